//! The transforms of Winograd F(4x4, 3x3) (Lavin & Gray 2016, points 0,
//! ±1, ±2, ∞), used by `winograd.rs` for "same" 3x3 convolutions: each 4x4
//! output tile needs the 6x6 input patch around it, and the convolution
//! becomes 36 GEMMs (one per position ξ of the 6x6 transform domain)
//! instead of F(2x2, 3x3)'s 16 over four times as many tiles: 36 / 16 =
//! 2.25 multiplications per output and channel pair against 4 (and 9 for
//! the direct form), and 2.25 transformed values per input value against 4.
//!
//! ```text
//! V = Bᵀ d B   (6x6 input patch → 36 values)
//! U = G g Gᵀ   (3x3 kernel      → 36 values)
//! Y = Aᵀ [U ⊙ V] A  (36 values  → 4x4 output tile)
//!
//!      ⎡ 4  0 -5  0  1  0 ⎤        ⎡ 1/4    0     0  ⎤
//!      ⎢ 0 -4 -4  1  1  0 ⎥        ⎢-1/6  -1/6  -1/6 ⎥        ⎡ 1  1  1  1  1  0 ⎤
//! Bᵀ = ⎢ 0  4 -4 -1  1  0 ⎥    G = ⎢-1/6   1/6  -1/6 ⎥   Aᵀ = ⎢ 0  1 -1  2 -2  0 ⎥
//!      ⎢ 0 -2 -1  2  1  0 ⎥        ⎢1/24  1/12   1/6 ⎥        ⎢ 0  1  1  4  4  0 ⎥
//!      ⎢ 0  2 -1 -2  1  0 ⎥        ⎢1/24 -1/12   1/6 ⎥        ⎣ 0  1 -1  8 -8  1 ⎦
//!      ⎣ 0  4  0 -5  0  1 ⎦        ⎣  0     0     1  ⎦
//! ```
//!
//! The weight gradient is the adjoint: `Z[ξ] = Σ_tiles (A dy Aᵀ)[ξ] (Bᵀ x
//! B)[ξ]`, then `dw = Gᵀ Z G`. The larger coefficients cost accuracy: f32
//! results differ from the direct form by a few units in the sixth digit
//! (tested), against the seventh for F(2x2, 3x3).
//!
//! Input rows are split into four streams by column (see
//! `winograd::split_rows`): `S_r[j]` holds column `4j + r` for `r < 3` and
//! `S_3[j]` column `4j - 1`, so tile `j`'s patch columns `4j - 1 ..= 4j + 4`
//! are `S_3[j], S_0[j], S_1[j], S_2[j], S_3[j + 1], S_0[j + 1]`, and a tile
//! row is a few whole-vector loads.

// The transforms index several fixed-size lane arrays with one counter.
#![allow(clippy::needless_range_loop)]

use super::gemm::Elem;
use super::simd::multiversion;
use super::winograd::{half_row, load_unchecked, store_unchecked, Same3x3, L};

type V<T> = [T; L];

/// `Bᵀ v` of six vectors (one row or column of a patch).
#[inline(always)]
fn bt<T: Elem>(v: &[V<T>; 6]) -> [V<T>; 6] {
    let (c2, c4, c5) = (T::from_f64(2.0), T::from_f64(4.0), T::from_f64(5.0));
    let mut r = [[T::zero(); L]; 6];
    for q in 0..L {
        let [v0, v1, v2, v3, v4, v5] = [v[0][q], v[1][q], v[2][q], v[3][q], v[4][q], v[5][q]];
        let (s12, d12) = (v1 + v2, v1 - v2);
        let (s34, d43) = (v3 + v4, v4 - v3);
        let (d42, d31) = (v4 - v2, v3 - v1);
        r[0][q] = c4 * v0 - c5 * v2 + v4;
        r[1][q] = s34 - c4 * s12;
        r[2][q] = d43 + c4 * d12;
        r[3][q] = d42 + c2 * d31;
        r[4][q] = d42 - c2 * d31;
        r[5][q] = c4 * v1 - c5 * v3 + v5;
    }
    r
}

