//! The boundary between the host and the training device (crate-internal).
//!
//! A training step runs well on a GPU only if it rarely waits for the
//! device, and on Metal at all only if it never makes an f64 tensor (Metal
//! has no f64). The step's code keeps two rules, and this module is where
//! it does so:
//!
//! 1. **No f64 tensor on a device that is not the CPU**, unless the user's
//!    own tensors are f64. Constants are built directly in the dtype they
//!    are used in ([`full`], [`upload`]); reductions accumulate in f32 (in
//!    f64 only for f64 inputs).
//! 2. **One host read per step.** Scalars the step needs on the host (the
//!    loss, gradient norms, finiteness) are reduced on the device, gathered
//!    into one small tensor and copied back in one transfer
//!    ([`reduce_and_read`]). A value read once is remembered by tensor id,
//!    so the non-finite guard, the loss scaler and gradient clipping share
//!    one read instead of each making their own. That is sound because a
//!    candle tensor's values never change, except a variable's (never
//!    remembered) and explicit in-place writes (`slice_set`, `zero_set`),
//!    which nothing does to a loss or a gradient between the check and the
//!    update.
//!
//! Tests can force the "not the CPU" mode (`Emulate`): the CPU kernels and
//! the fused CPU optimizer updates then step aside, so the candle-op path
//! that CUDA and Metal take runs on the CPU (`src/gpu_path_tests.rs`); host
//! reads are counted.
//! `tests/gpu_clean.rs` checks that the step's code reads and builds
//! tensors only through here.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use candle_core::{DType, Device, Shape, Tensor, TensorId};
use half::{bf16, f16};

use crate::{Error, Result};

thread_local! {
    static EMULATE: Cell<bool> = const { Cell::new(false) };
    static READS: Cell<u64> = const { Cell::new(0) };
    static KNOWN: RefCell<HashMap<(TensorId, Reduce), f64>> = RefCell::new(HashMap::new());
}

/// Values remembered at most; the table is emptied when it would grow past
/// this (tensor ids are never reused, so old entries are only memory).
const KNOWN_CAP: usize = 1 << 14;

/// Whether `device` is the CPU, and the CPU-only fast paths (our kernels,
/// fused optimizer updates, host-side checks) may run on its tensors.
pub(crate) fn on_cpu(device: &Device) -> bool {
    device.is_cpu() && !EMULATE.with(Cell::get)
}

/// A scalar reduction of a tensor, computed on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Reduce {
    /// The value of a one-element tensor.
    Value,
    /// `Σ x²`.
    SumSq,
    /// `Σ |x|` (NaN when any element is NaN).
    SumAbs,
    /// `max |x|` (may skip NaN; pair it with [`Reduce::SumAbs`] to see one).
    MaxAbs,
    /// `Σ |x|^p`, with `p` given by its bits.
    SumAbsPow(u64),
}

impl Reduce {
    /// `Σ |x|^p`.
    pub(crate) fn sum_abs_pow(p: f64) -> Self {
        Reduce::SumAbsPow(p.to_bits())
    }
}

