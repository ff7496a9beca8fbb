//! CIFAR-10 and CIFAR-100 binary batches (`data_batch_1.bin`, `train.bin`, ...).
//!
//! A CIFAR-10 record is 1 label byte followed by 3,072 pixel bytes (the red,
//! green and blue 32×32 planes); a CIFAR-100 record has 2 label bytes (coarse
//! then fine) before the pixels. A file is a whole number of records.

use std::path::Path;

use super::InMemoryDataset;
use crate::{Error, Result};

/// Bytes of one CIFAR image (3×32×32).
pub const CIFAR_IMAGE_BYTES: usize = 3 * 32 * 32;

/// Which CIFAR layout, and for CIFAR-100 which label to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CifarKind {
    /// CIFAR-10: one label byte, 10 classes.
    Cifar10,
    /// CIFAR-100 with its 100 fine labels.
    Cifar100Fine,
    /// CIFAR-100 with its 20 coarse (superclass) labels.
    Cifar100Coarse,
}

impl CifarKind {
    fn label_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1,
            _ => 2,
        }
    }

    /// The number of classes of this labelling.
    pub fn num_classes(self) -> u32 {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100Fine => 100,
            CifarKind::Cifar100Coarse => 20,
        }
    }

    /// Bytes of one record (labels and pixels).
    pub fn record_bytes(self) -> usize {
        self.label_bytes() + CIFAR_IMAGE_BYTES
    }
}

/// Parses one CIFAR binary batch held in memory; `source` names it in errors.
///
/// ```
/// use aimass::data::cifar::{parse_cifar, CifarKind};
/// let mut rec = vec![7u8];
/// rec.extend(std::iter::repeat(128).take(3072));
/// let ds = parse_cifar(&rec, CifarKind::Cifar10, "batch.bin")?;
/// assert_eq!(ds.labels(), &[7]);
/// assert!(parse_cifar(&rec[..100], CifarKind::Cifar10, "batch.bin").is_err());
/// # Ok::<(), aimass::Error>(())
/// ```
pub fn parse_cifar(
    bytes: &[u8],
    kind: CifarKind,
    source: impl AsRef<Path>,
) -> Result<InMemoryDataset> {
    let source = source.as_ref();
    let rec = kind.record_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(rec) {
        return Err(Error::malformed(
            source,
            "CIFAR batch size",
            format!("a non-zero multiple of {rec} bytes ({kind:?} records)"),
            format!(
                "{} bytes ({} whole records and {} extra bytes)",
                bytes.len(),
                bytes.len() / rec,
                bytes.len() % rec
            ),
        ));
    }
    let n = bytes.len() / rec;
    let mut pixels = Vec::with_capacity(n * CIFAR_IMAGE_BYTES);
    let mut labels = Vec::with_capacity(n);
    for (i, r) in bytes.chunks_exact(rec).enumerate() {
        let label = match kind {
            CifarKind::Cifar10 | CifarKind::Cifar100Coarse => r[0],
            CifarKind::Cifar100Fine => r[1],
        };
        if u32::from(label) >= kind.num_classes() {
            return Err(Error::malformed(
                source,
                format!("label of record {i}"),
                format!("a label below {} ({kind:?})", kind.num_classes()),
                format!("{label}"),
            ));
        }
        labels.push(u32::from(label));
        pixels.extend_from_slice(&r[kind.label_bytes()..]);
    }
    InMemoryDataset::new(pixels, labels, (3, 32, 32))
}

/// Reads and concatenates CIFAR binary batches, e.g. the five
/// `data_batch_*.bin` of CIFAR-10 or `train.bin` of CIFAR-100.
pub fn read_cifar<P: AsRef<Path>>(paths: &[P], kind: CifarKind) -> Result<InMemoryDataset> {
    let mut parts = Vec::with_capacity(paths.len());
    for p in paths {
        let p = p.as_ref();
        let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
        parts.push(parse_cifar(&bytes, kind, p)?);
    }
    InMemoryDataset::concat(&parts)
}
