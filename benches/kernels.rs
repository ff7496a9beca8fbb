//! Benchmarks of the CPU kernels (`aimass::ops::kernels`) against plain
//! candle and PyTorch, on the workloads of `benches/peers/torch_peer.py`.
//!
//! Run: `cargo bench --bench kernels [-- NAME...]` (a line runs when its
//! name contains one of the NAMEs: `conv` (the layer), `pool`, `bn`,
//! `convnet`, `resnet` (both ResNets), `resnet_tiny`, `simclr` (both),
//! `simclr_tiny`). Each line prints the median
//! time of aimass and of plain candle (set `AIMASS_BENCH_NO_CANDLE=1` to skip
//! candle, which takes minutes on the ResNet workloads) and, when `python3`
//! (skipped with `AIMASS_BENCH_NO_TORCH=1`)
//! with torch is installed, runs the same workload of `torch_peer.py` (found
//! at `benches/peers/` or `$AIMASS_TORCH_PEER`) with
//! the same thread count right after, so the ratio comes from one run on one
//! machine. Threads: `RAYON_NUM_THREADS` (default: all cores).

use std::time::Instant;

use aimass::candle::{DType, Device, Tensor, Var, D};
use aimass::ops::kernels;
use candle_nn::Optimizer;
use rand::Rng;

type R<T> = aimass::Result<T>;

fn median_ms(warmup: usize, iters: usize, f: impl FnMut() -> R<()>) -> R<f64> {
    Ok(timed(warmup, iters, f)?.wall)
}

/// Medians of wall time and of the process's CPU time (all threads) per
/// iteration, in ms.
struct Timing {
    wall: f64,
    cpu: Option<f64>,
}

