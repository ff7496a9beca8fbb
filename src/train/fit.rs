//! `fit`: the loop every trainer shares.
//!
//! A trainer implements [`TrainStep`] — one optimisation step on a batch,
//! plus saving and restoring its state — and [`Fit`] runs it for a number of
//! epochs over a [`BatchSource`] (a [`DataLoader`](crate::data::DataLoader)
//! or any other source of batches, such as an episode sampler). Before each
//! step `Fit` sets the learning rate from the [`Schedule`] at the global step
//! count; after each step and epoch it calls the [`Callback`]s; at the end of
//! an epoch it runs the evaluator, if any.
//!
//! [`Fit::checkpoint`] captures everything needed to continue exactly —
//! the trainer's state, the global step, the data position (epoch, batch,
//! seed; the loader derives augmentation randomness from it), the learning
//! rate, the state of every stateful callback (early stopping) and of a
//! plateau schedule — and [`Fit::resume`] restores it: on the CPU, N
//! steps, then save, load and N more steps give bit-identical weights to 2N
//! uninterrupted steps, and the resumed run stops at the same epoch.
//!
//! Resuming in code, from the newest checkpoint that verifies:
//!
//! ```no_run
//! # use aimass::prelude::*;
//! # use aimass::train::*;
//! # fn demo<T: TrainStep<Batch = aimass::data::Batch>>(trainer: &mut T, loader: &mut aimass::data::DataLoader) -> aimass::Result<()> {
//! let dir = CheckpointDir::new("runs/ckpt", 2)?;
//! let mut fit = Fit::new(trainer, loader, FitConfig::default().with_epochs(15))?
//!     .with_callback(PeriodicCheckpoint::new(dir.clone(), 1)?);
//! if let Some(found) = dir.load_latest_valid(&Device::Cpu)? {
//!     for s in &found.skipped {
//!         eprintln!("skipped {}: {}", s.path.display(), s.error);
//!     }
//!     fit.resume(&found.checkpoint)?;
//! }
//! fit.run()?;
//! # Ok(()) }
//! ```
//!
//! `fit` is a convenience, not a cage: every trainer's `train_step` can be
//! called from a hand-written loop.

use std::collections::BTreeMap;
use std::time::Instant;

use super::callback::{Callback, Control, EpochInfo, StepInfo, TrainingState};
use super::fit_state::{self, LrSource};
use super::Checkpoint;
use crate::config::config;
use crate::data::{Batch, DataLoader, LoaderPosition};
use crate::optim::{ReduceLrOnPlateau, Schedule};
use crate::{Error, Result};

/// What one optimisation step reports.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct StepOutput {
    /// The loss of the step (before any update).
    pub loss: f64,
    /// Samples in the batch.
    pub samples: usize,
    /// Whether the update was skipped (non-finite guard or loss-scale overflow).
    pub skipped: bool,
    /// Other metrics (e.g. `acc` of the batch).
    pub metrics: BTreeMap<String, f64>,
}

impl StepOutput {
    /// A step output with a loss and a sample count.
    pub fn new(loss: f64, samples: usize) -> Self {
        StepOutput {
            loss,
            samples,
            skipped: false,
            metrics: BTreeMap::new(),
        }
    }

    /// Marks the step as skipped.
    pub fn skipped(mut self, skipped: bool) -> Self {
        self.skipped = skipped;
        self
    }

    /// Adds a metric.
    pub fn with_metric(mut self, name: impl Into<String>, value: f64) -> Self {
        self.metrics.insert(name.into(), value);
        self
    }
}

/// One optimisation step on a batch, and the state to checkpoint: what a
/// trainer implements to run under [`Fit`].
pub trait TrainStep {
    /// The batch type (e.g. [`Batch`] from a `DataLoader`).
    type Batch;

    /// Runs one optimisation step on `batch`. `step` is the number of steps
    /// taken before this one.
    fn train_step(&mut self, batch: &Self::Batch, step: u64) -> Result<StepOutput>;

    /// Sets the learning rate of the next steps (called by [`Fit`] with the
    /// schedule's value before every step). A rate that is not finite or is
    /// negative must be refused with an error, leaving the rate unchanged
    /// (an aimass [`Optimizer::set_lr`](crate::optim::Optimizer::set_lr)
    /// does this).
    fn set_learning_rate(&mut self, lr: f64) -> Result<()>;

    /// The current learning rate.
    fn learning_rate(&self) -> f64;

    /// A short name of the trainer kind, checked when a checkpoint is loaded
    /// (e.g. `"classifier"`).
    fn kind(&self) -> &str;

