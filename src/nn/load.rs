//! Loading weights into a built model by name: strict by default, or
//! non-strict with renamed prefixes and a report, as torch's
//! `load_state_dict`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;

use super::params::named_vars;
use crate::config::config;
use crate::{Error, Result};

/// The last name segment of torchvision's BatchNorm step counters, which
/// aimass's BatchNorm does not keep: ignored when loading (and never
/// written, which PyTorch's `load_state_dict` accepts with `strict=False`).
const BATCHES_TRACKED: &str = "num_batches_tracked";

config! {
    /// How [`load_with`] matches a file's tensors to a model's variables.
    pub struct LoadConfig {
        /// Every variable of the model must be in the file and every tensor
        /// of the file must be a variable of the model (default `true`,
        /// torch's `load_state_dict(strict=True)`). When `false`, what
        /// matches is loaded and the rest is reported in the [`LoadReport`].
        strict: bool = true,
        /// Prefix renames applied to the file's names before matching, as
        /// `(from, to)` pairs: the first pair whose `from` starts a name
        /// replaces that start with `to` (default none). `("encoder.",
        /// "backbone.")` loads an SSL checkpoint's encoder into a
        /// classifier's backbone; `("", "backbone.")` prefixes every name;
        /// `("module.", "")` strips the prefix of a `DataParallel` state dict.
        prefix_map: Vec<(String, String)> = Vec::new(),
    }
}

impl LoadConfig {
    /// Non-strict loading (torch's `strict=False`).
    pub fn non_strict() -> Self {
        LoadConfig {
            strict: false,
            ..Self::default()
        }
    }

    /// Appends one `(from, to)` pair to `prefix_map`.
    pub fn with_renamed_prefix(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.prefix_map.push((from.into(), to.into()));
        self
    }

    /// The model name for the file name `name`.
    fn rename(&self, name: &str) -> String {
        for (from, to) in &self.prefix_map {
            if let Some(rest) = name.strip_prefix(from.as_str()) {
                return format!("{to}{rest}");
            }
        }
        name.to_string()
    }
}

/// What a non-strict load did, as torch's `load_state_dict` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadReport {
    /// Variables of the model that were loaded, sorted (model names).
    pub loaded: Vec<String>,
    /// Variables of the model that the file did not have, sorted (model
    /// names): they keep their values (e.g. a fresh classification head).
    pub missing_keys: Vec<String>,
    /// Tensors of the file that match no variable, sorted (file names, as
    /// in the file; `num_batches_tracked` entries are not listed).
    pub unexpected_keys: Vec<String>,
}

impl LoadReport {
    /// Whether every variable was loaded and every tensor used.
    pub fn is_complete(&self) -> bool {
        self.missing_keys.is_empty() && self.unexpected_keys.is_empty()
    }
}

/// Reads a safetensors file into CPU tensors.
pub(crate) fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
        Error::malformed(
            path,
            "safetensors file",
            "a valid safetensors file",
            e.to_string(),
        )
    })?;
    Ok(tensors.into_iter().collect())
}

/// Loads a safetensors file into the existing variables of `varmap` (build
/// the model first, then load), strictly.
///
/// Every variable must be in the file with the same shape, and every tensor
/// of the file must be a variable, except torchvision's
/// `num_batches_tracked` entries, which are ignored. Otherwise nothing is
/// changed and an [`Error::Malformed`] lists the missing, unexpected and
/// mis-shaped tensors. Values are cast to each variable's dtype. For
/// partial matches and renamed prefixes use [`load_with`].
pub fn load(varmap: &VarMap, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    assign(
        varmap,
        &read_safetensors(path)?,
        path,
        &LoadConfig::default(),
        true,
    )
    .map(|_| ())
}

/// Like [`load`], from tensors already in memory (e.g. loaded with
/// `candle_core::safetensors::load`); `source` names them in errors.
pub fn load_tensors(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    source: impl AsRef<Path>,
) -> Result<()> {
    load_tensors_with(varmap, tensors, source, &LoadConfig::default()).map(|_| ())
}

/// Loads a safetensors file into the variables of `varmap` as `config`
/// says, and reports what matched (torch's `load_state_dict`).
///
/// File names are renamed by `config.prefix_map` first. A tensor whose
/// (renamed) name is a variable of another shape is always an error naming
/// the tensor and both shapes: with `strict`, an [`Error::Malformed`] that
/// lists the missing, unexpected and mis-shaped tensors together; without,
/// an [`Error::Shape`]. Two file tensors renamed to the same variable are
/// an error too. On any error nothing has been changed.
///
/// ```
/// use aimass::prelude::*;
/// use aimass::nn::{init, params, ResNet, ResNetConfig};
/// use aimass::nn::params::LoadConfig;
///
/// let dir = std::env::temp_dir().join(format!("aimass-doc-load-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// // A backbone (no classifier) saved after pretraining ...
/// let backbone = VarMap::new();
/// let _ = ResNet::new(ResNetConfig::resnet_tiny(), init::seeded_var_builder(&backbone, 0, DType::F32, &Device::Cpu))?;
/// params::save(&backbone, dir.join("backbone.safetensors"))?;
/// // ... loads into a classifier with a fresh head.
/// let clf = VarMap::new();
/// let _ = ResNet::new(ResNetConfig::resnet_tiny().with_num_classes(Some(10)), init::seeded_var_builder(&clf, 1, DType::F32, &Device::Cpu))?;
/// let report = params::load_with(&clf, dir.join("backbone.safetensors"), &LoadConfig::non_strict())?;
/// assert_eq!(report.missing_keys, vec!["fc.bias".to_string(), "fc.weight".to_string()]);
/// assert!(report.unexpected_keys.is_empty());
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), aimass::Error>(())
/// ```
pub fn load_with(
    varmap: &VarMap,
    path: impl AsRef<Path>,
    config: &LoadConfig,
) -> Result<LoadReport> {
    let path = path.as_ref();
    assign(varmap, &read_safetensors(path)?, path, config, true)
}

