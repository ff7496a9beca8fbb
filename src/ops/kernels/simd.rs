//! Element-wise inner loops, compiled twice: for the baseline target and
//! with AVX2 + FMA, picked at run time (the default build targets plain
//! x86-64, whose SSE2 leaves these loops scalar).

use super::gemm::Elem;

/// Defines `pub(crate) fn $name<T: Elem>(...)` that runs the body with
/// AVX2 + FMA enabled when the CPU has them.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident<$T:ident>($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn $name<$T: Elem>($($arg: $ty),*) -> $ret {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp<$T: Elem>($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn fast<$T: Elem>($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `fast` is compiled for
                    // (checked just above); the body itself is safe code.
                    return unsafe { fast($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    /// `y = x * a + b` (then ReLU).
    fn affine<T>(y: &mut [T], x: &[T], a: T, b: T, relu: bool) -> () {
        let zero = T::zero();
        if relu {
            for (o, &v) in y.iter_mut().zip(x) {
                let t = v * a + b;
                *o = if t > zero { t } else { zero };
            }
        } else {
            for (o, &v) in y.iter_mut().zip(x) {
                *o = v * a + b;
            }
        }
    }
}

multiversion! {
    /// `o = a * g' + b * x + c` with `g' = g * (y > 0)` under the ReLU.
    fn affine_grad<T>(o: &mut [T], x: &[T], g: &[T], y: &[T], a: T, b: T, c: T, relu: bool) -> () {
        if relu {
            for (((o, &xv), &gv), &yv) in o.iter_mut().zip(x).zip(g).zip(y) {
                *o = a * gv.gate(yv) + b * xv + c;
            }
        } else {
            for ((o, &xv), &gv) in o.iter_mut().zip(x).zip(g) {
                *o = a * gv + b * xv + c;
            }
        }
    }
}

multiversion! {
    /// `y = max(x * a + b + s, 0)`: BatchNorm, residual add, ReLU (NaN stays
    /// NaN, as in [`relu`]). Rounded as the unfused `relu(affine + s)`.
    fn affine_add_relu<T>(y: &mut [T], x: &[T], s: &[T], a: T, b: T) -> () {
        let zero = T::zero();
        for ((o, &v), &sv) in y.iter_mut().zip(x).zip(s) {
            let t = v * a + b + sv;
            *o = if t < zero { zero } else { t };
        }
    }
}

multiversion! {
    /// `o = a * g' + b * x + c` and `ds = g'`, with `g' = g * (y > 0)`: the
    /// backward of [`affine_add_relu`] (`ds` is the shortcut's gradient).
    fn affine_grad_add<T>(o: &mut [T], ds: &mut [T], x: &[T], g: &[T], y: &[T], a: T, b: T, c: T) -> () {
        let outs = o.iter_mut().zip(ds.iter_mut());
        for (((o, ds), &xv), (&gv, &yv)) in outs.zip(x).zip(g.iter().zip(y)) {
            let gv = gv.gate(yv);
            *ds = gv;
            *o = a * gv + b * xv + c;
        }
    }
}

multiversion! {
    /// `(sum g', sum g' * (x - mu))`, `g' = g * (y > 0)` under the ReLU;
    /// two sets of 8 lanes of partial sums (two independent add chains per
    /// sum, so the loop is not bound by the add latency).
    fn grad_sums<T>(x: &[T], g: &[T], y: &[T], mu: T, relu: bool) -> (f64, f64) {
        let zero = T::zero();
        let (mut a1, mut a2) = ([zero; 8], [zero; 8]);
        let (mut b1, mut b2) = ([zero; 8], [zero; 8]);
        let n16 = x.len().min(g.len()).min(y.len()) / 16 * 16;
        let chunks = x[..n16]
            .chunks_exact(16)
            .zip(g[..n16].chunks_exact(16))
            .zip(y[..n16].chunks_exact(16));
        for ((xc, gc), yc) in chunks {
            // Fixed-size arrays: no bounds checks, so the lanes vectorise.
            let (Ok(xc), Ok(gc), Ok(yc)) = (
                <&[T; 16]>::try_from(xc),
                <&[T; 16]>::try_from(gc),
                <&[T; 16]>::try_from(yc),
            ) else {
                continue;
            };
            if relu {
                for j in 0..8 {
                    let (g0, g1) = (gc[j].gate(yc[j]), gc[j + 8].gate(yc[j + 8]));
                    a1[j] += g0;
                    a2[j] += g0 * (xc[j] - mu);
                    b1[j] += g1;
                    b2[j] += g1 * (xc[j + 8] - mu);
                }
            } else {
                for j in 0..8 {
                    a1[j] += gc[j];
                    a2[j] += gc[j] * (xc[j] - mu);
                    b1[j] += gc[j + 8];
                    b2[j] += gc[j + 8] * (xc[j + 8] - mu);
                }
            }
        }
        for ((&xv, &gv), &yv) in x[n16..].iter().zip(&g[n16..]).zip(&y[n16..]) {
            let gv = if relu { gv.gate(yv) } else { gv };
            a1[0] += gv;
            a2[0] += gv * (xv - mu);
        }
        (
            a1.iter().chain(&b1).map(|v| v.to_f64()).sum(),
            a2.iter().chain(&b2).map(|v| v.to_f64()).sum(),
        )
    }
}

multiversion! {
    /// `(sum (x - k), sum (x - k)^2)` in two sets of 8 lanes.
    fn shifted_sums<T>(x: &[T], k: T) -> (f64, f64) {
        let zero = T::zero();
        let (mut a1, mut a2) = ([zero; 8], [zero; 8]);
        let (mut b1, mut b2) = ([zero; 8], [zero; 8]);
        let mut it = x.chunks_exact(16);
        for c in &mut it {
            let Ok(c) = <&[T; 16]>::try_from(c) else {
                continue;
            };
            for j in 0..8 {
                let (v, w) = (c[j] - k, c[j + 8] - k);
                a1[j] += v;
                a2[j] += v * v;
                b1[j] += w;
                b2[j] += w * w;
            }
        }
        for &v in it.remainder() {
            let v = v - k;
            a1[0] += v;
            a2[0] += v * v;
        }
        (
            a1.iter().chain(&b1).map(|v| v.to_f64()).sum(),
            a2.iter().chain(&b2).map(|v| v.to_f64()).sum(),
        )
    }
}

multiversion! {
    /// `o = max(x, 0)` (NaN stays NaN).
    fn relu<T>(o: &mut [T], x: &[T]) -> () {
        let zero = T::zero();
        for (o, &v) in o.iter_mut().zip(x) {
            *o = if v < zero { zero } else { v };
        }
    }
}

multiversion! {
    /// `o = g * (y > 0)`.
    fn relu_mask<T>(o: &mut [T], g: &[T], y: &[T]) -> () {
        for ((o, &gv), &yv) in o.iter_mut().zip(g).zip(y) {
            *o = gv.gate(yv);
        }
    }
}

multiversion! {
    /// `y += b` for every element.
    fn add_scalar<T>(y: &mut [T], b: T) -> () {
        for v in y.iter_mut() {
            *v += b;
        }
    }
}

multiversion! {
    /// `dst += src`.
    fn add_assign<T>(dst: &mut [T], src: &[T]) -> () {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    }
}

multiversion! {
    /// `y = max(y, 0)` in place (NaN stays NaN).
    fn relu_in_place<T>(y: &mut [T]) -> () {
        let zero = T::zero();
        for v in y.iter_mut() {
            *v = if *v < zero { zero } else { *v };
        }
    }
}

multiversion! {
    /// [`grad_sums`] under the ReLU whose input is `x * ma + mb` (a
    /// BatchNorm output recomputed from its input `x`, rounded as
    /// [`affine`] rounds it): the mask is `x * ma + mb > 0`.
    fn grad_sums_recomputed<T>(x: &[T], g: &[T], mu: T, ma: T, mb: T) -> (f64, f64) {
        let zero = T::zero();
        let (mut a1, mut a2) = ([zero; 8], [zero; 8]);
        let (mut b1, mut b2) = ([zero; 8], [zero; 8]);
        let n16 = x.len().min(g.len()) / 16 * 16;
        let chunks = x[..n16].chunks_exact(16).zip(g[..n16].chunks_exact(16));
        for (xc, gc) in chunks {
            let (Ok(xc), Ok(gc)) = (<&[T; 16]>::try_from(xc), <&[T; 16]>::try_from(gc)) else {
                continue;
            };
            for j in 0..8 {
                let g0 = gc[j].gate(xc[j] * ma + mb);
                let g1 = gc[j + 8].gate(xc[j + 8] * ma + mb);
                a1[j] += g0;
                a2[j] += g0 * (xc[j] - mu);
                b1[j] += g1;
                b2[j] += g1 * (xc[j + 8] - mu);
            }
        }
        for (&xv, &gv) in x[n16..].iter().zip(&g[n16..]) {
            let gv = gv.gate(xv * ma + mb);
            a1[0] += gv;
            a2[0] += gv * (xv - mu);
        }
        (
            a1.iter().chain(&b1).map(|v| v.to_f64()).sum(),
            a2.iter().chain(&b2).map(|v| v.to_f64()).sum(),
        )
    }
}

multiversion! {
    /// `o = a * g' + b * x + c` with `g' = g * (x * ma + mb > 0)`: the
    /// backward of BatchNorm + ReLU with the mask recomputed from the
    /// input (see [`grad_sums_recomputed`]).
    fn affine_grad_recomputed<T>(o: &mut [T], x: &[T], g: &[T], a: T, b: T, c: T, ma: T, mb: T) -> () {
        for ((o, &xv), &gv) in o.iter_mut().zip(x).zip(g) {
            *o = a * gv.gate(xv * ma + mb) + b * xv + c;
        }
    }
}

multiversion! {
    /// `y = max(y * a + b, 0)` in place, exactly as [`affine`] with its ReLU.
    fn affine_relu_in_place<T>(y: &mut [T], a: T, b: T) -> () {
        let zero = T::zero();
        for v in y.iter_mut() {
            let t = *v * a + b;
            *v = if t > zero { t } else { zero };
        }
    }
}
