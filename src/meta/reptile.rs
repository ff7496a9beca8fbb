//! Reptile: move the initialisation towards each task's adapted weights.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::config::config;
use crate::distributed::Communicator;
use crate::meta::{Evaluation, Task, TaskBatch, TaskLoss};
use crate::nn::params::{deep_copy, dtype_device, named_vars};
use crate::nn::{Model, StepScope};
use crate::optim::clip::global_norm;
use crate::optim::{Adam, AdamConfig, Optimizer, Sgd, SgdConfig};
use crate::train::{
    Checkpoint, GuardAction, NonFiniteGuard, NonFinitePolicy, StepOutput, TrainStep,
};
use crate::{Error, Result};

/// The optimizer of Reptile's inner loop, fresh for every task.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum InnerOptimizer {
    /// Plain SGD.
    Sgd,
    /// Adam with `β = (0, 0.999)` (Nichol et al.'s inner optimizer;
    /// default).
    #[default]
    Adam,
}

config! {
    /// Settings of [`Reptile`]; defaults are Nichol et al.'s Omniglot
    /// settings.
    pub struct ReptileConfig {
        /// Inner steps per task (default 5).
        inner_steps: usize = 5,
        /// Learning rate of the inner optimizer (default 1e-3).
        inner_lr: f64 = 1e-3,
        /// The inner optimizer (default Adam with β₁ = 0).
        inner_optimizer: InnerOptimizer = InnerOptimizer::Adam,
        /// The outer step size ε of `θ ← θ + ε (mean φ − θ)` (default 1,
        /// annealed linearly to 0 over training in the paper: give
        /// [`crate::train::Fit`] a schedule; it sets ε as the learning rate).
        epsilon: f64 = 1.0,
        /// The loss of the inner steps and of the query sets (default
        /// cross-entropy).
        loss: TaskLoss = TaskLoss::CrossEntropy,
        /// What to do on a non-finite loss or adapted weight (default: error).
        non_finite: NonFinitePolicy = NonFinitePolicy::Error,
    }
}

impl ReptileConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        crate::meta::maml::check_inner("ReptileConfig", self.inner_lr, self.inner_steps)?;
        if !(self.epsilon.is_finite() && self.epsilon >= 0.0) {
            return Err(Error::config(
                "ReptileConfig::epsilon",
                self.epsilon,
                "must be finite and >= 0",
            ));
        }
        Ok(())
    }
}

/// Reptile (Nichol, Achiam and Schulman, "On First-Order Meta-Learning
/// Algorithms", 2018): for each task of a meta-batch, train a copy of the
/// model for `inner_steps` steps on the task's support set with a fresh
/// inner optimizer, giving `φ_i`; then move the model towards their mean,
/// `θ ← θ + ε (mean_i φ_i − θ)`. No second-order gradients, no query
/// gradient: the query set only reports the adapted loss.
///
/// Every variable moves, BatchNorm running statistics included (each copy
/// runs in train mode and updates its own). The outer step ε is the
/// trainer's learning rate ([`TrainStep::set_learning_rate`]), so a
/// [`crate::train::Fit`] schedule anneals it.
///
/// ```
/// use aimass::prelude::*;
/// use aimass::meta::{Reptile, ReptileConfig, Sinusoid, SinusoidConfig, TaskBatch, TaskLoss, TaskSampler};
/// use aimass::nn::{init, Mlp, MlpConfig, Model};
///
/// let build = |vb: VarBuilder| Mlp::new(MlpConfig::new([1, 40, 40, 1]), vb);
/// let varmap = VarMap::new();
/// let model = Model::new(build(init::seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu))?, varmap);
/// let cfg = ReptileConfig::default().with_loss(TaskLoss::Mse).with_epsilon(0.1);
/// let mut reptile = Reptile::new(model, build, cfg)?;
/// let tasks = Sinusoid::new(SinusoidConfig::default(), &Device::Cpu)?;
/// let batch = TaskBatch::new(vec![tasks.task(0)?, tasks.task(1)?])?;
/// let out = reptile.train_step(&batch, 0)?;
/// assert!(out.loss.is_finite());
/// # Ok::<(), aimass::Error>(())
/// ```
pub struct Reptile<M, B> {
    model: Model<M>,
    build: B,
    cfg: ReptileConfig,
    epsilon: f64,
    guard: NonFiniteGuard,
    comm: Option<Arc<dyn Communicator>>,
}

