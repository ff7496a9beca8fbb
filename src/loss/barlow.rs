//! Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised
//! Learning via Redundancy Reduction"), as in the authors' code.
//!
//! Each view's embeddings `(N, D)` are standardised along the batch like a
//! `BatchNorm1d(affine = false)` in training mode (biased variance, eps
//! 1e-5); then the cross-correlation matrix and the loss are
//!
//! ```text
//! c   = bn(z1)ᵀ · bn(z2) / N                      (D × D)
//! L   = Σ_i (1 − c_ii)²  +  λ · Σ_{i≠j} c_ij²      λ = 5e-3
//! ```
//!
//! lightly standardises with the *unbiased* standard deviation instead (a
//! factor (N−1)/N inside `c`); we follow the authors. Needs N >= 2.

use super::check_same_shape;
use super::{check_batch, check_float, check_non_negative, check_positive, check_rank};
use crate::config::config;
use crate::ops;
use crate::Result;
use candle_core::Tensor;

config! {
    /// Configuration of [`BarlowTwinsLoss`]; defaults from the paper.
    pub struct BarlowTwinsLossConfig {
        /// Weight λ >= 0 of the redundancy-reduction (off-diagonal) term
        /// (paper: 5e-3).
        lambda: f64 = 5e-3,
        /// `eps` added to the variance in the batch standardisation
        /// (`BatchNorm1d` default: 1e-5).
        eps: f64 = 1e-5,
    }
}

impl BarlowTwinsLossConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        check_non_negative("BarlowTwinsLossConfig::lambda", self.lambda)?;
        check_positive("BarlowTwinsLossConfig::eps", self.eps)?;
        Ok(())
    }
}

/// Barlow Twins loss (see the module docs).
#[derive(Debug, Clone)]
pub struct BarlowTwinsLoss {
    cfg: BarlowTwinsLossConfig,
}

/// Standardises each column over the batch (biased variance), like
/// `BatchNorm1d(affine = false)` in training mode.
pub(crate) fn batch_standardize(z: &Tensor, eps: f64) -> Result<Tensor> {
    let centered = z.broadcast_sub(&z.mean_keepdim(0)?)?;
    let var = centered.sqr()?.mean_keepdim(0)?;
    Ok(centered.broadcast_div(&(var + eps)?.sqrt()?)?)
}

impl BarlowTwinsLoss {
    /// Validates the configuration.
    pub fn new(cfg: BarlowTwinsLossConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &BarlowTwinsLossConfig {
        &self.cfg
    }

    /// The loss of two views' embeddings `(N, D)`, N >= 2.
    pub fn forward(&self, z1: &Tensor, z2: &Tensor) -> Result<Tensor> {
        const OP: &str = "barlow_twins_loss";
        check_rank(OP, "embeddings (N, D)", z1, 2)?;
        check_float(OP, "embeddings", z1)?;
        check_same_shape(OP, z1, z2)?;
        let n = check_batch(OP, z1, 2)?;
        let d = z1.dim(1)?;
        let a = batch_standardize(z1, self.cfg.eps)?;
        let b = batch_standardize(&z2.to_dtype(z1.dtype())?, self.cfg.eps)?;
        let c = (a.t()?.matmul(&b)? / n as f64)?;
        let eye = Tensor::eye(d, c.dtype(), c.device())?;
        let diag = (&c * &eye)?.sum(1)?;
        let on = diag.affine(-1.0, 1.0)?.sqr()?.sum_all()?;
        let off = if d > 1 {
            ops::off_diagonal(&c)?.sqr()?.sum_all()?
        } else {
            on.zeros_like()?
        };
        Ok((on + (off * self.cfg.lambda)?)?)
    }
}

/// Barlow Twins loss of two views' embeddings `(N, D)` with weight `lambda`
/// on the off-diagonal term (paper: 5e-3).
pub fn barlow_twins_loss(z1: &Tensor, z2: &Tensor, lambda: f64) -> Result<Tensor> {
    BarlowTwinsLoss::new(BarlowTwinsLossConfig::default().with_lambda(lambda))?.forward(z1, z2)
}
