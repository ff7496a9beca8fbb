//! ReLU routed to the fastest implementation (the CPU kernel for f32/f64
//! CPU tensors, candle's elsewhere). Both are differentiable to any order.

use candle_core::Tensor;

use crate::Result;

/// `max(x, 0)`.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if super::kernels::supports(x) {
        super::kernels::relu(x)
    } else {
        Ok(x.relu()?)
    }
}
