//! Episodes as epochs: an [`EpisodeSampler`] under [`Fit`](super::Fit).
//!
//! Meta-learning trains on a stream of tasks rather than passes over a
//! dataset. [`EpisodeEpochs`] groups the sampler's episodes into "epochs" of
//! a fixed number of episodes, so the same loop, schedule, callbacks and
//! exact resume work for meta-learning trainers (episode `i` is a pure
//! function of the seed and `i`).
//!
//! ```
//! use aimass::candle::Device;
//! use aimass::data::{EpisodeConfig, EpisodeSampler, InMemoryDataset};
//! use aimass::train::{BatchSource, EpisodeEpochs};
//!
//! let ds = InMemoryDataset::new(vec![0; 40 * 4], (0..40).map(|i| i % 4).collect(), (1, 2, 2))?;
//! let cfg = EpisodeConfig::default().with_n_way(2).with_k_shot(1).with_q_query(2);
//! let sampler = EpisodeSampler::new(ds, &[0, 1, 2, 3], cfg, &Device::Cpu)?;
//! let mut tasks = EpisodeEpochs::new(sampler, 5)?;
//! assert_eq!(tasks.batches_per_epoch(), 5);
//! tasks.set_position(2, 3)?; // episode 13
//! assert_eq!(tasks.sampler().position(), 13);
//! # Ok::<(), aimass::Error>(())
//! ```

use super::callback::Control;
use super::fit::BatchSource;
use crate::data::{Episode, EpisodeSampler};
use crate::{Error, Result};

/// An [`EpisodeSampler`] seen as epochs of `episodes_per_epoch` episodes.
#[derive(Debug)]
pub struct EpisodeEpochs {
    sampler: EpisodeSampler,
    per_epoch: usize,
}

impl EpisodeEpochs {
    /// Groups the episodes of `sampler` into epochs of `episodes_per_epoch` (≥ 1).
    pub fn new(sampler: EpisodeSampler, episodes_per_epoch: usize) -> Result<Self> {
        if episodes_per_epoch == 0 {
            return Err(Error::config(
                "EpisodeEpochs::episodes_per_epoch",
                0,
                "must be >= 1",
            ));
        }
        Ok(EpisodeEpochs {
            sampler,
            per_epoch: episodes_per_epoch,
        })
    }

    /// The sampler.
    pub fn sampler(&self) -> &EpisodeSampler {
        &self.sampler
    }
}

impl BatchSource for EpisodeEpochs {
    type Batch = Episode;

    fn batches_per_epoch(&self) -> usize {
        self.per_epoch
    }

    fn position(&self) -> (u64, usize) {
        let next = self.sampler.position();
        let per = self.per_epoch as u64;
        (next / per, (next % per) as usize)
    }

    fn fingerprint(&self) -> String {
        format!(
            "episodes seed={} {:?} classes={:?} per_epoch={}",
            self.sampler.seed(),
            self.sampler.config(),
            self.sampler.classes(),
            self.per_epoch
        )
    }

    fn set_position(&mut self, epoch: u64, batch: usize) -> Result<()> {
        if batch > self.per_epoch {
            return Err(Error::config(
                "episode position",
                batch,
                format!("an epoch has {} episodes", self.per_epoch),
            ));
        }
        let next = epoch
            .checked_mul(self.per_epoch as u64)
            .and_then(|e| e.checked_add(batch as u64));
        let next = next.ok_or_else(|| Error::config("episode position", epoch, "too large"))?;
        self.sampler.set_position(next);
        Ok(())
    }

    fn for_each_batch(&mut self, f: &mut dyn FnMut(Episode) -> Result<Control>) -> Result<()> {
        let (_, start) = self.position();
        for _ in start..self.per_epoch {
            let episode = self.sampler.sample()?;
            if f(episode)? == Control::Stop {
                break;
            }
        }
        Ok(())
    }
}
