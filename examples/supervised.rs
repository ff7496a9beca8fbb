//! Supervised training on Fashion-MNIST: the reference recipe (the
//! supervised protocol of docs/benchmarks.md), with progress, metrics log,
//! checkpoints, a curve plot and exact resume.
//!
//! ```text
//! cargo run --release --example supervised                      # resnet_tiny, embedded split, 15 epochs
//! cargo run --release --example supervised -- --model convnet   # ConvNet + Adam, 10 epochs, no augmentation
//! cargo run --release --example supervised -- --data /usr/share/datasets/fashion-mnist   # full 60k/10k
//! cargo run --release --example supervised -- --resume          # continue from runs/supervised/checkpoints
//! cargo run --release --example supervised -- --init runs/ssl/backbone.safetensors --labels-per-class 10
//! ```
//!
//! The last line fine-tunes a backbone pretrained without labels
//! (`--example ssl` or `simclr`) with 10 labelled images per class: the
//! backbone's weights load by name, the 10-way head starts fresh.
//!
//! Options (`--help`): `--model resnet_tiny|resnet_small|resnet18|convnet`,
//! `--data DIR`, `--epochs N`, `--batch-size N`, `--lr X`, `--seed N`,
//! `--out DIR`, `--resume`, `--max-steps N`, `--init BACKBONE.safetensors`
//! (start the ResNet from pretrained weights), `--labels-per-class N` (train
//! on N labelled images per class, drawn with the seed; default all).
//!
//! Ends with one line `RESULT method=supervised model=... test_acc=... epochs=... secs=...`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, ValueEnum};

use aimass::data::augment::{presets, Normalize};
use aimass::data::{
    embedded_fashion_mnist, fashion_mnist, DataLoader, DataLoaderConfig, FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
};
use aimass::nn::params::LoadConfig;
use aimass::nn::{
    init::seeded_var_builder, seq, ConvNet, ConvNetConfig, ResNet, ResNetConfig, SequentialT, Stem,
};
use aimass::optim::groups::varmap_single_group;
use aimass::optim::{Adam, AdamConfig, ConstantLr, CosineAnnealingLr, Optimizer, Sgd, SgdConfig};
use aimass::prelude::*;
use aimass::train::{
    evaluate_accuracy, CheckpointDir, Classifier, ClassifierConfig, CurvePlot, Fit, FitConfig,
    MetricsLog, PeriodicCheckpoint, Progress, ProgressMode,
};

/// Supervised training on Fashion-MNIST (see the module docs).
#[derive(Parser, Debug)]
#[command(
    about = "Supervised training on Fashion-MNIST: resnet_tiny by default, the embedded split"
)]
struct Args {
    /// The model.
    #[arg(long, value_enum, default_value_t = ModelKind::ResnetTiny)]
    model: ModelKind,
    /// Fashion-MNIST directory (the four *-ubyte.gz files): train on the
    /// full 60,000, test on the 10,000. Default: the embedded split.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Epochs (default: 15, the ConvNet 10; with --labels-per-class, as
    /// many as make the reference's 930 steps).
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Learning rate (default: SGD 0.1 for the ResNets, Adam 1e-3 for the ConvNet).
    #[arg(long)]
    lr: Option<f64>,
    /// Seed of initialisation, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory for checkpoints, the metrics log and the curve.
    #[arg(long, default_value = "runs/supervised")]
    out: PathBuf,
    /// Continue from the latest checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Start the ResNet's backbone from these weights (a backbone written
    /// by the SSL examples).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Train on this many labelled images per class only.
    #[arg(long)]
    labels_per_class: Option<usize>,
}

/// The models `--model` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModelKind {
    #[value(name = "resnet_tiny")]
    ResnetTiny,
    #[value(name = "resnet_small")]
    ResnetSmall,
    #[value(name = "resnet18")]
    Resnet18,
    #[value(name = "convnet")]
    Convnet,
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.to_possible_value().expect("every model has a name");
        f.write_str(v.get_name())
    }
}

