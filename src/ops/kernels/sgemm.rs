//! Single-precision GEMM for x86-64 CPUs with AVX-512F:
//! `C (+)= A · B` with `C` row-major (unit column stride).
//!
//! The `gemm` crate reaches AVX-512 only on a nightly compiler; on stable it
//! runs its AVX2 kernels, which leaves half of the vector registers (and, on
//! CPUs with full-width AVX-512 units, half of the arithmetic) unused. This
//! is a BLIS-style kernel of our own:
//!
//! * `A` is packed once into panels of [`MR`] rows, stored k-major, and the
//!   packing is reusable: a convolution packs its weights once per call and
//!   every image of the batch multiplies with the same panels;
//! * `B` is read in place when its rows are contiguous (the im2col matrix, an
//!   output gradient), otherwise packed into [`NR`]-column strips;
//! * the micro-kernel keeps an `MR x NR` tile of `C` in 16 zmm registers and
//!   handles the ragged right edge with masked loads and stores, so no
//!   padding copies are needed.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::gemm::View;

/// Rows of `A` (and `C`) per micro-tile.
pub(crate) const MR: usize = 8;
/// Columns of `B` (and `C`) per micro-tile: two 16-lane vectors.
pub(crate) const NR: usize = 32;
/// Depth of one pass over `k`: a `KC x NR` strip of `B` plus an `MR x KC`
/// panel of `A` stay within a 32 KiB L1 cache.
const KC: usize = 192;

/// From this many rows of `A` on, `B` is packed even when it could be read
/// in place (see [`gemm`]).
const PACK_B_MIN_ROWS: usize = 512;

/// Whether this CPU runs the AVX-512 kernel. Checked once; setting
/// `AIMASS_CPU_GEMM=portable` in the environment turns it off (for
/// comparisons), falling back to the `gemm` crate.
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::is_x86_feature_detected!("avx512f")
            && std::env::var("AIMASS_CPU_GEMM").map_or(true, |v| v != "portable")
    })
}

