//! Multinomial logistic regression on frozen features, fitted to
//! convergence by full-batch L-BFGS: the linear probe of the reference
//! protocol (`docs/benchmarks.md`, "SSL probes").
//!
//! Each feature dimension is standardised with the mean and population
//! standard deviation of the training features (a dimension whose deviation
//! is below 1e-6 is only centred); the test features get the same
//! transform. The model is `logits = x Wᵀ + b` with `W` and `b` starting at
//! zero; the objective is
//!
//! ```text
//! mean cross-entropy + ½ · weight_decay · ‖W‖²        (no decay on b)
//! ```
//!
//! minimised by L-BFGS with a strong-Wolfe line search, the algorithm of
//! `torch.optim.LBFGS(lr=1, max_iter, history_size, line_search_fn="strong_wolfe")`
//! and its stopping rules (gradient and change tolerances, iteration and
//! evaluation caps), in double precision on the host. The gradients come
//! from two matrix products per evaluation on the features' device.
//!
//! ```
//! use aimass::candle::{Device, Tensor};
//! use aimass::train::{logistic_regression, LogisticRegressionConfig};
//!
//! let x = Tensor::new(&[[2.0f32, 0.1], [1.5, -0.2], [-2.0, 0.0], [-1.0, 0.3]], &Device::Cpu)?;
//! let fit = logistic_regression(&x, &[0, 0, 1, 1], &x, &[0, 0, 1, 1], &LogisticRegressionConfig::default())?;
//! assert_eq!(fit.test_acc, 1.0);
//! assert!(fit.iterations >= 1);
//! # Ok::<(), aimass::Error>(())
//! ```

use candle_core::{DType, Device, Tensor};

use super::knn::accuracy_of;
use crate::config::config;
use crate::{Error, Result};

config! {
    /// Settings of [`logistic_regression`]; defaults are the reference
    /// probe's (torch's L-BFGS defaults with `max_iter` 500, history 20).
    pub struct LogisticRegressionConfig {
        /// L2 penalty on the weights, `½·wd·‖W‖²` in the loss (default 1e-3).
        weight_decay: f64 = 1e-3,
        /// Most L-BFGS iterations (default 500).
        max_iter: usize = 500,
        /// Most loss evaluations; `None` is `max_iter × 5 / 4` (torch's default, 625).
        max_eval: Option<usize> = None,
        /// Stop when the largest absolute gradient entry is at most this (default 1e-7).
        tolerance_grad: f64 = 1e-7,
        /// Stop when the step or the loss change is below this (default 1e-9).
        tolerance_change: f64 = 1e-9,
        /// Correction pairs kept (default 20).
        history_size: usize = 20,
        /// Classes; `None` is one more than the largest label (default).
        num_classes: Option<usize> = None,
    }
}

impl LogisticRegressionConfig {
    fn validate(&self) -> Result<()> {
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::config(
                "LogisticRegressionConfig::weight_decay",
                self.weight_decay,
                "must be finite and >= 0",
            ));
        }
        if self.max_iter == 0 {
            return Err(Error::config(
                "LogisticRegressionConfig::max_iter",
                0,
                "must be >= 1",
            ));
        }
        if self.history_size == 0 {
            return Err(Error::config(
                "LogisticRegressionConfig::history_size",
                0,
                "must be >= 1",
            ));
        }
        for (f, v) in [
            (
                "LogisticRegressionConfig::tolerance_grad",
                self.tolerance_grad,
            ),
            (
                "LogisticRegressionConfig::tolerance_change",
                self.tolerance_change,
            ),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(f, v, "must be finite and >= 0"));
            }
        }
        Ok(())
    }
}

