//! Feature terms: a loss between a named intermediate output of the student
//! and one of the teacher, through an optional trainable adapter.

use super::AdapterKind;
use crate::config::config;
use crate::loss::{AttentionTransferLossConfig, RkdLossConfig};
use crate::{Error, Result};

/// The loss of a [`FeatureTerm`], before the term's weight.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub enum FeatureLoss {
    /// FitNets' hint: `mean((adapter(f_s) − f_t)²)` over every element
    /// ([`hint_loss`](crate::loss::hint_loss)); the adapted student feature
    /// must have the teacher feature's shape.
    Hint,
    /// Attention transfer between feature maps `(N, C, H, W)`
    /// ([`AttentionTransferLoss`](crate::loss::AttentionTransferLoss)); the
    /// config's `beta` multiplies the term like its weight does. Channel
    /// counts may differ; spatial sizes must have an integer ratio.
    AttentionTransfer(AttentionTransferLossConfig),
    /// Relational KD, distance and angle terms with their own weights
    /// ([`RkdLoss`](crate::loss::RkdLoss)), on features flattened to
    /// `(N, D)`; needs batches of at least 2.
    Rkd(RkdLossConfig),
}

impl FeatureLoss {
    /// The short name used in term names: `hint`, `at` or `rkd`.
    pub fn short_name(&self) -> &'static str {
        match self {
            FeatureLoss::Hint => "hint",
            FeatureLoss::AttentionTransfer(_) => "at",
            FeatureLoss::Rkd(_) => "rkd",
        }
    }
}

config! {
    /// One feature term of a [`DistillLossConfig`](super::DistillLossConfig):
    /// `weight · loss(adapter(student stage), teacher stage)`. Stages are
    /// named as the models' [`FeatureExtractor`](crate::nn::FeatureExtractor)
    /// names them (`conv1`, `layer2`, `hidden1`, ...). Start from a preset:
    /// [`FeatureTerm::hint`], [`FeatureTerm::attention`], [`FeatureTerm::rkd`].
    pub struct FeatureTerm {
        /// The student's stage (no default: a preset sets it).
        student: String = String::new(),
        /// The teacher's stage (no default: a preset sets it).
        teacher: String = String::new(),
        /// The loss (default: FitNets' hint).
        loss: FeatureLoss = FeatureLoss::Hint,
        /// The adapter before the loss (default: a 1×1 convolution for maps,
        /// a linear layer for vectors).
        adapter: AdapterKind = AdapterKind::Auto,
        /// The term's weight, finite and >= 0 (default 100, RepDistiller's
        /// FitNet weight).
        weight: f64 = 100.0,
    }
}

impl FeatureTerm {
    /// FitNets' hint (Romero et al. 2015) from student stage `student` to
    /// teacher stage `teacher`: a 1×1-convolution (or linear) adapter to the
    /// teacher's width, mean squared error, weight 100 (RepDistiller).
    pub fn hint(student: impl Into<String>, teacher: impl Into<String>) -> Self {
        FeatureTerm::default()
            .with_student(student)
            .with_teacher(teacher)
    }

    /// Attention transfer (Zagoruyko & Komodakis 2017): no adapter, `p = 2`,
    /// weight 1000 (RepDistiller's `beta`; the loss config's own `beta` is
    /// set to 1, so the weight is the one knob).
    pub fn attention(student: impl Into<String>, teacher: impl Into<String>) -> Self {
        FeatureTerm::hint(student, teacher)
            .with_loss(FeatureLoss::AttentionTransfer(
                AttentionTransferLossConfig::default().with_beta(1.0),
            ))
            .with_adapter(AdapterKind::None)
            .with_weight(1000.0)
    }

    /// Relational KD (Park et al. 2019) on flattened features: no adapter,
    /// distance weight 25 and angle weight 50 inside the loss, term weight 1.
    pub fn rkd(student: impl Into<String>, teacher: impl Into<String>) -> Self {
        FeatureTerm::hint(student, teacher)
            .with_loss(FeatureLoss::Rkd(RkdLossConfig::default()))
            .with_adapter(AdapterKind::None)
            .with_weight(1.0)
    }

    /// The term's name in step outputs: `<loss>.<student>.<teacher>`, e.g.
    /// `at.conv1.layer2`.
    pub fn name(&self) -> String {
        format!(
            "{}.{}.{}",
            self.loss.short_name(),
            self.student,
            self.teacher
        )
    }

    /// Checks every field; called by the constructor that takes the recipe.
    pub(crate) fn validate(&self, index: usize) -> Result<()> {
        let field = |f: &str| format!("DistillLossConfig::features[{index}].{f}");
        if self.student.is_empty() {
            return Err(Error::config(
                field("student"),
                "\"\"",
                "name a stage of the student (its FeatureExtractor::feature_names)",
            ));
        }
        if self.teacher.is_empty() {
            return Err(Error::config(
                field("teacher"),
                "\"\"",
                "name a stage of the teacher (its FeatureExtractor::feature_names)",
            ));
        }
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            return Err(Error::config(
                field("weight"),
                self.weight,
                "must be finite and >= 0",
            ));
        }
        Ok(())
    }
}
