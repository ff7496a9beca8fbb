//! Checkpoints: named tensors plus metadata in one safetensors file, written
//! atomically and verified on load.
//!
//! A [`Checkpoint`] is a bag of named tensors (model weights of every
//! network of a trainer, optimizer state, ...) and string metadata (format
//! version, trainer kind, step, epoch, RNG and data-order state, config).
//! [`Checkpoint::save`] writes a temporary file next to the target, fsyncs
//! it, renames it over the target and fsyncs the directory, so a crash at any
//! moment leaves either the old or the new checkpoint, never a torn one.
//! [`Checkpoint::load`] checks the format version and a CRC-32 of every
//! tensor, so a truncated, corrupt or foreign file is an [`Error`] and
//! nothing is half-applied.
//!
//! ```
//! use aimass::candle::{Device, Tensor};
//! use aimass::train::Checkpoint;
//!
//! let dir = std::env::temp_dir().join(format!("aimass-doc-ckpt-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("run.safetensors");
//!
//! let mut ckpt = Checkpoint::new("example");
//! ckpt.insert_tensor("model/w", Tensor::new(&[1.0f32, 2.0], &Device::Cpu)?);
//! ckpt.set_meta("step", 42);
//! ckpt.save(&path)?;
//!
//! let back = Checkpoint::load(&path, &Device::Cpu)?;
//! assert_eq!(back.meta_parse::<u64>("step")?, 42);
//! assert_eq!(back.tensor("model/w")?.to_vec1::<f32>()?, vec![1.0, 2.0]);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), aimass::Error>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};

use crate::{Error, Result};

/// Named tensors and metadata, saved and loaded as one safetensors file.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    kind: String,
    tensors: BTreeMap<String, Tensor>,
    meta: BTreeMap<String, String>,
}

impl Checkpoint {
    /// An empty checkpoint for a trainer of the given kind (e.g.
    /// `"classifier"`); loading checks the kind.
    pub fn new(kind: impl Into<String>) -> Self {
        Checkpoint {
            kind: kind.into(),
            tensors: BTreeMap::new(),
            meta: BTreeMap::new(),
        }
    }

    /// The trainer kind recorded in the checkpoint.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Adds (or replaces) one tensor.
    pub fn insert_tensor(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Adds every tensor of `map` under `prefix` + `/` + its name.
    pub fn insert_tensors<'a>(
        &mut self,
        prefix: &str,
        map: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
    ) {
        for (name, t) in map {
            self.tensors.insert(format!("{prefix}/{name}"), t.clone());
        }
    }

    /// Adds the current values of every var of a `VarMap` under `prefix`.
    pub fn insert_varmap(&mut self, prefix: &str, varmap: &candle_nn::VarMap) -> Result<()> {
        let data = varmap.data().lock().map_err(|_| {
            Error::invalid("Checkpoint::insert_varmap", "the VarMap lock is poisoned")
        })?;
        for (name, var) in data.iter() {
            self.tensors
                .insert(format!("{prefix}/{name}"), var.as_tensor().copy()?);
        }
        Ok(())
    }

