//! Colour transforms: jitter (brightness, contrast, saturation, hue), random
//! grayscale and solarize, following torchvision's functional definitions.

use rand::Rng;

use super::image::{check_prob, coin, uniform, Image, Transform};
use crate::config::config;
use crate::device::SeededRng;
use crate::{Error, Result};

/// ITU-R 601 luma weights used by torchvision's `rgb_to_grayscale`.
const LUMA: [f32; 3] = [0.2989, 0.587, 0.114];

config! {
    /// Options of [`ColorJitter`]; strengths as torchvision's `ColorJitter`.
    pub struct ColorJitterConfig {
        /// Brightness factor drawn from `[max(0, 1 - b), 1 + b]`. Default 0.4.
        brightness: f32 = 0.4,
        /// Contrast factor drawn from `[max(0, 1 - c), 1 + c]`. Default 0.4.
        contrast: f32 = 0.4,
        /// Saturation factor drawn from `[max(0, 1 - s), 1 + s]` (3 channels only). Default 0.4.
        saturation: f32 = 0.4,
        /// Hue shift drawn from `[-h, h]`, `h <= 0.5` (3 channels only). Default 0.1.
        /// (Defaults: SimCLR's CIFAR strength 0.5, i.e. `(0.4, 0.4, 0.4, 0.1)`.)
        hue: f32 = 0.1,
        /// Probability of jittering (SimCLR's `RandomApply`). Default 0.8.
        p: f32 = 0.8,
        /// Apply the four adjustments in a random order per image (torchvision);
        /// `false` keeps brightness, contrast, saturation, hue. Default `true`.
        random_order: bool = true,
    }
}

impl ColorJitterConfig {
    /// SimCLR's jitter of strength `s`: `(0.8s, 0.8s, 0.8s, 0.2s)`, p 0.8.
    pub fn simclr(strength: f32) -> Self {
        Self {
            brightness: 0.8 * strength,
            contrast: 0.8 * strength,
            saturation: 0.8 * strength,
            hue: 0.2 * strength,
            ..Self::default()
        }
    }
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        for (f, v) in [
            ("ColorJitterConfig::brightness", self.brightness),
            ("ColorJitterConfig::contrast", self.contrast),
            ("ColorJitterConfig::saturation", self.saturation),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(f, v, "must be finite and >= 0"));
            }
        }
        if !(0.0..=0.5).contains(&self.hue) {
            return Err(Error::config(
                "ColorJitterConfig::hue",
                self.hue,
                "must be in [0, 0.5]",
            ));
        }
        check_prob("ColorJitterConfig::p", self.p)?;
        Ok(())
    }
}

/// Random brightness, contrast, saturation and hue changes (torchvision's
/// `ColorJitter` inside a `RandomApply` with probability `p`). On one-channel
/// images saturation and hue are skipped (they are identities on gray).
#[derive(Debug, Clone)]
pub struct ColorJitter {
    cfg: ColorJitterConfig,
}

impl ColorJitter {
    /// Validates the configuration.
    pub fn new(cfg: ColorJitterConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }
}

/// `v` clamped to `[0, 1]` (written so that it compiles to `maxps`/`minps`).
#[inline(always)]
fn unit(v: f32) -> f32 {
    let v = if v > 0.0 { v } else { 0.0 };
    if v < 1.0 {
        v
    } else {
        1.0
    }
}

/// Sum with 8 independent accumulators (vectorises; a single running sum
/// is a serial dependency chain).
fn sum8(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Multiplies by `factor` and clamps to `[0, 1]` (torchvision `adjust_brightness`).
pub fn adjust_brightness(image: &mut Image, factor: f32) {
    for v in &mut image.data {
        *v = unit(*v * factor);
    }
}

/// Blends with the mean gray level of the image (torchvision `adjust_contrast`).
pub fn adjust_contrast(image: &mut Image, factor: f32) {
    let plane = image.plane();
    let mean = if image.channels == 3 {
        let (r, rest) = image.data.split_at(plane);
        let (g, b) = rest.split_at(plane);
        (LUMA[0] * sum8(r) + LUMA[1] * sum8(g) + LUMA[2] * sum8(&b[..plane])) / plane as f32
    } else {
        sum8(&image.data) / image.data.len() as f32
    };
    let off = (1.0 - factor) * mean;
    for v in &mut image.data {
        *v = unit(factor * *v + off);
    }
}

/// Blends each pixel with its gray level (torchvision `adjust_saturation`; 3 channels only).
pub fn adjust_saturation(image: &mut Image, factor: f32) {
    if image.channels != 3 {
        return;
    }
    let plane = image.plane();
    let (r, rest) = image.data.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let gray = (1.0 - factor) * (LUMA[0] * *r + LUMA[1] * *g + LUMA[2] * *b);
        *r = unit(factor * *r + gray);
        *g = unit(factor * *g + gray);
        *b = unit(factor * *b + gray);
    }
}

