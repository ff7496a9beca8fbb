//! Model handles: a model with its variables, and a frozen model that
//! always runs in one mode and never trains.

use std::path::Path;

use candle_core::{Module, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::params::{self, LoadConfig, LoadReport};
use super::{FeatureExtractor, Features, ParamMap};
use crate::Result;

/// A model together with the [`VarMap`] of its variables: the handle
/// trainers take. It names the model's parameters and buffers, saves and
/// loads them by name, gives functional parameters, and turns into a
/// [`FrozenModel`].
///
/// ```
/// use aimass::prelude::*;
/// use aimass::nn::{init, ForwardMode, Model, ResNet, ResNetConfig};
///
/// let varmap = VarMap::new();
/// let vb = init::seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu);
/// let model = Model::new(ResNet::new(ResNetConfig::resnet_tiny(), vb)?, varmap);
/// let names: Vec<String> = model.named_parameters()?.into_iter().map(|(n, _)| n).collect();
/// assert!(names.contains(&"layer1.0.conv1.weight".to_string()));
/// assert!(!names.iter().any(|n| n.ends_with("running_mean"))); // buffers apart
///
/// // A teacher: eval mode whatever the caller asks, no gradients, no optimizer.
/// let teacher = model.freeze(ForwardMode::Eval);
/// let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu)?;
/// let y = teacher.forward_t(&x, true)?; // `true` is ignored
/// assert_eq!(y.dims(), &[2, 64]);
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Clone)]
pub struct Model<M> {
    module: M,
    varmap: VarMap,
}

impl<M> Model<M> {
    /// A handle for `module`, whose variables live in `varmap` (build the
    /// module from a `VarBuilder` over `varmap`, e.g.
    /// [`crate::nn::init::seeded_var_builder`]).
    pub fn new(module: M, varmap: VarMap) -> Self {
        Model { module, varmap }
    }

    /// The model.
    pub fn module(&self) -> &M {
        &self.module
    }

    /// The variables (parameters and buffers).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The model and its variables.
    pub fn into_parts(self) -> (M, VarMap) {
        (self.module, self.varmap)
    }

    /// The parameters, sorted by name (torch's `named_parameters()`):
    /// every variable except the buffers.
    pub fn named_parameters(&self) -> Result<Vec<(String, Var)>> {
        params::trainable_vars(&self.varmap, &params::Frozen::none())
    }

    /// The buffers (BatchNorm running statistics), sorted by name (torch's
    /// `named_buffers()`).
    pub fn named_buffers(&self) -> Result<Vec<(String, Var)>> {
        params::buffer_vars(&self.varmap)
    }

    /// The number of scalar parameters (buffers excluded).
    pub fn num_params(&self) -> Result<usize> {
        params::num_params(&self.varmap)
    }

    /// Functional parameters connected to the variables (see [`ParamMap`]).
    pub fn param_map(&self) -> Result<ParamMap> {
        ParamMap::from_varmap(&self.varmap)
    }

    /// Saves the variables as safetensors ([`params::save`]).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        params::save(&self.varmap, path)
    }

    /// Loads weights by name as `config` says ([`params::load_with`]).
    pub fn load(&self, path: impl AsRef<Path>, config: &LoadConfig) -> Result<LoadReport> {
        params::load_with(&self.varmap, path, config)
    }

    /// A frozen deep copy (new storage for every variable), built again by
    /// `build` from the copy's `VarBuilder`: BYOL's target network or
    /// MoCo's key encoder at the start, a teacher snapshot. This model is
    /// unchanged and keeps training.
    pub fn frozen_copy(
        &self,
        mode: ForwardMode,
        build: impl FnOnce(VarBuilder<'static>) -> Result<M>,
    ) -> Result<FrozenModel<M>> {
        let copy = params::deep_copy(&self.varmap)?;
        let (dtype, device) = params::dtype_device(&copy)?;
        let module = build(VarBuilder::from_varmap(&copy, dtype, &device))?;
        Ok(FrozenModel {
            module,
            varmap: copy,
            mode,
        })
    }

    /// Freezes the model: from now on it runs in `mode` whatever the caller
    /// asks, its outputs carry no gradient, and its variables cannot be
    /// handed to an optimizer (see [`FrozenModel`]).
    pub fn freeze(self, mode: ForwardMode) -> FrozenModel<M> {
        FrozenModel {
            module: self.module,
            varmap: self.varmap,
            mode,
        }
    }
}

impl<M: ModuleT> Model<M> {
    /// The model's output in train (`true`) or eval (`false`) mode.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.module.forward_t(x, train)?)
    }
}

