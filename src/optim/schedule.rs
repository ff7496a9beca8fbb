//! Learning-rate schedules with torch.optim.lr_scheduler's values.
//!
//! A [`Schedule`] gives the learning rate at a step: `lr(t)` equals
//! `optimizer.param_groups[0]["lr"]` after `t` calls of torch's
//! `scheduler.step()` (t = 0 before the first), for the same settings.
//! Set it before each optimizer step:
//!
//! ```
//! use aimass::optim::{CosineAnnealingLr, LinearWarmup, Schedule};
//! // 10 steps of linear warmup from 1% of 0.1, then cosine over 90 steps.
//! let s = LinearWarmup::new(0.01, 10, CosineAnnealingLr::new(0.1, 90, 0.0)?)?;
//! assert!((s.lr(0) - 0.001).abs() < 1e-12);
//! assert!((s.lr(10) - 0.1).abs() < 1e-12);
//! assert!(s.lr(99) < 1e-4);
//! # Ok::<(), aimass::Error>(())
//! ```
//!
//! [`ReduceLrOnPlateau`] is driven by a monitored metric instead of the step.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::config::config;
use crate::{Error, Result};

/// A learning rate as a function of the step (number of scheduler steps so far).
pub trait Schedule {
    /// The learning rate at `step`.
    fn lr(&self, step: u64) -> f64;
}

impl<S: Schedule + ?Sized> Schedule for Box<S> {
    fn lr(&self, step: u64) -> f64 {
        (**self).lr(step)
    }
}

fn check_base(field: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        return Err(Error::config(field, v, "must be finite and >= 0"));
    }
    Ok(())
}

fn check_gamma(field: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        return Err(Error::config(field, v, "must be finite and > 0"));
    }
    Ok(())
}

/// torch's `ConstantLR`: `base_lr * factor` for the first `total_iters`
/// steps, then `base_lr`. [`ConstantLr::new`] gives a plain constant,
/// [`ConstantLr::scaled`] torch's schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct ConstantLr {
    base_lr: f64,
    factor: f64,
    total_iters: u64,
}

impl ConstantLr {
    /// Always `base_lr`.
    pub fn new(base_lr: f64) -> Result<Self> {
        check_base("ConstantLr::base_lr", base_lr)?;
        Ok(Self {
            base_lr,
            factor: 1.0,
            total_iters: 0,
        })
    }

    /// torch `ConstantLR(factor, total_iters)` (torch defaults 1/3 and 5):
    /// `base_lr * factor` for `total_iters` steps, then `base_lr`; `factor`
    /// in `[0, 1]`.
    pub fn scaled(base_lr: f64, factor: f64, total_iters: u64) -> Result<Self> {
        check_base("ConstantLr::base_lr", base_lr)?;
        if !(0.0..=1.0).contains(&factor) {
            return Err(Error::config(
                "ConstantLr::factor",
                factor,
                "must be in [0, 1]",
            ));
        }
        Ok(Self {
            base_lr,
            factor,
            total_iters,
        })
    }
}

impl Schedule for ConstantLr {
    fn lr(&self, step: u64) -> f64 {
        if step < self.total_iters {
            self.base_lr * self.factor
        } else {
            self.base_lr
        }
    }
}

/// torch's `StepLR`: `base_lr * gamma^(step / step_size)`.
#[derive(Clone, Debug, PartialEq)]
pub struct StepLr {
    base_lr: f64,
    step_size: u64,
    gamma: f64,
}

impl StepLr {
    /// Decays by `gamma` (torch default 0.1) every `step_size` steps.
    pub fn new(base_lr: f64, step_size: u64, gamma: f64) -> Result<Self> {
        check_base("StepLr::base_lr", base_lr)?;
        if step_size == 0 {
            return Err(Error::config(
                "StepLr::step_size",
                step_size,
                "must be >= 1",
            ));
        }
        check_gamma("StepLr::gamma", gamma)?;
        Ok(Self {
            base_lr,
            step_size,
            gamma,
        })
    }
}

fn powi(g: f64, n: u64) -> f64 {
    g.powi(i32::try_from(n).unwrap_or(i32::MAX))
}

impl Schedule for StepLr {
    fn lr(&self, step: u64) -> f64 {
        self.base_lr * powi(self.gamma, step / self.step_size)
    }
}

