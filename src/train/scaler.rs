//! Dynamic loss scaling for f16 mixed-precision training.
//!
//! f16 gradients underflow for small values; multiplying the loss by a large
//! scale before backward keeps them representable. After backward the
//! gradients are divided by the scale. If any is infinite or NaN the scale
//! was too large: the step is skipped and the scale multiplied by
//! `backoff_factor`; after `growth_interval` consecutive good steps it is
//! multiplied by `growth_factor`. Defaults are torch's `GradScaler`
//! (initial 2¹⁶, growth 2, backoff 0.5, interval 2000).
//!
//! ```
//! use aimass::train::{LossScaler, LossScalerConfig};
//!
//! let mut s = LossScaler::new(LossScalerConfig::default().with_growth_interval(2))?;
//! assert_eq!(s.scale(), 65536.0);
//! assert!(!s.update(true));        // overflow: skip the step, halve the scale
//! assert_eq!(s.scale(), 32768.0);
//! assert!(s.update(false) && s.update(false)); // two good steps: double it
//! assert_eq!(s.scale(), 65536.0);
//! # Ok::<(), aimass::Error>(())
//! ```

use crate::config::config;
use crate::{Error, Result};

config! {
    /// Settings of [`LossScaler`] (torch.cuda.amp.GradScaler's defaults).
    pub struct LossScalerConfig {
        /// Starting scale (default 65536 = 2¹⁶).
        init_scale: f64 = 65536.0,
        /// Factor applied after `growth_interval` good steps (default 2).
        growth_factor: f64 = 2.0,
        /// Factor applied on overflow (default 0.5).
        backoff_factor: f64 = 0.5,
        /// Good steps between growths (default 2000).
        growth_interval: u64 = 2000,
    }
}

impl LossScalerConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if !(self.init_scale.is_finite() && self.init_scale > 0.0) {
            return Err(Error::config(
                "LossScalerConfig::init_scale",
                self.init_scale,
                "must be finite and > 0",
            ));
        }
        if !(self.growth_factor.is_finite() && self.growth_factor >= 1.0) {
            return Err(Error::config(
                "LossScalerConfig::growth_factor",
                self.growth_factor,
                "must be finite and >= 1",
            ));
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return Err(Error::config(
                "LossScalerConfig::backoff_factor",
                self.backoff_factor,
                "must be in (0, 1)",
            ));
        }
        if self.growth_interval == 0 {
            return Err(Error::config(
                "LossScalerConfig::growth_interval",
                0,
                "must be >= 1",
            ));
        }
        Ok(())
    }
}

/// Dynamic loss scale with growth and backoff.
#[derive(Debug, Clone)]
pub struct LossScaler {
    config: LossScalerConfig,
    scale: f64,
    good_steps: u64,
    skipped: u64,
}

impl LossScaler {
    /// A scaler at `config.init_scale`; the config is validated.
    pub fn new(config: LossScalerConfig) -> Result<Self> {
        config.validate()?;
        Ok(LossScaler {
            scale: config.init_scale,
            config,
            good_steps: 0,
            skipped: 0,
        })
    }

    /// The current scale: multiply the loss by it before backward, divide
    /// the gradients by it after.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Steps skipped because of overflow so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Records the outcome of a step: `overflow` is true when some scaled
    /// gradient was not finite. Returns whether the step should be applied.
    pub fn update(&mut self, overflow: bool) -> bool {
        if overflow {
            self.scale *= self.config.backoff_factor;
            self.good_steps = 0;
            self.skipped += 1;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps >= self.config.growth_interval {
            self.scale *= self.config.growth_factor;
            self.good_steps = 0;
        }
        true
    }

    /// The state to checkpoint: (scale, good steps since the last change, skipped).
    pub fn state(&self) -> (f64, u64, u64) {
        (self.scale, self.good_steps, self.skipped)
    }

    /// Restores a state from [`LossScaler::state`].
    pub fn set_state(&mut self, (scale, good_steps, skipped): (f64, u64, u64)) {
        self.scale = scale;
        self.good_steps = good_steps;
        self.skipped = skipped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_torch_grad_scaler_sequence() {
        // torch: scale halves on each inf step, doubles after `interval` clean steps.
        let mut s = LossScaler::new(
            LossScalerConfig::default()
                .with_init_scale(8.0)
                .with_growth_interval(3),
        )
        .unwrap();
        let outcomes = [false, false, true, false, false, false, true, true];
        let want = [8.0, 8.0, 4.0, 4.0, 4.0, 8.0, 4.0, 2.0];
        for (o, w) in outcomes.iter().zip(want) {
            let applied = s.update(*o);
            assert_eq!(applied, !o);
            assert_eq!(s.scale(), w);
        }
        assert_eq!(s.skipped(), 3);
    }

    #[test]
    fn bad_configs() {
        assert!(LossScaler::new(LossScalerConfig::default().with_init_scale(0.0)).is_err());
        assert!(LossScaler::new(LossScalerConfig::default().with_backoff_factor(1.5)).is_err());
        assert!(LossScaler::new(LossScalerConfig::default().with_growth_factor(0.5)).is_err());
        assert!(LossScaler::new(LossScalerConfig::default().with_growth_interval(0)).is_err());
    }
}
