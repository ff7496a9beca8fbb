//! SimSiam's negative cosine similarity with stop-gradient (Chen & He 2021,
//! "Exploring Simple Siamese Representation Learning").
//!
//! ```text
//! D(p, z)   = − mean_i cos(p_i, stopgrad(z_i))
//! symmetric = D(p1, z2)/2 + D(p2, z1)/2
//! ```
//!
//! `p` is the predictor's output, `z` the other view's projection; `z` is
//! detached (`Tensor::detach`), which is what keeps SimSiam from collapsing.
//! The cosine uses torch's `F.cosine_similarity` eps (1e-8). The loss lies in
//! [−1, 1]; −1 is perfect agreement.

use super::{check_batch, check_float, check_positive, check_rank, check_same_shape};
use crate::config::config;
use crate::ops;
use crate::Result;
use candle_core::Tensor;

config! {
    /// Configuration of [`NegativeCosineLoss`].
    pub struct NegativeCosineLossConfig {
        /// `eps` of the cosine similarity (torch's `F.cosine_similarity`: 1e-8).
        eps: f64 = 1e-8,
    }
}

impl NegativeCosineLossConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        check_positive("NegativeCosineLossConfig::eps", self.eps)?;
        Ok(())
    }
}

/// SimSiam's loss (see the module docs).
#[derive(Debug, Clone)]
pub struct NegativeCosineLoss {
    cfg: NegativeCosineLossConfig,
}

impl NegativeCosineLoss {
    /// Validates the configuration.
    pub fn new(cfg: NegativeCosineLossConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &NegativeCosineLossConfig {
        &self.cfg
    }

    /// `D(p, z) = −mean cos(p, stopgrad(z))` for `(N, D)` inputs.
    pub fn forward(&self, p: &Tensor, z: &Tensor) -> Result<Tensor> {
        const OP: &str = "negative_cosine_loss";
        check_rank(OP, "predictions (N, D)", p, 2)?;
        check_float(OP, "predictions", p)?;
        check_same_shape(OP, p, z)?;
        check_batch(OP, p, 1)?;
        let z = z.detach().to_dtype(p.dtype())?;
        let cos = ops::cosine_similarity(p, &z, 1, self.cfg.eps)?;
        Ok(cos.mean_all()?.neg()?)
    }

    /// `D(p1, z2)/2 + D(p2, z1)/2`, the paper's symmetrised loss.
    pub fn forward_symmetric(
        &self,
        p1: &Tensor,
        p2: &Tensor,
        z1: &Tensor,
        z2: &Tensor,
    ) -> Result<Tensor> {
        Ok(((self.forward(p1, z2)? + self.forward(p2, z1)?)? * 0.5)?)
    }
}

/// `−mean cos(p, stopgrad(z))`, SimSiam's `D(p, z)`.
pub fn negative_cosine_loss(p: &Tensor, z: &Tensor) -> Result<Tensor> {
    NegativeCosineLoss::new(NegativeCosineLossConfig::default())?.forward(p, z)
}
