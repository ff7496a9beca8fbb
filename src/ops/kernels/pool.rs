//! Max and average 2-D pooling with padding, forward and backward, on the CPU.
//!
//! Max pooling: `MaxPoolOp(x) -> y`; its backward scatters the output
//! gradient to each window's first maximum (`MaxPoolScatterOp(x, g)`), whose
//! backward gathers at the same positions (`MaxPoolGatherOp(x, v)`) and vice
//! versa, so gradients of any order are exact (the maxima's positions are
//! piecewise constant in `x`, so no gradient flows to `x` through them).
//!
//! Average pooling (padding counted, like torch's `count_include_pad=True`)
//! is linear: `AvgPoolOp` and its transpose `AvgPoolTOp` are each other's
//! backward.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{threads, Elem};
use super::simd::multiversion;
use super::util::{contiguous_slice, needs_grad, zero_grad, zero_init};

multiversion! {
    /// One output row of a 2x2 stride-2 max pool: the maximum of each
    /// window of input rows `r0`, `r1` and its plane index (`base` = index
    /// of `r0[0]`, `w` = row length). Ties and NaN as `argmax_plane`: the
    /// first maximum in row-major order, a NaN wins (the last one).
    #[allow(clippy::needless_range_loop)]
    fn argmax_2x2_row<T>(r0: &[T], r1: &[T], y: &mut [T], idx: &mut [u32], base: u32, w: u32) -> () {
        const L: usize = 8;
        let n = y.len().min(idx.len());
        let (r0, r1) = (&r0[..2 * n], &r1[..2 * n]);
        let mut j = 0;
        // Whole blocks of L windows as fixed-size lane arrays (vectorise);
        // the rest one by one, with the same arithmetic.
        while j < n {
            let lanes = L.min(n - j);
            let mut cand = [[T::zero(); L]; 4];
            for l in 0..lanes {
                let x = 2 * (j + l);
                cand[0][l] = r0[x];
                cand[1][l] = r0[x + 1];
                cand[2][l] = r1[x];
                cand[3][l] = r1[x + 1];
            }
            let mut bv = cand[0];
            let mut k = [0u32; L];
            for (q, c) in cand.iter().enumerate().skip(1) {
                for l in 0..L {
                    let v = c[l];
                    #[allow(clippy::eq_op)]
                    let take = (v > bv[l]) | (v != v);
                    bv[l] = T::pick(take, v, bv[l]);
                    k[l] = if take { q as u32 } else { k[l] };
                }
            }
            y[j..j + lanes].copy_from_slice(&bv[..lanes]);
            for l in 0..lanes {
                idx[j + l] = base + 2 * (j + l) as u32 + (k[l] & 1) + (k[l] >> 1) * w;
            }
            j += L;
        }
    }
}

multiversion! {
    /// The backward of [`argmax_2x2_row`]: each window's input rows `d0`,
    /// `d1` get `g` at the argmax and 0 elsewhere (the windows do not
    /// overlap).
    fn scatter_2x2_row<T>(g: &[T], idx: &[u32], d0: &mut [T], d1: &mut [T], base: u32, w: u32) -> () {
        let n = g.len().min(idx.len());
        let (d0, d1) = (&mut d0[..2 * n], &mut d1[..2 * n]);
        let zero = T::zero();
        for j in 0..n {
            let (i, gv) = (idx[j], g[j]);
            let p = base + 2 * j as u32;
            d0[2 * j] = T::pick(i == p, gv, zero);
            d0[2 * j + 1] = T::pick(i == p + 1, gv, zero);
            d1[2 * j] = T::pick(i == p + w, gv, zero);
            d1[2 * j + 1] = T::pick(i == p + w + 1, gv, zero);
        }
    }
}

/// Kernel, stride and padding of a pooling, each `(h, w)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PoolParams {
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
}

/// Every size of one pooling.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PoolGeom {
    planes: usize,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    p: PoolParams,
}

