//! Bucketed collectives: many tensors flattened into a few large buffers,
//! one collective per buffer instead of one per tensor.

use candle_core::{DType, Tensor};

use super::Communicator;
use crate::Result;

/// Runs of consecutive tensors of one dtype whose bytes stay within `cap`
/// (a single larger tensor gets a bucket of its own): index ranges into
/// `ts`.
pub(crate) fn plan(ts: &[&Tensor], cap: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    let mut dtype: Option<DType> = None;
    for (i, t) in ts.iter().enumerate() {
        let b = t.elem_count() * t.dtype().size_in_bytes();
        let fits = dtype == Some(t.dtype()) && bytes + b <= cap;
        if i > start && !fits {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        dtype = Some(t.dtype());
        bytes += b;
    }
    if start < ts.len() {
        out.push(start..ts.len());
    }
    out
}

/// The tensors of a bucket flattened into one.
fn flatten(ts: &[&Tensor]) -> Result<Tensor> {
    let flat = ts
        .iter()
        .map(|t| t.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&flat, 0)?)
}

/// Cuts a flat bucket back into tensors of the shapes of `like`.
fn unflatten(flat: &Tensor, like: &[&Tensor]) -> Result<Vec<Tensor>> {
    let mut at = 0;
    like.iter()
        .map(|t| {
            let n = t.elem_count();
            let part = flat.narrow(0, at, n)?.reshape(t.dims())?;
            at += n;
            Ok(part)
        })
        .collect()
}

/// What a bucketed collective moved: collectives and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Moved {
    /// Collective calls.
    pub(crate) calls: u64,
    /// Bytes reduced or broadcast (per rank).
    pub(crate) bytes: u64,
}

/// The elementwise mean over ranks of every tensor of `ts`, in buckets of
/// at most `cap` bytes (tensors of different dtypes go to different
/// buckets).
pub(crate) fn all_reduce_mean(
    comm: &dyn Communicator,
    ts: &[&Tensor],
    cap: usize,
    moved: &mut Moved,
) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(ts.len());
    let inv = 1.0 / comm.world_size() as f64;
    for range in plan(ts, cap) {
        let part = &ts[range];
        let flat = flatten(part)?;
        moved.calls += 1;
        moved.bytes += (flat.elem_count() * flat.dtype().size_in_bytes()) as u64;
        let mean = (comm.all_reduce_sum(&flat)? * inv)?;
        out.extend(unflatten(&mean, part)?);
    }
    Ok(out)
}

/// Rank `root`'s values of every tensor of `ts`, in buckets of at most
/// `cap` bytes.
pub(crate) fn broadcast(
    comm: &dyn Communicator,
    ts: &[&Tensor],
    root: usize,
    cap: usize,
    moved: &mut Moved,
) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(ts.len());
    for range in plan(ts, cap) {
        let part = &ts[range];
        let flat = flatten(part)?;
        moved.calls += 1;
        moved.bytes += (flat.elem_count() * flat.dtype().size_in_bytes()) as u64;
        let got = comm.broadcast(&flat, root)?;
        out.extend(unflatten(&got, part)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn buckets_split_by_size_and_dtype() {
        let d = Device::Cpu;
        let a = Tensor::zeros(10, DType::F32, &d).unwrap(); // 40 bytes
        let b = Tensor::zeros(10, DType::F32, &d).unwrap();
        let c = Tensor::zeros(30, DType::F32, &d).unwrap(); // 120 bytes
        let e = Tensor::zeros(2, DType::F64, &d).unwrap();
        let ts = [&a, &b, &c, &e];
        assert_eq!(plan(&ts, 100), vec![0..2, 2..3, 3..4]);
        assert_eq!(plan(&ts, 1000), vec![0..3, 3..4]);
        assert_eq!(plan(&ts, 1), vec![0..1, 1..2, 2..3, 3..4]);
        assert!(plan(&[], 10).is_empty());
    }

    #[test]
    fn flatten_then_unflatten_is_the_identity() {
        let d = Device::Cpu;
        let a = Tensor::arange(0f32, 6., &d)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::arange(6f32, 8., &d).unwrap();
        let flat = flatten(&[&a, &b]).unwrap();
        assert_eq!(
            flat.to_vec1::<f32>().unwrap(),
            (0..8).map(|x| x as f32).collect::<Vec<_>>()
        );
        let back = unflatten(&flat, &[&a, &b]).unwrap();
        assert_eq!(
            back[0].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(back[1].to_vec1::<f32>().unwrap(), vec![6.0, 7.0]);
    }
}
