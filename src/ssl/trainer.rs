//! The trait every SSL trainer implements, and the boilerplate they share.

use std::path::Path;

use candle_core::Tensor;

use super::optim::SslOptimConfig;
use crate::data::Batch;
use crate::train::{Checkpoint, TrainStep};
use crate::Result;

/// A self-supervised trainer: a [`TrainStep`] on two-view batches (so
/// [`Fit`](crate::train::Fit) runs it with progress, checkpoints and exact
/// resume) whose product is a pretrained backbone.
pub trait SslTrainer: TrainStep<Batch = Batch> {
    /// The backbone's features of `images` in eval mode, `(N, feature_dim)`,
    /// detached: what kNN and linear probes evaluate.
    fn features(&self, images: &Tensor) -> Result<Tensor>;

    /// Saves the backbone's variables (names without the `backbone.`
    /// prefix) as safetensors: they load into the same architecture with a
    /// fresh head by [`crate::nn::params::load_with`] with
    /// [`LoadConfig::non_strict`](crate::nn::params::LoadConfig::non_strict).
    fn export_backbone(&self, path: &Path) -> Result<()>;

    /// The optimisation settings, for the schedule
    /// ([`SslOptimConfig::schedule`]).
    fn optim_config(&self) -> &SslOptimConfig;

    /// Steps skipped by the non-finite guard.
    fn skipped_steps(&self) -> u64;
}

/// State a trainer keeps besides its networks and optimizer (MoCo's queue).
pub(crate) trait ExtraState {
    /// Adds the state to `ckpt`.
    fn save_extra(&self, _ckpt: &mut Checkpoint) -> Result<()> {
        Ok(())
    }
    /// Checks `ckpt` holds valid state, changing nothing.
    fn check_extra(&self, _ckpt: &Checkpoint) -> Result<()> {
        Ok(())
    }
    /// Restores the state (after [`ExtraState::check_extra`]).
    fn load_extra(&mut self, _ckpt: &Checkpoint) -> Result<()> {
        Ok(())
    }
}

/// Implements [`TrainStep`] and [`SslTrainer`] for a trainer with fields
/// `online: Model<Encoder<B>>`, `core: Core` and `cfg` (with an `optim`
/// field), and a method `step_impl(&mut self, &Batch, u64)`.
macro_rules! impl_ssl_trainer {
    ($ty:ident, $cfg:ident, $kind:literal) => {
        impl<B: candle_core::ModuleT> $crate::train::TrainStep for $ty<B> {
            type Batch = $crate::data::Batch;

            fn train_step(
                &mut self,
                batch: &$crate::data::Batch,
                step: u64,
            ) -> $crate::Result<$crate::train::StepOutput> {
                self.step_impl(batch, step)
            }

            fn set_learning_rate(&mut self, lr: f64) -> $crate::Result<()> {
                self.core.set_lr(lr)
            }

            fn learning_rate(&self) -> f64 {
                self.core.lr()
            }

            fn kind(&self) -> &str {
                $kind
            }

            fn save_state(&self, ckpt: &mut $crate::train::Checkpoint) -> $crate::Result<()> {
                self.core.save(ckpt)?;
                $crate::ssl::trainer::ExtraState::save_extra(self, ckpt)
            }

            fn steps_in_checkpoint(
                &self,
                ckpt: &$crate::train::Checkpoint,
            ) -> $crate::Result<Option<u64>> {
                $crate::train::optimizer_and_guard_steps(ckpt).map(Some)
            }

            fn load_state(&mut self, ckpt: &$crate::train::Checkpoint) -> $crate::Result<()> {
                self.core.check(ckpt)?;
                $crate::ssl::trainer::ExtraState::check_extra(self, ckpt)?;
                self.core.load(ckpt)?;
                $crate::ssl::trainer::ExtraState::load_extra(self, ckpt)
            }
        }

        impl<B: candle_core::ModuleT> $crate::ssl::SslTrainer for $ty<B> {
            fn features(
                &self,
                images: &candle_core::Tensor,
            ) -> $crate::Result<candle_core::Tensor> {
                Ok(self.online.module().features(images, false)?.detach())
            }

            fn export_backbone(&self, path: &std::path::Path) -> $crate::Result<()> {
                $crate::ssl::core::export_backbone(self.online.varmap(), path)
            }

            fn optim_config(&self) -> &$crate::ssl::SslOptimConfig {
                &self.cfg.optim
            }

            fn skipped_steps(&self) -> u64 {
                self.core.skipped()
            }
        }

        impl<B: candle_core::ModuleT> $ty<B> {
            /// The online network: backbone and projection head.
            pub fn encoder(&self) -> &$crate::nn::Model<$crate::ssl::Encoder<B>> {
                &self.online
            }

            /// The backbone being pretrained.
            pub fn backbone(&self) -> &B {
                self.online.module().backbone()
            }

            /// The configuration.
            pub fn config(&self) -> &$cfg {
                &self.cfg
            }

            /// The optimizer.
            pub fn optimizer(&self) -> &dyn $crate::optim::Optimizer {
                self.core.optimizer()
            }

            /// The same trainer, data-parallel over the ranks of `comm`
            /// (a collective: every rank calls it, each with its own
            /// trainer built from the same config): every network's
            /// variables are broadcast from rank 0, and the optimizer
            /// becomes a
            /// [`DistributedOptimizer`]($crate::distributed::DistributedOptimizer)
            /// with `config`, so gradients are averaged over the ranks
            /// before the non-finite check and the update (or, with local
            /// SGD, the online networks are averaged every H steps; target
            /// networks follow them by EMA). Each rank steps on its own
            /// shard of every batch ([`crate::data::Shard`]); wrap the
            /// result in [`DataParallel`]($crate::distributed::DataParallel)
            /// for synchronised BatchNorm and metrics averaged over the
            /// ranks. Checkpoints have the single-process layout (the
            /// optimizer state is the wrapped optimizer's).
            ///
            /// # Errors
            ///
            /// As [`DistributedOptimizer::new`]($crate::distributed::DistributedOptimizer::new);
            /// [`Error::InvalidArgument`]($crate::Error::InvalidArgument)
            /// for a trainer that is data-parallel already.
            pub fn data_parallel(
                mut self,
                comm: std::sync::Arc<dyn $crate::distributed::Communicator>,
                config: $crate::distributed::DistributedOptimizerConfig,
            ) -> $crate::Result<Self> {
                self.core = self.core.distribute(comm, config)?;
                Ok(self)
            }
        }
    };
}
pub(crate) use impl_ssl_trainer;