/// The process's CPU time so far (user + system, all threads), in ms.
fn cpu_ms() -> Option<f64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write into.
        let ok = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0;
        ok.then(|| ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

fn timed(warmup: usize, iters: usize, mut f: impl FnMut() -> R<()>) -> R<Timing> {
    // `AIMASS_BENCH_ITERS` overrides the timed iterations (A/B comparisons
    // on a loaded machine want more).
    let iters = std::env::var("AIMASS_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(iters);
    for _ in 0..warmup {
        f()?;
    }
    let mut xs = Vec::with_capacity(iters);
    let mut cs = Vec::with_capacity(iters);
    for _ in 0..iters {
        let c = cpu_ms();
        let t = Instant::now();
        f()?;
        xs.push(t.elapsed().as_secs_f64() * 1e3);
        if let (Some(a), Some(b)) = (c, cpu_ms()) {
            cs.push(b - a);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied()
    };
    Ok(Timing {
        wall: median(&mut xs).unwrap_or(f64::NAN),
        cpu: median(&mut cs),
    })
}

fn uniform(dims: &[usize], bound: f64, seed: u64) -> R<Tensor> {
    let mut r = aimass::device::rng(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| ((r.random::<f64>() * 2.0 - 1.0) * bound) as f32)
        .collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// Median ms of a torch_peer.py workload, when python3 + torch are present.
fn torch_ms(name: &str) -> Option<f64> {
    if std::env::var("AIMASS_BENCH_NO_TORCH").is_ok_and(|v| !v.is_empty() && v != "0") {
        return None;
    }
    let candidates = [
        std::env::var("AIMASS_TORCH_PEER").unwrap_or_default(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peers/torch_peer.py").to_string(),
    ];
    let script = candidates
        .iter()
        .find(|p| !p.is_empty() && std::path::Path::new(p).exists())?;
    let out = std::process::Command::new("python3")
        .args([script.as_str(), "--only", name, "--iters", "5", "--threads"])
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
    let par = if th > 1 {
        gemm::Parallelism::Rayon(th)
    } else {
        gemm::Parallelism::None
    };
    let ms = median_ms(2, 7, || {
        // SAFETY: all three buffers hold n * n elements, row-major.
        unsafe {
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
                par,
            )
        };
        Ok(())
    })
    .unwrap_or(f64::NAN);
    2.0 * (n * n * n) as f64 / ms / 1e6
}

/// GFLOP/s of our own GEMM on a 1024^3 product: a 1x1 convolution of one
/// 1024-channel 32x32 image (`ops::kernels::conv2d` runs it as one
/// threaded GEMM, the AVX-512 kernel where the CPU has it).
fn aimass_gemm_peak() -> R<f64> {
    let x = Tensor::ones((1, 1024, 32, 32), DType::F32, &Device::Cpu)?;
    let w = Tensor::ones((1024, 1024, 1, 1), DType::F32, &Device::Cpu)?;
    let ms = median_ms(2, 7, || {
        aimass::ops::kernels::conv2d(&x, &w, None, (1, 1), (0, 0), (1, 1), 1)?;
        Ok(())
    })?;
    Ok(2.0 * 1024f64.powi(3) / ms / 1e6)
}

struct Report {
    peak: f64,
    skip_candle: bool,
}

impl Report {
    fn line(
        &self,
        name: &str,
        ours: Timing,
        candle: Option<f64>,
        gflop: Option<f64>,
        torch: Option<&str>,
        items: usize,
    ) {
        let cpu = ours
            .cpu
            .map_or(String::new(), |c| format!(", CPU {c:.0} ms"));
        let ours = ours.wall;
        let mut line = format!(
            "{name:<22} aimass {ours:9.2} ms ({:7.0} items/s{cpu})",
            items as f64 / ours * 1e3
        );
        if let Some(gf) = gflop {
            let rate = gf / ours * 1e3;
            line += &format!(
                " {rate:6.1} GFLOP/s = {:4.1}% of GEMM peak",
                100.0 * rate / self.peak
            );
        }
        if let Some(c) = candle {
            line += &format!(" | candle {c:9.2} ms (aimass speed-up {:5.2}x)", c / ours);
        }
        if let Some(t) = torch.and_then(torch_ms) {
            line += &format!(" | torch {t:8.2} ms (aimass/torch speed {:4.2})", t / ours);
        }
        println!("{line}");
    }
    fn candle(&self, warmup: usize, iters: usize, f: impl FnMut() -> R<()>) -> R<Option<f64>> {
        if self.skip_candle {
            return Ok(None);
        }
        median_ms(warmup, iters, f).map(Some)
    }
}

/// Which implementation of the hot ops a model uses.
#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Aimass,
    Candle,
}

fn conv(
    b: Backend,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
    relu: bool,
) -> R<Tensor> {
    match b {
        Backend::Aimass => {
            let f = if relu {
                kernels::conv2d_relu
            } else {
                kernels::conv2d
            };
            f(x, w, bias, (stride, stride), (pad, pad), (1, 1), 1)
        }
        Backend::Candle => {
            let mut y = x.conv2d(w, pad, stride, 1, 1)?;
            if let Some(bias) = bias {
                y = y.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)?;
            }
            Ok(if relu { y.relu()? } else { y })
        }
    }
}

fn max_pool(b: Backend, x: &Tensor) -> R<Tensor> {
    match b {
        Backend::Aimass => kernels::max_pool2d(x, (2, 2), (2, 2), (0, 0)),
        Backend::Candle => Ok(x.max_pool2d(2)?),
    }
}

/// BatchNorm (training) with optional ReLU; plain candle writes it with
/// tensor ops, as `candle_nn::BatchNorm` does in training mode.
fn bn(b: Backend, x: &Tensor, g: &Tensor, beta: &Tensor, relu: bool) -> R<Tensor> {
    match b {
        Backend::Aimass => {
            let f = if relu {
                kernels::batch_norm_relu_train
            } else {
                kernels::batch_norm_train
            };
            Ok(f(x, Some(g), Some(beta), 1e-5)?.output)
        }
        Backend::Candle => {
            let c = x.dim(1)?;
            let shape: Vec<usize> = (0..x.rank()).map(|i| if i == 1 { c } else { 1 }).collect();
            let red: Vec<usize> = (0..x.rank()).filter(|&i| i != 1).collect();
            let m = (x.elem_count() / c) as f64;
            let mean = (x.sum_keepdim(red.clone())? / m)?;
            let xc = x.broadcast_sub(&mean)?;
            let var = (xc.sqr()?.sum_keepdim(red)? / m)?;
            let y = xc
                .broadcast_div(&(var + 1e-5)?.sqrt()?)?
                .broadcast_mul(&g.reshape(shape.clone())?)?
                .broadcast_add(&beta.reshape(shape)?)?;
            Ok(if relu { y.relu()? } else { y })
        }
    }
}

/// `relu(bn(x) + s)`, the end of a residual block: one fused kernel for
/// aimass, the composition for plain candle.
fn bn_add_relu(b: Backend, x: &Tensor, g: &Tensor, beta: &Tensor, s: &Tensor) -> R<Tensor> {
    match b {
        Backend::Aimass => {
            Ok(kernels::batch_norm_add_relu_train(x, Some(g), Some(beta), s, 1e-5)?.output)
        }
        Backend::Candle => Ok((bn(b, x, g, beta, false)? + s)?.relu()?),
    }
}

fn relu(b: Backend, x: &Tensor) -> R<Tensor> {
    match b {
        Backend::Aimass => kernels::relu(x),
        Backend::Candle => Ok(x.relu()?),
    }
}

fn linear(x: &Tensor, w: &Tensor, bias: &Tensor) -> R<Tensor> {
    Ok(x.matmul(&w.t()?)?.broadcast_add(bias)?)
}

struct Params {
    vars: Vec<Var>,
}

impl Params {
    fn new() -> Self {
        Params { vars: Vec::new() }
    }
    /// Kaiming-uniform like torch's default init (bound 1/sqrt(fan_in)).
    fn add(&mut self, dims: &[usize], fan_in: usize) -> R<Tensor> {
        let seed = self.vars.len() as u64 + 1000;
        let v = Var::from_tensor(&uniform(dims, 1.0 / (fan_in as f64).sqrt(), seed)?)?;
        self.vars.push(v.clone());
        Ok(v.as_tensor().clone())
    }
    fn constant(&mut self, dims: &[usize], value: f64) -> R<Tensor> {
        let v = Var::from_tensor(&(Tensor::ones(dims, DType::F32, &Device::Cpu)? * value)?)?;
        self.vars.push(v.clone());
        Ok(v.as_tensor().clone())
    }
}

/// conv32-conv64-fc128 classifier of `torch_peer.py::convnet`.
struct ConvNet {
    t: Vec<Tensor>,
}

impl ConvNet {
    fn new(p: &mut Params) -> R<Self> {
        let t = vec![
            p.add(&[32, 1, 3, 3], 9)?,
            p.add(&[32], 9)?,
            p.add(&[64, 32, 3, 3], 288)?,
            p.add(&[64], 288)?,
            p.add(&[128, 3136], 3136)?,
            p.add(&[128], 3136)?,
            p.add(&[10, 128], 128)?,
            p.add(&[10], 128)?,
        ];
        Ok(ConvNet { t })
    }
    fn forward(&self, b: Backend, x: &Tensor) -> R<Tensor> {
        let t = &self.t;
        let h = max_pool(b, &conv(b, x, &t[0], Some(&t[1]), 1, 1, true)?)?;
        let h = max_pool(b, &conv(b, &h, &t[2], Some(&t[3]), 1, 1, true)?)?;
        let h = relu(b, &linear(&h.flatten_from(1)?, &t[4], &t[5])?)?;
        linear(&h, &t[6], &t[7])
    }
}

/// BasicBlock of `torch_peer.py::Block`.
struct Block {
    c1: Tensor,
    b1: (Tensor, Tensor),
    c2: Tensor,
    b2: (Tensor, Tensor),
    short: Option<(Tensor, (Tensor, Tensor))>,
    stride: usize,
}

/// `torch_peer.py::small_resnet`: stem conv3x3, 3 stages of 2 BasicBlocks,
/// global average pool.
struct ResNet {
    stem: Tensor,
    stem_bn: (Tensor, Tensor),
    blocks: Vec<Block>,
}

fn bn_params(p: &mut Params, c: usize) -> R<(Tensor, Tensor)> {
    Ok((p.constant(&[c], 1.0)?, p.constant(&[c], 0.0)?))
}

impl ResNet {
    fn new(p: &mut Params, widths: [usize; 3]) -> R<Self> {
        let stem = p.add(&[widths[0], 1, 3, 3], 9)?;
        let stem_bn = bn_params(p, widths[0])?;
        let mut blocks = Vec::new();
        let mut cin = widths[0];
        for (i, &w) in widths.iter().enumerate() {
            for j in 0..2 {
                let stride = if i > 0 && j == 0 { 2 } else { 1 };
                let short = if stride != 1 || cin != w {
                    Some((p.add(&[w, cin, 1, 1], cin)?, bn_params(p, w)?))
                } else {
                    None
                };
                blocks.push(Block {
                    c1: p.add(&[w, cin, 3, 3], cin * 9)?,
                    b1: bn_params(p, w)?,
                    c2: p.add(&[w, w, 3, 3], w * 9)?,
                    b2: bn_params(p, w)?,
                    short,
                    stride,
                });
                cin = w;
            }
        }
        Ok(ResNet {
            stem,
            stem_bn,
            blocks,
        })
    }
    /// The stem and every block as `kernels` residual blocks.
    fn blocks(&self) -> Vec<kernels::ResidualBlock<'_>> {
        fn stage<'a>(
            w: &'a Tensor,
            bn: &'a (Tensor, Tensor),
            stride: usize,
        ) -> kernels::ConvBn<'a> {
            let pad = w.dims()[2] / 2;
            kernels::ConvBn {
                weight: w,
                stride: (stride, stride),
                padding: (pad, pad),
                bn_weight: Some(&bn.0),
                bn_bias: Some(&bn.1),
                eps: 1e-5,
            }
        }
        let mut v = vec![kernels::ResidualBlock {
            stages: vec![stage(&self.stem, &self.stem_bn, 1)],
            shortcut: kernels::Shortcut::None,
        }];
        for blk in &self.blocks {
            v.push(kernels::ResidualBlock {
                stages: vec![
                    stage(&blk.c1, &blk.b1, blk.stride),
                    stage(&blk.c2, &blk.b2, 1),
                ],
                shortcut: match &blk.short {
                    Some((w, bn)) => kernels::Shortcut::Projection(stage(w, bn, blk.stride)),
                    None => kernels::Shortcut::Identity,
                },
            });
        }
        v
    }
    fn forward(&self, b: Backend, x: &Tensor) -> R<Tensor> {
        if b == Backend::Aimass && std::env::var("AIMASS_BENCH_LAYERS").is_err() {
            let h = kernels::residual_blocks_train(x, &self.blocks())?.output;
            return Ok(h.mean(D::Minus1)?.mean(D::Minus1)?);
        }
        let mut h = conv(b, x, &self.stem, None, 1, 1, false)?;
        h = bn(b, &h, &self.stem_bn.0, &self.stem_bn.1, true)?;
        for blk in &self.blocks {
            let y = conv(b, &h, &blk.c1, None, blk.stride, 1, false)?;
            let y = bn(b, &y, &blk.b1.0, &blk.b1.1, true)?;
            let y = conv(b, &y, &blk.c2, None, 1, 1, false)?;
            let s = match &blk.short {
                Some((w, (g, beta))) => bn(
                    b,
                    &conv(b, &h, w, None, blk.stride, 0, false)?,
                    g,
                    beta,
                    false,
                )?,
                None => h.clone(),
            };
            h = bn_add_relu(b, &y, &blk.b2.0, &blk.b2.1, &s)?;
        }
        Ok(h.mean(D::Minus1)?.mean(D::Minus1)?)
    }
}