    /// The tensor called `name`, or an error naming it.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| {
            Error::malformed(
                Path::new("<checkpoint>"),
                "checkpoint tensors",
                format!("a tensor named `{name}`"),
                "none",
            )
        })
    }

    /// All tensors whose name starts with `prefix/`, with the prefix removed.
    pub fn tensors_with_prefix(&self, prefix: &str) -> HashMap<String, Tensor> {
        let p = format!("{prefix}/");
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&p).map(|n| (n.to_string(), v.clone())))
            .collect()
    }

    /// Every tensor, by name.
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    /// Adds every entry of `part` under `scope`: metadata entry `key` as
    /// `scope.key`, tensor `name` as `scope/name`.
    pub(crate) fn insert_part(&mut self, scope: &str, part: &Checkpoint) {
        for (k, v) in &part.meta {
            self.meta.insert(format!("{scope}.{k}"), v.clone());
        }
        for (k, t) in &part.tensors {
            self.tensors.insert(format!("{scope}/{k}"), t.clone());
        }
    }

    /// The entries stored under `scope` by [`Checkpoint::insert_part`], as
    /// a checkpoint of kind `kind`.
    pub(crate) fn part(&self, scope: &str, kind: &str) -> Checkpoint {
        let p = format!("{scope}.");
        let meta = self
            .meta
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&p).map(|k| (k.to_string(), v.clone())))
            .collect();
        Checkpoint {
            kind: kind.to_string(),
            tensors: self.tensors_with_prefix(scope).into_iter().collect(),
            meta,
        }
    }

    /// Adds every metadata entry and tensor of `other` (replacing entries
    /// of the same name).
    pub(crate) fn merge(&mut self, other: &Checkpoint) {
        self.meta
            .extend(other.meta.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.tensors
            .extend(other.tensors.iter().map(|(k, t)| (k.clone(), t.clone())));
    }

    /// Sets a metadata entry.
    pub fn set_meta(&mut self, key: impl Into<String>, value: impl ToString) {
        self.meta.insert(key.into(), value.to_string());
    }

    /// A metadata entry, if present.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta.get(key).map(String::as_str)
    }

    /// A metadata entry parsed as `T`; missing or unparsable is an error.
    pub fn meta_parse<T: std::str::FromStr>(&self, key: &str) -> Result<T> {
        let v = self.meta(key).ok_or_else(|| {
            Error::malformed(
                "<checkpoint>",
                "checkpoint metadata",
                format!("an entry `{key}`"),
                "none",
            )
        })?;
        v.parse().map_err(|_| {
            Error::malformed(
                "<checkpoint>",
                "checkpoint metadata",
                format!("a valid `{key}`"),
                format!("{v:?}"),
            )
        })
    }

    /// Writes the checkpoint to `path` atomically (temporary file, fsync,
    /// rename, directory fsync).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let tmp = self.write_temp(path)?;
        crate::atomic_file::commit(&tmp, path)
    }

    /// The first half of [`Checkpoint::save`]: writes and fsyncs the
    /// temporary file, returning its path. Until it is renamed, the previous
    /// checkpoint at `path` is untouched.
    pub(crate) fn write_temp(&self, path: &Path) -> Result<PathBuf> {
        crate::atomic_file::write_temp(path, &self.to_bytes()?)
    }

    /// Serialises to safetensors bytes (with the version, kind and a
    /// checksum over all metadata and tensors in the metadata).
    ///
    /// A float tensor holding a NaN or infinite value (weights that
    /// overflowed, a poisoned optimizer state) is [`Error::NonFinite`]
    /// naming it: such a checkpoint is never written.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        super::checkpoint_format::encode(&self.kind, &self.tensors, &self.meta)
    }

    /// Reads and verifies a checkpoint file, placing its tensors on `device`.
    ///
    /// Errors: [`Error::Io`] if the file cannot be read; [`Error::Malformed`]
    /// if it is truncated, corrupt (a checksum over every metadata entry and
    /// every tensor does not match: one flipped bit anywhere that matters is
    /// caught), of another format version, or not an aimass checkpoint.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, path, device)
    }

    /// Parses and verifies checkpoint bytes (see [`Checkpoint::load`]);
    /// `path` is only used in error messages.
    pub fn from_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<Self> {
        let (kind, tensors, meta) = super::checkpoint_format::decode(bytes, path, device)?;
        Ok(Checkpoint {
            kind,
            tensors,
            meta,
        })
    }

    /// Checks that the checkpoint was written by a trainer of `kind`.
    pub fn expect_kind(&self, kind: &str) -> Result<()> {
        if self.kind != kind {
            return Err(Error::malformed(
                "<checkpoint>",
                "checkpoint kind",
                format!("a `{kind}` checkpoint"),
                format!("a `{}` checkpoint", self.kind),
            ));
        }
        Ok(())
    }

    /// Copies the tensors under `prefix` into the vars of `varmap`.
    ///
    /// All names and shapes are checked first: a missing, unexpected or
    /// mis-shaped tensor is an error that names it, and then no var has been
    /// changed.
    pub fn restore_varmap(&self, prefix: &str, varmap: &candle_nn::VarMap) -> Result<()> {
        self.check_varmap(prefix, varmap)?;
        let data = varmap.data().lock().map_err(|_| {
            Error::invalid("Checkpoint::restore_varmap", "the VarMap lock is poisoned")
        })?;
        let saved = self.tensors_with_prefix(prefix);
        for (name, var) in data.iter() {
            if let Some(t) = saved.get(name) {
                var.set(t)?;
            }
        }
        Ok(())
    }

    /// Checks, without changing anything, that the tensors under `prefix`
    /// match the vars of `varmap` exactly (names, shapes, dtypes).
    pub fn check_varmap(&self, prefix: &str, varmap: &candle_nn::VarMap) -> Result<()> {
        let data = varmap.data().lock().map_err(|_| {
            Error::invalid("Checkpoint::check_varmap", "the VarMap lock is poisoned")
        })?;
        let saved = self.tensors_with_prefix(prefix);
        let vars: BTreeMap<&String, &Var> = data.iter().collect();
        check_same_names(prefix, saved.keys(), vars.keys().copied())?;
        for (name, var) in &vars {
            let t = &saved[*name];
            if t.dims() != var.dims() || t.dtype() != var.dtype() {
                return Err(Error::shape(
                    format!("restoring `{prefix}/{name}`"),
                    format!("{:?} {:?}", var.dims(), var.dtype()),
                    (t.dims(), t.dtype()),
                ));
            }
        }
        Ok(())
    }
}

