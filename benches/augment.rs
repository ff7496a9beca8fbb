//! Speed of the SimCLR two-view augmentation on 28×28 grayscale batches of
//! 256, beside the PyTorch peer (`torch_peer.py --only augment_two_views`).
//!
//! Run: `cargo bench --bench augment` (`RAYON_NUM_THREADS=1` compares one
//! thread each; the peer gets the same thread count as our rayon pool). Prints views/s (2 × 256 per
//! iteration, as the peer counts them) for ours and, when `python3` with
//! torch and the peer script exist, for torch and the ratio.
//! `AIMASS_BENCH_ITERS` sets the timed iterations (default 50).

use std::time::Instant;

use aimass::data::augment::{presets, ImageBatch, MultiView};

fn median_ms(mut f: impl FnMut(), iters: usize) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut xs: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn bench(name: &str, views: &MultiView, pixels: &[u8], bs: usize, iters: usize) -> f64 {
    let mut seed = 0u64;
    let ms = median_ms(
        || {
            // u8 -> [0, 1] floats is part of the workload, as in the peer.
            let batch = ImageBatch::from_u8(pixels, (bs, 1, 28, 28)).unwrap();
            let out = views.apply(&batch, seed, None).unwrap();
            assert_eq!(out.len(), 2);
            seed += 1;
        },
        iters,
    );
    let per_s = (2 * bs) as f64 / ms * 1e3;
    println!("aimass {name}: {ms:.3} ms per batch of {bs} (2 views), {per_s:.0} views/s");
    per_s
}

fn main() {
    let bs = 256;
    let iters: usize = std::env::var("AIMASS_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let mut state = 0x1234_5678u32;
    let pixels: Vec<u8> = (0..bs * 784)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect();
    // The peer runs with as many threads as our rayon pool (RAYON_NUM_THREADS).
    let threads = rayon::current_num_threads();
    println!("threads (ours and torch's): {threads}");
    let ours = bench(
        "reference two views (crop 0.3-1, flip, brightness/contrast p0.8)",
        &presets::fashion_mnist_reference_views().unwrap(),
        &pixels,
        bs,
        iters,
    );
    bench(
        "SimCLR preset two views (crop 0.08-1, flip, jitter, grayscale)",
        &presets::simclr_views(&Default::default()).unwrap(),
        &pixels,
        bs,
        iters,
    );
    bench(
        "BYOL preset two views (with 3x3 blur, solarize)",
        &presets::byol_views(&Default::default()).unwrap(),
        &pixels,
        bs,
        iters,
    );

    let peer = [concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/peers/torch_peer.py"
    )]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists());
    let Some(peer) = peer else {
        println!("torch peer script not found; skipping the comparison");
        return;
    };
    let out = std::process::Command::new("python3")
        .args([
            peer,
            "--only",
            "augment_two_views",
            "--threads",
            &threads.to_string(),
            "--iters",
            &iters.to_string(),
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let s = String::from_utf8_lossy(&o.stdout);
            let line = s
                .lines()
                .find(|l| l.contains("augment_two_views"))
                .unwrap_or("");
            println!("torch: {line}");
            let ips = line
                .split("\"items_per_s\":")
                .nth(1)
                .and_then(|r| r.split([',', '}']).next())
                .and_then(|v| v.trim().parse::<f64>().ok());
            if let Some(t) = ips {
                println!(
                    "RESULT aimass_views_per_s={ours:.0} torch_views_per_s={t:.0} ratio={:.2}",
                    ours / t
                );
            }
        }
        _ => println!("python3 with torch not available; skipping the comparison"),
    }
}
