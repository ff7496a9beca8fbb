//! [`DataLoader`]: seeded shuffling, batching, parallel augmentation and a
//! background thread that prepares the next batches.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use rand::Rng;

use super::augment::{derive_seed, ImageBatch, MultiView, Transform};
use super::{Dataset, Shard};
use crate::config::config;
use crate::device::rng;
use crate::error::Context;
use crate::{Error, Result};

const SHUFFLE_TAG: u64 = 0x5348_5546; // "SHUF"
const AUGMENT_TAG: u64 = 0x4155_474d; // "AUGM"

config! {
    /// Options of [`DataLoader`].
    #[derive(Eq)]
    pub struct DataLoaderConfig {
        /// Samples per batch (per rank with a [`Shard`]: a global batch is
        /// then `batch_size × world_size`). Default 256 (the reference
        /// runs' batch).
        batch_size: usize = 256,
        /// Reshuffle the order at every epoch. Default `true`.
        shuffle: bool = true,
        /// Drop the last, incomplete batch. Default `false` (torch's default).
        drop_last: bool = false,
        /// The seed of shuffling and augmentation. Default 0.
        seed: u64 = 0,
        /// Batches prepared ahead on a background thread; 0 prepares each batch
        /// on the caller's thread when asked. Default 2.
        prefetch: usize = 2,
        /// This rank's part of every global batch in data-parallel
        /// training (see [`Shard`]). Default: the whole data.
        shard: Shard = Shard::whole(),
    }
}

impl DataLoaderConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::config(
                "DataLoaderConfig::batch_size",
                0,
                "must be at least 1",
            ));
        }
        if self.prefetch > 1024 {
            return Err(Error::config(
                "DataLoaderConfig::prefetch",
                self.prefetch,
                "must be at most 1024",
            ));
        }
        Ok(())
    }
}

/// Where a loader is: the next batch it will give is batch `batch` of epoch
/// `epoch`. Save it in a checkpoint and [`DataLoader::set_position`] it to
/// resume exactly (same order, same augmented pixels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LoaderPosition {
    /// The loader's seed (checked on restore).
    pub seed: u64,
    /// The epoch, from 0.
    pub epoch: u64,
    /// The index of the next batch in the epoch.
    pub batch: usize,
}

/// One batch: the view tensors (`N×C×H×W`, `f32`), the labels (`u32`) and
/// which samples they are.
#[derive(Debug, Clone)]
pub struct Batch {
    /// One tensor per view (one when the loader has a single pipeline or none).
    pub views: Vec<Tensor>,
    /// Labels, shape `(N,)`, dtype `u32`.
    pub labels: Tensor,
    /// Dataset indices of the samples, in batch order.
    pub indices: Vec<usize>,
    /// The epoch this batch belongs to.
    pub epoch: u64,
    /// Its index within the epoch.
    pub batch: usize,
}

impl Batch {
    /// The first (often only) view; an error only for a hand-built batch without views.
    pub fn images(&self) -> Result<&Tensor> {
        self.views
            .first()
            .ok_or_else(|| Error::invalid("Batch::images", "the batch has no views"))
    }
}

/// A batch prepared on the host, before device placement.
struct HostBatch {
    views: Vec<ImageBatch>,
    labels: Vec<u32>,
    indices: Vec<usize>,
    batch: usize,
}

/// Iterates a [`Dataset`] in seeded batches.
///
/// Each epoch has its own permutation (`shuffle`), each sample its own
/// augmentation stream derived from (seed, epoch, view, dataset index), so
/// the same seed gives the same batches and pixels whatever the number of
/// threads, and a loader restored to a [`LoaderPosition`] continues
/// exactly. Without a pipeline a batch holds the images scaled to `[0, 1]`.
///
/// ```
/// use aimass::candle::Device;
/// use aimass::data::{DataLoader, DataLoaderConfig, InMemoryDataset};
///
/// let ds = InMemoryDataset::new(vec![0; 10 * 4], (0..10).collect(), (1, 2, 2))?;
/// let mut loader = DataLoader::new(ds, DataLoaderConfig::default().with_batch_size(4), &Device::Cpu)?;
/// assert_eq!(loader.len(), 3); // 4 + 4 + 2
/// let mut seen = 0;
/// for batch in loader.epoch() {
///     let batch = batch?;
///     seen += batch.indices.len();
///     assert_eq!(batch.images()?.dims()[1..], [1, 2, 2]);
/// }
/// assert_eq!(seen, 10);
/// assert_eq!(loader.position().epoch, 1);
/// # Ok::<(), aimass::Error>(())
/// ```
pub struct DataLoader {
    dataset: Arc<dyn Dataset>,
    cfg: DataLoaderConfig,
    views: Option<MultiView>,
    device: Device,
    pos: LoaderPosition,
}

impl std::fmt::Debug for DataLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataLoader")
            .field("len", &self.dataset.len())
            .field("cfg", &self.cfg)
            .field("views", &self.views.as_ref().map(|v| v.len()))
            .field("pos", &self.pos)
            .finish()
    }
}

