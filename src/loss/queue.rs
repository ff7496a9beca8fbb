//! The FIFO queue of negative keys used by MoCo's InfoNCE (He et al. 2020).
//!
//! The queue holds the `K` most recent keys `(K, D)`; each step's keys
//! replace the oldest ones, starting at a write pointer that wraps around
//! (MoCo requires `K` to be a multiple of the batch size; here any batch
//! size up to `K` works). Keys are stored detached and L2-normalised, as
//! MoCo does. Pass [`KeyQueue::keys`] to [`info_nce_loss`](super::info_nce_loss) *before*
//! pushing the current batch's keys.

use crate::device::SeededRng;
use crate::ops;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rand::Rng;

/// A fixed-size FIFO of keys `(K, D)` (see the module docs).
#[derive(Debug, Clone)]
pub struct KeyQueue {
    keys: Tensor,
    ptr: usize,
}

impl KeyQueue {
    /// A queue holding `initial` `(K, D)`, K >= 1 (normalised and detached);
    /// the first push overwrites row 0.
    pub fn new(initial: &Tensor) -> Result<Self> {
        match initial.dims() {
            [k, d] if *k > 0 && *d > 0 => {}
            other => {
                return Err(Error::shape(
                    "KeyQueue::new",
                    "a non-empty queue (K, D)",
                    other,
                ))
            }
        }
        Ok(Self {
            keys: ops::l2_normalize(&initial.detach(), 1, 1e-12)?.detach(),
            ptr: 0,
        })
    }

    /// A queue restored from saved state ([`KeyQueue::keys`] and
    /// [`KeyQueue::pointer`], e.g. from a checkpoint): the keys `(K, D)` are
    /// kept as they are (not normalised again, so a resumed run continues
    /// bit for bit) and `pointer` must be below `K`.
    pub fn from_state(keys: &Tensor, pointer: usize) -> Result<Self> {
        let k = match keys.dims() {
            [k, d] if *k > 0 && *d > 0 => *k,
            other => {
                return Err(Error::shape(
                    "KeyQueue::from_state",
                    "a non-empty queue (K, D)",
                    other,
                ))
            }
        };
        if pointer >= k {
            return Err(Error::invalid(
                "KeyQueue::from_state",
                format!("write pointer {pointer} is outside a queue of {k} keys"),
            ));
        }
        Ok(Self {
            keys: keys.detach(),
            ptr: pointer,
        })
    }

    /// A queue of `size` random unit vectors of dimension `dim` (MoCo starts
    /// from normalised Gaussian noise), drawn from `rng`.
    pub fn random(
        size: usize,
        dim: usize,
        rng: &mut SeededRng,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        // Box–Muller: two uniforms in (0, 1] give one standard normal.
        let v: Vec<f32> = (0..size * dim)
            .map(|_| {
                let u1: f32 = 1.0 - rng.random::<f32>();
                let u2: f32 = rng.random::<f32>();
                (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect();
        // host-ok: drawn once on the host in f32, then cast on the device.
        let t = Tensor::from_vec(v, (size, dim), device)?.to_dtype(dtype)?;
        Self::new(&t)
    }

    /// The keys `(K, D)`, oldest first after the write pointer.
    pub fn keys(&self) -> &Tensor {
        &self.keys
    }

    /// The queue length `K`.
    pub fn len(&self) -> usize {
        self.keys.dims().first().copied().unwrap_or(0)
    }

    /// Always false: a queue has at least one row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The row the next push starts writing at.
    pub fn pointer(&self) -> usize {
        self.ptr
    }

    /// Replaces the oldest rows with `keys` `(B, D)`, 1 <= B <= K (stored
    /// normalised and detached), wrapping around the end of the queue.
    pub fn push(&mut self, keys: &Tensor) -> Result<()> {
        let (k, d) = self.keys.dims2()?;
        let b = match keys.dims() {
            [b, kd] if *kd == d && *b >= 1 && *b <= k => *b,
            other => {
                return Err(Error::shape(
                    "KeyQueue::push",
                    format!("keys (B, {d}) with 1 <= B <= {k}"),
                    other,
                ))
            }
        };
        let new = ops::l2_normalize(&keys.detach().to_dtype(self.keys.dtype())?, 1, 1e-12)?
            .detach()
            .contiguous()?;
        let first = b.min(k - self.ptr);
        let mut q = self
            .keys
            .slice_scatter0(&new.narrow(0, 0, first)?, self.ptr)?;
        if first < b {
            q = q.slice_scatter0(&new.narrow(0, first, b - first)?, 0)?;
        }
        self.keys = q;
        self.ptr = (self.ptr + b) % k;
        Ok(())
    }
}
