//! Activation functions and dropout.

use std::sync::Mutex;

use candle_core::{Module, ModuleT, Tensor};

use crate::device::{rng, SeededRng};
use crate::{Error, Result};

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

/// Dropout with a seeded generator: in train mode each element is zeroed
/// with probability `p` and the others scaled by `1 / (1 − p)` (torch's
/// inverted dropout); in eval mode it is the identity.
///
/// Masks are drawn on the CPU from [`crate::device::rng`] (candle's own
/// random numbers are not seedable), so runs are reproducible.
#[derive(Debug)]
pub struct Dropout {
    p: f64,
    rng: Mutex<SeededRng>,
}

impl Dropout {
    /// Dropout with probability `p` in `[0, 1)` and masks seeded by `seed`.
    pub fn new(p: f64, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::config("Dropout p", p, "must be in [0, 1)"));
        }
        Ok(Self {
            p,
            rng: Mutex::new(rng(seed)),
        })
    }

    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.p
    }

    /// Applies dropout (train) or the identity (eval).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(x.clone());
        }
        use rand::Rng;
        let mask: Vec<f32> = {
            let mut r = self
                .rng
                .lock()
                .map_err(|_| Error::invalid("Dropout", "the generator lock is poisoned"))?;
            let scale = (1.0 / (1.0 - self.p)) as f32;
            (0..x.elem_count())
                .map(|_| {
                    if r.random::<f64>() < self.p {
                        0.0
                    } else {
                        scale
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }
}

impl ModuleT for Dropout {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Dropout::forward_t(self, x, train).map_err(crate::nn::to_candle)
    }
}
