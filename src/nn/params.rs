//! Parameters, buffers, weight-decay classes, freezing, copying and files.
//!
//! One place decides what a name in a [`VarMap`] is:
//!
//! * **buffer**: BatchNorm running statistics (`running_mean`,
//!   `running_var`, and torchvision's `num_batches_tracked`). Saved with the
//!   model, never optimized ([`is_buffer`]).
//! * **no-decay parameter**: a trainable tensor with at most one dimension
//!   (biases, BatchNorm/LayerNorm weights). Weight decay and LARS adaptation
//!   skip them by default ([`is_no_decay`]).
//! * **weight**: every other trainable tensor (conv kernels, linear weights).
//!
//! [`Frozen`] names a set of parameters that are excluded from
//! [`trainable_vars`] and handed out detached by
//! [`crate::nn::init::SeededBackend`], so no gradient flows into them.
//!
//! Files are safetensors; [`load`] checks names and shapes both ways and says
//! which tensors are missing, unexpected or mis-shaped; [`load_with`] loads
//! what matches (non-strict, with renamed prefixes) and reports the
//! missing and unexpected names, as torch's `load_state_dict`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Tensor, Var};
use candle_nn::VarMap;

use crate::{Error, Result};

pub use super::load::{load, load_tensors, load_tensors_with, load_with, LoadConfig, LoadReport};

/// The last name segments that mark a BatchNorm buffer.
pub const BUFFER_SUFFIXES: [&str; 3] = ["running_mean", "running_var", "num_batches_tracked"];

/// Whether `name` is a buffer (BatchNorm running statistics, or
/// torchvision's `num_batches_tracked`): saved with the model, never given
/// to an optimizer.
pub fn is_buffer(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    BUFFER_SUFFIXES.contains(&last)
}

/// Whether the trainable parameter `name` with shape `dims` belongs to the
/// no-weight-decay set: tensors of rank ≤ 1 (biases and normalisation
/// weights), the convention of SimCLR/BYOL's LARS setups and timm. Buffers
/// are not parameters: this returns `false` for them.
pub fn is_no_decay(name: &str, dims: &[usize]) -> bool {
    !is_buffer(name) && dims.len() <= 1
}

/// What one entry of a [`VarMap`] is (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ParamKind {
    /// A trainable tensor that gets weight decay (rank ≥ 2).
    Weight,
    /// A trainable tensor without weight decay (rank ≤ 1).
    NoDecay,
    /// A buffer (BatchNorm running statistics): never optimized.
    Buffer,
}

/// Classifies `name` with shape `dims`.
pub fn classify(name: &str, dims: &[usize]) -> ParamKind {
    if is_buffer(name) {
        ParamKind::Buffer
    } else if is_no_decay(name, dims) {
        ParamKind::NoDecay
    } else {
        ParamKind::Weight
    }
}

/// A set of frozen parameters, named by exact names or by module prefixes.
///
/// A pattern matches a name equal to it or starting with it at a `.`
/// boundary: `"layer1"` matches `layer1.0.conv1.weight` but not
/// `layer10.weight`. Frozen parameters are left out of [`trainable_vars`]
/// (hence out of every optimizer) and, when the model is built through a
/// [`crate::nn::init::SeededBackend`] carrying this set, the model holds them
/// detached so no gradient flows into them. Freezing is decided when the
/// model is built: to freeze more later, build the model again from the
/// same [`VarMap`] (nothing is copied; the weights are shared).
///
/// ```
/// use aimass::nn::params::Frozen;
/// let f = Frozen::prefixes(["conv1", "layer1"]);
/// assert!(f.contains("layer1.0.bn1.weight"));
/// assert!(!f.contains("layer10.weight"));
/// assert!(Frozen::all().contains("fc.bias"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frozen {
    all: bool,
    patterns: Vec<String>,
}

impl Frozen {
    /// Nothing frozen.
    pub fn none() -> Self {
        Self::default()
    }

    /// Every parameter frozen (e.g. a distillation teacher).
    pub fn all() -> Self {
        Self {
            all: true,
            patterns: Vec::new(),
        }
    }

