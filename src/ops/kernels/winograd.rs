//! Winograd F(2x2, 3x3): "same" 3x3 convolutions (stride 1, padding 1,
//! dilation 1, one group) with 2.25x fewer multiplications than im2col.
//!
//! The output is cut into 2x2 tiles; each tile needs the 4x4 input patch
//! around it. With the transforms of Lavin & Gray (2016),
//!
//! ```text
//! V = Bᵀ d B   (4x4 input patch → 16 values)
//! U = G g Gᵀ   (3x3 kernel      → 16 values)
//! Y = Aᵀ [U ⊙ V] A  (16 values  → 2x2 output tile)
//! ```
//!
//! and summing over input channels inside the `⊙`, a convolution becomes 16
//! independent GEMMs, `M[ξ] (o x tiles) = U[ξ] (o x c) · V[ξ] (c x tiles)`,
//! one per position `ξ` of the 4x4 transform domain, against 9 products per
//! output in the direct form over 4 outputs: 16 / (4 · 9 / 4) = 1 / 2.25.
//!
//! The input gradient of such a convolution is again one (of `dy` with the
//! kernel flipped and its channel axes swapped), so both run here. The
//! weight gradient is the adjoint: `dw = Gᵀ Z G` with `Z[ξ] = Σ_tiles (A dy
//! Aᵀ)[ξ] (Bᵀ x B)[ξ]`, per ξ one product over all tiles of the batch (a
//! dot-product GEMM, long inner dimension). The transforms are sums,
//! differences and halvings (no division), so f32 results differ from the
//! direct form by rounding only (the tests hold them to 1e-5 of the output's
//! scale).
//!
//! Layout: the transformed input of a block of images is `(channel, ξ,
//! tiles)`, so the 16 rows a plane produces are one sequential region and
//! each ξ's GEMM operand is `c` rows `16 x tiles` apart; the products are
//! laid out the same way per block of output channels.
//!
//! Turned off (im2col everywhere) by `AIMASS_CPU_CONV=im2col`.

// The transforms index several fixed-size lane arrays with one counter.
#![allow(clippy::needless_range_loop)]

use std::sync::OnceLock;

use rayon::prelude::*;

use super::batch_norm::PlaneSums;
use super::conv::Input;
use super::gemm::{matmul_abt, matmul_lhs, threads, Elem, Lhs, Parallelism, View};
use super::simd::multiversion;
use super::util::{sum_partials, zero_init};
use super::winograd4;

/// Vector width the transforms are written for (fixed-size arrays the
/// compiler turns into SIMD).
pub(crate) const L: usize = 8;

/// `AIMASS_CPU_CONV`: `im2col` turns the Winograd path off, `winograd2`
/// keeps it to F(2x2, 3x3).
fn conv_env() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| std::env::var("AIMASS_CPU_CONV").unwrap_or_default())
}

/// Whether the Winograd path may run (`AIMASS_CPU_CONV=im2col` turns it off).
fn enabled() -> bool {
    conv_env() != "im2col"
}

/// Sizes of one "same" 3x3 convolution: `n` images of `c x h x w` in,
/// `o x h x w` out, computed in `m x m` output tiles (F(m x m, 3x3), `m` 2
/// or 4).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Same3x3 {
    pub n: usize,
    pub c: usize,
    pub o: usize,
    pub h: usize,
    pub w: usize,
    pub m: usize,
}

impl Same3x3 {
    /// The sizes with the tile this crate uses for them: F(4x4, 3x3) (2.25
    /// multiplications per output against F(2x2, 3x3)'s 4) on planes at
    /// least 24 wide, F(2x2, 3x3) on narrower ones, where F(4x4)'s few
    /// tiles per row leave most lanes of the transforms' vectors idle (the
    /// `tile_sizes` test times both; `AIMASS_CPU_CONV=winograd2` or
    /// `winograd4` forces one).
    pub fn new(n: usize, c: usize, o: usize, h: usize, w: usize) -> Self {
        let m = match conv_env() {
            "winograd2" => 2,
            "winograd4" => 4,
            _ if w >= 24 => 4,
            _ => 2,
        };
        Same3x3 { n, c, o, h, w, m }
    }
    /// Positions of the transform domain, `(m + 2)^2`.
    pub fn xi(&self) -> usize {
        (self.m + 2) * (self.m + 2)
    }
    /// Whether the Winograd form pays for these sizes: both channel counts
    /// are the GEMM's inner and row dimensions, too few of either and the
    /// transforms cost more than they save (a 1-channel stem).
    pub fn worthwhile(&self) -> bool {
        enabled() && self.c >= 8 && self.o >= 8 && self.h >= 2 && self.w >= 2
    }
    pub(crate) fn th(&self) -> usize {
        self.h.div_ceil(self.m)
    }
    pub(crate) fn tw(&self) -> usize {
        self.w.div_ceil(self.m)
    }
    /// Values of the split rows of one plane ([`split_rows`]).
    fn split_len(&self) -> usize {
        (self.m * self.th() + 2) * self.m * half_row(self.tw())
    }
    /// Tiles per image.
    fn tiles(&self) -> usize {
        self.th() * self.tw()
    }
    /// Images per work item: enough tiles for full 32-column GEMM strips,
    /// few enough that the transformed input (ξ x c x tiles) stays within
    /// half of a 1 MiB L2 cache.
    fn images_per_chunk(&self) -> usize {
        let t = self.tiles().max(1);
        let bytes = |b: usize| self.xi() * self.c * b * t * std::mem::size_of::<f32>();
        let mut best = (1, 0.0f64);
        for b in 1..=self.n.clamp(1, 16) {
            if b > 1 && bytes(b) > 512 << 10 {
                break;
            }
            let cols = b * t;
            // Share of the 32-lane strips that carries data; small column
            // counts are penalised for the per-strip overhead.
            let fill = cols as f64 / (cols.div_ceil(32) * 32) as f64;
            let score = fill * (cols as f64 / (cols as f64 + 32.0));
            if score > best.1 + 1e-9 {
                best = (b, score);
            }
        }
        // Leave a few work items per thread.
        let per_thread = self.n.div_ceil(2 * threads()).max(1);
        best.0.min(per_thread)
    }
    /// Output channels per block of the GEMMs and output transform: the
    /// block's ξ x rows x cols products stay within a quarter of L2.
    fn out_block(&self, cols: usize) -> usize {
        let rows = (256 << 10) / (self.xi() * std::mem::size_of::<f32>() * cols.max(1));
        (rows / 8 * 8).clamp(8, (self.o.div_ceil(8) * 8).max(8))
    }
}

/// `U = G g Gᵀ` of one 3x3 kernel `g` (row-major) into `(m + 2)^2` values.
fn kernel_transform<T: Elem>(m: usize, g: [T; 9]) -> Vec<T> {
    if m == 4 {
        winograd4::kernel_transform(g)
    } else {
        kernel_transform2(g).to_vec()
    }
}

/// [`kernel_transform`] of F(2x2, 3x3).
fn kernel_transform2<T: Elem>(g: [T; 9]) -> [T; 16] {
    let half = T::from_f64(0.5);
    // G g: 4x3.
    let mut t = [T::zero(); 12];
    for col in 0..3 {
        let (g0, g1, g2) = (g[col], g[3 + col], g[6 + col]);
        t[col] = g0;
        t[3 + col] = (g0 + g1 + g2) * half;
        t[6 + col] = (g0 - g1 + g2) * half;
        t[9 + col] = g2;
    }
    // (G g) Gᵀ: 4x4.
    let mut u = [T::zero(); 16];
    for row in 0..4 {
        let (a, b, c) = (t[row * 3], t[row * 3 + 1], t[row * 3 + 2]);
        u[row * 4] = a;
        u[row * 4 + 1] = (a + b + c) * half;
        u[row * 4 + 2] = (a - b + c) * half;
        u[row * 4 + 3] = c;
    }
    u
}

