//! A directory of numbered checkpoints that keeps the last k, finds the
//! newest one that verifies, and the callback that fills it periodically.
//!
//! Files are named by the global step, zero-padded to 12 digits so that
//! they sort by name: `ckpt-000000000124.safetensors` is the checkpoint
//! after 124 steps. The checkpoint after epoch `n` of a run with `b` batches
//! per epoch is [`CheckpointDir::path`]`(n * b)`.

use std::fs;
use std::path::{Path, PathBuf};

use candle_core::Device;

use super::callback::{Callback, EpochInfo, TrainingState};
use super::Checkpoint;
use crate::{Error, Result};

/// Checkpoints `ckpt-<step, 12 digits>.safetensors` (e.g.
/// `ckpt-000000000124.safetensors`) in one directory, keeping the last k.
///
/// Temporary files of interrupted writes (`ckpt-<step>.safetensors.tmp-<pid>`)
/// are removed when the directory is opened and after every save; no other
/// file is ever touched.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    dir: PathBuf,
    keep_last: usize,
}

const PREFIX: &str = "ckpt-";
const SUFFIX: &str = ".safetensors";
const TMP: &str = ".tmp-";

/// A checkpoint that [`CheckpointDir::load_latest_valid`] passed over, and why.
#[derive(Debug)]
#[non_exhaustive]
pub struct SkippedCheckpoint {
    /// The file.
    pub path: PathBuf,
    /// Why it was skipped (corrupt, truncated, unreadable, ...).
    pub error: Error,
}

/// The newest checkpoint of a [`CheckpointDir`] that verifies.
#[derive(Debug)]
#[non_exhaustive]
pub struct LatestValid {
    /// Its step (from the file name, equal to its metadata's).
    pub step: u64,
    /// Its file.
    pub path: PathBuf,
    /// The loaded checkpoint.
    pub checkpoint: Checkpoint,
    /// The newer checkpoints that did not verify, newest first.
    pub skipped: Vec<SkippedCheckpoint>,
}

/// The step of a checkpoint file name (`ckpt-<digits>.safetensors`).
fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix(PREFIX)?
        .strip_suffix(SUFFIX)?
        .parse::<u64>()
        .ok()
}

/// Whether `name` is a temporary file of an interrupted checkpoint write
/// (`ckpt-<digits>.safetensors.tmp-<digits>`).
fn is_own_temp(name: &str) -> bool {
    name.split_once(TMP).is_some_and(|(ckpt, pid)| {
        step_of(ckpt).is_some() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
    })
}

