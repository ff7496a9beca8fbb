//! The tensor collectives of the backends that communicate through host
//! memory (threads, MPI), written once over their byte- and value-level
//! primitives.

use candle_core::{DType, Tensor};

use super::communicator::{check_root, tensor_bytes, tensor_from_bytes, HostValues};
use crate::{Error, Result};

/// The primitives a host-memory backend provides; every one is collective.
pub(crate) trait HostCollectives {
    /// This rank.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// Replaces `values` by the elementwise sum over ranks.
    fn sum_values(&self, op: &str, values: &mut HostValues) -> Result<()>;
    /// Replaces `bytes` by rank `root`'s bytes.
    fn broadcast_bytes(&self, op: &str, bytes: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Every rank's bytes, in rank order.
    fn gather_bytes(&self, op: &str, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Returns when every rank has called it.
    fn wait_all(&self) -> Result<()>;
}

/// [`super::Communicator::all_reduce_sum`] over host buffers.
pub(crate) fn all_reduce_sum(h: &impl HostCollectives, t: &Tensor) -> Result<Tensor> {
    const OP: &str = "all_reduce_sum";
    if h.world_size() == 1 {
        return Ok(t.copy()?);
    }
    let mut v = HostValues::read(OP, h.rank(), t)?;
    h.sum_values(OP, &mut v)?;
    v.to_tensor(t)
}

/// A shape, dtype and byte length header: what receivers check.
fn header(t: &Tensor) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend((t.rank() as u64).to_le_bytes());
    for d in t.dims() {
        out.extend((*d as u64).to_le_bytes());
    }
    out.extend((dtype_code(t.dtype()) as u64).to_le_bytes());
    out
}

fn dtype_code(d: DType) -> u8 {
    match d {
        DType::U8 => 0,
        DType::U32 => 1,
        DType::I64 => 2,
        DType::F32 => 3,
        DType::F64 => 4,
        DType::F16 => 5,
        DType::BF16 => 6,
        _ => 255,
    }
}

/// Splits a message made by [`header`] + data into (dims, dtype code, data).
fn split(op: &str, rank: usize, msg: &[u8]) -> Result<(Vec<usize>, u8, Vec<u8>)> {
    let bad = || Error::communication(op, rank, "received a malformed message");
    let word = |i: usize| -> Result<u64> {
        let b = msg.get(i * 8..i * 8 + 8).ok_or_else(bad)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| bad())?))
    };
    let r = word(0)? as usize;
    if r > 16 {
        return Err(bad());
    }
    let dims = (0..r)
        .map(|i| word(1 + i).map(|d| d as usize))
        .collect::<Result<Vec<_>>>()?;
    let code = word(1 + r)? as u8;
    Ok((dims, code, msg[(2 + r) * 8..].to_vec()))
}

/// [`super::Communicator::broadcast`] over host buffers.
pub(crate) fn broadcast(h: &impl HostCollectives, t: &Tensor, root: usize) -> Result<Tensor> {
    const OP: &str = "broadcast";
    check_root(OP, h.rank(), root, h.world_size())?;
    if h.world_size() == 1 {
        return Ok(t.copy()?);
    }
    let mut msg = if h.rank() == root {
        let mut m = header(t);
        m.extend(tensor_bytes(t)?);
        m
    } else {
        Vec::new()
    };
    h.broadcast_bytes(OP, &mut msg, root)?;
    if h.rank() == root {
        return Ok(t.copy()?);
    }
    let (dims, code, data) = split(OP, h.rank(), &msg)?;
    if dims != t.dims() || code != dtype_code(t.dtype()) {
        return Err(Error::communication(
            OP,
            h.rank(),
            format!(
                "rank {root} sent a tensor of shape {dims:?} where this rank expects {:?} of {:?}: every rank must pass the same shape and dtype",
                t.dims(),
                t.dtype()
            ),
        ));
    }
    tensor_from_bytes(&data, &dims, t.dtype(), t.device())
}

/// [`super::Communicator::all_gather`] over host buffers.
pub(crate) fn all_gather(h: &impl HostCollectives, t: &Tensor) -> Result<Tensor> {
    const OP: &str = "all_gather";
    if t.rank() == 0 {
        return Err(Error::communication(
            OP,
            h.rank(),
            "cannot gather a scalar along dimension 0: reshape it to (1,)",
        ));
    }
    if h.world_size() == 1 {
        return Ok(t.copy()?);
    }
    let mut msg = header(t);
    msg.extend(tensor_bytes(t)?);
    let all = h.gather_bytes(OP, &msg)?;
    let mut parts = Vec::with_capacity(all.len());
    for (r, m) in all.iter().enumerate() {
        let (dims, code, data) = split(OP, h.rank(), m)?;
        if dims.get(1..) != t.dims().get(1..) || code != dtype_code(t.dtype()) {
            return Err(Error::communication(
                OP,
                h.rank(),
                format!(
                    "rank {r} sent a tensor of shape {dims:?} where this rank has {:?} of {:?}: all but the first dimension, and the dtype, must agree",
                    t.dims(),
                    t.dtype()
                ),
            ));
        }
        parts.push(tensor_from_bytes(&data, &dims, t.dtype(), t.device())?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// [`super::Communicator::broadcast_bytes`] over host buffers.
pub(crate) fn broadcast_bytes(
    h: &impl HostCollectives,
    bytes: &[u8],
    root: usize,
) -> Result<Vec<u8>> {
    const OP: &str = "broadcast_bytes";
    check_root(OP, h.rank(), root, h.world_size())?;
    let mut buf = if h.rank() == root {
        bytes.to_vec()
    } else {
        Vec::new()
    };
    if h.world_size() > 1 {
        h.broadcast_bytes(OP, &mut buf, root)?;
    }
    Ok(buf)
}

/// Implements [`super::Communicator`] for a [`HostCollectives`] backend
/// named `$name`.
macro_rules! impl_host_communicator {
    ($ty:ty, $name:expr) => {
        impl $crate::distributed::Communicator for $ty {
            fn rank(&self) -> usize {
                self.rank
            }

            fn world_size(&self) -> usize {
                self.world_size
            }

            fn backend(&self) -> &str {
                $name
            }

            fn all_reduce_sum(
                &self,
                t: &candle_core::Tensor,
            ) -> $crate::Result<candle_core::Tensor> {
                $crate::distributed::host_collectives::all_reduce_sum(self, t)
            }

            fn broadcast(
                &self,
                t: &candle_core::Tensor,
                root: usize,
            ) -> $crate::Result<candle_core::Tensor> {
                $crate::distributed::host_collectives::broadcast(self, t, root)
            }

            fn all_gather(&self, t: &candle_core::Tensor) -> $crate::Result<candle_core::Tensor> {
                $crate::distributed::host_collectives::all_gather(self, t)
            }

            fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> $crate::Result<Vec<u8>> {
                $crate::distributed::host_collectives::broadcast_bytes(self, bytes, root)
            }

            fn barrier(&self) -> $crate::Result<()> {
                if self.world_size == 1 {
                    return Ok(());
                }
                $crate::distributed::host_collectives::HostCollectives::wait_all(self)
            }
        }
    };
}
pub(crate) use impl_host_communicator;
