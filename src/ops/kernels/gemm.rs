//! A bounds-checked wrapper around the `gemm` crate (candle's own CPU matmul
//! backend), plus the element trait the kernels are generic over.

use candle_core::WithDType;
pub(crate) use gemm::Parallelism;

/// The element types the kernels run on (f32 and f64).
pub(crate) trait Elem: WithDType + Default {
    /// `self` where `y > 0`, else 0, without a branch (bit mask), so that
    /// loops over it vectorise.
    fn gate(self, y: Self) -> Self;
    /// `if take { a } else { b }` without a branch (bit mask).
    fn pick(take: bool, a: Self, b: Self) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn gate(self, y: f32) -> f32 {
        f32::from_bits(self.to_bits() & ((y > 0.0) as u32).wrapping_neg())
    }
    #[inline(always)]
    fn pick(take: bool, a: f32, b: f32) -> f32 {
        let m = (take as u32).wrapping_neg();
        f32::from_bits((a.to_bits() & m) | (b.to_bits() & !m))
    }
}

impl Elem for f64 {
    #[inline(always)]
    fn gate(self, y: f64) -> f64 {
        f64::from_bits(self.to_bits() & ((y > 0.0) as u64).wrapping_neg())
    }
    #[inline(always)]
    fn pick(take: bool, a: f64, b: f64) -> f64 {
        let m = (take as u64).wrapping_neg();
        f64::from_bits((a.to_bits() & m) | (b.to_bits() & !m))
    }
}

/// A strided matrix view: `data[off + i * rs + j * cs]` is element `(i, j)`.
#[derive(Clone, Copy)]
pub(crate) struct View {
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl View {
    /// A row-major (C order) `rows x cols` matrix.
    pub fn rm(rows: usize, cols: usize) -> Self {
        View {
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of this view (no data moves).
    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
    /// One past the largest index the view touches (0 for an empty view).
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// The left operand of [`matmul_lhs`]: a strided matrix, packed for the
/// AVX-512 kernel when the CPU has one and the element type is f32, so that
/// one packing serves many products (a convolution's weights, for every
/// image of the batch).
pub(crate) struct Lhs<'a, T: Clone> {
    data: std::borrow::Cow<'a, [T]>,
    view: View,
    #[cfg(target_arch = "x86_64")]
    packed: Option<super::sgemm::PackedA>,
}

/// `s` as a slice of `U` when `T` and `U` are the same type.
#[cfg(target_arch = "x86_64")]
fn same_type<T: 'static, U: 'static>(s: &[T]) -> Option<&[U]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<U>()).then(|| {
        // SAFETY: T and U are the same type (same layout).
        unsafe { std::slice::from_raw_parts(s.as_ptr() as *const U, s.len()) }
    })
}

/// `s` as a mutable slice of `U` when `T` and `U` are the same type.
#[cfg(target_arch = "x86_64")]
fn same_type_mut<T: 'static, U: 'static>(s: &mut [T]) -> Option<&mut [U]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<U>()).then(|| {
        // SAFETY: T and U are the same type (same layout).
        unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut U, s.len()) }
    })
}

/// Whether a `view`-shaped left operand of element type `T` goes to the
/// AVX-512 kernel (f32, a CPU that has it, not empty).
#[cfg(target_arch = "x86_64")]
fn packs<T: 'static>(view: View) -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && super::sgemm::available()
        && view.rows > 0
        && view.cols > 0
}

impl<'a, T: Elem> Lhs<'a, T> {
    /// Wraps (and, for the AVX-512 kernel, packs) `view` of `data`. Errors
    /// when the view does not fit the slice.
    pub fn new(data: &'a [T], view: View) -> candle_core::Result<Self> {
        if view.extent() > data.len() {
            candle_core::bail!("aimass kernels: matmul lhs view out of bounds");
        }
        #[cfg(target_arch = "x86_64")]
        let packed = match same_type::<T, f32>(data) {
            Some(a) if packs::<T>(view) => Some(super::sgemm::PackedA::new(a, view)),
            _ => None,
        };
        Ok(Lhs {
            data: std::borrow::Cow::Borrowed(data),
            view,
            #[cfg(target_arch = "x86_64")]
            packed,
        })
    }
}

