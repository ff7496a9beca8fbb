//! Layer normalisation and RMS normalisation over the last dimension.
//!
//! candle-nn's `LayerNorm` and `RmsNorm` dispatch contiguous inputs to fused
//! custom ops that have no backward in candle 0.11, so training through them
//! fails with `BackwardNotSupported`. These are compositions of candle
//! primitives: differentiable to any order, on every device.

use candle_core::{Tensor, D};

use crate::{Error, Result};

fn check_affine(op: &str, x: &Tensor, p: Option<&Tensor>, name: &str) -> Result<()> {
    let last = x.dims().last().copied().unwrap_or(0);
    match p {
        Some(t) if t.dims() != [last] => Err(Error::shape(
            op,
            format!("{name} of shape ({last},)"),
            t.dims(),
        )),
        _ => Ok(()),
    }
}

/// `(x − mean) / sqrt(var + eps) · weight + bias` over the last dim (biased
/// variance, as torch's `F.layer_norm` with `normalized_shape = [d]`).
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    if x.rank() == 0 {
        return Err(Error::shape(
            "layer_norm",
            "a tensor of rank >= 1",
            x.dims(),
        ));
    }
    check_affine("layer_norm", x, weight, "weight")?;
    check_affine("layer_norm", x, bias, "bias")?;
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(w)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

/// `x / sqrt(mean(x²) + eps) · weight` over the last dim.
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if x.rank() == 0 {
        return Err(Error::shape("rms_norm", "a tensor of rank >= 1", x.dims()));
    }
    check_affine("rms_norm", x, weight, "weight")?;
    let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    let y = x.broadcast_div(&rms)?;
    match weight {
        Some(w) => Ok(y.broadcast_mul(w)?),
        None => Ok(y),
    }
}