    /// The parameters named by, or nested under, each of `patterns`.
    pub fn prefixes<I, S>(patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            all: false,
            patterns: patterns
                .into_iter()
                .map(|s| s.into().trim_end_matches('.').to_string())
                .collect(),
        }
    }

    /// Adds one more pattern.
    pub fn with(mut self, pattern: impl Into<String>) -> Self {
        self.patterns
            .push(pattern.into().trim_end_matches('.').to_string());
        self
    }

    /// Whether `name` is frozen.
    pub fn contains(&self, name: &str) -> bool {
        self.all
            || self.patterns.iter().any(|p| {
                name == p
                    || (name.len() > p.len()
                        && name.starts_with(p.as_str())
                        && name.as_bytes().get(p.len()) == Some(&b'.'))
            })
    }

    /// Whether nothing is frozen.
    pub fn is_empty(&self) -> bool {
        !self.all && self.patterns.is_empty()
    }
}

fn lock(varmap: &VarMap) -> Result<std::sync::MutexGuard<'_, HashMap<String, Var>>> {
    varmap
        .data()
        .lock()
        .map_err(|_| Error::invalid("nn::params", "the VarMap lock is poisoned"))
}

/// Every variable of `varmap` with its name, sorted by name.
pub fn named_vars(varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    let data = lock(varmap)?;
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// The dtype and device of the variables of `varmap` (of the first by
/// name); an empty map is an error.
pub fn dtype_device(varmap: &VarMap) -> Result<(candle_core::DType, candle_core::Device)> {
    named_vars(varmap)?
        .first()
        .map(|(_, v)| (v.dtype(), v.device().clone()))
        .ok_or_else(|| Error::invalid("nn::params::dtype_device", "the VarMap is empty"))
}

/// The trainable parameters, sorted by name: every variable that is not a
/// buffer and not `frozen`.
pub fn trainable_vars(varmap: &VarMap, frozen: &Frozen) -> Result<Vec<(String, Var)>> {
    Ok(named_vars(varmap)?
        .into_iter()
        .filter(|(n, _)| !is_buffer(n) && !frozen.contains(n))
        .collect())
}

/// The buffers (BatchNorm running statistics), sorted by name.
pub fn buffer_vars(varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    Ok(named_vars(varmap)?
        .into_iter()
        .filter(|(n, _)| is_buffer(n))
        .collect())
}

/// The trainable parameters split into (weight decay, no weight decay),
/// each sorted by name (see [`is_no_decay`]).
#[allow(clippy::type_complexity)]
pub fn split_decay(
    varmap: &VarMap,
    frozen: &Frozen,
) -> Result<(Vec<(String, Var)>, Vec<(String, Var)>)> {
    Ok(trainable_vars(varmap, frozen)?
        .into_iter()
        .partition(|(n, v)| !is_no_decay(n, v.dims())))
}

/// The number of scalar parameters (buffers excluded), as PyTorch's
/// `sum(p.numel() for p in model.parameters())`.
pub fn num_params(varmap: &VarMap) -> Result<usize> {
    Ok(named_vars(varmap)?
        .iter()
        .filter(|(n, _)| !is_buffer(n))
        .map(|(_, v)| v.elem_count())
        .sum())
}

/// A deep copy of `varmap`: new storage for every variable (candle's
/// `VarMap::clone` shares storage, so updating one would update the other).
pub fn deep_copy(varmap: &VarMap) -> Result<VarMap> {
    let out = VarMap::new();
    {
        let src = lock(varmap)?;
        let mut dst = lock(&out)?;
        for (name, var) in src.iter() {
            dst.insert(name.clone(), Var::from_tensor(&var.as_tensor().copy()?)?);
        }
    }
    Ok(out)
}

/// Copies every value of `src` into the variables of `dst` in place (e.g.
/// to reset a target network to the online one). Both must hold exactly the
/// same names and shapes.
pub fn copy_into(src: &VarMap, dst: &VarMap) -> Result<()> {
    let tensors: BTreeMap<String, Tensor> = named_vars(src)?
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    super::load::assign_all(dst, &tensors)
}

/// Saves every variable of `varmap` (parameters and buffers) to a
/// safetensors file. The file is written to a temporary name and renamed,
/// so a crash never leaves a truncated file behind.
pub fn save(varmap: &VarMap, path: impl AsRef<Path>) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = named_vars(varmap)?
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    save_tensors(&tensors, path.as_ref())
}

/// Writes named tensors as a safetensors file, atomically.
pub(crate) fn save_tensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| Error::invalid("nn::params::save", format!("serializing: {e}")))?;
    crate::atomic_file::write(path, &bytes)
}
