//! Data-parallel supervised training on Fashion-MNIST: the supervised
//! example's models, one rank per process.
//!
//! ```text
//! cargo run --release --example data_parallel                       # one process (no MPI needed)
//! cargo build --release --features mpi --example data_parallel
//! mpirun -np 2 -x RAYON_NUM_THREADS=1 target/release/examples/data_parallel   # 2 ranks, 1 thread each
//! mpirun -np 2 cargo run --release --features mpi --example data_parallel -- --sync-bn --model resnet_tiny
//! mpirun -np 4 --hostfile hosts target/release/examples/data_parallel --local-sgd 8   # see docs/distributed.md
//! ```
//!
//! The global batch (`--batch-size`, default 128) is split over the ranks,
//! so any number of ranks trains the one-process recipe on the same
//! batches (the same weights with `--sync-bn` or the ConvNet, which has no
//! BatchNorm). Rank 0 shows progress, evaluates, writes the metrics log
//! and checkpoints; `--resume` continues every rank from rank 0's newest
//! checkpoint.
//!
//! Ends (on rank 0) with one line `RESULT method=data_parallel model=...
//! world_size=... global_batch=... samples_per_sec=... allreduce_ms_per_step=...`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use aimass::data::augment::{presets, Normalize};
use aimass::data::{
    embedded_fashion_mnist, fashion_mnist, DataLoader, DataLoaderConfig, Shard, FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
};
use aimass::distributed::{
    abort_on_failure, broadcast_checkpoint, from_env, CommConfig, Communicator, DataParallel,
    DataParallelConfig, DistributedOptimizer, DistributedOptimizerConfig, RankZero, SyncMode,
};
use aimass::nn::{
    init::seeded_var_builder, seq, ConvNet, ConvNetConfig, ResNet, ResNetConfig, SequentialT,
};
use aimass::optim::groups::varmap_single_group;
use aimass::optim::{Adam, AdamConfig, ConstantLr, CosineAnnealingLr, Optimizer, Sgd, SgdConfig};
use aimass::prelude::*;
use aimass::train::{
    evaluate_accuracy, CheckpointDir, Classifier, ClassifierConfig, MetricsLog, PeriodicCheckpoint,
    Progress, ProgressMode,
};
use clap::Parser;

/// Data-parallel training of the supervised example's models.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// convnet (Adam, no augmentation) or resnet_tiny (SGD + cosine, augmented).
    #[arg(long, default_value = "convnet")]
    model: String,
    /// Directory of the full Fashion-MNIST (default: the embedded split).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Epochs.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Global batch, split over the ranks.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Learning rate (default: the recipe's, 1e-3 Adam / 0.1 SGD).
    #[arg(long)]
    lr: Option<f64>,
    /// Seed of initialisation and data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop after this many steps.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Synchronised BatchNorm (statistics of the global batch).
    #[arg(long)]
    sync_bn: bool,
    /// Local SGD: average the weights every H steps instead of the gradients every step.
    #[arg(long, value_name = "H")]
    local_sgd: Option<u64>,
    /// Seconds a collective waits for the other ranks.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// Output directory (rank 0): metrics log and checkpoints.
    #[arg(long, default_value = "runs/data_parallel")]
    out: PathBuf,
    /// Continue from rank 0's newest valid checkpoint.
    #[arg(long)]
    resume: bool,
    /// Skip the test-set evaluation (throughput runs).
    #[arg(long)]
    no_eval: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let comm = match from_env(CommConfig::default().with_timeout_secs(args.timeout)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match run(&args, comm.clone()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error on rank {}: {e}", comm.rank());
            // Stop the other ranks now rather than at their timeout.
            abort_on_failure(comm.as_ref(), 1);
            std::process::ExitCode::FAILURE
        }
    }
}

type Clf = Classifier<SequentialT, DistributedOptimizer<Box<dyn Optimizer>>>;

