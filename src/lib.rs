//! # aimass
//!
//! A deep-learning **training** library for Rust, built on
//! [candle](https://github.com/huggingface/candle). Candle gives tensors,
//! autograd and devices; aimass gives what every training program otherwise
//! writes by hand: optimizers with momentum and clipping, learning-rate
//! schedules, model families with train/eval modes, classification,
//! distillation and self-supervised losses, data pipelines with batched
//! augmentation, and whole trainers for self-supervised pretraining,
//! teacher-student distillation and meta-learning.
//!
//! aimass is candle interop, not a new framework: parameters live in a
//! [`candle_nn::VarMap`], models are built from a [`candle_nn::VarBuilder`],
//! and anything that implements candle's `Module`/`ModuleT` can be used.
//! Every fallible function returns [`Result`], whose [`Error`] says what
//! went wrong and where.
//!
//! ```
//! use aimass::prelude::*;
//!
//! // Pick a device (honours AIMASS_DEVICE), normalise embeddings and compare them.
//! let device = aimass::device::select_device(aimass::device::DeviceRequest::Cpu)?;
//! let z = Tensor::new(&[[3.0f32, 4.0], [1.0, 0.0]], &device)?;
//! let zn = aimass::ops::l2_normalize(&z, 1, 1e-12)?;
//! let sim = aimass::ops::cosine_similarity_matrix(&zn, &zn)?;
//! assert!((sim.to_vec2::<f32>()?[0][1] - 0.6).abs() < 1e-6);
//! # Ok::<(), aimass::Error>(())
//! ```
//!
//! ## Modules
//!
//! | module | what it holds |
//! |---|---|
//! | [`error`] | [`Error`] and [`Result`] |
//! | [`device`] | device selection (`AIMASS_DEVICE`) and the seeded RNG |
//! | [`autograd`] | gradients as values (named, accumulated) and second-order differentiation |
//! | [`ops`] | differentiable tensor ops candle lacks or gets wrong |
//! | [`nn`] | layers and model families with train/eval modes |
//! | [`optim`] | optimizers, clipping, learning-rate schedules, EMA |
//! | [`loss`] | classification, distillation and self-supervised losses |
//! | [`data`] | datasets, readers, loader, augmentations, episodes |
//! | [`train`] | the fit loop, callbacks, checkpoints, evaluation, the supervised trainer |
//! | [`ssl`] | self-supervised pretraining (SimCLR, BYOL, SimSiam, MoCo v2, Barlow Twins, VICReg) and few-label probes |
//! | [`distributed`] | data-parallel training: communicators (MPI, NCCL, threads), gradient averaging, local SGD, SyncBN |
//! | [`distill`] | teacher-student distillation: the `Distiller`, loss recipes with feature terms, cached teachers, transfer sets |
//! | [`meta`] | meta-learning: MAML (second and first order), ANIL, Meta-SGD, Reptile, ProtoNets; task families |
//!
//! Cargo features `cuda`, `cudnn`, `metal`, `mkl`, `accelerate` and `nccl`
//! forward to candle's; `nccl` and `mpi` add the communicators of
//! [`distributed`]. The CPU is the default and needs no system library.
#![deny(missing_docs)]

pub use candle_core as candle;
pub use candle_nn;

mod atomic_file;
pub mod autograd;
mod config;
pub mod data;
pub mod device;
pub mod distill;
pub mod distributed;
pub mod error;
#[cfg(test)]
mod gpu_path_tests;
mod host;
pub mod loss;
pub mod meta;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod ssl;
pub mod train;

pub use error::{Error, Result};

/// The names most programs need, in one `use aimass::prelude::*;`.
pub mod prelude {
    pub use crate::data::{DataLoader, DataLoaderConfig, Dataset, InMemoryDataset};
    pub use crate::device::{best_device, select_device, DeviceRequest};
    pub use crate::error::{Context, Error, Result};
    pub use crate::nn::{FeatureExtractor, Frozen};
    pub use crate::optim::{Optimizer, Schedule};
    pub use crate::train::{Fit, FitConfig, TrainStep};
    pub use candle_core::{DType, Device, Module, ModuleT, Tensor, Var, D};
    pub use candle_nn::{VarBuilder, VarMap};
}

/// The Rust programs of `docs/training.md` compile (run by `cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../docs/training.md")]
struct TrainingGuide;

/// The three trainers written by hand in `docs/own-trainer.md` (SimCLR,
/// knowledge distillation, first-order MAML) run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/own-trainer.md")]
struct OwnTrainerGuide;

/// The Rust programs of `docs/distributed.md` compile (run by `cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../docs/distributed.md")]
struct DistributedGuide;