/// The dtype reductions of `t` accumulate in: f32, or f64 for f64 input.
pub(crate) fn accumulator(t: &Tensor) -> DType {
    if t.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The reduction `r` of `t` as a one-element tensor on `t`'s device, or the
/// value itself when no device work is needed (empty tensors).
fn reduce_on_device(t: &Tensor, r: Reduce) -> Result<std::result::Result<Tensor, f64>> {
    let x = t.detach();
    if r == Reduce::Value {
        if x.elem_count() != 1 {
            return Err(Error::shape(
                "host::reduce_and_read",
                "a one-element tensor",
                x.dims(),
            ));
        }
        return Ok(Ok(x.flatten_all()?.to_dtype(accumulator(t))?));
    }
    if x.elem_count() == 0 {
        return Ok(Err(0.0));
    }
    let x = x.to_dtype(accumulator(t))?;
    let v = match r {
        Reduce::Value => unreachable!("handled above"),
        Reduce::SumSq => x.sqr()?.sum_all()?,
        Reduce::SumAbs => x.abs()?.sum_all()?,
        Reduce::MaxAbs => x.abs()?.flatten_all()?.max(0)?,
        Reduce::SumAbsPow(bits) => x.abs()?.powf(f64::from_bits(bits))?.sum_all()?,
    };
    Ok(Ok(v.reshape(1)?))
}

/// Copies a 1-D f32 or f64 tensor to the host: one transfer.
fn read(t: &Tensor) -> Result<Vec<f64>> {
    READS.with(|r| r.set(r.get() + 1));
    Ok(match t.dtype() {
        DType::F64 => t.to_vec1::<f64>()?,
        _ => t
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect(),
    })
}

/// The reductions `items` of their tensors, on the host, in order. Values
/// already read (same tensor, same reduction) come from memory; the others
/// are reduced on their device, gathered into one tensor and copied back in
/// one transfer per device (one in practice).
pub(crate) fn reduce_and_read(items: &[(&Tensor, Reduce)]) -> Result<Vec<f64>> {
    let mut out = vec![f64::NAN; items.len()];
    let mut missing: Vec<usize> = Vec::new();
    KNOWN.with(|k| {
        let k = k.borrow();
        for (i, (t, r)) in items.iter().enumerate() {
            match k.get(&(t.id(), *r)) {
                Some(v) => out[i] = *v,
                None => missing.push(i),
            }
        }
    });
    // Group what is missing by device: one gather and one read each.
    let mut groups: Vec<(Device, Vec<(usize, Tensor)>)> = Vec::new();
    for &i in &missing {
        let (t, r) = items[i];
        match reduce_on_device(t, r)? {
            Err(v) => out[i] = v,
            Ok(v) => match groups.iter_mut().find(|(d, _)| d.same_device(t.device())) {
                Some((_, g)) => g.push((i, v)),
                None => groups.push((t.device().clone(), vec![(i, v)])),
            },
        }
    }
    for (_, group) in groups {
        let dt = if group.iter().any(|(_, v)| v.dtype() == DType::F64) {
            DType::F64
        } else {
            DType::F32
        };
        let parts = group
            .iter()
            .map(|(_, v)| v.to_dtype(dt))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let values = read(&Tensor::cat(&parts, 0)?)?;
        for ((i, _), v) in group.iter().zip(values) {
            out[*i] = v;
        }
    }
    KNOWN.with(|k| {
        let mut k = k.borrow_mut();
        if k.len() + missing.len() > KNOWN_CAP {
            k.clear();
        }
        for &i in &missing {
            let (t, r) = items[i];
            // A variable's storage changes in place; its values are not
            // remembered.
            if !t.is_variable() {
                k.insert((t.id(), r), out[i]);
            }
        }
    });
    Ok(out)
}

/// A tensor of `shape` filled with `value`, made directly in `dtype` on
/// `device` (no f64 intermediate, no upload).
pub(crate) fn full(
    value: f64,
    shape: impl Into<Shape>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    Ok(match dtype {
        DType::F32 => Tensor::full(value as f32, shape, device)?,
        DType::F64 => Tensor::full(value, shape, device)?,
        DType::F16 => Tensor::full(f16::from_f64(value), shape, device)?,
        DType::BF16 => Tensor::full(bf16::from_f64(value), shape, device)?,
        other => return Err(not_float("host::full", other)),
    })
}

fn not_float(op: &str, dtype: DType) -> Error {
    Error::invalid(op, format!("a float dtype, got {dtype:?}"))
}

/// `values` (configuration numbers such as class weights) uploaded to
/// `device` as a tensor of `shape` in `dtype`, converted on the host.
pub(crate) fn upload(
    values: &[f64],
    shape: impl Into<Shape>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    Ok(match dtype {
        DType::F32 => {
            let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
            Tensor::from_vec(v, shape, device)?
        }
        DType::F64 => Tensor::from_vec(values.to_vec(), shape, device)?,
        DType::F16 => {
            let v: Vec<f16> = values.iter().map(|&x| f16::from_f64(x)).collect();
            Tensor::from_vec(v, shape, device)?
        }
        DType::BF16 => {
            let v: Vec<bf16> = values.iter().map(|&x| bf16::from_f64(x)).collect();
            Tensor::from_vec(v, shape, device)?
        }
        other => return Err(not_float("host::upload", other)),
    })
}

/// Host reads made on this thread so far (tests).
#[cfg(test)]
pub(crate) fn read_count() -> u64 {
    READS.with(Cell::get)
}

/// Forces the "not the CPU" mode on this thread while alive (tests): the
/// CPU fast paths step aside (host reads are counted in every mode).
#[cfg(test)]
pub(crate) struct Emulate(());

#[cfg(test)]
impl Emulate {
    /// Enters the mode.
    pub(crate) fn start() -> Self {
        EMULATE.with(|e| e.set(true));
        Emulate(())
    }
}

#[cfg(test)]
impl Drop for Emulate {
    fn drop(&mut self) {
        EMULATE.with(|e| e.set(false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_match_host_arithmetic_in_one_read() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[3f32, -4.0], &dev).unwrap();
        let b = Tensor::new(&[[1f32, -2.0], [2.0, 0.5]], &dev).unwrap();
        let loss = Tensor::new(1.25f32, &dev).unwrap();
        let empty = Tensor::zeros(0, DType::F32, &dev).unwrap();
        let start = read_count();
        let v = reduce_and_read(&[
            (&loss, Reduce::Value),
            (&a, Reduce::SumSq),
            (&b, Reduce::SumAbs),
            (&b, Reduce::MaxAbs),
            (&a, Reduce::sum_abs_pow(3.0)),
            (&empty, Reduce::SumSq),
        ])
        .unwrap();
        assert_eq!(v, vec![1.25, 25.0, 5.5, 2.0, 91.0, 0.0]);
        assert_eq!(read_count() - start, 1);
        // Read again: remembered, no transfer.
        let again = reduce_and_read(&[(&a, Reduce::SumSq), (&loss, Reduce::Value)]).unwrap();
        assert_eq!(again, vec![25.0, 1.25]);
        assert_eq!(read_count() - start, 1);
    }

    #[test]
    fn half_inputs_accumulate_in_f32_and_f64_stays_f64() {
        let dev = Device::Cpu;
        // 300² overflows f16 (max 65504) but not the f32 accumulator.
        let h = Tensor::new(&[300f32, 300.0], &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        assert_eq!(
            reduce_and_read(&[(&h, Reduce::SumSq)]).unwrap(),
            vec![180000.0]
        );
        // 1 + 1e-12 is not representable in f32.
        let d = Tensor::new(&[1.0 + 1e-12f64], &dev).unwrap();
        let v = reduce_and_read(&[(&d, Reduce::SumAbs)]).unwrap();
        assert_eq!(v, vec![1.0 + 1e-12]);
    }

    #[test]
    fn variables_are_not_remembered() {
        let v = candle_core::Var::new(&[1f32, 1.0], &Device::Cpu).unwrap();
        assert_eq!(
            reduce_and_read(&[(v.as_tensor(), Reduce::SumSq)]).unwrap(),
            vec![2.0]
        );
        v.set(&Tensor::new(&[2f32, 2.0], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(
            reduce_and_read(&[(v.as_tensor(), Reduce::SumSq)]).unwrap(),
            vec![8.0]
        );
    }

    #[test]
    fn constants_are_made_in_their_dtype() {
        let dev = Device::Cpu;
        for dt in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            let t = full(f64::NEG_INFINITY, (2, 3), dt, &dev).unwrap();
            assert_eq!(t.dtype(), dt);
            let u = upload(&[0.5, 2.0], 2, dt, &dev).unwrap();
            assert_eq!(u.dtype(), dt);
            let back = u.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(back, vec![0.5, 2.0]);
        }
        assert!(full(1.0, 2, DType::U32, &dev).is_err());
        assert!(upload(&[1.0], 1, DType::U8, &dev).is_err());
        let bad = Tensor::new(&[1f32, 2.0], &dev).unwrap();
        assert!(reduce_and_read(&[(&bad, Reduce::Value)]).is_err());
    }
}
