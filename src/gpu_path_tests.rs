//! The code path of CUDA and Metal, run on the CPU.
//!
//! `host::Emulate` makes the crate treat the CPU as "not the CPU": our CPU
//! kernels and fused optimizer updates step aside, candle's ops run instead
//! (the ops CUDA and Metal run), targets are not read back, and host reads
//! are counted. These tests check that this path computes what the CPU
//! path computes (which `tests/` checks against PyTorch and finite
//! differences), that a training step reads from the device once, and that
//! where candle's op is wrong we do not use it.

use candle_core::{DType, Device, Tensor, Var};

use crate::device::rng;
use crate::host::Emulate;
use crate::ops::{self, Conv2dParams};

fn randn(dims: &[usize], seed: u64) -> Tensor {
    use rand::Rng;
    let mut r = rng(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| r.random::<f64>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + x.abs().max(y.abs())),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// Output and input gradients of `f(inputs)` weighted by a fixed random
/// cotangent, on the CPU path and on the emulated device path.
fn both_paths<F>(inputs: &[Tensor], f: F) -> [(Vec<f32>, Vec<Vec<f32>>); 2]
where
    F: Fn(&[Tensor]) -> crate::Result<Tensor>,
{
    let run = || {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).unwrap();
        let cot = randn(y.dims(), 99);
        let grads = (&y * &cot).unwrap().sum_all().unwrap().backward().unwrap();
        let g = ts
            .iter()
            .map(|t| grads.get(t).map(flat).unwrap_or_default())
            .collect();
        (flat(&y), g)
    };
    let cpu = run();
    let _e = Emulate::start();
    [cpu, run()]
}

fn same_on_both_paths<F>(what: &str, inputs: &[Tensor], f: F)
where
    F: Fn(&[Tensor]) -> crate::Result<Tensor>,
{
    let [(y0, g0), (y1, g1)] = both_paths(inputs, f);
    assert_close(&format!("{what}: output"), &y1, &y0, 1e-5);
    for (i, (a, b)) in g1.iter().zip(&g0).enumerate() {
        assert!(!b.is_empty(), "{what}: no CPU gradient for input {i}");
        assert_close(&format!("{what}: gradient {i}"), a, b, 1e-4);
    }
}

#[test]
fn conv2d_gradients_match_the_cpu_kernel() {
    // (h, w, kernel, stride, padding, dilation, groups). The second and
    // third have different leftover rows and columns at stride 2, which
    // candle's conv2d backward gets wrong on its own.
    let cases = [
        (6, 6, 3, 1, 1, 1, 1),
        (8, 7, 3, 2, 1, 1, 1),
        (7, 8, 3, 2, 1, 1, 1),
        (9, 6, 3, 2, 0, 1, 2),
        (10, 9, 3, 1, 2, 2, 1),
        (9, 11, 1, 2, 0, 1, 1),
        (11, 8, 5, 3, 2, 1, 1),
    ];
    for (i, &(h, w, k, s, p, d, g)) in cases.iter().enumerate() {
        let x = randn(&[2, 4, h, w], i as u64);
        let wt = randn(&[6, 4 / g, k, k], 100 + i as u64);
        let b = randn(&[6], 200 + i as u64);
        let params = Conv2dParams::default()
            .with_stride(s)
            .with_padding(p)
            .with_dilation(d)
            .with_groups(g);
        same_on_both_paths(&format!("conv2d case {i}"), &[x, wt, b], |t| {
            ops::conv2d(&t[0], &t[1], Some(&t[2]), &params)
        });
    }
}

