//! The self-supervised trainers: each step lowers its loss on a fixed
//! batch; BYOL's and MoCo's targets change only by the EMA formula and get
//! no gradient; MoCo's queue rotates; every trainer resumes bit for bit;
//! the exported backbone reloads with identical features; bad settings
//! and batches are errors that name the problem.

use aimass::data::augment::presets::{simclr_views, PresetConfig};
use aimass::data::augment::{Compose, HorizontalFlip, MultiView, Normalize};
use aimass::data::{Batch, DataLoader, DataLoaderConfig, InMemoryDataset};
use aimass::nn::params::LoadConfig;
use aimass::nn::{
    init::seeded_var_builder, seq, HeadConfig, Mlp, MlpConfig, ResNet, ResNetConfig, SequentialT,
};
use aimass::optim::byol_tau;
use aimass::prelude::*;
use aimass::ssl::{
    Backbone, BarlowTwins, BarlowTwinsConfig, Byol, ByolConfig, MoCo, MoCoConfig, SimClr,
    SimClrConfig, SimSiam, SimSiamConfig, SslOptimConfig, SslOptimizer, SslTrainer, VicReg,
    VicRegConfig,
};
use aimass::train::Checkpoint;

const SIDE: usize = 8;

/// 32 random 8×8 gray images.
fn dataset() -> InMemoryDataset {
    use rand::Rng;
    let mut r = aimass::device::rng(11);
    let px: Vec<u8> = (0..32 * SIDE * SIDE)
        .map(|_| r.random_range(0..=255u8))
        .collect();
    InMemoryDataset::new(px, (0..32).map(|i| i % 4).collect(), (1, SIDE, SIDE)).unwrap()
}

/// 4 batches of 8 images, two views each: random flips (so two views of
/// one noise image can be matched, and the losses can fall), or SimCLR's
/// views (crops, jitter) for `strong`.
fn loader_with(strong: bool) -> DataLoader {
    let cfg = DataLoaderConfig::default()
        .with_batch_size(8)
        .with_drop_last(true)
        .with_seed(3)
        .with_prefetch(0);
    let views = if strong {
        simclr_views(&PresetConfig::default().with_size(SIDE)).unwrap()
    } else {
        let flip = Compose::new()
            .then(HorizontalFlip::new(0.5).unwrap())
            .then(Normalize::new(&[0.5], &[0.25]).unwrap());
        MultiView::repeat(flip, 2).unwrap()
    };
    DataLoader::new(dataset(), cfg, &Device::Cpu)
        .unwrap()
        .with_views(views)
}

fn loader() -> DataLoader {
    loader_with(false)
}

/// A small MLP with BatchNorm: 64 pixels → 32 → 16 features.
fn mlp() -> Backbone<SequentialT> {
    Backbone::new(16, |vb| {
        let mlp = Mlp::new(
            MlpConfig::new(vec![SIDE * SIDE, 32, 16]).with_batch_norm(true),
            vb,
        )?;
        Ok(seq().add_fn(|x, _| x.flatten_from(1)).add(mlp))
    })
}

fn head(out: usize) -> HeadConfig {
    HeadConfig::simclr()
        .with_hidden_dim(16)
        .with_output_dim(out)
}

fn sgd() -> SslOptimConfig {
    SslOptimConfig::default()
        .with_optimizer(SslOptimizer::Sgd)
        .with_lr(0.5)
        .with_weight_decay(0.0)
        .with_warmup_epochs(1)
}

fn simclr() -> SimClr<SequentialT> {
    SimClr::new(
        mlp(),
        SimClrConfig::default()
            .with_projector(head(8))
            .with_optim(sgd()),
        &Device::Cpu,
    )
    .unwrap()
}

fn byol() -> Byol<SequentialT> {
    let cfg = ByolConfig::default()
        .with_tau_base(0.9)
        .with_total_steps(8)
        .with_projector(head(8))
        .with_predictor(head(8))
        .with_optim(sgd().with_optimizer(SslOptimizer::Lars));
    Byol::new(mlp(), cfg, &Device::Cpu).unwrap()
}

