//! TEMPORARY stand-in for `crate::ops::{conv2d, Conv2dParams, max_pool2d}` until the
//! ops module lands on main. Same signatures; forward only is trusted.
#![allow(dead_code)]

use candle_core::Tensor;

use crate::Result;

/// Parameters of a 2-D convolution (stand-in for `ops::Conv2dParams`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub groups: usize,
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

impl Conv2dParams {
    pub fn with_stride(mut self, v: usize) -> Self {
        self.stride = v;
        self
    }
    pub fn with_padding(mut self, v: usize) -> Self {
        self.padding = v;
        self
    }
    pub fn with_dilation(mut self, v: usize) -> Self {
        self.dilation = v;
        self
    }
    pub fn with_groups(mut self, v: usize) -> Self {
        self.groups = v;
        self
    }
}

pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: &Conv2dParams) -> Result<Tensor> {
    let y = x.conv2d(w, p.padding, p.stride, p.dilation, p.groups)?;
    Ok(match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
        None => y,
    })
}

pub fn max_pool2d(
    x: &Tensor,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
) -> Result<Tensor> {
    let x = if padding != (0, 0) {
        let (n, c, h, w) = x.dims4()?;
        let neg = |shape: (usize, usize, usize, usize)| -> Result<Tensor> {
            Ok(Tensor::full(f32::NEG_INFINITY, shape, x.device())?.to_dtype(x.dtype())?)
        };
        let top = neg((n, c, padding.0, w))?;
        let x = Tensor::cat(&[&top, x, &top], 2)?;
        let side = neg((n, c, h + 2 * padding.0, padding.1))?;
        Tensor::cat(&[&side, &x, &side], 3)?
    } else {
        x.clone()
    };
    Ok(x.max_pool2d_with_stride(kernel, stride)?)
}
