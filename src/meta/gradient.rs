//! The machinery MAML, ANIL and Meta-SGD share: fast weights, the inner
//! loop, the meta-gradient of a meta-batch, evaluation, checkpoints.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::autograd::{second_order_enabled, GradAccumulator, Gradients, SECOND_ORDER_ENV_VAR};
use crate::host::{reduce_and_read, Reduce};
use crate::meta::learner::AdaptRule;
use crate::meta::task::stack_tasks;
use crate::meta::{Evaluation, Learner, Task, TaskBatch, TaskLoss};
use crate::nn::{Model, ParamMap, StepScope};
use crate::optim::clip::global_norm;
use crate::optim::Optimizer;
use crate::train::{
    BufferSnapshot, Checkpoint, GuardAction, NonFiniteGuard, NonFinitePolicy, StepOutput,
};
use crate::{Error, Result};

/// The prefix of Meta-SGD's learned learning rates in the model's
/// `VarMap`: the rate of parameter `p` is `meta_sgd.lr.p`.
pub const RATE_PREFIX: &str = "meta_sgd.lr.";

/// The settings every gradient-based meta-learner has.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub rule: AdaptRule,
    pub inner_steps: usize,
    pub batch_tasks: bool,
    pub loss: TaskLoss,
    pub learned_rates: bool,
    pub non_finite: NonFinitePolicy,
}

impl Settings {
    /// Plain MAML settings: every parameter adapted with one learning rate.
    pub(crate) fn new(
        inner_lr: f64,
        inner_steps: usize,
        first_order: bool,
        batch_tasks: bool,
        loss: TaskLoss,
        non_finite: NonFinitePolicy,
    ) -> Self {
        Settings {
            rule: AdaptRule {
                lr: inner_lr,
                first_order,
                only: None,
            },
            inner_steps,
            batch_tasks,
            loss,
            learned_rates: false,
            non_finite,
        }
    }
}

/// A model meta-learned by gradient descent through an inner loop.
pub(crate) struct GradientMeta<M, B, O> {
    model: Model<M>,
    build: B,
    optimizer: O,
    settings: Settings,
    guard: NonFiniteGuard,
    buffers: Vec<Var>,
    optimized: BTreeSet<String>,
    /// The public type's name, for messages ("Maml", "Anil", "MetaSgd").
    name: &'static str,
}