#[test]
fn pools_and_relu_match_the_cpu_kernels() {
    // Kernel != stride and padding: where candle's max_pool2d backward is
    // wrong (1/(k·k) scaling) or fails.
    for (i, &(k, s, p)) in [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 3, 1)]
        .iter()
        .enumerate()
    {
        let x = randn(&[2, 3, 9, 8], 300 + i as u64);
        same_on_both_paths(
            &format!("max_pool2d {k}/{s}/{p}"),
            std::slice::from_ref(&x),
            |t| ops::max_pool2d(&t[0], (k, k), (s, s), (p, p)),
        );
        same_on_both_paths(&format!("avg_pool2d {k}/{s}/{p}"), &[x], |t| {
            ops::avg_pool2d(&t[0], (k, k), (s, s), (p, p))
        });
    }
    let x = randn(&[3, 5, 4], 310);
    same_on_both_paths("relu", &[x], |t| ops::relu(&t[0]));
}

#[test]
fn max_pool_gradient_is_one_per_window_off_the_cpu() {
    // The hand-derived gradient: each window's maximum gets the whole
    // upstream gradient (candle's own backward would give 1/4).
    let x = Var::new(&[[[[1f32, 5.0], [3.0, 2.0]]]], &Device::Cpu).unwrap();
    let _e = Emulate::start();
    let y = ops::max_pool2d(x.as_tensor(), (2, 2), (2, 2), (0, 0)).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(flat(g.get(&x).unwrap()), vec![0.0, 1.0, 0.0, 0.0]);
}

#[test]
fn batch_norm_matches_the_cpu_kernel_with_running_statistics() {
    use crate::nn::{BatchNorm, BatchNormConfig};
    let x = randn(&[4, 3, 5, 6], 400);
    let s = randn(&[4, 3, 5, 6], 401);
    let run = |tail: usize| {
        let vm = candle_nn::VarMap::new();
        let vb = crate::nn::init::seeded_var_builder(&vm, 7, DType::F32, &Device::Cpu);
        let bn = BatchNorm::new(3, BatchNormConfig::default(), vb).unwrap();
        // Non-trivial affine parameters.
        for (name, v) in crate::nn::params::named_vars(&vm).unwrap() {
            if name.ends_with("weight") || name.ends_with("bias") {
                v.set(&randn(v.dims(), 402 + name.len() as u64)).unwrap();
            }
        }
        let xv = Var::from_tensor(&x).unwrap();
        let y = match tail {
            0 => bn.forward_t(xv.as_tensor(), true),
            1 => bn.forward_relu_t(xv.as_tensor(), true),
            _ => bn.forward_add_relu_t(xv.as_tensor(), &s, true),
        }
        .unwrap();
        let grads = (&y * randn(y.dims(), 403))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut out = vec![flat(&y), flat(grads.get(xv.as_tensor()).unwrap())];
        for (_, v) in crate::nn::params::named_vars(&vm).unwrap() {
            // Parameters' gradients, and the running statistics' new values.
            out.push(
                grads
                    .get(v.as_tensor())
                    .map(flat)
                    .unwrap_or_else(|| flat(v.as_tensor())),
            );
        }
        out
    };
    for tail in 0..3 {
        let cpu = run(tail);
        let dev = {
            let _e = Emulate::start();
            run(tail)
        };
        for (i, (a, b)) in dev.iter().zip(&cpu).enumerate() {
            assert_close(&format!("batch norm tail {tail}, part {i}"), a, b, 1e-4);
        }
    }
}

/// A small network with every op the crate routes by device: convolutions
/// (one strided with unequal leftovers), BatchNorm, ReLU, max pooling with
/// kernel != stride, a linear head.
fn small_net(vm: &candle_nn::VarMap) -> crate::nn::SequentialT {
    use crate::nn::{seq, BatchNorm, BatchNormConfig, Conv2d, Conv2dConfig, Flatten, MaxPool2d};
    let vb = crate::nn::init::seeded_var_builder(vm, 11, DType::F32, &Device::Cpu);
    let c1 = Conv2d::new(
        1,
        4,
        3,
        Conv2dConfig::default().with_padding(1),
        vb.pp("c1"),
    )
    .unwrap();
    let bn = BatchNorm::new(4, BatchNormConfig::default(), vb.pp("bn")).unwrap();
    let c2 = Conv2d::new(
        4,
        6,
        3,
        Conv2dConfig::default().with_stride(2).with_padding(1),
        vb.pp("c2"),
    )
    .unwrap();
    // 8×7 input → pool 4×4 → c2 2×2.
    let fc = crate::nn::linear(6 * 2 * 2, 3, vb.pp("fc")).unwrap();
    seq()
        .add(c1)
        .add_fn(move |x, train| {
            bn.forward_relu_t(x, train)
                .map_err(candle_core::Error::wrap)
        })
        .add(MaxPool2d::new(3, 2, 1).unwrap())
        .add(c2)
        .add_fn(|x, _| crate::ops::relu(x).map_err(candle_core::Error::wrap))
        .add(Flatten)
        .add(fc)
}