/// Like [`load_with`], from tensors already in memory; `source` names them
/// in errors.
pub fn load_tensors_with(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    source: impl AsRef<Path>,
    config: &LoadConfig,
) -> Result<LoadReport> {
    let tensors: BTreeMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assign(varmap, &tensors, source.as_ref(), config, true)
}

/// Copies every value of `src` into the same-named variables of `dst`,
/// strictly (no `num_batches_tracked` exception).
pub(crate) fn assign_all(dst: &VarMap, src: &BTreeMap<String, Tensor>) -> Result<()> {
    assign(
        dst,
        src,
        Path::new("<VarMap>"),
        &LoadConfig::default(),
        false,
    )
    .map(|_| ())
}

fn list(v: &[String]) -> String {
    const MAX: usize = 8;
    let mut s = v.iter().take(MAX).cloned().collect::<Vec<_>>().join(", ");
    if v.len() > MAX {
        s.push_str(&format!(", ... ({} in all)", v.len()));
    }
    s
}

fn assign(
    varmap: &VarMap,
    tensors: &BTreeMap<String, Tensor>,
    source: &Path,
    config: &LoadConfig,
    ignore_batches_tracked: bool,
) -> Result<LoadReport> {
    let vars: BTreeMap<String, Var> = named_vars(varmap)?.into_iter().collect();
    // Model name -> (file name, tensor).
    let mut matched: BTreeMap<String, (&String, &Tensor)> = BTreeMap::new();
    let mut unexpected = Vec::new();
    let mut shape = Vec::new();
    for (file_name, t) in tensors {
        let last = file_name.rsplit('.').next().unwrap_or(file_name);
        if ignore_batches_tracked && last == BATCHES_TRACKED {
            continue;
        }
        let name = config.rename(file_name);
        match vars.get(&name) {
            None => unexpected.push(file_name.clone()),
            Some(v) => {
                if t.dims() != v.dims() {
                    shape.push(if name == *file_name {
                        format!("{name} (model {:?}, file {:?})", v.dims(), t.dims())
                    } else {
                        format!(
                            "{name} (model {:?}, file {:?} as `{file_name}`)",
                            v.dims(),
                            t.dims()
                        )
                    });
                }
                if let Some((other, _)) = matched.insert(name.clone(), (file_name, t)) {
                    return Err(Error::malformed(
                        source,
                        "model weights",
                        "one file tensor per model variable",
                        format!("`{other}` and `{file_name}` both map to `{name}` (check the prefix map)"),
                    ));
                }
            }
        }
    }
    let missing: Vec<String> = vars
        .keys()
        .filter(|n| !matched.contains_key(*n))
        .cloned()
        .collect();
    if config.strict && !(missing.is_empty() && unexpected.is_empty() && shape.is_empty()) {
        let mut found = Vec::new();
        if !missing.is_empty() {
            found.push(format!("missing: {}", list(&missing)));
        }
        if !unexpected.is_empty() {
            found.push(format!("unexpected: {}", list(&unexpected)));
        }
        if !shape.is_empty() {
            found.push(format!("mis-shaped: {}", list(&shape)));
        }
        return Err(Error::malformed(
            source,
            "model weights",
            "exactly the model's tensor names and shapes (build the same model configuration that saved them, or load with LoadConfig::non_strict() and a prefix map)",
            found.join("; "),
        ));
    }
    if !shape.is_empty() {
        return Err(Error::Shape {
            op: format!("loading weights from `{}`", source.display()),
            expected: "the model's shape for every tensor that matches a variable".to_string(),
            got: format!("mis-shaped: {}", list(&shape)),
        });
    }
    // Convert everything first, so a failing conversion changes nothing.
    let mut converted = Vec::with_capacity(matched.len());
    for (name, (_, t)) in &matched {
        let var = &vars[name];
        converted.push((var, t.to_dtype(var.dtype())?.to_device(var.device())?));
    }
    for (var, t) in converted {
        var.set(&t)?;
    }
    Ok(LoadReport {
        loaded: matched.keys().cloned().collect(),
        missing_keys: missing,
        unexpected_keys: unexpected,
    })
}
