//! The checkpoint file format: safetensors with aimass metadata, a CRC-32
//! over every byte that influences a resumed run, and no non-finite floats.
//!
//! Format version 2 (this one) checksums, in order: the metadata entries
//! sorted by key (format version, trainer kind, step, data position,
//! callback state, ... — everything but the checksum entry itself), then
//! every tensor sorted by name (name, dtype, shape, bytes); each field is
//! length-prefixed so that no two different contents hash the same bytes.
//! Version 1 checksummed the tensors only, so a flipped bit in the stored
//! step resumed at the wrong place; version 1 files are refused.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};
use safetensors::{Dtype, View};

use crate::{Error, Result};

/// The checkpoint format written by this version of aimass.
pub const FORMAT_VERSION: u32 = 2;

pub(crate) const KEY_VERSION: &str = "aimass.format_version";
pub(crate) const KEY_KIND: &str = "aimass.kind";
const KEY_CRC: &str = "aimass.crc32";

/// CRC-32 over length-prefixed fields.
struct Crc(crc32fast::Hasher);

impl Crc {
    fn new() -> Self {
        Crc(crc32fast::Hasher::new())
    }

    fn field(&mut self, bytes: &[u8]) {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn meta<'a>(&mut self, meta: impl Iterator<Item = (&'a String, &'a String)>) {
        for (k, v) in meta {
            self.field(k.as_bytes());
            self.field(v.as_bytes());
        }
    }

    fn tensor(&mut self, name: &str, dtype: Dtype, shape: &[usize], data: &[u8]) {
        self.field(name.as_bytes());
        self.field(format!("{dtype:?}{shape:?}").as_bytes());
        self.field(data);
    }

    fn finish(self) -> String {
        self.0.finalize().to_string()
    }
}

/// Serialises `tensors` and `meta` (to which the version, `kind` and the
/// checksum are added). A float tensor with a NaN or infinite value is
/// [`Error::NonFinite`] naming it, and nothing is serialised.
pub(crate) fn encode(
    kind: &str,
    tensors: &BTreeMap<String, Tensor>,
    meta: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut meta = meta.clone();
    meta.insert(KEY_VERSION.to_string(), FORMAT_VERSION.to_string());
    meta.insert(KEY_KIND.to_string(), kind.to_string());
    meta.remove(KEY_CRC);
    let mut crc = Crc::new();
    crc.meta(meta.iter());
    // Tensors must be contiguous for their bytes to be read.
    let tensors: Vec<(&String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k, t.contiguous()?)))
        .collect::<Result<_>>()?;
    for (name, t) in &tensors {
        let data = View::data(&t);
        if let Some(value) = first_non_finite(View::dtype(&t), &data) {
            let step = meta.get("step").and_then(|s| s.parse().ok());
            return Err(Error::non_finite(
                format!("value in checkpoint tensor `{name}` (the checkpoint was not written; an earlier one is kept)"),
                value,
                step,
            ));
        }
        crc.tensor(name, View::dtype(&t), View::shape(&t), &data);
    }
    let mut meta: HashMap<String, String> = meta.into_iter().collect();
    meta.insert(KEY_CRC.to_string(), crc.finish());
    safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta)).map_err(|e| {
        Error::invalid(
            "Checkpoint::save",
            format!("cannot serialise the checkpoint: {e}"),
        )
    })
}

/// What [`decode`] returns: kind, tensors (on the device), metadata without
/// the aimass entries.
pub(crate) type Decoded = (String, BTreeMap<String, Tensor>, BTreeMap<String, String>);

/// Parses and verifies checkpoint bytes; `path` is only used in errors.
pub(crate) fn decode(bytes: &[u8], path: &Path, device: &Device) -> Result<Decoded> {
    let bad =
        |what: &str, expected: &str, found: String| Error::malformed(path, what, expected, found);
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        bad(
            "safetensors data",
            "a complete safetensors file",
            format!("{e} (truncated or corrupt file?)"),
        )
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad("safetensors header", "a readable header", e.to_string()))?;
    let mut meta: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let version = meta.get(KEY_VERSION).ok_or_else(|| {
        bad(
            "checkpoint metadata",
            "an aimass checkpoint (`aimass.format_version`)",
            "a safetensors file without it".into(),
        )
    })?;
    if *version != FORMAT_VERSION.to_string() {
        let hint = if version == "1" {
            " (written by an earlier aimass, whose checksum did not cover the metadata; it cannot be verified: start a new run)"
        } else {
            ""
        };
        return Err(bad(
            "checkpoint format version",
            &format!("version {FORMAT_VERSION}"),
            format!("version {version}{hint}"),
        ));
    }
    let stored = meta
        .remove(KEY_CRC)
        .ok_or_else(|| bad("checkpoint metadata", "a checksum", "none".into()))?;
    let mut views = st.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let mut crc = Crc::new();
    crc.meta(meta.iter());
    for (name, view) in &views {
        crc.tensor(name, view.dtype(), view.shape(), view.data());
    }
    let actual = crc.finish();
    if stored != actual {
        return Err(bad(
            "checkpoint",
            &format!("CRC-32 {stored} over its metadata and tensors"),
            format!("{actual} (the file is corrupt)"),
        ));
    }
    meta.remove(KEY_VERSION);
    let kind = meta
        .remove(KEY_KIND)
        .ok_or_else(|| bad("checkpoint metadata", "a trainer kind", "none".into()))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in views {
        let t = view.load(device).map_err(|e| {
            bad(
                "checkpoint tensor",
                &format!("a loadable tensor `{name}`"),
                e.to_string(),
            )
        })?;
        tensors.insert(name, t);
    }
    Ok((kind, tensors, meta))
}

/// The first NaN or infinite value of float data, if any.
fn first_non_finite(dtype: Dtype, data: &[u8]) -> Option<f64> {
    fn scan<const N: usize>(data: &[u8], f: impl Fn([u8; N]) -> f64) -> Option<f64> {
        data.chunks_exact(N)
            .map(|c| {
                let mut b = [0u8; N];
                b.copy_from_slice(c);
                f(b)
            })
            .find(|v| !v.is_finite())
    }
    match dtype {
        Dtype::F64 => scan::<8>(data, f64::from_le_bytes),
        Dtype::F32 => scan::<4>(data, |b| f32::from_le_bytes(b) as f64),
        Dtype::F16 => scan::<2>(data, |b| half::f16::from_le_bytes(b).to_f64()),
        Dtype::BF16 => scan::<2>(data, |b| half::bf16::from_le_bytes(b).to_f64()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_found_in_every_float_dtype() {
        let dev = Device::Cpu;
        for dt in [
            candle_core::DType::F64,
            candle_core::DType::F32,
            candle_core::DType::F16,
            candle_core::DType::BF16,
        ] {
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                let t = Tensor::new(&[1.0f64, bad, 2.0], &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let v = first_non_finite(View::dtype(&&t), &View::data(&&t));
                assert!(v.is_some_and(|v| !v.is_finite()), "{dt:?} {bad}");
            }
            let ok = Tensor::new(&[1.0f64, -3.0, 1e4], &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            assert_eq!(first_non_finite(View::dtype(&&ok), &View::data(&&ok)), None);
        }
        let ints = Tensor::new(&[u32::MAX, 7], &dev).unwrap();
        assert_eq!(
            first_non_finite(View::dtype(&&ints), &View::data(&&ints)),
            None
        );
    }
}
