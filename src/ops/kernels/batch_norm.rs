//! BatchNorm in training mode, fused: forward is one pass for the
//! per-channel statistics and one for `y = x * a + b`; backward is one pass
//! for the two per-channel sums and one for `dx`. An epilogue is fused into
//! both: nothing, a ReLU, or a residual add then a ReLU
//! (`y = max(x * a + b + s, 0)`, the end of a ResNet block, whose backward
//! also writes the shortcut's gradient `dy * (y > 0)` in the `dx` pass).
//!
//! The per-channel reductions (statistics, backward sums) walk memory in
//! order, image by image, and add up f64 partials in an order fixed by the
//! shape alone.
//!
//! First-order backward runs the fused kernel. When candle keeps gradients
//! differentiable (`CANDLE_GRAD_DO_NOT_DETACH`, second-order mode) the
//! backward is written with candle's differentiable ops instead, so
//! gradients of gradients are exact.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{threads, Elem};
use super::simd;
use super::util::{contiguous_slice, needs_grad, second_order, zero_init};

/// Per-channel batch statistics of one forward pass.
#[derive(Clone, Debug, Default)]
pub(crate) struct Stats {
    pub mean: Vec<f64>,
    /// Biased variance (divided by the count).
    pub var: Vec<f64>,
    pub invstd: Vec<f64>,
}

/// `(n, c, rest...)` viewed as `(n, c, hw)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
}

impl Dims {
    fn of(s: &Shape) -> candle_core::Result<Self> {
        let d = s.dims();
        if d.len() < 2 {
            candle_core::bail!("batch_norm: input must be (n, c, ...), got {s:?}");
        }
        let hw = d[2..].iter().product();
        Ok(Dims {
            n: d[0],
            c: d[1],
            hw,
        })
    }
    fn count(&self) -> usize {
        self.n * self.hw
    }
    fn min_len(&self, units: usize) -> usize {
        units.div_ceil(4 * threads()).max(1)
    }
}

/// At most this many image chunks in the per-channel reductions: enough to
/// spread over the threads, few enough that the partial sums stay small.
const CHUNKS: usize = 64;

/// Per-channel pairs of sums over all `n` images, walking memory in order:
/// parallel over tasks of (a chunk of whole images, a block of channels),
/// each adding `plane(ch, range)` (the sums over the plane `x[i, ch, ..]`,
/// whose elements are `range` of the flat input) into per-channel f64
/// partials, which are then added up chunk by chunk in order.
///
/// The tasks depend on the shape only, never on the thread count, so the
/// order of the additions, and the result, is the same on every machine.
/// Channels are split into blocks only when there are fewer than
/// [`CHUNKS`] image chunks (small batches), to keep the threads busy.
fn channel_sums<F>(d: Dims, plane: F) -> Vec<(f64, f64)>
where
    F: Fn(usize, std::ops::Range<usize>) -> (f64, f64) + Sync,
{
    if d.n == 0 || d.c == 0 {
        return vec![(0.0, 0.0); d.c];
    }
    let per_img = d.n.div_ceil(CHUNKS);
    let n_img = d.n.div_ceil(per_img);
    let per_ch = d.c.div_ceil(CHUNKS.div_ceil(n_img).min(d.c));
    let n_ch = d.c.div_ceil(per_ch);
    let partials: Vec<Vec<(f64, f64)>> = (0..n_img * n_ch)
        .into_par_iter()
        .map(|t| {
            let (imgs, chs) = (t / n_ch, t % n_ch);
            let ch0 = chs * per_ch;
            let ch1 = (ch0 + per_ch).min(d.c);
            let mut acc = vec![(0f64, 0f64); ch1 - ch0];
            for i in imgs * per_img..((imgs + 1) * per_img).min(d.n) {
                for (a, ch) in acc.iter_mut().zip(ch0..ch1) {
                    let start = (i * d.c + ch) * d.hw;
                    let (s1, s2) = plane(ch, start..start + d.hw);
                    a.0 += s1;
                    a.1 += s2;
                }
            }
            acc
        })
        .collect();
    let mut total = vec![(0f64, 0f64); d.c];
    for (t, p) in partials.iter().enumerate() {
        let ch0 = (t % n_ch) * per_ch;
        for (a, v) in total[ch0..].iter_mut().zip(p) {
            a.0 += v.0;
            a.1 += v.1;
        }
    }
    total
}

