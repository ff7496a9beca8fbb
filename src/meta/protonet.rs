//! Prototypical networks: classify by the nearest class mean in an
//! embedding space.

use candle_core::{DType, Device, ModuleT, Tensor, Var};

use crate::config::config;
use crate::meta::gradient::{fraction_correct, load_model_and_optimizer, save_model_and_optimizer};
use crate::meta::{Task, TaskBatch};
use crate::nn::{Model, StepScope};
use crate::ops::{cosine_similarity_matrix, pairwise_squared_distances};
use crate::optim::Optimizer;
use crate::train::{
    BufferSnapshot, Checkpoint, GuardAction, NonFiniteGuard, NonFinitePolicy, StepOutput, TrainStep,
};
use crate::{Error, Result};

/// How a query embedding is compared with the class prototypes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum Distance {
    /// Logits `−‖q − c‖²` (Snell et al.'s choice; default).
    #[default]
    SquaredEuclidean,
    /// Logits `scale · cos(q, c)`: a scaled cosine similarity (the
    /// cosine classifier of Chen et al., "A Closer Look at Few-shot
    /// Classification", 2019, which uses a fixed scale).
    Cosine {
        /// The factor on the cosine similarity (10 is a common choice,
        /// [`Distance::cosine`]).
        scale: f64,
    },
}

impl Distance {
    /// Cosine similarity scaled by 10.
    pub fn cosine() -> Self {
        Distance::Cosine { scale: 10.0 }
    }
}

/// Class prototypes: the mean embedding of each class's support examples,
/// `(N, D)` for embeddings `(n, D)` with labels `(n,)` in `0..N`.
///
/// # Errors
///
/// [`Error::Shape`] for mismatched sizes; [`Error::InvalidArgument`] for a
/// label outside `0..n_way` or a class without support examples.
pub fn prototypes(embeddings: &Tensor, labels: &Tensor, n_way: usize) -> Result<Tensor> {
    let (n, _) = embeddings
        .dims2()
        .map_err(|_| Error::shape("prototypes", "embeddings (n, D)", embeddings.dims()))?;
    // host-ok: an episode's support labels (made on the host by the task
    // sampler), read to build the averaging matrix.
    let labels = labels
        .flatten_all()?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    if labels.len() != n {
        return Err(Error::shape(
            "prototypes",
            format!("one label per embedding ({n})"),
            [labels.len()],
        ));
    }
    // Averaging matrix A (N, n): A[c, i] = 1/|c| for the examples of class c.
    let mut counts = vec![0usize; n_way];
    for &l in &labels {
        let slot = counts.get_mut(l as usize).ok_or_else(|| {
            Error::invalid("prototypes", format!("label {l} is outside 0..{n_way}"))
        })?;
        *slot += 1;
    }
    if let Some(c) = counts.iter().position(|&k| k == 0) {
        return Err(Error::invalid(
            "prototypes",
            format!("class {c} has no support example"),
        ));
    }
    let mut avg = vec![0f64; n_way * n];
    for (i, &l) in labels.iter().enumerate() {
        avg[l as usize * n + i] = 1.0 / counts[l as usize] as f64;
    }
    let avg = Tensor::from_vec(avg, (n_way, n), &Device::Cpu)?
        .to_dtype(embeddings.dtype())?
        .to_device(embeddings.device())?;
    Ok(avg.matmul(embeddings)?)
}

/// The logits of query embeddings `(m, D)` against prototypes `(N, D)`:
/// `(m, N)`, see [`Distance`].
pub fn prototype_logits(query: &Tensor, prototypes: &Tensor, distance: Distance) -> Result<Tensor> {
    match distance {
        Distance::SquaredEuclidean => Ok(pairwise_squared_distances(query, prototypes)?.neg()?),
        Distance::Cosine { scale } => Ok((cosine_similarity_matrix(query, prototypes)? * scale)?),
    }
}

/// The number of classes of a task: one more than its largest support label.
fn n_way(task: &Task) -> Result<usize> {
    // host-ok: the support labels' maximum, one value per task.
    let max = task
        .support_targets
        .to_dtype(DType::U32)?
        .flatten_all()?
        .max(0)?
        .to_scalar::<u32>()?;
    Ok(max as usize + 1)
}

