//! Transfer sets: datasets where only some samples carry a label.
//!
//! Distillation needs the teacher's soft targets, not labels, so every image
//! can teach; the few labelled ones add a hard-label cross-entropy. A
//! [`TransferSet`] wraps any [`Dataset`] with a label mask: the labels of
//! masked-out samples read as [`UNLABELLED`], which the
//! [`DistillLoss`](super::DistillLoss) leaves out of its cross-entropy (and
//! which every other loss of the crate rejects as out of range, so an
//! unlabelled sample never trains a classifier by accident).

use std::collections::BTreeMap;

use rand::Rng;

use crate::config::config;
use crate::data::{Dataset, Sample};
use crate::device::rng_stream;
use crate::{Error, Result};

/// The label of a sample without one: `u32::MAX`. In a batch from a
/// [`TransferSet`] (labels `u32`), rows with this label are unlabelled; with
/// `i64` labels a negative value (torch's ignore index −100) also counts as
/// unlabelled.
pub const UNLABELLED: u32 = u32::MAX;

config! {
    /// Which samples of a [`TransferSet`] keep their label.
    #[derive(Copy, Eq)]
    pub struct TransferSetConfig {
        /// Labelled samples kept per class, drawn without replacement; `None`
        /// keeps every label (default `None`).
        labels_per_class: Option<usize> = None,
        /// Seed of the draw (default 0): class `c` draws from
        /// `device::rng_stream(seed, c)`.
        seed: u64 = 0,
    }
}

/// A dataset in which only some samples carry their label (a label mask);
/// the others read as [`UNLABELLED`].
///
/// ```
/// use aimass::data::{Dataset, InMemoryDataset};
/// use aimass::distill::{TransferSet, TransferSetConfig, UNLABELLED};
///
/// // 12 images of 3 classes (4 each); keep 1 label per class.
/// let labels: Vec<u32> = (0..12).map(|i| i % 3).collect();
/// let ds = InMemoryDataset::new(vec![0; 12 * 4], labels, (1, 2, 2))?;
/// let set = TransferSet::new(ds, TransferSetConfig::default().with_labels_per_class(1).with_seed(7))?;
/// assert_eq!(set.len(), 12);
/// assert_eq!(set.num_labelled(), 3);
/// let unlabelled = (0..12).filter(|&i| set.label(i).unwrap() == UNLABELLED).count();
/// assert_eq!(unlabelled, 9);
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct TransferSet<D> {
    dataset: D,
    labelled: Vec<bool>,
}

impl<D: Dataset> TransferSet<D> {
    /// Keeps the labels `cfg` selects: all of them, or
    /// `labels_per_class` per class (seeded). A class with fewer samples
    /// than that is an error naming it.
    pub fn new(dataset: D, cfg: TransferSetConfig) -> Result<Self> {
        let n = dataset.len();
        let labelled = match cfg.labels_per_class {
            None => vec![true; n],
            Some(k) => {
                let mut by_class: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
                for i in 0..n {
                    by_class.entry(dataset.label(i)?).or_default().push(i);
                }
                let mut mask = vec![false; n];
                for (class, mut idx) in by_class {
                    if idx.len() < k {
                        return Err(Error::config(
                            "TransferSetConfig::labels_per_class",
                            k,
                            format!(
                                "class {class} has only {} samples; use at most that many labels per class",
                                idx.len()
                            ),
                        ));
                    }
                    // A partial Fisher-Yates shuffle: the first k are a uniform draw.
                    let mut r = rng_stream(cfg.seed, u64::from(class));
                    for j in 0..k {
                        let pick = r.random_range(j..idx.len());
                        idx.swap(j, pick);
                    }
                    for &i in &idx[..k] {
                        mask[i] = true;
                    }
                }
                mask
            }
        };
        Ok(TransferSet { dataset, labelled })
    }

    /// Keeps the label of sample `i` where `labelled[i]` is true; the mask
    /// needs one entry per sample.
    pub fn from_mask(dataset: D, labelled: Vec<bool>) -> Result<Self> {
        if labelled.len() != dataset.len() {
            return Err(Error::shape(
                "TransferSet::from_mask",
                format!("a mask of {} entries, one per sample", dataset.len()),
                labelled.len(),
            ));
        }
        Ok(TransferSet { dataset, labelled })
    }

    /// The wrapped dataset (with every label).
    pub fn dataset(&self) -> &D {
        &self.dataset
    }

    /// The label mask, one entry per sample.
    pub fn mask(&self) -> &[bool] {
        &self.labelled
    }

    /// Whether sample `i` keeps its label (false past the end).
    pub fn is_labelled(&self, i: usize) -> bool {
        self.labelled.get(i).copied().unwrap_or(false)
    }

    /// The indices of the labelled samples, in order.
    pub fn labelled_indices(&self) -> Vec<usize> {
        (0..self.labelled.len())
            .filter(|&i| self.labelled[i])
            .collect()
    }

    /// How many samples keep their label.
    pub fn num_labelled(&self) -> usize {
        self.labelled.iter().filter(|&&l| l).count()
    }
}

impl<D: Dataset> Dataset for TransferSet<D> {
    fn len(&self) -> usize {
        self.dataset.len()
    }

    fn image_shape(&self) -> (usize, usize, usize) {
        self.dataset.image_shape()
    }

    fn get(&self, index: usize) -> Result<Sample<'_>> {
        let s = self.dataset.get(index)?;
        Ok(Sample {
            pixels: s.pixels,
            label: if self.is_labelled(index) {
                s.label
            } else {
                UNLABELLED
            },
        })
    }

    fn label(&self, index: usize) -> Result<u32> {
        let l = self.dataset.label(index)?;
        Ok(if self.is_labelled(index) {
            l
        } else {
            UNLABELLED
        })
    }
}