pub(crate) fn stats<T: Elem>(d: Dims, x: &[T], eps: f64) -> candle_core::Result<Stats> {
    let m = d.count();
    if m == 0 {
        candle_core::bail!(
            "batch_norm: no values per channel (input {} x {} x {})",
            d.n,
            d.c,
            d.hw
        );
    }
    // Shifted sums, exact enough even when |mean| >> std: the shift of each
    // channel is its first value, x[0, ch, 0].
    let k: Vec<T> = (0..d.c).map(|ch| x[ch * d.hw]).collect();
    let sums = channel_sums(d, |ch, r| simd::shifted_sums(&x[r], k[ch]));
    let mf = m as f64;
    let (mut mean, mut var) = (Vec::with_capacity(d.c), Vec::with_capacity(d.c));
    for (&(s1, s2), kc) in sums.iter().zip(&k) {
        let mu = s1 / mf;
        mean.push(kc.to_f64() + mu);
        var.push((s2 / mf - mu * mu).max(0.0));
    }
    let invstd = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    Ok(Stats { mean, var, invstd })
}

/// The normalisation `bn(x) = a * x + b` per channel: `(a, b)` in `T`,
/// rounded once (the forward and every recomputation of its output use
/// these same values).
pub(crate) fn coefs<T: Elem>(gamma: &[f64], beta: &[f64], st: &Stats) -> (Vec<T>, Vec<T>) {
    let c = st.mean.len();
    let a = (0..c)
        .map(|c| T::from_f64(st.invstd[c] * gamma[c]))
        .collect();
    let b = (0..c)
        .map(|c| T::from_f64(beta[c] - st.mean[c] * st.invstd[c] * gamma[c]))
        .collect();
    (a, b)
}

/// Shifted sums of one plane (one image, one channel): `k` its first
/// value, `s1 = sum (x - k)`, `s2 = sum (x - k)^2`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PlaneSums {
    pub k: f64,
    pub s1: f64,
    pub s2: f64,
}

impl PlaneSums {
    /// The sums of `plane` (empty: all zero).
    pub fn of<T: Elem>(plane: &[T]) -> Self {
        let Some(&k) = plane.first() else {
            return Self::default();
        };
        let (s1, s2) = simd::shifted_sums(plane, k);
        PlaneSums {
            k: k.to_f64(),
            s1,
            s2,
        }
    }
}

/// The batch statistics from the sums of every plane, `parts[i * c + ch]`
/// for image `i` and channel `ch` (as a convolution writes them while its
/// output is in cache): per channel, the planes' means and squared
/// deviations combined image by image in order (Chan et al.), so the
/// result does not depend on how the planes were shared among threads.
pub(crate) fn stats_from_planes(
    d: Dims,
    parts: &[PlaneSums],
    eps: f64,
) -> candle_core::Result<Stats> {
    if d.count() == 0 || parts.len() != d.n * d.c {
        candle_core::bail!(
            "batch_norm: {} plane sums for {} x {} planes of {} values",
            parts.len(),
            d.n,
            d.c,
            d.hw
        );
    }
    let hw = d.hw as f64;
    let (mut mean, mut var) = (Vec::with_capacity(d.c), Vec::with_capacity(d.c));
    for ch in 0..d.c {
        let (mut n, mut mu, mut m2) = (0f64, 0f64, 0f64);
        for i in 0..d.n {
            let p = parts[i * d.c + ch];
            let (mb, m2b) = (p.k + p.s1 / hw, (p.s2 - p.s1 * p.s1 / hw).max(0.0));
            let total = n + hw;
            let delta = mb - mu;
            mu += delta * hw / total;
            m2 += m2b + delta * delta * n * hw / total;
            n = total;
        }
        mean.push(mu);
        var.push((m2 / n).max(0.0));
    }
    let invstd = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    Ok(Stats { mean, var, invstd })
}