/// The transformed weights, `U[ξ]` (`rows x cols`: `rows` output channels
/// of the product, `cols` inner), prepared as left operands per block of
/// `block` rows: entry `[blk][ξ]`. `kernel(r, q)` returns the 3x3 kernel
/// linking product row `r` to inner index `q`.
fn transformed_weights<'a, T: Elem>(
    s: &Same3x3,
    rows: usize,
    cols: usize,
    block: usize,
    kernel: impl Fn(usize, usize) -> [T; 9],
    store: &'a mut Vec<T>,
) -> candle_core::Result<Vec<Vec<Lhs<'a, T>>>> {
    let plane = rows * cols;
    let xis = s.xi();
    store.clear();
    store.resize(xis * plane, T::zero());
    for r in 0..rows {
        for q in 0..cols {
            let u = kernel_transform(s.m, kernel(r, q));
            for (xi, v) in u.iter().enumerate() {
                store[xi * plane + r * cols + q] = *v;
            }
        }
    }
    let store: &'a [T] = store;
    (0..rows)
        .step_by(block.max(1))
        .map(|r0| {
            let n = block.min(rows - r0);
            (0..xis)
                .map(|xi| {
                    let at = xi * plane + r0 * cols;
                    Lhs::new(&store[at..at + n * cols], View::rm(n, cols))
                })
                .collect()
        })
        .collect()
}

/// `L` values of `s` from `at` (the caller keeps `at + L <= s.len()`).
#[inline(always)]
pub(crate) fn load<T: Elem>(s: &[T], at: usize) -> [T; L] {
    let mut v = [T::zero(); L];
    v.copy_from_slice(&s[at..at + L]);
    v
}

/// [`load`] without the bounds check.
///
/// # Safety
/// `at + L <= s.len()`.
#[inline(always)]
pub(crate) unsafe fn load_unchecked<T: Elem>(s: &[T], at: usize) -> [T; L] {
    debug_assert!(at + L <= s.len());
    std::ptr::read_unaligned(s.as_ptr().add(at) as *const [T; L])
}

/// Stores `v` at `s[at..at + L]` without the bounds check.
///
/// # Safety
/// `at + L <= s.len()`.
#[inline(always)]
pub(crate) unsafe fn store_unchecked<T: Elem>(s: &mut [T], at: usize, v: &[T; L]) {
    debug_assert!(at + L <= s.len());
    std::ptr::write_unaligned(s.as_mut_ptr().add(at) as *mut [T; L], *v)
}

#[inline(always)]
fn add<T: Elem>(a: [T; L], b: [T; L]) -> [T; L] {
    let mut r = a;
    for i in 0..L {
        r[i] = a[i] + b[i];
    }
    r
}

#[inline(always)]
fn sub<T: Elem>(a: [T; L], b: [T; L]) -> [T; L] {
    let mut r = a;
    for i in 0..L {
        r[i] = a[i] - b[i];
    }
    r
}

/// Length of one stream (of the `m` a split input row has): room for
/// `tw + 1` values and the transform's full-vector loads at `j + 1`.
pub(crate) fn half_row(tw: usize) -> usize {
    (tw + 1).div_ceil(L) * L + L
}

/// Splits the rows of one `h x w` plane into `m` streams by column (`m`
/// the tile size): padded row `r` (input row `r - 1`) holds, at
/// `split[r * m * half..]`, stream `q < m - 1` (`S_q[j]` = column `m j +
/// q`) at `+ q * half` and stream `m - 1` (`S_{m-1}[j]` = column `m j - 1`)
/// at `+ (m - 1) * half`. For F(2x2) these are the even columns and the odd
/// ones shifted by one. Positions outside the plane are never written (the
/// caller zeroes `split` once per geometry).
///
/// With `ab = (a, b)`, the values split are `max(a * x + b, 0)` (a
/// BatchNorm and ReLU folded into the read, see `conv::Input`).
fn split_rows<T: Elem>(s: &Same3x3, plane: &[T], ab: Option<(T, T)>, split: &mut [T]) {
    let (h, w, m) = (s.h, s.w, s.m);
    let half = half_row(s.tw());
    // Every stream of a row ends at `w.div_ceil(m) + 1 <= half` (asserted
    // with the row count).
    assert!(
        plane.len() >= h * w
            && split.len() >= (h + 2) * m * half
            && w.div_ceil(m) < half
            && (m == 2 || m == 4)
    );
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() && avx512() {
        let ab = ab.map(|(a, b)| (a.to_f64() as f32, b.to_f64() as f32));
        // SAFETY: T is f32 (checked above); the CPU has AVX-512F (`avx512`);
        // the bounds of every access are asserted above.
        unsafe {
            split_rows_avx512(
                h,
                w,
                m,
                half,
                ab,
                std::slice::from_raw_parts(plane.as_ptr() as *const f32, plane.len()),
                std::slice::from_raw_parts_mut(split.as_mut_ptr() as *mut f32, split.len()),
            )
        };
        return;
    }
    split_rows_portable(
        s,
        plane,
        ab.is_some(),
        ab.unwrap_or((T::zero(), T::zero())),
        split,
    )
}

/// How many planes ahead [`prefetch`] asks for while splitting one.
const PREFETCH: usize = 2;

/// Asks the CPU to bring the first plane-sized part of `v` into cache (up
/// to 4 KiB; the planes are read in memory order, so this runs
/// [`PREFETCH`] planes ahead of the split).
#[inline(always)]
fn prefetch<T>(v: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = std::mem::size_of_val(v).min(4096);
        let p = v.as_ptr() as *const i8;
        for off in (0..bytes).step_by(64) {
            // SAFETY: `off < size_of_val(v)`: the address lies inside `v`
            // (a prefetch never faults anyway).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
        }
    }
}

/// Whether this CPU has AVX-512F (checked once).
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| std::is_x86_feature_detected!("avx512f"))
}

/// [`split_rows`] for f32 with AVX-512: each row in blocks of 32 columns,
/// two masked loads and one permute per stream per block (and, with `ab`,
/// a multiply, an add and a max, rounded as the portable code rounds
/// them).
///
/// # Safety
/// The CPU has AVX-512F; `m` is 2 or 4; `plane` holds `h * w` values;
/// `split` holds `(h + 2) * m * half` values with `w.div_ceil(m) < half`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn split_rows_avx512(
    h: usize,
    w: usize,
    m: usize,
    half: usize,
    ab: Option<(f32, f32)>,
    plane: &[f32],
    split: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (va, vb) = ab.map_or((0.0, 0.0), |v| v);
    let (va, vb, zero) = (_mm512_set1_ps(va), _mm512_set1_ps(vb), _mm512_setzero_ps());
    // max(x * a + b, 0) with the ReLU of `simd::affine` (`t > 0 ? t : 0`,
    // NaN to 0): `max_ps(t, 0)` returns its second operand when either is
    // NaN.
    let act = |x: __m512| _mm512_max_ps(_mm512_add_ps(_mm512_mul_ps(x, va), vb), zero);
    // Stream q takes columns q, q + m, q + 2m, ... of the 32 loaded.
    let idx: [__m512i; 4] = std::array::from_fn(|q| {
        let v: [i32; 16] = std::array::from_fn(|k| ((q + m * k) % 32) as i32);
        _mm512_loadu_si512(v.as_ptr() as *const __m512i)
    });
    let mask = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
    for r in 0..h {
        let src = plane.as_ptr().add(r * w);
        let row = split.as_mut_ptr().add((r + 1) * m * half);
        let mut c = 0;
        while c < w {
            let left = w - c;
            let mut a = _mm512_maskz_loadu_ps(mask(left), src.add(c));
            let mut b = _mm512_maskz_loadu_ps(mask(left.saturating_sub(16)), src.add(c + 16));
            if ab.is_some() {
                a = act(a);
                b = act(b);
            }
            let block = left.min(32);
            for (q, ix) in idx.iter().enumerate().take(m) {
                let count = if block > q {
                    (block - q).div_ceil(m)
                } else {
                    0
                };
                let shift = usize::from(q == m - 1);
                let dst = row.add(q * half + c / m + shift);
                _mm512_mask_storeu_ps(dst, mask(count), _mm512_permutex2var_ps(a, *ix, b));
            }
            c += 32;
        }
    }
}

