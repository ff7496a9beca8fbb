//! Tasks and where they come from: the sinusoid family against its formula,
//! episodes as tasks, meta-batches and their positions, per-task
//! parameters, and every bad input the meta module checks.

use aimass::autograd::Gradients;
use aimass::candle::{DType, Device, Tensor};
use aimass::candle_nn::VarBuilder;
use aimass::meta::*;
use aimass::nn::{Conv2d, Conv2dConfig, Linear, Mlp, MlpConfig, ParamMap};
use aimass::train::BatchSource;
use aimass::Error;

mod common;
mod meta_common;
use meta_common::*;

#[test]
fn sinusoid_tasks_follow_the_formula_and_the_seed() {
    let cfg = SinusoidConfig::default().with_k_support(7).with_k_query(30);
    let s = Sinusoid::new(cfg.with_dtype(DType::F64), &Device::Cpu).unwrap();
    let mut amplitudes = Vec::new();
    for i in 0..200 {
        let t = s.task(i).unwrap();
        assert_eq!(t.support.dims(), &[7, 1]);
        assert_eq!(t.query.dims(), &[30, 1]);
        let (a, phase) = s.function(i);
        assert!((0.1..=5.0).contains(&a) && (0.0..=std::f64::consts::PI).contains(&phase));
        amplitudes.push(a);
        for (x, y) in [
            (&t.support, &t.support_targets),
            (&t.query, &t.query_targets),
        ] {
            for (x, y) in flat(x).into_iter().zip(flat(y)) {
                assert!((-5.0..=5.0).contains(&x));
                assert!((y - a * (x + phase).sin()).abs() < 1e-12);
            }
        }
        // Support and query points are drawn separately.
        assert_ne!(flat(&t.support)[0], flat(&t.query)[0]);
    }
    // Roughly uniform amplitudes: mean near 2.55.
    let mean = amplitudes.iter().sum::<f64>() / amplitudes.len() as f64;
    assert!((mean - 2.55).abs() < 0.3, "{mean}");
    // A pure function of seed and index; another seed gives other tasks.
    assert_eq!(
        flat(&s.task(5).unwrap().query),
        flat(&s.task(5).unwrap().query)
    );
    let other = Sinusoid::new(cfg.with_seed(1), &Device::Cpu).unwrap();
    assert_ne!(s.function(5), other.function(5));
    assert_eq!(other.task(0).unwrap().support.dtype(), DType::F32);

    for bad in [
        cfg.with_k_support(0),
        cfg.with_k_query(0),
        cfg.with_amplitude((5.0, 1.0)),
        cfg.with_phase((0.0, f64::NAN)),
        cfg.with_dtype(DType::U32),
    ] {
        assert!(matches!(
            Sinusoid::new(bad, &Device::Cpu),
            Err(Error::Config { .. })
        ));
    }
}

#[test]
fn task_batches_number_tasks_and_resume_by_position() {
    let s = Sinusoid::new(SinusoidConfig::default(), &Device::Cpu).unwrap();
    let mut b = TaskBatches::new(
        s.clone(),
        TaskBatchesConfig::default()
            .with_meta_batch(3)
            .with_batches_per_epoch(4),
    )
    .unwrap();
    assert_eq!(b.batches_per_epoch(), 4);
    // Batch 5 holds tasks 15, 16, 17.
    b.set_position(1, 1).unwrap();
    assert_eq!(b.position(), (1, 1));
    let batch = b.next_batch().unwrap();
    assert_eq!(batch.len(), 3);
    assert_eq!(
        flat(&batch.tasks[2].support),
        flat(&s.task(17).unwrap().support)
    );
    assert_eq!(b.position(), (1, 2));
    assert!(b.set_position(0, 5).is_err());
    assert!(b.set_position(u64::MAX, 0).is_err());
    assert!(b.batch(u64::MAX).is_err());
    // The fingerprint names the sampler's seed.
    let other = TaskBatches::new(
        Sinusoid::new(SinusoidConfig::default().with_seed(9), &Device::Cpu).unwrap(),
        TaskBatchesConfig::default(),
    )
    .unwrap();
    assert_ne!(b.fingerprint(), other.fingerprint());
    for bad in [
        TaskBatchesConfig::default().with_meta_batch(0),
        TaskBatchesConfig::default().with_batches_per_epoch(0),
    ] {
        assert!(matches!(
            TaskBatches::new(s.clone(), bad),
            Err(Error::Config { .. })
        ));
    }
    // Stacking puts the tasks first.
    let stacked = batch.stack().unwrap();
    assert_eq!(stacked.support.dims(), &[3, 10, 1]);
    assert_eq!(stacked.query_targets.dims(), &[3, 10, 1]);
}