impl<T: Elem> Lhs<'static, T> {
    /// A row-major `rows x cols` matrix produced row by row by
    /// `fill(row, dst)`, which must write every value of `dst` (the buffer
    /// holds leftovers of earlier rows or matrices). The AVX-512 kernel
    /// packs each row as it comes (the matrix is never stored whole);
    /// otherwise it is materialised.
    pub fn from_rows(rows: usize, cols: usize, mut fill: impl FnMut(usize, &mut [T])) -> Self {
        let view = View::rm(rows, cols);
        #[cfg(target_arch = "x86_64")]
        if packs::<T>(view) {
            let packed = super::sgemm::PackedA::from_rows(rows, cols, |r, dst| {
                // Always `Some`: `packs` checked that T is f32.
                if let Some(dst) = same_type_mut::<f32, T>(dst) {
                    fill(r, dst)
                }
            });
            return Lhs {
                data: std::borrow::Cow::Owned(Vec::new()),
                view,
                packed: Some(packed),
            };
        }
        let mut data = vec![T::zero(); rows * cols];
        if cols > 0 {
            for (r, dst) in data.chunks_exact_mut(cols).enumerate() {
                fill(r, dst);
            }
        }
        Lhs {
            data: std::borrow::Cow::Owned(data),
            view,
            #[cfg(target_arch = "x86_64")]
            packed: None,
        }
    }
}

/// `dst = (acc ? dst : 0) + lhs @ rhs` with shapes checked against the slices.
///
/// Returns an error (never touches memory out of bounds) when the views do
/// not fit their slices or the inner dimensions disagree.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<T: Elem>(
    dst: &mut [T],
    dv: View,
    acc: bool,
    lhs: &[T],
    lv: View,
    rhs: &[T],
    rv: View,
    par: Parallelism,
) -> candle_core::Result<()> {
    matmul_lhs(dst, dv, acc, &Lhs::new(lhs, lv)?, rhs, rv, par)
}

/// [`matmul`] with a prepared left operand.
pub(crate) fn matmul_lhs<T: Elem>(
    dst: &mut [T],
    dv: View,
    acc: bool,
    lhs: &Lhs<'_, T>,
    rhs: &[T],
    rv: View,
    par: Parallelism,
) -> candle_core::Result<()> {
    let lv = lhs.view;
    let (m, k, n) = (lv.rows, lv.cols, rv.cols);
    if rv.rows != k || dv.rows != m || dv.cols != n {
        candle_core::bail!(
            "aimass kernels: matmul shapes ({m}x{k}) @ ({}x{n}) -> ({}x{})",
            rv.rows,
            dv.rows,
            dv.cols
        );
    }
    if dv.extent() > dst.len() || rv.extent() > rhs.len() {
        candle_core::bail!("aimass kernels: matmul view out of bounds");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dv.rs + j * dv.cs] = T::zero();
                }
            }
        }
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if let (Some(packed), Some(b), true) = (&lhs.packed, same_type::<T, f32>(rhs), dv.cs == 1) {
        let threads = match par {
            Parallelism::Rayon(t) => t.max(1),
            _ => 1,
        };
        if let Some(c) = same_type_mut::<T, f32>(dst) {
            // SAFETY: `packed` exists only when `available()` said so; the
            // destination extent was checked above, it is borrowed mutably
            // (no overlap with `rhs`), and `rv` fits `rhs` with
            // `rv.rows == k == packed.cols()`.
            unsafe { super::sgemm::gemm(c.as_mut_ptr(), dv.rs, n, acc, packed, b, rv, threads) };
            return Ok(());
        }
    }
    let lhs_data: &[T] = &lhs.data;
    // SAFETY: every view's extent was checked against its slice above, the
    // destination is borrowed mutably and cannot alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dv.cs as isize,
            dv.rs as isize,
            acc,
            lhs_data.as_ptr(),
            lv.cs as isize,
            lv.rs as isize,
            rhs.as_ptr(),
            rv.cs as isize,
            rv.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// `C += A · Bᵀ` for operands contiguous along the inner dimension: `A` is
