//! Batched image augmentations with independent random parameters per
//! sample, for 1- and 3-channel images.
//!
//! A [`Transform`] changes one [`Image`] (`f32`, `C×H×W`, values in `[0, 1]`
//! until [`Normalize`]) using a random stream it is given.
//! [`ImageBatch::augment`] runs a transform over a batch in parallel, each
//! image with its own stream derived from a seed and a key (the dataset
//! index in the [`DataLoader`](crate::data::DataLoader)), so the same seed
//! gives the same pixels whatever the number of threads. [`Compose`] chains
//! transforms; [`MultiView`] makes several views per image; [`presets`]
//! holds SimCLR, BYOL and the reference pipelines.
//!
//! Every transform has an application probability `p` and follows
//! torchvision's definition of the same name (see each type).
//!
//! ```
//! use aimass::data::augment::{presets, ImageBatch};
//!
//! // 4 gray 28×28 images, two SimCLR views of each.
//! let batch = ImageBatch::new(vec![0.5; 4 * 28 * 28], (4, 1, 28, 28))?;
//! let views = presets::simclr_views(&presets::PresetConfig::default())?.apply(&batch, 42, None)?;
//! assert_eq!(views.len(), 2);
//! assert_eq!(views[0].shape(), (4, 1, 28, 28));
//! // Same seed, same pixels.
//! let again = presets::simclr_views(&Default::default())?.apply(&batch, 42, None)?;
//! assert_eq!(views, again);
//! # Ok::<(), aimass::Error>(())
//! ```

mod blur;
mod color;
mod compose;
mod crop;
mod flip;
mod image;
mod multiview;
mod normalize;
pub mod presets;

pub use blur::{blur_with_kernel, gaussian_kernel1d, GaussianBlur, GaussianBlurConfig};
pub use color::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, ColorJitter,
    ColorJitterConfig, RandomGrayscale, Solarize,
};
pub use compose::Compose;
pub use crop::{
    resized_crop, CropBox, CropMode, RandomCrop, RandomCropConfig, RandomResizedCrop,
    RandomResizedCropConfig,
};
pub use flip::HorizontalFlip;
pub use image::{derive_seed, Image, ImageBatch, Transform};
pub use multiview::MultiView;
pub use normalize::Normalize;
