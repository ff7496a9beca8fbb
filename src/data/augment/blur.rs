//! Random Gaussian blur.

use super::image::{check_prob, check_range, coin, uniform, Image, Transform};
use crate::config::config;
use crate::device::SeededRng;
use crate::{Error, Result};

config! {
    /// Options of [`GaussianBlur`].
    pub struct GaussianBlurConfig {
        /// Odd kernel side. Default 3: SimCLR's 10% of the image side (23 px at
        /// 224), scaled to 28 px and rounded to odd.
        kernel_size: usize = 3,
        /// Range of the standard deviation in pixels, drawn uniformly per image.
        /// Default `(0.1, 2.0)` (torchvision, SimCLR, BYOL).
        sigma: (f32, f32) = (0.1, 2.0),
        /// Probability of blurring. Default 0.5 (SimCLR).
        p: f32 = 0.5,
    }
}

impl GaussianBlurConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if self.kernel_size.is_multiple_of(2) || self.kernel_size > 1023 {
            return Err(Error::config(
                "GaussianBlurConfig::kernel_size",
                self.kernel_size,
                "must be odd and at most 1023",
            ));
        }
        check_range(
            "GaussianBlurConfig::sigma",
            self.sigma,
            f32::MIN_POSITIVE,
            1e6,
        )?;
        check_prob("GaussianBlurConfig::p", self.p)?;
        Ok(())
    }
}

/// torchvision's `GaussianBlur`: a separable Gaussian kernel
/// (`exp(-x²/2σ²)` at integer offsets, normalised), reflect padding.
#[derive(Debug, Clone)]
pub struct GaussianBlur {
    cfg: GaussianBlurConfig,
}

impl GaussianBlur {
    /// Validates the configuration.
    pub fn new(cfg: GaussianBlurConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }
}

/// The normalised 1-D Gaussian kernel of torchvision (`_get_gaussian_kernel1d`).
pub fn gaussian_kernel1d(kernel_size: usize, sigma: f32) -> Vec<f32> {
    let half = (kernel_size as f32 - 1.0) * 0.5;
    let k: Vec<f32> = (0..kernel_size)
        .map(|i| (-0.5 * ((i as f32 - half) / sigma).powi(2)).exp())
        .collect();
    let s: f32 = k.iter().sum();
    k.into_iter().map(|v| v / s).collect()
}

/// Reflect index `i` (may be out of range) into `0..n` like torch's `reflect` padding.
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m >= n as isize { period - m } else { m }) as usize
}

/// Blurs every channel with a separable kernel (rows then columns),
/// reflect padding.
pub fn blur_with_kernel(image: &mut Image, k: &[f32]) {
    let (h, w) = (image.height, image.width);
    let r = k.len() / 2;
    let mut tmp = vec![0f32; h * w];
    let mut padded = vec![0f32; w + 2 * r];
    let col_src: Vec<usize> = (0..w + 2 * r)
        .map(|i| reflect(i as isize - r as isize, w))
        .collect();
    let row_src: Vec<Vec<usize>> = (0..h)
        .map(|y| {
            (0..k.len())
                .map(|t| reflect(y as isize + t as isize - r as isize, h))
                .collect()
        })
        .collect();
    for ch in image.data.chunks_exact_mut(h * w) {
        // Horizontal pass: a reflect-padded copy of the row, then a contiguous dot product.
        for (src, dst) in ch.chunks_exact(w).zip(tmp.chunks_exact_mut(w)) {
            for (p, &i) in padded.iter_mut().zip(&col_src) {
                *p = src[i];
            }
            for (x, d) in dst.iter_mut().enumerate() {
                *d = k
                    .iter()
                    .zip(&padded[x..x + k.len()])
                    .map(|(a, b)| a * b)
                    .sum();
            }
        }
        // Vertical pass: whole rows scaled and added (vectorises).
        for (y, dst) in ch.chunks_exact_mut(w).enumerate() {
            dst.fill(0.0);
            for (kv, &ry) in k.iter().zip(&row_src[y]) {
                for (d, s) in dst.iter_mut().zip(&tmp[ry * w..(ry + 1) * w]) {
                    *d += kv * s;
                }
            }
        }
    }
}

impl Transform for GaussianBlur {
    fn apply(&self, image: &mut Image, rng: &mut SeededRng) -> Result<()> {
        if coin(rng, self.cfg.p) {
            let sigma = uniform(rng, self.cfg.sigma.0, self.cfg.sigma.1);
            blur_with_kernel(image, &gaussian_kernel1d(self.cfg.kernel_size, sigma));
        }
        Ok(())
    }
}
