//! Ready-made pipelines: SimCLR, BYOL, and the exact pipelines of the
//! PyTorch reference figures (docs/benchmarks.md, "Protocols").
//!
//! # Scaling to 28×28
//!
//! The papers' values assume 224×224 ImageNet crops. Relative quantities
//! (crop area fraction, aspect ratio, flip and colour probabilities and
//! strengths) carry over unchanged. What is in pixels is scaled:
//!
//! - output size: 224 → [`PresetConfig::size`] (28 for Fashion-MNIST);
//! - blur kernel: 10% of the side (23 px at 224) → `odd(0.1 × size)`, at
//!   least 3 (3 at 28 px); σ stays torchvision's `(0.1, 2.0)` px, which in
//!   a 3-tap kernel ranges from almost no blur to almost a box blur;
//! - SimCLR turns blur off for small images (its CIFAR-10 recipe): below
//!   64 px [`simclr`] has no blur. BYOL's views differ precisely in blur and
//!   solarize, so [`byol_view1`]/[`byol_view2`] keep the 3-tap blur.
//!
//! Saturation, hue and grayscale are identities on one-channel images; they
//! stay in the pipelines so that the same preset works on RGB data.

use super::{
    ColorJitter, ColorJitterConfig, Compose, CropMode, GaussianBlur, GaussianBlurConfig,
    HorizontalFlip, MultiView, Normalize, RandomCrop, RandomCropConfig, RandomGrayscale,
    RandomResizedCrop, RandomResizedCropConfig, Solarize,
};
use crate::config::config;
use crate::data::{FASHION_MNIST_MEAN, FASHION_MNIST_STD};
use crate::{Error, Result};

config! {
    /// Size and normalisation shared by the presets.
    pub struct PresetConfig {
        /// Output side in pixels. Default 28 (Fashion-MNIST).
        size: usize = 28,
        /// Per-channel (or single) mean for the final `Normalize`. Default Fashion-MNIST's 0.2860.
        mean: Vec<f32> = vec![FASHION_MNIST_MEAN],
        /// Per-channel (or single) std for the final `Normalize`. Default Fashion-MNIST's 0.3530.
        std: Vec<f32> = vec![FASHION_MNIST_STD],
    }
}

impl PresetConfig {
    fn blur_kernel(&self) -> usize {
        let k = (0.1 * self.size as f32).round() as usize;
        (k | 1).max(3)
    }

    fn validate(&self) -> Result<()> {
        if self.size == 0 {
            return Err(Error::config("PresetConfig::size", 0, "must be > 0"));
        }
        Ok(())
    }
}

fn rrc(cfg: &PresetConfig, scale: (f32, f32), mode: CropMode) -> Result<RandomResizedCrop> {
    RandomResizedCrop::new(
        RandomResizedCropConfig::default()
            .with_size((cfg.size, cfg.size))
            .with_scale(scale)
            .with_mode(mode),
    )
}

/// SimCLR (Chen et al. 2020): random resized crop (scale 0.08–1, ratio
/// 3/4–4/3), flip 0.5, colour jitter (0.8, 0.8, 0.8, 0.2) with p 0.8 in
/// random order, grayscale p 0.2, Gaussian blur p 0.5 only from 64 px up
/// (off for small images, as SimCLR's CIFAR-10 recipe), normalise.
pub fn simclr(cfg: &PresetConfig) -> Result<Compose> {
    cfg.validate()?;
    let mut c = Compose::new()
        .then(rrc(cfg, (0.08, 1.0), CropMode::Torchvision)?)
        .then(HorizontalFlip::new(0.5)?)
        .then(ColorJitter::new(ColorJitterConfig::simclr(1.0))?)
        .then(RandomGrayscale::new(0.2)?);
    if cfg.size >= 64 {
        c = c.then(GaussianBlur::new(
            GaussianBlurConfig::default()
                .with_kernel_size(cfg.blur_kernel())
                .with_p(0.5),
        )?);
    }
    Ok(c.then(Normalize::new(&cfg.mean, &cfg.std)?))
}

/// Two views of [`simclr`].
pub fn simclr_views(cfg: &PresetConfig) -> Result<MultiView> {
    MultiView::repeat(simclr(cfg)?, 2)
}

