//! Optimizers, gradient clipping, learning-rate schedules and weight EMA,
//! with torch.optim's semantics.
//!
//! Candle ships plain SGD and a single-group AdamW. This module adds the
//! torch.optim toolbox, update rule for update rule:
//!
//! | type | torch | use it for |
//! |---|---|---|
//! | [`Sgd`] | `SGD` (momentum, dampening, Nesterov, L2 weight decay) | CNNs from scratch, SimSiam |
//! | [`Adam`], [`AdamW`] | `Adam`, `AdamW` (bias correction, `amsgrad`) | MLPs, transformers, meta-learning |
//! | [`RmsProp`] | `RMSprop` (`alpha`, `centered`, momentum) | RL, older recipes |
//! | [`Lars`] | SimCLR's / BYOL's LARS | large-batch self-supervised pretraining |
//!
//! Each optimizer takes [`ParamGroup`]s (named variables, a learning-rate
//! multiplier and a weight decay). `from_varmap` uses the default split of
//! [`groups::default_param_groups`]: no weight decay on 1-D parameters
//! (biases, norm scales), BatchNorm running statistics never optimised.
//! Variables without a gradient in a step are left untouched.
//!
//! All optimizers implement this module's [`Optimizer`] (step, learning
//! rate, state export/import for checkpoints) and
//! [`candle_nn::Optimizer`], so they drop into existing candle code (with
//! parameters named `param.0`, `param.1`, ...). Bring only one of the two
//! traits into scope, or call `Optimizer::step(&mut opt, &grads)`.
//!
//! Schedules ([`schedule`]) give the learning rate at a step, exactly as
//! torch.optim.lr_scheduler does; clipping ([`clip_grad_norm`],
//! [`GradClip`]) bounds gradients; [`Ema`] keeps an exponential moving
//! average of weights (BYOL's target network).
//!
//! ```
//! use aimass::prelude::*;
//! use aimass::optim::{AdamW, AdamWConfig, GradClip, Optimizer, Schedule, CosineAnnealingLr};
//!
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! let lin = aimass::candle_nn::linear(3, 1, vb.pp("fc"))?;
//! let x = Tensor::new(&[[1f32, 2., 3.], [0., 1., -1.]], &dev)?;
//! let y = Tensor::new(&[[1f32], [0.]], &dev)?;
//!
//! let cfg = AdamWConfig::default().with_lr(1e-2).with_grad_clip(GradClip::norm(1.0));
//! let mut opt = AdamW::from_varmap(&varmap, cfg)?;
//! let sched = CosineAnnealingLr::new(1e-2, 100, 0.0)?;
//! let mut first = None;
//! let mut last = 0.0;
//! for step in 0..100 {
//!     opt.set_lr(sched.lr(step))?;
//!     let loss = (lin.forward(&x)? - &y)?.sqr()?.mean_all()?;
//!     last = loss.to_scalar::<f32>()?;
//!     first.get_or_insert(last);
//!     opt.step(&loss.backward()?)?;
//! }
//! assert!(last < first.unwrap_or(0.0));
//! let state = opt.state_dict()?; // "fc.weight.exp_avg", ..., "step"
//! assert!(state.contains_key("fc.weight.exp_avg_sq"));
//! # Ok::<(), aimass::Error>(())
//! ```

mod adam;
pub mod clip;
mod ema;
mod fused;
pub mod groups;
mod lars;
mod rmsprop;
pub mod schedule;
mod sgd;
mod state;

use std::collections::HashMap;

use candle_core::{backprop::GradStore, Tensor};

use crate::autograd::Gradients;
use crate::Result;

pub use adam::{Adam, AdamConfig, AdamW, AdamWConfig};
pub use clip::{clip_grad_norm, clip_grad_value, grad_norm, GradClip};
pub use ema::{byol_tau, Ema, EmaConfig};
pub use groups::{default_param_groups, ParamGroup};
pub use lars::{Lars, LarsConfig};
pub use rmsprop::{RmsProp, RmsPropConfig};
pub use schedule::{
    ConstantLr, CosineAnnealingLr, CosineAnnealingWarmRestarts, ExponentialLr, LinearWarmup,
    MultiStepLr, OneCycleConfig, OneCycleLr, PlateauMode, ReduceLrOnPlateau,
    ReduceLrOnPlateauConfig, Schedule, StepLr, ThresholdMode,
};
pub use sgd::{Sgd, SgdConfig};

/// What every aimass optimizer does.
pub trait Optimizer {
    /// Applies one update with the gradients in `grads` (after the
    /// configured clipping). Parameters without a gradient are untouched.
    /// On error (non-finite clipped norm, wrong gradient shape) nothing is
    /// modified.
    fn step(&mut self, grads: &GradStore) -> Result<()>;

