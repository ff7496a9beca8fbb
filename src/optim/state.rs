//! Machinery shared by the optimizers: named parameters in groups, their
//! per-parameter state (moments, momentum buffers), gradient collection with
//! clipping, and state export/import for checkpoints.

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};

use super::clip::{clip_coef, global_norm, GradClip};
use super::groups::ParamGroup;
use crate::autograd::Gradients;
use crate::{Error, Result};

/// Name of the global step counter in exported state.
pub(crate) const STEP_KEY: &str = "step";

/// One optimised parameter.
pub(crate) struct Slot {
    pub name: String,
    pub var: Var,
    pub group: usize,
    /// Steps this parameter was updated (torch's per-parameter `state["step"]`).
    pub step: u64,
    /// State buffers, indexed like `Core::buf_names`.
    pub bufs: Vec<Option<Tensor>>,
}

/// Resolved settings of one parameter group.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupOpts {
    pub lr_scale: f64,
    pub weight_decay: f64,
    pub trust_ratio: bool,
}

/// Parameters, groups, step counter and state of one optimizer.
pub(crate) struct Core {
    pub slots: Vec<Slot>,
    pub groups: Vec<GroupOpts>,
    pub lr: f64,
    pub step: u64,
    pub clip: Option<GradClip>,
    buf_names: Vec<&'static str>,
    per_param_step: bool,
}

impl Core {
    /// Builds the core from groups; `default_wd` fills groups without their
    /// own weight decay. `owner` names the optimizer in error messages.
    pub fn new(
        owner: &str,
        groups: Vec<ParamGroup>,
        lr: f64,
        default_wd: f64,
        clip: Option<GradClip>,
        buf_names: Vec<&'static str>,
        per_param_step: bool,
    ) -> Result<Self> {
        let mut slots = Vec::new();
        let mut opts = Vec::new();
        let mut names = HashSet::new();
        let mut ids = HashSet::new();
        for (gi, g) in groups.into_iter().enumerate() {
            if !(g.lr_scale.is_finite() && g.lr_scale >= 0.0) {
                return Err(Error::config(
                    format!("ParamGroup::lr_scale (group {gi} of {owner})"),
                    g.lr_scale,
                    "must be finite and >= 0",
                ));
            }
            let wd = g.weight_decay.unwrap_or(default_wd);
            if !(wd.is_finite() && wd >= 0.0) {
                return Err(Error::config(
                    format!("ParamGroup::weight_decay (group {gi} of {owner})"),
                    wd,
                    "must be finite and >= 0",
                ));
            }
            opts.push(GroupOpts {
                lr_scale: g.lr_scale,
                weight_decay: wd,
                trust_ratio: g.trust_ratio,
            });
            for (name, var) in g.vars {
                if !var.dtype().is_float() {
                    return Err(Error::invalid(
                        format!("{owner}::new"),
                        format!("parameter `{name}` has dtype {:?}; only float parameters can be optimised", var.dtype()),
                    ));
                }
                if !names.insert(name.clone()) {
                    return Err(Error::invalid(
                        format!("{owner}::new"),
                        format!("parameter name `{name}` appears twice; names must be unique across groups"),
                    ));
                }
                if !ids.insert(var.id()) {
                    return Err(Error::invalid(
                        format!("{owner}::new"),
                        format!("variable `{name}` was given twice (under another name too)"),
                    ));
                }
                slots.push(Slot {
                    name,
                    var,
                    group: gi,
                    step: 0,
                    bufs: vec![None; buf_names.len()],
                });
            }
        }
        if let Some(c) = &clip {
            c.validate(owner)?;
        }
        Ok(Self {
            slots,
            groups: opts,
            lr,
            step: 0,
            clip,
            buf_names,
            per_param_step,
        })
    }

    /// One group named `param.0`, `param.1`, ... (the `candle_nn::Optimizer`
    /// entry point); non-float variables are dropped like candle-nn does.
    pub fn unnamed_group(vars: Vec<Var>) -> Vec<ParamGroup> {
        let vars = vars
            .into_iter()
            .filter(|v| v.dtype().is_float())
            .enumerate()
            .map(|(i, v)| (format!("param.{i}"), v))
            .collect();
        vec![ParamGroup::new(vars)]
    }

    /// The gradients of all slots (None where absent), shape-checked and
    /// clipped as configured. Fails before anything is modified.
    pub fn grads(&self, store: &GradStore) -> Result<Vec<Option<Tensor>>> {
        self.collect_grads(|s| store.get(&s.var))
    }

    /// Like [`Core::grads`], from gradients by parameter name; a name that
    /// is not a parameter of this optimizer is an error.
    pub fn named_grads(&self, grads: &Gradients) -> Result<Vec<Option<Tensor>>> {
        if let Some(unknown) = grads
            .names()
            .into_iter()
            .find(|n| !self.slots.iter().any(|s| s.name == *n))
        {
            return Err(Error::invalid(
                "Optimizer::step_gradients",
                format!(
                    "a gradient is given for `{unknown}`, which is not a parameter of this optimizer ({} parameters, e.g. {:?})",
                    self.slots.len(),
                    self.slots.first().map(|s| s.name.as_str()).unwrap_or("none")
                ),
            ));
        }
        self.collect_grads(|s| grads.get(&s.name))
    }