fn byol_view(cfg: &PresetConfig, blur_p: f32, solarize_p: f32) -> Result<Compose> {
    cfg.validate()?;
    Ok(Compose::new()
        .then(rrc(cfg, (0.08, 1.0), CropMode::Torchvision)?)
        .then(HorizontalFlip::new(0.5)?)
        .then(ColorJitter::new(
            ColorJitterConfig::default()
                .with_brightness(0.4)
                .with_contrast(0.4)
                .with_saturation(0.2)
                .with_hue(0.1),
        )?)
        .then(RandomGrayscale::new(0.2)?)
        .then(GaussianBlur::new(
            GaussianBlurConfig::default()
                .with_kernel_size(cfg.blur_kernel())
                .with_p(blur_p),
        )?)
        .then(Solarize::new(0.5, solarize_p)?)
        .then(Normalize::new(&cfg.mean, &cfg.std)?))
}

/// BYOL view 1 (Grill et al. 2020, table 6): crop 0.08–1, flip, jitter
/// (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, blur p 1.0, no solarize.
pub fn byol_view1(cfg: &PresetConfig) -> Result<Compose> {
    byol_view(cfg, 1.0, 0.0)
}

/// BYOL view 2: as view 1 but blur p 0.1 and solarize (threshold 0.5) p 0.2.
pub fn byol_view2(cfg: &PresetConfig) -> Result<Compose> {
    byol_view(cfg, 0.1, 0.2)
}

/// BYOL's two views.
pub fn byol_views(cfg: &PresetConfig) -> Result<MultiView> {
    MultiView::new(vec![
        std::sync::Arc::new(byol_view1(cfg)?),
        std::sync::Arc::new(byol_view2(cfg)?),
    ])
}

/// The view of the PyTorch reference figures (the self-supervised protocol
/// of docs/benchmarks.md):
/// continuous random resized crop to 28×28 (scale 0.3–1, ratio 3/4–4/3,
/// sides clamped to the image, bilinear with zeros outside), horizontal flip
/// 0.5, then with p 0.8 brightness `U(0.6, 1.4)` and contrast `U(0.6, 1.4)`
/// in that fixed order (each clamped to `[0, 1]`, contrast around the
/// image mean), then Fashion-MNIST normalisation. The SimCLR and BYOL
/// reference runs use it for both views.
pub fn fashion_mnist_reference() -> Result<Compose> {
    fashion_mnist_view(0.4)
}

/// Two views of [`fashion_mnist_reference`] (the SimCLR/BYOL reference runs).
pub fn fashion_mnist_reference_views() -> Result<MultiView> {
    MultiView::repeat(fashion_mnist_reference()?, 2)
}

/// The view of `examples/simclr.rs`' default recipe: the
/// [`fashion_mnist_reference`] view with SimCLR's colour strength,
/// brightness `U(0.2, 1.8)` and contrast `U(0.2, 1.8)` (what
/// `ColorJitterConfig::simclr(1.0)` does to one channel), p 0.8, in the
/// same fixed order. On the embedded split it lifts every probe of the
/// example by 1–2.5 points over the reference view (docs/benchmarks.md).
pub fn fashion_mnist_simclr() -> Result<Compose> {
    fashion_mnist_view(0.8)
}

/// Two views of [`fashion_mnist_simclr`] (the SimCLR example's default).
pub fn fashion_mnist_simclr_views() -> Result<MultiView> {
    MultiView::repeat(fashion_mnist_simclr()?, 2)
}

/// The reference view's pipeline with brightness and contrast strength
/// `jitter`.
fn fashion_mnist_view(jitter: f32) -> Result<Compose> {
    let cfg = PresetConfig::default();
    Ok(Compose::new()
        .then(rrc(&cfg, (0.3, 1.0), CropMode::Continuous)?)
        .then(HorizontalFlip::new(0.5)?)
        .then(ColorJitter::new(
            ColorJitterConfig::default()
                .with_brightness(jitter)
                .with_contrast(jitter)
                .with_saturation(0.0)
                .with_hue(0.0)
                .with_p(0.8)
                .with_random_order(false),
        )?)
        .then(Normalize::new(&cfg.mean, &cfg.std)?))
}

/// The supervised reference recipe (docs/benchmarks.md, "Protocols"):
/// zero-pad 2 px, random 28×28 crop, horizontal flip 0.5, normalise.
pub fn fashion_mnist_supervised_reference() -> Result<Compose> {
    let cfg = PresetConfig::default();
    Ok(Compose::new()
        .then(RandomCrop::new(RandomCropConfig::default())?)
        .then(HorizontalFlip::new(0.5)?)
        .then(Normalize::new(&cfg.mean, &cfg.std)?))
}
