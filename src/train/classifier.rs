//! The supervised trainer: a model, cross-entropy (with label smoothing), an
//! optimizer, and the non-finite guard.
//!
//! It is both a user-facing trainer and how teachers are trained for
//! distillation. It implements [`TrainStep`], so it runs under
//! [`Fit`](super::Fit) with any schedule and callbacks, and its checkpoints
//! hold the model (BatchNorm statistics included) and the optimizer state.
//!
//! ```
//! use aimass::prelude::*;
//! use aimass::data::{DataLoader, DataLoaderConfig, InMemoryDataset};
//! use aimass::nn::{Mlp, MlpConfig};
//! use aimass::optim::{Sgd, SgdConfig};
//! use aimass::train::{Classifier, ClassifierConfig, Fit, FitConfig};
//!
//! // A toy problem: 4-pixel images whose label is the brightest pixel.
//! let mut pixels = Vec::new();
//! let mut labels = Vec::new();
//! for i in 0..64u32 {
//!     let c = i % 4;
//!     pixels.extend((0..4).map(|p| if p == c { 250u8 } else { 10 }));
//!     labels.push(c);
//! }
//! let ds = InMemoryDataset::new(pixels, labels, (1, 2, 2))?;
//! let mut loader = DataLoader::new(ds, DataLoaderConfig::default().with_batch_size(16), &Device::Cpu)?;
//!
//! let varmap = VarMap::new();
//! let vb = aimass::nn::init::seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu);
//! let mlp = Mlp::new(MlpConfig::new(vec![4, 16, 4]), vb)?;
//! let model = aimass::nn::seq().add_fn(|x, _train| x.flatten_from(1)).add(mlp);
//! let opt = Sgd::from_varmap(&varmap, SgdConfig::default().with_lr(0.5).with_momentum(0.9))?;
//! let mut clf = Classifier::new(model, varmap, opt, ClassifierConfig::default())?;
//!
//! let summary = Fit::new(&mut clf, &mut loader, FitConfig::default().with_epochs(20))?.run()?;
//! assert!(summary.train_loss < 0.1, "{}", summary.train_loss);
//! # Ok::<(), aimass::Error>(())
//! ```

use candle_core::{DType, ModuleT, Tensor, Var};
use candle_nn::VarMap;

use super::fit::{StepOutput, TrainStep};
use super::guard::{GuardAction, NonFiniteGuard, NonFinitePolicy};
use super::Checkpoint;
use crate::config::config;
use crate::data::Batch;
use crate::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use crate::optim::Optimizer;
use crate::{Error, Result};

config! {
    /// Settings of [`Classifier`].
    pub struct ClassifierConfig {
        /// Label smoothing of the cross-entropy (default 0, torch's).
        label_smoothing: f64 = 0.0,
        /// What to do on a NaN/Inf loss or gradient (default: error).
        non_finite: NonFinitePolicy = NonFinitePolicy::Error,
    }
}

/// A model trained with cross-entropy on labelled batches.
pub struct Classifier<M: ModuleT, O: Optimizer> {
    model: M,
    varmap: VarMap,
    optimizer: O,
    loss: CrossEntropyLoss,
    guard: NonFiniteGuard,
    params: Vec<(String, Var)>,
    buffers: Vec<Var>,
}

impl<M: ModuleT, O: Optimizer> Classifier<M, O> {
    /// A trainer for `model`, whose parameters (and BatchNorm buffers) live
    /// in `varmap`, updated by `optimizer`.
    pub fn new(model: M, varmap: VarMap, optimizer: O, config: ClassifierConfig) -> Result<Self> {
        let loss = CrossEntropyLoss::new(
            CrossEntropyLossConfig::default().with_label_smoothing(config.label_smoothing),
        )?;
        let params = crate::nn::params::named_vars(&varmap)?;
        let buffers = crate::nn::params::buffer_vars(&varmap)?
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        Ok(Classifier {
            model,
            varmap,
            optimizer,
            loss,
            guard: NonFiniteGuard::new(config.non_finite),
            params,
            buffers,
        })
    }

    /// The model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The variables of the model.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    /// Steps skipped by the non-finite guard.
    pub fn skipped_steps(&self) -> u64 {
        self.guard.skipped()
    }

    /// Logits in eval mode.
    pub fn predict(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.model.forward_t(images, false)?)
    }
}

/// Copies of buffer values (BatchNorm running statistics), to undo a
/// rejected step.
pub(crate) struct BufferSnapshot(Vec<(Var, Tensor)>);

impl BufferSnapshot {
    /// Copies the current values of `buffers`.
    pub(crate) fn take(buffers: &[Var]) -> Result<Self> {
        Ok(BufferSnapshot(
            buffers
                .iter()
                .map(|v| Ok((v.clone(), v.as_tensor().copy()?)))
                .collect::<Result<_>>()?,
        ))
    }

    /// Writes the copied values back.
    pub(crate) fn restore(&self) -> Result<()> {
        for (v, t) in &self.0 {
            v.set(t)?;
        }
        Ok(())
    }
}

