//! Relational knowledge distillation (Park et al. 2019, "Relational
//! Knowledge Distillation"), distance and angle terms, as in RepDistiller's
//! `RKDLoss`.
//!
//! Features are flattened to `(N, D)`. With `d_ij = ‖x_i − x_j‖` and `μ` the
//! mean of `d` over the `N(N−1)` pairs `i ≠ j`, and `e_ij = (x_j − x_i)/‖x_j − x_i‖`:
//!
//! ```text
//! distance = Σ_{i≠j} huber(d^s_ij/μ_s − d^t_ij/μ_t) / N²
//! angle    = Σ_{i,j,k} huber(⟨e^s_ij, e^s_ik⟩ − ⟨e^t_ij, e^t_ik⟩) / N³
//! RKD      = w_d · distance + w_a · angle           (w_d = 25, w_a = 50)
//! ```
//!
//! `huber` is smooth-L1 with β = 1. The divisions by `N²` and `N³` (rather
//! than by the number of off-diagonal entries) follow RepDistiller, whose
//! matrices keep zero diagonals. Distances are clamped below at 1e-6 and
//! directions of coincident points are 0, as in RepDistiller. The teacher is
//! detached. The angle term costs `O(N²·D + N³)` memory.

use super::{check_batch, check_float, check_non_negative};
use crate::config::config;
use crate::ops;
use crate::{Error, Result};
use candle_core::Tensor;

config! {
    /// Configuration of [`RkdLoss`]; defaults from the paper and RepDistiller.
    pub struct RkdLossConfig {
        /// Weight `w_d` of the distance term, >= 0 (paper: 25).
        distance_weight: f64 = 25.0,
        /// Weight `w_a` of the angle term, >= 0 (paper: 50).
        angle_weight: f64 = 50.0,
    }
}

impl RkdLossConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        check_non_negative("RkdLossConfig::distance_weight", self.distance_weight)?;
        check_non_negative("RkdLossConfig::angle_weight", self.angle_weight)?;
        Ok(())
    }
}

/// RKD loss `w_d · distance + w_a · angle` (see the module docs).
#[derive(Debug, Clone)]
pub struct RkdLoss {
    cfg: RkdLossConfig,
}

/// Smooth-L1 (β = 1) of `x`, element-wise: `½x²` for |x| < 1, `|x| − ½` else.
fn smooth_l1(x: &Tensor) -> Result<Tensor> {
    let a = x.abs()?;
    let quadratic = (x.sqr()? * 0.5)?;
    let linear = (&a - 0.5)?;
    // The branch not taken gets no gradient, so |x|'s kink at 0 is harmless.
    Ok(a.lt(1.0)?.where_cond(&quadratic, &linear)?)
}

/// Flattens `(N, ...)` to `(N, D)` and checks student/teacher batches.
fn flat_pair(op: &str, student: &Tensor, teacher: &Tensor) -> Result<(Tensor, Tensor, usize)> {
    check_float(op, "student features", student)?;
    check_float(op, "teacher features", teacher)?;
    let n = check_batch(op, student, 2)?;
    if teacher.rank() == 0 || teacher.dim(0)? != n {
        return Err(Error::shape(
            op,
            format!("a teacher batch of {n} like the student's"),
            teacher.dims(),
        ));
    }
    let s = student.reshape((n, ()))?;
    let t = teacher
        .detach()
        .to_dtype(student.dtype())?
        .reshape((n, ()))?;
    if s.dim(1)? == 0 || t.dim(1)? == 0 {
        return Err(Error::invalid(op, "features have no elements"));
    }
    Ok((s, t, n))
}

/// Off-diagonal pairwise distances `(N(N−1),)` divided by their mean.
fn normalized_distances(x: &Tensor) -> Result<Tensor> {
    let d2 = ops::pairwise_squared_distances(x, x)?;
    let d = ops::off_diagonal(&d2)?.maximum(1e-12)?.sqrt()?;
    Ok(d.broadcast_div(&d.mean_all()?)?)
}

/// Angle matrix `(N, N, N)`: `⟨e_ij, e_ik⟩` with `e_ij` the unit vector from
/// `x_i` to `x_j` (0 when they coincide).
fn angles(x: &Tensor) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    let diff = x
        .unsqueeze(0)?
        .broadcast_as((n, n, d))?
        .broadcast_sub(&x.unsqueeze(1)?)?;
    let norm = diff.sqr()?.sum_keepdim(2)?.maximum(1e-24)?.sqrt()?;
    let e = diff.broadcast_div(&norm)?;
    Ok(e.matmul(&e.transpose(1, 2)?.contiguous()?)?)
}

impl RkdLoss {
    /// Validates the configuration.
    pub fn new(cfg: RkdLossConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &RkdLossConfig {
        &self.cfg
    }

    /// The unweighted distance term (batch of at least 2).
    pub fn distance(&self, student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
        let (s, t, n) = flat_pair("rkd_distance_loss", student, teacher)?;
        let diff = (normalized_distances(&s)? - normalized_distances(&t)?)?;
        Ok((smooth_l1(&diff)?.sum_all()? / (n * n) as f64)?)
    }

    /// The unweighted angle term (batch of at least 2).
    pub fn angle(&self, student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
        let (s, t, _) = flat_pair("rkd_angle_loss", student, teacher)?;
        let diff = (angles(&s)? - angles(&t)?)?;
        Ok(smooth_l1(&diff)?.mean_all()?)
    }

    /// `w_d · distance + w_a · angle`; terms with weight 0 are not computed.
    pub fn forward(&self, student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
        let (wd, wa) = (self.cfg.distance_weight, self.cfg.angle_weight);
        let d = if wd > 0.0 {
            (self.distance(student, teacher)? * wd)?
        } else {
            flat_pair("rkd", student, teacher)?;
            student.zeros_like()?.sum_all()?
        };
        if wa > 0.0 {
            Ok((d + (self.angle(student, teacher)? * wa)?)?)
        } else {
            Ok(d)
        }
    }
}

/// The unweighted RKD distance term (see the module docs).
pub fn rkd_distance_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    RkdLoss::new(RkdLossConfig::default())?.distance(student, teacher)
}

/// The unweighted RKD angle term (see the module docs).
pub fn rkd_angle_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    RkdLoss::new(RkdLossConfig::default())?.angle(student, teacher)
}
