//! Functional parameters: a model's weights as a value, for meta-learning.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::autograd::{require_second_order, Gradients};
use crate::nn::params::{is_buffer, named_vars};
use crate::{Error, Result};

/// One parameter: the value models are built from, and the variable whose
/// gradient is the gradient with respect to that value.
#[derive(Debug, Clone)]
struct Param {
    value: Tensor,
    leaf: Var,
}

impl Param {
    /// A parameter whose value is `t`, computed from others: candle keeps
    /// gradients only of variables, so the value gets a zero variable
    /// added, whose gradient is the gradient with respect to the value
    /// (`t + 0 = t` exactly).
    fn on_top_of(t: Tensor) -> Result<Self> {
        let leaf = Var::zeros(t.shape(), t.dtype(), t.device())?;
        Ok(Param {
            value: (t + leaf.as_tensor())?,
            leaf,
        })
    }
}

/// A model's parameters (and buffers) by name, as a value: the fast weights
/// of MAML and its relatives.
///
/// A model is a function of its weights. Candle models are structs of
/// tensors built from a [`VarBuilder`], so running a model with other
/// weights means building it again from them ([`ParamMap::build`]; building
/// is cheap, nothing is copied). A `ParamMap` is taken from a [`VarMap`]
///
/// * **connected** ([`ParamMap::from_varmap`]): the variables themselves, so
///   a loss computed through any number of [`ParamMap::sgd_step`]s
///   back-propagates into the `VarMap`'s variables: with second order on,
///   that is MAML's exact meta-gradient;
/// * or **detached** ([`ParamMap::detached_copy`]): copies, for inner loops
///   that must not touch the original (Reptile, fine-tuning at test time).
///
/// [`ParamMap::grad`] gives the gradient of a loss with respect to the
/// map's parameters, keeping its graph when asked (`create_graph`, which
/// needs [`crate::autograd::enable_second_order`]); [`ParamMap::sgd_step`]
/// returns `θ' = θ − α·g` without touching `θ` (learn2learn's `adapt`).
///
/// Buffers (BatchNorm running statistics) are shared with the `VarMap` in
/// connected mode and copied in detached mode; they never get gradients.
/// A model in train mode normalises with batch statistics (MAML's reference
/// behaviour during adaptation and evaluation) and updates the running
/// statistics of the map's buffers.
///
/// ```
/// use aimass::prelude::*;
/// use aimass::nn::{init, Mlp, MlpConfig, ParamMap};
///
/// let dev = Device::Cpu;
/// let varmap = VarMap::new();
/// let build = |vb: VarBuilder| Mlp::new(MlpConfig::new(vec![1, 8, 1]), vb);
/// let _model = build(init::seeded_var_builder(&varmap, 0, DType::F64, &dev))?;
///
/// let x = Tensor::new(&[[0.5f64], [-1.0]], &dev)?;
/// let y = Tensor::new(&[[1.0f64], [0.0]], &dev)?;
/// let mse = |m: &Mlp| -> aimass::Result<Tensor> { Ok((m.forward_t(&x, true)? - &y)?.sqr()?.mean_all()?) };
///
/// // One inner SGD step on fast weights (first order here).
/// let theta = ParamMap::from_varmap(&varmap)?;
/// let before = mse(&theta.build(build)?)?;
/// let fast = theta.sgd_step(&theta.grad(&before, false)?, 0.1)?;
/// let after = mse(&fast.build(build)?)?;
/// assert!(after.to_scalar::<f64>()? < before.to_scalar::<f64>()?);
/// // The outer loss back-propagates into the VarMap's variables.
/// let grads = aimass::autograd::Gradients::from_varmap(&after.backward()?, &varmap)?;
/// assert_eq!(grads.len(), 4);
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ParamMap {
    params: BTreeMap<String, Param>,
    buffers: BTreeMap<String, Tensor>,
    /// `Some(T)` for per-task parameters with a leading task dimension
    /// ([`ParamMap::expand_tasks`]).
    tasks: Option<usize>,
}

impl ParamMap {
    /// The variables of `varmap` themselves (connected mode): gradients of
    /// anything computed from this map flow into them.
    pub fn from_varmap(varmap: &VarMap) -> Result<Self> {
        let mut out = ParamMap::default();
        for (name, var) in named_vars(varmap)? {
            if is_buffer(&name) {
                out.buffers.insert(name, var.as_tensor().clone());
            } else {
                out.params.insert(
                    name,
                    Param {
                        value: var.as_tensor().clone(),
                        leaf: var,
                    },
                );
            }
        }
        Ok(out)
    }