/// torch's `MultiStepLR`: multiplies by `gamma` at each milestone.
#[derive(Clone, Debug, PartialEq)]
pub struct MultiStepLr {
    base_lr: f64,
    milestones: Vec<u64>,
    gamma: f64,
}

impl MultiStepLr {
    /// Decays by `gamma` (torch default 0.1) at each of `milestones`
    /// (a repeated milestone decays twice, as in torch).
    pub fn new(base_lr: f64, milestones: &[u64], gamma: f64) -> Result<Self> {
        check_base("MultiStepLr::base_lr", base_lr)?;
        check_gamma("MultiStepLr::gamma", gamma)?;
        let mut milestones = milestones.to_vec();
        milestones.sort_unstable();
        Ok(Self {
            base_lr,
            milestones,
            gamma,
        })
    }
}

impl Schedule for MultiStepLr {
    fn lr(&self, step: u64) -> f64 {
        let n = self.milestones.partition_point(|&m| m <= step);
        self.base_lr * powi(self.gamma, n as u64)
    }
}

/// torch's `ExponentialLR`: `base_lr * gamma^step`.
#[derive(Clone, Debug, PartialEq)]
pub struct ExponentialLr {
    base_lr: f64,
    gamma: f64,
}

impl ExponentialLr {
    /// Multiplies by `gamma` every step.
    pub fn new(base_lr: f64, gamma: f64) -> Result<Self> {
        check_base("ExponentialLr::base_lr", base_lr)?;
        check_gamma("ExponentialLr::gamma", gamma)?;
        Ok(Self { base_lr, gamma })
    }
}

impl Schedule for ExponentialLr {
    fn lr(&self, step: u64) -> f64 {
        self.base_lr * powi(self.gamma, step)
    }
}

/// torch's `CosineAnnealingLR`:
/// `eta_min + (base_lr - eta_min) * (1 + cos(pi * step / t_max)) / 2`
/// (periodic past `t_max`, like torch).
#[derive(Clone, Debug, PartialEq)]
pub struct CosineAnnealingLr {
    base_lr: f64,
    t_max: u64,
    eta_min: f64,
}

impl CosineAnnealingLr {
    /// Anneals from `base_lr` to the floor `eta_min` over `t_max` steps.
    pub fn new(base_lr: f64, t_max: u64, eta_min: f64) -> Result<Self> {
        check_base("CosineAnnealingLr::base_lr", base_lr)?;
        if t_max == 0 {
            return Err(Error::config(
                "CosineAnnealingLr::t_max",
                t_max,
                "must be >= 1",
            ));
        }
        check_base("CosineAnnealingLr::eta_min", eta_min)?;
        Ok(Self {
            base_lr,
            t_max,
            eta_min,
        })
    }
}

impl Schedule for CosineAnnealingLr {
    fn lr(&self, step: u64) -> f64 {
        let c = (std::f64::consts::PI * step as f64 / self.t_max as f64).cos();
        self.eta_min + (self.base_lr - self.eta_min) * (1.0 + c) / 2.0
    }
}

/// Linear warmup followed by any schedule: torch's
/// `SequentialLR([LinearLR(start_factor, 1.0, warmup_steps), after], milestones=[warmup_steps])`.
/// During warmup the rate is `after.lr(0) * factor`, the factor rising
/// linearly from `start_factor` to 1; from `warmup_steps` on it is
/// `after.lr(step - warmup_steps)`.
pub struct LinearWarmup<S> {
    start_factor: f64,
    warmup_steps: u64,
    after: S,
}

impl<S: Schedule> LinearWarmup<S> {
    /// `start_factor` in `(0, 1]` (torch `LinearLR` default 1/3).
    pub fn new(start_factor: f64, warmup_steps: u64, after: S) -> Result<Self> {
        if !(start_factor > 0.0 && start_factor <= 1.0) {
            return Err(Error::config(
                "LinearWarmup::start_factor",
                start_factor,
                "must be in (0, 1]",
            ));
        }
        Ok(Self {
            start_factor,
            warmup_steps,
            after,
        })
    }
}

impl<S: Schedule> Schedule for LinearWarmup<S> {
    fn lr(&self, step: u64) -> f64 {
        if step >= self.warmup_steps {
            return self.after.lr(step - self.warmup_steps);
        }
        let f =
            self.start_factor + (1.0 - self.start_factor) * step as f64 / self.warmup_steps as f64;
        self.after.lr(0) * f
    }
}

