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

/// `dst = (acc ? dst : 0) + lhs @ rhs` with shapes checked against the slices.
///
/// Returns an error (never touches memory out of bounds) when the views do
/// not fit their slices or the inner dimensions disagree.
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
    let (m, k, n) = (lv.rows, lv.cols, rv.cols);
    if rv.rows != k || dv.rows != m || dv.cols != n {
        candle_core::bail!(
            "aimass kernels: matmul shapes ({m}x{k}) @ ({}x{n}) -> ({}x{})",
            rv.rows,
            dv.rows,
            dv.cols
        );
    }
    if dv.extent() > dst.len() || lv.extent() > lhs.len() || rv.extent() > rhs.len() {
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
            lhs.as_ptr(),
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

/// How many rayon threads the kernels may use.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}