    /// Copies of the variables of `varmap` (detached mode): new storage, no
    /// connection to the originals; buffers are copied too, so a train-mode
    /// forward does not change the original running statistics.
    pub fn detached_copy(varmap: &VarMap) -> Result<Self> {
        ParamMap::from_varmap(varmap)?.detach()
    }

    /// The same values cut from every graph: parameters become new
    /// variables (copies), buffers are copied.
    pub fn detach(&self) -> Result<Self> {
        let params = self
            .params
            .iter()
            .map(|(n, p)| {
                let leaf = Var::from_tensor(&p.value.detach().copy()?)?;
                let value = leaf.as_tensor().clone();
                Ok((n.clone(), Param { value, leaf }))
            })
            .collect::<Result<_>>()?;
        let buffers = self
            .buffers
            .iter()
            .map(|(n, b)| {
                Ok((
                    n.clone(),
                    Var::from_tensor(&b.detach().copy()?)?.into_inner(),
                ))
            })
            .collect::<Result<_>>()?;
        Ok(ParamMap {
            params,
            buffers,
            tasks: self.tasks,
        })
    }

    /// Per-task parameters for `tasks` tasks run as one batch: every
    /// parameter `p` of shape `S` becomes `p` repeated along a new leading
    /// task dimension, shape `(tasks, S...)`, still connected to `p` (a loss
    /// computed from the result back-propagates into `p`, summed over the
    /// tasks). [`ParamMap::grad`] then gives each task's gradient as one
    /// `(tasks, S...)` tensor, and [`ParamMap::sgd_step`] steps every task
    /// with its own gradient.
    ///
    /// Models built from the result ([`ParamMap::build`]) get the
    /// `(tasks, S...)` tensors and must run every task with its own weights
    /// on inputs with the same leading task dimension: [`crate::nn::Linear`]
    /// and [`crate::nn::Mlp`] (without BatchNorm) do, element-wise layers
    /// need nothing. This is how MAML's meta-batch of small tasks runs as a
    /// few batched matrix products instead of one pass per task. A model
    /// that asks for a buffer (BatchNorm's running statistics) fails to
    /// build with an error saying so: batch statistics would mix the tasks.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for `tasks == 0` or a map that is already
    /// per-task.
    pub fn expand_tasks(&self, tasks: usize) -> Result<Self> {
        if tasks == 0 {
            return Err(Error::invalid(
                "ParamMap::expand_tasks",
                "the number of tasks must be at least 1",
            ));
        }
        if let Some(t) = self.tasks {
            return Err(Error::invalid(
                "ParamMap::expand_tasks",
                format!("the map already holds parameters for {t} tasks"),
            ));
        }
        let params = self
            .params
            .iter()
            .map(|(n, p)| {
                let mut dims = vec![tasks];
                dims.extend_from_slice(p.value.dims());
                // ones(T, 1) · p(1, K) rather than a broadcast: the same
                // values, but the backward pass sums over the tasks with a
                // matrix product instead of candle's strided reduction over
                // the leading dimension (40× slower for MAML's MLP).
                let ones = Tensor::ones((tasks, 1), p.value.dtype(), p.value.device())?;
                let repeated = ones
                    .matmul(&p.value.reshape((1, p.value.elem_count()))?)?
                    .reshape(dims)?;
                Ok((n.clone(), Param::on_top_of(repeated)?))
            })
            .collect::<Result<_>>()?;
        Ok(ParamMap {
            params,
            buffers: self.buffers.clone(),
            tasks: Some(tasks),
        })
    }

    /// `Some(T)` when every parameter has a leading dimension of `T` tasks
    /// ([`ParamMap::expand_tasks`]), `None` for ordinary parameters.
    pub fn tasks(&self) -> Option<usize> {
        self.tasks
    }

    /// The parameters whose name satisfies `keep` (buffers are all kept),
    /// connected as they are: e.g. a model's own parameters apart from
    /// learned inner learning rates, or a classifier head.
    pub fn select(&self, keep: impl Fn(&str) -> bool) -> Self {
        ParamMap {
            params: self
                .params
                .iter()
                .filter(|(n, _)| keep(n))
                .map(|(n, p)| (n.clone(), p.clone()))
                .collect(),
            buffers: self.buffers.clone(),
            tasks: self.tasks,
        }
    }

