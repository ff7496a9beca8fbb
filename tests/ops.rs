//! Values and first-order gradients of `aimass::ops` against independent
//! references (hand-derived values, candle's forward ops, central finite
//! differences in f64), and the candle 0.11 defects these ops replace.

mod common;

use aimass::candle::{DType, Device, Tensor, Var, D};
use aimass::ops;
use common::{check_grad, randt};

const H: f64 = 1e-6;
const TOL: f64 = 1e-6;

fn v2(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

#[test]
fn softmax_family_values() {
    let x = Tensor::new(
        &[[1.0f64, 2.0, 3.0], [1000.0, 1000.0, -1000.0]],
        &Device::Cpu,
    )
    .unwrap();
    let p = v2(&ops::softmax(&x, 1).unwrap());
    let z: f64 = [1f64, 2., 3.].iter().map(|v| v.exp()).sum();
    assert!((p[0][2] - 3f64.exp() / z).abs() < 1e-15);
    assert!(
        (p[1][0] - 0.5).abs() < 1e-15 && p[1][2] == 0.0,
        "large logits must not overflow: {:?}",
        p[1]
    );
    let lp = v2(&ops::log_softmax(&x, 1).unwrap());
    assert!((lp[0][0] - (1.0 - z.ln())).abs() < 1e-14);
    assert!((lp[1][0] + std::f64::consts::LN_2).abs() < 1e-12 && lp[1][2].is_finite());
    let lse = ops::logsumexp(&x, 1, false)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!(
        (lse[0] - z.ln()).abs() < 1e-14
            && (lse[1] - (1000.0 + std::f64::consts::LN_2)).abs() < 1e-9
    );
    // Along dim 0 and with keepdim.
    let k = ops::logsumexp(&x, 0, true).unwrap();
    assert_eq!(k.dims(), &[1, 3]);
    // A row of -inf stays finite where torch's is (shift by 0, not by -inf).
    let m = Tensor::new(&[[f64::NEG_INFINITY, 0.0]], &Device::Cpu).unwrap();
    assert_eq!(v2(&ops::softmax(&m, 1).unwrap())[0], vec![0.0, 1.0]);
    // softmax_last_dim equals candle-nn's forward.
    let r = randt(&[3, 5], 1).to_dtype(DType::F32).unwrap();
    let ours = ops::softmax_last_dim(&r).unwrap();
    let theirs = aimass::candle_nn::ops::softmax_last_dim(&r).unwrap();
    let d = (ours - theirs)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-6);
}

#[test]
fn softmax_family_gradients() {
    let x = randt(&[3, 4], 2);
    let w = randt(&[3, 4], 3);
    check_grad(
        std::slice::from_ref(&x),
        |t| Ok(ops::softmax(&t[0], 1)?.mul(&w)?.sum_all()?),
        H,
        TOL,
    );
    check_grad(
        std::slice::from_ref(&x),
        |t| Ok(ops::softmax(&t[0], 0)?.mul(&w)?.sum_all()?),
        H,
        TOL,
    );
    check_grad(
        std::slice::from_ref(&x),
        |t| Ok(ops::log_softmax(&t[0], D::Minus1)?.mul(&w)?.sum_all()?),
        H,
        TOL,
    );
    check_grad(
        std::slice::from_ref(&x),
        |t| Ok(ops::logsumexp(&t[0], 1, false)?.sqr()?.sum_all()?),
        H,
        TOL,
    );
    check_grad(
        &[x],
        |t| Ok(ops::softmax_last_dim(&t[0])?.mul(&w)?.sum_all()?),
        H,
        TOL,
    );
}

