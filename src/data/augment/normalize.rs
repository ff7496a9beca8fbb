//! Per-channel normalisation.

use super::image::{Image, Transform};
use crate::device::SeededRng;
use crate::{Error, Result};

/// torchvision's `Normalize(mean, std)`: `x = (x - mean[c]) / std[c]`.
/// One value applies to every channel.
#[derive(Debug, Clone)]
pub struct Normalize {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

impl Normalize {
    /// A normalisation with per-channel (or single) mean and std; every std must be > 0.
    pub fn new(mean: &[f32], std: &[f32]) -> Result<Self> {
        if mean.is_empty() || mean.len() != std.len() {
            return Err(Error::config(
                "Normalize::std",
                format!("{std:?}"),
                format!(
                    "need as many std values as mean values ({}), at least one",
                    mean.len()
                ),
            ));
        }
        if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(Error::config(
                "Normalize::std",
                s,
                "every std must be finite and > 0",
            ));
        }
        if let Some(m) = mean.iter().find(|m| !m.is_finite()) {
            return Err(Error::config(
                "Normalize::mean",
                m,
                "every mean must be finite",
            ));
        }
        Ok(Self {
            mean: mean.to_vec(),
            inv_std: std.iter().map(|s| 1.0 / s).collect(),
        })
    }
}

impl Transform for Normalize {
    fn apply(&self, image: &mut Image, _rng: &mut SeededRng) -> Result<()> {
        if self.mean.len() != 1 && self.mean.len() != image.channels {
            return Err(Error::shape(
                "Normalize",
                format!("an image with 1 or {} channels", self.mean.len()),
                image.channels,
            ));
        }
        let plane = image.plane();
        for (c, ch) in image.data.chunks_exact_mut(plane).enumerate() {
            let k = if self.mean.len() == 1 { 0 } else { c };
            let (m, s) = (self.mean[k], self.inv_std[k]);
            for v in ch {
                *v = (*v - m) * s;
            }
        }
        Ok(())
    }
}
