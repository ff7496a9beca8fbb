//! BYOL's regression loss (Grill et al. 2020, "Bootstrap Your Own Latent").
//!
//! For the online network's prediction `p` and the target network's
//! projection `z` `(N, D)`:
//!
//! ```text
//! byol(p, z)  = mean_i ( 2 − 2 · ⟨p_i/‖p_i‖, z_i/‖z_i‖⟩ )   = mean_i ‖p̂_i − ẑ_i‖²
//! symmetric   = byol(p1, z2) + byol(p2, z1)
//! ```
//!
//! The target `z` is detached (stop-gradient: the target network is updated
//! only by the EMA). The symmetric form is the *sum* of the two directions,
//! as in the paper (`L + L̃`); lightly averages them instead (half of ours).

use super::{check_batch, check_float, check_positive, check_rank, check_same_shape};
use crate::config::config;
use crate::ops;
use crate::Result;
use candle_core::Tensor;

config! {
    /// Configuration of [`ByolLoss`].
    pub struct ByolLossConfig {
        /// `eps` of the L2 normalisation (BYOL's code uses `F.normalize`: 1e-12).
        eps: f64 = 1e-12,
    }
}

impl ByolLossConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        check_positive("ByolLossConfig::eps", self.eps)?;
        Ok(())
    }
}

/// BYOL's `2 − 2·cos` loss (see the module docs).
#[derive(Debug, Clone)]
pub struct ByolLoss {
    cfg: ByolLossConfig,
}

impl ByolLoss {
    /// Validates the configuration.
    pub fn new(cfg: ByolLossConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &ByolLossConfig {
        &self.cfg
    }

    /// `mean(2 − 2·cos(p, z))` for online predictions `p` and target
    /// projections `z` `(N, D)`; `z` is detached.
    pub fn forward(&self, p: &Tensor, z: &Tensor) -> Result<Tensor> {
        const OP: &str = "byol_loss";
        check_rank(OP, "predictions (N, D)", p, 2)?;
        check_float(OP, "predictions", p)?;
        check_same_shape(OP, p, z)?;
        check_batch(OP, p, 1)?;
        let z = z.detach().to_dtype(p.dtype())?;
        let pn = ops::l2_normalize(p, 1, self.cfg.eps)?;
        let zn = ops::l2_normalize(&z, 1, self.cfg.eps)?;
        let cos = (pn * zn)?.sum(1)?;
        Ok(cos.affine(-2.0, 2.0)?.mean_all()?)
    }

    /// `forward(p1, z2) + forward(p2, z1)`: each view's prediction regresses
    /// the other view's target projection.
    pub fn forward_symmetric(
        &self,
        p1: &Tensor,
        p2: &Tensor,
        z1: &Tensor,
        z2: &Tensor,
    ) -> Result<Tensor> {
        Ok((self.forward(p1, z2)? + self.forward(p2, z1)?)?)
    }
}

/// BYOL's `mean(2 − 2·cos(p, z))`, with the target `z` detached.
pub fn byol_loss(p: &Tensor, z: &Tensor) -> Result<Tensor> {
    ByolLoss::new(ByolLossConfig::default())?.forward(p, z)
}
