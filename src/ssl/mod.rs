//! Self-supervised pretraining: learn a backbone from unlabelled images,
//! then get a good classifier from few labels.
//!
//! | trainer | idea | extra state |
//! |---|---|---|
//! | [`SimClr`] | contrastive: each view's positive is the other view of its image, the rest of the batch are negatives (NT-Xent) | – |
//! | [`Byol`] | an online network with a predictor regresses an EMA target's projection of the other view | target network |
//! | [`SimSiam`] | as BYOL without the EMA: a stop-gradient on the other branch | – |
//! | [`MoCo`] | (v2) contrastive against a queue of keys from a momentum encoder | key encoder, queue |
//! | [`BarlowTwins`] | the cross-correlation of the two views' projections pushed to the identity | – |
//! | [`VicReg`] | invariance, variance and covariance terms on the projections | – |
//!
//! Every trainer takes a [`Backbone`] (ours, e.g. [`Backbone::resnet`], or
//! any model built from a `VarBuilder`, with its feature width) and a
//! config whose default holds its paper's values (temperature, heads, τ,
//! queue size, LARS or SGD, learning rate per 256 images, weight decay
//! and what it exempts, warmup: [`SslOptimConfig`]), validated by the
//! constructor. Each step stacks the batch's two views into one batch
//! (BatchNorm sees both), computes the method's loss, and steps the
//! optimizer. BYOL's target and MoCo's key encoder are
//! [`FrozenModel`](crate::nn::FrozenModel)s: detached, outside every
//! optimizer, changed only by [`Ema::from_frozen`](crate::optim::Ema::from_frozen).
//!
//! Every trainer is a [`TrainStep`](crate::train::TrainStep) (and an
//! [`SslTrainer`]), so [`Fit`](crate::train::Fit) runs it with progress,
//! checkpoints and exact resume (networks, targets, queues, optimizer
//! state); [`SslTrainer::export_backbone`] writes the pretrained backbone
//! as safetensors that load into a classifier with a fresh head.
//! [`probe_features`] answers the user's question on frozen features: kNN,
//! a linear probe, and linear probes and kNN with 100 and 10 labelled
//! images per class.
//!
//! The whole pipeline (`examples/ssl.rs` runs it on Fashion-MNIST;
//! `docs/ssl.md` is the guide), here on 16 toy images:
//!
//! ```
//! use aimass::prelude::*;
//! use aimass::data::augment::presets::{simclr_views, PresetConfig};
//! use aimass::nn::{HeadConfig, ResNetConfig};
//! use aimass::ssl::{Backbone, SimClr, SimClrConfig, SslTrainer};
//!
//! // Unlabelled images (the labels are never read): 16 gray 28×28.
//! let pixels: Vec<u8> = (0..16 * 784).map(|i| (i * 31 % 251) as u8).collect();
//! let images = InMemoryDataset::new(pixels, vec![0; 16], (1, 28, 28))?;
//! // Two augmented views of every image.
//! let views = simclr_views(&PresetConfig::default())?;
//! let loader_cfg = DataLoaderConfig::default().with_batch_size(8).with_drop_last(true);
//! let mut loader = DataLoader::new(images, loader_cfg, &Device::Cpu)?.with_views(views);
//!
//! // resnet_tiny (64 features) + a small projection head.
//! let cfg = SimClrConfig::default()
//!     .with_projector(HeadConfig::simclr().with_hidden_dim(64).with_output_dim(32));
//! let mut simclr = SimClr::new(Backbone::resnet(ResNetConfig::resnet_tiny()), cfg, &Device::Cpu)?;
//! // Warmup then cosine, the peak rate scaled with the batch size.
//! let schedule = simclr.optim_config().schedule(8, loader.len(), 1)?;
//! Fit::new(&mut simclr, &mut loader, FitConfig::default().with_epochs(1))?
//!     .with_schedule(schedule)
//!     .run()?;
//!
//! // Frozen features for probes, and the backbone for fine-tuning.
//! let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu)?;
//! assert_eq!(simclr.features(&x)?.dims(), &[2, 64]);
//! let path = std::env::temp_dir().join(format!("aimass-doc-ssl-{}.safetensors", std::process::id()));
//! simclr.export_backbone(&path)?;
//! # std::fs::remove_file(&path).ok();
//! # Ok::<(), aimass::Error>(())
//! ```

mod backbone;
mod barlow;
mod byol;
pub(crate) mod core;
mod moco;
mod optim;
mod probe;
mod simclr;
mod simsiam;
pub(crate) mod trainer;
mod vicreg;

pub use backbone::{Backbone, Encoder};
pub use barlow::{BarlowTwins, BarlowTwinsConfig};
pub use byol::{Byol, ByolConfig};
pub use moco::{MoCo, MoCoConfig};
pub use optim::{SslOptimConfig, SslOptimizer};
pub use probe::{label_subset, probe_features, FewLabelResult, ProbeConfig, ProbeReport, Spread};
pub use simclr::{SimClr, SimClrConfig};
pub use simsiam::{SimSiam, SimSiamConfig};
pub use trainer::SslTrainer;
pub use vicreg::{VicReg, VicRegConfig};
