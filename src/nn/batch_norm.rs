//! Batch normalisation with PyTorch's train/eval semantics.

use candle_core::{DType, ModuleT, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::config::config;
use crate::{Error, Result};

config! {
    /// Configuration of a [`BatchNorm`] layer (torch's `nn.BatchNorm*d`
    /// arguments and defaults).
    #[derive(Copy)]
    pub struct BatchNormConfig {
        /// Added to the variance before the square root (torch default 1e-5).
        eps: f64 = 1e-5,
        /// Running statistics update `r ← (1 − momentum)·r + momentum·batch`
        /// (torch default 0.1).
        momentum: f64 = 0.1,
        /// Learnable `weight` (init 1) and `bias` (init 0) (torch default true).
        affine: bool = true,
        /// Keep running statistics and use them in eval mode (torch default
        /// true). When false, batch statistics are used in both modes.
        track_running_stats: bool = true,
    }
}

impl BatchNormConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::config(
                "BatchNormConfig::eps",
                self.eps,
                "must be positive and finite",
            ));
        }
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(Error::config(
                "BatchNormConfig::momentum",
                self.momentum,
                "must be in [0, 1]",
            ));
        }
        Ok(())
    }
}

/// Batch normalisation over dimension 1 of `(N, C)`, `(N, C, L)` or
/// `(N, C, H, W)` inputs (torch's `BatchNorm1d` / `BatchNorm2d`).
///
/// * **train** (`forward_t(x, true)`): normalises with the batch mean and
///   the biased batch variance, and updates the running statistics with
///   the *unbiased* variance: `running_var ← (1 − m)·running_var + m·var·n/(n − 1)`
///   where `n` is the number of values per channel. The normalisation is
///   composed of differentiable tensor ops (gradients flow through the
///   batch statistics, first and second order).
/// * **eval** (`forward_t(x, false)`): normalises with the running
///   statistics and changes nothing.
///
/// Tensors: `weight`, `bias` (when affine), `running_mean`, `running_var`
/// (buffers: [`crate::nn::params::is_buffer`]). The running statistics are
/// the [`Var`]s of the VarMap, updated in place, so saving the VarMap
/// saves them.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running_mean: Option<Var>,
    running_var: Option<Var>,
    num_features: usize,
    cfg: BatchNormConfig,
}

impl BatchNorm {
    /// A BatchNorm over `num_features` channels with tensors under `vb`.
    pub fn new(num_features: usize, cfg: BatchNormConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        if num_features == 0 {
            return Err(Error::config(
                "BatchNorm num_features",
                0,
                "must be at least 1",
            ));
        }
        let (weight, bias) = if cfg.affine {
            (
                Some(vb.get_with_hints(num_features, "weight", Init::Const(1.0))?),
                Some(vb.get_with_hints(num_features, "bias", Init::Const(0.0))?),
            )
        } else {
            (None, None)
        };
        let (running_mean, running_var) = if cfg.track_running_stats {
            let m = vb.get_with_hints(num_features, "running_mean", Init::Const(0.0))?;
            let v = vb.get_with_hints(num_features, "running_var", Init::Const(1.0))?;
            (Some(Var::from_tensor(&m)?), Some(Var::from_tensor(&v)?))
        } else {
            (None, None)
        };
        Ok(Self {
            weight,
            bias,
            running_mean,
            running_var,
            num_features,
            cfg,
        })
    }

    /// The running mean (`None` without running statistics).
    pub fn running_mean(&self) -> Option<&Tensor> {
        self.running_mean.as_ref().map(|v| v.as_tensor())
    }

    /// The running variance (`None` without running statistics).
    pub fn running_var(&self) -> Option<&Tensor> {
        self.running_var.as_ref().map(|v| v.as_tensor())
    }

