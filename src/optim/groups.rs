//! Parameter groups: which variables an optimizer updates, with which
//! learning-rate multiplier and weight decay.
//!
//! One function, [`default_param_groups`], decides the default split used by
//! every optimizer's `from_varmap` constructor:
//!
//! * BatchNorm running statistics (`running_mean`, `running_var`,
//!   `num_batches_tracked`) are buffers: they are never optimised
//!   ([`is_buffer`]);
//! * 1-D parameters (biases, norm scales and shifts) get no weight decay and
//!   no LARS trust-ratio adaptation ([`is_no_decay`]);
//! * everything else (weights of linear and convolution layers) gets the
//!   optimizer's weight decay and, for [`Lars`](super::Lars), adaptation.
//!
//! Names are visited in sorted order, so the split is deterministic.

use std::collections::HashMap;

use candle_core::Var;
use candle_nn::VarMap;

use crate::{Error, Result};

/// A set of named variables sharing optimisation settings, like one entry
/// of torch's `optimizer.param_groups`.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ParamGroup {
    /// The variables, with their names (unique across all groups).
    pub vars: Vec<(String, Var)>,
    /// Multiplier applied to the optimizer's learning rate (default 1).
    pub lr_scale: f64,
    /// Weight decay of this group; `None` uses the optimizer config's.
    pub weight_decay: Option<f64>,
    /// Whether [`Lars`](super::Lars) scales this group's learning rate by
    /// the trust ratio (default `true`; other optimizers ignore it).
    pub trust_ratio: bool,
}

impl ParamGroup {
    /// A group with `lr_scale` 1, the optimizer's weight decay and LARS
    /// adaptation on.
    pub fn new(vars: Vec<(String, Var)>) -> Self {
        Self {
            vars,
            lr_scale: 1.0,
            weight_decay: None,
            trust_ratio: true,
        }
    }

    /// Sets the learning-rate multiplier.
    pub fn with_lr_scale(mut self, v: f64) -> Self {
        self.lr_scale = v;
        self
    }

    /// Sets this group's weight decay (overriding the optimizer's).
    pub fn with_weight_decay(mut self, v: f64) -> Self {
        self.weight_decay = Some(v);
        self
    }

    /// Turns LARS trust-ratio adaptation on or off for this group.
    pub fn with_trust_ratio(mut self, v: bool) -> Self {
        self.trust_ratio = v;
        self
    }
}

/// Whether `name` is a buffer that no optimizer updates: BatchNorm's
/// `running_mean`, `running_var` and `num_batches_tracked`.
pub fn is_buffer(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    matches!(last, "running_mean" | "running_var" | "num_batches_tracked")
}

/// Whether a parameter is excluded from weight decay (and LARS adaptation)
/// by default: every parameter with at most one dimension (biases, norm
/// scales and shifts).
pub fn is_no_decay(_name: &str, var: &Var) -> bool {
    var.rank() <= 1
}

/// The default split of named variables into at most two groups: first the
/// decayed weights (optimizer's weight decay, trust ratio on), then the 1-D
/// parameters (weight decay 0, trust ratio off). Buffers and non-float
/// variables are left out; names are sorted. Empty groups are omitted.
pub fn default_param_groups(vars: &HashMap<String, Var>) -> Vec<ParamGroup> {
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut decay = Vec::new();
    let mut no_decay = Vec::new();
    for name in names {
        let Some(var) = vars.get(name) else { continue };
        if is_buffer(name) || !var.dtype().is_float() {
            continue;
        }
        if is_no_decay(name, var) {
            no_decay.push((name.clone(), var.clone()));
        } else {
            decay.push((name.clone(), var.clone()));
        }
    }
    let mut groups = Vec::new();
    if !decay.is_empty() {
        groups.push(ParamGroup::new(decay));
    }
    if !no_decay.is_empty() {
        groups.push(
            ParamGroup::new(no_decay)
                .with_weight_decay(0.0)
                .with_trust_ratio(false),
        );
    }
    groups
}

/// [`default_param_groups`] of the variables of a [`VarMap`].
pub fn varmap_param_groups(varmap: &VarMap) -> Result<Vec<ParamGroup>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::invalid("varmap_param_groups", "the VarMap lock is poisoned"))?;
    Ok(default_param_groups(&data))
}

/// One group holding all trainable variables of a [`VarMap`] (buffers left
/// out, names sorted), with the optimizer's weight decay on every parameter:
/// torch's `optimizer(model.parameters())`.
pub fn varmap_single_group(varmap: &VarMap) -> Result<Vec<ParamGroup>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::invalid("varmap_single_group", "the VarMap lock is poisoned"))?;
    let mut vars: Vec<(String, Var)> = data
        .iter()
        .filter(|(n, v)| !is_buffer(n) && v.dtype().is_float())
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vec![ParamGroup::new(vars)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn default_split() {
        let dev = Device::Cpu;
        let mut m = HashMap::new();
        let v = |s: &[usize]| Var::zeros(s, DType::F32, &dev).unwrap();
        m.insert("fc.weight".to_string(), v(&[3, 2]));
        m.insert("fc.bias".to_string(), v(&[3]));
        m.insert("bn.weight".to_string(), v(&[3]));
        m.insert("bn.running_mean".to_string(), v(&[3]));
        m.insert("bn.running_var".to_string(), v(&[3]));
        m.insert("conv.weight".to_string(), v(&[4, 3, 3, 3]));
        let g = default_param_groups(&m);
        assert_eq!(g.len(), 2);
        let names = |g: &ParamGroup| g.vars.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&g[0]), ["conv.weight", "fc.weight"]);
        assert_eq!(g[0].weight_decay, None);
        assert!(g[0].trust_ratio);
        assert_eq!(names(&g[1]), ["bn.weight", "fc.bias"]);
        assert_eq!(g[1].weight_decay, Some(0.0));
        assert!(!g[1].trust_ratio);
    }
}