    /// Adds the trainer's state (weights of every network, optimizer state,
    /// counters, config) to `ckpt`.
    fn save_state(&self, ckpt: &mut Checkpoint) -> Result<()>;

    /// Restores the state written by [`TrainStep::save_state`]. Must check
    /// everything before changing anything.
    fn load_state(&mut self, ckpt: &Checkpoint) -> Result<()>;

    /// The number of steps (applied and skipped) that the trainer state in
    /// `ckpt` has counted itself, e.g. its optimizer's step count plus the
    /// steps its non-finite guard skipped, or `None` (the default) when the
    /// trainer keeps no such count. [`Fit::resume`] cross-checks it with the
    /// checkpoint's step before changing anything.
    fn steps_in_checkpoint(&self, _ckpt: &Checkpoint) -> Result<Option<u64>> {
        Ok(None)
    }
}

/// Where batches come from: epochs of numbered batches with a resumable
/// position.
pub trait BatchSource {
    /// The batch type.
    type Batch;

    /// Batches in one epoch.
    fn batches_per_epoch(&self) -> usize;

    /// The next batch to be produced: (epoch from 0, batch index).
    fn position(&self) -> (u64, usize);

    /// A string that identifies the source's configuration (e.g. its seed),
    /// stored in checkpoints and checked on resume.
    fn fingerprint(&self) -> String;

    /// Moves to a position saved by [`BatchSource::position`].
    fn set_position(&mut self, epoch: u64, batch: usize) -> Result<()>;

    /// Runs `f` on each remaining batch of the current epoch until it
    /// returns [`Control::Stop`]; the position advances past every batch
    /// given to `f`.
    fn for_each_batch(&mut self, f: &mut dyn FnMut(Self::Batch) -> Result<Control>) -> Result<()>;
}

impl BatchSource for DataLoader {
    type Batch = Batch;

    fn batches_per_epoch(&self) -> usize {
        self.len()
    }

    fn position(&self) -> (u64, usize) {
        let p = DataLoader::position(self);
        (p.epoch, p.batch)
    }

    /// The same on every rank of a data-parallel run (rank 0's checkpoint
    /// resumes them all), different for another number of ranks (whose
    /// global batches differ).
    fn fingerprint(&self) -> String {
        let c = self.config();
        let shards = match c.shard.world_size() {
            1 => String::new(),
            w => format!(" shards={w}"),
        };
        format!(
            "seed={} batch_size={} shuffle={} drop_last={} len={}{shards}",
            c.seed,
            c.batch_size,
            c.shuffle,
            c.drop_last,
            self.dataset().len()
        )
    }

    fn set_position(&mut self, epoch: u64, batch: usize) -> Result<()> {
        let seed = self.config().seed;
        DataLoader::set_position(self, LoaderPosition { seed, epoch, batch })
    }

    fn for_each_batch(&mut self, f: &mut dyn FnMut(Batch) -> Result<Control>) -> Result<()> {
        for batch in self.epoch() {
            if f(batch?)? == Control::Stop {
                break;
            }
        }
        Ok(())
    }
}

/// An epoch-end evaluation: returns named metrics (e.g. `test_acc`).
pub type Evaluator<'a, T> = Box<dyn FnMut(&mut T, usize) -> Result<BTreeMap<String, f64>> + 'a>;

config! {
    /// Settings of a [`Fit`] run.
    pub struct FitConfig {
        /// Epochs to train (default 1).
        epochs: usize = 1,
        /// Stop after this many global steps, even mid-epoch (default: none).
        max_steps: Option<u64> = None,
        /// Run the evaluator every this many epochs, and after the last (default 1).
        eval_every: usize = 1,
        /// Tune the CPU allocator for training when the run starts
        /// ([`crate::device::tune_cpu_allocator`]: glibc keeps freed memory
        /// for the next step instead of returning and re-faulting it; the
        /// process keeps its peak memory). A process-wide setting, which
        /// `Fit` changes because a program that runs it is a training
        /// program (default true); set false in a host that must keep
        /// glibc's defaults. `AIMASS_CPU_MALLOC=system` also opts out.
        tune_cpu_allocator: bool = true,
    }
}

impl FitConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::config("FitConfig::epochs", 0, "must be >= 1"));
        }
        if self.eval_every == 0 {
            return Err(Error::config("FitConfig::eval_every", 0, "must be >= 1"));
        }
        Ok(())
    }
}

