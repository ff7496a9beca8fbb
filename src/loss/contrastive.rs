//! Contrastive losses: NT-Xent (SimCLR) and InfoNCE with a queue (MoCo).
//!
//! **NT-Xent** (Chen et al. 2020, "A Simple Framework for Contrastive
//! Learning of Visual Representations"). The two views' embeddings
//! `z1, z2` `(N, D)` are L2-normalised and stacked into `u` `(2N, D)`;
//! `s_ij = ⟨u_i, u_j⟩ / τ`; the positive of row `i` is its other view `p(i)`:
//!
//! ```text
//! ℓ_i = −s_{i,p(i)} + log Σ_{j ≠ i} exp(s_ij)      NT-Xent = mean over the 2N rows
//! ```
//!
//! Each row has 1 positive and 2N − 2 negatives (both views of every other
//! sample); the loss is symmetric in the views. Identical to lightly's
//! `NTXentLoss` without memory bank. Default τ = 0.5 (SimCLR on CIFAR;
//! 0.1 for ImageNet-size batches).
//!
//! **InfoNCE** (Oord et al. 2018; MoCo, He et al. 2020) for queries `q` and
//! positive keys `k` `(N, D)`, L2-normalised:
//!
//! ```text
//! with a queue (K, D) of negatives:  logits_i = [⟨q_i, k_i⟩, ⟨q_i, queue_1⟩, …, ⟨q_i, queue_K⟩] / τ,  label 0
//! without a queue (in-batch):        logits_i = [⟨q_i, k_1⟩, …, ⟨q_i, k_N⟩] / τ,                       label i
//! InfoNCE = mean_i ( −log softmax(logits_i)[label] )
//! ```
//!
//! The queue is always detached; the keys are detached by default (MoCo's
//! keys come from the momentum encoder, which gets no gradient). Default
//! τ = 0.2 (MoCo v2; MoCo v1 used 0.07). The queue form is not symmetric
//! (MoCo v1/v2); symmetrise by calling it twice with the views swapped.

use super::{check_batch, check_float, check_positive, check_rank, check_same_shape};
use crate::config::config;
use crate::ops;
use crate::{Error, Result};
use candle_core::{DType, Tensor};

config! {
    /// Configuration of [`NtXentLoss`].
    pub struct NtXentLossConfig {
        /// Temperature τ > 0 (SimCLR CIFAR-10 and lightly: 0.5).
        temperature: f64 = 0.5,
        /// `eps` of the L2 normalisation (torch's `F.normalize`: 1e-12).
        eps: f64 = 1e-12,
    }
}

impl NtXentLossConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        check_positive("NtXentLossConfig::temperature", self.temperature)?;
        check_positive("NtXentLossConfig::eps", self.eps)?;
        Ok(())
    }
}

/// SimCLR's NT-Xent loss (see the module docs).
#[derive(Debug, Clone)]
pub struct NtXentLoss {
    cfg: NtXentLossConfig,
}

impl NtXentLoss {
    /// Validates the configuration.
    pub fn new(cfg: NtXentLossConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &NtXentLossConfig {
        &self.cfg
    }

    /// The loss of two views' embeddings `z1`, `z2` of shape `(N, D)`, N >= 2.
    pub fn forward(&self, z1: &Tensor, z2: &Tensor) -> Result<Tensor> {
        let n = z1.dims().first().copied().unwrap_or(0);
        self.forward_rows(z1, z2, 0..n)
    }

    /// NT-Xent of the anchors `rows` of both views against every embedding
    /// of `z1`, `z2` `(M, D)`: the loss of one rank of a data-parallel run
    /// whose negatives come from every rank (`z1`, `z2` gathered in rank
    /// order, `rows` this rank's). The mean over the ranks of their losses
    /// is [`NtXentLoss::forward`] of the whole batch; `rows = 0..M` is
    /// `forward` itself.
    ///
    /// ```
    /// use aimass::candle::{Device, Tensor};
    /// use aimass::loss::{NtXentLoss, NtXentLossConfig};
    /// let z1 = Tensor::randn(0f32, 1., (4, 8), &Device::Cpu)?;
    /// let z2 = Tensor::randn(0f32, 1., (4, 8), &Device::Cpu)?;
    /// let loss = NtXentLoss::new(NtXentLossConfig::default())?;
    /// let halves = (loss.forward_rows(&z1, &z2, 0..2)? + loss.forward_rows(&z1, &z2, 2..4)?)?;
    /// let whole = loss.forward(&z1, &z2)?.to_scalar::<f32>()?;
    /// assert!((halves.to_scalar::<f32>()? / 2.0 - whole).abs() < 1e-5);
    /// # Ok::<(), aimass::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`NtXentLoss::forward`], and [`Error::InvalidArgument`] for an
    /// empty `rows` or one past `M`.
    pub fn forward_rows(
        &self,
        z1: &Tensor,
        z2: &Tensor,
        rows: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        const OP: &str = "nt_xent_loss";
        check_rank(OP, "embeddings (N, D)", z1, 2)?;
        check_float(OP, "embeddings", z1)?;
        check_same_shape(OP, z1, z2)?;
        let m = check_batch(OP, z1, 2)?;
        if rows.is_empty() || rows.end > m {
            return Err(Error::invalid(
                OP,
                format!("anchor rows {rows:?} must be a non-empty range within the {m} rows"),
            ));
        }
        let (start, n) = (rows.start, rows.len());
        let z2 = z2.to_dtype(z1.dtype())?;
        let eps = self.cfg.eps;
        let u1 = ops::l2_normalize(z1, 1, eps)?;
        let u2 = ops::l2_normalize(&z2, 1, eps)?;
        let (a1, a2) = (u1.narrow(0, start, n)?, u2.narrow(0, start, n)?);
        let u = Tensor::cat(&[&u1, &u2], 0)?;
        let anchors = Tensor::cat(&[&a1, &a2], 0)?;
        let tau = self.cfg.temperature;
        let s = (anchors.matmul(&u.t()?)? / tau)?;
        // Each anchor's own column (row `start + i` of view 1 is column
        // `start + i`, of view 2 column `M + start + i`) is left out.
        let eye = Tensor::eye(2 * m, DType::U8, s.device())?;
        let own = Tensor::cat(&[eye.narrow(0, start, n)?, eye.narrow(0, m + start, n)?], 0)?;
        let neg_inf = crate::host::full(f64::NEG_INFINITY, (2 * n, 2 * m), s.dtype(), s.device())?;
        let s = own.where_cond(&neg_inf, &s)?;
        let lse = ops::logsumexp(&s, 1, false)?;
        let pos = ((a1 * a2)?.sum(1)? / tau)?;
        let pos = Tensor::cat(&[&pos, &pos], 0)?;
        Ok((lse - pos)?.mean_all()?)
    }
}

/// NT-Xent of two views' embeddings `(N, D)` at `temperature` (see the
/// module docs); N >= 2.
pub fn nt_xent_loss(z1: &Tensor, z2: &Tensor, temperature: f64) -> Result<Tensor> {
    NtXentLoss::new(NtXentLossConfig::default().with_temperature(temperature))?.forward(z1, z2)
}

config! {
    /// Configuration of [`InfoNceLoss`].
    pub struct InfoNceLossConfig {
        /// Temperature τ > 0 (MoCo v2: 0.2; MoCo v1: 0.07).
        temperature: f64 = 0.2,
        /// Whether the keys are detached (MoCo: true, the key encoder is a
        /// momentum copy that gets no gradient).
        detach_keys: bool = true,
        /// `eps` of the L2 normalisation (torch's `F.normalize`: 1e-12).
        eps: f64 = 1e-12,
    }
}

impl InfoNceLossConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        check_positive("InfoNceLossConfig::temperature", self.temperature)?;
        check_positive("InfoNceLossConfig::eps", self.eps)?;
        Ok(())
    }
}