/// `Aᵀ m` of six vectors into four.
#[inline(always)]
fn a_t<T: Elem>(m: &[V<T>; 6]) -> [V<T>; 4] {
    let (c2, c4, c8) = (T::from_f64(2.0), T::from_f64(4.0), T::from_f64(8.0));
    let mut r = [[T::zero(); L]; 4];
    for q in 0..L {
        let [m0, m1, m2, m3, m4, m5] = [m[0][q], m[1][q], m[2][q], m[3][q], m[4][q], m[5][q]];
        let (s12, d12) = (m1 + m2, m1 - m2);
        let (s34, d34) = (m3 + m4, m3 - m4);
        r[0][q] = m0 + s12 + s34;
        r[1][q] = d12 + c2 * d34;
        r[2][q] = s12 + c4 * s34;
        r[3][q] = d12 + c8 * d34 + m5;
    }
    r
}

/// `A q` of four vectors into six (the adjoint of [`a_t`]).
#[inline(always)]
fn a<T: Elem>(q: &[V<T>; 4]) -> [V<T>; 6] {
    let (c2, c4, c8) = (T::from_f64(2.0), T::from_f64(4.0), T::from_f64(8.0));
    let mut r = [[T::zero(); L]; 6];
    for k in 0..L {
        let [q0, q1, q2, q3] = [q[0][k], q[1][k], q[2][k], q[3][k]];
        let (e, o) = (q0 + q2 * c4, q1 * c2 + q3 * c8);
        r[0][k] = q0;
        r[1][k] = (q0 + q2) + (q1 + q3);
        r[2][k] = (q0 + q2) - (q1 + q3);
        r[3][k] = e + o;
        r[4][k] = e - o;
        r[5][k] = q3;
    }
    r
}

multiversion! {
    /// `V = Bᵀ d B` of every tile of one plane (split into four streams):
    /// tile `t = i * tw + j` goes to `dst[ξ * stride + t]`, tile rows in
    /// whole vectors (up to `L - 1` values past a row's end are written,
    /// as in F(2x2)'s `input_tiles`).
    fn input_tiles<T>(s: &Same3x3, split: &[T], dst: &mut [T], stride: usize) -> () {
        let (th, tw) = (s.th(), s.tw());
        let half = half_row(tw);
        let rs = 4 * half;
        // Loads reach `j + 1 + L <= half` within a stream of split row
        // `4 th + 1`; stores reach `35 * stride + th * tw + L - 1`.
        assert!(split.len() >= (4 * th + 2) * rs && dst.len() >= 35 * stride + th * tw + L);
        for i in 0..th {
            let mut j = 0;
            while j < tw {
                // d B for each of the 6 patch rows.
                let mut db = [[[T::zero(); L]; 6]; 6];
                for (k, row) in db.iter_mut().enumerate() {
                    let base = (4 * i + k) * rs;
                    // SAFETY: within the bounds asserted above.
                    let ld = |r: usize, at: usize| unsafe { load_unchecked(split, base + r * half + at) };
                    let p = [ld(3, j), ld(0, j), ld(1, j), ld(2, j), ld(3, j + 1), ld(0, j + 1)];
                    *row = bt(&p);
                }
                // Bᵀ (d B) down each of the 6 columns.
                let base = i * tw + j;
                for col in 0..6 {
                    let column = [db[0][col], db[1][col], db[2][col], db[3][col], db[4][col], db[5][col]];
                    for (row, v) in bt(&column).iter().enumerate() {
                        // SAFETY: within the bounds asserted above.
                        unsafe { store_unchecked(dst, (row * 6 + col) * stride + base, v) };
                    }
                }
                j += L;
            }
        }
    }
}