/// Errors unless the two name sets are equal, naming the differences.
pub(crate) fn check_same_names<'a>(
    what: &str,
    saved: impl Iterator<Item = &'a String>,
    expected: impl Iterator<Item = &'a String>,
) -> Result<()> {
    let saved: std::collections::BTreeSet<&String> = saved.collect();
    let expected: std::collections::BTreeSet<&String> = expected.collect();
    let missing: Vec<&&String> = expected.difference(&saved).collect();
    let unexpected: Vec<&&String> = saved.difference(&expected).collect();
    if missing.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    Err(Error::malformed(
        "<checkpoint>",
        format!("`{what}` tensors"),
        "the model's tensors",
        format!("missing {missing:?}, unexpected {unexpected:?} (a checkpoint of another model?)"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::checkpoint_format::KEY_VERSION;

    fn sample(v: f32) -> Checkpoint {
        let mut c = Checkpoint::new("test");
        c.insert_tensor(
            "model/w",
            Tensor::new(&[[v, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap(),
        );
        c.insert_tensor("optim/step", Tensor::new(&[7u32], &Device::Cpu).unwrap());
        c.set_meta("epoch", 3);
        c
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("aimass-ckpt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip() {
        let d = tmpdir("rt");
        let p = d.join("a.safetensors");
        sample(1.0).save(&p).unwrap();
        let c = Checkpoint::load(&p, &Device::Cpu).unwrap();
        assert_eq!(c.kind(), "test");
        assert_eq!(c.meta_parse::<u32>("epoch").unwrap(), 3);
        assert_eq!(
            c.tensor("model/w").unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 2.0], vec![3.0, 4.0]]
        );
        assert!(c.expect_kind("other").is_err());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn crash_between_write_and_rename_keeps_the_old_checkpoint() {
        let d = tmpdir("crash");
        let p = d.join("a.safetensors");
        sample(1.0).save(&p).unwrap();
        // The new checkpoint is fully written to its temporary file, then the
        // process "dies" before the rename.
        let tmp = sample(9.0).write_temp(&p).unwrap();
        assert!(tmp.exists());
        let c = Checkpoint::load(&p, &Device::Cpu).unwrap();
        assert_eq!(
            c.tensor("model/w").unwrap().to_vec2::<f32>().unwrap()[0][0],
            1.0
        );
        // A half-written temporary file does not matter either.
        fs::write(&tmp, b"garbage").unwrap();
        assert!(Checkpoint::load(&p, &Device::Cpu).is_ok());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn truncated_corrupt_and_foreign_files_are_errors() {
        let d = tmpdir("bad");
        let bytes = sample(1.0).to_bytes().unwrap();
        for cut in [0, 4, 8, 20, bytes.len() / 2, bytes.len() - 1] {
            let e =
                Checkpoint::from_bytes(&bytes[..cut], Path::new("x"), &Device::Cpu).unwrap_err();
            assert!(matches!(e, Error::Malformed { .. }), "cut {cut}: {e}");
        }
        // Flip a bit in the tensor data (the last bytes of the file).
        let mut flipped = bytes.clone();
        let n = flipped.len();
        flipped[n - 3] ^= 0x10;
        let e = Checkpoint::from_bytes(&flipped, Path::new("x"), &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
        // A plain safetensors file (no aimass metadata).
        let plain =
            safetensors::serialize([("w", &Tensor::new(&[1f32], &Device::Cpu).unwrap())], None)
                .unwrap();
        assert!(Checkpoint::from_bytes(&plain, Path::new("x"), &Device::Cpu).is_err());
        // Another format version.
        let mut meta = HashMap::new();
        meta.insert(KEY_VERSION.to_string(), "999".to_string());
        let future = safetensors::serialize(
            [("w", &Tensor::new(&[1f32], &Device::Cpu).unwrap())],
            Some(meta),
        )
        .unwrap();
        let e = Checkpoint::from_bytes(&future, Path::new("x"), &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("version 999"), "{e}");
        // A missing file.
        assert!(matches!(
            Checkpoint::load(d.join("nope"), &Device::Cpu),
            Err(Error::Io { .. })
        ));
        fs::remove_dir_all(d).unwrap();
    }

    /// Kind, metadata and tensor values of a checkpoint.
    type Content = (String, BTreeMap<String, String>, Vec<(String, Vec<u8>)>);

    /// Everything a checkpoint holds.
    fn content(c: &Checkpoint) -> Content {
        let tensors = c
            .tensors()
            .iter()
            .map(|(k, t)| {
                let t = t.flatten_all().unwrap().to_dtype(candle_core::DType::F64);
                (
                    k.clone(),
                    format!("{:?}", t.unwrap().to_vec1::<f64>().unwrap()).into_bytes(),
                )
            })
            .collect();
        (c.kind.clone(), c.meta.clone(), tensors)
    }

    #[test]
    fn every_flipped_bit_is_caught_or_changes_nothing() {
        let mut c = sample(1.0);
        c.set_meta("step", 14);
        c.set_meta("data.epoch", 2);
        let bytes = c.to_bytes().unwrap();
        let want = content(&c);
        let (mut caught, mut harmless) = (0, 0);
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                match Checkpoint::from_bytes(&b, Path::new("x"), &Device::Cpu) {
                    Err(Error::Malformed { .. }) => caught += 1,
                    Err(e) => panic!("byte {i} bit {bit}: not Malformed: {e}"),
                    Ok(d) => {
                        assert!(
                            content(&d) == want,
                            "byte {i} bit {bit} changed the checkpoint without an error"
                        );
                        harmless += 1;
                    }
                }
            }
        }
        assert_eq!(caught + harmless, bytes.len() * 8);
        assert!(
            caught > harmless * 20,
            "{caught} caught, {harmless} harmless"
        );
        // The case of the report: the stored step, "14" -> "15".
        let at = bytes
            .windows(11)
            .position(|w| w == b"\"step\":\"14\"")
            .unwrap();
        let mut b = bytes.clone();
        b[at + 9] ^= 1;
        let e = Checkpoint::from_bytes(&b, Path::new("x"), &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
    }

    #[test]
    fn non_finite_tensors_are_never_written() {
        let d = tmpdir("nonfinite");
        let p = d.join("a.safetensors");
        sample(1.0).save(&p).unwrap();
        let before = fs::read(&p).unwrap();
        for bad in [f32::NAN, f32::INFINITY] {
            let mut c = sample(bad);
            c.set_meta("step", 12);
            let e = c.save(&p).unwrap_err();
            assert!(
                matches!(&e, Error::NonFinite { step: Some(12), quantity, .. } if quantity.contains("`model/w`")),
                "{e}"
            );
        }
        // The previous checkpoint is intact and no temporary file was left.
        assert_eq!(fs::read(&p).unwrap(), before);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn restore_checks_everything_before_changing_anything() {
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &Device::Cpu);
        let a = vb
            .get_with_hints((2, 2), "a", candle_nn::Init::Const(0.0))
            .unwrap();
        let _b = vb
            .get_with_hints(3, "b", candle_nn::Init::Const(0.0))
            .unwrap();
        let mut c = Checkpoint::new("test");
        c.insert_tensor(
            "model/a",
            Tensor::ones((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        c.insert_tensor(
            "model/b",
            Tensor::ones(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        let e = c.restore_varmap("model", &vm).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }), "{e}");
        // `a` was not touched even though it came first.
        assert_eq!(a.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        c.insert_tensor(
            "model/b",
            Tensor::ones(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        c.insert_tensor(
            "model/extra",
            Tensor::ones(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        let e = c.restore_varmap("model", &vm).unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        c.tensors.remove("model/extra");
        c.restore_varmap("model", &vm).unwrap();
        assert_eq!(a.sum_all().unwrap().to_scalar::<f32>().unwrap(), 4.0);
    }
}
