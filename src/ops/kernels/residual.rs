//! Chains of ResNet blocks (convolutions, training-mode BatchNorm, ReLU,
//! residual shortcut) run as **one** candle op.
//!
//! candle 0.11's backward pass keeps one gradient tensor per graph node and
//! adds every contribution into it: a tensor of zeros the size of the node,
//! then an addition, both full passes over memory on candle's own thread
//! pool, for every edge of the graph. A ResNet block written layer by layer
//! has five such edges, each the size of an activation; at resnet_tiny's
//! widths (16 to 64 channels) these passes cost about as much as the
//! convolutions. Here a chain of blocks is one op `(x, params) -> y`: the
//! intermediate tensors live inside the op, and its backward runs the
//! layers' gradients in reverse order, handing each to the next as a buffer.
//!
//! The layers are the kernels of `conv.rs` (with `winograd.rs`) and
//! `batch_norm.rs`, so results equal the layer-by-layer composition up to
//! the rounding of fused steps (tested against it).

use std::any::Any;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::batch_norm::{self as bn, Dims, Mask, PlaneSums, Stats};
use super::conv::{self, ConvParams, Geom, Input};
use super::gemm::Elem;
use super::simd;
use super::util::{contiguous_slice, needs_grad, second_order};

/// One stage of a block: a convolution without bias, then BatchNorm.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StageSpec {
    /// Kernel dimensions `(c_out, c_in, kh, kw)`.
    pub weight: (usize, usize, usize, usize),
    pub p: ConvParams,
    pub eps: f64,
}

/// What a block adds before its last ReLU.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ShortcutSpec {
    /// Nothing: the last stage ends in a ReLU like the others.
    None,
    /// The block's input.
    Identity,
    /// A convolution and BatchNorm of the block's input.
    Projection(StageSpec),
}

/// One block: `stages` in sequence, then the shortcut.
#[derive(Clone, Debug)]
pub(crate) struct BlockSpec {
    pub stages: Vec<StageSpec>,
    pub shortcut: ShortcutSpec,
}

/// A stage with its geometry resolved; its parameters are `weight ‖ gamma ‖
/// beta` from `at` in the packed parameter vector.
#[derive(Clone, Copy, Debug)]
struct Stage {
    g: Geom,
    at: usize,
    eps: f64,
}

impl Stage {
    fn new(x: (usize, usize, usize, usize), s: &StageSpec, at: usize) -> candle_core::Result<Self> {
        if s.p.groups != 1 {
            candle_core::bail!("residual block: convolutions of one group only");
        }
        Ok(Stage {
            g: Geom::new(x, s.weight, s.p)?,
            at,
            eps: s.eps,
        })
    }
    fn out(&self) -> (usize, usize, usize, usize) {
        (self.g.n, self.g.o, self.g.oh, self.g.ow)
    }
    fn wlen(&self) -> usize {
        self.g.o * self.g.c * self.g.kh * self.g.kw
    }
    fn len(&self) -> usize {
        self.wlen() + 2 * self.g.o
    }
    fn w<'a, T>(&self, p: &'a [T]) -> &'a [T] {
        &p[self.at..self.at + self.wlen()]
    }
    fn gamma_beta<T: Elem>(&self, p: &[T]) -> (Vec<f64>, Vec<f64>) {
        let at = self.at + self.wlen();
        let o = self.g.o;
        let f = |r: &[T]| r.iter().map(|v| v.to_f64()).collect();
        (f(&p[at..at + o]), f(&p[at + o..at + 2 * o]))
    }
    fn dims(&self) -> Dims {
        Dims {
            n: self.g.n,
            c: self.g.o,
            hw: self.g.oh * self.g.ow,
        }
    }
}

/// A block with its geometry resolved.
#[derive(Clone, Debug)]
struct Block {
    main: Vec<Stage>,
    proj: Option<Stage>,
    identity: bool,
}

