//! Named intermediate outputs of a model.

use candle_core::Tensor;

use crate::{Error, Result};

/// The outputs of a model's named stages, in forward order (e.g. `stem`,
/// `layer1`, ..., `pool`, `logits`).
#[derive(Debug, Clone, Default)]
pub struct Features {
    entries: Vec<(String, Tensor)>,
}

impl Features {
    /// No features yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the output of stage `name`.
    pub fn push(&mut self, name: impl Into<String>, t: Tensor) {
        self.entries.push((name.into(), t));
    }

    /// The output of stage `name`, if recorded.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The output of stage `name`, or an error listing the stages there are.
    pub fn require(&self, name: &str) -> Result<&Tensor> {
        self.get(name).ok_or_else(|| {
            Error::invalid(
                "Features::require",
                format!(
                    "no stage named `{name}`; stages: {}",
                    self.names().join(", ")
                ),
            )
        })
    }

    /// The stage names in forward order.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The last stage's output (the model's normal output).
    pub fn last(&self) -> Option<&Tensor> {
        self.entries.last().map(|(_, t)| t)
    }

    /// (name, output) pairs in forward order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// The number of recorded stages.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The (name, output) pairs.
    pub fn into_vec(self) -> Vec<(String, Tensor)> {
        self.entries
    }
}

/// A model that can return the outputs of its named stages (for feature
/// distillation, probing, visualisation) besides its normal forward.
///
/// `forward_features(x, train)` runs the same computation as the normal
/// forward (same train-mode side effects, e.g. BatchNorm statistics) and
/// records each stage; its last entry is the normal output.
pub trait FeatureExtractor {
    /// The stage names `forward_features` records, in order.
    fn feature_names(&self) -> Vec<String>;

    /// Runs the model, recording every named stage.
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Features>;
}
