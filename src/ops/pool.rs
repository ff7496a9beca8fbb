//! 2-D max and average pooling with kernel, stride and padding, and correct
//! gradients.
//!
//! candle 0.11's `max_pool2d` backward multiplies the gradient by 1/(k·k)
//! (0.25 instead of 1 for a 2×2 window) and fails when kernel ≠ stride; its
//! pools have no padding. These replacements gather the k·k shifted, strided
//! views of the (padded) input with `narrow`/`reshape` only, then reduce
//! them with `max` or `mean`, so the gradient is exact (it flows to the
//! maximum of each window, or evenly over it) and differentiable again for
//! second-order methods. On the CPU a fast kernel may take over (see
//! [`super::kernels`]).

use candle_core::Tensor;

use crate::{Error, Result};

/// Output size of a pooling window along one axis, validated.
fn pooled_len(op: &str, axis: &str, input: usize, k: usize, s: usize, p: usize) -> Result<usize> {
    if k == 0 || s == 0 {
        return Err(Error::invalid(
            op,
            format!("kernel and stride must be >= 1 (got kernel {k}, stride {s} along {axis})"),
        ));
    }
    if 2 * p > k {
        return Err(Error::invalid(
            op,
            format!("padding {p} along {axis} must be at most half the kernel {k}"),
        ));
    }
    if input + 2 * p < k {
        return Err(Error::invalid(
            op,
            format!("input {axis} {input} (+2×padding {p}) is smaller than the kernel {k}"),
        ));
    }
    Ok((input + 2 * p - k) / s + 1)
}

/// Pads dim `dim` of `x` with `before` and `after` entries of `value`.
fn pad_dim(x: &Tensor, dim: usize, before: usize, after: usize, value: f64) -> Result<Tensor> {
    if before == 0 && after == 0 {
        return Ok(x.clone());
    }
    let mut parts = Vec::with_capacity(3);
    let block = |n: usize| -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        dims[dim] = n;
        crate::host::full(value, dims, x.dtype(), x.device())
    };
    if before > 0 {
        parts.push(block(before)?);
    }
    parts.push(x.clone());
    if after > 0 {
        parts.push(block(after)?);
    }
    Ok(Tensor::cat(&parts, dim)?)
}

/// The views `x[..., k0 + s*i, ...]` for `i < out`, for every offset `k0 < k`,
/// along `dim`, after padding with `p` (and enough extra to reshape) of `value`.
fn strided_views(
    x: &Tensor,
    dim: usize,
    k: usize,
    s: usize,
    p: usize,
    out: usize,
    value: f64,
) -> Result<Vec<Tensor>> {
    let len = x.dim(dim)?;
    let needed = (k - 1) + s * out;
    let after = needed.saturating_sub(len + p).max(p);
    let xp = pad_dim(x, dim, p, after, value)?;
    let mut shape = xp.dims().to_vec();
    (0..k)
        .map(|k0| {
            let v = xp.narrow(dim, k0, s * out)?;
            shape[dim] = out;
            let mut split = shape.clone();
            split.insert(dim + 1, s);
            Ok(v.reshape(split)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)?)
        })
        .collect()
}

/// All k_h·k_w window views of an N×C×H×W tensor, stacked on a new last dim.
fn windows(
    x: &Tensor,
    op: &str,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    pad_value: f64,
) -> Result<Tensor> {
    let (_, _, h, w) = x
        .dims4()
        .map_err(|_| Error::shape(op, "an (N, C, H, W) tensor", x.dims()))?;
    let oh = pooled_len(op, "height", h, kernel.0, stride.0, padding.0)?;
    let ow = pooled_len(op, "width", w, kernel.1, stride.1, padding.1)?;
    let rows = strided_views(x, 2, kernel.0, stride.0, padding.0, oh, pad_value)?;
    let mut views = Vec::with_capacity(kernel.0 * kernel.1);
    for r in &rows {
        views.extend(strided_views(
            r, 3, kernel.1, stride.1, padding.1, ow, pad_value,
        )?);
    }
    Ok(Tensor::stack(&views, 4)?)
}

/// Max pooling over `kernel` windows moved by `stride`, with implicit
/// `-inf` padding, as torch's `F.max_pool2d` (dilation 1, floor mode).
/// The gradient goes to the maximum of each window (to every maximum on
/// exact ties).
pub fn max_pool2d(
    x: &Tensor,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
) -> Result<Tensor> {
    if super::kernels::supports_pool(x) {
        return super::kernels::max_pool2d(x, kernel, stride, padding);
    }
    max_pool2d_composed(x, kernel, stride, padding)
}

/// [`max_pool2d`] built from candle primitives only (every device, any order
/// of differentiation).
pub fn max_pool2d_composed(
    x: &Tensor,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
) -> Result<Tensor> {
    Ok(windows(x, "max_pool2d", kernel, stride, padding, f64::NEG_INFINITY)?.max(4)?)
}

/// Average pooling with zero padding counted in the average
/// (`count_include_pad=True`, torch's default), floor mode.
pub fn avg_pool2d(
    x: &Tensor,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
) -> Result<Tensor> {
    if super::kernels::supports_pool(x) {
        return super::kernels::avg_pool2d(x, kernel, stride, padding);
    }
    avg_pool2d_composed(x, kernel, stride, padding)
}

/// [`avg_pool2d`] built from candle primitives only.
pub fn avg_pool2d_composed(
    x: &Tensor,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
) -> Result<Tensor> {
    Ok(windows(x, "avg_pool2d", kernel, stride, padding, 0.0)?.mean(4)?)
}

/// Mean over the spatial dims of an N×C×H×W tensor: N×C.
pub fn global_avg_pool2d(x: &Tensor) -> Result<Tensor> {
    if x.rank() != 4 {
        return Err(Error::shape(
            "global_avg_pool2d",
            "an (N, C, H, W) tensor",
            x.dims(),
        ));
    }
    Ok(x.flatten_from(2)?.mean(2)?)
}
