//! A model cloned for one task (or one batch of tasks): forward, adapt.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use candle_core::{ModuleT, Tensor};
use candle_nn::VarBuilder;

use crate::autograd::Gradients;
use crate::nn::ParamMap;
use crate::Result;

/// How a [`Learner`] adapts: one gradient step per [`Learner::adapt`].
#[derive(Debug, Clone)]
pub(crate) struct AdaptRule {
    /// The inner learning rate α (unused with learned rates).
    pub lr: f64,
    /// Drop the graph of the inner gradients.
    pub first_order: bool,
    /// Only parameters whose name starts with this prefix are adapted
    /// (ANIL's head); `None` adapts every parameter.
    pub only: Option<String>,
}

/// A model with fast weights, for one task: learn2learn's `maml.clone()`.
///
/// Made by `clone_for_task` of [`Maml`](crate::meta::Maml),
/// [`Anil`](crate::meta::Anil) or [`MetaSgd`](crate::meta::MetaSgd), its
/// weights start as the meta-learner's and stay connected to them: a loss
/// computed after any number of [`Learner::adapt`] steps back-propagates
/// into the meta-learner's variables, through the inner steps (second
/// order) or around them (first order). Nothing is changed in place.
///
/// [`Learner::forward`] runs the model in train mode: BatchNorm normalises
/// with the statistics of the batch it is given (MAML's reference
/// behaviour, during adaptation and evaluation alike).
///
/// A learner made by `clone_for_tasks(T)` holds per-task weights
/// ([`ParamMap::expand_tasks`]) and runs `T` tasks at once on inputs with a
/// leading task dimension; [`Learner::adapt`] then takes the *mean* of the
/// tasks' losses (what `mean_all` gives for equal task sizes) and steps
/// each task with its own gradient, exactly as `T` separate learners would.
pub struct Learner<'a, M, B> {
    params: ParamMap,
    rates: Option<BTreeMap<String, Tensor>>,
    rule: AdaptRule,
    build: &'a B,
    _model: PhantomData<fn() -> M>,
}

impl<'a, M, B> Learner<'a, M, B>
where
    M: ModuleT,
    B: Fn(VarBuilder<'static>) -> Result<M>,
{
    /// A learner on `params` (connected or detached), adapting with `rule`
    /// and, for Meta-SGD, the learned `rates` (per parameter, already
    /// scaled for task batching).
    pub(crate) fn new(
        params: ParamMap,
        rates: Option<BTreeMap<String, Tensor>>,
        rule: AdaptRule,
        build: &'a B,
    ) -> Self {
        Learner {
            params,
            rates,
            rule,
            build,
            _model: PhantomData,
        }
    }

    /// The model built from the current fast weights.
    pub fn model(&self) -> Result<M> {
        self.params.build(self.build)
    }

    /// The model's output for `x`, in train mode (batch statistics).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.model()?.forward_t(x, true)?)
    }

    /// One inner step: the fast weights become `φ − α·∇φ loss` (with
    /// Meta-SGD, `φ − α ⊙ ∇φ loss` with the learned `α`). `loss` must be
    /// computed from this learner's [`Learner::forward`].
    ///
    /// # Errors
    ///
    /// As [`ParamMap::grad`]: [`crate::Error::InvalidArgument`] when second
    /// order is asked and off on this thread, [`crate::Error::Shape`] for a
    /// loss that is not a scalar.
    pub fn adapt(&mut self, loss: &Tensor) -> Result<()> {
        let grads = self.params.grad(loss, !self.rule.first_order)?;
        let grads: Gradients = match &self.rule.only {
            None => grads,
            Some(prefix) => grads
                .into_iter()
                .filter(|(n, _)| n.starts_with(prefix.as_str()))
                .collect(),
        };
        // The loss is the mean over T stacked tasks; task t's own gradient
        // is T times its share.
        let tasks = self.params.tasks().unwrap_or(1) as f64;
        self.params = match &self.rates {
            None => self.params.sgd_step(&grads, self.rule.lr * tasks)?,
            Some(rates) => self.params.sgd_step_with_rates(&grads, rates)?,
        };
        Ok(())
    }

    /// The fast weights.
    pub fn params(&self) -> &ParamMap {
        &self.params
    }

    /// `Some(T)` for a learner of `T` stacked tasks.
    pub fn tasks(&self) -> Option<usize> {
        self.params.tasks()
    }
}