impl<M, B, O> GradientMeta<M, B, O>
where
    M: ModuleT,
    B: Fn(VarBuilder<'static>) -> Result<M>,
    O: Optimizer,
{
    pub(crate) fn new(
        model: Model<M>,
        build: B,
        optimizer: O,
        settings: Settings,
        name: &'static str,
    ) -> Result<Self> {
        if !settings.rule.first_order && !second_order_enabled() {
            return Err(Error::invalid(
                format!("{name}::new"),
                format!(
                    "exact second-order {name} differentiates through the inner steps, which needs second-order gradients, and they are off on this thread: call aimass::autograd::enable_second_order() at the start of main (before any backward pass), or start the program with {SECOND_ORDER_ENV_VAR}=1, or choose first order explicitly with {name}Config::with_first_order(true)"
                ),
            ));
        }
        if model.named_parameters()?.is_empty() {
            return Err(Error::invalid(
                format!("{name}::new"),
                "the model has no parameters to meta-learn",
            ));
        }
        let optimized: BTreeSet<String> = optimizer.param_names().into_iter().collect();
        let buffers = model.named_buffers()?.into_iter().map(|(_, v)| v).collect();
        Ok(GradientMeta {
            model,
            build,
            optimizer,
            guard: NonFiniteGuard::new(settings.non_finite),
            settings,
            buffers,
            optimized,
            name,
        })
    }

    pub(crate) fn model(&self) -> &Model<M> {
        &self.model
    }

    pub(crate) fn optimizer(&self) -> &O {
        &self.optimizer
    }

    pub(crate) fn optimizer_mut(&mut self) -> &mut O {
        &mut self.optimizer
    }

    pub(crate) fn skipped_steps(&self) -> u64 {
        self.guard.skipped()
    }

    /// The meta-parameters θ (model parameters, connected to the variables
    /// or detached copies) and, for Meta-SGD, the learned rates by
    /// parameter name.
    fn theta(&self, detached: bool) -> Result<(ParamMap, Option<BTreeMap<String, Tensor>>)> {
        let varmap = self.model.varmap();
        let all = if detached {
            ParamMap::detached_copy(varmap)?
        } else {
            ParamMap::from_varmap(varmap)?
        };
        if !self.settings.learned_rates {
            return Ok((all, None));
        }
        let rates = all
            .params()
            .filter_map(|(n, t)| {
                n.strip_prefix(RATE_PREFIX)
                    .map(|p| (p.to_string(), t.clone()))
            })
            .collect();
        Ok((all.select(|n| !n.starts_with(RATE_PREFIX)), Some(rates)))
    }

    /// A learner on `theta` for one task (`tasks` = None) or `T` stacked
    /// tasks.
    fn learner_on(
        &self,
        theta: ParamMap,
        rates: Option<BTreeMap<String, Tensor>>,
        tasks: Option<usize>,
        first_order: bool,
    ) -> Result<Learner<'_, M, B>> {
        let (params, rates) = match tasks {
            None => (theta, rates),
            Some(t) => {
                // Each task steps with T times its share of the mean loss's
                // gradient (see Learner::adapt): scale learned rates too.
                let rates = match rates {
                    Some(r) => Some(
                        r.into_iter()
                            .map(|(n, a)| Ok((n, (a * t as f64)?)))
                            .collect::<Result<_>>()?,
                    ),
                    None => None,
                };
                (theta.expand_tasks(t)?, rates)
            }
        };
        let rule = AdaptRule {
            first_order: first_order || self.settings.rule.first_order,
            ..self.settings.rule.clone()
        };
        Ok(Learner::new(params, rates, rule, &self.build))
    }

    /// A learner connected to θ, for one task or `tasks` stacked tasks.
    pub(crate) fn clone_for(&self, tasks: Option<usize>) -> Result<Learner<'_, M, B>> {
        let (theta, rates) = self.theta(false)?;
        self.learner_on(theta, rates, tasks, false)
    }

    /// The configured inner loop on `task`'s support set.
    fn adapt_on(&self, learner: &mut Learner<'_, M, B>, task: &Task, steps: usize) -> Result<()> {
        for _ in 0..steps {
            let pred = learner.forward(&task.support)?;
            let loss = self.settings.loss.loss(&pred, &task.support_targets)?;
            learner.adapt(&loss)?;
        }
        Ok(())
    }

    /// A detached copy of θ adapted to `task` with the configured inner
    /// loop (first order: nothing flows back), to keep or to predict with.
    pub(crate) fn adapted(&self, task: &Task) -> Result<ParamMap> {
        let (theta, rates) = self.theta(true)?;
        let mut learner = self.learner_on(theta, rates, None, true)?;
        self.adapt_on(&mut learner, task, self.settings.inner_steps)?;
        Ok(learner.params().clone())
    }

    /// The gradients of `query_loss` with respect to the meta-parameters.
    pub(crate) fn meta_gradients(&self, query_loss: &Tensor) -> Result<Gradients> {
        Gradients::from_varmap(&query_loss.backward()?, self.model.varmap())
    }

    /// One update of the meta-parameters from `grads` (parameters the
    /// optimizer does not hold stay as they are).
    pub(crate) fn meta_step(&mut self, grads: &Gradients) -> Result<()> {
        let kept = self.optimized_only(grads);
        self.optimizer.step_gradients(&kept)
    }

    /// The gradients of the parameters the optimizer holds.
    fn optimized_only(&self, grads: &Gradients) -> Gradients {
        grads
            .iter()
            .filter(|(n, _)| self.optimized.contains(*n))
            .map(|(n, g)| (n.to_string(), g.clone()))
            .collect()
    }

    /// The meta-gradient of `batch` restricted to the optimized parameters
    /// and, with a data-parallel optimizer, averaged over the ranks; the
    /// guard's verdict on it; the loss and accuracy of this rank's tasks.
    fn checked_gradient(
        &mut self,
        batch: &TaskBatch,
        step: u64,
    ) -> Result<(GuardAction, Gradients, f64, Option<f64>)> {
        let (grads, stats) = self.meta_batch_gradient(batch)?;
        let mut grads = self.optimized_only(&grads);
        self.optimizer.sync_named_gradients(&mut grads)?;
        let (loss, acc) = stats.read_with(&grads)?;
        Ok((self.check(loss, &grads, step)?, grads, loss, acc))
    }

    /// The meta-gradient of a meta-batch (the mean over its tasks of the
    /// gradient of the post-adaptation query loss) and what the step
    /// reports (query losses and correct rows, still on the device: they
    /// are read with the meta-gradient's norm, in one transfer).
    fn meta_batch_gradient(&self, batch: &TaskBatch) -> Result<(Gradients, BatchStats)> {
        let steps = self.settings.inner_steps;
        let loss_fn = self.settings.loss;
        if self.settings.batch_tasks {
            let task = batch.stack()?;
            let mut learner = self.clone_for(Some(batch.len()))?;
            self.adapt_on(&mut learner, &task, steps)?;
            let pred = learner.forward(&task.query)?;
            let q = loss_fn.loss(&pred, &task.query_targets)?;
            let mut stats = BatchStats::default();
            stats.add(loss_fn, &q, &pred, &task.query_targets)?;
            return Ok((self.meta_gradients(&q)?, stats));
        }
        let mut grads = GradAccumulator::new();
        let mut stats = BatchStats::default();
        for task in &batch.tasks {
            let mut learner = self.clone_for(None)?;
            self.adapt_on(&mut learner, task, steps)?;
            let pred = learner.forward(&task.query)?;
            let q = loss_fn.loss(&pred, &task.query_targets)?;
            stats.add(loss_fn, &q, &pred, &task.query_targets)?;
            grads.add(&self.meta_gradients(&q)?)?;
        }
        Ok((grads.take_mean()?, stats))
    }

    /// One meta-training step on `batch`.
    pub(crate) fn train_step(&mut self, batch: &TaskBatch, step: u64) -> Result<StepOutput> {
        let _scope = StepScope::enter(step);
        // Train-mode forwards update BatchNorm running statistics: undo
        // them if the step is rejected.
        let saved = BufferSnapshot::take(&self.buffers)?;
        let (action, grads, loss, acc) = match self.checked_gradient(batch, step) {
            Ok(o) => o,
            Err(e) => {
                saved.restore()?;
                return Err(e);
            }
        };
        let tasks = batch.len();
        if action != GuardAction::Proceed {
            saved.restore()?;
            return Ok(StepOutput::new(loss, tasks).skipped(true));
        }
        // Already restricted to the optimized parameters (and synced).
        self.optimizer.step_gradients(&grads)?;
        let out = StepOutput::new(loss, tasks);
        Ok(match acc {
            Some(a) => out.with_metric("query_acc", a),
            None => out,
        })
    }

    /// The non-finite guard on the loss and the meta-gradient's norm.
    fn check(&mut self, loss: f64, grads: &Gradients, step: u64) -> Result<GuardAction> {
        if self.guard.check_value("query loss", loss, step)? == GuardAction::Skip {
            return Ok(GuardAction::Skip);
        }
        let norm = global_norm(grads.iter().map(|(_, g)| g), 2.0)?;
        self.guard.check_value("meta-gradient norm", norm, step)
    }

    /// Query losses (and accuracies) of `tasks` after each count in
    /// `steps` of inner steps from θ (detached copies, first order).
    pub(crate) fn evaluate(&self, tasks: &[Task], steps: &[usize]) -> Result<Evaluation> {
        let loss_fn = self.settings.loss;
        let mut eval = Evaluation::new(steps, loss_fn == TaskLoss::CrossEntropy)?;
        if tasks.is_empty() {
            return Err(Error::invalid(
                format!("{}::evaluate", self.name),
                "no tasks to evaluate",
            ));
        }
        let (theta, rates) = self.theta(true)?;
        let mut run = |task: &Task, tasks: Option<usize>| -> Result<()> {
            let mut learner = self.learner_on(theta.clone(), rates.clone(), tasks, true)?;
            let mut done = 0;
            for (i, &s) in steps.iter().enumerate() {
                self.adapt_on(&mut learner, task, s - done)?;
                done = s;
                let pred = learner.forward(&task.query)?.detach();
                let (l, a) = loss_fn.per_task(&pred, &task.query_targets, tasks.unwrap_or(1))?;
                eval.push(i, &l, a.as_deref());
            }
            Ok(())
        };
        if self.settings.batch_tasks {
            run(&stack_tasks(tasks)?, Some(tasks.len()))?;
        } else {
            for task in tasks {
                run(task, None)?;
            }
        }
        Ok(eval)
    }

    pub(crate) fn save_state(&self, ckpt: &mut Checkpoint) -> Result<()> {
        save_model_and_optimizer(ckpt, self.model.varmap(), &self.optimizer, &self.guard)
    }

    pub(crate) fn load_state(&mut self, ckpt: &Checkpoint) -> Result<()> {
        load_model_and_optimizer(
            ckpt,
            self.model.varmap(),
            &mut self.optimizer,
            &mut self.guard,
        )
    }
}

