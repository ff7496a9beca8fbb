//! Adam and AdamW: torch.optim.Adam / torch.optim.AdamW's update rule.
//!
//! For each parameter `p` with gradient `g` at its step `t` (from 1):
//!
//! ```text
//! Adam:  g = g + weight_decay * p          AdamW: p = p * (1 - lr * weight_decay)
//! m = beta1 * m + (1 - beta1) * g          (exp_avg)
//! v = beta2 * v + (1 - beta2) * g * g      (exp_avg_sq)
//! v_max = max(v_max, v)  and use v_max below when amsgrad
//! p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! On the CPU, f32 and f64 parameters are updated by one fused, in-place,
//! rayon-parallel pass; other devices and dtypes use candle ops.

use candle_core::{DType, Tensor};

use super::fused::{self, AdamCoef};
use super::groups::ParamGroup;
use super::state::Core;
use super::{check_lr, check_nonneg, check_unit, impl_optimizer, GradClip};
use crate::config::config;
use crate::{Error, Result};

macro_rules! adam_config {
    ($name:ident, $owner:literal, $torch:literal, $wd:expr, $wd_doc:literal) => {
        config! {
            #[doc = concat!("Settings of [`", $owner, "`]; defaults are ", $torch, "'s.")]
            pub struct $name {
                /// Learning rate (torch default 1e-3).
                lr: f64 = 1e-3,
                /// Decay rates of the first and second moment estimates, each in `[0, 1)` (torch default (0.9, 0.999)).
                betas: (f64, f64) = (0.9, 0.999),
                /// Added to the denominator for numerical stability (torch default 1e-8).
                eps: f64 = 1e-8,
                #[doc = $wd_doc]
                weight_decay: f64 = $wd,
                /// Use the maximum of past second moments (AMSGrad; torch default false).
                amsgrad: bool = false,
                /// Gradient clipping applied before each step (default none).
                grad_clip: Option<GradClip> = None,
                /// Fused in-place CPU update: `None` (default) uses it for f32/f64
                /// CPU parameters (so does `Some(true)`), `Some(false)` always uses
                /// candle ops.
                fused: Option<bool> = None,
            }
        }

        impl $name {
            fn validate(&self) -> Result<()> {
                let f = |s: &str| format!("{}::{}", stringify!($name), s);
                check_lr(&f("lr"), self.lr)?;
                check_unit(&f("betas.0"), self.betas.0)?;
                check_unit(&f("betas.1"), self.betas.1)?;
                if !(self.eps.is_finite() && self.eps > 0.0) {
                    return Err(Error::config(f("eps"), self.eps, "must be finite and > 0"));
                }
                check_nonneg(&f("weight_decay"), self.weight_decay)
            }

            fn params(&self) -> Params {
                Params {
                    beta1: self.betas.0,
                    beta2: self.betas.1,
                    eps: self.eps,
                    amsgrad: self.amsgrad,
                    fused: self.fused,
                }
            }
        }
    };
}

adam_config!(
    AdamConfig,
    "Adam",
    "torch.optim.Adam",
    0.0,
    "L2 penalty added to the gradient (torch default 0)."
);
adam_config!(
    AdamWConfig,
    "AdamW",
    "torch.optim.AdamW",
    1e-2,
    "Decoupled weight decay: `p *= 1 - lr * weight_decay` (torch default 1e-2)."
);

#[derive(Clone, Copy, Debug)]
struct Params {
    beta1: f64,
    beta2: f64,
    eps: f64,
    amsgrad: bool,
    fused: Option<bool>,
}

fn buf_names(amsgrad: bool) -> Vec<&'static str> {
    if amsgrad {
        vec!["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    } else {
        vec!["exp_avg", "exp_avg_sq"]
    }
}

