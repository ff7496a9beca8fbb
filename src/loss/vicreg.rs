//! VICReg (Bardes, Ponce, LeCun 2022, "VICReg: Variance-Invariance-Covariance
//! Regularization for Self-Supervised Learning"), as in the authors' code.
//!
//! For two views' embeddings `x, y` `(N, D)`:
//!
//! ```text
//! invariance = mean((x − y)²)
//! variance   = ½ mean_j relu(1 − √(Var(x_j) + ε)) + ½ mean_j relu(1 − √(Var(y_j) + ε))
//! covariance = Σ_{i≠j} C(x)_ij² / D + Σ_{i≠j} C(y)_ij² / D,    C(x) = x̄ᵀx̄ / (N − 1)
//! VICReg     = λ · invariance + μ · variance + ν · covariance     (λ, μ, ν) = (25, 25, 1)
//! ```
//!
//! `Var` is the unbiased variance over the batch and `ε = 1e-4`. The halves
//! in the variance term are those of the official code (`main_vicreg.py`)
//! and lightly; the paper's Algorithm 1 omits them (a variance term twice
//! as large). Needs N >= 2.

use super::check_same_shape;
use super::{check_batch, check_float, check_non_negative, check_positive, check_rank};
use crate::config::config;
use crate::ops;
use crate::Result;
use candle_core::Tensor;

config! {
    /// Configuration of [`VicRegLoss`]; defaults from the paper.
    pub struct VicRegLossConfig {
        /// Weight λ >= 0 of the invariance (MSE) term (paper: 25).
        sim_coeff: f64 = 25.0,
        /// Weight μ >= 0 of the variance term (paper: 25).
        std_coeff: f64 = 25.0,
        /// Weight ν >= 0 of the covariance term (paper: 1).
        cov_coeff: f64 = 1.0,
        /// ε > 0 added to the variance before the square root (paper: 1e-4).
        eps: f64 = 1e-4,
    }
}

impl VicRegLossConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        check_non_negative("VicRegLossConfig::sim_coeff", self.sim_coeff)?;
        check_non_negative("VicRegLossConfig::std_coeff", self.std_coeff)?;
        check_non_negative("VicRegLossConfig::cov_coeff", self.cov_coeff)?;
        check_positive("VicRegLossConfig::eps", self.eps)?;
        Ok(())
    }
}

/// The three unweighted VICReg terms and the weighted total (scalars).
#[derive(Debug, Clone)]
pub struct VicRegTerms {
    /// `mean((x − y)²)`.
    pub invariance: Tensor,
    /// The hinge on the standard deviations (both views, halved).
    pub variance: Tensor,
    /// The off-diagonal covariance penalty (both views).
    pub covariance: Tensor,
    /// `sim_coeff · invariance + std_coeff · variance + cov_coeff · covariance`.
    pub total: Tensor,
}

/// VICReg loss (see the module docs).
#[derive(Debug, Clone)]
pub struct VicRegLoss {
    cfg: VicRegLossConfig,
}

impl VicRegLoss {
    /// Validates the configuration.
    pub fn new(cfg: VicRegLossConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &VicRegLossConfig {
        &self.cfg
    }

    /// The terms and the total for two views' embeddings `(N, D)`, N >= 2.
    pub fn terms(&self, x: &Tensor, y: &Tensor) -> Result<VicRegTerms> {
        const OP: &str = "vicreg_loss";
        check_rank(OP, "embeddings (N, D)", x, 2)?;
        check_float(OP, "embeddings", x)?;
        check_same_shape(OP, x, y)?;
        let n = check_batch(OP, x, 2)?;
        let d = x.dim(1)?;
        let y = y.to_dtype(x.dtype())?;
        let invariance = (x - &y)?.sqr()?.mean_all()?;
        let eps = self.cfg.eps;
        let branch = |z: &Tensor| -> Result<(Tensor, Tensor)> {
            let zc = z.broadcast_sub(&z.mean_keepdim(0)?)?;
            let var = (zc.sqr()?.sum(0)? / (n - 1) as f64)?;
            let std = (var + eps)?.sqrt()?;
            let hinge = std.affine(-1.0, 1.0)?.relu()?.mean_all()?;
            let cov = (zc.t()?.matmul(&zc)? / (n - 1) as f64)?;
            let off = if d > 1 {
                (ops::off_diagonal(&cov)?.sqr()?.sum_all()? / d as f64)?
            } else {
                hinge.zeros_like()?
            };
            Ok((hinge, off))
        };
        let (hx, cx) = branch(x)?;
        let (hy, cy) = branch(&y)?;
        let variance = ((hx + hy)? * 0.5)?;
        let covariance = (cx + cy)?;
        let total = (((&invariance * self.cfg.sim_coeff)? + (&variance * self.cfg.std_coeff)?)?
            + (&covariance * self.cfg.cov_coeff)?)?;
        Ok(VicRegTerms {
            invariance,
            variance,
            covariance,
            total,
        })
    }

    /// The weighted VICReg loss of two views' embeddings `(N, D)`, N >= 2.
    pub fn forward(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        Ok(self.terms(x, y)?.total)
    }
}

/// VICReg with the paper's weights (25, 25, 1) for two views' embeddings
/// `(N, D)`, N >= 2.
pub fn vicreg_loss(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    VicRegLoss::new(VicRegLossConfig::default())?.forward(x, y)
}
