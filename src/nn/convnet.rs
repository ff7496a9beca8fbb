//! The small convolutional classifier used as the speed anchor.

use candle_core::{ModuleT, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{Conv2d, Conv2dConfig, FeatureExtractor, Features, Linear, MaxPool2d};
use crate::{Error, Result};

/// Configuration of a [`ConvNet`]. Defaults: the conv32–conv64–fc128
/// classifier of the reference protocols and speed peers (docs/benchmarks.md,
/// "Protocols") for 28×28 grey images and 10 classes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConvNetConfig {
    /// Input channels (default 1).
    pub in_channels: usize,
    /// Input height = width (default 28).
    pub image_size: usize,
    /// Channels of the two 3×3 convolutions (default 32, 64).
    pub channels: (usize, usize),
    /// Width of the hidden fully connected layer (default 128).
    pub hidden: usize,
    /// Number of classes (default 10).
    pub num_classes: usize,
}

impl Default for ConvNetConfig {
    fn default() -> Self {
        Self {
            in_channels: 1,
            image_size: 28,
            channels: (32, 64),
            hidden: 128,
            num_classes: 10,
        }
    }
}

impl ConvNetConfig {
    /// Sets the input channels.
    pub fn with_in_channels(mut self, v: usize) -> Self {
        self.in_channels = v;
        self
    }
    /// Sets the input size.
    pub fn with_image_size(mut self, v: usize) -> Self {
        self.image_size = v;
        self
    }
    /// Sets the convolution channels.
    pub fn with_channels(mut self, v: (usize, usize)) -> Self {
        self.channels = v;
        self
    }
    /// Sets the hidden width.
    pub fn with_hidden(mut self, v: usize) -> Self {
        self.hidden = v;
        self
    }
    /// Sets the number of classes.
    pub fn with_num_classes(mut self, v: usize) -> Self {
        self.num_classes = v;
        self
    }
}

/// `Conv(3×3, pad 1)–ReLU–MaxPool(2) → Conv(3×3, pad 1)–ReLU–MaxPool(2) →
/// Flatten → Linear–ReLU → Linear`, torch's
///
/// ```text
/// nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
///               nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
///               nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
/// ```
///
/// Tensor names: `conv1.*`, `conv2.*`, `fc1.*`, `fc2.*` (that Sequential's
/// `0.*`, `3.*`, `7.*`, `9.*`). Flattening is channel-major, as in torch.
#[derive(Debug, Clone)]
pub struct ConvNet {
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Linear,
    fc2: Linear,
    pool: MaxPool2d,
}

impl ConvNet {
    /// Builds the network under `vb`.
    pub fn new(cfg: ConvNetConfig, vb: VarBuilder) -> Result<Self> {
        let side = cfg.image_size / 4;
        if side == 0 {
            return Err(Error::config(
                "ConvNetConfig::image_size",
                cfg.image_size,
                "must be at least 4 (two 2×2 max pools)",
            ));
        }
        let c = Conv2dConfig::default().with_padding(1);
        let conv1 = Conv2d::new(cfg.in_channels, cfg.channels.0, 3, c, vb.pp("conv1"))?;
        let conv2 = Conv2d::new(cfg.channels.0, cfg.channels.1, 3, c, vb.pp("conv2"))?;
        let fc1 = Linear::new(cfg.channels.1 * side * side, cfg.hidden, true, vb.pp("fc1"))?;
        let fc2 = Linear::new(cfg.hidden, cfg.num_classes, true, vb.pp("fc2"))?;
        Ok(Self {
            conv1,
            conv2,
            fc1,
            fc2,
            pool: MaxPool2d::new(2, 2, 0)?,
        })
    }

    fn run(&self, x: &Tensor, mut rec: Option<&mut Features>) -> Result<Tensor> {
        let mut push = |name: &str, t: &Tensor| {
            if let Some(r) = rec.as_deref_mut() {
                r.push(name, t.clone());
            }
        };
        let x = self.pool.forward(&self.conv1.forward(x)?.relu()?)?;
        push("conv1", &x);
        let x = self.pool.forward(&self.conv2.forward(&x)?.relu()?)?;
        push("conv2", &x);
        let x = self.fc1.forward(&x.flatten_from(1)?)?.relu()?;
        push("fc1", &x);
        let x = self.fc2.forward(&x)?;
        push("logits", &x);
        Ok(x)
    }

    /// The logits (the network has no mode-dependent layer; `train` is
    /// accepted for a uniform interface).
    pub fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        self.run(x, None)
    }
}

impl ModuleT for ConvNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        ConvNet::forward_t(self, x, train).map_err(crate::nn::to_candle)
    }
}

impl FeatureExtractor for ConvNet {
    /// `conv1`, `conv2` (after each pool), `fc1` (the 128-d hidden layer), `logits`.
    fn feature_names(&self) -> Vec<String> {
        ["conv1", "conv2", "fc1", "logits"]
            .map(String::from)
            .to_vec()
    }

    fn forward_features(&self, x: &Tensor, _train: bool) -> Result<Features> {
        let mut f = Features::new();
        self.run(x, Some(&mut f))?;
        Ok(f)
    }
}
