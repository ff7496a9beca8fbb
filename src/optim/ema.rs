//! Exponential moving average of weights into a second set of variables:
//! BYOL's target network, MoCo's key encoder, model averaging.
//!
//! `target = tau * target + (1 - tau) * online`, with `tau` constant or
//! following BYOL's cosine schedule from `tau_base` to 1
//! ([`byol_tau`]).

use std::collections::HashMap;

use candle_core::Var;
use candle_nn::VarMap;

use super::groups::is_buffer;
use crate::config::config;
use crate::nn::FrozenModel;
use crate::{Error, Result};

/// BYOL's decay at step `k` of `total`:
/// `1 - (1 - tau_base) * (cos(pi * k / total) + 1) / 2` (`k` capped at `total`).
pub fn byol_tau(tau_base: f64, step: u64, total: u64) -> f64 {
    if total == 0 {
        return 1.0;
    }
    let k = step.min(total) as f64 / total as f64;
    1.0 - (1.0 - tau_base) * ((std::f64::consts::PI * k).cos() + 1.0) / 2.0
}

config! {
    /// Settings of [`Ema`]; defaults from BYOL (Grill et al. 2020).
    pub struct EmaConfig {
        /// Decay at step 0, in `[0, 1]` (BYOL: 0.996).
        tau_base: f64 = 0.996,
        /// Steps of the cosine schedule to 1 (BYOL); `None` keeps `tau_base` constant (default).
        total_steps: Option<u64> = None,
        /// Also average BatchNorm running statistics (torch `AveragedModel`'s
        /// `use_buffers`; default false: buffers are left alone).
        include_buffers: bool = false,
    }
}

impl EmaConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.tau_base) {
            return Err(Error::config(
                "EmaConfig::tau_base",
                self.tau_base,
                "must be in [0, 1]",
            ));
        }
        Ok(())
    }
}

/// Keeps target variables an exponential moving average of online ones.
pub struct Ema {
    cfg: EmaConfig,
    pairs: Vec<(String, Var, Var)>,
}

impl Ema {
    /// Pairs the variables of `online` and `target` by name (sorted). Both
    /// maps must hold the same names (buffers excepted unless
    /// `include_buffers`) with the same shapes.
    pub fn new(online: &VarMap, target: &VarMap, cfg: EmaConfig) -> Result<Self> {
        let lock = |m: &VarMap| -> Result<HashMap<String, Var>> {
            m.data()
                .lock()
                .map(|d| d.clone())
                .map_err(|_| Error::invalid("Ema::new", "a VarMap lock is poisoned"))
        };
        let (on, ta) = (lock(online)?, lock(target)?);
        let keep = |n: &str| cfg.include_buffers || !is_buffer(n);
        let mut names: Vec<&String> = on.keys().filter(|n| keep(n)).collect();
        names.sort();
        let mut pairs = Vec::new();
        for n in names {
            let (Some(o), Some(t)) = (on.get(n), ta.get(n)) else {
                return Err(Error::invalid(
                    "Ema::new",
                    format!("variable `{n}` of the online model is missing in the target"),
                ));
            };
            pairs.push((n.clone(), o.clone(), t.clone()));
        }
        if let Some(n) = ta.keys().filter(|n| keep(n)).find(|n| !on.contains_key(*n)) {
            return Err(Error::invalid(
                "Ema::new",
                format!("target variable `{n}` has no online counterpart"),
            ));
        }
        Self::from_pairs(pairs, cfg)
    }

    /// An average of `online` into the weights of a frozen model (BYOL's
    /// target network, MoCo's key encoder): the only way, besides loading a
    /// file, that a [`FrozenModel`]'s weights change. Names and shapes are
    /// paired as by [`Ema::new`].
    pub fn from_frozen<M>(
        online: &VarMap,
        target: &FrozenModel<M>,
        cfg: EmaConfig,
    ) -> Result<Self> {
        Self::new(online, target.varmap(), cfg)
    }

    /// From explicit `(name, online, target)` triples.
    pub fn from_pairs(pairs: Vec<(String, Var, Var)>, cfg: EmaConfig) -> Result<Self> {
        cfg.validate()?;
        for (n, o, t) in &pairs {
            if o.dims() != t.dims() {
                return Err(Error::shape(
                    format!("Ema, variable `{n}`"),
                    format!("{:?} (online)", o.dims()),
                    t.dims(),
                ));
            }
        }
        Ok(Self { cfg, pairs })
    }

    /// The decay used at `step`.
    pub fn tau(&self, step: u64) -> f64 {
        match self.cfg.total_steps {
            Some(total) => byol_tau(self.cfg.tau_base, step, total),
            None => self.cfg.tau_base,
        }
    }

    /// Copies the online weights into the target (BYOL's initialisation).
    pub fn copy_online_to_target(&self) -> Result<()> {
        for (_, o, t) in &self.pairs {
            t.set(
                &o.as_tensor()
                    .to_dtype(t.dtype())?
                    .to_device(t.device())?
                    .copy()?,
            )?;
        }
        Ok(())
    }

    /// `target = tau * target + (1 - tau) * online` with `tau = self.tau(step)`;
    /// returns the `tau` used.
    pub fn update(&self, step: u64) -> Result<f64> {
        let tau = self.tau(step);
        for (_, o, t) in &self.pairs {
            let o = o.as_tensor().detach().to_dtype(t.dtype())?;
            let new = ((t.as_tensor() * tau)? + (o * (1.0 - tau))?)?;
            t.set(&new)?;
        }
        Ok(tau)
    }

    /// Names of the averaged variables.
    pub fn names(&self) -> Vec<String> {
        self.pairs.iter().map(|(n, _, _)| n.clone()).collect()
    }
}
