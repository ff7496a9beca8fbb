//! MoCo v2 (He et al. 2020, "Momentum Contrast for Unsupervised Visual
//! Representation Learning"; Chen et al. 2020, "Improved Baselines with
//! Momentum Contrastive Learning").
//!
//! The query encoder (backbone and MLP head) is trained; the key encoder
//! is a [`FrozenModel`] copy run in train mode, changed only by
//! [`Ema::from_frozen`] after each optimizer step (`θ_k ← m·θ_k + (1 − m)·θ_q`,
//! momentum `m` = 0.999). Negatives come from a [`KeyQueue`] of the most
//! recent keys. Both views go through each encoder as one batch of 2N, and
//! the loss is symmetric:
//! `½·(InfoNCE(q1, k2, queue) + InfoNCE(q2, k1, queue))`
//! ([`crate::loss::InfoNceLoss`]); after the update the first view's keys
//! replace the oldest entries of the queue (each image enters it once per
//! epoch, as in MoCo). The queue starts as random unit vectors and is part
//! of the checkpoint, with its write pointer. In a data-parallel run
//! ([`MoCo::data_parallel`]) the keys of every rank enter every rank's
//! queue, in rank order, as in MoCo's reference code.

use candle_core::{DType, Device, ModuleT, Tensor};

use super::backbone::{Backbone, Encoder};
use super::core::{halves, online_encoder, stack_views, Core};
use super::optim::SslOptimConfig;
use super::trainer::{impl_ssl_trainer, ExtraState};
use crate::config::config;
use crate::data::augment::derive_seed;
use crate::data::Batch;
use crate::loss::{InfoNceLoss, InfoNceLossConfig, KeyQueue};
use crate::nn::{ForwardMode, FrozenModel, HeadConfig, Model};
use crate::optim::{Ema, EmaConfig};
use crate::train::{Checkpoint, StepOutput};
use crate::{Error, Result};

/// Seed tag of the queue's initial keys.
const QUEUE_TAG: u64 = 0x5155_4555; // "QUEU"

config! {
    /// Settings of [`MoCo`]; defaults from MoCo v2 (Chen et al. 2020).
    pub struct MoCoConfig {
        /// InfoNCE temperature (MoCo v2: 0.2).
        temperature: f64 = 0.2,
        /// Negative keys in the queue (MoCo: 65,536); at least the batch
        /// size, and well below the dataset size so the queue holds no
        /// stale copies of the current images.
        queue_size: usize = 65_536,
        /// Momentum of the key encoder, in `[0, 1]` (MoCo: 0.999).
        momentum: f64 = 0.999,
        /// Projection head; `input_dim` is set to the backbone's feature
        /// width (MoCo v2: Linear–ReLU–Linear, 2048 → 2048 → 128, no BN).
        projector: HeadConfig = HeadConfig::simclr().with_batch_norm(false),
        /// Optimizer and schedule (MoCo v2: SGD, 0.03 × B/256, weight decay 1e-4, cosine).
        optim: SslOptimConfig = SslOptimConfig::moco_v2(),
        /// Seed of the initialisation and the initial queue (default 0).
        seed: u64 = 0,
    }
}

impl MoCoConfig {
    fn validate(&self) -> Result<()> {
        if self.queue_size == 0 {
            return Err(Error::config("MoCoConfig::queue_size", 0, "must be >= 1"));
        }
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(Error::config(
                "MoCoConfig::momentum",
                self.momentum,
                "must be in [0, 1]",
            ));
        }
        Ok(())
    }
}

/// The MoCo v2 trainer (see the module docs and [`crate::ssl`]).
pub struct MoCo<B> {
    online: Model<Encoder<B>>,
    key_encoder: FrozenModel<Encoder<B>>,
    ema: Ema,
    queue: KeyQueue,
    core: Core,
    loss: InfoNceLoss,
    cfg: MoCoConfig,
}

