//! The loss recipe of a distillation run: a logit term (Hinton KD or DKD),
//! the hard-label cross-entropy on the labelled samples of the batch, and
//! feature terms through trainable adapters, each weighted.
//!
//! ```text
//! total = α·T²·KL(softmax(t/T) ‖ softmax(s/T))          "kd"   (whole batch, batch mean)
//!       + w_ce · CE(s[labelled], y[labelled])            "ce"   (labelled rows only; 0 if none)
//!       + Σ_k w_k · loss_k(adapter_k(f_s,k), f_t,k)      "<loss>.<student stage>.<teacher stage>"
//! ```
//!
//! with `w_ce = 1 − α` unless set (Hinton's and RepDistiller's convention:
//! α weights the soft term). With DKD instead of KD the logit term is
//! `α·TCKD + β·NCKD` ("dkd"; its target class is the label where there is
//! one, the teacher's argmax elsewhere) and `w_ce = 1` unless set
//! (mdistiller).

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::adapter::Adapter;
use super::FeatureLoss;
use super::FeatureTerm;
use crate::config::config;
use crate::host::Reduce;
use crate::loss::{
    hint_loss, AttentionTransferLoss, CrossEntropyLoss, CrossEntropyLossConfig, DkdLoss,
    DkdLossConfig, KdLoss, KdLossConfig, Reduction, RkdLoss,
};
use crate::nn::{FeatureExtractor, Features};
use crate::{Error, Result};

/// The logit term of a [`DistillLossConfig`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub enum LogitTerm {
    /// Hinton KD: `α·T²·KL(softmax(t/T) ‖ softmax(s/T))`, batch mean over
    /// every sample, labelled or not ([`KdLoss::soft`] times the config's `alpha`).
    Kd(KdLossConfig),
    /// Decoupled KD, `α·TCKD + β·NCKD` ([`DkdLoss`]); the target class is
    /// the label, or the teacher's argmax on an unlabelled sample.
    Dkd(DkdLossConfig),
    /// No logit term (feature terms and cross-entropy only).
    None,
}

config! {
    /// The loss recipe of a [`DistillLoss`]. The default is Hinton KD with
    /// `T = 4`, `α = 0.9` and the cross-entropy weighted `1 − α` (RepDistiller),
    /// without feature terms.
    pub struct DistillLossConfig {
        /// The logit term (default: KD, `T = 4`, `α = 0.9`).
        logits: LogitTerm = LogitTerm::Kd(KdLossConfig::default()),
        /// Weight of the hard-label cross-entropy on the labelled samples of
        /// a batch, finite and >= 0; `None` (default): `1 − α` with KD, 1
        /// with DKD or no logit term.
        ce_weight: Option<f64> = None,
        /// Feature terms (default none).
        features: Vec<FeatureTerm> = Vec::new(),
    }
}

impl DistillLossConfig {
    /// The weight the cross-entropy gets (see [`DistillLossConfig::ce_weight`]).
    pub fn effective_ce_weight(&self) -> f64 {
        match (self.ce_weight, &self.logits) {
            (Some(w), _) => w,
            (None, LogitTerm::Kd(c)) => 1.0 - c.alpha,
            (None, _) => 1.0,
        }
    }

    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if let Some(w) = self.ce_weight {
            if !(w.is_finite() && w >= 0.0) {
                return Err(Error::config(
                    "DistillLossConfig::ce_weight",
                    w,
                    "must be finite and >= 0",
                ));
            }
        }
        for (i, f) in self.features.iter().enumerate() {
            f.validate(i)?;
        }
        let logit = !matches!(self.logits, LogitTerm::None);
        let features = self.features.iter().any(|f| f.weight > 0.0);
        if !logit && !features && self.effective_ce_weight() == 0.0 {
            return Err(Error::config(
                "DistillLossConfig",
                "no logit term, no weighted feature term, ce_weight 0",
                "the recipe needs at least one term with a weight > 0",
            ));
        }
        Ok(())
    }
}

/// The weighted terms of one batch's loss and their sum.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DistillTerms {
    /// The sum of the terms: the loss to differentiate.
    pub total: Tensor,
    /// Each weighted term, by name (`kd`, `dkd`, `ce`, `hint.conv2.layer3`, ...),
    /// in recipe order; they add up to `total`.
    pub terms: Vec<(String, Tensor)>,
    /// How many samples of the batch carry a label (a scalar on the
    /// batch's device, read back with the loss).
    pub labelled: Tensor,
}