fn run(args: &Args, comm: Arc<dyn Communicator>) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let device = best_device()?;
    aimass::device::tune_cpu_allocator();
    let start = Instant::now();
    let say = |msg: String| {
        if rank == 0 {
            eprintln!("{msg}");
        }
    };
    if !args.batch_size.is_multiple_of(world) {
        return Err(Error::config(
            "--batch-size",
            args.batch_size,
            format!("the global batch must split evenly over the {world} ranks"),
        ));
    }
    let data = match &args.data {
        Some(dir) => fashion_mnist(Some(dir))?,
        None => embedded_fashion_mnist()?,
    };
    say(format!(
        "{} rank(s) ({}), data: {} ({} train, {} test), device: {}, {} thread(s) per rank",
        world,
        comm.backend(),
        data.source,
        data.train.len(),
        data.test.len(),
        aimass::device::device_name(&device),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into()),
    ));

    let is_convnet = args.model == "convnet";
    // Each rank its part of every global batch of the one-process recipe.
    let loader_cfg = DataLoaderConfig::default()
        .with_batch_size(args.batch_size / world)
        .with_drop_last(true)
        .with_seed(args.seed + 2)
        .with_shard(Shard::new(rank, world)?);
    let mut train = DataLoader::new(data.train.clone(), loader_cfg, &device)?;
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

    // Every rank builds the model; the DistributedOptimizer gives them
    // rank 0's weights.
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, args.seed, DType::F32, &device);
    let model: SequentialT = match args.model.as_str() {
        "convnet" => seq().add(ConvNet::new(ConvNetConfig::default(), vb)?),
        "resnet_tiny" => seq().add(ResNet::new(
            ResNetConfig::resnet_tiny().with_num_classes(Some(10)),
            vb,
        )?),
        other => {
            return Err(Error::config(
                "--model",
                other,
                "expected convnet or resnet_tiny",
            ))
        }
    };
    let num_params = aimass::nn::params::num_params(&varmap)?;
    let steps = (args.epochs * train.len()) as u64;
    let (inner, lr): (Box<dyn Optimizer>, f64) = if is_convnet {
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
        let cfg = SgdConfig::default()
            .with_lr(lr)
            .with_momentum(0.9)
            .with_weight_decay(5e-4);
        (Box::new(Sgd::new(varmap_single_group(&varmap)?, cfg)?), lr)
    };
    let sync = match args.local_sgd {
        Some(h) => SyncMode::local_sgd(h),
        None => SyncMode::Gradients,
    };
    let dcfg = DistributedOptimizerConfig::default()
        .with_sync(sync)
        .with_broadcast_buffers(!args.sync_bn);
    let opt = DistributedOptimizer::new(inner, &varmap, comm.clone(), dcfg)?;
    let clf = Classifier::new(model, varmap, opt, ClassifierConfig::default())?;
    let mut trainer = DataParallel::new(
        clf,
        comm.clone(),
        DataParallelConfig::default().with_sync_batch_norm(args.sync_bn),
    )?;
    say(format!(
        "model: {} ({num_params} parameters, {:.2} MB of f32 gradients per step), {} epoch(s) of {} steps, global batch {} = {} × {world}",
        args.model,
        num_params as f64 * 4.0 / 1e6,
        args.epochs,
        train.len(),
        args.batch_size,
        args.batch_size / world
    ));

    // Rank 0 writes; every rank resumes from what rank 0 read.
    let ckpt_dir = CheckpointDir::new(args.out.join("checkpoints"), 2)?;
    let found = if args.resume && rank == 0 {
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
    let resume_from = broadcast_checkpoint(comm.as_ref(), found, &device)?;
    if args.resume && resume_from.is_none() {
        return Err(Error::invalid("--resume", "rank 0 found no checkpoint"));
    }

    let evaluate = !args.no_eval;
    let config = FitConfig::default()
        .with_epochs(args.epochs)
        .with_max_steps(args.max_steps);
    let mut fit = Fit::new(&mut trainer, &mut train, config)?
        .with_evaluator(move |t: &mut DataParallel<Clf>, _| {
            // Rank 0 evaluates; the others wait at the next step.
            let mut m = BTreeMap::new();
            if rank == 0 && evaluate {
                m.insert(
                    "test_acc".to_string(),
                    evaluate_accuracy(t.trainer().model(), &test)?,
                );
            }
            Ok(m)
        })
        .with_callback(RankZero::new(
            Progress::new(ProgressMode::Auto, 20),
            comm.as_ref(),
        )?)
        .with_callback(RankZero::new(
            PeriodicCheckpoint::new(ckpt_dir, 1)?,
            comm.as_ref(),
        )?);
    if rank == 0 {
        std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
        fit = fit.with_callback(MetricsLog::new(args.out.join("metrics.jsonl"), 10)?);
    }
    fit = if is_convnet {
        fit.with_schedule(ConstantLr::new(lr)?)
    } else {
        fit.with_schedule(CosineAnnealingLr::new(lr, steps, 0.0)?)
    };
    if let Some(c) = &resume_from {
        fit.resume(c)?;
    }
    let train_start = Instant::now();
    let summary = fit.run()?;
    drop(fit);
    let train_secs = train_start.elapsed().as_secs_f64();
    let stats = trainer.trainer().optimizer().stats();
    let per_step = stats.steps.max(1) as f64;
    if rank == 0 {
        let test_acc = summary.metrics.get("test_acc").copied().unwrap_or(f64::NAN);
        eprintln!("checkpoints and metrics in {}", args.out.display());
        println!(
            "RESULT method=data_parallel model={} backend={} world_size={world} global_batch={} per_rank_batch={} sync={} sync_bn={} steps={} samples_per_sec={:.1} allreduce_ms_per_step={:.2} comm_mb_per_step={:.3} test_acc={:.4} secs={:.0}",
            args.model,
            comm.backend(),
            args.batch_size,
            args.batch_size / world,
            match args.local_sgd {
                Some(h) => format!("local_sgd_h{h}"),
                None => "gradients".into(),
            },
            args.sync_bn,
            summary.steps,
            (stats.steps as f64 * args.batch_size as f64) / train_secs,
            stats.time.as_secs_f64() * 1e3 / per_step,
            stats.bytes as f64 / per_step / (1024.0 * 1024.0),
            test_acc,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
