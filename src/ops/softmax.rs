//! Numerically stable softmax, log-softmax and log-sum-exp along any dim.
//!
//! All three subtract the (detached) maximum along `dim` before
//! exponentiating, so logits of any magnitude give finite results; the shift
//! does not change the value, and since the maximum is detached it adds no
//! term to the gradient (which is exact because softmax is shift-invariant).
//! Rows whose maximum is infinite are shifted by 0 instead, as torch does.
//! They are compositions of candle primitives, so they are differentiable to
//! any order (unlike candle-nn's fused `softmax_last_dim`, which has no
//! backward).

use candle_core::shape::Dim;
use candle_core::{Tensor, D};

use crate::Result;

/// The maximum along `dim` (kept), detached, with infinite entries replaced by 0.
fn stable_shift<I: Dim + Copy>(x: &Tensor, dim: I) -> Result<Tensor> {
    let m = x.max_keepdim(dim)?.detach();
    let finite = m.abs()?.lt(f64::INFINITY)?;
    Ok(finite.where_cond(&m, &m.zeros_like()?)?)
}

/// `log(sum(exp(x), dim))`, computed stably. Keeps `dim` as size 1 when
/// `keepdim` is true.
pub fn logsumexp<I: Dim + Copy>(x: &Tensor, dim: I, keepdim: bool) -> Result<Tensor> {
    let m = stable_shift(x, dim)?;
    let lse = x
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(dim)?
        .log()?
        .add(&m)?;
    if keepdim {
        Ok(lse)
    } else {
        Ok(lse.squeeze(dim)?)
    }
}

/// `x - logsumexp(x, dim)`: log-probabilities along `dim`.
pub fn log_softmax<I: Dim + Copy>(x: &Tensor, dim: I) -> Result<Tensor> {
    Ok(x.broadcast_sub(&logsumexp(x, dim, true)?)?)
}

/// `exp(x) / sum(exp(x), dim)`: probabilities along `dim`.
pub fn softmax<I: Dim + Copy>(x: &Tensor, dim: I) -> Result<Tensor> {
    let m = stable_shift(x, dim)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(dim)?)?)
}

/// Softmax along the last dimension: a differentiable replacement for
/// `candle_nn::ops::softmax_last_dim`, which has no backward in candle 0.11.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    softmax(x, D::Minus1)
}
