//! Seeded, PyTorch-default initialisation.
//!
//! candle's CPU random numbers cannot be seeded, so a model built from
//! [`VarBuilder::from_varmap`] differs from run to run. A [`SeededBackend`]
//! creates every missing variable from the crate's seeded generator
//! ([`crate::device::rng`]) in construction order, so the same seed and the
//! same model code give bit-identical weights on every run and platform.
//!
//! The layers of [`crate::nn`] ask for PyTorch's defaults through the
//! initialisation hints:
//!
//! | tensor | PyTorch default | hint |
//! |---|---|---|
//! | conv / linear weight | `kaiming_uniform_(a = √5)` = U(−1/√fan_in, 1/√fan_in) | [`torch_weight_init`] |
//! | conv / linear bias | U(−1/√fan_in, 1/√fan_in) | [`torch_bias_init`] |
//! | BatchNorm weight / bias | 1 / 0 | `Init::Const` |
//! | running mean / var | 0 / 1 | `Init::Const` |
//!
//! (`kaiming_uniform_` with `a = √5` has gain √(2/(1+5)) and bound
//! gain·√3/√fan_in = 1/√fan_in.) Other hints (`Randn`, `Kaiming`) are
//! sampled from the seeded generator too, with candle's meaning.

use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::Rng;

use crate::device::{rng, SeededRng};
use crate::nn::params::{is_buffer, Frozen};
use crate::{Error, Result};

/// PyTorch's default weight initialisation for `nn.Linear` and `nn.Conv2d`:
/// `kaiming_uniform_(a = √5)`, i.e. U(−1/√fan_in, 1/√fan_in), where fan_in is
/// `in_features` (linear) or `in_channels / groups · kh · kw` (conv).
pub fn torch_weight_init(fan_in: usize) -> Init {
    let b = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

/// PyTorch's default bias initialisation for `nn.Linear` and `nn.Conv2d`:
/// U(−1/√fan_in, 1/√fan_in).
pub fn torch_bias_init(fan_in: usize) -> Init {
    torch_weight_init(fan_in)
}

/// Draws a tensor of `shape` from the initialisation `init` with the seeded
/// generator `r` (values are drawn in f64, row-major, then cast to `dtype`).
pub fn sample_init(
    init: Init,
    shape: &Shape,
    dtype: DType,
    device: &Device,
    r: &mut SeededRng,
) -> Result<Tensor> {
    let n = shape.elem_count();
    let uniform = |r: &mut SeededRng, lo: f64, up: f64| -> Vec<f64> {
        (0..n).map(|_| lo + (up - lo) * r.random::<f64>()).collect()
    };
    let normal = |r: &mut SeededRng, mean: f64, std: f64| -> Vec<f64> {
        (0..n)
            .map(|_| {
                // Box-Muller; 1 - u avoids ln(0).
                let u1: f64 = 1.0 - r.random::<f64>();
                let u2: f64 = r.random::<f64>();
                mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            })
            .collect()
    };
    let values = match init {
        Init::Const(v) => vec![v; n],
        Init::Uniform { lo, up } => uniform(r, lo, up),
        Init::Randn { mean, stdev } => normal(r, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let dims = shape.dims();
            let receptive: usize = dims.iter().skip(2).product();
            let fan_v = match (fan, dims) {
                (FanInOut::FanIn, [_, i, ..]) => i * receptive,
                (FanInOut::FanOut, [o, _, ..]) => o * receptive,
                (_, [d]) => *d,
                _ => 1,
            };
            let std = non_linearity.gain() / (fan_v.max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    uniform(r, -b, b)
                }
                NormalOrUniform::Normal => normal(r, 0.0, std),
            }
        }
    };
    // host-ok: drawn in f64 and cast on the CPU, then uploaded in `dtype`
    // (no f64 tensor on a device that may not have f64).
    let t = Tensor::from_vec(values, shape.clone(), &Device::Cpu)?.to_dtype(dtype)?;
    Ok(t.to_device(device)?)
}

