//! Fully connected layer with PyTorch's names and initialisation.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::nn::init::{torch_bias_init, torch_weight_init};
use crate::{Error, Result};

/// `y = x Wᵀ + b`, like `torch.nn.Linear`: `weight` is `(out, in)`, `bias`
/// is `(out,)`; initialised as PyTorch does (U(−1/√in, 1/√in) for both).
///
/// Inputs of rank > 2 are treated as batches of rows over their last
/// dimension, as in PyTorch.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A linear layer `in_dim → out_dim` with tensors `weight` (and `bias`
    /// when `bias` is true) under `vb`.
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        if in_dim == 0 || out_dim == 0 {
            return Err(Error::config(
                "Linear dims",
                format!("{in_dim} -> {out_dim}"),
                "both dimensions must be at least 1",
            ));
        }
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", torch_weight_init(in_dim))?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", torch_bias_init(in_dim))?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// A linear layer from existing tensors (`weight` `(out, in)`).
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight, `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `(out,)`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Applies the layer, checking the input's last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let got = x.dims().last().copied().unwrap_or(0);
        if got != in_dim {
            return Err(Error::shape(
                "Linear",
                format!("input with last dimension {in_dim}"),
                x.dims(),
            ));
        }
        let lead: Vec<usize> = x.dims()[..x.rank() - 1].to_vec();
        let x2 = x.reshape(((), in_dim))?;
        let y = x2.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = lead;
        out.push(out_dim);
        Ok(y.reshape(out)?)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Linear::forward(self, x).map_err(crate::nn::to_candle)
    }
}

/// Shorthand for [`Linear::new`] with a bias.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new(in_dim, out_dim, true, vb)
}
