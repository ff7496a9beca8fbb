//! Losses: classification, distillation and self-supervised.
//!
//! Every loss comes in two forms that share one implementation, named as
//! torch's and lightly's classes are:
//!
//! - a **function** `xxx_loss` for the common case, with the paper's
//!   hyperparameters as arguments (`nt_xent_loss(&z1, &z2, 0.5)`,
//!   `kd_loss(&s, &t, 4.0)`); parts of one loss keep its prefix
//!   (`rkd_distance_loss`, `rkd_angle_loss`);
//! - a **configured** form, `XxxLoss::new(XxxLossConfig)` then `.forward(...)`,
//!   whose `XxxLossConfig::default()` holds the paper's values and whose constructor
//!   rejects bad values (temperature ≤ 0, smoothing outside [0, 1], ...) with
//!   [`Error::Config`] naming the field.
//!
//! Every loss checks its inputs (ranks, matching shapes, empty batches, a
//! batch of one for contrastive losses) and returns an [`Error`]
//! instead of panicking or producing a silent NaN. All of them are
//! differentiable with candle's autograd (they are built from `crate::ops` and
//! candle ops that have a backward pass) and were checked against PyTorch
//! reference values and central finite differences (`tests/loss.rs`).
//!
//! | family | losses |
//! |---|---|
//! | classification | [`cross_entropy_loss`] (label smoothing, class weights, ignore index), [`bce_with_logits_loss`] (stable for any logit), [`mse_loss`], [`kl_div_loss`] |
//! | distillation | [`kd_loss`] / [`KdLoss`] (Hinton), [`dkd_loss`] (decoupled KD), [`HintLoss`] (FitNets), [`attention_transfer_loss`], [`rkd_distance_loss`] / [`rkd_angle_loss`] / [`RkdLoss`] |
//! | self-supervised | [`nt_xent_loss`] (SimCLR), [`info_nce_loss`] (MoCo, with a [`KeyQueue`] of negatives), [`byol_loss`], [`negative_cosine_loss`] (SimSiam), [`barlow_twins_loss`], [`vicreg_loss`] |
//!
//! Targets and teachers are never differentiated: teacher logits and
//! features, BYOL/SimSiam targets and MoCo keys and queues are detached
//! inside the loss, so gradients flow only into what is being trained.
//!
//! `docs/losses.md` gives the formulas, the conventions chosen where
//! libraries disagree (KD's `alpha`, attention-transfer normalisation,
//! VICReg's variance term) and when to use which loss.
//!
//! ```
//! use aimass::candle::{Device, Tensor};
//! use aimass::loss::{cross_entropy_loss, nt_xent_loss, CrossEntropyLoss, CrossEntropyLossConfig};
//!
//! let dev = Device::Cpu;
//! let logits = Tensor::new(&[[2.0f32, 0.5, -1.0], [0.1, 0.2, 3.0]], &dev)?;
//! let labels = Tensor::new(&[0u32, 2], &dev)?;
//! let plain = cross_entropy_loss(&logits, &labels)?;
//! let smoothed = CrossEntropyLoss::new(CrossEntropyLossConfig::default().with_label_smoothing(0.1))?
//!     .forward(&logits, &labels)?;
//! assert!(smoothed.to_scalar::<f32>()? > plain.to_scalar::<f32>()?);
//!
//! // SimCLR's NT-Xent between two views' projections (batch of 2, dim 3).
//! let z1 = Tensor::new(&[[1.0f32, 0.0, 0.2], [0.0, 1.0, 0.1]], &dev)?;
//! let z2 = Tensor::new(&[[0.9f32, 0.1, 0.2], [0.1, 0.8, 0.0]], &dev)?;
//! let loss = nt_xent_loss(&z1, &z2, 0.5)?;
//! assert!(loss.to_scalar::<f32>()?.is_finite());
//! # Ok::<(), aimass::Error>(())
//! ```

mod attention;
mod barlow;
mod byol;
mod classification;
mod contrastive;
mod dkd;
mod hint;
mod kd;
mod kl;
mod negative_cosine;
mod queue;
mod rkd;
mod vicreg;

pub use attention::{attention_transfer_loss, AttentionTransferLoss, AttentionTransferLossConfig};
pub use barlow::{barlow_twins_loss, BarlowTwinsLoss, BarlowTwinsLossConfig};
pub use byol::{byol_loss, ByolLoss, ByolLossConfig};
pub use classification::{
    bce_with_logits_loss, cross_entropy_loss, mse_loss, BceWithLogitsLoss, BceWithLogitsLossConfig,
    CrossEntropyLoss, CrossEntropyLossConfig, MseLoss, MseLossConfig,
};
pub use contrastive::{
    info_nce_loss, nt_xent_loss, InfoNceLoss, InfoNceLossConfig, NtXentLoss, NtXentLossConfig,
};
pub use dkd::{dkd_loss, DkdLoss, DkdLossConfig};
pub use hint::{hint_loss, HintLoss, HintLossConfig, HintRegressor};
pub use kd::{kd_loss, KdLoss, KdLossConfig};
pub use kl::{kl_div_loss, KlDivLoss, KlDivLossConfig};
pub use negative_cosine::{negative_cosine_loss, NegativeCosineLoss, NegativeCosineLossConfig};
pub use queue::KeyQueue;
pub use rkd::{rkd_angle_loss, rkd_distance_loss, RkdLoss, RkdLossConfig};
pub use vicreg::{vicreg_loss, VicRegLoss, VicRegLossConfig, VicRegTerms};