impl PoolGeom {
    /// Checks the sizes against torch's rules (padding at most half the
    /// kernel, window inside the padded input).
    pub fn new(x: (usize, usize, usize, usize), p: PoolParams) -> candle_core::Result<Self> {
        let (n, c, h, w) = x;
        let (kh, kw) = p.kernel;
        let (sh, sw) = p.stride;
        let (ph, pw) = p.padding;
        if kh == 0 || kw == 0 || sh == 0 || sw == 0 {
            candle_core::bail!(
                "pool2d: kernel {:?} and stride {:?} must be >= 1",
                p.kernel,
                p.stride
            );
        }
        if h == 0 || w == 0 {
            candle_core::bail!("pool2d: empty input plane {h}x{w}");
        }
        if ph > kh / 2 || pw > kw / 2 {
            candle_core::bail!(
                "pool2d: padding {:?} must be at most half the kernel {:?}",
                p.padding,
                p.kernel
            );
        }
        if h + 2 * ph < kh || w + 2 * pw < kw {
            candle_core::bail!(
                "pool2d: kernel {:?} larger than the padded input {h}x{w} (padding {:?})",
                p.kernel,
                p.padding
            );
        }
        Ok(PoolGeom {
            planes: n * c,
            n,
            c,
            h,
            w,
            oh: (h + 2 * ph - kh) / sh + 1,
            ow: (w + 2 * pw - kw) / sw + 1,
            p,
        })
    }

    fn in_plane(&self) -> usize {
        self.h * self.w
    }
    fn out_plane(&self) -> usize {
        self.oh * self.ow
    }
    fn x_shape(&self) -> Shape {
        Shape::from((self.n, self.c, self.h, self.w))
    }
    fn y_shape(&self) -> Shape {
        Shape::from((self.n, self.c, self.oh, self.ow))
    }

    /// The input rows (or columns) `[lo, hi)` of window `o` along one axis.
    fn span(o: usize, s: usize, pad: usize, k: usize, len: usize) -> (usize, usize) {
        let start = o * s;
        let lo = start.saturating_sub(pad);
        let hi = (start + k).saturating_sub(pad).min(len);
        (lo, hi.max(lo))
    }

    /// Calls `f(out_index, in_index)` with the position of the first
    /// maximum (NaN counts as maximum, as in torch) of every window of one
    /// plane.
    fn argmax_plane<T: Elem>(&self, x: &[T], mut f: impl FnMut(usize, usize)) {
        let PoolParams {
            kernel: (kh, kw),
            stride: (sh, sw),
            padding: (ph, pw),
        } = self.p;
        for oi in 0..self.oh {
            let (r0, r1) = Self::span(oi, sh, ph, kh, self.h);
            for oj in 0..self.ow {
                let (c0, c1) = Self::span(oj, sw, pw, kw, self.w);
                let mut best = r0 * self.w + c0;
                let mut bv = x[best];
                for r in r0..r1 {
                    let base = r * self.w + c0;
                    for (j, &v) in x[base..r * self.w + c1].iter().enumerate() {
                        // Branch-free select (random data mispredicts a
                        // branch half the time); NaN wins, as in torch.
                        #[allow(clippy::eq_op)]
                        let take = (v > bv) | (v != v);
                        let mask = (take as usize).wrapping_neg();
                        best ^= (best ^ (base + j)) & mask;
                        bv = T::pick(take, v, bv);
                    }
                }
                f(oi * self.ow + oj, best);
            }
        }
    }

    /// The maximum (NaN wins) of every window of one plane.
    fn max_plane<T: Elem>(&self, x: &[T], out: &mut [T]) {
        let PoolParams {
            kernel: (kh, kw),
            stride: (sh, sw),
            padding: (ph, pw),
        } = self.p;
        for oi in 0..self.oh {
            let (r0, r1) = Self::span(oi, sh, ph, kh, self.h);
            for oj in 0..self.ow {
                let (c0, c1) = Self::span(oj, sw, pw, kw, self.w);
                let mut bv = x[r0 * self.w + c0];
                for r in r0..r1 {
                    for &v in &x[r * self.w + c0..r * self.w + c1] {
                        #[allow(clippy::eq_op)]
                        let take = (v > bv) | (v != v);
                        bv = if take { v } else { bv };
                    }
                }
                out[oi * self.ow + oj] = bv;
            }
        }
    }