impl DataLoader {
    /// A loader over `dataset` placing batches on `device`.
    pub fn new(
        dataset: impl Dataset + 'static,
        cfg: DataLoaderConfig,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        check_shard(&cfg, dataset.len())?;
        let pos = LoaderPosition {
            seed: cfg.seed,
            epoch: 0,
            batch: 0,
        };
        Ok(Self {
            dataset: Arc::new(dataset),
            cfg,
            views: None,
            device: device.clone(),
            pos,
        })
    }

    /// Augments every batch with `pipeline` (one view).
    pub fn with_transform(self, pipeline: impl Transform + 'static) -> Self {
        let t: Arc<dyn Transform> = Arc::new(pipeline);
        self.with_views(MultiView::from_single(t))
    }

    /// Makes several views of every batch (e.g. [`presets::simclr_views`](super::augment::presets::simclr_views)).
    pub fn with_views(mut self, views: MultiView) -> Self {
        self.views = Some(views);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &DataLoaderConfig {
        &self.cfg
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    /// Batches per epoch (the same on every rank of a [`Shard`]).
    pub fn len(&self) -> usize {
        let (n, b) = (self.dataset.len(), global_batch(&self.cfg));
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// Whether an epoch has no batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The position: the next batch [`DataLoader::epoch`] will give.
    pub fn position(&self) -> LoaderPosition {
        self.pos
    }

    /// Moves to `pos` (e.g. from a checkpoint). The seed must be this
    /// loader's and the batch index within an epoch.
    pub fn set_position(&mut self, pos: LoaderPosition) -> Result<()> {
        if pos.seed != self.cfg.seed {
            return Err(Error::config(
                "LoaderPosition::seed",
                pos.seed,
                format!(
                    "the loader was built with seed {}; a position only resumes the same seed",
                    self.cfg.seed
                ),
            ));
        }
        if pos.batch > self.len() {
            return Err(Error::config(
                "LoaderPosition::batch",
                pos.batch,
                format!("an epoch has {} batches", self.len()),
            ));
        }
        self.pos = if pos.batch == self.len() && !self.is_empty() {
            LoaderPosition {
                epoch: pos.epoch + 1,
                batch: 0,
                ..pos
            }
        } else {
            pos
        };
        Ok(())
    }

    /// The sample order of `epoch` (a seeded permutation, or `0..len` without shuffling).
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        epoch_order(self.dataset.len(), self.cfg.shuffle, self.cfg.seed, epoch)
    }

    /// Batch `batch` of `epoch`, prepared on this thread (does not move the position).
    pub fn batch_at(&self, epoch: u64, batch: usize) -> Result<Batch> {
        if batch >= self.len() {
            return Err(Error::invalid(
                "DataLoader::batch_at",
                format!("batch {batch} of an epoch of {} batches", self.len()),
            ));
        }
        let order = self.order(epoch);
        let host = host_batch(
            self.dataset.as_ref(),
            self.views.as_ref(),
            &order,
            &self.cfg,
            epoch,
            batch,
        )?;
        to_device(host, epoch, &self.device)
    }

    /// The remaining batches of the current epoch, prepared ahead on a
    /// background thread. Each batch taken advances the position; after the
    /// last one the position is the start of the next epoch.
    pub fn epoch(&mut self) -> EpochIter<'_> {
        let epoch = self.pos.epoch;
        let start = self.pos.batch;
        let end = self.len();
        let mut it = EpochIter {
            epoch,
            next: start,
            end,
            rx: None,
            worker: None,
            failed: false,
            order: None,
            loader: self,
        };
        if it.loader.cfg.prefetch > 0 && start < end {
            let (tx, rx) = sync_channel(it.loader.cfg.prefetch);
            let dataset = Arc::clone(&it.loader.dataset);
            let views = it.loader.views.clone();
            let cfg = it.loader.cfg.clone();
            let spawned = std::thread::Builder::new()
                .name("aimass-loader".into())
                .spawn(move || {
                    let order = epoch_order(dataset.len(), cfg.shuffle, cfg.seed, epoch);
                    for b in start..end {
                        let r =
                            host_batch(dataset.as_ref(), views.as_ref(), &order, &cfg, epoch, b);
                        let stop = r.is_err();
                        if tx.send(r).is_err() || stop {
                            return;
                        }
                    }
                });
            // If no thread can be spawned, fall back to preparing batches on demand.
            if let Ok(h) = spawned {
                it.rx = Some(rx);
                it.worker = Some(h);
            }
        }
        it
    }
}

/// Samples in a global batch: the batch size times the number of ranks.
fn global_batch(cfg: &DataLoaderConfig) -> usize {
    cfg.batch_size * cfg.shard.world_size()
}

/// Refuses a shard that would give a rank an empty last batch.
fn check_shard(cfg: &DataLoaderConfig, n: usize) -> Result<()> {
    let w = cfg.shard.world_size();
    let last = n % global_batch(cfg);
    if w > 1 && !cfg.drop_last && last > 0 && last < w {
        return Err(Error::config(
            "DataLoaderConfig::shard",
            format!("rank {} of {w}", cfg.shard.rank()),
            format!(
                "the last global batch of an epoch has {last} sample(s) ({n} samples, global batches of {} × {w}), fewer than the {w} ranks, so some rank would get none: set drop_last, or a batch size that leaves at least {w}",
                cfg.batch_size
            ),
        ));
    }
    Ok(())
}

fn epoch_order(n: usize, shuffle: bool, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut r = rng(derive_seed(seed, &[SHUFFLE_TAG, epoch]));
        for i in (1..n).rev() {
            order.swap(i, r.random_range(0..=i));
        }
    }
    order
}

