//! Chaining transforms.

use std::sync::Arc;

use super::image::{Image, Transform};
use crate::device::SeededRng;
use crate::Result;

/// Applies transforms in order (torchvision's `Compose`).
///
/// ```
/// use aimass::data::augment::{Compose, HorizontalFlip, Normalize};
/// let t = Compose::new()
///     .then(HorizontalFlip::new(0.5)?)
///     .then(Normalize::new(&[0.5], &[0.25])?);
/// assert_eq!(t.len(), 2);
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Compose {
    steps: Vec<Arc<dyn Transform>>,
}

impl Compose {
    /// An empty pipeline (the identity).
    pub fn new() -> Self {
        Self::default()
    }

    /// A pipeline from shared transforms.
    pub fn from_steps(steps: Vec<Arc<dyn Transform>>) -> Self {
        Self { steps }
    }

    /// Appends a transform.
    pub fn then(mut self, t: impl Transform + 'static) -> Self {
        self.steps.push(Arc::new(t));
        self
    }

    /// The number of steps.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether the pipeline has no step.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

impl Transform for Compose {
    fn apply(&self, image: &mut Image, rng: &mut SeededRng) -> Result<()> {
        for s in &self.steps {
            s.apply(image, rng)?;
        }
        Ok(())
    }
}