/// Where the backward finds the ReLU mask of the forward's output.
#[derive(Clone, Copy)]
pub(crate) enum Mask<'a, T> {
    /// No ReLU.
    None,
    /// `y > 0` of the stored output `y`.
    Output(&'a [T]),
    /// `a * x + b > 0`, the normalisation recomputed from the input with
    /// the forward's coefficients ([`coefs`], from the `beta` given).
    Recomputed,
}

/// What the fused op applies after the normalisation `bn(x) = a * x + b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Epilogue {
    /// `y = bn(x)`.
    None,
    /// `y = max(bn(x), 0)`.
    Relu,
    /// `y = max(bn(x) + s, 0)`, `s` (the residual shortcut, shaped as `x`)
    /// being the op's third input: the end of a ResNet block.
    AddRelu,
}

impl Epilogue {
    /// Whether the output went through a ReLU, so that the backward masks
    /// the incoming gradient with `y > 0`.
    fn relu(self) -> bool {
        self != Epilogue::None
    }
}

/// The second pass of the forward: `y = a * x + b` per channel, then the
/// epilogue (`s` is the shortcut, for [`Epilogue::AddRelu`] only).
pub(crate) fn forward<T: Elem>(
    d: Dims,
    x: &[T],
    s: Option<&[T]>,
    gamma: &[f64],
    beta: &[f64],
    st: &Stats,
    relu: bool,
) -> candle_core::Result<Vec<T>> {
    let numel = x.len();
    if s.is_some_and(|s| s.len() != numel) {
        candle_core::bail!("batch_norm: the shortcut must have the input's length {numel}");
    }
    let (a, b) = coefs::<T>(gamma, beta, st);
    let mut y: Vec<T> = Vec::with_capacity(numel);
    let img = (d.c * d.hw).max(1);
    let hw = d.hw.max(1);
    let pass = y.spare_capacity_mut()[..numel]
        .par_chunks_mut(img)
        .zip(x.par_chunks(img))
        .with_min_len(d.min_len(d.n));
    match s {
        Some(s) => pass.zip(s.par_chunks(img)).for_each(|((yi, xi), si)| {
            let yi = zero_init(yi);
            let planes = yi.chunks_mut(hw).zip(xi.chunks(hw)).zip(si.chunks(hw));
            for (ch, ((yp, xp), sp)) in planes.enumerate() {
                simd::affine_add_relu(yp, xp, sp, a[ch], b[ch]);
            }
        }),
        None => pass.for_each(|(yi, xi)| {
            let yi = zero_init(yi);
            for (ch, (yp, xp)) in yi.chunks_mut(hw).zip(xi.chunks(hw)).enumerate() {
                simd::affine(yp, xp, a[ch], b[ch], relu);
            }
        }),
    }
    // SAFETY: the first `numel` values were initialised (`zero_init`): the
    // loop visits every `img`-sized chunk of them, paired one to one with
    // the chunks of `x` (and `s`, of the same length), and does not exit
    // early; `numel <= capacity`.
    unsafe { y.set_len(numel) };
    Ok(y)
}

/// Fused backward: returns `[dx..., ds..., dgamma (c), dbeta (c)]` packed,
/// where `ds = dy * (y > 0)` (the shortcut's gradient) is there only when
/// `shortcut_grad`, which needs `relu`.
#[allow(clippy::too_many_arguments)]
fn backward<T: Elem>(
    d: Dims,
    x: &[T],
    dy: &[T],
    y: &[T],
    gamma: &[f64],
    st: &Stats,
    relu: bool,
    shortcut_grad: bool,
) -> candle_core::Result<Vec<T>> {
    let numel = x.len();
    let planes_out = if shortcut_grad { 2 * numel } else { numel };
    let total = planes_out + 2 * d.c;
    let mut out: Vec<T> = Vec::with_capacity(total);
    let (grads, tail) = out.spare_capacity_mut()[..total].split_at_mut(planes_out);
    let (dx, ds) = grads.split_at_mut(numel);
    let ds = shortcut_grad.then_some(ds);
    let mask = if relu { Mask::Output(y) } else { Mask::None };
    let (dgamma, dbeta) = backward_into(d, x, dy, mask, gamma, &[], st, dx, ds)?;
    let tail = zero_init(tail);
    for ch in 0..d.c {
        tail[ch] = T::from_f64(dgamma[ch]);
        tail[d.c + ch] = T::from_f64(dbeta[ch]);
    }
    // SAFETY: all `total` values were initialised: the tail just above, and
    // the gradients (`dx`, then `ds` when asked for) by `backward_into`,
    // which returned without error; `total <= capacity`.
    unsafe { out.set_len(total) };
    Ok(out)
}