/// What a finished [`Fit::run`] reports.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct FitSummary {
    /// Global steps taken in total (including before a resume).
    pub steps: u64,
    /// Epochs completed in total.
    pub epochs: usize,
    /// Steps the non-finite guard or the loss scaler skipped in this run.
    pub skipped: u64,
    /// The last epoch's mean training loss.
    pub train_loss: f64,
    /// The last evaluation's metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Wall-clock seconds of this run.
    pub secs: f64,
    /// Whether a callback stopped the run early.
    pub stopped_early: bool,
}

/// The training loop: a trainer, a batch source, a schedule, callbacks.
pub struct Fit<'a, T: TrainStep, S: BatchSource<Batch = T::Batch>> {
    trainer: &'a mut T,
    source: &'a mut S,
    config: FitConfig,
    schedule: Option<LrSource<'a>>,
    callbacks: Vec<Box<dyn Callback + 'a>>,
    evaluator: Option<Evaluator<'a, T>>,
    step: u64,
}

/// The whole state of a run, for checkpointing callbacks.
struct RunState<'r, T: TrainStep, S: BatchSource> {
    trainer: &'r T,
    source: &'r S,
    step: u64,
    /// Fit's own state (callbacks, plateau schedule), see `fit_state`.
    fit: &'r Checkpoint,
}

impl<T: TrainStep, S: BatchSource> TrainingState for RunState<'_, T, S> {
    fn checkpoint(&self) -> Result<Checkpoint> {
        let mut c = Checkpoint::new(self.trainer.kind());
        self.trainer.save_state(&mut c)?;
        let (epoch, batch) = self.source.position();
        c.set_meta("step", self.step);
        c.set_meta("data.epoch", epoch);
        c.set_meta("data.batch", batch);
        c.set_meta("data.fingerprint", self.source.fingerprint());
        c.set_meta("fit.lr", format!("{:?}", self.trainer.learning_rate()));
        c.merge(self.fit);
        Ok(c)
    }
}

impl<'a, T: TrainStep, S: BatchSource<Batch = T::Batch>> Fit<'a, T, S> {
    /// A loop over `source` driving `trainer`; the config is validated.
    pub fn new(trainer: &'a mut T, source: &'a mut S, config: FitConfig) -> Result<Self> {
        config.validate()?;
        if source.batches_per_epoch() == 0 {
            return Err(Error::invalid("Fit::new", "the batch source has no batches (empty dataset, or drop_last with fewer samples than a batch)"));
        }
        Ok(Fit {
            trainer,
            source,
            config,
            schedule: None,
            callbacks: Vec::new(),
            evaluator: None,
            step: 0,
        })
    }

    /// Sets the learning-rate schedule, queried at the global step before
    /// every step (replacing any schedule set before). A value that is not
    /// finite and >= 0 stops the run with an error naming the step.
    pub fn with_schedule(mut self, schedule: impl Schedule + 'a) -> Self {
        self.schedule = Some(LrSource::Steps(Box::new(schedule)));
        self
    }

    /// Drives the learning rate by `plateau` (torch's `ReduceLROnPlateau`)
    /// instead of a per-step schedule (replacing any schedule set before):
    /// after every epoch's evaluation, `plateau` is stepped with the epoch
    /// metric `metric` (`train_loss`, or a metric of the evaluator; epochs
    /// without an evaluation are skipped unless it is `train_loss`), and
    /// its rate is used from the next step on. Its position is in every
    /// checkpoint of the run.
    pub fn with_plateau_schedule(
        mut self,
        metric: impl Into<String>,
        plateau: ReduceLrOnPlateau,
    ) -> Self {
        self.schedule = Some(LrSource::Plateau {
            metric: metric.into(),
            plateau,
        });
        self
    }

    /// Adds a callback (called in the order added; a stateful callback's
    /// state is checkpointed by its [`Callback::state_name`], whatever the
    /// order).
    pub fn with_callback(mut self, callback: impl Callback + 'a) -> Self {
        self.callbacks.push(Box::new(callback));
        self
    }

    /// Sets the epoch-end evaluation.
    pub fn with_evaluator(
        mut self,
        evaluator: impl FnMut(&mut T, usize) -> Result<BTreeMap<String, f64>> + 'a,
    ) -> Self {
        self.evaluator = Some(Box::new(evaluator));
        self
    }

