//! MAML: model-agnostic meta-learning, exact second order or first order.

use candle_core::ModuleT;
use candle_nn::VarBuilder;

use crate::config::config;
use crate::meta::gradient::{gradient_meta_api, GradientMeta, Settings};
use crate::meta::TaskLoss;
use crate::nn::Model;
use crate::optim::Optimizer;
use crate::train::NonFinitePolicy;
use crate::{Error, Result};

config! {
    /// Settings of [`Maml`]; defaults are Finn et al.'s sinusoid and
    /// mini-ImageNet settings where they agree.
    pub struct MamlConfig {
        /// Inner learning rate α (default 0.01, Finn et al.'s sinusoid and
        /// mini-ImageNet value; 0.4 on Omniglot).
        inner_lr: f64 = 0.01,
        /// Inner SGD steps per task during meta-training (default 1).
        inner_steps: usize = 1,
        /// Drop the graph of the inner gradients (first-order MAML): the
        /// meta-gradient is the query gradient at the adapted weights.
        /// Default false: exact second order.
        first_order: bool = false,
        /// Run the meta-batch's tasks at once on per-task weights
        /// ([`crate::nn::ParamMap::expand_tasks`]) instead of one after the
        /// other: the same meta-gradient in a few batched operations, for
        /// models of [`crate::nn::Linear`] layers (e.g. [`crate::nn::Mlp`]
        /// without BatchNorm). Default false.
        batch_tasks: bool = false,
        /// The loss of the inner steps and of the query sets (default
        /// cross-entropy).
        loss: TaskLoss = TaskLoss::CrossEntropy,
        /// What to do on a non-finite query loss or meta-gradient (default:
        /// error).
        non_finite: NonFinitePolicy = NonFinitePolicy::Error,
    }
}

/// Checks an inner learning rate and step count.
pub(crate) fn check_inner(cfg: &str, lr: f64, steps: usize) -> Result<()> {
    if !lr.is_finite() {
        return Err(Error::config(
            format!("{cfg}::inner_lr"),
            lr,
            "must be finite",
        ));
    }
    if steps == 0 {
        return Err(Error::config(
            format!("{cfg}::inner_steps"),
            0,
            "must be at least 1",
        ));
    }
    Ok(())
}

/// MAML (Finn et al., "Model-Agnostic Meta-Learning for Fast Adaptation of
/// Deep Networks", ICML 2017): meta-parameters θ from which a few gradient
/// steps on a task's support set give weights that do well on its query
/// set.
///
/// For each task of a meta-batch, the inner loop takes `inner_steps` SGD
/// steps on fast weights, `φ ← φ − α ∇φ L_support(φ)` from `φ = θ`; the
/// meta-gradient is the mean over the tasks of `∇θ L_query(φ(θ))`, and the
/// meta-optimizer (any [`Optimizer`], Adam 1e-3 in the paper) steps θ with
/// it.
///
/// * **Second order** (default): the gradient flows through the inner
///   steps, Hessian-vector products included; exact, checked against
///   finite differences. It needs second-order gradients
///   ([`crate::autograd::enable_second_order`]); [`Maml::new`] fails with a
///   message saying so when they are off, never silently first order.
/// * **First order** (`first_order`): the inner gradients are constants,
///   so the meta-gradient is `∇φ L_query` at the adapted weights.
///
/// Cost of second order: the backward pass of every inner step is kept
/// as a graph (memory about that of one more forward-and-backward per
/// inner step and task) and differentiated again (time about twice the
/// inner step's backward); on the sinusoid MLP a meta-iteration takes
/// about 1.5 times as long as first order's (`docs/meta-learning.md` has
/// the measurements).
///
/// The model is any [`ModuleT`] that `build` can rebuild from a
/// `VarBuilder` (the same function that built it): fast weights are a
/// [`crate::nn::ParamMap`]. Models run in train mode throughout (BatchNorm
/// with the batch's statistics, adaptation and evaluation alike, as MAML's
/// reference code does); the running statistics in the model's `VarMap`
/// are updated by meta-training's forwards but never used by MAML, and
/// [`Maml::evaluate`] leaves them alone.
///
/// Hand-written loops use learn2learn's shape — clone, adapt, evaluate:
///
/// ```
/// use aimass::prelude::*;
/// use aimass::autograd::GradAccumulator;
/// use aimass::meta::{Maml, MamlConfig, Sinusoid, SinusoidConfig, TaskLoss, TaskSampler};
/// use aimass::nn::{init, Mlp, MlpConfig, Model};
/// use aimass::optim::{Adam, AdamConfig};
///
/// aimass::autograd::enable_second_order()?; // first thing in main
/// let dev = Device::Cpu;
/// let build = |vb: VarBuilder| Mlp::new(MlpConfig::new([1, 40, 40, 1]), vb);
/// let varmap = VarMap::new();
/// let model = Model::new(build(init::seeded_var_builder(&varmap, 0, DType::F32, &dev))?, varmap);
/// let opt = Adam::from_varmap(model.varmap(), AdamConfig::default().with_lr(1e-3))?;
/// let mut maml = Maml::new(model, build, opt, MamlConfig::default().with_loss(TaskLoss::Mse))?;
///
/// let tasks = Sinusoid::new(SinusoidConfig::default(), &dev)?;
/// let mse = |p: &Tensor, y: &Tensor| TaskLoss::Mse.loss(p, y);
/// let mut meta_grad = GradAccumulator::new();
/// for i in 0..4 {
///     let task = tasks.task(i)?;
///     let mut learner = maml.clone_for_task()?;
///     learner.adapt(&mse(&learner.forward(&task.support)?, &task.support_targets)?)?;
///     let q = mse(&learner.forward(&task.query)?, &task.query_targets)?;
///     meta_grad.add(&maml.meta_gradients(&q)?)?;
/// }
/// maml.meta_step(&meta_grad.take_mean()?)?;
/// # Ok::<(), aimass::Error>(())
/// ```
///
/// As a trainer it implements [`crate::train::TrainStep`] on
/// [`TaskBatch`](crate::meta::TaskBatch)es, so [`crate::train::Fit`] runs it
/// over [`TaskBatches`](crate::meta::TaskBatches) with schedules,
/// callbacks, checkpoints and exact resume (the checkpoint holds the model,
/// BatchNorm statistics included, and the meta-optimizer's state).
pub struct Maml<M, B, O> {
    core: GradientMeta<M, B, O>,
}

impl<M, B, O> Maml<M, B, O>
where
    M: ModuleT,
    B: Fn(VarBuilder<'static>) -> Result<M>,
    O: Optimizer,
{
    /// MAML on `model`, rebuilt from fast weights by `build`, its
    /// meta-parameters updated by `optimizer` (which holds the model's
    /// parameters, or the ones to meta-learn).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid config; [`Error::InvalidArgument`]
    /// when second order is asked and off on this thread (the message says
    /// how to turn it on, or to ask for first order), or for a model
    /// without parameters.
    pub fn new(model: Model<M>, build: B, optimizer: O, cfg: MamlConfig) -> Result<Self> {
        check_inner("MamlConfig", cfg.inner_lr, cfg.inner_steps)?;
        let settings = Settings::new(
            cfg.inner_lr,
            cfg.inner_steps,
            cfg.first_order,
            cfg.batch_tasks,
            cfg.loss,
            cfg.non_finite,
        );
        Ok(Maml {
            core: GradientMeta::new(model, build, optimizer, settings, "Maml")?,
        })
    }
}

gradient_meta_api!(Maml, "maml");