#[test]
fn normalize_and_cosine() {
    let x = Tensor::new(&[[3.0f64, 4.0], [0.0, 0.0]], &Device::Cpu).unwrap();
    let n = v2(&ops::l2_normalize(&x, 1, 1e-12).unwrap());
    assert_eq!(n, vec![vec![0.6, 0.8], vec![0.0, 0.0]]);
    let a = Tensor::new(&[[1.0f64, 0.0], [1.0, 1.0]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[[0.0f64, 2.0], [2.0, 2.0]], &Device::Cpu).unwrap();
    let c = ops::cosine_similarity(&a, &b, 1, 1e-8)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!(c[0].abs() < 1e-15 && (c[1] - 1.0).abs() < 1e-15);
    let m = v2(&ops::cosine_similarity_matrix(&a, &b).unwrap());
    let s = std::f64::consts::FRAC_1_SQRT_2;
    assert!((m[0][1] - s).abs() < 1e-15 && (m[1][0] - s).abs() < 1e-15);

    let x = randt(&[4, 3], 4);
    let y = randt(&[5, 3], 5);
    let w = randt(&[4, 3], 6);
    check_grad(
        std::slice::from_ref(&x),
        |t| Ok(ops::l2_normalize(&t[0], 1, 1e-12)?.mul(&w)?.sum_all()?),
        H,
        TOL,
    );
    check_grad(
        std::slice::from_ref(&x),
        |t| Ok(ops::l2_normalize(&t[0], 0, 1e-12)?.mul(&w)?.sum_all()?),
        H,
        TOL,
    );
    check_grad(
        &[x.clone(), w.clone()],
        |t| {
            Ok(ops::cosine_similarity(&t[0], &t[1], 1, 1e-8)?
                .sqr()?
                .sum_all()?)
        },
        H,
        TOL,
    );
    check_grad(
        &[x, y],
        |t| {
            Ok(ops::cosine_similarity_matrix(&t[0], &t[1])?
                .sqr()?
                .sum_all()?)
        },
        H,
        TOL,
    );
    // An all-zero row has a finite gradient (plain sqrt would give NaN).
    let z = Var::new(&[[0.0f64, 0.0]], &Device::Cpu).unwrap();
    let g = ops::l2_normalize(z.as_tensor(), 1, 1e-12)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(v2(g.get(&z).unwrap())[0].iter().all(|v| v.is_finite()));
}

#[test]
fn kl_divergence() {
    // Hand-computed: p = (0.5, 0.5, 0), q = (0.25, 0.25, 0.5), batch of 1.
    let p = Tensor::new(&[[0.5f64, 0.5, 0.0]], &Device::Cpu).unwrap();
    let q = Tensor::new(&[[0.25f64, 0.25, 0.5]], &Device::Cpu).unwrap();
    let kl = ops::kl_div(&q.log().unwrap(), &p)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((kl - std::f64::consts::LN_2).abs() < 1e-15, "{kl}");
    // Batch mean: two identical rows give the same value.
    let pp = Tensor::cat(&[&p, &p], 0).unwrap();
    let qq = Tensor::cat(&[&q, &q], 0).unwrap();
    let kl2 = ops::kl_div(&qq.log().unwrap(), &pp)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((kl2 - kl).abs() < 1e-15);
    let logits_s = randt(&[3, 4], 7);
    let logits_t = randt(&[3, 4], 8);
    let a = ops::kl_div(
        &ops::log_softmax(&logits_s, 1).unwrap(),
        &ops::softmax(&logits_t, 1).unwrap(),
    )
    .unwrap();
    let b = ops::kl_div_log_target(
        &ops::log_softmax(&logits_s, 1).unwrap(),
        &ops::log_softmax(&logits_t, 1).unwrap(),
    )
    .unwrap();
    assert!((a.to_scalar::<f64>().unwrap() - b.to_scalar::<f64>().unwrap()).abs() < 1e-14);
    check_grad(
        &[logits_s.clone(), logits_t.clone()],
        |t| ops::kl_div(&ops::log_softmax(&t[0], 1)?, &ops::softmax(&t[1], 1)?),
        H,
        TOL,
    );
    check_grad(
        &[logits_s, logits_t],
        |t| ops::kl_div_log_target(&ops::log_softmax(&t[0], 1)?, &ops::log_softmax(&t[1], 1)?),
        H,
        TOL,
    );
    assert!(ops::kl_div(&q, &randt(&[1, 4], 1)).is_err());
}

#[test]
fn distances_and_off_diagonal() {
    let a = Tensor::new(&[[0.0f64, 0.0], [3.0, 4.0]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[[0.0f64, 4.0]], &Device::Cpu).unwrap();
    assert_eq!(
        v2(&ops::pairwise_squared_distances(&a, &b).unwrap()),
        vec![vec![16.0], vec![9.0]]
    );
    assert_eq!(
        v2(&ops::pairwise_distances(&a, &b, 1e-12).unwrap()),
        vec![vec![4.0], vec![3.0]]
    );
    let m = Tensor::new(
        &[[1.0f64, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]],
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        ops::off_diagonal(&m).unwrap().to_vec1::<f64>().unwrap(),
        vec![2.0, 3.0, 4.0, 6.0, 7.0, 8.0]
    );
    assert!(ops::off_diagonal(&randt(&[2, 3], 1)).is_err());
    assert!(ops::pairwise_distances(&a, &randt(&[2, 3], 1), 1e-12).is_err());

    let x = randt(&[4, 3], 9);
    let y = randt(&[3, 3], 10);
    check_grad(
        &[x.clone(), y.clone()],
        |t| {
            Ok(ops::pairwise_squared_distances(&t[0], &t[1])?
                .sqr()?
                .sum_all()?)
        },
        H,
        TOL,
    );
    check_grad(
        &[x.clone(), y],
        |t| Ok(ops::pairwise_distances(&t[0], &t[1], 1e-12)?.sum_all()?),
        H,
        TOL,
    );
    let w = randt(&[4, 4], 11);
    check_grad(
        &[w],
        |t| Ok(ops::off_diagonal(&t[0])?.sqr()?.sum_all()?),
        H,
        TOL,
    );
    // Distances of a set to itself: zero diagonal with a finite gradient.
    let v = Var::from_tensor(&x).unwrap();
    let g = ops::pairwise_distances(v.as_tensor(), v.as_tensor(), 1e-12)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(v2(g.get(&v).unwrap())
        .iter()
        .flatten()
        .all(|v| v.is_finite()));
}

/// Direct max pooling in plain Rust, the independent reference.
fn max_pool_ref(
    x: &[f64],
    (n, c, h, w): (usize, usize, usize, usize),
    k: (usize, usize),
    s: (usize, usize),
    p: (usize, usize),
) -> Vec<f64> {
    let oh = (h + 2 * p.0 - k.0) / s.0 + 1;
    let ow = (w + 2 * p.1 - k.1) / s.1 + 1;
    let mut out = Vec::new();
    for b in 0..n * c {
        for i in 0..oh {
            for j in 0..ow {
                let mut m = f64::NEG_INFINITY;
                for di in 0..k.0 {
                    for dj in 0..k.1 {
                        let (y, x_) = (
                            (i * s.0 + di) as isize - p.0 as isize,
                            (j * s.1 + dj) as isize - p.1 as isize,
                        );
                        if y >= 0 && x_ >= 0 && (y as usize) < h && (x_ as usize) < w {
                            m = m.max(x[b * h * w + y as usize * w + x_ as usize]);
                        }
                    }
                }
                out.push(m);
            }
        }
    }
    out
}

#[test]
fn pooling_values_and_gradients() {
    for &(shape, k, s, p) in &[
        ((2, 3, 6, 6), (2, 2), (2, 2), (0, 0)),
        ((1, 2, 7, 5), (3, 3), (2, 2), (1, 1)),
        ((2, 1, 5, 6), (3, 2), (1, 2), (1, 0)),
        ((1, 1, 4, 4), (3, 3), (1, 1), (0, 0)),
    ] {
        let dims = [shape.0, shape.1, shape.2, shape.3];
        let x = randt(&dims, 12);
        let xs = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let ours = ops::max_pool2d(&x, k, s, p).unwrap();
        let want = max_pool_ref(&xs, shape, k, s, p);
        assert_eq!(
            ours.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            want,
            "{shape:?} {k:?} {s:?} {p:?}"
        );
        let w = randt(ours.dims(), 13);
        check_grad(
            std::slice::from_ref(&x),
            |t| Ok(ops::max_pool2d(&t[0], k, s, p)?.mul(&w)?.sum_all()?),
            H,
            TOL,
        );
        check_grad(
            std::slice::from_ref(&x),
            |t| Ok(ops::avg_pool2d(&t[0], k, s, p)?.mul(&w)?.sum_all()?),
            H,
            TOL,
        );
    }
    // Average pooling without padding equals candle's forward.
    let x = randt(&[2, 3, 6, 6], 14);
    let a = ops::avg_pool2d(&x, (2, 2), (2, 2), (0, 0)).unwrap();
    let b = x.avg_pool2d(2).unwrap();
    assert!(
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            < 1e-15
    );
    // With padding, zeros count in the average: a corner window of a 3×3 kernel
    // with padding 1 over an all-ones image sees 4 ones out of 9.
    let ones = Tensor::ones((1, 1, 4, 4), DType::F64, &Device::Cpu).unwrap();
    let pooled = ops::avg_pool2d(&ones, (3, 3), (1, 1), (1, 1)).unwrap();
    assert!((pooled.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0] - 4.0 / 9.0).abs() < 1e-15);
    let g = ops::global_avg_pool2d(&x).unwrap();
    assert_eq!(g.dims(), &[2, 3]);
    check_grad(
        &[randt(&[1, 2, 3, 3], 15)],
        |t| Ok(ops::global_avg_pool2d(&t[0])?.sqr()?.sum_all()?),
        H,
        TOL,
    );
    // Bad geometry is an error, not a panic.
    assert!(ops::max_pool2d(&x, (0, 2), (2, 2), (0, 0)).is_err());
    assert!(ops::max_pool2d(&x, (2, 2), (2, 2), (2, 2)).is_err());
    assert!(ops::max_pool2d(&x, (9, 9), (1, 1), (0, 0)).is_err());
    assert!(ops::max_pool2d(&randt(&[3, 3], 1), (2, 2), (2, 2), (0, 0)).is_err());
}

#[test]
fn norms_values_and_gradients() {
    let x = Tensor::new(&[[1.0f64, 2.0, 3.0, 6.0]], &Device::Cpu).unwrap();
    let y = ops::layer_norm(&x, None, None, 0.0)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    // mean 3, biased variance (4 + 1 + 0 + 9) / 4 = 3.5
    let sd = 3.5f64.sqrt();
    for (a, b) in y[0].iter().zip([-2.0, -1.0, 0.0, 3.0]) {
        assert!((a - b / sd).abs() < 1e-15);
    }
    let r = ops::rms_norm(&x, None, 0.0)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let rms = (50.0f64 / 4.0).sqrt();
    assert!((r[0][3] - 6.0 / rms).abs() < 1e-15);
    // Same forward as candle-nn's fused ops.
    let xf = randt(&[3, 8], 16).to_dtype(DType::F32).unwrap();
    let wf = randt(&[8], 17).to_dtype(DType::F32).unwrap();
    let bf = randt(&[8], 18).to_dtype(DType::F32).unwrap();
    let d = (ops::layer_norm(&xf, Some(&wf), Some(&bf), 1e-5).unwrap()
        - aimass::candle_nn::ops::layer_norm(&xf, &wf, &bf, 1e-5).unwrap())
    .unwrap();
    assert!(
        d.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            < 1e-5
    );
    let d = (ops::rms_norm(&xf, Some(&wf), 1e-5).unwrap()
        - aimass::candle_nn::ops::rms_norm(&xf, &wf, 1e-5).unwrap())
    .unwrap();
    assert!(
        d.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            < 1e-5
    );

    let x = randt(&[3, 5], 19);
    let (w, b, m) = (randt(&[5], 20), randt(&[5], 21), randt(&[3, 5], 22));
    check_grad(
        &[x.clone(), w.clone(), b],
        |t| {
            Ok(ops::layer_norm(&t[0], Some(&t[1]), Some(&t[2]), 1e-5)?
                .mul(&m)?
                .sum_all()?)
        },
        H,
        TOL,
    );
    check_grad(
        &[x, w],
        |t| {
            Ok(ops::rms_norm(&t[0], Some(&t[1]), 1e-5)?
                .mul(&m)?
                .sum_all()?)
        },
        H,
        TOL,
    );
    assert!(ops::layer_norm(&randt(&[3, 5], 1), Some(&randt(&[4], 1)), None, 1e-5).is_err());
}

#[test]
fn conv2d_values_and_gradients() {
    use aimass::ops::Conv2dParams;
    for (cin, cout, p) in [
        (3, 4, Conv2dParams::default().with_padding(1)),
        (2, 3, Conv2dParams::default().with_stride(2)),
        (4, 4, Conv2dParams::default().with_groups(2).with_padding(1)),
        (
            2,
            2,
            Conv2dParams::default().with_dilation(2).with_padding(2),
        ),
    ] {
        let x = randt(&[2, cin, 5, 5], 23);
        let w = randt(&[cout, cin / p.groups, 3, 3], 24);
        let b = randt(&[cout], 25);
        let y = ops::conv2d(&x, &w, Some(&b), &p).unwrap();
        // Independent reference: direct summation.
        let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let bv = b.to_vec1::<f64>().unwrap();
        let (_, _, oh, ow) = y.dims4().unwrap();
        let yv = y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let cg = cin / p.groups;
        let og = cout / p.groups;
        for n in 0..2 {
            for o in 0..cout {
                let g = o / og;
                for i in 0..oh {
                    for j in 0..ow {
                        let mut s = bv[o];
                        for c in 0..cg {
                            for ki in 0..3 {
                                for kj in 0..3 {
                                    let yy = (i * p.stride + ki * p.dilation) as isize
                                        - p.padding as isize;
                                    let xx = (j * p.stride + kj * p.dilation) as isize
                                        - p.padding as isize;
                                    if yy >= 0 && xx >= 0 && yy < 5 && xx < 5 {
                                        let ci = g * cg + c;
                                        s += xv
                                            [((n * cin + ci) * 5 + yy as usize) * 5 + xx as usize]
                                            * wv[((o * cg + c) * 3 + ki) * 3 + kj];
                                    }
                                }
                            }
                        }
                        let got = yv[((n * cout + o) * oh + i) * ow + j];
                        assert!((got - s).abs() < 1e-12, "{p:?}: {got} vs {s}");
                    }
                }
            }
        }
        let m = randt(y.dims(), 26);
        check_grad(
            &[x, w, b],
            |t| {
                Ok(ops::conv2d(&t[0], &t[1], Some(&t[2]), &p)?
                    .mul(&m)?
                    .sum_all()?)
            },
            H,
            TOL,
        );
    }
    let x = randt(&[1, 3, 5, 5], 1);
    assert!(ops::conv2d(&x, &randt(&[4, 2, 3, 3], 1), None, &Conv2dParams::default()).is_err());
    assert!(ops::conv2d(
        &x,
        &randt(&[4, 3, 3, 3], 1),
        Some(&randt(&[3], 1)),
        &Conv2dParams::default()
    )
    .is_err());
    assert!(ops::conv2d(&x, &randt(&[4, 3, 7, 7], 1), None, &Conv2dParams::default()).is_err());
    assert!(ops::conv2d(
        &x,
        &randt(&[4, 3, 3, 3], 1),
        None,
        &Conv2dParams::default().with_stride(0)
    )
    .is_err());
}

// ---------------------------------------------------------------------------
// The candle 0.11 behaviours these ops guard against. Each test asserts
// candle's *wrong* result: when a candle upgrade fixes one, its test fails,
// and we can reconsider the replacement.
// ---------------------------------------------------------------------------

#[test]
fn candle_defect_max_pool2d_backward_scales_by_one_over_k2() {
    let x = Var::from_tensor(&randt(&[1, 1, 4, 4], 30)).unwrap();
    let g = x
        .as_tensor()
        .max_pool2d(2)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let total: f64 = g.get(&x).unwrap().sum_all().unwrap().to_scalar().unwrap();
    // Four windows, each max should receive gradient 1: total 4. candle gives 4 × 0.25.
    assert!(
        (total - 1.0).abs() < 1e-12,
        "candle's max_pool2d backward changed: total {total}"
    );
    let ours = ops::max_pool2d(x.as_tensor(), (2, 2), (2, 2), (0, 0))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let total: f64 = ours
        .get(&x)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!((total - 4.0).abs() < 1e-12);
}

#[test]
fn candle_defect_max_pool2d_backward_rejects_kernel_ne_stride() {
    let x = Var::from_tensor(&randt(&[1, 1, 5, 5], 31)).unwrap();
    let y = x.as_tensor().max_pool2d_with_stride(3, 2).unwrap();
    assert!(
        y.sum_all().unwrap().backward().is_err(),
        "candle now supports max_pool2d backward with kernel != stride"
    );
}

#[test]
fn candle_defect_conv2d_backward_with_unequal_leftovers() {
    // Input 8×7, kernel 3, stride 2, padding 1: one row is left over, no
    // column. candle sizes the input gradient from the rows only.
    let x = Var::from_tensor(&randt(&[1, 2, 8, 7], 32)).unwrap();
    let w = randt(&[3, 2, 3, 3], 33);
    let y = x.as_tensor().conv2d(&w, 1, 2, 1, 1).unwrap();
    assert!(
        y.sum_all().unwrap().backward().is_err(),
        "candle's conv2d backward now handles unequal leftovers"
    );
    // Ours (the CPU kernel here; the padded candle path off the CPU,
    // src/gpu_path_tests.rs) differentiates it.
    let y = ops::conv2d(
        x.as_tensor(),
        &w,
        None,
        &ops::Conv2dParams::default().with_stride(2).with_padding(1),
    )
    .unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(g.get(&x).unwrap().dims(), &[1, 2, 8, 7]);
}

#[test]
fn candle_defect_fused_norms_and_softmax_drop_the_gradient() {
    // candle-nn 0.11 applies these fused ops with `apply_op*_no_bwd`: the
    // result is not attached to the graph, so backward succeeds but the
    // input silently receives no gradient at all.
    let x = Var::from_tensor(&randt(&[2, 4], 32).to_dtype(DType::F32).unwrap()).unwrap();
    let w = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    let grad_of = |y: Tensor| {
        y.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(&x)
            .cloned()
    };
    let ln_mod = aimass::candle_nn::LayerNorm::new(w.clone(), b.clone(), 1e-5);
    let rms_mod = aimass::candle_nn::RmsNorm::new(w.clone(), 1e-5);
    let theirs = [
        (
            "candle_nn::ops::layer_norm",
            aimass::candle_nn::ops::layer_norm(x.as_tensor(), &w, &b, 1e-5).unwrap(),
        ),
        (
            "candle_nn::LayerNorm",
            aimass::candle::Module::forward(&ln_mod, x.as_tensor()).unwrap(),
        ),
        (
            "candle_nn::ops::rms_norm",
            aimass::candle_nn::ops::rms_norm(x.as_tensor(), &w, 1e-5).unwrap(),
        ),
        (
            "candle_nn::RmsNorm",
            aimass::candle::Module::forward(&rms_mod, x.as_tensor()).unwrap(),
        ),
        (
            "candle_nn::ops::softmax_last_dim",
            aimass::candle_nn::ops::softmax_last_dim(x.as_tensor()).unwrap(),
        ),
    ];
    for (name, y) in theirs {
        assert!(
            grad_of(y).is_none(),
            "{name} now propagates a gradient: reconsider our replacement"
        );
    }
    // Ours train through the same computations.
    for y in [
        ops::layer_norm(x.as_tensor(), Some(&w), Some(&b), 1e-5).unwrap(),
        ops::rms_norm(x.as_tensor(), Some(&w), 1e-5).unwrap(),
        ops::softmax_last_dim(x.as_tensor()).unwrap(),
    ] {
        assert!(grad_of(y).is_some());
    }
}
