//! With second-order gradients off (this binary never turns them on), the
//! second-order trainers refuse to be built, with a message that says what
//! to do, instead of silently computing first-order MAML; asking for first
//! order works. Also the configuration errors of every trainer.

use aimass::autograd::second_order_enabled;
use aimass::candle::{DType, Device};
use aimass::candle_nn::VarBuilder;
use aimass::meta::*;
use aimass::nn::{Mlp, MlpConfig, Model};
use aimass::optim::{Adam, AdamConfig, Sgd, SgdConfig};
use aimass::train::TrainStep;
use aimass::Error;

mod common;
mod meta_common;
use meta_common::*;

fn build(vb: VarBuilder) -> aimass::Result<Mlp> {
    Mlp::new(MlpConfig::new([3, 5, 2]), vb)
}

fn parts(seed: u64) -> (Model<Mlp>, Adam) {
    let m = model(build, seed);
    let opt = Adam::from_varmap(m.varmap(), AdamConfig::default()).unwrap();
    (m, opt)
}

#[test]
fn second_order_off_is_an_error_that_says_what_to_do() {
    assert!(!second_order_enabled());
    let (m, opt) = parts(1);
    let e = Maml::new(m, build, opt, MamlConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("enable_second_order"), "{e}");
    assert!(e.contains("MamlConfig::with_first_order(true)"), "{e}");
    let (m, opt) = parts(1);
    let e = Anil::new(m, build, opt, AnilConfig::default().with_head("2."))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("AnilConfig::with_first_order(true)"), "{e}");
    let m = model(build, 1);
    add_learned_rates(m.varmap(), 0.01).unwrap();
    let opt = Adam::from_varmap(m.varmap(), AdamConfig::default()).unwrap();
    let e = MetaSgd::new(m, build, opt, MetaSgdConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("MetaSgdConfig::with_first_order(true)"), "{e}");

    // First order, asked for explicitly, trains.
    let (m, opt) = parts(1);
    let cfg = MamlConfig::default()
        .with_first_order(true)
        .with_loss(TaskLoss::Mse);
    let mut maml = Maml::new(m, build, opt, cfg).unwrap();
    let out = maml
        .train_step(&TaskBatch::new(vec![mlp_task(1)]).unwrap(), 0)
        .unwrap();
    assert!(out.loss.is_finite());
    // A hand-written second-order step on a first-order learner is first
    // order too; asking a ParamMap for second order is the error.
    let learner = maml.clone_for_task().unwrap();
    let l = TaskLoss::Mse
        .loss(
            &learner.forward(&mlp_task(2).support).unwrap(),
            &mlp_task(2).support_targets,
        )
        .unwrap();
    assert!(learner.params().grad(&l, true).is_err());
}

#[test]
fn bad_configurations_are_errors_naming_the_field() {
    let cfg = MamlConfig::default().with_first_order(true);
    for (bad, field) in [
        (cfg.clone().with_inner_lr(f64::NAN), "MamlConfig::inner_lr"),
        (cfg.clone().with_inner_steps(0), "MamlConfig::inner_steps"),
    ] {
        let (m, opt) = parts(2);
        match Maml::new(m, build, opt, bad) {
            Err(Error::Config { field: f, .. }) => assert_eq!(f, field),
            _ => panic!("{field} accepted"),
        }
    }
    // ANIL's head must name parameters of the model.
    for head in ["head.", ""] {
        let (m, opt) = parts(3);
        let e = Anil::new(
            m,
            build,
            opt,
            AnilConfig::default().with_first_order(true).with_head(head),
        )
        .err()
        .unwrap();
        assert!(
            matches!(&e, Error::Config { field, .. } if field == "AnilConfig::head"),
            "{e}"
        );
    }
    // Meta-SGD needs its rates, and an optimizer that learns them.
    let fo = MetaSgdConfig::default().with_first_order(true);
    let (m, opt) = parts(4);
    let e = MetaSgd::new(m, build, opt, fo.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("add_learned_rates"), "{e}");
    let (m, opt) = parts(4);
    add_learned_rates(m.varmap(), 0.01).unwrap();
    let e = MetaSgd::new(m, build, opt, fo).err().unwrap().to_string();
    assert!(e.contains("does not hold the learned rate"), "{e}");
    assert!(add_learned_rates(model(build, 1).varmap(), f64::INFINITY).is_err());
    // Adding the rates twice keeps the first ones.
    let vm = model(build, 1).varmap().clone();
    add_learned_rates(&vm, 0.5).unwrap();
    add_learned_rates(&vm, 0.7).unwrap();
    assert!(values(&vm)["meta_sgd.lr.0.weight"]
        .iter()
        .all(|v| *v == 0.5));
    // Reptile.
    for bad in [
        ReptileConfig::default().with_epsilon(-1.0),
        ReptileConfig::default().with_inner_steps(0),
        ReptileConfig::default().with_inner_lr(f64::NAN),
    ] {
        assert!(matches!(
            Reptile::new(model(build, 5), build, bad),
            Err(Error::Config { .. })
        ));
    }
    // A model without parameters.
    let empty = Model::new(
        build(VarBuilder::zeros(DType::F64, &Device::Cpu)).unwrap(),
        aimass::candle_nn::VarMap::new(),
    );
    let opt = Sgd::from_varmap(&aimass::candle_nn::VarMap::new(), SgdConfig::default()).unwrap();
    assert!(Maml::new(empty, build, opt, cfg).is_err());
}
