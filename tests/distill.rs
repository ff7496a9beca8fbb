//! Distillation: the teacher never changes, gradients reach only the student
//! and its adapters, the cross-entropy ignores unlabelled samples (checked
//! against PyTorch), cached and online teachers agree, shape mismatches are
//! clear errors, runs resume exactly, and a teacher trained in PyTorch loads
//! by name.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use aimass::candle::{DType, Device, Tensor, Var};
use aimass::candle_nn::{VarBuilder, VarMap};
use aimass::data::{DataLoader, DataLoaderConfig, Dataset, InMemoryDataset};
use aimass::distill::*;
use aimass::loss::{dkd_loss, DkdLossConfig, KdLossConfig};
use aimass::nn::init::seeded_var_builder;
use aimass::nn::params::LoadConfig;
use aimass::nn::*;
use aimass::optim::{Adam, AdamConfig, ConstantLr, CosineAnnealingLr, Optimizer, Schedule};
use aimass::train::{Checkpoint, Fit, FitConfig, TrainStep};
use aimass::Error;
use common::read_fixture;
use rand::Rng;

fn dev() -> Device {
    Device::Cpu
}

/// 48 grey 8×8 images of 4 classes (the bright quarter of the image).
fn images() -> InMemoryDataset {
    let mut r = aimass::device::rng(11);
    let (mut px, mut y) = (Vec::new(), Vec::new());
    for i in 0..48u32 {
        let c = i % 4;
        for p in 0..64u32 {
            px.push(if p / 16 == c {
                r.random_range(140..255)
            } else {
                r.random_range(0..110)
            });
        }
        y.push(c);
    }
    InMemoryDataset::new(px, y, (1, 8, 8)).unwrap()
}

/// Half the labels (6 per class), seeded.
fn transfer_set() -> TransferSet<InMemoryDataset> {
    TransferSet::new(
        images(),
        TransferSetConfig::default()
            .with_labels_per_class(6)
            .with_seed(3),
    )
    .unwrap()
}

fn loader(shuffle: bool) -> DataLoader {
    DataLoader::new(
        transfer_set(),
        DataLoaderConfig::default()
            .with_batch_size(8)
            .with_shuffle(shuffle)
            .with_seed(5)
            .with_prefetch(0),
        &dev(),
    )
    .unwrap()
}

fn teacher_cfg(classes: usize) -> ResNetConfig {
    ResNetConfig::resnet_tiny()
        .with_layers(vec![1, 1])
        .with_widths(vec![4, 8])
        .with_num_classes(Some(classes))
}

/// A teacher with non-default BatchNorm statistics (a few train-mode
/// passes), frozen; also returns its `VarMap` so tests can look behind the
/// handle.
fn teacher(classes: usize) -> (FrozenModel<ResNet>, VarMap) {
    teacher_seeded(classes, 1)
}

fn teacher_seeded(classes: usize, seed: u64) -> (FrozenModel<ResNet>, VarMap) {
    let vm = VarMap::new();
    let net = ResNet::new(
        teacher_cfg(classes),
        seeded_var_builder(&vm, seed, DType::F32, &dev()),
    )
    .unwrap();
    let x = loader(false).batch_at(0, 0).unwrap().views[0].clone();
    for _ in 0..3 {
        net.forward_t(&x, true).unwrap();
    }
    (Model::new(net, vm.clone()).freeze(ForwardMode::Eval), vm)
}

fn student_net(vb: VarBuilder, classes: usize) -> ConvNet {
    let cfg = ConvNetConfig::default()
        .with_image_size(8)
        .with_channels((4, 8))
        .with_hidden(16)
        .with_num_classes(classes);
    ConvNet::new(cfg, vb).unwrap()
}

/// KD + CE, a hint (1×1 conv adapter 4 → 8 channels), attention transfer
/// and RKD through a linear adapter (16 → 8).
fn full_recipe() -> DistillLossConfig {
    DistillLossConfig::default().with_features(vec![
        FeatureTerm::hint("conv1", "layer2"),
        FeatureTerm::attention("conv1", "layer2"),
        FeatureTerm::rkd("fc1", "pool").with_adapter(AdapterKind::Linear),
    ])
}

type D = Distiller<ResNet, ConvNet, Adam>;

fn distiller(mode: TeacherMode, recipe: DistillLossConfig) -> (D, VarMap) {
    distiller_with(teacher(4).0, mode, recipe)
}

/// A distiller of `t` into a seeded ConvNet (Adam, cosine over 18 steps).
fn distiller_with(
    t: FrozenModel<ResNet>,
    mode: TeacherMode,
    recipe: DistillLossConfig,
) -> (D, VarMap) {
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 2, DType::F32, &dev());
    let student = Model::new(student_net(vb.clone(), 4), vm.clone());
    let sample = loader(false).batch_at(0, 0).unwrap().views[0].clone();
    let loss = DistillLoss::new(&t, &student, &sample, recipe, vb.pp("adapters")).unwrap();
    let opt = Adam::from_varmap(&vm, AdamConfig::default().with_lr(1e-2)).unwrap();
    let d = Distiller::new(
        t,
        student,
        loss,
        opt,
        CosineAnnealingLr::new(1e-2, 18, 0.0).unwrap(),
        DistillerConfig::default().with_teacher_mode(mode),
    )
    .unwrap();
    (d, vm)
}

