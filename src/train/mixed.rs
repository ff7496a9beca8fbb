//! Mixed precision: forward and backward in bf16 or f16, master weights in
//! f32, and dynamic loss scaling for f16.
//!
//! The f32 variables of a `VarMap` stay the master copy. Each step,
//! [`MixedPrecision::var_builder`] casts them to the half type *inside the
//! autograd graph*, and the model is built from that `VarBuilder`
//! (functional weights: models are plain structs of tensors, so building one
//! costs no copy beyond the cast). The backward pass then flows through the
//! casts into f32 gradients of the master variables, which any optimizer
//! updates as usual. For f16, [`MixedPrecision::backward`] multiplies the
//! loss by the [`LossScaler`]'s scale, divides the gradients by it, and
//! returns `None` (skip the update) when a scaled gradient overflowed.
//!
//! Limits: BatchNorm running statistics are not updated through the cast
//! weights (they are copies); use it for models without BatchNorm, or
//! refresh the statistics in f32. On the CPU, candle's half-precision
//! kernels are slower than its f32 ones, so mixed precision does not pay
//! there (see `docs/training.md` for the measurement); it is the normal path
//! on CUDA.
//!
//! ```
//! use aimass::prelude::*;
//! use aimass::train::{MixedPrecision, MixedPrecisionConfig, Precision};
//! use aimass::optim::{Optimizer, Sgd, SgdConfig};
//!
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = aimass::nn::init::seeded_var_builder(&varmap, 0, DType::F32, &dev);
//! let _ = aimass::candle_nn::linear(4, 1, vb.pp("fc"))?; // creates the f32 master weights
//! let mut mp = MixedPrecision::new(MixedPrecisionConfig::default().with_precision(Precision::Bf16))?;
//! let mut opt = Sgd::from_varmap(&varmap, SgdConfig::default().with_lr(0.1))?;
//! let x = Tensor::ones((8, 4), DType::BF16, &dev)?;
//! for _ in 0..3 {
//!     let fc = aimass::candle_nn::linear(4, 1, mp.var_builder(&varmap, &dev)?.pp("fc"))?;
//!     let loss = fc.forward(&x)?.sqr()?.mean_all()?;
//!     if let Some(grads) = mp.backward(&loss, &varmap)? {
//!         opt.step(&grads)?;
//!     }
//! }
//! # Ok::<(), aimass::Error>(())
//! ```

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::scaler::{LossScaler, LossScalerConfig};
use crate::config::config;
use crate::host::{self, Reduce};
use crate::{Error, Result};

/// The arithmetic of the forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Precision {
    /// Plain f32 (default).
    #[default]
    F32,
    /// bfloat16: f32's range, no loss scaling needed.
    Bf16,
    /// float16: needs dynamic loss scaling against gradient underflow.
    F16,
}

impl Precision {
    /// The candle dtype of the passes.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }
}

config! {
    /// Settings of [`MixedPrecision`]: torch.autocast's CPU dtype and
    /// torch.cuda.amp.GradScaler's scaling.
    pub struct MixedPrecisionConfig {
        /// Arithmetic of the forward and backward passes (torch.autocast's
        /// CPU default: bf16).
        precision: Precision = Precision::Bf16,
        /// Dynamic loss scaling, used for f16 only (GradScaler's defaults).
        loss_scaler: LossScalerConfig = LossScalerConfig::default(),
    }
}

/// Casts master weights for the forward pass and scales/unscales gradients.
#[derive(Debug, Clone)]
pub struct MixedPrecision {
    precision: Precision,
    scaler: Option<LossScaler>,
}

impl MixedPrecision {
    /// Mixed precision at `cfg.precision`, with a loss scaler built from
    /// `cfg.loss_scaler` for f16 (none for bf16 and f32).
    pub fn new(cfg: MixedPrecisionConfig) -> Result<Self> {
        let scaler = match cfg.precision {
            Precision::F16 => Some(LossScaler::new(cfg.loss_scaler)?),
            _ => None,
        };
        Ok(MixedPrecision {
            precision: cfg.precision,
            scaler,
        })
    }

    /// The precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The loss scaler (f16 only).
    pub fn scaler(&self) -> Option<&LossScaler> {
        self.scaler.as_ref()
    }

