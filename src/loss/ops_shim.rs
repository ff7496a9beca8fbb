//! TEMPORARY: the subset of `crate::ops` the losses use, with the signatures
//! announced for `ops`, until that module lands on main. Deleted on merge.
#![allow(dead_code)]

use crate::Result;
use candle_core::Tensor;

pub(crate) fn logsumexp(x: &Tensor, dim: usize, keepdim: bool) -> Result<Tensor> {
    let m = x.max_keepdim(dim)?.detach();
    let s = x.broadcast_sub(&m)?.exp()?.sum_keepdim(dim)?.log()?;
    let out = s.broadcast_add(&m)?;
    Ok(if keepdim { out } else { out.squeeze(dim)? })
}

pub(crate) fn log_softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    Ok(x.broadcast_sub(&logsumexp(x, dim, true)?)?)
}

pub(crate) fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    Ok(log_softmax(x, dim)?.exp()?)
}

pub(crate) fn l2_normalize(x: &Tensor, dim: usize, eps: f64) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(dim)?.maximum(eps * eps)?.sqrt()?;
    Ok(x.broadcast_div(&n)?)
}

pub(crate) fn cosine_similarity(a: &Tensor, b: &Tensor, dim: usize, eps: f64) -> Result<Tensor> {
    let a = l2_normalize(a, dim, eps)?;
    let b = l2_normalize(b, dim, eps)?;
    Ok((a * b)?.sum(dim)?)
}

pub(crate) fn kl_div_log_target(log_input: &Tensor, log_target: &Tensor) -> Result<Tensor> {
    let n = log_input.dim(0)? as f64;
    let pw = (log_target.exp()? * (log_target - log_input)?)?;
    Ok((pw.sum_all()? / n)?)
}

pub(crate) fn off_diagonal(x: &Tensor) -> Result<Tensor> {
    let (n, _) = x.dims2()?;
    let flat = x.flatten_all()?;
    let body = flat.narrow(0, 0, n * n - 1)?.reshape((n - 1, n + 1))?;
    Ok(body.narrow(1, 1, n)?.flatten_all()?)
}

pub(crate) fn pairwise_squared_distances(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let a2 = a.sqr()?.sum_keepdim(1)?;
    let b2 = b.sqr()?.sum_keepdim(1)?.t()?;
    let ab = a.matmul(&b.t()?)?;
    Ok(a2.broadcast_add(&b2)?.broadcast_sub(&(ab * 2.0)?)?.relu()?)
}

pub(crate) fn avg_pool2d(
    x: &Tensor,
    kernel: (usize, usize),
    stride: (usize, usize),
    _padding: (usize, usize),
) -> Result<Tensor> {
    Ok(x.avg_pool2d_with_stride(kernel, stride)?)
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Conv2dParams {
    pub(crate) stride: usize,
    pub(crate) padding: usize,
    pub(crate) dilation: usize,
    pub(crate) groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: &Conv2dParams,
) -> Result<Tensor> {
    let y = x.conv2d(w, p.padding, p.stride, p.dilation, p.groups)?;
    Ok(match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
        None => y,
    })
}
