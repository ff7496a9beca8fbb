//! The meta-gradients of `Maml`, `Anil` and `MetaSgd` — the updates their
//! `train_step` applies — against central finite differences of the
//! post-adaptation query loss, computed without the meta module, in f64:
//! exact second order (≤ 1e-6 relative) through several inner steps, for an
//! MLP and a small conv net with BatchNorm; first order visibly differs.
//! Also: the clone/adapt API and task batching give the same gradient.
//!
//! Every test turns second order on first thing (its own test binary).

use aimass::autograd::{enable_second_order, GradAccumulator};
use aimass::candle::Tensor;
use aimass::candle_nn::VarMap;
use aimass::meta::*;
use aimass::nn::Model;
use aimass::optim::{Sgd, SgdConfig};
use aimass::train::TrainStep;

mod common;
mod meta_common;
use meta_common::*;

/// An SGD meta-optimizer with lr 1: the update it applies is the gradient.
fn sgd1(varmap: &VarMap) -> Sgd {
    Sgd::from_varmap(varmap, SgdConfig::default().with_lr(1.0)).unwrap()
}

/// The gradient one `train_step` on `tasks` applies; the weights are
/// restored afterwards.
fn trainer_gradient<T: TrainStep<Batch = TaskBatch>>(
    trainer: &mut T,
    varmap: &VarMap,
    tasks: &[Task],
) -> std::collections::BTreeMap<String, Vec<f64>> {
    let before = values(varmap);
    trainer
        .train_step(&TaskBatch::new(tasks.to_vec()).unwrap(), 0)
        .unwrap();
    let g = applied_gradient(&before, &values(varmap), |_| true);
    set_values(varmap, &before);
    g
}

type Build<M> = fn(aimass::candle_nn::VarBuilder) -> aimass::Result<M>;

fn maml_on<M: aimass::candle::ModuleT>(
    model: Model<M>,
    build: Build<M>,
    cfg: MamlConfig,
) -> (Maml<M, Build<M>, Sgd>, VarMap) {
    let vm = model.varmap().clone();
    let opt = sgd1(&vm);
    (Maml::new(model, build, opt, cfg).unwrap(), vm)
}

fn check_maml<M: aimass::candle::ModuleT>(
    build: fn(aimass::candle_nn::VarBuilder) -> aimass::Result<M>,
    tasks: &[Task],
    loss: TaskLoss,
    steps: usize,
    lr: f64,
) {
    let inner = Inner {
        steps,
        lr,
        only: None,
        learned_rates: false,
        loss,
    };
    for first_order in [false, true] {
        let cfg = MamlConfig::default()
            .with_loss(loss)
            .with_inner_lr(lr)
            .with_inner_steps(steps)
            .with_first_order(first_order);
        let (mut maml, vm) = maml_on(model(build, 7), build, cfg);
        let got = trainer_gradient(&mut maml, &vm, tasks);
        let fd = finite_differences(
            &vm,
            |_| true,
            1e-5,
            || post_adaptation_loss(&vm, &build, tasks, inner),
        );
        let e = rel_error(&got, &fd);
        if first_order {
            assert!(
                e > 1e-3,
                "{steps} steps: first order should differ, rel {e:e}"
            );
        } else {
            assert!(
                e <= 1e-6,
                "{steps} steps: second-order meta-gradient off by {e:e}"
            );
        }
    }
}

#[test]
fn maml_meta_gradient_of_an_mlp_matches_finite_differences() {
    enable_second_order().unwrap();
    let tasks = [mlp_task(10), mlp_task(20)];
    check_maml(tanh_mlp, &tasks, TaskLoss::Mse, 1, 0.3);
    check_maml(tanh_mlp, &tasks, TaskLoss::Mse, 3, 0.3);
}

#[test]
fn maml_meta_gradient_of_a_conv_net_with_batch_norm_matches_finite_differences() {
    enable_second_order().unwrap();
    let tasks = [conv_task(30), conv_task(40)];
    check_maml(conv_bn, &tasks, TaskLoss::CrossEntropy, 3, 0.5);
}

#[test]
fn anil_adapts_the_head_only_and_its_meta_gradient_is_exact() {
    enable_second_order().unwrap();
    let tasks = [conv_task(50), conv_task(60)];
    let inner = Inner {
        steps: 2,
        lr: 0.5,
        only: Some("head."),
        learned_rates: false,
        loss: TaskLoss::CrossEntropy,
    };
    let m = model(conv_bn, 3);
    let vm = m.varmap().clone();
    let cfg = AnilConfig::default().with_inner_lr(0.5).with_inner_steps(2);
    let mut anil = Anil::new(m, conv_bn, sgd1(&vm), cfg).unwrap();

    // The clone/adapt API moves the head and nothing else.
    let mut learner = anil.clone_for_task().unwrap();
    let loss = TaskLoss::CrossEntropy
        .loss(
            &learner.forward(&tasks[0].support).unwrap(),
            &tasks[0].support_targets,
        )
        .unwrap();
    learner.adapt(&loss).unwrap();
    let theta = values(&vm);
    for (name, t) in learner.params().params() {
        let moved = flat(t) != theta[name];
        assert_eq!(moved, name.starts_with("head."), "{name}");
    }

    let got = trainer_gradient(&mut anil, &vm, &tasks);
    let fd = finite_differences(
        &vm,
        |_| true,
        1e-5,
        || post_adaptation_loss(&vm, &conv_bn, &tasks, inner),
    );
    let e = rel_error(&got, &fd);
    assert!(e <= 1e-6, "ANIL meta-gradient off by {e:e}");
}