impl DistillTerms {
    /// The term called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.terms.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The total, each term and the labelled count as numbers, in one
    /// host read.
    pub fn values(&self) -> Result<DistillValues> {
        let mut items: Vec<(&Tensor, Reduce)> = vec![(&self.total, Reduce::Value)];
        items.extend(self.terms.iter().map(|(_, t)| (t, Reduce::Value)));
        items.push((&self.labelled, Reduce::Value));
        let v = crate::host::reduce_and_read(&items)?;
        Ok(Self::unpack(&self.terms, &v))
    }

    /// The values read in the order of [`DistillTerms::values`] (total,
    /// each term, labelled count).
    pub(crate) fn unpack(terms: &[(String, Tensor)], v: &[f64]) -> DistillValues {
        let named = terms
            .iter()
            .zip(&v[1..])
            .map(|((n, _), x)| (n.clone(), *x))
            .collect();
        DistillValues {
            total: v[0],
            terms: named,
            labelled: v[v.len() - 1].max(0.0) as usize,
        }
    }
}

/// [`DistillTerms`] read back as numbers.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DistillValues {
    /// The loss.
    pub total: f64,
    /// Each weighted term, by name, in recipe order.
    pub terms: Vec<(String, f64)>,
    /// Samples of the batch with a label.
    pub labelled: usize,
}

/// A feature term with its adapter and loss built.
#[derive(Debug, Clone)]
struct BuiltTerm {
    term: FeatureTerm,
    name: String,
    label: String,
    adapter: Adapter,
    at: Option<AttentionTransferLoss>,
    rkd: Option<RkdLoss>,
}

/// The loss of a distillation step (see the module docs for the formula),
/// with the adapters of its feature terms.
///
/// Built once from the teacher, the student and a sample input: the sample
/// runs through both in eval mode (nothing changes) to find the named
/// stages, check that the shapes fit, and size the adapters, whose
/// parameters are created in `vb` (`<prefix>.<term index>.weight`, `.bias`).
/// Pass a `VarBuilder` over the **student's** `VarMap`, so the adapters
/// train with the student and are saved with it, and build the optimizer
/// after this.
#[derive(Debug, Clone)]
pub struct DistillLoss {
    cfg: DistillLossConfig,
    kd: Option<KdLoss>,
    dkd: Option<DkdLoss>,
    ce: CrossEntropyLoss,
    ce_weight: f64,
    features: Vec<BuiltTerm>,
    student_output: String,
    teacher_output: String,
    teacher_stages: Vec<String>,
    adapters: Vec<(String, Tensor)>,
}

/// Puts `label` in front of the operation an error names.
fn in_term(label: &str, e: Error) -> Error {
    match e {
        Error::Shape { op, expected, got } => Error::Shape {
            op: format!("{label}: {op}"),
            expected,
            got,
        },
        Error::InvalidArgument { op, reason } => Error::InvalidArgument {
            op: format!("{label}: {op}"),
            reason,
        },
        other => other,
    }
}