fn batch(seed: u64) -> crate::data::Batch {
    crate::data::Batch {
        views: vec![randn(&[6, 1, 8, 7], seed)],
        labels: Tensor::new(&[0u32, 1, 2, 2, 1, 0], &Device::Cpu).unwrap(),
        indices: (0..6).collect(),
        epoch: 0,
        batch: seed as usize,
    }
}

/// Losses of three guarded, clipped classifier steps, the parameters
/// after them, and the host reads each step made.
fn classifier_run() -> (Vec<f64>, Vec<Vec<f32>>, Vec<u64>) {
    use crate::optim::{GradClip, Sgd, SgdConfig};
    use crate::train::{Classifier, ClassifierConfig, NonFinitePolicy, TrainStep};
    let vm = candle_nn::VarMap::new();
    let net = small_net(&vm);
    let opt = Sgd::from_varmap(
        &vm,
        SgdConfig::default()
            .with_lr(0.1)
            .with_momentum(0.9)
            .with_weight_decay(1e-3)
            .with_grad_clip(GradClip::norm(0.05)),
    )
    .unwrap();
    let cfg = ClassifierConfig::default()
        .with_label_smoothing(0.1)
        .with_non_finite(NonFinitePolicy::Skip { max_skips: 3 });
    let mut clf = Classifier::new(net, vm.clone(), opt, cfg).unwrap();
    let (mut losses, mut reads) = (Vec::new(), Vec::new());
    for step in 1..=3 {
        let before = crate::host::read_count();
        let out = clf.train_step(&batch(500 + step), step).unwrap();
        reads.push(crate::host::read_count() - before);
        losses.push(out.loss);
    }
    let params = crate::nn::params::named_vars(&vm)
        .unwrap()
        .iter()
        .map(|(_, v)| flat(v.as_tensor()))
        .collect();
    (losses, params, reads)
}

#[test]
fn classifier_step_off_the_cpu_reads_once_and_trains_like_the_cpu() {
    let (cpu_losses, cpu_params, _) = classifier_run();
    let _e = Emulate::start();
    let (losses, params, reads) = classifier_run();
    // One transfer per step: the loss, the batch accuracy and every
    // gradient's sum of squares (shared by the guard and the clipping).
    assert_eq!(reads, vec![1, 1, 1]);
    for (a, b) in losses.iter().zip(&cpu_losses) {
        assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "loss {a} vs {b}");
    }
    for (i, (a, b)) in params.iter().zip(&cpu_params).enumerate() {
        assert_close(&format!("parameter {i}"), a, b, 1e-4);
    }
}