/// Number of rows whose argmax equals the label, on the device (f32 scalar).
pub(crate) fn correct_on_device(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let pred = logits.argmax(1)?.to_dtype(DType::U32)?;
    let labels = labels.to_dtype(DType::U32)?;
    if pred.dims() != labels.dims() {
        return Err(Error::shape(
            "accuracy",
            format!("labels of shape {:?}", pred.dims()),
            labels.dims(),
        ));
    }
    Ok(pred.eq(&labels)?.to_dtype(DType::F32)?.sum_all()?)
}

/// Number of rows whose argmax equals the label (one host read).
pub(crate) fn correct(logits: &Tensor, labels: &Tensor) -> Result<usize> {
    let c = correct_on_device(logits, labels)?;
    Ok(crate::host::reduce_and_read(&[(&c, crate::host::Reduce::Value)])?[0] as usize)
}

impl<M: ModuleT, O: Optimizer> TrainStep for Classifier<M, O> {
    type Batch = Batch;

    fn train_step(&mut self, batch: &Batch, step: u64) -> Result<StepOutput> {
        // Dropout masks are a function of the step (exact resume).
        let _scope = crate::nn::StepScope::enter(step);
        // The train-mode forward updates BatchNorm running statistics; keep
        // their values so a step the guard rejects leaves no trace.
        let saved = BufferSnapshot::take(&self.buffers)?;
        let logits = self.model.forward_t(batch.images()?, true)?;
        let loss = self.loss.forward(&logits, &batch.labels)?;
        let right = correct_on_device(&logits.detach(), &batch.labels)?;
        let mut grads = loss.backward()?;
        // Data-parallel: the mean over ranks, before the checks (every
        // rank then skips or takes the same steps).
        self.optimizer.sync_gradients(&mut grads)?;
        let n = batch.labels.dim(0)?;
        // One host read for the step: the loss, the correct count and the
        // gradients' sums of squares (which norm clipping reuses).
        let checked = self
            .guard
            .check_reduced(Some(&loss), &[&right], &grads, &self.params, step);
        let (loss_value, right) = match checked {
            Ok((GuardAction::Proceed, v)) => (v[0], v[1]),
            rejected => {
                saved.restore()?;
                // Off the CPU the loss does not read the targets to check
                // them (a read per call); a bad one shows as a NaN loss.
                self.loss.check_targets(&batch.labels, logits.dim(1)?)?;
                let (_, v) = rejected?;
                return Ok(StepOutput::new(v[0], n).skipped(true));
            }
        };
        self.optimizer.step(&grads)?;
        let acc = right / n.max(1) as f64;
        Ok(StepOutput::new(loss_value, n).with_metric("batch_acc", acc))
    }

    fn set_learning_rate(&mut self, lr: f64) -> Result<()> {
        self.optimizer.set_lr(lr)
    }

    fn learning_rate(&self) -> f64 {
        self.optimizer.lr()
    }

    fn kind(&self) -> &str {
        "classifier"
    }

    fn save_state(&self, ckpt: &mut Checkpoint) -> Result<()> {
        ckpt.insert_varmap("model", &self.varmap)?;
        ckpt.insert_tensors("optim", self.optimizer.state_dict()?.iter());
        ckpt.set_meta("guard.skipped", self.guard.skipped());
        Ok(())
    }

    /// The optimizer's step count plus the steps the guard skipped.
    fn steps_in_checkpoint(&self, ckpt: &Checkpoint) -> Result<Option<u64>> {
        optimizer_and_guard_steps(ckpt).map(Some)
    }

    fn load_state(&mut self, ckpt: &Checkpoint) -> Result<()> {
        ckpt.check_varmap("model", &self.varmap)?;
        let skipped: u64 = ckpt.meta_parse("guard.skipped")?;
        self.optimizer
            .load_state_dict(&ckpt.tensors_with_prefix("optim"))?;
        ckpt.restore_varmap("model", &self.varmap)?;
        self.guard.set_skipped(skipped);
        Ok(())
    }
}

/// The steps a trainer state in `ckpt` has counted: the optimizer's step
/// count (`optim/step`) plus the steps its non-finite guard skipped
/// (`guard.skipped`), for [`TrainStep::steps_in_checkpoint`].
pub(crate) fn optimizer_and_guard_steps(ckpt: &Checkpoint) -> Result<u64> {
    let t = ckpt.tensor("optim/step")?;
    // host-ok: one checkpoint scalar, read once at resume, on the CPU.
    let v = t
        .to_device(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let optim = match v.as_slice() {
        [n] if *n >= 0.0 && n.fract() == 0.0 && *n < 9.0e15 => *n as u64,
        _ => {
            return Err(Error::malformed(
                "<checkpoint>",
                "`optim/step`",
                "one step count",
                format!("{v:?}"),
            ))
        }
    };
    let skipped: u64 = ckpt.meta_parse("guard.skipped")?;
    Ok(optim.saturating_add(skipped))
}
