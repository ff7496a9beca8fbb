//! 2-D convolution layer, routed through the crate's `conv2d` op.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::nn::init::{torch_bias_init, torch_weight_init};
use crate::ops;
use crate::{Error, Result};

/// Configuration of a [`Conv2d`] layer (torch's `nn.Conv2d` arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Conv2dConfig {
    /// Stride (torch default 1).
    pub stride: usize,
    /// Zero padding on each side (torch default 0).
    pub padding: usize,
    /// Dilation (torch default 1).
    pub dilation: usize,
    /// Groups (torch default 1).
    pub groups: usize,
    /// Whether the layer has a bias (torch default true).
    pub bias: bool,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
            bias: true,
        }
    }
}

impl Conv2dConfig {
    /// Sets the stride.
    pub fn with_stride(mut self, v: usize) -> Self {
        self.stride = v;
        self
    }
    /// Sets the padding.
    pub fn with_padding(mut self, v: usize) -> Self {
        self.padding = v;
        self
    }
    /// Sets the dilation.
    pub fn with_dilation(mut self, v: usize) -> Self {
        self.dilation = v;
        self
    }
    /// Sets the number of groups.
    pub fn with_groups(mut self, v: usize) -> Self {
        self.groups = v;
        self
    }
    /// Sets whether there is a bias.
    pub fn with_bias(mut self, v: bool) -> Self {
        self.bias = v;
        self
    }
}

/// A 2-D convolution like `torch.nn.Conv2d`: `weight` is
/// `(out, in / groups, k, k)`, `bias` `(out,)`, initialised as PyTorch does
/// (U(−1/√fan_in, 1/√fan_in), fan_in = in / groups · k · k). Input and
/// output are NCHW.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    params: ops::Conv2dParams,
}

impl Conv2d {
    /// A `kernel × kernel` convolution `in_channels → out_channels` under `vb`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        cfg: Conv2dConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        if cfg.groups == 0
            || !in_channels.is_multiple_of(cfg.groups)
            || !out_channels.is_multiple_of(cfg.groups)
        {
            return Err(Error::config(
                "Conv2dConfig::groups",
                cfg.groups,
                format!("must be ≥ 1 and divide in_channels ({in_channels}) and out_channels ({out_channels})"),
            ));
        }
        if cfg.stride == 0 || cfg.dilation == 0 {
            return Err(Error::config(
                "Conv2dConfig::stride/dilation",
                format!("{}/{}", cfg.stride, cfg.dilation),
                "stride and dilation must be at least 1",
            ));
        }
        if kernel == 0 || in_channels == 0 || out_channels == 0 {
            return Err(Error::config(
                "Conv2d",
                format!("{in_channels}->{out_channels} kernel {kernel}"),
                "channels and kernel size must be at least 1",
            ));
        }
        let fan_in = in_channels / cfg.groups * kernel * kernel;
        let weight = vb.get_with_hints(
            (out_channels, in_channels / cfg.groups, kernel, kernel),
            "weight",
            torch_weight_init(fan_in),
        )?;
        let bias = if cfg.bias {
            Some(vb.get_with_hints(out_channels, "bias", torch_bias_init(fan_in))?)
        } else {
            None
        };
        let params = ops::Conv2dParams::default()
            .with_stride(cfg.stride)
            .with_padding(cfg.padding)
            .with_dilation(cfg.dilation)
            .with_groups(cfg.groups);
        Ok(Self {
            weight,
            bias,
            params,
        })
    }

    /// The kernel, `(out, in / groups, k, k)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Applies the convolution to an NCHW input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let cin = self.weight.dim(1)? * self.params.groups;
        if x.rank() != 4 || x.dim(1)? != cin {
            return Err(Error::shape(
                "Conv2d",
                format!("(N, {cin}, H, W)"),
                x.dims(),
            ));
        }
        ops::conv2d(x, &self.weight, self.bias.as_ref(), &self.params)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Conv2d::forward(self, x).map_err(crate::nn::to_candle)
    }
}