/// The fused backward into the caller's buffers: writes `dx` (all `numel`
/// values) and, when given, the shortcut's gradient `ds = dy * (y > 0)`
/// (needs the mask of a stored output, [`Mask::Output`]); returns the
/// per-channel `(dgamma, dbeta)`. `beta` is read for [`Mask::Recomputed`]
/// only.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_into<T: Elem>(
    d: Dims,
    x: &[T],
    dy: &[T],
    mask: Mask<'_, T>,
    gamma: &[f64],
    beta: &[f64],
    st: &Stats,
    dx: &mut [std::mem::MaybeUninit<T>],
    ds: Option<&mut [std::mem::MaybeUninit<T>]>,
) -> candle_core::Result<(Vec<f64>, Vec<f64>)> {
    let numel = x.len();
    let y_len = match mask {
        Mask::Output(y) => y.len(),
        _ => numel,
    };
    if dy.len() != numel
        || y_len != numel
        || gamma.len() != d.c
        || (matches!(mask, Mask::Recomputed) && beta.len() != d.c)
        || dx.len() != numel
        || ds
            .as_ref()
            .is_some_and(|s| s.len() != numel || !matches!(mask, Mask::Output(_)))
        || numel != d.n * d.c * d.hw
    {
        candle_core::bail!(
            "batch_norm backward: lengths {numel}, {}, {y_len}, {}, {} (channels {})",
            dy.len(),
            gamma.len(),
            dx.len(),
            d.c
        );
    }
    let m = d.count() as f64;
    let (ma, mb) = match mask {
        Mask::Recomputed => coefs::<T>(gamma, beta, st),
        _ => (Vec::new(), Vec::new()),
    };
    // Pass 1: sum(dy) and sum(dy * xhat) per channel (dy masked by the ReLU).
    let mu: Vec<T> = st.mean.iter().map(|&v| T::from_f64(v)).collect();
    let sums: Vec<(f64, f64)> = channel_sums(d, |ch, r| match mask {
        Mask::None => simd::grad_sums(&x[r.clone()], &dy[r.clone()], &dy[r], mu[ch], false),
        Mask::Output(y) => simd::grad_sums(&x[r.clone()], &dy[r.clone()], &y[r], mu[ch], true),
        Mask::Recomputed => {
            simd::grad_sums_recomputed(&x[r.clone()], &dy[r], mu[ch], ma[ch], mb[ch])
        }
    })
    .into_iter()
    .zip(&st.invstd)
    .map(|((sdy, sdyx), is)| (sdy, sdyx * is))
    .collect();
    // dx = A * dy + B * x + C per channel.
    let coef: Vec<(T, T, T)> = (0..d.c)
        .map(|ch| {
            let (sdy, sdyx) = sums[ch];
            let a = gamma[ch] * st.invstd[ch];
            let b = -a * st.invstd[ch] * sdyx / m;
            let c = -a * sdy / m - b * st.mean[ch];
            (T::from_f64(a), T::from_f64(b), T::from_f64(c))
        })
        .collect();
    let img = (d.c * d.hw).max(1);
    let hw = d.hw.max(1);
    let y = match mask {
        Mask::Output(y) => y,
        _ => dy,
    };
    if let Some(ds) = ds {
        dx.par_chunks_mut(img)
            .zip(ds.par_chunks_mut(img))
            .zip(x.par_chunks(img))
            .zip(dy.par_chunks(img))
            .zip(y.par_chunks(img))
            .with_min_len(d.min_len(d.n))
            .for_each(|((((dxi, dsi), xi), gi), yi)| {
                let (dxi, dsi) = (zero_init(dxi), zero_init(dsi));
                let planes = dxi
                    .chunks_mut(hw)
                    .zip(dsi.chunks_mut(hw))
                    .zip(xi.chunks(hw))
                    .zip(gi.chunks(hw))
                    .zip(yi.chunks(hw));
                for (ch, ((((o, os), xp), gp), yp)) in planes.enumerate() {
                    let (a, b, c) = coef[ch];
                    simd::affine_grad_add(o, os, xp, gp, yp, a, b, c);
                }
            });
    } else {
        dx.par_chunks_mut(img)
            .zip(x.par_chunks(img))
            .zip(dy.par_chunks(img))
            .zip(y.par_chunks(img))
            .with_min_len(d.min_len(d.n))
            .for_each(|(((dxi, xi), gi), yi)| {
                let dxi = zero_init(dxi);
                let planes = dxi
                    .chunks_mut(hw)
                    .zip(xi.chunks(hw))
                    .zip(gi.chunks(hw))
                    .zip(yi.chunks(hw));
                for (ch, (((o, xp), gp), yp)) in planes.enumerate() {
                    let (a, b, c) = coef[ch];
                    match mask {
                        Mask::None => simd::affine_grad(o, xp, gp, yp, a, b, c, false),
                        Mask::Output(_) => simd::affine_grad(o, xp, gp, yp, a, b, c, true),
                        Mask::Recomputed => {
                            simd::affine_grad_recomputed(o, xp, gp, a, b, c, ma[ch], mb[ch])
                        }
                    }
                }
            });
    }
    Ok(sums.iter().map(|s| (s.1, s.0)).unzip())
}