    /// A `VarBuilder` over the variables of `varmap` cast to the half type,
    /// differentiably (gradients reach the f32 variables).
    pub fn var_builder(&self, varmap: &VarMap, device: &Device) -> Result<VarBuilder<'static>> {
        let dtype = self.precision.dtype();
        let data = varmap.data().lock().map_err(|_| {
            Error::invalid("MixedPrecision::var_builder", "the VarMap lock is poisoned")
        })?;
        let mut cast = HashMap::with_capacity(data.len());
        for (name, var) in data.iter() {
            cast.insert(name.clone(), var.as_tensor().to_dtype(dtype)?);
        }
        Ok(VarBuilder::from_tensors(cast, dtype, device))
    }

    /// Backward pass of `loss` (any dtype), returning f32 gradients of the
    /// variables of `varmap`, or `None` when the step must be skipped (f16
    /// overflow: the scale is lowered for the next step).
    ///
    /// With f16, the overflow check reduces every unscaled gradient to its
    /// sum of squares on the device and reads them, with the loss, in one
    /// transfer; [`NonFiniteGuard::check_step`](super::NonFiniteGuard::check_step)
    /// and 2-norm clipping afterwards reuse those values, so the step waits
    /// for the device once.
    pub fn backward(&mut self, loss: &Tensor, varmap: &VarMap) -> Result<Option<GradStore>> {
        let loss32 = loss.to_dtype(DType::F32)?;
        let Some(scaler) = self.scaler.as_mut() else {
            return Ok(Some(loss32.backward()?));
        };
        let scale = scaler.scale();
        let mut grads = (loss32 * scale)?.backward()?;
        let vars = crate::nn::params::named_vars(varmap)?;
        let mut unscaled = Vec::with_capacity(vars.len());
        for (_, var) in &vars {
            if let Some(g) = grads.get(var) {
                let g = (g.to_dtype(DType::F32)? / scale)?;
                grads.insert(var, g.clone());
                unscaled.push(g);
            }
        }
        // The loss rides along: a guard checking it next finds it read.
        let mut items = vec![(loss, Reduce::Value)];
        items.extend(unscaled.iter().map(|g| (g, Reduce::SumSq)));
        let values = host::reduce_and_read(&items)?;
        let overflow = values[1..].iter().any(|s| !s.is_finite());
        Ok(if scaler.update(overflow) {
            Some(grads)
        } else {
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{Optimizer, Sgd, SgdConfig};
    use candle_nn::Module;

    fn setup() -> (VarMap, Tensor, Tensor) {
        let varmap = VarMap::new();
        let vb = crate::nn::init::seeded_var_builder(&varmap, 1, DType::F32, &Device::Cpu);
        candle_nn::linear(3, 1, vb.pp("fc")).unwrap();
        let x = Tensor::new(
            &[[1f32, 0., 2.], [0., 1., -1.], [2., 1., 0.], [1., 1., 1.]],
            &Device::Cpu,
        )
        .unwrap();
        let y = Tensor::new(&[[1f32], [-1.], [2.], [0.5]], &Device::Cpu).unwrap();
        (varmap, x, y)
    }

    fn train(
        precision: Precision,
        scaler: LossScalerConfig,
        steps: usize,
    ) -> (f32, MixedPrecision, VarMap) {
        let (varmap, x, y) = setup();
        let cfg = MixedPrecisionConfig::default()
            .with_precision(precision)
            .with_loss_scaler(scaler);
        let mut mp = MixedPrecision::new(cfg).unwrap();
        let mut opt = Sgd::from_varmap(&varmap, SgdConfig::default().with_lr(0.05)).unwrap();
        let dt = precision.dtype();
        let mut last = f32::NAN;
        for _ in 0..steps {
            let fc = candle_nn::linear(
                3,
                1,
                mp.var_builder(&varmap, &Device::Cpu).unwrap().pp("fc"),
            )
            .unwrap();
            let pred = fc.forward(&x.to_dtype(dt).unwrap()).unwrap();
            let loss = (pred - y.to_dtype(dt).unwrap())
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap();
            last = loss
                .to_dtype(DType::F32)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            if let Some(g) = mp.backward(&loss, &varmap).unwrap() {
                opt.step(&g).unwrap();
            }
        }
        (last, mp, varmap)
    }

    #[test]
    fn half_precision_trains_f32_master_weights() {
        let (f32_loss, _, _) = train(Precision::F32, LossScalerConfig::default(), 200);
        for p in [Precision::Bf16, Precision::F16] {
            let (loss, _, varmap) = train(p, LossScalerConfig::default(), 200);
            assert!(
                (loss - f32_loss).abs() < 0.05 + 0.05 * f32_loss,
                "{p:?}: {loss} vs f32 {f32_loss}"
            );
            for (_, v) in crate::nn::params::named_vars(&varmap).unwrap() {
                assert_eq!(v.dtype(), DType::F32);
            }
        }
    }

    #[test]
    fn f16_overflow_skips_and_backs_off() {
        // 2^40 overflows f16 gradients (max 65504): the first steps are
        // skipped, each halving the scale, until it fits.
        let cfg = LossScalerConfig::default().with_init_scale(2f64.powi(40));
        let (_, mp, _) = train(Precision::F16, cfg, 40);
        let s = mp.scaler().unwrap();
        assert!(s.skipped() >= 20, "{}", s.skipped());
        assert!(s.scale() < 65504.0);
    }
}
