//! Gradients as a value: stepping an optimizer from named gradients equals
//! stepping from the `GradStore` they came from, bit for bit, for every
//! optimizer; micro-batch accumulation gives the whole batch's gradient.

mod common;

use aimass::autograd::{GradAccumulator, Gradients};
use aimass::candle::{DType, Device, Tensor};
use aimass::candle_nn::VarMap;
use aimass::nn::init::seeded_var_builder;
use aimass::nn::{params, Mlp, MlpConfig};
use aimass::optim::*;
use common::randt;

fn net(vm: &VarMap, bn: bool, dt: DType) -> Mlp {
    Mlp::new(
        MlpConfig::new(vec![4, 6, 3]).with_batch_norm(bn),
        seeded_var_builder(vm, 7, dt, &Device::Cpu),
    )
    .unwrap()
}

fn loss_of(m: &Mlp, x: &Tensor, y: &Tensor) -> Tensor {
    (m.forward_t(x, true).unwrap() - y)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
}

fn snapshot(vm: &VarMap) -> Vec<(String, Vec<f32>)> {
    params::named_vars(vm)
        .unwrap()
        .into_iter()
        .map(|(n, v)| {
            let t = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            (n, t.to_vec1::<f32>().unwrap())
        })
        .collect()
}

type Make = fn(&VarMap) -> Box<dyn Optimizer>;

#[test]
fn every_optimizer_steps_from_named_gradients_as_from_the_grad_store() {
    let makers: Vec<(&str, Make)> = vec![
        ("sgd", |vm| {
            let c = SgdConfig::default()
                .with_lr(0.1)
                .with_momentum(0.9)
                .with_nesterov(true)
                .with_weight_decay(1e-3)
                .with_grad_clip(GradClip::norm(0.05));
            Box::new(Sgd::from_varmap(vm, c).unwrap())
        }),
        ("sgd-candle-ops", |vm| {
            let c = SgdConfig::default()
                .with_lr(0.1)
                .with_momentum(0.5)
                .with_fused(false);
            Box::new(Sgd::from_varmap(vm, c).unwrap())
        }),
        ("adam", |vm| {
            let c = AdamConfig::default().with_lr(1e-2).with_amsgrad(true);
            Box::new(Adam::from_varmap(vm, c).unwrap())
        }),
        ("adamw", |vm| {
            let c = AdamWConfig::default()
                .with_lr(1e-2)
                .with_grad_clip(GradClip::Value(0.01));
            Box::new(AdamW::from_varmap(vm, c).unwrap())
        }),
        ("rmsprop", |vm| {
            let c = RmsPropConfig::default()
                .with_lr(1e-2)
                .with_centered(true)
                .with_momentum(0.9);
            Box::new(RmsProp::from_varmap(vm, c).unwrap())
        }),
        ("lars", |vm| {
            Box::new(Lars::from_varmap(vm, LarsConfig::default()).unwrap())
        }),
    ];
    let x = randt(&[8, 4], 1).to_dtype(DType::F32).unwrap();
    let y = randt(&[8, 3], 2).to_dtype(DType::F32).unwrap();
    for (name, make) in makers {
        let (vm_a, vm_b) = (VarMap::new(), VarMap::new());
        let (net_a, net_b) = (net(&vm_a, true, DType::F32), net(&vm_b, true, DType::F32));
        let (mut opt_a, mut opt_b) = (make(&vm_a), make(&vm_b));
        for _ in 0..5 {
            opt_a
                .step(&loss_of(&net_a, &x, &y).backward().unwrap())
                .unwrap();
            let store = loss_of(&net_b, &x, &y).backward().unwrap();
            let grads = Gradients::from_varmap(&store, &vm_b).unwrap();
            assert_eq!(grads.len(), 6, "{name}: BatchNorm buffers get no gradient");
            opt_b.step_gradients(&grads).unwrap();
        }
        assert_eq!(snapshot(&vm_a), snapshot(&vm_b), "{name}");
        assert_eq!(opt_a.step_count(), opt_b.step_count());
        assert_eq!(
            format!(
                "{:?}",
                opt_a
                    .state_dict()
                    .unwrap()
                    .keys()
                    .collect::<std::collections::BTreeSet<_>>()
            ),
            format!(
                "{:?}",
                opt_b
                    .state_dict()
                    .unwrap()
                    .keys()
                    .collect::<std::collections::BTreeSet<_>>()
            ),
        );
    }
}

