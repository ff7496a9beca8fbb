//! Meta-learning: models that learn to adapt to a new task from a few
//! examples.
//!
//! A **task** ([`Task`]) has a support set to adapt on and a query set to
//! be judged on; a [`TaskSampler`] numbers them (task `i` is a function of
//! the seed and `i`): the [`Sinusoid`] regression family of Finn et al.,
//! N-way K-shot classification episodes
//! ([`crate::data::EpisodeSampler`]), or your own. [`TaskBatches`] groups
//! them into meta-batches and epochs, so every trainer here runs under
//! [`crate::train::Fit`] with schedules, callbacks, checkpoints and exact
//! resume.
//!
//! | trainer | learns | inner loop | paper |
//! |---|---|---|---|
//! | [`Maml`] | an initialisation | SGD steps on fast weights, second order (exact) or first order | Finn et al. 2017 |
//! | [`Anil`] | an initialisation | as MAML, the head only | Raghu et al. 2020 |
//! | [`MetaSgd`] | an initialisation and per-weight inner learning rates | one learned-rate step | Li et al. 2017 |
//! | [`Reptile`] | an initialisation | SGD or Adam on a copy; θ moves towards the result | Nichol et al. 2018 |
//! | [`ProtoNet`] | an embedding | none: nearest class mean | Snell et al. 2017 |
//!
//! The gradient-based ones ([`Maml`], [`Anil`], [`MetaSgd`]) work on any
//! model that its build function can rebuild from functional parameters
//! ([`crate::nn::ParamMap`]), and give learn2learn's clone/adapt API for
//! hand-written loops next to the ready [`crate::train::TrainStep`]:
//!
//! ```
//! use aimass::prelude::*;
//! use aimass::meta::{Maml, MamlConfig, Sinusoid, SinusoidConfig, TaskLoss, TaskSampler};
//! use aimass::nn::{init, Mlp, MlpConfig, Model};
//! use aimass::optim::{Adam, AdamConfig};
//!
//! aimass::autograd::enable_second_order()?; // exact MAML: first thing in main
//! let dev = Device::Cpu;
//! let build = |vb: VarBuilder| Mlp::new(MlpConfig::new([1, 40, 40, 1]), vb);
//! let varmap = VarMap::new();
//! let model = Model::new(build(init::seeded_var_builder(&varmap, 0, DType::F32, &dev))?, varmap);
//! let opt = Adam::from_varmap(model.varmap(), AdamConfig::default().with_lr(1e-3))?;
//! let mut maml = Maml::new(model, build, opt, MamlConfig::default().with_loss(TaskLoss::Mse))?;
//!
//! let task = Sinusoid::new(SinusoidConfig::default(), &dev)?.task(0)?;
//! let mse = |p: &Tensor, y: &Tensor| TaskLoss::Mse.loss(p, y);
//! let mut learner = maml.clone_for_task()?;
//! learner.adapt(&mse(&learner.forward(&task.support)?, &task.support_targets)?)?;
//! let query_loss = mse(&learner.forward(&task.query)?, &task.query_targets)?;
//! let meta_grad = maml.meta_gradients(&query_loss)?; // through the inner step
//! maml.meta_step(&meta_grad)?;
//! # Ok::<(), aimass::Error>(())
//! ```
//!
//! **Second order.** MAML's exact meta-gradient differentiates through the
//! inner steps; candle computes it only when second-order gradients are
//! on ([`crate::autograd::enable_second_order`], a process-wide setting a
//! program turns on at the start of `main`). When they are off, building
//! a second-order trainer is an error saying what to do; it never falls
//! back to first order silently. Second order keeps the graph of every
//! inner backward pass (memory) and differentiates it again (time):
//! `docs/meta-learning.md` has the measured costs.
//!
//! **BatchNorm.** Adapted models run in train mode during adaptation and
//! evaluation alike: BatchNorm normalises with the statistics of the batch
//! it sees (support set, then query set), as MAML's reference code does;
//! the running statistics are never used by the gradient-based trainers.
//! [`ProtoNet`] trains in train mode and evaluates in eval mode (running
//! statistics), as Snell et al.'s code does. [`Reptile`] interpolates
//! running statistics with the weights.
//!
//! **Many small tasks at once.** With `batch_tasks` on, a meta-batch runs
//! as one batched forward and backward on per-task weights
//! ([`crate::nn::ParamMap::expand_tasks`]; models of
//! [`crate::nn::Linear`] layers such as [`crate::nn::Mlp`]): the same
//! meta-gradient, a fraction of the per-operation overhead. The sinusoid
//! MLP meta-trains 70,000 iterations in a few minutes this way.

mod anil;
mod batches;
mod eval;
mod gradient;
mod learner;
mod loss;
mod maml;
mod meta_sgd;
mod protonet;
mod reptile;
mod sinusoid;
mod task;

pub use anil::{Anil, AnilConfig};
pub use batches::{TaskBatches, TaskBatchesConfig};
pub use eval::{mean_ci95, Evaluation};
pub use gradient::RATE_PREFIX;
pub use learner::Learner;
pub use loss::TaskLoss;
pub use maml::{Maml, MamlConfig};
pub use meta_sgd::{add_learned_rates, MetaSgd, MetaSgdConfig};
pub use protonet::{
    nearest_prototype_accuracy, prototype_logits, prototypes, Distance, ProtoNet, ProtoNetConfig,
};
pub use reptile::{InnerOptimizer, Reptile, ReptileConfig};
pub use sinusoid::{Sinusoid, SinusoidConfig};
pub use task::{Task, TaskBatch, TaskSampler};
