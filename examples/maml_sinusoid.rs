//! MAML on the sinusoid regression tasks of Finn et al. (2017), §5.1, with
//! the protocol of the PyTorch reference (`torch_quality.py maml_sinusoid`,
//! see `docs/benchmarks.md`): second-order MAML, first-order MAML and the
//! "pretrained on all tasks" baseline, then the MSE on 600 new tasks after
//! 0, 1 and 10 SGD steps from K = 10 and K = 5 support points.
//!
//! ```text
//! cargo run --release --example maml_sinusoid                       # 70,000 iterations each
//! cargo run --release --example maml_sinusoid -- --iterations 5000  # a quick look
//! cargo run --release --example maml_sinusoid -- --per-task         # tasks one at a time (slower)
//! ```
//!
//! MLP 1-40-40-1 with ReLU, K = 10 support and 10 query points per task,
//! one inner SGD step with α = 0.01, meta-batch 25, Adam 1e-3. The
//! meta-batch runs as one batched pass on per-task weights
//! (`MamlConfig::batch_tasks`), as the reference does.
//!
//! Ends with one line `RESULT method=maml_sinusoid mse_k10_step1=…
//! mse_k10_step10=… … iterations=… secs=…` (keys without a prefix are
//! second-order MAML's; `fomaml_` first order, `pretrained_` the baseline).

use std::time::Instant;

use aimass::meta::{
    mean_ci95, Evaluation, Maml, MamlConfig, Sinusoid, SinusoidConfig, Task, TaskBatches,
    TaskBatchesConfig, TaskLoss, TaskSampler,
};
use aimass::nn::{init::seeded_var_builder, Mlp, MlpConfig, Model};
use aimass::optim::{Adam, AdamConfig};
use aimass::prelude::*;
use aimass::train::{BatchSource, Progress, ProgressMode};
use clap::Parser;

/// MAML on sinusoids: second order, first order and the pretrained baseline.
#[derive(Parser)]
struct Args {
    /// Meta-training iterations of each method (Finn et al.: 70,000).
    #[arg(long, default_value_t = 70_000)]
    iterations: u64,
    /// Seed of the initialisation (the tasks use seed + 1).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tasks of the final evaluation.
    #[arg(long, default_value_t = 600)]
    eval_tasks: u64,
    /// Run the meta-batch's tasks one at a time instead of batched.
    #[arg(long)]
    per_task: bool,
    /// Skip second-order MAML.
    #[arg(long)]
    skip_second_order: bool,
    /// Skip first-order MAML.
    #[arg(long)]
    skip_first_order: bool,
    /// Skip the pretrained baseline.
    #[arg(long)]
    skip_pretrained: bool,
    /// Save the trained weights here (`maml.safetensors`,
    /// `fomaml.safetensors`, `pretrained.safetensors`).
    #[arg(long)]
    save_dir: Option<std::path::PathBuf>,
}

/// Saves `model` as `name.safetensors` under `--save-dir`, if given.
fn save(args: &Args, model: &Model<Mlp>, name: &str) -> Result<()> {
    if let Some(dir) = &args.save_dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        model.save(dir.join(format!("{name}.safetensors")))?;
    }
    Ok(())
}

const META_BATCH: usize = 25;
const K: usize = 10;
const INNER_LR: f64 = 0.01;
const META_LR: f64 = 1e-3;

/// The trainer of this program: the MLP, rebuilt by `build`, meta-optimized by Adam.
type SineMaml = Maml<Mlp, fn(VarBuilder) -> Result<Mlp>, Adam>;

fn build(vb: VarBuilder) -> Result<Mlp> {
    Mlp::new(MlpConfig::new([1, 40, 40, 1]), vb)
}

fn new_model(seed: u64, dev: &Device) -> Result<Model<Mlp>> {
    let varmap = VarMap::new();
    let mlp = build(seeded_var_builder(&varmap, seed, DType::F32, dev))?;
    Ok(Model::new(mlp, varmap))
}

fn maml_config(args: &Args, first_order: bool) -> MamlConfig {
    MamlConfig::default()
        .with_loss(TaskLoss::Mse)
        .with_inner_lr(INNER_LR)
        .with_first_order(first_order)
        .with_batch_tasks(!args.per_task)
}