multiversion! {
    /// `A dy Aᵀ` of every 4x4 tile of one output-gradient plane (split into
    /// four streams as the input is): tile `t` goes to `dst[ξ * stride +
    /// t]`, written as [`input_tiles`] writes.
    fn grad_tiles<T>(s: &Same3x3, split: &[T], dst: &mut [T], stride: usize) -> () {
        let (th, tw) = (s.th(), s.tw());
        let half = half_row(tw);
        let rs = 4 * half;
        assert!(split.len() >= (4 * th + 2) * rs && dst.len() >= 35 * stride + th * tw + L);
        for i in 0..th {
            let mut j = 0;
            while j < tw {
                // Plane rows 4i..4i+3 are split rows 4i+1..4i+4; columns
                // 4j..4j+3 are S_0[j], S_1[j], S_2[j], S_3[j + 1].
                let mut ad = [[[T::zero(); L]; 6]; 4];
                for (k, row) in ad.iter_mut().enumerate() {
                    let base = (4 * i + 1 + k) * rs;
                    // SAFETY: within the bounds asserted above.
                    let ld = |r: usize, at: usize| unsafe { load_unchecked(split, base + r * half + at) };
                    *row = a(&[ld(0, j), ld(1, j), ld(2, j), ld(3, j + 1)]);
                }
                let base = i * tw + j;
                for col in 0..6 {
                    let column = [ad[0][col], ad[1][col], ad[2][col], ad[3][col]];
                    for (row, v) in a(&column).iter().enumerate() {
                        // SAFETY: within the bounds asserted above.
                        unsafe { store_unchecked(dst, (row * 6 + col) * stride + base, v) };
                    }
                }
                j += L;
            }
        }
    }
}

multiversion! {
    /// `Y = Aᵀ M A` of every tile of one output plane: reads `M[ξ][t]` at
    /// `m[ξ * stride + t]` and writes the plane at `out[at..at + h * w]`,
    /// rows in whole vectors of `4 L` values (spilling up to `4 L - 1`
    /// values past a row's end into what follows in `out`, written later by
    /// the caller, except where `out` ends). `tile` is scratch.
    fn output_tiles<T>(
        s: &Same3x3,
        m: &[T],
        stride: usize,
        out: &mut [T],
        at: usize,
        tile: &mut [T],
    ) -> () {
        let (h, w, th, tw) = (s.h, s.w, s.th(), s.tw());
        let tp = tw.div_ceil(L) * L;
        assert!(m.len() >= 35 * stride + th * tw + L && tile.len() >= 16 * tp);
        for i in 0..th {
            let mut j = 0;
            while j < tw {
                // Aᵀ m over the rows, for each of the 6 columns.
                let mut am = [[[T::zero(); L]; 6]; 4];
                for col in 0..6 {
                    let column: [V<T>; 6] = std::array::from_fn(|row| {
                        // SAFETY: within the bound asserted above.
                        unsafe { load_unchecked(m, (row * 6 + col) * stride + i * tw + j) }
                    });
                    for (r, v) in a_t(&column).into_iter().enumerate() {
                        am[r][col] = v;
                    }
                }
                // (Aᵀ m) A over the columns: output row r, column c of the tile.
                for (r, row) in am.iter().enumerate() {
                    for (c, v) in a_t(row).iter().enumerate() {
                        // SAFETY: `j + L <= tp`, `tile` holds `16 * tp` (asserted).
                        unsafe { store_unchecked(tile, (r * 4 + c) * tp + j, v) };
                    }
                }
                j += L;
            }
            // Output rows 4i..4i+3: column 4j + c from tile column c.
            for r in 0..4 {
                let oy = 4 * i + r;
                if oy >= h {
                    break;
                }
                let mut j = 0;
                while j < tw {
                    let cols: [V<T>; 4] = std::array::from_fn(|c| {
                        // SAFETY: `j + L <= tp` and `(r * 4 + c + 1) * tp <= 16 * tp`.
                        unsafe { load_unchecked(tile, (r * 4 + c) * tp + j) }
                    });
                    let quad: [T; 4 * L] = std::array::from_fn(|k| cols[k % 4][k / 4]);
                    let x = at + oy * w + 4 * j;
                    let end = at + (oy + 1) * w;
                    if x + 4 * L <= out.len() {
                        out[x..x + 4 * L].copy_from_slice(&quad);
                    } else {
                        out[x..end].copy_from_slice(&quad[..end - x]);
                    }
                    j += L;
                }
            }
        }
    }
}

/// `U = G g Gᵀ` of one 3x3 kernel `g` (row-major) into 36 values.
pub(crate) fn kernel_transform<T: Elem>(g: [T; 9]) -> Vec<T> {
    // G v of three values into six.
    let gv = |v: [f64; 3]| -> [f64; 6] {
        [
            v[0] / 4.0,
            -(v[0] + v[1] + v[2]) / 6.0,
            -(v[0] - v[1] + v[2]) / 6.0,
            v[0] / 24.0 + v[1] / 12.0 + v[2] / 6.0,
            v[0] / 24.0 - v[1] / 12.0 + v[2] / 6.0,
            v[2],
        ]
    };
    let g: [f64; 9] = std::array::from_fn(|k| g[k].to_f64());
    // G g: 6x3, column by column.
    let cols: [[f64; 6]; 3] = std::array::from_fn(|c| gv([g[c], g[3 + c], g[6 + c]]));
    // (G g) Gᵀ: 6x6, row by row.
    let mut u = Vec::with_capacity(36);
    for r in 0..6 {
        u.extend(gv([cols[0][r], cols[1][r], cols[2][r]]).map(T::from_f64));
    }
    u
}