fn simsiam() -> SimSiam<SequentialT> {
    let cfg = SimSiamConfig::default()
        .with_projector(head(8).with_last_batch_norm(true))
        .with_predictor(head(8))
        .with_optim(sgd());
    SimSiam::new(mlp(), cfg, &Device::Cpu).unwrap()
}

fn moco() -> MoCo<SequentialT> {
    let cfg = MoCoConfig::default()
        .with_queue_size(12)
        .with_momentum(0.9)
        .with_projector(head(8).with_batch_norm(false))
        .with_optim(sgd());
    MoCo::new(mlp(), cfg, &Device::Cpu).unwrap()
}

fn barlow() -> BarlowTwins<SequentialT> {
    let cfg = BarlowTwinsConfig::default()
        .with_projector(head(8).with_num_layers(3))
        .with_optim(sgd().with_lr(0.05));
    BarlowTwins::new(mlp(), cfg, &Device::Cpu).unwrap()
}

fn vicreg() -> VicReg<SequentialT> {
    let cfg = VicRegConfig::default()
        .with_projector(head(8).with_num_layers(3))
        .with_optim(sgd().with_lr(0.05));
    VicReg::new(mlp(), cfg, &Device::Cpu).unwrap()
}

fn fixed_batch() -> Batch {
    loader().batch_at(0, 0).unwrap()
}

/// The loss of the first and of the 30th step on the same batch.
fn first_and_last<T: SslTrainer>(mut t: T, lr: f64) -> (f64, f64) {
    let batch = fixed_batch();
    t.set_learning_rate(lr).unwrap();
    let first = t.train_step(&batch, 0).unwrap().loss;
    let mut last = first;
    for step in 1..30 {
        last = t.train_step(&batch, step).unwrap().loss;
    }
    assert!(first.is_finite() && last.is_finite());
    (first, last)
}

#[test]
fn each_trainer_lowers_its_loss_on_a_fixed_batch() {
    let cases = [
        ("simclr", first_and_last(simclr(), 0.05)),
        ("byol", first_and_last(byol(), 0.05)),
        ("simsiam", first_and_last(simsiam(), 0.05)),
        ("barlow", first_and_last(barlow(), 0.01)),
        ("vicreg", first_and_last(vicreg(), 0.01)),
    ];
    for (name, (first, last)) in cases {
        assert!(last < first, "{name}: loss {first} -> {last}");
    }
}

#[test]
fn moco_lowers_the_loss_of_a_batch_against_the_same_negatives() {
    // MoCo's loss depends on the queue: on one repeated batch the queue
    // fills with keys of the same images. With 4 batches in turn and a
    // queue of 24, batch 0 always meets the keys of batches 1..=3: compare
    // its loss on its 2nd and 8th visits.
    let cfg = MoCoConfig::default()
        .with_queue_size(24)
        .with_momentum(0.9)
        .with_projector(head(8).with_batch_norm(false))
        .with_optim(sgd());
    let mut m = MoCo::new(mlp(), cfg, &Device::Cpu).unwrap();
    m.set_learning_rate(0.05).unwrap();
    let l = loader();
    let batches: Vec<Batch> = (0..4).map(|b| l.batch_at(0, b).unwrap()).collect();
    let mut losses = Vec::new();
    for step in 0..32u64 {
        losses.push(
            m.train_step(&batches[step as usize % 4], step)
                .unwrap()
                .loss,
        );
    }
    assert!(
        losses[28] < losses[4],
        "moco: loss of batch 0 {} -> {}",
        losses[4],
        losses[28]
    );
}

/// `tau·t + (1 − tau)·o` in f32, as the EMA computes it.
fn ema(t: &Tensor, o: &Tensor, tau: f64) -> Vec<f32> {
    let t = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let o = o.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    t.iter()
        .zip(&o)
        .map(|(t, o)| t * tau as f32 + o * (1.0 - tau) as f32)
        .collect()
}