/// An error ends the example with status 1 and its message (`aimass::Error`'s
/// `Debug` is its message).
fn main() -> Result<()> {
    let args = Args::parse();
    let device = best_device()?;
    // A training program: keep freed memory for the next step (see the docs).
    aimass::device::tune_cpu_allocator();
    let start = Instant::now();

    // No --data: the embedded split (first 8,000 / last 2,000 of t10k), the
    // split of the reference figures. --data DIR: the full 60k / 10k.
    let data = match &args.data {
        Some(dir) => fashion_mnist(Some(dir))?,
        None => embedded_fashion_mnist()?,
    };
    eprintln!(
        "data: {} ({} train, {} test)",
        data.source,
        data.train.len(),
        data.test.len()
    );
    eprintln!("device: {}", aimass::device::device_name(&device));

    let is_convnet = args.model == ModelKind::Convnet;
    // Few labels: N labelled images per class, the rest of the training set unused.
    let train_set = match args.labels_per_class {
        Some(n) => {
            let picks = aimass::ssl::label_subset(data.train.labels(), n, args.seed)?;
            eprintln!(
                "training on {} labelled images ({n} per class)",
                picks.len()
            );
            data.train.subset(&picks)?
        }
        None => data.train.clone(),
    };
    let batch_size = args.batch_size.min(train_set.len());
    let loader_cfg = DataLoaderConfig::default()
        .with_batch_size(batch_size)
        .with_drop_last(true)
        .with_seed(args.seed + 2);
    let mut train = DataLoader::new(train_set, loader_cfg, &device)?;
    let normalize = Normalize::new(&[FASHION_MNIST_MEAN], &[FASHION_MNIST_STD])?;
    train = if is_convnet {
        train.with_transform(normalize.clone())
    } else {
        train.with_transform(presets::fashion_mnist_supervised_reference()?)
    };
    let test = DataLoader::new(
        data.test.clone(),
        DataLoaderConfig::default()
            .with_batch_size(500)
            .with_shuffle(false),
        &device,
    )?
    .with_transform(normalize);

    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, args.seed, DType::F32, &device);
    let model: SequentialT = match args.model {
        ModelKind::Convnet => seq().add(ConvNet::new(ConvNetConfig::default(), vb)?),
        ModelKind::ResnetTiny => seq().add(ResNet::new(
            ResNetConfig::resnet_tiny().with_num_classes(Some(10)),
            vb,
        )?),
        ModelKind::ResnetSmall => seq().add(ResNet::new(
            ResNetConfig::resnet_small().with_num_classes(Some(10)),
            vb,
        )?),
        ModelKind::Resnet18 => seq().add(ResNet::new(
            ResNetConfig::resnet18()
                .with_in_channels(1)
                .with_stem(Stem::Small)
                .with_num_classes(Some(10)),
            vb,
        )?),
    };
    let params = aimass::nn::params::num_params(&varmap)?;
    if let Some(path) = &args.init {
        // A backbone exported by an SSL trainer: every ResNet weight by
        // name; only the classification head (`fc.*`) starts fresh.
        if is_convnet {
            return Err(Error::config(
                "--init",
                path.display(),
                "needs a ResNet --model (the backbones the SSL examples write)",
            ));
        }
        let report = aimass::nn::params::load_with(&varmap, path, &LoadConfig::non_strict())?;
        if report.loaded.is_empty() || report.missing_keys.iter().any(|k| !k.starts_with("fc.")) {
            return Err(Error::config(
                "--init",
                path.display(),
                format!(
                    "is not a backbone of --model {}: missing {:?}",
                    args.model, report.missing_keys
                ),
            ));
        }
        eprintln!(
            "initialised {} tensors from {} (fresh: {:?})",
            report.loaded.len(),
            path.display(),
            report.missing_keys
        );
    }

    // The reference recipes: ResNets with SGD (lr 0.1, momentum 0.9, weight
    // decay 5e-4) and a per-step cosine to 0 over 15 epochs; the ConvNet
    // with Adam (lr 1e-3) for 10 epochs.
    // With few labels an epoch is a few steps: keep the reference's number
    // of steps (15 epochs of 62) unless --epochs says otherwise.
    let epochs = args
        .epochs
        .unwrap_or(match (is_convnet, args.labels_per_class) {
            (true, _) => 10,
            (false, None) => 15,
            (false, Some(_)) => 930usize.div_ceil(train.len()),
        });
    let steps = (epochs * train.len()) as u64;
    let (optimizer, lr): (Box<dyn Optimizer>, f64) = if is_convnet {
        let lr = args.lr.unwrap_or(1e-3);
        (
            Box::new(Adam::from_varmap(
                &varmap,
                AdamConfig::default().with_lr(lr),
            )?),
            lr,
        )
    } else {
        let lr = args.lr.unwrap_or(0.1);
        (
            // Weight decay on every parameter, biases and BatchNorm
            // included, as the reference's `SGD(model.parameters(), ...)`
            // (our default groups would exempt the 1-D parameters).
            Box::new(Sgd::new(
                varmap_single_group(&varmap)?,
                SgdConfig::default()
                    .with_lr(lr)
                    .with_momentum(0.9)
                    .with_weight_decay(5e-4),
            )?),
            lr,
        )
    };
    let mut clf = Classifier::new(model, varmap, optimizer, ClassifierConfig::default())?;
    eprintln!(
        "model: {} ({params} parameters), {epochs} epochs of {} steps",
        args.model,
        train.len()
    );

    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    let ckpt_dir = CheckpointDir::new(args.out.join("checkpoints"), 2)?;
    // --resume: the newest checkpoint that verifies; damaged newer ones are
    // reported and skipped.
    let resume_from = if args.resume {
        let found = ckpt_dir.load_latest_valid(&device)?.ok_or_else(|| {
            Error::invalid(
                "--resume",
                format!("no checkpoint in {}", ckpt_dir.dir().display()),
            )
        })?;
        for s in &found.skipped {
            eprintln!("skipping {}: {}", s.path.display(), s.error);
        }
        eprintln!(
            "resuming from {} (step {})",
            found.path.display(),
            found.step
        );
        Some(found.checkpoint)
    } else {
        None
    };

    // About 15 evaluations and checkpoints per run (every epoch at the
    // defaults; every 62 one-step epochs with 10 labels per class).
    let every = epochs.div_ceil(15);
    let config = FitConfig::default()
        .with_epochs(epochs)
        .with_max_steps(args.max_steps)
        .with_eval_every(every);
    let mut fit = Fit::new(&mut clf, &mut train, config)?
        .with_evaluator(|c: &mut Classifier<SequentialT, Box<dyn Optimizer>>, _| {
            Ok(BTreeMap::from([(
                "test_acc".to_string(),
                evaluate_accuracy(c.model(), &test)?,
            )]))
        })
        .with_callback(Progress::new(ProgressMode::Auto, 20))
        .with_callback(MetricsLog::new(args.out.join("metrics.jsonl"), 10)?)
        .with_callback(PeriodicCheckpoint::new(ckpt_dir, every)?)
        .with_callback(CurvePlot::new(args.out.join("curves.svg")));
    fit = if is_convnet {
        fit.with_schedule(ConstantLr::new(lr)?)
    } else {
        fit.with_schedule(CosineAnnealingLr::new(lr, steps, 0.0)?)
    };
    if let Some(c) = &resume_from {
        fit.resume(c)?;
    }
    let summary = fit.run()?;
    drop(fit);
    // A run stopped mid-epoch (--max-steps) has not evaluated yet.
    let test_acc = match summary.metrics.get("test_acc") {
        Some(a) => *a,
        None => evaluate_accuracy(clf.model(), &test)?,
    };
    eprintln!("checkpoints and curves in {}", args.out.display());
    println!(
        "RESULT method=supervised model={} data={} labels_per_class={} init={} test_acc={:.4} epochs={} steps={} secs={:.0}",
        args.model,
        if args.data.is_some() {
            "full"
        } else {
            "embedded"
        },
        args.labels_per_class.map_or("all".to_string(), |n| n.to_string()),
        if args.init.is_some() { "pretrained" } else { "random" },
        test_acc,
        summary.epochs,
        summary.steps,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