use crate::{Error, Result};
use candle_core::{DType, Tensor};

/// How per-element (or per-sample) losses are combined, as torch's
/// `reduction` argument.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reduction {
    /// The mean (torch's `"mean"`, the default). For [`cross_entropy_loss`] with
    /// class weights it is the weighted mean, as in torch; for [`kl_div_loss`] it
    /// is the *batch* mean (torch's `"batchmean"`).
    #[default]
    Mean,
    /// The sum (torch's `"sum"`).
    Sum,
    /// No reduction: one value per sample or element (torch's `"none"`).
    None,
}

/// Errors unless `t` has rank `rank`.
pub(crate) fn check_rank(op: &str, what: &str, t: &Tensor, rank: usize) -> Result<()> {
    if t.rank() != rank {
        return Err(Error::shape(op, format!("{what} of rank {rank}"), t.dims()));
    }
    Ok(())
}

/// Errors unless `a` and `b` have the same shape.
pub(crate) fn check_same_shape(op: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::shape(
            op,
            format!("both inputs of shape {:?}", a.dims()),
            b.dims(),
        ));
    }
    Ok(())
}

/// Errors unless `t` is a floating-point tensor.
pub(crate) fn check_float(op: &str, what: &str, t: &Tensor) -> Result<()> {
    if !t.dtype().is_float() {
        return Err(Error::invalid(
            op,
            format!("{what} must be floating point, got {:?}", t.dtype()),
        ));
    }
    Ok(())
}

/// Errors unless dimension 0 of `t` has at least `min` rows.
pub(crate) fn check_batch(op: &str, t: &Tensor, min: usize) -> Result<usize> {
    let n = t.dims().first().copied().unwrap_or(0);
    if n < min {
        let why = if n == 0 {
            "the batch is empty".to_string()
        } else {
            format!("needs a batch of at least {min}, got {n}")
        };
        return Err(Error::invalid(op, why));
    }
    Ok(n)
}

/// Errors unless `v` is finite and strictly positive.
pub(crate) fn check_positive(field: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        return Err(Error::config(field, v, "must be finite and > 0"));
    }
    Ok(())
}

/// Errors unless `v` is finite and >= 0.
pub(crate) fn check_non_negative(field: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        return Err(Error::config(field, v, "must be finite and >= 0"));
    }
    Ok(())
}

/// Class indices prepared for `gather` / `index_select` on their device.
pub(crate) struct ClassTargets {
    /// `(N,)` u32, in `0..C` on every row (ignored or bad rows hold 0).
    pub index: Tensor,
    /// `(N,)` u8, 1 on rows that count (not the ignore index); `None` when
    /// every row counts.
    pub keep: Option<Tensor>,
    /// `(N,)` u8, 1 on rows whose target is outside `0..C`. Only off the
    /// CPU: there the targets are not read to check them (a read per call
    /// would stall the device), so a loss makes those rows NaN instead.
    pub bad: Option<Tensor>,
}

impl ClassTargets {
    /// `per_row` `(N,)` with the rows of bad targets set to NaN.
    pub fn poison_rows(&self, per_row: &Tensor) -> Result<Tensor> {
        match &self.bad {
            None => Ok(per_row.clone()),
            Some(bad) => {
                let nan = crate::host::full(
                    f64::NAN,
                    per_row.shape(),
                    per_row.dtype(),
                    per_row.device(),
                )?;
                Ok(bad.where_cond(&nan, per_row)?)
            }
        }
    }

    /// The scalar `loss`, NaN when any target is bad.
    pub fn poison(&self, loss: &Tensor) -> Result<Tensor> {
        match &self.bad {
            None => Ok(loss.clone()),
            Some(bad) => {
                let any = bad.max_keepdim(0)?.reshape(())?;
                let nan = crate::host::full(f64::NAN, (), loss.dtype(), loss.device())?;
                Ok(any.where_cond(&nan, loss)?)
            }
        }
    }
}