/// A fitted probe's accuracies and the work it took.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LogisticRegressionResult {
    /// Accuracy on the training features (0..=1).
    pub train_acc: f64,
    /// Accuracy on the test features (0..=1).
    pub test_acc: f64,
    /// The final objective (mean cross-entropy + penalty).
    pub loss: f64,
    /// L-BFGS iterations.
    pub iterations: usize,
    /// Loss and gradient evaluations.
    pub evaluations: usize,
    /// Weights `(classes, d)` in the standardised feature space.
    pub weight: Tensor,
    /// Biases `(classes,)`.
    pub bias: Tensor,
}

/// The objective on standardised features.
struct Problem {
    x: Tensor,
    onehot: Vec<f64>,
    n: usize,
    d: usize,
    c: usize,
    wd: f64,
}

impl Problem {
    /// Loss and gradient at `p` = [W row-major (c×d), b (c)].
    fn eval(&self, p: &[f64]) -> Result<(f64, Vec<f64>)> {
        let (n, d, c) = (self.n, self.d, self.c);
        let w: Vec<f32> = p[..c * d].iter().map(|&v| v as f32).collect();
        let w = Tensor::from_vec(w, (c, d), &Device::Cpu)?;
        // host-ok: evaluation; the probe's features live on the CPU.
        let logits = self.x.matmul(&w.t()?)?.to_dtype(DType::F64)?;
        // host-ok: evaluation; the probe's features live on the CPU.
        let logits = logits.flatten_all()?.to_vec1::<f64>()?;
        let b = &p[c * d..];
        let mut g = vec![0f64; n * c];
        let mut loss = 0f64;
        for i in 0..n {
            let row = &logits[i * c..(i + 1) * c];
            let m = row
                .iter()
                .zip(b)
                .map(|(l, bb)| l + bb)
                .fold(f64::NEG_INFINITY, f64::max);
            let mut s = 0f64;
            for k in 0..c {
                s += (row[k] + b[k] - m).exp();
            }
            let lse = m + s.ln();
            for k in 0..c {
                let prob = (row[k] + b[k] - lse).exp();
                let y = self.onehot[i * c + k];
                loss -= y * (row[k] + b[k] - lse);
                g[i * c + k] = (prob - y) / n as f64;
            }
        }
        loss /= n as f64;
        let wsq: f64 = p[..c * d].iter().map(|v| v * v).sum();
        loss += 0.5 * self.wd * wsq;
        let g32: Vec<f32> = g.iter().map(|&v| v as f32).collect();
        let gt = Tensor::from_vec(g32, (n, c), &Device::Cpu)?;
        // host-ok: evaluation; the probe's features live on the CPU.
        let gw = gt.t()?.matmul(&self.x)?.to_dtype(DType::F64)?;
        // host-ok: evaluation; the probe's features live on the CPU.
        let gw = gw.flatten_all()?.to_vec1::<f64>()?;
        let mut grad = Vec::with_capacity(c * d + c);
        grad.extend(gw.iter().zip(&p[..c * d]).map(|(gv, wv)| gv + self.wd * wv));
        for k in 0..c {
            grad.push((0..n).map(|i| g[i * c + k]).sum());
        }
        Ok((loss, grad))
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn max_abs(a: &[f64]) -> f64 {
    a.iter().fold(0f64, |m, v| m.max(v.abs()))
}

/// torch's `_cubic_interpolate`: the minimiser of the cubic through two
/// points with their derivatives, clamped to `bounds`.
fn cubic_interpolate(
    x1: f64,
    f1: f64,
    g1: f64,
    x2: f64,
    f2: f64,
    g2: f64,
    bounds: Option<(f64, f64)>,
) -> f64 {
    let (lo, hi) = bounds.unwrap_or(if x1 <= x2 { (x1, x2) } else { (x2, x1) });
    let d1 = g1 + g2 - 3.0 * (f1 - f2) / (x1 - x2);
    let d2_square = d1 * d1 - g1 * g2;
    if d2_square >= 0.0 {
        let d2 = d2_square.sqrt();
        let min_pos = if x1 <= x2 {
            x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2.0 * d2))
        } else {
            x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2.0 * d2))
        };
        min_pos.max(lo).min(hi)
    } else {
        (lo + hi) / 2.0
    }
}