config! {
    /// Settings of [`OneCycleLr`]; defaults are torch `OneCycleLR`'s.
    pub struct OneCycleConfig {
        /// Peak learning rate (required; default 0.1 is a placeholder).
        max_lr: f64 = 0.1,
        /// Number of steps in the cycle (required; default 100 is a placeholder).
        total_steps: u64 = 100,
        /// Fraction of the cycle spent increasing the rate (torch default 0.3).
        pct_start: f64 = 0.3,
        /// Cosine annealing if true, linear otherwise (torch default `anneal_strategy="cos"`).
        cos_anneal: bool = true,
        /// `initial_lr = max_lr / div_factor` (torch default 25).
        div_factor: f64 = 25.0,
        /// `min_lr = initial_lr / final_div_factor` (torch default 1e4).
        final_div_factor: f64 = 1e4,
        /// fast.ai's three-phase variant (torch default false).
        three_phase: bool = false,
        /// Momentum at the rate's peak (torch `base_momentum` default 0.85).
        base_momentum: f64 = 0.85,
        /// Momentum at the rate's low points (torch `max_momentum` default 0.95).
        max_momentum: f64 = 0.95,
    }
}

impl OneCycleConfig {
    /// The config with torch's defaults for `max_lr` and `total_steps`.
    pub fn new(max_lr: f64, total_steps: u64) -> Self {
        Self {
            max_lr,
            total_steps,
            ..Self::default()
        }
    }
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        check_base("OneCycleConfig::max_lr", self.max_lr)?;
        if self.total_steps == 0 {
            return Err(Error::config(
                "OneCycleConfig::total_steps",
                self.total_steps,
                "must be >= 1",
            ));
        }
        if !(self.pct_start > 0.0 && self.pct_start < 1.0) {
            return Err(Error::config(
                "OneCycleConfig::pct_start",
                self.pct_start,
                "must be in (0, 1)",
            ));
        }
        check_gamma("OneCycleConfig::div_factor", self.div_factor)?;
        check_gamma("OneCycleConfig::final_div_factor", self.final_div_factor)?;
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Phase {
    end_step: f64,
    start_lr: f64,
    end_lr: f64,
    start_m: f64,
    end_m: f64,
}

/// torch's `OneCycleLR` (Smith & Topin 2018): the rate rises from
/// `max_lr / div_factor` to `max_lr`, then falls to
/// `max_lr / div_factor / final_div_factor`; [`OneCycleLr::momentum`] gives
/// the momentum (or Adam's beta1) cycled the opposite way.
#[derive(Clone, Debug, PartialEq)]
pub struct OneCycleLr {
    cfg: OneCycleConfig,
    phases: Vec<Phase>,
}

impl OneCycleLr {
    /// Validates the config: besides each field's range, no step of the
    /// cycle may fall in a phase of zero length (e.g. `pct_start ×
    /// total_steps = 1`, where the warm-up would end at step 0), which
    /// would give a NaN rate where torch raises `ZeroDivisionError`.
    pub fn new(cfg: OneCycleConfig) -> Result<Self> {
        cfg.validate()?;
        let initial = cfg.max_lr / cfg.div_factor;
        let min_lr = initial / cfg.final_div_factor;
        let total = cfg.total_steps as f64;
        let (bm, mm) = (cfg.base_momentum, cfg.max_momentum);
        let p1 = cfg.pct_start * total - 1.0;
        let phases = if cfg.three_phase {
            vec![
                Phase {
                    end_step: p1,
                    start_lr: initial,
                    end_lr: cfg.max_lr,
                    start_m: mm,
                    end_m: bm,
                },
                Phase {
                    end_step: 2.0 * cfg.pct_start * total - 2.0,
                    start_lr: cfg.max_lr,
                    end_lr: initial,
                    start_m: bm,
                    end_m: mm,
                },
                Phase {
                    end_step: total - 1.0,
                    start_lr: initial,
                    end_lr: min_lr,
                    start_m: mm,
                    end_m: mm,
                },
            ]
        } else {
            vec![
                Phase {
                    end_step: p1,
                    start_lr: initial,
                    end_lr: cfg.max_lr,
                    start_m: mm,
                    end_m: bm,
                },
                Phase {
                    end_step: total - 1.0,
                    start_lr: cfg.max_lr,
                    end_lr: min_lr,
                    start_m: bm,
                    end_m: mm,
                },
            ]
        };
        check_phases(&cfg, &phases)?;
        Ok(Self { cfg, phases })
    }

