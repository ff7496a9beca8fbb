//! Tasks, and where they come from.

use candle_core::Tensor;

use crate::data::{Episode, EpisodeSampler};
use crate::{Error, Result};

/// One task: a support set to adapt on and a query set to be judged on.
///
/// Inputs and targets have one example per row (dimension 0): support
/// inputs `(K, ...)` with targets `(K, ...)`, query inputs `(Q, ...)` with
/// targets `(Q, ...)`. Targets are class indices (`u32`, `(K,)`) for
/// classification and values (`(K, d)`, float) for regression.
///
/// A task can also hold a whole meta-batch at once ([`TaskBatch::stack`]):
/// every tensor then has a leading task dimension `(T, K, ...)`.
///
/// ```
/// use aimass::candle::{Device, Tensor};
/// use aimass::meta::Task;
///
/// let dev = Device::Cpu;
/// let x = Tensor::new(&[[0.0f32], [1.0], [2.0]], &dev)?;
/// let y = x.sin()?;
/// let task = Task::new(x.clone(), y.clone(), x, y)?;
/// assert_eq!(task.with_support_size(2)?.support.dims(), &[2, 1]);
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Task {
    /// Support inputs, `(K, ...)`.
    pub support: Tensor,
    /// Support targets, `(K, ...)`.
    pub support_targets: Tensor,
    /// Query inputs, `(Q, ...)`.
    pub query: Tensor,
    /// Query targets, `(Q, ...)`.
    pub query_targets: Tensor,
}

impl Task {
    /// A task from its support and query sets.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when inputs and targets disagree on the number of
    /// examples, or a set is empty or a scalar.
    pub fn new(
        support: Tensor,
        support_targets: Tensor,
        query: Tensor,
        query_targets: Tensor,
    ) -> Result<Self> {
        for (what, x, y) in [
            ("support", &support, &support_targets),
            ("query", &query, &query_targets),
        ] {
            let n = x.dims().first().copied().unwrap_or(0);
            if n == 0 || y.dims().first() != Some(&n) {
                return Err(Error::shape(
                    format!("Task::new ({what} set)"),
                    format!(
                        "inputs and targets with the same number of examples (≥ 1) in dimension 0, inputs {:?}",
                        x.dims()
                    ),
                    y.dims(),
                ));
            }
        }
        Ok(Task {
            support,
            support_targets,
            query,
            query_targets,
        })
    }

    /// The same task with only the first `k` support examples (e.g. the
    /// K = 5 evaluation of tasks drawn with 10 support points).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `k` is 0 or larger than the support set.
    pub fn with_support_size(&self, k: usize) -> Result<Self> {
        let n = self.support.dim(0)?;
        if k == 0 || k > n {
            return Err(Error::invalid(
                "Task::with_support_size",
                format!("k must be in 1..={n} (the support set's size), got {k}"),
            ));
        }
        Ok(Task {
            support: self.support.narrow(0, 0, k)?,
            support_targets: self.support_targets.narrow(0, 0, k)?,
            query: self.query.clone(),
            query_targets: self.query_targets.clone(),
        })
    }

    /// The task on another device.
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(Task {
            support: self.support.to_device(device)?,
            support_targets: self.support_targets.to_device(device)?,
            query: self.query.to_device(device)?,
            query_targets: self.query_targets.to_device(device)?,
        })
    }
}

/// A few-shot episode is a classification task: support images and labels,
/// query images and labels.
impl From<Episode> for Task {
    fn from(e: Episode) -> Self {
        Task {
            support: e.support,
            support_targets: e.support_labels,
            query: e.query,
            query_targets: e.query_labels,
        }
    }
}