    /// Applies one update with gradients the caller assembled, by
    /// parameter name: the mean of a meta-batch's task gradients, micro-batches
    /// from a [`GradAccumulator`](crate::autograd::GradAccumulator),
    /// gradients with respect to functional parameters. Same clipping,
    /// checks and result as [`Optimizer::step`] with the same gradients;
    /// parameters without a gradient are untouched, and a name that is not
    /// a parameter of this optimizer is an error (nothing is modified).
    fn step_gradients(&mut self, grads: &Gradients) -> Result<()>;

    /// Makes `grads` the gradients this optimizer's next step will apply,
    /// before the trainer checks them: called by trainers right after the
    /// backward pass. A data-parallel optimizer
    /// ([`DistributedOptimizer`](crate::distributed::DistributedOptimizer))
    /// replaces its parameters' gradients by their mean over all ranks
    /// here, so every rank's non-finite check, clipping and update see the
    /// same values. The default does nothing; an optimizer that needs it
    /// and is stepped without it does the work in [`Optimizer::step`].
    fn sync_gradients(&mut self, _grads: &mut GradStore) -> Result<()> {
        Ok(())
    }

    /// [`Optimizer::sync_gradients`] for gradients held by name (a
    /// [`Gradients`] value, as the meta-learning trainers compute them):
    /// a data-parallel optimizer replaces its parameters' gradients by
    /// their mean over all ranks, so every rank checks and applies the same
    /// values. The default does nothing.
    fn sync_named_gradients(&mut self, _grads: &mut Gradients) -> Result<()> {
        Ok(())
    }

    /// The base learning rate (each group multiplies it by its `lr_scale`).
    fn lr(&self) -> f64;

    /// Sets the base learning rate, e.g. from a [`Schedule`]. A rate that is
    /// not finite or is negative is refused with
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) and the
    /// rate stays as it was.
    fn set_lr(&mut self, lr: f64) -> Result<()>;

    /// Number of [`Optimizer::step`] calls so far (restored by
    /// [`Optimizer::load_state_dict`]).
    fn step_count(&self) -> u64;

    /// Names of the optimised parameters, in update order.
    fn param_names(&self) -> Vec<String>;

    /// The optimizer state as named tensors (deep copies): `"step"` (the
    /// step count) and `"<param>.<buffer>"` with torch's buffer names
    /// (`momentum_buffer`, `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`,
    /// `square_avg`, `grad_avg`, and the per-parameter `step` of Adam and
    /// RMSprop). Save it with `candle_core::safetensors::save`.
    fn state_dict(&self) -> Result<HashMap<String, Tensor>>;

    /// Replaces the state with one exported by [`Optimizer::state_dict`]
    /// (tensors are copied to the parameters' device and dtype). Entries
    /// for unknown parameters or buffers, or of the wrong shape, are an
    /// error, and then nothing changes.
    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;
}

/// A boxed optimizer is an optimizer, so a program can choose one at run time
/// (`Box<dyn Optimizer>`).
impl<O: Optimizer + ?Sized> Optimizer for Box<O> {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        (**self).step(grads)
    }
    fn step_gradients(&mut self, grads: &Gradients) -> Result<()> {
        (**self).step_gradients(grads)
    }
    fn sync_gradients(&mut self, grads: &mut GradStore) -> Result<()> {
        (**self).sync_gradients(grads)
    }
    fn sync_named_gradients(&mut self, grads: &mut Gradients) -> Result<()> {
        (**self).sync_named_gradients(grads)
    }
    fn lr(&self) -> f64 {
        (**self).lr()
    }
    fn set_lr(&mut self, lr: f64) -> Result<()> {
        (**self).set_lr(lr)
    }
    fn step_count(&self) -> u64 {
        (**self).step_count()
    }
    fn param_names(&self) -> Vec<String> {
        (**self).param_names()
    }
    fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        (**self).state_dict()
    }
    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        (**self).load_state_dict(state)
    }
}

