//! The `Distiller`: a frozen teacher, a student with its adapters, a loss
//! recipe, an optimizer and a schedule; one step per batch.

use candle_core::{Tensor, Var};

use super::cache::TeacherCache;
use super::{DistillLoss, DistillTerms};
use crate::config::config;
use crate::data::{Batch, DataLoader};
use crate::nn::{params, FeatureExtractor, Features, ForwardMode, FrozenModel, Model, StepScope};
use crate::optim::{Optimizer, Schedule};
use crate::train::{
    BufferSnapshot, Checkpoint, GuardAction, NonFiniteGuard, NonFinitePolicy, StepOutput, TrainStep,
};
use crate::{Error, Result};

/// Where the teacher's outputs come from.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TeacherMode {
    /// The teacher runs on every batch, on the images the student sees
    /// (augmented ones included). The default.
    #[default]
    Online,
    /// The teacher's outputs are cached by dataset index (`Batch::indices`):
    /// computed once over a loader without augmentation by
    /// [`Distiller::precompute_teacher`], and for samples not cached yet, on
    /// the batch that first brings them. Same result as online mode where
    /// the teacher would see the same images; the teacher then costs one
    /// forward per sample instead of one per step. The cache is part of the
    /// checkpoint (its size: samples × the cached stages' sizes).
    Cached,
}

config! {
    /// Settings of a [`Distiller`].
    pub struct DistillerConfig {
        /// Where the teacher's outputs come from (default: online).
        teacher_mode: TeacherMode = TeacherMode::Online,
        /// What to do on a NaN/Inf loss or gradient (default: error).
        non_finite: NonFinitePolicy = NonFinitePolicy::Error,
    }
}

/// What one distillation step reports.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DistillOutput {
    /// The total loss (before the update).
    pub loss: f64,
    /// Each weighted term (`kd`, `ce`, `at.conv1.layer2`, ...); they add up
    /// to `loss`.
    pub terms: Vec<(String, f64)>,
    /// Samples in the batch.
    pub samples: usize,
    /// Samples of the batch with a label.
    pub labelled: usize,
    /// Whether the non-finite guard skipped the update.
    pub skipped: bool,
}