multiversion! {
    /// [`split_rows`] in portable code (f64, CPUs without AVX-512); with
    /// `bn`, through `max(ab.0 * x + ab.1, 0)`. The tile size is a constant
    /// of each loop ([`split_row`]), so no index is divided per value.
    fn split_rows_portable<T>(s: &Same3x3, plane: &[T], bn: bool, ab: (T, T), split: &mut [T]) -> () {
        let (h, w, m) = (s.h, s.w, s.m);
        let half = half_row(s.tw());
        for r in 0..h {
            let src = &plane[r * w..(r + 1) * w];
            let row = &mut split[(r + 1) * m * half..(r + 2) * m * half];
            match (m, bn) {
                (2, false) => split_row::<T, 2>(src, row, half, |v| v),
                (2, true) => split_row::<T, 2>(src, row, half, |v| bn_relu(v, ab)),
                (_, false) => split_row::<T, 4>(src, row, half, |v| v),
                (_, true) => split_row::<T, 4>(src, row, half, |v| bn_relu(v, ab)),
            }
        }
    }
}

/// `max(a * v + b, 0)` as `simd::affine` rounds it (NaN to 0).
#[inline(always)]
fn bn_relu<T: Elem>(v: T, (a, b): (T, T)) -> T {
    let t = v * a + b;
    if t > T::zero() {
        t
    } else {
        T::zero()
    }
}

/// One row of [`split_rows`] with the tile size `M` known to the compiler:
/// the row's `M` streams (`half` values each) in `row`, column `M j + q` to
/// stream `q` at `j` (`q < M - 1`) and column `M j - 1` to stream `M - 1`
/// at `j`, through `act`.
#[inline(always)]
fn split_row<T: Elem, const M: usize>(src: &[T], row: &mut [T], half: usize, act: impl Fn(T) -> T) {
    let w = src.len();
    let full = w / M;
    let streams: [&mut [T]; M] = {
        let mut rest = row;
        std::array::from_fn(|_| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(half);
            rest = tail;
            head
        })
    };
    // Whole groups of M columns: stream q < M - 1 at j, the last at j + 1.
    for (j, group) in src.chunks_exact(M).enumerate() {
        for q in 0..M - 1 {
            streams[q][j] = act(group[q]);
        }
        streams[M - 1][j + 1] = act(group[M - 1]);
    }
    // The last w % M columns (never the last stream's: q < M - 1).
    for c in full * M..w {
        streams[c - full * M][full] = act(src[c]);
    }
}

multiversion! {
    /// `V = Bᵀ d B` of every tile of one plane (split by [`split_rows`]):
    /// tile `t = i * tw + j` goes to `dst[ξ * stride + t]`. Each tile row is
    /// written in whole vectors, so up to `L - 1` values past its end are
    /// overwritten (the caller writes those later or leaves them unused).
    fn input_tiles2<T>(s: &Same3x3, split: &[T], dst: &mut [T], stride: usize) -> () {
        let (th, tw) = (s.th(), s.tw());
        let half = half_row(tw);
        // Every index below stays under these bounds (tile rows are written
        // in whole vectors, at most `th * tw + L - 1` past each ξ's start;
        // loads reach `j + 1 + L <= half` within a split row).
        assert!(split.len() >= (2 * th + 2) * 2 * half && dst.len() >= 15 * stride + th * tw + L);
        for i in 0..th {
            let row = |k: usize| {
                let r = 2 * i + k;
                split[r * 2 * half..(r + 1) * 2 * half].split_at(half)
            };
            let rws = [row(0), row(1), row(2), row(3)];
            // SAFETY (loads and stores below): the bounds asserted above.
            let load = |s: &[T], at: usize| unsafe { load_unchecked(s, at) };
            let mut j = 0;
            while j < tw {
                // d B for each of the 4 patch rows: columns (2j-1, 2j,
                // 2j+1, 2j+2) = (odd[j], even[j], odd[j+1], even[j+1]),
                // giving (s0 - s2, s1 + s2, s2 - s1, s1 - s3); then Bᵀ (d B)
                // down each of the 4 columns. One column at a time keeps
                // few vectors live.
                let base = i * tw + j;
                for col in 0..4 {
                    let mut db = [[T::zero(); L]; 4];
                    for (d, (e, o)) in db.iter_mut().zip(rws) {
                        *d = match col {
                            0 => sub(load(o, j), load(o, j + 1)),
                            1 => add(load(e, j), load(o, j + 1)),
                            2 => sub(load(o, j + 1), load(e, j)),
                            _ => sub(load(e, j), load(e, j + 1)),
                        };
                    }
                    let v = [
                        sub(db[0], db[2]),
                        add(db[1], db[2]),
                        sub(db[2], db[1]),
                        sub(db[1], db[3]),
                    ];
                    for (row, vv) in v.iter().enumerate() {
                        let at = (row * 4 + col) * stride + base;
                        // SAFETY: within the bounds asserted above.
                        unsafe { store_unchecked(dst, at, vv) };
                    }
                }
                j += L;
            }
        }
    }
}

