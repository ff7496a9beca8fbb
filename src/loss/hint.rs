//! FitNets hint loss (Romero et al. 2015, "FitNets: Hints for Thin Deep
//! Nets") with a learned regressor.
//!
//! ```text
//! hint = beta · mean( (r(f_s) − f_t)² )
//! ```
//!
//! `f_s` is a student feature, `f_t` the teacher's (detached) and `r` a
//! learned regressor mapping the student's width to the teacher's: a 1×1
//! convolution with bias for feature maps `(N, C, H, W)` (FitNets used a
//! convolutional regressor), or a linear layer for vectors `(N, D)`.
//!
//! Conventions: the mean squared error over all elements (RepDistiller's
//! `HintLoss` is `nn.MSELoss()`; the paper's `½‖·‖²` sum differs only by a
//! constant factor), weighted by `beta` = 100 (RepDistiller's FitNet
//! setting). RepDistiller's regressor adds BatchNorm and ReLU after the
//! convolution; ours is the plain linear map of the paper. The regressor's
//! parameters (`weight`, `bias`) are created in the given `VarBuilder` and
//! must be handed to the optimizer with the student's.

use super::{
    check_float, check_non_negative, check_rank, check_same_shape, MseLoss, MseLossConfig,
};
use crate::config::config;
use crate::ops;
use crate::{Error, Result};
use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

/// The kind of regressor [`HintLoss`] learns.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HintRegressor {
    /// A 1×1 convolution with bias, for feature maps `(N, C, H, W)`; the
    /// spatial sizes of student and teacher must match (the default).
    #[default]
    Conv1x1,
    /// A linear layer with bias, for feature vectors `(N, D)`.
    Linear,
}

config! {
    /// Configuration of [`HintLoss`].
    pub struct HintLossConfig {
        /// The regressor (default: 1×1 convolution).
        regressor: HintRegressor = HintRegressor::Conv1x1,
        /// Weight of the loss, >= 0 (RepDistiller's FitNet runs: 100).
        beta: f64 = 100.0,
    }
}

impl HintLossConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        check_non_negative("HintLossConfig::beta", self.beta)?;
        Ok(())
    }
}

/// FitNets hint loss with its regressor (see the module docs).
#[derive(Debug, Clone)]
pub struct HintLoss {
    cfg: HintLossConfig,
    weight: Tensor,
    bias: Tensor,
}

impl HintLoss {
    /// Builds the regressor from `student_dim` to `teacher_dim` channels (or
    /// features) in `vb` (tensors `weight` and `bias`, initialised like
    /// torch's `Conv2d` / `Linear`: uniform in ±1/√student_dim).
    pub fn new(
        student_dim: usize,
        teacher_dim: usize,
        cfg: HintLossConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        if student_dim == 0 || teacher_dim == 0 {
            return Err(Error::invalid(
                "HintLoss::new",
                format!("student_dim ({student_dim}) and teacher_dim ({teacher_dim}) must be > 0"),
            ));
        }
        let bound = 1.0 / (student_dim as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = match cfg.regressor {
            HintRegressor::Conv1x1 => {
                vb.get_with_hints((teacher_dim, student_dim, 1, 1), "weight", init)?
            }
            HintRegressor::Linear => {
                vb.get_with_hints((teacher_dim, student_dim), "weight", init)?
            }
        };
        let bias = vb.get_with_hints(teacher_dim, "bias", init)?;
        Ok(Self { cfg, weight, bias })
    }

    /// The configuration.
    pub fn config(&self) -> &HintLossConfig {
        &self.cfg
    }

    /// The regressor applied to a student feature.
    pub fn regress(&self, student: &Tensor) -> Result<Tensor> {
        const OP: &str = "HintLoss::regress";
        check_float(OP, "student feature", student)?;
        let s_dim = self.weight.dim(1)?;
        match self.cfg.regressor {
            HintRegressor::Conv1x1 => {
                check_rank(OP, "student feature map (N, C, H, W)", student, 4)?;
                if student.dim(1)? != s_dim {
                    return Err(Error::shape(
                        OP,
                        format!("{s_dim} student channels"),
                        student.dims(),
                    ));
                }
                ops::conv2d(
                    student,
                    &self.weight,
                    Some(&self.bias),
                    &ops::Conv2dParams::default(),
                )
            }
            HintRegressor::Linear => {
                check_rank(OP, "student features (N, D)", student, 2)?;
                if student.dim(1)? != s_dim {
                    return Err(Error::shape(
                        OP,
                        format!("{s_dim} student features"),
                        student.dims(),
                    ));
                }
                Ok(student
                    .matmul(&self.weight.t()?)?
                    .broadcast_add(&self.bias)?)
            }
        }
    }

    /// `beta · mean((regress(student) − teacher)²)`; the teacher is detached.
    pub fn forward(&self, student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
        let r = self.regress(student)?;
        Ok((hint_loss(&r, teacher)? * self.cfg.beta)?)
    }
}

/// The unweighted hint term `mean((regressed − teacher)²)` for a student
/// feature already mapped to the teacher's shape; the teacher is detached.
pub fn hint_loss(regressed: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    check_same_shape("hint_loss", regressed, teacher)?;
    MseLoss::new(MseLossConfig::default())?.forward(regressed, &teacher.detach())
}
