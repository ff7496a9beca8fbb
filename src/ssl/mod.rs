//! Self-supervised pretraining.
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
