//! Classification losses: cross-entropy, binary cross-entropy with logits, MSE.
//!
//! **Cross-entropy** (torch's `F.cross_entropy`, with label smoothing from
//! Szegedy et al. 2016, "Rethinking the Inception Architecture"). With
//! `log p = log_softmax(x)`, `C` classes, smoothing `ε`, class weights `w`
//! (all 1 by default) and rows whose target is the ignore index dropped:
//!
//! ```text
//! ℓ_i  = (1 − ε) · w[y_i] · (−log p_i[y_i])  +  (ε / C) · Σ_c w[c] · (−log p_i[c])
//! mean = Σ_i ℓ_i / Σ_i w[y_i]          (the weighted mean, as torch)
//! ```
//!
//! This is exactly torch's formula, including how weights combine with
//! smoothing (the smoothing term is weighted per class and normalised by the
//! same `Σ w[y_i]`). One difference: when *every* target of a batch is
//! ignored, the mean is 0 here (torch returns NaN, which would poison
//! training).
//!
//! **BCE with logits** (torch's `F.binary_cross_entropy_with_logits`), in the
//! stable form that never exponentiates a positive number:
//!
//! ```text
//! ℓ = (1 − y)·x + (1 + (pos_weight − 1)·y) · (m + log(e^(−m) + e^(−x−m))),   m = max(−x, 0)
//! ```
//!
//! candle-nn's `binary_cross_entropy_with_logit` computes `log(sigmoid(x))`
//! and overflows to inf / NaN around |x| ≈ 30 in f32; this one is finite for
//! any finite logit.
//!
//! **MSE**: `mean((x − y)²)` (torch's `F.mse_loss`).

use super::{
    check_class_range, check_float, check_rank, check_same_shape, class_targets, Reduction,
};
use crate::config::config;
use crate::host;
use crate::ops;
use crate::{Error, Result};
use candle_core::Tensor;

config! {
    /// Configuration of [`CrossEntropyLoss`]; defaults are torch's.
    pub struct CrossEntropyLossConfig {
        /// Label smoothing ε in [0, 1] (torch default 0.0; Inception-v3 used 0.1).
        label_smoothing: f64 = 0.0,
        /// Per-class weights, one per class, finite and >= 0 (torch default: none).
        weight: Option<Vec<f64>> = None,
        /// Targets equal to this index contribute nothing (torch default -100).
        /// Use i64 or u8/u32 targets; a negative index only matches i64 targets.
        ignore_index: Option<i64> = Some(-100),
        /// How the per-sample losses are reduced (torch default: mean).
        reduction: Reduction = Reduction::Mean,
    }
}

impl CrossEntropyLossConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        let e = self.label_smoothing;
        if !(e.is_finite() && (0.0..=1.0).contains(&e)) {
            return Err(Error::config(
                "CrossEntropyLossConfig::label_smoothing",
                e,
                "must be in [0, 1]",
            ));
        }
        if let Some(w) = &self.weight {
            if w.is_empty() {
                return Err(Error::config(
                    "CrossEntropyLossConfig::weight",
                    "[]",
                    "needs one weight per class",
                ));
            }
            if let Some(bad) = w.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
                return Err(Error::config(
                    "CrossEntropyLossConfig::weight",
                    bad,
                    "every class weight must be finite and >= 0",
                ));
            }
        }
        Ok(())
    }
}

/// Cross-entropy between logits `(N, C)` and class indices `(N,)`, with
/// label smoothing, class weights and an ignore index (see the module docs
/// for the formula).
#[derive(Debug, Clone)]
pub struct CrossEntropyLoss {
    cfg: CrossEntropyLossConfig,
}

