//! Second-order gradients through the CPU kernels, checked against finite
//! differences of first-order gradients (Hessian-vector products).
//!
//! Its own test binary: candle keeps gradients differentiable only when
//! `CANDLE_GRAD_DO_NOT_DETACH` is set before a thread's first backward, and
//! that must not leak into the other tests.

use aimass::candle::{Device, Tensor, Var};
use aimass::ops::kernels;
use rand::Rng;

fn second_order_mode() {
    // Every test of this binary sets the same value before its first backward.
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
}

fn randt(r: &mut aimass::device::SeededRng, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| r.random::<f64>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Checks `H v` from double backward of `f` against
/// `(grad f(p + eps v) - grad f(p - eps v)) / (2 eps)`.
fn check_hvp(params: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor, seed: u64, what: &str) {
    let mut r = aimass::device::rng(seed);
    let vs: Vec<Tensor> = params.iter().map(|p| randt(&mut r, p.dims())).collect();
    let grads_at = |ps: &[Tensor]| -> (Vec<Var>, Vec<Tensor>, aimass::candle::backprop::GradStore) {
        let vars: Vec<Var> = ps.iter().map(|p| Var::from_tensor(p).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let store = f(&ts).backward().unwrap();
        let gs = vars.iter().map(|v| store.get(v).unwrap().clone()).collect();
        (vars, gs, store)
    };
    // Double backward: d/dp sum_i <grad_i, v_i>.
    let (vars, gs, _) = grads_at(params);
    let mut dot = Tensor::new(0f64, &Device::Cpu).unwrap();
    for (g, v) in gs.iter().zip(&vs) {
        dot = (dot + (g * v).unwrap().sum_all().unwrap()).unwrap();
    }
    let h = dot.backward().unwrap();
    // Finite differences of first-order gradients.
    let eps = 1e-5;
    let shifted = |s: f64| -> Vec<Tensor> {
        params
            .iter()
            .zip(&vs)
            .map(|(p, v)| (p + (v * s).unwrap()).unwrap())
            .collect()
    };
    let (_, gp, _) = grads_at(&shifted(eps));
    let (_, gm, _) = grads_at(&shifted(-eps));
    for (i, var) in vars.iter().enumerate() {
        let got = flat(
            h.get(var)
                .unwrap_or_else(|| panic!("{what}: no second-order grad for param {i}")),
        );
        let want: Vec<f64> = flat(&gp[i])
            .iter()
            .zip(flat(&gm[i]))
            .map(|(a, b)| (a - b) / (2.0 * eps))
            .collect();
        let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            d < 1e-6 * scale,
            "{what}: param {i}: max diff {d} (scale {scale})"
        );
    }
}

#[test]
fn conv2d_hessian_vector_products_match_finite_differences() {
    second_order_mode();
    for (seed, (stride, pad, dil, groups)) in [
        ((1, 1), (1, 1), (1, 1), 1),
        ((2, 1), (0, 1), (1, 2), 1),
        ((2, 2), (1, 1), (1, 1), 2),
        // 8 channels: the Winograd form (forward and both gradients).
        ((1, 1), (1, 1), (1, 1), 1),
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = aimass::device::rng(seed as u64);
        let ch = if seed == 3 { 8 } else { 4 };
        let x = randt(&mut r, &[2, ch, 6, 7]);
        let w1 = randt(&mut r, &[ch, ch / groups, 3, 3]);
        let w2 = randt(&mut r, &[2, ch, 1, 1]);
        let b = randt(&mut r, &[ch]);
        let f = |p: &[Tensor]| -> Tensor {
            let h = kernels::conv2d(&p[0], &p[1], Some(&p[3]), stride, pad, dil, groups)
                .unwrap()
                .tanh()
                .unwrap();
            let y = kernels::conv2d(&h, &p[2], None, (1, 1), (0, 0), (1, 1), 1).unwrap();
            (&y * &y).unwrap().tanh().unwrap().sum_all().unwrap()
        };
        check_hvp(
            &[x, w1, w2, b],
            &f,
            50 + seed as u64,
            &format!("conv case {seed}"),
        );
    }
}

#[test]
fn maml_style_inner_step_through_conv_is_differentiable() {
    second_order_mode();
    let mut r = aimass::device::rng(3);
    let x = randt(&mut r, &[3, 2, 5, 5]);
    let xq = randt(&mut r, &[3, 2, 5, 5]);
    let w = randt(&mut r, &[3, 2, 3, 3]);
    // Outer loss after one inner SGD step: L(w - a * dL(w)/dw) on other data.
    let f = |p: &[Tensor]| -> Tensor {
        let inner = kernels::conv2d(&x, &p[0], None, (1, 1), (1, 1), (1, 1), 1)
            .unwrap()
            .sqr()
            .unwrap()
            .tanh()
            .unwrap()
            .sum_all()
            .unwrap();
        let g = inner.backward().unwrap();
        let gw = g.get(&p[0]).unwrap().clone();
        let fast = (&p[0] - (gw * 0.1).unwrap()).unwrap();
        kernels::conv2d(&xq, &fast, None, (1, 1), (1, 1), (1, 1), 1)
            .unwrap()
            .tanh()
            .unwrap()
            .sum_all()
            .unwrap()
    };
    // The outer gradient d f / d w is itself a second-order quantity; its
    // Hessian-vector product is third order.
    check_hvp(&[w], &f, 77, "maml inner step");
}

#[test]
fn pooling_hessian_vector_products_match_finite_differences() {
    second_order_mode();
    let mut r = aimass::device::rng(5);
    let x = randt(&mut r, &[2, 3, 7, 6]);
    let wt = randt(&mut r, &[3, 3, 3, 3]);
    for (k, s, p) in [
        ((2, 2), (2, 2), (0, 0)),
        ((3, 3), (1, 1), (1, 1)),
        ((3, 2), (2, 1), (1, 1)),
    ] {
        let f = |q: &[Tensor]| -> Tensor {
            let h = kernels::conv2d(&q[0], &q[1], None, (1, 1), (1, 1), (1, 1), 1).unwrap();
            let m = kernels::max_pool2d(&h, k, s, p).unwrap();
            let a = kernels::avg_pool2d(&h.tanh().unwrap(), k, s, p).unwrap();
            ((&m * &m).unwrap() + (&a * &m).unwrap())
                .unwrap()
                .tanh()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        check_hvp(
            &[x.clone(), wt.clone()],
            &f,
            60,
            &format!("pool {k:?} {s:?} {p:?}"),
        );
    }
}

#[test]
fn batch_norm_hessian_vector_products_match_finite_differences() {
    second_order_mode();
    let mut r = aimass::device::rng(8);
    let x = randt(&mut r, &[3, 2, 4, 4]);
    let wt = randt(&mut r, &[3, 2, 3, 3]);
    let g = randt(&mut r, &[3]);
    let b = randt(&mut r, &[3]);
    for relu in [false, true] {
        let f = |q: &[Tensor]| -> Tensor {
            let h = kernels::conv2d(&q[0], &q[1], None, (1, 1), (1, 1), (1, 1), 1).unwrap();
            let bn = if relu {
                kernels::batch_norm_relu_train
            } else {
                kernels::batch_norm_train
            };
            let y = bn(&h, Some(&q[2]), Some(&q[3]), 1e-3).unwrap().output;
            (&y * &y).unwrap().tanh().unwrap().sum_all().unwrap()
        };
        check_hvp(
            &[x.clone(), wt.clone(), g.clone(), b.clone()],
            &f,
            61,
            &format!("bn relu {relu}"),
        );
    }
}

#[test]
fn batch_norm_add_relu_hessian_vector_products_match_finite_differences() {
    second_order_mode();
    let mut r = aimass::device::rng(11);
    let x = randt(&mut r, &[3, 2, 4, 4]);
    let wt = randt(&mut r, &[3, 2, 3, 3]);
    let g = randt(&mut r, &[3]);
    let b = randt(&mut r, &[3]);
    let s = randt(&mut r, &[3, 3, 4, 4]);
    let f = |q: &[Tensor]| -> Tensor {
        let h = kernels::conv2d(&q[0], &q[1], None, (1, 1), (1, 1), (1, 1), 1).unwrap();
        // The shortcut through a non-linearity, so its second derivative counts.
        let short = q[4].sin().unwrap();
        let y = kernels::batch_norm_add_relu_train(&h, Some(&q[2]), Some(&q[3]), &short, 1e-3)
            .unwrap()
            .output;
        (&y * &y).unwrap().tanh().unwrap().sum_all().unwrap()
    };
    check_hvp(&[x, wt, g, b, s], &f, 63, "bn add relu");
}

#[test]
fn fused_conv_relu_hessian_vector_products_match_finite_differences() {
    second_order_mode();
    let mut r = aimass::device::rng(9);
    let x = randt(&mut r, &[2, 3, 5, 5]);
    let w1 = randt(&mut r, &[4, 3, 3, 3]);
    let b1 = randt(&mut r, &[4]);
    let w2 = randt(&mut r, &[2, 4, 3, 3]);
    let f = |q: &[Tensor]| -> Tensor {
        let h = kernels::conv2d_relu(&q[0], &q[1], Some(&q[2]), (1, 1), (1, 1), (1, 1), 1).unwrap();
        let y = kernels::conv2d(&h, &q[3], None, (2, 2), (1, 1), (1, 1), 1).unwrap();
        let y = kernels::relu(&(&y * &y).unwrap().sin().unwrap()).unwrap();
        (&y * &h
            .sum_all()
            .unwrap()
            .tanh()
            .unwrap()
            .broadcast_as(y.shape())
            .unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
    };
    check_hvp(&[x, w1, b1, w2], &f, 62, "conv relu");
}

#[test]
fn ops_whose_input_reaches_the_loss_only_through_them() {
    // The second backward visits the pooled / rectified input only through
    // the scatter, gather and mask ops: they must still give it a gradient
    // (zero), or candle's backward fails.
    second_order_mode();
    let mut r = aimass::device::rng(10);
    let x = randt(&mut r, &[1, 2, 6, 6]);
    let f = |q: &[Tensor]| -> Tensor {
        let y = kernels::max_pool2d(&q[0].sqr().unwrap(), (3, 3), (2, 2), (1, 1)).unwrap();
        (&y * &y).unwrap().sum_all().unwrap()
    };
    check_hvp(std::slice::from_ref(&x), &f, 63, "max pool of x^2");
    let f = |q: &[Tensor]| -> Tensor {
        let y = kernels::relu(&q[0].sin().unwrap()).unwrap();
        (&y * &y).unwrap().sum_all().unwrap()
    };
    check_hvp(std::slice::from_ref(&x), &f, 64, "relu of sin x");
}
