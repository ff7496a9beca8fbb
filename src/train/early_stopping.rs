//! Early stopping on a monitored metric.

use super::callback::{Callback, Control, EpochInfo};
use super::Checkpoint;
use crate::{Error, Result};

/// Whether the monitored metric should go down or up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MonitorMode {
    /// Lower is better (losses; default).
    #[default]
    Min,
    /// Higher is better (accuracies).
    Max,
}

/// Stops training when `metric` has not improved by more than `min_delta`
/// for `patience` epochs (Keras/Lightning semantics).
///
/// Its state (the best value and the count of epochs without improvement)
/// is checkpointed under the name `early_stopping:<metric>`, so a resumed
/// run stops at the same epoch as an uninterrupted one.
#[derive(Debug, Clone)]
pub struct EarlyStopping {
    metric: String,
    mode: MonitorMode,
    patience: usize,
    min_delta: f64,
    best: Option<f64>,
    bad_epochs: usize,
}

impl EarlyStopping {
    /// Monitors `metric` (an epoch metric such as `test_acc`, or
    /// `train_loss`).
    pub fn new(
        metric: impl Into<String>,
        mode: MonitorMode,
        patience: usize,
        min_delta: f64,
    ) -> Result<Self> {
        if !(min_delta.is_finite() && min_delta >= 0.0) {
            return Err(Error::config(
                "EarlyStopping::min_delta",
                min_delta,
                "must be finite and >= 0",
            ));
        }
        Ok(EarlyStopping {
            metric: metric.into(),
            mode,
            patience,
            min_delta,
            best: None,
            bad_epochs: 0,
        })
    }

    /// The best value seen so far.
    pub fn best(&self) -> Option<f64> {
        self.best
    }

    /// Epochs since the last improvement.
    pub fn bad_epochs(&self) -> usize {
        self.bad_epochs
    }

    /// Feeds one epoch's value; returns whether to stop.
    pub fn observe(&mut self, value: f64) -> bool {
        let improved = match (self.best, self.mode) {
            (None, _) => value.is_finite(),
            (Some(b), MonitorMode::Min) => value < b - self.min_delta,
            (Some(b), MonitorMode::Max) => value > b + self.min_delta,
        };
        if improved {
            self.best = Some(value);
            self.bad_epochs = 0;
        } else {
            self.bad_epochs += 1;
        }
        self.bad_epochs > self.patience
    }
}

impl Callback for EarlyStopping {
    fn on_epoch_end(&mut self, info: &EpochInfo<'_>) -> Result<Control> {
        let value = match self.metric.as_str() {
            "train_loss" => info.train_loss,
            m => *info.metrics.get(m).ok_or_else(|| {
                Error::config(
                    "EarlyStopping::metric",
                    m,
                    format!(
                        "no such epoch metric; available: train_loss, {}",
                        info.metrics.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )
            })?,
        };
        Ok(if self.observe(value) {
            Control::Stop
        } else {
            Control::Continue
        })
    }

    fn state_name(&self) -> Option<String> {
        Some(format!("early_stopping:{}", self.metric))
    }

    fn save_state(&self, state: &mut Checkpoint) -> Result<()> {
        if let Some(b) = self.best {
            state.set_meta("best", format!("{b:?}"));
        }
        state.set_meta("bad_epochs", self.bad_epochs);
        Ok(())
    }

    fn load_state(&mut self, state: &Checkpoint) -> Result<()> {
        let best = match state.meta("best") {
            Some(_) => Some(state.meta_parse::<f64>("best")?),
            None => None,
        };
        let bad_epochs = state.meta_parse::<usize>("bad_epochs")?;
        self.best = best;
        self.bad_epochs = bad_epochs;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_after_patience() {
        let mut e = EarlyStopping::new("test_acc", MonitorMode::Max, 2, 0.0).unwrap();
        assert!(!e.observe(0.5));
        assert!(!e.observe(0.6));
        assert!(!e.observe(0.6)); // 1 bad epoch
        assert!(!e.observe(0.55)); // 2
        assert!(e.observe(0.59)); // 3 > patience
        assert_eq!(e.best(), Some(0.6));
        let mut m = EarlyStopping::new("train_loss", MonitorMode::Min, 0, 0.1).unwrap();
        assert!(!m.observe(1.0));
        assert!(m.observe(0.95)); // not better by more than min_delta
        assert!(EarlyStopping::new("x", MonitorMode::Min, 1, -1.0).is_err());
    }

    #[test]
    fn state_round_trips_and_bad_state_changes_nothing() {
        let mut a = EarlyStopping::new("val_loss", MonitorMode::Min, 3, 0.0).unwrap();
        assert_eq!(a.state_name().as_deref(), Some("early_stopping:val_loss"));
        let mut fresh = Checkpoint::new("s");
        a.save_state(&mut fresh).unwrap();
        for v in [0.5, 0.1 + 0.2, 0.4, 0.45] {
            a.observe(v);
        }
        let mut c = Checkpoint::new("s");
        a.save_state(&mut c).unwrap();
        let mut b = EarlyStopping::new("val_loss", MonitorMode::Min, 3, 0.0).unwrap();
        b.load_state(&c).unwrap();
        assert_eq!((b.best(), b.bad_epochs()), (Some(0.1 + 0.2), 2));
        // The restored state decides: one more bad epoch is within patience,
        // two are not.
        assert!(!b.observe(0.5));
        assert!(b.observe(0.5));
        // No best yet round-trips too.
        b.load_state(&fresh).unwrap();
        assert_eq!((b.best(), b.bad_epochs()), (None, 0));
        // A malformed entry is an error and changes nothing.
        b.load_state(&c).unwrap();
        let mut bad = c.clone();
        bad.set_meta("bad_epochs", "x");
        assert!(matches!(b.load_state(&bad), Err(Error::Malformed { .. })));
        let mut bad = c.clone();
        bad.set_meta("best", "");
        assert!(b.load_state(&bad).is_err());
        assert_eq!((b.best(), b.bad_epochs()), (Some(0.1 + 0.2), 2));
    }
}
