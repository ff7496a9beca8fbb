//! Rank 0 writes, every rank resumes: [`RankZero`] and
//! [`broadcast_checkpoint`].

use std::path::Path;

use candle_core::Device;

use super::Communicator;
use crate::train::{Callback, Checkpoint, Control, EpochInfo, StepInfo, TrainingState};
use crate::{Error, Result};

/// A callback that runs on rank 0 only: progress displays, metric logs,
/// [`PeriodicCheckpoint`](crate::train::PeriodicCheckpoint)s and plots,
/// which would otherwise write the same files from every rank.
///
/// Only callbacks without state and that never stop the run can be
/// wrapped: a stateful callback (early stopping) must run, and decide, on
/// every rank, or the ranks would stop at different steps.
///
/// ```
/// use aimass::distributed::{RankZero, SingleProcess};
/// use aimass::train::{Progress, ProgressMode};
///
/// let comm = SingleProcess::new();
/// let progress = RankZero::new(Progress::new(ProgressMode::Lines, 10), &comm)?;
/// assert!(progress.is_active());
/// # Ok::<(), aimass::Error>(())
/// ```
pub struct RankZero<C: Callback> {
    inner: C,
    active: bool,
}

impl<C: Callback> RankZero<C> {
    /// Runs `callback` when `comm`'s rank is 0.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a stateful callback (one with a
    /// [`Callback::state_name`]).
    pub fn new(callback: C, comm: &dyn Communicator) -> Result<Self> {
        if let Some(name) = callback.state_name() {
            return Err(Error::config(
                "RankZero::new",
                name,
                "a stateful callback (early stopping) decides when to stop and must run on every rank: add it to every rank's Fit directly",
            ));
        }
        Ok(RankZero {
            inner: callback,
            active: comm.rank() == 0,
        })
    }

    /// Whether the callback runs on this rank.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The wrapped callback.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    fn refuse_stop(&self, control: Control) -> Result<Control> {
        match control {
            Control::Continue => Ok(Control::Continue),
            _ => Err(Error::invalid(
                "RankZero",
                "a callback that runs on rank 0 only asked to stop the run; the other ranks would go on: run stopping callbacks on every rank",
            )),
        }
    }
}

impl<C: Callback> Callback for RankZero<C> {
    fn on_step(&mut self, info: &StepInfo<'_>) -> Result<Control> {
        if !self.active {
            return Ok(Control::Continue);
        }
        let c = self.inner.on_step(info)?;
        self.refuse_stop(c)
    }

    fn on_epoch_end(&mut self, info: &EpochInfo<'_>) -> Result<Control> {
        if !self.active {
            return Ok(Control::Continue);
        }
        let c = self.inner.on_epoch_end(info)?;
        self.refuse_stop(c)
    }

    fn after_epoch_end(&mut self, info: &EpochInfo<'_>, state: &dyn TrainingState) -> Result<()> {
        if self.active {
            self.inner.after_epoch_end(info, state)?;
        }
        Ok(())
    }

    fn on_end(&mut self, state: &dyn TrainingState) -> Result<()> {
        if self.active {
            self.inner.on_end(state)?;
        }
        Ok(())
    }
}

/// Rank 0's checkpoint on every rank: rank 0 passes the checkpoint it
/// loaded (or `None` to start afresh), the other ranks pass `None`; every
/// rank gets rank 0's choice, with tensors on `device`. For runs whose
/// ranks do not share a file system, and so that all ranks resume from the
/// very same bytes even if a newer checkpoint appears meanwhile.
///
/// ```
/// use aimass::prelude::*;
/// use aimass::distributed::{broadcast_checkpoint, SingleProcess};
/// use aimass::train::Checkpoint;
///
/// let mut ckpt = Checkpoint::new("classifier");
/// ckpt.set_meta("step", 3);
/// let got = broadcast_checkpoint(&SingleProcess::new(), Some(ckpt), &Device::Cpu)?;
/// assert_eq!(got.unwrap().meta("step"), Some("3"));
/// # Ok::<(), aimass::Error>(())
/// ```
pub fn broadcast_checkpoint(
    comm: &dyn Communicator,
    ckpt: Option<Checkpoint>,
    device: &Device,
) -> Result<Option<Checkpoint>> {
    if comm.world_size() == 1 {
        return Ok(ckpt);
    }
    let bytes = match (&ckpt, comm.rank()) {
        (Some(c), 0) => c.to_bytes()?,
        _ => Vec::new(),
    };
    let got = comm.broadcast_bytes(&bytes, 0)?;
    if got.is_empty() {
        return Ok(None);
    }
    if comm.rank() == 0 {
        return Ok(ckpt);
    }
    Ok(Some(Checkpoint::from_bytes(
        &got,
        Path::new("<checkpoint broadcast from rank 0>"),
        device,
    )?))
}