/// Errors unless `targets` are class indices (u8, u32 or i64) of shape `(n,)`.
fn check_class_indices(op: &str, targets: &Tensor, n: usize) -> Result<()> {
    if targets.rank() != 1 || targets.dim(0)? != n {
        return Err(Error::shape(
            op,
            format!("class indices of shape [{n}]"),
            targets.dims(),
        ));
    }
    match targets.dtype() {
        DType::U8 | DType::U32 | DType::I64 => Ok(()),
        other => Err(Error::invalid(
            op,
            format!("class indices must be u8, u32 or i64, got {other:?}"),
        )),
    }
}

/// The largest value of an integer dtype, as i64 (`None`: any i64).
fn max_index(dtype: DType) -> Option<i64> {
    match dtype {
        DType::U8 => Some(u8::MAX as i64),
        DType::U32 => Some(u32::MAX as i64),
        _ => None,
    }
}

/// `t` compared with the integer `v` (which fits `t`'s dtype).
fn cmp_int(t: &Tensor, v: i64, op: candle_core::op::CmpOp) -> Result<Tensor> {
    Ok(match t.dtype() {
        DType::U8 => t.cmp(v as u8, op)?,
        DType::U32 => t.cmp(v as u32, op)?,
        _ => t.cmp(v, op)?,
    })
}

/// Reads class indices to the host and checks each is in `0..c` or the
/// ignore index: an error names the first that is not.
pub(crate) fn check_class_range(
    op: &str,
    targets: &Tensor,
    c: usize,
    ignore: Option<i64>,
) -> Result<()> {
    check_class_indices(op, targets, targets.dims().first().copied().unwrap_or(0))?;
    // host-ok: validation, on the CPU or after a step already failed.
    let y = targets.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    for (i, &yi) in y.iter().enumerate() {
        if Some(yi) == ignore {
            continue;
        }
        if usize::try_from(yi).ok().filter(|&k| k < c).is_none() {
            let why = match ignore {
                Some(ig) => format!("is outside 0..{c} and not the ignore index {ig}"),
                None => format!("is outside 0..{c}"),
            };
            return Err(Error::invalid(op, format!("target {yi} at row {i} {why}")));
        }
    }
    Ok(())
}

/// Prepares class indices `(n,)` (u8, u32 or i64) over `c` classes for use
/// on their device. On the CPU every target is checked (an error names the
/// first outside `0..c` that is not `ignore`); elsewhere nothing is read
/// back and bad rows are marked in [`ClassTargets::bad`].
pub(crate) fn class_targets(
    op: &str,
    targets: &Tensor,
    n: usize,
    c: usize,
    ignore: Option<i64>,
) -> Result<ClassTargets> {
    use candle_core::op::CmpOp;
    check_class_indices(op, targets, n)?;
    let on_cpu = crate::host::on_cpu(targets.device());
    if on_cpu {
        check_class_range(op, targets, c, ignore)?;
    }
    let dt = targets.dtype();
    let fits = |v: i64| v >= 0 && max_index(dt).is_none_or(|m| v <= m);
    // An ignore index the dtype cannot hold matches nothing.
    let keep = match ignore {
        Some(ig) if fits(ig) || dt == DType::I64 => Some(cmp_int(targets, ig, CmpOp::Ne)?),
        _ => None,
    };
    // In range: below c (always, when the dtype cannot reach c) and >= 0.
    let mut ok = if fits(c as i64) {
        Some(cmp_int(targets, c as i64, CmpOp::Lt)?)
    } else {
        None
    };
    if dt == DType::I64 {
        let nonneg = cmp_int(targets, 0, CmpOp::Ge)?;
        ok = Some(match ok {
            Some(o) => o.mul(&nonneg)?,
            None => nonneg,
        });
    }
    let bad = match (&ok, on_cpu) {
        (Some(o), false) => {
            let out = o.eq(0u8)?;
            Some(match &keep {
                Some(k) => out.mul(k)?,
                None => out,
            })
        }
        _ => None,
    };
    let usable = match (&ok, &keep) {
        (Some(o), Some(k)) => Some(o.mul(k)?),
        (Some(o), None) => Some(o.clone()),
        (None, Some(k)) => Some(k.clone()),
        (None, None) => None,
    };
    let index = match usable {
        Some(u) => u.where_cond(targets, &targets.zeros_like()?)?,
        None => targets.clone(),
    }
    .to_dtype(DType::U32)?;
    Ok(ClassTargets { index, keep, bad })
}

/// One-hot rows `(n, c)` in `dtype` built on the device from prepared
/// targets (bad rows are all zero; losses poison them).
pub(crate) fn one_hot(targets: &ClassTargets, c: usize, dtype: DType) -> Result<Tensor> {
    // host-ok: the class ids 0..c (u32), a small upload.
    let classes = Tensor::arange(0u32, c as u32, targets.index.device())?.unsqueeze(0)?;
    Ok(targets
        .index
        .unsqueeze(1)?
        .broadcast_eq(&classes)?
        .to_dtype(dtype)?)
}