/// SGD with momentum and weight decay (torch semantics), written with
/// candle ops; the same for both backends.
struct Sgd {
    vars: Vec<Var>,
    bufs: Vec<Option<Tensor>>,
    lr: f64,
}

impl Sgd {
    fn new(vars: Vec<Var>, lr: f64) -> Self {
        let bufs = vec![None; vars.len()];
        Sgd { vars, bufs, lr }
    }
    fn step(&mut self, loss: &Tensor) -> R<()> {
        let grads = loss.backward()?;
        for (v, buf) in self.vars.iter().zip(self.bufs.iter_mut()) {
            if let Some(g) = grads.get(v) {
                // Detached, as torch's `.grad` is: candle's weight
                // gradients reference the forward graph, and a momentum
                // buffer built from them would keep every step's
                // activations alive.
                let (g, p) = (g.detach(), v.as_tensor().detach());
                let g = (g + (&p * 5e-4)?)?;
                let nb = match buf.take() {
                    Some(b) => ((b * 0.9)? + g)?,
                    None => g,
                };
                v.set(&(p - (&nb * self.lr)?)?)?;
                *buf = Some(nb);
            }
        }
        Ok(())
    }
}

/// The optimizer of a training workload: the library's own (fused CPU
/// update) for aimass, candle-op versions for plain candle.
enum Opt {
    Lib(Box<dyn aimass::optim::Optimizer>),
    CandleAdamW(candle_nn::AdamW),
    CandleSgd(Sgd),
}

