//! Layer normalisation over the last dimension.

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::{ops, Error, Result};

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
    /// A LayerNorm over a last dimension of `dim` with torch's eps 1e-5;
    /// `affine` adds `weight` and `bias` under `vb` (torch default true).
    pub fn new(dim: usize, affine: bool, vb: VarBuilder) -> Result<Self> {
        Self::with_eps(dim, affine, 1e-5, vb)
    }

    /// Like [`LayerNorm::new`] with a given `eps` (> 0).
    pub fn with_eps(dim: usize, affine: bool, eps: f64, vb: VarBuilder) -> Result<Self> {
        if dim == 0 {
            return Err(Error::config("LayerNorm dim", 0, "must be at least 1"));
        }
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(Error::config(
                "LayerNorm eps",
                eps,
                "must be positive and finite",
            ));
        }
        let (weight, bias) = if affine {
            (
                Some(vb.get_with_hints(dim, "weight", Init::Const(1.0))?),
                Some(vb.get_with_hints(dim, "bias", Init::Const(0.0))?),
            )
        } else {
            (None, None)
        };
        Ok(Self { weight, bias, eps })
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