/// `Gᵀ Z G` of one 6x6 `Z` (row-major) into the 3x3 kernel gradient.
pub(crate) fn kernel_grad_transform<T: Elem>(z: &[T]) -> [T; 9] {
    // Gᵀ v of six values into three.
    let gtv = |v: [f64; 6]| -> [f64; 3] {
        [
            v[0] / 4.0 - (v[1] + v[2]) / 6.0 + (v[3] + v[4]) / 24.0,
            (v[2] - v[1]) / 6.0 + (v[3] - v[4]) / 12.0,
            -(v[1] + v[2]) / 6.0 + (v[3] + v[4]) / 6.0 + v[5],
        ]
    };
    let z: [f64; 36] = std::array::from_fn(|k| z[k].to_f64());
    // Gᵀ Z: 3x6, column by column.
    let cols: [[f64; 3]; 6] = std::array::from_fn(|c| gtv(std::array::from_fn(|r| z[r * 6 + c])));
    // (Gᵀ Z) G: 3x3.
    let mut g = [T::zero(); 9];
    for r in 0..3 {
        let row = gtv(std::array::from_fn(|c| cols[c][r]));
        for c in 0..3 {
            g[r * 3 + c] = T::from_f64(row[c]);
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 1-D identity behind the tiles: `Aᵀ [(G g) ⊙ (Bᵀ d)]` is the
    /// correlation of `d` (6 values) with `g` (3 values), in f64.
    #[test]
    fn the_transforms_compute_a_correlation() {
        let d = [0.3, -1.2, 2.5, 0.7, -0.4, 1.9];
        let g = [0.8, -0.35, 1.1];
        // 2-D with a kernel that is zero outside its first row and a patch
        // that is zero outside its first row reduces to 1-D.
        let mut g2 = [0.0; 9];
        g2[..3].copy_from_slice(&g);
        let u = kernel_transform(g2);
        let bt1 = |v: [f64; 6]| bt(&v.map(|x| [x; L])).map(|r| r[0]);
        let bd = bt1(d);
        // The 1-D kernel transform G g.
        let ggv = [
            g[0] / 4.0,
            -(g[0] + g[1] + g[2]) / 6.0,
            -(g[0] - g[1] + g[2]) / 6.0,
            g[0] / 24.0 + g[1] / 12.0 + g[2] / 6.0,
            g[0] / 24.0 - g[1] / 12.0 + g[2] / 6.0,
            g[2],
        ];
        let m: [f64; 6] = std::array::from_fn(|k| ggv[k] * bd[k]);
        let y = a_t(&m.map(|x| [x; L])).map(|r| r[0]);
        for (i, yi) in y.iter().enumerate() {
            let want: f64 = (0..3).map(|k| g[k] * d[i + k]).sum();
            assert!((yi - want).abs() < 1e-12, "{i}: {yi} vs {want}");
        }
        // With only the kernel's first row, U = (G e0 gᵀ Gᵀ): its first row
        // is G g scaled by G[0][0] = 1/4.
        for (k, v) in ggv.iter().enumerate() {
            assert!(
                (u[k] - v / 4.0).abs() < 1e-12,
                "{k}: {} vs {}",
                u[k],
                v / 4.0
            );
        }
        // A is the adjoint of Aᵀ: <Aᵀ m, q> = <m, A q>.
        let q = [0.5, -1.5, 2.0, 0.25];
        let aq = a(&q.map(|x| [x; L])).map(|r| r[0]);
        let lhs: f64 = y.iter().zip(&q).map(|(a, b)| a * b).sum();
        let rhs: f64 = m.iter().zip(&aq).map(|(a, b)| a * b).sum();
        assert!((lhs - rhs).abs() < 1e-12);
    }
}