/// Writes a model's variables, its optimizer's state and the guard's skip
/// count into `ckpt`.
pub(crate) fn save_model_and_optimizer(
    ckpt: &mut Checkpoint,
    varmap: &VarMap,
    optimizer: &impl Optimizer,
    guard: &NonFiniteGuard,
) -> Result<()> {
    ckpt.insert_varmap("model", varmap)?;
    ckpt.insert_tensors("optim", optimizer.state_dict()?.iter());
    ckpt.set_meta("guard.skipped", guard.skipped());
    Ok(())
}

/// Restores what [`save_model_and_optimizer`] wrote, checking first.
pub(crate) fn load_model_and_optimizer(
    ckpt: &Checkpoint,
    varmap: &VarMap,
    optimizer: &mut impl Optimizer,
    guard: &mut NonFiniteGuard,
) -> Result<()> {
    ckpt.check_varmap("model", varmap)?;
    let skipped: u64 = ckpt.meta_parse("guard.skipped")?;
    optimizer.load_state_dict(&ckpt.tensors_with_prefix("optim"))?;
    ckpt.restore_varmap("model", varmap)?;
    guard.set_skipped(skipped);
    Ok(())
}

/// A one-element tensor's value, read through the host gateway.
pub(crate) fn scalar(t: &Tensor) -> Result<f64> {
    Ok(reduce_and_read(&[(t, Reduce::Value)])?[0])
}