impl<M: ModuleT> ModuleT for Model<M> {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.module.forward_t(x, train)
    }
}

impl<M: FeatureExtractor> FeatureExtractor for Model<M> {
    fn feature_names(&self) -> Vec<String> {
        self.module.feature_names()
    }

    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Features> {
        self.module.forward_features(x, train)
    }
}

/// The one mode a [`FrozenModel`] runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForwardMode {
    /// Eval mode (default): BatchNorm normalises with its running
    /// statistics and changes nothing, Dropout is off. A distillation
    /// teacher, a frozen backbone under a probe.
    #[default]
    Eval,
    /// Train mode: BatchNorm normalises with batch statistics (and updates
    /// its running statistics), Dropout drops. BYOL's and MoCo's target
    /// networks, which the papers run like the online network.
    Train,
}

/// A model that cannot train: it runs in one [`ForwardMode`] fixed when it
/// was frozen (generic code passing `train = true` does not change it),
/// its outputs are detached (no gradient ever reaches its parameters), and
/// its [`VarMap`] is not exposed, so its parameters never reach an
/// optimizer. In [`ForwardMode::Eval`] nothing it holds changes, however
/// many forwards run through it: BatchNorm statistics stay bit-identical.
///
/// Its weights change only through explicit calls: [`FrozenModel::load`]
/// (a teacher from a file), or an exponential moving average
/// ([`crate::optim::Ema::from_frozen`], BYOL's target). A frozen model
/// returns to training only by being consumed: [`FrozenModel::into_model`].
#[derive(Clone)]
pub struct FrozenModel<M> {
    module: M,
    varmap: VarMap,
    mode: ForwardMode,
}

impl<M> FrozenModel<M> {
    /// The mode it runs in.
    pub fn mode(&self) -> ForwardMode {
        self.mode
    }

    /// Copies of the parameters, by name (buffers excluded); changing them
    /// does not change the model.
    pub fn named_parameters(&self) -> Result<Vec<(String, Tensor)>> {
        params::trainable_vars(&self.varmap, &params::Frozen::none())?
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().copy()?)))
            .collect()
    }

    /// Copies of the buffers, by name.
    pub fn named_buffers(&self) -> Result<Vec<(String, Tensor)>> {
        params::buffer_vars(&self.varmap)?
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().copy()?)))
            .collect()
    }

    /// The number of scalar parameters (buffers excluded).
    pub fn num_params(&self) -> Result<usize> {
        params::num_params(&self.varmap)
    }

    /// Saves the variables as safetensors ([`params::save`]).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        params::save(&self.varmap, path)
    }

    /// Loads weights by name as `config` says ([`params::load_with`]): a
    /// teacher trained elsewhere, PyTorch weights.
    pub fn load(&self, path: impl AsRef<Path>, config: &LoadConfig) -> Result<LoadReport> {
        params::load_with(&self.varmap, path, config)
    }

    /// Functional parameters: detached copies, so nothing computed from
    /// them reaches this model (see [`ParamMap::detached_copy`]).
    pub fn param_map(&self) -> Result<ParamMap> {
        ParamMap::detached_copy(&self.varmap)
    }

    /// Unfreezes: the model and its variables as a trainable [`Model`].
    pub fn into_model(self) -> Model<M> {
        Model::new(self.module, self.varmap)
    }

    /// The variables, for the crate's own trainers (EMA updates).
    pub(crate) fn varmap(&self) -> &VarMap {
        &self.varmap
    }
}

impl<M: ModuleT> FrozenModel<M> {
    /// The model's output in its fixed mode, detached.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self
            .module
            .forward_t(x, self.mode == ForwardMode::Train)?
            .detach())
    }
}

/// Through candle's blanket `impl<M: Module> ModuleT for M`, a frozen model
/// is also a `ModuleT` whose `forward_t(x, train)` ignores `train`.
impl<M: ModuleT> Module for FrozenModel<M> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        FrozenModel::forward(self, x).map_err(super::to_candle)
    }
}

impl<M: FeatureExtractor> FeatureExtractor for FrozenModel<M> {
    fn feature_names(&self) -> Vec<String> {
        self.module.feature_names()
    }

    /// Ignores `train` (see [`FrozenModel`]); every stage is detached.
    fn forward_features(&self, x: &Tensor, _train: bool) -> Result<Features> {
        let f = self
            .module
            .forward_features(x, self.mode == ForwardMode::Train)?;
        let mut out = Features::new();
        for (name, t) in f.into_vec() {
            out.push(name, t.detach());
        }
        Ok(out)
    }
}