/// Checks that `after` = EMA(`before`, `online`) exactly for every parameter.
fn check_ema(
    before: &[(String, Tensor)],
    after: &[(String, Tensor)],
    online: &[(String, Var)],
    tau: f64,
) {
    assert_eq!(before.len(), online.len());
    let mut changed = false;
    for (((n0, t0), (n1, t1)), (no, o)) in before.iter().zip(after).zip(online) {
        assert_eq!((n0, n1), (no, no));
        let want = ema(t0, o.as_tensor(), tau);
        let got = t1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, want, "`{n0}` is not the EMA");
        changed |= got != t0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    }
    assert!(changed, "the target did not move");
}

#[test]
fn byol_target_changes_only_by_the_ema_and_gets_no_gradient() {
    let mut b = byol();
    b.set_learning_rate(0.1).unwrap();
    let batch = fixed_batch();
    for step in 0..3u64 {
        let before = b.target().named_parameters().unwrap();
        b.train_step(&batch, step).unwrap();
        // BYOL's schedule: τ after step k is 1 − (1 − τ_base)(cos(π(k+1)/K) + 1)/2.
        let k = (step + 1) as f64 / 8.0;
        let tau = 1.0 - 0.1 * ((std::f64::consts::PI * k).cos() + 1.0) / 2.0;
        assert!(
            (b.tau(step) - tau).abs() < 1e-15 && (byol_tau(0.9, step + 1, 8) - tau).abs() < 1e-15
        );
        let online = b.encoder().named_parameters().unwrap();
        check_ema(
            &before,
            &b.target().named_parameters().unwrap(),
            &online,
            tau,
        );
    }
    // The optimizer holds the online encoder and the predictor, nothing else.
    let trained = b.encoder().named_parameters().unwrap().len()
        + b.predictor().named_parameters().unwrap().len();
    assert_eq!(b.optimizer().param_names().len(), trained);
    // Whatever is computed from the target carries no gradient.
    let z = b.target().forward(&batch.views[0]).unwrap();
    assert!(!z.track_op() && !z.is_variable());
}

#[test]
fn moco_key_encoder_changes_only_by_the_ema_and_gets_no_gradient() {
    let mut m = moco();
    m.set_learning_rate(0.1).unwrap();
    let batch = fixed_batch();
    for step in 0..3u64 {
        let before = m.key_encoder().named_parameters().unwrap();
        m.train_step(&batch, step).unwrap();
        let online = m.encoder().named_parameters().unwrap();
        check_ema(
            &before,
            &m.key_encoder().named_parameters().unwrap(),
            &online,
            0.9,
        );
    }
    assert_eq!(
        m.optimizer().param_names().len(),
        m.encoder().named_parameters().unwrap().len()
    );
    let k = m.key_encoder().forward(&batch.views[0]).unwrap();
    assert!(!k.track_op() && !k.is_variable());
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

#[test]
fn moco_queue_rotates_the_first_views_keys_in() {
    // Queue of 12, batches of 8: writes rows 0..8, then 8..12 and 0..4 (wrap), then 4..12.
    let mut m = moco();
    m.set_learning_rate(0.1).unwrap();
    let l = loader();
    let mut expect_ptr = 0usize;
    for step in 0..3u64 {
        let batch = l.batch_at(0, step as usize).unwrap();
        // The key encoder runs in train mode, so its keys depend only on
        // its weights and the batch: compute them before the step.
        let x = Tensor::cat(&batch.views, 0).unwrap();
        let k1 = m
            .key_encoder()
            .forward(&x)
            .unwrap()
            .narrow(0, 0, 8)
            .unwrap();
        let k1 = aimass::ops::l2_normalize(&k1, 1, 1e-12).unwrap();
        let before = rows(m.queue().keys());
        m.train_step(&batch, step).unwrap();
        let after = rows(m.queue().keys());
        let written: Vec<usize> = (0..8).map(|i| (expect_ptr + i) % 12).collect();
        for (i, &r) in written.iter().enumerate() {
            for (a, b) in after[r].iter().zip(&rows(&k1)[i]) {
                assert!((a - b).abs() < 1e-6, "step {step}: row {r} is not key {i}");
            }
        }
        for r in (0..12).filter(|r| !written.contains(r)) {
            assert_eq!(after[r], before[r], "step {step}: row {r} changed");
        }
        expect_ptr = (expect_ptr + 8) % 12;
        assert_eq!(m.queue().pointer(), expect_ptr);
    }
    // A batch larger than the queue is an error naming the setting.
    let small = MoCoConfig::default()
        .with_queue_size(4)
        .with_projector(head(8))
        .with_optim(sgd());
    let mut m = MoCo::new(mlp(), small, &Device::Cpu).unwrap();
    let e = m.train_step(&fixed_batch(), 0).unwrap_err();
    assert!(e.to_string().contains("MoCoConfig::queue_size"), "{e}");
}

/// Every tensor and metadata entry of two checkpoints, bit for bit.
fn assert_same(a: &Checkpoint, b: &Checkpoint, what: &str) {
    assert_eq!(
        a.tensors().keys().collect::<Vec<_>>(),
        b.tensors().keys().collect::<Vec<_>>()
    );
    for (name, t) in a.tensors() {
        let u = b.tensor(name).unwrap();
        let (x, y) = (
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
            u.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
        );
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{what}: `{name}` differs"
        );
    }
    for key in [
        "step",
        "data.epoch",
        "data.batch",
        "queue.pointer",
        "guard.skipped",
    ] {
        assert_eq!(a.meta(key), b.meta(key), "{what}: {key}");
    }
}