/// One point of the line search: step, loss, gradient, directional derivative.
#[derive(Clone)]
struct Point {
    t: f64,
    f: f64,
    g: Vec<f64>,
    gtd: f64,
}

/// torch's `_strong_wolfe` (c1 = 1e-4, c2 = 0.9, 25 evaluations at most):
/// returns the accepted point and the number of evaluations.
fn strong_wolfe(
    prob: &Problem,
    x: &[f64],
    t0: f64,
    d: &[f64],
    start: &Point,
    tolerance_change: f64,
) -> Result<(Point, usize)> {
    const C1: f64 = 1e-4;
    const C2: f64 = 0.9;
    const MAX_LS: usize = 25;
    let eval_at = |t: f64| -> Result<Point> {
        let p: Vec<f64> = x.iter().zip(d).map(|(xi, di)| xi + t * di).collect();
        let (f, g) = prob.eval(&p)?;
        let gtd = dot(&g, d);
        Ok(Point { t, f, g, gtd })
    };
    let d_norm = max_abs(d);
    let (f, gtd) = (start.f, start.gtd);
    let mut new = eval_at(t0)?;
    let mut evals = 1;
    let mut prev = Point {
        t: 0.0,
        ..start.clone()
    };
    let mut ls_iter = 0;
    let mut done = false;
    let mut bracket: Vec<Point> = Vec::new();
    while ls_iter < MAX_LS {
        if new.f > f + C1 * new.t * gtd || (ls_iter > 1 && new.f >= prev.f) {
            bracket = vec![prev.clone(), new.clone()];
            break;
        }
        if new.gtd.abs() <= -C2 * gtd {
            bracket = vec![new.clone()];
            done = true;
            break;
        }
        if new.gtd >= 0.0 {
            bracket = vec![prev.clone(), new.clone()];
            break;
        }
        let min_step = new.t + 0.01 * (new.t - prev.t);
        let max_step = new.t * 10.0;
        let t = cubic_interpolate(
            prev.t,
            prev.f,
            prev.gtd,
            new.t,
            new.f,
            new.gtd,
            Some((min_step, max_step)),
        );
        prev = new;
        new = eval_at(t)?;
        evals += 1;
        ls_iter += 1;
    }
    if ls_iter == MAX_LS {
        bracket = vec![
            Point {
                t: 0.0,
                ..start.clone()
            },
            new.clone(),
        ];
    }
    // Zoom: shrink the bracket until the strong Wolfe conditions hold.
    let mut insuf_progress = false;
    let (mut low, mut high) = if bracket.len() == 2 && bracket[0].f > bracket[1].f {
        (1, 0)
    } else {
        (0, 1)
    };
    while !done && ls_iter < MAX_LS && bracket.len() == 2 {
        if (bracket[1].t - bracket[0].t).abs() * d_norm < tolerance_change {
            break;
        }
        let (b0, b1) = (&bracket[0], &bracket[1]);
        let mut t = cubic_interpolate(b0.t, b0.f, b0.gtd, b1.t, b1.f, b1.gtd, None);
        let (bmax, bmin) = (b0.t.max(b1.t), b0.t.min(b1.t));
        let eps = 0.1 * (bmax - bmin);
        if (bmax - t).min(t - bmin) < eps {
            if insuf_progress || t >= bmax || t <= bmin {
                t = if (t - bmax).abs() < (t - bmin).abs() {
                    bmax - eps
                } else {
                    bmin + eps
                };
                insuf_progress = false;
            } else {
                insuf_progress = true;
            }
        } else {
            insuf_progress = false;
        }
        let p = eval_at(t)?;
        evals += 1;
        ls_iter += 1;
        if p.f > f + C1 * t * gtd || p.f >= bracket[low].f {
            bracket[high] = p;
            (low, high) = if bracket[0].f <= bracket[1].f {
                (0, 1)
            } else {
                (1, 0)
            };
        } else {
            if p.gtd.abs() <= -C2 * gtd {
                done = true;
            } else if p.gtd * (bracket[high].t - bracket[low].t) >= 0.0 {
                bracket[high] = bracket[low].clone();
            }
            bracket[low] = p;
        }
    }
    let low = low.min(bracket.len() - 1);
    Ok((bracket.swap_remove(low), evals))
}

