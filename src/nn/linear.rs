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
///
/// **Per-task weights.** Built from task-batched parameters
/// ([`crate::nn::ParamMap::expand_tasks`]), `weight` is `(T, out, in)` and
/// `bias` `(T, out)`: the input is then `(T, ..., in)` and task `t`'s rows
/// go through task `t`'s weights, one batched matrix product for all tasks.
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

    /// Whether the weights have a leading task dimension (`(T, out, in)`,
    /// see the type's docs).
    pub fn is_task_batched(&self) -> bool {
        self.weight.rank() == 3
    }

    /// Applies the layer, checking the input's last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.is_task_batched() {
            return self.forward_tasks(x);
        }
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

    /// `(T, ..., in)` through per-task weights `(T, out, in)`.
    fn forward_tasks(&self, x: &Tensor) -> Result<Tensor> {
        let (tasks, out_dim, in_dim) = self.weight.dims3()?;
        let dims = x.dims();
        if dims.len() < 2 || dims[0] != tasks || dims[dims.len() - 1] != in_dim {
            return Err(Error::shape(
                "Linear (per-task weights)",
                format!("input (T = {tasks}, ..., {in_dim}) with the tasks first"),
                dims,
            ));
        }
        let x3 = x.reshape((tasks, (), in_dim))?;
        let y = x3.matmul(&self.weight.transpose(1, 2)?)?;
        let y = match &self.bias {
            // ones(T, n, 1) · b(T, 1, out) rather than a broadcast add: the
            // backward sums over the rows with a batched matrix product
            // instead of candle's strided reduction (much slower).
            Some(b) => {
                let ones = Tensor::ones((tasks, x3.dim(1)?, 1), y.dtype(), y.device())?;
                (y + ones.matmul(&b.unsqueeze(1)?)?)?
            }
            None => y,
        };
        let mut out = dims[..dims.len() - 1].to_vec();
        out.push(out_dim);
        Ok(y.reshape(out)?)
    }

    /// Per-task weights on inputs stored as columns: `(T, in, n)` to
    /// `(T, out, n)`, `W · h + b`. A stack of layers run this way needs no
    /// transposed weight anywhere (candle's transposed products and the
    /// strided additions of their gradients are slow), see
    /// [`crate::nn::Mlp`].
    pub(crate) fn forward_task_columns(&self, h: &Tensor) -> Result<Tensor> {
        let (tasks, out_dim, in_dim) = self.weight.dims3()?;
        let (t, d, n) = h.dims3().map_err(|_| {
            Error::shape("Linear (per-task weights, columns)", "(T, in, n)", h.dims())
        })?;
        if t != tasks || d != in_dim {
            return Err(Error::shape(
                "Linear (per-task weights, columns)",
                format!("input (T = {tasks}, {in_dim}, n)"),
                h.dims(),
            ));
        }
        let y = self.weight.matmul(h)?;
        match &self.bias {
            Some(b) => {
                let ones = Tensor::ones((tasks, 1, n), y.dtype(), y.device())?;
                Ok((y + b.reshape((tasks, out_dim, 1))?.matmul(&ones)?)?)
            }
            None => Ok(y),
        }
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