/// The largest absolute difference between two tensors of one shape.
fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn bits_of(entries: Vec<(String, Tensor)>) -> BTreeMap<String, Vec<u32>> {
    entries
        .into_iter()
        .map(|(n, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (n, v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

fn teacher_state<M>(t: &FrozenModel<M>) -> BTreeMap<String, Vec<u32>> {
    let mut all = t.named_parameters().unwrap();
    all.extend(t.named_buffers().unwrap());
    bits_of(all)
}

fn varmap_bits(vm: &VarMap) -> BTreeMap<String, Vec<u32>> {
    bits_of(
        aimass::nn::params::named_vars(vm)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect(),
    )
}

/// Runs `d` under `Fit` until `until` steps (6 batches per epoch, 3 epochs),
/// resuming from `ckpt`; returns the run's checkpoint and its step losses.
fn fit(
    d: &mut D,
    data: &mut DataLoader,
    until: u64,
    ckpt: Option<&Checkpoint>,
) -> (Checkpoint, Vec<f64>) {
    let mut losses = Vec::new();
    let cb = |info: &aimass::train::StepInfo<'_>| {
        losses.push(info.loss);
    };
    let mut f = Fit::new(
        d,
        data,
        FitConfig::default()
            .with_epochs(3)
            .with_max_steps(Some(until)),
    )
    .unwrap()
    .with_callback(StepLosses(cb));
    if let Some(c) = ckpt {
        f.resume(c).unwrap();
    }
    f.run().unwrap();
    let c = f.checkpoint().unwrap();
    drop(f);
    (c, losses)
}

struct StepLosses<F>(F);

impl<F: FnMut(&aimass::train::StepInfo<'_>)> aimass::train::Callback for StepLosses<F> {
    fn on_step(
        &mut self,
        info: &aimass::train::StepInfo<'_>,
    ) -> aimass::Result<aimass::train::Control> {
        (self.0)(info);
        Ok(aimass::train::Control::Continue)
    }
}

#[test]
fn teacher_weights_and_batchnorm_statistics_stay_bit_identical() {
    for mode in [TeacherMode::Online, TeacherMode::Cached] {
        let (mut d, _) = distiller(mode, full_recipe());
        let before = teacher_state(d.teacher());
        // The statistics are not BatchNorm's initial ones: a train-mode
        // teacher would move them.
        assert!(before["bn1.running_var"]
            .iter()
            .any(|&b| f32::from_bits(b) != 1.0));
        let mut data = loader(true);
        fit(&mut d, &mut data, 18, None);
        assert_eq!(d.steps(), 18);
        assert_eq!(
            teacher_state(d.teacher()),
            before,
            "{mode:?}: the teacher changed"
        );
    }
}

#[test]
fn gradients_reach_only_the_student_and_its_adapters() {
    let (t, tvm) = teacher(4);
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 2, DType::F32, &dev());
    let student = Model::new(student_net(vb.clone(), 4), vm.clone());
    let batch = loader(false).batch_at(0, 0).unwrap();
    let loss = DistillLoss::new(
        &t,
        &student,
        &batch.views[0],
        full_recipe(),
        vb.pp("adapters"),
    )
    .unwrap();
    let adapters: Vec<String> = loss
        .adapter_tensors()
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(
        adapters,
        [
            "adapters.0.weight",
            "adapters.0.bias",
            "adapters.2.weight",
            "adapters.2.bias"
        ]
    );
    let opt = Adam::from_varmap(&vm, AdamConfig::default().with_lr(1e-2)).unwrap();
    let mut d = Distiller::new(
        t,
        student,
        loss,
        opt,
        ConstantLr::new(1e-2).unwrap(),
        DistillerConfig::default(),
    )
    .unwrap();
    let terms = d.compute_loss(&batch).unwrap();
    let names: Vec<&str> = terms.terms.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "kd",
            "ce",
            "hint.conv1.layer2",
            "at.conv1.layer2",
            "rkd.fc1.pool"
        ]
    );
    let grads = terms.total.backward().unwrap();
    for (name, var) in aimass::nn::params::named_vars(&tvm).unwrap() {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "teacher variable {name} got a gradient"
        );
    }
    for (name, var) in aimass::nn::params::trainable_vars(&vm, &Frozen::none()).unwrap() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("student variable {name} got no gradient"));
        let norm = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{name}: zero gradient");
    }
    // One step moves the student and every adapter; the teacher stays.
    let before = varmap_bits(&vm);
    let teacher_before = varmap_bits(&tvm);
    let out = d.step(&batch).unwrap();
    let sum: f64 = out.terms.iter().map(|(_, v)| v).sum();
    assert!((sum - out.loss).abs() < 1e-5 * out.loss.abs().max(1.0));
    let after = varmap_bits(&vm);
    for (name, v) in &before {
        assert_ne!(&after[name], v, "{name} did not move");
    }
    assert_eq!(varmap_bits(&tvm), teacher_before);
}

