//! The small convolutional classifier used as the speed anchor.

use candle_core::{ModuleT, Tensor};
use candle_nn::VarBuilder;

use crate::config::config;
use crate::nn::{Conv2d, Conv2dConfig, FeatureExtractor, Features, Linear, MaxPool2d};
use crate::{Error, Result};

config! {
    /// Configuration of a [`ConvNet`]. Defaults: the conv32–conv64–fc128
    /// classifier of the reference protocols and speed peers
    /// (docs/benchmarks.md, "Protocols") for 28×28 grey images and 10
    /// classes.
    #[derive(Eq)]
    pub struct ConvNetConfig {
        /// Input channels (default 1).
        in_channels: usize = 1,
        /// Input height = width (default 28).
        image_size: usize = 28,
        /// Channels of the two 3×3 convolutions (default 32, 64).
        channels: (usize, usize) = (32, 64),
        /// Width of the hidden fully connected layer (default 128).
        hidden: usize = 128,
        /// Number of classes (default 10).
        num_classes: usize = 10,
    }
}

impl ConvNetConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if self.image_size < 4 {
            return Err(Error::config(
                "ConvNetConfig::image_size",
                self.image_size,
                "must be at least 4 (two 2×2 max pools)",
            ));
        }
        for (field, v) in [
            ("ConvNetConfig::in_channels", self.in_channels),
            ("ConvNetConfig::channels.0", self.channels.0),
            ("ConvNetConfig::channels.1", self.channels.1),
            ("ConvNetConfig::hidden", self.hidden),
            ("ConvNetConfig::num_classes", self.num_classes),
        ] {
            if v == 0 {
                return Err(Error::config(field, 0, "must be at least 1"));
            }
        }
        Ok(())
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
        cfg.validate()?;
        let side = cfg.image_size / 4;
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
