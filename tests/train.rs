//! The training loop: exact resume, checkpoint failures that change nothing,
//! the non-finite guard, callbacks.

use std::collections::BTreeMap;
use std::path::PathBuf;

use aimass::candle::{DType, Device};
use aimass::data::{DataLoader, DataLoaderConfig, InMemoryDataset};
use aimass::nn::{init::seeded_var_builder, seq, Mlp, MlpConfig, SequentialT};
use aimass::optim::{CosineAnnealingLr, Schedule, Sgd, SgdConfig};
use aimass::train::{
    Callback, Checkpoint, Classifier, ClassifierConfig, Control, EarlyStopping,
    EarlyStoppingConfig, EpochInfo, Fit, FitConfig, MonitorMode, NonFinitePolicy, TrainingState,
};
use aimass::Error;
use rand::Rng;

type Clf = Classifier<SequentialT, Sgd>;

/// 96 random 1×8×8 images with 3 classes (brightest third of the image).
fn dataset(seed: u64) -> InMemoryDataset {
    let mut r = aimass::device::rng(seed);
    let mut px = Vec::new();
    let mut y = Vec::new();
    for i in 0..96 {
        let c = i % 3;
        for p in 0..64 {
            let bright = (p / 22) as u32 == c;
            px.push(if bright {
                r.random_range(150..255)
            } else {
                r.random_range(0..100)
            });
        }
        y.push(c);
    }
    InMemoryDataset::new(px, y, (1, 8, 8)).unwrap()
}

/// A loader with random augmentation (pad-crop-flip), so resume must also
/// restore the augmentation randomness.
fn loader(seed: u64) -> DataLoader {
    let aug = aimass::data::augment::Compose::new()
        .then(
            aimass::data::augment::RandomCrop::new(
                aimass::data::augment::RandomCropConfig::default()
                    .with_size((8, 8))
                    .with_padding(2),
            )
            .unwrap(),
        )
        .then(aimass::data::augment::HorizontalFlip::new(0.5).unwrap());
    DataLoader::new(
        dataset(1),
        DataLoaderConfig::default()
            .with_batch_size(16)
            .with_seed(seed)
            .with_prefetch(1),
        &Device::Cpu,
    )
    .unwrap()
    .with_transform(aug)
}

fn classifier(width: usize, policy: NonFinitePolicy) -> Clf {
    let varmap = aimass::candle_nn::VarMap::new();
    let vb = seeded_var_builder(&varmap, 7, DType::F32, &Device::Cpu);
    // Dropout too: its masks follow the step (`nn::StepScope`, entered by
    // the classifier), so resumed runs draw the masks of uninterrupted ones.
    let mlp = Mlp::new(
        MlpConfig::new(vec![64, width, 3])
            .with_batch_norm(true)
            .with_dropout(0.2)
            .with_dropout_seed(5),
        vb,
    )
    .unwrap();
    let model = seq().add_fn(|x, _| x.flatten_from(1)).add(mlp);
    let opt = Sgd::from_varmap(
        &varmap,
        SgdConfig::default()
            .with_lr(0.1)
            .with_momentum(0.9)
            .with_nesterov(true)
            .with_weight_decay(1e-3),
    )
    .unwrap();
    Classifier::new(
        model,
        varmap,
        opt,
        ClassifierConfig::default()
            .with_label_smoothing(0.1)
            .with_non_finite(policy),
    )
    .unwrap()
}

