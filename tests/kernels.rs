//! Tests of the CPU kernels (`aimass::ops::kernels`) against independent
//! references: candle's own ops and naive loops for values, central finite
//! differences in f64 for gradients.

use aimass::candle::{DType, Device, Tensor, Var};
use aimass::ops::kernels;
use rand::Rng;

fn rand_vec(r: &mut aimass::device::SeededRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| r.random::<f64>() * 2.0 - 1.0).collect()
}

fn randt(r: &mut aimass::device::SeededRng, dims: &[usize]) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(rand_vec(r, n), dims, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[derive(Clone, Copy, Debug)]
struct Case {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    stride: (usize, usize),
    pad: (usize, usize),
    dil: (usize, usize),
    groups: usize,
}

impl Case {
    fn out(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad.0 - self.dil.0 * (self.kh - 1) - 1) / self.stride.0 + 1,
            (self.w + 2 * self.pad.1 - self.dil.1 * (self.kw - 1) - 1) / self.stride.1 + 1,
        )
    }
}

/// Direct-loop convolution in f64: the definition, nothing clever.
fn naive_conv(c: &Case, x: &[f64], w: &[f64]) -> Vec<f64> {
    let (oh, ow) = c.out();
    let cg = c.c / c.groups;
    let og = c.o / c.groups;
    let mut y = vec![0.0; c.n * c.o * oh * ow];
    for n in 0..c.n {
        for o in 0..c.o {
            let g = o / og;
            for i in 0..oh {
                for j in 0..ow {
                    let mut s = 0.0;
                    for ci in 0..cg {
                        for ki in 0..c.kh {
                            for kj in 0..c.kw {
                                let ii =
                                    (i * c.stride.0 + ki * c.dil.0) as isize - c.pad.0 as isize;
                                let jj =
                                    (j * c.stride.1 + kj * c.dil.1) as isize - c.pad.1 as isize;
                                if ii < 0 || jj < 0 || ii >= c.h as isize || jj >= c.w as isize {
                                    continue;
                                }
                                let xc = g * cg + ci;
                                s += x[((n * c.c + xc) * c.h + ii as usize) * c.w + jj as usize]
                                    * w[((o * cg + ci) * c.kh + ki) * c.kw + kj];
                            }
                        }
                    }
                    y[((n * c.o + o) * oh + i) * ow + j] = s;
                }
            }
        }
    }
    y
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let base = Case {
        n: 2,
        c: 3,
        h: 7,
        w: 6,
        o: 4,
        kh: 3,
        kw: 3,
        stride: (1, 1),
        pad: (1, 1),
        dil: (1, 1),
        groups: 1,
    };
    v.push(base);
    v.push(Case {
        pad: (0, 0),
        ..base
    });
    v.push(Case {
        stride: (2, 2),
        ..base
    });
    v.push(Case {
        stride: (2, 1),
        pad: (0, 2),
        ..base
    });
    v.push(Case {
        dil: (2, 2),
        pad: (2, 2),
        ..base
    });
    v.push(Case {
        dil: (2, 1),
        ..base
    });
    v.push(Case {
        kh: 1,
        kw: 1,
        pad: (0, 0),
        ..base
    });
    v.push(Case {
        kh: 1,
        kw: 1,
        stride: (2, 2),
        pad: (0, 0),
        ..base
    });
    v.push(Case {
        kh: 2,
        kw: 3,
        stride: (3, 2),
        pad: (1, 0),
        ..base
    });
    v.push(Case {
        c: 4,
        o: 6,
        groups: 2,
        ..base
    });
    v.push(Case {
        c: 6,
        o: 6,
        groups: 3,
        stride: (2, 2),
        ..base
    });
    v.push(Case {
        c: 4,
        o: 4,
        groups: 4,
        kh: 1,
        kw: 1,
        pad: (0, 0),
        ..base
    }); // depthwise 1x1
    v.push(Case {
        n: 1,
        c: 1,
        h: 5,
        w: 5,
        o: 1,
        kh: 5,
        kw: 5,
        pad: (0, 0),
        ..base
    });
    v.push(Case {
        n: 5,
        c: 2,
        h: 9,
        w: 11,
        o: 3,
        kh: 3,
        kw: 5,
        pad: (2, 1),
        ..base
    });
    v
}