impl DistillLoss {
    /// Builds the recipe for `teacher` and `student`, reading the stage
    /// shapes from one forward pass of `sample` (a batch of inputs, or one
    /// input with a batch dimension) in eval mode. Errors when a named stage
    /// does not exist (listing the stages there are), when teacher and
    /// student outputs differ in shape while a logit term compares them,
    /// or when a feature term's shapes do not fit its adapter and loss.
    pub fn new(
        teacher: &impl FeatureExtractor,
        student: &impl FeatureExtractor,
        sample: &Tensor,
        cfg: DistillLossConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        const OP: &str = "DistillLoss::new";
        cfg.validate()?;
        if sample.rank() == 0 || sample.dim(0)? == 0 {
            return Err(Error::shape(
                OP,
                "a sample batch (N, ...) with N >= 1",
                sample.dims(),
            ));
        }
        let tf = teacher.forward_features(sample, false)?;
        let sf = student.forward_features(sample, false)?;
        let (Some((t_name, t_out)), Some((s_name, s_out))) = (tf.iter().last(), sf.iter().last())
        else {
            return Err(Error::invalid(
                OP,
                "the teacher or the student records no stage in forward_features",
            ));
        };
        let ce_weight = cfg.effective_ce_weight();
        let logit = !matches!(cfg.logits, LogitTerm::None);
        if (logit || ce_weight > 0.0) && s_out.rank() != 2 {
            return Err(Error::shape(
                OP,
                format!("the student's output (stage `{s_name}`) as class scores (N, classes)"),
                s_out.dims(),
            ));
        }
        if logit && t_out.dims() != s_out.dims() {
            return Err(Error::shape(
                OP,
                format!(
                    "teacher and student outputs of one shape: logit distillation compares the \
                     teacher's `{t_name}` {:?} with the student's `{s_name}` class by class, so \
                     both must score the same classes (or use LogitTerm::None and feature terms only)",
                    t_out.dims()
                ),
                s_out.dims(),
            ));
        }
        let (kd, dkd) = match &cfg.logits {
            LogitTerm::Kd(c) => (Some(KdLoss::new(c.clone())?), None),
            LogitTerm::Dkd(c) => (None, Some(DkdLoss::new(c.clone())?)),
            LogitTerm::None => (None, None),
        };
        let prefix = vb.prefix();
        let mut features = Vec::with_capacity(cfg.features.len());
        let mut adapters = Vec::new();
        let mut teacher_stages: Vec<String> = Vec::new();
        for (i, term) in cfg.features.iter().enumerate() {
            let name = term.name();
            let label = format!("feature term {i} ({name})");
            let s = sf.require(&term.student).map_err(|e| in_term(&label, e))?;
            let t = tf.require(&term.teacher).map_err(|e| in_term(&label, e))?;
            let adapter = Adapter::new(term.adapter, s.dims(), t.dims(), &label, vb.pp(i))?;
            for (tname, tensor) in adapter.tensors() {
                let full = if prefix.is_empty() {
                    format!("{i}.{tname}")
                } else {
                    format!("{prefix}.{i}.{tname}")
                };
                adapters.push((full, tensor.clone()));
            }
            let (at, rkd) = match &term.loss {
                FeatureLoss::Hint => (None, None),
                FeatureLoss::AttentionTransfer(c) => {
                    (Some(AttentionTransferLoss::new(c.clone())?), None)
                }
                FeatureLoss::Rkd(c) => (None, Some(RkdLoss::new(c.clone())?)),
            };
            let built = BuiltTerm {
                term: term.clone(),
                name,
                label,
                adapter,
                at,
                rkd,
            };
            // A dry run on the sample surfaces shape errors now, not at the
            // first step (RKD needs two samples).
            if built.rkd.is_none() || sample.dim(0)? >= 2 {
                built.value(s, t)?;
            }
            if !teacher_stages.contains(&term.teacher) {
                teacher_stages.push(term.teacher.clone());
            }
            features.push(built);
        }
        if !teacher_stages.iter().any(|n| n == t_name) {
            teacher_stages.push(t_name.to_string());
        }
        Ok(DistillLoss {
            ce: CrossEntropyLoss::new(
                CrossEntropyLossConfig::default()
                    .with_reduction(Reduction::None)
                    .with_ignore_index(None),
            )?,
            cfg,
            kd,
            dkd,
            ce_weight,
            features,
            student_output: s_name.to_string(),
            teacher_output: t_name.to_string(),
            teacher_stages,
            adapters,
        })
    }

    /// The recipe.
    pub fn config(&self) -> &DistillLossConfig {
        &self.cfg
    }

    /// The teacher stages the loss reads (feature stages, then the output).
    pub fn teacher_stages(&self) -> &[String] {
        &self.teacher_stages
    }

    /// The student's output stage (its logits).
    pub fn student_output(&self) -> &str {
        &self.student_output
    }

    /// The teacher's output stage (its logits).
    pub fn teacher_output(&self) -> &str {
        &self.teacher_output
    }

    /// The adapters' tensors by their full name in the `VarMap` they were
    /// built in.
    pub fn adapter_tensors(&self) -> &[(String, Tensor)] {
        &self.adapters
    }

    /// The names of the terms [`DistillLoss::forward`] returns, in order.
    pub fn term_names(&self) -> Vec<String> {
        let mut v = Vec::new();
        match &self.cfg.logits {
            LogitTerm::Kd(c) if c.alpha > 0.0 => v.push("kd".to_string()),
            LogitTerm::Dkd(_) => v.push("dkd".to_string()),
            _ => {}
        }
        if self.ce_weight > 0.0 {
            v.push("ce".to_string());
        }
        v.extend(
            self.features
                .iter()
                .filter(|f| f.term.weight > 0.0)
                .map(|f| f.name.clone()),
        );
        v
    }

