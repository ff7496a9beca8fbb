//! Few-shot classification on Fashion-MNIST: meta-train on classes 0–4 of
//! the first 8,000 images, meta-test 5-way on classes 5–9 of the last 2,000
//! (1-shot and 5-shot, 15 queries per class, 600 test episodes each,
//! accuracy ± 95 % CI), for
//!
//! * ProtoNet with a conv-4 embedding trained from scratch (the protocol of
//!   `torch_quality.py protonet`, see `docs/benchmarks.md`),
//! * first-order MAML on a conv-4 with a 5-way head (`--maml-second-order`
//!   for exact MAML),
//! * the floor: raw-pixel nearest centroid on the same episodes,
//! * a `resnet_tiny` encoder pretrained by SimCLR (`aimass::ssl`) on all
//!   8,000 training images without their labels (`--ssl-epochs`, default
//!   10; or `--ssl-encoder FILE`, a backbone written by `examples/ssl.rs
//!   --out`), as the ProtoNet embedding: frozen, and fine-tuned by episodes.
//!
//! ```text
//! cargo run --release --example few_shot
//! cargo run --release --example few_shot -- --ssl-encoder runs/ssl/backbone.safetensors
//! cargo run --release --example few_shot -- --ssl-epochs 0          # skip the SSL rows (nan)
//! cargo run --release --example few_shot -- --protonet-episodes 100 --maml-iterations 50   # quick look
//! ```
//!
//! Ends with one line `RESULT method=few_shot protonet_5w1s=… protonet_5w5s=…
//! ssl_protonet_5w1s=… ssl_protonet_5w5s=… centroid_5w1s=… centroid_5w5s=…
//! … secs=…` (accuracies in percent; `_ci95` keys are the interval's
//! half-widths).

use std::path::{Path, PathBuf};
use std::time::Instant;

use aimass::data::augment::{presets, Normalize};
use aimass::data::{
    embedded_fashion_mnist, DataLoader, DataLoaderConfig, EpisodeConfig, EpisodeSampler,
    InMemoryDataset, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
};
use aimass::meta::{
    mean_ci95, nearest_prototype_accuracy, Distance, Maml, MamlConfig, ProtoNet, ProtoNetConfig,
    Task, TaskBatches, TaskBatchesConfig, TaskSampler,
};
use aimass::nn::params::load_with;
use aimass::nn::{
    init::seeded_var_builder, params::LoadConfig, seq, Activation, BatchNorm, BatchNormConfig,
    Conv2d, Conv2dConfig, Flatten, ForwardMode, Linear, MaxPool2d, Model, ResNet, ResNetConfig,
    SequentialT,
};
use aimass::optim::{Adam, AdamConfig};
use aimass::prelude::*;
use aimass::ssl::{Backbone, SimClr, SimClrConfig, SslTrainer};
use aimass::train::{BatchSource, Progress, ProgressMode};
use clap::Parser;