fn to_f64_vec(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// The training forward; caches the statistics. Its operands are `x`, the
/// affine parameters packed as one `(2c,)` tensor `gamma ‖ beta`, and, for
/// [`Epilogue::AddRelu`], the shortcut: a [`candle_core::CustomOp2`]
/// `(x, gamma ‖ beta) -> y` for the other epilogues, a
/// [`candle_core::CustomOp3`] `(x, gamma ‖ beta, s) -> y` for that one.
pub(crate) struct BatchNormOp {
    pub eps: f64,
    pub epilogue: Epilogue,
    pub stats: Arc<Mutex<Option<Stats>>>,
}

/// The fused backward `(x, dy, y) -> [dx, ds, dgamma, dbeta]` (packed, no
/// grad; `ds` only when `shortcut_grad`).
struct BatchNormBwdOp {
    gamma: Vec<f64>,
    stats: Stats,
    relu: bool,
    shortcut_grad: bool,
}

/// The `(2c,)` parameters `gamma ‖ beta` as f64.
fn params_f64(s: &CpuStorage, l: &Layout, c: usize) -> candle_core::Result<Vec<f64>> {
    if l.shape().elem_count() != 2 * c {
        candle_core::bail!("batch_norm: weight and bias need {c} values each");
    }
    Ok(match s {
        CpuStorage::F32(_) => contiguous_slice::<f32>(s, l)?
            .iter()
            .map(|v| *v as f64)
            .collect(),
        CpuStorage::F64(_) => contiguous_slice::<f64>(s, l)?.to_vec(),
        _ => candle_core::bail!("batch_norm: weight/bias must be f32 or f64"),
    })
}

impl BatchNormOp {
    /// The forward of both op arities; `shortcut` is the third operand.
    fn fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        shortcut: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = Dims::of(l1.shape())?;
        if shortcut.is_some() != (self.epilogue == Epilogue::AddRelu) {
            candle_core::bail!("batch_norm: a shortcut goes with the add + ReLU epilogue only");
        }
        if let Some((_, l3)) = shortcut {
            if l3.shape() != l1.shape() {
                candle_core::bail!(
                    "batch_norm: shortcut {:?} must have the input's shape {:?}",
                    l3.shape(),
                    l1.shape()
                );
            }
        }
        let gb = params_f64(s2, l2, d.c)?;
        let (gamma, beta) = gb.split_at(d.c);
        let relu = self.epilogue.relu();
        fn run<T: Elem>(
            d: Dims,
            x: &[T],
            s: Option<&[T]>,
            gamma: &[f64],
            beta: &[f64],
            eps: f64,
            relu: bool,
        ) -> candle_core::Result<(Vec<T>, Stats)> {
            let st = stats(d, x, eps)?;
            Ok((forward(d, x, s, gamma, beta, &st, relu)?, st))
        }
        let (out, st) = match s1 {
            CpuStorage::F32(_) => {
                let x = contiguous_slice::<f32>(s1, l1)?;
                let s = match shortcut {
                    Some((s3, l3)) => Some(contiguous_slice::<f32>(s3, l3)?),
                    None => None,
                };
                let (y, st) = run(d, x, s, gamma, beta, self.eps, relu)?;
                (CpuStorage::F32(y), st)
            }
            CpuStorage::F64(_) => {
                let x = contiguous_slice::<f64>(s1, l1)?;
                let s = match shortcut {
                    Some((s3, l3)) => Some(contiguous_slice::<f64>(s3, l3)?),
                    None => None,
                };
                let (y, st) = run(d, x, s, gamma, beta, self.eps, relu)?;
                (CpuStorage::F64(y), st)
            }
            _ => candle_core::bail!("batch_norm: only f32 and f64, got {:?}", s1.dtype()),
        };
        if let Ok(mut g) = self.stats.lock() {
            *g = Some(st);
        }
        Ok((out, l1.shape().clone()))
    }

    /// The backward of both op arities: gradients of `x`, `gamma ‖ beta`
    /// and (when given) the shortcut, each only where autograd wants it.
    fn grads(
        &self,
        x: &Tensor,
        gb: &Tensor,
        shortcut: Option<&Tensor>,
        res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dim(1)?;
        let want_ds = shortcut.is_some_and(needs_grad);
        let relu = self.epilogue.relu();
        let (dx, dgb, ds) = if second_order() {
            let (dx, dgb, g) = differentiable_bwd(x, gb, res, dy, self.eps, relu)?;
            (dx, dgb, want_ds.then_some(g))
        } else {
            let st = match self.stats.lock() {
                Ok(g) => g.clone(),
                Err(_) => None,
            };
            let Some(st) = st else {
                candle_core::bail!("batch_norm backward: forward statistics missing")
            };
            let op = BatchNormBwdOp {
                gamma: to_f64_vec(&gb.narrow(0, 0, c)?)?,
                stats: st,
                relu,
                shortcut_grad: want_ds && relu,
            };
            let packed =
                x.contiguous()?
                    .apply_op3_no_bwd(&dy.contiguous()?, &res.contiguous()?, &op)?;
            let numel = x.elem_count();
            let dx = packed.narrow(0, 0, numel)?.reshape(x.shape())?;
            let (ds, off) = if op.shortcut_grad {
                let ds = packed.narrow(0, numel, numel)?.reshape(x.shape())?;
                (Some(ds), 2 * numel)
            } else {
                (None, numel)
            };
            (dx, packed.narrow(0, off, 2 * c)?, ds)
        };
        Ok((
            needs_grad(x).then_some(dx),
            needs_grad(gb).then_some(dgb),
            ds,
        ))
    }
}

