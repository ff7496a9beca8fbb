//! Gradient clipping by global norm and by value (torch's
//! `clip_grad_norm_` and `clip_grad_value_`), standalone on a [`GradStore`]
//! or as an optimizer option ([`GradClip`]) applied before each step.

use candle_core::{backprop::GradStore, DType, Tensor, Var};

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

/// The p-norm of one tensor, computed in f64.
pub(crate) fn tensor_norm(t: &Tensor, p: f64) -> Result<f64> {
    if t.elem_count() == 0 {
        return Ok(0.0);
    }
    let a = t.to_dtype(DType::F64)?.abs()?;
    let n = if p.is_infinite() {
        // The sum carries a NaN that `max` would skip.
        let s = a.sum_all()?.to_scalar::<f64>()?;
        if s.is_nan() {
            f64::NAN
        } else {
            a.flatten_all()?.max(0)?.to_scalar::<f64>()?
        }
    } else if p == 2.0 {
        a.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt()
    } else if p == 1.0 {
        a.sum_all()?.to_scalar::<f64>()?
    } else {
        a.powf(p)?.sum_all()?.to_scalar::<f64>()?.powf(1.0 / p)
    };
    Ok(n)
}

/// The global p-norm of several tensors: the p-norm of their p-norms, as
/// torch computes it.
pub(crate) fn global_norm<'a>(ts: impl IntoIterator<Item = &'a Tensor>, p: f64) -> Result<f64> {
    let mut acc = 0.0f64;
    for t in ts {
        let n = tensor_norm(t, p)?;
        if p.is_infinite() {
            // NaN must propagate: f64::max would drop it.
            acc = if n.is_nan() || acc.is_nan() {
                f64::NAN
            } else {
                acc.max(n)
            };
        } else {
            acc += n.powf(p);
        }
    }
    Ok(if p.is_infinite() || p == 1.0 {
        acc
    } else {
        acc.powf(1.0 / p)
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
