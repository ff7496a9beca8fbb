//! Small helpers shared by the kernels.

use candle_core::{CpuStorage, Layout, Tensor};

use super::gemm::Elem;

/// The elements of a contiguous CPU tensor as a slice (errors when the
/// layout is strided; the public wrappers make inputs contiguous first).
pub(crate) fn contiguous_slice<'a, T: Elem>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) if b <= data.len() => Ok(&data[a..b]),
        _ => candle_core::bail!("aimass kernels: expected a contiguous tensor, got {l:?}"),
    }
}

/// Whether autograd may want a gradient for `t` (a variable or the result
/// of a tracked op); plain data tensors get none, which saves their backward.
pub(crate) fn needs_grad(t: &Tensor) -> bool {
    t.track_op()
}

/// The gradient of an argument an op is locally constant in: zeros when
/// autograd tracks it (candle wants a gradient for every node it visits),
/// nothing otherwise.
pub(crate) fn zero_grad(t: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if needs_grad(t) {
        Ok(Some(t.zeros_like()?))
    } else {
        Ok(None)
    }
}

thread_local! {
    static DO_NOT_DETACH: bool = match std::env::var("CANDLE_GRAD_DO_NOT_DETACH") {
        Ok(s) => !s.is_empty() && s != "0",
        Err(_) => false,
    };
}

/// Whether candle keeps gradients attached (second-order mode): read as
/// candle does, once per thread.
pub(crate) fn second_order() -> bool {
    DO_NOT_DETACH.with(|b| *b)
}

/// Zero-initialises `c` and returns it as initialised values: for outputs
/// allocated with `Vec::with_capacity` and filled chunk by chunk in
/// parallel, each chunk zeroed by the thread that fills it, while it is in
/// cache (`vec![0; n]` is one serial `memset` of the whole buffer first).
pub(crate) fn zero_init<T: Elem>(c: &mut [std::mem::MaybeUninit<T>]) -> &mut [T] {
    for v in c.iter_mut() {
        v.write(T::zero());
    }
    // SAFETY: every element of `c` was initialised just above, and
    // `MaybeUninit<T>` has the layout of `T`.
    unsafe { &mut *(c as *mut [std::mem::MaybeUninit<T>] as *mut [T]) }
}

/// Adds up per-thread partial results of `len` values each (in order),
/// returning the first error; zeros when there are none.
pub(crate) fn sum_partials<T: Elem>(
    partial: Vec<candle_core::Result<Vec<T>>>,
    len: usize,
) -> candle_core::Result<Vec<T>> {
    let mut total: Option<Vec<T>> = None;
    for p in partial {
        let p = p?;
        match total.as_mut() {
            None => total = Some(p),
            Some(t) => t.iter_mut().zip(&p).for_each(|(a, b)| *a += *b),
        }
    }
    Ok(total.unwrap_or_else(|| vec![T::zero(); len]))
}

/// Deterministic test values in [-1, 1) (xorshift).
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f64 / (1u64 << 24) as f64) * 2.0 - 1.0
        })
        .collect()
}
