//! The [`Dataset`] trait and the in-memory image dataset every reader returns.

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::{Error, Result};

/// One labelled image: `C×H×W` bytes in channel-major order, and its class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample<'a> {
    /// The pixels, `C×H×W` values in `0..=255`, channel-major (CHW).
    pub pixels: Cow<'a, [u8]>,
    /// The class label, `0..num_classes`.
    pub label: u32,
}

/// A finite, indexable collection of labelled images of one shape.
///
/// Implement it to feed your own data to a [`DataLoader`](super::DataLoader)
/// or an [`EpisodeSampler`](super::EpisodeSampler): return the pixels as
/// `C×H×W` bytes (borrowed when they already live in memory, owned when you
/// decode them on demand) and a label. `get` may be called from several
/// threads at once.
pub trait Dataset: Send + Sync {
    /// The number of samples.
    fn len(&self) -> usize;

    /// Whether the dataset has no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape `(channels, height, width)` shared by every image.
    fn image_shape(&self) -> (usize, usize, usize);

    /// The sample at `index`; an [`Error::InvalidArgument`] when `index >= len()`.
    fn get(&self, index: usize) -> Result<Sample<'_>>;

    /// The label of sample `index` (override when it is cheaper than [`Dataset::get`]).
    fn label(&self, index: usize) -> Result<u32> {
        Ok(self.get(index)?.label)
    }
}

/// Images of one shape held in memory as bytes (`N×C×H×W`) with `u32` labels.
///
/// Every reader of this module returns one. It is cheap to index, to subset
/// and to split; converting to floats happens batch by batch in the
/// [`DataLoader`](super::DataLoader).
///
/// ```
/// use aimass::data::{Dataset, InMemoryDataset};
///
/// // Four 1×2×2 images, labels 0, 1, 0, 2.
/// let ds = InMemoryDataset::new((0..16).collect(), vec![0, 1, 0, 2], (1, 2, 2))?;
/// assert_eq!(ds.len(), 4);
/// assert_eq!(ds.get(1)?.pixels.as_ref(), &[4, 5, 6, 7]);
/// let (train, test) = ds.split_at(3)?;
/// assert_eq!((train.len(), test.len()), (3, 1));
/// let zeros = ds.filter_classes(&[0])?;
/// assert_eq!(zeros.labels(), &[0, 0]);
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct InMemoryDataset {
    pixels: Vec<u8>,
    labels: Vec<u32>,
    shape: (usize, usize, usize),
}

impl InMemoryDataset {
    /// Builds a dataset from `N×C×H×W` bytes and `N` labels.
    ///
    /// Errors when a dimension is zero or when the number of bytes is not
    /// `labels.len() × C × H × W`.
    pub fn new(pixels: Vec<u8>, labels: Vec<u32>, shape: (usize, usize, usize)) -> Result<Self> {
        let (c, h, w) = shape;
        if c == 0 || h == 0 || w == 0 {
            return Err(Error::shape(
                "InMemoryDataset::new",
                "an image shape (C, H, W) with every dimension > 0",
                shape,
            ));
        }
        let per = c * h * w;
        let expected = labels.len().checked_mul(per);
        if expected != Some(pixels.len()) {
            return Err(Error::shape(
                "InMemoryDataset::new",
                format!(
                    "{} labels × {c}×{h}×{w} = {:?} pixel bytes",
                    labels.len(),
                    expected
                ),
                pixels.len(),
            ));
        }
        Ok(Self {
            pixels,
            labels,
            shape,
        })
    }

    /// The number of samples (also [`Dataset::len`]).
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there is no sample.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// All pixels, `N×C×H×W` bytes.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// All labels, in sample order.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// The number of bytes of one image, `C×H×W`.
    pub fn image_len(&self) -> usize {
        self.shape.0 * self.shape.1 * self.shape.2
    }