/// What a meta-step reports, still on the device: the detached query loss
/// of each task (or of the stacked tasks) and, for classification, the
/// number of correct query predictions with the number of query rows.
#[derive(Default)]
struct BatchStats {
    losses: Vec<Tensor>,
    hits: Vec<(Tensor, usize)>,
}

impl BatchStats {
    /// Records one query prediction: its loss and, for classification,
    /// its correct rows.
    fn add(
        &mut self,
        loss_fn: TaskLoss,
        q: &Tensor,
        pred: &Tensor,
        targets: &Tensor,
    ) -> Result<()> {
        self.losses.push(q.detach());
        if loss_fn == TaskLoss::CrossEntropy {
            let c = pred.dims().last().copied().unwrap_or(0);
            self.hits
                .push(correct_rows(&pred.detach().reshape(((), c))?, targets)?);
        }
        Ok(())
    }

    /// Reads the statistics and the squared norms of `grads` in one host
    /// transfer (the guard's norm is then served from memory); returns the
    /// mean loss and the mean accuracy (each entry's fraction, averaged).
    fn read_with(&self, grads: &Gradients) -> Result<(f64, Option<f64>)> {
        let mut items: Vec<(&Tensor, Reduce)> =
            self.losses.iter().map(|l| (l, Reduce::Value)).collect();
        items.extend(self.hits.iter().map(|(h, _)| (h, Reduce::Value)));
        items.extend(grads.iter().map(|(_, g)| (g, Reduce::SumSq)));
        let v = reduce_and_read(&items)?;
        let n = self.losses.len();
        let loss = v[..n].iter().sum::<f64>() / n.max(1) as f64;
        let acc = (!self.hits.is_empty()).then(|| {
            let fractions = self
                .hits
                .iter()
                .zip(&v[n..])
                .map(|((_, rows), h)| h / (*rows).max(1) as f64);
            fractions.sum::<f64>() / self.hits.len() as f64
        });
        Ok((loss, acc))
    }
}

/// The fraction of rows of `logits` `(n, C)` whose argmax is the label.
pub(crate) fn fraction_correct(logits: &Tensor, labels: &Tensor) -> Result<f64> {
    let (hits, n) = correct_rows(logits, labels)?;
    Ok(scalar(&hits)? / n.max(1) as f64)
}

/// The number of rows of `logits` `(n, C)` whose argmax is the label (a
/// one-element f32 tensor, exact up to 2²⁴ rows), and `n`.
fn correct_rows(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let labels = labels.flatten_all()?.to_dtype(DType::U32)?;
    let n = labels.dim(0)?;
    if logits.dims().first() != Some(&n) {
        return Err(Error::shape(
            "accuracy",
            format!("one row of logits per label ({n})"),
            logits.dims(),
        ));
    }
    let hits = logits.argmax(1)?.to_dtype(DType::U32)?.eq(&labels)?;
    Ok((hits.to_dtype(DType::F32)?.sum_all()?, n))
}