/// The meta-training tasks: K support and K query points, meta-batches of 25.
fn training_tasks(args: &Args, dev: &Device) -> Result<TaskBatches<Sinusoid>> {
    let tasks = Sinusoid::new(SinusoidConfig::default().with_seed(args.seed + 1), dev)?;
    TaskBatches::new(
        tasks,
        TaskBatchesConfig::default()
            .with_meta_batch(META_BATCH)
            .with_batches_per_epoch(1000),
    )
}

/// MAML (second or first order) for `args.iterations`; returns the trainer
/// and the training seconds.
fn train_maml(args: &Args, first_order: bool, dev: &Device) -> Result<(SineMaml, f64)> {
    let model = new_model(args.seed, dev)?;
    let opt = Adam::from_varmap(model.varmap(), AdamConfig::default().with_lr(META_LR))?;
    let build_fn: fn(VarBuilder) -> Result<Mlp> = build;
    let mut maml = Maml::new(model, build_fn, opt, maml_config(args, first_order))?;
    let mut batches = training_tasks(args, dev)?;
    let per_epoch = batches.batches_per_epoch() as u64;
    let cfg = FitConfig::default()
        .with_epochs(args.iterations.div_ceil(per_epoch) as usize)
        .with_max_steps(args.iterations);
    let start = Instant::now();
    Fit::new(&mut maml, &mut batches, cfg)?
        .with_callback(Progress::new(ProgressMode::Auto, 5000))
        .run()?;
    Ok((maml, start.elapsed().as_secs_f64()))
}

/// The baseline: the same MLP trained by plain regression on every task's
/// 20 points, 25 fresh tasks per step, for as many steps.
fn train_pretrained(args: &Args, dev: &Device) -> Result<(Model<Mlp>, f64)> {
    let model = new_model(args.seed, dev)?;
    let mut opt = Adam::from_varmap(model.varmap(), AdamConfig::default().with_lr(META_LR))?;
    let mut batches = training_tasks(args, dev)?;
    let start = Instant::now();
    for it in 1..=args.iterations {
        let task = batches.next_batch()?.stack()?;
        let x = Tensor::cat(&[&task.support, &task.query], 1)?;
        let y = Tensor::cat(&[&task.support_targets, &task.query_targets], 1)?;
        let loss = TaskLoss::Mse.loss(
            &model.forward_t(&x.reshape(((), 1))?, true)?,
            &y.reshape(((), 1))?,
        )?;
        opt.step(&loss.backward()?)?;
        if it % 10_000 == 0 {
            eprintln!(
                "pretrained: step {it}/{} loss {:.4} ({:.0} s)",
                args.iterations,
                loss.to_scalar::<f32>()?,
                start.elapsed().as_secs_f64()
            );
        }
    }
    Ok((model, start.elapsed().as_secs_f64()))
}

/// The evaluation tasks of the reference: seed 1000, 10 support and 100
/// query points each.
fn evaluation_tasks(args: &Args, dev: &Device) -> Result<Vec<Task>> {
    let family = Sinusoid::new(
        SinusoidConfig::default()
            .with_seed(1000)
            .with_k_support(K)
            .with_k_query(100),
        dev,
    )?;
    (0..args.eval_tasks).map(|i| family.task(i)).collect()
}

/// MSE after 0, 1 and 10 steps for K = 10 and K = 5 (the first 5 points).
fn evaluate(maml: &SineMaml, tasks: &[Task]) -> Result<Vec<(usize, Evaluation)>> {
    let mut out = Vec::new();
    for k in [10, 5] {
        let tasks_k: Vec<Task> = tasks
            .iter()
            .map(|t| t.with_support_size(k))
            .collect::<Result<_>>()?;
        out.push((k, maml.evaluate(&tasks_k, &[0, 1, 10])?));
    }
    Ok(out)
}

