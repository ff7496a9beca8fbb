//! Second-order gradients (Hessian-vector products) of the ops that
//! meta-learning differentiates twice, against finite differences of the
//! first-order gradient. candle detaches gradients during backward unless
//! `CANDLE_GRAD_DO_NOT_DETACH` is set before a thread's first backward, so
//! this binary sets it once, first thing in every test.

mod common;

use aimass::candle::{Tensor, D};
use aimass::ops::{self, Conv2dParams};
use common::{check_hvp, randt};

const H: f64 = 1e-5;
const TOL: f64 = 1e-6;

fn second_order() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1"));
}

/// A fixed weighting so each scalar function depends on every output.
fn weighted(y: Tensor, seed: u64) -> aimass::Result<Tensor> {
    let w = randt(y.dims(), seed);
    Ok((y * w)?.sum_all()?)
}

#[test]
fn hvp_matmul_and_activations() {
    second_order();
    let m = randt(&[4, 3], 1);
    check_hvp(
        &randt(&[2, 4], 2),
        |x| weighted(x.matmul(&m)?.tanh()?, 3),
        H,
        TOL,
    );
    check_hvp(
        &randt(&[2, 4], 4),
        |x| weighted(x.matmul(&m)?.sqr()?, 5),
        H,
        TOL,
    );
    check_hvp(&randt(&[2, 4], 6), |x| weighted(x.silu()?, 7), H, TOL);
    check_hvp(&randt(&[2, 4], 8), |x| weighted(x.gelu_erf()?, 9), H, TOL);
    // relu is piecewise linear: its Hessian is zero, the product must be too.
    check_hvp(
        &randt(&[2, 4], 10),
        |x| weighted(x.relu()?.sqr()?, 11),
        H,
        TOL,
    );
    check_hvp(
        &randt(&[2, 4], 12),
        |x| Ok(x.sqr()?.mean_all()?.add(&x.sum_all()?.sqr()?)?),
        H,
        TOL,
    );
}

#[test]
fn hvp_softmax_family() {
    second_order();
    check_hvp(
        &randt(&[3, 4], 20),
        |x| weighted(ops::softmax(x, 1)?, 21),
        H,
        TOL,
    );
    check_hvp(
        &randt(&[3, 4], 22),
        |x| weighted(ops::log_softmax(x, D::Minus1)?, 23),
        H,
        TOL,
    );
    check_hvp(
        &randt(&[3, 4], 24),
        |x| weighted(ops::softmax_last_dim(x)?, 25),
        H,
        TOL,
    );
    check_hvp(
        &randt(&[3, 4], 26),
        |x| Ok(ops::logsumexp(x, 0, false)?.sqr()?.sum_all()?),
        H,
        TOL,
    );
}

#[test]
fn hvp_norms_and_normalize() {
    second_order();
    let w = randt(&[5], 30);
    let b = randt(&[5], 31);
    check_hvp(
        &randt(&[3, 5], 32),
        |x| weighted(ops::layer_norm(x, Some(&w), Some(&b), 1e-5)?, 33),
        H,
        TOL,
    );
    check_hvp(
        &randt(&[3, 5], 34),
        |x| weighted(ops::rms_norm(x, Some(&w), 1e-5)?, 35),
        H,
        TOL,
    );
    check_hvp(
        &randt(&[3, 5], 36),
        |x| weighted(ops::l2_normalize(x, 1, 1e-12)?, 37),
        H,
        TOL,
    );
}

#[test]
fn hvp_conv_and_pooling() {
    second_order();
    let w = randt(&[3, 2, 3, 3], 40);
    let p = Conv2dParams::default().with_padding(1);
    check_hvp(
        &randt(&[1, 2, 5, 5], 41),
        |x| weighted(ops::conv2d(x, &w, None, &p)?.sqr()?, 42),
        H,
        TOL,
    );
    // Second order in the weights too (MAML differentiates through the inner update of w).
    let x = randt(&[1, 2, 5, 5], 43);
    check_hvp(
        &w,
        |w| weighted(ops::conv2d(&x, w, None, &p)?.tanh()?, 44),
        H,
        TOL,
    );
    check_hvp(
        &randt(&[1, 2, 6, 6], 45),
        |x| weighted(ops::max_pool2d(&x.sqr()?, (3, 3), (2, 2), (1, 1))?, 46),
        H,
        TOL,
    );
    check_hvp(
        &randt(&[1, 2, 6, 6], 47),
        |x| weighted(ops::avg_pool2d(&x.sqr()?, (2, 2), (2, 2), (0, 0))?, 48),
        H,
        TOL,
    );
    check_hvp(
        &randt(&[2, 2, 4, 4], 49),
        |x| Ok(ops::global_avg_pool2d(x)?.sqr()?.sum_all()?),
        H,
        TOL,
    );
}