thread_local! {
    /// Packing buffers kept per thread: a convolution packs once per image,
    /// and fresh multi-megabyte allocations cost page faults every time.
    static BUFFERS: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of at least `len` values (contents unspecified; callers use
/// the first `len`) from this thread's pool.
fn take_buffer(len: usize) -> Vec<f32> {
    let mut v = BUFFERS
        .with(|b| {
            let mut b = b.borrow_mut();
            // The smallest buffer that fits, else the largest (to grow).
            let fits = (0..b.len())
                .filter(|&i| b[i].capacity() >= len)
                .min_by_key(|&i| b[i].capacity());
            let best = fits.or_else(|| (0..b.len()).max_by_key(|&i| b[i].capacity()))?;
            Some(b.swap_remove(best))
        })
        .unwrap_or_default();
    // Keep the old values and the old length (the packers overwrite every
    // position they use, padding included): only growth writes here, not a
    // memset of the buffer on every packing.
    if v.len() < len {
        v.resize(len, 0.0);
    }
    v
}

/// Returns a buffer to this thread's pool (at most four are kept).
fn give_buffer(v: Vec<f32>) {
    BUFFERS.with(|b| {
        let mut b = b.borrow_mut();
        if v.capacity() > 0 && b.len() < 4 {
            b.push(v);
        }
    });
}

/// `A` packed into panels of [`MR`] rows: panel `i` holds rows
/// `i*MR..i*MR+MR` as `k` groups of `MR` values (rows past `m` are zero).
pub(crate) struct PackedA {
    buf: Vec<f32>,
    m: usize,
    k: usize,
}

impl PackedA {
    /// Packs the `m x k` matrix `v` of `a` (any strides; bounds checked by
    /// the caller).
    pub fn new(a: &[f32], v: View) -> Self {
        Self::from_rows(v.rows, v.cols, |r, dst| {
            let row = r * v.rs;
            if v.cs == 1 {
                dst.copy_from_slice(&a[row..row + dst.len()]);
            } else {
                for (p, d) in dst.iter_mut().enumerate() {
                    *d = a[row + p * v.cs];
                }
            }
        })
    }

    /// Packs the row-major `m x k` matrix whose row `r` `fill(r, dst)`
    /// writes into `dst` (`k` values; it must write all of them, the buffer
    /// is reused without clearing): each row goes through a small buffer
    /// straight into its panel.
    pub fn from_rows(m: usize, k: usize, mut fill: impl FnMut(usize, &mut [f32])) -> Self {
        let panels = m.div_ceil(MR);
        let mut buf = take_buffer(panels * MR * k);
        let mut row = take_buffer(k);
        if k > 0 {
            let row = &mut row[..k];
            for (pi, panel) in buf[..panels * MR * k].chunks_exact_mut(MR * k).enumerate() {
                let r0 = pi * MR;
                let rows = MR.min(m - r0);
                for i in 0..rows {
                    fill(r0 + i, row);
                    for (p, x) in row.iter().enumerate() {
                        panel[p * MR + i] = *x;
                    }
                }
                if rows < MR {
                    for group in panel.chunks_exact_mut(MR) {
                        group[rows..].fill(0.0);
                    }
                }
            }
        }
        give_buffer(row);
        PackedA { buf, m, k }
    }
}

impl Drop for PackedA {
    fn drop(&mut self) {
        give_buffer(std::mem::take(&mut self.buf));
    }
}

/// `B` packed into strips of [`NR`] columns (zero-padded), each `k x NR`.
fn pack_b(b: &[f32], v: View) -> Vec<f32> {
    let (k, n) = (v.rows, v.cols);
    let strips = n.div_ceil(NR);
    let mut buf = take_buffer(strips * NR * k);
    if k > 0 {
        for (si, strip) in buf[..strips * NR * k].chunks_exact_mut(NR * k).enumerate() {
            let c0 = si * NR;
            let cols = NR.min(n - c0);
            if v.cs == 1 {
                // Row-major B: each row of the strip is one contiguous copy.
                for (p, dst) in strip.chunks_exact_mut(NR).enumerate() {
                    let src = p * v.rs + c0;
                    dst[..cols].copy_from_slice(&b[src..src + cols]);
                    dst[cols..].fill(0.0);
                }
                continue;
            }
            for j in 0..cols {
                let col = (c0 + j) * v.cs;
                if v.rs == 1 {
                    let src = &b[col..col + k];
                    for (p, x) in src.iter().enumerate() {
                        strip[p * NR + j] = *x;
                    }
                } else {
                    for p in 0..k {
                        strip[p * NR + j] = b[col + p * v.rs];
                    }
                }
            }
            if cols < NR {
                for row in strip.chunks_exact_mut(NR) {
                    row[cols..].fill(0.0);
                }
            }
        }
    }
    buf
}

/// Where the micro-kernel finds `B`: `base + strip * strip_stride` is the
/// first element of a strip, consecutive rows are `row_stride` apart.
#[derive(Clone, Copy)]
struct RhsLayout {
    base: usize,
    row_stride: usize,
    strip_stride: usize,
}

/// The masks of the two 16-lane halves of a strip with `cols` valid columns.
fn masks(cols: usize) -> [__mmask16; 2] {
    let lane = |c: usize| -> __mmask16 {
        if c >= 16 {
            0xffff
        } else {
            ((1u32 << c) - 1) as __mmask16
        }
    };
    [lane(cols), lane(cols.saturating_sub(16))]
}

/// One `MR x (16*NV)` tile: `C[..rows, ..] (+)= A_panel · B_strip` over `k`.
///
/// # Safety
/// The CPU has AVX-512F; `a` holds `k * MR` values; `b + p * rsb` holds the
/// lanes of `mask` for every `p < k`; `c + i * rsc` holds the lanes of
/// `mask` for every `i < rows <= MR`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const NV: usize>(
    k: usize,
    a: *const f32,
    b: *const f32,
    rsb: usize,
    mask: [__mmask16; 2],
    c: *mut f32,
    rsc: usize,
    rows: usize,
    acc: bool,
) {
    let mut t = [[_mm512_setzero_ps(); NV]; MR];
    let (mut a, mut b) = (a, b);
    for _ in 0..k {
        let mut bv = [_mm512_setzero_ps(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm512_maskz_loadu_ps(mask[v], b.add(16 * v));
        }
        for (i, row) in t.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*a.add(i));
            for (v, x) in row.iter_mut().enumerate() {
                *x = _mm512_fmadd_ps(ai, bv[v], *x);
            }
        }
        a = a.add(MR);
        b = b.add(rsb);
    }
    for (i, row) in t.iter().enumerate() {
        if i < rows {
            let ci = c.add(i * rsc);
            for (v, x) in row.iter().enumerate() {
                let p = ci.add(16 * v);
                let r = if acc {
                    _mm512_add_ps(*x, _mm512_maskz_loadu_ps(mask[v], p))
                } else {
                    *x
                };
                _mm512_mask_storeu_ps(p, mask[v], r);
            }
        }
    }
}