/// A chain of blocks for one input shape: every geometry and where each
/// stage's parameters lie in the packed vector.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    blocks: Vec<Block>,
    input: (usize, usize, usize, usize),
    output: (usize, usize, usize, usize),
    params: usize,
}

impl Plan {
    /// Resolves `specs` for an input of dims `x`; errors when the shapes do
    /// not chain (channels, an identity shortcut that changes the shape, a
    /// projection whose output differs from the main branch's).
    pub fn new(x: (usize, usize, usize, usize), specs: &[BlockSpec]) -> candle_core::Result<Self> {
        if specs.is_empty() {
            candle_core::bail!("residual blocks: at least one block");
        }
        let mut at = 0;
        let mut cur = x;
        let mut blocks = Vec::with_capacity(specs.len());
        for (bi, b) in specs.iter().enumerate() {
            if b.stages.is_empty() {
                candle_core::bail!("residual blocks: block {bi} has no stage");
            }
            let input = cur;
            let mut main = Vec::with_capacity(b.stages.len());
            for (si, s) in b.stages.iter().enumerate() {
                if s.weight.1 != cur.1 {
                    candle_core::bail!(
                        "residual blocks: block {bi} stage {si} takes {} channels, gets {}",
                        s.weight.1,
                        cur.1
                    );
                }
                let st = Stage::new(cur, s, at)?;
                at += st.len();
                cur = st.out();
                main.push(st);
            }
            let (proj, identity) = match &b.shortcut {
                ShortcutSpec::None => (None, false),
                ShortcutSpec::Identity => {
                    if input != cur {
                        candle_core::bail!(
                            "residual blocks: block {bi}'s identity shortcut needs an output \
                             shaped as its input {input:?}, got {cur:?}"
                        );
                    }
                    (None, true)
                }
                ShortcutSpec::Projection(s) => {
                    if s.weight.1 != input.1 {
                        candle_core::bail!(
                            "residual blocks: block {bi}'s projection takes {} channels, gets {}",
                            s.weight.1,
                            input.1
                        );
                    }
                    let st = Stage::new(input, s, at)?;
                    if st.out() != cur {
                        candle_core::bail!(
                            "residual blocks: block {bi}'s projection gives {:?}, the main \
                             branch {cur:?}",
                            st.out()
                        );
                    }
                    at += st.len();
                    (Some(st), false)
                }
            };
            blocks.push(Block {
                main,
                proj,
                identity,
            });
        }
        Ok(Plan {
            blocks,
            input: x,
            output: cur,
            params: at,
        })
    }

    /// Values per channel of each BatchNorm, in the order of the packed
    /// parameters (and of the statistics).
    pub fn counts(&self) -> Vec<usize> {
        let mut v = Vec::new();
        for b in &self.blocks {
            for s in b.main.iter().chain(&b.proj) {
                v.push(s.g.n * s.g.oh * s.g.ow);
            }
        }
        v
    }
}

/// What one block keeps for its backward.
struct BlockSaved<T> {
    /// Each stage's convolution output.
    z: Vec<Vec<T>>,
    /// Each stage's BatchNorm as `a * z + b` per channel ([`bn::coefs`]),
    /// but the last's: the next stage reads `max(a * z + b, 0)` straight
    /// from `z` (the activation is never stored).
    ab: Vec<(Vec<T>, Vec<T>)>,
    /// The projection's convolution output.
    zp: Option<Vec<T>>,
    st: Vec<Stats>,
    stp: Option<Stats>,
}

impl<T: Elem> BlockSaved<T> {
    /// The input of stage `i` as its convolution reads it.
    fn input<'a>(&'a self, h: &'a [T], i: usize) -> Input<'a, T> {
        if i == 0 {
            Input::plain(h)
        } else {
            let (a, b) = &self.ab[i - 1];
            Input {
                x: &self.z[i - 1],
                bn_relu: Some((a, b)),
            }
        }
    }
}

