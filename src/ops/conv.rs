//! 2-D convolution, routed to the fastest correct implementation.
//!
//! On the CPU, f32/f64 tensors go to aimass's own kernel (see
//! [`super::kernels`]) when it supports the case; everything else (CUDA,
//! Metal, half types) uses candle's `conv2d`. Both are differentiable.
//!
//! candle 0.11's `conv2d` backward sizes the input gradient from the
//! leftover rows only (`out_padding` of its transposed convolution), so
//! when a strided convolution leaves a different number of unused rows
//! and columns (height 8, width 7, stride 2) the backward pass fails with
//! a shape mismatch. On that path the input is first zero-padded at the
//! bottom or right, inside the unused margin, so both leftovers agree: the
//! output is unchanged and the gradient of the padding is dropped.

use candle_core::Tensor;

use crate::config::config;
use crate::{Error, Result};

config! {
    /// Geometry of a 2-D convolution (square stride, padding and dilation).
    #[derive(Copy, Eq)]
    pub struct Conv2dParams {
        /// Step between windows (default 1).
        stride: usize = 1,
        /// Zero padding on each side (default 0).
        padding: usize = 0,
        /// Spacing between kernel taps (default 1).
        dilation: usize = 1,
        /// Number of channel groups (default 1; `groups = C_in` is depthwise).
        groups: usize = 1,
    }
}

/// Checks the shapes of a convolution and returns the output (H, W).
pub(crate) fn check_conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: &Conv2dParams,
) -> Result<(usize, usize)> {
    let op = "conv2d";
    let (_, c_in, h, wd) = x
        .dims4()
        .map_err(|_| Error::shape(op, "input of shape (N, C_in, H, W)", x.dims()))?;
    let (c_out, c_in_g, kh, kw) = w
        .dims4()
        .map_err(|_| Error::shape(op, "weight of shape (C_out, C_in/groups, kH, kW)", w.dims()))?;
    if p.stride == 0 || p.dilation == 0 || p.groups == 0 {
        return Err(Error::invalid(
            op,
            format!("stride, dilation and groups must be >= 1, got {p:?}"),
        ));
    }
    if c_in % p.groups != 0 || c_out % p.groups != 0 || c_in_g * p.groups != c_in {
        return Err(Error::shape(
            op,
            format!(
                "weight (C_out divisible by {}, {} = C_in/groups, kH, kW)",
                p.groups,
                c_in / p.groups.max(1)
            ),
            w.dims(),
        ));
    }
    if let Some(b) = bias {
        if b.dims() != [c_out] {
            return Err(Error::shape(
                op,
                format!("bias of shape ({c_out},)"),
                b.dims(),
            ));
        }
    }
    let eh = p.dilation * (kh - 1) + 1;
    let ew = p.dilation * (kw - 1) + 1;
    if h + 2 * p.padding < eh || wd + 2 * p.padding < ew {
        return Err(Error::shape(
            op,
            format!("input at least {eh}×{ew} after padding"),
            x.dims(),
        ));
    }
    Ok((
        (h + 2 * p.padding - eh) / p.stride + 1,
        (wd + 2 * p.padding - ew) / p.stride + 1,
    ))
}

/// `x` zero-padded at the end of H or W so that the convolution leaves as
/// many unused rows as columns (see the module docs); `x` itself when it
/// already does.
fn balance_leftovers(x: &Tensor, w: &Tensor, p: &Conv2dParams) -> Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let left = |len: usize, k: usize| (len + 2 * p.padding - (p.dilation * (k - 1) + 1)) % p.stride;
    let (lh, lw) = (left(h, kh), left(wd, kw));
    Ok(if lh > lw {
        x.pad_with_zeros(3, 0, lh - lw)?
    } else if lw > lh {
        x.pad_with_zeros(2, 0, lw - lh)?
    } else {
        x.clone()
    })
}

/// 2-D convolution of `x` (N×C_in×H×W) with `w` (C_out×C_in/groups×kH×kW),
/// plus an optional per-channel `bias`, as torch's `F.conv2d`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    params: &Conv2dParams,
) -> Result<Tensor> {
    check_conv2d(x, w, bias, params)?;
    if super::kernels::supports_conv(x, w, bias) {
        // The kernel adds the bias in the same pass (and its gradient).
        let (s, p, d) = (params.stride, params.padding, params.dilation);
        return super::kernels::conv2d(x, w, bias, (s, s), (p, p), (d, d), params.groups);
    }
    let x = &balance_leftovers(x, w, params)?;
    let y = x.conv2d(
        w,
        params.padding,
        params.stride,
        params.dilation,
        params.groups,
    )?;
    match bias {
        Some(b) => Ok(y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?),
        None => Ok(y),
    }
}
