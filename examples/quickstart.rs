//! A first look at aimass: pick a device, then use the differentiable ops
//! that self-supervised and distillation losses are built from.
//!
//! Run: `cargo run --release --example quickstart` (set `AIMASS_DEVICE` to
//! choose the device: `cpu`, `cuda`, `cuda:N`, `metal`).

use std::time::Instant;

use aimass::prelude::*;
use aimass::{device, ops};

/// An error ends the example with status 1 and its message (`aimass::Error`'s
/// `Debug` is its message).
fn main() -> Result<()> {
    let start = Instant::now();
    let dev = best_device()?;
    println!("device: {}", device::device_name(&dev));

    // Two "views" of 8 embeddings: the second a noisy copy of the first.
    let mut rng = device::rng(0);
    use rand::Rng;
    let z1: Vec<f32> = (0..8 * 16).map(|_| rng.random_range(-1.0..1.0)).collect();
    let z2: Vec<f32> = z1.iter().map(|v| v + rng.random_range(-0.1..0.1)).collect();
    let z1 = Var::from_tensor(&Tensor::from_vec(z1, (8, 16), &dev)?)?;
    let z2 = Tensor::from_vec(z2, (8, 16), &dev)?;

    // Cosine similarities: the matching pairs sit on the diagonal.
    let sim = ops::cosine_similarity_matrix(z1.as_tensor(), &z2)?;
    let diag: f32 = sim
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?
        .iter()
        .enumerate()
        .map(|(i, r)| r[i])
        .sum::<f32>()
        / 8.0;
    println!("mean cosine similarity of matching pairs: {diag:.4}");

    // A contrastive-style objective: log-softmax over similarities / 0.5,
    // pick the matching pair, and take a gradient through everything.
    let logits = (sim / 0.5)?;
    let log_p = ops::log_softmax(&logits, 1)?;
    let eye = Tensor::eye(8, DType::F32, &dev)?;
    let loss = (log_p * eye)?.sum_all()?.neg()? / 8.0;
    let loss = loss?;
    let grads = loss.backward()?;
    let gnorm = grads
        .get(&z1)
        .ok_or_else(|| Error::invalid("quickstart", "no gradient reached z1"))?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f32>()?;
    let loss = loss.to_scalar::<f32>()?;
    println!("contrastive loss {loss:.4}, gradient norm {gnorm:.4}");

    // Max pooling with the correct gradient (candle's scales it by 1/(k*k)).
    let img = Var::from_tensor(&Tensor::arange(0f32, 16.0, &dev)?.reshape((1, 1, 4, 4))?)?;
    let pooled = ops::max_pool2d(img.as_tensor(), (2, 2), (2, 2), (0, 0))?;
    let g = pooled.sum_all()?.backward()?;
    let total = g
        .get(&img)
        .ok_or_else(|| Error::invalid("quickstart", "no gradient reached the image"))?
        .sum_all()?
        .to_scalar::<f32>()?;
    println!("max-pool gradient mass: {total} (one per window)");

    println!(
        "RESULT example=quickstart device={} loss={loss:.4} pool_grad={total} secs={:.2}",
        device::device_name(&dev),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
