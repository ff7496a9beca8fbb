//! The non-finite guard: catch a NaN/Inf loss or gradient before the update.
//!
//! A trainer asks the guard after the backward pass and before the optimizer
//! step. With [`NonFinitePolicy::Error`] (the default) a non-finite value
//! returns [`Error::NonFinite`] naming the quantity and the step; with
//! [`NonFinitePolicy::Skip`] the step is skipped (no update) and counted, up
//! to a limit after which it is an error again. Either way no non-finite
//! value reaches the weights, so a guarded run never checkpoints them.
//!
//! ```
//! use aimass::train::{GuardAction, NonFiniteGuard, NonFinitePolicy};
//!
//! let mut guard = NonFiniteGuard::new(NonFinitePolicy::Skip { max_skips: 2 });
//! assert_eq!(guard.check_value("loss", 0.5, 1)?, GuardAction::Proceed);
//! assert_eq!(guard.check_value("loss", f64::NAN, 2)?, GuardAction::Skip);
//! assert_eq!(guard.skipped(), 1);
//! # Ok::<(), aimass::Error>(())
//! ```

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::host::{self, Reduce};
use crate::{Error, Result};

/// What to do when a loss or gradient is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum NonFinitePolicy {
    /// Stop with [`Error::NonFinite`] (default).
    #[default]
    Error,
    /// Skip the update and count it; after `max_skips` skipped steps, stop
    /// with [`Error::NonFinite`].
    Skip {
        /// How many steps may be skipped in a run.
        max_skips: u64,
    },
}

/// What the trainer should do with the current step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuardAction {
    /// Everything is finite: apply the update.
    Proceed,
    /// Something is not finite: do not update (policy `Skip`).
    Skip,
}

/// Checks losses and gradients for NaN/Inf according to a policy.
#[derive(Debug, Clone, Default)]
pub struct NonFiniteGuard {
    policy: NonFinitePolicy,
    skipped: u64,
}

impl NonFiniteGuard {
    /// A guard with this policy and no skipped steps.
    pub fn new(policy: NonFinitePolicy) -> Self {
        NonFiniteGuard { policy, skipped: 0 }
    }

    /// The policy.
    pub fn policy(&self) -> NonFinitePolicy {
        self.policy
    }

    /// How many steps were skipped so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Restores the skip count (from a checkpoint).
    pub fn set_skipped(&mut self, skipped: u64) {
        self.skipped = skipped;
    }

    /// Checks one scalar (e.g. the loss) at `step`.
    pub fn check_value(&mut self, quantity: &str, value: f64, step: u64) -> Result<GuardAction> {
        if value.is_finite() {
            return Ok(GuardAction::Proceed);
        }
        self.on_non_finite(quantity, value, step)
    }

    /// Checks the loss and the gradients of `vars` at `step`. Each gradient
    /// is reduced to its sum of squares on its device and all of them come
    /// back in one host read (shared with norm clipping, which needs the
    /// same sums: see [`NonFiniteGuard::check_step`]).
    pub fn check(
        &mut self,
        loss: f64,
        grads: &GradStore,
        vars: &[(String, Var)],
        step: u64,
    ) -> Result<GuardAction> {
        if self.check_value("loss", loss, step)? == GuardAction::Skip {
            return Ok(GuardAction::Skip);
        }
        let (action, _) = self.check_reduced(None, &[], grads, vars, step)?;
        Ok(action)
    }

    /// Checks the loss, still a tensor, and the gradients of `vars` at
    /// `step`, and returns the loss value with the action. The loss and
    /// every gradient's sum of squares are computed on the device and read
    /// in one transfer; an optimizer clipping by the 2-norm right after
    /// (`GradClip::norm`) reuses those sums instead of reading again, so a
    /// guarded, clipped step waits for the device once.
    pub fn check_step(
        &mut self,
        loss: &Tensor,
        grads: &GradStore,
        vars: &[(String, Var)],
        step: u64,
    ) -> Result<(GuardAction, f64)> {
        let (action, values) = self.check_reduced(Some(loss), &[], grads, vars, step)?;
        Ok((action, values[0]))
    }

