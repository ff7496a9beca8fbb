//! The optimizer and learning-rate schedule of the SSL trainers: LARS or
//! SGD, the learning rate scaled with the batch size, weight decay with the
//! papers' exclusions, linear warmup then cosine decay.

use std::collections::HashMap;

use candle_core::Var;
use candle_nn::VarMap;

use crate::config::config;
use crate::optim::{
    default_param_groups, CosineAnnealingLr, Lars, LarsConfig, LinearWarmup, Optimizer, ParamGroup,
    Sgd, SgdConfig,
};
use crate::train::NonFinitePolicy;
use crate::{Error, Result};

/// Which optimizer an SSL trainer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SslOptimizer {
    /// LARS (SimCLR, BYOL, Barlow Twins, VICReg): SGD with momentum whose
    /// step is scaled per parameter by the trust ratio ([`Lars`]).
    #[default]
    Lars,
    /// SGD with momentum (SimSiam, MoCo v2, and small-batch recipes) ([`Sgd`]).
    Sgd,
}

config! {
    /// Optimisation settings shared by the SSL trainers. The default is
    /// SimCLR's (Chen et al. 2020): LARS, lr 0.3 × batch / 256, momentum
    /// 0.9, weight decay 1e-6 on weights only, 10 warmup epochs then cosine
    /// decay to 0. Each trainer's config starts from its own paper's values
    /// ([`SslOptimConfig::byol`], [`SslOptimConfig::simsiam`], ...).
    pub struct SslOptimConfig {
        /// LARS or SGD (SimCLR: LARS).
        optimizer: SslOptimizer = SslOptimizer::Lars,
        /// Learning rate per 256 images: the peak rate is `lr × batch_size / 256`
        /// (SimCLR's linear scaling; SimCLR: 0.3).
        lr: f64 = 0.3,
        /// Momentum in `[0, 1)` (SimCLR: 0.9).
        momentum: f64 = 0.9,
        /// Weight decay (SimCLR: 1e-6).
        weight_decay: f64 = 1e-6,
        /// Exempt biases and normalisation parameters (every 1-D parameter)
        /// from weight decay and LARS adaptation, as SimCLR and BYOL do
        /// (default true). `false` decays every parameter, as torch's
        /// `SGD(model.parameters(), weight_decay=...)`.
        exclude_bias_and_norm: bool = true,
        /// Epochs of linear warmup from ~0 to the peak rate (SimCLR: 10).
        warmup_epochs: usize = 10,
        /// What to do on a NaN/Inf loss or gradient (default: error).
        non_finite: NonFinitePolicy = NonFinitePolicy::Error,
    }
}

impl SslOptimConfig {
    /// SimCLR: LARS, lr 0.3 × B/256, weight decay 1e-6, 10 warmup epochs.
    pub fn simclr() -> Self {
        Self::default()
    }

    /// BYOL (Grill et al. 2020): LARS, lr 0.2 × B/256, weight decay 1.5e-6,
    /// 10 warmup epochs.
    pub fn byol() -> Self {
        Self::default().with_lr(0.2).with_weight_decay(1.5e-6)
    }

    /// SimSiam (Chen & He 2021): SGD, lr 0.05 × B/256, momentum 0.9, weight
    /// decay 1e-4 on every parameter, no warmup.
    pub fn simsiam() -> Self {
        Self::default()
            .with_optimizer(SslOptimizer::Sgd)
            .with_lr(0.05)
            .with_weight_decay(1e-4)
            .with_exclude_bias_and_norm(false)
            .with_warmup_epochs(0)
    }

    /// MoCo v2 (Chen et al. 2020): SGD, lr 0.03 × B/256, momentum 0.9,
    /// weight decay 1e-4 on every parameter, no warmup.
    pub fn moco_v2() -> Self {
        Self::simsiam().with_lr(0.03)
    }

    /// Barlow Twins (Zbontar et al. 2021): LARS, lr 0.2 × B/256, weight
    /// decay 1.5e-6, 10 warmup epochs.
    pub fn barlow_twins() -> Self {
        Self::byol()
    }