/// Rotates the hue by `shift` turns through HSV (torchvision `adjust_hue`; 3 channels only).
pub fn adjust_hue(image: &mut Image, shift: f32) {
    if image.channels != 3 {
        return;
    }
    let plane = image.plane();
    let (r, rest) = image.data.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let (h, s, v) = rgb_to_hsv(*r, *g, *b);
        let h = (h + shift).rem_euclid(1.0);
        let (nr, ng, nb) = hsv_to_rgb(h, s, v);
        (*r, *g, *b) = (nr, ng, nb);
    }
}

fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let eqc = maxc == minc;
    let cr = maxc - minc;
    let s = cr / if eqc { 1.0 } else { maxc };
    let d = if eqc { 1.0 } else { cr };
    let (rc, gc, bc) = ((maxc - r) / d, (maxc - g) / d, (maxc - b) / d);
    let h = if maxc == r {
        bc - gc
    } else if maxc == g {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    ((h / 6.0 + 1.0).rem_euclid(1.0), s, maxc)
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let i = (i as i32).rem_euclid(6);
    let p = unit(v * (1.0 - s));
    let q = unit(v * (1.0 - s * f));
    let t = unit(v * (1.0 - s * (1.0 - f)));
    match i {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

impl Transform for ColorJitter {
    fn apply(&self, image: &mut Image, rng: &mut SeededRng) -> Result<()> {
        if !coin(rng, self.cfg.p) {
            return Ok(());
        }
        let mut order = [0usize, 1, 2, 3];
        if self.cfg.random_order {
            for i in (1..4).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
        }
        let c = &self.cfg;
        let factor = |rng: &mut SeededRng, s: f32| uniform(rng, (1.0 - s).max(0.0), 1.0 + s);
        // Factors are drawn in a fixed order (as torchvision), used in `order`.
        let fb = factor(rng, c.brightness);
        let fc = factor(rng, c.contrast);
        let fs = factor(rng, c.saturation);
        let fh = uniform(rng, -c.hue, c.hue);
        for op in order {
            match op {
                0 if c.brightness > 0.0 => adjust_brightness(image, fb),
                1 if c.contrast > 0.0 => adjust_contrast(image, fc),
                2 if c.saturation > 0.0 => adjust_saturation(image, fs),
                3 if c.hue > 0.0 => adjust_hue(image, fh),
                _ => {}
            }
        }
        Ok(())
    }
}

/// torchvision's `RandomGrayscale(p)`: with probability `p` a 3-channel
/// image becomes its luma repeated on the 3 channels; one-channel images
/// are unchanged.
#[derive(Debug, Clone)]
pub struct RandomGrayscale {
    p: f32,
}

impl RandomGrayscale {
    /// Grayscale with probability `p` (SimCLR 0.2; torchvision default 0.1).
    pub fn new(p: f32) -> Result<Self> {
        check_prob("RandomGrayscale::p", p)?;
        Ok(Self { p })
    }
}

impl Transform for RandomGrayscale {
    fn apply(&self, image: &mut Image, rng: &mut SeededRng) -> Result<()> {
        if coin(rng, self.p) && image.channels == 3 {
            let plane = image.plane();
            for i in 0..plane {
                let d = &mut image.data;
                let y = LUMA[0] * d[i] + LUMA[1] * d[plane + i] + LUMA[2] * d[2 * plane + i];
                (d[i], d[plane + i], d[2 * plane + i]) = (y, y, y);
            }
        }
        Ok(())
    }
}

/// torchvision's `RandomSolarize(threshold, p)`: values `>= threshold`
/// become `1 - value`.
#[derive(Debug, Clone)]
pub struct Solarize {
    threshold: f32,
    p: f32,
}

impl Solarize {
    /// Solarize at `threshold` (BYOL: 0.5) with probability `p` (BYOL view 2: 0.2).
    pub fn new(threshold: f32, p: f32) -> Result<Self> {
        if !threshold.is_finite() {
            return Err(Error::config(
                "Solarize::threshold",
                threshold,
                "must be finite",
            ));
        }
        check_prob("Solarize::p", p)?;
        Ok(Self { threshold, p })
    }
}

impl Transform for Solarize {
    fn apply(&self, image: &mut Image, rng: &mut SeededRng) -> Result<()> {
        if coin(rng, self.p) {
            for v in &mut image.data {
                if *v >= self.threshold {
                    *v = 1.0 - *v;
                }
            }
        }
        Ok(())
    }
}