impl<M, B> Reptile<M, B>
where
    M: ModuleT,
    B: Fn(VarBuilder<'static>) -> Result<M>,
{
    /// Reptile on `model`, rebuilt on copies of its variables by `build`.
    pub fn new(model: Model<M>, build: B, cfg: ReptileConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Reptile {
            model,
            build,
            epsilon: cfg.epsilon,
            guard: NonFiniteGuard::new(cfg.non_finite),
            cfg,
            comm: None,
        })
    }

    /// The same trainer, data-parallel over the ranks of `comm` (a
    /// collective: every rank calls it): the model's variables are
    /// broadcast from rank 0, and each step moves θ towards the mean of the
    /// adapted weights over every task of every rank (each rank adapts to
    /// its own share of the meta-batch): the single-process step on the
    /// whole meta-batch. The reported loss and accuracy are the means over
    /// all ranks' tasks.
    ///
    /// # Errors
    ///
    /// [`Error::Communication`] if the broadcast fails;
    /// [`Error::InvalidArgument`] for a trainer that is data-parallel
    /// already.
    pub fn data_parallel(mut self, comm: Arc<dyn Communicator>) -> Result<Self> {
        if self.comm.is_some() {
            return Err(Error::invalid(
                "Reptile::data_parallel",
                "the trainer is data-parallel already",
            ));
        }
        let vars: Vec<_> = named_vars(self.model.varmap())?
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        crate::distributed::broadcast_vars(
            comm.as_ref(),
            &vars,
            crate::distributed::TRAINER_BUCKET_BYTES,
        )?;
        self.comm = Some(comm);
        Ok(self)
    }

    /// With [`Reptile::data_parallel`]: the means over the ranks of the
    /// summed adapted weights, of the summed loss and accuracy and of the
    /// task count; without: the local values.
    fn across_ranks(
        &self,
        sum: BTreeMap<String, Tensor>,
        loss_sum: f64,
        acc_sum: f64,
        n: f64,
    ) -> Result<(BTreeMap<String, Tensor>, f64, f64, f64)> {
        let Some(comm) = self.comm.as_ref().filter(|c| c.world_size() > 1) else {
            return Ok((sum, loss_sum, acc_sum, n));
        };
        let (_, device) = dtype_device(self.model.varmap())?;
        // host-ok: three per-step statistics join the collective (in f32,
        // which every device has, whatever the model's dtype).
        let stats = Tensor::new(&[loss_sum, acc_sum, n], &candle_core::Device::Cpu)?
            .to_dtype(candle_core::DType::F32)?
            .to_device(&device)?;
        let mut refs: Vec<&Tensor> = sum.values().collect();
        refs.push(&stats);
        let mut means = crate::distributed::mean_over_ranks(comm.as_ref(), &refs)?;
        let stats = means.pop().expect("the statistics were pushed last");
        // host-ok: the three means, once per step.
        let s = stats
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        let sum = sum.into_keys().zip(means).collect();
        Ok((sum, s[0], s[1], s[2]))
    }

    /// The model being meta-learned.
    pub fn model(&self) -> &Model<M> {
        &self.model
    }

    /// Steps skipped by the non-finite guard.
    pub fn skipped_steps(&self) -> u64 {
        self.guard.skipped()
    }

    /// A copy of the model's variables and the model built on it.
    fn copy(&self) -> Result<(VarMap, M)> {
        let copy = deep_copy(self.model.varmap())?;
        let (dtype, device) = dtype_device(&copy)?;
        let m = (self.build)(VarBuilder::from_varmap(&copy, dtype, &device))?;
        Ok((copy, m))
    }

    fn inner_optimizer(&self, vars: &VarMap) -> Result<Box<dyn Optimizer>> {
        let lr = self.cfg.inner_lr;
        Ok(match self.cfg.inner_optimizer {
            InnerOptimizer::Sgd => {
                Box::new(Sgd::from_varmap(vars, SgdConfig::default().with_lr(lr))?)
            }
            InnerOptimizer::Adam => Box::new(Adam::from_varmap(
                vars,
                AdamConfig::default().with_lr(lr).with_betas((0.0, 0.999)),
            )?),
        })
    }

    /// `steps` inner steps on `task`'s support set, on `model` over `vars`.
    fn inner_loop(
        &self,
        model: &M,
        opt: &mut dyn Optimizer,
        task: &Task,
        steps: usize,
    ) -> Result<()> {
        for _ in 0..steps {
            let pred = model.forward_t(&task.support, true)?;
            let loss = self.cfg.loss.loss(&pred, &task.support_targets)?;
            opt.step(&loss.backward()?)?;
        }
        Ok(())
    }

    /// A copy of the model adapted to `task` by the inner loop: its
    /// variables.
    pub fn adapted(&self, task: &Task) -> Result<VarMap> {
        let (vars, model) = self.copy()?;
        let mut opt = self.inner_optimizer(&vars)?;
        self.inner_loop(&model, opt.as_mut(), task, self.cfg.inner_steps)?;
        Ok(vars)
    }

    /// Query losses (and accuracies) of `tasks` after each count in
    /// `steps` (strictly increasing) of inner steps, each task from a fresh
    /// copy of the model; the model is not changed.
    pub fn evaluate(&self, tasks: &[Task], steps: &[usize]) -> Result<Evaluation> {
        let loss_fn = self.cfg.loss;
        let mut eval = Evaluation::new(steps, loss_fn == TaskLoss::CrossEntropy)?;
        for task in tasks {
            let (vars, model) = self.copy()?;
            let mut opt = self.inner_optimizer(&vars)?;
            let mut done = 0;
            for (i, &s) in steps.iter().enumerate() {
                self.inner_loop(&model, opt.as_mut(), task, s - done)?;
                done = s;
                let pred = model.forward_t(&task.query, true)?.detach();
                let (l, a) = loss_fn.per_task(&pred, &task.query_targets, 1)?;
                eval.push(i, &l, a.as_deref());
            }
        }
        Ok(eval)
    }
}

