//! Distillation with few labels: a ResNet teacher taught to small students
//! on Fashion-MNIST, with 10, 50 or all labels per class. The protocol of
//! `benches/peers/torch_quality.py distill_transfer` (see `docs/benchmarks.md`).
//!
//! ```text
//! cargo run --release --example distill                                  # train the teacher, then 36 student runs
//! cargo run --release --example distill -- --save-teacher teacher.safetensors
//! cargo run --release --example distill -- --teacher teacher.safetensors # a saved or PyTorch-trained teacher
//! cargo run --release --example distill -- --students convnet            # feature distillation (hints, attention)
//! cargo run --release --example distill -- --steps 100 --seeds 0        # a quick look
//! ```
//!
//! The teacher is resnet_tiny with a 10-class head, trained as
//! `examples/supervised.rs` does (SGD, cosine, pad-crop-flip, 15 epochs) or
//! loaded with `--teacher FILE` (safetensors with torchvision names; see
//! `docs/distillation.md` for converting a PyTorch `state_dict`). Its logits
//! (and, for feature terms, its stage outputs) are computed once on the
//! un-augmented 8,000 training images (a cached teacher).
//!
//! Students (`--students mlp`, the default): MLP 784-128-10 and 784-32-10 on
//! normalised pixels, Adam 1e-3, batch 128, 1,240 steps; seeds 0, 1, 2 draw
//! the initialisation, the shuffling and the labelled subset.
//! - scratch: cross-entropy on the labelled images only (batch
//!   min(128, labelled));
//! - KD: all 8,000 images, `0.9·T²·KL` (T = 4) on every image plus
//!   `0.1·CE` on the labelled images of the batch.
//!
//! `--students convnet`: the ConvNet (conv32-conv64-fc128) from scratch,
//! with KD, with KD plus attention transfer (conv1 ↔ layer2, conv2 ↔
//! layer3), and with KD plus a FitNets hint (conv2 → layer3, 1×1 adapter).
//!
//! Prints the table teacher / scratch / KD (mean ± std over the seeds, in
//! percent) and the inference throughput (images/s, batch 256, eval mode),
//! then one line `RESULT method=distill teacher_acc=… <student>_n<labels>_<method>=… …
//! teacher_img_s=… <student>_img_s=… secs=…` (accuracies in percent, as
//! `torch_quality.py` reports them).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use aimass::data::augment::{presets, Normalize};
use aimass::data::{
    embedded_fashion_mnist, fashion_mnist, DataLoader, DataLoaderConfig, InMemoryDataset,
    FASHION_MNIST_MEAN, FASHION_MNIST_STD,
};
use aimass::distill::{
    DistillLoss, DistillLossConfig, Distiller, DistillerConfig, FeatureTerm, TeacherCache,
    TeacherMode, TransferSet, TransferSetConfig,
};
use aimass::nn::params::LoadConfig;
use aimass::nn::{
    init::seeded_var_builder, ConvNet, ConvNetConfig, FeatureExtractor, ForwardMode, FrozenModel,
    Mlp, MlpConfig, Model, ResNet, ResNetConfig,
};
use aimass::optim::groups::varmap_single_group;
use aimass::optim::{Adam, AdamConfig, ConstantLr, CosineAnnealingLr, Sgd, SgdConfig};
use aimass::prelude::*;
use aimass::train::{
    evaluate_accuracy, Classifier, ClassifierConfig, Fit, FitConfig, Progress, ProgressMode,
};
use clap::{Parser, ValueEnum};

