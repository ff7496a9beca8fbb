//! Evaluation: accuracy of a classifier, feature extraction in eval mode, and
//! the linear probe (logistic regression on frozen features).
//!
//! ```
//! use aimass::candle::{Device, Tensor};
//! use aimass::train::{linear_probe, LinearProbeConfig};
//!
//! // Two linearly separable clusters.
//! let x = Tensor::new(&[[2.0f32, 0.1], [1.5, -0.2], [-2.0, 0.0], [-1.0, 0.3]], &Device::Cpu)?;
//! let r = linear_probe(&x, &[0, 0, 1, 1], &x, &[0, 0, 1, 1], &LinearProbeConfig::default().with_epochs(50))?;
//! assert_eq!(r.test_acc, 1.0);
//! # Ok::<(), aimass::Error>(())
//! ```

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{Module, VarMap};

use super::knn::accuracy_of;
use crate::config::config;
use crate::data::DataLoader;
use crate::loss::cross_entropy_loss;
use crate::optim::{AdamW, AdamWConfig, CosineAnnealingLr, Optimizer, Schedule};
use crate::{Error, Result};

/// Runs `f` on every batch of one pass over `loader` (in its epoch-0 order,
/// without moving its position) and concatenates the outputs, with the labels.
pub fn extract<F>(loader: &DataLoader, mut f: F) -> Result<(Tensor, Vec<u32>)>
where
    F: FnMut(&Tensor) -> Result<Tensor>,
{
    let mut outs = Vec::with_capacity(loader.len());
    let mut labels = Vec::new();
    for b in 0..loader.len() {
        let batch = loader.batch_at(0, b)?;
        outs.push(f(batch.images()?)?.detach());
        // host-ok: evaluation returns the labels on the host.
        labels.extend(batch.labels.to_dtype(DType::U32)?.to_vec1::<u32>()?);
    }
    if outs.is_empty() {
        return Err(Error::invalid("extract", "the loader has no batches"));
    }
    Ok((Tensor::cat(&outs, 0)?, labels))
}

/// Features of every sample of `loader`, computed in eval mode by `features`
/// (e.g. `|x| backbone.forward_t(x, false)`), flattened to rows, with labels.
pub fn extract_features<M: ModuleT>(model: &M, loader: &DataLoader) -> Result<(Tensor, Vec<u32>)> {
    let (f, y) = extract(loader, |x| Ok(model.forward_t(x, false)?))?;
    Ok((f.flatten_from(1)?, y))
}

/// Fraction of samples of `loader` whose argmax of `model` (in eval mode)
/// is the label. Use a loader without shuffling or random augmentation.
pub fn evaluate_accuracy<M: ModuleT>(model: &M, loader: &DataLoader) -> Result<f64> {
    let mut right = 0usize;
    let mut total = 0usize;
    for b in 0..loader.len() {
        let batch = loader.batch_at(0, b)?;
        let logits = model.forward_t(batch.images()?, false)?;
        right += super::classifier::correct(&logits, &batch.labels)?;
        total += batch.labels.dim(0)?;
    }
    if total == 0 {
        return Err(Error::invalid(
            "evaluate_accuracy",
            "the loader has no samples",
        ));
    }
    Ok(right as f64 / total as f64)
}

config! {
    /// Settings of [`linear_probe`].
    pub struct LinearProbeConfig {
        /// Passes over the training features (default 100).
        epochs: usize = 100,
        /// AdamW learning rate, cosine-annealed to 0 (default 0.05).
        lr: f64 = 0.05,
        /// AdamW weight decay (default 1e-4).
        weight_decay: f64 = 1e-4,
        /// Mini-batch size (default 256).
        batch_size: usize = 256,
        /// Seed of the initialisation and the shuffling (default 0).
        seed: u64 = 0,
    }
}

impl LinearProbeConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::config(
                "LinearProbeConfig::epochs",
                0,
                "must be >= 1",
            ));
        }
        if self.batch_size == 0 {
            return Err(Error::config(
                "LinearProbeConfig::batch_size",
                0,
                "must be >= 1",
            ));
        }
        Ok(())
    }
}

/// Accuracies of a linear probe.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LinearProbeResult {
    /// Accuracy on the training features (0..=1).
    pub train_acc: f64,
    /// Accuracy on the test features (0..=1).
    pub test_acc: f64,
}