impl<M, B> TrainStep for Reptile<M, B>
where
    M: ModuleT,
    B: Fn(VarBuilder<'static>) -> Result<M>,
{
    type Batch = TaskBatch;

    fn train_step(&mut self, batch: &TaskBatch, step: u64) -> Result<StepOutput> {
        let _scope = StepScope::enter(step);
        let loss_fn = self.cfg.loss;
        let mut sum: BTreeMap<String, Tensor> = BTreeMap::new();
        let (mut loss_sum, mut acc_sum) = (0.0, 0.0);
        for task in &batch.tasks {
            let (vars, model) = self.copy()?;
            let mut opt = self.inner_optimizer(&vars)?;
            self.inner_loop(&model, opt.as_mut(), task, self.cfg.inner_steps)?;
            // φ before the query pass (whose train-mode forward would move
            // the copy's BatchNorm statistics).
            for (name, v) in named_vars(&vars)? {
                let t = v.as_tensor().copy()?;
                let s = match sum.remove(&name) {
                    Some(s) => (s + t)?,
                    None => t,
                };
                sum.insert(name, s);
            }
            let pred = model.forward_t(&task.query, true)?.detach();
            let (l, a) = loss_fn.per_task(&pred, &task.query_targets, 1)?;
            loss_sum += l.first().copied().unwrap_or(f64::NAN);
            acc_sum += a.and_then(|a| a.first().copied()).unwrap_or(0.0);
        }
        let (sum, loss_sum, acc_sum, n) =
            self.across_ranks(sum, loss_sum, acc_sum, batch.len() as f64)?;
        let loss = loss_sum / n;
        let norm = global_norm(sum.values(), 2.0)?;
        let ok = self
            .guard
            .check_value("query loss after adaptation", loss, step)?
            == GuardAction::Proceed
            && self
                .guard
                .check_value("adapted weights' norm", norm, step)?
                == GuardAction::Proceed;
        if !ok {
            return Ok(StepOutput::new(loss, batch.len()).skipped(true));
        }
        // θ ← θ + ε (mean φ − θ) = (1 − ε) θ + ε mean φ.
        let eps = self.epsilon;
        for (name, var) in named_vars(self.model.varmap())? {
            if let Some(s) = sum.get(&name) {
                let theta = var.as_tensor().detach();
                let next = ((&theta * (1.0 - eps))? + (s * (eps / n))?.to_dtype(theta.dtype())?)?;
                var.set(&next)?;
            }
        }
        let out = StepOutput::new(loss, batch.len());
        Ok(if loss_fn == TaskLoss::CrossEntropy {
            out.with_metric("query_acc", acc_sum / n)
        } else {
            out
        })
    }

    /// Sets the outer step size ε.
    fn set_learning_rate(&mut self, lr: f64) -> Result<()> {
        crate::optim::check_set_lr("Reptile::set_learning_rate (ε)", lr, self.epsilon)?;
        self.epsilon = lr;
        Ok(())
    }

    /// The outer step size ε.
    fn learning_rate(&self) -> f64 {
        self.epsilon
    }

    fn kind(&self) -> &str {
        "reptile"
    }

    fn save_state(&self, ckpt: &mut Checkpoint) -> Result<()> {
        ckpt.insert_varmap("model", self.model.varmap())?;
        ckpt.set_meta("reptile.epsilon", self.epsilon);
        ckpt.set_meta("guard.skipped", self.guard.skipped());
        Ok(())
    }

    fn load_state(&mut self, ckpt: &Checkpoint) -> Result<()> {
        ckpt.check_varmap("model", self.model.varmap())?;
        let eps: f64 = ckpt.meta_parse("reptile.epsilon")?;
        let skipped: u64 = ckpt.meta_parse("guard.skipped")?;
        ckpt.restore_varmap("model", self.model.varmap())?;
        self.epsilon = eps;
        self.guard.set_skipped(skipped);
        Ok(())
    }
}
