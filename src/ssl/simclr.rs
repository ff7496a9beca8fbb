//! SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning
//! of Visual Representations").
//!
//! Both views of a batch go through backbone and projection head as one
//! batch of 2N (BatchNorm normalises over both views); the loss is NT-Xent
//! over the 2N projections: each projection's positive is its other view,
//! the 2N − 2 others are negatives ([`crate::loss::NtXentLoss`]).

use std::sync::Arc;

use candle_core::{Device, ModuleT};

use super::backbone::{Backbone, Encoder};
use super::core::{online_encoder, projection_step, Core};
use super::optim::SslOptimConfig;
use super::trainer::{impl_ssl_trainer, ExtraState};
use crate::config::config;
use crate::data::Batch;
use crate::loss::{NtXentLoss, NtXentLossConfig};
use crate::nn::{HeadConfig, Model};
use crate::train::StepOutput;
use crate::Result;

config! {
    /// Settings of [`SimClr`]; defaults from SimCLR (Chen et al. 2020).
    pub struct SimClrConfig {
        /// NT-Xent temperature (SimCLR, CIFAR-10: 0.5; 0.1 for ImageNet-size batches).
        temperature: f64 = 0.5,
        /// Projection head; its `input_dim` is set to the backbone's feature
        /// width (SimCLR: Linear–BN–ReLU–Linear, 2048 → 2048 → 128).
        projector: HeadConfig = HeadConfig::simclr(),
        /// Optimizer and schedule (SimCLR: LARS, 0.3 × B/256, weight decay
        /// 1e-6 without biases and norms, 10 warmup epochs, cosine).
        optim: SslOptimConfig = SslOptimConfig::simclr(),
        /// Seed of the initialisation (default 0).
        seed: u64 = 0,
        /// In a data-parallel run ([`SimClr::data_parallel`]), take the
        /// negatives from every rank's batch (SimCLR's global batch; lightly's
        /// `gather_distributed`): the embeddings are gathered, and their
        /// gradients flow back to the rank that computed them. The loss is
        /// then that of one process with the global batch. Default false:
        /// each rank's negatives are its own batch's (cheaper, a smaller
        /// effective batch for the loss). No effect in one process.
        gather_distributed: bool = false,
    }
}

impl SimClrConfig {
    /// The recipe of this crate's SimCLR example, tuned for small images
    /// (28×28 Fashion-MNIST, a 64-d resnet_tiny) and short runs: NT-Xent
    /// temperature 0.2, projection head d → 256 → 128 (Linear–BN–ReLU–Linear),
    /// SGD with momentum 0.9, 0.3 × B/256 with 2 warmup epochs then cosine,
    /// weight decay 5e-4 on every parameter (the example runs it at batch
    /// 128 with the rate raised to 1.2 × B/256). On the embedded
    /// Fashion-MNIST split it beats raw pixels on every probe where the
    /// paper's defaults (and the reference recipe) do not (figures in
    /// docs/ssl.md).
    ///
    /// ```
    /// use aimass::ssl::SimClrConfig;
    /// let cfg = SimClrConfig::small_images().with_seed(1);
    /// assert_eq!(cfg.temperature, 0.2);
    /// ```
    pub fn small_images() -> Self {
        SimClrConfig::default()
            .with_temperature(0.2)
            .with_projector(
                HeadConfig::simclr()
                    .with_hidden_dim(256)
                    .with_output_dim(128),
            )
            .with_optim(SslOptimConfig::small_images())
    }
}

/// The SimCLR trainer (see the module docs and [`crate::ssl`]).
pub struct SimClr<B> {
    online: Model<Encoder<B>>,
    core: Core,
    loss: NtXentLoss,
    cfg: SimClrConfig,
}

impl<B: ModuleT> SimClr<B> {
    /// Builds backbone and projection head (seeded with `cfg.seed`) on
    /// `device`, and the optimizer; validates the config.
    pub fn new(backbone: Backbone<B>, cfg: SimClrConfig, device: &Device) -> Result<Self> {
        let loss = NtXentLoss::new(NtXentLossConfig::default().with_temperature(cfg.temperature))?;
        let online = online_encoder(&backbone, &cfg.projector, cfg.seed, device)?;
        let core = Core::new(
            vec![("online", online.varmap().clone())],
            vec![],
            &cfg.optim,
        )?;
        Ok(SimClr {
            online,
            core,
            loss,
            cfg,
        })
    }

    fn step_impl(&mut self, batch: &Batch, step: u64) -> Result<StepOutput> {
        let loss = &self.loss;
        let replicas = match self.core.replicas() {
            Some(r) if self.cfg.gather_distributed && r.world_size() > 1 => Some(Arc::clone(r)),
            _ => None,
        };
        projection_step(
            &mut self.core,
            &self.online,
            batch,
            step,
            "SimClr::train_step",
            |z1, z2| match &replicas {
                None => loss.forward(z1, z2),
                Some(r) => {
                    let (g1, g2) = (r.gather(z1)?, r.gather(z2)?);
                    let rows = g1.offset..g1.offset + z1.dim(0)?;
                    loss.forward_rows(&g1.all, &g2.all, rows)
                }
            },
        )
    }
}

impl<B> ExtraState for SimClr<B> {}

impl_ssl_trainer!(SimClr, SimClrConfig, "simclr");