#[test]
fn cross_entropy_ignores_unlabelled_samples_as_pytorch_does() {
    let f = read_fixture("distill_kd.safetensors");
    let (s, t) = (&f["student"], &f["teacher"]);
    // Stand-ins whose output is their input: the loss gets logits directly.
    let identity = || seq().add_fn(|x, _| Ok(x.clone()));
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev());
    let kd = DistillLoss::new(
        &identity(),
        &identity(),
        s,
        DistillLossConfig::default(),
        vb.clone(),
    )
    .unwrap();
    let feats = |x: &Tensor| {
        let mut f = Features::new();
        f.push("0", x.clone());
        f
    };
    let scalar = |x: &Tensor| x.to_scalar::<f64>().unwrap();
    let unlabelled = {
        // UNLABELLED rows in u32 labels, as a TransferSet gives them.
        let y = f["labels_mixed"].to_vec1::<i64>().unwrap();
        let y: Vec<u32> = y
            .iter()
            .map(|&v| if v < 0 { UNLABELLED } else { v as u32 })
            .collect();
        Tensor::new(y, &dev()).unwrap()
    };
    let none = Tensor::new(vec![UNLABELLED; 8], &dev()).unwrap();
    for (labels, key) in [
        (&unlabelled, "mixed"),
        (&f["labels_mixed"], "mixed"),
        (&none, "none"),
        (&f["labels_all"], "all"),
    ] {
        let sv = Var::from_tensor(s).unwrap();
        let terms = kd
            .forward(&feats(sv.as_tensor()), &feats(t), labels)
            .unwrap();
        let want = f[&format!("loss_{key}")].to_vec1::<f64>().unwrap()[0];
        let got = scalar(&terms.total);
        assert!((got - want).abs() < 1e-12, "{key}: {got} vs torch {want}");
        let g = terms.total.backward().unwrap();
        let gs = g.get(sv.as_tensor()).unwrap();
        assert!(
            max_diff(gs, &f[&format!("grad_{key}")]) < 1e-12,
            "{key}: gradient"
        );
    }
    let terms = kd
        .forward(&feats(s), &feats(t), &f["labels_mixed"])
        .unwrap();
    assert_eq!(terms.values().unwrap().labelled, 3);
    let ce = scalar(terms.get("ce").unwrap());
    assert!((ce - f["ce_mixed"].to_vec1::<f64>().unwrap()[0]).abs() < 1e-12);
    let none_terms = kd.forward(&feats(s), &feats(t), &none).unwrap();
    assert_eq!(scalar(none_terms.get("ce").unwrap()), 0.0);

    // The cross-entropy alone: unlabelled rows of the logits get exactly no gradient.
    let ce_only = DistillLoss::new(
        &identity(),
        &identity(),
        s,
        DistillLossConfig::default().with_logits(LogitTerm::None),
        vb,
    )
    .unwrap();
    let sv = Var::from_tensor(s).unwrap();
    let terms = ce_only
        .forward(&feats(sv.as_tensor()), &feats(t), &unlabelled)
        .unwrap();
    let g = terms.total.backward().unwrap();
    let g = g.get(sv.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
    let mask = f["labels_mixed"].to_vec1::<i64>().unwrap();
    for (row, &y) in g.iter().zip(&mask) {
        let zero = row.iter().all(|&v| v == 0.0);
        assert_eq!(zero, y < 0, "row gradient {row:?} for label {y}");
    }
}

#[test]
fn dkd_targets_the_label_or_the_teachers_guess() {
    let f = read_fixture("distill_kd.safetensors");
    let (s, t) = (&f["student"], &f["teacher"]);
    let identity = || seq().add_fn(|x, _| Ok(x.clone()));
    let vm = VarMap::new();
    let cfg = DistillLossConfig::default().with_logits(LogitTerm::Dkd(DkdLossConfig::default()));
    assert_eq!(cfg.effective_ce_weight(), 1.0);
    let loss = DistillLoss::new(
        &identity(),
        &identity(),
        s,
        cfg,
        VarBuilder::from_varmap(&vm, DType::F64, &dev()),
    )
    .unwrap();
    let mut fs = Features::new();
    fs.push("0", s.clone());
    let mut ft = Features::new();
    ft.push("0", t.clone());
    let terms = loss.forward(&fs, &ft, &f["labels_mixed"]).unwrap();
    // The targets written out: the label where there is one, else the
    // teacher's argmax.
    let tv = t.to_vec2::<f64>().unwrap();
    let y = f["labels_mixed"].to_vec1::<i64>().unwrap();
    let target: Vec<i64> = y
        .iter()
        .zip(&tv)
        .map(|(&l, row)| {
            if l >= 0 {
                l
            } else {
                (0..row.len())
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .unwrap() as i64
            }
        })
        .collect();
    let want = dkd_loss(s, t, &Tensor::new(target, &dev()).unwrap(), 1.0, 8.0, 4.0).unwrap();
    let got = terms.get("dkd").unwrap();
    assert!(max_diff(got, &want) < 1e-12);
}