    fn anneal(&self, start: f64, end: f64, pct: f64) -> f64 {
        if self.cfg.cos_anneal {
            end + (start - end) / 2.0 * ((std::f64::consts::PI * pct).cos() + 1.0)
        } else {
            (end - start) * pct + start
        }
    }

    fn at(&self, step: u64) -> (f64, f64) {
        let step = step.min(self.cfg.total_steps) as f64;
        let mut start = 0.0;
        let n = self.phases.len();
        for (i, ph) in self.phases.iter().enumerate() {
            if step <= ph.end_step || i + 1 == n {
                let pct = (step - start) / (ph.end_step - start);
                return (
                    self.anneal(ph.start_lr, ph.end_lr, pct),
                    self.anneal(ph.start_m, ph.end_m, pct),
                );
            }
            start = ph.end_step;
        }
        (self.cfg.max_lr, self.cfg.base_momentum)
    }

    /// The momentum at `step` (torch's `cycle_momentum=True`): set it as
    /// SGD's momentum or Adam's beta1.
    pub fn momentum(&self, step: u64) -> f64 {
        self.at(step).1
    }
}

impl Schedule for OneCycleLr {
    /// The rate at `step`; steps past `total_steps` (an error in torch)
    /// give the value at `total_steps`.
    fn lr(&self, step: u64) -> f64 {
        self.at(step).0
    }
}

/// Refuses a cycle in which a step lands in a phase of zero length: its
/// position in the phase would be `x / 0` (NaN or infinite), where torch
/// raises `ZeroDivisionError`. Phase `i` spans `(end[i-1], end[i]]`
/// (`[0, end[0]]` for the first; the last takes every later step up to
/// `total_steps`) and is reached by the integer steps in that range that
/// no earlier phase took.
fn check_phases(cfg: &OneCycleConfig, phases: &[Phase]) -> Result<()> {
    let names: &[&str] = if cfg.three_phase {
        &["warm-up", "cool-down", "annealing"]
    } else {
        &["warm-up", "annealing"]
    };
    let total = cfg.total_steps as f64;
    let mut first_free = 0.0f64; // the first step no earlier phase takes
    let mut start = 0.0;
    for (i, ph) in phases.iter().enumerate() {
        let last = if i + 1 == phases.len() {
            total
        } else {
            ph.end_step.floor().min(total)
        };
        if first_free <= last && ph.end_step == start {
            let name = names.get(i).copied().unwrap_or("last");
            return Err(Error::config(
                "OneCycleConfig::pct_start",
                cfg.pct_start,
                format!(
                    "with total_steps = {}{}, the {name} phase would span zero steps (it starts and ends at step {start}), so the rate at step {first_free} divides by zero (torch raises ZeroDivisionError): change pct_start or total_steps so that no phase has zero length{}",
                    cfg.total_steps,
                    if cfg.three_phase { " and three_phase" } else { "" },
                    if i == 0 { " (pct_start × total_steps must not be 1)" } else { "" },
                ),
            ));
        }
        first_free = first_free.max(ph.end_step.floor() + 1.0);
        start = ph.end_step;
    }
    Ok(())
}

/// torch's `CosineAnnealingWarmRestarts` (SGDR, Loshchilov & Hutter 2017):
/// cosine annealing from `base_lr` to `eta_min` over a cycle of `t_i`
/// steps, then a restart at `base_lr`. The first cycle has `t_0` steps and
/// each cycle is `t_mult` times longer than the one before:
///
/// ```text
/// lr(step) = eta_min + (base_lr - eta_min) * (1 + cos(pi * t_cur / t_i)) / 2
/// ```
///
/// where `t_cur` counts the steps since the last restart. Like torch's
/// schedulers here, `step` counts optimizer steps (torch's per-batch use of
/// `scheduler.step()` without an epoch argument).
///
/// ```
/// use aimass::optim::{CosineAnnealingWarmRestarts, Schedule};
/// // Cycles of 10, 20, 40, ... steps.
/// let s = CosineAnnealingWarmRestarts::new(0.1, 10, 2, 0.0)?;
/// assert_eq!(s.lr(0), 0.1);
/// assert!((s.lr(5) - 0.05).abs() < 1e-12);
/// assert_eq!(s.lr(10), 0.1); // restart
/// assert!((s.lr(20) - 0.05).abs() < 1e-12); // half-way through the second cycle
/// assert_eq!(s.lr(30), 0.1);
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct CosineAnnealingWarmRestarts {
    base_lr: f64,
    t_0: u64,
    t_mult: u64,
    eta_min: f64,
}

impl CosineAnnealingWarmRestarts {
    /// Restarts after `t_0` (≥ 1) steps, then after cycles `t_mult` (≥ 1,
    /// torch default 1) times longer each; anneals to `eta_min` (torch
    /// default 0).
    pub fn new(base_lr: f64, t_0: u64, t_mult: u64, eta_min: f64) -> Result<Self> {
        check_base("CosineAnnealingWarmRestarts::base_lr", base_lr)?;
        if t_0 == 0 {
            return Err(Error::config(
                "CosineAnnealingWarmRestarts::t_0",
                t_0,
                "the first cycle must be >= 1 step long",
            ));
        }
        if t_mult == 0 {
            return Err(Error::config(
                "CosineAnnealingWarmRestarts::t_mult",
                t_mult,
                "must be >= 1 (1: every cycle has t_0 steps)",
            ));
        }
        check_base("CosineAnnealingWarmRestarts::eta_min", eta_min)?;
        Ok(Self {
            base_lr,
            t_0,
            t_mult,
            eta_min,
        })
    }

