//! Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised
//! Learning via Redundancy Reduction").
//!
//! Both views through backbone and projector as one batch of 2N; the
//! cross-correlation matrix of the two views' batch-standardised
//! projections is pushed to the identity:
//! `Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²` ([`crate::loss::BarlowTwinsLoss`]).

use candle_core::{Device, ModuleT};

use super::backbone::{Backbone, Encoder};
use super::core::{online_encoder, projection_step, Core};
use super::optim::SslOptimConfig;
use super::trainer::{impl_ssl_trainer, ExtraState};
use crate::config::config;
use crate::data::Batch;
use crate::loss::{BarlowTwinsLoss, BarlowTwinsLossConfig};
use crate::nn::{HeadConfig, Model};
use crate::train::StepOutput;
use crate::Result;

config! {
    /// Settings of [`BarlowTwins`]; defaults from Barlow Twins (Zbontar et al. 2021).
    pub struct BarlowTwinsConfig {
        /// Weight of the off-diagonal (redundancy) term (Barlow Twins: 5e-3).
        lambda: f64 = 5e-3,
        /// Projector; `input_dim` is set to the backbone's feature width
        /// (Barlow Twins: 3 linear layers of 8192, BN–ReLU between).
        projector: HeadConfig = HeadConfig::default()
            .with_hidden_dim(8192)
            .with_output_dim(8192)
            .with_num_layers(3),
        /// Optimizer and schedule (Barlow Twins: LARS, 0.2 × B/256, weight decay 1.5e-6).
        optim: SslOptimConfig = SslOptimConfig::barlow_twins(),
        /// Seed of the initialisation (default 0).
        seed: u64 = 0,
    }
}

/// The Barlow Twins trainer (see the module docs and [`crate::ssl`]).
pub struct BarlowTwins<B> {
    online: Model<Encoder<B>>,
    core: Core,
    loss: BarlowTwinsLoss,
    cfg: BarlowTwinsConfig,
}

impl<B: ModuleT> BarlowTwins<B> {
    /// Builds backbone and projector (seeded with `cfg.seed`) on `device`,
    /// and the optimizer; validates the config.
    pub fn new(backbone: Backbone<B>, cfg: BarlowTwinsConfig, device: &Device) -> Result<Self> {
        let loss = BarlowTwinsLoss::new(BarlowTwinsLossConfig::default().with_lambda(cfg.lambda))?;
        let online = online_encoder(&backbone, &cfg.projector, cfg.seed, device)?;
        let core = Core::new(
            vec![("online", online.varmap().clone())],
            vec![],
            &cfg.optim,
        )?;
        Ok(BarlowTwins {
            online,
            core,
            loss,
            cfg,
        })
    }

    fn step_impl(&mut self, batch: &Batch, step: u64) -> Result<StepOutput> {
        let loss = &self.loss;
        projection_step(
            &mut self.core,
            &self.online,
            batch,
            step,
            "BarlowTwins::train_step",
            |z1, z2| loss.forward(z1, z2),
        )
    }
}

impl<B> ExtraState for BarlowTwins<B> {}

impl_ssl_trainer!(BarlowTwins, BarlowTwinsConfig, "barlow_twins");