/// Distil a resnet_tiny teacher into small students with few labels.
#[derive(Parser, Debug)]
#[command(name = "distill")]
struct Args {
    /// Load the teacher (resnet_tiny + 10-class `fc`, torchvision names,
    /// safetensors) instead of training it.
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Save the trained (or loaded) teacher here.
    #[arg(long)]
    save_teacher: Option<PathBuf>,
    /// Epochs of teacher training.
    #[arg(long, default_value_t = 15)]
    teacher_epochs: usize,
    /// Which students: the two MLPs (scratch, KD) or the ConvNet (scratch,
    /// KD, KD + attention transfer, KD + hints).
    #[arg(long, value_enum, default_value_t = Students::Mlp)]
    students: Students,
    /// Optimiser steps of every student run.
    #[arg(long, default_value_t = 1240)]
    steps: u64,
    /// Student seeds (initialisation, shuffling, labelled subset).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    seeds: Vec<u64>,
    /// Labelled images per class (`all`: every training image).
    #[arg(long, value_delimiter = ',', default_value = "10,50,all")]
    labels: Vec<String>,
    /// Methods to run (default: scratch,kd for the MLPs; scratch,kd,kd_at,kd_hint for the ConvNet).
    #[arg(long, value_enum, value_delimiter = ',')]
    methods: Vec<Method>,
    /// Run the teacher on every batch instead of caching its outputs (same
    /// result without augmentation, slower).
    #[arg(long)]
    online_teacher: bool,
    /// Weight of each attention-transfer term (`--students convnet`).
    #[arg(long, default_value_t = 1000.0)]
    at_weight: f64,
    /// Weight of the hint term (`--students convnet`).
    #[arg(long, default_value_t = 100.0)]
    hint_weight: f64,
    /// Fashion-MNIST directory (the full 60k/10k); default the embedded split.
    #[arg(long)]
    data: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Students {
    Mlp,
    Convnet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Student {
    Mlp(usize),
    ConvNet,
}

impl Student {
    fn name(&self) -> String {
        match self {
            Student::Mlp(h) => format!("mlp{h}"),
            Student::ConvNet => "convnet".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Method {
    Scratch,
    Kd,
    #[value(name = "kd_at")]
    KdAt,
    #[value(name = "kd_hint")]
    KdHint,
}

impl Method {
    fn name(&self) -> &'static str {
        match self {
            Method::Scratch => "scratch",
            Method::Kd => "kd",
            Method::KdAt => "kd_at",
            Method::KdHint => "kd_hint",
        }
    }

    fn recipe(&self, args: &Args) -> DistillLossConfig {
        let base = DistillLossConfig::default(); // KD, T = 4, α = 0.9, CE 0.1 on labelled images
        match self {
            Method::KdAt => base.with_features(vec![
                FeatureTerm::attention("conv1", "layer2").with_weight(args.at_weight),
                FeatureTerm::attention("conv2", "layer3").with_weight(args.at_weight),
            ]),
            Method::KdHint => base.with_features(vec![
                FeatureTerm::hint("conv2", "layer3").with_weight(args.hint_weight)
            ]),
            _ => base,
        }
    }
}

/// What every student run shares.
struct Setup {
    device: Device,
    train: InMemoryDataset,
    test: DataLoader,
    normalize: Normalize,
    teacher: FrozenModel<ResNet>,
    steps: u64,
    teacher_mode: TeacherMode,
    caches: RefCell<HashMap<Vec<String>, TeacherCache>>,
}

/// The labelled subset of the training images for a budget and a seed.
fn transfer_set(
    s: &Setup,
    budget: Option<usize>,
    seed: u64,
) -> Result<TransferSet<InMemoryDataset>> {
    TransferSet::new(
        s.train.clone(),
        TransferSetConfig::default()
            .with_labels_per_class(budget)
            .with_seed(seed),
    )
}

/// A shuffled, normalised loader without augmentation.
fn loader(
    s: &Setup,
    data: impl Dataset + 'static,
    batch: usize,
    shuffle: bool,
    seed: u64,
) -> Result<DataLoader> {
    let cfg = DataLoaderConfig::default()
        .with_batch_size(batch)
        .with_drop_last(shuffle)
        .with_shuffle(shuffle)
        .with_seed(seed);
    Ok(DataLoader::new(data, cfg, &s.device)?.with_transform(s.normalize.clone()))
}

/// `steps` steps over epochs of `per_epoch` batches (the last one cut short).
fn fit_config(steps: u64, per_epoch: usize) -> FitConfig {
    FitConfig::default()
        .with_epochs(steps.div_ceil(per_epoch as u64) as usize)
        .with_max_steps(steps)
}

/// One student run; returns the held-out accuracy in percent.
fn run<S>(
    s: &Setup,
    build: &dyn Fn(VarBuilder<'static>) -> Result<S>,
    method: Method,
    args: &Args,
    budget: Option<usize>,
    seed: u64,
) -> Result<(f64, usize)>
where
    S: ModuleT + FeatureExtractor + 'static,
{
    let set = transfer_set(s, budget, seed)?;
    let labelled = set.num_labelled();
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, seed, DType::F32, &s.device);
    let net = build(vb.clone())?;
    let adam = AdamConfig::default().with_lr(1e-3);
    if method == Method::Scratch {
        // Cross-entropy on the labelled images only.
        let data = s.train.subset(&set.labelled_indices())?;
        let batch = 128.min(data.len());
        let mut train = loader(s, data, batch, true, seed + 2)?;
        let opt = Adam::from_varmap(&varmap, adam)?;
        let mut clf = Classifier::new(net, varmap, opt, ClassifierConfig::default())?;
        let per_epoch = train.len();
        Fit::new(&mut clf, &mut train, fit_config(s.steps, per_epoch))?.run()?;
        return Ok((100.0 * evaluate_accuracy(clf.model(), &s.test)?, labelled));
    }
    // KD on all images; the CE sees the labelled ones.
    let student = Model::new(net, varmap.clone());
    let mut train = loader(s, set, 128, true, seed + 2)?;
    let sample = train.batch_at(0, 0)?.images()?.clone();
    let loss = DistillLoss::new(
        &s.teacher,
        &student,
        &sample,
        method.recipe(args),
        vb.pp("adapters"),
    )?;
    let opt = Adam::from_varmap(&varmap, adam)?;
    let cfg = DistillerConfig::default().with_teacher_mode(s.teacher_mode);
    let mut distiller = Distiller::new(
        s.teacher.clone(),
        student,
        loss,
        opt,
        ConstantLr::new(1e-3)?,
        cfg,
    )?;
    if s.teacher_mode == TeacherMode::Cached {
        // The teacher runs once over the un-augmented images; later runs
        // reading the same stages share its outputs.
        let stages = distiller.loss().teacher_stages().to_vec();
        let mut caches = s.caches.borrow_mut();
        match caches.get(&stages) {
            Some(cache) => distiller.set_teacher_cache(cache.clone())?,
            None => {
                let plain = loader(s, s.train.clone(), 500, false, 0)?;
                distiller.precompute_teacher(&plain)?;
                if let Some(cache) = distiller.teacher_cache() {
                    caches.insert(stages, cache.clone());
                }
            }
        }
    }
    let per_epoch = train.len();
    Fit::new(&mut distiller, &mut train, fit_config(s.steps, per_epoch))?.run()?;
    Ok((
        100.0 * evaluate_accuracy(distiller.student(), &s.test)?,
        labelled,
    ))
}

fn mlp(h: usize) -> impl Fn(VarBuilder<'static>) -> Result<Mlp> {
    move |vb| Mlp::new(MlpConfig::new([784, h, 10]), vb)
}

fn convnet(vb: VarBuilder<'static>) -> Result<ConvNet> {
    ConvNet::new(ConvNetConfig::default(), vb)
}

/// Images per second of `f` on `x`: 3 warm-up calls, then the median of 20.
fn images_per_sec(f: impl Fn(&Tensor) -> Result<Tensor>, x: &Tensor) -> Result<f64> {
    for _ in 0..3 {
        f(x)?;
    }
    let mut times = Vec::with_capacity(20);
    for _ in 0..20 {
        let t = Instant::now();
        f(x)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(x.dim(0)? as f64 / times[times.len() / 2])
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    (
        m,
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt(),
    )
}

/// The teacher: loaded from `--teacher`, or trained as `examples/supervised.rs` does.
fn teacher(
    args: &Args,
    data: &InMemoryDataset,
    device: &Device,
) -> Result<(FrozenModel<ResNet>, f64)> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 0, DType::F32, device);
    let net = ResNet::new(ResNetConfig::resnet_tiny().with_num_classes(Some(10)), vb)?;
    if let Some(path) = &args.teacher {
        let t = Model::new(net, varmap).freeze(ForwardMode::Eval);
        t.load(path, &LoadConfig::default())?; // strict: every name and shape
        eprintln!("teacher loaded from {}", path.display());
        return Ok((t, 0.0));
    }
    let start = Instant::now();
    let cfg = DataLoaderConfig::default()
        .with_batch_size(128)
        .with_drop_last(true);
    let mut train = DataLoader::new(data.clone(), cfg, device)?
        .with_transform(presets::fashion_mnist_supervised_reference()?);
    let steps = (args.teacher_epochs * train.len()) as u64;
    // The reference recipe: SGD lr 0.1, momentum 0.9, weight decay 5e-4 on every parameter, cosine to 0.
    let sgd = SgdConfig::default()
        .with_lr(0.1)
        .with_momentum(0.9)
        .with_weight_decay(5e-4);
    let opt = Sgd::new(varmap_single_group(&varmap)?, sgd)?;
    let mut clf = Classifier::new(net, varmap, opt, ClassifierConfig::default())?;
    eprintln!(
        "training the teacher: resnet_tiny, {} epochs of {} steps",
        args.teacher_epochs,
        train.len()
    );
    Fit::new(
        &mut clf,
        &mut train,
        FitConfig::default().with_epochs(args.teacher_epochs),
    )?
    .with_schedule(CosineAnnealingLr::new(0.1, steps, 0.0)?)
    .with_callback(Progress::new(ProgressMode::Auto, 31))
    .run()?;
    let t = Model::new(clf.model().clone(), clf.varmap().clone()).freeze(ForwardMode::Eval);
    Ok((t, start.elapsed().as_secs_f64()))
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let args = Args::parse();
    let start = Instant::now();
    aimass::device::tune_cpu_allocator();
    let device = best_device()?;
    let data = match &args.data {
        Some(dir) => fashion_mnist(Some(dir))?,
        None => embedded_fashion_mnist()?,
    };
    eprintln!(
        "data: {} ({} train, {} test); device: {}",
        data.source,
        data.train.len(),
        data.test.len(),
        aimass::device::device_name(&device)
    );
    let budgets = args
        .labels
        .iter()
        .map(|b| match b.as_str() {
            "all" => Ok(None),
            n => n.parse::<usize>().map(Some).map_err(|_| {
                Error::config("--labels", n, "a number of labels per class, or `all`")
            }),
        })
        .collect::<Result<Vec<_>>>()?;
    let normalize = Normalize::new(&[FASHION_MNIST_MEAN], &[FASHION_MNIST_STD])?;
    let test = DataLoader::new(
        data.test.clone(),
        DataLoaderConfig::default()
            .with_batch_size(500)
            .with_shuffle(false),
        &device,
    )?
    .with_transform(normalize.clone());

    let (teacher, teacher_secs) = teacher(&args, &data.train, &device)?;
    if let Some(path) = &args.save_teacher {
        teacher.save(path)?;
        eprintln!("teacher saved to {}", path.display());
    }
    let teacher_acc = 100.0 * evaluate_accuracy(&teacher, &test)?;
    eprintln!(
        "teacher: resnet_tiny, {teacher_acc:.2} % held-out ({} parameters)",
        teacher.num_params()?
    );

    let setup = Setup {
        device: device.clone(),
        train: data.train.clone(),
        test,
        normalize,
        teacher,
        steps: args.steps,
        teacher_mode: if args.online_teacher {
            TeacherMode::Online
        } else {
            TeacherMode::Cached
        },
        caches: RefCell::new(HashMap::new()),
    };
    let (students, mut methods) = match args.students {
        Students::Mlp => (
            vec![Student::Mlp(128), Student::Mlp(32)],
            vec![Method::Scratch, Method::Kd],
        ),
        Students::Convnet => (
            vec![Student::ConvNet],
            vec![Method::Scratch, Method::Kd, Method::KdAt, Method::KdHint],
        ),
    };
    if !args.methods.is_empty() {
        methods = args.methods.clone();
    }

    // (student, labels per class, the accuracies of each method over the seeds)
    let mut rows: Vec<(String, String, Vec<Vec<f64>>)> = Vec::new();
    let mut keys: Vec<(String, String)> = vec![("teacher_acc".into(), format!("{teacher_acc:.4}"))];
    for student in &students {
        for budget in &budgets {
            let label = budget.map_or("all".to_string(), |n| n.to_string());
            let mut per_method = Vec::new();
            for &method in &methods {
                let mut accs = Vec::new();
                for &seed in &args.seeds {
                    let t0 = Instant::now();
                    let (acc, labelled) = match student {
                        Student::Mlp(h) => run(&setup, &mlp(*h), method, &args, *budget, seed)?,
                        Student::ConvNet => run(&setup, &convnet, method, &args, *budget, seed)?,
                    };
                    eprintln!("{} n={label} {} seed {seed}: {acc:.2} % ({labelled} labelled, {} steps, {:.1} s)", student.name(), method.name(), args.steps, t0.elapsed().as_secs_f64());
                    accs.push(acc);
                }
                let (m, sd) = mean_std(&accs);
                let key = format!("{}_n{label}_{}", student.name(), method.name());
                keys.push((key.clone(), format!("{m:.4}")));
                keys.push((format!("{key}_std"), format!("{sd:.4}")));
                per_method.push(accs);
            }
            rows.push((student.name(), label, per_method));
        }
    }

    // Throughput: batch 256 of held-out images, eval mode.
    let x = setup.test.batch_at(0, 0)?.images()?.narrow(0, 0, 256)?;
    let mut tput = vec![(
        "teacher".to_string(),
        images_per_sec(|x| setup.teacher.forward(x), &x)?,
    )];
    for student in &students {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &device);
        let ips = match student {
            Student::Mlp(h) => {
                let m = mlp(*h)(vb)?;
                images_per_sec(|x| m.forward_t(x, false), &x)?
            }
            Student::ConvNet => {
                let m = convnet(vb)?;
                images_per_sec(|x| m.forward_t(x, false), &x)?
            }
        };
        tput.push((student.name(), ips));
    }

    println!();
    println!("teacher resnet_tiny: {teacher_acc:.2} % (held-out accuracy, percent; mean ± std over seeds {:?})", args.seeds);
    let mut header: Vec<String> = methods
        .iter()
        .map(|m| format!("{:>15}", m.name()))
        .collect();
    if methods.contains(&Method::Scratch) && methods.contains(&Method::Kd) {
        header.push(format!("{:>15}", "kd − scratch"));
    }
    println!("{:<8} {:>7}  {}", "student", "labels", header.join(" "));
    for (student, label, per_method) in &rows {
        let cells: Vec<String> = per_method
            .iter()
            .map(|accs| {
                let (m, sd) = mean_std(accs);
                format!("{:>15}", format!("{m:.2} ± {sd:.2}"))
            })
            .collect();
        // KD's gain over scratch, in points.
        let of = |m: Method| {
            methods
                .iter()
                .position(|&x| x == m)
                .map(|i| mean_std(&per_method[i]).0)
        };
        let gain = match (of(Method::Scratch), of(Method::Kd)) {
            (Some(a), Some(b)) => format!("{:>+15.2}", b - a),
            _ => String::new(),
        };
        println!("{student:<8} {label:>7}  {} {gain}", cells.join(" "));
    }
    println!(
        "inference (images/s, batch 256): {}",
        tput.iter()
            .map(|(n, v)| format!("{n} {v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (n, v) in &tput {
        keys.push((format!("{n}_img_s"), format!("{v:.0}")));
    }
    keys.push(("teacher_secs".into(), format!("{teacher_secs:.0}")));
    keys.push((
        "secs".into(),
        format!("{:.0}", start.elapsed().as_secs_f64()),
    ));
    println!(
        "RESULT method=distill {}",
        keys.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}