    /// [`NonFiniteGuard::check_step`] that also reads the one-element
    /// tensors `extra` in the same transfer (a trainer's metrics). Returns
    /// the values read: the loss (NaN when none is given), then `extra`.
    pub(crate) fn check_reduced(
        &mut self,
        loss: Option<&Tensor>,
        extra: &[&Tensor],
        grads: &GradStore,
        vars: &[(String, Var)],
        step: u64,
    ) -> Result<(GuardAction, Vec<f64>)> {
        let with_grads: Vec<(&String, &Tensor)> = vars
            .iter()
            .filter_map(|(name, var)| grads.get(var).map(|g| (name, g)))
            .collect();
        let mut items: Vec<(&Tensor, Reduce)> = Vec::new();
        if let Some(l) = loss {
            items.push((l, Reduce::Value));
        }
        items.extend(extra.iter().map(|t| (*t, Reduce::Value)));
        items.extend(with_grads.iter().map(|(_, g)| (*g, Reduce::SumSq)));
        let mut values = host::reduce_and_read(&items)?;
        let sums = values.split_off(values.len() - with_grads.len());
        if loss.is_none() {
            values.insert(0, f64::NAN);
        } else if self.check_value("loss", values[0], step)? == GuardAction::Skip {
            return Ok((GuardAction::Skip, values));
        }
        for ((name, _), s) in with_grads.iter().zip(sums) {
            if !s.is_finite() {
                let action = self.on_non_finite(&format!("gradient of `{name}`"), s, step)?;
                return Ok((action, values));
            }
        }
        Ok((GuardAction::Proceed, values))
    }

    fn on_non_finite(&mut self, quantity: &str, value: f64, step: u64) -> Result<GuardAction> {
        match self.policy {
            NonFinitePolicy::Skip { max_skips } if self.skipped < max_skips => {
                self.skipped += 1;
                Ok(GuardAction::Skip)
            }
            NonFinitePolicy::Skip { max_skips } => Err(Error::non_finite(
                format!("{quantity} (after {max_skips} skipped steps, the limit)"),
                value,
                Some(step),
            )),
            NonFinitePolicy::Error => Err(Error::non_finite(quantity, value, Some(step))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn error_policy_names_quantity_and_step() {
        let mut g = NonFiniteGuard::default();
        let e = g.check_value("loss", f64::INFINITY, 7).unwrap_err();
        assert!(matches!(e, Error::NonFinite { step: Some(7), .. }), "{e}");
        assert!(e.to_string().contains("loss"));
    }

    #[test]
    fn skip_policy_counts_and_limits() {
        let mut g = NonFiniteGuard::new(NonFinitePolicy::Skip { max_skips: 1 });
        assert_eq!(
            g.check_value("loss", f64::NAN, 1).unwrap(),
            GuardAction::Skip
        );
        assert!(g.check_value("loss", f64::NAN, 2).is_err());
        assert_eq!(g.skipped(), 1);
    }

    #[test]
    fn gradients_are_checked() {
        let w = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let loss = (w.as_tensor() * f64::NAN).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let mut g = NonFiniteGuard::default();
        // Loss is NaN too: reported as the loss first.
        assert!(g
            .check(f64::NAN, &grads, &vars, 3)
            .unwrap_err()
            .to_string()
            .contains("loss"));
        let e = g.check(1.0, &grads, &vars, 3).unwrap_err();
        assert!(e.to_string().contains("gradient of `w`"), "{e}");
        let ok = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let grads = (w.as_tensor() * &ok)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(
            g.check(1.0, &grads, &vars, 4).unwrap(),
            GuardAction::Proceed
        );
    }

    #[test]
    fn check_step_returns_the_loss_and_shares_its_read_with_clipping() {
        let w = Var::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let b = Var::new(&[0.5f32], &Device::Cpu).unwrap();
        let vars = vec![("w".to_string(), w.clone()), ("b".to_string(), b.clone())];
        // loss = 0.5·(w·w) + 2·b: gradients w = (3, 4) and b = 2, norm √29.
        let loss = ((w.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap()
            + (b.as_tensor() * 2.0).unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let mut g = NonFiniteGuard::default();
        let start = crate::host::read_count();
        let (action, value) = g.check_step(&loss, &grads, &vars, 1).unwrap();
        assert_eq!((action, value), (GuardAction::Proceed, 13.5));
        let norm = crate::optim::grad_norm(&grads, &[w.clone(), b.clone()], 2.0).unwrap();
        assert!((norm - 29f64.sqrt()).abs() < 1e-6, "{norm}");
        assert_eq!(crate::host::read_count() - start, 1);
        // A NaN loss is skipped (policy Skip) and its value returned.
        let mut g = NonFiniteGuard::new(NonFinitePolicy::Skip { max_skips: 1 });
        let nan = (&loss * f64::NAN).unwrap();
        let grads = nan.backward().unwrap();
        let (action, value) = g.check_step(&nan, &grads, &vars, 2).unwrap();
        assert_eq!(action, GuardAction::Skip);
        assert!(value.is_nan());
        // Then an error naming the loss and the limit.
        let e = g
            .check_step(&nan, &grads, &vars, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("loss") && e.contains("limit"), "{e}");
    }
}
