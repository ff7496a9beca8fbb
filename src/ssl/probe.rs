//! Evaluation on frozen features: does pretraining help a classifier that
//! has few labels?
//!
//! [`probe_features`] runs, on features of labelled training images and
//! held-out images (computed once, the encoder frozen in eval mode):
//!
//! - **kNN** with every training image as the bank (k = 20, cosine,
//!   vote weight `exp(sim / 0.1)`, [`crate::train::knn_accuracy`]);
//! - the **linear probe** on every training label: logistic regression on
//!   standardised features fitted by L-BFGS
//!   ([`crate::train::logistic_regression`]);
//! - **few-label probes**: for each budget `n` (default 100 and 10 labelled
//!   images per class) and each of `subsets` (default 5) random label
//!   subsets ([`label_subset`]), the linear probe and the kNN trained on
//!   that subset only; reported as mean and population standard deviation.
//!
//! Run it on the pretrained backbone's features, on raw pixels and on a
//! randomly initialised backbone (the same subsets are drawn for all three,
//! so the rows compare subset by subset): the protocol of the reference
//! figures (`docs/benchmarks.md`, "SSL probes").
//!
//! ```
//! use aimass::candle::{Device, Tensor};
//! use aimass::ssl::{probe_features, ProbeConfig};
//!
//! // Two classes of 2-d points, 12 labelled and 4 held out.
//! let pts: Vec<f32> = (0..16).flat_map(|i| {
//!     let s = if i % 2 == 0 { 1.0 } else { -1.0 };
//!     [s * (1.0 + 0.1 * (i as f32)), 0.05 * i as f32]
//! }).collect();
//! let x = Tensor::from_vec(pts, (16, 2), &Device::Cpu)?;
//! let y: Vec<u32> = (0..16).map(|i| i % 2).collect();
//! let (tr, te) = (x.narrow(0, 0, 12)?, x.narrow(0, 12, 4)?);
//! let cfg = ProbeConfig::default().with_labels_per_class(vec![3]).with_subsets(2);
//! let report = probe_features(&tr, &y[..12], &te, &y[12..], &cfg)?;
//! assert_eq!(report.linear_all, 1.0);
//! assert_eq!(report.few[0].labels_per_class, 3);
//! assert_eq!(report.few[0].linear.values.len(), 2);
//! # Ok::<(), aimass::Error>(())
//! ```

use candle_core::Tensor;
use rand::Rng;

use crate::config::config;
use crate::train::{knn_accuracy, logistic_regression, KnnConfig, LogisticRegressionConfig};
use crate::{Error, Result};

config! {
    /// Settings of [`probe_features`]; defaults are the reference protocol's.
    pub struct ProbeConfig {
        /// Label budgets of the few-label probes, in images per class (default 100 and 10).
        labels_per_class: Vec<usize> = vec![100, 10],
        /// Random label subsets per budget (default 5).
        subsets: usize = 5,
        /// The kNN classifier (default k = 20, temperature 0.1).
        knn: KnnConfig = KnnConfig::default(),
        /// The linear probe (default: weight decay 1e-3, L-BFGS up to 500 iterations).
        logistic: LogisticRegressionConfig = LogisticRegressionConfig::default(),
        /// Seed of the label subsets: subset `s` is drawn with seed `seed + s` (default 0).
        seed: u64 = 0,
    }
}

impl ProbeConfig {
    fn validate(&self) -> Result<()> {
        if self.subsets == 0 && !self.labels_per_class.is_empty() {
            return Err(Error::config("ProbeConfig::subsets", 0, "must be >= 1"));
        }
        if let Some(0) = self.labels_per_class.iter().copied().find(|&n| n == 0) {
            return Err(Error::config(
                "ProbeConfig::labels_per_class",
                format!("{:?}", self.labels_per_class),
                "every budget must be >= 1",
            ));
        }
        Ok(())
    }
}

/// Accuracies over several label subsets: the values, their mean and
/// population standard deviation (fractions in 0..=1).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Spread {
    /// One accuracy per subset, in subset order.
    pub values: Vec<f64>,
    /// The mean.
    pub mean: f64,
    /// The population standard deviation.
    pub std: f64,
}