impl Opt {
    /// One group holding every variable (weight decay on all, as torch's
    /// `optimizer(model.parameters())`).
    fn group(vars: &[Var]) -> Vec<aimass::optim::ParamGroup> {
        let named = vars
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("p{i}"), v.clone()))
            .collect();
        vec![aimass::optim::ParamGroup::new(named)]
    }
    /// AdamW, torch defaults (weight decay 1e-2).
    fn adamw(b: Backend, vars: &[Var], lr: f64) -> R<Self> {
        Ok(match b {
            Backend::Aimass => Opt::Lib(Box::new(aimass::optim::AdamW::new(
                Self::group(vars),
                aimass::optim::AdamWConfig::default().with_lr(lr),
            )?)),
            Backend::Candle => Opt::CandleAdamW(candle_nn::AdamW::new(
                vars.to_vec(),
                candle_nn::ParamsAdamW {
                    lr,
                    ..Default::default()
                },
            )?),
        })
    }
    /// SGD with momentum 0.9 and weight decay 5e-4.
    fn sgd(b: Backend, vars: &[Var], lr: f64) -> R<Self> {
        Ok(match b {
            Backend::Aimass => Opt::Lib(Box::new(aimass::optim::Sgd::new(
                Self::group(vars),
                aimass::optim::SgdConfig::default()
                    .with_lr(lr)
                    .with_momentum(0.9)
                    .with_weight_decay(5e-4),
            )?)),
            Backend::Candle => Opt::CandleSgd(Sgd::new(vars.to_vec(), lr)),
        })
    }
    fn step(&mut self, loss: &Tensor) -> R<()> {
        match self {
            Opt::Lib(o) => o.step(&loss.backward()?),
            Opt::CandleAdamW(o) => Ok(o.backward_step(loss)?),
            Opt::CandleSgd(o) => o.step(loss),
        }
    }
}

