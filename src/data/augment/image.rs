//! [`Image`], [`ImageBatch`], the [`Transform`] trait and batched application.

use std::fmt;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::device::{rng_stream, SeededRng};
use crate::error::Context;
use crate::{Error, Result};

/// One image as `f32` values, channel-major (`C×H×W`), normally in `[0, 1]`
/// before [`Normalize`](super::Normalize). Built with [`Image::new`], which
/// checks that the values match the shape; a transform that changes the
/// shape replaces the image (`*image = Image::new(...)?`).
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub(crate) channels: usize,
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) data: Vec<f32>,
}

impl Image {
    /// An image from its values; errors when the length does not match the shape.
    pub fn new(data: Vec<f32>, channels: usize, height: usize, width: usize) -> Result<Self> {
        if channels == 0 || height == 0 || width == 0 || channels * height * width != data.len() {
            return Err(Error::shape(
                "Image::new",
                format!("{channels}×{height}×{width} (all > 0) values"),
                data.len(),
            ));
        }
        Ok(Self {
            channels,
            height,
            width,
            data,
        })
    }

    /// Number of channels (1 or 3 for the colour transforms).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The `channels × height × width` values.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The values, mutable (the shape cannot change; build a new [`Image`] for that).
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// The values, consuming the image.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// Pixels per channel, `height × width`.
    pub fn plane(&self) -> usize {
        self.height * self.width
    }
}

/// A random image transform with its own probability of being applied.
///
/// `apply` draws every random number it needs from `rng`, which the caller
/// derives from (seed, epoch, view, sample index): the same seed gives the
/// same pixels on any number of threads. Implement it to add your own
/// augmentation; [`Compose`](super::Compose) chains transforms.
pub trait Transform: Send + Sync + fmt::Debug {
    /// Transforms `image` in place (its shape may change, e.g. a crop).
    fn apply(&self, image: &mut Image, rng: &mut SeededRng) -> Result<()>;
}

impl<T: Transform + ?Sized> Transform for std::sync::Arc<T> {
    fn apply(&self, image: &mut Image, rng: &mut SeededRng) -> Result<()> {
        (**self).apply(image, rng)
    }
}

impl<T: Transform + ?Sized> Transform for Box<T> {
    fn apply(&self, image: &mut Image, rng: &mut SeededRng) -> Result<()> {
        (**self).apply(image, rng)
    }
}

/// A batch of images of one shape on the host, `N×C×H×W` `f32` values.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageBatch {
    shape: (usize, usize, usize, usize),
    data: Vec<f32>,
}

impl ImageBatch {
    /// A batch from its values and shape `(N, C, H, W)`.
    pub fn new(data: Vec<f32>, shape: (usize, usize, usize, usize)) -> Result<Self> {
        let (n, c, h, w) = shape;
        let len = n
            .checked_mul(c)
            .and_then(|x| x.checked_mul(h))
            .and_then(|x| x.checked_mul(w));
        if c == 0 || h == 0 || w == 0 || len != Some(data.len()) {
            return Err(Error::shape(
                "ImageBatch::new",
                format!("{n}×{c}×{h}×{w} (C, H, W > 0) values"),
                data.len(),
            ));
        }
        Ok(Self { shape, data })
    }

    /// A batch from bytes (`N×C×H×W`, `0..=255`), scaled to `[0, 1]` by `/255`.
    pub fn from_u8(pixels: &[u8], shape: (usize, usize, usize, usize)) -> Result<Self> {
        Self::new(
            pixels
                .iter()
                .map(|&p| f32::from(p) * (1.0 / 255.0))
                .collect(),
            shape,
        )
    }

