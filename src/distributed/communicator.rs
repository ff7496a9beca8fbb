//! The [`Communicator`] trait: the collectives data-parallel training needs.

use std::time::Duration;

use candle_core::{DType, Tensor};

use crate::config::config;
use crate::{Error, Result};

/// The collective operations of data-parallel training, over a group of
/// `world_size` ranks (processes, threads or GPUs) of which this is `rank`.
///
/// Every operation is collective: all ranks call it, in the same order,
/// with tensors of the same dtype (and shape, except for the first
/// dimension in [`Communicator::all_gather`]); the result is on the
/// device of the tensor passed in. A rank that does not arrive within the
/// configured timeout ([`CommConfig::timeout_secs`]) makes the others fail
/// with [`Error::Communication`] instead of waiting forever.
///
/// Backends: [`SingleProcess`](super::SingleProcess) (world size 1, the
/// default, free), [`ThreadCommunicator`](super::ThreadCommunicator) (ranks
/// as threads of one process), `MpiCommunicator` (feature `mpi`: processes
/// and machines, launched by `mpirun`) and `NcclCommunicator` (feature
/// `nccl`: CUDA devices).
///
/// Reductions accumulate in the tensor's dtype for f32 and f64, and in f32
/// for f16 and bf16; integer tensors can be broadcast and gathered, not
/// reduced.
pub trait Communicator: Send + Sync + std::fmt::Debug {
    /// This rank, from 0.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn world_size(&self) -> usize;

    /// The backend's name (`single`, `threads`, `mpi`, `nccl`).
    fn backend(&self) -> &str;

    /// The elementwise sum of every rank's `t`, on every rank.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;

    /// The elementwise mean of every rank's `t`, on every rank.
    fn all_reduce_mean(&self, t: &Tensor) -> Result<Tensor> {
        let sum = self.all_reduce_sum(t)?;
        Ok((sum * (1.0 / self.world_size() as f64))?)
    }

    /// Rank `root`'s `t`, on every rank (the other ranks' `t` gives the
    /// shape, dtype and device of the result).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;

    /// Every rank's `t` concatenated along dimension 0 in rank order, on
    /// every rank; the size of dimension 0 may differ between ranks.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;

    /// Rank `root`'s bytes on every rank (the other ranks' `bytes` are
    /// ignored): checkpoints, configurations.
    fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>>;

    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;
}

config! {
    /// Settings of a communicator.
    pub struct CommConfig {
        /// Seconds a collective waits for the other ranks before it fails
        /// with [`Error::Communication`] (default 600, the NCCL timeout of
        /// torch.distributed): long enough for a rank that evaluates or
        /// writes a checkpoint while the others wait, short enough that a
        /// rank that died or hangs stops the run.
        timeout_secs: f64 = 600.0,
    }
}

impl CommConfig {
    /// Checks every field; called by the constructors that take it.
    pub(crate) fn validate(&self) -> Result<()> {
        if !(self.timeout_secs.is_finite() && self.timeout_secs > 0.0) {
            return Err(Error::config(
                "CommConfig::timeout_secs",
                self.timeout_secs,
                "must be finite and > 0 (seconds)",
            ));
        }
        Ok(())
    }

    /// The timeout as a duration.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_secs)
    }
}

/// Checks that `root` is a rank of a group of `world` ranks.
pub(crate) fn check_root(op: &str, rank: usize, root: usize, world: usize) -> Result<()> {
    if root >= world {
        return Err(Error::communication(
            op,
            rank,
            format!("root {root} is not a rank of this group of {world}"),
        ));
    }
    Ok(())
}

/// A tensor's values on the host, in the dtype its reduction accumulates in.
#[derive(Debug, Clone)]
pub(crate) enum HostValues {
    /// f32 values (f32, f16 and bf16 tensors).
    F32(Vec<f32>),
    /// f64 values.
    F64(Vec<f64>),
}

