//! Stochastic gradient descent with momentum, dampening, Nesterov and L2
//! weight decay: torch.optim.SGD's update rule.
//!
//! For each parameter `p` with gradient `g`, at learning rate `lr`:
//!
//! ```text
//! g = g + weight_decay * p
//! if momentum != 0:
//!     buf = g                                   (first step)
//!     buf = momentum * buf + (1 - dampening) * g (later steps)
//!     g = g + momentum * buf  if nesterov else buf
//! p = p - lr * g
//! ```

use candle_core::{DType, Tensor};

use super::fused;
use super::groups::ParamGroup;
use super::state::Core;
use super::{check_lr, check_nonneg, check_unit, impl_optimizer, GradClip};
use crate::config::config;
use crate::{Error, Result};

config! {
    /// Settings of [`Sgd`]; defaults are torch.optim.SGD's.
    pub struct SgdConfig {
        /// Learning rate (torch default 1e-3).
        lr: f64 = 1e-3,
        /// Momentum factor in `[0, 1)` (torch default 0).
        momentum: f64 = 0.0,
        /// Dampening of the momentum update in `[0, 1]` (torch default 0).
        dampening: f64 = 0.0,
        /// L2 penalty added to the gradient (torch default 0).
        weight_decay: f64 = 0.0,
        /// Nesterov momentum; needs `momentum > 0` and `dampening == 0` (torch default false).
        nesterov: bool = false,
        /// Gradient clipping applied before each step (default none).
        grad_clip: Option<GradClip> = None,
        /// Fused in-place CPU update: `None` (default) uses it for f32/f64 CPU
        /// parameters (so does `Some(true)`), `Some(false)` always uses candle ops.
        fused: Option<bool> = None,
    }
}

impl SgdConfig {
    fn validate(&self) -> Result<()> {
        check_lr("SgdConfig::lr", self.lr)?;
        check_unit("SgdConfig::momentum", self.momentum)?;
        if !(0.0..=1.0).contains(&self.dampening) {
            return Err(Error::config(
                "SgdConfig::dampening",
                self.dampening,
                "must be in [0, 1]",
            ));
        }
        check_nonneg("SgdConfig::weight_decay", self.weight_decay)?;
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Error::config(
                "SgdConfig::nesterov",
                self.nesterov,
                format!(
                    "Nesterov momentum requires momentum > 0 and dampening = 0 (got momentum {}, dampening {})",
                    self.momentum, self.dampening
                ),
            ));
        }
        Ok(())
    }
}

/// SGD with momentum (torch.optim.SGD). State: `momentum_buffer`.
pub struct Sgd {
    core: Core,
    cfg: SgdConfig,
}

impl Sgd {
    /// Builds the optimizer over `groups` (see [`ParamGroup`]); validates
    /// the config.
    pub fn new(groups: Vec<ParamGroup>, config: SgdConfig) -> Result<Self> {
        config.validate()?;
        let bufs = if config.momentum != 0.0 {
            vec!["momentum_buffer"]
        } else {
            vec![]
        };
        let core = Core::new(
            "SgdConfig",
            groups,
            config.lr,
            config.weight_decay,
            config.grad_clip,
            bufs,
            false,
        )?;
        Ok(Self { core, cfg: config })
    }

    /// The configuration.
    pub fn config(&self) -> &SgdConfig {
        &self.cfg
    }

    fn update(&mut self, i: usize, g: &Tensor) -> Result<()> {
        let grp = self.core.group_of(i);
        let lr = self.core.lr * grp.lr_scale;
        let wd = grp.weight_decay;
        let c = &self.cfg;
        let Some(slot) = self.core.slots.get_mut(i) else {
            return Ok(());
        };
        let p = &slot.var.as_tensor().detach();
        let use_fused = c.fused != Some(false);
        let has_buf = c.momentum != 0.0 && slot.bufs.first().is_some_and(|b| b.is_some());
        if use_fused && (c.momentum == 0.0 || has_buf) {
            let mut muts = vec![p];
            if let Some(Some(b)) = slot.bufs.first() {
                muts.push(b);
            }
            if fused::applicable(&muts, g) {
                let (m, d, n) = (c.momentum, c.dampening, c.nesterov);
                match p.dtype() {
                    DType::F32 => {
                        return fused::with_slices::<f32>(&muts, g, |s, g| {
                            fused::sgd(s, g, lr, wd, m, d, n)
                        })
                    }
                    DType::F64 => {
                        return fused::with_slices::<f64>(&muts, g, |s, g| {
                            fused::sgd(s, g, lr, wd, m, d, n)
                        })
                    }
                    _ => {}
                }
            }
        }
        // Candle-op path (any device and dtype).
        let mut g = g.clone();
        if wd != 0.0 {
            g = (g + (p * wd)?)?;
        }
        if c.momentum != 0.0 {
            let buf = match slot.bufs.first().and_then(|b| b.as_ref()) {
                None => g.copy()?,
                Some(b) => ((b * c.momentum)? + (&g * (1.0 - c.dampening))?)?,
            };
            g = if c.nesterov {
                (g + (&buf * c.momentum)?)?
            } else {
                buf.clone()
            };
            if let Some(b) = slot.bufs.first_mut() {
                *b = Some(buf);
            }
        }
        slot.var.set(&(p - (g * lr)?)?)?;
        Ok(())
    }
}

impl_optimizer!(Sgd, SgdConfig);