    /// A batch from a 4-D tensor (any dtype and device; copied to the host as `f32`).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (n, c, h, w) = t
            .dims4()
            .context("ImageBatch::from_tensor expects N×C×H×W")?;
        // host-ok: the augmentations run on the host; this is their input.
        let data = t
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .context("ImageBatch::from_tensor")?;
        Self::new(data, (n, c, h, w))
    }

    /// The batch as an `f32` tensor `N×C×H×W` on `device`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let (n, c, h, w) = self.shape;
        // host-ok: a batch of images goes to the device once, in f32.
        Tensor::from_slice(&self.data, (n, c, h, w), device).context("ImageBatch::to_tensor")
    }

    /// `(N, C, H, W)`.
    pub fn shape(&self) -> (usize, usize, usize, usize) {
        self.shape
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.shape.0
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.shape.0 == 0
    }

    /// All values, `N×C×H×W`.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The values of image `i`.
    pub fn image_data(&self, i: usize) -> Result<&[f32]> {
        let (n, c, h, w) = self.shape;
        if i >= n {
            return Err(Error::invalid(
                "ImageBatch::image_data",
                format!("index {i} out of range for {n} images"),
            ));
        }
        let per = c * h * w;
        Ok(&self.data[i * per..(i + 1) * per])
    }

    /// A copy of image `i`.
    pub fn image(&self, i: usize) -> Result<Image> {
        let (_, c, h, w) = self.shape;
        Image::new(self.image_data(i)?.to_vec(), c, h, w)
    }

    /// Stacks images of one shape into a batch.
    pub fn from_images(images: Vec<Image>) -> Result<Self> {
        let Some(first) = images.first() else {
            return Err(Error::invalid("ImageBatch::from_images", "no images given"));
        };
        let (c, h, w) = (first.channels, first.height, first.width);
        let mut data = Vec::with_capacity(images.len() * c * h * w);
        for im in &images {
            if (im.channels, im.height, im.width) != (c, h, w) {
                return Err(Error::shape(
                    "ImageBatch::from_images",
                    format!("every image {c}×{h}×{w} (give crops an output size)"),
                    (im.channels, im.height, im.width),
                ));
            }
            data.extend_from_slice(&im.data);
        }
        Self::new(data, (images.len(), c, h, w))
    }

    /// Applies `transform` to every image with its own random stream, in
    /// parallel (rayon).
    ///
    /// Image `i` draws from `rng_stream(seed, keys[i])` (or `i` when `keys`
    /// is `None`; the [`DataLoader`](crate::data::DataLoader) passes dataset
    /// indices), so the result does not depend on the number of threads.
    pub fn augment(
        &self,
        transform: &dyn Transform,
        seed: u64,
        keys: Option<&[u64]>,
    ) -> Result<Self> {
        let n = self.len();
        if let Some(k) = keys {
            if k.len() != n {
                return Err(Error::shape(
                    "ImageBatch::augment",
                    format!("{n} keys, one per image"),
                    k.len(),
                ));
            }
        }
        let images: Vec<Image> = (0..n)
            .into_par_iter()
            .map(|i| {
                let mut img = self.image(i)?;
                let key = keys.map_or(i as u64, |k| k[i]);
                let mut rng = rng_stream(seed, key);
                transform.apply(&mut img, &mut rng)?;
                Ok(img)
            })
            .collect::<Result<_>>()?;
        if images.is_empty() {
            return Ok(self.clone());
        }
        Self::from_images(images)
    }
}

/// A seed derived from `seed` and a path of integers (splitmix64 mixing),
/// used to give each epoch and each view its own independent randomness.
pub fn derive_seed(seed: u64, path: &[u64]) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    path.iter().fold(mix(seed), |acc, &p| mix(acc ^ mix(p)))
}

pub(crate) fn check_prob(field: &str, p: f32) -> Result<()> {
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::config(field, p, "a probability must be in [0, 1]"));
    }
    Ok(())
}

pub(crate) fn check_range(field: &str, r: (f32, f32), lo: f32, hi: f32) -> Result<()> {
    if !(r.0.is_finite() && r.1.is_finite() && lo <= r.0 && r.0 <= r.1 && r.1 <= hi) {
        return Err(Error::config(
            field,
            format!("({}, {})", r.0, r.1),
            format!("need {lo} <= min <= max <= {hi}"),
        ));
    }
    Ok(())
}

/// `true` with probability `p`; always consumes one draw.
pub(crate) fn coin(rng: &mut SeededRng, p: f32) -> bool {
    use rand::Rng;
    rng.random::<f32>() < p
}

/// Uniform in `[lo, hi)`; always consumes one draw.
pub(crate) fn uniform(rng: &mut SeededRng, lo: f32, hi: f32) -> f32 {
    use rand::Rng;
    lo + (hi - lo) * rng.random::<f32>()
}
