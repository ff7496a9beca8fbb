//! RMSprop: torch.optim.RMSprop's update rule.
//!
//! ```text
//! g = g + weight_decay * p
//! sq = alpha * sq + (1 - alpha) * g * g               (square_avg)
//! centered:  ga = ga + (1 - alpha) * (g - ga);  avg = sqrt(sq - ga * ga) + eps
//! otherwise: avg = sqrt(sq) + eps
//! momentum > 0: buf = momentum * buf + g / avg;  p = p - lr * buf
//! otherwise:    p = p - lr * g / avg
//! ```

use candle_core::Tensor;

use super::groups::ParamGroup;
use super::state::Core;
use super::{check_lr, check_nonneg, check_unit, impl_optimizer, GradClip};
use crate::config::config;
use crate::{Error, Result};

config! {
    /// Settings of [`RmsProp`]; defaults are torch.optim.RMSprop's.
    pub struct RmsPropConfig {
        /// Learning rate (torch default 1e-2).
        lr: f64 = 1e-2,
        /// Smoothing constant of the squared-gradient average, in `[0, 1)` (torch default 0.99).
        alpha: f64 = 0.99,
        /// Added to the denominator for numerical stability (torch default 1e-8).
        eps: f64 = 1e-8,
        /// L2 penalty added to the gradient (torch default 0).
        weight_decay: f64 = 0.0,
        /// Momentum factor in `[0, 1)` (torch default 0).
        momentum: f64 = 0.0,
        /// Normalise by the estimated variance instead of the second moment (torch default false).
        centered: bool = false,
        /// Gradient clipping applied before each step (default none).
        grad_clip: Option<GradClip> = None,
    }
}

impl RmsPropConfig {
    fn validate(&self) -> Result<()> {
        check_lr("RmsPropConfig::lr", self.lr)?;
        check_unit("RmsPropConfig::alpha", self.alpha)?;
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::config(
                "RmsPropConfig::eps",
                self.eps,
                "must be finite and > 0",
            ));
        }
        check_nonneg("RmsPropConfig::weight_decay", self.weight_decay)?;
        check_unit("RmsPropConfig::momentum", self.momentum)
    }
}

/// RMSprop (torch.optim.RMSprop). State: `step`, `square_avg`,
/// `momentum_buffer` (momentum > 0), `grad_avg` (centered).
pub struct RmsProp {
    core: Core,
    cfg: RmsPropConfig,
}

impl RmsProp {
    /// Builds the optimizer over `groups`; validates the config.
    pub fn new(groups: Vec<ParamGroup>, config: RmsPropConfig) -> Result<Self> {
        config.validate()?;
        let mut bufs = vec!["square_avg"];
        if config.momentum > 0.0 {
            bufs.push("momentum_buffer");
        }
        if config.centered {
            bufs.push("grad_avg");
        }
        let core = Core::new(
            "RmsPropConfig",
            groups,
            config.lr,
            config.weight_decay,
            config.grad_clip,
            bufs,
            true,
        )?;
        Ok(Self { core, cfg: config })
    }

    /// The configuration.
    pub fn config(&self) -> &RmsPropConfig {
        &self.cfg
    }

    fn update(&mut self, i: usize, g: &Tensor) -> Result<()> {
        let grp = self.core.group_of(i);
        let lr = self.core.lr * grp.lr_scale;
        let c = &self.cfg;
        let Some(slot) = self.core.slots.get_mut(i) else {
            return Ok(());
        };
        let p = slot.var.as_tensor().detach();
        let mut bufs = Vec::with_capacity(slot.bufs.len());
        for b in &slot.bufs {
            bufs.push(match b {
                Some(b) => b.clone(),
                None => p.zeros_like()?,
            });
        }
        slot.step += 1;
        let mut g = g.clone();
        if grp.weight_decay != 0.0 {
            g = (g + (&p * grp.weight_decay)?)?;
        }
        let mut it = bufs.into_iter();
        let sq = it
            .next()
            .ok_or_else(|| Error::invalid("RmsProp step", "missing square_avg"))?;
        let buf = if c.momentum > 0.0 { it.next() } else { None };
        let ga = if c.centered { it.next() } else { None };
        let sq = ((sq * c.alpha)? + (g.sqr()? * (1.0 - c.alpha))?)?;
        let ga = match ga {
            Some(ga) => Some((&ga + ((&g - &ga)? * (1.0 - c.alpha))?)?),
            None => None,
        };
        let avg = match &ga {
            Some(ga) => (&sq - ga.sqr()?)?.sqrt()?,
            None => sq.sqrt()?,
        };
        let avg = (avg + c.eps)?;
        let buf = match buf {
            Some(b) => {
                let b = ((b * c.momentum)? + (&g / &avg)?)?;
                slot.var.set(&(&p - (&b * lr)?)?)?;
                Some(b)
            }
            None => {
                slot.var.set(&(&p - ((&g / &avg)? * lr)?)?)?;
                None
            }
        };
        slot.bufs = std::iter::once(sq).chain(buf).chain(ga).map(Some).collect();
        Ok(())
    }
}

impl_optimizer!(RmsProp, RmsPropConfig);
