//! Meta-batches of tasks as epochs, so meta-learning runs under `Fit`.

use crate::config::config;
use crate::meta::{TaskBatch, TaskSampler};
use crate::train::{BatchSource, Control};
use crate::{Error, Result};

config! {
    /// Options of [`TaskBatches`].
    #[derive(Copy, Eq)]
    pub struct TaskBatchesConfig {
        /// Tasks per meta-training step (default 1, ProtoNets' one episode
        /// per step; MAML uses 25 on the sinusoids, 32 on Omniglot and 4 on
        /// mini-ImageNet).
        meta_batch: usize = 1,
        /// Meta-batches per "epoch" (default 100): how often `Fit` reports
        /// an epoch, evaluates and runs epoch-end callbacks.
        batches_per_epoch: usize = 100,
    }
}

impl TaskBatchesConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("TaskBatchesConfig::meta_batch", self.meta_batch),
            (
                "TaskBatchesConfig::batches_per_epoch",
                self.batches_per_epoch,
            ),
        ] {
            if v == 0 {
                return Err(Error::config(field, 0, "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// The tasks of a [`TaskSampler`] in meta-batches, grouped into epochs: a
/// [`BatchSource`] for [`Fit`](crate::train::Fit).
///
/// Meta-batch `b` (counting from 0 over the whole run) holds tasks
/// `b·T .. (b + 1)·T` of the sampler, `T` the meta-batch size, so the
/// position is one number and a resumed run sees exactly the tasks it would
/// have seen.
///
/// ```
/// use aimass::candle::Device;
/// use aimass::meta::{Sinusoid, SinusoidConfig, TaskBatches, TaskBatchesConfig};
/// use aimass::train::BatchSource;
///
/// let tasks = Sinusoid::new(SinusoidConfig::default(), &Device::Cpu)?;
/// let cfg = TaskBatchesConfig::default().with_meta_batch(25).with_batches_per_epoch(1000);
/// let mut batches = TaskBatches::new(tasks, cfg)?;
/// let b = batches.next_batch()?;
/// assert_eq!(b.len(), 25);
/// assert_eq!(batches.position(), (0, 1));
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Debug)]
pub struct TaskBatches<S> {
    sampler: S,
    cfg: TaskBatchesConfig,
    next: u64,
}

impl<S: TaskSampler> TaskBatches<S> {
    /// Meta-batches of the tasks of `sampler`, from the first.
    pub fn new(sampler: S, cfg: TaskBatchesConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(TaskBatches {
            sampler,
            cfg,
            next: 0,
        })
    }

    /// The sampler.
    pub fn sampler(&self) -> &S {
        &self.sampler
    }

    /// The configuration.
    pub fn config(&self) -> &TaskBatchesConfig {
        &self.cfg
    }

    /// Meta-batch number `b` (a pure function of the sampler and `b`).
    pub fn batch(&self, b: u64) -> Result<TaskBatch> {
        let t = self.cfg.meta_batch as u64;
        let first = b
            .checked_mul(t)
            .ok_or_else(|| Error::invalid("TaskBatches::batch", format!("batch {b} is too far")))?;
        let tasks = (first..first + t)
            .map(|i| self.sampler.task(i))
            .collect::<Result<Vec<_>>>()?;
        TaskBatch::new(tasks)
    }

    /// The next meta-batch, for hand-written loops.
    pub fn next_batch(&mut self) -> Result<TaskBatch> {
        let b = self.batch(self.next)?;
        self.next += 1;
        Ok(b)
    }
}

impl<S: TaskSampler> BatchSource for TaskBatches<S> {
    type Batch = TaskBatch;

    fn batches_per_epoch(&self) -> usize {
        self.cfg.batches_per_epoch
    }

    fn position(&self) -> (u64, usize) {
        let per = self.cfg.batches_per_epoch as u64;
        (self.next / per, (self.next % per) as usize)
    }

    fn fingerprint(&self) -> String {
        format!(
            "tasks [{}] meta_batch={} per_epoch={}",
            self.sampler.fingerprint(),
            self.cfg.meta_batch,
            self.cfg.batches_per_epoch
        )
    }

    fn set_position(&mut self, epoch: u64, batch: usize) -> Result<()> {
        if batch > self.cfg.batches_per_epoch {
            return Err(Error::config(
                "task batch position",
                batch,
                format!("an epoch has {} meta-batches", self.cfg.batches_per_epoch),
            ));
        }
        self.next = epoch
            .checked_mul(self.cfg.batches_per_epoch as u64)
            .and_then(|e| e.checked_add(batch as u64))
            .ok_or_else(|| Error::config("task batch position", epoch, "too large"))?;
        Ok(())
    }

    fn for_each_batch(&mut self, f: &mut dyn FnMut(TaskBatch) -> Result<Control>) -> Result<()> {
        let (_, start) = self.position();
        for _ in start..self.cfg.batches_per_epoch {
            let b = self.next_batch()?;
            if f(b)? == Control::Stop {
                break;
            }
        }
        Ok(())
    }
}