    /// Sums of every window of one plane (padding counts as zeros).
    fn window_sums<T: Elem>(&self, x: &[T], out: &mut [T], scale: T) {
        let PoolParams {
            kernel: (kh, kw),
            stride: (sh, sw),
            padding: (ph, pw),
        } = self.p;
        for oi in 0..self.oh {
            let (r0, r1) = Self::span(oi, sh, ph, kh, self.h);
            for oj in 0..self.ow {
                let (c0, c1) = Self::span(oj, sw, pw, kw, self.w);
                let mut s = T::zero();
                for r in r0..r1 {
                    for &v in &x[r * self.w + c0..r * self.w + c1] {
                        s += v;
                    }
                }
                out[oi * self.ow + oj] = s * scale;
            }
        }
    }

    /// Adds `g * scale` to every input of each window of one plane.
    fn window_spread<T: Elem>(&self, g: &[T], dx: &mut [T], scale: T) {
        let PoolParams {
            kernel: (kh, kw),
            stride: (sh, sw),
            padding: (ph, pw),
        } = self.p;
        for oi in 0..self.oh {
            let (r0, r1) = Self::span(oi, sh, ph, kh, self.h);
            for oj in 0..self.ow {
                let (c0, c1) = Self::span(oj, sw, pw, kw, self.w);
                let v = g[oi * self.ow + oj] * scale;
                for r in r0..r1 {
                    for d in &mut dx[r * self.w + c0..r * self.w + c1] {
                        *d += v;
                    }
                }
            }
        }
    }

    fn min_planes(&self) -> usize {
        self.planes.div_ceil(8 * threads()).max(1)
    }

    fn max_fwd<T: Elem>(&self, x: &[T]) -> Vec<T> {
        let mut y = vec![T::zero(); self.planes * self.out_plane()];
        y.par_chunks_mut(self.out_plane().max(1))
            .zip(x.par_chunks(self.in_plane().max(1)))
            .with_min_len(self.min_planes())
            .for_each(|(yp, xp)| self.max_plane(xp, yp));
        y
    }

    /// Whether this is the common 2x2, stride-2, unpadded pooling (windows
    /// tile the plane without overlap), which has vectorised kernels.
    fn is_2x2(&self) -> bool {
        self.p
            == PoolParams {
                kernel: (2, 2),
                stride: (2, 2),
                padding: (0, 0),
            }
    }

    /// Values and plane-local argmax indices of every window.
    fn max_fwd_idx<T: Elem>(&self, x: &[T]) -> (Vec<T>, Vec<u32>) {
        let n = self.planes * self.out_plane();
        if self.is_2x2() && n > 0 {
            let (mut y, mut idx) = (vec![T::zero(); n], vec![0u32; n]);
            let (w, ow) = (self.w, self.ow);
            y.par_chunks_mut(self.out_plane())
                .zip(idx.par_chunks_mut(self.out_plane()))
                .zip(x.par_chunks(self.in_plane()))
                .with_min_len(self.min_planes())
                .for_each(|((yp, ip), xp)| {
                    for oi in 0..self.oh {
                        let r0 = &xp[2 * oi * w..(2 * oi + 1) * w];
                        let r1 = &xp[(2 * oi + 1) * w..(2 * oi + 2) * w];
                        let (yr, ir) = (
                            &mut yp[oi * ow..(oi + 1) * ow],
                            &mut ip[oi * ow..(oi + 1) * ow],
                        );
                        argmax_2x2_row(r0, r1, yr, ir, (2 * oi * w) as u32, w as u32);
                    }
                });
            return (y, idx);
        }
        let (mut y, mut idx) = (vec![T::zero(); n], vec![0u32; n]);
        y.par_chunks_mut(self.out_plane().max(1))
            .zip(idx.par_chunks_mut(self.out_plane().max(1)))
            .zip(x.par_chunks(self.in_plane().max(1)))
            .with_min_len(self.min_planes())
            .for_each(|((yp, ip), xp)| {
                self.argmax_plane(xp, |o, i| {
                    yp[o] = xp[i];
                    ip[o] = i as u32;
                })
            });
        (y, idx)
    }

