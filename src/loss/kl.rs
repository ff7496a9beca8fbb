//! Kullback–Leibler divergence, torch's `F.kl_div` argument order.
//!
//! ```text
//! KL(target ‖ input) = Σ target · (log target − log_input)
//! ```
//!
//! As in torch, the *input* is given as log-probabilities and the target as
//! probabilities (or as log-probabilities with `log_target = true`, which is
//! more accurate when probabilities underflow). Terms with `target = 0`
//! contribute 0. [`Reduction::Mean`](super::Reduction::Mean) is torch's
//! `"batchmean"` (the sum divided by the batch size, dimension 0), the only
//! mean that is the KL divergence; torch's element-wise `"mean"` is not
//! offered.

use super::{check_float, check_same_shape, Reduction};
use crate::config::config;
use crate::{Error, Result};
use candle_core::Tensor;

config! {
    /// Configuration of [`KlDivLoss`].
    pub struct KlDivLossConfig {
        /// Reduction; `Mean` is the batch mean (torch's `"batchmean"`).
        reduction: Reduction = Reduction::Mean,
        /// Whether the target is given as log-probabilities (torch's
        /// `log_target`, default false).
        log_target: bool = false,
    }
}

/// KL divergence `KL(target ‖ exp(log_input))`, see the module docs.
#[derive(Debug, Clone)]
pub struct KlDivLoss {
    cfg: KlDivLossConfig,
}

impl KlDivLoss {
    /// Builds the loss (every configuration is valid).
    pub fn new(cfg: KlDivLossConfig) -> Result<Self> {
        Ok(Self { cfg })
    }

    /// The divergence between `log_input` and `target` (same shape, rank >= 1,
    /// the batch along dimension 0).
    pub fn forward(&self, log_input: &Tensor, target: &Tensor) -> Result<Tensor> {
        const OP: &str = "kl_div_loss";
        check_float(OP, "log_input", log_input)?;
        check_float(OP, "target", target)?;
        check_same_shape(OP, log_input, target)?;
        let n = log_input.dims().first().copied().unwrap_or(0);
        if n == 0 || log_input.elem_count() == 0 {
            return Err(Error::invalid(OP, "the batch is empty"));
        }
        let per = if self.cfg.log_target {
            (target.exp()? * (target - log_input)?)?
        } else {
            // xlogy(t, t): log of 1 where t == 0 so that 0·log 0 = 0.
            let pos = target.gt(0.0)?;
            let safe = pos.where_cond(target, &target.ones_like()?)?;
            (target * (safe.log()? - log_input)?)?
        };
        Ok(match self.cfg.reduction {
            Reduction::None => per,
            Reduction::Sum => per.sum_all()?,
            Reduction::Mean => (per.sum_all()? / n as f64)?,
        })
    }
}

/// `KL(target ‖ exp(log_input))` averaged over the batch (torch's
/// `F.kl_div(log_input, target, reduction="batchmean")`).
pub fn kl_div_loss(log_input: &Tensor, target: &Tensor) -> Result<Tensor> {
    KlDivLoss::new(KlDivLossConfig::default())?.forward(log_input, target)
}
