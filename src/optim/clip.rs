//! Gradient clipping by global norm and by value (torch's
//! `clip_grad_norm_` and `clip_grad_value_`), standalone on a [`GradStore`]
//! or as an optimizer option ([`GradClip`]) applied before each step.

use candle_core::{backprop::GradStore, Tensor, Var};

use crate::host::{self, Reduce};
use crate::{Error, Result};

/// Gradient clipping applied by an optimizer before its update.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum GradClip {
    /// Scale all gradients by `min(1, max_norm / (norm + 1e-6))` where `norm`
    /// is the global `norm_type`-norm of the gradients (torch's
    /// `clip_grad_norm_`). A non-finite norm makes the step fail with
    /// [`Error::NonFinite`] and leaves the parameters unchanged.
    Norm {
        /// Largest allowed global norm.
        max_norm: f64,
        /// The `p` of the p-norm (`2.0` usually; `f64::INFINITY` for the max norm).
        norm_type: f64,
    },
    /// Clamp every gradient element to `[-v, v]` (torch's `clip_grad_value_`).
    Value(f64),
}

impl GradClip {
    /// Clipping by the global 2-norm.
    pub fn norm(max_norm: f64) -> Self {
        GradClip::Norm {
            max_norm,
            norm_type: 2.0,
        }
    }

    pub(crate) fn validate(&self, owner: &str) -> Result<()> {
        match *self {
            GradClip::Norm {
                max_norm,
                norm_type,
            } => {
                if !(max_norm.is_finite() && max_norm > 0.0) {
                    return Err(Error::config(
                        format!("{owner}::grad_clip.max_norm"),
                        max_norm,
                        "must be finite and > 0",
                    ));
                }
                check_norm_type(norm_type).map_err(|r| {
                    Error::config(format!("{owner}::grad_clip.norm_type"), norm_type, r)
                })
            }
            GradClip::Value(v) => {
                if !(v.is_finite() && v > 0.0) {
                    return Err(Error::config(
                        format!("{owner}::grad_clip.value"),
                        v,
                        "must be finite and > 0",
                    ));
                }
                Ok(())
            }
        }
    }
}

fn check_norm_type(p: f64) -> std::result::Result<(), &'static str> {
    if p.is_nan() || p <= 0.0 {
        Err("must be > 0 (2.0 for the Euclidean norm, f64::INFINITY for the max norm)")
    } else {
        Ok(())
    }
}

/// The reductions whose host values give the global p-norm, per tensor.
fn norm_reductions(p: f64) -> &'static [Reduce] {
    if p.is_infinite() {
        // `max` may skip a NaN that the sum carries.
        &[Reduce::MaxAbs, Reduce::SumAbs]
    } else if p == 2.0 {
        &[Reduce::SumSq]
    } else if p == 1.0 {
        &[Reduce::SumAbs]
    } else {
        &[]
    }
}

/// The global p-norm of several tensors, as torch's `clip_grad_norm_`
/// computes it (the p-norm of the per-tensor p-norms). Each tensor is
/// reduced on its device (in f32, or f64 for f64 tensors) and all the
/// partial results come back in one host read, shared with the non-finite
/// guard and the loss scaler when they already read them (see
/// `crate::host`).
pub(crate) fn global_norm<'a>(ts: impl IntoIterator<Item = &'a Tensor>, p: f64) -> Result<f64> {
    let pow = [Reduce::sum_abs_pow(p)];
    let per = match norm_reductions(p) {
        [] => &pow[..],
        r => r,
    };
    let ts: Vec<&Tensor> = ts.into_iter().collect();
    let items: Vec<(&Tensor, Reduce)> = ts
        .iter()
        .flat_map(|t| per.iter().map(move |r| (*t, *r)))
        .collect();
    let v = host::reduce_and_read(&items)?;
    Ok(if p.is_infinite() {
        // NaN must propagate: f64::max would drop it.
        v.chunks(2).fold(0.0, |acc: f64, mv| {
            if mv[1].is_nan() || acc.is_nan() {
                f64::NAN
            } else {
                acc.max(mv[0])
            }
        })
    } else {
        let sum: f64 = v.iter().sum();
        if p == 1.0 {
            sum
        } else if p == 2.0 {
            sum.sqrt()
        } else {
            sum.powf(1.0 / p)
        }
    })
}

/// torch's clip coefficient: `min(1, max_norm / (norm + 1e-6))`.
pub(crate) fn clip_coef(max_norm: f64, norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// The global `norm_type`-norm of the gradients of `vars` in `grads` (vars
/// without a gradient are skipped).
pub fn grad_norm(grads: &GradStore, vars: &[Var], norm_type: f64) -> Result<f64> {
    check_norm_type(norm_type)
        .map_err(|r| Error::invalid("grad_norm", format!("norm_type {norm_type}: {r}")))?;
    global_norm(vars.iter().filter_map(|v| grads.get(v)), norm_type)
}

/// Scales the gradients of `vars` in place so that their global
/// `norm_type`-norm is at most `max_norm`, like torch's
/// `clip_grad_norm_(params, max_norm, norm_type)`; returns the norm before
/// clipping. Gradients are multiplied by `max_norm / (norm + 1e-6)` when
/// that is below 1.
///
/// A NaN or infinite norm returns [`Error::NonFinite`] and leaves the
/// gradients unchanged.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    vars: &[Var],
    max_norm: f64,
    norm_type: f64,
) -> Result<f64> {
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(Error::invalid(
            "clip_grad_norm",
            format!("max_norm must be >= 0, got {max_norm}"),
        ));
    }
    let norm = grad_norm(grads, vars, norm_type)?;
    if !norm.is_finite() {
        return Err(Error::non_finite("gradient norm", norm, None));
    }
    let coef = clip_coef(max_norm, norm);
    if coef < 1.0 {
        for v in vars {
            if let Some(g) = grads.get(v) {
                let scaled = (g * coef)?;
                grads.insert(v, scaled);
            }
        }
    }
    Ok(norm)
}

/// Clamps every gradient element of `vars` to `[-clip_value, clip_value]`,
/// like torch's `clip_grad_value_`.
pub fn clip_grad_value(grads: &mut GradStore, vars: &[Var], clip_value: f64) -> Result<()> {
    if clip_value.is_nan() || clip_value < 0.0 {
        return Err(Error::invalid(
            "clip_grad_value",
            format!("clip_value must be >= 0, got {clip_value}"),
        ));
    }
    for v in vars {
        if let Some(g) = grads.get(v) {
            let c = g.clamp(-clip_value, clip_value)?;
            grads.insert(v, c);
        }
    }
    Ok(())
}
