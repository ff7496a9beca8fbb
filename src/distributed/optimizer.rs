//! [`DistributedOptimizer`]: data-parallel updates around any optimizer.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};
use candle_nn::VarMap;

use super::buckets::{self, Moved};
use super::Communicator;
use crate::autograd::Gradients;
use crate::config::config;
use crate::optim::Optimizer;
use crate::{Error, Result};

/// How the ranks of a data-parallel run stay together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncMode {
    /// Synchronous SGD (the default, torch's DDP): the gradients are
    /// averaged over the ranks before every update, so every rank applies
    /// the same update and the weights stay identical.
    Gradients,
    /// Local SGD (periodic averaging): each rank updates with its own
    /// gradients, and every `every` steps the parameters and buffers (and,
    /// with `average_state`, the optimizer state: momentum, Adam moments)
    /// are replaced by their mean over the ranks. One all-reduce of the
    /// weights per `every` steps instead of one of the gradients per step.
    /// `every = 1` with `average_state` and a linear update (SGD with
    /// momentum and weight decay) is synchronous SGD.
    LocalSgd {
        /// Steps between averagings (H >= 1).
        every: u64,
        /// Whether the optimizer state is averaged too.
        average_state: bool,
    },
}

impl SyncMode {
    /// Local SGD averaging the parameters, buffers and optimizer state
    /// every `every` steps.
    pub fn local_sgd(every: u64) -> Self {
        SyncMode::LocalSgd {
            every,
            average_state: true,
        }
    }
}

config! {
    /// Settings of a [`DistributedOptimizer`].
    pub struct DistributedOptimizerConfig {
        /// Largest bucket in MiB: gradients are flattened into buckets of
        /// at most this size and each bucket is one all-reduce (default
        /// 25, torch DDP's `bucket_cap_mb`).
        bucket_mb: f64 = 25.0,
        /// Synchronous gradient averaging (default) or local SGD.
        sync: SyncMode = SyncMode::Gradients,
        /// After every update, replace the buffers (BatchNorm running
        /// statistics) by rank 0's, so every rank evaluates and checkpoints
        /// the same model (default true, torch DDP's `broadcast_buffers`).
        /// Not needed with synchronised BatchNorm, whose statistics are the
        /// same on every rank. Local SGD averages buffers at its averaging
        /// steps instead.
        broadcast_buffers: bool = true,
    }
}

impl DistributedOptimizerConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if !(self.bucket_mb.is_finite() && self.bucket_mb > 0.0) {
            return Err(Error::config(
                "DistributedOptimizerConfig::bucket_mb",
                self.bucket_mb,
                "must be finite and > 0 (MiB)",
            ));
        }
        if let SyncMode::LocalSgd { every: 0, .. } = self.sync {
            return Err(Error::config(
                "DistributedOptimizerConfig::sync",
                "LocalSgd { every: 0 }",
                "local SGD averages every H >= 1 steps (H = 1 is synchronous)",
            ));
        }
        Ok(())
    }
}

/// Communication counters of a [`DistributedOptimizer`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct CommStats {
    /// Updates applied.
    pub steps: u64,
    /// Collective calls made (all-reduces and broadcasts).
    pub collectives: u64,
    /// Bytes each rank sent into collectives.
    pub bytes: u64,
    /// Wall time spent in collectives.
    pub time: Duration,
}

