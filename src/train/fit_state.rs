//! What [`Fit`](super::Fit) keeps in a checkpoint besides the trainer's
//! state and the data position: the state of every stateful callback and of
//! a plateau schedule, and the learning rate.
//!
//! Callback states are stored in the order of their names, not the order
//! the callbacks were added: `fit.callbacks` (their number), `fit.callback.<i>`
//! (the `i`-th name), and the callback's own entries as `callback.<i>.<key>`
//! (metadata) and `callback.<i>/<name>` (tensors). A plateau schedule is
//! `fit.plateau.metric` and `fit.plateau.<entry>` for each entry of
//! [`ReduceLrOnPlateau::state_dict`], as metadata (its `best` starts at ±∞,
//! and checkpoint tensors must be finite).

use std::collections::{BTreeSet, HashMap};

use candle_core::{DType, Device, Tensor};

use super::callback::Callback;
use super::Checkpoint;
use crate::optim::{ReduceLrOnPlateau, Schedule};
use crate::{Error, Result};

/// Where the learning rate of a run comes from.
pub(crate) enum LrSource<'a> {
    /// A schedule queried at the global step before every step.
    Steps(Box<dyn Schedule + 'a>),
    /// A plateau schedule stepped with an epoch metric after every epoch.
    Plateau {
        /// The monitored epoch metric (`train_loss` or an evaluator metric).
        metric: String,
        /// The schedule and its position.
        plateau: ReduceLrOnPlateau,
    },
}

/// The stateful callbacks as (name, index), sorted by name; two callbacks
/// with one name are an error.
pub(crate) fn stateful(callbacks: &[Box<dyn Callback + '_>]) -> Result<Vec<(String, usize)>> {
    let mut named: Vec<(String, usize)> = callbacks
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.state_name().map(|n| (n, i)))
        .collect();
    named.sort();
    for w in named.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(Error::config(
                "Fit::with_callback",
                &w[0].0,
                "two callbacks keep their state under this name, so a checkpoint could not tell them apart: monitor different metrics, or drop one",
            ));
        }
    }
    Ok(named)
}