#[test]
fn meta_sgd_learns_rates_with_the_exact_gradient() {
    enable_second_order().unwrap();
    let tasks = [mlp_task(70), mlp_task(80)];
    let vm = model(tanh_mlp, 4).varmap().clone();
    add_learned_rates(&vm, 0.1).unwrap();
    // Different rates per element, so each one matters.
    let mut vals = values(&vm);
    for (n, v) in vals.iter_mut() {
        if n.starts_with(RATE_PREFIX) {
            for (j, x) in v.iter_mut().enumerate() {
                *x = 0.05 + 0.02 * (j % 5) as f64;
            }
        }
    }
    set_values(&vm, &vals);
    let inner = Inner {
        steps: 2,
        lr: 0.0,
        only: None,
        learned_rates: true,
        loss: TaskLoss::Mse,
    };
    let fd = finite_differences(
        &vm,
        |_| true,
        1e-5,
        || post_adaptation_loss(&vm, &tanh_mlp, &tasks, inner),
    );
    // Per task and with the meta-batch's tasks run at once (per-task
    // weights, learned rates shared).
    for (first_order, batch_tasks) in [(false, false), (true, false), (false, true), (true, true)] {
        let cfg = MetaSgdConfig::default()
            .with_loss(TaskLoss::Mse)
            .with_inner_steps(2)
            .with_first_order(first_order)
            .with_batch_tasks(batch_tasks);
        let m = Model::new(tanh_mlp(ro(&vm)).unwrap(), vm.clone());
        let mut meta_sgd = MetaSgd::new(m, tanh_mlp, sgd1(&vm), cfg).unwrap();
        let got = trainer_gradient(&mut meta_sgd, &vm, &tasks);
        assert!(got.keys().any(|n| n.starts_with(RATE_PREFIX)));
        let e = rel_error(&got, &fd);
        if first_order {
            assert!(
                e > 1e-3,
                "first-order Meta-SGD should differ (batch_tasks {batch_tasks}), rel {e:e}"
            );
        } else {
            assert!(
                e <= 1e-6,
                "Meta-SGD meta-gradient off by {e:e} (batch_tasks {batch_tasks})"
            );
        }
    }
}

/// A VarBuilder over existing variables (the model is built again on them).
fn ro(vm: &VarMap) -> aimass::candle_nn::VarBuilder<'static> {
    aimass::candle_nn::VarBuilder::from_varmap(
        vm,
        aimass::candle::DType::F64,
        &aimass::candle::Device::Cpu,
    )
}

#[test]
fn hand_written_loops_and_task_batching_give_the_trainers_gradient() {
    enable_second_order().unwrap();
    let tasks = [mlp_task(90), mlp_task(100), mlp_task(110)];
    let cfg = MamlConfig::default()
        .with_loss(TaskLoss::Mse)
        .with_inner_lr(0.2)
        .with_inner_steps(2);
    let (mut maml, vm) = maml_on(model(tanh_mlp, 5), tanh_mlp, cfg.clone());
    let reference = trainer_gradient(&mut maml, &vm, &tasks);

    // learn2learn's loop: clone, adapt, query loss, meta-gradient.
    let mse = |p: &Tensor, y: &Tensor| TaskLoss::Mse.loss(p, y).unwrap();
    let mut acc = GradAccumulator::new();
    for task in &tasks {
        let mut learner = maml.clone_for_task().unwrap();
        for _ in 0..2 {
            let l = mse(
                &learner.forward(&task.support).unwrap(),
                &task.support_targets,
            );
            learner.adapt(&l).unwrap();
        }
        let q = mse(&learner.forward(&task.query).unwrap(), &task.query_targets);
        acc.add(&maml.meta_gradients(&q).unwrap()).unwrap();
    }
    let by_hand: std::collections::BTreeMap<String, Vec<f64>> = acc
        .take_mean()
        .unwrap()
        .iter()
        .map(|(n, t)| (n.to_string(), flat(t)))
        .collect();
    assert!(rel_error(&by_hand, &reference) < 1e-12);

    // The same tasks stacked, on per-task weights.
    let stacked = TaskBatch::new(tasks.to_vec()).unwrap().stack().unwrap();
    let mut learner = maml.clone_for_tasks(3).unwrap();
    assert_eq!(learner.tasks(), Some(3));
    for _ in 0..2 {
        let l = mse(
            &learner.forward(&stacked.support).unwrap(),
            &stacked.support_targets,
        );
        learner.adapt(&l).unwrap();
    }
    let q = mse(
        &learner.forward(&stacked.query).unwrap(),
        &stacked.query_targets,
    );
    let batched: std::collections::BTreeMap<String, Vec<f64>> = maml
        .meta_gradients(&q)
        .unwrap()
        .iter()
        .map(|(n, t)| (n.to_string(), flat(t)))
        .collect();
    let e = rel_error(&batched, &reference);
    assert!(e < 1e-12, "batched learner: rel {e:e}");

    // And the trainer with batch_tasks on.
    let (mut batched_maml, vm2) = maml_on(model(tanh_mlp, 5), tanh_mlp, cfg.with_batch_tasks(true));
    let g = trainer_gradient(&mut batched_maml, &vm2, &tasks);
    let e = rel_error(&g, &reference);
    assert!(e < 1e-12, "batch_tasks trainer: rel {e:e}");
}