/// The query accuracy (a fraction) of nearest-prototype classification of
/// `task` in the space of `embed`: prototypes from the support set's
/// embeddings, each query example assigned to the nearest. With the
/// identity (flattened pixels) it is the raw-pixel nearest-centroid floor
/// of few-shot benchmarks; with a frozen encoder, a linear-free probe.
///
/// ```
/// use aimass::candle::{Device, Tensor};
/// use aimass::meta::{nearest_prototype_accuracy, Distance, Task};
///
/// let dev = Device::Cpu;
/// let xs = Tensor::new(&[[0.0f32, 0.0], [4.0, 4.0]], &dev)?;
/// let xq = Tensor::new(&[[1.0f32, 0.0], [3.0, 5.0], [3.0, 3.0]], &dev)?;
/// let task = Task::new(xs, Tensor::new(&[0u32, 1], &dev)?, xq, Tensor::new(&[0u32, 1, 0], &dev)?)?;
/// let acc = nearest_prototype_accuracy(|x| Ok(x.clone()), &task, Distance::SquaredEuclidean)?;
/// assert!((acc - 2.0 / 3.0).abs() < 1e-12);
/// # Ok::<(), aimass::Error>(())
/// ```
pub fn nearest_prototype_accuracy(
    embed: impl Fn(&Tensor) -> Result<Tensor>,
    task: &Task,
    distance: Distance,
) -> Result<f64> {
    let zs = embed(&task.support)?.flatten_from(1)?;
    let zq = embed(&task.query)?.flatten_from(1)?;
    let protos = prototypes(&zs, &task.support_targets, n_way(task)?)?;
    let logits = prototype_logits(&zq, &protos, distance)?;
    fraction_correct(&logits, &task.query_targets)
}

config! {
    /// Settings of [`ProtoNet`].
    pub struct ProtoNetConfig {
        /// How queries are compared with prototypes (default squared
        /// Euclidean, Snell et al.'s).
        distance: Distance = Distance::SquaredEuclidean,
        /// What to do on a non-finite loss or gradient (default: error).
        non_finite: NonFinitePolicy = NonFinitePolicy::Error,
    }
}

/// Prototypical networks (Snell, Swersky and Zemel, "Prototypical Networks
/// for Few-shot Learning", NeurIPS 2017): an embedding network trained by
/// episodes so that each query example is closest to the mean embedding
/// (prototype) of its class's support examples.
///
/// A training step embeds the support and query images of each episode in
/// one batch (train mode: BatchNorm statistics of the whole episode),
/// computes the prototypes, the logits of the queries ([`Distance`]) and
/// their cross-entropy, and steps the optimizer with the mean over the
/// meta-batch. [`ProtoNet::evaluate`] embeds in eval mode (BatchNorm
/// running statistics: an image's embedding does not depend on its
/// episode).
///
/// Any [`ModuleT`] that maps a batch of inputs to `(n, ...)` embeddings
/// works (flattened after the batch dimension): a conv-4, a ResNet, a
/// self-supervised encoder loaded with [`crate::nn::params::load_with`].
///
/// ```
/// use aimass::prelude::*;
/// use aimass::meta::{ProtoNet, ProtoNetConfig, Task, TaskBatch};
/// use aimass::nn::{init, Mlp, MlpConfig, Model};
/// use aimass::optim::{Adam, AdamConfig};
///
/// let varmap = VarMap::new();
/// let vb = init::seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu);
/// let model = Model::new(Mlp::new(MlpConfig::new([4, 16, 8]), vb)?, varmap);
/// let opt = Adam::from_varmap(model.varmap(), AdamConfig::default())?;
/// let mut protonet = ProtoNet::new(model, opt, ProtoNetConfig::default())?;
/// let x = Tensor::new(&[[1f32, 0., 0., 0.], [0., 1., 0., 0.], [1., 0.1, 0., 0.], [0.1, 1., 0., 0.]], &Device::Cpu)?;
/// let y = Tensor::new(&[0u32, 1, 0, 1], &Device::Cpu)?;
/// let task = Task::new(x.narrow(0, 0, 2)?, y.narrow(0, 0, 2)?, x.narrow(0, 2, 2)?, y.narrow(0, 2, 2)?)?;
/// let out = protonet.train_step(&TaskBatch::new(vec![task.clone()])?, 0)?;
/// assert!(out.loss.is_finite());
/// assert_eq!(protonet.evaluate(&[task])?.len(), 1);
/// # Ok::<(), aimass::Error>(())
/// ```
pub struct ProtoNet<M, O> {
    model: Model<M>,
    optimizer: O,
    cfg: ProtoNetConfig,
    guard: NonFiniteGuard,
    params: Vec<(String, Var)>,
    buffers: Vec<Var>,
}

