//! Functional parameters (`nn::ParamMap`): MAML's meta-gradient through
//! one and three differentiable inner SGD steps against central finite
//! differences of the post-adaptation loss, for an MLP and a small conv
//! net with BatchNorm, in f64. This binary turns second order on first
//! thing in every test (`autograd::enable_second_order`).

use std::collections::BTreeMap;

use aimass::autograd::{enable_second_order, Gradients};
use aimass::candle::{DType, Device, Tensor, Var};
use aimass::candle_nn::{VarBuilder, VarMap};
use aimass::nn::init::seeded_var_builder;
use aimass::nn::params;
use aimass::nn::*;
use aimass::Result;

mod common;
use common::randt;

const ALPHA: f64 = 0.1;

/// A model family the test can rebuild from any weights.
trait Family {
    type Net;
    fn build(vb: VarBuilder) -> Result<Self::Net>;
    fn forward(net: &Self::Net, x: &Tensor) -> Result<Tensor>;
}

struct TanhMlp;
impl Family for TanhMlp {
    type Net = Mlp;
    fn build(vb: VarBuilder) -> Result<Mlp> {
        Mlp::new(
            MlpConfig::new(vec![3, 5, 2]).with_activation(Activation::Tanh),
            vb,
        )
    }
    fn forward(net: &Mlp, x: &Tensor) -> Result<Tensor> {
        net.forward_t(x, true)
    }
}

/// conv 1→3 3×3 – BatchNorm (train mode: batch statistics) – tanh –
/// global average pool – linear 3→2.
struct ConvBn;
struct ConvBnNet {
    conv: Conv2d,
    bn: BatchNorm,
    fc: Linear,
}
impl Family for ConvBn {
    type Net = ConvBnNet;
    fn build(vb: VarBuilder) -> Result<ConvBnNet> {
        Ok(ConvBnNet {
            conv: Conv2d::new(
                1,
                3,
                3,
                Conv2dConfig::default().with_padding(1),
                vb.pp("conv"),
            )?,
            bn: BatchNorm::new(3, BatchNormConfig::default(), vb.pp("bn"))?,
            fc: Linear::new(3, 2, true, vb.pp("fc"))?,
        })
    }
    fn forward(net: &ConvBnNet, x: &Tensor) -> Result<Tensor> {
        let h = net.bn.forward_t(&net.conv.forward(x)?, true)?.tanh()?;
        net.fc.forward(&global_avg_pool(&h)?)
    }
}

fn mse(y: &Tensor, t: &Tensor) -> Result<Tensor> {
    Ok((y - t)?.sqr()?.mean_all()?)
}

