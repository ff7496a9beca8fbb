//! Gradients as values, and second-order differentiation.
//!
//! candle's `loss.backward()` returns a `GradStore` keyed by tensor; an
//! optimizer can step from it directly. Training algorithms often need to
//! assemble gradients first — the mean of a meta-batch's task gradients,
//! micro-batches accumulated before one step, gradients with respect to
//! functional (fast) weights — so aimass also gives gradients as a value:
//!
//! * [`Gradients`]: gradients by parameter name, built from a `GradStore`,
//!   scaled, added, averaged; every optimizer steps from them
//!   ([`crate::optim::Optimizer::step_gradients`]).
//! * [`GradAccumulator`]: a weighted sum over micro-batches or tasks.
//! * Second order: [`enable_second_order`] turns on the graph of gradients
//!   (candle's `CANDLE_GRAD_DO_NOT_DETACH`, read once per thread), and
//!   [`require_second_order`] fails fast where a result would otherwise be
//!   silently first order. MAML's meta-gradient needs it
//!   ([`crate::nn::ParamMap`]).
//! * [`Replicas`]: differentiable sums and gathers across the ranks of a
//!   data-parallel run, for layers and losses that need the global batch
//!   (synchronised BatchNorm); [`crate::distributed`] implements it.
//!
//! ```
//! use aimass::prelude::*;
//! use aimass::autograd::{GradAccumulator, Gradients};
//! use aimass::optim::{Optimizer, Sgd, SgdConfig};
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let lin = aimass::candle_nn::linear(2, 1, vb.pp("fc"))?;
//! let mut opt = Sgd::from_varmap(&varmap, SgdConfig::default().with_lr(0.1))?;
//! // Two micro-batches, one step.
//! let mut acc = GradAccumulator::new();
//! for x in [[[1f32, 0.]], [[0., 1.]]] {
//!     let loss = lin.forward(&Tensor::new(&x, &Device::Cpu)?)?.sqr()?.mean_all()?;
//!     acc.add(&Gradients::from_varmap(&loss.backward()?, &varmap)?)?;
//! }
//! opt.step_gradients(&acc.take_mean()?)?;
//! assert_eq!(opt.step_count(), 1);
//! # Ok::<(), aimass::Error>(())
//! ```

mod accumulator;
mod gradients;
mod replicas;
mod second_order;

pub use accumulator::GradAccumulator;
pub use gradients::Gradients;
pub use replicas::{Gathered, Replicas};
pub use second_order::{
    enable_second_order, require_second_order, second_order_enabled, SECOND_ORDER_ENV_VAR,
};
