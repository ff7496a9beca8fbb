//! Kullback–Leibler divergence with batch-mean reduction.
//!
//! `KL(p ‖ q) = Σ p·(log p − log q)`, summed over all elements and divided by
//! the size of dimension 0, as torch's `F.kl_div(..., reduction="batchmean")`.
//! As in torch, the *input* is `log q` (log-probabilities of the model) and
//! the *target* is `p`.

use candle_core::Tensor;

use crate::{Error, Result};

fn check(op: &str, input: &Tensor, target: &Tensor) -> Result<usize> {
    if input.dims() != target.dims() {
        return Err(Error::shape(
            op,
            format!("target with the input's shape {:?}", input.dims()),
            target.dims(),
        ));
    }
    match input.dims().first() {
        Some(&n) if n > 0 => Ok(n),
        _ => Err(Error::shape(op, "a non-empty batch in dim 0", input.dims())),
    }
}

/// `Σ p·(log p − log_input) / batch` with the target `p` given as
/// probabilities; entries with `p = 0` contribute 0.
pub fn kl_div(log_input: &Tensor, target: &Tensor) -> Result<Tensor> {
    let n = check("kl_div", log_input, target)?;
    // p·log p with 0·log 0 = 0: the clamp keeps log and its gradient finite.
    let tiny = match target.dtype() {
        candle_core::DType::F64 => f64::MIN_POSITIVE,
        _ => f32::MIN_POSITIVE as f64,
    };
    let p_log_p = (target * target.maximum(tiny)?.log()?)?;
    let cross = (target * log_input)?;
    Ok(((p_log_p - cross)?.sum_all()? / n as f64)?)
}

/// `Σ exp(log_target)·(log_target − log_input) / batch`, with the target
/// given as log-probabilities (torch's `log_target=True`): the stable form
/// for distillation, where both sides come from `log_softmax`.
pub fn kl_div_log_target(log_input: &Tensor, log_target: &Tensor) -> Result<Tensor> {
    let n = check("kl_div_log_target", log_input, log_target)?;
    let kl = (log_target.exp()? * (log_target - log_input)?)?;
    Ok((kl.sum_all()? / n as f64)?)
}
