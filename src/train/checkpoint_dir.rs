//! A directory of numbered checkpoints that keeps the last k, and the
//! callback that fills it periodically.

use std::fs;
use std::path::{Path, PathBuf};

use super::callback::{Callback, Control, EpochInfo, TrainingState};
use super::Checkpoint;
use crate::{Error, Result};

/// Checkpoints `ckpt-<step>.safetensors` in one directory, keeping the last k.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    dir: PathBuf,
    keep_last: usize,
}

const PREFIX: &str = "ckpt-";
const SUFFIX: &str = ".safetensors";

impl CheckpointDir {
    /// Creates the directory if needed; `keep_last` ≥ 1 checkpoints are kept.
    pub fn new(dir: impl AsRef<Path>, keep_last: usize) -> Result<Self> {
        if keep_last == 0 {
            return Err(Error::config("CheckpointDir::keep_last", 0, "must be >= 1"));
        }
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(CheckpointDir { dir, keep_last })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Saves `ckpt` as the checkpoint of `step` (atomically), then deletes
    /// all but the `keep_last` newest. Returns the path written.
    pub fn save(&self, ckpt: &Checkpoint, step: u64) -> Result<PathBuf> {
        let path = self.dir.join(format!("{PREFIX}{step:012}{SUFFIX}"));
        ckpt.save(&path)?;
        let all = self.list()?;
        for (_, old) in all.iter().take(all.len().saturating_sub(self.keep_last)) {
            fs::remove_file(old).map_err(|e| Error::io(old, e))?;
        }
        Ok(path)
    }

    /// The checkpoints present, oldest first, with their step.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            let name = entry.file_name();
            let step = name
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|n| n.strip_suffix(SUFFIX))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(step) = step {
                out.push((step, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The newest checkpoint, if any (temporary files of an interrupted
    /// write are never listed).
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        Ok(self.list()?.pop().map(|(_, p)| p))
    }
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
    fn on_epoch_end(&mut self, info: &EpochInfo<'_>, state: &dyn TrainingState) -> Result<Control> {
        if info.epoch.is_multiple_of(self.every_epochs) {
            self.dir.save(&state.checkpoint()?, info.step)?;
            self.last_step = Some(info.step);
        }
        Ok(Control::Continue)
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
}
