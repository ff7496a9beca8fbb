//! Data: datasets, readers, a seeded parallel loader, batched augmentations
//! and a few-shot episode sampler.
//!
//! - [`Dataset`] is what the loader and the episode sampler read; the
//!   readers return an [`InMemoryDataset`] (`u8` images `N×C×H×W`, `u32`
//!   labels): [`idx`] (MNIST, Fashion-MNIST, EMNIST; gzip or raw),
//!   [`cifar`] (CIFAR-10/100 binary), [`ImageFolder`] (PNG/JPEG, one folder per class).
//! - [`fashion_mnist`] gives the data every example uses: the full
//!   Fashion-MNIST when installed, else the 10,000 embedded images (8,000
//!   train / 2,000 held out), and says which ([`DataSource`]).
//! - [`DataLoader`] batches a dataset with a seeded per-epoch shuffle,
//!   prepares batches on a background thread and augments them in parallel;
//!   the same seed gives the same batches and pixels on any number of threads;
//!   with a [`Shard`] it gives one rank of a data-parallel run its part of
//!   every global batch.
//! - [`augment`] holds the transforms, [`augment::Compose`],
//!   [`augment::MultiView`] and the SimCLR/BYOL/reference [`augment::presets`].
//! - [`EpisodeSampler`] draws N-way K-shot tasks; [`split_classes`] makes
//!   disjoint meta-train/meta-test class sets.
//!
//! ```
//! use aimass::candle::Device;
//! use aimass::data::{augment::presets, DataLoader, DataLoaderConfig, InMemoryDataset};
//!
//! // 16 random 28×28 gray images; with real data use `aimass::data::fashion_mnist(None)?.train`.
//! let pixels: Vec<u8> = (0..16 * 784).map(|i| (i * 37 % 256) as u8).collect();
//! let ds = InMemoryDataset::new(pixels, (0..16).map(|i| i % 10).collect(), (1, 28, 28))?;
//! let cfg = DataLoaderConfig::default().with_batch_size(8).with_seed(1);
//! let mut loader = DataLoader::new(ds, cfg, &Device::Cpu)?
//!     .with_views(presets::simclr_views(&presets::PresetConfig::default())?);
//! for batch in loader.epoch() {
//!     let batch = batch?;
//!     assert_eq!(batch.views.len(), 2);
//!     assert_eq!(batch.views[0].dims(), &[8, 1, 28, 28]);
//! }
//! # Ok::<(), aimass::Error>(())
//! ```

pub mod augment;
pub mod cifar;
mod dataset;
mod episodes;
mod fashion_mnist;
pub mod idx;
mod image_folder;
mod loader;
mod shard;

pub use cifar::{parse_cifar, read_cifar, CifarKind};
pub use dataset::{Dataset, InMemoryDataset, Sample};
pub use episodes::{split_classes, Episode, EpisodeConfig, EpisodeSampler};
pub use fashion_mnist::{
    embedded_fashion_mnist, fashion_mnist, DataSource, FashionMnist, EMBEDDED_TRAIN_LEN,
    FASHION_MNIST_CLASSES, FASHION_MNIST_EMBEDDED_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
    FASHION_MNIST_SYSTEM_DIR,
};
pub use idx::{parse_idx, read_idx, read_idx_dataset, IdxArray};
pub use image_folder::{ImageFolder, ImageFolderConfig};
pub use loader::{Batch, DataLoader, DataLoaderConfig, EpochIter, LoaderPosition};
pub use shard::Shard;
