//! SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation
//! Learning").
//!
//! One network (backbone, projector, predictor) on both views as one
//! batch of 2N; each view's prediction regresses the other view's
//! projection through a stop-gradient:
//! `loss = ½·(D(p1, sg(z2)) + D(p2, sg(z1)))` with `D = −cos`
//! ([`crate::loss::NegativeCosineLoss`]). No target network, no negatives.

use candle_core::{Device, ModuleT};

use super::backbone::{Backbone, Encoder};
use super::core::{halves, online_encoder, predictor, stack_views, Core};
use super::optim::SslOptimConfig;
use super::trainer::{impl_ssl_trainer, ExtraState};
use crate::config::config;
use crate::data::Batch;
use crate::loss::{NegativeCosineLoss, NegativeCosineLossConfig};
use crate::nn::{HeadConfig, Model, ProjectionHead};
use crate::train::StepOutput;
use crate::Result;

config! {
    /// Settings of [`SimSiam`]; defaults from SimSiam (Chen & He 2021).
    pub struct SimSiamConfig {
        /// Projector; `input_dim` is set to the backbone's feature width
        /// (SimSiam: 3 layers of 2048 with BN, a non-affine BN at the end).
        projector: HeadConfig = HeadConfig::simsiam_projector(),
        /// Predictor; `input_dim` is set to the projector's output width
        /// (SimSiam: bottleneck 2048 → 512 → 2048).
        predictor: HeadConfig = HeadConfig::simsiam_predictor(),
        /// Optimizer and schedule (SimSiam: SGD, 0.05 × B/256, weight decay 1e-4).
        optim: SslOptimConfig = SslOptimConfig::simsiam(),
        /// Seed of the initialisation (default 0).
        seed: u64 = 0,
    }
}

/// The SimSiam trainer (see the module docs and [`crate::ssl`]).
pub struct SimSiam<B> {
    online: Model<Encoder<B>>,
    predictor: Model<ProjectionHead>,
    core: Core,
    loss: NegativeCosineLoss,
    cfg: SimSiamConfig,
}

impl<B: ModuleT> SimSiam<B> {
    /// Builds the encoder and predictor (seeded with `cfg.seed`) on
    /// `device`, and the optimizer; validates the config.
    pub fn new(backbone: Backbone<B>, cfg: SimSiamConfig, device: &Device) -> Result<Self> {
        let loss = NegativeCosineLoss::new(NegativeCosineLossConfig::default())?;
        let online = online_encoder(&backbone, &cfg.projector, cfg.seed, device)?;
        let predictor = predictor(&cfg.predictor, cfg.projector.output_dim, cfg.seed, device)?;
        let core = Core::new(
            vec![
                ("online", online.varmap().clone()),
                ("predictor", predictor.varmap().clone()),
            ],
            vec![],
            &cfg.optim,
        )?;
        Ok(SimSiam {
            online,
            predictor,
            core,
            loss,
            cfg,
        })
    }

    /// The predictor.
    pub fn predictor(&self) -> &Model<ProjectionHead> {
        &self.predictor
    }

    fn step_impl(&mut self, batch: &Batch, step: u64) -> Result<StepOutput> {
        let (x, n) = stack_views(batch, "SimSiam::train_step")?;
        let (online, predictor, loss) = (&self.online, &self.predictor, &self.loss);
        let stepped = self.core.step(step, n, || {
            let z = online.forward_t(&x, true)?;
            let p = predictor.forward_t(&z, true)?;
            let (z1, z2) = halves(&z, n)?;
            let (p1, p2) = halves(&p, n)?;
            Ok((loss.forward_symmetric(&p1, &p2, &z1, &z2)?, ()))
        })?;
        Ok(stepped.out)
    }
}

impl<B> ExtraState for SimSiam<B> {}

impl_ssl_trainer!(SimSiam, SimSiamConfig, "simsiam");