/// One Adam/AdamW update of slot `i`.
fn update(core: &mut Core, h: Params, decoupled: bool, i: usize, g: &Tensor) -> Result<()> {
    let grp = core.group_of(i);
    let lr = core.lr * grp.lr_scale;
    let wd = grp.weight_decay;
    let Some(slot) = core.slots.get_mut(i) else {
        return Ok(());
    };
    let p = slot.var.as_tensor().detach();
    for b in slot.bufs.iter_mut() {
        if b.is_none() {
            *b = Some(p.zeros_like()?);
        }
    }
    slot.step += 1;
    let t = slot.step as f64;
    let coef = AdamCoef {
        beta1: h.beta1,
        beta2: h.beta2,
        eps: h.eps,
        decay_mul: if decoupled && wd != 0.0 {
            1.0 - lr * wd
        } else {
            1.0
        },
        l2: if decoupled { 0.0 } else { wd },
        step_size: lr / (1.0 - h.beta1.powf(t)),
        bc2_sqrt: (1.0 - h.beta2.powf(t)).sqrt(),
    };
    let bufs: Vec<Tensor> = slot.bufs.iter().flatten().cloned().collect();
    if h.fused != Some(false) {
        let mut muts = vec![&p];
        muts.extend(bufs.iter());
        if fused::applicable(&muts, g) {
            match p.dtype() {
                DType::F32 => {
                    return fused::with_slices::<f32>(&muts, g, |s, g| fused::adam(s, g, coef))
                }
                DType::F64 => {
                    return fused::with_slices::<f64>(&muts, g, |s, g| fused::adam(s, g, coef))
                }
                _ => {}
            }
        }
    }
    // Candle-op path (any device and dtype).
    let (m, v) = match bufs.as_slice() {
        [m, v, ..] => (m, v),
        _ => return Err(Error::invalid("Adam step", "missing moment buffers")),
    };
    let mut g = g.clone();
    if coef.l2 != 0.0 {
        g = (g + (&p * coef.l2)?)?;
    }
    let p0 = if coef.decay_mul != 1.0 {
        (&p * coef.decay_mul)?
    } else {
        p.clone()
    };
    let m = (m + ((&g - m)? * (1.0 - h.beta1))?)?;
    let v = ((v * h.beta2)? + (g.sqr()? * (1.0 - h.beta2))?)?;
    let vmax = match bufs.get(2) {
        Some(x) => Some(x.maximum(&v)?),
        None => None,
    };
    let denom = ((vmax.as_ref().unwrap_or(&v).sqrt()? / coef.bc2_sqrt)? + h.eps)?;
    let newp = (p0 - ((&m / denom)? * coef.step_size)?)?;
    slot.var.set(&newp)?;
    slot.bufs = std::iter::once(m)
        .chain(std::iter::once(v))
        .chain(vmax)
        .map(Some)
        .collect();
    Ok(())
}

/// Adam (torch.optim.Adam): weight decay is an L2 penalty added to the
/// gradient. State: `step`, `exp_avg`, `exp_avg_sq` (`max_exp_avg_sq` with amsgrad).
pub struct Adam {
    core: Core,
    cfg: AdamConfig,
    h: Params,
}

impl Adam {
    /// Builds the optimizer over `groups`; validates the config.
    pub fn new(groups: Vec<ParamGroup>, config: AdamConfig) -> Result<Self> {
        config.validate()?;
        let h = config.params();
        let core = Core::new(
            "AdamConfig",
            groups,
            config.lr,
            config.weight_decay,
            config.grad_clip,
            buf_names(h.amsgrad),
            true,
        )?;
        Ok(Self {
            core,
            cfg: config,
            h,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }

    fn update(&mut self, i: usize, g: &Tensor) -> Result<()> {
        update(&mut self.core, self.h, false, i, g)
    }
}

/// AdamW (torch.optim.AdamW): decoupled weight decay
/// `p *= 1 - lr * weight_decay` before the Adam step. State as [`Adam`].
pub struct AdamW {
    core: Core,
    cfg: AdamWConfig,
    h: Params,
}

impl AdamW {
    /// Builds the optimizer over `groups`; validates the config.
    pub fn new(groups: Vec<ParamGroup>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let h = config.params();
        let core = Core::new(
            "AdamWConfig",
            groups,
            config.lr,
            config.weight_decay,
            config.grad_clip,
            buf_names(h.amsgrad),
            true,
        )?;
        Ok(Self {
            core,
            cfg: config,
            h,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    fn update(&mut self, i: usize, g: &Tensor) -> Result<()> {
        update(&mut self.core, self.h, true, i, g)
    }
}

impl_optimizer!(Adam, AdamConfig);
impl_optimizer!(AdamW, AdamWConfig);