    /// VICReg (Bardes et al. 2022): LARS, lr 0.2 × B/256, weight decay
    /// 1e-6, 10 warmup epochs.
    pub fn vicreg() -> Self {
        Self::default().with_lr(0.2)
    }

    /// Short runs on small images (this crate's SimCLR example, see
    /// [`SimClrConfig::small_images`](super::SimClrConfig::small_images)):
    /// SGD, lr 0.3 × B/256, momentum 0.9, weight decay 5e-4 on every
    /// parameter, 2 warmup epochs.
    pub fn small_images() -> Self {
        Self::simsiam()
            .with_lr(0.3)
            .with_weight_decay(5e-4)
            .with_warmup_epochs(2)
    }

    /// The peak learning rate for batches of `batch_size`: `lr × batch_size / 256`.
    pub fn scaled_lr(&self, batch_size: usize) -> f64 {
        self.lr * batch_size as f64 / 256.0
    }

    /// The schedule of a run of `epochs` epochs of `steps_per_epoch` steps
    /// at batch size `batch_size`: linear warmup over `warmup_epochs`
    /// (capped at the run), then cosine decay from the peak
    /// ([`SslOptimConfig::scaled_lr`]) to 0 at the last step. Pass it to
    /// [`Fit::with_schedule`](crate::train::Fit::with_schedule).
    pub fn schedule(
        &self,
        batch_size: usize,
        steps_per_epoch: usize,
        epochs: usize,
    ) -> Result<LinearWarmup<CosineAnnealingLr>> {
        self.validate()?;
        let total = (steps_per_epoch as u64) * (epochs as u64);
        if total == 0 || batch_size == 0 {
            return Err(Error::invalid(
                "SslOptimConfig::schedule",
                format!("a run of {epochs} epochs of {steps_per_epoch} steps at batch size {batch_size}: all must be >= 1"),
            ));
        }
        let warmup = (self.warmup_epochs as u64 * steps_per_epoch as u64).min(total - 1);
        let cosine = CosineAnnealingLr::new(self.scaled_lr(batch_size), total - warmup, 0.0)?;
        let start = if warmup == 0 {
            1.0
        } else {
            1.0 / warmup as f64
        };
        LinearWarmup::new(start, warmup, cosine)
    }

    /// Checks every field; called by the trainers' constructors.
    pub(crate) fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::config(
                "SslOptimConfig::lr",
                self.lr,
                "must be finite and > 0 (the rate per 256 images)",
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::config(
                "SslOptimConfig::momentum",
                self.momentum,
                "must be in [0, 1)",
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::config(
                "SslOptimConfig::weight_decay",
                self.weight_decay,
                "must be finite and >= 0",
            ));
        }
        Ok(())
    }

    /// The optimizer over every trainable variable of `varmaps` (buffers
    /// left out), starting at the unscaled `lr` until a schedule sets it.
    pub(crate) fn build(&self, varmaps: &[&VarMap]) -> Result<Box<dyn Optimizer>> {
        self.validate()?;
        let mut all: HashMap<String, Var> = HashMap::new();
        for vm in varmaps {
            for (name, var) in crate::nn::params::trainable_vars(vm, &crate::nn::Frozen::none())? {
                if all.insert(name.clone(), var).is_some() {
                    return Err(Error::invalid(
                        "ssl trainer",
                        format!("variable `{name}` appears in two networks"),
                    ));
                }
            }
        }
        let groups = if self.exclude_bias_and_norm {
            default_param_groups(&all)
        } else {
            let mut vars: Vec<(String, Var)> = all.into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            vec![ParamGroup::new(vars)]
        };
        Ok(match self.optimizer {
            SslOptimizer::Lars => Box::new(Lars::new(
                groups,
                LarsConfig::default()
                    .with_lr(self.lr)
                    .with_momentum(self.momentum)
                    .with_weight_decay(self.weight_decay),
            )?),
            SslOptimizer::Sgd => Box::new(Sgd::new(
                groups,
                SgdConfig::default()
                    .with_lr(self.lr)
                    .with_momentum(self.momentum)
                    .with_weight_decay(self.weight_decay),
            )?),
        })
    }
}