impl CheckpointDir {
    /// Creates the directory if needed and removes the temporary files of
    /// interrupted checkpoint writes; `keep_last` ≥ 1 checkpoints are kept.
    pub fn new(dir: impl AsRef<Path>, keep_last: usize) -> Result<Self> {
        if keep_last == 0 {
            return Err(Error::config("CheckpointDir::keep_last", 0, "must be >= 1"));
        }
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let cd = CheckpointDir { dir, keep_last };
        cd.remove_temps()?;
        Ok(cd)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of the checkpoint of `step`:
    /// `<dir>/ckpt-<step, zero-padded to 12 digits>.safetensors`.
    pub fn path(&self, step: u64) -> PathBuf {
        self.dir.join(format!("{PREFIX}{step:012}{SUFFIX}"))
    }

    /// Saves `ckpt` as the checkpoint of `step` (atomically), then deletes
    /// all but the `keep_last` newest. Returns the path written. On error
    /// (a non-finite tensor, a full disk) the earlier checkpoints are kept
    /// and no temporary file is left behind.
    pub fn save(&self, ckpt: &Checkpoint, step: u64) -> Result<PathBuf> {
        let path = self.path(step);
        let saved = ckpt.save(&path);
        self.remove_temps()?;
        saved?;
        let all = self.list()?;
        for (_, old) in all.iter().take(all.len().saturating_sub(self.keep_last)) {
            fs::remove_file(old).map_err(|e| Error::io(old, e))?;
        }
        Ok(path)
    }

    /// Removes the temporary files of interrupted checkpoint writes
    /// (`ckpt-<step>.safetensors.tmp-<pid>`), nothing else.
    fn remove_temps(&self) -> Result<()> {
        for entry in fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            let own = entry.file_name().to_str().is_some_and(is_own_temp);
            if own && entry.file_type().is_ok_and(|t| t.is_file()) {
                let p = entry.path();
                fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        Ok(())
    }

    /// The checkpoints present, oldest first, with their step.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            if let Some(step) = entry.file_name().to_str().and_then(step_of) {
                out.push((step, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The newest checkpoint, if any (temporary files of an interrupted
    /// write are never listed). It is not loaded, so it may be damaged: to
    /// resume, prefer [`CheckpointDir::load_latest_valid`].
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        Ok(self.list()?.pop().map(|(_, p)| p))
    }

    /// Loads the newest checkpoint that verifies (see [`Checkpoint::load`];
    /// its metadata step must also match its file name), placing its
    /// tensors on `device`, and says which newer ones were skipped and why.
    ///
    /// `Ok(None)` when the directory holds no checkpoint; an
    /// [`Error::Malformed`] listing every file and its error when it holds
    /// some and none verifies.
    pub fn load_latest_valid(&self, device: &Device) -> Result<Option<LatestValid>> {
        let mut skipped = Vec::new();
        for (step, path) in self.list()?.into_iter().rev() {
            match load_checked(&path, step, device) {
                Ok(checkpoint) => {
                    return Ok(Some(LatestValid {
                        step,
                        path,
                        checkpoint,
                        skipped,
                    }))
                }
                Err(error) => skipped.push(SkippedCheckpoint { path, error }),
            }
        }
        if skipped.is_empty() {
            return Ok(None);
        }
        let found: Vec<String> = skipped
            .iter()
            .map(|s| format!("{}: {}", s.path.display(), s.error))
            .collect();
        Err(Error::malformed(
            &self.dir,
            "checkpoint directory",
            "at least one checkpoint that verifies",
            format!("none of {}: {}", skipped.len(), found.join("; ")),
        ))
    }
}

/// Loads the checkpoint of `step` at `path`, checking its stored step
/// against the file name.
fn load_checked(path: &Path, step: u64, device: &Device) -> Result<Checkpoint> {
    let c = Checkpoint::load(path, device)?;
    if c.meta("step").is_some() {
        let stored: u64 = c.meta_parse("step")?;
        if stored != step {
            return Err(Error::malformed(
                path,
                "checkpoint step",
                format!("step {step} (the file name)"),
                format!("step {stored} in its metadata (a renamed file?)"),
            ));
        }
    }
    Ok(c)
}

/// Saves a checkpoint every `every_epochs` epochs and at the end of training.
pub struct PeriodicCheckpoint {
    dir: CheckpointDir,
    every_epochs: usize,
    last_step: Option<u64>,
}

impl PeriodicCheckpoint {
    /// Checkpoints into `dir` every `every_epochs` (≥ 1) epochs.
    pub fn new(dir: CheckpointDir, every_epochs: usize) -> Result<Self> {
        if every_epochs == 0 {
            return Err(Error::config(
                "PeriodicCheckpoint::every_epochs",
                0,
                "must be >= 1",
            ));
        }
        Ok(PeriodicCheckpoint {
            dir,
            every_epochs,
            last_step: None,
        })
    }
}

impl Callback for PeriodicCheckpoint {
    fn after_epoch_end(&mut self, info: &EpochInfo<'_>, state: &dyn TrainingState) -> Result<()> {
        if info.epoch.is_multiple_of(self.every_epochs) {
            self.dir.save(&state.checkpoint()?, info.step)?;
            self.last_step = Some(info.step);
        }
        Ok(())
    }

    fn on_end(&mut self, state: &dyn TrainingState) -> Result<()> {
        let ckpt = state.checkpoint()?;
        let step: u64 = ckpt.meta_parse("step")?;
        if self.last_step != Some(step) {
            self.dir.save(&ckpt, step)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn keeps_the_last_k() {
        let d = std::env::temp_dir().join(format!("aimass-ckdir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let cd = CheckpointDir::new(&d, 2).unwrap();
        let mut c = Checkpoint::new("t");
        c.insert_tensor("w", Tensor::new(&[1f32], &Device::Cpu).unwrap());
        for s in [5, 10, 15] {
            cd.save(&c, s).unwrap();
        }
        fs::write(d.join("ckpt-000000000099.safetensors.tmp-1"), b"x").unwrap();
        let steps: Vec<u64> = cd.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![10, 15]);
        assert!(cd
            .latest()
            .unwrap()
            .unwrap()
            .ends_with("ckpt-000000000015.safetensors"));
        assert!(CheckpointDir::new(&d, 0).is_err());
        fs::remove_dir_all(&d).unwrap();
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("aimass-ckdir-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn names(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn ckpt(step: u64, w: f32) -> Checkpoint {
        let mut c = Checkpoint::new("t");
        c.insert_tensor("w", Tensor::new(&[w], &Device::Cpu).unwrap());
        c.set_meta("step", step);
        c
    }

    #[test]
    fn removes_its_own_temporary_files_and_nothing_else() {
        let d = tmpdir("tmp");
        fs::create_dir_all(&d).unwrap();
        let others = [
            "ckpt-000000000005.safetensors.tmp-abc",
            "ckpt-x.safetensors.tmp-12",
            "notes.txt",
            "other.safetensors.tmp-12",
            "weights.safetensors",
        ];
        for n in others {
            fs::write(d.join(n), b"keep").unwrap();
        }
        fs::write(d.join("ckpt-000000000005.safetensors.tmp-4242"), b"x").unwrap();
        fs::create_dir(d.join("ckpt-000000000006.safetensors.tmp-1")).unwrap();
        let cd = CheckpointDir::new(&d, 2).unwrap();
        let mut want: Vec<String> = others.iter().map(|s| s.to_string()).collect();
        want.push("ckpt-000000000006.safetensors.tmp-1".into()); // a directory
        want.sort();
        assert_eq!(names(&d), want);
        // A save that fails (non-finite weights) leaves no temporary file
        // and keeps the earlier checkpoints; an interrupted write's leftover
        // goes at the next save.
        cd.save(&ckpt(10, 1.0), 10).unwrap();
        fs::write(d.join("ckpt-000000000012.safetensors.tmp-99"), b"x").unwrap();
        let e = cd.save(&ckpt(20, f32::NAN), 20).unwrap_err();
        assert!(matches!(e, Error::NonFinite { .. }), "{e}");
        want.push("ckpt-000000000010.safetensors".into());
        want.sort();
        assert_eq!(names(&d), want);
        assert_eq!(cd.path(10), d.join("ckpt-000000000010.safetensors"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn load_latest_valid_skips_damaged_checkpoints() {
        let d = tmpdir("valid");
        let cd = CheckpointDir::new(&d, 5).unwrap();
        assert!(cd.load_latest_valid(&Device::Cpu).unwrap().is_none());
        for s in [5, 10, 15] {
            cd.save(&ckpt(s, s as f32), s).unwrap();
        }
        // 15: one flipped bit; 10: truncated; a copy of 5 renamed to 20.
        let mut b = fs::read(cd.path(15)).unwrap();
        let n = b.len();
        b[n - 2] ^= 4;
        fs::write(cd.path(15), b).unwrap();
        let b = fs::read(cd.path(10)).unwrap();
        fs::write(cd.path(10), &b[..b.len() / 2]).unwrap();
        fs::copy(cd.path(5), cd.path(20)).unwrap();
        let found = cd.load_latest_valid(&Device::Cpu).unwrap().unwrap();
        assert_eq!((found.step, &found.path), (5, &cd.path(5)));
        assert_eq!(
            found
                .checkpoint
                .tensor("w")
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![5.0]
        );
        let why: Vec<(PathBuf, String)> = found
            .skipped
            .iter()
            .map(|s| (s.path.clone(), s.error.to_string()))
            .collect();
        assert_eq!(why.len(), 3, "{why:?}");
        assert_eq!(why[0].0, cd.path(20));
        assert!(why[0].1.contains("renamed"), "{}", why[0].1);
        assert!(why[1].1.contains("corrupt"), "{}", why[1].1);
        assert!(why[2].1.contains("truncated"), "{}", why[2].1);
        // Nothing valid: an error that lists every file.
        fs::remove_file(cd.path(5)).unwrap();
        let e = cd.load_latest_valid(&Device::Cpu).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Malformed { .. }), "{msg}");
        for s in [10, 15, 20] {
            assert!(msg.contains(&format!("ckpt-{s:012}")), "{msg}");
        }
        fs::remove_dir_all(&d).unwrap();
    }
}