fn weights(c: &Clf) -> BTreeMap<String, Vec<f32>> {
    c.varmap()
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("aimass-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(clf: &mut Clf, data: &mut DataLoader, until: u64, ckpt: Option<&Checkpoint>) -> Checkpoint {
    // 6 batches per epoch, 3 epochs = 18 steps; the schedule spans the run.
    let mut fit = Fit::new(
        clf,
        data,
        FitConfig::default()
            .with_epochs(3)
            .with_max_steps(Some(until)),
    )
    .unwrap()
    .with_schedule(CosineAnnealingLr::new(0.1, 18, 0.0).unwrap());
    if let Some(c) = ckpt {
        fit.resume(c).unwrap();
    }
    fit.run().unwrap();
    fit.checkpoint().unwrap()
}

#[test]
fn resume_is_bit_identical() {
    let dir = tmp("resume");
    // Reference: 14 uninterrupted steps (crosses an epoch boundary mid-way).
    let mut a = classifier(16, NonFinitePolicy::Error);
    let mut la = loader(3);
    run(&mut a, &mut la, 14, None);

    // 7 steps (mid-epoch), save to disk, load into fresh objects, 7 more.
    let mut b = classifier(16, NonFinitePolicy::Error);
    let mut lb = loader(3);
    let c = run(&mut b, &mut lb, 7, None);
    c.save(dir.join("mid.safetensors")).unwrap();
    let loaded = Checkpoint::load(dir.join("mid.safetensors"), &Device::Cpu).unwrap();
    let mut b2 = classifier(16, NonFinitePolicy::Error);
    let mut lb2 = loader(3);
    let end = run(&mut b2, &mut lb2, 14, Some(&loaded));

    assert_eq!(end.meta("step"), Some("14"));
    assert!(
        weights(&a) == weights(&b2),
        "resumed weights differ from the uninterrupted run"
    );
    assert!(
        weights(&a) != weights(&classifier(16, NonFinitePolicy::Error)),
        "training changed nothing"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_checkpoints_change_nothing() {
    let dir = tmp("bad");
    let mut a = classifier(16, NonFinitePolicy::Error);
    let mut la = loader(3);
    let good = run(&mut a, &mut la, 4, None);
    let path = dir.join("c.safetensors");
    good.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();

    let mut fresh = classifier(16, NonFinitePolicy::Error);
    let before = weights(&fresh);
    // Truncated and corrupt files fail to load at all.
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        Checkpoint::load(&path, &Device::Cpu),
        Err(Error::Malformed { .. })
    ));
    let mut flipped = bytes.clone();
    let n = flipped.len();
    flipped[n - 5] ^= 1;
    std::fs::write(&path, &flipped).unwrap();
    assert!(Checkpoint::load(&path, &Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("corrupt"));

    // A checkpoint of another model (wider hidden layer): an error naming
    // the tensor, and neither weights nor optimizer nor data position move.
    let mut wide = classifier(32, NonFinitePolicy::Error);
    let mut lw = loader(3);
    let other = run(&mut wide, &mut lw, 2, None);
    let mut l = loader(3);
    let mut fit = Fit::new(&mut fresh, &mut l, FitConfig::default()).unwrap();
    let e = fit.resume(&other).unwrap_err();
    assert!(e.to_string().contains("model/0."), "{e}");
    assert_eq!(fit.step(), 0);
    // A checkpoint of another kind of trainer.
    let mut foreign = Checkpoint::new("byol");
    foreign.set_meta("step", 1);
    assert!(fit
        .resume(&foreign)
        .unwrap_err()
        .to_string()
        .contains("byol"));
    // Another data seed.
    let mut l9 = loader(9);
    let mut fresh2 = classifier(16, NonFinitePolicy::Error);
    let mut fit9 = Fit::new(&mut fresh2, &mut l9, FitConfig::default()).unwrap();
    assert!(fit9.resume(&good).is_err());
    drop(fit);
    assert!(
        weights(&fresh) == before,
        "a failed resume changed the weights"
    );
    assert_eq!(aimass::optim::Optimizer::step_count(fresh.optimizer()), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

fn plain_loader() -> DataLoader {
    DataLoader::new(
        dataset(1),
        DataLoaderConfig::default()
            .with_batch_size(16)
            .with_prefetch(0),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn non_finite_policies() {
    use aimass::data::Batch;
    use aimass::train::TrainStep;
    let l = plain_loader();
    let good = l.batch_at(0, 0).unwrap();
    let bad = Batch {
        views: vec![(good.images().unwrap() * f64::NAN).unwrap()],
        ..good.clone()
    };

    // Default policy: a typed error, weights untouched.
    let mut c = classifier(16, NonFinitePolicy::Error);
    let before = weights(&c);
    let e = c.train_step(&bad, 5).unwrap_err();
    assert!(matches!(e, Error::NonFinite { step: Some(5), .. }), "{e}");
    assert!(
        weights(&c) == before,
        "a rejected step changed the weights or BatchNorm statistics"
    );

    // Skip policy: the step is skipped and counted, then the limit is an error.
    let mut c = classifier(16, NonFinitePolicy::Skip { max_skips: 1 });
    let out = c.train_step(&bad, 0).unwrap();
    assert!(out.skipped);
    assert!(
        weights(&c) == before,
        "a rejected step changed the weights or BatchNorm statistics"
    );
    assert!(c.train_step(&good, 1).is_ok());
    assert!(c.train_step(&bad, 2).is_err());
    assert_eq!(c.skipped_steps(), 1);
    // Every weight of the guarded run is finite, so are its checkpoints.
    let mut ck = Checkpoint::new("classifier");
    c.save_state(&mut ck).unwrap();
    for (name, t) in ck.tensors() {
        let s = t
            .to_dtype(DType::F64)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(s.is_finite(), "{name} is not finite");
    }
}

#[derive(Default)]
struct Recorder {
    epochs: Vec<usize>,
    steps: u64,
    ended: bool,
}

impl Callback for &mut Recorder {
    fn on_step(&mut self, info: &aimass::train::StepInfo<'_>) -> aimass::Result<Control> {
        assert!(info.loss.is_finite() && info.lr > 0.0);
        self.steps += 1;
        Ok(Control::Continue)
    }
    fn on_epoch_end(&mut self, info: &EpochInfo<'_>) -> aimass::Result<Control> {
        assert!(info.metrics.contains_key("train_acc"));
        self.epochs.push(info.epoch);
        Ok(Control::Continue)
    }
    fn after_epoch_end(
        &mut self,
        info: &EpochInfo<'_>,
        state: &dyn TrainingState,
    ) -> aimass::Result<()> {
        assert_eq!(state.checkpoint()?.meta_parse::<u64>("step")?, info.step);
        Ok(())
    }
    fn on_end(&mut self, _state: &dyn TrainingState) -> aimass::Result<()> {
        self.ended = true;
        Ok(())
    }
}

#[test]
fn callbacks_evaluation_and_early_stopping() {
    let mut c = classifier(16, NonFinitePolicy::Error);
    let mut l = loader(4);
    let eval_loader = DataLoader::new(
        dataset(1),
        DataLoaderConfig::default().with_shuffle(false),
        &Device::Cpu,
    )
    .unwrap();
    let mut rec = Recorder::default();
    let summary = Fit::new(&mut c, &mut l, FitConfig::default().with_epochs(4))
        .unwrap()
        .with_callback(&mut rec)
        .with_evaluator(|t: &mut Clf, _| {
            Ok(BTreeMap::from([(
                "train_acc".to_string(),
                aimass::train::evaluate_accuracy(t.model(), &eval_loader)?,
            )]))
        })
        .run()
        .unwrap();
    assert_eq!(rec.epochs, vec![1, 2, 3, 4]);
    assert_eq!(rec.steps, 24);
    assert!(rec.ended);
    assert_eq!(summary.steps, 24);
    assert!(summary.metrics["train_acc"] > 0.9, "{summary:?}");

    // Early stopping on a metric that never improves stops after patience + 1 epochs.
    let mut c = classifier(16, NonFinitePolicy::Error);
    let mut l = loader(4);
    let s = Fit::new(&mut c, &mut l, FitConfig::default().with_epochs(10))
        .unwrap()
        .with_evaluator(|_: &mut Clf, _| Ok(BTreeMap::from([("flat".to_string(), 1.0)])))
        .with_callback(
            EarlyStopping::new(
                "flat",
                EarlyStoppingConfig::default()
                    .with_mode(MonitorMode::Max)
                    .with_patience(1),
            )
            .unwrap(),
        )
        .run()
        .unwrap();
    assert_eq!(s.epochs, 3);
    assert!(s.stopped_early);
}

/// A trainer that only records which episodes it saw.
struct EpisodeLog(Vec<Vec<u32>>);

impl aimass::train::TrainStep for EpisodeLog {
    type Batch = aimass::data::Episode;
    fn train_step(
        &mut self,
        ep: &aimass::data::Episode,
        _step: u64,
    ) -> aimass::Result<aimass::train::StepOutput> {
        self.0.push(ep.classes.clone());
        Ok(aimass::train::StepOutput::new(0.0, ep.query_labels.dim(0)?))
    }
    fn set_learning_rate(&mut self, _lr: f64) -> aimass::Result<()> {
        Ok(())
    }
    fn learning_rate(&self) -> f64 {
        1.0
    }
    fn kind(&self) -> &str {
        "episode-log"
    }
    fn save_state(&self, _ckpt: &mut Checkpoint) -> aimass::Result<()> {
        Ok(())
    }
    fn load_state(&mut self, _ckpt: &Checkpoint) -> aimass::Result<()> {
        Ok(())
    }
}

#[test]
fn fit_runs_over_episodes_and_resumes() {
    use aimass::data::{EpisodeConfig, EpisodeSampler};
    use aimass::train::EpisodeEpochs;
    let tasks = || {
        let cfg = EpisodeConfig::default()
            .with_n_way(2)
            .with_k_shot(1)
            .with_q_query(1)
            .with_seed(5);
        EpisodeEpochs::new(
            EpisodeSampler::new(dataset(2), &[0, 1, 2], cfg, &Device::Cpu).unwrap(),
            3,
        )
        .unwrap()
    };
    let mut all = EpisodeLog(Vec::new());
    let mut t = tasks();
    let s = Fit::new(&mut all, &mut t, FitConfig::default().with_epochs(2))
        .unwrap()
        .run()
        .unwrap();
    assert_eq!((s.steps, s.epochs, all.0.len()), (6, 2, 6));

    let mut first = EpisodeLog(Vec::new());
    let mut t1 = tasks();
    let mut fit = Fit::new(
        &mut first,
        &mut t1,
        FitConfig::default().with_epochs(2).with_max_steps(Some(4)),
    )
    .unwrap();
    fit.run().unwrap();
    let ckpt = fit.checkpoint().unwrap();
    drop(fit);
    let mut rest = EpisodeLog(Vec::new());
    let mut t2 = tasks();
    let mut fit = Fit::new(&mut rest, &mut t2, FitConfig::default().with_epochs(2)).unwrap();
    fit.resume(&ckpt).unwrap();
    fit.run().unwrap();
    drop(fit);
    first.0.extend(rest.0);
    assert_eq!(first.0, all.0);
}

/// 0.1, then `bad` from step `at` on.
struct BadFrom {
    at: u64,
    bad: f64,
}

impl Schedule for BadFrom {
    fn lr(&self, step: u64) -> f64 {
        if step < self.at {
            0.1
        } else {
            self.bad
        }
    }
}

#[test]
fn fit_refuses_bad_schedule_values() {
    use aimass::train::TrainStep;
    for bad in [f64::NAN, f64::INFINITY, -0.5] {
        let mut c = classifier(16, NonFinitePolicy::Error);
        let mut l = loader(3);
        let mut fit = Fit::new(&mut c, &mut l, FitConfig::default().with_epochs(2))
            .unwrap()
            .with_schedule(BadFrom { at: 3, bad });
        let e = fit.run().unwrap_err();
        assert!(matches!(e, Error::Config { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("at step 3") && msg.contains(&format!("{bad}")),
            "{msg}"
        );
        assert_eq!(fit.step(), 3);
        drop(fit);
        // The bad value never reached the optimizer.
        assert_eq!(c.learning_rate(), 0.1);
        assert_eq!(aimass::optim::Optimizer::step_count(c.optimizer()), 3);
        // The trainer refuses it too.
        assert!(c.set_learning_rate(bad).is_err());
        assert_eq!(c.learning_rate(), 0.1);
    }
}

/// The monitored metric of the early-stopping runs, by epoch (from 1): best
/// at epoch 2, then three epochs without improvement, so patience 2 stops
/// after epoch 5. A fresh `EarlyStopping` resumed after epoch 3 would take
/// 0.65 as its best and never stop.
const VAL: [f64; 8] = [0.50, 0.70, 0.60, 0.65, 0.66, 0.68, 0.69, 0.90];

/// An 8-epoch run (6 steps per epoch) with early stopping on `val`; `dir`
/// adds a periodic checkpoint *before* the early stopping.
fn fit_with_early_stopping(
    clf: &mut Clf,
    data: &mut DataLoader,
    max_steps: Option<u64>,
    resume: Option<&Checkpoint>,
    dir: Option<aimass::train::CheckpointDir>,
) -> (aimass::train::FitSummary, Checkpoint) {
    let mut fit = Fit::new(
        clf,
        data,
        FitConfig::default()
            .with_epochs(8)
            .with_max_steps(max_steps),
    )
    .unwrap()
    .with_schedule(CosineAnnealingLr::new(0.1, 48, 0.0).unwrap())
    .with_evaluator(|_: &mut Clf, epoch| Ok(BTreeMap::from([("val".to_string(), VAL[epoch - 1])])));
    if let Some(d) = dir {
        fit = fit.with_callback(aimass::train::PeriodicCheckpoint::new(d, 1).unwrap());
    }
    fit = fit.with_callback(
        EarlyStopping::new(
            "val",
            EarlyStoppingConfig::default()
                .with_mode(MonitorMode::Max)
                .with_patience(2),
        )
        .unwrap(),
    );
    if let Some(c) = resume {
        fit.resume(c).unwrap();
    }
    let summary = fit.run().unwrap();
    (summary, fit.checkpoint().unwrap())
}

#[test]
fn resume_restores_early_stopping_bit_for_bit() {
    let dir = tmp("early");
    let mut a = classifier(16, NonFinitePolicy::Error);
    let mut la = loader(3);
    let (sa, _) = fit_with_early_stopping(&mut a, &mut la, None, None, None);
    assert_eq!((sa.epochs, sa.steps, sa.stopped_early), (5, 30, true));

    // Stopped mid-epoch 4 (after epoch 3's early-stopping update), saved,
    // loaded into fresh objects, continued.
    let mut b = classifier(16, NonFinitePolicy::Error);
    let mut lb = loader(3);
    let (_, mid) = fit_with_early_stopping(&mut b, &mut lb, Some(20), None, None);
    assert_eq!(mid.meta("fit.callback.0"), Some("early_stopping:val"));
    mid.save(dir.join("mid.safetensors")).unwrap();
    let loaded = Checkpoint::load(dir.join("mid.safetensors"), &Device::Cpu).unwrap();
    let mut b2 = classifier(16, NonFinitePolicy::Error);
    let mut lb2 = loader(3);
    let (sb, _) = fit_with_early_stopping(&mut b2, &mut lb2, None, Some(&loaded), None);
    assert_eq!((sb.epochs, sb.steps, sb.stopped_early), (5, 30, true));
    assert!(weights(&a) == weights(&b2), "resumed weights differ");

    // The periodic checkpoint of epoch 3, taken by a callback added before
    // the early stopping, holds the early stopping's state after epoch 3.
    let cd = aimass::train::CheckpointDir::new(dir.join("ck"), 10).unwrap();
    let mut c = classifier(16, NonFinitePolicy::Error);
    let mut lc = loader(3);
    fit_with_early_stopping(&mut c, &mut lc, Some(20), None, Some(cd.clone()));
    let e3 = Checkpoint::load(cd.path(18), &Device::Cpu).unwrap();
    assert_eq!(e3.meta("callback.0.best"), Some("0.7"));
    assert_eq!(e3.meta("callback.0.bad_epochs"), Some("1"));
    let mut c2 = classifier(16, NonFinitePolicy::Error);
    let mut lc2 = loader(3);
    let (sc, _) = fit_with_early_stopping(&mut c2, &mut lc2, None, Some(&e3), Some(cd));
    assert_eq!((sc.epochs, sc.steps, sc.stopped_early), (5, 30, true));
    assert!(weights(&a) == weights(&c2), "resumed weights differ");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn resume_checks_callbacks_and_step_before_changing_anything() {
    let mut a = classifier(16, NonFinitePolicy::Error);
    let mut la = loader(3);
    let (_, with_es) = fit_with_early_stopping(&mut a, &mut la, Some(7), None, None);
    let mut b = classifier(16, NonFinitePolicy::Error);
    let mut lb = loader(3);
    let plain = run(&mut b, &mut lb, 7, None);

    let mut fresh = classifier(16, NonFinitePolicy::Error);
    let before = weights(&fresh);
    let mut l = loader(3);
    let mut es = EarlyStopping::new(
        "val",
        EarlyStoppingConfig::default()
            .with_mode(MonitorMode::Max)
            .with_patience(2),
    )
    .unwrap();
    {
        // The checkpoint has early-stopping state, the run has no such callback.
        let mut fit = Fit::new(&mut fresh, &mut l, FitConfig::default()).unwrap();
        let e = fit.resume(&with_es).unwrap_err();
        assert!(matches!(e, Error::Malformed { .. }), "{e}");
        assert!(e.to_string().contains("early_stopping:val"), "{e}");
        assert_eq!(fit.step(), 0);
    }
    {
        // The run has an early stopping the checkpoint has no state for.
        let mut fit = Fit::new(&mut fresh, &mut l, FitConfig::default())
            .unwrap()
            .with_callback(&mut es);
        let e = fit.resume(&plain).unwrap_err();
        assert!(e.to_string().contains("early_stopping:val"), "{e}");
        // A stored step that disagrees with the trainer's own count (7
        // optimizer steps, none skipped).
        let mut edited = with_es.clone();
        edited.set_meta("step", 99);
        let e = fit.resume(&edited).unwrap_err();
        assert!(matches!(e, Error::Malformed { .. }), "{e}");
        assert!(
            e.to_string().contains("step 7") && e.to_string().contains("step 99"),
            "{e}"
        );
        assert_eq!(fit.step(), 0);
    }
    {
        // The callbacks match but the model does not: the early stopping,
        // loaded before the trainer, gets its state back.
        let mut wide = classifier(32, NonFinitePolicy::Error);
        let mut lw = loader(3);
        let (_, other) = fit_with_early_stopping(&mut wide, &mut lw, Some(14), None, None);
        let mut fit = Fit::new(&mut fresh, &mut l, FitConfig::default())
            .unwrap()
            .with_callback(&mut es);
        let e = fit.resume(&other).unwrap_err();
        assert!(e.to_string().contains("model/0."), "{e}");
    }
    assert_eq!((es.best(), es.bad_epochs()), (None, 0));
    assert!(
        weights(&fresh) == before,
        "a failed resume changed the weights"
    );
    assert_eq!(aimass::optim::Optimizer::step_count(fresh.optimizer()), 0);

    // One flipped bit in the stored step of a saved file: an error, where
    // format 1 resumed at step 15 and exited normally.
    let dir = tmp("flip");
    let path = dir.join("c.safetensors");
    with_es.save(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(10)
        .position(|w| w == b"\"step\":\"7\"")
        .unwrap();
    bytes[at + 8] ^= 2; // '7' -> '5'
    std::fs::write(&path, &bytes).unwrap();
    let e = Checkpoint::load(&path, &Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::Malformed { .. }), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn two_callbacks_with_one_state_name_are_refused() {
    let mut c = classifier(16, NonFinitePolicy::Error);
    let mut l = loader(3);
    let e = Fit::new(&mut c, &mut l, FitConfig::default())
        .unwrap()
        .with_callback(
            EarlyStopping::new(
                "val",
                EarlyStoppingConfig::default()
                    .with_mode(MonitorMode::Max)
                    .with_patience(2),
            )
            .unwrap(),
        )
        .with_callback(
            EarlyStopping::new(
                "val",
                EarlyStoppingConfig::default()
                    .with_mode(MonitorMode::Max)
                    .with_patience(5),
            )
            .unwrap(),
        )
        .run()
        .unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e}");
    assert_eq!(aimass::optim::Optimizer::step_count(c.optimizer()), 0);
}

#[test]
fn non_finite_weights_are_never_checkpointed() {
    let dir = tmp("overflow");
    let cd = aimass::train::CheckpointDir::new(&dir, 5).unwrap();
    let mut c = classifier(16, NonFinitePolicy::Error);
    let mut l = loader(3);
    // Finite gradients, but at step 11 (the last of epoch 2) a rate so
    // large that the update overflows the weights; the epoch-end checkpoint
    // comes before any forward pass could see them.
    let e = Fit::new(&mut c, &mut l, FitConfig::default().with_epochs(3))
        .unwrap()
        .with_schedule(BadFrom { at: 11, bad: 1e300 })
        .with_callback(aimass::train::PeriodicCheckpoint::new(cd.clone(), 1).unwrap())
        .run()
        .unwrap_err();
    assert!(
        matches!(&e, Error::NonFinite { step: Some(12), quantity, .. } if quantity.contains("checkpoint tensor `model/")),
        "{e}"
    );
    // Only epoch 1's checkpoint is there, and it is finite.
    let steps: Vec<u64> = cd.list().unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![6]);
    let found = cd.load_latest_valid(&Device::Cpu).unwrap().unwrap();
    assert!(found.skipped.is_empty());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Records the learning rate of every step.
#[derive(Default)]
struct Lrs(Vec<f64>);

impl Callback for &mut Lrs {
    fn on_step(&mut self, info: &aimass::train::StepInfo<'_>) -> aimass::Result<Control> {
        self.0.push(info.lr);
        Ok(Control::Continue)
    }
}

const PLATEAU_VAL: [f64; 5] = [1.0, 1.0, 0.5, 0.6, 0.4];

fn fit_with_plateau(
    clf: &mut Clf,
    data: &mut DataLoader,
    lrs: &mut Lrs,
    max_steps: Option<u64>,
    resume: Option<&Checkpoint>,
) -> Checkpoint {
    use aimass::optim::{PlateauMode, ReduceLrOnPlateau, ReduceLrOnPlateauConfig};
    let plateau = ReduceLrOnPlateau::new(
        0.1,
        ReduceLrOnPlateauConfig::default()
            .with_mode(PlateauMode::Min)
            .with_patience(0)
            .with_factor(0.5),
    )
    .unwrap();
    let mut fit = Fit::new(
        clf,
        data,
        FitConfig::default()
            .with_epochs(5)
            .with_max_steps(max_steps),
    )
    .unwrap()
    .with_plateau_schedule("val", plateau)
    .with_evaluator(|_: &mut Clf, epoch| {
        Ok(BTreeMap::from([(
            "val".to_string(),
            PLATEAU_VAL[epoch - 1],
        )]))
    })
    .with_callback(lrs);
    if let Some(c) = resume {
        fit.resume(c).unwrap();
    }
    fit.run().unwrap();
    fit.checkpoint().unwrap()
}

#[test]
fn plateau_schedule_follows_the_epoch_metric_and_resumes() {
    let mut a = classifier(16, NonFinitePolicy::Error);
    let mut la = loader(3);
    let mut lrs = Lrs::default();
    fit_with_plateau(&mut a, &mut la, &mut lrs, None, None);
    // torch's ReduceLROnPlateau(patience=0, factor=0.5), stepped once per
    // epoch: epoch 2 does not improve on 1.0 -> 0.05 from epoch 3; epoch 3
    // improves (0.5); epoch 4 does not (0.6) -> 0.025 for epoch 5.
    let want: Vec<f64> = [0.1, 0.1, 0.05, 0.05, 0.025]
        .iter()
        .flat_map(|&lr| [lr; 6])
        .collect();
    assert_eq!(lrs.0, want);

    // Stopped mid-epoch 4, resumed from the saved file.
    let mut b = classifier(16, NonFinitePolicy::Error);
    let mut lb = loader(3);
    let mut first = Lrs::default();
    let mid = fit_with_plateau(&mut b, &mut lb, &mut first, Some(21), None);
    assert_eq!(mid.meta("fit.plateau.metric"), Some("val"));
    let bytes = mid.to_bytes().unwrap();
    let loaded = Checkpoint::from_bytes(&bytes, std::path::Path::new("mid"), &Device::Cpu).unwrap();
    let mut b2 = classifier(16, NonFinitePolicy::Error);
    let mut lb2 = loader(3);
    let mut rest = Lrs::default();
    fit_with_plateau(&mut b2, &mut lb2, &mut rest, None, Some(&loaded));
    first.0.extend(rest.0);
    assert_eq!(first.0, want);
    assert!(weights(&a) == weights(&b2), "resumed weights differ");

    // A plain schedule cannot resume a plateau run, nor the other way.
    let mut c = classifier(16, NonFinitePolicy::Error);
    let mut lc = loader(3);
    let mut fit = Fit::new(&mut c, &mut lc, FitConfig::default())
        .unwrap()
        .with_schedule(CosineAnnealingLr::new(0.1, 18, 0.0).unwrap());
    let e = fit.resume(&loaded).unwrap_err();
    assert!(e.to_string().contains("plateau"), "{e}");
}

#[test]
fn plateau_schedule_needs_an_existing_metric() {
    use aimass::optim::{ReduceLrOnPlateau, ReduceLrOnPlateauConfig};
    let mut c = classifier(16, NonFinitePolicy::Error);
    let mut l = loader(3);
    let e = Fit::new(&mut c, &mut l, FitConfig::default())
        .unwrap()
        .with_plateau_schedule(
            "val_loss",
            ReduceLrOnPlateau::new(0.1, ReduceLrOnPlateauConfig::default()).unwrap(),
        )
        .with_evaluator(|_: &mut Clf, _| Ok(BTreeMap::from([("val".to_string(), 1.0)])))
        .run()
        .unwrap_err();
    assert!(
        matches!(&e, Error::Config { field, .. } if field == "Fit::with_plateau_schedule"),
        "{e}"
    );
    assert!(e.to_string().contains("val_loss"), "{e}");
}
