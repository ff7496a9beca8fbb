//! Several augmented views of each image (SimCLR, BYOL, ...).

use std::sync::Arc;

use super::image::{derive_seed, ImageBatch, Transform};
use crate::{Error, Result};

/// `n` views per image, view `v` made by its own pipeline with its own
/// random stream (BYOL's two views differ in blur and solarize
/// probabilities; SimCLR's two views share one pipeline).
#[derive(Debug, Clone)]
pub struct MultiView {
    views: Vec<Arc<dyn Transform>>,
}

impl MultiView {
    /// One pipeline per view; at least one view.
    pub fn new(views: Vec<Arc<dyn Transform>>) -> Result<Self> {
        if views.is_empty() {
            return Err(Error::config(
                "MultiView::views",
                0,
                "need at least one view",
            ));
        }
        Ok(Self { views })
    }

    /// A single view (cannot fail).
    pub(crate) fn from_single(t: Arc<dyn Transform>) -> Self {
        Self { views: vec![t] }
    }

    /// `n` views from the same pipeline (independent random draws per view).
    pub fn repeat(pipeline: impl Transform + 'static, n: usize) -> Result<Self> {
        let t: Arc<dyn Transform> = Arc::new(pipeline);
        Self::new(vec![t; n])
    }

    /// The number of views.
    pub fn len(&self) -> usize {
        self.views.len()
    }

    /// Always `false` (a `MultiView` has at least one view).
    pub fn is_empty(&self) -> bool {
        self.views.is_empty()
    }

    /// The pipeline of view `v`.
    pub fn view(&self, v: usize) -> Option<&Arc<dyn Transform>> {
        self.views.get(v)
    }

    /// All views of `batch`: view `v` of image `i` uses the stream
    /// `keys[i]` of the seed `derive_seed(seed, [v])`.
    pub fn apply(
        &self,
        batch: &ImageBatch,
        seed: u64,
        keys: Option<&[u64]>,
    ) -> Result<Vec<ImageBatch>> {
        self.views
            .iter()
            .enumerate()
            .map(|(v, t)| batch.augment(t.as_ref(), derive_seed(seed, &[v as u64]), keys))
            .collect()
    }
}