#[test]
fn cached_and_online_teachers_agree() {
    let run = |mode: TeacherMode, precompute: bool| {
        let (mut d, vm) = distiller(mode, full_recipe());
        if precompute {
            // Unshuffled batches: other groupings than training's.
            assert_eq!(d.precompute_teacher(&loader(false)).unwrap(), 48);
        }
        let mut data = loader(true);
        let (_, losses) = fit(&mut d, &mut data, 18, None);
        assert_eq!(
            d.cached_samples(),
            if mode == TeacherMode::Cached { 48 } else { 0 }
        );
        (losses, varmap_bits(&vm))
    };
    let (online, w_online) = run(TeacherMode::Online, false);
    let (lazy, w_lazy) = run(TeacherMode::Cached, false);
    let (pre, w_pre) = run(TeacherMode::Cached, true);
    // The first epoch fills the lazy cache from the very batches the online
    // teacher sees; afterwards, and for the cache precomputed over other
    // groupings of the samples, the teacher's outputs per sample do not
    // depend on the batch on the CPU: the runs agree bit for bit.
    assert_eq!(lazy, online, "filled per batch: losses");
    assert_eq!(w_lazy, w_online, "filled per batch: weights");
    assert_eq!(pre, online, "precomputed: losses");
    assert_eq!(w_pre, w_online, "precomputed: weights");
}

#[test]
fn output_shape_mismatch_is_a_clear_error() {
    let (t, _) = teacher(4);
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 2, DType::F32, &dev());
    let student = Model::new(student_net(vb.clone(), 3), vm.clone());
    let x = loader(false).batch_at(0, 0).unwrap().views[0].clone();
    let e =
        DistillLoss::new(&t, &student, &x, DistillLossConfig::default(), vb.pp("a")).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("[8, 4]") && msg.contains("[8, 3]") && msg.contains("same classes"),
        "{msg}"
    );
    // DKD compares classes too; feature terms alone do not.
    let dkd = DistillLossConfig::default().with_logits(LogitTerm::Dkd(DkdLossConfig::default()));
    assert!(DistillLoss::new(&t, &student, &x, dkd, vb.pp("b")).is_err());
    let features_only = DistillLossConfig::default()
        .with_logits(LogitTerm::None)
        .with_features(vec![FeatureTerm::attention("conv1", "layer2")]);
    DistillLoss::new(&t, &student, &x, features_only, vb.pp("c")).unwrap();

    // At step time: teacher outputs of another shape than the student's.
    let (t4, _) = teacher(4);
    let vm4 = VarMap::new();
    let vb4 = seeded_var_builder(&vm4, 2, DType::F32, &dev());
    let s4 = Model::new(student_net(vb4.clone(), 4), vm4.clone());
    let loss = DistillLoss::new(&t4, &s4, &x, DistillLossConfig::default(), vb4).unwrap();
    let sf = s4.forward_features(&x, false).unwrap();
    let mut tf = Features::new();
    tf.push("logits", Tensor::zeros((8, 3), DType::F32, &dev()).unwrap());
    let labels = Tensor::new(vec![0u32; 8], &dev()).unwrap();
    let e = loss.forward(&sf, &tf, &labels).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
}

