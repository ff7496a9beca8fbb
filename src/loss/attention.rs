//! Attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention
//! to Attention"), activation-based, as in the authors' code and RepDistiller.
//!
//! For a feature map `A` of shape `(N, C, H, W)`:
//!
//! ```text
//! Q(A)  = normalize_L2( mean_c |A_c|^p  flattened to (N, H·W) )
//! AT    = mean( (Q(A_s) − Q(A_t))² )          (over N and H·W)
//! total = beta · Σ_pairs AT
//! ```
//!
//! Conventions: `p = 2`; the channel *mean* (the paper writes a sum; the
//! normalisation makes them equal); the loss is the **mean squared
//! difference** of the normalised maps, as in the authors' code and
//! RepDistiller (the paper writes `β/2 · ‖Q_s − Q_t‖_2`, a norm without the
//! square; the code's choice is what produced the published numbers);
//! `beta = 1000` (RepDistiller). When student and teacher maps differ in
//! size, the larger is average-pooled to the smaller (RepDistiller uses
//! adaptive average pooling); the ratio must be an integer in each spatial
//! dimension. Channel counts may differ. The teacher is detached.

use super::{check_batch, check_float, check_non_negative, check_positive, check_rank};
use crate::config::config;
use crate::ops;
use crate::{Error, Result};
use candle_core::Tensor;

config! {
    /// Configuration of [`AttentionTransferLoss`].
    pub struct AttentionTransferLossConfig {
        /// The exponent `p` > 0 of the attention map (paper and RepDistiller: 2).
        p: f64 = 2.0,
        /// Weight of the summed per-pair losses, >= 0 (RepDistiller: 1000).
        beta: f64 = 1000.0,
    }
}

impl AttentionTransferLossConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        check_positive("AttentionTransferLossConfig::p", self.p)?;
        check_non_negative("AttentionTransferLossConfig::beta", self.beta)?;
        Ok(())
    }
}

/// Attention-transfer loss over pairs of student/teacher feature maps.
#[derive(Debug, Clone)]
pub struct AttentionTransferLoss {
    cfg: AttentionTransferLossConfig,
}

impl AttentionTransferLoss {
    /// Validates the configuration.
    pub fn new(cfg: AttentionTransferLossConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &AttentionTransferLossConfig {
        &self.cfg
    }

    /// The normalised attention map `(N, H·W)` of a feature map `(N, C, H, W)`.
    pub fn attention_map(&self, f: &Tensor) -> Result<Tensor> {
        let a = if self.cfg.p == 2.0 {
            f.sqr()?
        } else {
            f.abs()?.powf(self.cfg.p)?
        };
        let n = f.dim(0)?;
        let q = a.mean(1)?.reshape((n, ()))?;
        ops::l2_normalize(&q, 1, 1e-12)
    }

    /// The unweighted loss of one pair: `mean((Q(student) − Q(teacher))²)`.
    pub fn pair(&self, student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
        const OP: &str = "attention_transfer_loss";
        check_rank(OP, "student feature map (N, C, H, W)", student, 4)?;
        check_rank(OP, "teacher feature map (N, C, H, W)", teacher, 4)?;
        check_float(OP, "student feature map", student)?;
        let n = check_batch(OP, student, 1)?;
        let (nt, _, th, tw) = teacher.dims4()?;
        let (_, _, sh, sw) = student.dims4()?;
        if nt != n {
            return Err(Error::shape(
                OP,
                format!("a teacher batch of {n} like the student's"),
                teacher.dims(),
            ));
        }
        let teacher = teacher.detach().to_dtype(student.dtype())?;
        let pool = |x: &Tensor, (fh, fw): (usize, usize), (h, w): (usize, usize)| {
            if fh % h != 0 || fw % w != 0 || h == 0 || w == 0 {
                return Err(Error::shape(
                    OP,
                    format!("spatial sizes with an integer ratio to {h}x{w}"),
                    x.dims(),
                ));
            }
            let k = (fh / h, fw / w);
            ops::avg_pool2d(x, k, k, (0, 0))
        };
        let (s, t) = if sh * sw > th * tw {
            (pool(student, (sh, sw), (th, tw))?, teacher)
        } else if sh * sw < th * tw {
            (student.clone(), pool(&teacher, (th, tw), (sh, sw))?)
        } else if (sh, sw) != (th, tw) {
            return Err(Error::shape(
                OP,
                format!("a teacher map of {sh}x{sw} or an integer multiple"),
                teacher.dims(),
            ));
        } else {
            (student.clone(), teacher)
        };
        let d = (self.attention_map(&s)? - self.attention_map(&t)?)?;
        Ok(d.sqr()?.mean_all()?)
    }

    /// `beta · Σ_i pair(student[i], teacher[i])` over matched lists of
    /// feature maps (e.g. the outputs of each stage).
    pub fn forward(&self, student: &[Tensor], teacher: &[Tensor]) -> Result<Tensor> {
        if student.len() != teacher.len() || student.is_empty() {
            return Err(Error::invalid(
                "AttentionTransferLoss::forward",
                format!(
                    "needs as many student as teacher feature maps, at least one (got {} and {})",
                    student.len(),
                    teacher.len()
                ),
            ));
        }
        let mut total: Option<Tensor> = None;
        for (s, t) in student.iter().zip(teacher) {
            let l = self.pair(s, t)?;
            total = Some(match total {
                None => l,
                Some(acc) => (acc + l)?,
            });
        }
        match total {
            Some(t) => Ok((t * self.cfg.beta)?),
            None => Err(Error::invalid(
                "AttentionTransferLoss::forward",
                "no feature maps",
            )),
        }
    }
}

/// The unweighted attention-transfer loss (p = 2) of one pair of feature
/// maps: `mean((Q(student) − Q(teacher))²)` (see the module docs).
pub fn attention_transfer_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    AttentionTransferLoss::new(AttentionTransferLossConfig::default())?.pair(student, teacher)
}
