//! Dropout whose masks are a function of (seed, step, call), so runs are
//! reproducible and resume exactly.

use std::cell::Cell;
use std::sync::Mutex;

use candle_core::{DType, ModuleT, Tensor};
use rand::RngCore;

use crate::config::config;
use crate::device::rng_stream;
use crate::{Error, Result};

thread_local! {
    static STEP: Cell<Option<u64>> = const { Cell::new(None) };
}

/// The training step that the forward passes on this thread belong to,
/// while the guard lives: [`Dropout`] derives its masks from it.
///
/// Trainers enter one per step (`let _scope = StepScope::enter(step);`
/// before the forward passes); [`crate::train::Classifier`] and the other
/// trainers of aimass do, so under [`crate::train::Fit`] nothing is needed.
/// Scopes nest (the previous step is restored when the guard drops) and are
/// per thread.
///
/// ```
/// use aimass::prelude::*;
/// use aimass::nn::{Dropout, DropoutConfig, StepScope};
///
/// let drop = Dropout::new(DropoutConfig::default().with_p(0.5).with_seed(7))?;
/// let x = Tensor::ones(16, DType::F32, &Device::Cpu)?;
/// let at = |step| -> aimass::Result<Vec<f32>> {
///     let _scope = StepScope::enter(step);
///     Ok(drop.forward_t(&x, true)?.to_vec1::<f32>()?)
/// };
/// // The mask of a step depends on the step, not on what ran before:
/// // a resumed run (or a rebuilt model) draws the same masks.
/// let step3 = at(3)?;
/// let _ = at(4)?;
/// assert_eq!(at(3)?, step3);
/// assert_ne!(at(4)?, step3);
/// # Ok::<(), aimass::Error>(())
/// ```
#[must_use = "the scope ends when the guard is dropped"]
pub struct StepScope {
    previous: Option<u64>,
}

impl StepScope {
    /// Marks the forward passes on this thread, until the guard drops, as
    /// belonging to training step `step`.
    pub fn enter(step: u64) -> Self {
        let previous = STEP.with(|s| s.replace(Some(step)));
        StepScope { previous }
    }

    /// The step of the innermost scope on this thread, if any.
    pub fn current() -> Option<u64> {
        STEP.with(Cell::get)
    }
}

impl Drop for StepScope {
    fn drop(&mut self) {
        STEP.with(|s| s.set(self.previous));
    }
}

config! {
    /// Settings of [`Dropout`]; the default is torch's `nn.Dropout()`.
    pub struct DropoutConfig {
        /// Probability of zeroing an element, in `[0, 1)` (torch default 0.5).
        p: f64 = 0.5,
        /// Seed of the masks (default 0). Give every Dropout layer of a model
        /// its own seed (as [`crate::nn::Mlp`] does), or two layers of the
        /// same width draw the same masks.
        seed: u64 = 0,
    }
}

impl DropoutConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.p) {
            return Err(Error::config(
                "DropoutConfig::p",
                self.p,
                "must be in [0, 1)",
            ));
        }
        Ok(())
    }
}

/// Where a Dropout layer is in the step clock: the step of its last
/// train-mode call and how many calls that step has seen.
#[derive(Debug, Default)]
struct Calls {
    step: Option<u64>,
    in_step: u64,
    unscoped: u64,
}

/// Inverted dropout (torch's `nn.Dropout`): in train mode each element is
/// zeroed with probability `p` and the others are scaled by `1 / (1 − p)`;
/// in eval mode it is the identity.
///
/// The mask of a train-mode call is a function of the seed, the training
/// step ([`StepScope`]) and the number of calls this layer had in that step
/// (a model that runs the layer on two views in one step draws two masks).
/// So a run resumed from a checkpoint, or a model rebuilt every step (from
/// functional parameters), draws exactly the masks of an uninterrupted run.
/// Outside any [`StepScope`] the layer counts its own calls instead: still
/// reproducible from the start, but not across a resume or a rebuild.
///
/// Masks are drawn on the host from the crate's seeded generator (candle's
/// random numbers cannot be seeded) as one byte per element, uploaded, and
/// applied on the tensor's device: one host-to-device copy of a quarter of
/// the activation's f32 size per call.
#[derive(Debug)]
pub struct Dropout {
    cfg: DropoutConfig,
    calls: Mutex<Calls>,
}

impl Dropout {
    /// Dropout as `config` says.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `p` is not in `[0, 1)`.
    pub fn new(config: DropoutConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            cfg: config,
            calls: Mutex::new(Calls::default()),
        })
    }

    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.cfg.p
    }

    /// The configuration.
    pub fn config(&self) -> &DropoutConfig {
        &self.cfg
    }

    /// Applies dropout (train) or the identity (eval).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.cfg.p == 0.0 {
            return Ok(x.clone());
        }
        let (step, call) = self.next_key()?;
        // One stream per (step, call) of this layer's seed.
        let stream = step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ call.rotate_left(32);
        let mut r = rng_stream(self.cfg.seed, stream);
        // Keep an element when a uniform u32 is >= p·2³².
        let threshold = (self.cfg.p * 4_294_967_296.0) as u64;
        let keep: Vec<u8> = (0..x.elem_count())
            .map(|_| u8::from(u64::from(r.next_u32()) >= threshold))
            .collect();
        let scale = 1.0 / (1.0 - self.cfg.p);
        // host-ok: the mask is drawn on the host from the seeded stream (so
        // resume is exact on every device) and uploaded as u8.
        let mask = Tensor::from_vec(keep, x.shape(), x.device())?;
        let mask = if x.dtype() == DType::F64 {
            // host-ok: f64 only for f64 input.
            (mask.to_dtype(DType::F64)? * scale)?
        } else {
            (mask.to_dtype(DType::F32)? * scale)?.to_dtype(x.dtype())?
        };
        Ok((x * mask)?)
    }

    /// (step, call within the step) of the next train-mode call.
    fn next_key(&self) -> Result<(u64, u64)> {
        let mut c = self
            .calls
            .lock()
            .map_err(|_| Error::invalid("Dropout", "the call counter lock is poisoned"))?;
        Ok(match StepScope::current() {
            Some(step) => {
                if c.step != Some(step) {
                    c.step = Some(step);
                    c.in_step = 0;
                }
                let call = c.in_step;
                c.in_step += 1;
                (step, call)
            }
            None => {
                let call = c.unscoped;
                c.unscoped += 1;
                // Unscoped calls live far from any real step.
                (u64::MAX, call)
            }
        })
    }
}

impl ModuleT for Dropout {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Dropout::forward_t(self, x, train).map_err(crate::nn::to_candle)
    }
}
