//! 2-D convolution on the CPU: im2col into a GEMM (our AVX-512 kernel,
//! `sgemm.rs`, where the CPU has it, else the `gemm` crate), parallel over
//! the batch with rayon.
//!
//! Three custom ops close under differentiation, so gradients of any order
//! flow through them:
//!
//! * `Conv2dOp(x, w) -> y`, backward: `dx = InputGrad(dy, w)`,
//!   `dw = WeightGrad(x, dy)`;
//! * `Conv2dInputGradOp(dy, w) -> dx` (the transposed convolution), backward:
//!   `d(dy) = Conv(g, w)`, `dw = WeightGrad(g, dy)`;
//! * `Conv2dWeightGradOp(x, dy) -> dw`, backward: `dx = InputGrad(dy, g)`,
//!   `d(dy) = Conv(x, g)`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::batch_norm::PlaneSums;
use super::gemm::{matmul_lhs, threads, Elem, Lhs, Parallelism, View};
use super::simd;
use super::util::{contiguous_slice, needs_grad, sum_partials, zero_grad, zero_init};
use super::winograd::{self, Same3x3};

/// Stride, padding, dilation and groups of a convolution (each `(h, w)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvParams {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

/// A convolution's input as the kernels read it: the stored values `x`,
/// or, with `bn_relu = (a, b)`, `max(a[c] * x + b[c], 0)` per input channel
/// `c` (a BatchNorm and ReLU folded into the read, rounded as
/// `simd::affine` rounds them), so that the activation is never written
/// out. Zero padding stays zero (it pads the activation).
#[derive(Clone, Copy)]
pub(crate) struct Input<'a, T> {
    pub x: &'a [T],
    pub bn_relu: Option<(&'a [T], &'a [T])>,
}

impl<'a, T: Elem> Input<'a, T> {
    /// The stored values.
    pub fn plain(x: &'a [T]) -> Self {
        Input { x, bn_relu: None }
    }
    /// The coefficients of input channel `c`.
    pub fn coef(&self, c: usize) -> Option<(T, T)> {
        self.bn_relu.map(|(a, b)| (a[c], b[c]))
    }
}

/// `max(v * a + b, 0)` over `v`, in place (with `ab`; nothing without).
fn apply_bn_relu<T: Elem>(v: &mut [T], ab: Option<(T, T)>) {
    if let Some((a, b)) = ab {
        simd::affine_relu_in_place(v, a, b);
    }
}

/// Every size of one convolution.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub p: ConvParams,
}

fn out_size(i: usize, k: usize, s: usize, pad: usize, d: usize) -> Option<usize> {
    let span = d.checked_mul(k.checked_sub(1)?)?.checked_add(1)?;
    let padded = i.checked_add(pad.checked_mul(2)?)?;
    if s == 0 || padded < span {
        return None;
    }
    Some((padded - span) / s + 1)
}

impl Geom {
    /// Checks the sizes; `x = (n, c, h, w)`, `w = (o, c / groups, kh, kw)`.
    pub fn new(
        x: (usize, usize, usize, usize),
        wt: (usize, usize, usize, usize),
        p: ConvParams,
    ) -> candle_core::Result<Self> {
        let (n, c, h, w) = x;
        let (o, cg, kh, kw) = wt;
        if p.groups == 0 || c != cg * p.groups || o % p.groups != 0 || kh == 0 || kw == 0 {
            candle_core::bail!(
                "conv2d: input {x:?} and weight {wt:?} do not fit groups {} (need c_in = \
                 weight.dim(1) * groups and c_out divisible by groups)",
                p.groups
            );
        }
        if p.dilation.0 == 0 || p.dilation.1 == 0 {
            candle_core::bail!("conv2d: dilation must be >= 1, got {:?}", p.dilation);
        }
        let oh = out_size(h, kh, p.stride.0, p.padding.0, p.dilation.0);
        let ow = out_size(w, kw, p.stride.1, p.padding.1, p.dilation.1);
        match (oh, ow) {
            (Some(oh), Some(ow)) => Ok(Geom {
                n,
                c,
                h,
                w,
                o,
                kh,
                kw,
                oh,
                ow,
                p,
            }),
            _ => candle_core::bail!(
                "conv2d: kernel {kh}x{kw} (dilation {:?}, stride {:?}) does not fit input \
                 {h}x{w} with padding {:?}",
                p.dilation,
                p.stride,
                p.padding
            ),
        }
    }