    /// The configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.cfg
    }

    /// Normalises `x` in train (`true`) or eval (`false`) mode.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(x, train, Tail::None)
    }

    /// `relu(forward_t(x, train))`, fused into one kernel on the CPU in
    /// train mode (one pass less over the data, forward and backward).
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(x, train, Tail::Relu)
    }

    /// `relu(forward_t(x, train) + shortcut)`, the end of a ResNet block.
    /// In train mode on f32/f64 CPU tensors it is one fused kernel
    /// ([`crate::ops::kernels::batch_norm_add_relu_train`]: the normalised
    /// values and their sum with the shortcut are never written out, and the
    /// backward skips the ReLU's and the add's passes too); elsewhere (eval
    /// mode, other devices and dtypes) the plain composition. The running
    /// statistics are updated as by [`BatchNorm::forward_t`].
    ///
    /// # Errors
    ///
    /// As [`BatchNorm::forward_t`], and [`Error::Shape`] when `shortcut`
    /// does not have the shape of `x`.
    pub fn forward_add_relu_t(&self, x: &Tensor, shortcut: &Tensor, train: bool) -> Result<Tensor> {
        if shortcut.dims() != x.dims() {
            return Err(Error::shape(
                "BatchNorm::forward_add_relu_t",
                format!("a shortcut of the input's shape {:?}", x.dims()),
                shortcut.dims(),
            ));
        }
        self.forward_impl(x, train, Tail::AddRelu(shortcut))
    }

    /// Train-mode BatchNorm through the fused CPU kernel, when it applies.
    fn forward_kernel(&self, x: &Tensor, train: bool, tail: Tail) -> Result<Option<Tensor>> {
        use crate::ops::kernels;
        let dims = x.dims();
        let count: usize = dims[0] * dims[2..].iter().product::<usize>();
        let same = |t: &Tensor| t.dtype() == x.dtype();
        let params_ok = [&self.weight, &self.bias]
            .iter()
            .all(|p| p.as_ref().is_none_or(same));
        let shortcut_ok = match tail {
            Tail::AddRelu(s) => kernels::supports(s) && same(s),
            Tail::None | Tail::Relu => true,
        };
        if !(kernels::supports(x) && params_ok && shortcut_ok && count > 1) {
            return Ok(None);
        }
        let (w, b) = (self.weight.as_ref(), self.bias.as_ref());
        let eps = self.cfg.eps;
        let out = match tail {
            Tail::None => kernels::batch_norm_train(x, w, b, eps)?,
            Tail::Relu => kernels::batch_norm_relu_train(x, w, b, eps)?,
            Tail::AddRelu(s) => kernels::batch_norm_add_relu_train(x, w, b, s, eps)?,
        };
        if train {
            self.update_running_stats(&out.mean, &out.var, count)?;
        }
        Ok(Some(out.output))
    }

    /// The learnable scale and shift (`None` without `affine`).
    pub(crate) fn affine_params(&self) -> (Option<&Tensor>, Option<&Tensor>) {
        (self.weight.as_ref(), self.bias.as_ref())
    }

    /// Moves the running statistics towards a training batch's `mean` and
    /// biased `var` over `count` values per channel (unbiased in the
    /// running variance, as torch); nothing without running statistics.
    pub(crate) fn update_running_stats(
        &self,
        mean: &Tensor,
        var: &Tensor,
        count: usize,
    ) -> Result<()> {
        if let (Some(rm), Some(rv)) = (&self.running_mean, &self.running_var) {
            let m = self.cfg.momentum;
            let unbiased = (var * (count as f64 / (count as f64 - 1.0)))?;
            let new_m =
                ((rm.as_tensor().detach() * (1.0 - m))? + (mean.to_dtype(rm.dtype())? * m)?)?;
            let new_v =
                ((rv.as_tensor().detach() * (1.0 - m))? + (unbiased.to_dtype(rv.dtype())? * m)?)?;
            rm.set(&new_m)?;
            rv.set(&new_v)?;
        }
        Ok(())
    }

    fn forward_impl(&self, x: &Tensor, train: bool, tail: Tail) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() < 2 || dims[1] != self.num_features {
            return Err(Error::shape(
                "BatchNorm",
                format!("(N, {}, ...)", self.num_features),
                dims,
            ));
        }
        // Work on an (N, C, L) view: reductions over the contiguous last
        // dimension first, then over the batch, are much faster in candle
        // than one reduction over dims (0, 2, 3).
        let n_batch = dims[0];
        let c = self.num_features;
        let l: usize = dims[2..].iter().product();
        let bshape = (1usize, c, 1usize);
        let use_batch = train || self.running_mean.is_none();
        // Statistics in f32 at least (half inputs are upcast like torch).
        let dt = x.dtype();
        let internal = match dt {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        let xi = x.to_dtype(internal)?.reshape((n_batch, c, l))?;
        let affine = match (&self.weight, &self.bias) {
            (Some(w), Some(b)) => Some((
                w.to_dtype(internal)?.reshape(bshape)?,
                b.to_dtype(internal)?.reshape(bshape)?,
            )),
            _ => None,
        };
        if train {
            if let Some(replicas) = super::SyncBatchNormScope::current() {
                if replicas.world_size() > 1 {
                    let y = self.forward_sync(&xi, affine.as_ref(), replicas.as_ref())?;
                    return finish(y.reshape(dims)?.to_dtype(dt)?, tail);
                }
            }
        }
        let y = if use_batch {
            let n = n_batch * l;
            if n <= 1 {
                return Err(Error::shape(
                    "BatchNorm (train mode)",
                    "more than one value per channel (batch of ≥ 2, or spatial size > 1)",
                    dims,
                ));
            }
            if let Some(y) = self.forward_kernel(x, train, tail)? {
                return Ok(y);
            }
            let inv_n = 1.0 / n as f64;
            let mean = (xi.sum_keepdim(2)?.sum_keepdim(0)? * inv_n)?;
            let centered = xi.broadcast_sub(&mean)?;
            let var = (centered.sqr()?.sum_keepdim(2)?.sum_keepdim(0)? * inv_n)?;
            if train {
                if let (Some(rm), Some(rv)) = (&self.running_mean, &self.running_var) {
                    let m = self.cfg.momentum;
                    let bm = mean.detach().flatten_all()?.to_dtype(rm.dtype())?;
                    let bv = (var.detach().flatten_all()? * (n as f64 / (n as f64 - 1.0)))?
                        .to_dtype(rv.dtype())?;
                    let new_m = ((rm.as_tensor().detach() * (1.0 - m))? + (bm * m)?)?;
                    let new_v = ((rv.as_tensor().detach() * (1.0 - m))? + (bv * m)?)?;
                    rm.set(&new_m)?;
                    rv.set(&new_v)?;
                }
            }
            // One full-size multiply (and add) after centring: fold the
            // weight into the per-channel scale.
            let scale = (var + self.cfg.eps)?.sqrt()?.recip()?;
            match &affine {
                Some((w, b)) => centered.broadcast_mul(&(scale * w)?)?.broadcast_add(b)?,
                None => centered.broadcast_mul(&scale)?,
            }
        } else {
            let (rm, rv) = match (&self.running_mean, &self.running_var) {
                (Some(m), Some(v)) => (m, v),
                _ => return Err(Error::invalid("BatchNorm", "no running statistics")),
            };
            let mean = rm
                .as_detached_tensor()
                .to_dtype(internal)?
                .reshape(bshape)?;
            let var = rv
                .as_detached_tensor()
                .to_dtype(internal)?
                .reshape(bshape)?;
            // y = x · scale + shift with per-channel scale and shift.
            let inv_std = (var + self.cfg.eps)?.sqrt()?.recip()?;
            let (scale, shift) = match &affine {
                Some((w, b)) => {
                    let scale = (inv_std * w)?;
                    let shift = (b - (&mean * &scale)?)?;
                    (scale, shift)
                }
                None => {
                    let shift = (&mean * &inv_std)?.neg()?;
                    (inv_std, shift)
                }
            };
            xi.broadcast_mul(&scale)?.broadcast_add(&shift)?
        };
        finish(y.reshape(dims)?.to_dtype(dt)?, tail)
    }

    /// Train mode with the statistics of the global batch
    /// ([`super::SyncBatchNormScope`]): `xi` is the `(N, C, L)` view in the
    /// internal dtype. Two passes, as the local path: the global mean from
    /// the ranks' sums and counts (one all-reduce of `C + 1` values), then
    /// the global biased variance from the ranks' sums of squared
    /// deviations (one all-reduce of `C` values). The sums are
    /// differentiable across ranks, so the backward pass all-reduces the
    /// two gradients of the statistics as torch's SyncBatchNorm does.
    fn forward_sync(
        &self,
        xi: &Tensor,
        affine: Option<&(Tensor, Tensor)>,
        replicas: &dyn crate::autograd::Replicas,
    ) -> Result<Tensor> {
        let (n_batch, c, l) = xi.dims3()?;
        if n_batch * l == 0 {
            return Err(Error::shape(
                "BatchNorm (synchronised, train mode)",
                "at least one value per channel on every rank",
                xi.dims(),
            ));
        }
        let count = crate::host::full((n_batch * l) as f64, 1, xi.dtype(), xi.device())?;
        let local = Tensor::cat(
            &[&xi.sum_keepdim(2)?.sum_keepdim(0)?.flatten_all()?, &count],
            0,
        )?;
        let global = replicas.sum(&local)?;
        let n = global.narrow(0, c, 1)?;
        let mean = global
            .narrow(0, 0, c)?
            .broadcast_div(&n)?
            .reshape((1, c, 1))?;
        let centered = xi.broadcast_sub(&mean)?;
        let sq = centered
            .sqr()?
            .sum_keepdim(2)?
            .sum_keepdim(0)?
            .flatten_all()?;
        let var = replicas.sum(&sq)?.broadcast_div(&n)?;
        if let (Some(rm), Some(rv)) = (&self.running_mean, &self.running_var) {
            let m = self.cfg.momentum;
            let n = n.detach();
            let unbiased = var
                .detach()
                .broadcast_mul(&n.broadcast_div(&(&n - 1.0)?)?)?
                .to_dtype(rv.dtype())?;
            let bm = mean.detach().flatten_all()?.to_dtype(rm.dtype())?;
            rm.set(&((rm.as_tensor().detach() * (1.0 - m))? + (bm * m)?)?)?;
            rv.set(&((rv.as_tensor().detach() * (1.0 - m))? + (unbiased * m)?)?)?;
        }
        let scale = (var.reshape((1, c, 1))? + self.cfg.eps)?.sqrt()?.recip()?;
        Ok(match affine {
            Some((w, b)) => centered.broadcast_mul(&(scale * w)?)?.broadcast_add(b)?,
            None => centered.broadcast_mul(&scale)?,
        })
    }
}

/// Applies the tail (ReLU, shortcut + ReLU) to the normalised `y`.
fn finish(y: Tensor, tail: Tail) -> Result<Tensor> {
    match tail {
        Tail::None => Ok(y),
        Tail::Relu => crate::ops::relu(&y),
        Tail::AddRelu(s) => crate::ops::relu(&(y + s)?),
    }
}

/// What [`BatchNorm`] applies after the normalisation.
#[derive(Clone, Copy)]
enum Tail<'a> {
    None,
    Relu,
    /// Add the shortcut (shaped as the input), then ReLU.
    AddRelu(&'a Tensor),
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        BatchNorm::forward_t(self, x, train).map_err(crate::nn::to_candle)
    }
}

/// Shorthand for [`BatchNorm::new`] with torch's defaults.
pub fn batch_norm(num_features: usize, vb: VarBuilder) -> Result<BatchNorm> {
    BatchNorm::new(num_features, BatchNormConfig::default(), vb)
}
