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

/// Reads class indices (u8, u32 or i64 of rank 1 and length `n`) to the host.
pub(crate) fn class_indices(op: &str, targets: &Tensor, n: usize) -> Result<Vec<i64>> {
    if targets.rank() != 1 || targets.dim(0)? != n {
        return Err(Error::shape(
            op,
            format!("class indices of shape [{n}]"),
            targets.dims(),
        ));
    }
    match targets.dtype() {
        DType::U8 | DType::U32 | DType::I64 => {}
        other => {
            return Err(Error::invalid(
                op,
                format!("class indices must be u8, u32 or i64, got {other:?}"),
            ))
        }
    }
    Ok(targets.to_dtype(DType::I64)?.to_vec1::<i64>()?)
}

/// One-hot rows (n, c) in `dtype` for in-range labels; errors on a label
/// outside `0..c`.
pub(crate) fn one_hot(
    op: &str,
    labels: &[i64],
    c: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut m = vec![0f64; labels.len() * c];
    for (i, &y) in labels.iter().enumerate() {
        let k = usize::try_from(y)
            .ok()
            .filter(|&k| k < c)
            .ok_or_else(|| Error::invalid(op, format!("label {y} at row {i} is outside 0..{c}")))?;
        m[i * c + k] = 1.0;
    }
    Ok(Tensor::from_vec(m, (labels.len(), c), device)?.to_dtype(dtype)?)
}