    fn cg(&self) -> usize {
        self.c / self.p.groups
    }
    fn og(&self) -> usize {
        self.o / self.p.groups
    }
    /// Rows of the im2col matrix of one group.
    fn kk(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    /// Output pixels per channel.
    fn np(&self) -> usize {
        self.oh * self.ow
    }
    fn in_img(&self) -> usize {
        self.c * self.h * self.w
    }
    fn out_img(&self) -> usize {
        self.o * self.np()
    }
    /// A 1x1 convolution with stride 1 and no padding: the input is its own
    /// im2col matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.p.stride == (1, 1) && self.p.padding == (0, 0)
    }
    /// These sizes as a "same" 3x3 convolution (stride 1, padding 1, no
    /// dilation, one group) when they are one and the Winograd form pays.
    fn winograd(&self) -> Option<Same3x3> {
        let same = (self.kh, self.kw) == (3, 3)
            && self.p.stride == (1, 1)
            && self.p.padding == (1, 1)
            && self.p.dilation == (1, 1)
            && self.p.groups == 1;
        let s = Same3x3::new(self.n, self.c, self.o, self.h, self.w);
        (same && s.worthwhile()).then_some(s)
    }
    fn x_shape(&self) -> Shape {
        Shape::from((self.n, self.c, self.h, self.w))
    }
    fn w_shape(&self) -> Shape {
        Shape::from((self.o, self.cg(), self.kh, self.kw))
    }
    fn y_shape(&self) -> Shape {
        Shape::from((self.n, self.o, self.oh, self.ow))
    }

    /// For output row/column index `o` and kernel tap `k` along one axis,
    /// the valid range of outputs `[lo, hi)` whose input index lies inside.
    fn valid_range(
        o_len: usize,
        i_len: usize,
        k: usize,
        s: usize,
        pad: usize,
        d: usize,
    ) -> (usize, usize) {
        // input index = o * s + k * d - pad, need 0 <= idx < i_len
        let off = k * d;
        let lo = if off >= pad {
            0
        } else {
            (pad - off).div_ceil(s)
        };
        // o * s + off - pad <= i_len - 1  <=>  o <= (i_len - 1 + pad - off) / s
        let hi = if i_len + pad > off {
            ((i_len - 1 + pad - off) / s + 1).min(o_len)
        } else {
            0
        };
        (lo.min(hi), hi)
    }

    /// Writes the im2col matrix (`kk x np`, row-major) of one image group
    /// (`cg x h x w`) into `col`; `ab(ci)` are the BatchNorm + ReLU
    /// coefficients of the group's input channel `ci`, if any.
    fn im2col<T: Elem>(&self, x: &[T], ab: &dyn Fn(usize) -> Option<(T, T)>, col: &mut [T]) {
        let np = self.np();
        let taps = self.kh * self.kw;
        for (row, dst) in col.chunks_exact_mut(np).take(self.kk()).enumerate() {
            self.im2col_row(x, ab(row / taps), row, dst);
        }
    }

    /// Writes row `row` (one input channel and kernel tap) of the im2col
    /// matrix of one image group into `dst` (`np` values), the channel's
    /// values through `max(a * x + b, 0)` when `ab = (a, b)`.
    fn im2col_row<T: Elem>(&self, x: &[T], ab: Option<(T, T)>, row: usize, dst: &mut [T]) {
        let (sh, sw) = self.p.stride;
        let (ph, pw) = self.p.padding;
        let (dh, dw) = self.p.dilation;
        let kj = row % self.kw;
        let ki = (row / self.kw) % self.kh;
        let ci = row / (self.kw * self.kh);
        let plane = &x[ci * self.h * self.w..(ci + 1) * self.h * self.w];
        let (olo, ohi) = Self::valid_range(self.oh, self.h, ki, sh, ph, dh);
        let (wlo, whi) = Self::valid_range(self.ow, self.w, kj, sw, pw, dw);
        if (sh, sw) == (1, 1) && self.ow == self.w && olo < ohi && wlo < whi {
            // "Same"-size stride-1 convolution: output and input rows have
            // one length, so the valid window is the plane shifted by one
            // offset. One copy of the whole span, then zero what lies
            // outside the window (the ends of each row, rows out of range),
            // instead of a short copy per output row.
            let w = self.w;
            let shift = (ki * dh * w + kj * dw) as isize - (ph * w + pw) as isize;
            let (first, last) = (olo * w + wlo, (ohi - 1) * w + whi);
            let from = (first as isize + shift) as usize;
            let src = &plane[from..from + (last - first)];
            match ab {
                Some((a, b)) => simd::affine(&mut dst[first..last], src, a, b, true),
                None => dst[first..last].copy_from_slice(src),
            }
            dst[..first].fill(T::zero());
            dst[last..].fill(T::zero());
            for oi in olo..ohi {
                let row = &mut dst[oi * w..(oi + 1) * w];
                row[..wlo].fill(T::zero());
                row[whi..].fill(T::zero());
            }
            return;
        }
        for oi in 0..self.oh {
            let drow = &mut dst[oi * self.ow..(oi + 1) * self.ow];
            if oi < olo || oi >= ohi || wlo >= whi {
                drow.fill(T::zero());
                continue;
            }
            let ii = oi * sh + ki * dh - ph;
            let src = &plane[ii * self.w..(ii + 1) * self.w];
            drow[..wlo].fill(T::zero());
            drow[whi..].fill(T::zero());
            let base = wlo * sw + kj * dw - pw;
            if sw == 1 {
                drow[wlo..whi].copy_from_slice(&src[base..base + (whi - wlo)]);
            } else {
                for (t, d) in drow[wlo..whi].iter_mut().enumerate() {
                    *d = src[base + t * sw];
                }
            }
            apply_bn_relu(&mut drow[wlo..whi], ab);
        }
    }

