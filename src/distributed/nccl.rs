//! [`NcclCommunicator`]: CUDA devices through NCCL (feature `nccl`).
//!
//! NCCL through candle's cudarc. One rank per CUDA device, each a process
//! (launched by `mpirun`, whose [`MpiCommunicator`](super::MpiCommunicator)
//! can carry NCCL's unique id: [`NcclCommunicator::from_bootstrap`]) or a
//! thread ([`ThreadCommunicator`](super::ThreadCommunicator) as the
//! bootstrap). Collectives run on candle's stream of the device, in order
//! with the kernels around them, and each is followed by a wait on a CUDA
//! event polled against the timeout: a rank that died or hangs makes the
//! others fail with [`Error::Communication`] (the NCCL communicator is then
//! aborted and the communicator refuses further calls). CPU tensors are
//! staged through the device.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::communicator::{check_root, tensor_bytes, tensor_from_bytes, CommConfig, Communicator};
use crate::{Error, Result};

/// NCCL's state, shared with the custom ops that run the collectives.
struct Shared {
    comm: Mutex<Option<Comm>>,
    device: candle_core::CudaDevice,
    rank: usize,
    timeout: Duration,
    poisoned: Mutex<Option<String>>,
}

// SAFETY: the NCCL communicator is used under the mutex only, from one
// thread at a time, which NCCL allows.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn err(&self, op: &str, reason: impl Into<String>) -> candle_core::Error {
        candle_core::Error::wrap(Error::communication(op, self.rank, reason))
    }

    /// Runs `f` with the NCCL communicator, then waits (polling a CUDA
    /// event) until the device has finished the collective, or fails at
    /// the timeout.
    fn run(
        &self,
        op: &str,
        f: impl FnOnce(&Comm) -> candle_core::Result<CudaStorage>,
    ) -> candle_core::Result<CudaStorage> {
        if let Some(why) = self
            .poisoned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Err(self.err(
                op,
                format!(
                    "an earlier collective failed ({why}); this communicator cannot be used again"
                ),
            ));
        }
        let mut guard = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let comm = guard
            .as_ref()
            .ok_or_else(|| self.err(op, "the NCCL communicator was aborted"))?;
        let out = f(comm)?;
        let stream = self.device.cuda_stream();
        let event = stream
            .record_event(None)
            .map_err(|e| self.err(op, format!("recording a CUDA event: {e}")))?;
        let begin = Instant::now();
        while !event.is_complete() {
            if begin.elapsed() >= self.timeout {
                // Aborting the communicator releases the kernels waiting
                // for the lost rank.
                drop(guard.take());
                *self.poisoned.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(format!("{op} timed out"));
                return Err(self.err(
                    op,
                    format!(
                        "timed out after {:.1} s waiting for the other ranks: a rank failed, hangs, or makes different collective calls (raise CommConfig::timeout_secs if a rank legitimately works alone that long)",
                        self.timeout.as_secs_f64()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        Ok(out)
    }
}

/// A collective as a custom op (its CUDA forward has the device buffers).
enum Collective {
    Sum,
    Broadcast(usize),
    Gather(usize),
}

struct NcclOp {
    shared: Arc<Shared>,
    what: Collective,
}

fn nccl_err(e: impl std::fmt::Debug) -> String {
    format!("NCCL error {e:?}")
}

impl NcclOp {
    fn run_typed<
        T: CudaDType
            + candle_core::cuda_backend::cudarc::nccl::safe::NcclType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    >(
        &self,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (lo, hi) = l
            .contiguous_offsets()
            .ok_or_else(|| self.shared.err(op, "the tensor must be contiguous"))?;
        let src = s.as_cuda_slice::<T>()?.slice(lo..hi);
        let n = hi - lo;
        let dev = self.shared.device.clone();
        let (rows_out, count) = match self.what {
            Collective::Gather(w) => (w, n * w),
            _ => (1, n),
        };
        let out = self.shared.run(op, |comm| {
            // SAFETY: every element is written by the collective before use.
            let mut dst: CudaSlice<T> = unsafe { dev.alloc::<T>(count)? };
            match self.what {
                Collective::Sum => comm
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(|e| self.shared.err(op, nccl_err(e)))?,
                Collective::Broadcast(root) => comm
                    .broadcast(Some(&src), &mut dst, root as i32)
                    .map_err(|e| self.shared.err(op, nccl_err(e)))?,
                Collective::Gather(_) => comm
                    .all_gather(&src, &mut dst)
                    .map_err(|e| self.shared.err(op, nccl_err(e)))?,
            };
            Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
        })?;
        let dims = l.shape().dims();
        let shape = match self.what {
            Collective::Gather(_) => {
                let mut d = dims.to_vec();
                d[0] *= rows_out;
                Shape::from(d)
            }
            _ => l.shape().clone(),
        };
        Ok((out, shape))
    }
}

impl CustomOp1 for NcclOp {
    fn name(&self) -> &'static str {
        match self.what {
            Collective::Sum => "nccl-all-reduce",
            Collective::Broadcast(_) => "nccl-broadcast",
            Collective::Gather(_) => "nccl-all-gather",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(self.shared.err(self.name(), "NCCL works on CUDA tensors"))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        match s.dtype() {
            DType::F32 => self.run_typed::<f32>(s, l),
            DType::F64 => self.run_typed::<f64>(s, l),
            DType::F16 => self.run_typed::<half::f16>(s, l),
            DType::BF16 => self.run_typed::<half::bf16>(s, l),
            DType::U8 => self.run_typed::<u8>(s, l),
            DType::U32 => self.run_typed::<u32>(s, l),
            DType::I64 => self.run_typed::<i64>(s, l),
            other => Err(self
                .shared
                .err(self.name(), format!("NCCL cannot move {other:?} tensors"))),
        }
    }
}

/// The ranks of a group of CUDA devices as a [`Communicator`], through
/// NCCL. One rank per device; all ranks must create theirs together.
///
/// ```no_run
/// use std::sync::Arc;
/// use aimass::distributed::{from_env, CommConfig, Communicator, NcclCommunicator};
/// use aimass::prelude::*;
///
/// // mpirun -np 8 prog: MPI carries NCCL's id, each rank its own GPU.
/// let mpi = from_env(CommConfig::default())?;
/// let device = Device::new_cuda(mpi.rank())?;
/// let nccl: Arc<dyn Communicator> =
///     Arc::new(NcclCommunicator::from_bootstrap(mpi.as_ref(), &device, CommConfig::default())?);
/// # Ok::<(), aimass::Error>(())
/// ```
pub struct NcclCommunicator {
    shared: Arc<Shared>,
    rank: usize,
    world_size: usize,
    device: Device,
}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

impl NcclCommunicator {
    /// A new NCCL unique id (128 bytes): made by one rank and given to
    /// every rank of the group, which pass it to [`NcclCommunicator::new`].
    pub fn unique_id() -> Result<Vec<u8>> {
        let id = Id::new().map_err(|e| Error::communication("nccl unique id", 0, nccl_err(e)))?;
        Ok(id.internal().iter().map(|&c| c as u8).collect())
    }

    /// Rank `rank` of `world_size` on the CUDA `device`, joining the group
    /// of `id` (from [`NcclCommunicator::unique_id`]).
    pub fn new(
        id: &[u8],
        rank: usize,
        world_size: usize,
        device: &Device,
        config: CommConfig,
    ) -> Result<Self> {
        config.validate()?;
        let bytes: [u8; 128] = id.try_into().map_err(|_| {
            Error::invalid(
                "NcclCommunicator::new",
                format!("an NCCL id has 128 bytes, got {}", id.len()),
            )
        })?;
        let Device::Cuda(cuda) = device else {
            return Err(Error::invalid(
                "NcclCommunicator::new",
                format!("NCCL needs a CUDA device, got {device:?}"),
            ));
        };
        if rank >= world_size {
            return Err(Error::config(
                "NcclCommunicator::new",
                format!("rank {rank} of {world_size}"),
                "needs rank < world_size",
            ));
        }
        let id = Id::uninit(bytes.map(|b| b as std::os::raw::c_char));
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, world_size, id)
            .map_err(|e| Error::communication("NcclCommunicator::new", rank, nccl_err(e)))?;
        Ok(NcclCommunicator {
            shared: Arc::new(Shared {
                comm: Mutex::new(Some(comm)),
                device: cuda.clone(),
                rank,
                timeout: config.timeout(),
                poisoned: Mutex::new(None),
            }),
            rank,
            world_size,
            device: device.clone(),
        })
    }

    /// This rank of `bootstrap`'s group on `device`: rank 0 makes the
    /// NCCL id and `bootstrap` (MPI, threads) gives it to the others.
    pub fn from_bootstrap(
        bootstrap: &dyn Communicator,
        device: &Device,
        config: CommConfig,
    ) -> Result<Self> {
        let id = if bootstrap.rank() == 0 {
            Self::unique_id()?
        } else {
            Vec::new()
        };
        let id = bootstrap.broadcast_bytes(&id, 0)?;
        Self::new(
            &id,
            bootstrap.rank(),
            bootstrap.world_size(),
            device,
            config,
        )
    }

    /// Runs `what` on `t` (on this communicator's device), and returns the
    /// result on `t`'s device.
    fn apply(&self, t: &Tensor, what: Collective) -> Result<Tensor> {
        let on = t.to_device(&self.device)?.contiguous()?;
        let op = NcclOp {
            shared: Arc::clone(&self.shared),
            what,
        };
        Ok(on.detach().apply_op1(op)?.to_device(t.device())?)
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn backend(&self) -> &str {
        "nccl"
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.apply(t, Collective::Sum)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        check_root("broadcast", self.rank, root, self.world_size)?;
        self.apply(t, Collective::Broadcast(root))
    }

    /// NCCL gathers equal parts: every rank's `t` must have the same shape.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        if t.rank() == 0 {
            return Err(Error::communication(
                "all_gather",
                self.rank,
                "cannot gather a scalar along dimension 0: reshape it to (1,)",
            ));
        }
        self.apply(t, Collective::Gather(self.world_size))
    }

    fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>> {
        check_root("broadcast_bytes", self.rank, root, self.world_size)?;
        // host-ok: the length, then the bytes, travel as device tensors.
        let len = Tensor::new(&[bytes.len() as u64 as i64], &Device::Cpu)?;
        // host-ok: the broadcast length, read once.
        let len = self.broadcast(&len, root)?.to_vec1::<i64>()?[0] as usize;
        let mine = if self.rank == root {
            bytes.to_vec()
        } else {
            vec![0u8; len]
        };
        let t = tensor_from_bytes(&mine, &[len], DType::U8, &Device::Cpu)?;
        tensor_bytes(&self.broadcast(&t, root)?)
    }

    fn barrier(&self) -> Result<()> {
        // host-ok: a one-element tensor summed over the ranks.
        let one = Tensor::new(&[1f32], &Device::Cpu)?;
        self.all_reduce_sum(&one).map(|_| ())
    }
}