    fn max_gather<T: Elem>(&self, x: &[T], v: &[T]) -> Vec<T> {
        let mut y = vec![T::zero(); self.planes * self.out_plane()];
        y.par_chunks_mut(self.out_plane().max(1))
            .zip(x.par_chunks(self.in_plane().max(1)))
            .zip(v.par_chunks(self.in_plane().max(1)))
            .with_min_len(self.min_planes())
            .for_each(|((yp, xp), vp)| self.argmax_plane(xp, |o, i| yp[o] = vp[i]));
        y
    }

    fn max_scatter<T: Elem>(&self, x: &[T], g: &[T]) -> Vec<T> {
        let mut dx = vec![T::zero(); self.planes * self.in_plane()];
        dx.par_chunks_mut(self.in_plane().max(1))
            .zip(x.par_chunks(self.in_plane().max(1)))
            .zip(g.par_chunks(self.out_plane().max(1)))
            .with_min_len(self.min_planes())
            .for_each(|((dp, xp), gp)| self.argmax_plane(xp, |o, i| dp[i] += gp[o]));
        dx
    }

    fn avg_fwd<T: Elem>(&self, x: &[T]) -> Vec<T> {
        let scale = T::from_f64(1.0 / (self.p.kernel.0 * self.p.kernel.1) as f64);
        let mut y = vec![T::zero(); self.planes * self.out_plane()];
        y.par_chunks_mut(self.out_plane().max(1))
            .zip(x.par_chunks(self.in_plane().max(1)))
            .with_min_len(self.min_planes())
            .for_each(|(yp, xp)| self.window_sums(xp, yp, scale));
        y
    }

    fn avg_transpose<T: Elem>(&self, g: &[T]) -> Vec<T> {
        let scale = T::from_f64(1.0 / (self.p.kernel.0 * self.p.kernel.1) as f64);
        let mut dx = vec![T::zero(); self.planes * self.in_plane()];
        dx.par_chunks_mut(self.in_plane().max(1))
            .zip(g.par_chunks(self.out_plane().max(1)))
            .with_min_len(self.min_planes())
            .for_each(|(dp, gp)| self.window_spread(gp, dp, scale));
        dx
    }
}

fn dims4(l: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
    l.shape().dims4().map_err(|_| {
        candle_core::Error::Msg(format!("pool2d: input must be 4-D, got {:?}", l.shape()))
    })
}

fn check_len(l: &Layout, want: &Shape, what: &str) -> candle_core::Result<()> {
    if l.shape() != want {
        candle_core::bail!(
            "pool2d {what}: expected shape {want:?}, got {:?}",
            l.shape()
        );
    }
    Ok(())
}

macro_rules! dispatch1 {
    ($s:expr, $l:expr, $name:expr, |$a:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                let $a = contiguous_slice::<f32>($s, $l)?;
                CpuStorage::F32($body)
            }
            CpuStorage::F64(_) => {
                let $a = contiguous_slice::<f64>($s, $l)?;
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!(
                "{}: only f32 and f64 are supported, got {:?}",
                $name,
                $s.dtype()
            ),
        }
    };
}

macro_rules! dispatch2 {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, $name:expr, |$a:ident, $b:ident| $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let $a = contiguous_slice::<f32>($s1, $l1)?;
                let $b = contiguous_slice::<f32>($s2, $l2)?;
                CpuStorage::F32($body)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let $a = contiguous_slice::<f64>($s1, $l1)?;
                let $b = contiguous_slice::<f64>($s2, $l2)?;
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!(
                "{}: only f32 and f64 (both operands the same) are supported, got {:?} and {:?}",
                $name,
                $s1.dtype(),
                $s2.dtype()
            ),
        }
    };
}

