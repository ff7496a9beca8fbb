//! 2-D convolution, routed to the fastest correct implementation.
//!
//! On the CPU, f32/f64 tensors go to aimass's own kernel (see
//! [`super::kernels`]) when it supports the case; everything else uses
//! candle's `conv2d`. Both are differentiable.

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
    let y = {
        x.conv2d(
            w,
            params.padding,
            params.stride,
            params.dilation,
            params.groups,
        )?
    };
    match bias {
        Some(b) => Ok(y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?),
        None => Ok(y),
    }
}