/// What the chain keeps for its backward.
struct Saved<T> {
    /// The outputs of every block but the last (the next blocks' inputs).
    outs: Vec<Vec<T>>,
    blocks: Vec<BlockSaved<T>>,
}

impl<T> Saved<T> {
    /// The batch statistics in the order of the packed parameters.
    fn stats(&self) -> Vec<Stats> {
        let mut v = Vec::new();
        for b in &self.blocks {
            v.extend(b.st.iter().cloned());
            v.extend(b.stp.iter().cloned());
        }
        v
    }
}

fn bn_forward<T: Elem>(
    s: &Stage,
    z: &[T],
    st: &Stats,
    p: &[T],
    short: Option<&[T]>,
    relu: bool,
) -> candle_core::Result<Vec<T>> {
    let (gamma, beta) = s.gamma_beta(p);
    bn::forward(s.dims(), z, short, &gamma, &beta, st, relu)
}

/// Stage `s`'s convolution of `input` and its batch statistics, summed
/// while each output plane is in cache.
fn conv_stats<T: Elem>(
    s: &Stage,
    input: Input<'_, T>,
    p: &[T],
) -> candle_core::Result<(Vec<T>, Stats)> {
    let mut sums = vec![PlaneSums::default(); s.g.n * s.g.o];
    let z = conv::forward_in(&s.g, input, s.w(p), None, false, Some(&mut sums))?;
    let st = bn::stats_from_planes(s.dims(), &sums, s.eps)?;
    Ok((z, st))
}

fn block_forward<T: Elem>(
    b: &Block,
    h: &[T],
    p: &[T],
) -> candle_core::Result<(Vec<T>, BlockSaved<T>)> {
    let last = b.main.len() - 1;
    let mut sv = BlockSaved {
        z: Vec::with_capacity(b.main.len()),
        ab: Vec::with_capacity(last),
        zp: None,
        st: Vec::with_capacity(b.main.len()),
        stp: None,
    };
    for (i, s) in b.main.iter().enumerate() {
        let (z, st) = conv_stats(s, sv.input(h, i), p)?;
        if i < last {
            let (gamma, beta) = s.gamma_beta(p);
            sv.ab.push(bn::coefs(&gamma, &beta, &st));
            sv.z.push(z);
            sv.st.push(st);
            continue;
        }
        let y = match &b.proj {
            Some(ps) => {
                let (zp, stp) = conv_stats(ps, Input::plain(h), p)?;
                let sp = bn_forward(ps, &zp, &stp, p, None, false)?;
                sv.zp = Some(zp);
                sv.stp = Some(stp);
                bn_forward(s, &z, &st, p, Some(&sp), true)?
            }
            None if b.identity => bn_forward(s, &z, &st, p, Some(h), true)?,
            None => bn_forward(s, &z, &st, p, None, true)?,
        };
        sv.z.push(z);
        sv.st.push(st);
        return Ok((y, sv));
    }
    candle_core::bail!("residual blocks: a block without stages")
}

fn forward<T: Elem>(plan: &Plan, x: &[T], p: &[T]) -> candle_core::Result<(Vec<T>, Saved<T>)> {
    let mut saved = Saved {
        outs: Vec::with_capacity(plan.blocks.len()),
        blocks: Vec::with_capacity(plan.blocks.len()),
    };
    let mut y: Option<Vec<T>> = None;
    for b in &plan.blocks {
        let (out, bs) = block_forward(b, y.as_deref().unwrap_or(x), p)?;
        saved.outs.extend(y.take());
        y = Some(out);
        saved.blocks.push(bs);
    }
    match y {
        Some(y) => Ok((y, saved)),
        None => candle_core::bail!("residual blocks: at least one block"),
    }
}