/// `m x k` (rows `lda` apart), `B` is `n x k` (rows `ldb` apart), `C` is
/// `m x n` (rows `ldc` apart). The AVX-512 kernel runs it without packing
/// either operand (see `sgemm::gemm_abt`); otherwise the `gemm` crate.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_abt<T: Elem>(
    c: &mut [T],
    ldc: usize,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    (m, n, k): (usize, usize, usize),
) -> candle_core::Result<()> {
    let av = View {
        rows: m,
        cols: k,
        rs: lda,
        cs: 1,
    };
    let bv = View {
        rows: k,
        cols: n,
        rs: 1,
        cs: ldb,
    };
    let cv = View {
        rows: m,
        cols: n,
        rs: ldc,
        cs: 1,
    };
    if av.extent() > a.len() || bv.extent() > b.len() || cv.extent() > c.len() {
        candle_core::bail!("aimass kernels: matmul_abt view out of bounds");
    }
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(af), Some(bf)) = (
        packs::<T>(av),
        same_type::<T, f32>(a),
        same_type::<T, f32>(b),
    ) {
        if let Some(cf) = same_type_mut::<T, f32>(c) {
            // SAFETY: `packs` checked the CPU; every extent was checked
            // above, and `c` is borrowed mutably (no overlap).
            unsafe {
                super::sgemm::gemm_abt(
                    m,
                    n,
                    k,
                    af.as_ptr(),
                    lda,
                    bf.as_ptr(),
                    ldb,
                    cf.as_mut_ptr(),
                    ldc,
                )
            };
            return Ok(());
        }
    }
    // The portable path: A as a strided left operand, B transposed by view.
    let lhs = Lhs {
        data: std::borrow::Cow::Borrowed(a),
        view: av,
        #[cfg(target_arch = "x86_64")]
        packed: None,
    };
    matmul_lhs(c, cv, true, &lhs, b, bv, Parallelism::None)
}

