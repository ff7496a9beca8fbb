//! Random resized crop (torchvision's and the reference's continuous crop)
//! and random crop with zero padding.

use rand::Rng;

use super::image::{check_prob, check_range, coin, uniform, Image, Transform};
use crate::config::config;
use crate::device::SeededRng;
use crate::{Error, Result};

/// How [`RandomResizedCrop`] picks and samples the crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum CropMode {
    /// torchvision's `RandomResizedCrop`: an integer pixel box (area
    /// fraction and log-aspect-ratio uniform, side lengths rounded, up to 10
    /// tries, else a centre crop), then a bilinear resize
    /// (`align_corners=False`, no antialiasing).
    #[default]
    Torchvision,
    /// The continuous crop of the reference figures' self-supervised views
    /// (docs/benchmarks.md, "Protocols"): side fractions
    /// `w = sqrt(s·r)`, `h = sqrt(s/r)` clamped to 1, centre uniform where the
    /// crop fits, sampled like `affine_grid` + `grid_sample` (bilinear,
    /// `align_corners=False`, zeros outside).
    Continuous,
}

/// A crop rectangle in input pixel units (may be fractional in
/// [`CropMode::Continuous`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropBox {
    /// Top edge.
    pub top: f32,
    /// Left edge.
    pub left: f32,
    /// Height.
    pub height: f32,
    /// Width.
    pub width: f32,
}

config! {
    /// Options of [`RandomResizedCrop`].
    pub struct RandomResizedCropConfig {
        /// Output `(height, width)`. Default `(28, 28)` (Fashion-MNIST; torchvision requires it).
        size: (usize, usize) = (28, 28),
        /// Range of the crop's area fraction. Default `(0.08, 1.0)` (torchvision, SimCLR).
        scale: (f32, f32) = (0.08, 1.0),
        /// Range of the aspect ratio width/height, sampled log-uniformly. Default `(3/4, 4/3)` (torchvision).
        ratio: (f32, f32) = (3.0 / 4.0, 4.0 / 3.0),
        /// How the box is drawn and sampled. Default [`CropMode::Torchvision`].
        mode: CropMode = CropMode::Torchvision,
        /// Probability of cropping; otherwise the whole image is resized. Default 1.0.
        p: f32 = 1.0,
    }
}

impl RandomResizedCropConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        let (h, w) = self.size;
        if h == 0 || w == 0 || h > 1 << 16 || w > 1 << 16 {
            return Err(Error::config(
                "RandomResizedCropConfig::size",
                format!("{h}×{w}"),
                "sides must be in 1..=65536",
            ));
        }
        check_range(
            "RandomResizedCropConfig::scale",
            self.scale,
            f32::MIN_POSITIVE,
            1.0,
        )?;
        check_range(
            "RandomResizedCropConfig::ratio",
            self.ratio,
            f32::MIN_POSITIVE,
            f32::MAX,
        )?;
        check_prob("RandomResizedCropConfig::p", self.p)?;
        Ok(())
    }
}

/// Crops a random part of the image and resizes it to a fixed size.
#[derive(Debug, Clone)]
pub struct RandomResizedCrop {
    cfg: RandomResizedCropConfig,
}