/// Fits `W, b` by L-BFGS from zero; returns them with the final loss,
/// iterations and evaluations.
fn lbfgs(prob: &Problem, cfg: &LogisticRegressionConfig) -> Result<(Vec<f64>, f64, usize, usize)> {
    let size = prob.c * prob.d + prob.c;
    let max_eval = cfg.max_eval.unwrap_or(cfg.max_iter * 5 / 4);
    let mut x = vec![0f64; size];
    let (mut loss, mut grad) = prob.eval(&x)?;
    let mut evals = 1;
    if max_abs(&grad) <= cfg.tolerance_grad {
        return Ok((x, loss, 0, evals));
    }
    let mut old_dirs: Vec<Vec<f64>> = Vec::new();
    let mut old_stps: Vec<Vec<f64>> = Vec::new();
    let mut ro: Vec<f64> = Vec::new();
    let mut h_diag = 1.0;
    let mut d: Vec<f64> = grad.iter().map(|v| -v).collect();
    let mut t = 0.0;
    let mut prev_grad: Vec<f64> = Vec::new();
    let mut n_iter = 0;
    while n_iter < cfg.max_iter {
        n_iter += 1;
        if n_iter > 1 {
            let y: Vec<f64> = grad.iter().zip(&prev_grad).map(|(a, b)| a - b).collect();
            let s: Vec<f64> = d.iter().map(|v| v * t).collect();
            let ys = dot(&y, &s);
            if ys > 1e-10 {
                if old_dirs.len() == cfg.history_size {
                    old_dirs.remove(0);
                    old_stps.remove(0);
                    ro.remove(0);
                }
                h_diag = ys / dot(&y, &y);
                old_dirs.push(y);
                old_stps.push(s);
                ro.push(1.0 / ys);
            }
            // Two-loop recursion: d = -H · grad.
            let k = old_dirs.len();
            let mut al = vec![0f64; k];
            let mut q: Vec<f64> = grad.iter().map(|v| -v).collect();
            for i in (0..k).rev() {
                al[i] = dot(&old_stps[i], &q) * ro[i];
                for (qj, yj) in q.iter_mut().zip(&old_dirs[i]) {
                    *qj -= al[i] * yj;
                }
            }
            let mut r: Vec<f64> = q.iter().map(|v| v * h_diag).collect();
            for i in 0..k {
                let be_i = dot(&old_dirs[i], &r) * ro[i];
                for (rj, sj) in r.iter_mut().zip(&old_stps[i]) {
                    *rj += (al[i] - be_i) * sj;
                }
            }
            d = r;
        }
        prev_grad.clone_from(&grad);
        let prev_loss = loss;
        t = if n_iter == 1 {
            (1.0 / grad.iter().map(|v| v.abs()).sum::<f64>()).min(1.0)
        } else {
            1.0
        };
        let gtd = dot(&grad, &d);
        if gtd > -cfg.tolerance_change {
            break;
        }
        let start = Point {
            t: 0.0,
            f: loss,
            g: grad.clone(),
            gtd,
        };
        let (p, ls_evals) = strong_wolfe(prob, &x, t, &d, &start, cfg.tolerance_change)?;
        t = p.t;
        for (xi, di) in x.iter_mut().zip(&d) {
            *xi += t * di;
        }
        loss = p.f;
        grad = p.g;
        evals += ls_evals;
        if n_iter == cfg.max_iter || evals >= max_eval || max_abs(&grad) <= cfg.tolerance_grad {
            break;
        }
        if max_abs(&d) * t.abs() <= cfg.tolerance_change
            || (loss - prev_loss).abs() < cfg.tolerance_change
        {
            break;
        }
    }
    Ok((x, loss, n_iter, evals))
}

