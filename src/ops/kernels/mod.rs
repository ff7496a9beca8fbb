//! Fast CPU kernels (custom ops with backward). Until a kernel lands for a
//! case, these report "unsupported" and the ops fall back to candle
//! primitives.

use candle_core::Tensor;

use super::Conv2dParams;
use crate::Result;

/// Whether a fast CPU convolution kernel handles these tensors.
pub(crate) fn supports_conv(_x: &Tensor, _w: &Tensor) -> bool {
    false
}

/// Whether a fast CPU pooling kernel handles this tensor.
pub(crate) fn supports_pool(_x: &Tensor) -> bool {
    false
}

/// Fast CPU convolution (only called when [`supports_conv`] is true).
pub(crate) fn conv2d(x: &Tensor, w: &Tensor, p: &Conv2dParams) -> Result<Tensor> {
    Ok(x.conv2d(w, p.padding, p.stride, p.dilation, p.groups)?)
}

/// Fast CPU max pooling (only called when [`supports_pool`] is true).
pub(crate) fn max_pool2d(
    x: &Tensor,
    k: (usize, usize),
    s: (usize, usize),
    p: (usize, usize),
) -> Result<Tensor> {
    super::pool::max_pool2d_composed(x, k, s, p)
}

/// Fast CPU average pooling (only called when [`supports_pool`] is true).
pub(crate) fn avg_pool2d(
    x: &Tensor,
    k: (usize, usize),
    s: (usize, usize),
    p: (usize, usize),
) -> Result<Tensor> {
    super::pool::avg_pool2d_composed(x, k, s, p)
}
