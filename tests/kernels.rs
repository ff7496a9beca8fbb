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
    // "Same" 3x3 convolutions with at least 8 channels each way run the
    // Winograd form (forward and both gradients): odd and even sizes.
    v.push(Case { c: 8, o: 9, ..base });
    v.push(Case {
        n: 3,
        c: 9,
        h: 4,
        w: 5,
        o: 8,
        ..base
    });
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
    // Stride 1 with an even, non-square kernel and asymmetric padding, and
    // with padding beyond the kernel's reach.
    v.push(Case {
        kh: 2,
        kw: 3,
        pad: (1, 0),
        ..base
    });
    v.push(Case {
        pad: (3, 2),
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

/// Direct-loop pooling in f64 over the padded input: max (padding = -inf)
/// or average (padding = 0, divided by the full window size).
fn naive_pool(
    x: &[f64],
    (n, c, h, w): (usize, usize, usize, usize),
    k: (usize, usize),
    s: (usize, usize),
    p: (usize, usize),
    max: bool,
) -> (Vec<f64>, (usize, usize)) {
    let oh = (h + 2 * p.0 - k.0) / s.0 + 1;
    let ow = (w + 2 * p.1 - k.1) / s.1 + 1;
    let mut y = Vec::new();
    for plane in 0..n * c {
        for i in 0..oh {
            for j in 0..ow {
                let mut acc = if max { f64::NEG_INFINITY } else { 0.0 };
                for a in 0..k.0 {
                    for b in 0..k.1 {
                        let (r, q) = (
                            (i * s.0 + a) as isize - p.0 as isize,
                            (j * s.1 + b) as isize - p.1 as isize,
                        );
                        let v = if r < 0 || q < 0 || r >= h as isize || q >= w as isize {
                            if max {
                                f64::NEG_INFINITY
                            } else {
                                0.0
                            }
                        } else {
                            x[plane * h * w + r as usize * w + q as usize]
                        };
                        acc = if max { acc.max(v) } else { acc + v };
                    }
                }
                y.push(if max { acc } else { acc / (k.0 * k.1) as f64 });
            }
        }
    }
    (y, (oh, ow))
}

type PoolCase = ((usize, usize), (usize, usize), (usize, usize));

fn pool_cases() -> Vec<PoolCase> {
    vec![
        ((2, 2), (2, 2), (0, 0)),
        ((3, 3), (2, 2), (1, 1)),
        ((3, 3), (1, 1), (1, 1)),
        ((3, 2), (2, 1), (1, 0)),
        ((2, 2), (1, 1), (1, 0)),
        ((3, 3), (3, 3), (0, 1)),
        ((1, 1), (2, 2), (0, 0)),
    ]
}

#[test]
fn pooling_values_match_naive_loops_and_candle() {
    let mut r = aimass::device::rng(11);
    for (i, &(k, s, p)) in pool_cases().iter().enumerate() {
        // Widths up to 35: 17 windows per row, past one 8-lane block of the
        // 2x2 row kernels.
        for &(h, w) in &[(7usize, 5usize), (8, 8), (4, 9), (3, 35)] {
            let dims = (3, 2, h, w);
            let x = randt(&mut r, &[3, 2, h, w]);
            for max in [true, false] {
                let (want, (oh, ow)) = naive_pool(&flat(&x), dims, k, s, p, max);
                let f = if max {
                    kernels::max_pool2d
                } else {
                    kernels::avg_pool2d
                };
                let y = f(&x, k, s, p).unwrap();
                assert_eq!(y.dims(), &[3, 2, oh, ow], "case {i}");
                assert!(
                    max_abs_diff(&flat(&y), &want) < 1e-12,
                    "case {i} max {max} {h}x{w}"
                );
                let y32 = f(&x.to_dtype(DType::F32).unwrap(), k, s, p).unwrap();
                assert!(
                    max_abs_diff(&flat(&y32), &want) < 1e-6,
                    "case {i} max {max} f32"
                );
                if p == (0, 0) {
                    let c = if max {
                        x.max_pool2d_with_stride(k, s)
                    } else {
                        x.avg_pool2d_with_stride(k, s)
                    };
                    assert!(
                        max_abs_diff(&flat(&y), &flat(&c.unwrap())) < 1e-12,
                        "case {i} vs candle"
                    );
                }
            }
        }
    }
}

#[test]
fn max_pool_nan_wins_as_in_torch() {
    // A NaN is the maximum of its window (the last NaN, as torch's CPU
    // kernel scans), on the 2x2 fast path and on the general path (3x3).
    let nan = f32::NAN;
    let x = Tensor::new(
        &[[[
            [1f32, nan, 0., 1.],
            [3., 4., 5., 2.],
            [nan, 1., 0., 0.],
            [nan, 2., 0., 0.],
        ]]],
        &Device::Cpu,
    )
    .unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let y = kernels::max_pool2d(xv.as_tensor(), (2, 2), (2, 2), (0, 0)).unwrap();
    let yv = flat(&y);
    assert!(yv[0].is_nan() && yv[2].is_nan());
    assert_eq!((yv[1], yv[3]), (5.0, 0.0));
    let g = y.sum_all().unwrap().backward().unwrap();
    let gx = flat(g.get(&xv).unwrap());
    let hot: Vec<usize> = (0..16).filter(|&i| gx[i] != 0.0).collect();
    assert_eq!(hot, vec![1, 6, 10, 12]);
    let y3 = kernels::max_pool2d(&x, (3, 3), (1, 1), (0, 0)).unwrap();
    let y3 = flat(&y3);
    assert!(y3[..3].iter().all(|v| v.is_nan()) && y3[3] == 5.0, "{y3:?}");
}

#[test]
fn max_pool_2x2_rows_longer_than_a_vector_keep_ties_and_nan() {
    // One 2 x 34 plane (17 windows): each window's maximum is its top-right
    // value, except window 10 (a NaN below) and window 12 (a tie on top:
    // the first of the two wins).
    let w = 34;
    let mut v: Vec<f32> = (0..w).map(|c| c as f32).collect();
    v.extend((0..w).map(|c| c as f32 - 0.5));
    v[w + 20] = f32::NAN;
    v[24] = 100.0;
    v[25] = 100.0;
    let xv = Var::from_tensor(&Tensor::from_vec(v, (1, 1, 2, w), &Device::Cpu).unwrap()).unwrap();
    let y = kernels::max_pool2d(xv.as_tensor(), (2, 2), (2, 2), (0, 0)).unwrap();
    let yv = flat(&y);
    for (j, got) in yv.iter().enumerate() {
        match j {
            10 => assert!(got.is_nan()),
            12 => assert_eq!(*got, 100.0),
            _ => assert_eq!(*got, (2 * j + 1) as f64),
        }
    }
    let g = y.sum_all().unwrap().backward().unwrap();
    let gx = flat(g.get(&xv).unwrap());
    let hot: Vec<usize> = (0..2 * w).filter(|&i| gx[i] != 0.0).collect();
    let mut want: Vec<usize> = (0..17)
        .map(|j| match j {
            10 => w + 20,
            12 => 24,
            _ => 2 * j + 1,
        })
        .collect();
    want.sort();
    assert_eq!(hot, want);
}

#[test]
fn max_pool_gradient_goes_whole_to_the_first_maximum() {
    // Hand-derived: 2x2 windows, stride 2; each window's max gets the whole
    // upstream gradient (candle's own max_pool2d backward gives 1/4 here).
    let x = Tensor::new(
        &[[[
            [1f32, 5., 2., 2.],
            [3., 4., 2., 0.],
            [0., 0., 9., 1.],
            [7., 0., 1., 1.],
        ]]],
        &Device::Cpu,
    )
    .unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let y = kernels::max_pool2d(xv.as_tensor(), (2, 2), (2, 2), (0, 0)).unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![5., 2., 7., 9.]
    );
    let g = (y * Tensor::new(&[[[[10f32, 20.], [30., 40.]]]], &Device::Cpu).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let want = [
        0., 10., 20., 0., 0., 0., 0., 0., 0., 0., 40., 0., 30., 0., 0., 0.,
    ];
    assert_eq!(flat(g.get(&xv).unwrap()), want.to_vec());
    // Overlapping windows add up: 3x3 stride 1 over a single peak.
    let mut v = vec![0f64; 25];
    v[12] = 1.0;
    let xv = Var::from_tensor(&Tensor::from_vec(v, (1, 1, 5, 5), &Device::Cpu).unwrap()).unwrap();
    let g = kernels::max_pool2d(xv.as_tensor(), (3, 3), (1, 1), (1, 1))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(flat(g.get(&xv).unwrap())[12], 9.0);
}

#[test]
fn pooling_gradients_match_finite_differences() {
    let mut r = aimass::device::rng(12);
    for (i, &(k, s, p)) in pool_cases().iter().enumerate() {
        let x = randt(&mut r, &[2, 2, 7, 6]);
        for max in [true, false] {
            let f = if max {
                kernels::max_pool2d
            } else {
                kernels::avg_pool2d
            };
            let y0 = f(&x, k, s, p).unwrap();
            let rw = randt(&mut r, y0.dims());
            let loss = |x: &Tensor| f(x, k, s, p).unwrap().mul(&rw).unwrap().sum_all().unwrap();
            let xv = Var::from_tensor(&x).unwrap();
            let g = loss(xv.as_tensor()).backward().unwrap();
            let xs = flat(&x);
            let fx = fd_grad(&xs, &|v| {
                loss(&Tensor::from_slice(v, x.dims(), &Device::Cpu).unwrap())
                    .to_scalar::<f64>()
                    .unwrap()
            });
            assert_close(
                &flat(g.get(&xv).unwrap()),
                &fx,
                1e-7,
                &format!("pool case {i} max {max}"),
            );
        }
    }
}

#[test]
fn pooling_rejects_bad_arguments() {
    let x = Tensor::zeros((1, 2, 5, 5), DType::F32, &Device::Cpu).unwrap();
    for f in [kernels::max_pool2d, kernels::avg_pool2d] {
        assert!(f(&x, (0, 2), (1, 1), (0, 0)).is_err());
        assert!(f(&x, (2, 2), (0, 1), (0, 0)).is_err());
        assert!(f(&x, (2, 2), (1, 1), (2, 0)).is_err()); // padding over half the kernel
        assert!(f(&x, (6, 6), (1, 1), (0, 0)).is_err()); // window larger than input
        assert!(f(&x.flatten_all().unwrap(), (2, 2), (1, 1), (0, 0)).is_err());
        assert!(f(&x.to_dtype(DType::BF16).unwrap(), (2, 2), (1, 1), (0, 0)).is_err());
        let empty = Tensor::zeros((1, 2, 0, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(f(&empty, (1, 1), (1, 1), (0, 0)).is_err());
    }
}

/// Direct-loop BatchNorm (training) in f64.
fn naive_bn(
    x: &[f64],
    dims: &[usize],
    g: &[f64],
    b: &[f64],
    eps: f64,
    relu: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (n, c) = (dims[0], dims[1]);
    let hw: usize = dims[2..].iter().product();
    let m = (n * hw) as f64;
    let idx = |i: usize, ch: usize, j: usize| (i * c + ch) * hw + j;
    let mut y = vec![0.0; x.len()];
    let (mut means, mut vars) = (vec![], vec![]);
    for ch in 0..c {
        let mut s = 0.0;
        for i in 0..n {
            for j in 0..hw {
                s += x[idx(i, ch, j)];
            }
        }
        let mean = s / m;
        let mut v = 0.0;
        for i in 0..n {
            for j in 0..hw {
                v += (x[idx(i, ch, j)] - mean).powi(2);
            }
        }
        let var = v / m;
        for i in 0..n {
            for j in 0..hw {
                let t = (x[idx(i, ch, j)] - mean) / (var + eps).sqrt() * g[ch] + b[ch];
                y[idx(i, ch, j)] = if relu { t.max(0.0) } else { t };
            }
        }
        means.push(mean);
        vars.push(var);
    }
    (y, means, vars)
}

const BN_SHAPES: &[&[usize]] = &[
    &[4, 3, 5, 5],
    &[6, 4],
    &[3, 2, 7],
    &[2, 5, 3, 1],
    &[1, 3, 4, 4],
    // More than 64 images: several images per chunk of the reductions.
    &[70, 2, 3],
    // Planes of 42: the 16-lane loops plus a tail.
    &[3, 4, 6, 7],
];

#[test]
fn batch_norm_values_and_statistics_match_naive_loops() {
    let mut r = aimass::device::rng(21);
    for dims in BN_SHAPES {
        let c = dims[1];
        let x = (randt(&mut r, dims) * 3.0).unwrap() + 0.5;
        let x = x.unwrap();
        let g = randt(&mut r, &[c]);
        let b = randt(&mut r, &[c]);
        for relu in [false, true] {
            let (want, mean, var) = naive_bn(&flat(&x), dims, &flat(&g), &flat(&b), 1e-5, relu);
            let f = if relu {
                kernels::batch_norm_relu_train
            } else {
                kernels::batch_norm_train
            };
            let out = f(&x, Some(&g), Some(&b), 1e-5).unwrap();
            assert_eq!(out.output.dims(), *dims);
            assert!(
                max_abs_diff(&flat(&out.output), &want) < 1e-10,
                "{dims:?} relu {relu}"
            );
            assert!(max_abs_diff(&flat(&out.mean), &mean) < 1e-12);
            assert!(max_abs_diff(&flat(&out.var), &var) < 1e-12);
            assert_eq!(out.count, x.elem_count() / c);
            let o32 = f(
                &x.to_dtype(DType::F32).unwrap(),
                Some(&g.to_dtype(DType::F32).unwrap()),
                Some(&b.to_dtype(DType::F32).unwrap()),
                1e-5,
            )
            .unwrap();
            assert!(max_abs_diff(&flat(&o32.output), &want) < 1e-4);
        }
        // No affine parameters: weight 1, bias 0.
        let ones = vec![1.0; c];
        let zeros = vec![0.0; c];
        let (want, _, _) = naive_bn(&flat(&x), dims, &ones, &zeros, 1e-3, false);
        let out = kernels::batch_norm_train(&x, None, None, 1e-3).unwrap();
        assert!(max_abs_diff(&flat(&out.output), &want) < 1e-10);
    }
}

#[test]
fn batch_norm_statistics_stay_accurate_with_a_large_offset() {
    let mut r = aimass::device::rng(22);
    let x = (randt(&mut r, &[64, 2, 8, 8]) + 1e4).unwrap();
    let (_, mean, var) = naive_bn(
        &flat(&x),
        &[64, 2, 8, 8],
        &[1.0, 1.0],
        &[0.0, 0.0],
        1e-5,
        false,
    );
    let out =
        kernels::batch_norm_train(&x.to_dtype(DType::F32).unwrap(), None, None, 1e-5).unwrap();
    let (m, v) = (flat(&out.mean), flat(&out.var));
    for ch in 0..2 {
        assert!(
            (m[ch] - mean[ch]).abs() < 1e-2,
            "mean {} vs {}",
            m[ch],
            mean[ch]
        );
        assert!(
            (v[ch] - var[ch]).abs() < 1e-3 * var[ch],
            "var {} vs {}",
            v[ch],
            var[ch]
        );
    }
}

#[test]
fn batch_norm_gradients_match_finite_differences() {
    let mut r = aimass::device::rng(23);
    for dims in BN_SHAPES {
        let c = dims[1];
        let x = randt(&mut r, dims);
        let g = randt(&mut r, &[c]);
        let b = randt(&mut r, &[c]);
        let rw = randt(&mut r, dims);
        for relu in [false, true] {
            let f = if relu {
                kernels::batch_norm_relu_train
            } else {
                kernels::batch_norm_train
            };
            let loss = |x: &Tensor, g: &Tensor, b: &Tensor| {
                f(x, Some(g), Some(b), 1e-3)
                    .unwrap()
                    .output
                    .mul(&rw)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let (xv, gv, bv) = (
                Var::from_tensor(&x).unwrap(),
                Var::from_tensor(&g).unwrap(),
                Var::from_tensor(&b).unwrap(),
            );
            let grads = loss(xv.as_tensor(), gv.as_tensor(), bv.as_tensor())
                .backward()
                .unwrap();
            let t = |v: &[f64], d: &[usize]| Tensor::from_slice(v, d, &Device::Cpu).unwrap();
            let sc = |t: Tensor| t.to_scalar::<f64>().unwrap();
            let fx = fd_grad(&flat(&x), &|v| sc(loss(&t(v, x.dims()), &g, &b)));
            let fg = fd_grad(&flat(&g), &|v| sc(loss(&x, &t(v, g.dims()), &b)));
            let fb = fd_grad(&flat(&b), &|v| sc(loss(&x, &g, &t(v, b.dims()))));
            let what = format!("bn {dims:?} relu {relu}");
            assert_close(&flat(grads.get(&xv).unwrap()), &fx, 1e-6, &what);
            assert_close(&flat(grads.get(&gv).unwrap()), &fg, 1e-6, &what);
            assert_close(&flat(grads.get(&bv).unwrap()), &fb, 1e-6, &what);
        }
    }
}

#[test]
fn batch_norm_rejects_bad_arguments() {
    let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let w2 = Tensor::ones(2, DType::F32, &Device::Cpu).unwrap();
    assert!(kernels::batch_norm_train(&x, Some(&w2), None, 1e-5).is_err());
    assert!(kernels::batch_norm_train(&x, None, Some(&w2), 1e-5).is_err());
    assert!(kernels::batch_norm_train(&x, None, None, -1.0).is_err());
    assert!(kernels::batch_norm_train(&x, None, None, f64::NAN).is_err());
    assert!(kernels::batch_norm_train(&x.flatten_all().unwrap(), None, None, 1e-5).is_err());
    let w64 = Tensor::ones(3, DType::F64, &Device::Cpu).unwrap();
    assert!(kernels::batch_norm_train(&x, Some(&w64), None, 1e-5).is_err());
    let empty = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(kernels::batch_norm_train(&empty, None, None, 1e-5).is_err());
}

/// BatchNorm (training) written with candle's own tensor ops: the output,
/// the batch mean and the biased batch variance.
fn candle_bn(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> (Tensor, Tensor, Tensor) {
    let c = x.dim(1).unwrap();
    let shape: Vec<usize> = (0..x.rank()).map(|i| if i == 1 { c } else { 1 }).collect();
    let red: Vec<usize> = (0..x.rank()).filter(|&i| i != 1).collect();
    let m = (x.elem_count() / c) as f64;
    let mean = (x.sum_keepdim(red.clone()).unwrap() / m).unwrap();
    let xc = x.broadcast_sub(&mean).unwrap();
    let var = (xc.sqr().unwrap().sum_keepdim(red).unwrap() / m).unwrap();
    let y = xc
        .broadcast_div(&(&var + eps).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&g.reshape(shape.clone()).unwrap())
        .unwrap()
        .broadcast_add(&b.reshape(shape).unwrap())
        .unwrap();
    (y, mean.flatten_all().unwrap(), var.flatten_all().unwrap())
}

#[test]
fn batch_norm_add_relu_matches_candle_composition() {
    let mut r = aimass::device::rng(24);
    for dims in BN_SHAPES {
        let c = dims[1];
        let x = ((randt(&mut r, dims) * 3.0).unwrap() + 0.5).unwrap();
        let g = randt(&mut r, &[c]);
        let b = randt(&mut r, &[c]);
        let s = randt(&mut r, dims);
        let (bn, mean, var) = candle_bn(&x, &g, &b, 1e-5);
        let want = flat(&(bn + &s).unwrap().relu().unwrap());
        assert!(want.contains(&0.0) && want.iter().any(|v| *v > 0.0));
        for (dt, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            let cast = |t: &Tensor| t.to_dtype(dt).unwrap();
            let out = kernels::batch_norm_add_relu_train(
                &cast(&x),
                Some(&cast(&g)),
                Some(&cast(&b)),
                &cast(&s),
                1e-5,
            )
            .unwrap();
            assert_eq!(out.output.dims(), *dims);
            assert_eq!(out.output.dtype(), dt);
            let d = max_abs_diff(&flat(&out.output), &want);
            assert!(d < tol, "{dims:?} {dt:?}: max diff {d}");
            // The statistics are those of x, not of x + shortcut.
            assert!(max_abs_diff(&flat(&out.mean), &flat(&mean)) < tol);
            assert!(max_abs_diff(&flat(&out.var), &flat(&var)) < tol);
            assert_eq!(out.count, x.elem_count() / c);
        }
        // No affine parameters: weight 1, bias 0.
        let (ones, zeros) = (
            Tensor::ones(c, DType::F64, &Device::Cpu).unwrap(),
            Tensor::zeros(c, DType::F64, &Device::Cpu).unwrap(),
        );
        let (bn, _, _) = candle_bn(&x, &ones, &zeros, 1e-3);
        let want = flat(&(bn + &s).unwrap().relu().unwrap());
        let out = kernels::batch_norm_add_relu_train(&x, None, None, &s, 1e-3).unwrap();
        assert!(max_abs_diff(&flat(&out.output), &want) < 1e-10);
    }
    // A strided (transposed) shortcut.
    let x = randt(&mut r, &[4, 3, 5, 6]);
    let s = randt(&mut r, &[4, 5, 3, 6]).transpose(1, 2).unwrap();
    assert!(!s.is_contiguous());
    let (g, b) = (randt(&mut r, &[3]), randt(&mut r, &[3]));
    let (bn, _, _) = candle_bn(&x, &g, &b, 1e-5);
    let want = flat(&(bn + &s).unwrap().relu().unwrap());
    let out = kernels::batch_norm_add_relu_train(&x, Some(&g), Some(&b), &s, 1e-5).unwrap();
    assert!(max_abs_diff(&flat(&out.output), &want) < 1e-10);
}

#[test]
fn batch_norm_add_relu_gradients_match_finite_differences() {
    let mut r = aimass::device::rng(25);
    for dims in BN_SHAPES {
        let c = dims[1];
        let x = randt(&mut r, dims);
        let g = randt(&mut r, &[c]);
        let b = randt(&mut r, &[c]);
        let s = randt(&mut r, dims);
        let rw = randt(&mut r, dims);
        let loss = |x: &Tensor, g: &Tensor, b: &Tensor, s: &Tensor| {
            kernels::batch_norm_add_relu_train(x, Some(g), Some(b), s, 1e-3)
                .unwrap()
                .output
                .mul(&rw)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let var = |t: &Tensor| Var::from_tensor(t).unwrap();
        let (xv, gv, bv, sv) = (var(&x), var(&g), var(&b), var(&s));
        let grads = loss(
            xv.as_tensor(),
            gv.as_tensor(),
            bv.as_tensor(),
            sv.as_tensor(),
        )
        .backward()
        .unwrap();
        let t = |v: &[f64], d: &[usize]| Tensor::from_slice(v, d, &Device::Cpu).unwrap();
        let sc = |t: Tensor| t.to_scalar::<f64>().unwrap();
        let fx = fd_grad(&flat(&x), &|v| sc(loss(&t(v, x.dims()), &g, &b, &s)));
        let fg = fd_grad(&flat(&g), &|v| sc(loss(&x, &t(v, g.dims()), &b, &s)));
        let fb = fd_grad(&flat(&b), &|v| sc(loss(&x, &g, &t(v, b.dims()), &s)));
        let fs = fd_grad(&flat(&s), &|v| sc(loss(&x, &g, &b, &t(v, s.dims()))));
        let what = format!("bn add relu {dims:?}");
        let gx = flat(grads.get(&xv).unwrap());
        let gs = flat(grads.get(&sv).unwrap());
        assert_close(&gx, &fx, 1e-6, &what);
        assert_close(&flat(grads.get(&gv).unwrap()), &fg, 1e-6, &what);
        assert_close(&flat(grads.get(&bv).unwrap()), &fb, 1e-6, &what);
        assert_close(&gs, &fs, 1e-6, &what);
        // Only some operands tracked: the same gradients.
        let xv = var(&x);
        let only_x = loss(xv.as_tensor(), &g, &b, &s).backward().unwrap();
        assert!(max_abs_diff(&flat(only_x.get(&xv).unwrap()), &gx) < 1e-12);
        let sv = var(&s);
        let only_s = loss(&x, &g, &b, sv.as_tensor()).backward().unwrap();
        assert!(max_abs_diff(&flat(only_s.get(&sv).unwrap()), &gs) < 1e-12);
    }
}

#[test]
fn batch_norm_add_relu_rejects_bad_arguments() {
    let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let f = |s: &Tensor| kernels::batch_norm_add_relu_train(&x, None, None, s, 1e-5);
    let shape_err = |r: aimass::Result<kernels::BatchNormTrainOutput>| {
        matches!(r, Err(aimass::Error::Shape { .. }))
    };
    let invalid = |r: aimass::Result<kernels::BatchNormTrainOutput>| {
        matches!(r, Err(aimass::Error::InvalidArgument { .. }))
    };
    assert!(shape_err(f(&Tensor::zeros(
        (2, 3, 4, 5),
        DType::F32,
        &Device::Cpu
    )
    .unwrap())));
    // Same number of values, other shape.
    assert!(shape_err(f(&Tensor::zeros(
        (2, 3, 16),
        DType::F32,
        &Device::Cpu
    )
    .unwrap())));
    assert!(shape_err(f(&Tensor::zeros(
        (2, 3, 4),
        DType::F32,
        &Device::Cpu
    )
    .unwrap())));
    assert!(invalid(f(&Tensor::zeros(
        (2, 3, 4, 4),
        DType::F64,
        &Device::Cpu
    )
    .unwrap())));
    assert!(invalid(f(&Tensor::zeros(
        (2, 3, 4, 4),
        DType::U32,
        &Device::Cpu
    )
    .unwrap())));
    // The BatchNorm checks still apply.
    let w2 = Tensor::ones(2, DType::F32, &Device::Cpu).unwrap();
    assert!(shape_err(kernels::batch_norm_add_relu_train(
        &x,
        Some(&w2),
        None,
        &x,
        1e-5
    )));
    assert!(invalid(kernels::batch_norm_add_relu_train(
        &x, None, None, &x, -1.0
    )));
    assert!(f(&x).is_ok());
}

#[test]
fn fused_conv_relu_and_relu_match_references_and_finite_differences() {
    for (i, c) in cases().iter().enumerate().step_by(2) {
        let (x, w) = case_tensors(c, 300 + i as u64);
        let mut r = aimass::device::rng(400 + i as u64);
        let b = randt(&mut r, &[c.o]);
        let conv = kernels::conv2d(&x, &w, Some(&b), c.stride, c.pad, c.dil, c.groups).unwrap();
        let want: Vec<f64> = flat(&conv).iter().map(|v| v.max(0.0)).collect();
        let got = kernels::conv2d_relu(&x, &w, Some(&b), c.stride, c.pad, c.dil, c.groups).unwrap();
        assert!(max_abs_diff(&flat(&got), &want) < 1e-12, "{c:?}");
        let got_nb = kernels::conv2d_relu(&x, &w, None, c.stride, c.pad, c.dil, c.groups).unwrap();
        let conv_nb = kernels::conv2d(&x, &w, None, c.stride, c.pad, c.dil, c.groups).unwrap();
        assert!(max_abs_diff(&flat(&got_nb), &flat(&conv_nb.relu().unwrap())) < 1e-12);
        assert!(max_abs_diff(&flat(&kernels::relu(&conv).unwrap()), &want) < 1e-12);

        let rw = randt(&mut r, conv.dims());
        let loss = |x: &Tensor, w: &Tensor, b: &Tensor| {
            kernels::conv2d_relu(x, w, Some(b), c.stride, c.pad, c.dil, c.groups)
                .unwrap()
                .mul(&rw)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let (xv, wv, bv) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&w).unwrap(),
            Var::from_tensor(&b).unwrap(),
        );
        let g = loss(xv.as_tensor(), wv.as_tensor(), bv.as_tensor())
            .backward()
            .unwrap();
        let t = |v: &[f64], d: &[usize]| Tensor::from_slice(v, d, &Device::Cpu).unwrap();
        let sc = |t: Tensor| t.to_scalar::<f64>().unwrap();
        let fx = fd_grad(&flat(&x), &|v| sc(loss(&t(v, x.dims()), &w, &b)));
        let fw = fd_grad(&flat(&w), &|v| sc(loss(&x, &t(v, w.dims()), &b)));
        let fb = fd_grad(&flat(&b), &|v| sc(loss(&x, &w, &t(v, b.dims()))));
        assert_close(
            &flat(g.get(&xv).unwrap()),
            &fx,
            1e-7,
            &format!("relu dx {c:?}"),
        );
        assert_close(
            &flat(g.get(&wv).unwrap()),
            &fw,
            1e-7,
            &format!("relu dw {c:?}"),
        );
        assert_close(
            &flat(g.get(&bv).unwrap()),
            &fb,
            1e-7,
            &format!("relu db {c:?}"),
        );

        // Standalone relu: gradient is the upstream gradient where x > 0.
        let cv = Var::from_tensor(&conv).unwrap();
        let g = kernels::relu(cv.as_tensor())
            .unwrap()
            .mul(&rw)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let want: Vec<f64> = flat(&conv)
            .iter()
            .zip(flat(&rw))
            .map(|(v, r)| if *v > 0.0 { r } else { 0.0 })
            .collect();
        assert_eq!(flat(g.get(&cv).unwrap()), want);
    }
}

#[test]
fn empty_batches_give_empty_outputs_and_gradients() {
    let x =
        Var::from_tensor(&Tensor::zeros((0, 3, 6, 6), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let w =
        Var::from_tensor(&Tensor::ones((4, 3, 3, 3), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::ones(4, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let y = kernels::conv2d(&x, &w, Some(&b), (2, 2), (1, 1), (1, 1), 1).unwrap();
    assert_eq!(y.dims(), &[0, 4, 3, 3]);
    let p = kernels::max_pool2d(&y, (2, 2), (1, 1), (0, 0)).unwrap();
    assert_eq!(p.dims(), &[0, 4, 2, 2]);
    let g = p.sum_all().unwrap().backward().unwrap();
    assert_eq!(flat(g.get(&w).unwrap()), vec![0.0; 4 * 27]);
    assert_eq!(flat(g.get(&b).unwrap()), vec![0.0; 4]);
}

#[test]
fn huge_arguments_are_errors_not_overflows() {
    let x = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let big = usize::MAX / 2 + 1;
    assert!(kernels::max_pool2d(&x, (2, 2), (1, 1), (big, 0)).is_err());
    assert!(kernels::avg_pool2d(&x, (big, 2), (1, 1), (0, 0)).is_err());
    assert!(kernels::conv2d(&x, &w, None, (1, 1), (big, 0), (1, 1), 1).is_err());
    assert!(kernels::conv2d(&x, &w, None, (1, 1), (0, 0), (big, 1), 1).is_err());
    assert!(kernels::conv2d(&x, &w, None, (big, 1), (0, 0), (1, 1), 1).is_ok());
}