/// How many rayon threads the kernels may use.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        super::super::util::test_values(len, seed)
            .iter()
            .map(|v| *v as f32)
            .collect()
    }

    /// `dst (+)= lhs @ rhs` by the definition, in f64.
    fn naive(dst: &mut [f32], dv: View, acc: bool, a: &[f32], av: View, b: &[f32], bv: View) {
        for i in 0..av.rows {
            for j in 0..bv.cols {
                let mut s = 0.0f64;
                for p in 0..av.cols {
                    s += a[i * av.rs + p * av.cs] as f64 * b[p * bv.rs + j * bv.cs] as f64;
                }
                let d = &mut dst[i * dv.rs + j * dv.cs];
                *d = if acc { *d + s as f32 } else { s as f32 };
            }
        }
    }

    #[test]
    fn matmul_abt_matches_definition() {
        // Odd sizes around the 4 x 4 blocks and the 16-lane tail, padded
        // row strides, accumulation into existing values.
        for &(m, n, k) in &[(1, 1, 1), (5, 7, 33), (4, 4, 16), (9, 3, 47), (8, 13, 200)] {
            let (lda, ldb, ldc) = (k + 3, k + 5, n + 2);
            let a = values(m * lda, 1);
            let b = values(n * ldb, 2);
            let mut c = values(m * ldc, 3);
            let want: Vec<f64> = (0..m * ldc)
                .map(|idx| {
                    let (i, j) = (idx / ldc, idx % ldc);
                    let mut s = c[idx] as f64;
                    if j < n {
                        for p in 0..k {
                            s += a[i * lda + p] as f64 * b[j * ldb + p] as f64;
                        }
                    }
                    s
                })
                .collect();
            matmul_abt(&mut c, ldc, &a, lda, &b, ldb, (m, n, k)).unwrap();
            for (g, w) in c.iter().zip(&want) {
                assert!(
                    (*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "{m}x{n}x{k}: {g} vs {w}"
                );
            }
        }
        let mut c = vec![0.0f32; 4];
        assert!(matmul_abt(&mut c, 2, &[0.0; 3], 2, &[0.0; 4], 2, (2, 2, 2)).is_err());
    }

    /// Every path (AVX-512 with B in place or packed, the `gemm` crate for
    /// transposed destinations) against the definition: ragged edges in
    /// every dimension, k past one cache block, transposed operands,
    /// accumulation, one and two threads.
    #[test]
    fn matmul_matches_definition() {
        let shapes = [
            (1, 1, 1),
            (8, 32, 5),
            (7, 33, 3),
            (9, 17, 200),
            (64, 196, 288),
            (13, 16, 450),
            (3, 70, 1),
            (33, 4, 64),
            // Enough rows that a row-major B is packed too.
            (517, 37, 19),
        ];
        for (si, &(m, n, k)) in shapes.iter().enumerate() {
            for (ta, tb, tc) in [
                (false, false, false),
                (true, false, false),
                (false, true, false),
                (true, true, false),
                (false, false, true),
            ] {
                let av = if ta {
                    View::rm(k, m).t()
                } else {
                    View::rm(m, k)
                };
                let bv = if tb {
                    View::rm(n, k).t()
                } else {
                    View::rm(k, n)
                };
                let dv = if tc {
                    View::rm(n, m).t()
                } else {
                    View::rm(m, n)
                };
                let a = values(m * k, si as u64 * 7 + 1);
                let b = values(k * n, si as u64 * 7 + 2);
                for acc in [false, true] {
                    for par in [Parallelism::None, Parallelism::Rayon(2)] {
                        let init = values(m * n, si as u64 * 7 + 3);
                        let mut got = init.clone();
                        matmul(&mut got, dv, acc, &a, av, &b, bv, par).unwrap();
                        let mut want = init.clone();
                        naive(&mut want, dv, acc, &a, av, &b, bv);
                        for (g, w) in got.iter().zip(&want) {
                            assert!(
                                (g - w).abs() <= 1e-5 * (1.0 + k as f32),
                                "{m}x{k}x{n} ta {ta} tb {tb} tc {tc} acc {acc}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_rejects_bad_views() {
        let a = vec![0.0f32; 6];
        let mut d = vec![0.0f32; 4];
        let r = matmul(
            &mut d,
            View::rm(2, 2),
            false,
            &a,
            View::rm(2, 4),
            &a,
            View::rm(4, 2),
            Parallelism::None,
        );
        assert!(r.is_err());
        let r = matmul(
            &mut d,
            View::rm(2, 2),
            false,
            &a,
            View::rm(2, 3),
            &a,
            View::rm(2, 2),
            Parallelism::None,
        );
        assert!(r.is_err());
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// Single-thread GFLOP/s of the conv shapes, ours vs the gemm crate:
    /// `cargo test --release --lib gemm_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn gemm_speed() {
        let cases = [
            (
                "fwd 64x288 @ 288x196",
                View::rm(64, 288),
                View::rm(288, 196),
            ),
            (
                "dx 288x64(T) @ 64x196",
                View::rm(64, 288).t(),
                View::rm(64, 196),
            ),
            (
                "dw 64x196 @ 196x288(T)",
                View::rm(64, 196),
                View::rm(288, 196).t(),
            ),
            (
                "big 512x512 @ 512x512",
                View::rm(512, 512),
                View::rm(512, 512),
            ),
            ("1024^3", View::rm(1024, 1024), View::rm(1024, 1024)),
            (
                "fwd 128x1152 @ 1152x49",
                View::rm(128, 1152),
                View::rm(1152, 49),
            ),
            (
                "fwd 32x288 @ 288x784",
                View::rm(32, 288),
                View::rm(288, 784),
            ),
        ];
        for (name, av, bv) in cases {
            let (m, k, n) = (av.rows, av.cols, bv.cols);
            let a = vec![0.5f32; m * k];
            let b = vec![0.25f32; k * n];
            let mut c = vec![0.0f32; m * n];
            let flops = 2.0 * (m * k * n) as f64;
            let iters = (2e9 / flops) as usize + 1;
            for (label, portable) in [("ours", false), ("gemm crate", true)] {
                let t = std::time::Instant::now();
                for _ in 0..iters {
                    if portable {
                        unsafe {
                            gemm::gemm(
                                m,
                                n,
                                k,
                                c.as_mut_ptr(),
                                1,
                                n as isize,
                                false,
                                a.as_ptr(),
                                av.cs as isize,
                                av.rs as isize,
                                b.as_ptr(),
                                bv.cs as isize,
                                bv.rs as isize,
                                1.0,
                                1.0,
                                false,
                                false,
                                false,
                                Parallelism::None,
                            )
                        }
                    } else {
                        matmul(
                            &mut c,
                            View::rm(m, n),
                            false,
                            &a,
                            av,
                            &b,
                            bv,
                            Parallelism::None,
                        )
                        .unwrap();
                    }
                }
                let s = t.elapsed().as_secs_f64();
                println!(
                    "{name:28} {label:10} {:7.1} GFLOP/s",
                    flops * iters as f64 / s / 1e9
                );
            }
        }
    }
}