/// 6 steps straight against 3 steps, a checkpoint through bytes, a fresh
/// trainer and loader, and 3 more steps.
fn resumes_exactly<T: SslTrainer>(make: impl Fn() -> T, what: &str) {
    let cfg = FitConfig::default().with_epochs(2).with_max_steps(6);
    let run =
        |t: &mut T, l: &mut DataLoader, cfg: FitConfig, from: Option<&Checkpoint>| -> Checkpoint {
            let schedule = t.optim_config().schedule(8, 4, 2).unwrap();
            let mut fit = Fit::new(t, l, cfg).unwrap().with_schedule(schedule);
            if let Some(c) = from {
                fit.resume(c).unwrap();
            }
            fit.run().unwrap();
            fit.checkpoint().unwrap()
        };
    let straight = run(&mut make(), &mut loader_with(true), cfg.clone(), None);
    let half = run(
        &mut make(),
        &mut loader_with(true),
        cfg.clone().with_max_steps(3),
        None,
    );
    let bytes = half.to_bytes().unwrap();
    let back = Checkpoint::from_bytes(&bytes, std::path::Path::new("mem"), &Device::Cpu).unwrap();
    let resumed = run(&mut make(), &mut loader_with(true), cfg, Some(&back));
    assert_same(&straight, &resumed, what);
    assert_eq!(straight.meta_parse::<u64>("step").unwrap(), 6);
}

#[test]
fn every_trainer_resumes_bit_for_bit() {
    resumes_exactly(simclr, "simclr");
    resumes_exactly(byol, "byol");
    resumes_exactly(simsiam, "simsiam");
    resumes_exactly(moco, "moco");
    resumes_exactly(barlow, "barlow");
    resumes_exactly(vicreg, "vicreg");
}

