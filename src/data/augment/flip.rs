//! Random horizontal flip.

use super::image::{check_prob, coin, Image, Transform};
use crate::device::SeededRng;
use crate::Result;

/// torchvision's `RandomHorizontalFlip(p)`: mirrors every row with probability `p`.
#[derive(Debug, Clone)]
pub struct HorizontalFlip {
    p: f32,
}

impl HorizontalFlip {
    /// A flip applied with probability `p` (torchvision's default 0.5).
    pub fn new(p: f32) -> Result<Self> {
        check_prob("HorizontalFlip::p", p)?;
        Ok(Self { p })
    }
}

impl Default for HorizontalFlip {
    fn default() -> Self {
        Self { p: 0.5 }
    }
}

impl Transform for HorizontalFlip {
    fn apply(&self, image: &mut Image, rng: &mut SeededRng) -> Result<()> {
        if coin(rng, self.p) {
            for row in image.data.chunks_exact_mut(image.width) {
                row.reverse();
            }
        }
        Ok(())
    }
}
