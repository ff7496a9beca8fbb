//! [`Shard`]: one rank's part of every batch of a data-parallel run.

use std::ops::Range;

use crate::{Error, Result};

/// Which part of the data a [`DataLoader`](super::DataLoader) gives this
/// rank of a data-parallel run: rank `rank` of `world_size`.
///
/// With a shard, the loader's `batch_size` is the per-rank batch and a
/// **global batch** has `batch_size × world_size` samples: the loader
/// draws the epoch's permutation from the seed exactly as a one-process
/// loader with the global batch size does, cuts it into global batches,
/// and gives each rank a contiguous slice of each global batch (rank 0 the
/// first `batch_size` samples, rank 1 the next, ...). So, with the same
/// seed:
///
/// * every sample is seen exactly once per epoch across the ranks;
/// * the ranks' batches, concatenated in rank order, are the one-process
///   loader's batches, with the same augmented pixels (augmentation is
///   keyed by the sample, not by the rank);
/// * every rank has the same number of batches per epoch (a collective
///   per step needs it). A last, partial global batch (without
///   `drop_last`) is split as evenly as possible, and must have at least
///   one sample per rank; [`DataLoader::new`](super::DataLoader::new)
///   refuses a dataset size that would leave a rank an empty batch.
///
/// ```
/// use aimass::candle::Device;
/// use aimass::data::{DataLoader, DataLoaderConfig, InMemoryDataset, Shard};
///
/// let ds = InMemoryDataset::new(vec![0; 10 * 4], (0..10).collect(), (1, 2, 2))?;
/// let mut seen = Vec::new();
/// for rank in 0..2 {
///     let cfg = DataLoaderConfig::default().with_batch_size(2).with_shard(Shard::new(rank, 2)?);
///     let mut loader = DataLoader::new(ds.clone(), cfg, &Device::Cpu)?;
///     assert_eq!(loader.len(), 3); // global batches of 4: 4 + 4 + 2
///     for batch in loader.epoch() {
///         seen.extend(batch?.indices);
///     }
/// }
/// seen.sort();
/// assert_eq!(seen, (0..10).collect::<Vec<_>>()); // each sample once
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shard {
    rank: usize,
    world_size: usize,
}

impl Shard {
    /// Rank `rank` of `world_size` ranks.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `world_size` is 0 or `rank >= world_size`.
    pub fn new(rank: usize, world_size: usize) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::config(
                "Shard",
                format!("rank {rank} of {world_size}"),
                "needs world_size >= 1 and rank < world_size",
            ));
        }
        Ok(Shard { rank, world_size })
    }

    /// The whole data (rank 0 of 1), the default.
    pub fn whole() -> Self {
        Shard {
            rank: 0,
            world_size: 1,
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// This rank's positions within a global batch of `len` samples:
    /// `[⌊rank·len/W⌋, ⌊(rank+1)·len/W⌋)`, contiguous, in rank order, as
    /// even as possible (a full global batch gives every rank the
    /// per-rank batch size).
    pub fn part(&self, len: usize) -> Range<usize> {
        let w = self.world_size;
        (self.rank * len / w)..((self.rank + 1) * len / w)
    }
}

impl Default for Shard {
    fn default() -> Self {
        Shard::whole()
    }
}