#[test]
fn a_checkpoint_of_another_trainer_or_shape_is_refused_without_change() {
    let mut half = byol();
    half.set_learning_rate(0.1).unwrap();
    half.train_step(&fixed_batch(), 0).unwrap();
    let mut ckpt = Checkpoint::new("byol");
    half.save_state(&mut ckpt).unwrap();
    // Another head width: refused, and the trainer is untouched.
    let cfg = ByolConfig::default()
        .with_total_steps(8)
        .with_projector(head(4))
        .with_predictor(head(4));
    let mut other = Byol::new(mlp(), cfg, &Device::Cpu).unwrap();
    let before = other.encoder().named_parameters().unwrap()[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(other.load_state(&ckpt).is_err());
    let after = other.encoder().named_parameters().unwrap()[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(before, after);
    // A MoCo checkpoint without its queue.
    let mut m = moco();
    let mut c = Checkpoint::new("moco");
    simclr().save_state(&mut c).unwrap();
    assert!(m.load_state(&c).is_err());
}

#[test]
fn the_exported_backbone_reloads_with_identical_features() {
    let cfg = SimClrConfig::default()
        .with_projector(head(8))
        .with_optim(sgd());
    let mut s = SimClr::new(
        Backbone::resnet(ResNetConfig::resnet_tiny()),
        cfg,
        &Device::Cpu,
    )
    .unwrap();
    s.set_learning_rate(0.1).unwrap();
    s.train_step(&fixed_batch(), 0).unwrap(); // BatchNorm statistics move too
    let dir = std::env::temp_dir().join(format!("aimass-ssl-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("backbone.safetensors");
    s.export_backbone(&path).unwrap();
    // A classifier with a fresh 10-way head.
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 5, DType::F32, &Device::Cpu);
    let clf = ResNet::new(ResNetConfig::resnet_tiny().with_num_classes(Some(10)), vb).unwrap();
    let report = aimass::nn::params::load_with(&varmap, &path, &LoadConfig::non_strict()).unwrap();
    assert_eq!(
        report.missing_keys,
        vec!["fc.bias".to_string(), "fc.weight".to_string()]
    );
    assert!(
        report.unexpected_keys.is_empty(),
        "{:?}",
        report.unexpected_keys
    );
    let x = fixed_batch().views[0].clone();
    let want = s
        .features(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let got = clf
        .features(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(got, want);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_settings_and_batches_are_errors_that_say_what() {
    let e = Byol::new(mlp(), ByolConfig::default(), &Device::Cpu)
        .err()
        .unwrap();
    assert!(e.to_string().contains("ByolConfig::total_steps"), "{e}");
    let e = Byol::new(
        mlp(),
        ByolConfig::default().with_total_steps(4).with_tau_base(1.5),
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("ByolConfig::tau_base"), "{e}");
    let e = MoCo::new(
        mlp(),
        MoCoConfig::default().with_queue_size(0),
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("MoCoConfig::queue_size"), "{e}");
    let e = MoCo::new(
        mlp(),
        MoCoConfig::default().with_momentum(-0.1),
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("MoCoConfig::momentum"), "{e}");
    let e = SimClr::new(
        mlp(),
        SimClrConfig::default().with_temperature(0.0),
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("temperature"), "{e}");
    let e = SimClr::new(
        mlp(),
        SimClrConfig::default().with_optim(SslOptimConfig::default().with_lr(0.0)),
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("SslOptimConfig::lr"), "{e}");
    let e = SimClr::new(
        mlp(),
        SimClrConfig::default().with_optim(SslOptimConfig::default().with_momentum(1.0)),
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("SslOptimConfig::momentum"), "{e}");
    let zero = Backbone::new(0, |vb| {
        Ok(seq().add(Mlp::new(MlpConfig::new(vec![64, 4]), vb)?))
    });
    let e = SimClr::new(zero, SimClrConfig::default(), &Device::Cpu)
        .err()
        .unwrap();
    assert!(e.to_string().contains("Backbone::feature_dim"), "{e}");
    // One view instead of two.
    let mut s = simclr();
    let mut one = fixed_batch();
    one.views.truncate(1);
    let e = s.train_step(&one, 0).unwrap_err();
    assert!(e.to_string().contains("two augmented views"), "{e}");
    // A backbone whose output is not (N, features).
    let conv = Backbone::new(8, |vb| {
        Ok(seq().add(aimass::nn::Conv2d::new(1, 8, 3, Default::default(), vb)?))
    });
    let mut s = SimClr::new(
        conv,
        SimClrConfig::default().with_projector(head(8)),
        &Device::Cpu,
    )
    .unwrap();
    let e = s.train_step(&fixed_batch(), 0).unwrap_err();
    assert!(e.to_string().contains("feature_dim"), "{e}");
    // The schedule needs a non-empty run.
    assert!(SslOptimConfig::default().schedule(256, 0, 10).is_err());
}

#[test]
fn the_schedule_warms_up_linearly_then_follows_the_cosine_to_zero() {
    let cfg = SslOptimConfig::default().with_lr(0.3).with_warmup_epochs(2);
    let s = cfg.schedule(512, 5, 10).unwrap(); // peak 0.6, 10 warmup steps, 40 cosine steps
    let peak = 0.3 * 512.0 / 256.0;
    assert!((s.lr(0) - peak / 10.0).abs() < 1e-12);
    assert!((s.lr(5) - peak * (0.1 + 0.9 * 0.5)).abs() < 1e-12);
    assert!((s.lr(10) - peak).abs() < 1e-12);
    let c = |k: f64| peak * (1.0 + (std::f64::consts::PI * k / 40.0).cos()) / 2.0;
    assert!((s.lr(30) - c(20.0)).abs() < 1e-12);
    assert!(s.lr(49) > 0.0 && s.lr(49) < 1e-3);
    // No warmup: the plain cosine of the reference runs.
    let s = cfg.with_warmup_epochs(0).schedule(256, 31, 19).unwrap();
    assert!((s.lr(0) - 0.3).abs() < 1e-12);
    assert!(
        (s.lr(100) - 0.3 * (1.0 + (std::f64::consts::PI * 100.0 / 589.0).cos()) / 2.0).abs()
            < 1e-12
    );
}

mod guide {
    use aimass::data::augment::presets::{simclr_views, PresetConfig};
    use aimass::data::{ImageFolder, ImageFolderConfig};
    use aimass::nn::{HeadConfig, ResNetConfig, Stem};
    use aimass::prelude::*;
    use aimass::ssl::{Backbone, SimClr, SimClrConfig, SslTrainer};
    use aimass::train::{CheckpointDir, PeriodicCheckpoint, Progress, ProgressMode};

    /// The program of docs/ssl.md ("Your own images"), compiled here so the
    /// guide stays correct; not run (it needs an image folder).
    #[allow(dead_code)]
    fn guide_your_own_images() -> aimass::Result<()> {
        aimass::device::tune_cpu_allocator(); // a training program opts in
        let device = best_device()?;
        // RGB images resized to 64×64.
        let folder = ImageFolder::load(
            "my_images/",
            ImageFolderConfig::default().with_size(Some((64, 64))),
        )?;
        // SimCLR's augmentations at 64 px, normalised with your data's mean and std.
        let preset = PresetConfig::default()
            .with_size(64)
            .with_mean(vec![0.5, 0.5, 0.5])
            .with_std(vec![0.25, 0.25, 0.25]);
        let batch = 256;
        let loader_cfg = DataLoaderConfig::default()
            .with_batch_size(batch)
            .with_drop_last(true);
        let mut loader = DataLoader::new(folder.dataset, loader_cfg, &device)?
            .with_views(simclr_views(&preset)?);

        // A ResNet-18 for small images (3×3 stem), 512 features.
        let resnet = ResNetConfig::resnet18().with_stem(Stem::Small);
        let cfg = SimClrConfig::default().with_projector(
            HeadConfig::simclr()
                .with_hidden_dim(512)
                .with_output_dim(128),
        );
        let mut simclr = SimClr::new(Backbone::resnet(resnet), cfg, &device)?;

        let epochs = 100;
        let schedule = simclr
            .optim_config()
            .schedule(batch, loader.len(), epochs)?;
        let checkpoints = CheckpointDir::new("runs/mine/checkpoints", 2)?;
        Fit::new(
            &mut simclr,
            &mut loader,
            FitConfig::default().with_epochs(epochs),
        )?
        .with_schedule(schedule)
        .with_callback(Progress::new(ProgressMode::Auto, 10))
        .with_callback(PeriodicCheckpoint::new(checkpoints, 1)?)
        .run()?;
        simclr.export_backbone(std::path::Path::new("runs/mine/backbone.safetensors"))
    }
}