    /// The position in the cycle holding `step`: (steps since the restart,
    /// length of the cycle).
    fn cycle(&self, step: u64) -> (u64, u64) {
        if self.t_mult == 1 {
            return (step % self.t_0, self.t_0);
        }
        let (mut start, mut len) = (0u64, self.t_0);
        // At most 64 cycles before the lengths pass u64::MAX.
        while step - start >= len {
            start += len;
            match len.checked_mul(self.t_mult) {
                Some(l) => len = l,
                None => return (step - start, u64::MAX),
            }
        }
        (step - start, len)
    }
}

impl Schedule for CosineAnnealingWarmRestarts {
    fn lr(&self, step: u64) -> f64 {
        let (t_cur, t_i) = self.cycle(step);
        let c = (std::f64::consts::PI * t_cur as f64 / t_i as f64).cos();
        self.eta_min + (self.base_lr - self.eta_min) * (1.0 + c) / 2.0
    }
}

/// Whether [`ReduceLrOnPlateau`]'s metric should go down or up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlateauMode {
    /// Lower is better (a loss).
    Min,
    /// Higher is better (an accuracy).
    Max,
}

/// How [`ReduceLrOnPlateau`] decides that a metric improved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ThresholdMode {
    /// Better than `best * (1 ∓ threshold)`.
    Rel,
    /// Better than `best ∓ threshold`.
    Abs,
}

config! {
    /// Settings of [`ReduceLrOnPlateau`]; defaults are torch `ReduceLROnPlateau`'s.
    pub struct ReduceLrOnPlateauConfig {
        /// Direction of improvement (torch default min).
        mode: PlateauMode = PlateauMode::Min,
        /// Multiplier applied on a plateau, in `(0, 1)` (torch default 0.1).
        factor: f64 = 0.1,
        /// Steps without improvement tolerated before reducing (torch default 10).
        patience: u64 = 10,
        /// Minimal significant improvement (torch default 1e-4).
        threshold: f64 = 1e-4,
        /// Relative or absolute threshold (torch default rel).
        threshold_mode: ThresholdMode = ThresholdMode::Rel,
        /// Steps to wait after a reduction before counting again (torch default 0).
        cooldown: u64 = 0,
        /// Floor of the learning rate (torch default 0).
        min_lr: f64 = 0.0,
        /// Reductions smaller than this are skipped (torch default 1e-8).
        eps: f64 = 1e-8,
    }
}

impl ReduceLrOnPlateauConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if !(self.factor > 0.0 && self.factor < 1.0) {
            return Err(Error::config(
                "ReduceLrOnPlateauConfig::factor",
                self.factor,
                "must be in (0, 1)",
            ));
        }
        check_base("ReduceLrOnPlateauConfig::threshold", self.threshold)?;
        check_base("ReduceLrOnPlateauConfig::min_lr", self.min_lr)?;
        check_base("ReduceLrOnPlateauConfig::eps", self.eps)?;
        Ok(())
    }
}