/// `prefix`mse_kK_stepS (+ _ci95) keys, and a readable table row.
fn report(
    name: &str,
    prefix: &str,
    evals: &[(usize, Evaluation)],
    keys: &mut Vec<String>,
) -> Result<()> {
    let mut row = String::new();
    for (k, e) in evals {
        for s in [0, 1, 10] {
            let (m, ci) = e.mean_loss(s)?;
            keys.push(format!("{prefix}mse_k{k}_step{s}={m:.4}"));
            keys.push(format!("{prefix}mse_k{k}_step{s}_ci95={ci:.4}"));
            row.push_str(&format!(" k{k}/step{s} {m:.3}±{ci:.3}"));
            // Plain SGD at α = 0.01 can diverge on a task whose loss is
            // too sharp at the initialisation: say so instead of leaving
            // an unexplained `inf`.
            let finite: Vec<f64> = e
                .losses(s)?
                .iter()
                .copied()
                .filter(|v| v.is_finite())
                .collect();
            let diverged = e.num_tasks() - finite.len();
            if diverged > 0 {
                let (fm, fci) = mean_ci95(&finite);
                eprintln!(
                    "{name}: k{k}/step{s}: {diverged} of {} tasks diverged (non-finite loss); the others {fm:.3}±{fci:.3}",
                    e.num_tasks()
                );
                keys.push(format!("{prefix}mse_k{k}_step{s}_diverged={diverged}"));
            }
        }
    }
    eprintln!("{name}:{row}");
    Ok(())
}

fn run(args: Args) -> Result<()> {
    // Exact second-order MAML differentiates through the inner step: turn
    // second-order gradients on before any backward pass.
    aimass::autograd::enable_second_order()?;
    aimass::device::tune_cpu_allocator();
    let threads = aimass::device::fix_cpu_thread_count();
    let dev = best_device()?;
    eprintln!(
        "device: {} ({threads} threads); {} iterations per method, meta-batch {META_BATCH}, {}",
        aimass::device::device_name(&dev),
        args.iterations,
        if args.per_task {
            "tasks one at a time"
        } else {
            "tasks batched"
        }
    );
    let start = Instant::now();
    let eval_tasks = evaluation_tasks(&args, &dev)?;
    let mut keys = Vec::new();
    let iters = args.iterations.max(1) as f64;

    if !args.skip_second_order {
        let (maml, secs) = train_maml(&args, false, &dev)?;
        save(&args, maml.model(), "maml")?;
        eprintln!(
            "MAML (second order): {secs:.1} s, {:.3} ms/iteration",
            secs / iters * 1e3
        );
        report("MAML", "", &evaluate(&maml, &eval_tasks)?, &mut keys)?;
        keys.push(format!("ms_per_it={:.3}", secs / iters * 1e3));
    }

    if !args.skip_first_order {
        let (fomaml, secs) = train_maml(&args, true, &dev)?;
        save(&args, fomaml.model(), "fomaml")?;
        eprintln!(
            "first-order MAML: {secs:.1} s, {:.3} ms/iteration",
            secs / iters * 1e3
        );
        report(
            "first-order MAML",
            "fomaml_",
            &evaluate(&fomaml, &eval_tasks)?,
            &mut keys,
        )?;
        keys.push(format!("fomaml_ms_per_it={:.3}", secs / iters * 1e3));
    }
    if !args.skip_pretrained {
        let (model, secs) = train_pretrained(&args, &dev)?;
        save(&args, &model, "pretrained")?;
        eprintln!("pretrained: {secs:.1} s, {:.3} ms/step", secs / iters * 1e3);
        // Evaluated exactly as MAML: plain SGD steps from its weights.
        let opt = Adam::from_varmap(model.varmap(), AdamConfig::default())?;
        let build_fn: fn(VarBuilder) -> Result<Mlp> = build;
        let as_maml = Maml::new(model, build_fn, opt, maml_config(&args, true))?;
        report(
            "pretrained",
            "pretrained_",
            &evaluate(&as_maml, &eval_tasks)?,
            &mut keys,
        )?;
        keys.push(format!("pretrained_ms_per_step={:.3}", secs / iters * 1e3));
    }
    println!(
        "RESULT method=maml_sinusoid {} iterations={} secs={:.1}",
        keys.join(" "),
        args.iterations,
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
