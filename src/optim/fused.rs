//! Fused CPU updates: one pass over a parameter and its state, in place,
//! parallel over chunks with rayon. Used on the CPU for f32/f64 parameters;
//! other devices and dtypes take the candle-op path.

use std::cell::Cell;

use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor};
use rayon::prelude::*;

/// Elements per parallel chunk (large enough that rayon's overhead vanishes).
const CHUNK: usize = 1 << 15;

/// The float types with a fused path.
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + 'static
{
    fn of(v: f64) -> Self;
    fn sqrt(self) -> Self;
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
}

impl Real for f32 {
    fn of(v: f64) -> Self {
        v as f32
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Real for f64 {
    fn of(v: f64) -> Self {
        v
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

type AccessFn<'a> = Box<dyn FnOnce(&mut CpuStorage, &Layout) -> candle_core::Result<()> + 'a>;

/// An in-place op that hands the tensor's CPU storage to a closure.
struct Access<'a>(Cell<Option<AccessFn<'a>>>);

impl InplaceOp1 for Access<'_> {
    fn name(&self) -> &'static str {
        "aimass-optim-fused"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        match self.0.take() {
            Some(f) => f(s, l),
            None => candle_core::bail!("aimass-optim-fused: storage handed out twice"),
        }
    }
}

type Ptrs<T> = Vec<(*mut T, usize)>;

fn nest<T: Real>(
    ts: &[&Tensor],
    ptrs: &mut Ptrs<T>,
    f: &mut dyn FnMut(&Ptrs<T>) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    let Some((first, rest)) = ts.split_first() else {
        return f(ptrs);
    };
    let op = Access(Cell::new(Some(Box::new(
        |s: &mut CpuStorage, l: &Layout| {
            let Some((a, b)) = l.contiguous_offsets() else {
                candle_core::bail!("aimass-optim-fused: tensor is not contiguous")
            };
            let Some(sl) = T::slice_mut(s).and_then(|v| v.get_mut(a..b)) else {
                candle_core::bail!("aimass-optim-fused: unexpected dtype or layout")
            };
            ptrs.push((sl.as_mut_ptr(), sl.len()));
            let r = nest(rest, ptrs, f);
            ptrs.pop();
            r
        },
    ))));
    first.inplace_op1(&op)
}

/// Whether the fused path applies: everything on the CPU with dtype `T`'s,
/// contiguous, the same number of elements, and no two tensors sharing storage.
pub(crate) fn applicable(muts: &[&Tensor], grad: &Tensor) -> bool {
    let n = grad.elem_count();
    let dt = grad.dtype();
    let all: Vec<&Tensor> = muts.iter().copied().chain(std::iter::once(grad)).collect();
    for t in all.iter() {
        if !crate::host::on_cpu(t.device())
            || t.dtype() != dt
            || t.elem_count() != n
            || !t.is_contiguous()
        {
            return false;
        }
    }
    if n == 0 {
        return false;
    }
    // No two tensors may share storage (the nested write locks would
    // deadlock and the slices alias): compare the buffers' base addresses.
    let mut addrs = Vec::with_capacity(all.len());
    for t in &all {
        let (s, _) = t.storage_and_layout();
        let addr = match &*s {
            Storage::Cpu(CpuStorage::F32(v)) => v.as_ptr() as usize,
            Storage::Cpu(CpuStorage::F64(v)) => v.as_ptr() as usize,
            _ => return false,
        };
        if addrs.contains(&addr) {
            return false;
        }
        addrs.push(addr);
    }
    true
}

/// Runs `f` on mutable slices of `muts` (in order) and the slice of `grad`,
/// holding every storage lock meanwhile. Call only when [`applicable`].
pub(crate) fn with_slices<T: Real>(
    muts: &[&Tensor],
    grad: &Tensor,
    f: impl FnOnce(&mut [&mut [T]], &[T]),
) -> crate::Result<()> {
    let (gs, gl) = grad.storage_and_layout();
    let g: &[T] = match (&*gs, gl.contiguous_offsets()) {
        (Storage::Cpu(c), Some((a, b))) => match T::slice(c).and_then(|v| v.get(a..b)) {
            Some(g) => g,
            None => {
                return Err(crate::Error::invalid(
                    "fused optimizer step",
                    "gradient dtype or layout",
                ))
            }
        },
        _ => {
            return Err(crate::Error::invalid(
                "fused optimizer step",
                "gradient is not a contiguous CPU tensor",
            ))
        }
    };
    let mut f = Some(f);
    let mut ptrs = Vec::with_capacity(muts.len());
    nest::<T>(muts, &mut ptrs, &mut |ptrs: &Ptrs<T>| {
        // SAFETY: each pointer comes from a distinct storage (checked by
        // `applicable` via `same_storage`) whose write lock is held by an
        // enclosing `inplace_op1` frame for the whole duration of this call,
        // so the slices are valid and do not alias each other or `g`.
        let mut slices: Vec<&mut [T]> = ptrs
            .iter()
            .map(|&(p, n)| unsafe { std::slice::from_raw_parts_mut(p, n) })
            .collect();
        if slices.iter().any(|s| s.len() != g.len()) {
            candle_core::bail!("aimass-optim-fused: length mismatch")
        }
        if let Some(f) = f.take() {
            f(&mut slices, g);
        }
        Ok(())
    })?;
    Ok(())
}

/// Scalars of one Adam/AdamW update.
#[derive(Clone, Copy)]
pub(crate) struct AdamCoef {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// `1 - lr * wd` (AdamW) or 1.
    pub decay_mul: f64,
    /// L2 weight decay added to the gradient (Adam) or 0.
    pub l2: f64,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f64,
    /// `sqrt(1 - beta2^t)`.
    pub bc2_sqrt: f64,
}

/// In-place Adam/AdamW update of `p` with moments `m`, `v` and optionally
/// `vmax` (amsgrad), following torch's single-tensor implementation op by op.
pub(crate) fn adam<T: Real>(s: &mut [&mut [T]], g: &[T], c: AdamCoef) {
    let (b2, w1, w2) = (T::of(c.beta2), T::of(1.0 - c.beta1), T::of(1.0 - c.beta2));
    let (eps, dm, l2, ss, bc) = (
        T::of(c.eps),
        T::of(c.decay_mul),
        T::of(c.l2),
        T::of(c.step_size),
        T::of(c.bc2_sqrt),
    );
    let decoupled = c.decay_mul != 1.0;
    let has_l2 = c.l2 != 0.0;
    let upd = |pi: &mut T, mi: &mut T, vi: &mut T, vmax: Option<&mut T>, gi: T| {
        let p0 = *pi;
        let gi = if has_l2 { gi + l2 * p0 } else { gi };
        let p0 = if decoupled { p0 * dm } else { p0 };
        let m = *mi + w1 * (gi - *mi);
        let v = b2 * *vi + w2 * (gi * gi);
        *mi = m;
        *vi = v;
        let v = match vmax {
            Some(x) => {
                if v > *x {
                    *x = v;
                }
                *x
            }
            None => v,
        };
        let denom = v.sqrt() / bc + eps;
        *pi = p0 - ss * (m / denom);
    };
    match s {
        [p, m, v] => p
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                for (((pi, mi), vi), &gi) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g)
                {
                    upd(pi, mi, vi, None, gi);
                }
            }),
        [p, m, v, vmax] => p
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(vmax.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|((((p, m), v), vmax), g)| {
                for ((((pi, mi), vi), xi), &gi) in p
                    .iter_mut()
                    .zip(m.iter_mut())
                    .zip(v.iter_mut())
                    .zip(vmax.iter_mut())
                    .zip(g)
                {
                    upd(pi, mi, vi, Some(xi), gi);
                }
            }),
        _ => {}
    }
}

