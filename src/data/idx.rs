//! IDX files (MNIST, Fashion-MNIST, EMNIST, KMNIST), raw or gzip-compressed.
//!
//! Format (big-endian): two zero bytes, a type byte (`0x08` = unsigned
//! byte, the only type image datasets use), the number of dimensions `d`,
//! then `d` 32-bit sizes, then the values in row-major order. An image
//! file has `d = 3` (`N×H×W`), a label file `d = 1`.
//!
//! Every check happens before anything is allocated from the header: the
//! product of the sizes is computed with overflow checks and compared with
//! the number of bytes actually present.

use std::io::Read;
use std::path::Path;

use super::InMemoryDataset;
use crate::{Error, Result};

/// Gzip streams start with these two bytes.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Decompressed files larger than this are refused (the largest IDX
/// dataset, EMNIST ByClass, is about 550 MB).
pub const MAX_DECOMPRESSED_BYTES: u64 = 4 << 30;

/// The content of an IDX file of unsigned bytes: its dimensions and values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// The sizes from the header, outermost first.
    pub dims: Vec<usize>,
    /// The values, row-major; `data.len()` is the product of `dims`.
    pub data: Vec<u8>,
}

/// Parses IDX bytes (gzip-compressed or raw; detected from the first two
/// bytes). `source` names the file in error messages.
///
/// ```
/// use aimass::data::idx::parse_idx;
/// // A 1-D IDX file with three values.
/// let bytes = [0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9];
/// let a = parse_idx(&bytes, "labels.idx")?;
/// assert_eq!(a.dims, vec![3]);
/// assert_eq!(a.data, vec![7, 8, 9]);
/// assert!(parse_idx(&bytes[..10], "labels.idx").is_err());
/// # Ok::<(), aimass::Error>(())
/// ```
pub fn parse_idx(bytes: &[u8], source: impl AsRef<Path>) -> Result<IdxArray> {
    let source = source.as_ref();
    if bytes.starts_with(&GZIP_MAGIC) {
        let raw = gunzip(bytes, source)?;
        parse_raw(&raw, source)
    } else {
        parse_raw(bytes, source)
    }
}

/// Reads and parses an IDX file (gzip or raw).
pub fn read_idx(path: impl AsRef<Path>) -> Result<IdxArray> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_idx(&bytes, path)
}

/// Decompresses a gzip stream, refusing outputs above [`MAX_DECOMPRESSED_BYTES`].
pub(crate) fn gunzip(bytes: &[u8], source: &Path) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut dec = flate2::read::MultiGzDecoder::new(bytes).take(MAX_DECOMPRESSED_BYTES + 1);
    dec.read_to_end(&mut out).map_err(|e| {
        Error::malformed(
            source,
            "gzip stream",
            "a complete gzip-compressed file",
            format!("a decoding error: {e}"),
        )
    })?;
    if out.len() as u64 > MAX_DECOMPRESSED_BYTES {
        return Err(Error::malformed(
            source,
            "gzip stream",
            format!("at most {MAX_DECOMPRESSED_BYTES} decompressed bytes"),
            "more",
        ));
    }
    Ok(out)
}

fn parse_raw(bytes: &[u8], source: &Path) -> Result<IdxArray> {
    let header =
        |expected: &str, found: String| Error::malformed(source, "IDX header", expected, found);
    if bytes.len() < 4 {
        return Err(header(
            "at least 4 bytes (magic number)",
            format!("{} bytes", bytes.len()),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(header(
            "magic number starting with 0x00 0x00 (IDX) or 0x1f 0x8b (gzip)",
            format!("0x{:02x} 0x{:02x}", bytes[0], bytes[1]),
        ));
    }
    if bytes[2] != 0x08 {
        return Err(header(
            "data type 0x08 (unsigned byte)",
            format!(
                "type 0x{:02x} (only unsigned-byte IDX files hold images and labels)",
                bytes[2]
            ),
        ));
    }
    let ndim = bytes[3] as usize;
    if ndim == 0 {
        return Err(header("at least one dimension", "0 dimensions".to_string()));
    }
    let data_start = 4 + 4 * ndim;
    if bytes.len() < data_start {
        return Err(header(
            &format!("{data_start} header bytes for {ndim} dimensions"),
            format!("a file of {} bytes", bytes.len()),
        ));
    }
    let mut dims = Vec::with_capacity(ndim);
    let mut total: usize = 1;
    for k in 0..ndim {
        let o = 4 + 4 * k;
        let d = u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize;
        dims.push(d);
        total = total.checked_mul(d).ok_or_else(|| {
            header(
                "dimensions whose product fits in memory",
                format!("{dims:?}..."),
            )
        })?;
    }
    let body = bytes.len() - data_start;
    if body != total {
        let what = if body < total {
            "truncated file"
        } else {
            "trailing bytes after the data"
        };
        return Err(Error::malformed(
            source,
            "IDX data",
            format!("{total} data bytes for dimensions {dims:?}"),
            format!("{body} ({what})"),
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[data_start..].to_vec(),
    })
}

/// Builds a dataset from an image IDX array (`N×H×W`) and a label IDX array
/// (`N`). The paths name the files in error messages.
pub fn idx_dataset(
    images: IdxArray,
    labels: IdxArray,
    images_path: &Path,
    labels_path: &Path,
) -> Result<InMemoryDataset> {
    let [n, h, w] = images.dims[..] else {
        return Err(Error::malformed(
            images_path,
            "IDX image header",
            "3 dimensions (count, height, width)",
            format!("{} dimensions {:?}", images.dims.len(), images.dims),
        ));
    };
    let [m] = labels.dims[..] else {
        return Err(Error::malformed(
            labels_path,
            "IDX label header",
            "1 dimension (count)",
            format!("{} dimensions {:?}", labels.dims.len(), labels.dims),
        ));
    };
    if n != m {
        return Err(Error::malformed(
            labels_path,
            "IDX label count",
            format!("{n} labels, one per image in `{}`", images_path.display()),
            format!("{m}"),
        ));
    }
    if h == 0 || w == 0 {
        return Err(Error::malformed(
            images_path,
            "IDX image header",
            "non-zero height and width",
            format!("{h}×{w}"),
        ));
    }
    let labels = labels.data.into_iter().map(u32::from).collect();
    InMemoryDataset::new(images.data, labels, (1, h, w))
}

/// Parses an image/label pair of IDX byte buffers (gzip or raw) into a
/// one-channel dataset; the names are used in error messages.
pub fn idx_dataset_from_bytes(
    images: &[u8],
    labels: &[u8],
    images_name: &str,
    labels_name: &str,
) -> Result<InMemoryDataset> {
    let (ip, lp) = (Path::new(images_name), Path::new(labels_name));
    idx_dataset(parse_idx(images, ip)?, parse_idx(labels, lp)?, ip, lp)
}

/// Reads an image/label pair of IDX files (gzip or raw) into a one-channel
/// dataset, e.g. `train-images-idx3-ubyte.gz` and `train-labels-idx1-ubyte.gz`.
///
/// EMNIST stores its images transposed (column-major); they load as they
/// are stored.
pub fn read_idx_dataset(
    images: impl AsRef<Path>,
    labels: impl AsRef<Path>,
) -> Result<InMemoryDataset> {
    let (ip, lp) = (images.as_ref(), labels.as_ref());
    idx_dataset(read_idx(ip)?, read_idx(lp)?, ip, lp)
}