/// An optimizer made data-parallel: wraps any [`Optimizer`] so that every
/// rank of a [`Communicator`] group applies the update of the global batch.
///
/// * At construction, every parameter and buffer of `varmap` is replaced
///   by rank 0's (one bucketed broadcast), so all ranks start from the same
///   weights whatever their seeds.
/// * [`SyncMode::Gradients`] (default): the gradients are averaged over
///   the ranks (flattened into buckets of [`DistributedOptimizerConfig::bucket_mb`],
///   one all-reduce per bucket) and the wrapped optimizer steps with the
///   mean. Its gradient clipping therefore clips the **global** norm, and
///   its state stays identical on every rank. With the per-rank loss a mean
///   over the rank's samples and equal per-rank batches, this is the
///   update of one process on the global batch.
/// * [`SyncMode::LocalSgd`]: local steps, periodic averaging.
///
/// The averaging runs after the backward pass: candle's backward returns
/// all gradients at once and has no per-parameter hooks, so there is
/// nothing to overlap it with (PyTorch DDP overlaps bucket all-reduces with
/// the rest of the backward pass).
///
/// **Trainers** call [`Optimizer::sync_gradients`] right after the
/// backward pass (aimass's trainers do): the gradients are averaged there,
/// so the non-finite guard, clipping and the update of every rank see the
/// same values and every rank skips or takes the same steps. An optimizer
/// stepped without that call averages in [`Optimizer::step`].
///
/// Every rank must step the same number of times, with gradients for the
/// same parameters (a parameter without a gradient on a rank counts zero
/// there, and is updated only on ranks that have one: give it a gradient
/// everywhere, e.g. `0 · param.sum()`, if some ranks may not use it).
///
/// ```
/// use std::sync::Arc;
/// use aimass::prelude::*;
/// use aimass::distributed::{Communicator, DistributedOptimizer, DistributedOptimizerConfig, SingleProcess};
/// use aimass::optim::{Sgd, SgdConfig};
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let lin = aimass::candle_nn::linear(2, 1, vb.pp("fc"))?;
/// let comm: Arc<dyn Communicator> = Arc::new(SingleProcess::new());
/// let sgd = Sgd::from_varmap(&varmap, SgdConfig::default().with_lr(0.1))?;
/// let mut opt = DistributedOptimizer::new(sgd, &varmap, comm, DistributedOptimizerConfig::default())?;
/// let loss = lin.forward(&Tensor::new(&[[1f32, 2.0]], &Device::Cpu)?)?.sum_all()?;
/// let mut grads = loss.backward()?;
/// opt.sync_gradients(&mut grads)?; // the mean over ranks (here one)
/// opt.step(&grads)?;
/// assert_eq!(opt.step_count(), 1);
/// # Ok::<(), aimass::Error>(())
/// ```
pub struct DistributedOptimizer<O: Optimizer> {
    inner: O,
    comm: Arc<dyn Communicator>,
    cfg: DistributedOptimizerConfig,
    /// The wrapped optimizer's parameters, in its update order.
    params: Vec<(String, Var)>,
    /// Buffers of the VarMap (BatchNorm running statistics).
    buffers: Vec<Var>,
    /// The gradient tensors [`Optimizer::sync_gradients`] produced last.
    synced: HashSet<TensorId>,
    /// Updates applied (drives local SGD).
    local_steps: u64,
    moved: Moved,
    time: Duration,
}

impl<O: Optimizer> std::fmt::Debug for DistributedOptimizer<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistributedOptimizer")
            .field("comm", &self.comm)
            .field("cfg", &self.cfg)
            .field("params", &self.params.len())
            .finish()
    }
}