/// `v` with its first `n` values initialised by `f`.
fn filled<T>(
    n: usize,
    f: impl FnOnce(&mut [MaybeUninit<T>]) -> candle_core::Result<()>,
) -> candle_core::Result<Vec<T>> {
    let mut v = Vec::with_capacity(n);
    f(&mut v.spare_capacity_mut()[..n])?;
    // SAFETY: `f` initialised every one of the first `n` values (the
    // callers pass it `bn::backward_into`, which writes all of them or
    // fails, and a failure returns above); `n <= capacity`.
    unsafe { v.set_len(n) };
    Ok(v)
}

/// BatchNorm backward of stage `s` (the ReLU's mask as `mask` says):
/// returns `dz` and, with `want_ds`, `dy * (y > 0)` (the shortcut's
/// gradient, for a stored output `y`); writes `dgamma`, `dbeta` into `dp`.
#[allow(clippy::too_many_arguments)]
fn bn_backward<T: Elem>(
    s: &Stage,
    z: &[T],
    st: &Stats,
    dy: &[T],
    mask: Mask<'_, T>,
    want_ds: bool,
    p: &[T],
    dp: &mut [T],
) -> candle_core::Result<(Vec<T>, Option<Vec<T>>)> {
    let n = z.len();
    let (gamma, beta) = s.gamma_beta(p);
    let mut ds: Option<Vec<T>> = want_ds.then(|| Vec::with_capacity(n));
    let mut sums = (Vec::new(), Vec::new());
    let dz = filled(n, |dz| {
        let ds = ds.as_mut().map(|v| &mut v.spare_capacity_mut()[..n]);
        sums = bn::backward_into(s.dims(), z, dy, mask, &gamma, &beta, st, dz, ds)?;
        Ok(())
    })?;
    if let Some(v) = ds.as_mut() {
        // SAFETY: `backward_into` wrote all `n` values of `ds` (it returned
        // without error just above); `n <= capacity`.
        unsafe { v.set_len(n) };
    }
    let (o, at) = (s.g.o, s.at + s.wlen());
    for c in 0..o {
        dp[at + c] = T::from_f64(sums.0[c]);
        dp[at + o + c] = T::from_f64(sums.1[c]);
    }
    Ok((dz, ds))
}

/// `dst += src`, in parallel.
fn add_into<T: Elem>(dst: &mut [T], src: &[T]) {
    const CHUNK: usize = 1 << 14;
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| simd::add_assign(d, s));
}

/// The backward of one block: writes its parameters' gradients into `dp`
/// (when `want_dp`) and returns the gradient of its input (when `want_dx`).
#[allow(clippy::too_many_arguments)]
fn block_backward<T: Elem>(
    b: &Block,
    h: &[T],
    y: &[T],
    sv: &BlockSaved<T>,
    dy: &[T],
    p: &[T],
    dp: &mut [T],
    want_dx: bool,
    want_dp: bool,
) -> candle_core::Result<Option<Vec<T>>> {
    let last = b.main.len() - 1;
    let want_ds = b.proj.is_some() || (b.identity && want_dx);
    let (mut dz, ds) = bn_backward(
        &b.main[last],
        &sv.z[last],
        &sv.st[last],
        dy,
        Mask::Output(y),
        want_ds,
        p,
        dp,
    )?;
    let mut dx = None;
    for i in (0..=last).rev() {
        let s = &b.main[i];
        if want_dp {
            let dw = conv::weight_grad_in(&s.g, sv.input(h, i), &dz)?;
            dp[s.at..s.at + s.wlen()].copy_from_slice(&dw);
        }
        if i == 0 && !want_dx {
            break;
        }
        let din = conv::input_grad(&s.g, &dz, s.w(p))?;
        if i == 0 {
            dx = Some(din);
            break;
        }
        let prev = &b.main[i - 1];
        let (zp, stp) = (&sv.z[i - 1], &sv.st[i - 1]);
        dz = bn_backward(prev, zp, stp, &din, Mask::Recomputed, false, p, dp)?.0;
    }
    match (&b.proj, &sv.zp, &sv.stp, ds) {
        (Some(ps), Some(zp), Some(stp), Some(ds)) => {
            let dzp = bn_backward(ps, zp, stp, &ds, Mask::None, false, p, dp)?.0;
            if want_dp {
                let dw = conv::weight_grad(&ps.g, h, &dzp)?;
                dp[ps.at..ps.at + ps.wlen()].copy_from_slice(&dw);
            }
            if let Some(dx) = dx.as_mut() {
                add_into(dx, &conv::input_grad(&ps.g, &dzp, ps.w(p))?);
            }
        }
        (None, _, _, Some(ds)) => {
            if let Some(dx) = dx.as_mut() {
                add_into(dx, &ds);
            }
        }
        (Some(_), ..) => candle_core::bail!("residual blocks: projection state missing"),
        (None, ..) => {}
    }
    Ok(dx)
}

