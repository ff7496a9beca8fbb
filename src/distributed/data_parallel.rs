//! [`DataParallel`]: any trainer, one rank of a data-parallel run.

use std::sync::Arc;

use super::Communicator;
use crate::autograd::Replicas;
use crate::config::config;
use crate::nn::SyncBatchNormScope;
use crate::train::{Checkpoint, StepOutput, TrainStep};
use crate::{Error, Result};

config! {
    /// Settings of [`DataParallel`].
    pub struct DataParallelConfig {
        /// Synchronised BatchNorm: every train-mode BatchNorm normalises
        /// with the statistics of the global batch (see
        /// [`SyncBatchNormScope`]). Default false: local statistics, as
        /// PyTorch DDP.
        sync_batch_norm: bool = false,
        /// Report every step's loss and metrics as their mean over the
        /// ranks (weighted by samples) and its sample count as the global
        /// batch, so rank 0's progress, logs and early stopping see the
        /// global values (default true; one all-reduce of a few numbers
        /// per step). When false each rank reports its own.
        average_metrics: bool = true,
    }
}

/// A trainer run as one rank of a data-parallel group: what [`Fit`](crate::train::Fit)
/// drives on every rank.
///
/// The trainer's optimizer is a [`DistributedOptimizer`](super::DistributedOptimizer)
/// (which averages the gradients and broadcasts the initial weights);
/// this wrapper adds what happens around the step:
///
/// * with [`DataParallelConfig::sync_batch_norm`], the step runs inside a
///   [`SyncBatchNormScope`];
/// * with [`DataParallelConfig::average_metrics`] (default), the step's
///   loss and metrics are averaged over the ranks and its sample count
///   summed, so every rank reports the global batch; a step that some
///   ranks skipped and others did not (the ranks' non-finite guards
///   disagreed) is an [`Error::Communication`], never a silent divergence;
/// * its kind, state, checkpoints and learning rate are the trainer's, so
///   a checkpoint of a data-parallel run resumes a one-process run and the
///   reverse (with the same global data order: see
///   [`Shard`](crate::data::Shard)).
///
/// Every rank builds the same trainer, wraps it, and runs `Fit` over its
/// shard of the data; only rank 0 writes checkpoints and logs
/// ([`RankZero`](super::RankZero)), every rank resumes
/// ([`broadcast_checkpoint`](super::broadcast_checkpoint)). The module
/// docs have the whole program.
pub struct DataParallel<T: TrainStep> {
    inner: T,
    comm: Arc<dyn Communicator>,
    replicas: Arc<dyn Replicas>,
    cfg: DataParallelConfig,
}

impl<T: TrainStep> DataParallel<T> {
    /// Wraps `trainer` as this rank of `comm`'s group.
    pub fn new(
        trainer: T,
        comm: Arc<dyn Communicator>,
        config: DataParallelConfig,
    ) -> Result<Self> {
        let replicas = super::replicas(&comm);
        Ok(DataParallel {
            inner: trainer,
            comm,
            replicas,
            cfg: config,
        })
    }

    /// The wrapped trainer.
    pub fn trainer(&self) -> &T {
        &self.inner
    }

    /// The wrapped trainer, mutably.
    pub fn trainer_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Unwraps the trainer.
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// The communicator.
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// The configuration.
    pub fn config(&self) -> &DataParallelConfig {
        &self.cfg
    }

    /// The step's report averaged over the ranks.
    fn average(&self, out: StepOutput, step: u64) -> Result<StepOutput> {
        let n = out.samples as f64;
        // [samples, skipped, samples · loss, samples · metric...], metrics
        // in name order (every rank's trainer reports the same names).
        let mut v = vec![n, if out.skipped { 1.0 } else { 0.0 }, n * out.loss];
        v.extend(out.metrics.values().map(|m| n * m));
        // host-ok: a few step numbers, already on the host, summed over ranks.
        let t = candle_core::Tensor::from_vec(v, out.metrics.len() + 3, &candle_core::Device::Cpu)?;
        // host-ok: the summed step numbers, on the CPU.
        let s = self.comm.all_reduce_sum(&t)?.to_vec1::<f64>()?;
        let w = self.comm.world_size() as f64;
        if s[1] != 0.0 && s[1] != w {
            return Err(Error::communication(
                "DataParallel::train_step",
                self.comm.rank(),
                format!(
                    "{} of {w} ranks skipped step {step} (non-finite loss or gradient on some ranks only): the ranks' weights would diverge; let the trainer call Optimizer::sync_gradients before its non-finite check",
                    s[1]
                ),
            ));
        }
        let total = s[0];
        let mean = |x: f64| if total > 0.0 { x / total } else { f64::NAN };
        let mut avg = StepOutput::new(mean(s[2]), total as usize).skipped(out.skipped);
        for (i, name) in out.metrics.keys().enumerate() {
            avg = avg.with_metric(name.clone(), mean(s[3 + i]));
        }
        Ok(avg)
    }
}

impl<T: TrainStep> TrainStep for DataParallel<T> {
    type Batch = T::Batch;

    fn train_step(&mut self, batch: &T::Batch, step: u64) -> Result<StepOutput> {
        let out = {
            let _sync = self
                .cfg
                .sync_batch_norm
                .then(|| SyncBatchNormScope::enter(Arc::clone(&self.replicas)));
            self.inner.train_step(batch, step)?
        };
        if self.cfg.average_metrics && self.comm.world_size() > 1 {
            self.average(out, step)
        } else {
            Ok(out)
        }
    }

    fn set_learning_rate(&mut self, lr: f64) -> Result<()> {
        self.inner.set_learning_rate(lr)
    }

    fn learning_rate(&self) -> f64 {
        self.inner.learning_rate()
    }

    fn kind(&self) -> &str {
        self.inner.kind()
    }

    fn save_state(&self, ckpt: &mut Checkpoint) -> Result<()> {
        self.inner.save_state(ckpt)
    }

    fn load_state(&mut self, ckpt: &Checkpoint) -> Result<()> {
        self.inner.load_state(ckpt)
    }

    fn steps_in_checkpoint(&self, ckpt: &Checkpoint) -> Result<Option<u64>> {
        self.inner.steps_in_checkpoint(ckpt)
    }
}