/// torch's `ReduceLROnPlateau`: multiplies the rate by `factor` when the
/// monitored metric has not improved for more than `patience` steps.
#[derive(Clone, Debug, PartialEq)]
pub struct ReduceLrOnPlateau {
    cfg: ReduceLrOnPlateauConfig,
    lr: f64,
    best: f64,
    num_bad: u64,
    cooldown_counter: u64,
}

impl ReduceLrOnPlateau {
    /// Starts at learning rate `lr`; validates the config.
    pub fn new(lr: f64, cfg: ReduceLrOnPlateauConfig) -> Result<Self> {
        check_base("ReduceLrOnPlateau::lr", lr)?;
        cfg.validate()?;
        let best = match cfg.mode {
            PlateauMode::Min => f64::INFINITY,
            PlateauMode::Max => f64::NEG_INFINITY,
        };
        Ok(Self {
            cfg,
            lr,
            best,
            num_bad: 0,
            cooldown_counter: 0,
        })
    }

    fn is_better(&self, a: f64) -> bool {
        let (b, t) = (self.best, self.cfg.threshold);
        match (self.cfg.mode, self.cfg.threshold_mode) {
            (PlateauMode::Min, ThresholdMode::Rel) => a < b * (1.0 - t),
            (PlateauMode::Min, ThresholdMode::Abs) => a < b - t,
            (PlateauMode::Max, ThresholdMode::Rel) => a > b * (t + 1.0),
            (PlateauMode::Max, ThresholdMode::Abs) => a > b + t,
        }
    }

    /// Records `metric` (e.g. the validation loss of an epoch) and returns
    /// the learning rate to use next.
    pub fn step(&mut self, metric: f64) -> f64 {
        if self.is_better(metric) {
            self.best = metric;
            self.num_bad = 0;
        } else {
            self.num_bad += 1;
        }
        if self.cooldown_counter > 0 {
            self.cooldown_counter -= 1;
            self.num_bad = 0;
        }
        if self.num_bad > self.cfg.patience {
            let new_lr = (self.lr * self.cfg.factor).max(self.cfg.min_lr);
            if self.lr - new_lr > self.cfg.eps {
                self.lr = new_lr;
            }
            self.cooldown_counter = self.cfg.cooldown;
            self.num_bad = 0;
        }
        self.lr
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// The best metric seen so far.
    pub fn best(&self) -> f64 {
        self.best
    }

    /// The scheduler's position as named f64 scalars (`lr`, `best`,
    /// `num_bad_epochs`, `cooldown_counter`), for checkpoints.
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let mut m = HashMap::new();
        for (k, v) in [
            ("lr", self.lr),
            ("best", self.best),
            ("num_bad_epochs", self.num_bad as f64),
            ("cooldown_counter", self.cooldown_counter as f64),
        ] {
            m.insert(k.to_string(), Tensor::new(v, &Device::Cpu)?);
        }
        Ok(m)
    }

    /// Restores a position saved by [`ReduceLrOnPlateau::state_dict`]; a
    /// missing or malformed entry is an error and changes nothing.
    pub fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |k: &str| -> Result<f64> {
            let t = state.get(k).ok_or_else(|| {
                Error::invalid(
                    "ReduceLrOnPlateau::load_state_dict",
                    format!("missing `{k}`"),
                )
            })?;
            if t.elem_count() != 1 {
                return Err(Error::shape(
                    format!("ReduceLrOnPlateau::load_state_dict `{k}`"),
                    "a scalar",
                    t.dims(),
                ));
            }
            // host-ok: checkpoint data, read once on load, on the CPU.
            Ok(t.flatten_all()?
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?)
        };
        let count = |k: &str| -> Result<u64> {
            let v = get(k)?;
            if !(v >= 0.0 && v.fract() == 0.0 && v < 9.0e15) {
                return Err(Error::invalid(
                    "ReduceLrOnPlateau::load_state_dict",
                    format!("`{k}` = {v} is not a count"),
                ));
            }
            Ok(v as u64)
        };
        let (lr, best, nb, cd) = (
            get("lr")?,
            get("best")?,
            count("num_bad_epochs")?,
            count("cooldown_counter")?,
        );
        check_base("ReduceLrOnPlateau::lr", lr)?;
        self.lr = lr;
        self.best = best;
        self.num_bad = nb;
        self.cooldown_counter = cd;
        Ok(())
    }
}