/// The backward of the chain: `(dx when want_dx, dparams)`.
#[allow(clippy::too_many_arguments)]
fn backward<T: Elem>(
    plan: &Plan,
    saved: &Saved<T>,
    x: &[T],
    p: &[T],
    y: &[T],
    dy: &[T],
    want_dx: bool,
    want_dp: bool,
) -> candle_core::Result<(Option<Vec<T>>, Vec<T>)> {
    let nb = plan.blocks.len();
    if saved.blocks.len() != nb || saved.outs.len() + 1 != nb {
        candle_core::bail!("residual blocks backward: saved state does not match the plan");
    }
    let mut dp = vec![T::zero(); plan.params];
    let mut g: Option<Vec<T>> = None;
    for k in (0..nb).rev() {
        let h = if k == 0 { x } else { &saved.outs[k - 1] };
        let yk = if k + 1 == nb { y } else { &saved.outs[k] };
        let need_dx = k > 0 || want_dx;
        g = block_backward(
            &plan.blocks[k],
            h,
            yk,
            &saved.blocks[k],
            g.as_deref().unwrap_or(dy),
            p,
            &mut dp,
            need_dx,
            want_dp,
        )?;
        if !need_dx {
            break;
        }
    }
    Ok((g, dp))
}

/// The chain's saved state (`Saved<f32>` or `Saved<f64>`), kept for the
/// backward, and the batch statistics for the caller.
type SavedAny = Arc<Mutex<Option<Box<dyn Any + Send>>>>;

/// `(x, params) -> y` for a chain of blocks (see the module docs); params
/// packed as `weight ‖ gamma ‖ beta` per stage, block by block, each
/// block's projection after its main stages.
pub(crate) struct ResidualOp {
    pub plan: Arc<Plan>,
    pub saved: SavedAny,
    pub stats: Arc<Mutex<Vec<Stats>>>,
}

impl ResidualOp {
    fn run<T: Elem>(&self, x: &[T], p: &[T]) -> candle_core::Result<Vec<T>> {
        if p.len() != self.plan.params {
            candle_core::bail!(
                "residual blocks: {} packed parameters, the blocks need {}",
                p.len(),
                self.plan.params
            );
        }
        let (y, saved) = forward(&self.plan, x, p)?;
        if let Ok(mut s) = self.stats.lock() {
            *s = saved.stats();
        }
        if let Ok(mut s) = self.saved.lock() {
            *s = Some(Box::new(saved));
        }
        Ok(y)
    }

