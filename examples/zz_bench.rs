use aimass::prelude::*;
use std::time::Instant;
fn time(name: &str, f: impl Fn() -> candle_core::Result<Tensor>) {
    for _ in 0..50 {
        f().unwrap();
    }
    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        f().unwrap();
    }
    println!(
        "{name:40} {:8.2} us",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
}
fn main() -> candle_core::Result<()> {
    aimass::device::fix_cpu_thread_count();
    let d = Device::Cpu;
    let w = Tensor::randn(0f32, 1., (25, 40, 40), &d)?;
    let w2 = Tensor::randn(0f32, 1., (25, 40, 40), &d)?;
    let h = Tensor::randn(0f32, 1., (25, 10, 40), &d)?;
    let b = Tensor::randn(0f32, 1., (25, 1, 40), &d)?;
    let th = Tensor::randn(0f32, 1., (40, 40), &d)?;
    time("sum_keepdim(0) (25,40,40)", || w.sum_keepdim(0));
    time("sum_keepdim(1) (25,10,40)", || h.sum_keepdim(1));
    time("sum_keepdim(2) (25,10,40)", || h.sum_keepdim(2));
    time("add (25,40,40)", || w.add(&w2));
    time("zeros (25,40,40)", || w.zeros_like());
    time("affine (25,40,40)", || w.affine(0.5, 0.));
    time("mul scalar (25,40,40)", || &w * 0.5);
    time("broadcast_add (25,10,40)+(25,1,40)", || h.broadcast_add(&b));
    time("broadcast_as θ to (25,40,40) + w", || {
        th.unsqueeze(0)?.broadcast_as((25, 40, 40))?.add(&w)
    });
    time("matmul h@w (25,10,40)x(25,40,40)", || h.matmul(&w));
    time("matmul h@w.t", || h.matmul(&w.transpose(1, 2)?));
    time("relu (25,10,40)", || h.relu());
    time("ge mask (25,10,40)", || h.ge(0f32));
    time("sqr", || h.sqr());
    time("mean_all", || h.mean_all());
    time("copy (25,40,40)", || w.copy());
    time("transpose contiguous", || w.transpose(1, 2)?.contiguous());
    let ones = Tensor::ones((1, 25), DType::F32, &d)?;
    let wf = w.reshape((25, 1600))?;
    time("ones@W (1,25)x(25,1600)", || ones.matmul(&wf));
    Ok(())
}
