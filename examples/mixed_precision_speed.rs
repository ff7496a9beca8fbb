//! Does mixed precision pay on this machine? Times one training step
//! (forward, backward, SGD update of f32 master weights) of an MLP and of
//! `resnet_tiny` in f32, bf16 and f16, back to back in one process.
//!
//! Run: `cargo run --release --example mixed_precision_speed`
//! Ends with `RESULT example=mixed_precision_speed ...` (step times in ms).

use std::time::Instant;

use aimass::nn::{init::seeded_var_builder, Mlp, MlpConfig, ResNet, ResNetConfig};
use aimass::optim::{Sgd, SgdConfig};
use aimass::prelude::*;
use aimass::train::{MixedPrecision, MixedPrecisionConfig, Precision};

fn median_ms(mut f: impl FnMut() -> Result<()>, reps: usize) -> Result<f64> {
    f()?; // warm-up
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[reps / 2])
}

/// Builds the model from a `VarBuilder` (functional weights).
type Builder = Box<dyn Fn(VarBuilder) -> Result<Box<dyn ModuleT>>>;

fn step_ms(model: &str, precision: Precision, dev: &Device) -> Result<f64> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 0, DType::F32, dev);
    let (x, build): (Tensor, Builder) = match model {
        "mlp" => {
            let cfg = MlpConfig::new(vec![784, 1024, 1024, 10]);
            Mlp::new(cfg.clone(), vb)?;
            (
                Tensor::ones((256, 784), DType::F32, dev)?,
                Box::new(move |vb| Ok(Box::new(Mlp::new(cfg.clone(), vb)?) as Box<dyn ModuleT>)),
            )
        }
        _ => {
            let cfg = ResNetConfig::resnet_tiny().with_num_classes(Some(10));
            ResNet::new(cfg.clone(), vb)?;
            (
                Tensor::ones((64, 1, 28, 28), DType::F32, dev)?,
                Box::new(move |vb| Ok(Box::new(ResNet::new(cfg.clone(), vb)?) as Box<dyn ModuleT>)),
            )
        }
    };
    let mut mp = MixedPrecision::new(MixedPrecisionConfig::default().with_precision(precision))?;
    let mut opt = Sgd::from_varmap(&varmap, SgdConfig::default().with_lr(1e-3))?;
    let x = x.to_dtype(precision.dtype())?;
    median_ms(
        || {
            let m = build(mp.var_builder(&varmap, dev)?)?;
            let loss = m.forward_t(&x, true)?.sqr()?.mean_all()?;
            if let Some(g) = mp.backward(&loss, &varmap)? {
                Optimizer::step(&mut opt, &g)?;
            }
            Ok(())
        },
        5,
    )
}

/// An error ends the example with status 1 and its message (`aimass::Error`'s
/// `Debug` is its message).
fn main() -> Result<()> {
    let dev = best_device()?;
    // A training program: keep freed memory for the next step (see the docs).
    aimass::device::tune_cpu_allocator();
    let mut result = String::from("RESULT example=mixed_precision_speed");
    for model in ["mlp", "resnet_tiny"] {
        let f32_ms = step_ms(model, Precision::F32, &dev)?;
        for (p, name) in [
            (Precision::F32, "f32"),
            (Precision::Bf16, "bf16"),
            (Precision::F16, "f16"),
        ] {
            let ms = if p == Precision::F32 {
                Ok(f32_ms)
            } else {
                step_ms(model, p, &dev)
            };
            match ms {
                Ok(ms) => {
                    println!(
                        "{model:12} {name:5} {ms:9.1} ms/step  ({:.2}x f32)",
                        ms / f32_ms
                    );
                    result.push_str(&format!(" {model}_{name}_ms={ms:.1}"));
                }
                // e.g. candle's CPU backend has no bf16/f16 matmul for convolutions.
                Err(e) => {
                    let first = e.to_string().lines().next().unwrap_or_default().to_string();
                    println!("{model:12} {name:5} unsupported on this device: {first}");
                    result.push_str(&format!(" {model}_{name}_ms=unsupported"));
                }
            }
        }
    }
    println!("{result}");
    Ok(())
}
