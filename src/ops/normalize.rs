//! L2 normalisation and cosine similarity.
//!
//! `l2_normalize(x) = x / max(‖x‖₂, eps)` along `dim`, as torch's
//! `F.normalize`. The norm is computed as `sqrt(max(Σx², eps²))`, which has
//! the same value and a finite gradient for all-zero rows (plain `sqrt` has an
//! infinite derivative at 0 and would give NaN).

use candle_core::shape::Dim;
use candle_core::Tensor;

use crate::{Error, Result};

/// Divides `x` by its L2 norm along `dim`, with the norm clamped below at `eps`.
pub fn l2_normalize<I: Dim + Copy>(x: &Tensor, dim: I, eps: f64) -> Result<Tensor> {
    if eps.is_nan() || eps <= 0.0 {
        return Err(Error::invalid(
            "l2_normalize",
            format!("eps must be > 0, got {eps}"),
        ));
    }
    let norm = x.sqr()?.sum_keepdim(dim)?.maximum(eps * eps)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// Cosine similarity of `a` and `b` along `dim` (which is reduced), as
/// torch's `F.cosine_similarity`: `a·b / (max(‖a‖, eps)·max(‖b‖, eps))`.
pub fn cosine_similarity<I: Dim + Copy>(
    a: &Tensor,
    b: &Tensor,
    dim: I,
    eps: f64,
) -> Result<Tensor> {
    if a.dims() != b.dims() {
        return Err(Error::shape(
            "cosine_similarity",
            format!("b with the shape of a {:?}", a.dims()),
            b.dims(),
        ));
    }
    let an = l2_normalize(a, dim, eps)?;
    let bn = l2_normalize(b, dim, eps)?;
    Ok((an * bn)?.sum(dim)?)
}

/// All pairwise cosine similarities of the rows of `a` (n×d) and `b` (m×d):
/// an n×m matrix. Rows are normalised with eps 1e-8.
pub fn cosine_similarity_matrix(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_rows("cosine_similarity_matrix", a, b)?;
    let an = l2_normalize(a, 1, 1e-8)?;
    let bn = l2_normalize(b, 1, 1e-8)?;
    Ok(an.matmul(&bn.t()?)?)
}

/// Checks that `a` and `b` are matrices with the same number of columns.
pub(crate) fn check_rows(op: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    match (a.dims(), b.dims()) {
        ([_, d1], [_, d2]) if d1 == d2 => Ok(()),
        ([_, d], other) => Err(Error::shape(op, format!("b of shape (m, {d})"), other)),
        (other, _) => Err(Error::shape(op, "a of shape (n, d)", other)),
    }
}