/// Runs the tiles of column strips `strips` (all panels, all of `k`).
///
/// # Safety
/// As [`gemm`]; the strips of different calls write disjoint columns of `C`.
#[allow(clippy::too_many_arguments)]
unsafe fn run_strips(
    strips: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    n: usize,
    c: usize,
    rsc: usize,
    acc: bool,
    a: &PackedA,
    rhs: RhsLayout,
) {
    let (m, k) = (a.m, a.k);
    let blocks = k.div_ceil(KC).max(1);
    let kc = k.div_ceil(blocks);
    let c = c as *mut f32;
    let b = rhs.base as *const f32;
    for s in strips {
        let c0 = s * NR;
        let cols = NR.min(n - c0);
        let mask = masks(cols);
        let bs = b.add(s * rhs.strip_stride);
        let mut p0 = 0;
        while p0 < k {
            let kb = kc.min(k - p0);
            let first = p0 == 0;
            for pi in panels.clone() {
                let r0 = pi * MR;
                let ap = a.buf.as_ptr().add(pi * MR * k + p0 * MR);
                let bp = bs.add(p0 * rhs.row_stride);
                let cp = c.add(r0 * rsc + c0);
                let rows = MR.min(m - r0);
                let accum = acc || !first;
                if cols > 16 {
                    tile::<2>(kb, ap, bp, rhs.row_stride, mask, cp, rsc, rows, accum);
                } else {
                    tile::<1>(kb, ap, bp, rhs.row_stride, mask, cp, rsc, rows, accum);
                }
            }
            p0 += kb;
        }
    }
}

