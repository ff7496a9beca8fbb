//! The program behind `examples/ssl.rs`, `simclr.rs` and `byol.rs`:
//! self-supervised pretraining of resnet_tiny on Fashion-MNIST images
//! without their labels, then the question users ask: how good a
//! classifier do the pretrained features give with few labels?

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use aimass::data::augment::{presets, Normalize};
use aimass::data::{
    embedded_fashion_mnist, fashion_mnist, DataLoader, DataLoaderConfig, InMemoryDataset,
    FASHION_MNIST_MEAN, FASHION_MNIST_STD,
};
use aimass::nn::{init::seeded_var_builder, HeadConfig, ResNet, ResNetConfig};
use aimass::prelude::*;
use aimass::ssl::{
    probe_features, Backbone, BarlowTwins, BarlowTwinsConfig, Byol, ByolConfig, MoCo, MoCoConfig,
    ProbeConfig, ProbeReport, SimClr, SimClrConfig, SimSiam, SimSiamConfig, SslOptimConfig,
    SslOptimizer, SslTrainer, VicReg, VicRegConfig,
};
use aimass::train::{
    extract, knn_accuracy, Checkpoint, CheckpointDir, KnnConfig, PeriodicCheckpoint, Progress,
    ProgressMode,
};
use clap::{Parser, ValueEnum};

/// The self-supervised method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// SimCLR: contrastive, NT-Xent over both views.
    Simclr,
    /// BYOL: online network regresses an EMA target.
    Byol,
    /// SimSiam: like BYOL without the EMA (stop-gradient).
    Simsiam,
    /// MoCo v2: momentum key encoder and a queue of negatives.
    Moco,
    /// Barlow Twins: cross-correlation to the identity.
    Barlow,
    /// VICReg: variance, invariance, covariance.
    Vicreg,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Simclr => "simclr",
            Method::Byol => "byol",
            Method::Simsiam => "simsiam",
            Method::Moco => "moco",
            Method::Barlow => "barlow",
            Method::Vicreg => "vicreg",
        }
    }
}

/// The recipe: ours (tuned for 28-pixel images and a 10-minute budget on
/// 2 cores) or the PyTorch reference's (`torch_quality.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Recipe {
    /// Ours (see docs/ssl.md).
    Tuned,
    /// The reference runs' recipe, for like-for-like comparisons.
    Reference,
}

/// Pretrain resnet_tiny without labels, then probe its features with few labels.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// The method (examples/simclr.rs and byol.rs fix it).
    #[arg(long, value_enum)]
    method: Option<Method>,
    /// Recipe: tuned (default) or the PyTorch reference's.
    #[arg(long, value_enum, default_value_t = Recipe::Tuned)]
    recipe: Recipe,
    /// Full Fashion-MNIST directory (the four *-ubyte.gz files): pretrain on
    /// its 60,000 training images, evaluate on the 10,000 test images.
    /// Default: the embedded split (8,000 / 2,000).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Pretraining epochs (default: the recipe's).
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per batch (two views each; default: the recipe's).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Learning rate per 256 images (default: the recipe's).
    #[arg(long)]
    lr: Option<f64>,
    /// Contrastive temperature, SimCLR and MoCo (default: the recipe's).
    #[arg(long)]
    temperature: Option<f64>,
    /// Seed of initialisation, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the pretrained backbone is written.
    #[arg(long, default_value = "runs/ssl/backbone.safetensors")]
    out: PathBuf,
    /// kNN evaluation every this many epochs, and at epoch 0 (default or 0:
    /// once, after the last epoch).
    #[arg(long)]
    eval_every: Option<usize>,
    /// Continue from the latest checkpoint next to --out.
    #[arg(long)]
    resume: bool,
    /// Skip the probes (kNN only).
    #[arg(long)]
    no_probe: bool,
}