    fn collect_grads<'g>(
        &self,
        lookup: impl Fn(&Slot) -> Option<&'g Tensor>,
    ) -> Result<Vec<Option<Tensor>>> {
        let mut out = Vec::with_capacity(self.slots.len());
        // What the clipping norm is computed on: the store's own tensors
        // where no cast is needed, so that a norm the non-finite guard or
        // the loss scaler already read (by tensor id) is not read again.
        let mut norm_of = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            match lookup(s) {
                None => out.push(None),
                Some(g) => {
                    if g.dims() != s.var.dims() {
                        return Err(Error::shape(
                            format!("optimizer step, gradient of `{}`", s.name),
                            format!("{:?}", s.var.dims()),
                            g.dims(),
                        ));
                    }
                    // Detached: a gradient computed by candle's backward
                    // still references the forward graph, and optimizer
                    // state built from it would keep every step's graph
                    // (all activations) alive.
                    let d = if g.dtype() != s.var.dtype() {
                        g.detach().to_dtype(s.var.dtype())?
                    } else {
                        g.detach()
                    };
                    norm_of.push(if g.dtype() == d.dtype() {
                        g.clone()
                    } else {
                        d.clone()
                    });
                    out.push(Some(d));
                }
            }
        }
        match self.clip {
            None => {}
            Some(GradClip::Value(c)) => {
                for g in out.iter_mut().flatten() {
                    *g = g.clamp(-c, c)?;
                }
            }
            Some(GradClip::Norm {
                max_norm,
                norm_type,
            }) => {
                let norm = global_norm(&norm_of, norm_type)?;
                if !norm.is_finite() {
                    return Err(Error::non_finite(
                        "gradient norm",
                        norm,
                        Some(self.step + 1),
                    ));
                }
                let coef = clip_coef(max_norm, norm);
                if coef < 1.0 {
                    for g in out.iter_mut().flatten() {
                        *g = (&*g * coef)?;
                    }
                }
            }
        }
        Ok(out)
    }

    /// The effective learning rate and settings of a slot's group.
    pub fn group_of(&self, slot: usize) -> GroupOpts {
        self.slots
            .get(slot)
            .and_then(|s| self.groups.get(s.group))
            .copied()
            .unwrap_or(GroupOpts {
                lr_scale: 1.0,
                weight_decay: 0.0,
                trust_ratio: false,
            })
    }

    /// Names of the parameters, in update order.
    pub fn names(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.name.clone()).collect()
    }

    /// All state as named tensors (deep copies).
    pub fn export(&self) -> Result<HashMap<String, Tensor>> {
        let mut m = HashMap::new();
        m.insert(
            STEP_KEY.to_string(),
            Tensor::new(self.step as i64, &Device::Cpu)?,
        );
        for s in &self.slots {
            if self.per_param_step && s.step > 0 {
                m.insert(
                    format!("{}.step", s.name),
                    Tensor::new(s.step as i64, &Device::Cpu)?,
                );
            }
            for (b, name) in s.bufs.iter().zip(&self.buf_names) {
                if let Some(b) = b {
                    m.insert(format!("{}.{}", s.name, name), b.copy()?);
                }
            }
        }
        Ok(m)
    }

    /// Replaces all state with `state` (as produced by [`Core::export`]).
    /// Unknown names and wrong shapes are errors; nothing changes on error.
    pub fn import(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        const OP: &str = "load_state_dict";
        let index: HashMap<&str, usize> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut steps = vec![0u64; self.slots.len()];
        let mut bufs: Vec<Vec<Option<Tensor>>> =
            vec![vec![None; self.buf_names.len()]; self.slots.len()];
        let mut global = None;
        let sorted: BTreeMap<&String, &Tensor> = state.iter().collect();
        for (key, t) in sorted {
            if key == STEP_KEY {
                global = Some(scalar_step(key, t)?);
                continue;
            }
            let Some((pname, bname)) = key.rsplit_once('.') else {
                return Err(Error::invalid(
                    OP,
                    format!("state entry `{key}` is not `<param>.<buffer>` or `step`"),
                ));
            };
            let Some(&i) = index.get(pname) else {
                return Err(Error::invalid(
                    OP,
                    format!("state entry `{key}` is for unknown parameter `{pname}` (this optimizer has {} parameters)", self.slots.len()),
                ));
            };
            let slot = &self.slots[i];
            if bname == "step" && self.per_param_step {
                steps[i] = scalar_step(key, t)?;
                continue;
            }
            let Some(b) = self.buf_names.iter().position(|n| *n == bname) else {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "state entry `{key}`: unknown buffer `{bname}`, expected one of {:?}",
                        self.buf_names
                    ),
                ));
            };
            if t.dims() != slot.var.dims() {
                return Err(Error::shape(
                    format!("{OP} `{key}`"),
                    format!("{:?} (the shape of `{pname}`)", slot.var.dims()),
                    t.dims(),
                ));
            }
            let t = t
                .to_device(slot.var.device())?
                .to_dtype(slot.var.dtype())?
                .contiguous()?
                .copy()?;
            bufs[i][b] = Some(t);
        }
        let Some(global) = global else {
            return Err(Error::invalid(OP, "state has no `step` entry"));
        };
        self.step = global;
        for ((s, st), b) in self.slots.iter_mut().zip(steps).zip(bufs) {
            s.step = st;
            s.bufs = b;
        }
        Ok(())
    }
}

fn scalar_step(key: &str, t: &Tensor) -> Result<u64> {
    if t.elem_count() != 1 {
        return Err(Error::shape(
            format!("load_state_dict `{key}`"),
            "a scalar step count",
            t.dims(),
        ));
    }
    // host-ok: checkpoint data, read once on load, on the CPU (which has f64).
    let v = t
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?[0];
    if !(v >= 0.0 && v.fract() == 0.0 && v < 9.0e15) {
        return Err(Error::invalid(
            "load_state_dict",
            format!("`{key}` = {v} is not a step count"),
        ));
    }
    Ok(v as u64)
}