#[test]
fn feature_terms_that_do_not_fit_are_errors_naming_the_term() {
    let (t, _) = teacher(4);
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 2, DType::F32, &dev());
    let student = Model::new(student_net(vb.clone(), 4), vm.clone());
    let x = loader(false).batch_at(0, 0).unwrap().views[0].clone();
    let build = |terms: Vec<FeatureTerm>| {
        DistillLoss::new(
            &t,
            &student,
            &x,
            DistillLossConfig::default().with_features(terms),
            vb.pp("x"),
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    // conv2 is 2×2, layer2 4×4: a hint needs equal shapes after the adapter.
    let e = build(vec![FeatureTerm::hint("conv2", "layer2")]);
    assert!(e.contains("feature term 0 (hint.conv2.layer2)"), "{e}");
    // An unknown stage lists the stages there are.
    let e = build(vec![FeatureTerm::attention("conv9", "layer2")]);
    assert!(
        e.contains("conv9") && e.contains("conv1, conv2, fc1, logits"),
        "{e}"
    );
    // Attention maps need an integer ratio of spatial sizes: 4×4 vs 8×8 is fine, a vector is not.
    let e = build(vec![
        FeatureTerm::attention("conv1", "layer1"),
        FeatureTerm::attention("fc1", "layer1"),
    ]);
    assert!(e.contains("feature term 1"), "{e}");
    // A linear adapter on a feature map.
    let e = build(vec![
        FeatureTerm::hint("conv1", "layer2").with_adapter(AdapterKind::Linear)
    ]);
    assert!(e.contains("Linear adapter"), "{e}");
    // Configuration errors name the field.
    let e = build(vec![FeatureTerm::hint("", "layer2")]);
    assert!(e.contains("features[0].student"), "{e}");
    let e = build(vec![FeatureTerm::hint("conv1", "layer2").with_weight(-1.0)]);
    assert!(e.contains("features[0].weight"), "{e}");
}

#[test]
fn bad_configurations_are_errors() {
    let x = loader(false).batch_at(0, 0).unwrap().views[0].clone();
    let make = |cfg: DistillLossConfig| {
        let (t, _) = teacher(4);
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 2, DType::F32, &dev());
        let s = Model::new(student_net(vb.clone(), 4), vm.clone());
        DistillLoss::new(&t, &s, &x, cfg, vb).map(|_| ())
    };
    let e = make(DistillLossConfig::default().with_ce_weight(-0.5)).unwrap_err();
    assert!(
        e.to_string().contains("DistillLossConfig::ce_weight"),
        "{e}"
    );
    let e = make(
        DistillLossConfig::default()
            .with_logits(LogitTerm::None)
            .with_ce_weight(0.0),
    )
    .unwrap_err();
    assert!(e.to_string().contains("at least one term"), "{e}");
    let e = make(
        DistillLossConfig::default()
            .with_logits(LogitTerm::Kd(KdLossConfig::default().with_temperature(0.0))),
    )
    .unwrap_err();
    assert!(e.to_string().contains("KdLossConfig::temperature"), "{e}");
    assert_eq!(
        DistillLossConfig::default()
            .with_logits(LogitTerm::Kd(KdLossConfig::default().with_alpha(0.7)))
            .effective_ce_weight(),
        1.0 - 0.7
    );

    // Distiller::new: a teacher in train mode, adapters outside the
    // student's VarMap or the optimizer, an optimizer over other variables.
    let parts = |mode: ForwardMode| {
        let tvm = VarMap::new();
        let net = ResNet::new(
            teacher_cfg(4),
            seeded_var_builder(&tvm, 1, DType::F32, &dev()),
        )
        .unwrap();
        let t = Model::new(net, tvm.clone()).freeze(mode);
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 2, DType::F32, &dev());
        let s = Model::new(student_net(vb.clone(), 4), vm.clone());
        (t, tvm, s, vm, vb)
    };
    let hint =
        DistillLossConfig::default().with_features(vec![FeatureTerm::hint("conv1", "layer2")]);
    let adam = |vm: &VarMap| Adam::from_varmap(vm, AdamConfig::default()).unwrap();
    // The message of the error Distiller::new returns.
    let refused = |t, s, loss, opt: Adam| {
        let lr = ConstantLr::new(1e-3).unwrap();
        let d: aimass::Result<D> = Distiller::new(t, s, loss, opt, lr, DistillerConfig::default());
        d.map(|_| ()).unwrap_err().to_string()
    };

    let (t, _, s, vm, vb) = parts(ForwardMode::Train);
    let loss = DistillLoss::new(&t, &s, &x, hint.clone(), vb.pp("adapters")).unwrap();
    let e = refused(t, s, loss, adam(&vm));
    assert!(e.contains("ForwardMode::Eval"), "{e}");

    let (t, _, s, vm, _) = parts(ForwardMode::Eval);
    let other = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev());
    let loss = DistillLoss::new(&t, &s, &x, hint.clone(), other.pp("adapters")).unwrap();
    let e = refused(t, s, loss, adam(&vm));
    assert!(e.contains("not a variable of the student's VarMap"), "{e}");

    let (t, _, s, vm, vb) = parts(ForwardMode::Eval);
    let early = adam(&vm); // built before the adapters exist
    let loss = DistillLoss::new(&t, &s, &x, hint.clone(), vb.pp("adapters")).unwrap();
    let e = refused(t, s, loss, early);
    assert!(
        e.contains("adapter `adapters.0.weight` is not updated"),
        "{e}"
    );

    let (t, tvm, s, _, vb) = parts(ForwardMode::Eval);
    let loss = DistillLoss::new(&t, &s, &x, hint, vb.pp("adapters")).unwrap();
    let e = refused(t, s, loss, adam(&tvm));
    assert!(e.contains("not a variable of the student's VarMap"), "{e}");

    // precompute_teacher needs the cached mode.
    let (mut d, _) = distiller(TeacherMode::Online, DistillLossConfig::default());
    let e = d.precompute_teacher(&loader(false)).unwrap_err();
    assert!(e.to_string().contains("TeacherMode::Cached"), "{e}");
}