/// Few-shot Fashion-MNIST: ProtoNet, first-order MAML, raw-pixel floor, SSL encoder.
#[derive(Parser)]
struct Args {
    /// ProtoNet training episodes (5-way 5-shot 15 queries; the PyTorch
    /// reference ran 3,176 in its 4 minutes).
    #[arg(long, default_value_t = 3176)]
    protonet_episodes: u64,
    /// First-order MAML meta-iterations (meta-batch 4).
    #[arg(long, default_value_t = 300)]
    maml_iterations: u64,
    /// Exact second-order MAML instead of first order (slower, more memory).
    #[arg(long)]
    maml_second_order: bool,
    /// Test episodes per shot count.
    #[arg(long, default_value_t = 600)]
    test_episodes: u64,
    /// A resnet_tiny backbone (safetensors) used as the ProtoNet embedding,
    /// instead of pretraining one here.
    #[arg(long)]
    ssl_encoder: Option<PathBuf>,
    /// SimCLR pretraining epochs of the encoder on the 8,000 training
    /// images without labels (when no --ssl-encoder; 0: skip, the ssl_*
    /// keys are nan).
    #[arg(long, default_value_t = 10)]
    ssl_epochs: usize,
    /// Where the pretrained encoder is written.
    #[arg(long, default_value = "runs/few_shot/ssl_backbone.safetensors")]
    ssl_out: PathBuf,
    /// A prefix of the tensor names in --ssl-encoder to strip (e.g. "backbone.").
    #[arg(long, default_value = "")]
    ssl_prefix: String,
    /// Fine-tuning episodes of the SSL encoder (ProtoNet, Adam 1e-4).
    #[arg(long, default_value_t = 500)]
    ssl_episodes: u64,
    /// Seed of initialisation and training episodes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

const WAYS: usize = 5;
const QUERIES: usize = 15;
const TRAIN_CLASSES: [u32; 5] = [0, 1, 2, 3, 4];
const TEST_CLASSES: [u32; 5] = [5, 6, 7, 8, 9];

/// conv-4: 4 × [conv 3×3 64 (pad 1, bias), BatchNorm, ReLU, max-pool 2],
/// 28 → 14 → 7 → 3 → 1, flattened to 64. Names follow torch's Sequential
/// (`0.weight`, `1.running_mean`, `4.weight`, ...).
fn conv4(vb: VarBuilder) -> Result<SequentialT> {
    let mut net = seq();
    let mut cin = 1;
    for b in 0..4 {
        let conv_cfg = Conv2dConfig::default().with_padding(1);
        net = net
            .add(Conv2d::new(
                cin,
                64,
                3,
                conv_cfg,
                vb.pp((4 * b).to_string()),
            )?)
            .add(BatchNorm::new(
                64,
                BatchNormConfig::default(),
                vb.pp((4 * b + 1).to_string()),
            )?)
            .add(Activation::Relu)
            .add(MaxPool2d::new(2, 2, 0)?);
        cin = 64;
    }
    Ok(net.add(Flatten))
}

/// conv-4 (`body.*`) and a 5-way linear head (`head.*`), for MAML.
fn conv4_classifier(vb: VarBuilder) -> Result<SequentialT> {
    Ok(seq()
        .add(conv4(vb.pp("body"))?)
        .add(Linear::new(64, WAYS, true, vb.pp("head"))?))
}

fn normalize() -> Result<Normalize> {
    Normalize::new(&[FASHION_MNIST_MEAN], &[FASHION_MNIST_STD])
}

fn sampler(
    data: &InMemoryDataset,
    classes: &[u32],
    shots: usize,
    seed: u64,
) -> Result<EpisodeSampler> {
    let cfg = EpisodeConfig::default()
        .with_n_way(WAYS)
        .with_k_shot(shots)
        .with_q_query(QUERIES)
        .with_seed(seed);
    Ok(EpisodeSampler::new(data.clone(), classes, cfg, &Device::Cpu)?.with_transform(normalize()?))
}

/// Training episodes: 5-way 5-shot 15 queries from classes 0–4.
fn training_tasks(
    data: &InMemoryDataset,
    seed: u64,
    meta_batch: usize,
) -> Result<TaskBatches<EpisodeSampler>> {
    TaskBatches::new(
        sampler(data, &TRAIN_CLASSES, 5, seed)?,
        TaskBatchesConfig::default()
            .with_meta_batch(meta_batch)
            .with_batches_per_epoch(100),
    )
}

fn fit_config(steps: u64, per_epoch: usize) -> FitConfig {
    FitConfig::default()
        .with_epochs(steps.div_ceil(per_epoch as u64).max(1) as usize)
        .with_max_steps(steps)
}

/// `name_5w{1,5}s` accuracy keys (percent) with their `_ci95` half-widths.
fn report(keys: &mut Vec<String>, name: &str, shots: usize, accs: Option<&[f64]>) {
    let (m, ci) = accs.map_or((f64::NAN, f64::NAN), |a| {
        let pct: Vec<f64> = a.iter().map(|v| 100.0 * v).collect();
        mean_ci95(&pct)
    });
    if m.is_finite() {
        eprintln!("  {name} 5-way {shots}-shot: {m:.2} ± {ci:.2} %");
    }
    let fmt = |v: f64| {
        if v.is_finite() {
            format!("{v:.2}")
        } else {
            "nan".to_string()
        }
    };
    keys.push(format!("{name}_5w{shots}s={}", fmt(m)));
    keys.push(format!("{name}_5w{shots}s_ci95={}", fmt(ci)));
}

/// Milliseconds per step, `nan` without steps.
fn per_step_ms(secs: f64, steps: u64) -> String {
    if steps == 0 {
        "nan".to_string()
    } else {
        format!("{:.1}", secs * 1e3 / steps as f64)
    }
}

/// Reports nearest-prototype accuracy in the space of `embed` on the test episodes.
fn report_embedding(
    keys: &mut Vec<String>,
    name: &str,
    test: &[(usize, Vec<Task>)],
    embed: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<()> {
    for (shots, tasks) in test {
        let accs = tasks
            .iter()
            .map(|t| nearest_prototype_accuracy(&embed, t, Distance::SquaredEuclidean))
            .collect::<Result<Vec<_>>>()?;
        report(keys, name, *shots, Some(&accs));
    }
    Ok(())
}

/// Reports a trained ProtoNet on the test episodes (eval mode).
fn report_protonet<M: ModuleT>(
    keys: &mut Vec<String>,
    name: &str,
    test: &[(usize, Vec<Task>)],
    protonet: &ProtoNet<M, Adam>,
) -> Result<()> {
    for (shots, tasks) in test {
        report(keys, name, *shots, Some(&protonet.evaluate(tasks)?));
    }
    Ok(())
}

/// A ProtoNet trainer on `model`, trained for `episodes` episodes.
fn train_protonet<M: ModuleT>(
    model: Model<M>,
    lr: f64,
    episodes: u64,
    data: &InMemoryDataset,
    seed: u64,
) -> Result<ProtoNet<M, Adam>> {
    let opt = Adam::from_varmap(model.varmap(), AdamConfig::default().with_lr(lr))?;
    let mut protonet = ProtoNet::new(model, opt, ProtoNetConfig::default())?;
    let mut tasks = training_tasks(data, seed, 1)?;
    let cfg = fit_config(episodes, tasks.batches_per_epoch());
    if episodes > 0 {
        Fit::new(&mut protonet, &mut tasks, cfg)?
            .with_callback(Progress::new(ProgressMode::Auto, 500))
            .run()?;
    }
    Ok(protonet)
}

/// Pretrains resnet_tiny with SimCLR on `images` without their labels
/// (the recipe of `examples/ssl.rs`: temperature 0.2, head 64→256→128, SGD
/// 0.3 × B/256 with 2 warmup epochs and cosine, batch 256 × 2 views) and
/// writes the backbone to `out`.
fn pretrain_simclr(
    images: &InMemoryDataset,
    epochs: usize,
    seed: u64,
    out: &Path,
    dev: &Device,
) -> Result<()> {
    let batch = 256;
    let mut loader = DataLoader::new(
        images.clone(),
        DataLoaderConfig::default()
            .with_batch_size(batch)
            .with_drop_last(true)
            .with_seed(seed + 5),
        dev,
    )?
    .with_views(presets::fashion_mnist_reference_views()?);
    // The SimCLR example's recipe for small images (docs/ssl.md).
    let cfg = SimClrConfig::small_images().with_seed(seed + 4);
    let mut simclr = SimClr::new(Backbone::resnet(ResNetConfig::resnet_tiny()), cfg, dev)?;
    let schedule = simclr
        .optim_config()
        .schedule(batch, loader.len(), epochs)?;
    eprintln!(
        "SimCLR pretraining of the encoder: {epochs} epochs of {} steps on {} images without labels",
        loader.len(),
        images.len()
    );
    Fit::new(
        &mut simclr,
        &mut loader,
        FitConfig::default().with_epochs(epochs),
    )?
    .with_schedule(schedule)
    .with_callback(Progress::new(ProgressMode::Auto, 10))
    .run()?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    simclr.export_backbone(out)
}

/// A resnet_tiny with the weights of `path` (every variable must be there).
fn load_encoder(path: &PathBuf, prefix: &str, seed: u64, dev: &Device) -> Result<Model<ResNet>> {
    let varmap = VarMap::new();
    let net = ResNet::new(
        ResNetConfig::resnet_tiny(),
        seeded_var_builder(&varmap, seed, DType::F32, dev),
    )?;
    let mut cfg = LoadConfig::non_strict();
    if !prefix.is_empty() {
        cfg = cfg.with_renamed_prefix(prefix, "");
    }
    let report = load_with(&varmap, path, &cfg)?;
    if !report.missing_keys.is_empty() {
        return Err(Error::invalid(
            "--ssl-encoder",
            format!(
                "{} is not a resnet_tiny backbone: {} of its variables are missing (e.g. `{}`); pass --ssl-prefix if its names carry a prefix",
                path.display(),
                report.missing_keys.len(),
                report.missing_keys[0]
            ),
        ));
    }
    if !report.unexpected_keys.is_empty() {
        eprintln!(
            "ssl encoder: {} tensors of the file are not part of the backbone and were ignored (e.g. `{}`)",
            report.unexpected_keys.len(),
            report.unexpected_keys[0]
        );
    }
    Ok(Model::new(net, varmap))
}

fn run(args: Args) -> Result<()> {
    if args.maml_second_order {
        // Before any backward pass of this thread.
        aimass::autograd::enable_second_order()?;
    }
    aimass::device::tune_cpu_allocator();
    let threads = aimass::device::fix_cpu_thread_count();
    let dev = Device::Cpu;
    let start = Instant::now();
    let data = embedded_fashion_mnist()?;
    eprintln!(
        "data: {} ({} meta-train images, classes 0-4; {} meta-test images, classes 5-9); {threads} threads",
        data.source,
        data.train.len(),
        data.test.len()
    );
    // The test episodes of the reference: seeds 2000 (1-shot) and 2001 (5-shot).
    let mut test: Vec<(usize, Vec<Task>)> = Vec::new();
    for (shots, seed) in [(1, 2000), (5, 2001)] {
        let s = sampler(&data.test, &TEST_CLASSES, shots, seed)?;
        test.push((
            shots,
            (0..args.test_episodes)
                .map(|i| s.task(i))
                .collect::<Result<_>>()?,
        ));
    }
    let mut keys = Vec::new();

    eprintln!("raw-pixel nearest centroid (the floor)");
    report_embedding(&mut keys, "centroid", &test, |x| Ok(x.clone()))?;

    eprintln!(
        "ProtoNet, conv-4 from scratch: {} episodes, Adam 1e-3",
        args.protonet_episodes
    );
    let t = Instant::now();
    let varmap = VarMap::new();
    let net = conv4(seeded_var_builder(&varmap, args.seed, DType::F32, &dev))?;
    let protonet = train_protonet(
        Model::new(net, varmap),
        1e-3,
        args.protonet_episodes,
        &data.train,
        args.seed + 1,
    )?;
    let secs = t.elapsed().as_secs_f64();
    keys.push(format!("protonet_train_secs={secs:.1}"));
    keys.push(format!(
        "protonet_episode_ms={}",
        per_step_ms(secs, args.protonet_episodes)
    ));
    report_protonet(&mut keys, "protonet", &test, &protonet)?;

    eprintln!(
        "{} MAML, conv-4 + 5-way head: {} iterations of 4 tasks, 1 inner step (α 0.4), 3 at test",
        if args.maml_second_order {
            "second-order"
        } else {
            "first-order"
        },
        args.maml_iterations
    );

    let t = Instant::now();
    let varmap = VarMap::new();
    let net = conv4_classifier(seeded_var_builder(&varmap, args.seed, DType::F32, &dev))?;
    let model = Model::new(net, varmap);
    let opt = Adam::from_varmap(model.varmap(), AdamConfig::default().with_lr(1e-3))?;
    let cfg = MamlConfig::default()
        .with_first_order(true)
        .with_inner_lr(0.4);
    let build: fn(VarBuilder) -> Result<SequentialT> = conv4_classifier;
    let mut maml = Maml::new(model, build, opt, cfg)?;
    let mut tasks = training_tasks(&data.train, args.seed + 2, 4)?;
    if args.maml_iterations > 0 {
        let cfg = fit_config(args.maml_iterations, tasks.batches_per_epoch());
        Fit::new(&mut maml, &mut tasks, cfg)?
            .with_callback(Progress::new(ProgressMode::Auto, 100))
            .run()?;
    }
    let secs = t.elapsed().as_secs_f64();
    keys.push(format!("maml_train_secs={secs:.1}"));
    keys.push(format!(
        "maml_iteration_ms={}",
        per_step_ms(secs, args.maml_iterations)
    ));
    for (shots, tasks) in &test {
        let eval = maml.evaluate(tasks, &[3])?;
        report(&mut keys, "maml", *shots, Some(eval.accuracies(3)?));
    }

    let ssl_encoder = match &args.ssl_encoder {
        Some(path) => Some(path.clone()),
        None if args.ssl_epochs > 0 => {
            let t = Instant::now();
            pretrain_simclr(&data.train, args.ssl_epochs, args.seed, &args.ssl_out, &dev)?;
            keys.push(format!(
                "ssl_pretrain_secs={:.1}",
                t.elapsed().as_secs_f64()
            ));
            Some(args.ssl_out.clone())
        }
        None => None,
    };
    match &ssl_encoder {
        None => {
            eprintln!("--ssl-epochs 0 and no --ssl-encoder: the ssl_* keys are nan");
            for name in ["ssl_protonet", "ssl_finetuned_protonet"] {
                for shots in [1, 5] {
                    report(&mut keys, name, shots, None);
                }
            }
        }
        Some(path) => {
            eprintln!(
                "self-supervised encoder {} as the ProtoNet embedding",
                path.display()
            );
            let frozen =
                load_encoder(path, &args.ssl_prefix, args.seed, &dev)?.freeze(ForwardMode::Eval);
            report_embedding(&mut keys, "ssl_protonet", &test, |x| frozen.forward(x))?;
            eprintln!(
                "fine-tuned by {} ProtoNet episodes (Adam 1e-4)",
                args.ssl_episodes
            );
            let encoder = load_encoder(path, &args.ssl_prefix, args.seed, &dev)?;
            let tuned =
                train_protonet(encoder, 1e-4, args.ssl_episodes, &data.train, args.seed + 3)?;
            report_protonet(&mut keys, "ssl_finetuned_protonet", &test, &tuned)?;
        }
    }
    println!(
        "RESULT method=few_shot {} protonet_episodes={} maml_iterations={} test_episodes={} secs={:.1}",
        keys.join(" "),
        args.protonet_episodes,
        args.maml_iterations,
        args.test_episodes,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
