//! Callbacks: code that [`Fit`](super::Fit) runs after every step, at the
//! end of every epoch and at the end of training.
//!
//! A callback sees read-only summaries ([`StepInfo`], [`EpochInfo`]) and can
//! stop training by returning [`Control::Stop`]. The end of an epoch has two
//! phases: first every callback's [`Callback::on_epoch_end`] (update state,
//! decide whether to stop), then every callback's
//! [`Callback::after_epoch_end`], which can take a checkpoint of the whole
//! training state through [`TrainingState`] — so a checkpoint taken after
//! an epoch holds every callback's state *after* that epoch, whatever order
//! the callbacks were added in.
//!
//! A callback whose state influences the rest of the run (early stopping's
//! best value and patience counter) gives it a name
//! ([`Callback::state_name`]) and saves and restores it
//! ([`Callback::save_state`], [`Callback::load_state`]); [`Fit::checkpoint`](super::Fit::checkpoint)
//! stores it and [`Fit::resume`](super::Fit::resume) restores it, after
//! checking that the run has the same stateful callbacks.
//!
//! Shipped callbacks: [`Progress`](super::Progress),
//! [`MetricsLog`](super::MetricsLog), [`EarlyStopping`](super::EarlyStopping),
//! [`PeriodicCheckpoint`](super::PeriodicCheckpoint) and, with the `plot`
//! feature, [`CurvePlot`](super::CurvePlot).

use std::collections::BTreeMap;
use std::time::Duration;

use super::Checkpoint;
use crate::Result;

/// Whether training goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Control {
    /// Keep training.
    Continue,
    /// Stop after this step or epoch (the run ends normally).
    Stop,
}

/// What happened in one optimisation step.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StepInfo<'a> {
    /// Epoch, from 1.
    pub epoch: usize,
    /// Number of epochs of the run.
    pub epochs: usize,
    /// Batch index within the epoch, from 1.
    pub batch: usize,
    /// Batches per epoch, when known.
    pub batches_per_epoch: Option<usize>,
    /// Global step count after this step (1 after the first step).
    pub step: u64,
    /// Learning rate used for this step.
    pub lr: f64,
    /// Loss of this step.
    pub loss: f64,
    /// Samples in the batch.
    pub samples: usize,
    /// Whether the non-finite guard skipped the update.
    pub skipped: bool,
    /// Other metrics the step reported.
    pub metrics: &'a BTreeMap<String, f64>,
    /// Wall time since `fit` started (this session only, not before a resume).
    pub elapsed: Duration,
    /// Samples processed since `fit` started.
    pub samples_seen: u64,
    /// Steps still to go in the run, when known.
    pub steps_left: Option<u64>,
}

/// Summary of a finished epoch.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EpochInfo<'a> {
    /// Epoch, from 1.
    pub epoch: usize,
    /// Number of epochs of the run.
    pub epochs: usize,
    /// Global step count at the end of the epoch.
    pub step: u64,
    /// Mean training loss over the epoch's steps.
    pub train_loss: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Evaluation and other epoch metrics (e.g. `test_acc`, `knn_acc`).
    pub metrics: &'a BTreeMap<String, f64>,
    /// Wall time since `fit` started.
    pub elapsed: Duration,
}

/// Access to the full training state, for checkpointing callbacks.
pub trait TrainingState {
    /// A checkpoint of everything needed to resume exactly at this point.
    fn checkpoint(&self) -> Result<Checkpoint>;
}

/// Code run by [`Fit`](super::Fit) during training. Every method has a
/// default that does nothing.
pub trait Callback {
    /// After every optimisation step.
    fn on_step(&mut self, _info: &StepInfo<'_>) -> Result<Control> {
        Ok(Control::Continue)
    }

    /// After every epoch (after evaluation): update the callback's state and
    /// decide whether to stop. [`Fit`](super::Fit) calls it for every
    /// callback before any [`Callback::after_epoch_end`].
    fn on_epoch_end(&mut self, _info: &EpochInfo<'_>) -> Result<Control> {
        Ok(Control::Continue)
    }

    /// After every callback's [`Callback::on_epoch_end`] of this epoch: the
    /// place to save the run (`state.checkpoint()` then holds every
    /// callback's state after this epoch). State changed here is not in this
    /// epoch's checkpoints.
    fn after_epoch_end(&mut self, _info: &EpochInfo<'_>, _state: &dyn TrainingState) -> Result<()> {
        Ok(())
    }

    /// Once, when training ends (normally or stopped by a callback).
    fn on_end(&mut self, _state: &dyn TrainingState) -> Result<()> {
        Ok(())
    }

    /// The name under which this callback's state is checkpointed, or
    /// `None` (the default) when it has no state that influences the rest
    /// of the run. Names are unique among the callbacks of a run.
    fn state_name(&self) -> Option<String> {
        None
    }

    /// Adds the callback's state to `state` (metadata entries and tensors;
    /// the checkpoint is the callback's own, names need no prefix). Called
    /// only when [`Callback::state_name`] is `Some`.
    fn save_state(&self, _state: &mut Checkpoint) -> Result<()> {
        Ok(())
    }

    /// Restores the state written by [`Callback::save_state`]. Must check
    /// everything before changing anything.
    fn load_state(&mut self, _state: &Checkpoint) -> Result<()> {
        Ok(())
    }
}

/// A callback lent to a run (`.with_callback(&mut early_stopping)`) stays
/// the caller's, who can read it after the run (e.g. the best value).
impl<C: Callback + ?Sized> Callback for &mut C {
    fn on_step(&mut self, info: &StepInfo<'_>) -> Result<Control> {
        (**self).on_step(info)
    }
    fn on_epoch_end(&mut self, info: &EpochInfo<'_>) -> Result<Control> {
        (**self).on_epoch_end(info)
    }
    fn after_epoch_end(&mut self, info: &EpochInfo<'_>, state: &dyn TrainingState) -> Result<()> {
        (**self).after_epoch_end(info, state)
    }
    fn on_end(&mut self, state: &dyn TrainingState) -> Result<()> {
        (**self).on_end(state)
    }
    fn state_name(&self) -> Option<String> {
        (**self).state_name()
    }
    fn save_state(&self, state: &mut Checkpoint) -> Result<()> {
        (**self).save_state(state)
    }
    fn load_state(&mut self, state: &Checkpoint) -> Result<()> {
        (**self).load_state(state)
    }
}