/// Max pooling forward.
pub(crate) struct MaxPoolOp(pub PoolParams);
/// `dx[argmax] += g` for the windows of `x`.
pub(crate) struct MaxPoolScatterOp(pub PoolParams);
/// `y = v[argmax]` for the windows of `x`.
pub(crate) struct MaxPoolGatherOp(pub PoolParams);
/// Average pooling forward (padding counted).
pub(crate) struct AvgPoolOp(pub PoolParams);
/// The transpose of average pooling, for an input of size `in_hw`.
pub(crate) struct AvgPoolTOp {
    pub p: PoolParams,
    pub in_hw: (usize, usize),
}

/// Max pooling forward that keeps each window's argmax for the backward
/// (used when `x` needs a gradient).
pub(crate) struct MaxPoolIdxOp {
    pub p: PoolParams,
    pub idx: Arc<Mutex<Option<Arc<Vec<u32>>>>>,
}

/// `dx[plane, idx[o]] += g[plane, o]` with fixed indices (linear in `g`).
pub(crate) struct IdxScatterOp {
    g: PoolGeom,
    idx: Arc<Vec<u32>>,
}

/// `y[plane, o] = v[plane, idx[o]]` with fixed indices (linear in `v`).
pub(crate) struct IdxGatherOp {
    g: PoolGeom,
    idx: Arc<Vec<u32>>,
}

impl candle_core::CustomOp1 for MaxPoolIdxOp {
    fn name(&self) -> &'static str {
        "aimass-max-pool2d-idx"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = PoolGeom::new(dims4(l)?, self.p)?;
        if g.in_plane() > u32::MAX as usize {
            candle_core::bail!("max_pool2d: planes over 2^32 values are not supported");
        }
        let (out, idx) = match s {
            CpuStorage::F32(_) => {
                let (y, i) = g.max_fwd_idx(contiguous_slice::<f32>(s, l)?);
                (CpuStorage::F32(y), i)
            }
            CpuStorage::F64(_) => {
                let (y, i) = g.max_fwd_idx(contiguous_slice::<f64>(s, l)?);
                (CpuStorage::F64(y), i)
            }
            _ => candle_core::bail!("max_pool2d: only f32 and f64, got {:?}", s.dtype()),
        };
        if let Ok(mut slot) = self.idx.lock() {
            *slot = Some(Arc::new(idx));
        }
        Ok((out, g.y_shape()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let idx = self.idx.lock().ok().and_then(|s| s.clone());
        let g = PoolGeom::new(x.dims4()?, self.p)?;
        match idx {
            Some(idx) if idx.len() == g.planes * g.out_plane() => {
                Ok(Some(dy.contiguous()?.apply_op1(IdxScatterOp { g, idx })?))
            }
            _ => Ok(Some(max_scatter(x, dy, self.p)?)),
        }
    }
}

impl candle_core::CustomOp1 for IdxScatterOp {
    fn name(&self) -> &'static str {
        "aimass-max-pool2d-idx-scatter"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.g;
        check_len(l, &g.y_shape(), "gradient")?;
        let out = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(idx_scatter(g, &self.idx, contiguous_slice::<f32>(s, l)?))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(idx_scatter(g, &self.idx, contiguous_slice::<f64>(s, l)?))
            }
            _ => candle_core::bail!("max_pool2d backward: only f32 and f64, got {:?}", s.dtype()),
        };
        Ok((out, g.x_shape()))
    }
    fn bwd(&self, _g: &Tensor, _res: &Tensor, gg: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = IdxGatherOp {
            g: self.g,
            idx: self.idx.clone(),
        };
        Ok(Some(gg.contiguous()?.apply_op1(op)?))
    }
}

impl candle_core::CustomOp1 for IdxGatherOp {
    fn name(&self) -> &'static str {
        "aimass-max-pool2d-idx-gather"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.g;
        check_len(l, &g.x_shape(), "gather source")?;
        let out = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(idx_gather(g, &self.idx, contiguous_slice::<f32>(s, l)?))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(idx_gather(g, &self.idx, contiguous_slice::<f64>(s, l)?))
            }
            _ => candle_core::bail!("max_pool2d gather: only f32 and f64, got {:?}", s.dtype()),
        };
        Ok((out, g.y_shape()))
    }
    fn bwd(&self, _v: &Tensor, _res: &Tensor, gg: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = IdxScatterOp {
            g: self.g,
            idx: self.idx.clone(),
        };
        Ok(Some(gg.contiguous()?.apply_op1(op)?))
    }
}

