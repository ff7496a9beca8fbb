//! BYOL (Grill et al. 2020, "Bootstrap Your Own Latent").
//!
//! The online network (backbone, projector, predictor) regresses the
//! target network's projection of the other view:
//! `loss = byol(p1, z'2) + byol(p2, z'1)` with `byol(p, z) = mean(2 − 2·cos(p, z))`
//! ([`crate::loss::ByolLoss`]). The target (backbone and projector) is a
//! [`FrozenModel`] copy of the online encoder, run in train mode as BYOL
//! does (batch statistics), detached, and changed only by
//! [`Ema::from_frozen`] after each optimizer step:
//! `θ' ← τ·θ' + (1 − τ)·θ` with `τ = 1 − (1 − τ_base)(cos(πk/K) + 1)/2`
//! at step `k` of `K` ([`crate::optim::byol_tau`]). Its BatchNorm running
//! statistics are its own (updated by its train-mode forwards; they are
//! never used in training). Both views go through each network as one
//! batch of 2N.

use candle_core::{Device, ModuleT};

use super::backbone::{Backbone, Encoder};
use super::core::{halves, online_encoder, predictor, stack_views, Core};
use super::optim::SslOptimConfig;
use super::trainer::{impl_ssl_trainer, ExtraState};
use crate::config::config;
use crate::data::Batch;
use crate::loss::{ByolLoss, ByolLossConfig};
use crate::nn::{ForwardMode, FrozenModel, HeadConfig, Model, ProjectionHead};
use crate::optim::{Ema, EmaConfig};
use crate::train::StepOutput;
use crate::{Error, Result};

config! {
    /// Settings of [`Byol`]; defaults from BYOL (Grill et al. 2020).
    pub struct ByolConfig {
        /// Target decay at step 0, rising to 1 by the cosine schedule (BYOL: 0.996).
        tau_base: f64 = 0.996,
        /// Steps of the run `K` (epochs × batches per epoch), over which τ
        /// rises to 1; required (no default).
        total_steps: Option<u64> = None,
        /// Projector; `input_dim` is set to the backbone's feature width
        /// (BYOL: Linear–BN–ReLU–Linear, 2048 → 4096 → 256).
        projector: HeadConfig = HeadConfig::byol_projector(),
        /// Predictor; `input_dim` is set to the projector's output width
        /// (BYOL: 256 → 4096 → 256).
        predictor: HeadConfig = HeadConfig::byol_predictor(),
        /// Optimizer and schedule (BYOL: LARS, 0.2 × B/256, weight decay 1.5e-6).
        optim: SslOptimConfig = SslOptimConfig::byol(),
        /// Seed of the initialisation (default 0).
        seed: u64 = 0,
    }
}

impl ByolConfig {
    fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.tau_base) {
            return Err(Error::config(
                "ByolConfig::tau_base",
                self.tau_base,
                "must be in [0, 1]",
            ));
        }
        match self.total_steps {
            Some(k) if k >= 1 => Ok(()),
            other => Err(Error::config(
                "ByolConfig::total_steps",
                format!("{other:?}"),
                "set it to the steps of the run (epochs × batches per epoch): τ follows a cosine over them",
            )),
        }
    }
}

/// The BYOL trainer (see the module docs and [`crate::ssl`]).
pub struct Byol<B> {
    online: Model<Encoder<B>>,
    predictor: Model<ProjectionHead>,
    target: FrozenModel<Encoder<B>>,
    ema: Ema,
    core: Core,
    loss: ByolLoss,
    cfg: ByolConfig,
}

impl<B: ModuleT> Byol<B> {
    /// Builds the online encoder and predictor (seeded with `cfg.seed`) on
    /// `device`, the target as a frozen copy of the encoder, the EMA and
    /// the optimizer (over the online networks only); validates the config.
    pub fn new(backbone: Backbone<B>, cfg: ByolConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let loss = ByolLoss::new(ByolLossConfig::default())?;
        let online = online_encoder(&backbone, &cfg.projector, cfg.seed, device)?;
        let predictor = predictor(&cfg.predictor, cfg.projector.output_dim, cfg.seed, device)?;
        let projector = cfg.projector.clone();
        let target = online.frozen_copy(ForwardMode::Train, move |vb| {
            Encoder::new(&backbone, &projector, vb)
        })?;
        let ema = Ema::from_frozen(
            online.varmap(),
            &target,
            EmaConfig::default()
                .with_tau_base(cfg.tau_base)
                .with_total_steps(cfg.total_steps),
        )?;
        let core = Core::new(
            vec![
                ("online", online.varmap().clone()),
                ("predictor", predictor.varmap().clone()),
            ],
            vec![("target", target.varmap().clone())],
            &cfg.optim,
        )?;
        Ok(Byol {
            online,
            predictor,
            target,
            ema,
            core,
            loss,
            cfg,
        })
    }

    /// The target network (frozen; changed only by the EMA).
    pub fn target(&self) -> &FrozenModel<Encoder<B>> {
        &self.target
    }

    /// The predictor.
    pub fn predictor(&self) -> &Model<ProjectionHead> {
        &self.predictor
    }

    /// The target decay τ applied after step `step` (counted from 0).
    pub fn tau(&self, step: u64) -> f64 {
        self.ema.tau(step + 1)
    }

    fn step_impl(&mut self, batch: &Batch, step: u64) -> Result<StepOutput> {
        let (x, n) = stack_views(batch, "Byol::train_step")?;
        let (online, predictor, target, loss) =
            (&self.online, &self.predictor, &self.target, &self.loss);
        let stepped = self.core.step(step, n, || {
            let p = predictor.forward_t(&online.forward_t(&x, true)?, true)?;
            let z = target.forward(&x)?;
            let (p1, p2) = halves(&p, n)?;
            let (z1, z2) = halves(&z, n)?;
            Ok((loss.forward_symmetric(&p1, &p2, &z1, &z2)?, ()))
        })?;
        if stepped.extra.is_some() {
            self.ema.update(step + 1)?;
        }
        Ok(stepped.out)
    }
}

impl<B> ExtraState for Byol<B> {}

impl_ssl_trainer!(Byol, ByolConfig, "byol");
