//! Layer normalisation over the last dimension.

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::config::config;
use crate::{ops, Error, Result};

config! {
    /// Configuration of a [`LayerNorm`] (torch's `nn.LayerNorm` arguments and
    /// defaults).
    #[derive(Copy)]
    pub struct LayerNormConfig {
        /// Added to the variance before the square root, > 0 (torch default 1e-5).
        eps: f64 = 1e-5,
        /// Learnable `weight` (init 1) and `bias` (init 0) (torch's
        /// `elementwise_affine`, default true).
        affine: bool = true,
    }
}

impl LayerNormConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::config(
                "LayerNormConfig::eps",
                self.eps,
                "must be positive and finite",
            ));
        }
        Ok(())
    }
}

/// `torch.nn.LayerNorm(d)`: normalises over the last dimension (biased
/// variance) then applies `weight` (init 1) and `bias` (init 0). Same in
/// train and eval mode. Routed through [`crate::ops::layer_norm`], which has
/// a correct gradient (candle-nn's fused LayerNorm has none).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    /// A LayerNorm over a last dimension of `dim`; with `cfg.affine`, its
    /// `weight` and `bias` live under `vb`.
    pub fn new(dim: usize, cfg: LayerNormConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        if dim == 0 {
            return Err(Error::config("LayerNorm dim", 0, "must be at least 1"));
        }
        let (weight, bias) = if cfg.affine {
            (
                Some(vb.get_with_hints(dim, "weight", Init::Const(1.0))?),
                Some(vb.get_with_hints(dim, "bias", Init::Const(0.0))?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            weight,
            bias,
            eps: cfg.eps,
        })
    }

    /// Normalises `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, self.weight.as_ref(), self.bias.as_ref(), self.eps)
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        LayerNorm::forward(self, x).map_err(crate::nn::to_candle)
    }
}
