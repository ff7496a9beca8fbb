//! Differentiable tensor ops that candle lacks or gets wrong.
//!
//! Everything here is differentiable through candle's autograd, to second
//! order where meta-learning needs it (verified against finite differences
//! in `tests/ops.rs` and `tests/ops_second_order.rs`):
//!
//! - normalisation and similarity: [`l2_normalize`], [`cosine_similarity`],
//!   [`cosine_similarity_matrix`];
//! - probabilities: [`softmax`], [`log_softmax`], [`logsumexp`] along any
//!   dim, numerically stable; [`kl_div`] and [`kl_div_log_target`]
//!   (batch mean);
//! - geometry: [`pairwise_squared_distances`], [`pairwise_distances`],
//!   [`off_diagonal`];
//! - **replacements for candle 0.11 ops with a wrong or missing backward**:
//!   [`max_pool2d`] (candle scales the gradient by 1/(k·k) and rejects
//!   kernel ≠ stride), [`layer_norm`] and [`rms_norm`] (candle-nn's fused
//!   versions have no backward), [`softmax_last_dim`] (likewise). Later
//!   modules use these, never candle's;
//! - [`conv2d`], [`avg_pool2d`], [`global_avg_pool2d`]: the entry points
//!   that models call, so that fast CPU kernels can take over on the CPU.
//!
//! ```
//! use aimass::candle::{Device, Tensor, Var};
//!
//! let x = Var::new(&[[1.0f64, 2.0, 3.0]], &Device::Cpu)?;
//! let p = aimass::ops::softmax(x.as_tensor(), 1)?;
//! let loss = p.narrow(1, 2, 1)?.sum_all()?;
//! let grads = loss.backward()?;
//! // d p_2 / d x_2 = p_2 (1 - p_2)
//! let p2 = p.to_vec2::<f64>()?[0][2];
//! let g = grads.get(&x).unwrap().to_vec2::<f64>()?[0][2];
//! assert!((g - p2 * (1.0 - p2)).abs() < 1e-12);
//! # Ok::<(), aimass::Error>(())
//! ```

mod activation;
mod conv;
mod distance;
pub mod kernels;
mod kl;
mod norm;
mod normalize;
mod pool;
mod softmax;

pub use activation::relu;
pub use conv::{conv2d, Conv2dParams};
pub use distance::{off_diagonal, pairwise_distances, pairwise_squared_distances};
pub use kl::{kl_div, kl_div_log_target};
pub use norm::{layer_norm, rms_norm};
pub use normalize::{cosine_similarity, cosine_similarity_matrix, l2_normalize};
pub use pool::{
    avg_pool2d, avg_pool2d_composed, global_avg_pool2d, max_pool2d, max_pool2d_composed,
};
pub use softmax::{log_softmax, logsumexp, softmax, softmax_last_dim};