/// In-place SGD update (torch semantics) of `p` with optional momentum
/// buffer `buf` (already initialised).
pub(crate) fn sgd<T: Real>(
    s: &mut [&mut [T]],
    g: &[T],
    lr: f64,
    wd: f64,
    momentum: f64,
    dampening: f64,
    nesterov: bool,
) {
    let (lr, wd, mo, w) = (
        T::of(lr),
        T::of(wd),
        T::of(momentum),
        T::of(1.0 - dampening),
    );
    let has_wd = wd != T::of(0.0);
    match s {
        [p] => p
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(p, g)| {
                for (pi, &gi) in p.iter_mut().zip(g) {
                    let gi = if has_wd { gi + wd * *pi } else { gi };
                    *pi = *pi - lr * gi;
                }
            }),
        [p, b] => p
            .par_chunks_mut(CHUNK)
            .zip(b.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|((p, b), g)| {
                for ((pi, bi), &gi) in p.iter_mut().zip(b.iter_mut()).zip(g) {
                    let gi = if has_wd { gi + wd * *pi } else { gi };
                    let nb = mo * *bi + w * gi;
                    *bi = nb;
                    let d = if nesterov { gi + mo * nb } else { nb };
                    *pi = *pi - lr * d;
                }
            }),
        _ => {}
    }
}
