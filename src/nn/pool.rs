//! Pooling and flattening layers.

use candle_core::{Module, Tensor};

use crate::ops;
use crate::{Error, Result};

/// Global average pooling: `(N, C, H, W) → (N, C)` (torch's
/// `AdaptiveAvgPool2d(1)` followed by `Flatten()`).
#[derive(Debug, Clone, Copy, Default)]
pub struct GlobalAvgPool;

impl GlobalAvgPool {
    /// Averages over the spatial dimensions.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        global_avg_pool(x)
    }
}

/// Global average pooling of an NCHW tensor to `(N, C)`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    ops::global_avg_pool2d(x)
}

impl Module for GlobalAvgPool {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        global_avg_pool(x).map_err(crate::nn::to_candle)
    }
}

/// 2-D max pooling (torch's `nn.MaxPool2d`, ceil_mode false), with a
/// correct gradient (routed through the crate's `max_pool2d` op).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool2d {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl MaxPool2d {
    /// A `kernel × kernel` max pool with the given stride and padding
    /// (torch's default stride is the kernel size).
    pub fn new(kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        if kernel == 0 || stride == 0 || 2 * padding > kernel {
            return Err(Error::config(
                "MaxPool2d",
                format!("kernel {kernel}, stride {stride}, padding {padding}"),
                "kernel and stride must be ≥ 1 and padding at most half the kernel",
            ));
        }
        Ok(Self {
            kernel,
            stride,
            padding,
        })
    }

    /// Pools an NCHW tensor.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() != 4 {
            return Err(Error::shape("MaxPool2d", "(N, C, H, W)", x.dims()));
        }
        ops::max_pool2d(
            x,
            (self.kernel, self.kernel),
            (self.stride, self.stride),
            (self.padding, self.padding),
        )
    }
}

impl Module for MaxPool2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        MaxPool2d::forward(self, x).map_err(crate::nn::to_candle)
    }
}

/// Flattens all dimensions after the first: `(N, ...) → (N, prod)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Flatten;

impl Module for Flatten {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.flatten_from(1)
    }
}