/// The checkpoint entries of Fit's own state (callbacks, plateau schedule).
pub(crate) fn save(
    callbacks: &[Box<dyn Callback + '_>],
    lr_source: Option<&LrSource<'_>>,
) -> Result<Checkpoint> {
    let mut c = Checkpoint::new("fit");
    let named = stateful(callbacks)?;
    c.set_meta("fit.callbacks", named.len());
    for (i, (name, idx)) in named.iter().enumerate() {
        c.set_meta(format!("fit.callback.{i}"), name);
        let mut part = Checkpoint::new(name.clone());
        callbacks[*idx].save_state(&mut part)?;
        c.insert_part(&format!("callback.{i}"), &part);
    }
    if let Some(LrSource::Plateau { metric, plateau }) = lr_source {
        c.set_meta("fit.plateau.metric", metric);
        for (k, t) in plateau.state_dict()? {
            // host-ok: the plateau state's scalars, on the CPU, at checkpoint time.
            let v = t
                .to_device(&candle_core::Device::Cpu)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            c.set_meta(format!("fit.plateau.{k}"), format!("{v:?}"));
        }
    }
    Ok(c)
}

/// The callback names stored in `ckpt`, in storage order.
fn saved_names(ckpt: &Checkpoint) -> Result<Vec<String>> {
    let n = match ckpt.meta("fit.callbacks") {
        Some(_) => ckpt.meta_parse::<usize>("fit.callbacks")?,
        None => 0,
    };
    (0..n)
        .map(|i| ckpt.meta_parse::<String>(&format!("fit.callback.{i}")))
        .collect()
}

/// Fit's own state read from a checkpoint and checked against the run,
/// ready to apply.
pub(crate) struct Restore {
    /// (index of the callback, its state), for every stateful callback.
    callbacks: Vec<(usize, Checkpoint)>,
    /// The plateau schedule's restored position.
    plateau: Option<ReduceLrOnPlateau>,
}

/// Reads and checks Fit's own state in `ckpt` without changing anything:
/// the stateful callbacks must be the same set by name, and the plateau
/// schedule the same metric.
pub(crate) fn read(
    ckpt: &Checkpoint,
    callbacks: &[Box<dyn Callback + '_>],
    lr_source: Option<&LrSource<'_>>,
) -> Result<Restore> {
    let named = stateful(callbacks)?;
    let saved = saved_names(ckpt)?;
    let have: BTreeSet<&String> = named.iter().map(|(n, _)| n).collect();
    let want: BTreeSet<&String> = saved.iter().collect();
    if have != want {
        let missing: Vec<&&String> = want.difference(&have).collect();
        let unexpected: Vec<&&String> = have.difference(&want).collect();
        return Err(Error::malformed(
            "<checkpoint>",
            "callback state",
            format!("state for the run's stateful callbacks {have:?}"),
            format!("state for {want:?}: this run lacks {missing:?} and adds {unexpected:?} (resume with the callbacks the checkpoint was written with)"),
        ));
    }
    let callbacks = named
        .iter()
        .map(|(name, idx)| {
            let i = saved.iter().position(|s| s == name).unwrap_or_default();
            (*idx, ckpt.part(&format!("callback.{i}"), name))
        })
        .collect();
    let saved_metric = ckpt.meta("fit.plateau.metric");
    let plateau = match (lr_source, saved_metric) {
        (Some(LrSource::Plateau { metric, plateau }), Some(m)) if m == metric => {
            let mut state = HashMap::new();
            for k in plateau.state_dict()?.into_keys() {
                let v: f64 = ckpt.meta_parse(&format!("fit.plateau.{k}"))?;
                state.insert(k, Tensor::new(v, &Device::Cpu)?);
            }
            let mut p = plateau.clone();
            p.load_state_dict(&state)?;
            Some(p)
        }
        (None | Some(LrSource::Steps(_)), None) => None,
        (source, saved) => {
            let run = match source {
                Some(LrSource::Plateau { metric, .. }) => {
                    format!("a plateau schedule on `{metric}`")
                }
                _ => "no plateau schedule".to_string(),
            };
            return Err(Error::malformed(
                "<checkpoint>",
                "plateau schedule state",
                format!("the run's {run}"),
                match saved {
                    Some(m) => format!("a plateau schedule on `{m}` (resume with the same schedule)"),
                    None => "no plateau schedule (resume with the schedule the checkpoint was written with)".into(),
                },
            ));
        }
    };
    Ok(Restore { callbacks, plateau })
}

impl Restore {
    /// Loads the callbacks' states, each all-or-nothing; when one fails,
    /// those already loaded get their previous state (`backups`, from
    /// [`Restore::backups`]) back.
    pub(crate) fn load_callbacks(
        &self,
        callbacks: &mut [Box<dyn Callback + '_>],
        backups: &[Checkpoint],
    ) -> Result<()> {
        for (k, (idx, state)) in self.callbacks.iter().enumerate() {
            if let Err(e) = callbacks[*idx].load_state(state) {
                self.rollback(callbacks, &backups[..k]);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Restores the first `backups.len()` callbacks' previous states.
    pub(crate) fn rollback(
        &self,
        callbacks: &mut [Box<dyn Callback + '_>],
        backups: &[Checkpoint],
    ) {
        for ((idx, _), b) in self.callbacks.iter().zip(backups) {
            // Their own earlier state: loading it back cannot fail in a
            // callback that follows the contract.
            let _ = callbacks[*idx].load_state(b);
        }
    }

    /// The previous states of the callbacks [`Restore::load_callbacks`]
    /// changes, for [`Restore::rollback`].
    pub(crate) fn backups(&self, callbacks: &[Box<dyn Callback + '_>]) -> Result<Vec<Checkpoint>> {
        self.callbacks
            .iter()
            .map(|(idx, _)| {
                let cb = &callbacks[*idx];
                let mut b = Checkpoint::new(cb.state_name().unwrap_or_default());
                cb.save_state(&mut b)?;
                Ok(b)
            })
            .collect()
    }

    /// The plateau schedule's restored position, if the run has one.
    pub(crate) fn take_plateau(&mut self) -> Option<ReduceLrOnPlateau> {
        self.plateau.take()
    }
}
