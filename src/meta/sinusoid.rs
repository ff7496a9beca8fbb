//! The sinusoid regression tasks of Finn et al. (2017).

use candle_core::{DType, Device, Tensor};
use rand::Rng;

use crate::config::config;
use crate::device::rng_stream;
use crate::meta::{Task, TaskSampler};
use crate::{Error, Result};

config! {
    /// Options of [`Sinusoid`]; defaults are Finn et al.'s (MAML, 2017).
    #[derive(Copy)]
    pub struct SinusoidConfig {
        /// Support points per task, K (default 10).
        k_support: usize = 10,
        /// Query points per task (default 10, as many as support points).
        k_query: usize = 10,
        /// Amplitude range, drawn uniformly (default [0.1, 5]).
        amplitude: (f64, f64) = (0.1, 5.0),
        /// Phase range, drawn uniformly (default [0, π]).
        phase: (f64, f64) = (0.0, std::f64::consts::PI),
        /// Input range, every point drawn uniformly (default [−5, 5]).
        x_range: (f64, f64) = (-5.0, 5.0),
        /// Element type of the tensors (default f32).
        dtype: DType = DType::F32,
        /// Seed; task `i` depends only on it and `i` (default 0).
        seed: u64 = 0,
    }
}

impl SinusoidConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("SinusoidConfig::k_support", self.k_support),
            ("SinusoidConfig::k_query", self.k_query),
        ] {
            if v == 0 {
                return Err(Error::config(field, 0, "must be at least 1"));
            }
        }
        for (field, (lo, hi)) in [
            ("SinusoidConfig::amplitude", self.amplitude),
            ("SinusoidConfig::phase", self.phase),
            ("SinusoidConfig::x_range", self.x_range),
        ] {
            if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                return Err(Error::config(
                    field,
                    format!("({lo}, {hi})"),
                    "must be a finite range (low, high) with low ≤ high",
                ));
            }
        }
        if !self.dtype.is_float() {
            return Err(Error::config(
                "SinusoidConfig::dtype",
                format!("{:?}", self.dtype),
                "must be a float type",
            ));
        }
        Ok(())
    }
}

/// Sinusoid regression tasks: `y = A · sin(x + φ)` with amplitude `A` and
/// phase `φ` drawn per task, and `K` support and separate query points `x`
/// drawn uniformly; inputs and targets are `(K, 1)`.
///
/// The family of Finn et al., "Model-Agnostic Meta-Learning for Fast
/// Adaptation of Deep Networks" (ICML 2017), §5.1: `A ∈ U[0.1, 5]`,
/// `φ ∈ U[0, π]`, `x ∈ U[−5, 5]`. Task `i` draws from the stream `i` of the
/// seed ([`crate::device::rng_stream`]): amplitude, phase, the support
/// points, then the query points.
///
/// ```
/// use aimass::candle::Device;
/// use aimass::meta::{Sinusoid, SinusoidConfig, TaskSampler};
///
/// let tasks = Sinusoid::new(SinusoidConfig::default().with_seed(1), &Device::Cpu)?;
/// let t = tasks.task(7)?;
/// let (a, phase) = tasks.function(7);
/// let x = t.support.to_vec2::<f32>()?[0][0] as f64;
/// let y = t.support_targets.to_vec2::<f32>()?[0][0] as f64;
/// assert!((y - a * (x + phase).sin()).abs() < 1e-5);
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Sinusoid {
    cfg: SinusoidConfig,
    device: Device,
}

impl Sinusoid {
    /// The task family, its tensors on `device`.
    pub fn new(cfg: SinusoidConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        Ok(Sinusoid {
            cfg,
            device: device.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SinusoidConfig {
        &self.cfg
    }

    /// Amplitude and phase of task `index`.
    pub fn function(&self, index: u64) -> (f64, f64) {
        let mut r = rng_stream(self.cfg.seed, index);
        draw_function(&self.cfg, &mut r)
    }
}

fn uniform(r: &mut impl Rng, (lo, hi): (f64, f64)) -> f64 {
    lo + (hi - lo) * r.random::<f64>()
}

fn draw_function(cfg: &SinusoidConfig, r: &mut impl Rng) -> (f64, f64) {
    let a = uniform(r, cfg.amplitude);
    let phase = uniform(r, cfg.phase);
    (a, phase)
}

impl TaskSampler for Sinusoid {
    fn task(&self, index: u64) -> Result<Task> {
        let cfg = &self.cfg;
        let mut r = rng_stream(cfg.seed, index);
        let (a, phase) = draw_function(cfg, &mut r);
        let mut points = |k: usize| -> Result<(Tensor, Tensor)> {
            let x: Vec<f64> = (0..k).map(|_| uniform(&mut r, cfg.x_range)).collect();
            let y: Vec<f64> = x.iter().map(|x| a * (x + phase).sin()).collect();
            let t = |v: Vec<f64>| -> Result<Tensor> {
                Ok(Tensor::from_vec(v, (k, 1), &Device::Cpu)?
                    .to_dtype(cfg.dtype)?
                    .to_device(&self.device)?)
            };
            Ok((t(x)?, t(y)?))
        };
        let (xs, ys) = points(cfg.k_support)?;
        let (xq, yq) = points(cfg.k_query)?;
        Task::new(xs, ys, xq, yq)
    }

    fn fingerprint(&self) -> String {
        format!("sinusoid {:?}", self.cfg)
    }
}