#[test]
fn episodes_are_classification_tasks() {
    let sampler = episodes(2);
    let t = sampler.task(3).unwrap();
    let e = sampler.episode(3).unwrap();
    assert_eq!(flat(&t.support), flat(&e.support));
    assert_eq!(
        t.query_targets.to_vec1::<u32>().unwrap(),
        e.query_labels.to_vec1::<u32>().unwrap()
    );
    assert!(sampler.fingerprint().contains("seed=2"));
}

#[test]
fn bad_tasks_and_batches_are_errors() {
    let x = randt(&[3, 2], 1);
    let y = randt(&[3, 1], 2);
    let short = randt(&[2, 1], 3);
    assert!(matches!(
        Task::new(x.clone(), short.clone(), x.clone(), y.clone()),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        Task::new(x.clone(), y.clone(), x.clone(), short),
        Err(Error::Shape { .. })
    ));
    let empty = Tensor::zeros((0, 2), DType::F64, &Device::Cpu).unwrap();
    assert!(Task::new(empty.clone(), empty, x.clone(), y.clone()).is_err());
    let t = Task::new(x.clone(), y.clone(), x.clone(), y.clone()).unwrap();
    assert!(t.with_support_size(0).is_err());
    assert!(t.with_support_size(4).is_err());
    assert_eq!(t.with_support_size(2).unwrap().support.dims(), &[2, 2]);
    assert!(TaskBatch::new(Vec::new()).is_err());
    let other = Task::new(randt(&[5, 2], 4), randt(&[5, 1], 5), x.clone(), y.clone()).unwrap();
    let e = TaskBatch::new(vec![t.clone(), other])
        .unwrap()
        .stack()
        .unwrap_err()
        .to_string();
    assert!(e.contains("support of task 1"), "{e}");
    // Cross-entropy needs logits with one more dimension than the labels.
    assert!(matches!(
        TaskLoss::CrossEntropy.loss(&x, &y),
        Err(Error::Shape { .. })
    ));
    assert!(TaskLoss::Mse.loss(&x, &y).is_err());
    // Prototypes need (n, D) embeddings and one label per row.
    let labels3 = Tensor::new(&[0u32, 1, 0], &Device::Cpu).unwrap();
    assert!(matches!(
        prototypes(&randt(&[3, 2, 2], 1), &labels3, 2),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        prototypes(&randt(&[4, 2], 1), &labels3, 2),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn regression_evaluations_have_no_accuracy() {
    let vm = model(tanh_mlp, 1).varmap().clone();
    let opt = aimass::optim::Sgd::from_varmap(&vm, Default::default()).unwrap();
    let m = aimass::nn::Model::new(
        tanh_mlp(VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu)).unwrap(),
        vm,
    );
    let cfg = MamlConfig::default()
        .with_first_order(true)
        .with_loss(TaskLoss::Mse);
    let maml = Maml::new(m, tanh_mlp, opt, cfg).unwrap();
    let e = maml.evaluate(&[mlp_task(1), mlp_task(2)], &[0, 1]).unwrap();
    assert_eq!(e.num_tasks(), 2);
    assert_eq!(e.steps(), &[0, 1]);
    assert!(e.accuracies(1).is_err());
    assert!(e.mean_accuracy(0).is_err());
    assert!(e.mean_loss(1).unwrap().0.is_finite());
}

#[test]
fn mean_and_confidence_interval() {
    let (m, ci) = mean_ci95(&[2.0, 4.0, 6.0, 8.0]);
    assert_eq!(m, 5.0);
    // s = sqrt(20 / 3), 1.96 s / 2.
    assert!((ci - 1.96 * (20.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
    assert!(mean_ci95(&[]).0.is_nan());
    assert_eq!(mean_ci95(&[3.0]), (3.0, 0.0));
}

fn mlp(vb: VarBuilder) -> aimass::Result<Mlp> {
    Mlp::new(MlpConfig::new([3, 4, 2]), vb)
}

#[test]
fn per_task_parameters_give_each_task_its_own_gradient() {
    let vm = model(mlp, 3).varmap().clone();
    let theta = ParamMap::from_varmap(&vm).unwrap();
    let tasks: Vec<_> = (0..3).map(|i| mlp_task(10 * i)).collect();
    let stacked = TaskBatch::new(tasks.clone()).unwrap().stack().unwrap();
    let per = theta.expand_tasks(3).unwrap();
    assert_eq!(per.tasks(), Some(3));
    assert_eq!(per.get("0.weight").unwrap().dims(), &[3, 4, 3]);
    let net = per.build(mlp).unwrap();
    assert!(net.is_task_batched());
    let pred = net.forward_t(&stacked.support, true).unwrap();
    assert_eq!(pred.dims(), &[3, 4, 2]);
    // The sum of the tasks' losses: each task's slice of the gradient is
    // its own loss's gradient.
    let sq = (pred - &stacked.support_targets).unwrap().sqr().unwrap();
    let total = sq.sum_all().unwrap();
    let g = per.grad(&total, false).unwrap();
    for (i, task) in tasks.iter().enumerate() {
        let one = theta.build(mlp).unwrap();
        let l = (one.forward_t(&task.support, true).unwrap() - &task.support_targets)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let own: Gradients = theta.grad(&l, false).unwrap();
        for (name, gi) in own.iter() {
            let batched = g.get(name).unwrap().get(i).unwrap();
            let d = flat(&(batched - gi).unwrap());
            assert!(d.iter().all(|v| v.abs() < 1e-12), "{name} task {i}");
        }
    }
    // A plain Linear takes per-task weights too, rows or any leading shape.
    let lin = per.build(|vb| Linear::new(3, 4, true, vb.pp("0"))).unwrap();
    assert!(lin.is_task_batched());
    assert_eq!(
        lin.forward(&randt(&[3, 2, 5, 3], 1)).unwrap().dims(),
        &[3, 2, 5, 4]
    );
    assert!(matches!(
        lin.forward(&randt(&[2, 5, 3], 1)),
        Err(Error::Shape { .. })
    ));
    // A per-task MLP needs the tasks first.
    assert!(matches!(
        net.forward_t(&randt(&[3, 3], 1), true),
        Err(Error::Shape { .. })
    ));
    // Errors: no tasks, twice, BatchNorm buffers, convolutions.
    assert!(theta.expand_tasks(0).is_err());
    assert!(per.expand_tasks(2).is_err());
    let bn_vm = model(conv_bn, 1).varmap().clone();
    let bn_per = ParamMap::from_varmap(&bn_vm)
        .unwrap()
        .expand_tasks(2)
        .unwrap();
    let e = bn_per.build(conv_bn).err().unwrap().to_string();
    assert!(
        e.contains("running_mean") || e.contains("running_var"),
        "{e}"
    );
    let conv = bn_per
        .build(|vb| Conv2d::new(1, 3, 3, Conv2dConfig::default(), vb.pp("conv")))
        .unwrap();
    let e = conv
        .forward(&randt(&[2, 1, 4, 4], 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("one at a time"), "{e}");
    // Selecting parameters keeps them connected.
    let head = theta.select(|n| n.starts_with("2."));
    assert_eq!(head.param_names(), vec!["2.bias", "2.weight"]);
}
