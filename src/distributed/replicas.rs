//! The differentiable collectives of [`Replicas`] over a [`Communicator`].
//!
//! Each is a custom op with two arguments, the local tensor and the result
//! the communicator computed from its detached copy: the forward pass
//! returns the result, the backward pass sends the gradient to the local
//! tensor through the adjoint collective (a sum of the ranks' gradients),
//! itself differentiable, so second-order gradients cross ranks too.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, MetalStorage, Shape, Tensor};

use super::Communicator;
use crate::autograd::{Gathered, Replicas};
use crate::Result;

/// The [`Replicas`] of the ranks of `comm`, for
/// [`SyncBatchNormScope`](crate::nn::SyncBatchNormScope) and other layers
/// and losses that work on the global batch.
pub fn replicas(comm: &Arc<dyn Communicator>) -> Arc<dyn Replicas> {
    Arc::new(CommReplicas(Arc::clone(comm)))
}

/// [`Replicas`] over a communicator.
struct CommReplicas(Arc<dyn Communicator>);

impl Replicas for CommReplicas {
    fn rank(&self) -> usize {
        self.0.rank()
    }

    fn world_size(&self) -> usize {
        self.0.world_size()
    }

    fn sum(&self, x: &Tensor) -> Result<Tensor> {
        replica_sum(&self.0, x)
    }

    fn gather(&self, x: &Tensor) -> Result<Gathered> {
        replica_gather(&self.0, x)
    }
}

/// `Σ_r x_r` with the gradient `Σ_r ∂L_r/∂y`.
fn replica_sum(comm: &Arc<dyn Communicator>, x: &Tensor) -> Result<Tensor> {
    if comm.world_size() == 1 {
        return Ok(x.clone());
    }
    let r = fresh(comm.all_reduce_sum(&x.detach())?)?;
    if !x.track_op() {
        return Ok(r);
    }
    Ok(x.apply_op2(
        &r,
        Adjoint {
            comm: Arc::clone(comm),
            rows: None,
        },
    )?)
}

/// `[x_0; x_1; …]` with the gradient: this rank's rows of `Σ_r ∂L_r/∂y`.
fn replica_gather(comm: &Arc<dyn Communicator>, x: &Tensor) -> Result<Gathered> {
    let n = x.dim(0)?;
    if comm.world_size() == 1 {
        return Ok(Gathered::new(x.clone(), 0));
    }
    // host-ok: one row count per rank, to find this rank's rows.
    let count = Tensor::new(&[n as u32], &candle_core::Device::Cpu)?;
    // host-ok: the gathered row counts (world_size values).
    let counts = comm.all_gather(&count)?.to_vec1::<u32>()?;
    let offset: usize = counts[..comm.rank()].iter().map(|&c| c as usize).sum();
    let r = fresh(comm.all_gather(&x.detach())?)?;
    if !x.track_op() {
        return Ok(Gathered::new(r, offset));
    }
    let all = x.apply_op2(
        &r,
        Adjoint {
            comm: Arc::clone(comm),
            rows: Some((offset, n)),
        },
    )?;
    Ok(Gathered::new(all, offset))
}

/// A tensor that owns its storage from offset 0, as a custom op's output
/// must.
fn fresh(t: Tensor) -> Result<Tensor> {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        Ok(t)
    } else {
        Ok(t.copy()?)
    }
}

/// Forward: the collective's result (the second argument). Backward: the
/// sum over ranks of the gradient, narrowed to this rank's rows for a
/// gather.
struct Adjoint {
    comm: Arc<dyn Communicator>,
    /// For a gather: (first row of this rank, rows).
    rows: Option<(usize, usize)>,
}

impl CustomOp2 for Adjoint {
    fn name(&self) -> &'static str {
        match self.rows {
            None => "replica-sum",
            Some(_) => "replica-gather",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        s2: &MetalStorage,
        l2: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn bwd(
        &self,
        _arg1: &Tensor,
        _arg2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = replica_sum(&self.comm, grad).map_err(candle_core::Error::wrap)?;
        let g = match self.rows {
            None => g,
            Some((offset, n)) => g.narrow(0, offset, n)?,
        };
        Ok((Some(g), None))
    }
}