impl HostValues {
    /// Copies `t` to the host (one transfer) for a reduction.
    pub(crate) fn read(op: &str, rank: usize, t: &Tensor) -> Result<Self> {
        let flat = t.flatten_all()?;
        Ok(match t.dtype() {
            // host-ok: host-memory collectives (threads, MPI) reduce host buffers.
            DType::F64 => HostValues::F64(flat.to_vec1::<f64>()?),
            DType::F32 | DType::F16 | DType::BF16 => {
                // host-ok: host-memory collectives (threads, MPI) reduce host buffers.
                HostValues::F32(flat.to_dtype(DType::F32)?.to_vec1::<f32>()?)
            }
            other => {
                return Err(Error::communication(
                    op,
                    rank,
                    format!(
                        "cannot reduce a {other:?} tensor: reductions need f32, f64, f16 or bf16"
                    ),
                ))
            }
        })
    }

    /// The values as a tensor shaped, typed and placed like `like`.
    pub(crate) fn to_tensor(&self, like: &Tensor) -> Result<Tensor> {
        let t = match self {
            // host-ok: the reduced values go back to the tensor's device (one transfer).
            HostValues::F32(v) => Tensor::from_slice(v, like.dims(), &candle_core::Device::Cpu)?,
            // host-ok: the reduced values go back to the tensor's device (one transfer).
            HostValues::F64(v) => Tensor::from_slice(v, like.dims(), &candle_core::Device::Cpu)?,
        };
        Ok(t.to_dtype(like.dtype())?.to_device(like.device())?)
    }
}

/// A tensor's raw bytes (any dtype, row-major), for broadcasts and gathers.
pub(crate) fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    macro_rules! bytes {
        ($ty:ty) => {{
            // host-ok: host-memory collectives (threads, MPI) move host buffers.
            let v = flat.to_vec1::<$ty>()?;
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }};
    }
    Ok(match t.dtype() {
        DType::U8 => bytes!(u8),
        DType::U32 => bytes!(u32),
        DType::I64 => bytes!(i64),
        DType::F32 => bytes!(f32),
        DType::F64 => bytes!(f64),
        DType::F16 => bytes!(half::f16),
        DType::BF16 => bytes!(half::bf16),
        other => {
            return Err(Error::invalid(
                "Communicator",
                format!("{other:?} tensors cannot be sent"),
            ))
        }
    })
}

/// The tensor of dtype `dtype` and shape `dims` whose bytes are `bytes`,
/// on `device`.
pub(crate) fn tensor_from_bytes(
    bytes: &[u8],
    dims: &[usize],
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    if bytes.len() != n * dtype.size_in_bytes() {
        return Err(Error::invalid(
            "Communicator",
            format!(
                "received {} bytes for a {dtype:?} tensor of shape {dims:?} ({} bytes): the ranks passed tensors of different shapes or dtypes",
                bytes.len(),
                n * dtype.size_in_bytes()
            ),
        ));
    }
    macro_rules! from {
        ($ty:ty, $w:expr) => {{
            let v: Vec<$ty> = bytes
                .chunks_exact($w)
                .map(|c| <$ty>::from_le_bytes(c.try_into().unwrap_or([0; $w])))
                .collect();
            // host-ok: received bytes become a tensor on the caller's device (one transfer).
            Tensor::from_vec(v, dims, &candle_core::Device::Cpu)?
        }};
    }
    let t = match dtype {
        DType::U8 => from!(u8, 1),
        DType::U32 => from!(u32, 4),
        DType::I64 => from!(i64, 8),
        DType::F32 => from!(f32, 4),
        DType::F64 => from!(f64, 8),
        DType::F16 => from!(half::f16, 2),
        DType::BF16 => from!(half::bf16, 2),
        other => {
            return Err(Error::invalid(
                "Communicator",
                format!("{other:?} tensors cannot be received"),
            ))
        }
    };
    Ok(t.to_device(device)?)
}