impl candle_core::CustomOp2 for BatchNormOp {
    fn name(&self) -> &'static str {
        "aimass-batch-norm-train"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd(s1, l1, s2, l2, None)
    }
    fn bwd(
        &self,
        x: &Tensor,
        gb: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dgb, _) = self.grads(x, gb, None, res, dy)?;
        Ok((dx, dgb))
    }
}

impl candle_core::CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "aimass-batch-norm-add-relu-train"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd(s1, l1, s2, l2, Some((s3, l3)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        gb: &Tensor,
        s: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.grads(x, gb, Some(s), res, dy)
    }
}

impl candle_core::CustomOp3 for BatchNormBwdOp {
    fn name(&self) -> &'static str {
        "aimass-batch-norm-train-backward"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = Dims::of(l1.shape())?;
        if l2.shape() != l1.shape()
            || l3.shape() != l1.shape()
            || self.gamma.len() != d.c
            || (self.shortcut_grad && !self.relu)
        {
            candle_core::bail!(
                "batch_norm backward: shapes {:?} {:?} {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let numel = l1.shape().elem_count();
        let n = numel * (1 + self.shortcut_grad as usize) + 2 * d.c;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(backward(
                    d,
                    contiguous_slice::<f32>(s1, l1)?,
                    contiguous_slice::<f32>(s2, l2)?,
                    contiguous_slice::<f32>(s3, l3)?,
                    &self.gamma,
                    &self.stats,
                    self.relu,
                    self.shortcut_grad,
                )?)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(backward(
                    d,
                    contiguous_slice::<f64>(s1, l1)?,
                    contiguous_slice::<f64>(s2, l2)?,
                    contiguous_slice::<f64>(s3, l3)?,
                    &self.gamma,
                    &self.stats,
                    self.relu,
                    self.shortcut_grad,
                )?)
            }
            _ => candle_core::bail!("batch_norm backward: only f32 and f64"),
        };
        Ok((out, Shape::from(n)))
    }
}

