//! [`SingleProcess`]: the group of one, the default.

use candle_core::Tensor;

use super::communicator::{check_root, Communicator};
use crate::{Error, Result};

/// The communicator of a run that is not distributed: world size 1, every
/// collective returns its input and costs nothing (no copy, no
/// synchronisation). The same training program runs on it unchanged.
///
/// ```
/// use aimass::prelude::*;
/// use aimass::distributed::{Communicator, SingleProcess};
///
/// let comm = SingleProcess::new();
/// let t = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
/// assert_eq!(comm.all_reduce_mean(&t)?.to_vec1::<f32>()?, vec![1.0, 2.0]);
/// assert_eq!((comm.rank(), comm.world_size()), (0, 1));
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl SingleProcess {
    /// The communicator of a one-process run.
    pub fn new() -> Self {
        SingleProcess
    }
}

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn backend(&self) -> &str {
        "single"
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn all_reduce_mean(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        check_root("broadcast", 0, root, 1)?;
        Ok(t.clone())
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        if t.rank() == 0 {
            return Err(Error::communication(
                "all_gather",
                0,
                "cannot gather a scalar along dimension 0: reshape it to (1,)",
            ));
        }
        Ok(t.clone())
    }

    fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>> {
        check_root("broadcast_bytes", 0, root, 1)?;
        Ok(bytes.to_vec())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}