    /// The value of parameter or buffer `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.params
            .get(name)
            .map(|p| &p.value)
            .or_else(|| self.buffers.get(name))
    }

    /// The parameter names (buffers excluded), sorted.
    pub fn param_names(&self) -> Vec<&str> {
        self.params.keys().map(String::as_str).collect()
    }

    /// (name, value) of every parameter (buffers excluded), sorted by name.
    pub fn params(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params.iter().map(|(n, p)| (n.as_str(), &p.value))
    }

    /// (name, value) of every buffer, sorted by name.
    pub fn buffers(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.buffers.iter().map(|(n, b)| (n.as_str(), b))
    }

    /// The number of parameters (buffers excluded).
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// Whether there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// A [`VarBuilder`] over these values (parameters and buffers), of their
    /// dtype and device: build any model that was built from a `VarBuilder`
    /// with the same names. Asking for a name that is not in the map, or
    /// with another shape, is an error naming it.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        let (dtype, device) = self
            .params
            .values()
            .next()
            .map(|p| (p.value.dtype(), p.value.device().clone()))
            .or_else(|| {
                self.buffers
                    .values()
                    .next()
                    .map(|b| (b.dtype(), b.device().clone()))
            })
            .unwrap_or((DType::F32, Device::Cpu));
        let tensors = self
            .params
            .iter()
            .map(|(n, p)| (n.clone(), p.value.clone()))
            .chain(self.buffers.iter().map(|(n, b)| (n.clone(), b.clone())))
            .collect();
        let backend = Backend {
            tensors,
            tasks: self.tasks,
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device)
    }

    /// Builds a model from these values: `build` is the same function that
    /// built it from its `VarBuilder` the first time.
    pub fn build<M>(&self, build: impl FnOnce(VarBuilder<'static>) -> Result<M>) -> Result<M> {
        build(self.var_builder())
    }

    /// The gradient of the scalar `loss` with respect to each parameter of
    /// this map (parameters the loss does not depend on are left out).
    ///
    /// With `create_graph`, the gradients keep their graph, so a loss
    /// computed from [`ParamMap::sgd_step`]'s result differentiates through
    /// them (second order); this needs second-order gradients on for the
    /// thread ([`crate::autograd::enable_second_order`]). Without it, the
    /// gradients are detached (first order).
    ///
    /// The backward pass runs through everything the loss depends on,
    /// including earlier inner steps: the k-th of K inner steps
    /// back-propagates through the k − 1 before it (cheap element-wise
    /// work in first order, whole backward passes in second order).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `create_graph` is asked and second
    /// order is off (instead of silently first-order gradients), or when
    /// `loss` is not a scalar.
    pub fn grad(&self, loss: &Tensor, create_graph: bool) -> Result<Gradients> {
        if loss.rank() != 0 {
            return Err(Error::shape(
                "ParamMap::grad",
                "a scalar loss (rank 0)",
                loss.dims(),
            ));
        }
        if create_graph {
            require_second_order("ParamMap::grad with create_graph")?;
        }
        let store = loss.backward()?;
        Ok(self
            .params
            .iter()
            .filter_map(|(n, p)| {
                store.get(&p.leaf).map(|g| {
                    let g = if create_graph { g.clone() } else { g.detach() };
                    (n.clone(), g)
                })
            })
            .collect())
    }

    /// `θ' = θ − lr · g` for every parameter with a gradient in `grads`
    /// (the others keep their value): a new map, this one is unchanged.
    /// The result stays connected to this map's values (and, through
    /// `grads` computed with `create_graph`, to their gradients), so a loss
    /// computed from it back-propagates to this map's origin.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a non-finite `lr` or a gradient whose
    /// name is not a parameter of this map; [`Error::Shape`] for a gradient
    /// of the wrong shape.
    pub fn sgd_step(&self, grads: &Gradients, lr: f64) -> Result<Self> {
        if !lr.is_finite() {
            return Err(Error::invalid(
                "ParamMap::sgd_step",
                format!("the learning rate must be finite, got {lr}"),
            ));
        }
        self.update(grads, "ParamMap::sgd_step", |_, value, g| {
            Ok((value - (g * lr)?)?)
        })
    }

    /// `θ' = θ − α ⊙ g` with a learning-rate tensor per parameter (Meta-SGD's
    /// learned, element-wise rates; each `α` has the parameter's shape or
    /// broadcasts to it). Parameters without a gradient keep their value;
    /// a parameter with a gradient needs a rate.
    pub fn sgd_step_with_rates(
        &self,
        grads: &Gradients,
        rates: &BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        self.update(grads, "ParamMap::sgd_step_with_rates", |name, value, g| {
            let a = rates.get(name).ok_or_else(|| {
                Error::invalid(
                    "ParamMap::sgd_step_with_rates",
                    format!("no learning rate for parameter `{name}`"),
                )
            })?;
            Ok((value - g.broadcast_mul(a)?)?)
        })
    }

    /// One gradient step and its result: `sgd_step(grad(loss,
    /// create_graph), lr)` (learn2learn's `learner.adapt(loss)`).
    pub fn adapt(&self, loss: &Tensor, lr: f64, create_graph: bool) -> Result<Self> {
        self.sgd_step(&self.grad(loss, create_graph)?, lr)
    }

    fn update(
        &self,
        grads: &Gradients,
        op: &str,
        f: impl Fn(&str, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        if let Some(unknown) = grads
            .names()
            .into_iter()
            .find(|n| !self.params.contains_key(*n))
        {
            return Err(Error::invalid(
                op,
                format!(
                    "a gradient is given for `{unknown}`, which is not a parameter of this map"
                ),
            ));
        }
        let mut params = BTreeMap::new();
        for (name, p) in &self.params {
            let next = match grads.get(name) {
                None => p.clone(),
                Some(g) => {
                    if g.dims() != p.value.dims() {
                        return Err(Error::shape(
                            format!("{op}, gradient of `{name}`"),
                            format!("{:?}", p.value.dims()),
                            g.dims(),
                        ));
                    }
                    let g = g.to_dtype(p.value.dtype())?;
                    Param::on_top_of(f(name, &p.value, &g)?)?
                }
            };
            params.insert(name.clone(), next);
        }
        Ok(ParamMap {
            params,
            buffers: self.buffers.clone(),
            tasks: self.tasks,
        })
    }

    /// Writes these values into the variables of `varmap` with the same
    /// names (e.g. adapted weights kept as the new model); every parameter
    /// and buffer must have a variable of the same shape, checked before
    /// anything is written.
    pub fn write_into(&self, varmap: &VarMap) -> Result<()> {
        let vars: BTreeMap<String, Var> = named_vars(varmap)?.into_iter().collect();
        let entries: Vec<(&String, &Tensor)> = self
            .params
            .iter()
            .map(|(n, p)| (n, &p.value))
            .chain(self.buffers.iter())
            .collect();
        for (name, t) in &entries {
            match vars.get(*name) {
                None => {
                    return Err(Error::invalid(
                        "ParamMap::write_into",
                        format!("the VarMap has no variable `{name}`"),
                    ))
                }
                Some(v) if v.dims() != t.dims() => {
                    return Err(Error::shape(
                        format!("ParamMap::write_into `{name}`"),
                        format!("{:?}", v.dims()),
                        t.dims(),
                    ))
                }
                Some(_) => {}
            }
        }
        for (name, t) in entries {
            if let Some(v) = vars.get(name) {
                v.set(&t.detach().to_dtype(v.dtype())?)?;
            }
        }
        Ok(())
    }

    /// Saves the values (parameters and buffers) as a safetensors file that
    /// [`crate::nn::params::load`] reads into a model of the same names.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(n, p)| (n.clone(), p.value.detach()))
            .chain(self.buffers.iter().map(|(n, b)| (n.clone(), b.detach())))
            .collect();
        crate::nn::params::save_tensors(&tensors, path.as_ref())
    }
}