/// A source of tasks: task `index` is a pure function of the sampler's
/// configuration (its seed) and `index`, so a run that stops and resumes
/// sees the same tasks ([`crate::meta::TaskBatches`] numbers them).
///
/// Implemented by [`Sinusoid`](crate::meta::Sinusoid) (regression) and by
/// [`EpisodeSampler`] (N-way K-shot classification); implement it for a
/// custom task family.
///
/// ```
/// use aimass::candle::{Device, Tensor};
/// use aimass::meta::{Task, TaskSampler};
///
/// /// Tasks y = a·x with a = index.
/// struct Lines;
/// impl TaskSampler for Lines {
///     fn task(&self, index: u64) -> aimass::Result<Task> {
///         let x = Tensor::new(&[[1.0f32], [2.0]], &Device::Cpu)?;
///         let y = (&x * index as f64)?;
///         Task::new(x.clone(), y.clone(), x, y)
///     }
///     fn fingerprint(&self) -> String {
///         "lines".into()
///     }
/// }
/// let t = Lines.task(3)?;
/// assert_eq!(t.query_targets.to_vec2::<f32>()?, vec![vec![3.0], vec![6.0]]);
/// # Ok::<(), aimass::Error>(())
/// ```
pub trait TaskSampler {
    /// Task number `index`.
    fn task(&self, index: u64) -> Result<Task>;

    /// A string identifying the configuration (family, seed, sizes): stored
    /// in checkpoints and checked on resume.
    fn fingerprint(&self) -> String;
}

impl<S: TaskSampler + ?Sized> TaskSampler for Box<S> {
    fn task(&self, index: u64) -> Result<Task> {
        (**self).task(index)
    }
    fn fingerprint(&self) -> String {
        (**self).fingerprint()
    }
}

/// Episode `index` of the sampler ([`EpisodeSampler::episode`]) as a task;
/// the sampler's own position is not used.
impl TaskSampler for EpisodeSampler {
    fn task(&self, index: u64) -> Result<Task> {
        Ok(self.episode(index)?.into())
    }

    fn fingerprint(&self) -> String {
        format!(
            "episodes seed={} {:?} classes={:?}",
            self.seed(),
            self.config(),
            self.classes()
        )
    }
}

/// The tasks of one meta-training step (a meta-batch), in sampling order.
#[derive(Debug, Clone)]
pub struct TaskBatch {
    /// The tasks.
    pub tasks: Vec<Task>,
}

impl TaskBatch {
    /// A meta-batch of `tasks`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an empty list.
    pub fn new(tasks: Vec<Task>) -> Result<Self> {
        if tasks.is_empty() {
            return Err(Error::invalid(
                "TaskBatch::new",
                "a meta-batch needs at least one task",
            ));
        }
        Ok(TaskBatch { tasks })
    }

    /// The number of tasks.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether there are no tasks.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// All tasks as one [`Task`] with a leading task dimension: support
    /// `(T, K, ...)`, query `(T, Q, ...)`, for models run on per-task
    /// parameters ([`crate::nn::ParamMap::expand_tasks`]).
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when the tasks' tensors differ in shape.
    pub fn stack(&self) -> Result<Task> {
        stack_tasks(&self.tasks)
    }
}

/// `tasks` as one [`Task`] with a leading task dimension (see
/// [`TaskBatch::stack`]).
pub(crate) fn stack_tasks(tasks: &[Task]) -> Result<Task> {
    let first = tasks.first().ok_or_else(|| {
        Error::invalid("TaskBatch::stack", "a meta-batch needs at least one task")
    })?;
    let part = |what: &str, f: fn(&Task) -> &Tensor| -> Result<Tensor> {
        let want = f(first).dims();
        if let Some((i, t)) = tasks.iter().enumerate().find(|(_, t)| f(t).dims() != want) {
            return Err(Error::shape(
                format!("TaskBatch::stack ({what} of task {i})"),
                format!("{want:?}, the shape in task 0 (tasks run together need equal shapes)"),
                f(t).dims(),
            ));
        }
        let parts: Vec<&Tensor> = tasks.iter().map(f).collect();
        Ok(Tensor::stack(&parts, 0)?)
    };
    Ok(Task {
        support: part("support", |t| &t.support)?,
        support_targets: part("support targets", |t| &t.support_targets)?,
        query: part("query", |t| &t.query)?,
        query_targets: part("query targets", |t| &t.query_targets)?,
    })
}