#[test]
fn transfer_sets_keep_the_labels_they_are_asked_to() {
    let set = transfer_set();
    assert_eq!(set.num_labelled(), 24);
    let mut per_class = [0; 4];
    for i in set.labelled_indices() {
        per_class[set.dataset().labels()[i] as usize] += 1;
        assert_eq!(set.label(i).unwrap(), set.dataset().labels()[i]);
    }
    assert_eq!(per_class, [6; 4]);
    for i in 0..set.len() {
        if !set.is_labelled(i) {
            assert_eq!(set.label(i).unwrap(), UNLABELLED);
            assert_eq!(set.get(i).unwrap().label, UNLABELLED);
            assert_eq!(set.get(i).unwrap().pixels, images().get(i).unwrap().pixels);
        }
    }
    // Same seed, same draw; another seed, another draw.
    assert_eq!(transfer_set().mask(), set.mask());
    let other = TransferSet::new(
        images(),
        TransferSetConfig::default()
            .with_labels_per_class(6)
            .with_seed(4),
    )
    .unwrap();
    assert_ne!(other.mask(), set.mask());
    // Every label by default.
    let all = TransferSet::new(images(), TransferSetConfig::default()).unwrap();
    assert_eq!(all.num_labelled(), 48);
    // Batches carry UNLABELLED.
    let b = loader(false).batch_at(0, 0).unwrap();
    let labels = b.labels.to_vec1::<u32>().unwrap();
    for (l, &i) in labels.iter().zip(&b.indices) {
        assert_eq!(*l == UNLABELLED, !set.is_labelled(i));
    }
    // Bad inputs.
    let e = TransferSet::new(
        images(),
        TransferSetConfig::default().with_labels_per_class(13),
    )
    .unwrap_err();
    assert!(e.to_string().contains("class 0 has only 12 samples"), "{e}");
    let e = TransferSet::from_mask(images(), vec![true; 47]).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    let m = TransferSet::from_mask(images(), (0..48).map(|i| i < 5).collect()).unwrap();
    assert_eq!(m.labelled_indices(), [0, 1, 2, 3, 4]);
}

#[test]
fn resume_is_bit_identical_online_and_cached() {
    for mode in [TeacherMode::Online, TeacherMode::Cached] {
        let (mut straight, vm) = distiller(mode, full_recipe());
        let mut data = loader(true);
        let (_, losses) = fit(&mut straight, &mut data, 18, None);

        let (mut first, _) = distiller(mode, full_recipe());
        let mut data = loader(true);
        let (ckpt, mut resumed_losses) = fit(&mut first, &mut data, 8, None);
        let bytes = ckpt.to_bytes().unwrap();
        let ckpt = Checkpoint::from_bytes(&bytes, Path::new("mem"), &dev()).unwrap();
        let (mut second, vm2) = distiller(mode, full_recipe());
        let mut data = loader(true);
        let (_, rest) = fit(&mut second, &mut data, 18, Some(&ckpt));
        resumed_losses.extend(rest);
        assert_eq!(resumed_losses, losses, "{mode:?}: losses");
        assert_eq!(varmap_bits(&vm2), varmap_bits(&vm), "{mode:?}: weights");
        assert_eq!(second.steps(), 18);
        assert_eq!(
            second.learning_rate(),
            CosineAnnealingLr::new(1e-2, 18, 0.0).unwrap().lr(18)
        );
    }
}

#[test]
fn resuming_with_another_teacher_or_recipe_is_refused() {
    let (mut d, vm) = distiller(TeacherMode::Online, full_recipe());
    let mut data = loader(true);
    let (ckpt, _) = fit(&mut d, &mut data, 4, None);

    // Another recipe.
    let (mut other, vm2) = distiller(TeacherMode::Online, DistillLossConfig::default());
    let before = varmap_bits(&vm2);
    let e = other.load_state(&ckpt).unwrap_err();
    assert!(e.to_string().contains("distill.terms"), "{e}");
    assert_eq!(
        varmap_bits(&vm2),
        before,
        "a refused checkpoint changed the student"
    );
    // Another teacher mode.
    let (mut cached, _) = distiller(TeacherMode::Cached, full_recipe());
    assert!(cached.load_state(&ckpt).is_err());
    // Another teacher (other weights, same architecture).
    let (mut third, _) = distiller_with(teacher_seeded(4, 9).0, TeacherMode::Online, full_recipe());
    let e = third.load_state(&ckpt).unwrap_err();
    assert!(e.to_string().contains("teacher_crc32"), "{e}");
    // The right one loads.
    let (mut same, vm3) = distiller(TeacherMode::Online, full_recipe());
    same.load_state(&ckpt).unwrap();
    assert_eq!(varmap_bits(&vm3), varmap_bits(&vm));
}

