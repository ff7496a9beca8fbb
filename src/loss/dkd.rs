//! Decoupled knowledge distillation (Zhao et al. 2022, "Decoupled Knowledge
//! Distillation"), as in the authors' mdistiller `DKD` loss.
//!
//! With `p = softmax(s / T)`, `q = softmax(t / T)`, `g` the target class:
//!
//! ```text
//! TCKD = T² · KL( [q_g, 1 − q_g] ‖ [p_g, 1 − p_g] )                  (batch mean)
//! NCKD = T² · KL( softmax(t/T over classes ≠ g) ‖ softmax(s/T over classes ≠ g) )
//! DKD  = alpha · TCKD + beta · NCKD
//! ```
//!
//! The target class is removed from the non-target softmax by subtracting
//! 1000 from its logit (after dividing by `T`), exactly as mdistiller does.
//! Defaults `alpha = 1`, `beta = 8`, `T = 4` (the paper's CIFAR-100 setting).
//! The hard-label cross-entropy and mdistiller's warm-up factor are left to
//! the caller. The teacher is detached.

use super::{check_batch, check_float, check_non_negative, check_positive, check_rank};
use super::{check_same_shape, class_targets, one_hot};
use crate::config::config;
use crate::ops;
use crate::Result;
use candle_core::{Tensor, D};

config! {
    /// Configuration of [`DkdLoss`]; defaults from the paper (CIFAR-100).
    pub struct DkdLossConfig {
        /// Weight of the target-class term TCKD, >= 0 (paper: 1).
        alpha: f64 = 1.0,
        /// Weight of the non-target-class term NCKD, >= 0 (paper: 8).
        beta: f64 = 8.0,
        /// Softmax temperature > 0 (paper: 4).
        temperature: f64 = 4.0,
    }
}

impl DkdLossConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        check_non_negative("DkdLossConfig::alpha", self.alpha)?;
        check_non_negative("DkdLossConfig::beta", self.beta)?;
        check_positive("DkdLossConfig::temperature", self.temperature)?;
        Ok(())
    }
}

/// Decoupled KD loss (see the module docs).
#[derive(Debug, Clone)]
pub struct DkdLoss {
    cfg: DkdLossConfig,
}

impl DkdLoss {
    /// Validates the configuration.
    pub fn new(cfg: DkdLossConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &DkdLossConfig {
        &self.cfg
    }

    /// `alpha · TCKD + beta · NCKD` for student and teacher logits `(N, C)`
    /// and class indices `(N,)`.
    pub fn forward(&self, student: &Tensor, teacher: &Tensor, labels: &Tensor) -> Result<Tensor> {
        const OP: &str = "dkd_loss";
        check_rank(OP, "student logits (N, C)", student, 2)?;
        check_float(OP, "student logits", student)?;
        check_same_shape(OP, student, teacher)?;
        let n = check_batch(OP, student, 1)?;
        let c = student.dim(1)?;
        let y = class_targets(OP, labels, n, c, None)?;
        let gt = one_hot(&y, c, student.dtype())?;
        let t = self.cfg.temperature;
        let zs = (student / t)?;
        let zt = (teacher.detach().to_dtype(student.dtype())? / t)?;

        // Binary [target, rest] distributions, in log space.
        let binary = |z: &Tensor| -> Result<Tensor> {
            let lse = ops::logsumexp(z, 1, true)?;
            let log_g = (z * &gt)?.sum_keepdim(1)?.broadcast_sub(&lse)?;
            let log_rest = ops::logsumexp(&(z - (&gt * 1000.0)?)?, 1, true)?.broadcast_sub(&lse)?;
            Ok(Tensor::cat(&[log_g, log_rest], D::Minus1)?)
        };
        let tckd = ops::kl_div_log_target(&binary(&zs)?, &binary(&zt)?)?;
        let ls2 = ops::log_softmax(&(&zs - (&gt * 1000.0)?)?, 1)?;
        let lt2 = ops::log_softmax(&(&zt - (&gt * 1000.0)?)?, 1)?;
        let nckd = ops::kl_div_log_target(&ls2, &lt2)?;
        let tt = t * t;
        y.poison(&((tckd * (self.cfg.alpha * tt))? + (nckd * (self.cfg.beta * tt))?)?)
    }
}

/// Decoupled KD, `alpha · TCKD + beta · NCKD` (see the module docs).
pub fn dkd_loss(
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
    alpha: f64,
    beta: f64,
    temperature: f64,
) -> Result<Tensor> {
    DkdLoss::new(DkdLossConfig {
        alpha,
        beta,
        temperature,
    })?
    .forward(student, teacher, labels)
}
