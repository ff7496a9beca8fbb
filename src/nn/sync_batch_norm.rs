//! Synchronised BatchNorm (SyncBN): batch statistics over every rank of a
//! data-parallel run.

use std::cell::RefCell;
use std::sync::Arc;

use crate::autograd::Replicas;

thread_local! {
    static SYNC: RefCell<Option<Arc<dyn Replicas>>> = const { RefCell::new(None) };
}

/// While this guard lives, every train-mode [`BatchNorm`](super::BatchNorm)
/// forward on this thread normalises with the mean and variance of the
/// **global** batch, the union of every rank's batch (torch's
/// `nn.SyncBatchNorm`), and updates its running statistics with them; the
/// default, outside any scope, is local statistics (each rank its own
/// batch, as PyTorch DDP).
///
/// With SyncBN, `W` ranks with `B/W` samples each compute what one process
/// computes on `B` samples: the same outputs, running statistics and (with
/// the gradients averaged over ranks) the same weights. It costs two small
/// all-reduces (one per statistic, `C + 1` and `C` values) per BatchNorm
/// layer in the forward pass and two in the backward pass, and it skips the
/// fused CPU kernel. Use it when the per-rank batch is small (detection,
/// segmentation, large models), where local statistics are noisy.
///
/// [`crate::distributed::DataParallel`] enters the scope around every step
/// when its `sync_batch_norm` option is on; a hand-written loop enters it
/// itself, around the forward pass (the backward pass needs no scope).
/// Every rank must run the same forwards: the statistics are collective.
/// In eval mode, and with one replica, BatchNorm is unchanged.
///
/// ```
/// use std::sync::Arc;
/// use aimass::prelude::*;
/// use aimass::distributed::{Communicator, SingleProcess};
/// use aimass::nn::{batch_norm, SyncBatchNormScope};
///
/// let varmap = VarMap::new();
/// let bn = batch_norm(3, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
/// let comm: Arc<dyn Communicator> = Arc::new(SingleProcess::new());
/// let _sync = SyncBatchNormScope::enter(aimass::distributed::replicas(&comm));
/// let x = Tensor::ones((4, 3), DType::F32, &Device::Cpu)?;
/// assert_eq!(bn.forward_t(&x, true)?.dims(), &[4, 3]);
/// # Ok::<(), aimass::Error>(())
/// ```
#[must_use = "the scope ends when the guard is dropped"]
pub struct SyncBatchNormScope {
    previous: Option<Arc<dyn Replicas>>,
}

impl SyncBatchNormScope {
    /// Synchronises BatchNorm over `replicas` on this thread until the guard
    /// drops (scopes nest; the previous one is restored).
    pub fn enter(replicas: Arc<dyn Replicas>) -> Self {
        let previous = SYNC.with(|s| s.borrow_mut().replace(replicas));
        SyncBatchNormScope { previous }
    }

    /// The replicas BatchNorm synchronises over on this thread, if any.
    pub fn current() -> Option<Arc<dyn Replicas>> {
        SYNC.with(|s| s.borrow().clone())
    }
}

impl Drop for SyncBatchNormScope {
    fn drop(&mut self) {
        let previous = self.previous.take();
        SYNC.with(|s| *s.borrow_mut() = previous);
    }
}