#[test]
fn mixed_precision_guard_and_clipping_share_one_read() {
    use crate::optim::{GradClip, Optimizer, Sgd, SgdConfig};
    use crate::train::{
        GuardAction, LossScalerConfig, MixedPrecision, MixedPrecisionConfig, NonFiniteGuard,
        Precision,
    };
    let vm = candle_nn::VarMap::new();
    let vb = crate::nn::init::seeded_var_builder(&vm, 3, DType::F32, &Device::Cpu);
    crate::nn::linear(5, 2, vb.pp("fc")).unwrap();
    let params = crate::nn::params::named_vars(&vm).unwrap();
    let mut mp = MixedPrecision::new(
        MixedPrecisionConfig::default()
            .with_precision(Precision::F16)
            .with_loss_scaler(LossScalerConfig::default().with_init_scale(256.0)),
    )
    .unwrap();
    let mut guard = NonFiniteGuard::default();
    let mut opt = Sgd::from_varmap(
        &vm,
        SgdConfig::default()
            .with_lr(0.1)
            .with_grad_clip(GradClip::norm(0.01)),
    )
    .unwrap();
    let x = randn(&[4, 5], 600).to_dtype(DType::F16).unwrap();
    let _e = Emulate::start();
    for step in 1..=2 {
        let before = crate::host::read_count();
        let fc =
            crate::nn::linear(5, 2, mp.var_builder(&vm, &Device::Cpu).unwrap().pp("fc")).unwrap();
        let loss = candle_core::Module::forward(&fc, &x)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let grads = mp
            .backward(&loss, &vm)
            .unwrap()
            .expect("no overflow at scale 256");
        let (action, value) = guard.check_step(&loss, &grads, &params, step).unwrap();
        assert_eq!(action, GuardAction::Proceed);
        assert!(value.is_finite() && value > 0.0);
        opt.step(&grads).unwrap();
        assert_eq!(crate::host::read_count() - before, 1, "step {step}");
    }
}

#[test]
fn cross_entropy_is_the_same_off_the_cpu_and_reads_nothing() {
    use crate::loss::{CrossEntropyLoss, CrossEntropyLossConfig, Reduction};
    let logits = randn(&[5, 4], 700);
    let y = Tensor::new(&[3i64, -100, 0, 2, 1], &Device::Cpu).unwrap();
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let ce = CrossEntropyLoss::new(
            CrossEntropyLossConfig::default()
                .with_label_smoothing(0.2)
                .with_weight(Some(vec![0.5, 1.0, 2.0, 1.5]))
                .with_reduction(reduction),
        )
        .unwrap();
        let start = crate::host::read_count();
        same_on_both_paths("cross_entropy", std::slice::from_ref(&logits), |t| {
            ce.forward(&t[0], &y)
        });
        assert_eq!(crate::host::read_count(), start);
    }
}

#[test]
fn bad_targets_off_the_cpu_poison_the_loss_and_the_classifier_names_them() {
    use crate::loss::{dkd_loss, CrossEntropyLoss, CrossEntropyLossConfig, Reduction};
    let logits = randn(&[3, 4], 710);
    let bad = Tensor::new(&[1u32, 4, 0], &Device::Cpu).unwrap();
    // On the CPU: an error naming the target.
    let ce =
        CrossEntropyLoss::new(CrossEntropyLossConfig::default().with_reduction(Reduction::None))
            .unwrap();
    let e = ce.forward(&logits, &bad).unwrap_err().to_string();
    assert!(e.contains("target 4 at row 1"), "{e}");
    let _e = Emulate::start();
    // Off the CPU: that row is NaN, the others are untouched.
    let rows = flat(&ce.forward(&logits, &bad).unwrap());
    assert!(
        rows[0].is_finite() && rows[1].is_nan() && rows[2].is_finite(),
        "{rows:?}"
    );
    let neg = Tensor::new(&[1i64, -3, 0], &Device::Cpu).unwrap();
    assert!(flat(&ce.forward(&logits, &neg).unwrap())[1].is_nan());
    let dkd = dkd_loss(&logits, &logits, &bad, 1.0, 8.0, 4.0).unwrap();
    assert!(flat(&dkd)[0].is_nan());
    // The classifier's one read sees a NaN loss; it then reads the targets
    // and says which one is wrong, whatever the non-finite policy.
    use crate::optim::{Sgd, SgdConfig};
    use crate::train::{Classifier, ClassifierConfig, NonFinitePolicy, TrainStep};
    let vm = candle_nn::VarMap::new();
    let net = small_net(&vm);
    let opt = Sgd::from_varmap(&vm, SgdConfig::default()).unwrap();
    let cfg = ClassifierConfig::default().with_non_finite(NonFinitePolicy::Skip { max_skips: 5 });
    let mut clf = Classifier::new(net, vm, opt, cfg).unwrap();
    let mut b = batch(720);
    b.labels = Tensor::new(&[0u32, 1, 2, 7, 1, 0], &Device::Cpu).unwrap();
    let e = clf.train_step(&b, 1).unwrap_err().to_string();
    assert!(e.contains("target 7 at row 3"), "{e}");
}