    /// Global steps taken so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// A checkpoint of the whole run: trainer state, step, data position,
    /// learning rate, and the state of the stateful callbacks and of a
    /// plateau schedule.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let fit = fit_state::save(&self.callbacks, self.schedule.as_ref())?;
        RunState {
            trainer: &*self.trainer,
            source: &*self.source,
            step: self.step,
            fit: &fit,
        }
        .checkpoint()
    }

    /// Restores a checkpoint made by [`Fit::checkpoint`] (or a
    /// [`PeriodicCheckpoint`](super::PeriodicCheckpoint)): trainer state,
    /// step, data position, learning rate, callback and plateau-schedule
    /// state.
    ///
    /// Checks first, and on error changes nothing: the trainer kind, the
    /// data source, the step against the trainer's own count
    /// ([`TrainStep::steps_in_checkpoint`]; a mismatch is
    /// [`Error::Malformed`] naming both), the set of stateful callbacks and
    /// the plateau schedule against this run's.
    pub fn resume(&mut self, ckpt: &Checkpoint) -> Result<()> {
        ckpt.expect_kind(self.trainer.kind())?;
        let step: u64 = ckpt.meta_parse("step")?;
        let epoch: u64 = ckpt.meta_parse("data.epoch")?;
        let batch: usize = ckpt.meta_parse("data.batch")?;
        let fp = ckpt.meta("data.fingerprint").unwrap_or_default();
        if fp != self.source.fingerprint() {
            return Err(Error::config(
                "data source",
                self.source.fingerprint(),
                format!("the checkpoint was written with a different data source ({fp}): resume with the same data, seed and batch size"),
            ));
        }
        let per_epoch = self.source.batches_per_epoch();
        if batch > per_epoch {
            return Err(Error::malformed(
                "<checkpoint>",
                "checkpoint data position",
                format!("a batch index <= {per_epoch} (batches per epoch)"),
                format!("batch {batch}"),
            ));
        }
        if let Some(counted) = self.trainer.steps_in_checkpoint(ckpt)? {
            if counted != step {
                return Err(Error::malformed(
                    "<checkpoint>",
                    "checkpoint step",
                    format!("step {counted}, the trainer's own count in the checkpoint (optimizer steps plus skipped steps)"),
                    format!("step {step} in the metadata (a checkpoint assembled or edited by hand?)"),
                ));
            }
        }
        let lr = match ckpt.meta("fit.lr") {
            Some(_) => {
                let lr: f64 = ckpt.meta_parse("fit.lr")?;
                if !(lr.is_finite() && lr >= 0.0) {
                    return Err(Error::malformed(
                        "<checkpoint>",
                        "checkpoint learning rate",
                        "a finite rate >= 0",
                        format!("{lr}"),
                    ));
                }
                Some(lr)
            }
            None => None,
        };
        let mut restore = fit_state::read(ckpt, &self.callbacks, self.schedule.as_ref())?;
        let backups = restore.backups(&self.callbacks)?;
        restore.load_callbacks(&mut self.callbacks, &backups)?;
        if let Err(e) = self.trainer.load_state(ckpt) {
            restore.rollback(&mut self.callbacks, &backups);
            return Err(e);
        }
        if let (Some(p), Some(LrSource::Plateau { plateau, .. })) =
            (restore.take_plateau(), self.schedule.as_mut())
        {
            *plateau = p;
        }
        self.source.set_position(epoch, batch)?;
        if let Some(lr) = lr {
            self.trainer.set_learning_rate(lr)?;
        }
        self.step = step;
        Ok(())
    }

    /// Trains until `epochs` epochs are complete (counting epochs done before
    /// a resume), `max_steps` is reached, or a callback stops the run.
    pub fn run(&mut self) -> Result<FitSummary> {
        let start = Instant::now();
        if self.config.tune_cpu_allocator {
            crate::device::tune_cpu_allocator();
        }
        let Fit {
            trainer,
            source,
            config,
            schedule,
            callbacks,
            evaluator,
            step,
        } = self;
        fit_state::stateful(callbacks)?; // distinct state names, before any step
        let per_epoch = source.batches_per_epoch();
        let total_steps =
            (config.epochs as u64 * per_epoch as u64).min(config.max_steps.unwrap_or(u64::MAX));
        let mut summary = FitSummary::default();
        let mut samples_seen = 0u64;
        let mut stop = false;
        while !stop && (source.position().0 as usize) < config.epochs && *step < total_steps {
            let (epoch0, _) = source.position();
            let epoch = epoch0 as usize + 1;
            let (mut loss_sum, mut loss_n) = (0.0, 0usize);
            let mut lr = trainer.learning_rate();
            let mut run_batch = |b: T::Batch| -> Result<Control> {
                match schedule.as_ref() {
                    Some(LrSource::Steps(s)) => {
                        trainer.set_learning_rate(checked_schedule_lr(s.as_ref(), *step)?)?
                    }
                    Some(LrSource::Plateau { plateau, .. }) => {
                        trainer.set_learning_rate(plateau.lr())?
                    }
                    None => {}
                }
                lr = trainer.learning_rate();
                let out = trainer.train_step(&b, *step)?;
                *step += 1;
                samples_seen += out.samples as u64;
                if out.skipped {
                    summary.skipped += 1;
                } else {
                    loss_sum += out.loss;
                    loss_n += 1;
                }
                let (_, next) = source_position_hint(*step, per_epoch);
                let info = StepInfo {
                    epoch,
                    epochs: config.epochs,
                    batch: next,
                    batches_per_epoch: Some(per_epoch),
                    step: *step,
                    lr,
                    loss: out.loss,
                    samples: out.samples,
                    skipped: out.skipped,
                    metrics: &out.metrics,
                    elapsed: start.elapsed(),
                    samples_seen,
                    steps_left: Some(total_steps.saturating_sub(*step)),
                };
                let mut control = Control::Continue;
                for cb in callbacks.iter_mut() {
                    if cb.on_step(&info)? == Control::Stop {
                        control = Control::Stop;
                    }
                }
                if control == Control::Stop {
                    stop = true;
                }
                if *step >= total_steps {
                    control = Control::Stop;
                }
                Ok(control)
            };
            source.for_each_batch(&mut run_batch)?;
            let epoch_done = source.position().0 as usize >= epoch;
            if !epoch_done {
                break; // stopped mid-epoch (max_steps or a callback)
            }
            summary.train_loss = if loss_n > 0 {
                loss_sum / loss_n as f64
            } else {
                f64::NAN
            };
            let last = epoch == config.epochs || *step >= total_steps;
            let (metrics, evaluated) = match evaluator.as_mut() {
                Some(ev) if epoch.is_multiple_of(config.eval_every) || last => {
                    (ev(trainer, epoch)?, true)
                }
                _ => (BTreeMap::new(), false),
            };
            if let Some(LrSource::Plateau { metric, plateau }) = schedule.as_mut() {
                let value = match metric.as_str() {
                    "train_loss" => Some(summary.train_loss),
                    m => metrics.get(m).copied(),
                };
                match value {
                    Some(v) => {
                        plateau.step(v);
                    }
                    None if evaluated => {
                        return Err(Error::config(
                            "Fit::with_plateau_schedule",
                            metric,
                            format!(
                                "no such epoch metric; available: train_loss, {}",
                                metrics.keys().cloned().collect::<Vec<_>>().join(", ")
                            ),
                        ))
                    }
                    None => {}
                }
            }
            let info = EpochInfo {
                epoch,
                epochs: config.epochs,
                step: *step,
                train_loss: summary.train_loss,
                lr,
                metrics: &metrics,
                elapsed: start.elapsed(),
            };
            for cb in callbacks.iter_mut() {
                if cb.on_epoch_end(&info)? == Control::Stop {
                    stop = true;
                    summary.stopped_early = true;
                }
            }
            // Every callback has seen the epoch: checkpoints taken now hold
            // every callback's state after it.
            let fit = fit_state::save(callbacks, schedule.as_ref())?;
            let state = RunState {
                trainer: &**trainer,
                source: &**source,
                step: *step,
                fit: &fit,
            };
            for cb in callbacks.iter_mut() {
                cb.after_epoch_end(&info, &state)?;
            }
            summary.metrics = metrics;
        }
        let fit = fit_state::save(callbacks, schedule.as_ref())?;
        let state = RunState {
            trainer: &**trainer,
            source: &**source,
            step: *step,
            fit: &fit,
        };
        for cb in callbacks.iter_mut() {
            cb.on_end(&state)?;
        }
        summary.steps = *step;
        summary.epochs = source.position().0 as usize;
        summary.secs = start.elapsed().as_secs_f64();
        summary.stopped_early |= stop && summary.epochs < config.epochs && *step < total_steps;
        Ok(summary)
    }
}

/// The schedule's rate at `step`, or an error naming the step and the value
/// when it is not finite or negative (nothing is applied then).
fn checked_schedule_lr(schedule: &dyn Schedule, step: u64) -> Result<f64> {
    let lr = schedule.lr(step);
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(Error::config(
            "Fit::with_schedule",
            lr,
            format!("the schedule's learning rate at step {step} is not finite and >= 0; the step was not taken (check the schedule's settings)"),
        ));
    }
    Ok(lr)
}

/// (epoch, batch-within-epoch from 1) of the step just taken, for display.
fn source_position_hint(step: u64, per_epoch: usize) -> (u64, usize) {
    let per = per_epoch.max(1) as u64;
    ((step - 1) / per, ((step - 1) % per) as usize + 1)
}
