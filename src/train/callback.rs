//! Callbacks: code that [`Fit`](super::Fit) runs after every step, at the
//! end of every epoch and at the end of training.
//!
//! A callback sees read-only summaries ([`StepInfo`], [`EpochInfo`]) and can
//! stop training by returning [`Control::Stop`]. At the end of an epoch it can
//! also ask for a checkpoint of the whole training state through
//! [`TrainingState`]. Shipped callbacks: [`Progress`](super::Progress),
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

    /// After every epoch (after evaluation).
    fn on_epoch_end(
        &mut self,
        _info: &EpochInfo<'_>,
        _state: &dyn TrainingState,
    ) -> Result<Control> {
        Ok(Control::Continue)
    }

    /// Once, when training ends (normally or stopped by a callback).
    fn on_end(&mut self, _state: &dyn TrainingState) -> Result<()> {
        Ok(())
    }
}