/// The backward written with candle's differentiable ops (second order):
/// `(dx, d(gamma ‖ beta), g')` with `g' = dy * (y > 0)` under the ReLU (else
/// `dy`), which is also the shortcut's gradient. The mask comes from the
/// detached output: it is locally constant.
fn differentiable_bwd(
    x: &Tensor,
    gb: &Tensor,
    res: &Tensor,
    dy: &Tensor,
    eps: f64,
    relu: bool,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let d = Dims::of(x.shape())?;
    let rank = x.rank();
    let red: Vec<usize> = std::iter::once(0).chain(2..rank).collect();
    let mut bshape = vec![1usize; rank];
    bshape[1] = d.c;
    let m = d.count() as f64;
    let dy = if relu {
        let mask = res.detach().gt(0.0)?.to_dtype(dy.dtype())?;
        (dy * mask)?
    } else {
        dy.clone()
    };
    let mean = (x.sum_keepdim(red.clone())? / m)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(red.clone())? / m)?;
    let invstd = (var + eps)?.sqrt()?.recip()?;
    let xhat = xc.broadcast_mul(&invstd)?;
    let sdy = dy.sum_keepdim(red.clone())?;
    let sdyx = (&dy * &xhat)?.sum_keepdim(red)?;
    let g = gb.narrow(0, 0, d.c)?.reshape(bshape)?;
    let inner = dy
        .broadcast_sub(&(&sdy / m)?)?
        .sub(&xhat.broadcast_mul(&(&sdyx / m)?)?)?;
    let dx = inner.broadcast_mul(&g.mul(&invstd)?)?;
    let dgb = Tensor::cat(&[sdyx.flatten_all()?, sdy.flatten_all()?], 0)?;
    Ok((dx, dgb, dy))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every plane is visited exactly once, whatever the chunking: integer
    /// sums are exact, so they must equal the direct per-channel loop.
    #[test]
    fn channel_sums_visit_every_plane_once() {
        for (n, c, hw) in [
            (1, 1, 1),
            (1, 7, 3),
            (2, 5, 4),
            (3, 100, 2),
            (63, 3, 5),
            (64, 2, 1),
            (65, 3, 2),
            (130, 4, 3),
            (200, 1, 9),
        ] {
            let d = Dims { n, c, hw };
            let x: Vec<f64> = (0..n * c * hw).map(|i| (i % 97) as f64).collect();
            let got = channel_sums(d, |ch, r| {
                let s: f64 = x[r.clone()].iter().sum();
                (s, (ch * r.len()) as f64)
            });
            for (ch, g) in got.iter().enumerate() {
                let want: f64 = (0..n)
                    .flat_map(|i| (0..hw).map(move |j| (i * c + ch) * hw + j))
                    .map(|k| x[k])
                    .sum();
                assert_eq!(g.0, want, "{n} x {c} x {hw}, channel {ch}");
                assert_eq!(g.1, (ch * hw * n) as f64, "{n} x {c} x {hw}, channel {ch}");
            }
        }
    }
}