/// Implements [`Optimizer`] and `candle_nn::Optimizer` for a type with a
/// `core: state::Core` field and an `update(&mut self, slot, &grad)` method.
macro_rules! impl_optimizer {
    ($ty:ident, $cfg:ident) => {
        impl $crate::optim::Optimizer for $ty {
            fn step(&mut self, grads: &candle_core::backprop::GradStore) -> $crate::Result<()> {
                $crate::optim::check_lr_before_step(stringify!($ty), self.core.lr)?;
                let gs = self.core.grads(grads)?;
                self.apply(gs)
            }
            fn step_gradients(
                &mut self,
                grads: &$crate::autograd::Gradients,
            ) -> $crate::Result<()> {
                $crate::optim::check_lr_before_step(stringify!($ty), self.core.lr)?;
                let gs = self.core.named_grads(grads)?;
                self.apply(gs)
            }
            fn lr(&self) -> f64 {
                self.core.lr
            }
            fn set_lr(&mut self, lr: f64) -> $crate::Result<()> {
                $crate::optim::check_set_lr(
                    concat!(stringify!($ty), "::set_lr"),
                    lr,
                    self.core.lr,
                )?;
                self.core.lr = lr;
                Ok(())
            }
            fn step_count(&self) -> u64 {
                self.core.step
            }
            fn param_names(&self) -> Vec<String> {
                self.core.names()
            }
            fn state_dict(
                &self,
            ) -> $crate::Result<std::collections::HashMap<String, candle_core::Tensor>> {
                self.core.export()
            }
            fn load_state_dict(
                &mut self,
                state: &std::collections::HashMap<String, candle_core::Tensor>,
            ) -> $crate::Result<()> {
                self.core.import(state)
            }
        }

        impl candle_nn::Optimizer for $ty {
            type Config = $cfg;
            fn new(vars: Vec<candle_core::Var>, config: $cfg) -> candle_core::Result<Self> {
                $ty::new($crate::optim::state::Core::unnamed_group(vars), config)
                    .map_err(candle_core::Error::wrap)
            }
            fn step(
                &mut self,
                grads: &candle_core::backprop::GradStore,
            ) -> candle_core::Result<()> {
                $crate::optim::Optimizer::step(self, grads).map_err(candle_core::Error::wrap)
            }
            fn learning_rate(&self) -> f64 {
                self.core.lr
            }
            /// Sets the learning rate. This method cannot fail, so a rate
            /// that is not finite or is negative is kept and the next
            /// `step` fails with an error saying so (use
            /// [`Optimizer::set_lr`](crate::optim::Optimizer::set_lr) to be
            /// told at once).
            fn set_learning_rate(&mut self, lr: f64) {
                self.core.lr = lr;
            }
        }

        impl $ty {
            fn apply(&mut self, gs: Vec<Option<candle_core::Tensor>>) -> $crate::Result<()> {
                for (i, g) in gs.into_iter().enumerate() {
                    if let Some(g) = g {
                        self.update(i, &g)?;
                    }
                }
                self.core.step += 1;
                Ok(())
            }

            /// Builds the optimizer over the trainable variables of `varmap`
            /// with the default split of
            /// [`default_param_groups`](crate::optim::default_param_groups):
            /// no weight decay on 1-D parameters, buffers left out.
            pub fn from_varmap(varmap: &candle_nn::VarMap, config: $cfg) -> $crate::Result<Self> {
                $ty::new($crate::optim::groups::varmap_param_groups(varmap)?, config)
            }
        }
    };
}
pub(crate) use impl_optimizer;

/// Checks `lr`: finite and >= 0.
pub(crate) fn check_lr(field: &str, lr: f64) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(crate::Error::config(
            field,
            lr,
            "the learning rate must be finite and >= 0",
        ));
    }
    Ok(())
}

/// Refuses a learning rate for `set_lr` (`op`) that is not finite or is
/// negative; `current` is the rate that stays.
pub(crate) fn check_set_lr(op: &str, lr: f64, current: f64) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(crate::Error::invalid(
            op,
            format!("the learning rate must be finite and >= 0, got {lr}; it stays {current}"),
        ));
    }
    Ok(())
}

/// Refuses to step optimizer `owner` with a learning rate that is not
/// finite or is negative (one set through `candle_nn::Optimizer::set_learning_rate`,
/// which cannot return an error).
pub(crate) fn check_lr_before_step(owner: &str, lr: f64) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(crate::Error::invalid(
            format!("{owner}::step"),
            format!("the learning rate is {lr} (set through candle_nn::Optimizer::set_learning_rate, which cannot fail); it must be finite and >= 0: set a valid rate before stepping. Nothing was updated"),
        ));
    }
    Ok(())
}

/// Checks a value in `[0, 1)`.
pub(crate) fn check_unit(field: &str, v: f64) -> Result<()> {
    if !(0.0..1.0).contains(&v) {
        return Err(crate::Error::config(field, v, "must be in [0, 1)"));
    }
    Ok(())
}

/// Checks a finite value >= 0.
pub(crate) fn check_nonneg(field: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        return Err(crate::Error::config(field, v, "must be finite and >= 0"));
    }
    Ok(())
}