impl DistillOutput {
    /// The value of the term called `name`.
    pub fn term(&self, name: &str) -> Option<f64> {
        self.terms.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

/// Teacher-student distillation: the student (and the adapters of the
/// feature terms) learn from a frozen teacher's outputs through a
/// [`DistillLoss`]; the teacher never changes.
///
/// - The teacher is a [`FrozenModel`] in [`ForwardMode::Eval`]: it cannot
///   reach an optimizer, its outputs carry no gradient, and its weights and
///   BatchNorm statistics stay bit-identical however long the run.
/// - The student is a [`Model`] whose `VarMap` also holds the adapters;
///   the optimizer must update exactly those variables (checked here).
/// - The schedule sets the learning rate before every step, at the step's
///   global index (a resumed run continues it); under
///   [`Fit`](crate::train::Fit) give `Fit` no second schedule.
/// - Batches are [`Batch`]es: the first view is the input of both models,
///   labels equal to [`UNLABELLED`](super::UNLABELLED) mark samples without
///   a label ([`TransferSet`](super::TransferSet)), and `indices` key the
///   teacher cache.
///
/// It implements [`TrainStep`], so `Fit` runs it with checkpoints and exact
/// resume; [`Distiller::step`] serves a hand-written loop. See the
/// [module docs](super) for a complete program.
pub struct Distiller<T, S, O> {
    teacher: FrozenModel<T>,
    student: Model<S>,
    loss: DistillLoss,
    optimizer: O,
    schedule: Box<dyn Schedule + Send>,
    cfg: DistillerConfig,
    cache: Option<TeacherCache>,
    guard: NonFiniteGuard,
    params: Vec<(String, Var)>,
    buffers: Vec<Var>,
    adapter_names: Vec<String>,
    teacher_crc: u32,
    steps: u64,
}

/// CRC-32 of a frozen model's parameters and buffers: identifies the
/// teacher a checkpoint was written with.
fn model_crc<T>(m: &FrozenModel<T>) -> Result<u32> {
    let mut h = crc32fast::Hasher::new();
    let mut all = m.named_parameters()?;
    all.extend(m.named_buffers()?);
    for (name, t) in all {
        h.update(name.as_bytes());
        // host-ok: the teacher's fingerprint, once at construction.
        for v in t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?
        {
            h.update(&v.to_bits().to_le_bytes());
        }
    }
    Ok(h.finalize())
}

impl<T: FeatureExtractor, S: FeatureExtractor, O: Optimizer> Distiller<T, S, O> {
    /// A distiller of `teacher` into `student` with `loss` (whose adapters
    /// were built in the student's `VarMap`), `optimizer` (over the
    /// student's `VarMap`, built after the loss) and `schedule`.
    ///
    /// Errors when the teacher is not in eval mode, when an adapter is not a
    /// variable of the student's `VarMap` or not updated by the optimizer,
    /// or when the optimizer updates a variable that is not the student's.
    pub fn new(
        teacher: FrozenModel<T>,
        student: Model<S>,
        loss: DistillLoss,
        optimizer: O,
        schedule: impl Schedule + Send + 'static,
        cfg: DistillerConfig,
    ) -> Result<Self> {
        const OP: &str = "Distiller::new";
        if teacher.mode() != ForwardMode::Eval {
            return Err(Error::invalid(
                OP,
                "the teacher runs in train mode; a distillation teacher is frozen with ForwardMode::Eval",
            ));
        }
        let vars = params::named_vars(student.varmap())?;
        let mut adapter_names = Vec::new();
        for (name, t) in loss.adapter_tensors() {
            match vars.iter().find(|(n, _)| n == name) {
                Some((_, v)) if v.as_tensor().id() == t.id() => adapter_names.push(name.clone()),
                _ => {
                    return Err(Error::invalid(
                        OP,
                        format!("adapter `{name}` is not a variable of the student's VarMap: build the DistillLoss with a VarBuilder over the student's VarMap (e.g. `vb.pp(\"adapters\")`)"),
                    ))
                }
            }
        }
        let optimized = optimizer.param_names();
        if optimized.is_empty() {
            return Err(Error::invalid(OP, "the optimizer updates no parameter"));
        }
        for n in &optimized {
            if !vars.iter().any(|(v, _)| v == n) {
                return Err(Error::invalid(
                    OP,
                    format!("the optimizer updates `{n}`, which is not a variable of the student's VarMap: build the optimizer from the student's VarMap"),
                ));
            }
        }
        if let Some(a) = adapter_names.iter().find(|a| !optimized.contains(a)) {
            return Err(Error::invalid(
                OP,
                format!("adapter `{a}` is not updated by the optimizer: build the optimizer after the DistillLoss, from the student's VarMap"),
            ));
        }
        let params = params::trainable_vars(student.varmap(), &params::Frozen::none())?;
        let buffers = params::buffer_vars(student.varmap())?
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        let teacher_crc = model_crc(&teacher)?;
        let cache = match cfg.teacher_mode {
            TeacherMode::Cached => Some(TeacherCache::new(
                loss.teacher_stages().to_vec(),
                teacher_crc,
            )),
            _ => None,
        };
        let mut optimizer = optimizer;
        optimizer.set_lr(schedule.lr(0))?;
        Ok(Distiller {
            teacher,
            student,
            loss,
            optimizer,
            schedule: Box::new(schedule),
            guard: NonFiniteGuard::new(cfg.non_finite),
            cfg,
            cache,
            params,
            buffers,
            adapter_names,
            teacher_crc,
            steps: 0,
        })
    }

    /// The teacher.
    pub fn teacher(&self) -> &FrozenModel<T> {
        &self.teacher
    }

    /// The student (its `VarMap` holds the adapters too).
    pub fn student(&self) -> &Model<S> {
        &self.student
    }

    /// The student, giving up the distiller.
    pub fn into_student(self) -> Model<S> {
        self.student
    }

    /// The loss recipe.
    pub fn loss(&self) -> &DistillLoss {
        &self.loss
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    /// The configuration.
    pub fn config(&self) -> &DistillerConfig {
        &self.cfg
    }

    /// Steps taken (restored from checkpoints).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Steps the non-finite guard skipped.
    pub fn skipped_steps(&self) -> u64 {
        self.guard.skipped()
    }

    /// Samples whose teacher outputs are cached (0 in online mode).
    pub fn cached_samples(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.filled())
    }

    /// Saves the student's weights without the adapters, as safetensors
    /// with the student's own names: the file loads strictly into a fresh
    /// student. ([`Model::save`] on [`Distiller::student`] keeps the adapters.)
    pub fn save_student(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = params::named_vars(self.student.varmap())?
            .into_iter()
            .filter(|(n, _)| !self.adapter_names.contains(n))
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        params::save_tensors(&tensors, path.as_ref())
    }

    /// Fills the teacher cache ([`TeacherMode::Cached`]) with the teacher's
    /// outputs on every batch of `loader` (in its epoch-0 order; its
    /// position does not move). Use a loader over the training dataset (the
    /// same indices) without augmentation. Returns the number of cached
    /// samples.
    pub fn precompute_teacher(&mut self, loader: &DataLoader) -> Result<usize> {
        if self.cache.is_none() {
            return Err(Error::invalid(
                "Distiller::precompute_teacher",
                "the distiller runs its teacher online; set DistillerConfig::teacher_mode to TeacherMode::Cached",
            ));
        }
        for b in 0..loader.len() {
            let batch = loader.batch_at(0, b)?;
            let feats = self.run_teacher(batch.images()?)?;
            if let Some(cache) = self.cache.as_mut() {
                cache.insert(&batch.indices, &feats)?;
            }
        }
        Ok(self.cached_samples())
    }

    /// The teacher cache ([`TeacherMode::Cached`]; `None` online).
    pub fn teacher_cache(&self) -> Option<&TeacherCache> {
        self.cache.as_ref()
    }

    /// Replaces the teacher cache with `cache`, for instance one filled by
    /// another distiller with the same teacher over the same dataset (the
    /// cache is keyed by dataset index). Errors in online mode, when the
    /// cache was computed by another teacher (other weights), or when it
    /// lacks a stage the loss reads.
    pub fn set_teacher_cache(&mut self, cache: TeacherCache) -> Result<()> {
        const OP: &str = "Distiller::set_teacher_cache";
        if self.cache.is_none() {
            return Err(Error::invalid(
                OP,
                "the distiller runs its teacher online; set DistillerConfig::teacher_mode to TeacherMode::Cached",
            ));
        }
        if cache.teacher_crc() != self.teacher_crc {
            return Err(Error::invalid(
                OP,
                "the cache holds the outputs of another teacher (its weights differ from this distiller's)",
            ));
        }
        if let Some(missing) = self
            .loss
            .teacher_stages()
            .iter()
            .find(|s| !cache.stages().contains(s))
        {
            return Err(Error::invalid(
                OP,
                format!(
                    "the cache has no teacher stage `{missing}` (it holds {}), which the loss reads",
                    cache.stages().join(", ")
                ),
            ));
        }
        self.cache = Some(cache);
        Ok(())
    }

    /// The teacher's outputs on `images`: the stages the loss reads.
    fn run_teacher(&self, images: &Tensor) -> Result<Features> {
        let all = self.teacher.forward_features(images, false)?;
        let mut out = Features::new();
        for name in self.loss.teacher_stages() {
            out.push(name.clone(), all.require(name)?.clone());
        }
        Ok(out)
    }

    /// The teacher's outputs for a batch, online or from the cache (filling
    /// it for samples seen for the first time).
    fn teacher_outputs(&mut self, images: &Tensor, indices: &[usize]) -> Result<Features> {
        let Some(cache) = self.cache.as_ref() else {
            return self.run_teacher(images);
        };
        let n = images.dim(0)?;
        if indices.len() != n {
            return Err(Error::shape(
                "Distiller (cached teacher)",
                format!("one dataset index per sample of the batch ({n}) in Batch::indices"),
                indices.len(),
            ));
        }
        let missing: Vec<usize> = (0..n).filter(|&j| !cache.has(indices[j])).collect();
        if !missing.is_empty() {
            let (x, ids) = if missing.len() == n {
                (images.clone(), indices.to_vec())
            } else {
                let pos: Vec<u32> = missing.iter().map(|&j| j as u32).collect();
                // host-ok: the batch rows the cache lacks, a small upload.
                let pos = Tensor::from_vec(pos, missing.len(), images.device())?;
                let ids = missing.iter().map(|&j| indices[j]).collect();
                (images.index_select(&pos, 0)?, ids)
            };
            let feats = self.run_teacher(&x)?;
            if let Some(cache) = self.cache.as_mut() {
                cache.insert(&ids, &feats)?;
            }
        }
        match self.cache.as_ref() {
            Some(cache) => cache.gather(indices),
            None => self.run_teacher(images),
        }
    }

    /// The loss terms of `batch` with the student in train mode (its
    /// BatchNorm statistics update) and no parameter update: for a
    /// hand-written loop that differentiates `total` itself.
    pub fn compute_loss(&mut self, batch: &Batch) -> Result<DistillTerms> {
        let images = batch.images()?;
        let teacher = self.teacher_outputs(images, &batch.indices)?;
        let student = self.student.module().forward_features(images, true)?;
        self.loss.forward(&student, &teacher, &batch.labels)
    }

    /// One optimisation step on `batch` (the learning rate from the
    /// schedule at [`Distiller::steps`]); returns each term's value.
    pub fn step(&mut self, batch: &Batch) -> Result<DistillOutput> {
        self.step_at(batch, self.steps)
    }

    fn step_at(&mut self, batch: &Batch, step: u64) -> Result<DistillOutput> {
        // Dropout masks are a function of the step (exact resume).
        let _scope = StepScope::enter(step);
        self.optimizer.set_lr(self.schedule.lr(step))?;
        // A step that fails or is skipped leaves no trace in the student's
        // BatchNorm statistics.
        let saved = BufferSnapshot::take(&self.buffers)?;
        let result = (|| {
            let terms = self.compute_loss(batch)?;
            let mut grads = terms.total.backward()?;
            // Data-parallel: the mean over ranks, before the checks.
            self.optimizer.sync_gradients(&mut grads)?;
            // One host read for the step: the loss, each term, the
            // labelled count and the gradients' sums of squares.
            let mut extra: Vec<&Tensor> = terms.terms.iter().map(|(_, t)| t).collect();
            extra.push(&terms.labelled);
            let (action, values) =
                self.guard
                    .check_reduced(Some(&terms.total), &extra, &grads, &self.params, step)?;
            Ok((DistillTerms::unpack(&terms.terms, &values), grads, action))
        })();
        let (values, grads, action) = match result {
            Ok(r) => r,
            Err(e) => {
                saved.restore()?;
                return Err(e);
            }
        };
        let skipped = action != GuardAction::Proceed;
        if skipped {
            saved.restore()?;
        } else {
            self.optimizer.step(&grads)?;
        }
        self.steps = step + 1;
        // So that `learning_rate()` before the next step reports its rate.
        self.optimizer.set_lr(self.schedule.lr(step + 1))?;
        Ok(DistillOutput {
            loss: values.total,
            terms: values.terms,
            samples: batch.images()?.dim(0)?,
            labelled: values.labelled,
            skipped,
        })
    }
}

impl<T: FeatureExtractor, S: FeatureExtractor, O: Optimizer> TrainStep for Distiller<T, S, O> {
    type Batch = Batch;

    fn train_step(&mut self, batch: &Batch, step: u64) -> Result<StepOutput> {
        let out = self.step_at(batch, step)?;
        let mut s = StepOutput::new(out.loss, out.samples)
            .skipped(out.skipped)
            .with_metric("labelled", out.labelled as f64);
        for (name, v) in out.terms {
            s = s.with_metric(name, v);
        }
        Ok(s)
    }

    fn set_learning_rate(&mut self, lr: f64) -> Result<()> {
        self.optimizer.set_lr(lr)
    }

    fn learning_rate(&self) -> f64 {
        self.optimizer.lr()
    }

    fn kind(&self) -> &str {
        "distiller"
    }

    fn save_state(&self, ckpt: &mut Checkpoint) -> Result<()> {
        ckpt.insert_varmap("student", self.student.varmap())?;
        ckpt.insert_tensors("optim", self.optimizer.state_dict()?.iter());
        ckpt.set_meta("guard.skipped", self.guard.skipped());
        ckpt.set_meta("distill.steps", self.steps);
        ckpt.set_meta("distill.teacher_crc32", self.teacher_crc);
        ckpt.set_meta("distill.terms", self.loss.term_names().join(","));
        ckpt.set_meta(
            "distill.teacher_mode",
            format!("{:?}", self.cfg.teacher_mode),
        );
        if let Some(cache) = &self.cache {
            cache.save(ckpt, "teacher_cache")?;
        }
        Ok(())
    }

    /// The optimizer's step count plus the steps the guard skipped.
    fn steps_in_checkpoint(&self, ckpt: &Checkpoint) -> Result<Option<u64>> {
        crate::train::optimizer_and_guard_steps(ckpt).map(Some)
    }

    fn load_state(&mut self, ckpt: &Checkpoint) -> Result<()> {
        let expect = |key: &str, want: String| -> Result<()> {
            let got = ckpt.meta(key).unwrap_or_default();
            if got != want {
                return Err(Error::malformed(
                    "<checkpoint>",
                    format!("distiller `{key}`"),
                    want,
                    format!("{got}: resume with the teacher, recipe and teacher mode the checkpoint was written with"),
                ));
            }
            Ok(())
        };
        expect("distill.teacher_crc32", self.teacher_crc.to_string())?;
        expect("distill.terms", self.loss.term_names().join(","))?;
        expect(
            "distill.teacher_mode",
            format!("{:?}", self.cfg.teacher_mode),
        )?;
        ckpt.check_varmap("student", self.student.varmap())?;
        let skipped: u64 = ckpt.meta_parse("guard.skipped")?;
        let steps: u64 = ckpt.meta_parse("distill.steps")?;
        let cache = match &self.cache {
            Some(_) => Some(TeacherCache::load(
                ckpt,
                "teacher_cache",
                self.loss.teacher_stages(),
                self.teacher_crc,
            )?),
            None => None,
        };
        self.optimizer
            .load_state_dict(&ckpt.tensors_with_prefix("optim"))?;
        ckpt.restore_varmap("student", self.student.varmap())?;
        self.guard.set_skipped(skipped);
        self.steps = steps;
        self.cache = cache;
        self.optimizer.set_lr(self.schedule.lr(steps))
    }
}
