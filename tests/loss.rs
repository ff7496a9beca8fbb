//! Tests of `aimass::loss`: every loss against PyTorch reference values
//! (tests/fixtures/gen_loss.py -> loss.json, computed in float64), against
//! central finite differences of its gradient (f64), and on bad input.

use aimass::candle::{DType, Device, Tensor, Var};
use aimass::candle_nn::VarBuilder;
use aimass::loss::*;
use aimass::Error;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::OnceLock;

// ------------------------------------------------------------------ helpers

fn fixtures() -> &'static Value {
    static F: OnceLock<Value> = OnceLock::new();
    F.get_or_init(|| {
        serde_json::from_str(include_str!("fixtures/loss.json")).expect("parse loss.json")
    })
}

fn case(name: &str) -> &'static Value {
    &fixtures()["cases"][name]
}

fn flatten(v: &Value, out: &mut Vec<f64>, shape: &mut Vec<usize>, depth: usize) {
    match v {
        Value::Array(a) => {
            if shape.len() == depth {
                shape.push(a.len());
            }
            for x in a {
                flatten(x, out, shape, depth + 1);
            }
        }
        Value::Number(n) => out.push(n.as_f64().unwrap()),
        other => panic!("unexpected {other:?}"),
    }
}

/// A nested JSON list as an f64 tensor.
fn tensor(v: &Value) -> Tensor {
    let (mut data, mut shape) = (vec![], vec![]);
    flatten(v, &mut data, &mut shape, 0);
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn field(c: &Value, k: &str) -> Tensor {
    tensor(&c[k])
}

fn num(c: &Value, k: &str) -> f64 {
    c[k].as_f64().unwrap_or_else(|| panic!("missing {k}"))
}

fn labels(c: &Value, k: &str) -> Tensor {
    let v: Vec<i64> = c[k]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[track_caller]
fn close(got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol * want.abs().max(1.0),
        "got {got}, want {want} (tol {tol})"
    );
}

#[track_caller]
fn close_vec(got: &Tensor, want: &Value, tol: f64) {
    let g = got.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let (mut w, mut s) = (vec![], vec![]);
    flatten(want, &mut w, &mut s, 0);
    assert_eq!(g.len(), w.len());
    for (a, b) in g.iter().zip(&w) {
        close(*a, *b, tol);
    }
}

/// Central finite differences (h = 1e-5, f64) of the scalar `f(inputs)`
/// with respect to every element of `inputs[i]` for `i` in `wrt`, compared
/// with candle's autograd. `f` gets the inputs as tensors (tracked `Var`s
/// for the analytic pass, plain tensors for the numerical one).
#[track_caller]
fn grad_check(inputs: &[Tensor], wrt: &[usize], f: impl Fn(&[Tensor]) -> aimass::Result<Tensor>) {
    const H: f64 = 1e-5;
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tracked: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = f(&tracked).unwrap().backward().unwrap();
    for &i in wrt {
        let base = inputs[i].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let analytic = grads
            .get(&tracked[i])
            .unwrap_or_else(|| panic!("no gradient for input {i}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for j in 0..base.len() {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                let mut args = inputs.to_vec();
                args[i] = Tensor::from_vec(v, inputs[i].shape(), &Device::Cpu).unwrap();
                scalar(&f(&args).unwrap())
            };
            let numeric = (eval(H) - eval(-H)) / (2.0 * H);
            let a = analytic[j];
            assert!(
                (a - numeric).abs() <= 1e-7 + 1e-5 * a.abs().max(numeric.abs()),
                "input {i} element {j}: autograd {a}, finite difference {numeric}"
            );
        }
    }
}

/// The gradient of `loss` with respect to `t`, as a vector (zeros if none).
fn grad_of(loss: &Tensor, t: &Tensor) -> Vec<f64> {
    let g = loss.backward().unwrap();
    match g.get(t) {
        Some(g) => g.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        None => vec![0.0; t.elem_count()],
    }
}

fn var(t: &Tensor) -> Tensor {
    Var::from_tensor(t).unwrap().as_tensor().clone()
}

fn is_config_err(r: aimass::Result<impl std::fmt::Debug>, field: &str) {
    match r {
        Err(Error::Config { field: f, .. }) => assert_eq!(f, field),
        other => panic!("expected a config error on {field}, got {other:?}"),
    }
}

fn is_err(r: aimass::Result<Tensor>) {
    assert!(r.is_err(), "expected an error, got {r:?}");
}

const TOL: f64 = 1e-10;

// ------------------------------------------------------------------ classification

#[test]
fn cross_entropy_matches_torch() {
    let c = case("cross_entropy");
    let x = field(c, "logits");
    let y = labels(c, "targets");
    let w: Vec<f64> = serde_json::from_value(c["weight"].clone()).unwrap();
    let ce = |cfg: CrossEntropyLossConfig, y: &Tensor| {
        CrossEntropyLoss::new(cfg).unwrap().forward(&x, y).unwrap()
    };
    close(
        scalar(&cross_entropy_loss(&x, &y).unwrap()),
        num(c, "plain_mean"),
        TOL,
    );
    let base = CrossEntropyLossConfig::default();
    close(
        scalar(&ce(base.clone().with_reduction(Reduction::Sum), &y)),
        num(c, "plain_sum"),
        TOL,
    );
    close_vec(
        &ce(base.clone().with_reduction(Reduction::None), &y),
        &c["plain_none"],
        TOL,
    );
    close(
        scalar(&ce(base.clone().with_label_smoothing(0.1), &y)),
        num(c, "smooth_0.1"),
        TOL,
    );
    let weighted = base.clone().with_weight(Some(w.clone()));
    close(
        scalar(&ce(weighted.clone(), &y)),
        num(c, "weight_mean"),
        TOL,
    );
    let ws = weighted.clone().with_label_smoothing(0.2);
    close(
        scalar(&ce(ws.clone(), &y)),
        num(c, "weight_smooth_0.2_mean"),
        TOL,
    );
    close(
        scalar(&ce(ws.clone().with_reduction(Reduction::Sum), &y)),
        num(c, "weight_smooth_0.2_sum"),
        TOL,
    );
    close_vec(
        &ce(ws.with_reduction(Reduction::None), &y),
        &c["weight_smooth_0.2_none"],
        TOL,
    );
    // ignore_index -100 (default) with i64 targets.
    let yi = labels(c, "targets_ignore");
    close(
        scalar(&ce(base.clone().with_label_smoothing(0.1), &yi)),
        num(c, "ignore_smooth_0.1_mean"),
        TOL,
    );
    // A custom ignore index with u32 targets, weights and smoothing.
    let y7 = labels(c, "targets_ignore7").to_dtype(DType::U32).unwrap();
    let cfg = weighted
        .with_label_smoothing(0.3)
        .with_ignore_index(Some(7));
    close(
        scalar(&ce(cfg.clone(), &y7)),
        num(c, "ignore7_weight_smooth_0.3_mean"),
        TOL,
    );
    close_vec(
        &ce(cfg.with_reduction(Reduction::None), &y7),
        &c["ignore7_weight_smooth_0.3_none"],
        TOL,
    );
    // f32 logits agree to f32 precision.
    let x32 = x.to_dtype(DType::F32).unwrap();
    close(
        scalar(&cross_entropy_loss(&x32, &y).unwrap()),
        num(c, "plain_mean"),
        1e-6,
    );
}

#[test]
fn cross_entropy_gradient() {
    let c = case("cross_entropy");
    let y7 = labels(c, "targets_ignore7");
    let w: Vec<f64> = serde_json::from_value(c["weight"].clone()).unwrap();
    let ce = CrossEntropyLoss::new(
        CrossEntropyLossConfig::default()
            .with_weight(Some(w))
            .with_label_smoothing(0.3)
            .with_ignore_index(Some(7)),
    )
    .unwrap();
    grad_check(&[field(c, "logits")], &[0], |t| ce.forward(&t[0], &y7));
}

/// The cross-entropy as aimass computed it before it moved to `gather`: a
/// dense coefficient matrix built on the host (smoothing, class weights and
/// ignored rows folded in), `ℓ_i = −Σ_c coef[i, c] · log p_i[c]`. The
/// reference for the device version.
fn cross_entropy_one_hot_reference(
    logits: &Tensor,
    targets: &[i64],
    eps: f64,
    weight: Option<&[f64]>,
    ignore: Option<i64>,
    reduction: Reduction,
) -> Vec<f64> {
    let (n, c) = logits.dims2().unwrap();
    let w: Vec<f64> = weight.map_or(vec![1.0; c], <[f64]>::to_vec);
    let mut coef = vec![0f64; n * c];
    let mut denom = 0f64;
    for (i, &yi) in targets.iter().enumerate() {
        if Some(yi) == ignore {
            continue;
        }
        let k = yi as usize;
        let row = &mut coef[i * c..(i + 1) * c];
        for (r, wc) in row.iter_mut().zip(&w) {
            *r = eps / c as f64 * wc;
        }
        row[k] += (1.0 - eps) * w[k];
        denom += w[k];
    }
    let logp = aimass::ops::log_softmax(&logits.to_dtype(DType::F64).unwrap(), 1)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let per_row: Vec<f64> = (0..n)
        .map(|i| -(0..c).map(|k| coef[i * c + k] * logp[i][k]).sum::<f64>())
        .collect();
    let sum: f64 = per_row.iter().sum();
    match reduction {
        Reduction::None => per_row,
        Reduction::Sum => vec![sum],
        _ if denom > 0.0 => vec![sum / denom],
        _ => vec![0.0],
    }
}

#[test]
fn cross_entropy_by_gather_equals_the_one_hot_formula() {
    use rand::Rng;
    let mut r = aimass::device::rng(21);
    let (n, c) = (13, 7);
    for case in 0..48 {
        let x: Vec<f32> = (0..n * c).map(|_| r.random::<f32>() * 8.0 - 4.0).collect();
        let logits = Tensor::from_vec(x, (n, c), &Device::Cpu).unwrap();
        let eps = [0.0, 0.1, 0.3][case % 3];
        let weight: Option<Vec<f64>> =
            (case % 2 == 1).then(|| (0..c).map(|_| r.random::<f64>() * 2.0).collect());
        let ignore = [None, Some(-100), Some(3), Some(0)][(case / 2) % 4];
        let reduction = [Reduction::Mean, Reduction::Sum, Reduction::None][(case / 8) % 3];
        let mut y: Vec<i64> = (0..n).map(|_| r.random_range(0..c as i64)).collect();
        if let Some(ig) = ignore {
            y[1] = ig;
            y[5] = ig;
        }
        let want =
            cross_entropy_one_hot_reference(&logits, &y, eps, weight.as_deref(), ignore, reduction);
        let ce = CrossEntropyLoss::new(
            CrossEntropyLossConfig::default()
                .with_label_smoothing(eps)
                .with_weight(weight.clone())
                .with_ignore_index(ignore)
                .with_reduction(reduction),
        )
        .unwrap();
        // Every target dtype that can hold these targets.
        let mut targets = vec![Tensor::new(y.as_slice(), &Device::Cpu).unwrap()];
        if y.iter().all(|&v| v >= 0) {
            let yu: Vec<u32> = y.iter().map(|&v| v as u32).collect();
            let yb: Vec<u8> = y.iter().map(|&v| v as u8).collect();
            targets.push(Tensor::new(yu.as_slice(), &Device::Cpu).unwrap());
            targets.push(Tensor::new(yb.as_slice(), &Device::Cpu).unwrap());
        }
        for t in &targets {
            let got = ce
                .forward(&logits, t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (*g as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()),
                    "case {case} ({:?} targets): {g} vs {w}",
                    t.dtype()
                );
            }
        }
    }
}

