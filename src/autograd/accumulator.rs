//! Summing gradients over micro-batches (or tasks) before one step.

use candle_core::{backprop::GradStore, Var};

use super::gradients::{add_named, Gradients};
use crate::{Error, Result};

/// Accumulates gradients over several backward passes, for one optimizer
/// step: micro-batches of a batch that does not fit in memory, or the tasks
/// of a meta-batch.
///
/// Each addition is detached (its graph and activations are freed at once)
/// and carries a weight, by default 1; [`GradAccumulator::mean`] divides the
/// sum by the total weight. With the per-micro-batch mean loss and the
/// micro-batch size as weight, the mean is the gradient of the whole batch's
/// mean loss.
///
/// ```
/// use aimass::prelude::*;
/// use aimass::autograd::{GradAccumulator, Gradients};
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
/// let w = vb.get_with_hints(1, "w", aimass::candle_nn::Init::Const(2.0))?;
/// let mut acc = GradAccumulator::new();
/// for xs in [&[1.0f64, 2.0][..], &[3.0, 4.0, 5.0][..]] {
///     let x = Tensor::new(xs, &Device::Cpu)?;
///     let loss = w.broadcast_mul(&x)?.mean_all()?; // this micro-batch's mean
///     acc.add_weighted(&Gradients::from_varmap(&loss.backward()?, &varmap)?, xs.len() as f64)?;
/// }
/// // The gradient of the mean over all five samples: (1+2+3+4+5)/5 = 3.
/// assert_eq!(acc.mean()?.get("w").unwrap().to_vec1::<f64>()?, vec![3.0]);
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct GradAccumulator {
    sum: Gradients,
    weight: f64,
    count: usize,
}

impl GradAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `grads` with weight 1.
    pub fn add(&mut self, grads: &Gradients) -> Result<()> {
        self.add_weighted(grads, 1.0)
    }

    /// Adds `weight · grads` (e.g. the micro-batch size when each
    /// micro-batch's loss is its mean).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a weight that is not finite and
    /// positive; [`Error::Shape`] when a gradient's shape differs from the
    /// one accumulated under its name. Nothing changes on error.
    pub fn add_weighted(&mut self, grads: &Gradients, weight: f64) -> Result<()> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(Error::invalid(
                "GradAccumulator::add_weighted",
                format!("the weight must be finite and > 0, got {weight}"),
            ));
        }
        let mut sum = self.sum.clone();
        for (name, g) in grads.iter() {
            let g = g.detach();
            let g = if weight == 1.0 { g } else { (g * weight)? };
            let new = match sum.get(name) {
                Some(a) => add_named(name, a, &g)?,
                None => g,
            };
            sum.insert(name, new);
        }
        self.sum = sum;
        self.weight += weight;
        self.count += 1;
        Ok(())
    }

    /// Adds the gradients in `store` of the named variables `params` with
    /// weight 1 (see [`Gradients::from_store`]).
    pub fn add_store(&mut self, store: &GradStore, params: &[(String, Var)]) -> Result<()> {
        self.add(&Gradients::from_store(store, params))
    }

    /// How many gradient sets were added since the last reset.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The total weight added.
    pub fn total_weight(&self) -> f64 {
        self.weight
    }

    /// The weighted sum.
    pub fn sum(&self) -> &Gradients {
        &self.sum
    }

    /// The weighted mean: the sum divided by the total weight.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when nothing was added.
    pub fn mean(&self) -> Result<Gradients> {
        if self.count == 0 {
            return Err(Error::invalid(
                "GradAccumulator::mean",
                "no gradients were added since the last reset",
            ));
        }
        self.sum.scale(1.0 / self.weight)
    }

    /// The mean, and the accumulator emptied for the next step.
    pub fn take_mean(&mut self) -> Result<Gradients> {
        let m = self.mean()?;
        self.reset();
        Ok(m)
    }

    /// Empties the accumulator.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}