/// First-order MAML's meta-gradient is the query gradient at the adapted
/// weights, averaged over the tasks (computed here on detached copies).
#[test]
fn first_order_maml_uses_the_query_gradient_at_the_adapted_weights() {
    enable_second_order().unwrap();
    let tasks = [mlp_task(120), mlp_task(130)];
    for batch_tasks in [false, true] {
        let cfg = MamlConfig::default()
            .with_loss(TaskLoss::Mse)
            .with_inner_lr(0.3)
            .with_inner_steps(2)
            .with_first_order(true)
            .with_batch_tasks(batch_tasks);
        let (mut maml, vm) = maml_on(model(tanh_mlp, 8), tanh_mlp, cfg);
        let mut want: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        for task in &tasks {
            let mut fast = aimass::nn::ParamMap::detached_copy(&vm).unwrap();
            for _ in 0..2 {
                let net = fast.build(tanh_mlp).unwrap();
                let l = TaskLoss::Mse
                    .loss(
                        &net.forward_t(&task.support, true).unwrap(),
                        &task.support_targets,
                    )
                    .unwrap();
                fast = fast.adapt(&l, 0.3, false).unwrap();
            }
            let net = fast.build(tanh_mlp).unwrap();
            let q = TaskLoss::Mse
                .loss(
                    &net.forward_t(&task.query, true).unwrap(),
                    &task.query_targets,
                )
                .unwrap();
            for (n, g) in fast.grad(&q, false).unwrap().iter() {
                let e = want
                    .entry(n.to_string())
                    .or_insert_with(|| vec![0.0; g.elem_count()]);
                for (w, v) in e.iter_mut().zip(flat(g)) {
                    *w += v / tasks.len() as f64;
                }
            }
        }
        let got = trainer_gradient(&mut maml, &vm, &tasks);
        let e = rel_error(&got, &want);
        assert!(e < 1e-12, "batch_tasks {batch_tasks}: rel {e:e}");
    }
}

/// MAML's own model: ReLU (through the crate's CPU kernel) and task
/// batching, on sinusoid tasks in f64.
fn relu_mlp(vb: aimass::candle_nn::VarBuilder) -> aimass::Result<aimass::nn::Mlp> {
    aimass::nn::Mlp::new(aimass::nn::MlpConfig::new([1, 8, 8, 1]), vb)
}

#[test]
fn maml_meta_gradient_of_a_relu_mlp_matches_finite_differences() {
    enable_second_order().unwrap();
    let sines = Sinusoid::new(
        SinusoidConfig::default()
            .with_dtype(aimass::candle::DType::F64)
            .with_seed(3),
        &aimass::candle::Device::Cpu,
    )
    .unwrap();
    let tasks: Vec<Task> = (0..3).map(|i| sines.task(i).unwrap()).collect();
    for batch_tasks in [false, true] {
        let cfg = MamlConfig::default()
            .with_loss(TaskLoss::Mse)
            .with_inner_lr(0.01)
            .with_inner_steps(2)
            .with_batch_tasks(batch_tasks);
        let (mut maml, vm) = maml_on(model(relu_mlp, 9), relu_mlp, cfg);
        let got = trainer_gradient(&mut maml, &vm, &tasks);
        let inner = Inner {
            steps: 2,
            lr: 0.01,
            only: None,
            learned_rates: false,
            loss: TaskLoss::Mse,
        };
        let fd = finite_differences(
            &vm,
            |_| true,
            1e-6,
            || post_adaptation_loss(&vm, &relu_mlp, &tasks, inner),
        );
        let e = rel_error(&got, &fd);
        assert!(e <= 1e-6, "batch_tasks {batch_tasks}: rel {e:e}");
    }
}
