//! Layers and model families with explicit train/eval modes.
//!
//! Every model here is built from a [`candle_nn::VarBuilder`] and a config
//! struct, and every forward takes the mode: `forward_t(x, train)`
//! ([`candle_core::ModuleT`]). In train mode BatchNorm normalises with batch
//! statistics and updates its running statistics, and dropout drops; in
//! eval mode BatchNorm uses the running statistics and nothing changes.
//!
//! * layers: [`Linear`], [`Conv2d`] (through the crate's `conv2d` op),
//!   [`BatchNorm`], [`LayerNorm`], [`Activation`], [`Dropout`] (seeded), [`MaxPool2d`],
//!   [`GlobalAvgPool`], [`Flatten`], and [`SequentialT`], a sequential
//!   container that passes the train flag;
//! * models: [`Mlp`], [`ConvNet`] (the conv32–conv64–fc128 speed anchor),
//!   [`ResNet`] (BasicBlock / Bottleneck, `resnet18/34/50`, small-image
//!   presets `resnet_tiny` / `resnet_small`), and [`ProjectionHead`]
//!   (SimCLR head, BYOL / SimSiam projector and predictor);
//! * [`FeatureExtractor`]: named intermediate outputs (`stem`, `layer1`, …);
//! * [`params`]: trainable parameters vs buffers vs the no-weight-decay set,
//!   freezing, deep copies, safetensors save/load with clear errors;
//! * [`init`]: PyTorch's default initialisation drawn from the crate's
//!   seeded generator, so a seed reproduces a model exactly.
//!
//! Tensor names follow torchvision / `torch.nn.Sequential`, so weights made
//! in PyTorch load directly.
//!
//! ```
//! use aimass::candle::{DType, Device, Tensor};
//! use aimass::candle_nn::VarMap;
//! use aimass::nn::{init, params, FeatureExtractor, ResNet, ResNetConfig};
//!
//! let device = Device::Cpu;
//! let varmap = VarMap::new();
//! // Seeded PyTorch-default initialisation: same seed, same weights.
//! let vb = init::seeded_var_builder(&varmap, 42, DType::F32, &device);
//! let cfg = ResNetConfig::resnet_tiny().with_num_classes(Some(10));
//! let net = ResNet::new(cfg, vb)?;
//!
//! let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &device)?;
//! let logits = net.forward_t(&x, true)?; // train mode: BN batch statistics
//! assert_eq!(logits.dims(), &[2, 10]);
//! let feats = net.forward_features(&x, false)?; // eval mode, named stages
//! assert_eq!(feats.require("layer3")?.dims(), &[2, 64, 7, 7]);
//!
//! // What an optimizer gets: trainable parameters, no buffers.
//! let trainable = params::trainable_vars(&varmap, &params::Frozen::none())?;
//! assert!(trainable.iter().all(|(name, _)| !name.ends_with("running_mean")));
//! # Ok::<(), aimass::Error>(())
//! ```

mod activation;
mod batch_norm;
mod conv;
mod convnet;
mod dropout;
mod features;
mod functional;
mod heads;
pub mod init;
mod layer_norm;
mod linear;
mod load;
mod mlp;
mod model;
pub mod params;
mod pool;
mod resnet;
mod sequential;
mod sync_batch_norm;

pub use activation::Activation;
pub use batch_norm::{batch_norm, BatchNorm, BatchNormConfig};
pub use conv::{Conv2d, Conv2dConfig};
pub use convnet::{ConvNet, ConvNetConfig};
pub use dropout::{Dropout, DropoutConfig, StepScope};
pub use features::{FeatureExtractor, Features};
pub use functional::ParamMap;
pub use heads::{HeadConfig, ProjectionHead};
pub use layer_norm::{LayerNorm, LayerNormConfig};
pub use linear::{linear, Linear};
pub use mlp::{Mlp, MlpConfig};
pub use model::{ForwardMode, FrozenModel, Model};
pub use params::Frozen;
pub use pool::{global_avg_pool, Flatten, GlobalAvgPool, MaxPool2d};
pub use resnet::{
    resnet18, resnet34, resnet50, resnet_small, resnet_tiny, BlockKind, ResNet, ResNetConfig, Stem,
};
pub use sequential::{seq, SequentialT};
pub use sync_batch_norm::SyncBatchNormScope;

/// Turns an aimass error into a candle error for the `Module`/`ModuleT`
/// trait impls (a plain candle error is passed through unchanged).
pub(crate) fn to_candle(e: crate::Error) -> candle_core::Error {
    match e {
        crate::Error::Candle { context, source } if context == "tensor operation" => source,
        other => candle_core::Error::wrap(other),
    }
}