    fn grads<T: Elem>(
        &self,
        x: &Tensor,
        params: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_dx, want_dp) = (needs_grad(x), needs_grad(params));
        if !(want_dx || want_dp) {
            return Ok((None, None));
        }
        let dy = dy.contiguous()?;
        let guard = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("residual blocks: state lock poisoned".into()))?;
        let Some(saved) = guard.as_ref().and_then(|b| b.downcast_ref::<Saved<T>>()) else {
            candle_core::bail!("residual blocks backward: forward state missing")
        };
        let (xs, xl) = x.storage_and_layout();
        let (ps, pl) = params.storage_and_layout();
        let (ys, yl) = res.storage_and_layout();
        let (gs, gl) = dy.storage_and_layout();
        let (dx, dp) = match (&*xs, &*ps, &*ys, &*gs) {
            (Storage::Cpu(xs), Storage::Cpu(ps), Storage::Cpu(ys), Storage::Cpu(gs)) => backward(
                &self.plan,
                saved,
                contiguous_slice::<T>(xs, xl)?,
                contiguous_slice::<T>(ps, pl)?,
                contiguous_slice::<T>(ys, yl)?,
                contiguous_slice::<T>(gs, gl)?,
                want_dx,
                want_dp,
            )?,
            _ => candle_core::bail!("residual blocks backward: CPU tensors only"),
        };
        let cpu = candle_core::Device::Cpu;
        let dx = match dx {
            Some(v) if want_dx => Some(Tensor::from_vec(v, x.shape(), &cpu)?),
            _ => None,
        };
        let dp = if want_dp {
            Some(Tensor::from_vec(dp, params.shape(), &cpu)?)
        } else {
            None
        };
        Ok((dx, dp))
    }
}

