//! k-nearest-neighbour classification on features: the yardstick of
//! self-supervised learning.
//!
//! The protocol of InstDisc and lightly (and of the reference figures, see
//! docs/benchmarks.md, "Protocols"): features L2-normalised, cosine similarity of
//! each query to every bank feature, the `k` most similar vote for their
//! class with weight `exp(sim / temperature)`, the class with the largest
//! total wins (ties go to the lowest class). Queries are processed in
//! batches, so a 60,000-image bank against 10,000 queries needs only
//! `batch_size × bank` similarities in memory at a time.
//!
//! ```
//! use aimass::candle::{Device, Tensor};
//! use aimass::train::{knn_accuracy, KnnConfig};
//!
//! let bank = Tensor::new(&[[1.0f32, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], &Device::Cpu)?;
//! let query = Tensor::new(&[[1.0f32, 0.2], [0.2, 1.0]], &Device::Cpu)?;
//! let acc = knn_accuracy(&bank, &[0, 0, 1, 1], &query, &[0, 1], &KnnConfig::default().with_k(2))?;
//! assert_eq!(acc, 1.0);
//! # Ok::<(), aimass::Error>(())
//! ```

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::config::config;
use crate::{ops, Error, Result};

config! {
    /// Settings of the kNN classifier (defaults: k = 20, temperature 0.1).
    pub struct KnnConfig {
        /// Number of neighbours that vote (default 20, as in the reference protocol).
        k: usize = 20,
        /// Vote weight `exp(sim / temperature)` (default 0.1, InstDisc).
        temperature: f64 = 0.1,
        /// Queries per similarity batch (default 500).
        batch_size: usize = 500,
    }
}

impl KnnConfig {
    fn validate(&self) -> Result<()> {
        if self.k == 0 {
            return Err(Error::config("KnnConfig::k", self.k, "must be >= 1"));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::config(
                "KnnConfig::temperature",
                self.temperature,
                "must be finite and > 0",
            ));
        }
        if self.batch_size == 0 {
            return Err(Error::config(
                "KnnConfig::batch_size",
                self.batch_size,
                "must be >= 1",
            ));
        }
        Ok(())
    }
}

fn as_matrix(op: &str, t: &Tensor) -> Result<Tensor> {
    if t.rank() < 2 || t.dim(0)? == 0 {
        return Err(Error::shape(
            op,
            "features of shape (n >= 1, d, ...)",
            t.dims(),
        ));
    }
    Ok(t.flatten_from(1)?.to_dtype(DType::F32)?)
}

/// Predicts a class for every query row by weighted kNN voting over the bank.
pub fn knn_predict(
    bank: &Tensor,
    bank_labels: &[u32],
    queries: &Tensor,
    config: &KnnConfig,
) -> Result<Vec<u32>> {
    config.validate()?;
    let bank = ops::l2_normalize(&as_matrix("knn_predict (bank)", bank)?, 1, 1e-12)?;
    let queries = ops::l2_normalize(&as_matrix("knn_predict (queries)", queries)?, 1, 1e-12)?;
    let n = bank.dim(0)?;
    if bank_labels.len() != n {
        return Err(Error::shape(
            "knn_predict",
            format!("{n} bank labels"),
            bank_labels.len(),
        ));
    }
    if bank.dim(1)? != queries.dim(1)? {
        return Err(Error::shape(
            "knn_predict",
            format!("queries with {} features", bank.dim(1)?),
            queries.dims(),
        ));
    }
    let classes = bank_labels
        .iter()
        .copied()
        .max()
        .map_or(0, |m| m as usize + 1);
    let k = config.k.min(n);
    let bank_t = bank.t()?.contiguous()?;
    let m = queries.dim(0)?;
    let mut preds = Vec::with_capacity(m);
    let mut start = 0;
    while start < m {
        let len = config.batch_size.min(m - start);
        let sim = queries.narrow(0, start, len)?.matmul(&bank_t)?;
        // host-ok: the votes are counted on the host, one read per chunk
        // of queries (evaluation, not a training step).
        let rows = sim.to_vec2::<f32>()?;
        let batch: Vec<u32> = rows
            .par_iter()
            .map(|row| vote(row, bank_labels, k, classes, config.temperature))
            .collect();
        preds.extend(batch);
        start += len;
    }
    Ok(preds)
}