fn case_tensors(c: &Case, seed: u64) -> (Tensor, Tensor) {
    let mut r = aimass::device::rng(seed);
    let x = randt(&mut r, &[c.n, c.c, c.h, c.w]);
    let w = randt(&mut r, &[c.o, c.c / c.groups, c.kh, c.kw]);
    (x, w)
}

#[test]
fn conv2d_values_match_naive_loops_f32_and_f64() {
    for (i, c) in cases().iter().enumerate() {
        let (x, w) = case_tensors(c, i as u64);
        let want = naive_conv(c, &flat(&x), &flat(&w));
        let y = kernels::conv2d(&x, &w, None, c.stride, c.pad, c.dil, c.groups).unwrap();
        let (oh, ow) = c.out();
        assert_eq!(y.dims(), &[c.n, c.o, oh, ow], "{c:?}");
        assert!(max_abs_diff(&flat(&y), &want) < 1e-12, "{c:?}");
        let y32 = kernels::conv2d(
            &x.to_dtype(DType::F32).unwrap(),
            &w.to_dtype(DType::F32).unwrap(),
            None,
            c.stride,
            c.pad,
            c.dil,
            c.groups,
        )
        .unwrap();
        assert_eq!(y32.dtype(), DType::F32);
        assert!(max_abs_diff(&flat(&y32), &want) < 1e-4, "{c:?}");
    }
}

#[test]
fn conv2d_values_match_candle_with_bias_and_strided_input() {
    // candle's conv2d takes one stride/padding/dilation for both axes.
    let mut r = aimass::device::rng(7);
    for &(n, c, h, w, o, k, s, p, d, g) in &[
        (
            3usize, 4usize, 10usize, 9usize, 6usize, 3usize, 1usize, 1usize, 1usize, 1usize,
        ),
        (2, 4, 11, 11, 4, 3, 2, 1, 1, 2),
        (2, 3, 12, 10, 5, 3, 1, 2, 2, 1),
        (4, 8, 6, 6, 8, 1, 1, 0, 1, 1),
        (1, 2, 13, 7, 2, 5, 3, 2, 1, 2),
    ] {
        let x = randt(&mut r, &[n, c, h, w]).to_dtype(DType::F32).unwrap();
        let wt = randt(&mut r, &[o, c / g, k, k])
            .to_dtype(DType::F32)
            .unwrap();
        let b = randt(&mut r, &[o]).to_dtype(DType::F32).unwrap();
        let want = x
            .conv2d(&wt, p, s, d, g)
            .unwrap()
            .broadcast_add(&b.reshape((1, o, 1, 1)).unwrap())
            .unwrap();
        let got = kernels::conv2d(&x, &wt, Some(&b), (s, s), (p, p), (d, d), g).unwrap();
        assert!(max_abs_diff(&flat(&got), &flat(&want)) < 1e-4);
        // A transposed (non-contiguous) input gives the same result.
        let xt = x
            .transpose(2, 3)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        assert!(!xt.is_contiguous());
        let got_t = kernels::conv2d(&xt, &wt, Some(&b), (s, s), (p, p), (d, d), g).unwrap();
        assert!(max_abs_diff(&flat(&got_t), &flat(&want)) < 1e-4);
    }
}

/// Central finite differences of `f` at `x0` (f64).
fn fd_grad(x0: &[f64], f: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
    let eps = 1e-6;
    let mut x = x0.to_vec();
    (0..x0.len())
        .map(|i| {
            x[i] = x0[i] + eps;
            let a = f(&x);
            x[i] = x0[i] - eps;
            let b = f(&x);
            x[i] = x0[i];
            (a - b) / (2.0 * eps)
        })
        .collect()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let d = max_abs_diff(got, want);
    assert!(d < tol * scale, "{what}: max diff {d} (scale {scale})");
}