multiversion! {
    /// `Y = Aᵀ M A` of every tile of one output plane: reads `M[ξ][t]` at
    /// `m[ξ * stride + t]` and writes the plane at `out[at..at + h * w]`.
    /// Rows are written in whole vectors, spilling up to `2L - 1` values
    /// past a row's end into what comes after it in `out` (written later by
    /// the caller), except where `out` ends. `tile` is scratch.
    fn output_tiles2<T>(
        s: &Same3x3,
        m: &[T],
        stride: usize,
        out: &mut [T],
        at: usize,
        tile: &mut [T],
    ) -> () {
        let (h, w, th, tw) = (s.h, s.w, s.th(), s.tw());
        let tp = tw.div_ceil(L) * L;
        // The loads of M reach `15 * stride + th * tw + L - 1` at most.
        assert!(m.len() >= 15 * stride + th * tw + L && tile.len() >= 4 * tp);
        for i in 0..th {
            let mut j = 0;
            while j < tw {
                let mut mv = [[T::zero(); L]; 16];
                for (xi, v) in mv.iter_mut().enumerate() {
                    // SAFETY: within the bound asserted above.
                    *v = unsafe { load_unchecked(m, xi * stride + i * tw + j) };
                }
                // Aᵀ m: rows (m0 + m1 + m2, m1 - m2 - m3) for each column.
                let (mut r0, mut r1) = ([[T::zero(); L]; 4], [[T::zero(); L]; 4]);
                for c in 0..4 {
                    r0[c] = add(add(mv[c], mv[4 + c]), mv[8 + c]);
                    r1[c] = sub(sub(mv[4 + c], mv[8 + c]), mv[12 + c]);
                }
                // (Aᵀ m) A.
                let y = [
                    add(add(r0[0], r0[1]), r0[2]),
                    sub(sub(r0[1], r0[2]), r0[3]),
                    add(add(r1[0], r1[1]), r1[2]),
                    sub(sub(r1[1], r1[2]), r1[3]),
                ];
                for (q, v) in y.iter().enumerate() {
                    // SAFETY: `j + L <= tp`, `tile` holds `4 * tp` (asserted).
                    unsafe { store_unchecked(tile, q * tp + j, v) };
                }
                j += L;
            }
            // Output rows 2i and 2i + 1: even columns from tile output
            // column 0, odd ones from column 1.
            for dr in 0..2 {
                let oy = 2 * i + dr;
                if oy >= h {
                    break;
                }
                let mut j = 0;
                while j < tw {
                    let (e, o) = (load(tile, 2 * dr * tp + j), load(tile, (2 * dr + 1) * tp + j));
                    let mut pair = [T::zero(); 2 * L];
                    for q in 0..L {
                        pair[2 * q] = e[q];
                        pair[2 * q + 1] = o[q];
                    }
                    let x = at + oy * w + 2 * j;
                    let end = at + (oy + 1) * w;
                    if x + 2 * L <= out.len() {
                        out[x..x + 2 * L].copy_from_slice(&pair);
                    } else {
                        out[x..end].copy_from_slice(&pair[..end - x]);
                    }
                    j += L;
                }
            }
        }
    }
}

/// `V = Bᵀ d B` of every tile of one split plane, for the tile size of `s`
/// (see [`input_tiles2`] and `winograd4::input_tiles`).
fn input_tiles<T: Elem>(s: &Same3x3, split: &[T], dst: &mut [T], stride: usize) {
    if s.m == 4 {
        winograd4::input_tiles(s, split, dst, stride)
    } else {
        input_tiles2(s, split, dst, stride)
    }
}

/// `A dy Aᵀ` of every tile of one split output-gradient plane, for the tile
/// size of `s`.
fn grad_tiles<T: Elem>(s: &Same3x3, split: &[T], dst: &mut [T], stride: usize) {
    if s.m == 4 {
        winograd4::grad_tiles(s, split, dst, stride)
    } else {
        grad_tiles2(s, split, dst, stride)
    }
}

/// `Y = Aᵀ M A` of every tile of one output plane, for the tile size of `s`.
fn output_tiles<T: Elem>(
    s: &Same3x3,
    m: &[T],
    stride: usize,
    out: &mut [T],
    at: usize,
    tile: &mut [T],
) {
    if s.m == 4 {
        winograd4::output_tiles(s, m, stride, out, at, tile)
    } else {
        output_tiles2(s, m, stride, out, at, tile)
    }
}

/// `Gᵀ Z G` of one transformed kernel gradient (`(m + 2)^2` values).
fn kernel_grad_transform<T: Elem>(m: usize, z: &[T]) -> [T; 9] {
    if m == 4 {
        winograd4::kernel_grad_transform(z)
    } else {
        kernel_grad_transform2(std::array::from_fn(|k| z[k]))
    }
}