#[test]
fn unknown_or_misshaped_gradients_change_nothing() {
    let vm = VarMap::new();
    let _ = net(&vm, false, DType::F32);
    let mut opt = Sgd::from_varmap(&vm, SgdConfig::default().with_lr(0.1)).unwrap();
    let before = snapshot(&vm);
    let mut g = Gradients::new();
    g.insert(
        "0.weight",
        Tensor::ones((6, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    g.insert(
        "fc.weight",
        Tensor::ones((6, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = opt.step_gradients(&g).unwrap_err().to_string();
    assert!(e.contains("fc.weight"), "{e}");
    let mut g = Gradients::new();
    g.insert(
        "0.weight",
        Tensor::ones((4, 6), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(matches!(
        opt.step_gradients(&g),
        Err(aimass::Error::Shape { .. })
    ));
    assert_eq!(snapshot(&vm), before);
    assert_eq!(opt.step_count(), 0);
    // A bad rate set through candle's trait (which cannot refuse it) stops
    // this path too.
    aimass::candle_nn::Optimizer::set_learning_rate(&mut opt, f64::NAN);
    let mut g = Gradients::new();
    g.insert("2.bias", Tensor::ones(3, DType::F32, &Device::Cpu).unwrap());
    assert!(opt.step_gradients(&g).is_err());
    assert_eq!(snapshot(&vm), before);
    opt.set_lr(0.1).unwrap();
    // A subset of the parameters: the others are untouched.
    let mut g = Gradients::new();
    g.insert("2.bias", Tensor::ones(3, DType::F32, &Device::Cpu).unwrap());
    opt.step_gradients(&g).unwrap();
    let after = snapshot(&vm);
    for ((n, a), (_, b)) in after.iter().zip(&before) {
        assert_eq!(a != b, n == "2.bias", "{n}");
    }
}

/// Micro-batches of 5, 4 and 3 samples, each loss its own mean, weighted by
/// size: the mean is the gradient of the 12-sample batch, and the step from
/// it is the full-batch step.
#[test]
fn accumulated_micro_batches_give_the_full_batch_gradient_and_step() {
    let x = randt(&[12, 4], 3);
    let y = randt(&[12, 3], 4);
    let (vm_full, vm_micro) = (VarMap::new(), VarMap::new());
    let (full, micro) = (
        net(&vm_full, false, DType::F64),
        net(&vm_micro, false, DType::F64),
    );
    let store = loss_of(&full, &x, &y).backward().unwrap();
    let want = Gradients::from_varmap(&store, &vm_full).unwrap();

    let mut acc = GradAccumulator::new();
    let mut start = 0;
    for size in [5, 4, 3] {
        let xs = x.narrow(0, start, size).unwrap();
        let ys = y.narrow(0, start, size).unwrap();
        let store = loss_of(&micro, &xs, &ys).backward().unwrap();
        let params = params::trainable_vars(&vm_micro, &params::Frozen::none()).unwrap();
        let g = Gradients::from_store(&store, &params);
        acc.add_weighted(&g, size as f64).unwrap();
        start += size;
    }
    assert_eq!(acc.count(), 3);
    assert_eq!(acc.total_weight(), 12.0);
    let got = acc.mean().unwrap();
    assert_eq!(got.names(), want.names());
    for (n, w) in want.iter() {
        let (a, b) = (got.get(n).unwrap(), w);
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let s = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d <= 1e-12 * s.max(1e-12), "{n}: {d} vs scale {s}");
    }
    // Accumulated gradients carry no graph.
    assert!(got.iter().all(|(_, t)| !t.track_op()));

    let mk = |vm: &VarMap| {
        Sgd::from_varmap(vm, SgdConfig::default().with_lr(0.5).with_momentum(0.9)).unwrap()
    };
    let (mut a, mut b) = (mk(&vm_full), mk(&vm_micro));
    a.step(&store_of(&full, &x, &y)).unwrap();
    b.step_gradients(&acc.take_mean().unwrap()).unwrap();
    assert_eq!(acc.count(), 0);
    for ((n, va), (_, vb)) in params::named_vars(&vm_full)
        .unwrap()
        .iter()
        .zip(params::named_vars(&vm_micro).unwrap().iter())
    {
        let d = (va.as_tensor() - vb.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12, "{n}: {d}");
    }
}

fn store_of(m: &Mlp, x: &Tensor, y: &Tensor) -> aimass::candle::backprop::GradStore {
    loss_of(m, x, y).backward().unwrap()
}

#[test]
fn gradient_arithmetic_and_errors() {
    let dev = Device::Cpu;
    let t = |v: &[f64]| Tensor::new(v, &dev).unwrap();
    let mut a = Gradients::new();
    a.insert("w", t(&[1.0, 2.0]));
    let mut b = Gradients::new();
    b.insert("w", t(&[3.0, 4.0]));
    b.insert("v", t(&[10.0]));
    let m = Gradients::mean_of(&[a.clone(), b.clone()]).unwrap();
    assert_eq!(
        m.get("w").unwrap().to_vec1::<f64>().unwrap(),
        vec![2.0, 3.0]
    );
    // Missing from one set counts as zero there.
    assert_eq!(m.get("v").unwrap().to_vec1::<f64>().unwrap(), vec![5.0]);
    assert!(Gradients::mean_of(&[]).is_err());
    assert!(a.scale(f64::INFINITY).is_err());
    let mut c = Gradients::new();
    c.insert("w", t(&[1.0]));
    assert!(matches!(a.add(&c), Err(aimass::Error::Shape { .. })));
    let mut acc = GradAccumulator::new();
    assert!(acc.mean().is_err());
    assert!(acc.add_weighted(&a, 0.0).is_err());
    assert!(acc.add_weighted(&a, f64::NAN).is_err());
    acc.add(&a).unwrap();
    // A failed addition changes nothing.
    assert!(acc.add(&c).is_err());
    assert_eq!(acc.count(), 1);
    assert_eq!(
        acc.mean()
            .unwrap()
            .get("w")
            .unwrap()
            .to_vec1::<f64>()
            .unwrap(),
        vec![1.0, 2.0]
    );
}
