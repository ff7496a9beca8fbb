//! AdamW step over 10 M parameters (10 tensors of 1000×1000, f32): aimass
//! (fused CPU path and candle-op path) beside candle-nn's AdamW and, when
//! python3 with torch is available, torch.optim.AdamW(foreach=True) from
//! `benches/peers/torch_peer.py --only adamw_10m` (same workload).
//!
//! Run: `cargo bench --bench adamw` (env `AIMASS_BENCH_ITERS`, default 10;
//! `AIMASS_TORCH_PEER` overrides the peer script's path).

use std::time::Instant;

use aimass::candle::{backprop::GradStore, Device, Tensor, Var};
use aimass::optim::{AdamW, AdamWConfig, Optimizer as _, ParamGroup};

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn time(iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..2 {
        f();
    }
    let xs = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    median(xs)
}

fn setup(dev: &Device) -> (Vec<Var>, GradStore) {
    let vars: Vec<Var> = (0..10)
        .map(|_| Var::from_tensor(&Tensor::randn(0f32, 1.0, (1000, 1000), dev).unwrap()).unwrap())
        .collect();
    // Gradients: d/dv sum(v * g) = g, with g ~ N(0, 1) like the peer's randn_like.
    let mut loss = Tensor::new(0f32, dev).unwrap();
    for v in &vars {
        let g = Tensor::randn(0f32, 1.0, (1000, 1000), dev).unwrap();
        loss = (loss + (v.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    (vars, grads)
}

fn torch_peer() -> Option<f64> {
    let path = std::env::var("AIMASS_TORCH_PEER").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peers/torch_peer.py").to_string()
    });
    if !std::path::Path::new(&path).exists() {
        println!("torch peer: {path} not found, skipped");
        return None;
    }
    let out = std::process::Command::new("python3")
        .args([path.as_str(), "--only", "adamw_10m", "--threads", "2"])
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout);
    let line = s.lines().find(|l| l.contains("\"adamw_10m\""))?;
    let ms = line
        .split("\"ms\":")
        .nth(1)?
        .split(',')
        .next()?
        .trim()
        .parse::<f64>()
        .ok()?;
    Some(ms)
}

fn main() {
    let iters = std::env::var("AIMASS_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let dev = Device::Cpu;
    let threads = rayon::current_num_threads();
    println!("AdamW step, 10 x (1000x1000) f32, median of {iters} after 2 warm-up, {threads} rayon threads");

    let (vars, grads) = setup(&dev);
    let named = |vars: &[Var]| {
        vec![ParamGroup::new(
            vars.iter()
                .enumerate()
                .map(|(i, v)| (format!("p{i}"), v.clone()))
                .collect(),
        )]
    };
    let cfg = AdamWConfig::default().with_lr(1e-3);
    let mut fused = AdamW::new(named(&vars), cfg.clone()).unwrap();
    let ours = time(iters, || fused.step(&grads).unwrap());
    println!("aimass AdamW (fused CPU):   {ours:8.2} ms");
    let mut ops = AdamW::new(named(&vars), cfg.with_fused(false)).unwrap();
    let ours_ops = time(iters, || ops.step(&grads).unwrap());
    println!("aimass AdamW (candle ops):  {ours_ops:8.2} ms");
    let mut cnn = <aimass::candle_nn::AdamW as aimass::candle_nn::Optimizer>::new(
        vars.clone(),
        aimass::candle_nn::ParamsAdamW {
            lr: 1e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let candle = time(iters, || {
        aimass::candle_nn::Optimizer::step(&mut cnn, &grads).unwrap()
    });
    println!(
        "candle-nn AdamW:            {candle:8.2} ms   (aimass fused is {:.2}x faster)",
        candle / ours
    );
    match torch_peer() {
        Some(t) => println!(
            "torch AdamW(foreach=True):  {t:8.2} ms   (aimass fused / torch = {:.2})",
            ours / t
        ),
        None => println!("torch peer: unavailable (python3 with torch needed)"),
    }
}
