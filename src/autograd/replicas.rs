//! Differentiable operations across the replicas of a data-parallel run.

use candle_core::Tensor;

use crate::Result;

/// The replicas (ranks) of a data-parallel run, seen from one of them, as
/// differentiable operations: what a layer or a loss needs to compute on
/// the global batch while each rank holds a part of it (synchronised
/// BatchNorm's statistics, contrastive negatives from every rank).
///
/// Defined here, below the layers and losses that use it;
/// [`crate::distributed`] implements it for every communicator
/// (`distributed::replicas`). Every rank must make the same calls in the
/// same order, forward and backward, with tensors of the same dtype (and,
/// for [`Replicas::sum`], the same shape): the calls are collective.
///
/// Gradients follow the chain rule across ranks, so that the mean of the
/// ranks' gradients is the gradient of the loss of the global batch:
///
/// * `y = sum(x)` (the same `y = Σ_r x_r` on every rank): the gradient of
///   `x` on rank `s` is `Σ_r ∂L_r/∂y`, the sum over ranks of the incoming
///   gradients;
/// * `y = gather(x)` (`[x_0; x_1; …]` on every rank): the gradient of `x`
///   on rank `s` is its own rows of `Σ_r ∂L_r/∂y`.
pub trait Replicas: Send + Sync {
    /// This replica's rank, from 0.
    fn rank(&self) -> usize;

    /// The number of replicas.
    fn world_size(&self) -> usize;

    /// `Σ_r x_r`, elementwise, on every rank (differentiable, see the
    /// trait docs).
    fn sum(&self, x: &Tensor) -> Result<Tensor>;

    /// The ranks' tensors concatenated along dimension 0 in rank order, on
    /// every rank (differentiable, see the trait docs); ranks may have
    /// different sizes of dimension 0.
    fn gather(&self, x: &Tensor) -> Result<Gathered>;
}

/// What [`Replicas::gather`] returns.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Gathered {
    /// Every rank's rows, in rank order.
    pub all: Tensor,
    /// Where this rank's rows start in `all`.
    pub offset: usize,
}

impl Gathered {
    /// The gathered rows and where this rank's rows start.
    pub fn new(all: Tensor, offset: usize) -> Self {
        Gathered { all, offset }
    }
}