/// The class with the largest sum of `exp(sim / t)` over the `k` most similar.
fn vote(row: &[f32], labels: &[u32], k: usize, classes: usize, t: f64) -> u32 {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    // Partial selection of the k largest similarities (NaN sorts last).
    let cmp = |a: &usize, b: &usize| {
        row[*b]
            .partial_cmp(&row[*a])
            .unwrap_or(std::cmp::Ordering::Equal)
    };
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    let mut votes = vec![0f64; classes];
    for i in idx {
        votes[labels[i] as usize] += (row[i] as f64 / t).exp();
    }
    let mut best = 0;
    for (c, v) in votes.iter().enumerate() {
        if *v > votes[best] {
            best = c;
        }
    }
    best as u32
}

/// Fraction of queries whose kNN prediction equals their label (0..=1).
pub fn knn_accuracy(
    bank: &Tensor,
    bank_labels: &[u32],
    queries: &Tensor,
    query_labels: &[u32],
    config: &KnnConfig,
) -> Result<f64> {
    let preds = knn_predict(bank, bank_labels, queries, config)?;
    if preds.len() != query_labels.len() {
        return Err(Error::shape(
            "knn_accuracy",
            format!("{} query labels", preds.len()),
            query_labels.len(),
        ));
    }
    Ok(accuracy_of(&preds, query_labels))
}

/// Fraction of equal entries of two label slices (0 for empty input).
pub fn accuracy_of(preds: &[u32], labels: &[u32]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    preds.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / labels.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::Rng;

    fn clusters(n_per: usize, classes: usize, noise: f32, seed: u64) -> (Tensor, Vec<u32>) {
        let mut r = crate::device::rng(seed);
        let d = 16;
        let centres: Vec<Vec<f32>> = (0..classes)
            .map(|_| (0..d).map(|_| r.random_range(-1.0..1.0)).collect())
            .collect();
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n_per * classes {
            let c = i % classes;
            x.extend(
                centres[c]
                    .iter()
                    .map(|v| v + noise * r.random_range(-1.0..1.0f32)),
            );
            y.push(c as u32);
        }
        (
            Tensor::from_vec(x, (n_per * classes, d), &Device::Cpu).unwrap(),
            y,
        )
    }

    #[test]
    fn separable_clusters_are_classified_perfectly() {
        let (bank, by) = clusters(50, 5, 0.05, 1);
        let (q, qy) = clusters(20, 5, 0.05, 1);
        let acc = knn_accuracy(
            &bank,
            &by,
            &q,
            &qy,
            &KnnConfig::default().with_batch_size(7),
        )
        .unwrap();
        assert_eq!(acc, 1.0);
    }

    #[test]
    fn random_labels_give_chance() {
        let (bank, _) = clusters(200, 5, 1.0, 2);
        let (q, _) = clusters(200, 5, 1.0, 3);
        let mut r = crate::device::rng(4);
        let by: Vec<u32> = (0..1000).map(|_| r.random_range(0..5)).collect();
        let qy: Vec<u32> = (0..1000).map(|_| r.random_range(0..5)).collect();
        let acc = knn_accuracy(&bank, &by, &q, &qy, &KnnConfig::default()).unwrap();
        assert!((acc - 0.2).abs() < 0.05, "{acc}");
    }

    #[test]
    fn weighted_vote_by_hand() {
        // Query (1, 0). Neighbours: class 1 at cos 1.0, two of class 0 at cos 0.8.
        // Weights exp(10) vs 2 exp(8): class 1 wins (e^10 = 22026 > 2 e^8 = 5962).
        let bank = Tensor::new(
            &[[1.0f32, 0.0], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let q = Tensor::new(&[[1.0f32, 0.0]], &Device::Cpu).unwrap();
        let p = knn_predict(&bank, &[1, 0, 0, 2], &q, &KnnConfig::default().with_k(3)).unwrap();
        assert_eq!(p, vec![1]);
        // With a high temperature the votes become counts: class 0 wins 2 to 1.
        let p = knn_predict(
            &bank,
            &[1, 0, 0, 2],
            &q,
            &KnnConfig::default().with_k(3).with_temperature(100.0),
        )
        .unwrap();
        assert_eq!(p, vec![0]);
    }

    #[test]
    fn bad_inputs() {
        let (bank, by) = clusters(2, 2, 0.1, 5);
        assert!(knn_predict(&bank, &by[..3], &bank, &KnnConfig::default()).is_err());
        assert!(knn_predict(
            &bank,
            &by,
            &Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
            &KnnConfig::default()
        )
        .is_err());
        assert!(knn_predict(&bank, &by, &bank, &KnnConfig::default().with_k(0)).is_err());
        assert!(knn_predict(
            &bank,
            &by,
            &bank,
            &KnnConfig::default().with_temperature(0.0)
        )
        .is_err());
    }
}
