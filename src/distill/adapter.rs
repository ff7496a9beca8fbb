//! Adapters: trainable maps from a student feature to the teacher's width,
//! so features of different widths can be compared (FitNets' regressor).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::nn::{Conv2d, Conv2dConfig, Linear};
use crate::{Error, Result};

/// The adapter a [`FeatureTerm`](super::FeatureTerm) puts between the
/// student's feature and the loss. Its parameters live in the student's
/// `VarMap`, train with the student and are saved with it.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdapterKind {
    /// No adapter: the student's feature goes to the loss as it is.
    None,
    /// A 1×1 convolution for feature maps `(N, C, H, W)`, a linear layer
    /// for vectors `(N, D)` (the default).
    #[default]
    Auto,
    /// A 1×1 convolution with bias, `C_student → C_teacher` channels;
    /// student and teacher features are maps `(N, C, H, W)`.
    Conv1x1,
    /// A linear layer with bias, `D_student → D_teacher`; student and
    /// teacher features are vectors `(N, D)`.
    Linear,
}

/// A built adapter.
#[derive(Debug, Clone)]
pub(crate) enum Adapter {
    Identity,
    Conv(Conv2d),
    Linear(Linear),
}

impl Adapter {
    /// Builds the adapter of `kind` from a student feature of shape
    /// `student` to a teacher feature of shape `teacher` (batch dimension
    /// first) in `vb` (`weight`, `bias`; PyTorch's default initialisation).
    /// `term` names the feature term in errors.
    pub(crate) fn new(
        kind: AdapterKind,
        student: &[usize],
        teacher: &[usize],
        term: &str,
        vb: VarBuilder,
    ) -> Result<Self> {
        let kind = match (kind, student.len()) {
            (AdapterKind::Auto, 4) => AdapterKind::Conv1x1,
            (AdapterKind::Auto, 2) => AdapterKind::Linear,
            (AdapterKind::Auto, _) => {
                return Err(Error::shape(
                    term,
                    "a student feature map (N, C, H, W) or vector (N, D) for an adapter",
                    student,
                ))
            }
            (k, _) => k,
        };
        let want = |rank: usize, what: &str, dims: &[usize]| {
            if dims.len() == rank {
                Ok(())
            } else {
                Err(Error::shape(
                    term,
                    format!("a {what} for a {kind:?} adapter"),
                    dims,
                ))
            }
        };
        match kind {
            AdapterKind::Conv1x1 => {
                want(4, "student feature map (N, C, H, W)", student)?;
                want(4, "teacher feature map (N, C, H, W)", teacher)?;
                let cfg = Conv2dConfig::default();
                Ok(Adapter::Conv(Conv2d::new(
                    student[1], teacher[1], 1, cfg, vb,
                )?))
            }
            AdapterKind::Linear => {
                want(2, "student feature vector (N, D)", student)?;
                want(2, "teacher feature vector (N, D)", teacher)?;
                Ok(Adapter::Linear(Linear::new(
                    student[1], teacher[1], true, vb,
                )?))
            }
            _ => Ok(Adapter::Identity),
        }
    }

    /// The adapted student feature.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Adapter::Identity => Ok(x.clone()),
            Adapter::Conv(c) => c.forward(x),
            Adapter::Linear(l) => l.forward(x),
        }
    }

    /// The adapter's tensors by their name under its `VarBuilder` prefix.
    pub(crate) fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        match self {
            Adapter::Identity => Vec::new(),
            Adapter::Conv(c) => {
                let mut v = vec![("weight", c.weight())];
                v.extend(c.bias().map(|b| ("bias", b)));
                v
            }
            Adapter::Linear(l) => {
                let mut v = vec![("weight", l.weight())];
                v.extend(l.bias().map(|b| ("bias", b)));
                v
            }
        }
    }
}
