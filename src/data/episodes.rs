//! N-way K-shot episodes for few-shot learning.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rand::seq::index::sample as sample_indices;
use rand::Rng;

use super::augment::{derive_seed, ImageBatch, Transform};
use super::Dataset;
use crate::config::config;
use crate::device::rng;
use crate::error::Context;
use crate::{Error, Result};

config! {
    /// Options of [`EpisodeSampler`].
    #[derive(Copy, Eq)]
    pub struct EpisodeConfig {
        /// Classes per episode (N). Default 5 (MAML, ProtoNets).
        n_way: usize = 5,
        /// Support images per class (K). Default 1 (the 5-way 1-shot benchmark).
        k_shot: usize = 1,
        /// Query images per class (Q). Default 15 (ProtoNets, MAML's mini-ImageNet).
        q_query: usize = 15,
        /// Seed of the class and image draws and of the transform's
        /// randomness; episode `i` depends only on it and `i`. Default 0.
        seed: u64 = 0,
    }
}

impl EpisodeConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        for (f, v) in [
            ("EpisodeConfig::n_way", self.n_way),
            ("EpisodeConfig::k_shot", self.k_shot),
            ("EpisodeConfig::q_query", self.q_query),
        ] {
            if v == 0 {
                return Err(Error::config(f, 0, "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// One few-shot task. Support and query are class-major (`K` then `Q`
/// images of episode class 0, then class 1, ...), labels are `0..N` in the
/// order of [`Episode::classes`].
#[derive(Debug, Clone)]
pub struct Episode {
    /// Support images, `(N·K)×C×H×W`, `f32`.
    pub support: Tensor,
    /// Support labels in `0..N`, `(N·K,)`, `u32`.
    pub support_labels: Tensor,
    /// Query images, `(N·Q)×C×H×W`, `f32`.
    pub query: Tensor,
    /// Query labels in `0..N`, `(N·Q,)`, `u32`.
    pub query_labels: Tensor,
    /// The dataset class behind each episode label.
    pub classes: Vec<u32>,
    /// Dataset indices of the support images.
    pub support_indices: Vec<usize>,
    /// Dataset indices of the query images.
    pub query_indices: Vec<usize>,
}

/// Samples N-way K-shot Q-query episodes from the allowed classes of a
/// labelled dataset; episode `i` depends only on the seed and `i`.
///
/// ```
/// use aimass::candle::Device;
/// use aimass::data::{EpisodeConfig, EpisodeSampler, InMemoryDataset};
///
/// // 6 classes × 4 images of 1×2×2.
/// let labels: Vec<u32> = (0..24).map(|i| i % 6).collect();
/// let ds = InMemoryDataset::new(vec![0; 24 * 4], labels, (1, 2, 2))?;
/// let cfg = EpisodeConfig::default()
///     .with_n_way(3)
///     .with_k_shot(1)
///     .with_q_query(2)
///     .with_seed(7);
/// let mut sampler = EpisodeSampler::new(ds, &[0, 1, 2, 3], cfg, &Device::Cpu)?;
/// let ep = sampler.sample()?;
/// assert_eq!(ep.support.dims(), &[3, 1, 2, 2]);
/// assert_eq!(ep.query_labels.to_vec1::<u32>()?, vec![0, 0, 1, 1, 2, 2]);
/// assert!(ep.classes.iter().all(|c| *c < 4));
/// # Ok::<(), aimass::Error>(())
/// ```
pub struct EpisodeSampler {
    dataset: Arc<dyn Dataset>,
    by_class: BTreeMap<u32, Vec<usize>>,
    classes: Vec<u32>,
    cfg: EpisodeConfig,
    next: u64,
    transform: Option<Arc<dyn Transform>>,
    device: Device,
}

impl std::fmt::Debug for EpisodeSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpisodeSampler")
            .field("classes", &self.classes)
            .field("cfg", &self.cfg)
            .field("next", &self.next)
            .finish()
    }
}

impl EpisodeSampler {
    /// A sampler over the samples of `dataset` whose label is in `classes`.
    ///
    /// Errors when a count is zero, when fewer than `n_way` classes are
    /// given, when a class repeats, or when a class has fewer than
    /// `k_shot + q_query` images (support and query never share an image).
    pub fn new(
        dataset: impl Dataset + 'static,
        classes: &[u32],
        cfg: EpisodeConfig,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut sorted = classes.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != classes.len() {
            return Err(Error::config(
                "EpisodeSampler classes",
                format!("{classes:?}"),
                "a class is listed twice",
            ));
        }
        if classes.len() < cfg.n_way {
            return Err(Error::config(
                "EpisodeConfig::n_way",
                cfg.n_way,
                format!("only {} classes are allowed ({classes:?})", classes.len()),
            ));
        }
        let mut by_class: BTreeMap<u32, Vec<usize>> =
            classes.iter().map(|&c| (c, Vec::new())).collect();
        for i in 0..dataset.len() {
            if let Some(v) = by_class.get_mut(&dataset.label(i)?) {
                v.push(i);
            }
        }
        let need = cfg.k_shot + cfg.q_query;
        if let Some((c, v)) = by_class.iter().find(|(_, v)| v.len() < need) {
            return Err(Error::invalid(
                "EpisodeSampler::new",
                format!(
                    "class {c} has {} images, fewer than k_shot + q_query = {need}",
                    v.len()
                ),
            ));
        }
        Ok(Self {
            dataset: Arc::new(dataset),
            by_class,
            classes: classes.to_vec(),
            cfg,
            next: 0,
            transform: None,
            device: device.clone(),
        })
    }

    /// Applies `t` to support and query images (e.g. a `Normalize`, or
    /// augmentation; its randomness is derived from the seed and episode).
    pub fn with_transform(mut self, t: impl Transform + 'static) -> Self {
        self.transform = Some(Arc::new(t));
        self
    }

    /// The seed of the sampler ([`EpisodeConfig::seed`]).
    pub fn seed(&self) -> u64 {
        self.cfg.seed
    }

    /// The N-way K-shot Q-query configuration.
    pub fn config(&self) -> &EpisodeConfig {
        &self.cfg
    }

    /// The classes episodes are drawn from.
    pub fn classes(&self) -> &[u32] {
        &self.classes
    }

    /// The index of the next episode [`EpisodeSampler::sample`] gives.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Sets the index of the next episode (to resume).
    pub fn set_position(&mut self, next: u64) {
        self.next = next;
    }

    /// The next episode.
    pub fn sample(&mut self) -> Result<Episode> {
        let e = self.episode(self.next)?;
        self.next += 1;
        Ok(e)
    }

    /// Episode number `i` (a pure function of the seed and `i`).
    pub fn episode(&self, i: u64) -> Result<Episode> {
        let mut r = rng(derive_seed(self.cfg.seed, &[i]));
        // Choose N classes (partial Fisher-Yates over the allowed classes).
        let mut pool = self.classes.clone();
        for k in 0..self.cfg.n_way {
            let j = r.random_range(k..pool.len());
            pool.swap(k, j);
        }
        let chosen: Vec<u32> = pool[..self.cfg.n_way].to_vec();
        let (k, q) = (self.cfg.k_shot, self.cfg.q_query);
        let mut support_indices = Vec::with_capacity(chosen.len() * k);
        let mut query_indices = Vec::with_capacity(chosen.len() * q);
        for c in &chosen {
            let members = self.by_class.get(c).map(Vec::as_slice).unwrap_or(&[]);
            let picks = sample_indices(&mut r, members.len(), k + q);
            for (n, p) in picks.iter().enumerate() {
                if n < k {
                    support_indices.push(members[p]);
                } else {
                    query_indices.push(members[p]);
                }
            }
        }
        let support_labels: Vec<u32> = (0..chosen.len() as u32)
            .flat_map(|l| std::iter::repeat_n(l, k))
            .collect();
        let query_labels: Vec<u32> = (0..chosen.len() as u32)
            .flat_map(|l| std::iter::repeat_n(l, q))
            .collect();
        let seed = derive_seed(self.cfg.seed, &[i, 1]);
        let support = self.images(&support_indices, seed)?;
        let query = self.images(&query_indices, derive_seed(seed, &[2]))?;
        let d = &self.device;
        Ok(Episode {
            support,
            // host-ok: an episode's labels go to the device once (u32).
            support_labels: Tensor::from_vec(support_labels, support_indices.len(), d)
                .context("episode labels")?,
            query,
            // host-ok: likewise.
            query_labels: Tensor::from_vec(query_labels, query_indices.len(), d)
                .context("episode labels")?,
            classes: chosen,
            support_indices,
            query_indices,
        })
    }

    fn images(&self, indices: &[usize], seed: u64) -> Result<Tensor> {
        let (c, h, w) = self.dataset.image_shape();
        let mut px = Vec::with_capacity(indices.len() * c * h * w);
        for &i in indices {
            px.extend_from_slice(&self.dataset.get(i)?.pixels);
        }
        let mut b = ImageBatch::from_u8(&px, (indices.len(), c, h, w))?;
        if let Some(t) = &self.transform {
            let keys: Vec<u64> = indices.iter().map(|&i| i as u64).collect();
            b = b.augment(t.as_ref(), seed, Some(&keys))?;
        }
        b.to_tensor(&self.device)
    }
}

/// Splits `classes` into disjoint meta-train and meta-test sets, the last
/// `n_test` of a seeded shuffle going to meta-test.
///
/// ```
/// let (train, test) = aimass::data::split_classes(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 5, 0)?;
/// assert_eq!((train.len(), test.len()), (5, 5));
/// assert!(train.iter().all(|c| !test.contains(c)));
/// # Ok::<(), aimass::Error>(())
/// ```
pub fn split_classes(classes: &[u32], n_test: usize, seed: u64) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut v = classes.to_vec();
    v.sort_unstable();
    v.dedup();
    if v.len() != classes.len() {
        return Err(Error::invalid(
            "split_classes",
            format!("a class is listed twice in {classes:?}"),
        ));
    }
    if n_test > v.len() {
        return Err(Error::invalid(
            "split_classes",
            format!("cannot hold out {n_test} of {} classes", v.len()),
        ));
    }
    let mut r = rng(derive_seed(seed, &[0x434c_4153])); // "CLAS"
    for i in (1..v.len()).rev() {
        v.swap(i, r.random_range(0..=i));
    }
    let test = v.split_off(v.len() - n_test);
    Ok((v, test))
}