/// InfoNCE with a queue of negatives (MoCo) or in-batch negatives (see the
/// module docs).
#[derive(Debug, Clone)]
pub struct InfoNceLoss {
    cfg: InfoNceLossConfig,
}

impl InfoNceLoss {
    /// Validates the configuration.
    pub fn new(cfg: InfoNceLossConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &InfoNceLossConfig {
        &self.cfg
    }

    /// The loss of queries `q` and their positive keys `k` `(N, D)`. With
    /// `queue` `(K, D)` (K >= 1) the negatives are the queue (N >= 1);
    /// without, they are the other keys of the batch (N >= 2).
    pub fn forward(&self, q: &Tensor, k: &Tensor, queue: Option<&Tensor>) -> Result<Tensor> {
        const OP: &str = "info_nce_loss";
        check_rank(OP, "queries (N, D)", q, 2)?;
        check_float(OP, "queries", q)?;
        check_same_shape(OP, q, k)?;
        let eps = self.cfg.eps;
        let tau = self.cfg.temperature;
        let k = k.to_dtype(q.dtype())?;
        let k = if self.cfg.detach_keys { k.detach() } else { k };
        let qn = ops::l2_normalize(q, 1, eps)?;
        let kn = ops::l2_normalize(&k, 1, eps)?;
        match queue {
            Some(queue) => {
                check_batch(OP, q, 1)?;
                check_rank(OP, "queue (K, D)", queue, 2)?;
                let d = q.dim(1)?;
                if queue.dim(1)? != d || queue.dim(0)? == 0 {
                    return Err(Error::shape(
                        OP,
                        format!("a non-empty queue (K, {d})"),
                        queue.dims(),
                    ));
                }
                let queue = queue.detach().to_dtype(q.dtype())?;
                let qu = ops::l2_normalize(&queue, 1, eps)?;
                let pos = (&qn * &kn)?.sum_keepdim(1)?;
                let neg = qn.matmul(&qu.t()?)?;
                let logits = (Tensor::cat(&[&pos, &neg], 1)? / tau)?;
                let lse = ops::logsumexp(&logits, 1, false)?;
                Ok((lse - (pos.squeeze(1)? / tau)?)?.mean_all()?)
            }
            None => {
                check_batch(OP, q, 2)?;
                let logits = (qn.matmul(&kn.t()?)? / tau)?;
                let lse = ops::logsumexp(&logits, 1, false)?;
                let pos = ((&qn * &kn)?.sum(1)? / tau)?;
                Ok((lse - pos)?.mean_all()?)
            }
        }
    }
}

/// InfoNCE of queries `q` against positive keys `k` `(N, D)` and negatives
/// from `queue` `(K, D)` (MoCo) or, when `queue` is `None`, the other keys of
/// the batch. Keys and queue are detached.
pub fn info_nce_loss(
    q: &Tensor,
    k: &Tensor,
    queue: Option<&Tensor>,
    temperature: f64,
) -> Result<Tensor> {
    InfoNceLoss::new(InfoNceLossConfig::default().with_temperature(temperature))?
        .forward(q, k, queue)
}