fn nt_xent(z1: &Tensor, z2: &Tensor, t: f64) -> R<Tensor> {
    let n = z1.dim(0)?;
    let z = Tensor::cat(&[z1, z2], 0)?;
    let z = z.broadcast_div(&(z.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-12)?)?;
    let sim = (z.matmul(&z.t()?)? / t)?;
    let eye = Tensor::eye(2 * n, DType::F32, &Device::Cpu)?;
    let sim = (sim - (eye * 1e9)?)?;
    let target: Vec<u32> = (0..2 * n).map(|i| ((i + n) % (2 * n)) as u32).collect();
    let target = Tensor::new(target, &Device::Cpu)?;
    Ok(candle_nn::loss::cross_entropy(&sim, &target)?)
}

fn main() -> R<()> {
    aimass::device::tune_cpu_allocator();
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |n: &str| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str()));
    let crate_peak = gemm_peak();
    let ours_peak = aimass_gemm_peak()?;
    let peak = crate_peak.max(ours_peak);
    let rep = Report {
        peak,
        skip_candle: std::env::var("AIMASS_BENCH_NO_CANDLE")
            .is_ok_and(|v| !v.is_empty() && v != "0"),
    };
    println!(
        "threads {}; f32 GEMM 1024^3: gemm crate {crate_peak:.1} GFLOP/s, aimass kernel \
         {ours_peak:.1} GFLOP/s; 'GEMM peak' below = {peak:.1}",
        rayon::current_num_threads()
    );
    let bs = 256;
    let labels = Tensor::new(
        (0..bs as u32).map(|i| i % 10).collect::<Vec<_>>(),
        &Device::Cpu,
    )?;
    let images = uniform(&[bs, 1, 28, 28], 1.0, 1)?;

    if want("conv") {
        let x = Var::from_tensor(&uniform(&[bs, 32, 14, 14], 1.0, 2)?)?;
        let w = Var::from_tensor(&uniform(&[64, 32, 3, 3], 0.06, 3)?)?;
        let b = Var::from_tensor(&uniform(&[64], 0.06, 4)?)?;
        let gflop = 2.0 * (bs * 64 * 196 * 288) as f64 / 1e9;
        for (name, backward) in [("conv_fwd", false), ("conv_fwd_bwd", true)] {
            let run = |be: Backend| {
                let y = conv(be, &x, &w, Some(&b), 1, 1, false)?;
                if backward {
                    y.sum_all()?.backward()?;
                }
                Ok(())
            };
            let ours = timed(2, 10, || run(Backend::Aimass))?;
            let cand = rep.candle(1, 5, || run(Backend::Candle))?;
            let k = if backward { 3.0 } else { 1.0 };
            rep.line(
                name,
                ours,
                cand,
                Some(k * gflop),
                backward.then_some("conv_fwd_bwd"),
                bs,
            );
        }
    }
    if want("pool") {
        let x = Var::from_tensor(&uniform(&[bs, 32, 28, 28], 1.0, 5)?)?;
        let run = |be: Backend| {
            max_pool(be, &x)?.sum_all()?.backward()?;
            Ok(())
        };
        let ours = timed(2, 10, || run(Backend::Aimass))?;
        let cand = rep.candle(1, 5, || run(Backend::Candle))?;
        rep.line("maxpool2x2_fwd_bwd", ours, cand, None, None, bs);
    }
    if want("bn") {
        let x = Var::from_tensor(&uniform(&[bs, 64, 14, 14], 1.0, 6)?)?;
        let g = Var::from_tensor(&Tensor::ones(64, DType::F32, &Device::Cpu)?)?;
        let beta = Var::from_tensor(&Tensor::zeros(64, DType::F32, &Device::Cpu)?)?;
        let r = uniform(&[bs, 64, 14, 14], 1.0, 7)?;
        let run = |be: Backend| {
            bn(be, &x, &g, &beta, true)?
                .mul(&r)?
                .sum_all()?
                .backward()?;
            Ok(())
        };
        let ours = timed(2, 10, || run(Backend::Aimass))?;
        let cand = rep.candle(1, 5, || run(Backend::Candle))?;
        rep.line("bn_relu_fwd_bwd", ours, cand, None, None, bs);
        // The end of a residual block: relu(bn(x) + s), s differentiable too.
        let s = Var::from_tensor(&uniform(&[bs, 64, 14, 14], 1.0, 8)?)?;
        let run = |be: Backend| {
            bn_add_relu(be, &x, &g, &beta, &s)?
                .mul(&r)?
                .sum_all()?
                .backward()?;
            Ok(())
        };
        let ours = timed(2, 10, || run(Backend::Aimass))?;
        let cand = rep.candle(1, 5, || run(Backend::Candle))?;
        rep.line("bn_add_relu_fwd_bwd", ours, cand, None, None, bs);
    }
    if want("convnet") {
        let step_time = |be: Backend, warm: usize, iters: usize| -> R<Timing> {
            let mut p = Params::new();
            let net = ConvNet::new(&mut p)?;
            let mut opt = Opt::adamw(be, &p.vars, 1e-3)?;
            timed(warm, iters, || {
                opt.step(&candle_nn::loss::cross_entropy(
                    &net.forward(be, &images)?,
                    &labels,
                )?)
            })
        };
        let ours = step_time(Backend::Aimass, 2, 7)?;
        let cand = if rep.skip_candle {
            None
        } else {
            Some(step_time(Backend::Candle, 1, 3)?.wall)
        };
        rep.line(
            "convnet_step",
            ours,
            cand,
            Some(6.5),
            Some("convnet_step"),
            bs,
        );
    }
    let images2 = uniform(&[bs, 1, 28, 28], 1.0, 8)?;
    // The small ResNet (32/64/128) and resnet_tiny (16/32/64, the default
    // examples' backbone): a supervised step, and a SimCLR step (the small
    // one with its two views as two forward passes, as the peer's
    // `simclr_step`; the tiny one with both views as one batch of 512, as
    // `simclr_tiny_step` and the examples).
    for (suffix, widths, views_as_one_batch) in
        [("", [32, 64, 128], false), ("_tiny", [16, 32, 64], true)]
    {
        let name = format!("resnet{suffix}_step");
        if want(&name) {
            let step_time = |be: Backend, warm: usize, iters: usize| -> R<Timing> {
                let mut p = Params::new();
                let net = ResNet::new(&mut p, widths)?;
                let d = widths[2];
                let fc_w = p.add(&[10, d], d)?;
                let fc_b = p.add(&[10], d)?;
                let mut opt = Opt::sgd(be, &p.vars, 0.1)?;
                timed(warm, iters, || {
                    let logits = linear(&net.forward(be, &images)?, &fc_w, &fc_b)?;
                    opt.step(&candle_nn::loss::cross_entropy(&logits, &labels)?)
                })
            };
            let ours = step_time(Backend::Aimass, 1, 5)?;
            let cand = if rep.skip_candle {
                None
            } else {
                Some(step_time(Backend::Candle, 1, 2)?.wall)
            };
            rep.line(&name, ours, cand, None, Some(&name), bs);
        }
        let name = format!("simclr{suffix}_step");
        if want(&name) {
            let both = Tensor::cat(&[&images, &images2], 0)?;
            let step_time = |be: Backend, warm: usize, iters: usize| -> R<Timing> {
                let mut p = Params::new();
                let enc = ResNet::new(&mut p, widths)?;
                // Head Linear(d, hd), BN, ReLU, Linear(hd, out): 128/128/64
                // on the small ResNet, 64/64/32 on resnet_tiny.
                let (d, out) = (widths[2], widths[2] / 2);
                let h1 = p.add(&[d, d], d)?;
                let h1b = p.add(&[d], d)?;
                let (hg, hbeta) = bn_params(&mut p, d)?;
                let h2 = p.add(&[out, d], d)?;
                let h2b = p.add(&[out], d)?;
                let head = |x: &Tensor| -> R<Tensor> {
                    let h = bn(be, &linear(x, &h1, &h1b)?, &hg, &hbeta, true)?;
                    linear(&h, &h2, &h2b)
                };
                let mut opt = Opt::sgd(be, &p.vars, 0.06)?;
                timed(warm, iters, || {
                    let (z1, z2) = if views_as_one_batch {
                        let z = head(&enc.forward(be, &both)?)?;
                        (z.narrow(0, 0, bs)?, z.narrow(0, bs, bs)?)
                    } else {
                        (
                            head(&enc.forward(be, &images)?)?,
                            head(&enc.forward(be, &images2)?)?,
                        )
                    };
                    opt.step(&nt_xent(&z1, &z2, 0.5)?)
                })
            };
            let ours = step_time(Backend::Aimass, 1, 3)?;
            let cand = if rep.skip_candle {
                None
            } else {
                Some(step_time(Backend::Candle, 1, 2)?.wall)
            };
            rep.line(&name, ours, cand, None, Some(&name), 2 * bs);
        }
    }
    Ok(())
}