impl RandomResizedCrop {
    /// Validates the configuration.
    pub fn new(cfg: RandomResizedCropConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &RandomResizedCropConfig {
        &self.cfg
    }

    /// Draws a crop box for an input of `height × width` (exposed for tests
    /// and visualisation; [`Transform::apply`] uses exactly this draw).
    pub fn sample_box(&self, height: usize, width: usize, rng: &mut SeededRng) -> CropBox {
        let (hf, wf) = (height as f32, width as f32);
        let (lr0, lr1) = (self.cfg.ratio.0.ln(), self.cfg.ratio.1.ln());
        match self.cfg.mode {
            CropMode::Continuous => {
                let s = uniform(rng, self.cfg.scale.0, self.cfg.scale.1);
                let r = uniform(rng, lr0, lr1).exp();
                let fw = (s * r).sqrt().min(1.0);
                let fh = (s / r).sqrt().min(1.0);
                let cx = (uniform(rng, 0.0, 1.0) * 2.0 - 1.0) * (1.0 - fw);
                let cy = (uniform(rng, 0.0, 1.0) * 2.0 - 1.0) * (1.0 - fh);
                // Normalised [-1, 1] extent [c - f, c + f] -> pixels.
                CropBox {
                    top: (cy - fh + 1.0) * 0.5 * hf,
                    left: (cx - fw + 1.0) * 0.5 * wf,
                    height: fh * hf,
                    width: fw * wf,
                }
            }
            CropMode::Torchvision => {
                let area = hf * wf;
                for _ in 0..10 {
                    let target = area * uniform(rng, self.cfg.scale.0, self.cfg.scale.1);
                    let aspect = uniform(rng, lr0, lr1).exp();
                    let cw = (target * aspect).sqrt().round();
                    let ch = (target / aspect).sqrt().round();
                    if cw > 0.0 && cw <= wf && ch > 0.0 && ch <= hf {
                        let (cw, ch) = (cw as usize, ch as usize);
                        let top = rng.random_range(0..=height - ch);
                        let left = rng.random_range(0..=width - cw);
                        return CropBox {
                            top: top as f32,
                            left: left as f32,
                            height: ch as f32,
                            width: cw as f32,
                        };
                    }
                }
                let in_ratio = wf / hf;
                let (cw, ch) = if in_ratio < self.cfg.ratio.0 {
                    (wf, (wf / self.cfg.ratio.0).round())
                } else if in_ratio > self.cfg.ratio.1 {
                    ((hf * self.cfg.ratio.1).round(), hf)
                } else {
                    (wf, hf)
                };
                let top = ((hf - ch) / 2.0).floor();
                let left = ((wf - cw) / 2.0).floor();
                CropBox {
                    top,
                    left,
                    height: ch,
                    width: cw,
                }
            }
        }
    }
}

/// Bilinear sampling positions along one axis: two taps per output pixel.
pub(crate) struct Taps {
    idx: Vec<[usize; 2]>,
    wts: Vec<[f32; 2]>,
}

impl Taps {
    /// torch `interpolate(mode="bilinear", align_corners=False)` of the
    /// integer window `[start, start + len)` of an axis of size `n` to `out` samples.
    fn resize(start: usize, len: usize, n: usize, out: usize) -> Self {
        let scale = len as f32 / out as f32;
        let mut idx = Vec::with_capacity(out);
        let mut wts = Vec::with_capacity(out);
        for o in 0..out {
            let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(len - 1);
            let i1 = if i0 + 1 < len { i0 + 1 } else { i0 };
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            idx.push([(start + i0).min(n - 1), (start + i1).min(n - 1)]);
            wts.push([1.0 - l1, l1]);
        }
        Self { idx, wts }
    }

