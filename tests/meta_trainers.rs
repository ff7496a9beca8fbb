//! The meta-learning trainers: Reptile's and ProtoNet's updates against
//! hand computations, BatchNorm inside adapted models, evaluation, the
//! non-finite guard, and exact resume under `Fit` for every trainer.

use std::collections::BTreeMap;

use aimass::autograd::enable_second_order;
use aimass::candle::{DType, Device, ModuleT, Tensor};
use aimass::candle_nn::{VarBuilder, VarMap};
use aimass::meta::*;
use aimass::nn::{Mlp, MlpConfig, ParamMap};
use aimass::optim::{Adam, AdamConfig, CosineAnnealingLr, Sgd, SgdConfig};
use aimass::train::{BatchSource, Checkpoint, Fit, FitConfig, NonFinitePolicy, TrainStep};
use aimass::Error;

mod common;
mod meta_common;
use meta_common::*;

type Build<M> = fn(VarBuilder) -> aimass::Result<M>;

fn mlp_1_8_1(vb: VarBuilder) -> aimass::Result<Mlp> {
    Mlp::new(MlpConfig::new([1, 8, 1]), vb)
}

fn sinusoid_batches(meta_batch: usize) -> TaskBatches<Sinusoid> {
    let s = Sinusoid::new(SinusoidConfig::default().with_seed(3), &Device::Cpu).unwrap();
    TaskBatches::new(
        s,
        TaskBatchesConfig::default()
            .with_meta_batch(meta_batch)
            .with_batches_per_epoch(3),
    )
    .unwrap()
}

fn episode_batches(meta_batch: usize) -> TaskBatches<aimass::data::EpisodeSampler> {
    TaskBatches::new(
        episodes(9),
        TaskBatchesConfig::default()
            .with_meta_batch(meta_batch)
            .with_batches_per_epoch(3),
    )
    .unwrap()
}

// ----------------------------------------------------------------- Reptile

#[test]
fn reptile_moves_towards_the_mean_of_the_adapted_weights() {
    let tasks = vec![mlp_task(1), mlp_task(2)];
    let m = model(tanh_mlp, 11);
    let vm = m.varmap().clone();
    let theta = values(&vm);
    // Independently: 3 plain SGD steps per task on a detached copy.
    let mut mean: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for task in &tasks {
        let mut fast = ParamMap::detached_copy(&vm).unwrap();
        for _ in 0..3 {
            let net = fast.build(tanh_mlp).unwrap();
            let l = TaskLoss::Mse
                .loss(
                    &net.forward_t(&task.support, true).unwrap(),
                    &task.support_targets,
                )
                .unwrap();
            fast = fast.adapt(&l, 0.1, false).unwrap();
        }
        for (n, t) in fast.params() {
            let e = mean
                .entry(n.to_string())
                .or_insert_with(|| vec![0.0; t.elem_count()]);
            for (m, v) in e.iter_mut().zip(flat(t)) {
                *m += v / 2.0;
            }
        }
    }
    let cfg = ReptileConfig::default()
        .with_inner_optimizer(InnerOptimizer::Sgd)
        .with_inner_lr(0.1)
        .with_inner_steps(3)
        .with_epsilon(0.25)
        .with_loss(TaskLoss::Mse);
    let mut reptile = Reptile::new(m, tanh_mlp, cfg).unwrap();
    let out = reptile
        .train_step(&TaskBatch::new(tasks).unwrap(), 0)
        .unwrap();
    assert!(out.loss.is_finite() && !out.skipped);
    let after = values(&vm);
    for (n, t0) in &theta {
        for ((a, t), m) in after[n].iter().zip(t0).zip(&mean[n]) {
            let want = t + 0.25 * (m - t);
            assert!((a - want).abs() < 1e-12, "{n}: {a} vs {want}");
        }
    }
    // ε is the trainer's learning rate.
    reptile.set_learning_rate(0.5).unwrap();
    assert_eq!(reptile.learning_rate(), 0.5);
}

// ---------------------------------------------------------------- ProtoNet