/// `C (+)= A · B` on `threads` rayon threads, for `C` row-major with row
/// stride `rsc` (`m x n`, `m = a.rows()`), and `B` (`k x n`) of any
/// strides: read in place when `bv.cs == 1`, packed otherwise.
///
/// # Safety
/// [`available`] returned true; `c` holds `(m - 1) * rsc + n` values
/// (when `m, n > 0`) and does not overlap `b`; `bv` fits `b`; `bv.rows ==
/// a.cols()`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    c: *mut f32,
    rsc: usize,
    n: usize,
    acc: bool,
    a: &PackedA,
    b: &[f32],
    bv: View,
    threads: usize,
) {
    let (m, k) = (a.m, a.k);
    if m == 0 || n == 0 {
        return;
    }
    let mut packed = Vec::new();
    // B is read in place when its rows are contiguous, unless many row
    // panels of A will stream over it: then a packed copy (contiguous
    // strips, no cache-set conflicts from a power-of-two row stride) pays
    // for itself.
    let in_place = bv.cs == 1 && m < PACK_B_MIN_ROWS;
    let rhs = if in_place {
        RhsLayout {
            base: b.as_ptr() as usize,
            row_stride: bv.rs,
            strip_stride: NR,
        }
    } else {
        packed = pack_b(b, bv);
        RhsLayout {
            base: packed.as_ptr() as usize,
            row_stride: NR,
            strip_stride: NR * k,
        }
    };
    let strips = n.div_ceil(NR);
    let panels = m.div_ceil(MR);
    let c = c as usize;
    if threads <= 1 || strips * panels < 2 {
        run_strips(0..strips, 0..panels, n, c, rsc, acc, a, rhs);
    } else if strips >= threads {
        let per = strips.div_ceil(threads);
        (0..strips.div_ceil(per)).into_par_iter().for_each(|t| {
            // SAFETY: each job writes its own columns of C.
            unsafe {
                run_strips(
                    t * per..((t + 1) * per).min(strips),
                    0..panels,
                    n,
                    c,
                    rsc,
                    acc,
                    a,
                    rhs,
                )
            }
        });
    } else {
        let per = panels.div_ceil(threads);
        (0..panels.div_ceil(per)).into_par_iter().for_each(|t| {
            // SAFETY: each job writes its own rows of C.
            unsafe {
                run_strips(
                    0..strips,
                    t * per..((t + 1) * per).min(panels),
                    n,
                    c,
                    rsc,
                    acc,
                    a,
                    rhs,
                )
            }
        });
    }
    give_buffer(packed);
}

/// Rows of `A` and of `B` per block of [`gemm_abt`]: 4 x 4 accumulators.
const DOT: usize = 4;

/// `C += A · Bᵀ` where both operands are contiguous along `k`: `A` is
/// `m x k` with rows `lda` apart, `B` is `n x k` with rows `ldb` apart, `C`
/// is `m x n` with rows `ldc` apart. No packing: each 4 x 4 block of `C`
/// keeps 16 vector accumulators of dot products over `k` (16 lanes at a
/// time, the tail masked) and reduces them once at the end, which pays when
/// `k` is long and `m`, `n` are short (a weight gradient summed over many
/// positions), where packing both operands would cost as much as the
/// product.
///
/// # Safety
/// [`available`] returned true; `a`, `b` and `c` hold the rows described
/// (`(m - 1) * lda + k` values and so on, when the sizes are non-zero); `c`
/// does not overlap `a` or `b`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_abt(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let tail = k % 16;
    let tail_mask: __mmask16 = ((1u32 << tail) - 1) as __mmask16;
    for i0 in (0..m).step_by(DOT) {
        let rows = DOT.min(m - i0);
        // Rows past the end repeat the last one (valid memory; their
        // results are not stored).
        let ar: [*const f32; DOT] = std::array::from_fn(|i| a.add((i0 + i.min(rows - 1)) * lda));
        for j0 in (0..n).step_by(DOT) {
            let cols = DOT.min(n - j0);
            let br: [*const f32; DOT] =
                std::array::from_fn(|j| b.add((j0 + j.min(cols - 1)) * ldb));
            let mut acc = [[_mm512_setzero_ps(); DOT]; DOT];
            let mut p = 0;
            while p + 16 <= k {
                let bv: [__m512; DOT] = std::array::from_fn(|j| _mm512_loadu_ps(br[j].add(p)));
                for i in 0..DOT {
                    let av = _mm512_loadu_ps(ar[i].add(p));
                    for j in 0..DOT {
                        acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
                    }
                }
                p += 16;
            }
            if tail > 0 {
                let bv: [__m512; DOT] =
                    std::array::from_fn(|j| _mm512_maskz_loadu_ps(tail_mask, br[j].add(p)));
                for i in 0..DOT {
                    let av = _mm512_maskz_loadu_ps(tail_mask, ar[i].add(p));
                    for j in 0..DOT {
                        acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate().take(rows) {
                let ci = c.add((i0 + i) * ldc + j0);
                for (j, v) in row.iter().enumerate().take(cols) {
                    *ci.add(j) += _mm512_reduce_add_ps(*v);
                }
            }
        }
    }
}
