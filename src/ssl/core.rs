//! What every SSL trainer shares: the trained networks' variables, the
//! optimizer, the non-finite guard, the two-view batch, one guarded step,
//! checkpoint state and the backbone export.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;

use super::optim::SslOptimConfig;
use crate::autograd::Replicas;
use crate::data::Batch;
use crate::distributed::{Communicator, DistributedOptimizer, DistributedOptimizerConfig};
use crate::nn::params;
use crate::optim::Optimizer;
use crate::train::{BufferSnapshot, Checkpoint, GuardAction, NonFiniteGuard, StepOutput};
use crate::{Error, Result};

/// The trained variables (under checkpoint prefixes), optimizer and guard.
pub(crate) struct Core {
    /// Trained networks: (checkpoint prefix, variables).
    trained: Vec<(&'static str, VarMap)>,
    /// Networks that are not trained but change (targets): (prefix, variables).
    frozen: Vec<(&'static str, VarMap)>,
    optimizer: Box<dyn Optimizer>,
    guard: NonFiniteGuard,
    params: Vec<(String, Var)>,
    buffers: Vec<Var>,
    /// The other ranks, once [`Core::distribute`] made the trainer
    /// data-parallel.
    replicas: Option<Arc<dyn Replicas>>,
}

/// The result of [`Core::step`]: the step output and, when the update was
/// applied, what the loss closure returned besides the loss.
pub(crate) struct Stepped<T> {
    pub out: StepOutput,
    pub extra: Option<T>,
}

impl Core {
    /// A core over the `trained` networks (optimised) and the `frozen` ones
    /// (checkpointed, and their buffers restored when a step is rejected).
    pub fn new(
        trained: Vec<(&'static str, VarMap)>,
        frozen: Vec<(&'static str, VarMap)>,
        optim: &SslOptimConfig,
    ) -> Result<Self> {
        let maps: Vec<&VarMap> = trained.iter().map(|(_, m)| m).collect();
        let optimizer = optim.build(&maps)?;
        let mut params_all = Vec::new();
        let mut buffers = Vec::new();
        for (_, m) in &trained {
            params_all.extend(params::trainable_vars(m, &crate::nn::Frozen::none())?);
        }
        for (_, m) in trained.iter().chain(&frozen) {
            buffers.extend(params::buffer_vars(m)?.into_iter().map(|(_, v)| v));
        }
        Ok(Core {
            trained,
            frozen,
            optimizer,
            guard: NonFiniteGuard::new(optim.non_finite),
            params: params_all,
            buffers,
            replicas: None,
        })
    }

    /// The same core, data-parallel over the ranks of `comm`: the optimizer
    /// becomes a [`DistributedOptimizer`] (gradients averaged over the
    /// ranks before the checks and the update), and every variable of
    /// every network, trained or not, is broadcast from rank 0 (a
    /// collective: every rank calls it). The untrained networks (targets)
    /// join under their checkpoint prefix, so their BatchNorm statistics
    /// follow rank 0's as the trained ones do.
    pub fn distribute(
        self,
        comm: Arc<dyn Communicator>,
        config: DistributedOptimizerConfig,
    ) -> Result<Self> {
        if self.replicas.is_some() {
            return Err(Error::invalid(
                "ssl trainer data_parallel",
                "the trainer is data-parallel already",
            ));
        }
        let all = VarMap::new();
        {
            let mut data = all.data().lock().map_err(|_| {
                Error::invalid("ssl trainer data_parallel", "a VarMap lock is poisoned")
            })?;
            for (_, m) in &self.trained {
                data.extend(params::named_vars(m)?);
            }
            for (prefix, m) in &self.frozen {
                for (name, var) in params::named_vars(m)? {
                    data.insert(format!("{prefix}.{name}"), var);
                }
            }
        }
        let replicas = crate::distributed::replicas(&comm);
        let optimizer: Box<dyn Optimizer> = Box::new(DistributedOptimizer::new(
            self.optimizer,
            &all,
            comm,
            config,
        )?);
        Ok(Core {
            optimizer,
            replicas: Some(replicas),
            ..self
        })
    }

    /// The other ranks of a data-parallel trainer ([`Core::distribute`]).
    pub fn replicas(&self) -> Option<&Arc<dyn Replicas>> {
        self.replicas.as_ref()
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &dyn Optimizer {
        self.optimizer.as_ref()
    }

    /// Steps skipped by the non-finite guard.
    pub fn skipped(&self) -> u64 {
        self.guard.skipped()
    }

    /// Sets the learning rate.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.optimizer.set_lr(lr)
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.optimizer.lr()
    }

    /// One step: `f` runs the forward passes and returns the loss (and
    /// anything else the trainer needs after the update); then backward,
    /// the guard, and the optimizer step. A rejected step (error or skip)
    /// leaves every BatchNorm buffer as it was.
    pub fn step<T>(
        &mut self,
        step: u64,
        samples: usize,
        f: impl FnOnce() -> Result<(Tensor, T)>,
    ) -> Result<Stepped<T>> {
        // Dropout masks are a function of the step (exact resume).
        let _scope = crate::nn::StepScope::enter(step);
        let saved = BufferSnapshot::take(&self.buffers)?;
        let run = || -> Result<_> {
            let (loss, extra) = f()?;
            let mut grads = loss.backward()?;
            // Data-parallel: the mean over ranks, before the checks.
            self.optimizer.sync_gradients(&mut grads)?;
            Ok((loss, grads, extra))
        };
        let (loss, grads, extra) = match run() {
            Ok(r) => r,
            Err(e) => {
                saved.restore()?;
                return Err(e);
            }
        };
        // One host read for the step: the loss and the gradients' sums of
        // squares.
        let value = match self
            .guard
            .check_reduced(Some(&loss), &[], &grads, &self.params, step)
        {
            Ok((GuardAction::Proceed, v)) => v[0],
            Ok((_, v)) => {
                saved.restore()?;
                return Ok(Stepped {
                    out: StepOutput::new(v[0], samples).skipped(true),
                    extra: None,
                });
            }
            Err(e) => {
                saved.restore()?;
                return Err(e);
            }
        };
        self.optimizer.step(&grads)?;
        Ok(Stepped {
            out: StepOutput::new(value, samples),
            extra: Some(extra),
        })
    }

    /// Adds every network, the optimizer state and the guard to `ckpt`.
    pub fn save(&self, ckpt: &mut Checkpoint) -> Result<()> {
        for (prefix, m) in self.trained.iter().chain(&self.frozen) {
            ckpt.insert_varmap(prefix, m)?;
        }
        ckpt.insert_tensors("optim", self.optimizer.state_dict()?.iter());
        ckpt.set_meta("guard.skipped", self.guard.skipped());
        Ok(())
    }

    /// Checks that `ckpt` holds every network with the right names and
    /// shapes, without changing anything.
    pub fn check(&self, ckpt: &Checkpoint) -> Result<u64> {
        for (prefix, m) in self.trained.iter().chain(&self.frozen) {
            ckpt.check_varmap(prefix, m)?;
        }
        ckpt.meta_parse("guard.skipped")
    }

    /// Restores what [`Core::save`] wrote (call [`Core::check`] first).
    pub fn load(&mut self, ckpt: &Checkpoint) -> Result<()> {
        let skipped = self.check(ckpt)?;
        self.optimizer
            .load_state_dict(&ckpt.tensors_with_prefix("optim"))?;
        for (prefix, m) in self.trained.iter().chain(&self.frozen) {
            ckpt.restore_varmap(prefix, m)?;
        }
        self.guard.set_skipped(skipped);
        Ok(())
    }
}

/// Both views of a two-view batch stacked into one batch `(2N, C, H, W)`,
/// so BatchNorm normalises over both; returns it with `N`.
pub(crate) fn stack_views(batch: &Batch, who: &str) -> Result<(Tensor, usize)> {
    let [v1, v2] = batch.views.as_slice() else {
        return Err(Error::invalid(
            who,
            format!(
                "needs batches of two augmented views, got {} view(s): build the DataLoader \
                 with `.with_views(...)` (e.g. `data::augment::presets::simclr_views`)",
                batch.views.len()
            ),
        ));
    };
    if v1.dims() != v2.dims() {
        return Err(Error::shape(
            who,
            format!("both views of shape {:?}", v1.dims()),
            v2.dims(),
        ));
    }
    let n = v1.dims().first().copied().unwrap_or(0);
    Ok((Tensor::cat(&[v1, v2], 0)?, n))
}

/// The two halves `(N, D)` of a `(2N, D)` output.
pub(crate) fn halves(z: &Tensor, n: usize) -> Result<(Tensor, Tensor)> {
    Ok((z.narrow(0, 0, n)?, z.narrow(0, n, n)?))
}

/// Saves the variables named `backbone.*` of `varmap`, with that prefix
/// removed, as a safetensors file: the pretrained backbone, loadable into
/// the same architecture with a fresh head by
/// [`crate::nn::params::load_with`].
pub(crate) fn export_backbone(varmap: &VarMap, path: &Path) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = params::named_vars(varmap)?
        .into_iter()
        .filter_map(|(n, v)| {
            n.strip_prefix("backbone.")
                .map(|s| (s.to_string(), v.as_tensor().clone()))
        })
        .collect();
    if tensors.is_empty() {
        return Err(Error::invalid(
            "export_backbone",
            "the backbone has no variables (was it built from the VarBuilder it was given?)",
        ));
    }
    params::save_tensors(&tensors, path)
}

/// The online encoder (backbone + projector), seeded with `seed`.
pub(crate) fn online_encoder<B: candle_core::ModuleT>(
    backbone: &super::Backbone<B>,
    projector: &crate::nn::HeadConfig,
    seed: u64,
    device: &candle_core::Device,
) -> Result<crate::nn::Model<super::Encoder<B>>> {
    let varmap = VarMap::new();
    let vb = crate::nn::init::seeded_var_builder(&varmap, seed, DType::F32, device);
    Ok(crate::nn::Model::new(
        super::Encoder::new(backbone, projector, vb)?,
        varmap,
    ))
}

/// Seed tag of a predictor's initialisation.
const PREDICTOR_TAG: u64 = 0x5052_4544; // "PRED"

/// A predictor head of layout `cfg` on projections of width `input_dim`,
/// its variables named `predictor.*`, seeded from `seed`.
pub(crate) fn predictor(
    cfg: &crate::nn::HeadConfig,
    input_dim: usize,
    seed: u64,
    device: &candle_core::Device,
) -> Result<crate::nn::Model<crate::nn::ProjectionHead>> {
    let varmap = VarMap::new();
    let seed = crate::data::augment::derive_seed(seed, &[PREDICTOR_TAG]);
    let vb = crate::nn::init::seeded_var_builder(&varmap, seed, DType::F32, device);
    let head = cfg.clone().with_input_dim(input_dim);
    Ok(crate::nn::Model::new(
        crate::nn::ProjectionHead::new(head, vb.pp("predictor"))?,
        varmap,
    ))
}

/// The step of the methods with one network and a loss of the two views'
/// projections (SimCLR, Barlow Twins, VICReg).
pub(crate) fn projection_step<B: candle_core::ModuleT>(
    core: &mut Core,
    online: &crate::nn::Model<super::Encoder<B>>,
    batch: &Batch,
    step: u64,
    who: &str,
    loss: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<StepOutput> {
    let (x, n) = stack_views(batch, who)?;
    let stepped = core.step(step, n, || {
        let (z1, z2) = halves(&online.forward_t(&x, true)?, n)?;
        Ok((loss(&z1, &z2)?, ()))
    })?;
    Ok(stepped.out)
}