/// A [`VarBuilder`] backend over a [`VarMap`] that initialises missing
/// variables from a seeded generator and hands out frozen parameters
/// detached.
///
/// * A variable already in the map is returned as is (its shape is checked),
///   so building a second model from the same map shares the weights.
/// * A missing variable is drawn from its hint with the generator seeded by
///   `seed`, in the order the model asks for them (construction order is
///   deterministic, so the weights are too), and inserted into the map.
/// * A parameter matched by the [`Frozen`] set is returned detached: it
///   shares storage with the variable (loading weights later is visible)
///   but no gradient flows into it. Buffers (BatchNorm running statistics)
///   are never detached, so BatchNorm can update them.
///
/// ```
/// use aimass::candle::{DType, Device};
/// use aimass::candle_nn::VarMap;
/// use aimass::nn::init::SeededBackend;
///
/// let a = VarMap::new();
/// let vb = SeededBackend::new(&a, 7).into_var_builder(DType::F32, &Device::Cpu);
/// let w1 = vb.pp("fc").get_with_hints((2, 3), "weight", aimass::nn::init::torch_weight_init(3))?;
/// let b = VarMap::new();
/// let vb = SeededBackend::new(&b, 7).into_var_builder(DType::F32, &Device::Cpu);
/// let w2 = vb.pp("fc").get_with_hints((2, 3), "weight", aimass::nn::init::torch_weight_init(3))?;
/// assert_eq!(w1.to_vec2::<f32>()?, w2.to_vec2::<f32>()?);
/// # Ok::<(), aimass::Error>(())
/// ```
pub struct SeededBackend {
    varmap: VarMap,
    rng: Mutex<SeededRng>,
    frozen: Frozen,
}

impl SeededBackend {
    /// A backend over `varmap` (shared, not copied) drawing new variables
    /// from the generator seeded with `seed`.
    pub fn new(varmap: &VarMap, seed: u64) -> Self {
        Self {
            varmap: varmap.clone(),
            rng: Mutex::new(rng(seed)),
            frozen: Frozen::none(),
        }
    }

    /// Hands out the parameters matched by `frozen` detached (see
    /// [`Frozen`]).
    pub fn with_frozen(mut self, frozen: Frozen) -> Self {
        self.frozen = frozen;
        self
    }

    /// The [`VarBuilder`] that models are built from.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn get_impl(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::invalid("SeededBackend::get", "the VarMap lock is poisoned"))?;
        let t = match data.get(name) {
            Some(var) => {
                if var.shape() != &shape {
                    return Err(Error::shape(
                        format!("building the model: variable `{name}`"),
                        format!("{shape:?} (what the model asks for)"),
                        var.shape(),
                    ));
                }
                var.as_tensor().clone()
            }
            None => {
                let mut r = self.rng.lock().map_err(|_| {
                    Error::invalid("SeededBackend::get", "the generator lock is poisoned")
                })?;
                let t = sample_init(init, &shape, dtype, device, &mut r)?;
                let var = candle_core::Var::from_tensor(&t)?;
                let t = var.as_tensor().clone();
                data.insert(name.to_string(), var);
                t
            }
        };
        if self.frozen.contains(name) && !is_buffer(name) {
            Ok(t.detach())
        } else {
            Ok(t)
        }
    }
}

impl SimpleBackend for SeededBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.get_impl(s, name, h, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("the VarMap lock is poisoned".into()))?;
        match data.get(name) {
            Some(v) if self.frozen.contains(name) && !is_buffer(name) => Ok(v.as_detached_tensor()),
            Some(v) => Ok(v.as_tensor().clone()),
            None => Err(candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

/// A [`VarBuilder`] over `varmap` whose new variables are drawn from the
/// generator seeded with `seed` (shorthand for [`SeededBackend`]).
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    SeededBackend::new(varmap, seed).into_var_builder(dtype, device)
}