impl<M: ModuleT, O: Optimizer> ProtoNet<M, O> {
    /// A ProtoNet trainer for the embedding network `model`, updated by
    /// `optimizer`.
    pub fn new(model: Model<M>, optimizer: O, cfg: ProtoNetConfig) -> Result<Self> {
        if let Distance::Cosine { scale } = cfg.distance {
            if !(scale.is_finite() && scale > 0.0) {
                return Err(Error::config(
                    "ProtoNetConfig::distance",
                    format!("{:?}", cfg.distance),
                    "the cosine scale must be finite and > 0",
                ));
            }
        }
        let params = model.named_parameters()?;
        let buffers = model.named_buffers()?.into_iter().map(|(_, v)| v).collect();
        Ok(ProtoNet {
            model,
            optimizer,
            guard: NonFiniteGuard::new(cfg.non_finite),
            cfg,
            params,
            buffers,
        })
    }

    /// The embedding network.
    pub fn model(&self) -> &Model<M> {
        &self.model
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    /// Steps skipped by the non-finite guard.
    pub fn skipped_steps(&self) -> u64 {
        self.guard.skipped()
    }

    /// The episode's query loss (cross-entropy of the prototype logits) and
    /// accuracy, support and query embedded together in `train` mode.
    pub fn episode_loss(&self, task: &Task, train: bool) -> Result<(Tensor, f64)> {
        let ns = task.support.dim(0)?;
        let x = Tensor::cat(&[&task.support, &task.query], 0)?;
        let z = self.model.forward_t(&x, train)?.flatten_from(1)?;
        let (zs, zq) = (z.narrow(0, 0, ns)?, z.narrow(0, ns, z.dim(0)? - ns)?);
        let protos = prototypes(&zs, &task.support_targets, n_way(task)?)?;
        let logits = prototype_logits(&zq, &protos, self.cfg.distance)?;
        let loss = crate::loss::cross_entropy_loss(&logits, &task.query_targets)?;
        let acc = fraction_correct(&logits.detach(), &task.query_targets)?;
        Ok((loss, acc))
    }

    /// The query accuracy (a fraction) of each task, embedded in eval mode;
    /// nothing changes.
    pub fn evaluate(&self, tasks: &[Task]) -> Result<Vec<f64>> {
        let embed = |x: &Tensor| self.model.forward_t(x, false).map(|z| z.detach());
        tasks
            .iter()
            .map(|t| nearest_prototype_accuracy(embed, t, self.cfg.distance))
            .collect()
    }
}

impl<M: ModuleT, O: Optimizer> TrainStep for ProtoNet<M, O> {
    type Batch = TaskBatch;

    fn train_step(&mut self, batch: &TaskBatch, step: u64) -> Result<StepOutput> {
        let _scope = StepScope::enter(step);
        let saved = BufferSnapshot::take(&self.buffers)?;
        let mut total: Option<Tensor> = None;
        let mut acc = 0.0;
        for task in &batch.tasks {
            let (l, a) = match self.episode_loss(task, true) {
                Ok(r) => r,
                Err(e) => {
                    saved.restore()?;
                    return Err(e);
                }
            };
            acc += a;
            total = Some(match total {
                Some(t) => (t + l)?,
                None => l,
            });
        }
        let n = batch.len();
        let Some(total) = total else {
            return Err(Error::invalid(
                "ProtoNet::train_step",
                "an empty meta-batch",
            ));
        };
        let loss = (total / n as f64)?;
        let mut grads = loss.backward()?;
        // Data-parallel: the mean over ranks, before the checks.
        self.optimizer.sync_gradients(&mut grads)?;
        // One host read: the loss and the gradients' sums of squares.
        let checked = self
            .guard
            .check_reduced(Some(&loss), &[], &grads, &self.params, step);
        let value = checked.as_ref().map_or(f64::NAN, |(_, v)| v[0]);
        match checked.map(|(a, _)| a) {
            Ok(GuardAction::Proceed) => {}
            Ok(_) => {
                saved.restore()?;
                return Ok(StepOutput::new(value, n).skipped(true));
            }
            Err(e) => {
                saved.restore()?;
                return Err(e);
            }
        }
        self.optimizer.step(&grads)?;
        Ok(StepOutput::new(value, n).with_metric("query_acc", acc / n as f64))
    }

    fn set_learning_rate(&mut self, lr: f64) -> Result<()> {
        self.optimizer.set_lr(lr)
    }

    fn learning_rate(&self) -> f64 {
        self.optimizer.lr()
    }

    fn kind(&self) -> &str {
        "protonet"
    }

    fn save_state(&self, ckpt: &mut Checkpoint) -> Result<()> {
        save_model_and_optimizer(ckpt, self.model.varmap(), &self.optimizer, &self.guard)
    }

    fn load_state(&mut self, ckpt: &Checkpoint) -> Result<()> {
        load_model_and_optimizer(
            ckpt,
            self.model.varmap(),
            &mut self.optimizer,
            &mut self.guard,
        )
    }
}