    /// Adds the im2col-shaped `col` back into one image group (`cg x h x w`).
    fn col2im<T: Elem>(&self, col: &[T], x: &mut [T]) {
        let (sh, sw) = self.p.stride;
        let (ph, pw) = self.p.padding;
        let (dh, dw) = self.p.dilation;
        let np = self.np();
        for ci in 0..self.cg() {
            let plane = &mut x[ci * self.h * self.w..(ci + 1) * self.h * self.w];
            for ki in 0..self.kh {
                let (olo, ohi) = Self::valid_range(self.oh, self.h, ki, sh, ph, dh);
                for kj in 0..self.kw {
                    let (wlo, whi) = Self::valid_range(self.ow, self.w, kj, sw, pw, dw);
                    if wlo >= whi {
                        continue;
                    }
                    let row = (ci * self.kh + ki) * self.kw + kj;
                    let src = &col[row * np..(row + 1) * np];
                    for oi in olo..ohi {
                        let ii = oi * sh + ki * dh - ph;
                        let dst = &mut plane[ii * self.w..(ii + 1) * self.w];
                        let s = &src[oi * self.ow + wlo..oi * self.ow + whi];
                        let base = wlo * sw + kj * dw - pw;
                        if sw == 1 {
                            simd::add_assign(&mut dst[base..base + s.len()], s);
                        } else {
                            for (t, v) in s.iter().enumerate() {
                                dst[base + t * sw] += *v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Allocates `n * chunk` values and runs `f(scratch, image_index,
/// image_chunk, parallelism)` for every image: in parallel over images
/// (single-threaded GEMMs) when there are at least as many images as
/// threads, otherwise image by image with threaded GEMMs. Each chunk is
/// zeroed by the thread that fills it, right before `f` (no serial
/// `memset` of the whole output, and the chunk is in cache for `f`).
///
/// With `sums`, each image's chunk is cut into `sums.len() / n` planes
/// whose [`PlaneSums`] are written (image-major) right after `f`, while the
/// chunk is still in cache.
fn per_image<T, F>(
    n: usize,
    chunk: usize,
    scratch: usize,
    sums: Option<&mut [PlaneSums]>,
    f: F,
) -> candle_core::Result<Vec<T>>
where
    T: Elem,
    F: Fn(&mut Vec<T>, usize, &mut [T], Parallelism) -> candle_core::Result<()> + Sync,
{
    let total = n * chunk;
    let mut out: Vec<T> = Vec::with_capacity(total);
    if total == 0 {
        return Ok(out);
    }
    let per = sums.as_ref().map_or(0, |s| s.len() / n);
    if sums
        .as_ref()
        .is_some_and(|s| per == 0 || s.len() != per * n || !chunk.is_multiple_of(per))
    {
        candle_core::bail!("conv2d: plane sums do not match {n} images of {chunk} values");
    }
    // Without sums, one dummy entry per image that nothing reads.
    let mut dummy = Vec::new();
    let (sums, per, want) = match sums {
        Some(s) => (s, per, true),
        None => {
            dummy.resize(n, PlaneSums::default());
            (&mut dummy[..], 1, false)
        }
    };
    let plane = chunk / per;
    let spare = &mut out.spare_capacity_mut()[..total];
    let run = |buf: &mut Vec<T>,
               i: usize,
               c: &mut [std::mem::MaybeUninit<T>],
               sc: &mut [PlaneSums],
               par: Parallelism| {
        let img = zero_init(c);
        f(buf, i, img, par)?;
        if want {
            for (p, s) in img.chunks_exact(plane).zip(sc.iter_mut()) {
                *s = PlaneSums::of(p);
            }
        }
        Ok::<(), candle_core::Error>(())
    };
    let nt = threads();
    if nt > 1 && n >= nt {
        // A few jobs per thread: enough to balance a noisy machine, few
        // enough that each scratch buffer serves many images.
        spare
            .par_chunks_mut(chunk)
            .zip(sums.par_chunks_mut(per))
            .with_min_len(n.div_ceil(4 * nt).max(1))
            .enumerate()
            .try_for_each_init(
                || vec![T::zero(); scratch],
                |buf, (i, (c, sc))| run(buf, i, c, sc, Parallelism::None),
            )?;
    } else {
        let par = if nt > 1 {
            Parallelism::Rayon(nt)
        } else {
            Parallelism::None
        };
        let mut buf = vec![T::zero(); scratch];
        for (i, (c, sc)) in spare
            .chunks_mut(chunk)
            .zip(sums.chunks_mut(per))
            .enumerate()
        {
            run(&mut buf, i, c, sc, par)?;
        }
    }
    // SAFETY: every chunk was initialised (`zero_init` in `run`) and the
    // loops above returned early on any error; `total <= capacity`.
    unsafe { out.set_len(total) };
    Ok(out)
}

/// `y = conv(x, w)`.
pub(crate) fn forward<T: Elem>(
    g: &Geom,
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    relu: bool,
) -> candle_core::Result<Vec<T>> {
    forward_in(g, Input::plain(x), w, bias, relu, None)
}

/// `y = conv(x, w)` (+ bias, then ReLU) from an [`Input`]; with `sums`
/// (`n * o` entries), the [`PlaneSums`] of every output plane too,
/// computed while the plane is in cache (BatchNorm statistics without a
/// pass of their own).
pub(crate) fn forward_in<T: Elem>(
    g: &Geom,
    x: Input<'_, T>,
    w: &[T],
    bias: Option<&[T]>,
    relu: bool,
    sums: Option<&mut [PlaneSums]>,
) -> candle_core::Result<Vec<T>> {
    if let Some(b) = bias {
        if b.len() != g.o {
            candle_core::bail!(
                "conv2d: bias of {} values for {} output channels",
                b.len(),
                g.o
            );
        }
    }
    if x.x.len() != g.n * g.in_img()
        || x.bn_relu
            .is_some_and(|(a, b)| a.len() != g.c || b.len() != g.c)
    {
        candle_core::bail!(
            "conv2d: input of {} values for {:?}",
            x.x.len(),
            g.x_shape()
        );
    }
    if let Some(s) = g.winograd() {
        let epilogue = |plane: &mut [T], ch: usize| {
            if let Some(b) = bias {
                simd::add_scalar(plane, b[ch]);
            }
            if relu {
                simd::relu_in_place(plane);
            }
        };
        return winograd::forward(&s, x, w, &epilogue, sums);
    }
    let (og, kk, np) = (g.og(), g.kk(), g.np());
    let (cg, cghw) = (g.cg(), g.cg() * g.h * g.w);
    // The pointwise path reads the input in place, unless a BatchNorm is
    // folded into it: then the transformed image goes through the scratch.
    let in_place = g.pointwise() && x.bn_relu.is_none();
    let scratch = if in_place { 0 } else { kk * np };
    // The weights of each group, prepared once for every image.
    let lhs = (0..g.p.groups)
        .map(|gi| Lhs::new(&w[gi * og * kk..(gi + 1) * og * kk], View::rm(og, kk)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let y = per_image(g.n, g.out_img(), scratch, sums, |col, ni, yimg, par| {
        for (gi, lhs) in lhs.iter().enumerate() {
            let xs = &x.x[ni * g.in_img() + gi * cghw..ni * g.in_img() + (gi + 1) * cghw];
            let rhs: &[T] = if in_place {
                xs
            } else if g.pointwise() {
                for (ci, (dst, src)) in col
                    .chunks_exact_mut(np)
                    .zip(xs.chunks_exact(np))
                    .enumerate()
                {
                    dst.copy_from_slice(src);
                    apply_bn_relu(dst, x.coef(gi * cg + ci));
                }
                col
            } else {
                g.im2col(xs, &|ci| x.coef(gi * cg + ci), col);
                col
            };
            matmul_lhs(
                &mut yimg[gi * og * np..(gi + 1) * og * np],
                View::rm(og, np),
                false,
                lhs,
                rhs,
                View::rm(kk, np),
                par,
            )?;
        }
        if let Some(b) = bias {
            for (row, bv) in yimg.chunks_mut(np).zip(b) {
                simd::add_scalar(row, *bv);
            }
        }
        if relu {
            simd::relu_in_place(yimg);
        }
        Ok(())
    })?;
    Ok(y)
}

/// Per-channel sums of an `(n, c, h, w)` tensor: the bias gradient.
pub(crate) fn channel_sum<T: Elem>(x: &[T], n: usize, c: usize, hw: usize) -> Vec<T> {
    let img = c * hw;
    if img == 0 || n == 0 {
        return vec![T::zero(); c];
    }
    let per = n.div_ceil(4 * threads()).max(1);
    x.par_chunks(img * per)
        .map(|block| {
            let mut acc = vec![T::zero(); c];
            for im in block.chunks(img) {
                for (a, plane) in acc.iter_mut().zip(im.chunks(hw)) {
                    *a += sum_slice(plane);
                }
            }
            acc
        })
        .reduce(
            || vec![T::zero(); c],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += *y);
                a
            },
        )
}

/// A sum with 8 independent accumulators (vectorises, and is more accurate
/// than one running sum).
pub(crate) fn sum_slice<T: Elem>(v: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let mut it = v.chunks_exact(8);
    for ch in &mut it {
        for (a, x) in acc.iter_mut().zip(ch) {
            *a += *x;
        }
    }
    let mut s = T::zero();
    for x in it.remainder() {
        s += *x;
    }
    acc.iter().fold(s, |a, b| a + *b)
}

/// `dx = conv^T(dy, w)`: the gradient of `sum(conv(x, w) * dy)` in `x`.
pub(crate) fn input_grad<T: Elem>(g: &Geom, dy: &[T], w: &[T]) -> candle_core::Result<Vec<T>> {
    if let Some(s) = g.winograd() {
        return winograd::input_grad(&s, dy, w);
    }
    let (og, kk, np) = (g.og(), g.kk(), g.np());
    let cghw = g.cg() * g.h * g.w;
    let scratch = if g.pointwise() { 0 } else { kk * np };
    // The transposed weights of each group, prepared once for every image.
    let lhs = (0..g.p.groups)
        .map(|gi| Lhs::new(&w[gi * og * kk..(gi + 1) * og * kk], View::rm(og, kk).t()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let dx = per_image(g.n, g.in_img(), scratch, None, |col, ni, dximg, par| {
        for (gi, wt) in lhs.iter().enumerate() {
            let dys = &dy[ni * g.out_img() + gi * og * np..ni * g.out_img() + (gi + 1) * og * np];
            let dst = &mut dximg[gi * cghw..(gi + 1) * cghw];
            if g.pointwise() {
                matmul_lhs(dst, View::rm(kk, np), false, wt, dys, View::rm(og, np), par)?;
            } else {
                matmul_lhs(col, View::rm(kk, np), false, wt, dys, View::rm(og, np), par)?;
                g.col2im(col, dst);
            }
        }
        Ok(())
    })?;
    Ok(dx)
}

/// `dw`: the gradient of `sum(conv(x, w) * dy)` in `w`.
///
/// Computed transposed, `dw^T (kk x og) += col (kk x np) · dy^T`, so that
/// the large operand, the im2col matrix, is produced row by row straight
/// into the GEMM's packed layout (never written out whole), and only the
/// small `dy` is transposed.
pub(crate) fn weight_grad<T: Elem>(g: &Geom, x: &[T], dy: &[T]) -> candle_core::Result<Vec<T>> {
    weight_grad_in(g, Input::plain(x), dy)
}

/// [`weight_grad`] from an [`Input`].
pub(crate) fn weight_grad_in<T: Elem>(
    g: &Geom,
    x: Input<'_, T>,
    dy: &[T],
) -> candle_core::Result<Vec<T>> {
    if x.x.len() != g.n * g.in_img()
        || x.bn_relu
            .is_some_and(|(a, b)| a.len() != g.c || b.len() != g.c)
    {
        candle_core::bail!(
            "conv2d weight grad: input of {} values for {:?}",
            x.x.len(),
            g.x_shape()
        );
    }
    if let Some(s) = g.winograd() {
        return winograd::weight_grad(&s, x, dy);
    }
    let cg = g.cg();
    let (og, kk, np) = (g.og(), g.kk(), g.np());
    let cghw = g.cg() * g.h * g.w;
    let wlen = g.o * kk;
    let nt = threads();
    let chunks = if nt > 1 && g.n >= nt { nt } else { 1 };
    let par = if chunks == 1 && nt > 1 {
        Parallelism::Rayon(nt)
    } else {
        Parallelism::None
    };
    let per = g.n.div_ceil(chunks.max(1)).max(1);
    // Per chunk of images: dw^T of every group, (groups, kk, og).
    let partial: Vec<candle_core::Result<Vec<T>>> = (0..chunks)
        .into_par_iter()
        .map(|ci| {
            let mut dwt = vec![T::zero(); wlen];
            for ni in (ci * per)..((ci + 1) * per).min(g.n) {
                for gi in 0..g.p.groups {
                    let xs = &x.x[ni * g.in_img() + gi * cghw..ni * g.in_img() + (gi + 1) * cghw];
                    let taps = g.kh * g.kw;
                    let lhs = if g.pointwise() && x.bn_relu.is_none() {
                        Lhs::new(xs, View::rm(kk, np))?
                    } else {
                        Lhs::from_rows(kk, np, |r, dst| {
                            g.im2col_row(xs, x.coef(gi * cg + r / taps), r, dst)
                        })
                    };
                    let dys =
                        &dy[ni * g.out_img() + gi * og * np..ni * g.out_img() + (gi + 1) * og * np];
                    matmul_lhs(
                        &mut dwt[gi * og * kk..(gi + 1) * og * kk],
                        View::rm(kk, og),
                        true,
                        &lhs,
                        dys,
                        View::rm(og, np).t(),
                        par,
                    )?;
                }
            }
            Ok(dwt)
        })
        .collect();
    let dwt = sum_partials(partial, wlen)?;
    // (groups, kk, og) -> (groups, og, kk) = (o, cg, kh, kw).
    let mut dw = vec![T::zero(); wlen];
    for (src, dst) in dwt.chunks_exact(og * kk).zip(dw.chunks_exact_mut(og * kk)) {
        for r in 0..kk {
            for o in 0..og {
                dst[o * kk + r] = src[r * og + o];
            }
        }
    }
    Ok(dw)
}

fn dims4(l: &Layout, what: &str) -> candle_core::Result<(usize, usize, usize, usize)> {
    l.shape().dims4().map_err(|_| {
        candle_core::Error::Msg(format!("conv2d: {what} must be 4-D, got {:?}", l.shape()))
    })
}

/// Dispatches a kernel on the dtype of two CPU storages.
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

/// The convolution `y = conv(x, w)`, optionally followed by ReLU.
pub(crate) struct Conv2dOp {
    pub p: ConvParams,
    pub relu: bool,
}

/// The convolution with bias `y = conv(x, w) + b`, optionally followed by
/// ReLU.
pub(crate) struct Conv2dBiasOp {
    pub p: ConvParams,
    pub relu: bool,
}

/// `dy * (y > 0)`: the ReLU backward, linear in `dy`.
pub(crate) struct ReluMaskOp;

/// ReLU forward.
pub(crate) struct ReluOp;

/// Per-channel sums `(n, c, h, w) -> (c,)` (the bias gradient).
pub(crate) struct ChannelSumOp;

/// The input gradient `dx = conv^T(dy, w)` for an input of size `in_hw`.
pub(crate) struct Conv2dInputGradOp {
    pub p: ConvParams,
    pub in_hw: (usize, usize),
}

/// The weight gradient `dw` for a kernel of size `k_hw`.
pub(crate) struct Conv2dWeightGradOp {
    pub p: ConvParams,
    pub k_hw: (usize, usize),
}

impl candle_core::CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "aimass-conv2d"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geom::new(dims4(l1, "input")?, dims4(l2, "weight")?, self.p)?;
        let out = dispatch2!(s1, l1, s2, l2, "conv2d", |x, w| forward(
            &g, x, w, None, self.relu
        )?);
        Ok((out, g.y_shape()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = if self.relu {
            relu_mask(dy, res)?
        } else {
            dy.clone()
        };
        conv_grads(x, w, &dy, self.p)
    }
}

/// Input and weight gradients of a convolution (those autograd wants).
fn conv_grads(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    p: ConvParams,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let dx = if needs_grad(x) {
        Some(conv2d_input_grad(dy, w, p, (h, wd))?)
    } else {
        None
    };
    let dw = if needs_grad(w) {
        Some(conv2d_weight_grad(x, dy, p, (kh, kw))?)
    } else {
        None
    };
    Ok((dx, dw))
}

impl candle_core::CustomOp3 for Conv2dBiasOp {
    fn name(&self) -> &'static str {
        "aimass-conv2d-bias"
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
        let g = Geom::new(dims4(l1, "input")?, dims4(l2, "weight")?, self.p)?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(forward(
                    &g,
                    contiguous_slice::<f32>(s1, l1)?,
                    contiguous_slice::<f32>(s2, l2)?,
                    Some(contiguous_slice::<f32>(s3, l3)?),
                    self.relu,
                )?)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(forward(
                    &g,
                    contiguous_slice::<f64>(s1, l1)?,
                    contiguous_slice::<f64>(s2, l2)?,
                    Some(contiguous_slice::<f64>(s3, l3)?),
                    self.relu,
                )?)
            }
            _ => candle_core::bail!(
                "conv2d: input, weight and bias must all be f32 or all f64, got {:?}, {:?}, {:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        };
        Ok((out, g.y_shape()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = if self.relu {
            relu_mask(dy, res)?
        } else {
            dy.clone()
        };
        let (dx, dw) = conv_grads(x, w, &dy, self.p)?;
        let db = if needs_grad(b) {
            Some(dy.contiguous()?.apply_op1(ChannelSumOp)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

impl candle_core::CustomOp2 for ReluMaskOp {
    fn name(&self) -> &'static str {
        "aimass-relu-mask"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("relu mask: shapes {:?} and {:?}", l1.shape(), l2.shape());
        }
        let out = dispatch2!(s1, l1, s2, l2, "relu backward", |g, y| relu_mask_kernel(
            g, y
        ));
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        g: &Tensor,
        y: &Tensor,
        _res: &Tensor,
        gg: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dg = if needs_grad(g) {
            Some(relu_mask(gg, y)?)
        } else {
            None
        };
        Ok((dg, zero_grad(y)?))
    }
}

impl candle_core::CustomOp1 for ReluOp {
    fn name(&self) -> &'static str {
        "aimass-relu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(relu_kernel(contiguous_slice::<f32>(s, l)?)),
            CpuStorage::F64(_) => CpuStorage::F64(relu_kernel(contiguous_slice::<f64>(s, l)?)),
            _ => candle_core::bail!("relu: only f32 and f64, got {:?}", s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(relu_mask(dy, res)?))
    }
}

const ELEM_CHUNK: usize = 1 << 14;

fn relu_kernel<T: Elem>(x: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(ELEM_CHUNK)
        .zip(x.par_chunks(ELEM_CHUNK))
        .for_each(|(o, i)| simd::relu(o, i));
    y
}

fn relu_mask_kernel<T: Elem>(g: &[T], y: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); g.len()];
    out.par_chunks_mut(ELEM_CHUNK)
        .zip(g.par_chunks(ELEM_CHUNK).zip(y.par_chunks(ELEM_CHUNK)))
        .for_each(|(o, (g, y))| simd::relu_mask(o, g, y));
    out
}

/// `g * (y > 0)`, differentiable in `g`.
pub(crate) fn relu_mask(g: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    g.contiguous()?.apply_op2(&y.contiguous()?, ReluMaskOp)
}

/// ReLU as a custom op whose backward is one fused pass.
pub(crate) fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(ReluOp)
}

impl candle_core::CustomOp1 for ChannelSumOp {
    fn name(&self) -> &'static str {
        "aimass-channel-sum"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = dims4(l, "channel-sum input")?;
        let out = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(channel_sum(contiguous_slice::<f32>(s, l)?, n, c, h * w))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(channel_sum(contiguous_slice::<f64>(s, l)?, n, c, h * w))
            }
            _ => candle_core::bail!("channel sum: only f32 and f64, got {:?}", s.dtype()),
        };
        Ok((out, Shape::from(c)))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, gg: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let c = gg.dim(0)?;
        Ok(Some(gg.reshape((1, c, 1, 1))?.broadcast_as(x.shape())?))
    }
}

impl candle_core::CustomOp2 for Conv2dInputGradOp {
    fn name(&self) -> &'static str {
        "aimass-conv2d-input-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, o, oh, ow) = dims4(l1, "output gradient")?;
        let wd = dims4(l2, "weight")?;
        let g = Geom::new(
            (n, wd.1 * self.p.groups, self.in_hw.0, self.in_hw.1),
            wd,
            self.p,
        )?;
        if (o, oh, ow) != (g.o, g.oh, g.ow) {
            candle_core::bail!(
                "conv2d input grad: output gradient {:?} does not match {:?}",
                l1.shape(),
                g.y_shape()
            );
        }
        let out = dispatch2!(s1, l1, s2, l2, "conv2d input grad", |dy, w| input_grad(
            &g, dy, w
        )?);
        Ok((out, g.x_shape()))
    }
    fn bwd(
        &self,
        dy: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        gg: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, kh, kw) = w.dims4()?;
        let d_dy = if needs_grad(dy) {
            Some(conv2d_raw(gg, w, self.p)?)
        } else {
            None
        };
        let d_w = if needs_grad(w) {
            Some(conv2d_weight_grad(gg, dy, self.p, (kh, kw))?)
        } else {
            None
        };
        Ok((d_dy, d_w))
    }
}

impl candle_core::CustomOp2 for Conv2dWeightGradOp {
    fn name(&self) -> &'static str {
        "aimass-conv2d-weight-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let xd = dims4(l1, "input")?;
        let (n, o, oh, ow) = dims4(l2, "output gradient")?;
        if self.p.groups == 0 {
            candle_core::bail!("conv2d weight grad: groups must be >= 1");
        }
        let g = Geom::new(
            xd,
            (o, xd.1 / self.p.groups, self.k_hw.0, self.k_hw.1),
            self.p,
        )?;
        if (n, oh, ow) != (g.n, g.oh, g.ow) {
            candle_core::bail!(
                "conv2d weight grad: output gradient {:?} does not match {:?}",
                l2.shape(),
                g.y_shape()
            );
        }
        let out = dispatch2!(s1, l1, s2, l2, "conv2d weight grad", |x, dy| weight_grad(
            &g, x, dy
        )?);
        Ok((out, g.w_shape()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        dy: &Tensor,
        _res: &Tensor,
        gg: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, w) = x.dims4()?;
        let d_x = if needs_grad(x) {
            Some(conv2d_input_grad(dy, gg, self.p, (h, w))?)
        } else {
            None
        };
        let d_dy = if needs_grad(dy) {
            Some(conv2d_raw(x, gg, self.p)?)
        } else {
            None
        };
        Ok((d_x, d_dy))
    }
}

/// `conv(x, w)` without bias, as a differentiable custom op.
pub(crate) fn conv2d_raw(x: &Tensor, w: &Tensor, p: ConvParams) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv2dOp { p, relu: false })
}

/// `conv(x, w) (+ b) (then ReLU)`, as one differentiable custom op.
pub(crate) fn conv2d_fused(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: ConvParams,
    relu: bool,
) -> candle_core::Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, Conv2dBiasOp { p, relu }),
        None => x.apply_op2(&w, Conv2dOp { p, relu }),
    }
}