/// Runs the program with `fixed` as the method (or `--method`, default
/// SimCLR), printing any error with its message.
pub fn main_for(fixed: Option<Method>) -> std::process::ExitCode {
    aimass::device::tune_cpu_allocator();
    let args = Args::parse();
    match run(args, fixed) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Everything a run needs besides the trainer.
struct Setup {
    method: Method,
    recipe: Recipe,
    epochs: usize,
    batch_size: usize,
    steps_per_epoch: usize,
    train_eval: DataLoader,
    test_eval: DataLoader,
    train_labels: Vec<u32>,
    test_labels: Vec<u32>,
    device: Device,
}

fn run(args: Args, fixed: Option<Method>) -> Result<()> {
    let start = Instant::now();
    let method = match (fixed, args.method) {
        (Some(f), Some(m)) if f != m => {
            return Err(Error::config(
                "--method",
                m.name(),
                format!(
                    "this example is {}; run `--example ssl -- --method {}`",
                    f.name(),
                    m.name()
                ),
            ))
        }
        (Some(f), _) => f,
        (None, m) => m.unwrap_or(Method::Simclr),
    };
    let device = best_device()?;
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
    let (def_epochs, def_batch, def_lr, def_t) = defaults(method, args.recipe);
    let epochs = args.epochs.unwrap_or(def_epochs);
    let batch_size = args.batch_size.unwrap_or(def_batch);
    let lr = args.lr.unwrap_or(def_lr);
    let temperature = args.temperature.unwrap_or(def_t);

    // Pretraining sees images only: the loader's labels are never read.
    // Our SimCLR recipe jitters brightness and contrast at SimCLR's
    // strength (0.8, not the reference's 0.4).
    let views = if args.recipe == Recipe::Tuned && method == Method::Simclr {
        presets::fashion_mnist_simclr_views()?
    } else {
        presets::fashion_mnist_reference_views()?
    };
    let mut train = DataLoader::new(
        data.train.clone(),
        DataLoaderConfig::default()
            .with_batch_size(batch_size)
            .with_drop_last(true)
            .with_seed(args.seed + 2),
        &device,
    )?
    .with_views(views);
    let eval_loader = |ds: &InMemoryDataset| -> Result<DataLoader> {
        Ok(DataLoader::new(
            ds.clone(),
            DataLoaderConfig::default()
                .with_batch_size(500)
                .with_shuffle(false),
            &device,
        )?
        .with_transform(Normalize::new(&[FASHION_MNIST_MEAN], &[FASHION_MNIST_STD])?))
    };
    let setup = Setup {
        method,
        recipe: args.recipe,
        epochs,
        batch_size,
        steps_per_epoch: train.len(),
        train_eval: eval_loader(&data.train)?,
        test_eval: eval_loader(&data.test)?,
        train_labels: data.train.labels().to_vec(),
        test_labels: data.test.labels().to_vec(),
        device: device.clone(),
    };
    eprintln!(
        "{} ({:?} recipe): resnet_tiny, {epochs} epochs of {} steps, batch {batch_size} × 2 views, lr {lr} per 256",
        method.name(),
        args.recipe,
        setup.steps_per_epoch
    );
    let backbone = Backbone::resnet(ResNetConfig::resnet_tiny());
    let total = (epochs * setup.steps_per_epoch) as u64;
    let optim = optim_config(args.recipe, lr);
    let small = |hidden, out| {
        HeadConfig::simclr()
            .with_hidden_dim(hidden)
            .with_output_dim(out)
    };
    let seed = args.seed;
    let out = match method {
        Method::Simclr => {
            let cfg = match args.recipe {
                Recipe::Reference => SimClrConfig::default().with_projector(small(64, 32)),
                Recipe::Tuned => SimClrConfig::small_images(),
            };
            let cfg = cfg
                .with_temperature(temperature)
                .with_optim(optim)
                .with_seed(seed);
            pretrain(
                SimClr::new(backbone, cfg, &device)?,
                &mut train,
                &setup,
                &args,
            )?
        }
        Method::Byol => {
            let cfg = ByolConfig::default()
                .with_tau_base(0.99)
                .with_total_steps(total)
                .with_projector(small(128, 32))
                .with_predictor(small(128, 32))
                .with_optim(optim)
                .with_seed(seed);
            pretrain(
                Byol::new(backbone, cfg, &device)?,
                &mut train,
                &setup,
                &args,
            )?
        }
        Method::Simsiam => {
            let cfg = SimSiamConfig::default()
                .with_projector(
                    small(256, 256)
                        .with_num_layers(2)
                        .with_last_batch_norm(true),
                )
                .with_predictor(small(64, 256))
                .with_optim(optim)
                .with_seed(seed);
            pretrain(
                SimSiam::new(backbone, cfg, &device)?,
                &mut train,
                &setup,
                &args,
            )?
        }
        Method::Moco => {
            let cfg = MoCoConfig::default()
                .with_queue_size(4096)
                .with_momentum(0.99)
                .with_temperature(temperature)
                .with_projector(small(256, 64).with_batch_norm(false))
                .with_optim(optim)
                .with_seed(seed);
            pretrain(
                MoCo::new(backbone, cfg, &device)?,
                &mut train,
                &setup,
                &args,
            )?
        }
        Method::Barlow => {
            let cfg = BarlowTwinsConfig::default()
                .with_projector(small(512, 512).with_num_layers(3))
                .with_optim(optim)
                .with_seed(seed);
            pretrain(
                BarlowTwins::new(backbone, cfg, &device)?,
                &mut train,
                &setup,
                &args,
            )?
        }
        Method::Vicreg => {
            let cfg = VicRegConfig::default()
                .with_projector(small(512, 512).with_num_layers(3))
                .with_optim(optim)
                .with_seed(seed);
            pretrain(
                VicReg::new(backbone, cfg, &device)?,
                &mut train,
                &setup,
                &args,
            )?
        }
    };
    let train_secs = out.secs;
    // The same questions for raw pixels and for the untrained network.
    let probes = !args.no_probe;
    let t_probe = Instant::now();
    let raw_x =
        |l: &DataLoader| -> Result<Tensor> { Ok(extract(l, |x| Ok(x.flatten_from(1)?))?.0) };
    let (raw_tr, raw_te) = (raw_x(&setup.train_eval)?, raw_x(&setup.test_eval)?);
    let random = {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, DType::F32, &device);
        ResNet::new(ResNetConfig::resnet_tiny(), vb)?
    };
    let feats =
        |l: &DataLoader| -> Result<Tensor> { Ok(extract(l, |x| random.forward_t(x, false))?.0) };
    let (rnd_tr, rnd_te) = (feats(&setup.train_eval)?, feats(&setup.test_eval)?);
    let rows = [
        ("raw pixels", raw_tr, raw_te),
        ("random init", rnd_tr, rnd_te),
        ("pretrained", out.train_features, out.test_features),
    ];
    let mut reports = Vec::new();
    for (name, tr, te) in &rows {
        let r = if probes {
            eprintln!("probing {name} features ({} dims) ...", tr.dim(1)?);
            probe_features(
                tr,
                &setup.train_labels,
                te,
                &setup.test_labels,
                &ProbeConfig::default(),
            )?
        } else {
            knn_only(tr, te, &setup)?
        };
        reports.push((*name, r));
    }
    let probe_secs = t_probe.elapsed().as_secs_f64();
    print_table(&reports, probes);
    let get = |i: usize| &reports[i].1;
    let lin = |r: &ProbeReport, n: usize| r.at(n).map_or(f64::NAN, |f| 100.0 * f.linear.mean);
    let lin_std = |r: &ProbeReport, n: usize| r.at(n).map_or(f64::NAN, |f| 100.0 * f.linear.std);
    let (p, raw, rnd) = (get(2), get(0), get(1));
    println!(
        "RESULT method={} knn_acc={:.2} lin_all={:.2} lin_100={:.2} lin_100_std={:.2} lin_10={:.2} lin_10_std={:.2} \
         raw_knn_acc={:.2} raw_lin_all={:.2} raw_lin_100={:.2} raw_lin_10={:.2} raw_lin_10_std={:.2} \
         random_init_knn_acc={:.2} random_init_lin_10={:.2} epochs={} steps={} batch={} recipe={:?} data={} \
         train_secs={:.0} probe_secs={:.0} secs={:.0}",
        method.name(),
        100.0 * p.knn_all,
        100.0 * p.linear_all,
        lin(p, 100),
        lin_std(p, 100),
        lin(p, 10),
        lin_std(p, 10),
        100.0 * raw.knn_all,
        100.0 * raw.linear_all,
        lin(raw, 100),
        lin(raw, 10),
        lin_std(raw, 10),
        100.0 * rnd.knn_all,
        lin(rnd, 10),
        out.epochs,
        out.steps,
        setup.batch_size,
        setup.recipe,
        if args.data.is_some() { "full" } else { "embedded" },
        train_secs,
        probe_secs,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// (epochs, batch size, lr per 256, temperature) of a method's recipe.
fn defaults(method: Method, recipe: Recipe) -> (usize, usize, f64, f64) {
    match (recipe, method) {
        (Recipe::Reference, Method::Byol) => (14, 256, 0.3, 0.5),
        (Recipe::Reference, _) => (19, 256, 0.06, 0.5),
        // 16 epochs at batch 128, peak lr 0.6: under 10 minutes on 2 AVX2
        // cores on slow days too (20 and 24 epochs tie with it).
        (Recipe::Tuned, Method::Simclr) => (16, 128, 1.2, 0.2),
        (Recipe::Tuned, Method::Moco) => (30, 256, 0.06, 0.2),
        (Recipe::Tuned, Method::Byol) => (30, 256, 0.3, 0.5),
        (Recipe::Tuned, _) => (30, 256, 0.1, 0.5),
    }
}

/// Ours (`SslOptimConfig::small_images`: 2 epochs of warmup for the higher
/// learning rate) or the reference runs' (`torch_quality.py`: SGD with
/// momentum 0.9, weight decay 5e-4 on every parameter, no warmup), cosine
/// to 0. The reference is spelled out so that tuning ours never moves it.
fn optim_config(recipe: Recipe, lr: f64) -> SslOptimConfig {
    match recipe {
        Recipe::Tuned => SslOptimConfig::small_images().with_lr(lr),
        Recipe::Reference => SslOptimConfig::default()
            .with_optimizer(SslOptimizer::Sgd)
            .with_lr(lr)
            .with_momentum(0.9)
            .with_weight_decay(5e-4)
            .with_exclude_bias_and_norm(false)
            .with_warmup_epochs(0),
    }
}

/// What pretraining produced.
struct Pretrained {
    train_features: Tensor,
    test_features: Tensor,
    epochs: usize,
    steps: u64,
    secs: f64,
}

fn knn(tr: &Tensor, te: &Tensor, s: &Setup) -> Result<f64> {
    knn_accuracy(
        tr,
        &s.train_labels,
        te,
        &s.test_labels,
        &KnnConfig::default(),
    )
}

fn knn_only(tr: &Tensor, te: &Tensor, s: &Setup) -> Result<ProbeReport> {
    // Without the few-label probes: kNN and the linear probe on all labels.
    let cfg = ProbeConfig::default().with_labels_per_class(vec![]);
    probe_features(tr, &s.train_labels, te, &s.test_labels, &cfg)
}

/// Runs `trainer` under `Fit` with progress, checkpoints, a kNN curve and
/// the schedule, exports the backbone and returns its frozen features.
fn pretrain<T: SslTrainer>(
    mut trainer: T,
    train: &mut DataLoader,
    s: &Setup,
    args: &Args,
) -> Result<Pretrained> {
    let schedule = trainer
        .optim_config()
        .schedule(s.batch_size, s.steps_per_epoch, s.epochs)?;
    let dir = args
        .out
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let ckpt_dir = CheckpointDir::new(dir.join(format!("checkpoints-{}", s.method.name())), 2)?;
    let resume = if args.resume {
        let latest = ckpt_dir.latest()?.ok_or_else(|| {
            Error::invalid(
                "--resume",
                format!("no checkpoint in {}", ckpt_dir.dir().display()),
            )
        })?;
        eprintln!("resuming from {}", latest.display());
        Some(Checkpoint::load(&latest, &s.device)?)
    } else {
        None
    };
    // By default one kNN evaluation, after the last epoch (its features
    // serve the probes too); `--eval-every N` adds the curve from epoch 0.
    let eval_every = match args.eval_every {
        None | Some(0) => s.epochs,
        Some(n) => n,
    };
    let features =
        |t: &T, l: &DataLoader| -> Result<Tensor> { Ok(extract(l, |x| t.features(x))?.0) };
    let t0 = Instant::now();
    if args.eval_every.is_some_and(|n| n > 0) {
        let knn0 = knn(
            &features(&trainer, &s.train_eval)?,
            &features(&trainer, &s.test_eval)?,
            s,
        )?;
        eprintln!("epoch 0: knn_acc {:.2}%", 100.0 * knn0);
    }
    // The features of the last evaluation, with the epoch they belong to.
    let last: RefCell<Option<(usize, Tensor, Tensor)>> = RefCell::new(None);
    let config = FitConfig::default()
        .with_epochs(s.epochs)
        .with_eval_every(eval_every);
    let mut fit = Fit::new(&mut trainer, train, config)?
        .with_schedule(schedule)
        .with_evaluator(|t: &mut T, epoch| {
            let (tr, te) = (features(t, &s.train_eval)?, features(t, &s.test_eval)?);
            let acc = knn(&tr, &te, s)?;
            eprintln!(
                "epoch {epoch}: knn_acc {:.2}% ({:.0} s)",
                100.0 * acc,
                t0.elapsed().as_secs_f64()
            );
            *last.borrow_mut() = Some((epoch, tr, te));
            Ok(BTreeMap::from([("knn_acc".to_string(), acc)]))
        })
        .with_callback(Progress::new(ProgressMode::Auto, 10))
        .with_callback(PeriodicCheckpoint::new(ckpt_dir, 1)?);
    if let Some(c) = &resume {
        fit.resume(c)?;
    }
    let summary = fit.run()?;
    drop(fit);
    let secs = t0.elapsed().as_secs_f64();
    trainer.export_backbone(&args.out)?;
    eprintln!(
        "pretrained {} epochs ({} steps) in {secs:.0} s; backbone written to {}",
        summary.epochs,
        summary.steps,
        args.out.display()
    );
    let (train_features, test_features) = match last.into_inner() {
        Some((epoch, tr, te)) if epoch == summary.epochs => (tr, te),
        _ => (
            features(&trainer, &s.train_eval)?,
            features(&trainer, &s.test_eval)?,
        ),
    };
    Ok(Pretrained {
        train_features,
        test_features,
        epochs: summary.epochs,
        steps: summary.steps,
        secs,
    })
}

fn print_table(reports: &[(&str, ProbeReport)], probes: bool) {
    let pm = |f: Option<&aimass::ssl::FewLabelResult>, knn: bool| match f {
        Some(f) => {
            let s = if knn { &f.knn } else { &f.linear };
            format!("{:6.2} ± {:4.2}", 100.0 * s.mean, 100.0 * s.std)
        }
        None => "      –      ".to_string(),
    };
    eprintln!();
    eprintln!("held-out accuracy (%) of frozen features; ± is the spread over 5 label subsets");
    eprintln!(
        "{:<12} | {:>7} | {:>7} | {:>13} | {:>13} | {:>13} | {:>13}",
        "features",
        "kNN all",
        "lin all",
        "lin 100/class",
        "lin 10/class",
        "kNN 100/class",
        "kNN 10/class"
    );
    for (name, r) in reports {
        eprintln!(
            "{:<12} | {:>7.2} | {:>7} | {} | {} | {} | {}",
            name,
            100.0 * r.knn_all,
            if probes {
                format!("{:.2}", 100.0 * r.linear_all)
            } else {
                "–".into()
            },
            pm(r.at(100), false),
            pm(r.at(10), false),
            pm(r.at(100), true),
            pm(r.at(10), true)
        );
    }
    eprintln!();
}