    /// The loss of one batch: `student` and `teacher` are the models'
    /// recorded stages on the batch (the teacher's from a frozen model or a
    /// cache), `labels` the class indices `(N,)` (`u8`, `u32` or `i64`), where
    /// [`UNLABELLED`](super::UNLABELLED) (or a negative `i64`) marks a
    /// sample without a label.
    pub fn forward(
        &self,
        student: &Features,
        teacher: &Features,
        labels: &Tensor,
    ) -> Result<DistillTerms> {
        const OP: &str = "DistillLoss::forward";
        let s = student.require(&self.student_output)?;
        let t = teacher.require(&self.teacher_output)?;
        let n = s.dim(0)?;
        let (keep, y) = labelled_rows(OP, labels, n)?;
        let mut terms: Vec<(String, Tensor)> = Vec::new();
        let check_logits = || {
            if t.dims() != s.dims() {
                return Err(Error::shape(
                    OP,
                    format!("teacher logits of the student's shape {:?}", s.dims()),
                    t.dims(),
                ));
            }
            Ok(())
        };
        if let Some(kd) = &self.kd {
            let alpha = kd.config().alpha;
            if alpha > 0.0 {
                check_logits()?;
                terms.push(("kd".into(), (kd.soft(s, t)? * alpha)?));
            }
        }
        if let Some(dkd) = &self.dkd {
            check_logits()?;
            // The label where there is one, the teacher's guess elsewhere.
            let target = keep.where_cond(&y, &t.argmax(1)?.to_dtype(DType::U32)?)?;
            terms.push(("dkd".into(), dkd.forward(s, t, &target)?));
        }
        if self.ce_weight > 0.0 {
            // The mean over the labelled rows (0 when there are none):
            // per-row cross-entropy, unlabelled rows (target 0) selected out.
            let rows = self.ce.forward(s, &y)?;
            let kept = keep.where_cond(&rows, &rows.zeros_like()?)?;
            let count = keep.to_dtype(s.dtype())?.sum_all()?;
            let ce = (kept.sum_all()? / count.maximum(1.0)?)?;
            terms.push(("ce".into(), (ce * self.ce_weight)?));
        }
        for f in &self.features {
            if f.term.weight > 0.0 {
                let fs = student.require(&f.term.student)?;
                let ft = teacher.require(&f.term.teacher)?;
                terms.push((f.name.clone(), (f.value(fs, ft)? * f.term.weight)?));
            }
        }
        let mut total: Option<Tensor> = None;
        for (_, v) in &terms {
            total = Some(match total {
                None => v.clone(),
                Some(acc) => (acc + v)?,
            });
        }
        let total = match total {
            Some(t) => t,
            None => Tensor::zeros((), s.dtype(), s.device())?,
        };
        Ok(DistillTerms {
            total,
            terms,
            labelled: keep.to_dtype(DType::F32)?.sum_all()?,
        })
    }
}

impl BuiltTerm {
    /// The unweighted term on student and teacher features.
    fn value(&self, s: &Tensor, t: &Tensor) -> Result<Tensor> {
        let run = || -> Result<Tensor> {
            let a = self.adapter.forward(s)?;
            match (&self.at, &self.rkd) {
                (Some(at), _) => at.forward(&[a], std::slice::from_ref(t)),
                (_, Some(rkd)) => rkd.forward(&a, t),
                _ => hint_loss(&a, t),
            }
        };
        run().map_err(|e| in_term(&self.label, e))
    }
}

/// The labelled rows of `labels` `(n,)` (u8, u32 or i64): a u8 mask, 1
/// where the sample has a label (not [`UNLABELLED`](super::UNLABELLED), not
/// negative), and the labels as u32 with 0 in the unlabelled rows. On the
/// device, nothing read back.
fn labelled_rows(op: &str, labels: &Tensor, n: usize) -> Result<(Tensor, Tensor)> {
    if labels.rank() != 1 || labels.dim(0)? != n {
        return Err(Error::shape(
            op,
            format!("labels of shape [{n}]"),
            labels.dims(),
        ));
    }
    let keep = match labels.dtype() {
        DType::U8 => labels.ones_like()?,
        DType::U32 => labels.ne(super::UNLABELLED)?,
        DType::I64 => labels
            .ge(0i64)?
            .mul(&labels.ne(i64::from(super::UNLABELLED))?)?,
        other => {
            return Err(Error::invalid(
                op,
                format!("labels must be u8, u32 or i64, got {other:?}"),
            ))
        }
    };
    let y = keep
        .where_cond(labels, &labels.zeros_like()?)?
        .to_dtype(DType::U32)?;
    Ok((keep, y))
}
