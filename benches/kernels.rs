//! Benchmarks of the CPU kernels against plain candle and PyTorch.
//!
//! Run: `cargo bench --bench kernels` (optionally `-- NAME` to run one
//! workload). Prints one line per workload with the median time; when
//! `python3` with torch is installed, also runs the same workload of
//! `../shared/bench/torch_peer.py` (or `$AIMASS_TORCH_PEER`) and prints the
//! ratio, so both come from one run on one machine.

use std::time::Instant;

use aimass::candle::{DType, Device, Tensor, Var};
use aimass::ops::kernels;

fn median_ms(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    f();
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

fn randn(dims: &[usize], seed: u64) -> Tensor {
    use rand::Rng;
    let mut r = aimass::device::rng(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.random::<f32>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// Median ms of a torch_peer.py workload, when python3 + torch are present.
fn torch_ms(name: &str) -> Option<f64> {
    let script = std::env::var("AIMASS_TORCH_PEER")
        .unwrap_or_else(|_| "../shared/bench/torch_peer.py".to_string());
    let script = if std::path::Path::new(&script).exists() {
        script
    } else {
        "/work/shared/bench/torch_peer.py".to_string()
    };
    let out = std::process::Command::new("python3")
        .args([script.as_str(), "--only", name, "--threads"])
        .arg(rayon::current_num_threads().to_string())
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout);
    let line = s.lines().find(|l| l.contains("\"ms\""))?;
    let rest = &line[line.find("\"ms\":")? + 5..];
    rest.split([',', '}']).next()?.trim().parse().ok()
}

fn gemm_peak() -> f64 {
    let n = 1024;
    let a = vec![1.0f32; n * n];
    let b = vec![1.0f32; n * n];
    let mut c = vec![0.0f32; n * n];
    let th = rayon::current_num_threads();
    let ms = median_ms(5, || unsafe {
        gemm::gemm(
            n,
            n,
            n,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            n as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            if th > 1 {
                gemm::Parallelism::Rayon(th)
            } else {
                gemm::Parallelism::None
            },
        )
    });
    2.0 * (n * n * n) as f64 / ms / 1e6
}

fn report(name: &str, ours: f64, candle: Option<f64>, gflop: f64, peak: f64, torch: Option<&str>) {
    let mut line = format!(
        "{name:<28} aimass {ours:8.2} ms  {:6.1} GFLOP/s ({:4.1}% of peak)",
        gflop / ours * 1e3,
        100.0 * gflop / ours * 1e3 / peak
    );
    if let Some(c) = candle {
        line += &format!("  | candle {c:8.2} ms (candle/aimass {:5.2}x)", c / ours);
    }
    if let Some(t) = torch.and_then(torch_ms) {
        line += &format!("  | torch {t:8.2} ms (torch/aimass {:5.2}x)", t / ours);
    }
    println!("{line}");
}

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |n: &str| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str()));
    let peak = gemm_peak();
    println!(
        "threads {}  f32 GEMM 1024^3 (gemm crate): {peak:.1} GFLOP/s",
        rayon::current_num_threads()
    );

    let bs = 256;
    if want("conv") {
        // conv 32->64 3x3 pad 1 on 14x14, batch 256.
        let x = Var::from_tensor(&randn(&[bs, 32, 14, 14], 1)).unwrap();
        let w = Var::from_tensor(&(randn(&[64, 32, 3, 3], 2) * 0.05).unwrap()).unwrap();
        let b = Var::from_tensor(&randn(&[64], 3)).unwrap();
        let gflop = 2.0 * (bs * 64 * 196 * 288) as f64 / 1e9;
        let ours_f = median_ms(10, || {
            kernels::conv2d(&x, &w, Some(&b), (1, 1), (1, 1), (1, 1), 1).unwrap();
        });
        let candle_f = median_ms(5, || {
            x.conv2d(&w, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, 64, 1, 1)).unwrap())
                .unwrap();
        });
        report(
            "conv_fwd (32->64 3x3 14x14)",
            ours_f,
            Some(candle_f),
            gflop,
            peak,
            None,
        );
        let ours = median_ms(10, || {
            let y = kernels::conv2d(&x, &w, Some(&b), (1, 1), (1, 1), (1, 1), 1).unwrap();
            y.sum_all().unwrap().backward().unwrap();
        });
        let cand = median_ms(5, || {
            let y = x
                .conv2d(&w, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, 64, 1, 1)).unwrap())
                .unwrap();
            y.sum_all().unwrap().backward().unwrap();
        });
        report(
            "conv_fwd_bwd",
            ours,
            Some(cand),
            3.0 * gflop,
            peak,
            Some("conv_fwd_bwd"),
        );
    }
    let _ = DType::F32;
}