/// Standardises `train` (population statistics) and applies the same
/// transform to `test`; dimensions with deviation < 1e-6 are only centred.
fn standardise(train: &Tensor, test: &Tensor) -> Result<(Tensor, Tensor)> {
    let mean = train.mean_keepdim(0)?;
    let std = train.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?.sqrt()?;
    let small = std.lt(1e-6)?;
    let std = small.where_cond(&std.ones_like()?, &std)?;
    Ok((
        train.broadcast_sub(&mean)?.broadcast_div(&std)?,
        test.broadcast_sub(&mean)?.broadcast_div(&std)?,
    ))
}

/// Fits the probe on `(train_x, train_y)` and reports train and test
/// accuracy (see the module docs). Features are `(n, ...)` (flattened to
/// rows), labels are class indices.
pub fn logistic_regression(
    train_x: &Tensor,
    train_y: &[u32],
    test_x: &Tensor,
    test_y: &[u32],
    config: &LogisticRegressionConfig,
) -> Result<LogisticRegressionResult> {
    const OP: &str = "logistic_regression";
    config.validate()?;
    // The probe runs on the CPU (L-BFGS reads the logits every evaluation).
    let tx = train_x
        .flatten_from(1)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    let vx = test_x
        .flatten_from(1)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    let (n, d) = tx.dims2()?;
    if n == 0 || n != train_y.len() {
        return Err(Error::shape(
            OP,
            format!("{n} training labels for {n} feature rows (n >= 1)"),
            train_y.len(),
        ));
    }
    if vx.dim(1)? != d || vx.dim(0)? != test_y.len() {
        return Err(Error::shape(
            OP,
            format!("test features (m, {d}) with m = {} labels", test_y.len()),
            vx.dims(),
        ));
    }
    let c = match config.num_classes {
        Some(c) => c,
        None => train_y.iter().copied().max().map_or(1, |m| m as usize + 1),
    };
    if let Some((i, y)) = train_y
        .iter()
        .chain(test_y)
        .enumerate()
        .find(|(_, &y)| y as usize >= c)
    {
        return Err(Error::invalid(
            OP,
            format!("label {y} (entry {i}) is outside 0..{c}: set `num_classes`"),
        ));
    }
    let (tx, vx) = standardise(&tx, &vx)?;
    let mut onehot = vec![0f64; n * c];
    for (i, &y) in train_y.iter().enumerate() {
        onehot[i * c + y as usize] = 1.0;
    }
    let prob = Problem {
        x: tx.contiguous()?,
        onehot,
        n,
        d,
        c,
        wd: config.weight_decay,
    };
    let (p, loss, iterations, evaluations) = lbfgs(&prob, config)?;
    if !loss.is_finite() {
        return Err(Error::non_finite("logistic_regression loss", loss, None));
    }
    let w32: Vec<f32> = p[..c * d].iter().map(|&v| v as f32).collect();
    let weight = Tensor::from_vec(w32, (c, d), &Device::Cpu)?;
    let b32: Vec<f32> = p[c * d..].iter().map(|&v| v as f32).collect();
    let bias = Tensor::from_vec(b32, c, &Device::Cpu)?;
    let predict = |x: &Tensor| -> Result<Vec<u32>> {
        // host-ok: evaluation on the CPU.
        Ok(x.matmul(&weight.t()?)?
            .broadcast_add(&bias)?
            .argmax(1)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?)
    };
    Ok(LogisticRegressionResult {
        train_acc: accuracy_of(&predict(&tx)?, train_y),
        test_acc: accuracy_of(&predict(&vx)?, test_y),
        loss,
        iterations,
        evaluations,
        weight,
        bias,
    })
}