#[test]
fn prototypes_logits_and_loss_match_a_hand_computation() {
    let dev = Device::Cpu;
    let z = Tensor::new(&[[0.0f64, 0.0], [2.0, 0.0], [0.0, 4.0], [1.0, 1.0]], &dev).unwrap();
    let y = Tensor::new(&[0u32, 0, 1, 1], &dev).unwrap();
    let p = prototypes(&z, &y, 2).unwrap();
    assert_eq!(
        p.to_vec2::<f64>().unwrap(),
        vec![vec![1.0, 0.0], vec![0.5, 2.5]]
    );
    let q = Tensor::new(&[[1.0f64, 1.0]], &dev).unwrap();
    let l = prototype_logits(&q, &p, Distance::SquaredEuclidean).unwrap();
    assert_eq!(l.to_vec2::<f64>().unwrap(), vec![vec![-1.0, -2.5]]);
    let c = prototype_logits(&q, &p, Distance::Cosine { scale: 2.0 }).unwrap();
    let cos1 = 1.0 / 2f64.sqrt();
    let cos2 = (0.5 + 2.5) / (2f64.sqrt() * (0.25f64 + 6.25).sqrt());
    let got = c.to_vec2::<f64>().unwrap();
    assert!((got[0][0] - 2.0 * cos1).abs() < 1e-12 && (got[0][1] - 2.0 * cos2).abs() < 1e-12);
    // Labels in any order; bad labels are errors.
    let bad = Tensor::new(&[0u32, 0, 2, 2], &dev).unwrap();
    assert!(prototypes(&z, &bad, 2).is_err());
    assert!(prototypes(&z, &bad, 3)
        .unwrap_err()
        .to_string()
        .contains("class 1"));

    // The episode loss of a linear embedding, by hand.
    let m = model(|vb| Mlp::new(MlpConfig::new([3, 2]), vb), 4);
    let w = flat(
        &m.varmap().data().lock().unwrap()["0.weight"]
            .as_tensor()
            .clone(),
    );
    let b = flat(
        &m.varmap().data().lock().unwrap()["0.bias"]
            .as_tensor()
            .clone(),
    );
    let task = Task::new(
        randt(&[4, 3], 1),
        Tensor::new(&[1u32, 0, 1, 0], &dev).unwrap(),
        randt(&[3, 3], 2),
        Tensor::new(&[0u32, 1, 1], &dev).unwrap(),
    )
    .unwrap();
    let embed = |x: &Tensor| -> Vec<[f64; 2]> {
        x.to_vec2::<f64>()
            .unwrap()
            .iter()
            .map(|r| {
                let f = |o: usize| b[o] + (0..3).map(|i| w[o * 3 + i] * r[i]).sum::<f64>();
                [f(0), f(1)]
            })
            .collect()
    };
    let zs = embed(&task.support);
    let protos = [
        [(zs[1][0] + zs[3][0]) / 2.0, (zs[1][1] + zs[3][1]) / 2.0],
        [(zs[0][0] + zs[2][0]) / 2.0, (zs[0][1] + zs[2][1]) / 2.0],
    ];
    let mut want = 0.0;
    for (zq, label) in embed(&task.query).iter().zip([0usize, 1, 1]) {
        let logit: Vec<f64> = protos
            .iter()
            .map(|p| -((zq[0] - p[0]).powi(2) + (zq[1] - p[1]).powi(2)))
            .collect();
        let lse = logit.iter().map(|v| v.exp()).sum::<f64>().ln();
        want += (lse - logit[label]) / 3.0;
    }
    let opt = Adam::from_varmap(m.varmap(), AdamConfig::default()).unwrap();
    let protonet = ProtoNet::new(m, opt, ProtoNetConfig::default()).unwrap();
    let (loss, _) = protonet.episode_loss(&task, true).unwrap();
    assert!((loss.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
}

#[test]
fn protonet_evaluates_in_eval_mode_and_changes_nothing() {
    let m = model_of(conv_bn, 2, DType::F32);
    let vm = m.varmap().clone();
    let opt = Adam::from_varmap(&vm, AdamConfig::default()).unwrap();
    let cfg = ProtoNetConfig::default().with_distance(Distance::cosine());
    let protonet = ProtoNet::new(m, opt, cfg).unwrap();
    let tasks: Vec<Task> = (0..3).map(|i| episodes(4).task(i).unwrap()).collect();
    let before = values(&vm);
    let accs = protonet.evaluate(&tasks).unwrap();
    assert_eq!(values(&vm), before, "evaluation changed the model");
    let model = protonet.model();
    for (t, a) in tasks.iter().zip(&accs) {
        let eval_mode = |x: &Tensor| model.forward_t(x, false);
        let want = nearest_prototype_accuracy(eval_mode, t, Distance::cosine()).unwrap();
        assert_eq!(*a, want);
    }
    let bad = ProtoNetConfig::default().with_distance(Distance::Cosine { scale: 0.0 });
    let m = model_of(conv_bn, 2, DType::F32);
    let opt = Adam::from_varmap(m.varmap(), AdamConfig::default()).unwrap();
    assert!(matches!(
        ProtoNet::new(m, opt, bad),
        Err(Error::Config { .. })
    ));
}

// -------------------------------------------------------------- BatchNorm

#[test]
fn adapted_models_normalise_with_batch_statistics_and_evaluation_changes_nothing() {
    enable_second_order().unwrap();
    let m = model(conv_bn, 6);
    let vm = m.varmap().clone();
    let opt = Sgd::from_varmap(&vm, SgdConfig::default()).unwrap();
    let cfg = MamlConfig::default().with_inner_lr(0.5).with_inner_steps(2);
    let maml = Maml::new(m, conv_bn as Build<ConvBn>, opt, cfg.clone()).unwrap();
    let task = conv_task(3);
    // The learner runs in train mode: batch statistics.
    let learner = maml.clone_for_task().unwrap();
    let net = ParamMap::detached_copy(&vm)
        .unwrap()
        .build(conv_bn)
        .unwrap();
    let y = flat(&learner.forward(&task.query).unwrap());
    assert_eq!(y, flat(&net.forward_t(&task.query, true).unwrap()));
    assert_ne!(y, flat(&net.forward_t(&task.query, false).unwrap()));

    // Evaluation works on copies: weights and running statistics unchanged.
    let before = values(&vm);
    let tasks = [conv_task(3), conv_task(4), conv_task(5)];
    let all = maml.evaluate(&tasks, &[0, 1, 2]).unwrap();
    assert_eq!(values(&vm), before);
    // A task's result does not depend on the tasks evaluated with it.
    let alone = maml.evaluate(&tasks[1..2], &[0, 1, 2]).unwrap();
    for s in [0, 1, 2] {
        assert_eq!(all.losses(s).unwrap()[1], alone.losses(s).unwrap()[0]);
        assert_eq!(
            all.accuracies(s).unwrap()[1],
            alone.accuracies(s).unwrap()[0]
        );
    }
    // Step 0 is the query loss of θ itself (train-mode BatchNorm).
    let q0 = TaskLoss::CrossEntropy
        .loss(
            &net.forward_t(&tasks[0].query, true).unwrap(),
            &tasks[0].query_targets,
        )
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((all.losses(0).unwrap()[0] - q0).abs() < 1e-12);
    // Adapting on a set lowers the loss on that set.
    let t = conv_task(8);
    let own = Task::new(
        t.support.clone(),
        t.support_targets.clone(),
        t.support,
        t.support_targets,
    )
    .unwrap();
    let e = maml.evaluate(&[own], &[0, 2]).unwrap();
    assert!(e.mean_loss(2).unwrap().0 < e.mean_loss(0).unwrap().0);
    assert!(all.mean_loss(7).is_err());
    assert!(maml.evaluate(&tasks, &[2, 1]).is_err());
    assert!(maml.evaluate(&[], &[0]).is_err());

    // Task batching would mix the tasks' batch statistics: an error.
    let m = model(conv_bn, 6);
    let opt = Sgd::from_varmap(m.varmap(), SgdConfig::default()).unwrap();
    let batched = Maml::new(m, conv_bn as Build<ConvBn>, opt, cfg.with_batch_tasks(true)).unwrap();
    let e = batched.evaluate(&tasks, &[0]).err().unwrap().to_string();
    assert!(e.contains("one at a time"), "{e}");
}

// ------------------------------------------------------------------ guard

#[test]
fn non_finite_query_losses_stop_or_skip_and_leave_the_model_alone() {
    enable_second_order().unwrap();
    let mut task = mlp_task(5);
    task.query_targets = (task.query_targets * f64::NAN).unwrap();
    let batch = TaskBatch::new(vec![task]).unwrap();
    for policy in [
        NonFinitePolicy::Error,
        NonFinitePolicy::Skip { max_skips: 3 },
    ] {
        let m = model(tanh_mlp, 1);
        let vm = m.varmap().clone();
        let opt = Adam::from_varmap(&vm, AdamConfig::default()).unwrap();
        let cfg = MamlConfig::default()
            .with_loss(TaskLoss::Mse)
            .with_non_finite(policy);
        let mut maml = Maml::new(m, tanh_mlp as Build<Mlp>, opt, cfg).unwrap();
        let before = values(&vm);
        match maml.train_step(&batch, 4) {
            Err(Error::NonFinite { step: Some(4), .. }) => {
                assert_eq!(policy, NonFinitePolicy::Error)
            }
            Ok(out) => {
                assert!(out.skipped);
                assert_eq!(maml.skipped_steps(), 1);
            }
            Err(e) => panic!("unexpected {e}"),
        }
        assert_eq!(values(&vm), before);
    }
}

// ------------------------------------------------------------ exact resume

fn run<T, S>(
    t: &mut T,
    s: &mut S,
    until: u64,
    base_lr: f64,
    ckpt: Option<&Checkpoint>,
) -> Checkpoint
where
    T: TrainStep<Batch = TaskBatch>,
    S: BatchSource<Batch = TaskBatch>,
{
    let cfg = FitConfig::default().with_epochs(3).with_max_steps(until);
    let mut fit = Fit::new(t, s, cfg)
        .unwrap()
        .with_schedule(CosineAnnealingLr::new(base_lr, 9, 0.0).unwrap());
    if let Some(c) = ckpt {
        fit.resume(c).unwrap();
    }
    fit.run().unwrap();
    fit.checkpoint().unwrap()
}

/// 8 uninterrupted steps against 4 + save + load into fresh objects + 4.
fn resume_is_exact<T, S>(name: &str, base_lr: f64, make: impl Fn() -> (T, S, VarMap))
where
    T: TrainStep<Batch = TaskBatch>,
    S: BatchSource<Batch = TaskBatch>,
{
    let (mut a, mut sa, vma) = make();
    let fresh = values(&vma);
    run(&mut a, &mut sa, 8, base_lr, None);
    let (mut b, mut sb, _) = make();
    let c = run(&mut b, &mut sb, 4, base_lr, None);
    let path = std::env::temp_dir().join(format!(
        "aimass-meta-{name}-{}.safetensors",
        std::process::id()
    ));
    c.save(&path).unwrap();
    let loaded = Checkpoint::load(&path, &Device::Cpu).unwrap();
    let _ = std::fs::remove_file(&path);
    let (mut b2, mut sb2, vmb2) = make();
    let end = run(&mut b2, &mut sb2, 8, base_lr, Some(&loaded));
    assert_eq!(end.meta("step"), Some("8"));
    assert_eq!(end.kind(), name);
    assert!(values(&vma) != fresh, "{name}: training changed nothing");
    assert!(
        values(&vma) == values(&vmb2),
        "{name}: the resumed run differs"
    );
}

#[test]
fn every_trainer_resumes_exactly() {
    enable_second_order().unwrap();
    let f32_model = |build: Build<ConvBn>, seed| model_of(build, seed, DType::F32);
    resume_is_exact("maml", 1e-2, || {
        let m = model_of(mlp_1_8_1, 1, DType::F32);
        let vm = m.varmap().clone();
        let opt = Adam::from_varmap(&vm, AdamConfig::default()).unwrap();
        let cfg = MamlConfig::default()
            .with_loss(TaskLoss::Mse)
            .with_batch_tasks(true);
        (
            Maml::new(m, mlp_1_8_1 as Build<Mlp>, opt, cfg).unwrap(),
            sinusoid_batches(4),
            vm,
        )
    });
    resume_is_exact("maml", 0.1, || {
        let m = f32_model(conv_bn, 2);
        let vm = m.varmap().clone();
        let opt = Sgd::from_varmap(&vm, SgdConfig::default().with_momentum(0.9)).unwrap();
        let cfg = MamlConfig::default().with_inner_lr(0.4).with_inner_steps(2);
        (
            Maml::new(m, conv_bn as Build<ConvBn>, opt, cfg).unwrap(),
            episode_batches(2),
            vm,
        )
    });
    resume_is_exact("anil", 1e-2, || {
        let m = f32_model(conv_bn, 3);
        let vm = m.varmap().clone();
        let opt = Adam::from_varmap(&vm, AdamConfig::default()).unwrap();
        let cfg = AnilConfig::default()
            .with_first_order(true)
            .with_inner_lr(0.4);
        (
            Anil::new(m, conv_bn as Build<ConvBn>, opt, cfg).unwrap(),
            episode_batches(2),
            vm,
        )
    });
    resume_is_exact("meta_sgd", 1e-2, || {
        let m = model_of(mlp_1_8_1, 4, DType::F32);
        let vm = m.varmap().clone();
        add_learned_rates(&vm, 0.01).unwrap();
        let opt = Adam::from_varmap(&vm, AdamConfig::default()).unwrap();
        let cfg = MetaSgdConfig::default().with_loss(TaskLoss::Mse);
        (
            MetaSgd::new(m, mlp_1_8_1 as Build<Mlp>, opt, cfg).unwrap(),
            sinusoid_batches(3),
            vm,
        )
    });
    resume_is_exact("reptile", 0.5, || {
        let m = f32_model(conv_bn, 5);
        let vm = m.varmap().clone();
        (
            Reptile::new(m, conv_bn as Build<ConvBn>, ReptileConfig::default()).unwrap(),
            episode_batches(2),
            vm,
        )
    });
    resume_is_exact("protonet", 1e-2, || {
        let m = f32_model(conv_bn, 6);
        let vm = m.varmap().clone();
        let opt = Adam::from_varmap(&vm, AdamConfig::default()).unwrap();
        (
            ProtoNet::new(m, opt, ProtoNetConfig::default()).unwrap(),
            episode_batches(1),
            vm,
        )
    });
}

#[test]
fn a_checkpoint_of_another_trainer_or_task_stream_is_refused() {
    enable_second_order().unwrap();
    let make = |seed: u64| {
        let m = model_of(mlp_1_8_1, 1, DType::F32);
        let opt = Adam::from_varmap(m.varmap(), AdamConfig::default()).unwrap();
        let cfg = MamlConfig::default()
            .with_loss(TaskLoss::Mse)
            .with_batch_tasks(true);
        let s = Sinusoid::new(SinusoidConfig::default().with_seed(seed), &Device::Cpu).unwrap();
        let b =
            TaskBatches::new(s, TaskBatchesConfig::default().with_batches_per_epoch(3)).unwrap();
        (Maml::new(m, mlp_1_8_1 as Build<Mlp>, opt, cfg).unwrap(), b)
    };
    let (mut a, mut sa) = make(1);
    let c = run(&mut a, &mut sa, 2, 1e-2, None);
    let (mut b, mut sb) = make(2);
    let mut fit = Fit::new(&mut b, &mut sb, FitConfig::default()).unwrap();
    let e = fit.resume(&c).unwrap_err().to_string();
    assert!(e.contains("different data source"), "{e}");
    let m = model_of(mlp_1_8_1, 1, DType::F32);
    let mut r = Reptile::new(m, mlp_1_8_1 as Build<Mlp>, ReptileConfig::default()).unwrap();
    let mut sr = sinusoid_batches(1);
    let mut fit = Fit::new(&mut r, &mut sr, FitConfig::default()).unwrap();
    assert!(fit.resume(&c).is_err());
}
