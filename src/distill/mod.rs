//! Teacher-student distillation: shrink a trained model into one that is
//! fast enough to ship, with mostly unlabelled data.
//!
//! The idea (Hinton et al. 2015): a trained teacher's class probabilities,
//! softened by a temperature `T`, say more about an image than its label
//! does ("this 3 looks a bit like an 8"). A small student trained to match
//! them learns much of what the teacher knows, and needs labels only for a
//! small part of the data: every image, labelled or not, carries the
//! teacher's soft targets. Feature terms (FitNets' hints, attention
//! transfer, relational KD) also match intermediate outputs, through small
//! trainable adapters where widths differ.
//!
//! - [`Distiller`]: a frozen teacher ([`FrozenModel`](crate::nn::FrozenModel)
//!   in eval mode: never in an optimizer, its weights and BatchNorm
//!   statistics unchanged), a student ([`Model`](crate::nn::Model)), a
//!   [`DistillLoss`], an optimizer and a schedule. [`Distiller::step`]
//!   returns each loss term's value; it implements
//!   [`TrainStep`](crate::train::TrainStep), so [`Fit`](crate::train::Fit)
//!   runs it with checkpoints and exact resume.
//! - [`DistillLoss`] / [`DistillLossConfig`]: Hinton KD (`α·T²·KL`, α weights
//!   the soft term) or DKD, the hard-label cross-entropy on the **labelled
//!   samples of the batch only**, and [`FeatureTerm`]s between named stages
//!   ([`FeatureExtractor`](crate::nn::FeatureExtractor)) through adapters
//!   ([`AdapterKind`]: 1×1 convolution or linear), each weighted.
//! - [`TransferSet`]: a dataset where only some samples carry labels (the
//!   others read as [`UNLABELLED`]).
//! - [`TeacherMode::Cached`]: the teacher's outputs computed once per
//!   sample, over a loader without augmentation or batch by batch; the same
//!   result as running it online on the same images, without its cost at
//!   every step.
//!
//! `docs/distillation.md` is the guide: the α/T convention and how to
//! convert from other libraries', feature matching, cached mode, transfer
//! sets, and teachers trained in PyTorch. `examples/distill.rs` distils a
//! ResNet into MLPs with 10, 50 or all labels per class.
//!
//! ```
//! use aimass::prelude::*;
//! use aimass::data::{DataLoader, DataLoaderConfig, InMemoryDataset};
//! use aimass::distill::*;
//! use aimass::nn::{init::seeded_var_builder, ForwardMode, Mlp, MlpConfig, Model};
//! use aimass::optim::{Adam, AdamConfig, ConstantLr};
//!
//! let dev = Device::Cpu;
//! // 64 4-pixel images; the label is the brightest pixel. 2 labels per class.
//! let (mut pixels, mut labels) = (Vec::new(), Vec::new());
//! for i in 0..64u32 {
//!     pixels.extend((0..4).map(|p| if p == i % 4 { 250u8 } else { 10 }));
//!     labels.push(i % 4);
//! }
//! let data = InMemoryDataset::new(pixels, labels, (1, 2, 2))?;
//! let set = TransferSet::new(data, TransferSetConfig::default().with_labels_per_class(2))?;
//! let mut loader = DataLoader::new(set, DataLoaderConfig::default().with_batch_size(16), &dev)?;
//!
//! // A teacher (here untrained; load yours with `FrozenModel::load`).
//! let tvm = VarMap::new();
//! let teacher = Mlp::new(MlpConfig::new([4, 32, 4]), seeded_var_builder(&tvm, 1, DType::F32, &dev))?;
//! let teacher = Model::new(teacher, tvm).freeze(ForwardMode::Eval);
//!
//! // The student, then the recipe (adapters in the student's VarMap), then the optimizer.
//! let vm = VarMap::new();
//! let vb = seeded_var_builder(&vm, 0, DType::F32, &dev);
//! let student = Model::new(Mlp::new(MlpConfig::new([4, 8, 4]), vb.clone())?, vm.clone());
//! let recipe = DistillLossConfig::default() // KD, T = 4, α = 0.9, CE on labelled samples
//!     .with_features(vec![FeatureTerm::hint("hidden1", "hidden1")]); // 8 -> 32 linear adapter
//! let sample = loader.batch_at(0, 0)?.images()?.clone();
//! let loss = DistillLoss::new(&teacher, &student, &sample, recipe, vb.pp("adapters"))?;
//! let opt = Adam::from_varmap(&vm, AdamConfig::default().with_lr(1e-2))?;
//! let mut distiller = Distiller::new(teacher, student, loss, opt, ConstantLr::new(1e-2)?,
//!                                    DistillerConfig::default())?;
//!
//! for batch in loader.epoch() {
//!     let out = distiller.step(&batch?)?;
//!     assert!(out.term("kd").is_some() && out.term("hint.hidden1.hidden1").is_some());
//! }
//! assert_eq!(distiller.steps(), 4);
//! # Ok::<(), aimass::Error>(())
//! ```

mod adapter;
mod cache;
mod distiller;
mod feature;
mod recipe;
mod transfer;

pub use adapter::AdapterKind;
pub use cache::TeacherCache;
pub use distiller::{DistillOutput, Distiller, DistillerConfig, TeacherMode};
pub use feature::{FeatureLoss, FeatureTerm};
pub use recipe::{DistillLoss, DistillLossConfig, DistillTerms, DistillValues, LogitTerm};
pub use transfer::{TransferSet, TransferSetConfig, UNLABELLED};