/// Post-adaptation query loss after `steps` inner SGD steps from `theta`.
fn adapted_loss<F: Family>(
    theta: &ParamMap,
    steps: usize,
    create_graph: bool,
    (xs, ys, xq, yq): (&Tensor, &Tensor, &Tensor, &Tensor),
) -> Result<Tensor> {
    let mut fast = theta.clone();
    for _ in 0..steps {
        let net = fast.build(F::build)?;
        let inner = mse(&F::forward(&net, xs)?, ys)?;
        fast = fast.adapt(&inner, ALPHA, create_graph)?;
    }
    let net = fast.build(F::build)?;
    mse(&F::forward(&net, xq)?, yq)
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// The meta-gradient by autograd (second or first order) and by central
/// finite differences of the post-adaptation loss, per parameter.
#[allow(clippy::type_complexity)]
fn meta_gradients<F: Family>(
    steps: usize,
    data: (&Tensor, &Tensor, &Tensor, &Tensor),
    seed: u64,
) -> (
    BTreeMap<String, Vec<f64>>,
    BTreeMap<String, Vec<f64>>,
    BTreeMap<String, Vec<f64>>,
) {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    F::build(seeded_var_builder(&varmap, seed, DType::F64, &dev)).unwrap();
    let theta = ParamMap::from_varmap(&varmap).unwrap();
    let loss = adapted_loss::<F>(&theta, steps, true, data).unwrap();
    let second = Gradients::from_varmap(&loss.backward().unwrap(), &varmap).unwrap();
    let loss = adapted_loss::<F>(&theta, steps, false, data).unwrap();
    let first = Gradients::from_varmap(&loss.backward().unwrap(), &varmap).unwrap();

    let h = 1e-5;
    let base: BTreeMap<String, Vec<f64>> = params::named_vars(&varmap)
        .unwrap()
        .into_iter()
        .map(|(n, v)| (n, values(v.as_tensor())))
        .collect();
    let mut numeric = BTreeMap::new();
    for (name, var) in params::trainable_vars(&varmap, &params::Frozen::none()).unwrap() {
        let mut g = Vec::new();
        for j in 0..var.elem_count() {
            let eval = |delta: f64| {
                let vm = VarMap::new();
                F::build(seeded_var_builder(&vm, seed, DType::F64, &dev)).unwrap();
                for (n, v) in params::named_vars(&vm).unwrap() {
                    let mut vals = base[&n].clone();
                    if n == name {
                        vals[j] += delta;
                    }
                    v.set(&Tensor::from_vec(vals, v.dims(), &dev).unwrap())
                        .unwrap();
                }
                let theta = ParamMap::detached_copy(&vm).unwrap();
                adapted_loss::<F>(&theta, steps, false, data)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            g.push((eval(h) - eval(-h)) / (2.0 * h));
        }
        numeric.insert(name, g);
    }
    let as_map = |g: &Gradients| -> BTreeMap<String, Vec<f64>> {
        g.iter().map(|(n, t)| (n.to_string(), values(t))).collect()
    };
    (as_map(&second), as_map(&first), numeric)
}

/// max over parameters of ‖a − n‖ / ‖n‖, where a parameter whose true
/// meta-gradient is (nearly) zero, like a conv bias under BatchNorm, is
/// measured against the whole meta-gradient's norm.
fn rel_error(a: &BTreeMap<String, Vec<f64>>, n: &BTreeMap<String, Vec<f64>>) -> f64 {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        n.keys().collect::<Vec<_>>(),
        "every parameter needs a meta-gradient"
    );
    let norm = |v: &[f64]| v.iter().map(|y| y * y).sum::<f64>().sqrt();
    let total = n.values().map(|v| norm(v).powi(2)).sum::<f64>().sqrt();
    let mut worst = 0.0f64;
    for (name, nv) in n {
        let av = &a[name];
        let diff: Vec<f64> = av.iter().zip(nv).map(|(x, y)| x - y).collect();
        let rel = norm(&diff) / norm(nv).max(1e-3 * total);
        if std::env::var("DEBUG_META").is_ok() {
            eprintln!("{name}: rel {rel:e}");
        }
        worst = worst.max(rel);
    }
    worst
}

fn check_family<F: Family>(x_shape: &[usize], y_shape: &[usize], seed: u64) {
    enable_second_order().unwrap();
    let xs = randt(x_shape, seed);
    let ys = randt(y_shape, seed + 1);
    let xq = randt(x_shape, seed + 2);
    let yq = randt(y_shape, seed + 3);
    for steps in [1, 3] {
        let (second, first, numeric) = meta_gradients::<F>(steps, (&xs, &ys, &xq, &yq), seed + 10);
        let e2 = rel_error(&second, &numeric);
        assert!(
            e2 <= 1e-6,
            "{steps} steps: second-order meta-gradient off by {e2:e} (relative)"
        );
        // First order drops the inner gradients' dependence on θ: it is a
        // different (approximate) gradient, visibly so.
        let e1 = rel_error(&first, &numeric);
        assert!(
            e1 > 1e-3,
            "{steps} steps: first order should differ, rel {e1:e}"
        );
    }
}

#[test]
fn maml_meta_gradient_of_an_mlp_matches_finite_differences() {
    check_family::<TanhMlp>(&[4, 3], &[4, 2], 1);
}

#[test]
fn maml_meta_gradient_of_a_conv_net_with_batch_norm_matches_finite_differences() {
    check_family::<ConvBn>(&[3, 1, 4, 4], &[3, 2], 2);
}

/// Meta-SGD: the gradient with respect to learned per-element learning
/// rates, against finite differences.
#[test]
fn learned_learning_rates_get_the_right_gradient() {
    enable_second_order().unwrap();
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    TanhMlp::build(seeded_var_builder(&varmap, 5, DType::F64, &dev)).unwrap();
    let (xs, ys, xq, yq) = (
        randt(&[4, 3], 20),
        randt(&[4, 2], 21),
        randt(&[4, 3], 22),
        randt(&[4, 2], 23),
    );
    let theta = ParamMap::from_varmap(&varmap).unwrap();
    let loss_for = |rates: &BTreeMap<String, Tensor>| -> Tensor {
        let net = theta.build(TanhMlp::build).unwrap();
        let inner = mse(&TanhMlp::forward(&net, &xs).unwrap(), &ys).unwrap();
        let g = theta.grad(&inner, true).unwrap();
        let fast = theta.sgd_step_with_rates(&g, rates).unwrap();
        let net = fast.build(TanhMlp::build).unwrap();
        mse(&TanhMlp::forward(&net, &xq).unwrap(), &yq).unwrap()
    };
    let rate_vars: BTreeMap<String, Var> = theta
        .params()
        .enumerate()
        .map(|(i, (n, t))| {
            let r = (randt(t.dims(), 30 + i as u64).abs().unwrap() * 0.1).unwrap();
            (n.to_string(), Var::from_tensor(&r).unwrap())
        })
        .collect();
    let rates: BTreeMap<String, Tensor> = rate_vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let store = loss_for(&rates).backward().unwrap();
    let name = "2.weight";
    let analytic = values(store.get(rate_vars[name].as_tensor()).unwrap());
    let base = values(&rates[name]);
    for (j, a) in analytic.iter().enumerate() {
        let eval = |d: f64| {
            let mut v = base.clone();
            v[j] += d;
            let mut r = rates.clone();
            r.insert(
                name.into(),
                Tensor::from_vec(v, rates[name].dims(), &dev).unwrap(),
            );
            loss_for(&r).to_scalar::<f64>().unwrap()
        };
        let n = (eval(1e-5) - eval(-1e-5)) / 2e-5;
        assert!(
            (a - n).abs() <= 1e-7 * (1.0 + n.abs()),
            "rate {j}: {a} vs {n}"
        );
    }
}

#[test]
fn connected_maps_share_buffers_and_detached_copies_do_not() {
    enable_second_order().unwrap();
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    ConvBn::build(seeded_var_builder(&varmap, 3, DType::F64, &dev)).unwrap();
    let running = || values(varmap.data().lock().unwrap()["bn.running_mean"].as_tensor());
    let w_before = values(varmap.data().lock().unwrap()["conv.weight"].as_tensor());
    let x = randt(&[2, 1, 4, 4], 40);
    let before = running();
    let copy = ParamMap::detached_copy(&varmap).unwrap();
    ConvBn::forward(&copy.build(ConvBn::build).unwrap(), &x).unwrap();
    assert_eq!(
        running(),
        before,
        "a detached copy must not touch the original"
    );
    assert_ne!(values(copy.get("bn.running_mean").unwrap()), before);
    let connected = ParamMap::from_varmap(&varmap).unwrap();
    ConvBn::forward(&connected.build(ConvBn::build).unwrap(), &x).unwrap();
    assert_ne!(
        running(),
        before,
        "connected maps share the running statistics"
    );
    // Adapted weights written back.
    let net = copy.build(ConvBn::build).unwrap();
    let loss = ConvBn::forward(&net, &x)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let fast = copy.adapt(&loss, 0.5, false).unwrap();
    assert_eq!(
        values(varmap.data().lock().unwrap()["conv.weight"].as_tensor()),
        w_before,
        "sgd_step never changes its input"
    );
    fast.write_into(&varmap).unwrap();
    assert_eq!(
        values(varmap.data().lock().unwrap()["conv.weight"].as_tensor()),
        values(fast.get("conv.weight").unwrap())
    );
}

#[test]
fn bad_inputs_are_errors() {
    enable_second_order().unwrap();
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    TanhMlp::build(seeded_var_builder(&varmap, 4, DType::F64, &dev)).unwrap();
    let theta = ParamMap::from_varmap(&varmap).unwrap();
    let mut g = Gradients::new();
    g.insert("nope.weight", Tensor::zeros(2, DType::F64, &dev).unwrap());
    let e = theta.sgd_step(&g, 0.1).unwrap_err().to_string();
    assert!(e.contains("nope.weight"), "{e}");
    let mut g = Gradients::new();
    g.insert("0.bias", Tensor::zeros(3, DType::F64, &dev).unwrap());
    assert!(matches!(
        theta.sgd_step(&g, 0.1),
        Err(aimass::Error::Shape { .. })
    ));
    assert!(theta.sgd_step(&Gradients::new(), f64::NAN).is_err());
    let vec_loss = Tensor::zeros(2, DType::F64, &dev).unwrap();
    assert!(matches!(
        theta.grad(&vec_loss, false),
        Err(aimass::Error::Shape { .. })
    ));
    // Building another model from the map names the missing tensor.
    let e = theta
        .build(|vb| Linear::new(3, 5, true, vb.pp("other")))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("other.weight"), "{e}");
    let e = theta
        .build(|vb| Linear::new(4, 5, true, vb.pp("0")))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("0.weight") && e.contains("[5, 3]"), "{e}");
}
