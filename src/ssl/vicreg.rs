//! VICReg (Bardes et al. 2022, "VICReg: Variance-Invariance-Covariance
//! Regularization for Self-Supervised Learning").
//!
//! Both views through backbone and projector as one batch of 2N; the
//! loss keeps the two views' projections close (invariance, weight 25),
//! each dimension's standard deviation above 1 over the batch (variance,
//! 25) and the dimensions decorrelated (covariance, 1)
//! ([`crate::loss::VicRegLoss`]).

use candle_core::{Device, ModuleT};

use super::backbone::{Backbone, Encoder};
use super::core::{online_encoder, projection_step, Core};
use super::optim::SslOptimConfig;
use super::trainer::{impl_ssl_trainer, ExtraState};
use crate::config::config;
use crate::data::Batch;
use crate::loss::{VicRegLoss, VicRegLossConfig};
use crate::nn::{HeadConfig, Model};
use crate::train::StepOutput;
use crate::Result;

config! {
    /// Settings of [`VicReg`]; defaults from VICReg (Bardes et al. 2022).
    pub struct VicRegConfig {
        /// Weight of the invariance (mean squared distance) term (VICReg: 25).
        sim_coeff: f64 = 25.0,
        /// Weight of the variance (std hinge) term (VICReg: 25).
        std_coeff: f64 = 25.0,
        /// Weight of the covariance term (VICReg: 1).
        cov_coeff: f64 = 1.0,
        /// Projector; `input_dim` is set to the backbone's feature width
        /// (VICReg: 3 linear layers of 8192, BN–ReLU between).
        projector: HeadConfig = HeadConfig::default()
            .with_hidden_dim(8192)
            .with_output_dim(8192)
            .with_num_layers(3),
        /// Optimizer and schedule (VICReg: LARS, 0.2 × B/256, weight decay 1e-6).
        optim: SslOptimConfig = SslOptimConfig::vicreg(),
        /// Seed of the initialisation (default 0).
        seed: u64 = 0,
    }
}

/// The VICReg trainer (see the module docs and [`crate::ssl`]).
pub struct VicReg<B> {
    online: Model<Encoder<B>>,
    core: Core,
    loss: VicRegLoss,
    cfg: VicRegConfig,
}

impl<B: ModuleT> VicReg<B> {
    /// Builds backbone and projector (seeded with `cfg.seed`) on `device`,
    /// and the optimizer; validates the config.
    pub fn new(backbone: Backbone<B>, cfg: VicRegConfig, device: &Device) -> Result<Self> {
        let loss = VicRegLoss::new(
            VicRegLossConfig::default()
                .with_sim_coeff(cfg.sim_coeff)
                .with_std_coeff(cfg.std_coeff)
                .with_cov_coeff(cfg.cov_coeff),
        )?;
        let online = online_encoder(&backbone, &cfg.projector, cfg.seed, device)?;
        let core = Core::new(
            vec![("online", online.varmap().clone())],
            vec![],
            &cfg.optim,
        )?;
        Ok(VicReg {
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
            "VicReg::train_step",
            |z1, z2| loss.forward(z1, z2),
        )
    }
}

impl<B> ExtraState for VicReg<B> {}

impl_ssl_trainer!(VicReg, VicRegConfig, "vicreg");