#[test]
fn save_student_leaves_the_adapters_out() {
    let (mut d, vm) = distiller(TeacherMode::Online, full_recipe());
    let batch = loader(true).batch_at(0, 0).unwrap();
    d.step(&batch).unwrap();
    let dir = std::env::temp_dir().join(format!("aimass-distill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("student.safetensors");
    d.save_student(&path).unwrap();
    // Loads strictly into a fresh student (no adapter tensors in the file).
    let fresh = VarMap::new();
    let net = student_net(seeded_var_builder(&fresh, 99, DType::F32, &dev()), 4);
    aimass::nn::params::load(&fresh, &path).unwrap();
    let x = &batch.views[0];
    let a = net.forward_t(x, false).unwrap();
    let b = d.student().forward_t(x, false).unwrap();
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // Model::save keeps them.
    let all = dir.join("with_adapters.safetensors");
    d.student().save(&all).unwrap();
    let saved = aimass::candle::safetensors::load(&all, &dev()).unwrap();
    assert!(saved.contains_key("adapters.0.weight"));
    assert_eq!(
        saved.len(),
        aimass::nn::params::named_vars(&vm).unwrap().len()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_teacher_trained_in_pytorch_loads_by_torchvision_names() {
    let io = read_fixture("distill_teacher_torch_io.safetensors");
    let vm = VarMap::new();
    let cfg = ResNetConfig::resnet_tiny()
        .with_widths(vec![4, 8, 16])
        .with_num_classes(Some(10));
    let net = ResNet::new(cfg, seeded_var_builder(&vm, 0, DType::F32, &dev())).unwrap();
    let teacher = Model::new(net, vm).freeze(ForwardMode::Eval);
    let path = format!(
        "{}/tests/fixtures/distill_teacher_torch.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let report = teacher.load(&path, &LoadConfig::default()).unwrap();
    assert!(report.is_complete(), "{report:?}");
    let f = teacher.forward_features(&io["input"], true).unwrap(); // `true` is ignored: eval mode
    for (stage, key) in [("logits", "logits"), ("layer2", "layer2"), ("pool", "pool")] {
        let d = max_diff(f.require(stage).unwrap(), &io[key]);
        assert!(d < 1e-5, "{stage}: max difference {d} from PyTorch");
    }
    // It teaches: an MLP student distils from it and the teacher stays as loaded.
    let before = teacher_state(&teacher);
    let svm = VarMap::new();
    let svb = seeded_var_builder(&svm, 0, DType::F32, &dev());
    let student = Model::new(
        Mlp::new(MlpConfig::new([144, 16, 10]), svb.clone()).unwrap(),
        svm.clone(),
    );
    let x = &io["input"];
    let loss = DistillLoss::new(&teacher, &student, x, DistillLossConfig::default(), svb).unwrap();
    let opt = Adam::from_varmap(&svm, AdamConfig::default().with_lr(1e-2)).unwrap();
    let mut d = Distiller::new(
        teacher,
        student,
        loss,
        opt,
        ConstantLr::new(1e-2).unwrap(),
        DistillerConfig::default(),
    )
    .unwrap();
    let batch = aimass::data::Batch {
        views: vec![x.clone()],
        labels: Tensor::new(vec![UNLABELLED; 3], &dev()).unwrap(),
        indices: vec![0, 1, 2],
        epoch: 0,
        batch: 0,
    };
    let first = d.step(&batch).unwrap();
    assert_eq!(first.labelled, 0);
    assert_eq!(first.term("ce"), Some(0.0));
    let mut last = first.loss;
    for _ in 0..30 {
        last = d.step(&batch).unwrap().loss;
    }
    assert!(last < 0.5 * first.loss, "{} -> {last}", first.loss);
    assert_eq!(teacher_state(d.teacher()), before);
}

#[test]
fn any_sequential_model_is_a_feature_extractor() {
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 0, DType::F32, &dev());
    let net = seq()
        .add(Linear::new(4, 6, true, vb.pp("0")).unwrap())
        .add(Activation::Relu)
        .add(Linear::new(6, 3, true, vb.pp("2")).unwrap());
    assert_eq!(net.feature_names(), ["0", "1", "2"]);
    let x = Tensor::new(&[[1f32, -2., 0.5, 3.], [0., 1., 1., -1.]], &dev()).unwrap();
    let f = net.forward_features(&x, false).unwrap();
    assert_eq!(f.names(), ["0", "1", "2"]);
    assert_eq!(f.require("0").unwrap().dims(), &[2, 6]);
    let y = net.forward_t(&x, false).unwrap();
    assert_eq!(
        f.last().unwrap().to_vec2::<f32>().unwrap(),
        y.to_vec2::<f32>().unwrap()
    );
}

#[test]
fn the_schedule_sets_the_learning_rate_of_every_step() {
    let (mut d, _) = distiller(TeacherMode::Online, DistillLossConfig::default());
    let sched = CosineAnnealingLr::new(1e-2, 18, 0.0).unwrap();
    assert_eq!(d.optimizer().lr(), sched.lr(0));
    let data = loader(true);
    for b in 0..3 {
        let batch = data.batch_at(0, b).unwrap();
        let out = d.step(&batch).unwrap();
        assert_eq!(out.samples, 8);
        assert_eq!(d.optimizer().lr(), sched.lr(b as u64 + 1));
    }
    assert_eq!(d.optimizer().step_count(), 3);
}

#[test]
fn a_teacher_cache_is_shared_between_runs_of_the_same_teacher() {
    let (mut a, _) = distiller(TeacherMode::Cached, full_recipe());
    assert_eq!(a.precompute_teacher(&loader(false)).unwrap(), 48);
    let cache = a.teacher_cache().unwrap().clone();
    assert_eq!(cache.filled(), 48);
    assert_eq!(cache.stages(), ["layer2", "pool", "logits"]);
    assert!(cache.has(47) && !cache.has(48));

    // A KD-only run reads a subset of those stages: it takes the cache and
    // trains exactly as with the teacher online.
    let (mut shared, vm_shared) = distiller(TeacherMode::Cached, DistillLossConfig::default());
    shared.set_teacher_cache(cache.clone()).unwrap();
    let (mut online, vm_online) = distiller(TeacherMode::Online, DistillLossConfig::default());
    let (_, l_shared) = fit(&mut shared, &mut loader(true), 18, None);
    let (_, l_online) = fit(&mut online, &mut loader(true), 18, None);
    assert_eq!(l_shared, l_online);
    assert_eq!(varmap_bits(&vm_shared), varmap_bits(&vm_online));

    // Refused: online mode, another teacher, a missing stage.
    let e = online.set_teacher_cache(cache.clone()).unwrap_err();
    assert!(e.to_string().contains("TeacherMode::Cached"), "{e}");
    let (mut d, _) = distiller_with(
        teacher_seeded(4, 9).0,
        TeacherMode::Cached,
        DistillLossConfig::default(),
    );
    let e = d.set_teacher_cache(cache.clone()).unwrap_err();
    assert!(e.to_string().contains("another teacher"), "{e}");
    let at_layer1 =
        DistillLossConfig::default().with_features(vec![FeatureTerm::attention("conv1", "layer1")]);
    let (mut needs_layer1, _) = distiller(TeacherMode::Cached, at_layer1);
    let e = needs_layer1.set_teacher_cache(cache).unwrap_err();
    assert!(e.to_string().contains("no teacher stage `layer1`"), "{e}");
}

#[test]
fn bad_batches_and_checkpoints_are_errors() {
    let (mut d, vm) = distiller(TeacherMode::Cached, full_recipe());
    let good = loader(false).batch_at(0, 0).unwrap();
    let before = varmap_bits(&vm);
    // Cached mode keys the teacher by Batch::indices: one per sample.
    let mut short = good.clone();
    short.indices.pop();
    let e = d.step(&short).unwrap_err();
    assert!(
        e.to_string().contains("one dataset index per sample"),
        "{e}"
    );
    // Labels: one per sample, in range.
    let mut wrong = good.clone();
    wrong.labels = Tensor::new(vec![0u32; 7], &dev()).unwrap();
    assert!(matches!(d.step(&wrong).unwrap_err(), Error::Shape { .. }));
    let mut out_of_range = good.clone();
    out_of_range.labels = Tensor::new(vec![9u32; 8], &dev()).unwrap();
    let e = d.step(&out_of_range).unwrap_err();
    assert!(e.to_string().contains("outside 0..4"), "{e}");
    assert_eq!(
        varmap_bits(&vm),
        before,
        "a failed step changed the student"
    );
    assert_eq!(d.steps(), 0);
    // An empty sample batch for DistillLoss::new.
    let (t, _) = teacher(4);
    let svm = VarMap::new();
    let vb = seeded_var_builder(&svm, 2, DType::F32, &dev());
    let s = Model::new(student_net(vb.clone(), 4), svm);
    let empty = Tensor::zeros((0, 1, 8, 8), DType::F32, &dev()).unwrap();
    let e = DistillLoss::new(&t, &s, &empty, DistillLossConfig::default(), vb).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");

    // A checkpoint whose teacher cache does not add up.
    d.step(&good).unwrap();
    let mut ckpt = Checkpoint::new("distiller");
    d.save_state(&mut ckpt).unwrap();
    assert_eq!(ckpt.meta("teacher_cache.filled"), Some("8"));
    let (mut fresh, vm2) = distiller(TeacherMode::Cached, full_recipe());
    let before = varmap_bits(&vm2);
    ckpt.set_meta("teacher_cache.filled", 9);
    let e = fresh.load_state(&ckpt).unwrap_err();
    assert!(e.to_string().contains("teacher cache"), "{e}");
    assert_eq!(varmap_bits(&vm2), before);
    assert_eq!(fresh.cached_samples(), 0);
    ckpt.set_meta("teacher_cache.filled", 8);
    fresh.load_state(&ckpt).unwrap();
    assert_eq!(fresh.cached_samples(), 8);
}

#[test]
fn a_distiller_can_move_to_another_thread() {
    fn is_send<T: Send>(_: &T) {}
    let (d, _) = distiller(TeacherMode::Cached, full_recipe());
    is_send(&d);
    let steps = std::thread::spawn(move || {
        let mut d = d;
        d.step(&loader(true).batch_at(0, 0).unwrap()).unwrap();
        d.steps()
    })
    .join()
    .unwrap();
    assert_eq!(steps, 1);
}
