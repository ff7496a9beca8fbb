//! Pairwise distances (ProtoNets, RKD) and the off-diagonal of a square
//! matrix (Barlow Twins).

use candle_core::Tensor;

use super::normalize::check_rows;
use crate::{Error, Result};

/// Squared Euclidean distances between the rows of `a` (n×d) and `b` (m×d):
/// `‖a_i‖² + ‖b_j‖² − 2 a_i·b_j`, clamped at 0 against rounding, as n×m.
pub fn pairwise_squared_distances(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_rows("pairwise_squared_distances", a, b)?;
    let aa = a.sqr()?.sum_keepdim(1)?;
    let bb = b.sqr()?.sum_keepdim(1)?.t()?;
    let ab = a.matmul(&b.t()?)?;
    Ok(aa.broadcast_add(&bb)?.sub(&(ab * 2.0)?)?.relu()?)
}

/// Euclidean distances between the rows of `a` and `b`:
/// `sqrt(max(d², eps))` (RepDistiller's RKD convention), as n×m. The clamp
/// keeps the gradient finite where two rows coincide.
pub fn pairwise_distances(a: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if eps.is_nan() || eps <= 0.0 {
        return Err(Error::invalid(
            "pairwise_distances",
            format!("eps must be > 0, got {eps}"),
        ));
    }
    Ok(pairwise_squared_distances(a, b)?.maximum(eps)?.sqrt()?)
}

/// The n·(n−1) off-diagonal entries of a square n×n matrix, row by row.
pub fn off_diagonal(x: &Tensor) -> Result<Tensor> {
    let n = match x.dims() {
        [n, m] if n == m => *n,
        other => {
            return Err(Error::shape(
                "off_diagonal",
                "a square matrix (n, n)",
                other,
            ))
        }
    };
    if n < 2 {
        return Err(Error::shape(
            "off_diagonal",
            "a square matrix with n >= 2",
            x.dims(),
        ));
    }
    // Dropping the last element and viewing the rest as (n-1)×(n+1) puts
    // every diagonal element in column 0.
    Ok(x.flatten_all()?
        .narrow(0, 0, n * n - 1)?
        .reshape((n - 1, n + 1))?
        .narrow(1, 1, n)?
        .flatten_all()?)
}