impl CrossEntropyLoss {
    /// Validates the configuration.
    pub fn new(cfg: CrossEntropyLossConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &CrossEntropyLossConfig {
        &self.cfg
    }

    /// The loss of `logits` `(N, C)` (float) against `targets` `(N,)`
    /// (u8, u32 or i64 class indices in `0..C`, or the ignore index).
    /// Returns a scalar, or `(N,)` for [`Reduction::None`] (ignored rows 0).
    /// For dense predictions `(N, C, H, W)`, move the class dimension last
    /// and flatten to `(N·H·W, C)` first.
    ///
    /// Everything runs on the logits' device: the target log-probabilities
    /// and class weights are picked with `gather` / `index_select`, nothing
    /// is built on the host. On the CPU a target outside `0..C` (and not
    /// the ignore index) is an error naming it; on other devices the
    /// targets are not read back to check them (that would stall the
    /// device every call), and such a row's loss is NaN instead, which the
    /// non-finite guard catches ([`Classifier`](crate::train::Classifier)
    /// then names the target).
    pub fn forward(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        const OP: &str = "cross_entropy_loss";
        check_rank(OP, "logits (N, C)", logits, 2)?;
        check_float(OP, "logits", logits)?;
        let (n, c) = logits.dims2()?;
        if n == 0 || c == 0 {
            return Err(Error::invalid(
                OP,
                format!("empty logits {:?}", logits.dims()),
            ));
        }
        if let Some(w) = &self.cfg.weight {
            if w.len() != c {
                return Err(Error::shape(
                    OP,
                    format!("one class weight per class ({c})"),
                    [w.len()],
                ));
            }
        }
        let y = class_targets(OP, targets, n, c, self.cfg.ignore_index)?;
        let (dt, dev) = (logits.dtype(), logits.device());
        let weight = match &self.cfg.weight {
            Some(w) => Some(host::upload(w, c, dt, dev)?),
            None => None,
        };
        let logp = ops::log_softmax(logits, 1)?;
        // w[y_i] (ignored rows pick class 0; they are zeroed below).
        let w_y = match &weight {
            Some(w) => Some(w.index_select(&y.index, 0)?),
            None => None,
        };
        // −log p_i[y_i], weighted.
        let nll = logp.gather(&y.index.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
        let mut per_row = match &w_y {
            Some(w) => (nll * w)?,
            None => nll,
        };
        let eps = self.cfg.label_smoothing;
        if eps > 0.0 {
            // (ε / C) · Σ_c w[c] · (−log p_i[c]).
            let all = match &weight {
                Some(w) => logp.broadcast_mul(&w.unsqueeze(0)?)?.sum(1)?,
                None => logp.sum(1)?,
            };
            per_row = ((per_row * (1.0 - eps))? + (all * (-eps / c as f64))?)?;
        }
        // Ignored rows are 0 (selected, not multiplied: an infinite log
        // probability there must not turn into NaN).
        let zero_ignored = |t: Tensor| -> Result<Tensor> {
            Ok(match &y.keep {
                Some(k) => k.where_cond(&t, &t.zeros_like()?)?,
                None => t,
            })
        };
        let per_row = y.poison_rows(&zero_ignored(per_row)?)?;
        Ok(match self.cfg.reduction {
            Reduction::None => per_row,
            Reduction::Sum => per_row.sum_all()?,
            Reduction::Mean => {
                // Σ ℓ_i / Σ w[y_i] over the rows that count, 0 when none does.
                let counted = match (&w_y, &y.keep) {
                    (Some(w), _) => zero_ignored(w.clone())?,
                    (None, Some(k)) => k.to_dtype(dt)?,
                    (None, None) => return Ok(per_row.mean_all()?),
                };
                let denom = counted.sum_all()?;
                let none = denom.eq(0.0)?.to_dtype(dt)?;
                let inv = ((denom + &none)?.recip()? * none.affine(-1.0, 1.0)?)?;
                (per_row.sum_all()? * inv)?
            }
        })
    }

    /// Reads `targets` to the host and checks each is in `0..c` or the
    /// ignore index (what [`CrossEntropyLoss::forward`] does itself on the CPU).
    pub(crate) fn check_targets(&self, targets: &Tensor, c: usize) -> Result<()> {
        check_class_range("cross_entropy_loss", targets, c, self.cfg.ignore_index)
    }
}

/// Mean cross-entropy of `logits` `(N, C)` against class indices `(N,)`
/// (torch's `F.cross_entropy(logits, targets)` defaults; targets equal to
/// -100 are ignored). See [`CrossEntropyLoss`] for smoothing, weights, reductions.
pub fn cross_entropy_loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    CrossEntropyLoss::new(CrossEntropyLossConfig::default())?.forward(logits, targets)
}

config! {
    /// Configuration of [`BceWithLogitsLoss`]; defaults are torch's.
    pub struct BceWithLogitsLossConfig {
        /// Weight of the positive term per class (last dimension), torch's
        /// `pos_weight` (default: none, i.e. 1). Finite and >= 0.
        pos_weight: Option<Vec<f64>> = None,
        /// How the per-element losses are reduced (torch default: mean).
        reduction: Reduction = Reduction::Mean,
    }
}

impl BceWithLogitsLossConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if let Some(pw) = &self.pos_weight {
            if pw.is_empty() {
                return Err(Error::config(
                    "BceWithLogitsLossConfig::pos_weight",
                    "[]",
                    "needs one weight per class (last dimension)",
                ));
            }
            if let Some(bad) = pw.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
                return Err(Error::config(
                    "BceWithLogitsLossConfig::pos_weight",
                    bad,
                    "every weight must be finite and >= 0",
                ));
            }
        }
        Ok(())
    }
}

