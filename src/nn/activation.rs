//! Activation functions.

use candle_core::{Module, Tensor};

use crate::Result;

/// An element-wise activation (torch's `nn.ReLU`, `nn.GELU`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum Activation {
    /// `max(x, 0)`.
    #[default]
    Relu,
    /// GELU with the exact erf form (torch's default `approximate='none'`).
    Gelu,
    /// GELU with the tanh approximation (`approximate='tanh'`).
    GeluTanh,
    /// `tanh(x)`.
    Tanh,
    /// `1 / (1 + e^−x)`.
    Sigmoid,
    /// `x · sigmoid(x)` (SiLU / swish).
    Silu,
    /// `x` for `x ≥ 0`, `slope · x` otherwise (torch default slope 0.01).
    LeakyRelu(f64),
    /// `x` unchanged.
    Identity,
}

impl Activation {
    /// Applies the activation.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Relu => crate::ops::relu(x)?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Tanh => x.tanh()?,
            Activation::Sigmoid => candle_nn::ops::sigmoid(x)?,
            Activation::Silu => x.silu()?,
            Activation::LeakyRelu(s) => {
                // max(x, 0) + s · min(x, 0): differentiable composition.
                (x.relu()? - (x.neg()?.relu()? * *s)?)?
            }
            Activation::Identity => x.clone(),
        })
    }
}

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x).map_err(crate::nn::to_candle)
    }
}