impl<O: Optimizer> DistributedOptimizer<O> {
    /// Wraps `inner`, whose parameters (and the model's buffers) live in
    /// `varmap`, for the ranks of `comm`; broadcasts every variable of
    /// `varmap` from rank 0 (a collective: every rank constructs its own).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a bad config or a parameter of `inner` that is
    /// not in `varmap`; [`Error::Communication`] if the broadcast fails.
    pub fn new(
        inner: O,
        varmap: &VarMap,
        comm: Arc<dyn Communicator>,
        config: DistributedOptimizerConfig,
    ) -> Result<Self> {
        config.validate()?;
        let all: HashMap<String, Var> =
            crate::nn::params::named_vars(varmap)?.into_iter().collect();
        let params = inner
            .param_names()
            .into_iter()
            .map(|n| match all.get(&n) {
                Some(v) => Ok((n, v.clone())),
                None => Err(Error::config(
                    "DistributedOptimizer::new",
                    &n,
                    "a parameter of the optimizer is not in the VarMap: pass the VarMap the optimizer was built from",
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let buffers = crate::nn::params::buffer_vars(varmap)?
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        let opt = DistributedOptimizer {
            inner,
            comm,
            cfg: config,
            params,
            buffers,
            synced: HashSet::new(),
            local_steps: 0,
            moved: Moved::default(),
            time: Duration::ZERO,
        };
        let vars: Vec<Var> = crate::nn::params::named_vars(varmap)?
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        // The construction-time broadcast, not counted in the stats.
        super::broadcast_vars(opt.comm.as_ref(), &vars, opt.cap())?;
        Ok(opt)
    }

    /// The wrapped optimizer.
    pub fn inner(&self) -> &O {
        &self.inner
    }

    /// The communicator.
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// The configuration.
    pub fn config(&self) -> &DistributedOptimizerConfig {
        &self.cfg
    }

    /// Collectives, bytes and time spent communicating so far (the initial
    /// broadcast excluded).
    pub fn stats(&self) -> CommStats {
        CommStats {
            steps: self.local_steps,
            collectives: self.moved.calls,
            bytes: self.moved.bytes,
            time: self.time,
        }
    }

    fn cap(&self) -> usize {
        (self.cfg.bucket_mb * 1024.0 * 1024.0) as usize
    }

    /// The mean over ranks of `ts`, bucketed and timed.
    fn mean_over_ranks(&mut self, ts: &[&Tensor]) -> Result<Vec<Tensor>> {
        let cap = self.cap();
        let start = Instant::now();
        let r = buckets::all_reduce_mean(self.comm.as_ref(), ts, cap, &mut self.moved);
        self.time += start.elapsed();
        r
    }

    /// Rank 0's values of `ts`, bucketed and timed.
    fn broadcast_from_rank_zero(&mut self, ts: &[&Tensor]) -> Result<Vec<Tensor>> {
        let cap = self.cap();
        let start = Instant::now();
        let r = buckets::broadcast(self.comm.as_ref(), ts, 0, cap, &mut self.moved);
        self.time += start.elapsed();
        r
    }

    /// The mean over ranks of this rank's gradients `local` (one per
    /// parameter, in order; a missing gradient counts zero), for the
    /// parameters that have one here.
    fn average(&mut self, local: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        if self.comm.world_size() == 1 {
            return Ok(local.to_vec());
        }
        let filled: Vec<Tensor> = self
            .params
            .iter()
            .zip(local)
            .map(|((_, v), g)| match g {
                Some(g) => Ok(g.to_dtype(v.dtype())?),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = filled.iter().collect();
        let means = self.mean_over_ranks(&refs)?;
        Ok(means
            .into_iter()
            .zip(local)
            .map(|(m, g)| g.as_ref().map(|_| m))
            .collect())
    }

    /// This rank's gradient of each parameter, in order, as `get` finds it.
    fn gradients_by_param(
        &self,
        get: impl Fn(&str, &Var) -> Option<Tensor>,
    ) -> Vec<Option<Tensor>> {
        self.params.iter().map(|(n, v)| get(n, v)).collect()
    }

    /// The sync of [`Optimizer::sync_gradients`]: in synchronous mode, the
    /// mean over ranks of `local` (by parameter) goes back through `put`,
    /// and is remembered as synchronised (the update that applies it does
    /// not average it again).
    fn sync_in_place(
        &mut self,
        local: Vec<Option<Tensor>>,
        mut put: impl FnMut(&str, &Var, Tensor),
    ) -> Result<()> {
        if !self.averages_gradients() {
            return Ok(());
        }
        let averaged = self.average(&local)?;
        self.synced.clear();
        for ((n, v), g) in self.params.iter().zip(averaged) {
            if let Some(g) = g {
                self.synced.insert(g.id());
                put(n, v, g);
            }
        }
        Ok(())
    }

    /// Replaces every variable of `vars` by its mean over the ranks.
    fn average_vars(&mut self, vars: &[Var]) -> Result<()> {
        if vars.is_empty() {
            return Ok(());
        }
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().detach()).collect();
        let refs: Vec<&Tensor> = ts.iter().collect();
        let means = self.mean_over_ranks(&refs)?;
        for (v, m) in vars.iter().zip(means) {
            v.set(&m)?;
        }
        Ok(())
    }

    /// Replaces the optimizer state by its mean over the ranks.
    fn average_state(&mut self) -> Result<()> {
        let mut state = self.inner.state_dict()?;
        // Step counts (integers) are the same on every rank: only the
        // float buffers (momentum, moments) are averaged.
        let mut names: Vec<&String> = state
            .iter()
            .filter(|(_, t)| t.dtype().is_float())
            .map(|(n, _)| n)
            .collect();
        names.sort();
        let refs: Vec<&Tensor> = names.iter().map(|n| &state[*n]).collect();
        let means = self.mean_over_ranks(&refs)?;
        let averaged: Vec<(String, Tensor)> = names.into_iter().cloned().zip(means).collect();
        state.extend(averaged);
        self.inner.load_state_dict(&state)
    }

    /// After an update: buffers from rank 0, or local SGD's averaging.
    fn after_update(&mut self) -> Result<()> {
        self.local_steps += 1;
        if self.comm.world_size() == 1 {
            return Ok(());
        }
        match self.cfg.sync {
            SyncMode::Gradients => {
                if self.cfg.broadcast_buffers && !self.buffers.is_empty() {
                    let buffers = self.buffers.clone();
                    let ts: Vec<Tensor> = buffers.iter().map(|v| v.as_tensor().detach()).collect();
                    let refs: Vec<&Tensor> = ts.iter().collect();
                    let got = self.broadcast_from_rank_zero(&refs)?;
                    for (v, t) in buffers.iter().zip(got) {
                        v.set(&t)?;
                    }
                }
            }
            SyncMode::LocalSgd {
                every,
                average_state,
            } => {
                // The wrapped optimizer's count survives a resume, so the
                // averaging steps are those of an uninterrupted run.
                if self.inner.step_count().is_multiple_of(every) {
                    let vars: Vec<Var> = self
                        .params
                        .iter()
                        .map(|(_, v)| v.clone())
                        .chain(self.buffers.iter().cloned())
                        .collect();
                    self.average_vars(&vars)?;
                    if average_state {
                        self.average_state()?;
                    }
                }
            }
        }
        Ok(())
    }

    /// An error naming the first gradient in `grads` that is not one of
    /// this optimizer's parameters (nothing is changed).
    fn check_names(&self, grads: &Gradients, op: &str) -> Result<()> {
        let known: HashSet<&str> = self.params.iter().map(|(n, _)| n.as_str()).collect();
        match grads.names().into_iter().find(|n| !known.contains(n)) {
            Some(unknown) => Err(Error::invalid(
                op,
                format!("`{unknown}` is not a parameter of this optimizer; nothing was changed"),
            )),
            None => Ok(()),
        }
    }

    /// Whether gradients are averaged before each update.
    fn averages_gradients(&self) -> bool {
        self.cfg.sync == SyncMode::Gradients && self.comm.world_size() > 1
    }

    /// The update with this rank's gradients `local`, by parameter.
    fn update(&mut self, local: Vec<Option<Tensor>>) -> Result<()> {
        let already = local
            .iter()
            .flatten()
            .all(|g| self.synced.contains(&g.id()));
        let grads = if self.averages_gradients() && !already {
            self.average(&local)?
        } else {
            local
        };
        self.synced.clear();
        let named: Gradients = self
            .params
            .iter()
            .zip(grads)
            .filter_map(|((n, _), g)| g.map(|g| (n.clone(), g)))
            .collect();
        self.inner.step_gradients(&named)?;
        self.after_update()
    }
}

impl<O: Optimizer> Optimizer for DistributedOptimizer<O> {
    /// Averages the gradients of this optimizer's parameters in `grads`
    /// over the ranks, in place (synchronous mode; local SGD leaves them).
    fn sync_gradients(&mut self, grads: &mut GradStore) -> Result<()> {
        let local = self.gradients_by_param(|_, v| grads.get(v).cloned());
        self.sync_in_place(local, |_, v, g| {
            grads.insert(v, g);
        })
    }

    /// Averages the named gradients of this optimizer's parameters over
    /// the ranks, in place (synchronous mode; local SGD leaves them). A
    /// name that is not a parameter of this optimizer is an error.
    fn sync_named_gradients(&mut self, grads: &mut Gradients) -> Result<()> {
        self.check_names(grads, "DistributedOptimizer::sync_named_gradients")?;
        let local = self.gradients_by_param(|n, _| grads.get(n).cloned());
        self.sync_in_place(local, |n, _, g| {
            grads.insert(n, g);
        })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let local = self
            .params
            .iter()
            .map(|(_, v)| grads.get(v).cloned())
            .collect();
        self.update(local)
    }

    fn step_gradients(&mut self, grads: &Gradients) -> Result<()> {
        self.check_names(grads, "DistributedOptimizer::step_gradients")?;
        let local = self
            .params
            .iter()
            .map(|(n, _)| grads.get(n).cloned())
            .collect();
        self.update(local)
    }

    fn lr(&self) -> f64 {
        self.inner.lr()
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.inner.set_lr(lr)
    }

    fn step_count(&self) -> u64 {
        self.inner.step_count()
    }

    fn param_names(&self) -> Vec<String> {
        self.inner.param_names()
    }

    fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        self.inner.state_dict()
    }

    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.inner.load_state_dict(state)
    }
}
