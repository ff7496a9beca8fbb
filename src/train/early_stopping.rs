//! Early stopping on a monitored metric.

use super::callback::{Callback, Control, EpochInfo};
use super::Checkpoint;
use crate::config::config;
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

config! {
    /// Settings of [`EarlyStopping`]; defaults are PyTorch Lightning's
    /// `EarlyStopping`'s.
    pub struct EarlyStoppingConfig {
        /// Whether the metric should go down or up (Lightning default: min).
        mode: MonitorMode = MonitorMode::Min,
        /// Epochs without improvement tolerated before stopping (Lightning
        /// default 3; Keras 0).
        patience: usize = 3,
        /// Smallest change that counts as an improvement, >= 0 (Lightning and
        /// Keras default 0).
        min_delta: f64 = 0.0,
    }
}

impl EarlyStoppingConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if !(self.min_delta.is_finite() && self.min_delta >= 0.0) {
            return Err(Error::config(
                "EarlyStoppingConfig::min_delta",
                self.min_delta,
                "must be finite and >= 0",
            ));
        }
        Ok(())
    }
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
    cfg: EarlyStoppingConfig,
    best: Option<f64>,
    bad_epochs: usize,
}

impl EarlyStopping {
    /// Monitors `metric` (an epoch metric such as `test_acc`, or
    /// `train_loss`); validates the config.
    pub fn new(metric: impl Into<String>, cfg: EarlyStoppingConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(EarlyStopping {
            metric: metric.into(),
            cfg,
            best: None,
            bad_epochs: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EarlyStoppingConfig {
        &self.cfg
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
        let improved = match (self.best, self.cfg.mode) {
            (None, _) => value.is_finite(),
            (Some(b), MonitorMode::Min) => value < b - self.cfg.min_delta,
            (Some(b), MonitorMode::Max) => value > b + self.cfg.min_delta,
        };
        if improved {
            self.best = Some(value);
            self.bad_epochs = 0;
        } else {
            self.bad_epochs += 1;
        }
        self.bad_epochs > self.cfg.patience
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
        let cfg = EarlyStoppingConfig::default;
        let max = cfg().with_mode(MonitorMode::Max).with_patience(2);
        let mut e = EarlyStopping::new("test_acc", max).unwrap();
        assert!(!e.observe(0.5));
        assert!(!e.observe(0.6));
        assert!(!e.observe(0.6)); // 1 bad epoch
        assert!(!e.observe(0.55)); // 2
        assert!(e.observe(0.59)); // 3 > patience
        assert_eq!(e.best(), Some(0.6));
        let min = cfg().with_patience(0).with_min_delta(0.1);
        let mut m = EarlyStopping::new("train_loss", min).unwrap();
        assert!(!m.observe(1.0));
        assert!(m.observe(0.95)); // not better by more than min_delta
        match EarlyStopping::new("x", cfg().with_min_delta(-1.0)) {
            Err(Error::Config { field, .. }) => assert_eq!(field, "EarlyStoppingConfig::min_delta"),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn state_round_trips_and_bad_state_changes_nothing() {
        let mut a = EarlyStopping::new(
            "val_loss",
            EarlyStoppingConfig::default()
                .with_mode(MonitorMode::Min)
                .with_patience(3),
        )
        .unwrap();
        assert_eq!(a.state_name().as_deref(), Some("early_stopping:val_loss"));
        let mut fresh = Checkpoint::new("s");
        a.save_state(&mut fresh).unwrap();
        for v in [0.5, 0.1 + 0.2, 0.4, 0.45] {
            a.observe(v);
        }
        let mut c = Checkpoint::new("s");
        a.save_state(&mut c).unwrap();
        let mut b = EarlyStopping::new(
            "val_loss",
            EarlyStoppingConfig::default()
                .with_mode(MonitorMode::Min)
                .with_patience(3),
        )
        .unwrap();
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