fn idx_scatter<T: Elem>(g: &PoolGeom, idx: &[u32], gr: &[T]) -> Vec<T> {
    let (ip, op) = (g.in_plane().max(1), g.out_plane().max(1));
    let total = g.planes * g.in_plane();
    // The fast path initialises every plane only when each has its
    // gradient and indices (the caller checks the shapes; so does this).
    let outs = g.planes * g.out_plane();
    if g.is_2x2() && total > 0 && idx.len() == outs && gr.len() == outs {
        let (w, ow) = (g.w, g.ow);
        let mut dx: Vec<T> = Vec::with_capacity(total);
        dx.spare_capacity_mut()[..total]
            .par_chunks_mut(ip)
            .zip(gr.par_chunks(op).zip(idx.par_chunks(op)))
            .with_min_len(g.min_planes())
            .for_each(|(dp, (gp, xp))| {
                // Zeroed here: an odd last row or column is in no window.
                let dp = zero_init(dp);
                for oi in 0..g.oh {
                    let (d0, d1) = dp[2 * oi * w..(2 * oi + 2) * w].split_at_mut(w);
                    let (go, io) = (&gp[oi * ow..(oi + 1) * ow], &xp[oi * ow..(oi + 1) * ow]);
                    scatter_2x2_row(go, io, d0, d1, (2 * oi * w) as u32, w as u32);
                }
            });
        // SAFETY: every plane of the first `total` values was initialised
        // by `zero_init` above (the chunks cover them exactly).
        unsafe { dx.set_len(total) };
        return dx;
    }
    let mut dx = vec![T::zero(); g.planes * g.in_plane()];
    dx.par_chunks_mut(ip)
        .zip(gr.par_chunks(op).zip(idx.par_chunks(op)))
        .with_min_len(g.min_planes())
        .for_each(|(dp, (gp, xp))| {
            for (&v, &i) in gp.iter().zip(xp) {
                if let Some(d) = dp.get_mut(i as usize) {
                    *d += v;
                }
            }
        });
    dx
}

fn idx_gather<T: Elem>(g: &PoolGeom, idx: &[u32], v: &[T]) -> Vec<T> {
    let (ip, op) = (g.in_plane().max(1), g.out_plane().max(1));
    let mut y = vec![T::zero(); g.planes * g.out_plane()];
    y.par_chunks_mut(op)
        .zip(v.par_chunks(ip).zip(idx.par_chunks(op)))
        .with_min_len(g.min_planes())
        .for_each(|(yp, (vp, xp))| {
            for (o, &i) in yp.iter_mut().zip(xp) {
                *o = vp.get(i as usize).copied().unwrap_or_else(T::zero);
            }
        });
    y
}

impl candle_core::CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "aimass-max-pool2d"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = PoolGeom::new(dims4(l)?, self.0)?;
        Ok((
            dispatch1!(s, l, "max_pool2d", |x| g.max_fwd(x)),
            g.y_shape(),
        ))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(max_scatter(x, dy, self.0)?))
    }
}

impl candle_core::CustomOp2 for MaxPoolScatterOp {
    fn name(&self) -> &'static str {
        "aimass-max-pool2d-scatter"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = PoolGeom::new(dims4(l1)?, self.0)?;
        check_len(l2, &g.y_shape(), "gradient")?;
        Ok((
            dispatch2!(s1, l1, s2, l2, "max_pool2d backward", |x, gr| g
                .max_scatter(x, gr)),
            g.x_shape(),
        ))
    }
    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        gg: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dg = if needs_grad(g) {
            Some(max_gather(x, gg, self.0)?)
        } else {
            None
        };
        Ok((zero_grad(x)?, dg))
    }
}