/// Numerically stable binary cross-entropy on logits (see the module docs).
#[derive(Debug, Clone)]
pub struct BceWithLogitsLoss {
    cfg: BceWithLogitsLossConfig,
}

impl BceWithLogitsLoss {
    /// Validates the configuration.
    pub fn new(cfg: BceWithLogitsLossConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &BceWithLogitsLossConfig {
        &self.cfg
    }

    /// The loss of `logits` against `targets` in [0, 1] of the same shape
    /// (any rank >= 1). Scalar, or the element-wise losses for
    /// [`Reduction::None`].
    pub fn forward(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        const OP: &str = "bce_with_logits_loss";
        check_float(OP, "logits", logits)?;
        check_same_shape(OP, logits, targets)?;
        if logits.elem_count() == 0 {
            return Err(Error::invalid(OP, "the batch is empty"));
        }
        let y = targets.to_dtype(logits.dtype())?;
        let x = logits;
        // −log σ(x) = log(1 + e^(−x)) = m + log(e^(−m) + e^(−x−m)) for any
        // constant m; m = max(−x, 0) keeps both exponents <= 0. m is detached:
        // the expression is exact for every m, so all derivatives are too (and
        // there is no kink at x = 0, where |x| and relu disagree on a subgradient).
        let m = x.neg()?.relu()?.detach();
        let softplus_neg = (&m + (m.neg()?.exp()? + (x + &m)?.neg()?.exp()?)?.log()?)?;
        let one_minus_y = y.affine(-1.0, 1.0)?;
        let weighted = match &self.cfg.pos_weight {
            None => softplus_neg,
            Some(pw) => {
                let last = x.dims().last().copied().unwrap_or(1);
                if pw.len() != last && pw.len() != 1 {
                    return Err(Error::shape(
                        OP,
                        format!("pos_weight of length 1 or {last} (the last dimension)"),
                        [pw.len()],
                    ));
                }
                let pw = host::upload(pw, pw.len(), x.dtype(), x.device())?;
                // 1 + (pos_weight − 1) · y
                let lw = (y.broadcast_mul(&(pw - 1.0)?)? + 1.0)?;
                (lw * softplus_neg)?
            }
        };
        let per = ((one_minus_y * x)? + weighted)?;
        Ok(match self.cfg.reduction {
            Reduction::None => per,
            Reduction::Sum => per.sum_all()?,
            Reduction::Mean => per.mean_all()?,
        })
    }
}

/// Mean binary cross-entropy of `logits` against `targets` (same shape,
/// values in [0, 1]); finite for any finite logit, unlike candle-nn's
/// `binary_cross_entropy_with_logit`.
pub fn bce_with_logits_loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    BceWithLogitsLoss::new(BceWithLogitsLossConfig::default())?.forward(logits, targets)
}

config! {
    /// Configuration of [`MseLoss`].
    pub struct MseLossConfig {
        /// How the squared errors are reduced (torch default: mean).
        reduction: Reduction = Reduction::Mean,
    }
}

/// Mean squared error, torch's `F.mse_loss` (no broadcasting: the shapes
/// must match).
#[derive(Debug, Clone)]
pub struct MseLoss {
    cfg: MseLossConfig,
}

impl MseLoss {
    /// Builds the loss (every configuration is valid).
    pub fn new(cfg: MseLossConfig) -> Result<Self> {
        Ok(Self { cfg })
    }

    /// The loss of `input` against `target` (same shape).
    pub fn forward(&self, input: &Tensor, target: &Tensor) -> Result<Tensor> {
        const OP: &str = "mse_loss";
        check_float(OP, "input", input)?;
        check_same_shape(OP, input, target)?;
        if input.elem_count() == 0 {
            return Err(Error::invalid(OP, "the input is empty"));
        }
        let target = if target.dtype() == input.dtype() {
            target.clone()
        } else {
            target.to_dtype(input.dtype())?
        };
        let sq = (input - target)?.sqr()?;
        Ok(match self.cfg.reduction {
            Reduction::None => sq,
            Reduction::Sum => sq.sum_all()?,
            Reduction::Mean => sq.mean_all()?,
        })
    }
}

/// Mean squared error `mean((input − target)²)`.
pub fn mse_loss(input: &Tensor, target: &Tensor) -> Result<Tensor> {
    MseLoss::new(MseLossConfig::default())?.forward(input, target)
}