impl<B: ModuleT> MoCo<B> {
    /// Builds the query encoder (seeded with `cfg.seed`) on `device`, the
    /// key encoder as a frozen copy, the EMA, the queue and the optimizer
    /// (over the query encoder only); validates the config.
    pub fn new(backbone: Backbone<B>, cfg: MoCoConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let loss =
            InfoNceLoss::new(InfoNceLossConfig::default().with_temperature(cfg.temperature))?;
        let online = online_encoder(&backbone, &cfg.projector, cfg.seed, device)?;
        let projector = cfg.projector.clone();
        let key_encoder = online.frozen_copy(ForwardMode::Train, move |vb| {
            Encoder::new(&backbone, &projector, vb)
        })?;
        let ema = Ema::from_frozen(
            online.varmap(),
            &key_encoder,
            EmaConfig::default().with_tau_base(cfg.momentum),
        )?;
        let mut rng = crate::device::rng(derive_seed(cfg.seed, &[QUEUE_TAG]));
        let queue = KeyQueue::random(
            cfg.queue_size,
            cfg.projector.output_dim,
            &mut rng,
            DType::F32,
            device,
        )?;
        let core = Core::new(
            vec![("online", online.varmap().clone())],
            vec![("key_encoder", key_encoder.varmap().clone())],
            &cfg.optim,
        )?;
        Ok(MoCo {
            online,
            key_encoder,
            ema,
            queue,
            core,
            loss,
            cfg,
        })
    }

    /// The key encoder (frozen; changed only by the EMA).
    pub fn key_encoder(&self) -> &FrozenModel<Encoder<B>> {
        &self.key_encoder
    }

    /// The queue of negative keys.
    pub fn queue(&self) -> &KeyQueue {
        &self.queue
    }

    fn step_impl(&mut self, batch: &Batch, step: u64) -> Result<StepOutput> {
        let (x, n) = stack_views(batch, "MoCo::train_step")?;
        let replicas = self.core.replicas().cloned();
        let ranks = replicas.as_ref().map_or(1, |r| r.world_size());
        if n * ranks > self.queue.len() {
            return Err(Error::config(
                "MoCoConfig::queue_size",
                self.queue.len(),
                format!("must be at least the (global) batch size ({})", n * ranks),
            ));
        }
        let (online, key_encoder, queue, loss) =
            (&self.online, &self.key_encoder, &self.queue, &self.loss);
        let stepped = self.core.step(step, n, || {
            let (q1, q2) = halves(&online.forward_t(&x, true)?, n)?;
            let (k1, k2) = halves(&key_encoder.forward(&x)?, n)?;
            let negatives = queue.keys();
            let l = ((loss.forward(&q1, &k2, Some(negatives))?
                + loss.forward(&q2, &k1, Some(negatives))?)?
                * 0.5)?;
            Ok((l, k1))
        })?;
        if let Some(k1) = stepped.extra {
            self.ema.update(step + 1)?;
            // Data-parallel: every rank's keys, in rank order (MoCo's
            // reference gathers them too), so the queues stay identical.
            let k1 = match &replicas {
                Some(r) if ranks > 1 => r.gather(&k1.detach())?.all,
                _ => k1,
            };
            self.queue.push(&k1)?;
        }
        Ok(stepped.out)
    }
}

impl<B> ExtraState for MoCo<B> {
    fn save_extra(&self, ckpt: &mut Checkpoint) -> Result<()> {
        ckpt.insert_tensor("queue/keys", self.queue.keys().copy()?);
        ckpt.set_meta("queue.pointer", self.queue.pointer());
        Ok(())
    }

    fn check_extra(&self, ckpt: &Checkpoint) -> Result<()> {
        self.restored_queue(ckpt).map(|_| ())
    }

    fn load_extra(&mut self, ckpt: &Checkpoint) -> Result<()> {
        self.queue = self.restored_queue(ckpt)?;
        Ok(())
    }
}

impl<B> MoCo<B> {
    fn restored_queue(&self, ckpt: &Checkpoint) -> Result<KeyQueue> {
        let keys: &Tensor = ckpt.tensor("queue/keys")?;
        if keys.dims() != self.queue.keys().dims() {
            return Err(Error::shape(
                "restoring the MoCo queue",
                format!(
                    "{:?} (MoCoConfig::queue_size × projector output)",
                    self.queue.keys().dims()
                ),
                keys.dims(),
            ));
        }
        let keys = keys
            .to_dtype(self.queue.keys().dtype())?
            .to_device(self.queue.keys().device())?;
        KeyQueue::from_state(&keys, ckpt.meta_parse("queue.pointer")?)
    }
}

impl_ssl_trainer!(MoCo, MoCoConfig, "moco");