    /// `grid_sample(bilinear, zeros, align_corners=False)` of the continuous
    /// window `[start, start + len)` (pixel units) of an axis of size `n`.
    fn continuous(start: f32, len: f32, n: usize, out: usize) -> Self {
        let mut idx = Vec::with_capacity(out);
        let mut wts = Vec::with_capacity(out);
        for o in 0..out {
            // Output pixel centre in the window, then input pixel coordinate.
            let pos = start + (o as f32 + 0.5) * len / out as f32 - 0.5;
            let f0 = pos.floor();
            let l1 = pos - f0;
            let mut pair_i = [0usize; 2];
            let mut pair_w = [0f32; 2];
            for (k, (wgt, at)) in [(1.0 - l1, f0), (l1, f0 + 1.0)].into_iter().enumerate() {
                if at >= 0.0 && at < n as f32 {
                    pair_i[k] = at as usize;
                    pair_w[k] = wgt;
                }
            }
            idx.push(pair_i);
            wts.push(pair_w);
        }
        Self { idx, wts }
    }
}

/// Resamples every channel of `img` with separable taps (rows, cols):
/// for each output row, blend its two source rows (contiguous, vectorised),
/// then gather the two column taps.
pub(crate) fn resample(img: &Image, rows: &Taps, cols: &Taps) -> Image {
    let (oh, ow) = (rows.idx.len(), cols.idx.len());
    let (h, w) = (img.height, img.width);
    let mut out = vec![0f32; img.channels * oh * ow];
    let mut line = vec![0f32; w];
    for (src, dst) in img
        .data
        .chunks_exact(h * w)
        .zip(out.chunks_exact_mut(oh * ow))
    {
        for ((drow, &[r0, r1]), &[a0, a1]) in dst.chunks_exact_mut(ow).zip(&rows.idx).zip(&rows.wts)
        {
            let s0 = &src[r0 * w..(r0 + 1) * w];
            let s1 = &src[r1 * w..(r1 + 1) * w];
            for ((l, &u), &v) in line.iter_mut().zip(s0).zip(s1) {
                *l = a0 * u + a1 * v;
            }
            for ((d, &[c0, c1]), &[b0, b1]) in drow.iter_mut().zip(&cols.idx).zip(&cols.wts) {
                *d = b0 * line[c0] + b1 * line[c1];
            }
        }
    }
    Image {
        channels: img.channels,
        height: oh,
        width: ow,
        data: out,
    }
}

/// Crops `b` out of `img` and resizes it to `size` (bilinear, `align_corners=False`),
/// the deterministic core of [`RandomResizedCrop`]. `continuous` selects
/// `grid_sample`-style sampling of a fractional box with zeros outside;
/// otherwise the box is rounded to whole pixels and resized like torch's
/// `interpolate`.
pub fn resized_crop(
    img: &Image,
    b: CropBox,
    size: (usize, usize),
    continuous: bool,
) -> Result<Image> {
    if size.0 == 0 || size.1 == 0 {
        return Err(Error::invalid(
            "resized_crop",
            format!("output size {}×{} must be non-zero", size.0, size.1),
        ));
    }
    let (rows, cols) = if continuous {
        (
            Taps::continuous(b.top, b.height, img.height, size.0),
            Taps::continuous(b.left, b.width, img.width, size.1),
        )
    } else {
        let top = (b.top.max(0.0) as usize).min(img.height - 1);
        let left = (b.left.max(0.0) as usize).min(img.width - 1);
        let bh = (b.height.max(1.0) as usize).min(img.height - top);
        let bw = (b.width.max(1.0) as usize).min(img.width - left);
        (
            Taps::resize(top, bh, img.height, size.0),
            Taps::resize(left, bw, img.width, size.1),
        )
    };
    Ok(resample(img, &rows, &cols))
}

impl Transform for RandomResizedCrop {
    fn apply(&self, image: &mut Image, rng: &mut SeededRng) -> Result<()> {
        let full = CropBox {
            top: 0.0,
            left: 0.0,
            height: image.height as f32,
            width: image.width as f32,
        };
        let b = if coin(rng, self.cfg.p) {
            self.sample_box(image.height, image.width, rng)
        } else {
            full
        };
        *image = resized_crop(
            image,
            b,
            self.cfg.size,
            self.cfg.mode == CropMode::Continuous,
        )?;
        Ok(())
    }
}

config! {
    /// Options of [`RandomCrop`].
    pub struct RandomCropConfig {
        /// Output `(height, width)`. Default `(28, 28)`.
        size: (usize, usize) = (28, 28),
        /// Zero padding added on every side before cropping. Default 2
        /// (the supervised reference recipe, docs/benchmarks.md; torchvision's CIFAR recipe uses 4 on 32 px).
        padding: usize = 2,
        /// Probability of cropping at a random offset; otherwise the centre. Default 1.0.
        p: f32 = 1.0,
    }
}

impl RandomCropConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        let (h, w) = self.size;
        if h == 0 || w == 0 || h > 1 << 16 || w > 1 << 16 {
            return Err(Error::config(
                "RandomCropConfig::size",
                format!("{h}×{w}"),
                "sides must be in 1..=65536",
            ));
        }
        if self.padding > 1 << 16 {
            return Err(Error::config(
                "RandomCropConfig::padding",
                self.padding,
                "must be at most 65536",
            ));
        }
        check_prob("RandomCropConfig::p", self.p)?;
        Ok(())
    }
}

/// torchvision's `RandomCrop(size, padding)` with zero fill: pad every side,
/// then take a `size` window at a uniformly random offset.
#[derive(Debug, Clone)]
pub struct RandomCrop {
    cfg: RandomCropConfig,
}

impl RandomCrop {
    /// Validates the configuration.
    pub fn new(cfg: RandomCropConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }
}

impl Transform for RandomCrop {
    fn apply(&self, image: &mut Image, rng: &mut SeededRng) -> Result<()> {
        let (oh, ow) = self.cfg.size;
        let pad = self.cfg.padding;
        let (ph, pw) = (image.height + 2 * pad, image.width + 2 * pad);
        if oh > ph || ow > pw {
            return Err(Error::shape(
                "RandomCrop",
                format!("an image of at least {oh}×{ow} after padding {pad}"),
                (image.channels, image.height, image.width),
            ));
        }
        let (oy, ox) = if coin(rng, self.cfg.p) {
            (rng.random_range(0..=ph - oh), rng.random_range(0..=pw - ow))
        } else {
            ((ph - oh) / 2, (pw - ow) / 2)
        };
        let (h, w) = (image.height, image.width);
        let mut out = vec![0f32; image.channels * oh * ow];
        for c in 0..image.channels {
            for y in 0..oh {
                let sy = (y + oy) as isize - pad as isize;
                if sy < 0 || sy >= h as isize {
                    continue;
                }
                for x in 0..ow {
                    let sx = (x + ox) as isize - pad as isize;
                    if sx >= 0 && sx < w as isize {
                        out[(c * oh + y) * ow + x] =
                            image.data[(c * h + sy as usize) * w + sx as usize];
                    }
                }
            }
        }
        *image = Image {
            channels: image.channels,
            height: oh,
            width: ow,
            data: out,
        };
        Ok(())
    }
}