/// The input gradient of a convolution, as a differentiable custom op.
pub(crate) fn conv2d_input_grad(
    dy: &Tensor,
    w: &Tensor,
    p: ConvParams,
    in_hw: (usize, usize),
) -> candle_core::Result<Tensor> {
    dy.contiguous()?
        .apply_op2(&w.contiguous()?, Conv2dInputGradOp { p, in_hw })
}

/// The weight gradient of a convolution, as a differentiable custom op.
pub(crate) fn conv2d_weight_grad(
    x: &Tensor,
    dy: &Tensor,
    p: ConvParams,
    k_hw: (usize, usize),
) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&dy.contiguous()?, Conv2dWeightGradOp { p, k_hw })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_range_matches_brute_force() {
        for o_len in 1..6 {
            for i_len in 1..6 {
                for k in 0..3 {
                    for s in 1..3 {
                        for pad in 0..3 {
                            for d in 1..3 {
                                let (lo, hi) = Geom::valid_range(o_len, i_len, k, s, pad, d);
                                for o in 0..o_len {
                                    let idx = (o * s + k * d) as isize - pad as isize;
                                    let inside = idx >= 0 && idx < i_len as isize;
                                    assert_eq!(inside, o >= lo && o < hi, "o_len {o_len} i_len {i_len} k {k} s {s} pad {pad} d {d} o {o}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