/// Runs the convolution of `x` (`n x c x h x w`) with the prepared `U`
/// (`o x c` per ξ) into a fresh `n x o x h x w` output; `epilogue(plane,
/// channel)` runs on each finished output plane (bias, ReLU), and with
/// `sums` (`n * o` entries) the plane's [`PlaneSums`] are written right
/// after it.
fn run<T: Elem>(
    s: &Same3x3,
    x: Input<'_, T>,
    u: &[Vec<Lhs<'_, T>>],
    ob: usize,
    epilogue: &(dyn Fn(&mut [T], usize) + Sync),
    sums: Option<&mut [PlaneSums]>,
) -> candle_core::Result<Vec<T>> {
    let (c, o, hw, t) = (s.c, s.o, s.h * s.w, s.tiles());
    let b = s.images_per_chunk();
    let total = s.n * o * hw;
    let mut y: Vec<T> = Vec::with_capacity(total);
    if total == 0 {
        return Ok(y);
    }
    let nchunks = s.n.div_ceil(b);
    let nt = threads();
    let inner = if nchunks < nt && nt > 1 {
        Parallelism::Rayon(nt)
    } else {
        Parallelism::None
    };
    let split_len = s.split_len();
    let tp = s.tw().div_ceil(L) * L;
    let xis = s.xi();
    // Per worker: V, `(c, 16, cols + L)`: the 16 transformed rows of a
    // channel lie together (one sequential region per plane), each row with
    // L values of room for the whole-vector stores of its last tile row; M,
    // `(block rows, 16, cols + L)` likewise for the output transform's
    // loads; the split rows of one plane; one tile row of outputs.
    let want = sums.is_some();
    let work = |bufs: &mut [Vec<T>; 4], (ci, ychunk, sc): (usize, &mut [T], &mut [PlaneSums])| {
        let [v, m, split, tile] = bufs;
        let imgs = ychunk.len() / (o * hw);
        let cols = imgs * t;
        let cp = cols + L;
        v.resize(c * xis * cp, T::zero());
        m.resize(ob.min(o) * xis * cp, T::zero());
        // Zeroed once per worker: every plane of this geometry writes the
        // same positions, the padding stays zero.
        if split.is_empty() {
            split.resize(split_len, T::zero());
        }
        tile.resize(s.m * s.m * tp, T::zero());
        let x0 = ci * b * c * hw;
        // Images in order (per channel), tile rows in order: every spill of
        // a tile row lands on values written after it (or on the row's
        // slack). Planes in memory order: one sequential read of the chunk.
        for li in 0..imgs {
            for ch in 0..c {
                let at = x0 + (li * c + ch) * hw;
                prefetch(&x.x[(at + PREFETCH * hw).min(x.x.len())..]);
                split_rows(s, &x.x[at..at + hw], x.coef(ch), split);
                input_tiles(s, split, &mut v[ch * xis * cp + li * t..], cp);
            }
        }
        // Per block of output channels: the ξ products, then the output
        // transform of the block's planes, in memory order within each
        // image (row spills land on later planes; the planes of the next
        // block are written by its own pass).
        for (bi, ub) in u.iter().enumerate() {
            let (o0, on) = (bi * ob, ob.min(o - bi * ob));
            for (xi, lhs) in ub.iter().enumerate() {
                let rows = |r: usize| View {
                    rows: r,
                    cols,
                    rs: xis * cp,
                    cs: 1,
                };
                matmul_lhs(
                    &mut m[xi * cp..],
                    rows(on),
                    false,
                    lhs,
                    &v[xi * cp..],
                    rows(c),
                    inner,
                )?;
            }
            for li in 0..imgs {
                for k in 0..on {
                    let at = (li * o + o0 + k) * hw;
                    let end = (li * o + o0 + on) * hw;
                    output_tiles(
                        s,
                        &m[k * xis * cp + li * t..],
                        cp,
                        &mut ychunk[..end],
                        at,
                        tile,
                    );
                    epilogue(&mut ychunk[at..at + hw], o0 + k);
                    if want {
                        sc[li * o + o0 + k] = PlaneSums::of(&ychunk[at..at + hw]);
                    }
                }
            }
        }
        Ok::<(), candle_core::Error>(())
    };
    // Each chunk of the output is zeroed by the thread that fills it (in
    // cache, no serial memset of the whole output first).
    let chunk = b * o * hw;
    let spare = &mut y.spare_capacity_mut()[..total];
    // Without sums, one dummy entry per chunk that nothing writes.
    let mut dummy = Vec::new();
    let (sums, per_chunk) = match sums {
        Some(v) if v.len() == s.n * o => (v, b * o),
        Some(_) => candle_core::bail!("conv2d (winograd): plane sums for another shape"),
        None => {
            dummy.resize(nchunks, PlaneSums::default());
            (&mut dummy[..], 1)
        }
    };
    if matches!(inner, Parallelism::None) && nt > 1 {
        spare
            .par_chunks_mut(chunk)
            .zip(sums.par_chunks_mut(per_chunk))
            .enumerate()
            .try_for_each_init(
                || std::array::from_fn(|_| Vec::new()),
                |bufs, (ci, (c, sc))| work(bufs, (ci, zero_init(c), sc)),
            )?;
    } else {
        let mut bufs = std::array::from_fn(|_| Vec::new());
        for (ci, (c, sc)) in spare
            .chunks_mut(chunk)
            .zip(sums.chunks_mut(per_chunk))
            .enumerate()
        {
            work(&mut bufs, (ci, zero_init(c), sc))?;
        }
    }
    // SAFETY: every chunk of the first `total` values was initialised by
    // `zero_init` (the loops returned early on any error).
    unsafe { y.set_len(total) };
    Ok(y)
}

/// The 3x3 kernel `w[oi, ci]` (weights `o x c x 3 x 3`).
fn kernel_at<T: Elem>(w: &[T], c: usize, oi: usize, ci: usize) -> [T; 9] {
    let at = (oi * c + ci) * 9;
    std::array::from_fn(|k| w[at + k])
}

/// `y = conv(x, w)` (+ bias, then ReLU) for a "same" 3x3 convolution.
pub(crate) fn forward<T: Elem>(
    s: &Same3x3,
    x: Input<'_, T>,
    w: &[T],
    epilogue: &(dyn Fn(&mut [T], usize) + Sync),
    sums: Option<&mut [PlaneSums]>,
) -> candle_core::Result<Vec<T>> {
    if x.x.len() != s.n * s.c * s.h * s.w || w.len() != s.o * s.c * 9 {
        candle_core::bail!("conv2d (winograd): input or weight size does not match {s:?}");
    }
    let ob = s.out_block(s.images_per_chunk() * s.tiles());
    let mut store = Vec::new();
    let u = transformed_weights(
        s,
        s.o,
        s.c,
        ob,
        |oi, ci| kernel_at(w, s.c, oi, ci),
        &mut store,
    )?;
    run(s, x, &u, ob, epilogue, sums)
}

/// `dx` of a "same" 3x3 convolution from `dy` (`n x o x h x w`): the
/// convolution of `dy` with the kernel flipped and its channel axes swapped.
pub(crate) fn input_grad<T: Elem>(s: &Same3x3, dy: &[T], w: &[T]) -> candle_core::Result<Vec<T>> {
    if dy.len() != s.n * s.o * s.h * s.w || w.len() != s.o * s.c * 9 {
        candle_core::bail!("conv2d input grad (winograd): dy or weight size does not match {s:?}");
    }
    let t = Same3x3 {
        c: s.o,
        o: s.c,
        ..*s
    };
    let ob = t.out_block(t.images_per_chunk() * t.tiles());
    let mut store = Vec::new();
    let u = transformed_weights(
        &t,
        s.c,
        s.o,
        ob,
        |ci, oi| {
            let k = kernel_at(w, s.c, oi, ci);
            std::array::from_fn(|i| k[8 - i])
        },
        &mut store,
    )?;
    run(&t, Input::plain(dy), &u, ob, &|_, _| {}, None)
}

multiversion! {
    /// `A dy Aᵀ` of every 2x2 tile of one output-gradient plane (split by
    /// [`split_rows`]): tile `t` goes to `dst[ξ * stride + t]`, written in
    /// whole vectors per tile row as [`input_tiles`] does.
    fn grad_tiles2<T>(s: &Same3x3, split: &[T], dst: &mut [T], stride: usize) -> () {
        let (th, tw) = (s.th(), s.tw());
        let half = half_row(tw);
        // As in `input_tiles`: the stores stay under this bound.
        assert!(dst.len() >= 15 * stride + th * tw + L);
        for i in 0..th {
            // Plane rows 2i and 2i + 1 are split rows 2i + 1 and 2i + 2;
            // column 2j is even[j], column 2j + 1 is odd[j + 1].
            let row = |r: usize| split[r * 2 * half..(r + 1) * 2 * half].split_at(half);
            let ((e0, o0), (e1, o1)) = (row(2 * i + 1), row(2 * i + 2));
            let mut j = 0;
            while j < tw {
                let (a, b) = (load(e0, j), load(o0, j + 1));
                let (c, d) = (load(e1, j), load(o1, j + 1));
                let zero = [T::zero(); L];
                // A dy: rows [a b], [a+c b+d], [a-c b-d], [-c -d].
                let rows = [
                    (a, b),
                    (add(a, c), add(b, d)),
                    (sub(a, c), sub(b, d)),
                    (sub(zero, c), sub(zero, d)),
                ];
                let base = i * tw + j;
                for (r, (p, q)) in rows.iter().enumerate() {
                    // (A dy) Aᵀ: [p q] -> [p, p+q, p-q, -q].
                    let v = [*p, add(*p, *q), sub(*p, *q), sub(zero, *q)];
                    for (col, vv) in v.iter().enumerate() {
                        let at = (r * 4 + col) * stride + base;
                        // SAFETY: within the bound asserted above.
                        unsafe { store_unchecked(dst, at, vv) };
                    }
                }
                j += L;
            }
        }
    }
}

/// `Gᵀ Z G` of one 4x4 `Z` (row-major) into the 3x3 kernel gradient.
fn kernel_grad_transform2<T: Elem>(z: [T; 16]) -> [T; 9] {
    let half = T::from_f64(0.5);
    // Gᵀ Z: 3x4 (rows z0 + (z1 + z2)/2, (z1 - z2)/2, (z1 + z2)/2 + z3).
    let mut t = [T::zero(); 12];
    for col in 0..4 {
        let (z0, z1, z2, z3) = (z[col], z[4 + col], z[8 + col], z[12 + col]);
        t[col] = z0 + (z1 + z2) * half;
        t[4 + col] = (z1 - z2) * half;
        t[8 + col] = (z1 + z2) * half + z3;
    }
    // (Gᵀ Z) G: 3x3.
    let mut g = [T::zero(); 9];
    for row in 0..3 {
        let (a, b, c, d) = (t[row * 4], t[row * 4 + 1], t[row * 4 + 2], t[row * 4 + 3]);
        g[row * 3] = a + (b + c) * half;
        g[row * 3 + 1] = (b - c) * half;
        g[row * 3 + 2] = (b + c) * half + d;
    }
    g
}

/// `dw` (`o x c x 3 x 3`) of a "same" 3x3 convolution from its input `x`
/// and output gradient `dy`: per ξ, `Z[ξ] (o x c) = Σ_tiles (A dy Aᵀ)[ξ] ·
/// (Bᵀ x B)[ξ]ᵀ`, a GEMM over the tiles of the batch, then `dw = Gᵀ Z G`
/// (the adjoint of the forward's `Aᵀ [U ⊙ V] A` in `U = G g Gᵀ`).
pub(crate) fn weight_grad<T: Elem>(
    s: &Same3x3,
    x: Input<'_, T>,
    dy: &[T],
) -> candle_core::Result<Vec<T>> {
    let (c, o, hw, t) = (s.c, s.o, s.h * s.w, s.tiles());
    if x.x.len() != s.n * c * hw || dy.len() != s.n * o * hw {
        candle_core::bail!("conv2d weight grad (winograd): x or dy size does not match {s:?}");
    }
    // About 512 tiles per chunk: the products run along the tiles (a long
    // inner dimension amortises the dot products' final reductions), and
    // one ξ's two operands (2 x 128 channels x 512 tiles at most) stay in
    // L2 while its 4 x 4 blocks re-read them. At least one chunk per thread.
    let b = (512 / t.max(1)).clamp(1, s.n.div_ceil(threads()).max(1));
    let nchunks = s.n.div_ceil(b);
    // Parallel over parts of the chunks, each summing its own Z (a batch
    // smaller than the thread count runs as one part).
    let parts = threads().min(nchunks).max(1);
    let per = nchunks.div_ceil(parts);
    let split_len = s.split_len();
    let xis = s.xi();
    // Per part of the chunks: Z of every ξ, (16, o, c).
    let partial: Vec<candle_core::Result<Vec<T>>> = (0..parts)
        .into_par_iter()
        .map(|pi| {
            let mut z = vec![T::zero(); xis * o * c];
            let (mut v, mut g) = (Vec::new(), Vec::new());
            // Zeroed once: the planes of x and of dy share this geometry,
            // so they write the same positions and the padding stays zero.
            let mut split = vec![T::zero(); split_len];
            for ci in (pi * per)..((pi + 1) * per).min(nchunks) {
                let n0 = ci * b;
                let imgs = b.min(s.n - n0);
                let cols = imgs * t;
                let cp = cols + L;
                v.resize(c * xis * cp, T::zero());
                g.resize(o * xis * cp, T::zero());
                // Planes in memory order (images in order per channel, as
                // the spills of the tile rows need).
                for li in 0..imgs {
                    for ch in 0..c {
                        let at = ((n0 + li) * c + ch) * hw;
                        prefetch(&x.x[(at + PREFETCH * hw).min(x.x.len())..]);
                        split_rows(s, &x.x[at..at + hw], x.coef(ch), &mut split);
                        input_tiles(s, &split, &mut v[ch * xis * cp + li * t..], cp);
                    }
                }
                for li in 0..imgs {
                    for oc in 0..o {
                        let at = ((n0 + li) * o + oc) * hw;
                        prefetch(&dy[(at + PREFETCH * hw).min(dy.len())..]);
                        split_rows(s, &dy[at..at + hw], None, &mut split);
                        grad_tiles(s, &split, &mut g[oc * xis * cp + li * t..], cp);
                    }
                }
                // Z[ξ] += G[ξ] · V[ξ]ᵀ: both are read along the tiles, rows
                // 16 * cp apart. With one part only (a batch smaller than
                // the thread count), the ξ products run in parallel.
                let product = |xi: usize, zx: &mut [T]| {
                    let (gx, vx) = (&g[xi * cp..], &v[xi * cp..]);
                    matmul_abt(zx, c, gx, xis * cp, vx, xis * cp, (o, c, cols))
                };
                if parts == 1 && threads() > 1 {
                    z.par_chunks_mut((o * c).max(1))
                        .enumerate()
                        .try_for_each(|(xi, zx)| product(xi, zx))?;
                } else {
                    for (xi, zx) in z.chunks_mut((o * c).max(1)).enumerate() {
                        product(xi, zx)?;
                    }
                }
            }
            Ok(z)
        })
        .collect();
    let z = sum_partials(partial, xis * o * c)?;
    let mut dw = vec![T::zero(); o * c * 9];
    for (pair, out) in dw.chunks_exact_mut(9).enumerate() {
        let zz: Vec<T> = (0..xis).map(|xi| z[xi * o * c + pair]).collect();
        out.copy_from_slice(&kernel_grad_transform(s.m, &zz));
    }
    Ok(dw)
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::util::test_values as values;

    /// `v` rounded to f32.
    fn f32s(v: &[f64]) -> Vec<f32> {
        v.iter().map(|v| *v as f32).collect()
    }

    /// The direct "same" 3x3 convolution by its definition.
    fn direct(s: &Same3x3, x: &[f64], w: &[f64]) -> Vec<f64> {
        let (h, wd) = (s.h as isize, s.w as isize);
        let mut y = vec![0.0; s.n * s.o * s.h * s.w];
        for n in 0..s.n {
            for o in 0..s.o {
                for oy in 0..h {
                    for ox in 0..wd {
                        let mut acc = 0.0;
                        for c in 0..s.c {
                            for ky in 0..3isize {
                                for kx in 0..3isize {
                                    let (iy, ix) = (oy + ky - 1, ox + kx - 1);
                                    if iy < 0 || ix < 0 || iy >= h || ix >= wd {
                                        continue;
                                    }
                                    let xv =
                                        x[((n * s.c + c) * s.h + iy as usize) * s.w + ix as usize];
                                    let wv = w[(o * s.c + c) * 9 + (ky * 3 + kx) as usize];
                                    acc += xv * wv;
                                }
                            }
                        }
                        y[((n * s.o + o) * s.h + oy as usize) * s.w + ox as usize] = acc;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn forward_matches_the_direct_convolution() {
        for (n, c, o, h, w) in [
            (1, 1, 1, 1, 1),
            (2, 3, 5, 7, 7),
            (3, 8, 4, 6, 5),
            (1, 2, 3, 2, 9),
            (5, 4, 6, 14, 13),
            (2, 9, 17, 3, 4),
            // Several blocks of output channels (16 + 8).
            (2, 8, 24, 30, 29),
        ] {
            for m in [2, 4] {
                let s = Same3x3 { n, c, o, h, w, m };
                if (n, o, m) == (2, 24, 2) {
                    assert!(s.out_block(s.images_per_chunk() * s.tiles()) < o);
                }
                let x = values(n * c * h * w, 1);
                let wt = values(o * c * 9, 2);
                let got = forward(&s, Input::plain(&x), &wt, &|_, _| {}, None).unwrap();
                let want = direct(&s, &x, &wt);
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-12, "{s:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn epilogue_sees_every_output_plane_once() {
        let s = Same3x3 {
            n: 3,
            c: 2,
            o: 4,
            h: 5,
            w: 5,
            m: 4,
        };
        let x = values(3 * 2 * 25, 6);
        let wt = values(4 * 2 * 9, 7);
        let y = forward(
            &s,
            Input::plain(&x),
            &wt,
            &|p, ch| p.iter_mut().for_each(|v| *v = ch as f64),
            None,
        )
        .unwrap();
        for (i, plane) in y.chunks(25).enumerate() {
            assert!(plane.iter().all(|v| *v == (i % 4) as f64));
        }
    }

    /// Forward, input gradient and weight gradient of `s` against the
    /// direct form by definition (f64, every input and weight), and the f32
    /// kernels against f64.
    fn check_all_passes(s: &Same3x3, seed: u64) {
        let (n, c, o, h, w) = (s.n, s.c, s.o, s.h, s.w);
        let x = values(n * c * h * w, seed);
        let wt = values(o * c * 9, seed + 1);
        let dy = values(n * o * h * w, seed + 2);
        let y = forward(s, Input::plain(&x), &wt, &|_, _| {}, None).unwrap();
        let want_y = direct(s, &x, &wt);
        for (a, b) in y.iter().zip(&want_y) {
            assert!((a - b).abs() < 1e-12, "forward {s:?}: {a} vs {b}");
        }
        // Both gradients are linear: one unit input (weight) at a time.
        let dot = |v: &[f64]| v.iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>();
        let unit = |len: usize, k: usize| {
            let mut e = vec![0.0; len];
            e[k] = 1.0;
            e
        };
        let want_dx: Vec<f64> = (0..x.len())
            .map(|k| dot(&direct(s, &unit(x.len(), k), &wt)))
            .collect();
        let want_dw: Vec<f64> = (0..wt.len())
            .map(|k| dot(&direct(s, &x, &unit(wt.len(), k))))
            .collect();
        let dx = input_grad(s, &dy, &wt).unwrap();
        let dw = weight_grad(s, Input::plain(&x), &dy).unwrap();
        for (what, got, want) in [("dx", &dx, &want_dx), ("dw", &dw, &want_dw)] {
            for (a, b) in got.iter().zip(want.iter()) {
                assert!(
                    (a - b).abs() < 1e-10 * b.abs().max(1.0),
                    "{what} {s:?}: {a} vs {b}"
                );
            }
        }
        let (xf, wf, dyf) = (f32s(&x), f32s(&wt), f32s(&dy));
        for (got, want) in [
            (
                forward(s, Input::plain(&xf), &wf, &|_, _| {}, None).unwrap(),
                &want_y,
            ),
            (input_grad(s, &dyf, &wf).unwrap(), &want_dx),
            (weight_grad(s, Input::plain(&xf), &dyf).unwrap(), &want_dw),
        ] {
            let scale = want.iter().fold(1e-3f64, |a, b| a.max(b.abs()));
            for (a, b) in got.iter().zip(want.iter()) {
                assert!(
                    (*a as f64 - b).abs() < 1e-4 * scale,
                    "f32 {s:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn every_pass_matches_the_definition_at_any_thread_count() {
        // Tiny planes with several images (output spills across planes),
        // 1-wide planes, more tile columns than one vector (second block,
        // spill into the next tile row), ragged last chunks; the chunking
        // depends on the thread count, so several pools.
        let shapes = [
            (5, 2, 3, 2, 2),
            (7, 3, 2, 1, 18),
            (4, 2, 3, 18, 1),
            (3, 3, 4, 5, 19),
            (2, 2, 3, 17, 17),
            (5, 3, 2, 3, 2),
            (9, 2, 2, 2, 3),
            (3, 9, 20, 2, 2),
            (1, 2, 3, 4, 33),
            (2, 3, 5, 7, 7),
            (1, 4, 2, 5, 8),
            (3, 6, 9, 4, 3),
            (2, 8, 9, 9, 10),
            (1, 2, 2, 1, 1),
        ];
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                for (i, &(n, c, o, h, w)) in shapes.iter().enumerate() {
                    for m in [2, 4] {
                        check_all_passes(&Same3x3 { n, c, o, h, w, m }, 40 + i as u64);
                    }
                }
            });
        }
    }

    #[test]
    fn several_output_blocks_with_an_epilogue() {
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                for (n, c, o, h, w) in [(5, 3, 40, 40, 30), (3, 2, 17, 60, 60)] {
                    let s = Same3x3::new(n, c, o, h, w);
                    assert!(s.out_block(s.images_per_chunk() * s.tiles()) < o);
                    let x = values(n * c * h * w, 3);
                    let wt = values(o * c * 9, 4);
                    let add_channel =
                        |p: &mut [f64], ch: usize| p.iter_mut().for_each(|v| *v += ch as f64);
                    let got = forward(&s, Input::plain(&x), &wt, &add_channel, None).unwrap();
                    let want = direct(&s, &x, &wt);
                    for (idx, (a, b)) in got.iter().zip(&want).enumerate() {
                        let ch = (idx / (h * w)) % o;
                        assert!((a - b - ch as f64).abs() < 1e-12, "{s:?}: {a} vs {b}");
                    }
                    let got =
                        forward(&s, Input::plain(&f32s(&x)), &f32s(&wt), &|_, _| {}, None).unwrap();
                    let scale = want.iter().fold(0.0f64, |a, b| a.max(b.abs()));
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (*a as f64 - b).abs() < 1e-5 * scale,
                            "f32 {s:?}: {a} vs {b}"
                        );
                    }
                }
            });
        }
    }

    /// Times each pass of the bench's conv layer and of the small ResNet's
    /// 3x3 convolutions, Winograd against the im2col path of `conv.rs`
    /// (`cargo test --release --lib winograd_speed -- --ignored
    /// --nocapture`; `WINOGRAD_SHAPE=i` runs only shape `i`).
    #[test]
    #[ignore]
    fn winograd_speed() {
        use super::super::conv::{self, ConvParams, Geom};
        // As a training program does (large buffers stay mapped).
        crate::device::tune_cpu_allocator();
        let shapes = [
            (32, 64, 14),
            (32, 32, 28),
            (64, 64, 14),
            (128, 128, 7),
            (16, 16, 28),
            (32, 32, 14),
            (64, 64, 7),
        ];
        let only: Option<usize> = std::env::var("WINOGRAD_SHAPE")
            .ok()
            .and_then(|v| v.parse().ok());
        let time = |f: &dyn Fn() -> usize| {
            let mut best = f64::MAX;
            for _ in 0..10 {
                let t0 = std::time::Instant::now();
                assert!(f() > 0);
                best = best.min(t0.elapsed().as_secs_f64());
            }
            best
        };
        for (i, &(c, o, hw)) in shapes.iter().enumerate() {
            if only.is_some_and(|k| k != i) {
                continue;
            }
            let n = 256;
            let s = Same3x3::new(n, c, o, hw, hw);
            let x = f32s(&values(n * c * hw * hw, 1));
            let wt = f32s(&values(o * c * 9, 2));
            let dy = f32s(&values(n * o * hw * hw, 3));
            let flop = 2.0 * (n * o * hw * hw * c * 9) as f64;
            let p = ConvParams {
                stride: (1, 1),
                padding: (1, 1),
                dilation: (1, 1),
                groups: 1,
            };
            // A 3x3 convolution with dilation 2 and padding 2 has the same
            // sizes and cost on the im2col path, and never runs Winograd.
            let g = Geom::new(
                (n, c, hw, hw),
                (o, c, 3, 3),
                ConvParams {
                    padding: (2, 2),
                    dilation: (2, 2),
                    ..p
                },
            )
            .unwrap();
            for (what, wino, col) in [
                (
                    "forward",
                    time(&|| {
                        forward(&s, Input::plain(&x), &wt, &|_, _| {}, None)
                            .unwrap()
                            .len()
                    }),
                    time(&|| conv::forward(&g, &x, &wt, None, false).unwrap().len()),
                ),
                (
                    "input grad",
                    time(&|| input_grad(&s, &dy, &wt).unwrap().len()),
                    time(&|| conv::input_grad(&g, &dy, &wt).unwrap().len()),
                ),
                (
                    "weight grad",
                    time(&|| weight_grad(&s, Input::plain(&x), &dy).unwrap().len()),
                    time(&|| conv::weight_grad(&g, &x, &dy).unwrap().len()),
                ),
            ] {
                println!(
                    "{c}->{o} {hw}x{hw} {what}: winograd {:.2} ms ({:.0} direct-GFLOP/s), \
                     im2col {:.2} ms ({:.0} GFLOP/s)",
                    wino * 1e3,
                    flop / wino / 1e9,
                    col * 1e3,
                    flop / col / 1e9
                );
            }
        }
    }

    /// Shapes of the row-split tests: both tile sizes, planes whose width
    /// is and is not a multiple of the SIMD blocks.
    const SPLIT_SHAPES: [(usize, usize); 8] = [
        (28, 2),
        (14, 2),
        (7, 2),
        (33, 2),
        (28, 4),
        (14, 4),
        (7, 4),
        (37, 4),
    ];

    /// One `hw x hw` plane in `m x m` tiles.
    fn one_plane(hw: usize, m: usize) -> Same3x3 {
        Same3x3 {
            n: 1,
            c: 1,
            o: 1,
            h: hw,
            w: hw,
            m,
        }
    }

    /// Every row split (AVX-512 or portable, whichever this CPU runs, and
    /// the portable one) against the definition: column `m j + q` of
    /// input row `r` at stream `q`, position `j` (`j + 1` for the last
    /// stream) of padded row `r + 1`, through the folded BatchNorm + ReLU
    /// (NaN to 0), nothing else written.
    #[test]
    fn split_rows_match_the_definition() {
        for (hw, m) in SPLIT_SHAPES {
            let s = one_plane(hw, m);
            let mut x = f32s(&values(hw * hw, 1));
            x[3] = f32::NAN;
            x[5] = -0.0;
            let half = half_row(s.tw());
            let len = (m * s.th() + 2) * m * half;
            for ab in [None, Some((0.7f32, -0.1f32))] {
                let mut want = vec![f32::MAX; len];
                for r in 0..hw {
                    for c in 0..hw {
                        let (j, q) = (c / m, c % m);
                        let v = x[r * hw + c];
                        let v = match ab {
                            Some((a, b)) if (v * a + b) > 0.0 => v * a + b,
                            Some(_) => 0.0,
                            None => v,
                        };
                        want[(r + 1) * m * half + q * half + j + usize::from(q == m - 1)] = v;
                    }
                }
                let (bn, coef) = (ab.is_some(), ab.unwrap_or((0.0, 0.0)));
                let (mut a, mut b) = (vec![f32::MAX; len], vec![f32::MAX; len]);
                split_rows(&s, &x, ab, &mut a);
                split_rows_portable(&s, &x, bn, coef, &mut b);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&want), "split_rows {hw}x{hw} m {m} {ab:?}");
                assert_eq!(bits(&b), bits(&want), "portable {hw}x{hw} m {m} {ab:?}");
            }
        }
    }

    /// The row split this CPU runs against the portable one on
    /// resnet_tiny's plane sizes (`cargo test --release --lib
    /// split_rows_speed -- --ignored --nocapture`).
    #[test]
    #[ignore]
    #[cfg(target_arch = "x86_64")]
    fn split_rows_speed() {
        for (hw, m) in SPLIT_SHAPES {
            let s = one_plane(hw, m);
            let planes = 4096 * 49 / (hw * hw);
            let x = f32s(&values(planes * hw * hw, 1));
            let len = (m * s.th() + 2) * m * half_row(s.tw());
            let (mut a, mut b) = (vec![0f32; len], vec![0f32; len]);
            let (mut fast, mut port) = (f64::MAX, f64::MAX);
            for _ in 0..20 {
                let t = std::time::Instant::now();
                for p in x.chunks_exact(hw * hw) {
                    split_rows(&s, p, None, &mut a);
                }
                fast = fast.min(t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                for p in x.chunks_exact(hw * hw) {
                    split_rows_portable(&s, p, false, (0.0, 0.0), &mut b);
                }
                port = port.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{hw}x{hw} F({m}x{m}): {planes} planes, split_rows {:.3} ms, portable {:.3} ms",
                fast * 1e3,
                port * 1e3
            );
        }
    }

    /// F(2x2, 3x3) against F(4x4, 3x3) on every pass of resnet_tiny's and
    /// the bench's 3x3 convolutions, interleaved, best of 15 in process CPU
    /// time (`RAYON_NUM_THREADS=1 cargo test --release --lib tile_sizes --
    /// --ignored --nocapture`).
    #[test]
    #[ignore]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn tile_sizes() {
        crate::device::tune_cpu_allocator();
        let cpu_ms = || {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `ts` is a valid timespec to write into.
            unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
            ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
        };
        // `TILE_ONLY=shape,m,pass` (indices) runs one pass only (profiling).
        let only: Option<Vec<usize>> = std::env::var("TILE_ONLY")
            .ok()
            .map(|v| v.split(',').filter_map(|t| t.parse().ok()).collect());
        let shapes = [
            (16, 16, 28),
            (32, 32, 14),
            (64, 64, 7),
            (32, 64, 14),
            (128, 128, 7),
        ];
        for (si, &(c, o, hw)) in shapes.iter().enumerate() {
            if only.as_ref().is_some_and(|v| v[0] != si) {
                continue;
            }
            let n = 256;
            let x = f32s(&values(n * c * hw * hw, 1));
            let wt = f32s(&values(o * c * 9, 2));
            let dy = f32s(&values(n * o * hw * hw, 3));
            let mut best = [[f64::MAX; 3]; 2];
            for _ in 0..15 {
                for (k, m) in [2, 4].into_iter().enumerate() {
                    let s = Same3x3 {
                        n,
                        c,
                        o,
                        h: hw,
                        w: hw,
                        m,
                    };
                    let passes: [&dyn Fn() -> usize; 3] = [
                        &|| {
                            forward(&s, Input::plain(&x), &wt, &|_, _| {}, None)
                                .unwrap()
                                .len()
                        },
                        &|| input_grad(&s, &dy, &wt).unwrap().len(),
                        &|| weight_grad(&s, Input::plain(&x), &dy).unwrap().len(),
                    ];
                    for (p, f) in passes.iter().enumerate() {
                        if only.as_ref().is_some_and(|v| v[1] != m || v[2] != p) {
                            continue;
                        }
                        let t = cpu_ms();
                        assert!(f() > 0);
                        best[k][p] = best[k][p].min(cpu_ms() - t);
                    }
                }
            }
            println!(
                "{c}->{o} {hw}x{hw}: F(2x2) fwd {:.2} igrad {:.2} wgrad {:.2} ms | F(4x4) fwd \
                 {:.2} igrad {:.2} wgrad {:.2} ms",
                best[0][0], best[0][1], best[0][2], best[1][0], best[1][1], best[1][2]
            );
        }
    }

    #[test]
    fn f32_stays_close_to_the_direct_form() {
        let s = Same3x3 {
            n: 4,
            c: 32,
            o: 16,
            h: 7,
            w: 7,
            m: 4,
        };
        let x = values(4 * 32 * 49, 8);
        let wt = values(16 * 32 * 9, 9);
        let want = direct(&s, &x, &wt);
        let (xf, wf) = (f32s(&x), f32s(&wt));
        let got = forward(&s, Input::plain(&xf), &wf, &|_, _| {}, None).unwrap();
        let scale = want.iter().fold(0.0f64, |a, b| a.max(b.abs()));
        for (a, b) in got.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-5 * scale, "{a} vs {b}");
        }
        // The gradients in f32 (the AVX-512 kernels where the CPU has them)
        // against the f64 ones.
        let dy = values(4 * 16 * 49, 10);
        let dyf = f32s(&dy);
        for (got, want) in [
            (
                input_grad(&s, &dyf, &wf).unwrap(),
                input_grad(&s, &dy, &wt).unwrap(),
            ),
            (
                weight_grad(&s, Input::plain(&xf), &dyf).unwrap(),
                weight_grad(&s, Input::plain(&x), &dy).unwrap(),
            ),
        ] {
            let scale = want.iter().fold(0.0f64, |a, b| a.max(b.abs()));
            for (a, b) in got.iter().zip(&want) {
                assert!((*a as f64 - b).abs() < 1e-5 * scale, "{a} vs {b}");
            }
        }
    }
}
