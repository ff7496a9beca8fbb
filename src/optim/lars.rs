//! LARS (layer-wise adaptive rate scaling, You et al. 2017) as used by
//! SimCLR and BYOL: SGD with momentum whose per-parameter learning rate is
//! scaled by a trust ratio.
//!
//! For a parameter `p` with gradient `g` in a group with weight decay `wd`
//! and adaptation on:
//!
//! ```text
//! d = g + wd * p
//! if ||p|| > 0 and ||g|| > 0:  d = d * eta * ||p|| / (||g|| + wd * ||p|| + eps)
//! buf = d (first step);  buf = momentum * buf + d (later steps)
//! p = p - lr * (d + momentum * buf  if nesterov else buf)
//! ```
//!
//! Groups with adaptation off (by default the 1-D parameters: biases and
//! norm scales, which also get no weight decay, see
//! [`default_param_groups`](super::default_param_groups)) take the plain
//! momentum step with `d = g + wd * p`. Like the PyTorch ports used by
//! lightly and solo-learn, the learning rate multiplies the momentum
//! buffer's output (torch SGD style), not its input as in SimCLR's
//! TensorFlow code; the two agree at a constant learning rate.

use candle_core::Tensor;

use super::groups::ParamGroup;
use super::state::Core;
use super::{check_lr, check_nonneg, check_unit, impl_optimizer, GradClip};
use crate::config::config;
use crate::{Error, Result};

config! {
    /// Settings of [`Lars`]; defaults from SimCLR (Chen et al. 2020).
    pub struct LarsConfig {
        /// Base learning rate (SimCLR: 0.3 × batch / 256; default 0.3).
        lr: f64 = 0.3,
        /// Momentum factor in `[0, 1)` (SimCLR, BYOL: 0.9).
        momentum: f64 = 0.9,
        /// Weight decay of adapted parameters (SimCLR: 1e-6; BYOL uses 1.5e-6).
        weight_decay: f64 = 1e-6,
        /// Trust coefficient η (SimCLR, BYOL: 1e-3).
        eta: f64 = 1e-3,
        /// Added to the trust-ratio denominator (lightly's LARS: 1e-8).
        eps: f64 = 1e-8,
        /// Nesterov momentum (default false).
        nesterov: bool = false,
        /// Gradient clipping applied before each step (default none).
        grad_clip: Option<GradClip> = None,
    }
}

impl LarsConfig {
    fn validate(&self) -> Result<()> {
        check_lr("LarsConfig::lr", self.lr)?;
        check_unit("LarsConfig::momentum", self.momentum)?;
        check_nonneg("LarsConfig::weight_decay", self.weight_decay)?;
        if !(self.eta.is_finite() && self.eta > 0.0) {
            return Err(Error::config(
                "LarsConfig::eta",
                self.eta,
                "must be finite and > 0",
            ));
        }
        check_nonneg("LarsConfig::eps", self.eps)?;
        if self.nesterov && self.momentum <= 0.0 {
            return Err(Error::config(
                "LarsConfig::nesterov",
                true,
                "Nesterov momentum requires momentum > 0",
            ));
        }
        Ok(())
    }
}

/// LARS optimizer (SimCLR / BYOL). State: `momentum_buffer`.
pub struct Lars {
    core: Core,
    cfg: LarsConfig,
}

/// The 2-norm of `t` as a 0-d tensor on its device (f32, or f64 for f64).
fn norm(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(crate::host::accumulator(t))?
        .sqr()?
        .sum_all()?
        .sqrt()?)
}

/// The trust ratio `eta·‖p‖ / (‖g‖ + wd·‖p‖ + eps)`, or 1 unless both
/// norms are > 0, computed on the device (no host read per parameter).
fn trust_ratio(p: &Tensor, g: &Tensor, eta: f64, wd: f64, eps: f64) -> Result<Tensor> {
    let (pn, gn) = (norm(p)?, norm(g)?);
    let ratio = ((&pn * eta)? / ((&gn + (&pn * wd)?)? + eps)?)?;
    let one = ratio.ones_like()?;
    let ratio = gn.gt(0.0)?.where_cond(&ratio, &one)?;
    Ok(pn.gt(0.0)?.where_cond(&ratio, &one)?)
}

impl Lars {
    /// Builds the optimizer over `groups`; validates the config. Groups
    /// with `trust_ratio == false` are not adapted.
    pub fn new(groups: Vec<ParamGroup>, config: LarsConfig) -> Result<Self> {
        config.validate()?;
        let bufs = if config.momentum != 0.0 {
            vec!["momentum_buffer"]
        } else {
            vec![]
        };
        let core = Core::new(
            "LarsConfig",
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
    pub fn config(&self) -> &LarsConfig {
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
        let mut d = if wd != 0.0 {
            (g + (p * wd)?)?
        } else {
            g.clone()
        };
        if grp.trust_ratio {
            let r = trust_ratio(p, g, c.eta, wd, c.eps)?;
            d = d.broadcast_mul(&r.to_dtype(d.dtype())?)?;
        }
        if c.momentum != 0.0 {
            let buf = match slot.bufs.first().and_then(|b| b.as_ref()) {
                None => d.copy()?,
                Some(b) => ((b * c.momentum)? + &d)?,
            };
            d = if c.nesterov {
                (d + (&buf * c.momentum)?)?
            } else {
                buf.clone()
            };
            if let Some(b) = slot.bufs.first_mut() {
                *b = Some(buf);
            }
        }
        slot.var.set(&(p - (d * lr)?)?)?;
        Ok(())
    }
}

impl_optimizer!(Lars, LarsConfig);