impl Spread {
    /// Mean and population standard deviation of `values`.
    pub fn of(values: Vec<f64>) -> Self {
        let n = values.len().max(1) as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = (values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n).sqrt();
        Spread { values, mean, std }
    }
}

/// The probes at one label budget.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct FewLabelResult {
    /// Labelled images per class.
    pub labels_per_class: usize,
    /// Linear-probe test accuracy over the subsets.
    pub linear: Spread,
    /// kNN test accuracy with the subset as the bank.
    pub knn: Spread,
}

/// What [`probe_features`] measured (accuracies as fractions in 0..=1).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ProbeReport {
    /// kNN with every training image in the bank.
    pub knn_all: f64,
    /// Linear probe trained on every training label.
    pub linear_all: f64,
    /// The few-label probes, in the order of `labels_per_class`.
    pub few: Vec<FewLabelResult>,
}

impl ProbeReport {
    /// The probes at budget `labels_per_class`, if it was run.
    pub fn at(&self, labels_per_class: usize) -> Option<&FewLabelResult> {
        self.few
            .iter()
            .find(|f| f.labels_per_class == labels_per_class)
    }
}

/// `per_class` indices of each class of `labels` (classes 0..=max in order,
/// each drawn without replacement from that class's indices by a seeded
/// partial Fisher–Yates shuffle), concatenated in class order. A class with
/// fewer than `per_class` images is an error.
pub fn label_subset(labels: &[u32], per_class: usize, seed: u64) -> Result<Vec<usize>> {
    let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut r = crate::device::rng(seed);
    let mut out = Vec::with_capacity(classes * per_class);
    for c in 0..classes as u32 {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        if idx.len() < per_class {
            return Err(Error::invalid(
                "label_subset",
                format!(
                    "class {c} has {} images, fewer than the {per_class} per class asked for",
                    idx.len()
                ),
            ));
        }
        for k in 0..per_class {
            let j = r.random_range(k..idx.len());
            idx.swap(k, j);
        }
        out.extend_from_slice(&idx[..per_class]);
    }
    Ok(out)
}

/// Runs the probes of the module docs on training features `(n, d)` with
/// labels and held-out features `(m, d)` with labels.
pub fn probe_features(
    train_x: &Tensor,
    train_y: &[u32],
    test_x: &Tensor,
    test_y: &[u32],
    config: &ProbeConfig,
) -> Result<ProbeReport> {
    config.validate()?;
    let train_x = train_x.flatten_from(1)?;
    let test_x = test_x.flatten_from(1)?;
    let knn_all = knn_accuracy(&train_x, train_y, &test_x, test_y, &config.knn)?;
    let linear_all =
        logistic_regression(&train_x, train_y, &test_x, test_y, &config.logistic)?.test_acc;
    let mut few = Vec::with_capacity(config.labels_per_class.len());
    for &n in &config.labels_per_class {
        let (mut lin, mut knn) = (Vec::new(), Vec::new());
        for s in 0..config.subsets as u64 {
            let idx = label_subset(train_y, n, config.seed + s)?;
            // host-ok: evaluation, the label subset's row indices.
            let ids = Tensor::from_vec(
                idx.iter().map(|&i| i as u32).collect::<Vec<u32>>(),
                idx.len(),
                train_x.device(),
            )?;
            let sx = train_x.index_select(&ids, 0)?;
            let sy: Vec<u32> = idx.iter().map(|&i| train_y[i]).collect();
            lin.push(logistic_regression(&sx, &sy, &test_x, test_y, &config.logistic)?.test_acc);
            knn.push(knn_accuracy(&sx, &sy, &test_x, test_y, &config.knn)?);
        }
        few.push(FewLabelResult {
            labels_per_class: n,
            linear: Spread::of(lin),
            knn: Spread::of(knn),
        });
    }
    Ok(ProbeReport {
        knn_all,
        linear_all,
        few,
    })
}