    /// One more than the largest label (0 for an empty dataset).
    pub fn num_classes(&self) -> usize {
        self.labels.iter().max().map_or(0, |&m| m as usize + 1)
    }

    /// How many samples each label has, sorted by label.
    pub fn class_counts(&self) -> BTreeMap<u32, usize> {
        let mut m = BTreeMap::new();
        for &l in &self.labels {
            *m.entry(l).or_insert(0) += 1;
        }
        m
    }

    /// A new dataset made of the samples at `indices`, in that order
    /// (repeats allowed); an error names the first index out of range.
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        let per = self.image_len();
        let mut pixels = Vec::with_capacity(indices.len().saturating_mul(per));
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let label = *self
                .labels
                .get(i)
                .ok_or_else(|| self.out_of_range("subset", i))?;
            pixels.extend_from_slice(&self.pixels[i * per..(i + 1) * per]);
            labels.push(label);
        }
        Self::new(pixels, labels, self.shape)
    }

    /// The first `n` samples and the rest, in file order (the embedded
    /// Fashion-MNIST split is `split_at(8000)`).
    pub fn split_at(&self, n: usize) -> Result<(Self, Self)> {
        if n > self.len() {
            return Err(Error::invalid(
                "InMemoryDataset::split_at",
                format!("cannot take the first {n} of {} samples", self.len()),
            ));
        }
        let per = self.image_len();
        let (pa, pb) = self.pixels.split_at(n * per);
        let (la, lb) = self.labels.split_at(n);
        Ok((
            Self::new(pa.to_vec(), la.to_vec(), self.shape)?,
            Self::new(pb.to_vec(), lb.to_vec(), self.shape)?,
        ))
    }

    /// The samples whose label is in `classes`, in their original order
    /// (labels are kept, not remapped).
    pub fn filter_classes(&self, classes: &[u32]) -> Result<Self> {
        let keep: Vec<usize> = (0..self.len())
            .filter(|&i| classes.contains(&self.labels[i]))
            .collect();
        self.subset(&keep)
    }

    /// Concatenates datasets of the same image shape.
    pub fn concat(parts: &[Self]) -> Result<Self> {
        let Some(first) = parts.first() else {
            return Err(Error::invalid(
                "InMemoryDataset::concat",
                "no datasets given",
            ));
        };
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for p in parts {
            if p.shape != first.shape {
                return Err(Error::shape(
                    "InMemoryDataset::concat",
                    format!("{:?}", first.shape),
                    p.shape,
                ));
            }
            pixels.extend_from_slice(&p.pixels);
            labels.extend_from_slice(&p.labels);
        }
        Self::new(pixels, labels, first.shape)
    }

    fn out_of_range(&self, op: &str, i: usize) -> Error {
        Error::invalid(
            format!("InMemoryDataset::{op}"),
            format!(
                "index {i} out of range for a dataset of {} samples",
                self.len()
            ),
        )
    }
}

impl Dataset for InMemoryDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn image_shape(&self) -> (usize, usize, usize) {
        self.shape
    }

    fn get(&self, index: usize) -> Result<Sample<'_>> {
        let label = *self
            .labels
            .get(index)
            .ok_or_else(|| self.out_of_range("get", index))?;
        let per = self.image_len();
        Ok(Sample {
            pixels: Cow::Borrowed(&self.pixels[index * per..(index + 1) * per]),
            label,
        })
    }

    fn label(&self, index: usize) -> Result<u32> {
        self.labels
            .get(index)
            .copied()
            .ok_or_else(|| self.out_of_range("label", index))
    }
}

impl<D: Dataset + ?Sized> Dataset for std::sync::Arc<D> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn image_shape(&self) -> (usize, usize, usize) {
        (**self).image_shape()
    }
    fn get(&self, index: usize) -> Result<Sample<'_>> {
        (**self).get(index)
    }
    fn label(&self, index: usize) -> Result<u32> {
        (**self).label(index)
    }
}