impl candle_core::CustomOp2 for ResidualOp {
    fn name(&self) -> &'static str {
        "aimass-residual-blocks-train"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape().dims4()? != self.plan.input {
            candle_core::bail!(
                "residual blocks: input {:?}, the plan was made for {:?}",
                l1.shape(),
                self.plan.input
            );
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(self.run(
                contiguous_slice::<f32>(s1, l1)?,
                contiguous_slice::<f32>(s2, l2)?,
            )?),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(self.run(
                contiguous_slice::<f64>(s1, l1)?,
                contiguous_slice::<f64>(s2, l2)?,
            )?),
            _ => candle_core::bail!(
                "residual blocks: f32 or f64 input and parameters of one dtype, got {:?} and {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((out, Shape::from(self.plan.output)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if second_order() {
            candle_core::bail!(
                "residual blocks: the fused op is first order; in second-order mode the blocks \
                 are composed of differentiable ops"
            );
        }
        match x.dtype() {
            candle_core::DType::F32 => self.grads::<f32>(x, params, res, dy),
            candle_core::DType::F64 => self.grads::<f64>(x, params, res, dy),
            d => candle_core::bail!("residual blocks backward: f32 or f64, got {d:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::util::test_values;

    /// resnet_tiny's blocks (stem, then stages of two BasicBlocks at widths
    /// 16/32/64, strides 1/2/2) for 28x28 inputs.
    fn resnet_tiny_specs() -> Vec<BlockSpec> {
        let p = |stride: usize, padding: usize| ConvParams {
            stride: (stride, stride),
            padding: (padding, padding),
            dilation: (1, 1),
            groups: 1,
        };
        let st = |o, c, k, stride| StageSpec {
            weight: (o, c, k, k),
            p: p(stride, k / 2),
            eps: 1e-5,
        };
        let mut v = vec![BlockSpec {
            stages: vec![st(16, 1, 3, 1)],
            shortcut: ShortcutSpec::None,
        }];
        let mut cin = 16;
        for (i, w) in [16, 32, 64].into_iter().enumerate() {
            for j in 0..2 {
                let stride = if i > 0 && j == 0 { 2 } else { 1 };
                let shortcut = if stride != 1 || cin != w {
                    ShortcutSpec::Projection(st(w, cin, 1, stride))
                } else {
                    ShortcutSpec::Identity
                };
                v.push(BlockSpec {
                    stages: vec![st(w, cin, 3, stride), st(w, w, 3, 1)],
                    shortcut,
                });
                cin = w;
            }
        }
        v
    }

    /// Times the passes of resnet_tiny's forward and backward (batch 256,
    /// f32), each pass separately, by kind, in CPU time (`RAYON_NUM_THREADS=1
    /// cargo test --release --lib residual_speed -- --ignored --nocapture`).
    #[test]
    #[ignore]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn residual_speed() {
        crate::device::tune_cpu_allocator();
        let n = 256;
        let plan = Plan::new((n, 1, 28, 28), &resnet_tiny_specs()).unwrap();
        let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        let x = f(test_values(n * 784, 1));
        let mut p = f(test_values(plan.params, 2));
        for p in p.iter_mut() {
            *p *= 0.3;
        }
        let (y, saved) = forward(&plan, &x, &p).unwrap();
        let dy = f(test_values(y.len(), 3));
        let reps = 5;
        // Process CPU time (all threads), so that a loaded machine inflates
        // the figures less than wall time; best of `reps`.
        let cpu_ms = || {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `ts` is a valid timespec to write into.
            unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
            ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
        };
        let best = |g: &mut dyn FnMut()| {
            let mut b = f64::MAX;
            for _ in 0..reps {
                let t = cpu_ms();
                g();
                b = b.min(cpu_ms() - t);
            }
            b
        };
        let total_f = best(&mut || {
            forward(&plan, &x, &p).unwrap();
        });
        let total_b = best(&mut || {
            backward(&plan, &saved, &x, &p, &y, &dy, false, true).unwrap();
        });
        println!("resnet_tiny chain, batch {n}: forward {total_f:.1} ms, backward {total_b:.1} ms (CPU time)");
        // Per pass, by kind.
        let mut kinds: Vec<(String, f64)> = Vec::new();
        let mut add = |k: String, t: f64| match kinds.iter_mut().find(|(n, _)| *n == k) {
            Some(e) => e.1 += t,
            None => kinds.push((k, t)),
        };
        for (bi, b) in plan.blocks.iter().enumerate() {
            let h: &[f32] = if bi == 0 { &x } else { &saved.outs[bi - 1] };
            let sv = &saved.blocks[bi];
            for (i, s) in b.main.iter().chain(&b.proj).enumerate() {
                let is_proj = i == b.main.len();
                let input = if is_proj {
                    Input::plain(h)
                } else {
                    sv.input(h, i)
                };
                let z = if is_proj {
                    sv.zp.as_ref().unwrap()
                } else {
                    &sv.z[i]
                };
                let kind = format!(
                    "{}x{} s{} {}->{} {}x{}",
                    s.g.kh, s.g.kw, s.g.p.stride.0, s.g.c, s.g.o, s.g.oh, s.g.ow
                );
                add(
                    format!("conv fwd   {kind}"),
                    best(&mut || {
                        conv::forward_in(&s.g, input, s.w(&p), None, false, None).unwrap();
                    }),
                );
                add(
                    format!("conv igrad {kind}"),
                    best(&mut || {
                        conv::input_grad(&s.g, z, s.w(&p)).unwrap();
                    }),
                );
                add(
                    format!("conv wgrad {kind}"),
                    best(&mut || {
                        conv::weight_grad_in(&s.g, input, z).unwrap();
                    }),
                );
                let st = bn::stats(s.dims(), z, 1e-5).unwrap();
                add(
                    "bn apply".into(),
                    best(&mut || {
                        bn_forward(s, z, &st, &p, None, true).unwrap();
                    }),
                );
                let mut dp = vec![0f32; plan.params];
                add(
                    "bn backward".into(),
                    best(&mut || {
                        bn_backward(s, z, &st, z, Mask::Recomputed, false, &p, &mut dp).unwrap();
                    }),
                );
            }
        }
        let sum: f64 = kinds.iter().map(|k| k.1).sum();
        for (k, t) in &kinds {
            println!("{k:<34} {t:8.2} ms {:5.1}%", 100.0 * t / sum);
        }
        println!("sum of passes {sum:.1} ms");
    }
}
