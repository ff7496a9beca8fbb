//! Hinton knowledge distillation (Hinton, Vinyals, Dean 2015, "Distilling
//! the Knowledge in a Neural Network").
//!
//! ```text
//! soft  = T² · KL( softmax(t / T) ‖ softmax(s / T) )      (batch mean)
//! total = alpha · soft + (1 − alpha) · CE(s, y)
//! ```
//!
//! `s` are the student's logits, `t` the teacher's (detached here: no
//! gradient reaches the teacher), `T` the temperature and `y` the hard labels.
//! The `T²` keeps the soft term's gradient magnitude independent of `T`.
//!
//! **Convention for `alpha`** (libraries disagree): here, as in Hinton's paper
//! and RepDistiller (`-a 0.9` weights the KD term, `-r 0.1` the CE), `alpha`
//! weights the **soft** (distillation) term. torchdistill's `KDLoss` uses
//! `alpha` for the hard cross-entropy instead, and TextBrewer leaves out `T²`.
//! Defaults: `T = 4`, `alpha = 0.9` (RepDistiller's CIFAR-100 setting).

use super::{check_batch, check_float, check_positive, check_rank, check_same_shape};
use super::{CrossEntropyLoss, CrossEntropyLossConfig};
use crate::config::config;
use crate::ops;
use crate::{Error, Result};
use candle_core::Tensor;

config! {
    /// Configuration of [`KdLoss`]; defaults from RepDistiller's KD runs.
    pub struct KdLossConfig {
        /// Softmax temperature `T` > 0 (RepDistiller: 4; Hinton's MNIST: 20).
        temperature: f64 = 4.0,
        /// Weight of the soft (KD) term in [0, 1]; the hard CE gets `1 − alpha`
        /// (RepDistiller: 0.9).
        alpha: f64 = 0.9,
    }
}

impl KdLossConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        check_positive("KdLossConfig::temperature", self.temperature)?;
        if !(self.alpha.is_finite() && (0.0..=1.0).contains(&self.alpha)) {
            return Err(Error::config(
                "KdLossConfig::alpha",
                self.alpha,
                "must be in [0, 1]",
            ));
        }
        Ok(())
    }
}

/// Hinton distillation loss (see the module docs for the formula and the
/// `alpha` convention).
#[derive(Debug, Clone)]
pub struct KdLoss {
    cfg: KdLossConfig,
    ce: CrossEntropyLoss,
}

impl KdLoss {
    /// Validates the configuration.
    pub fn new(cfg: KdLossConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            ce: CrossEntropyLoss::new(CrossEntropyLossConfig::default())?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KdLossConfig {
        &self.cfg
    }

    /// The soft term alone: `T² · KL(softmax(t/T) ‖ softmax(s/T))`, batch
    /// mean, for student and teacher logits of the same shape `(N, C)`.
    pub fn soft(&self, student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
        const OP: &str = "kd_loss";
        check_rank(OP, "student logits (N, C)", student, 2)?;
        check_float(OP, "student logits", student)?;
        check_same_shape(OP, student, teacher)?;
        check_batch(OP, student, 1)?;
        let t = self.cfg.temperature;
        let teacher = teacher.detach().to_dtype(student.dtype())?;
        let log_s = ops::log_softmax(&(student / t)?, 1)?;
        let log_t = ops::log_softmax(&(teacher / t)?, 1)?;
        Ok((ops::kl_div_log_target(&log_s, &log_t)? * (t * t))?)
    }

    /// `alpha · soft + (1 − alpha) · CE(student, labels)`; `labels` are class
    /// indices `(N,)`.
    pub fn forward(&self, student: &Tensor, teacher: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let soft = self.soft(student, teacher)?;
        let hard = self.ce.forward(student, labels)?;
        let a = self.cfg.alpha;
        Ok(((soft * a)? + (hard * (1.0 - a))?)?)
    }
}

/// The soft distillation term `T² · KL(softmax(teacher/T) ‖ softmax(student/T))`
/// (batch mean); the teacher is detached. Combine it with the hard-label
/// cross-entropy yourself, or use [`KdLoss::forward`].
pub fn kd_loss(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    KdLoss::new(KdLossConfig::default().with_temperature(temperature))?.soft(student, teacher)
}
