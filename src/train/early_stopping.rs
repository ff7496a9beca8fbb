//! Early stopping on a monitored metric.

use super::callback::{Callback, Control, EpochInfo, TrainingState};
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
    fn on_epoch_end(
        &mut self,
        info: &EpochInfo<'_>,
        _state: &dyn TrainingState,
    ) -> Result<Control> {
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
}
