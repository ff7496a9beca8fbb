//! 2-D convolution layer, routed through the crate's `conv2d` op.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::config::config;
use crate::nn::init::{torch_bias_init, torch_weight_init};
use crate::ops;
use crate::{Error, Result};

config! {
    /// Configuration of a [`Conv2d`] layer (torch's `nn.Conv2d` arguments).
    #[derive(Copy, Eq)]
    pub struct Conv2dConfig {
        /// Stride (torch default 1).
        stride: usize = 1,
        /// Zero padding on each side (torch default 0).
        padding: usize = 0,
        /// Dilation (torch default 1).
        dilation: usize = 1,
        /// Groups (torch default 1).
        groups: usize = 1,
        /// Whether the layer has a bias (torch default true).
        bias: bool = true,
    }
}

impl Conv2dConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("Conv2dConfig::stride", self.stride),
            ("Conv2dConfig::dilation", self.dilation),
            ("Conv2dConfig::groups", self.groups),
        ] {
            if v == 0 {
                return Err(Error::config(field, 0, "must be at least 1"));
            }
        }
        Ok(())
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
        cfg.validate()?;
        if !in_channels.is_multiple_of(cfg.groups) || !out_channels.is_multiple_of(cfg.groups) {
            return Err(Error::config(
                "Conv2dConfig::groups",
                cfg.groups,
                format!("must be ≥ 1 and divide in_channels ({in_channels}) and out_channels ({out_channels})"),
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

    /// Stride, padding, dilation and groups.
    pub(crate) fn params(&self) -> &ops::Conv2dParams {
        &self.params
    }

    /// Applies the convolution to an NCHW input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.weight.rank() != 4 {
            return Err(Error::shape(
                "Conv2d",
                "a 4-D kernel (out, in / groups, k, k) (per-task kernels from ParamMap::expand_tasks are not supported: run the tasks one at a time)",
                self.weight.dims(),
            ));
        }
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
