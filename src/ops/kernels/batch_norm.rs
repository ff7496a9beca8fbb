//! BatchNorm in training mode, fused: forward is one pass for the
//! per-channel statistics and one for `y = x * a + b`; backward is one pass
//! for the two per-channel sums and one for `dx`. An optional ReLU is fused
//! into both.
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
use super::util::{contiguous_slice, needs_grad, second_order};

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
struct Dims {
    n: usize,
    c: usize,
    hw: usize,
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

fn stats<T: Elem>(d: Dims, x: &[T], eps: f64) -> candle_core::Result<Stats> {
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

fn forward<T: Elem>(
    d: Dims,
    x: &[T],
    gamma: &[f64],
    beta: &[f64],
    st: &Stats,
    relu: bool,
) -> Vec<T> {
    let a: Vec<T> = (0..d.c)
        .map(|c| T::from_f64(st.invstd[c] * gamma[c]))
        .collect();
    let b: Vec<T> = (0..d.c)
        .map(|c| T::from_f64(beta[c] - st.mean[c] * st.invstd[c] * gamma[c]))
        .collect();
    let mut y = vec![T::zero(); x.len()];
    let img = d.c * d.hw;
    y.par_chunks_mut(img.max(1))
        .zip(x.par_chunks(img.max(1)))
        .with_min_len(d.min_len(d.n))
        .for_each(|(yi, xi)| {
            for (ch, (yp, xp)) in yi
                .chunks_mut(d.hw.max(1))
                .zip(xi.chunks(d.hw.max(1)))
                .enumerate()
            {
                simd::affine(yp, xp, a[ch], b[ch], relu);
            }
        });
    y
}

/// Fused backward: returns `[dx..., dgamma (c), dbeta (c)]` packed.
fn backward<T: Elem>(
    d: Dims,
    x: &[T],
    dy: &[T],
    y: &[T],
    gamma: &[f64],
    st: &Stats,
    relu: bool,
) -> Vec<T> {
    let m = d.count() as f64;
    // Pass 1: sum(dy) and sum(dy * xhat) per channel (dy masked by the ReLU).
    let mu: Vec<T> = st.mean.iter().map(|&v| T::from_f64(v)).collect();
    let sums: Vec<(f64, f64)> = channel_sums(d, |ch, r| {
        simd::grad_sums(&x[r.clone()], &dy[r.clone()], &y[r], mu[ch], relu)
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
    let mut out = vec![T::zero(); x.len() + 2 * d.c];
    let (dx, tail) = out.split_at_mut(x.len());
    let img = d.c * d.hw;
    dx.par_chunks_mut(img.max(1))
        .zip(x.par_chunks(img.max(1)))
        .zip(dy.par_chunks(img.max(1)))
        .zip(y.par_chunks(img.max(1)))
        .with_min_len(d.min_len(d.n))
        .for_each(|(((dxi, xi), gi), yi)| {
            let hw = d.hw.max(1);
            for (ch, (((o, xp), gp), yp)) in dxi
                .chunks_mut(hw)
                .zip(xi.chunks(hw))
                .zip(gi.chunks(hw))
                .zip(yi.chunks(hw))
                .enumerate()
            {
                let (a, b, c) = coef[ch];
                simd::affine_grad(o, xp, gp, yp, a, b, c, relu);
            }
        });
    for ch in 0..d.c {
        tail[ch] = T::from_f64(sums[ch].1);
        tail[d.c + ch] = T::from_f64(sums[ch].0);
    }
    out
}

fn to_f64_vec(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// The training forward `(x, gamma, beta) -> y`; caches the statistics.
pub(crate) struct BatchNormOp {
    pub eps: f64,
    pub relu: bool,
    pub stats: Arc<Mutex<Option<Stats>>>,
}

/// The fused backward `(x, dy, y) -> [dx, dgamma, dbeta]` (packed, no grad).
struct BatchNormBwdOp {
    gamma: Vec<f64>,
    stats: Stats,
    relu: bool,
}

impl candle_core::CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "aimass-batch-norm-train"
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
        if l2.shape().elem_count() != d.c || l3.shape().elem_count() != d.c {
            candle_core::bail!("batch_norm: weight and bias need {} values", d.c);
        }
        let f64s = |s: &CpuStorage, l: &Layout| -> candle_core::Result<Vec<f64>> {
            Ok(match s {
                CpuStorage::F32(_) => contiguous_slice::<f32>(s, l)?
                    .iter()
                    .map(|v| *v as f64)
                    .collect(),
                CpuStorage::F64(_) => contiguous_slice::<f64>(s, l)?.to_vec(),
                _ => candle_core::bail!("batch_norm: weight/bias must be f32 or f64"),
            })
        };
        let (gamma, beta) = (f64s(s2, l2)?, f64s(s3, l3)?);
        let (out, st) = match s1 {
            CpuStorage::F32(_) => {
                let x = contiguous_slice::<f32>(s1, l1)?;
                let st = stats(d, x, self.eps)?;
                (
                    CpuStorage::F32(forward(d, x, &gamma, &beta, &st, self.relu)),
                    st,
                )
            }
            CpuStorage::F64(_) => {
                let x = contiguous_slice::<f64>(s1, l1)?;
                let st = stats(d, x, self.eps)?;
                (
                    CpuStorage::F64(forward(d, x, &gamma, &beta, &st, self.relu)),
                    st,
                )
            }
            _ => candle_core::bail!("batch_norm: only f32 and f64, got {:?}", s1.dtype()),
        };
        if let Ok(mut g) = self.stats.lock() {
            *g = Some(st);
        }
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dim(1)?;
        let wanted = (needs_grad(x), needs_grad(gamma), needs_grad(beta));
        let (dx, dg, db) = if second_order() {
            differentiable_bwd(x, gamma, res, dy, self.eps, self.relu)?
        } else {
            let st = match self.stats.lock() {
                Ok(g) => g.clone(),
                Err(_) => None,
            };
            let Some(st) = st else {
                candle_core::bail!("batch_norm backward: forward statistics missing")
            };
            let op = BatchNormBwdOp {
                gamma: to_f64_vec(gamma)?,
                stats: st,
                relu: self.relu,
            };
            let packed =
                x.contiguous()?
                    .apply_op3_no_bwd(&dy.contiguous()?, &res.contiguous()?, &op)?;
            let numel = x.elem_count();
            let dx = packed.narrow(0, 0, numel)?.reshape(x.shape())?;
            let dg = packed.narrow(0, numel, c)?.reshape(gamma.shape())?;
            let db = packed.narrow(0, numel + c, c)?.reshape(beta.shape())?;
            (dx, dg, db)
        };
        Ok((
            wanted.0.then_some(dx),
            wanted.1.then_some(dg),
            wanted.2.then_some(db),
        ))
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
        if l2.shape() != l1.shape() || l3.shape() != l1.shape() || self.gamma.len() != d.c {
            candle_core::bail!(
                "batch_norm backward: shapes {:?} {:?} {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let n = l1.shape().elem_count() + 2 * d.c;
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
                ))
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
                ))
            }
            _ => candle_core::bail!("batch_norm backward: only f32 and f64"),
        };
        Ok((out, Shape::from(n)))
    }
}

/// The backward written with candle's differentiable ops (second order).
fn differentiable_bwd(
    x: &Tensor,
    gamma: &Tensor,
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
    let g = gamma.reshape(bshape)?;
    let inner = dy
        .broadcast_sub(&(&sdy / m)?)?
        .sub(&xhat.broadcast_mul(&(&sdyx / m)?)?)?;
    let dx = inner.broadcast_mul(&g.mul(&invstd)?)?;
    Ok((dx, sdyx.flatten_all()?, sdy.flatten_all()?))
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