#[test]
fn conv2d_gradients_match_finite_differences() {
    for (i, c) in cases().iter().enumerate() {
        let (x, w) = case_tensors(c, 100 + i as u64);
        let mut r = aimass::device::rng(200 + i as u64);
        let (oh, ow) = c.out();
        let rw = randt(&mut r, &[c.n, c.o, oh, ow]);
        let b = randt(&mut r, &[c.o]);
        let xv = Var::from_tensor(&x).unwrap();
        let wv = Var::from_tensor(&w).unwrap();
        let bv = Var::from_tensor(&b).unwrap();
        let loss = |x: &Tensor, w: &Tensor, b: &Tensor| -> Tensor {
            kernels::conv2d(x, w, Some(b), c.stride, c.pad, c.dil, c.groups)
                .unwrap()
                .mul(&rw)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = loss(xv.as_tensor(), wv.as_tensor(), bv.as_tensor())
            .backward()
            .unwrap();
        let (xs, ws, bs) = (flat(&x), flat(&w), flat(&b));
        let t = |v: &[f64], d: &[usize]| Tensor::from_slice(v, d, &Device::Cpu).unwrap();
        let scalar = |t: Tensor| t.to_scalar::<f64>().unwrap();
        let fx = fd_grad(&xs, &|v| scalar(loss(&t(v, x.dims()), &w, &b)));
        let fw = fd_grad(&ws, &|v| scalar(loss(&x, &t(v, w.dims()), &b)));
        let fb = fd_grad(&bs, &|v| scalar(loss(&x, &w, &t(v, b.dims()))));
        assert_close(
            &flat(grads.get(&xv).unwrap()),
            &fx,
            1e-7,
            &format!("dx {c:?}"),
        );
        assert_close(
            &flat(grads.get(&wv).unwrap()),
            &fw,
            1e-7,
            &format!("dw {c:?}"),
        );
        assert_close(
            &flat(grads.get(&bv).unwrap()),
            &fb,
            1e-7,
            &format!("db {c:?}"),
        );
    }
}

#[test]
fn conv2d_f32_gradients_match_candle() {
    let mut r = aimass::device::rng(9);
    let (n, c, h, w, o) = (8, 6, 9, 9, 10);
    let x = randt(&mut r, &[n, c, h, w]).to_dtype(DType::F32).unwrap();
    let wt = randt(&mut r, &[o, c, 3, 3]).to_dtype(DType::F32).unwrap();
    let rw = randt(&mut r, &[n, o, 5, 5]).to_dtype(DType::F32).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let wv = Var::from_tensor(&wt).unwrap();
    let g1 = kernels::conv2d(
        xv.as_tensor(),
        wv.as_tensor(),
        None,
        (2, 2),
        (1, 1),
        (1, 1),
        1,
    )
    .unwrap()
    .mul(&rw)
    .unwrap()
    .sum_all()
    .unwrap()
    .backward()
    .unwrap();
    let g2 = xv
        .as_tensor()
        .conv2d(wv.as_tensor(), 1, 2, 1, 1)
        .unwrap()
        .mul(&rw)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for v in [&xv, &wv] {
        let a = flat(g1.get(v).unwrap());
        let b = flat(g2.get(v).unwrap());
        assert_close(&a, &b, 1e-5, "f32 grad vs candle");
    }
}

#[test]
fn conv2d_rejects_bad_arguments() {
    let x = Tensor::zeros((1, 4, 5, 5), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let k = kernels::conv2d;
    assert!(k(&x, &w, None, (0, 1), (0, 0), (1, 1), 1).is_err());
    assert!(k(&x, &w, None, (1, 1), (0, 0), (0, 1), 1).is_err());
    assert!(k(&x, &w, None, (1, 1), (0, 0), (1, 1), 0).is_err());
    assert!(k(&x, &w, None, (1, 1), (0, 0), (1, 1), 2).is_err()); // c_in 4 != 4 * 2
    let big = Tensor::zeros((2, 4, 7, 7), DType::F32, &Device::Cpu).unwrap();
    assert!(k(&x, &big, None, (1, 1), (0, 0), (1, 1), 1).is_err());
    let b = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    assert!(k(&x, &w, Some(&b), (1, 1), (0, 0), (1, 1), 1).is_err());
    let xi = Tensor::zeros((1, 4, 5, 5), DType::U32, &Device::Cpu).unwrap();
    assert!(!kernels::supports(&xi));
    assert!(k(&xi, &w, None, (1, 1), (0, 0), (1, 1), 1).is_err());
    let x64 = x.to_dtype(DType::F64).unwrap();
    assert!(k(&x64, &w, None, (1, 1), (0, 0), (1, 1), 1).is_err());
    let x3 = Tensor::zeros((4, 5, 5), DType::F32, &Device::Cpu).unwrap();
    assert!(k(&x3, &w, None, (1, 1), (0, 0), (1, 1), 1).is_err());
}