/// The `VarBuilder` backend of a [`ParamMap`], with errors that name the
/// missing or mis-shaped tensor.
struct Backend {
    tensors: BTreeMap<String, Tensor>,
    tasks: Option<usize>,
}

impl Backend {
    fn find(&self, name: &str) -> candle_core::Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "building a model from a ParamMap: no tensor `{name}` (the map holds {} tensors, e.g. {:?}; it must come from a model with the same names)",
                self.tensors.len(),
                self.tensors.keys().next().map(String::as_str).unwrap_or("none")
            ))
        })
    }
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.find(name)?;
        let want: Vec<usize> = match self.tasks {
            None => s.dims().to_vec(),
            Some(_) if is_buffer(name) => {
                return Err(candle_core::Error::Msg(format!(
                    "building a model from per-task parameters (ParamMap::expand_tasks): the model asks for the buffer `{name}`, but batch statistics over a batch of tasks would mix the tasks; run the tasks one at a time"
                )))
            }
            Some(tasks) => std::iter::once(tasks).chain(s.dims().iter().copied()).collect(),
        };
        if t.dims() != want.as_slice() {
            return Err(candle_core::Error::Msg(format!(
                "building a model from a ParamMap: `{name}` has shape {:?}, the model asks for {:?}",
                t.dims(),
                want
            )));
        }
        t.to_device(dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.find(name)?.to_device(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