/// Trains a logistic regression on frozen features (standardised with the
/// training mean and deviation) and reports train and test accuracy.
pub fn linear_probe(
    train_x: &Tensor,
    train_y: &[u32],
    test_x: &Tensor,
    test_y: &[u32],
    config: &LinearProbeConfig,
) -> Result<LinearProbeResult> {
    config.validate()?;
    let dev = Device::Cpu;
    let tx = train_x
        .flatten_from(1)?
        .to_dtype(DType::F32)?
        .to_device(&dev)?;
    let vx = test_x
        .flatten_from(1)?
        .to_dtype(DType::F32)?
        .to_device(&dev)?;
    let (n, d) = tx.dims2()?;
    if n == 0 || n != train_y.len() {
        return Err(Error::shape(
            "linear_probe",
            format!("{} training labels for {n} features (n >= 1)", n),
            train_y.len(),
        ));
    }
    if vx.dim(1)? != d || vx.dim(0)? != test_y.len() {
        return Err(Error::shape(
            "linear_probe",
            format!(
                "test features (m, {d}) with m labels ({} given)",
                test_y.len()
            ),
            vx.dims(),
        ));
    }
    let mean = tx.mean_keepdim(0)?;
    let std = (tx.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)? + 1e-6)?.sqrt()?;
    let tx = tx.broadcast_sub(&mean)?.broadcast_div(&std)?;
    let vx = vx.broadcast_sub(&mean)?.broadcast_div(&std)?;
    let classes = train_y
        .iter()
        .chain(test_y)
        .copied()
        .max()
        .map_or(1, |m| m as usize + 1);

    let varmap = VarMap::new();
    let vb = crate::nn::init::seeded_var_builder(&varmap, config.seed, DType::F32, &dev);
    let head = candle_nn::linear(d, classes, vb.pp("probe"))?;
    let mut opt = AdamW::from_varmap(
        &varmap,
        AdamWConfig::default()
            .with_lr(config.lr)
            .with_weight_decay(config.weight_decay),
    )?;
    let per_epoch = n.div_ceil(config.batch_size);
    let total = (config.epochs * per_epoch) as u64;
    let schedule = CosineAnnealingLr::new(config.lr, total, 0.0)?;
    // host-ok: the probe trains on the CPU (`dev`).
    let ty = Tensor::new(train_y, &dev)?;
    let mut rng = crate::device::rng(config.seed);
    let mut step = 0u64;
    for _ in 0..config.epochs {
        let mut order: Vec<u32> = (0..n as u32).collect();
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rng);
        for chunk in order.chunks(config.batch_size) {
            // host-ok: on the CPU (`dev`).
            let idx = Tensor::new(chunk, &dev)?;
            let logits = head.forward(&tx.index_select(&idx, 0)?)?;
            let loss = cross_entropy_loss(&logits, &ty.index_select(&idx, 0)?)?;
            opt.set_lr(schedule.lr(step))?;
            opt.step(&loss.backward()?)?;
            step += 1;
        }
    }
    let predict = |x: &Tensor| -> Result<Vec<u32>> {
        // host-ok: predictions of the CPU probe, compared on the host.
        Ok(head
            .forward(x)?
            .argmax(1)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?)
    };
    Ok(LinearProbeResult {
        train_acc: accuracy_of(&predict(&tx)?, train_y),
        test_acc: accuracy_of(&predict(&vx)?, test_y),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn blobs(n: usize, classes: usize, seed: u64, random_labels: bool) -> (Tensor, Vec<u32>) {
        let mut r = crate::device::rng(seed);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let c = (i % classes) as u32;
            for j in 0..8 {
                let centre = if j == c as usize { 3.0 } else { 0.0 };
                x.push(centre + r.random_range(-1.0f32..1.0));
            }
            y.push(if random_labels {
                r.random_range(0..classes as u32)
            } else {
                c
            });
        }
        (Tensor::from_vec(x, (n, 8), &Device::Cpu).unwrap(), y)
    }

    #[test]
    fn separable_features_give_full_accuracy() {
        let (x, y) = blobs(200, 4, 1, false);
        let (vx, vy) = blobs(100, 4, 2, false);
        let r = linear_probe(
            &x,
            &y,
            &vx,
            &vy,
            &LinearProbeConfig::default().with_epochs(100),
        )
        .unwrap();
        assert_eq!(r.test_acc, 1.0, "{r:?}");
    }

    #[test]
    fn random_labels_give_chance_on_test() {
        let (x, y) = blobs(400, 4, 3, true);
        let (vx, vy) = blobs(400, 4, 4, true);
        let r = linear_probe(
            &x,
            &y,
            &vx,
            &vy,
            &LinearProbeConfig::default().with_epochs(100),
        )
        .unwrap();
        assert!((r.test_acc - 0.25).abs() < 0.07, "{r:?}");
    }

    #[test]
    fn bad_inputs() {
        let (x, y) = blobs(10, 2, 5, false);
        assert!(linear_probe(&x, &y[..5], &x, &y, &LinearProbeConfig::default()).is_err());
        assert!(
            linear_probe(&x, &y, &x, &y, &LinearProbeConfig::default().with_epochs(0)).is_err()
        );
    }
}