impl candle_core::CustomOp2 for MaxPoolGatherOp {
    fn name(&self) -> &'static str {
        "aimass-max-pool2d-gather"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = PoolGeom::new(dims4(l1)?, self.0)?;
        check_len(l2, &g.x_shape(), "gather source")?;
        Ok((
            dispatch2!(s1, l1, s2, l2, "max_pool2d gather", |x, v| g
                .max_gather(x, v)),
            g.y_shape(),
        ))
    }
    fn bwd(
        &self,
        x: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        gg: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dv = if needs_grad(v) {
            Some(max_scatter(x, gg, self.0)?)
        } else {
            None
        };
        Ok((zero_grad(x)?, dv))
    }
}

impl candle_core::CustomOp1 for AvgPoolOp {
    fn name(&self) -> &'static str {
        "aimass-avg-pool2d"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = PoolGeom::new(dims4(l)?, self.0)?;
        Ok((
            dispatch1!(s, l, "avg_pool2d", |x| g.avg_fwd(x)),
            g.y_shape(),
        ))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        Ok(Some(dy.contiguous()?.apply_op1(AvgPoolTOp {
            p: self.0,
            in_hw: (h, w),
        })?))
    }
}

impl candle_core::CustomOp1 for AvgPoolTOp {
    fn name(&self) -> &'static str {
        "aimass-avg-pool2d-transpose"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, _, _) = dims4(l)?;
        let g = PoolGeom::new((n, c, self.in_hw.0, self.in_hw.1), self.p)?;
        check_len(l, &g.y_shape(), "gradient")?;
        Ok((
            dispatch1!(s, l, "avg_pool2d backward", |gr| g.avg_transpose(gr)),
            g.x_shape(),
        ))
    }
    fn bwd(&self, _g: &Tensor, _res: &Tensor, gg: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(gg.contiguous()?.apply_op1(AvgPoolOp(self.p))?))
    }
}

/// `dx[argmax] += g`, differentiable in `g`.
pub(crate) fn max_scatter(x: &Tensor, g: &Tensor, p: PoolParams) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&g.contiguous()?, MaxPoolScatterOp(p))
}

/// `v[argmax]`, differentiable in `v`.
pub(crate) fn max_gather(x: &Tensor, v: &Tensor, p: PoolParams) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&v.contiguous()?, MaxPoolGatherOp(p))
}

/// Max pooling, differentiable to any order.
pub(crate) fn max_pool(x: &Tensor, p: PoolParams) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    if needs_grad(&x) {
        // Keep the argmax for the backward instead of recomputing it.
        let idx = Arc::new(Mutex::new(None));
        x.apply_op1(MaxPoolIdxOp { p, idx })
    } else {
        x.apply_op1(MaxPoolOp(p))
    }
}

/// Average pooling (padding counted), differentiable to any order.
pub(crate) fn avg_pool(x: &Tensor, p: PoolParams) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(AvgPoolOp(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The recomputing scatter/gather (fallback) and the index-keeping path
    /// route gradients identically.
    #[test]
    fn index_path_matches_recomputing_path() {
        let p = PoolParams {
            kernel: (3, 2),
            stride: (2, 1),
            padding: (1, 1),
        };
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 7, 6), &Device::Cpu).unwrap())
            .unwrap();
        let y = max_pool(x.as_tensor(), p).unwrap();
        let y_plain = x.as_tensor().detach().apply_op1(MaxPoolOp(p)).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(flat(&y), flat(&y_plain));
        let g = Tensor::randn(0f64, 1.0, y.dims(), &Device::Cpu).unwrap();
        let dx = y.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = flat(dx.get(&x).unwrap());
        assert_eq!(dx, flat(&max_scatter(x.as_tensor(), &g, p).unwrap()));
        let v = Tensor::randn(0f64, 1.0, x.dims(), &Device::Cpu).unwrap();
        let gathered = max_gather(x.as_tensor(), &v, p).unwrap();
        let g = PoolGeom::new(x.dims4().unwrap(), p).unwrap();
        let (_, idx) = g.max_fwd_idx(&flat(x.as_tensor()));
        let op = IdxGatherOp {
            g,
            idx: Arc::new(idx),
        };
        assert_eq!(flat(&gathered), flat(&v.apply_op1(op).unwrap()));
    }
}
