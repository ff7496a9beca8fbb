//! Projection and prediction heads of self-supervised methods.

use candle_core::{ModuleT, Tensor};
use candle_nn::VarBuilder;

use crate::config::config;
use crate::nn::{Mlp, MlpConfig};
use crate::{Error, Result};

config! {
    /// Configuration of a [`ProjectionHead`]: `num_layers` linear layers
    /// `input_dim → hidden_dim → ... → output_dim`, each hidden one followed by
    /// BatchNorm (optional) and ReLU.
    ///
    /// The default is SimCLR's head for a ResNet-50 (Chen et al. 2020:
    /// 2048 → 2048 → 128, two layers; BatchNorm as in SimCLR v2 and lightly's
    /// `SimCLRProjectionHead`). Presets: [`HeadConfig::simclr`],
    /// [`HeadConfig::byol_projector`], [`HeadConfig::byol_predictor`],
    /// [`HeadConfig::simsiam_projector`], [`HeadConfig::simsiam_predictor`].
    pub struct HeadConfig {
        /// Input width (the backbone's feature width; SimCLR ResNet-50: 2048).
        input_dim: usize = 2048,
        /// Hidden width (SimCLR: 2048).
        hidden_dim: usize = 2048,
        /// Output width (SimCLR: 128).
        output_dim: usize = 128,
        /// Number of linear layers, ≥ 1 (SimCLR: 2).
        num_layers: usize = 2,
        /// BatchNorm after each hidden linear layer (SimCLR v2 / lightly: true).
        batch_norm: bool = true,
        /// Non-affine BatchNorm after the last layer (SimSiam's projector: true;
        /// default false).
        last_batch_norm: bool = false,
    }
}

impl HeadConfig {
    /// SimCLR projection head: Linear(2048, 2048)–BN–ReLU–Linear(2048, 128).
    pub fn simclr() -> Self {
        Self::default()
    }

    /// BYOL projector (Grill et al. 2020): Linear(2048, 4096)–BN–ReLU–Linear(4096, 256).
    pub fn byol_projector() -> Self {
        Self {
            input_dim: 2048,
            hidden_dim: 4096,
            output_dim: 256,
            ..Self::simclr()
        }
    }

    /// BYOL predictor: Linear(256, 4096)–BN–ReLU–Linear(4096, 256).
    pub fn byol_predictor() -> Self {
        Self {
            input_dim: 256,
            hidden_dim: 4096,
            output_dim: 256,
            ..Self::simclr()
        }
    }

    /// SimSiam projector (Chen & He 2021): three layers 2048 → 2048 → 2048 →
    /// 2048 with BN–ReLU after the hidden ones and a non-affine BN at the end.
    pub fn simsiam_projector() -> Self {
        Self {
            input_dim: 2048,
            hidden_dim: 2048,
            output_dim: 2048,
            num_layers: 3,
            batch_norm: true,
            last_batch_norm: true,
        }
    }

    /// SimSiam predictor: Linear(2048, 512)–BN–ReLU–Linear(512, 2048).
    pub fn simsiam_predictor() -> Self {
        Self {
            input_dim: 2048,
            hidden_dim: 512,
            output_dim: 2048,
            ..Self::simclr()
        }
    }
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if self.num_layers == 0 {
            return Err(Error::config(
                "HeadConfig::num_layers",
                0,
                "must be at least 1",
            ));
        }
        for (field, v) in [
            ("HeadConfig::input_dim", self.input_dim),
            ("HeadConfig::hidden_dim", self.hidden_dim),
            ("HeadConfig::output_dim", self.output_dim),
        ] {
            if v == 0 {
                return Err(Error::config(field, 0, "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// A projection or prediction head (an [`Mlp`] with the layout of
/// [`HeadConfig`]). Tensor names are those of the equivalent
/// `torch.nn.Sequential` (`0.weight`, `1.running_mean`, `3.weight`, ...).
///
/// ```
/// use aimass::candle::{DType, Device, Tensor};
/// use aimass::candle_nn::VarMap;
/// use aimass::nn::{HeadConfig, ProjectionHead};
///
/// let vm = VarMap::new();
/// let vb = aimass::nn::init::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
/// let cfg = HeadConfig::simclr().with_input_dim(64).with_hidden_dim(64).with_output_dim(32);
/// let head = ProjectionHead::new(cfg, vb.pp("head"))?;
/// let z = head.forward_t(&Tensor::ones((4, 64), DType::F32, &Device::Cpu)?, true)?;
/// assert_eq!(z.dims(), &[4, 32]);
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Debug)]
pub struct ProjectionHead {
    mlp: Mlp,
    cfg: HeadConfig,
}

impl ProjectionHead {
    /// Builds the head under `vb`.
    pub fn new(cfg: HeadConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let mut sizes = vec![cfg.input_dim];
        sizes.extend(std::iter::repeat_n(cfg.hidden_dim, cfg.num_layers - 1));
        sizes.push(cfg.output_dim);
        let mlp = Mlp::new(
            MlpConfig::new(sizes)
                .with_batch_norm(cfg.batch_norm)
                .with_last_batch_norm(cfg.last_batch_norm),
            vb,
        )?;
        Ok(Self { mlp, cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &HeadConfig {
        &self.cfg
    }

    /// Applies the head in train or eval mode.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.mlp.forward_t(x, train)
    }
}

impl ModuleT for ProjectionHead {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        ProjectionHead::forward_t(self, x, train).map_err(crate::nn::to_candle)
    }
}