fn host_batch(
    dataset: &dyn Dataset,
    views: Option<&MultiView>,
    order: &[usize],
    cfg: &DataLoaderConfig,
    epoch: u64,
    batch: usize,
) -> Result<HostBatch> {
    // The global batch, then this rank's part of it.
    let lo = batch * global_batch(cfg);
    let hi = (lo + global_batch(cfg)).min(order.len());
    let part = cfg.shard.part(hi.saturating_sub(lo));
    let indices = order
        .get(lo + part.start..lo + part.end)
        .ok_or_else(|| Error::invalid("DataLoader", format!("batch {batch} is past the end")))?
        .to_vec();
    let (c, h, w) = dataset.image_shape();
    let per = c * h * w;
    let mut pixels = Vec::with_capacity(indices.len() * per);
    let mut labels = Vec::with_capacity(indices.len());
    for &i in &indices {
        let s = dataset.get(i)?;
        if s.pixels.len() != per {
            return Err(Error::shape(
                format!("DataLoader reading sample {i}"),
                format!("{per} bytes ({c}×{h}×{w}, the dataset's image_shape)"),
                s.pixels.len(),
            ));
        }
        pixels.extend_from_slice(&s.pixels);
        labels.push(s.label);
    }
    let raw = ImageBatch::from_u8(&pixels, (indices.len(), c, h, w))?;
    let views = match views {
        None => vec![raw],
        Some(v) => {
            let keys: Vec<u64> = indices.iter().map(|&i| i as u64).collect();
            v.apply(
                &raw,
                derive_seed(cfg.seed, &[AUGMENT_TAG, epoch]),
                Some(&keys),
            )?
        }
    };
    Ok(HostBatch {
        views,
        labels,
        indices,
        batch,
    })
}

fn to_device(host: HostBatch, epoch: u64, device: &Device) -> Result<Batch> {
    let views = host
        .views
        .iter()
        .map(|v| v.to_tensor(device))
        .collect::<Result<Vec<_>>>()?;
    let n = host.labels.len();
    // host-ok: a batch's labels go to the device once (u32).
    let labels =
        Tensor::from_vec(host.labels, n, device).context("DataLoader: labels to device")?;
    Ok(Batch {
        views,
        labels,
        indices: host.indices,
        epoch,
        batch: host.batch,
    })
}

/// The batches of one epoch; see [`DataLoader::epoch`].
pub struct EpochIter<'a> {
    loader: &'a mut DataLoader,
    epoch: u64,
    next: usize,
    end: usize,
    rx: Option<Receiver<Result<HostBatch>>>,
    worker: Option<JoinHandle<()>>,
    failed: bool,
    order: Option<Vec<usize>>,
}

impl Iterator for EpochIter<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.next >= self.end {
            return None;
        }
        let host = match &self.rx {
            Some(rx) => match rx.recv() {
                Ok(r) => r,
                Err(_) => Err(Error::invalid(
                    "DataLoader",
                    "the background loader thread stopped unexpectedly",
                )),
            },
            None => {
                let l = &*self.loader;
                let order = self.order.get_or_insert_with(|| l.order(self.epoch));
                host_batch(
                    l.dataset.as_ref(),
                    l.views.as_ref(),
                    order,
                    &l.cfg,
                    self.epoch,
                    self.next,
                )
            }
        };
        let out = host.and_then(|h| to_device(h, self.epoch, &self.loader.device));
        if out.is_err() {
            self.failed = true;
            return Some(out);
        }
        self.next += 1;
        self.loader.pos = if self.next >= self.end {
            LoaderPosition {
                seed: self.loader.cfg.seed,
                epoch: self.epoch + 1,
                batch: 0,
            }
        } else {
            LoaderPosition {
                seed: self.loader.cfg.seed,
                epoch: self.epoch,
                batch: self.next,
            }
        };
        Some(out)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.end.saturating_sub(self.next);
        (n, Some(n))
    }
}

impl Drop for EpochIter<'_> {
    fn drop(&mut self) {
        // Closing the channel makes the worker's next send fail, so it stops.
        self.rx = None;
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
    }
}