#[test]
fn cross_entropy_ignore_index_the_target_dtype_cannot_hold() {
    // -100 as u32 targets, or 300 as u8 targets, matches no row (it is not
    // wrapped around to a valid class).
    let x = Tensor::new(&[[1.0f32, 2.0, 0.5], [0.5, -1.0, 0.0]], &Device::Cpu).unwrap();
    let plain = |y: &Tensor| scalar(&cross_entropy_loss(&x, y).unwrap());
    let y32 = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
    let y64 = Tensor::new(&[2i64, 0], &Device::Cpu).unwrap();
    assert_eq!(plain(&y32), plain(&y64));
    let ce300 =
        CrossEntropyLoss::new(CrossEntropyLossConfig::default().with_ignore_index(Some(300)))
            .unwrap();
    let y8 = Tensor::new(&[2u8, 0], &Device::Cpu).unwrap();
    assert_eq!(scalar(&ce300.forward(&x, &y8).unwrap()), plain(&y64));
}

#[test]
fn cross_entropy_all_ignored_is_zero() {
    let x = Tensor::new(&[[1.0f64, 2.0], [0.5, -1.0]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[-100i64, -100], &Device::Cpu).unwrap();
    assert_eq!(scalar(&cross_entropy_loss(&x, &y).unwrap()), 0.0);
}

#[test]
fn bce_matches_torch_and_is_stable() {
    let c = case("bce");
    let x = field(c, "logits");
    let y = field(c, "targets");
    let pw: Vec<f64> = serde_json::from_value(c["pos_weight"].clone()).unwrap();
    close(
        scalar(&bce_with_logits_loss(&x, &y).unwrap()),
        num(c, "mean"),
        TOL,
    );
    let b = |cfg: BceWithLogitsLossConfig| {
        BceWithLogitsLoss::new(cfg)
            .unwrap()
            .forward(&x, &y)
            .unwrap()
    };
    close(
        scalar(&b(
            BceWithLogitsLossConfig::default().with_reduction(Reduction::Sum)
        )),
        num(c, "sum"),
        TOL,
    );
    close_vec(
        &b(BceWithLogitsLossConfig::default().with_reduction(Reduction::None)),
        &c["none"],
        TOL,
    );
    close(
        scalar(&b(
            BceWithLogitsLossConfig::default().with_pos_weight(Some(pw))
        )),
        num(c, "pos_weight_mean"),
        TOL,
    );

    // |logit| 30..100 in f32: ours is finite and matches torch's f32 value;
    // candle-nn's binary_cross_entropy_with_logit gives inf/NaN.
    let x32 = x.to_dtype(DType::F32).unwrap();
    let y32 = y.to_dtype(DType::F32).unwrap();
    let ours = scalar(&bce_with_logits_loss(&x32, &y32).unwrap());
    assert!(ours.is_finite());
    close(ours, num(c, "mean_f32"), 1e-6);
    let theirs =
        scalar(&aimass::candle_nn::loss::binary_cross_entropy_with_logit(&x32, &y32).unwrap());
    assert!(!theirs.is_finite(), "candle-nn gave {theirs}");
}

#[test]
fn bce_gradient() {
    let c = case("bce");
    let pw: Vec<f64> = serde_json::from_value(c["pos_weight"].clone()).unwrap();
    let y = field(c, "targets");
    let b = BceWithLogitsLoss::new(BceWithLogitsLossConfig::default().with_pos_weight(Some(pw)))
        .unwrap();
    // Large logits included: the gradient stays exact (sigmoid saturates).
    grad_check(&[field(c, "logits")], &[0], |t| b.forward(&t[0], &y));
}

#[test]
fn mse_and_kl_match_torch() {
    let c = case("mse");
    let (x, t) = (field(c, "input"), field(c, "target"));
    close(scalar(&mse_loss(&x, &t).unwrap()), num(c, "mean"), TOL);
    let s = MseLoss::new(MseLossConfig::default().with_reduction(Reduction::Sum)).unwrap();
    close(scalar(&s.forward(&x, &t).unwrap()), num(c, "sum"), TOL);
    grad_check(&[x, t], &[0, 1], |a| mse_loss(&a[0], &a[1]));

    let c = case("kl_div");
    let (li, tp) = (field(c, "log_input"), field(c, "target"));
    close(
        scalar(&kl_div_loss(&li, &tp).unwrap()),
        num(c, "batchmean"),
        TOL,
    );
    let s = KlDivLoss::new(KlDivLossConfig::default().with_reduction(Reduction::Sum)).unwrap();
    close(scalar(&s.forward(&li, &tp).unwrap()), num(c, "sum"), TOL);
    let lt = KlDivLoss::new(KlDivLossConfig::default().with_log_target(true)).unwrap();
    close(
        scalar(&lt.forward(&li, &tp.log().unwrap()).unwrap()),
        num(c, "batchmean_log_target"),
        TOL,
    );
    grad_check(&[li, tp], &[0, 1], |a| kl_div_loss(&a[0], &a[1]));
    // Zero target probabilities contribute 0, not NaN.
    let li = Tensor::new(&[[-0.1f64, -2.4]], &Device::Cpu).unwrap();
    let tp = Tensor::new(&[[1.0f64, 0.0]], &Device::Cpu).unwrap();
    close(scalar(&kl_div_loss(&li, &tp).unwrap()), 0.1, TOL);
}

// ------------------------------------------------------------------ distillation

#[test]
fn kd_matches_repdistiller() {
    let c = case("kd");
    let (s, t, y) = (
        field(c, "student"),
        field(c, "teacher"),
        labels(c, "labels"),
    );
    close(
        scalar(&kd_loss(&s, &t, 4.0).unwrap()),
        num(c, "soft_T4"),
        TOL,
    );
    close(
        scalar(&kd_loss(&s, &t, 1.0).unwrap()),
        num(c, "soft_T1"),
        TOL,
    );
    let kd = KdLoss::new(KdLossConfig::default()).unwrap();
    close(
        scalar(&kd.forward(&s, &t, &y).unwrap()),
        num(c, "total_T4_a0.9"),
        TOL,
    );
    let kd2 = KdLoss::new(
        KdLossConfig::default()
            .with_temperature(2.0)
            .with_alpha(0.5),
    )
    .unwrap();
    close(
        scalar(&kd2.forward(&s, &t, &y).unwrap()),
        num(c, "total_T2_a0.5"),
        TOL,
    );
    grad_check(&[s.clone(), t.clone()], &[0], |a| {
        kd.forward(&a[0], &a[1], &y)
    });
    // No gradient reaches the teacher.
    let tv = var(&t);
    let l = kd.forward(&var(&s), &tv, &y).unwrap();
    assert!(grad_of(&l, &tv).iter().all(|g| *g == 0.0));
}

#[test]
fn dkd_matches_mdistiller() {
    let c = case("dkd");
    let (s, t, y) = (
        field(c, "student"),
        field(c, "teacher"),
        labels(c, "labels"),
    );
    close(
        scalar(&dkd_loss(&s, &t, &y, 1.0, 8.0, 4.0).unwrap()),
        num(c, "a1_b8_T4"),
        TOL,
    );
    let d = DkdLoss::new(
        DkdLossConfig::default()
            .with_alpha(0.5)
            .with_beta(2.0)
            .with_temperature(1.0),
    )
    .unwrap();
    close(
        scalar(&d.forward(&s, &t, &y).unwrap()),
        num(c, "a0.5_b2_T1"),
        TOL,
    );
    let d = DkdLoss::new(DkdLossConfig::default()).unwrap();
    grad_check(&[s, t], &[0], |a| d.forward(&a[0], &a[1], &y));
}

fn hint_from(cfg: HintLossConfig, w: &Tensor, b: &Tensor) -> HintLoss {
    let ts = HashMap::from([
        ("weight".to_string(), w.clone()),
        ("bias".to_string(), b.clone()),
    ]);
    let vb = VarBuilder::from_tensors(ts, DType::F64, &Device::Cpu);
    HintLoss::new(w.dim(1).unwrap(), w.dim(0).unwrap(), cfg, vb).unwrap()
}

#[test]
fn hint_matches_torch() {
    let c = case("hint");
    let (s, t) = (field(c, "student_conv"), field(c, "teacher_conv"));
    let (w, b) = (field(c, "weight_conv"), field(c, "bias_conv"));
    let h = hint_from(HintLossConfig::default().with_beta(1.0), &w, &b);
    close(
        scalar(&h.forward(&s, &t).unwrap()),
        num(c, "loss_conv"),
        TOL,
    );
    let h100 = hint_from(HintLossConfig::default(), &w, &b);
    close(
        scalar(&h100.forward(&s, &t).unwrap()),
        100.0 * num(c, "loss_conv"),
        TOL,
    );
    grad_check(&[s, t, w, b], &[0, 2, 3], |a| {
        hint_from(HintLossConfig::default().with_beta(1.0), &a[2], &a[3]).forward(&a[0], &a[1])
    });

    let (s, t) = (field(c, "student_vec"), field(c, "teacher_vec"));
    let (w, b) = (field(c, "weight_vec"), field(c, "bias_vec"));
    let cfg = HintLossConfig::default()
        .with_regressor(HintRegressor::Linear)
        .with_beta(1.0);
    let h = hint_from(cfg.clone(), &w, &b);
    close(scalar(&h.forward(&s, &t).unwrap()), num(c, "loss_vec"), TOL);
    grad_check(&[s, t, w, b], &[0, 2, 3], |a| {
        hint_from(cfg.clone(), &a[2], &a[3]).forward(&a[0], &a[1])
    });
}

#[test]
fn hint_builds_trainable_regressor() {
    let vm = aimass::candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let h = HintLoss::new(3, 8, HintLossConfig::default(), vb.pp("hint")).unwrap();
    let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    assert!(names.contains(&"hint.weight".to_string()) && names.contains(&"hint.bias".to_string()));
    let s = Tensor::ones((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(h.regress(&s).unwrap().dims(), &[2, 8, 4, 4]);
    // Wrong student width, wrong teacher shape, wrong rank.
    let bad = Tensor::ones((2, 5, 4, 4), DType::F32, &Device::Cpu).unwrap();
    is_err(h.regress(&bad));
    let t_bad = Tensor::ones((2, 8, 2, 2), DType::F32, &Device::Cpu).unwrap();
    is_err(h.forward(&s, &t_bad));
    is_err(h.regress(&Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap()));
}

#[test]
fn attention_transfer_matches_repdistiller() {
    let c = case("attention");
    let (s, t, sb) = (
        field(c, "student"),
        field(c, "teacher"),
        field(c, "student_big"),
    );
    close(
        scalar(&attention_transfer_loss(&s, &t).unwrap()),
        num(c, "same_size"),
        TOL,
    );
    close(
        scalar(&attention_transfer_loss(&sb, &t).unwrap()),
        num(c, "pooled"),
        TOL,
    );
    let at = AttentionTransferLoss::new(AttentionTransferLossConfig::default()).unwrap();
    let total = at
        .forward(&[s.clone(), sb.clone()], &[t.clone(), t.clone()])
        .unwrap();
    close(scalar(&total), num(c, "beta1000_two_pairs"), TOL);
    grad_check(&[s, t.clone()], &[0], |a| {
        attention_transfer_loss(&a[0], &a[1])
    });
    grad_check(&[sb, t], &[0], |a| attention_transfer_loss(&a[0], &a[1]));
}

#[test]
fn rkd_matches_repdistiller() {
    let c = case("rkd");
    let (s, t) = (field(c, "student"), field(c, "teacher"));
    close(
        scalar(&rkd_distance_loss(&s, &t).unwrap()),
        num(c, "distance"),
        TOL,
    );
    close(
        scalar(&rkd_angle_loss(&s, &t).unwrap()),
        num(c, "angle"),
        TOL,
    );
    let rkd = RkdLoss::new(RkdLossConfig::default()).unwrap();
    close(
        scalar(&rkd.forward(&s, &t).unwrap()),
        num(c, "total_25_50"),
        TOL,
    );
    grad_check(&[s, t], &[0], |a| rkd.forward(&a[0], &a[1]));
}

#[test]
fn rkd_handles_coincident_points() {
    // Two identical student rows: distance clamped, zero directions, finite gradient.
    let s = Tensor::new(&[[1.0f64, 2.0], [1.0, 2.0], [0.0, -1.0]], &Device::Cpu).unwrap();
    let t = Tensor::new(&[[0.5f64, 2.0], [1.0, 0.0], [0.0, -1.0]], &Device::Cpu).unwrap();
    let sv = var(&s);
    let l = RkdLoss::new(RkdLossConfig::default())
        .unwrap()
        .forward(&sv, &t)
        .unwrap();
    assert!(scalar(&l).is_finite());
    assert!(grad_of(&l, &sv).iter().all(|g| g.is_finite()));
}

// ------------------------------------------------------------------ self-supervised

#[test]
fn nt_xent_matches_lightly() {
    let c = case("nt_xent");
    let (z1, z2) = (field(c, "z1"), field(c, "z2"));
    close(
        scalar(&nt_xent_loss(&z1, &z2, 0.5).unwrap()),
        num(c, "t0.5"),
        TOL,
    );
    close(
        scalar(&nt_xent_loss(&z1, &z2, 0.1).unwrap()),
        num(c, "t0.1"),
        TOL,
    );
    let (a, b) = (z1.narrow(0, 0, 2).unwrap(), z2.narrow(0, 0, 2).unwrap());
    close(
        scalar(&nt_xent_loss(&a, &b, 1.0).unwrap()),
        num(c, "t1.0_batch2"),
        TOL,
    );
    // Symmetric in the views.
    close(
        scalar(&nt_xent_loss(&z2, &z1, 0.5).unwrap()),
        num(c, "t0.5"),
        TOL,
    );
    grad_check(&[z1, z2], &[0, 1], |a| nt_xent_loss(&a[0], &a[1], 0.5));
}

#[test]
fn info_nce_matches_moco() {
    let c = case("info_nce");
    let (q, k, queue) = (field(c, "q"), field(c, "k"), field(c, "queue"));
    close(
        scalar(&info_nce_loss(&q, &k, Some(&queue), 0.2).unwrap()),
        num(c, "queue_t0.2"),
        TOL,
    );
    close(
        scalar(&info_nce_loss(&q, &k, Some(&queue), 0.07).unwrap()),
        num(c, "queue_t0.07"),
        TOL,
    );
    close(
        scalar(&info_nce_loss(&q, &k, None, 0.2).unwrap()),
        num(c, "batch_t0.2"),
        TOL,
    );
    grad_check(&[q.clone(), k.clone(), queue.clone()], &[0], |a| {
        info_nce_loss(&a[0], &a[1], Some(&a[2]), 0.2)
    });
    let both = InfoNceLoss::new(InfoNceLossConfig::default().with_detach_keys(false)).unwrap();
    grad_check(&[q.clone(), k.clone()], &[0, 1], |a| {
        both.forward(&a[0], &a[1], None)
    });
    // Keys and queue are detached by default.
    let (kv, qv) = (var(&k), var(&queue));
    let l = info_nce_loss(&var(&q), &kv, Some(&qv), 0.2).unwrap();
    let g = l.backward().unwrap();
    assert!(g.get(&kv).is_none() && g.get(&qv).is_none());
}

#[test]
fn byol_matches_paper() {
    let c = case("byol");
    let (p1, p2, z1, z2) = (
        field(c, "p1"),
        field(c, "p2"),
        field(c, "z1"),
        field(c, "z2"),
    );
    close(scalar(&byol_loss(&p1, &z2).unwrap()), num(c, "single"), TOL);
    let b = ByolLoss::new(ByolLossConfig::default()).unwrap();
    close(
        scalar(&b.forward_symmetric(&p1, &p2, &z1, &z2).unwrap()),
        num(c, "symmetric"),
        TOL,
    );
    grad_check(&[p1.clone(), z2.clone()], &[0], |a| byol_loss(&a[0], &a[1]));
    let zv = var(&z2);
    let l = byol_loss(&var(&p1), &zv).unwrap();
    assert!(
        grad_of(&l, &zv).iter().all(|g| *g == 0.0),
        "target must get no gradient"
    );
}

#[test]
fn simsiam_matches_paper_with_stop_gradient() {
    let c = case("simsiam");
    let (p1, p2, z1, z2) = (
        field(c, "p1"),
        field(c, "p2"),
        field(c, "z1"),
        field(c, "z2"),
    );
    close(
        scalar(&negative_cosine_loss(&p1, &z2).unwrap()),
        num(c, "single"),
        TOL,
    );
    let s = NegativeCosineLoss::new(NegativeCosineLossConfig::default()).unwrap();
    close(
        scalar(&s.forward_symmetric(&p1, &p2, &z1, &z2).unwrap()),
        num(c, "symmetric"),
        TOL,
    );
    grad_check(&[p1.clone(), z2.clone()], &[0], |a| {
        negative_cosine_loss(&a[0], &a[1])
    });
    let zv = var(&z2);
    let l = negative_cosine_loss(&var(&p1), &zv).unwrap();
    assert!(
        grad_of(&l, &zv).iter().all(|g| *g == 0.0),
        "stop-gradient on z"
    );
}

#[test]
fn barlow_twins_matches_authors() {
    let c = case("barlow");
    let (z1, z2) = (field(c, "z1"), field(c, "z2"));
    close(
        scalar(&barlow_twins_loss(&z1, &z2, 5e-3).unwrap()),
        num(c, "lambda_5e-3"),
        TOL,
    );
    let b = BarlowTwinsLoss::new(BarlowTwinsLossConfig::default().with_lambda(0.1)).unwrap();
    close(
        scalar(&b.forward(&z1, &z2).unwrap()),
        num(c, "lambda_0.1"),
        TOL,
    );
    grad_check(&[z1, z2], &[0, 1], |a| b.forward(&a[0], &a[1]));
}

#[test]
fn vicreg_matches_authors() {
    let c = case("vicreg");
    let (x, y) = (field(c, "z1"), field(c, "z2"));
    close(
        scalar(&vicreg_loss(&x, &y).unwrap()),
        num(c, "total_25_25_1"),
        TOL,
    );
    let terms = VicRegLoss::new(VicRegLossConfig::default())
        .unwrap()
        .terms(&x, &y)
        .unwrap();
    close(scalar(&terms.invariance), num(c, "invariance"), TOL);
    close(scalar(&terms.variance), num(c, "variance"), TOL);
    close(scalar(&terms.covariance), num(c, "covariance"), TOL);
    let v = VicRegLoss::new(
        VicRegLossConfig::default()
            .with_sim_coeff(10.0)
            .with_std_coeff(5.0)
            .with_cov_coeff(2.0),
    )
    .unwrap();
    close(
        scalar(&v.forward(&x, &y).unwrap()),
        num(c, "total_10_5_2"),
        TOL,
    );
    grad_check(&[x, y], &[0, 1], |a| vicreg_loss(&a[0], &a[1]));
}

// ------------------------------------------------------------------ bad input

#[test]
fn bad_configs_are_rejected() {
    is_config_err(
        NtXentLoss::new(NtXentLossConfig::default().with_temperature(0.0)),
        "NtXentLossConfig::temperature",
    );
    is_config_err(
        NtXentLoss::new(NtXentLossConfig::default().with_temperature(-0.5)),
        "NtXentLossConfig::temperature",
    );
    is_config_err(
        InfoNceLoss::new(InfoNceLossConfig::default().with_temperature(f64::NAN)),
        "InfoNceLossConfig::temperature",
    );
    is_config_err(
        KdLoss::new(KdLossConfig::default().with_temperature(0.0)),
        "KdLossConfig::temperature",
    );
    is_config_err(
        KdLoss::new(KdLossConfig::default().with_alpha(1.5)),
        "KdLossConfig::alpha",
    );
    is_config_err(
        DkdLoss::new(DkdLossConfig::default().with_beta(-1.0)),
        "DkdLossConfig::beta",
    );
    is_config_err(
        CrossEntropyLoss::new(CrossEntropyLossConfig::default().with_label_smoothing(1.1)),
        "CrossEntropyLossConfig::label_smoothing",
    );
    is_config_err(
        CrossEntropyLoss::new(CrossEntropyLossConfig::default().with_weight(Some(vec![1.0, -1.0]))),
        "CrossEntropyLossConfig::weight",
    );
    is_config_err(
        BceWithLogitsLoss::new(BceWithLogitsLossConfig::default().with_pos_weight(Some(vec![]))),
        "BceWithLogitsLossConfig::pos_weight",
    );
    is_config_err(
        BarlowTwinsLoss::new(BarlowTwinsLossConfig::default().with_lambda(-1.0)),
        "BarlowTwinsLossConfig::lambda",
    );
    is_config_err(
        VicRegLoss::new(VicRegLossConfig::default().with_eps(0.0)),
        "VicRegLossConfig::eps",
    );
    is_config_err(
        AttentionTransferLoss::new(AttentionTransferLossConfig::default().with_p(0.0)),
        "AttentionTransferLossConfig::p",
    );
    is_config_err(
        RkdLoss::new(RkdLossConfig::default().with_angle_weight(f64::INFINITY)),
        "RkdLossConfig::angle_weight",
    );
    // The function forms validate too.
    let z = Tensor::ones((3, 2), DType::F32, &Device::Cpu).unwrap();
    is_err(nt_xent_loss(&z, &z, 0.0));
    is_err(kd_loss(&z, &z, -1.0));
}

#[test]
fn bad_inputs_are_rejected() {
    let dev = Device::Cpu;
    let z = |n: usize, d: usize| Tensor::ones((n, d), DType::F32, &dev).unwrap();
    // Empty batch.
    for r in [
        nt_xent_loss(&z(0, 4), &z(0, 4), 0.5),
        byol_loss(&z(0, 4), &z(0, 4)),
        negative_cosine_loss(&z(0, 4), &z(0, 4)),
        barlow_twins_loss(&z(0, 4), &z(0, 4), 5e-3),
        vicreg_loss(&z(0, 4), &z(0, 4)),
        mse_loss(&z(0, 4), &z(0, 4)),
        bce_with_logits_loss(&z(0, 4), &z(0, 4)),
        kd_loss(&z(0, 4), &z(0, 4), 4.0),
    ] {
        is_err(r);
    }
    // A batch of one for losses that need pairs.
    for r in [
        nt_xent_loss(&z(1, 4), &z(1, 4), 0.5),
        info_nce_loss(&z(1, 4), &z(1, 4), None, 0.2),
        barlow_twins_loss(&z(1, 4), &z(1, 4), 5e-3),
        vicreg_loss(&z(1, 4), &z(1, 4)),
        rkd_distance_loss(&z(1, 4), &z(1, 4)),
    ] {
        is_err(r);
    }
    // ... but MoCo with a queue has its negatives.
    assert!(info_nce_loss(&z(1, 4), &z(1, 4), Some(&z(3, 4)), 0.2).is_ok());
    // Mismatched shapes.
    for r in [
        nt_xent_loss(&z(4, 4), &z(4, 3), 0.5),
        nt_xent_loss(&z(4, 4), &z(3, 4), 0.5),
        info_nce_loss(&z(4, 4), &z(4, 4), Some(&z(5, 3)), 0.2),
        byol_loss(&z(4, 4), &z(4, 3)),
        negative_cosine_loss(&z(4, 4), &z(2, 4)),
        barlow_twins_loss(&z(4, 4), &z(4, 5), 5e-3),
        vicreg_loss(&z(4, 4), &z(3, 4)),
        mse_loss(&z(4, 4), &z(4, 1)),
        bce_with_logits_loss(&z(4, 4), &z(4, 1)),
        kd_loss(&z(4, 4), &z(4, 5), 4.0),
        kl_div_loss(&z(4, 4), &z(4, 5)),
        rkd_angle_loss(&z(4, 4), &z(3, 4)),
        nt_xent_loss(
            &Tensor::ones(4, DType::F32, &dev).unwrap(),
            &Tensor::ones(4, DType::F32, &dev).unwrap(),
            0.5,
        ),
    ] {
        is_err(r);
    }
    // Cross-entropy: labels out of range, wrong length, wrong dtype, weights of wrong length.
    let logits = z(3, 4);
    is_err(cross_entropy_loss(
        &logits,
        &Tensor::new(&[0u32, 4, 1], &dev).unwrap(),
    ));
    is_err(cross_entropy_loss(
        &logits,
        &Tensor::new(&[0i64, -3, 1], &dev).unwrap(),
    ));
    is_err(cross_entropy_loss(
        &logits,
        &Tensor::new(&[0u32, 1], &dev).unwrap(),
    ));
    is_err(cross_entropy_loss(
        &logits,
        &Tensor::new(&[0f32, 1., 2.], &dev).unwrap(),
    ));
    let w =
        CrossEntropyLoss::new(CrossEntropyLossConfig::default().with_weight(Some(vec![1.0; 3])))
            .unwrap();
    is_err(w.forward(&logits, &Tensor::new(&[0u32, 1, 2], &dev).unwrap()));
    is_err(KdLoss::new(KdLossConfig::default()).unwrap().forward(
        &logits,
        &logits,
        &Tensor::new(&[0u32, 9, 1], &dev).unwrap(),
    ));
    is_err(dkd_loss(
        &logits,
        &logits,
        &Tensor::new(&[0u32, 9, 1], &dev).unwrap(),
        1.0,
        8.0,
        4.0,
    ));
    // Attention transfer: non-integer size ratio, rank, batch mismatch.
    let fm = |n: usize, h: usize| Tensor::ones((n, 2, h, h), DType::F32, &dev).unwrap();
    is_err(attention_transfer_loss(&fm(2, 6), &fm(2, 4)));
    is_err(attention_transfer_loss(&fm(2, 4), &fm(3, 4)));
    is_err(attention_transfer_loss(&z(2, 4), &z(2, 4)));
    let at = AttentionTransferLoss::new(AttentionTransferLossConfig::default()).unwrap();
    is_err(at.forward(&[fm(2, 4)], &[]));
}

#[test]
fn f32_inputs_work_everywhere() {
    // Every loss runs in f32 and gives what the f64 fixture gives, to f32 precision.
    let c = case("nt_xent");
    let f = |k: &str| field(c, k).to_dtype(DType::F32).unwrap();
    close(
        scalar(&nt_xent_loss(&f("z1"), &f("z2"), 0.5).unwrap()),
        num(c, "t0.5"),
        1e-5,
    );
    let c = case("barlow");
    let f = |k: &str| field(c, k).to_dtype(DType::F32).unwrap();
    close(
        scalar(&barlow_twins_loss(&f("z1"), &f("z2"), 5e-3).unwrap()),
        num(c, "lambda_5e-3"),
        1e-4,
    );
    let c = case("rkd");
    let f = |k: &str| field(c, k).to_dtype(DType::F32).unwrap();
    close(
        scalar(
            &RkdLoss::new(RkdLossConfig::default())
                .unwrap()
                .forward(&f("student"), &f("teacher"))
                .unwrap(),
        ),
        num(c, "total_25_50"),
        1e-5,
    );
}

#[test]
fn key_queue_is_a_fifo_that_wraps() {
    let dev = Device::Cpu;
    let init = Tensor::new(&[[1.0f64, 0.0], [1.0, 0.0], [1.0, 0.0]], &dev).unwrap();
    let mut q = KeyQueue::new(&init).unwrap();
    // Pushed keys are normalised: [0, 2] -> [0, 1], [3, 4] -> [0.6, 0.8].
    q.push(&Tensor::new(&[[0.0f64, 2.0], [3.0, 4.0]], &dev).unwrap())
        .unwrap();
    assert_eq!(q.pointer(), 2);
    q.push(&Tensor::new(&[[-1.0f64, 0.0], [0.0, -5.0]], &dev).unwrap())
        .unwrap();
    assert_eq!(q.pointer(), 1);
    let got = q.keys().to_vec2::<f64>().unwrap();
    assert_eq!(got, vec![vec![0.0, -1.0], vec![0.6, 0.8], vec![-1.0, 0.0]]);
    assert!(q
        .push(&Tensor::ones((4, 2), DType::F64, &dev).unwrap())
        .is_err());
    assert!(q
        .push(&Tensor::ones((1, 3), DType::F64, &dev).unwrap())
        .is_err());
    // Seeded random queues are reproducible and unit-norm.
    let mk = || {
        let mut r = aimass::device::rng(7);
        KeyQueue::random(16, 4, &mut r, DType::F32, &dev).unwrap()
    };
    let (a, b) = (mk(), mk());
    assert_eq!(
        a.keys().to_vec2::<f32>().unwrap(),
        b.keys().to_vec2::<f32>().unwrap()
    );
    let norms = a
        .keys()
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5));
    assert!(info_nce_loss(
        &Tensor::ones((2, 4), DType::F32, &dev).unwrap(),
        &Tensor::ones((2, 4), DType::F32, &dev).unwrap(),
        Some(a.keys()),
        0.2
    )
    .is_ok());
}