/// Implements the shared API and [`crate::train::TrainStep`] for a public
/// wrapper `$ty { core: GradientMeta<M, B, O> }`.
macro_rules! gradient_meta_api {
    ($ty:ident, $kind:literal) => {
        impl<M, B, O> $ty<M, B, O>
        where
            M: candle_core::ModuleT,
            B: Fn(candle_nn::VarBuilder<'static>) -> $crate::Result<M>,
            O: $crate::optim::Optimizer,
        {
            /// A learner for one task, its fast weights connected to the
            /// meta-parameters (learn2learn's `clone()`): adapt it on the
            /// support loss, compute the query loss from it, and pass that
            /// to [`Self::meta_gradients`].
            pub fn clone_for_task(&self) -> $crate::Result<$crate::meta::Learner<'_, M, B>> {
                self.core.clone_for(None)
            }

            /// A learner for `tasks` tasks run at once on inputs with a
            /// leading task dimension (per-task weights,
            /// [`crate::nn::ParamMap::expand_tasks`]); its
            /// [`adapt`]($crate::meta::Learner::adapt) takes the mean of
            /// the tasks' losses.
            pub fn clone_for_tasks(
                &self,
                tasks: usize,
            ) -> $crate::Result<$crate::meta::Learner<'_, M, B>> {
                self.core.clone_for(Some(tasks))
            }

            /// The gradients of a post-adaptation loss with respect to the
            /// meta-parameters (one backward pass through the inner steps).
            pub fn meta_gradients(
                &self,
                query_loss: &candle_core::Tensor,
            ) -> $crate::Result<$crate::autograd::Gradients> {
                self.core.meta_gradients(query_loss)
            }

            /// Updates the meta-parameters with the meta-optimizer from
            /// `grads` (e.g. the mean of [`Self::meta_gradients`] over a
            /// meta-batch); parameters the optimizer does not hold are
            /// left as they are.
            pub fn meta_step(&mut self, grads: &$crate::autograd::Gradients) -> $crate::Result<()> {
                self.core.meta_step(grads)
            }

            /// A detached copy of the meta-parameters adapted to `task` by
            /// the configured inner loop (first order), e.g. to predict on
            /// new inputs of the task or to write into a model
            /// ([`crate::nn::ParamMap::write_into`]).
            pub fn adapted(
                &self,
                task: &$crate::meta::Task,
            ) -> $crate::Result<$crate::nn::ParamMap> {
                self.core.adapted(task)
            }

            /// Query losses (and, for classification, accuracies) of
            /// `tasks` after each count in `steps` (strictly increasing,
            /// 0 allowed) of inner steps, starting from the
            /// meta-parameters each time: detached copies and first-order
            /// steps, so nothing here changes the model. Tasks run one at a
            /// time, or all at once when the config's `batch_tasks` is on.
            pub fn evaluate(
                &self,
                tasks: &[$crate::meta::Task],
                steps: &[usize],
            ) -> $crate::Result<$crate::meta::Evaluation> {
                self.core.evaluate(tasks, steps)
            }

            /// The model being meta-learned.
            pub fn model(&self) -> &$crate::nn::Model<M> {
                self.core.model()
            }

            /// The meta-optimizer.
            pub fn optimizer(&self) -> &O {
                self.core.optimizer()
            }

            /// Steps skipped by the non-finite guard.
            pub fn skipped_steps(&self) -> u64 {
                self.core.skipped_steps()
            }
        }

        impl<M, B, O> $crate::train::TrainStep for $ty<M, B, O>
        where
            M: candle_core::ModuleT,
            B: Fn(candle_nn::VarBuilder<'static>) -> $crate::Result<M>,
            O: $crate::optim::Optimizer,
        {
            type Batch = $crate::meta::TaskBatch;

            fn train_step(
                &mut self,
                batch: &$crate::meta::TaskBatch,
                step: u64,
            ) -> $crate::Result<$crate::train::StepOutput> {
                self.core.train_step(batch, step)
            }

            fn set_learning_rate(&mut self, lr: f64) -> $crate::Result<()> {
                self.core.optimizer_mut().set_lr(lr)
            }

            fn learning_rate(&self) -> f64 {
                self.core.optimizer().lr()
            }

            fn kind(&self) -> &str {
                $kind
            }

            fn save_state(&self, ckpt: &mut $crate::train::Checkpoint) -> $crate::Result<()> {
                self.core.save_state(ckpt)
            }

            fn load_state(&mut self, ckpt: &$crate::train::Checkpoint) -> $crate::Result<()> {
                self.core.load_state(ckpt)
            }
        }
    };
}
pub(crate) use gradient_meta_api;