/// What three first-order MAML steps on 3-way tasks left behind.
struct MamlRun {
    /// (query loss, query accuracy) of each step.
    out: Vec<(f64, f64)>,
    /// The parameters after the last step, flattened.
    params: Vec<Vec<f32>>,
    /// Host reads of each step.
    reads: Vec<u64>,
}

/// Three first-order MAML steps on 3-way tasks (one after the other or
/// batched).
fn maml_run(batch_tasks: bool) -> MamlRun {
    use crate::meta::{Maml, MamlConfig, Task, TaskBatch};
    use crate::nn::{Mlp, MlpConfig, Model};
    use crate::optim::{Adam, AdamConfig};
    use crate::train::TrainStep;
    let build = |vb: candle_nn::VarBuilder<'static>| Mlp::new(MlpConfig::new([5, 8, 3]), vb);
    let vm = candle_nn::VarMap::new();
    let vb = crate::nn::init::seeded_var_builder(&vm, 13, DType::F32, &Device::Cpu);
    let model = Model::new(build(vb).unwrap(), vm.clone());
    let opt = Adam::from_varmap(&vm, AdamConfig::default().with_lr(0.01)).unwrap();
    let cfg = MamlConfig::default()
        .with_inner_lr(0.3)
        .with_inner_steps(2)
        .with_first_order(true)
        .with_batch_tasks(batch_tasks);
    let mut maml = Maml::new(model, build, opt, cfg).unwrap();
    let task = |seed: u64| {
        let y = Tensor::new(&[0u32, 1, 2, 0, 1, 2], &Device::Cpu).unwrap();
        Task::new(randn(&[6, 5], seed), y.clone(), randn(&[6, 5], seed + 1), y).unwrap()
    };
    let (mut out, mut reads) = (Vec::new(), Vec::new());
    for step in 1..=3u64 {
        let batch =
            TaskBatch::new((0..4).map(|t| task(900 + 10 * step + 2 * t)).collect()).unwrap();
        let before = crate::host::read_count();
        let o = maml.train_step(&batch, step).unwrap();
        reads.push(crate::host::read_count() - before);
        out.push((o.loss, o.metrics["query_acc"]));
    }
    let params = crate::nn::params::named_vars(&vm)
        .unwrap()
        .iter()
        .map(|(_, v)| flat(v.as_tensor()))
        .collect();
    MamlRun { out, params, reads }
}

#[test]
fn maml_step_off_the_cpu_reads_once_and_trains_like_the_cpu() {
    for batch_tasks in [false, true] {
        let MamlRun {
            out: cpu_out,
            params: cpu_params,
            ..
        } = maml_run(batch_tasks);
        let _e = Emulate::start();
        let MamlRun { out, params, reads } = maml_run(batch_tasks);
        // The query losses, the correct rows and the meta-gradient's norm
        // (the guard's) in one transfer.
        assert_eq!(reads, vec![1, 1, 1], "batch_tasks {batch_tasks}");
        for ((l, a), (cl, ca)) in out.iter().zip(&cpu_out) {
            assert!((l - cl).abs() < 1e-5 * (1.0 + cl.abs()), "loss {l} vs {cl}");
            assert_eq!(a, ca);
            assert!((0.0..=1.0).contains(a));
        }
        for (i, (a, b)) in params.iter().zip(&cpu_params).enumerate() {
            assert_close(&format!("parameter {i}"), a, b, 1e-5);
        }
    }
}
