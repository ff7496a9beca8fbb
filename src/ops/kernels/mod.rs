//! Fast CPU kernels with backward: convolution, pooling, BatchNorm, ReLU.
//!
//! **An implementation detail, outside the stability promise.** Nothing in
//! this module is needed to train models: the layers of [`crate::nn`] and
//! the ops of [`crate::ops`] dispatch here on the CPU by themselves. The
//! module is public for benchmarks and for readers who want to call a
//! kernel directly; its names and signatures may change in any release.
//!
//! Candle's CPU convolution backward is several times slower than its
//! forward, and its max-pool backward is wrong. This module holds our own
//! CPU kernels, wrapped as candle custom ops **with backward**, so that
//! autograd works through them as through any candle op:
//!
//! * [`conv2d`] (and [`conv2d_relu`], with the ReLU fused in): "same" 3x3
//!   convolutions (stride 1, padding 1, one group, at least 8 channels in
//!   and out) run Winograd F(2x2, 3x3), 2.25x fewer multiplications, for
//!   the forward and both gradients (`AIMASS_CPU_CONV=im2col` turns it
//!   off); the others im2col (skipped for 1x1 convolutions). Both end in
//!   GEMMs (our own AVX-512 kernels where the CPU has them, else the `gemm`
//!   crate), parallel over the batch with rayon; stride, padding, dilation,
//!   groups, and the bias added in the same pass. Its input and weight
//!   gradients are custom ops too, whose own backward is again a
//!   convolution, so gradients of any order (MAML's second order included)
//!   are exact.
//! * [`max_pool2d`] and [`avg_pool2d`] with padding (average pooling counts
//!   the padding, like torch's default `count_include_pad=True`); max
//!   pooling routes the whole gradient to the first maximum of each window.
//! * [`batch_norm_train`] and [`batch_norm_relu_train`]: BatchNorm's
//!   training forward and backward, each fused into two passes over the data;
//!   [`batch_norm_add_relu_train`] adds a residual shortcut before the ReLU
//!   in the same passes (the end of a ResNet block).
//! * [`relu`], whose backward is one pass (candle's takes three).
//!
//! The kernels take f32 and f64 tensors on the CPU (any layout: strided
//! inputs are made contiguous first); [`supports`] says whether a tensor
//! qualifies. On other devices and dtypes each function returns an error:
//! callers (the `ops` module) use candle's own ops there.
//!
//! Second order: the convolution, pooling and ReLU ops are closed under
//! differentiation. BatchNorm's backward is a fused kernel unless candle's
//! second-order mode is on (`CANDLE_GRAD_DO_NOT_DETACH` set), where it is
//! written with candle's differentiable ops.
//!
//! Threads: the kernels use rayon's global pool (`RAYON_NUM_THREADS`).
//!
//! ```
//! use aimass::candle::{DType, Device, Tensor, Var};
//! use aimass::ops::kernels;
//!
//! let x = Tensor::ones((2, 3, 8, 8), DType::F32, &Device::Cpu)?;
//! let w = Var::from_tensor(&Tensor::ones((4, 3, 3, 3), DType::F32, &Device::Cpu)?)?;
//! assert!(kernels::supports(&x));
//! let y = kernels::conv2d(&x, &w, None, (1, 1), (1, 1), (1, 1), 1)?;
//! assert_eq!(y.dims(), &[2, 4, 8, 8]);
//! // The centre pixel sees the whole 3x3x3 window of ones.
//! let centre = y.get(0)?.get(0)?.get(4)?.get(4)?.to_scalar::<f32>()?;
//! assert_eq!(centre, 27.0);
//!
//! // Pool, normalise, and differentiate through all of it.
//! let p = kernels::max_pool2d(&y, (2, 2), (2, 2), (0, 0))?;
//! let bn = kernels::batch_norm_relu_train(&p, None, None, 1e-5)?;
//! let grads = bn.output.sqr()?.sum_all()?.backward()?;
//! assert_eq!(grads.get(&w).map(|g| g.dims().to_vec()), Some(vec![4, 3, 3, 3]));
//! # Ok::<(), aimass::Error>(())
//! ```

mod batch_norm;
mod conv;
mod gemm;
mod pool;
mod residual;
#[cfg(target_arch = "x86_64")]
mod sgemm;
mod simd;
mod util;
mod winograd;
mod winograd4;

use candle_core::{DType, Tensor};

use crate::error::Context;
use crate::{Error, Result};

/// Whether the kernels of this module can run on `x`: a CPU tensor of dtype
/// f32 or f64.
pub fn supports(x: &Tensor) -> bool {
    crate::host::on_cpu(x.device()) && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Whether [`conv2d`] takes these operands (used by `ops::conv2d`).
pub(crate) fn supports_conv(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> bool {
    let same = |t: &Tensor| supports(t) && t.dtype() == x.dtype();
    supports(x) && same(w) && bias.is_none_or(same)
}

/// Whether [`max_pool2d`] and [`avg_pool2d`] take `x` (used by `ops`).
pub(crate) fn supports_pool(x: &Tensor) -> bool {
    supports(x)
}

/// Checks that the kernels take `ts` (CPU, f32/f64, one dtype). Every
/// entry point validates its operands here before running a kernel. (It
/// leaves the process's allocator alone: tuning it is the training
/// program's choice, [`crate::device::tune_cpu_allocator`].)
fn check_supported(op: &str, ts: &[&Tensor]) -> Result<()> {
    let first = ts.first().map(|t| t.dtype());
    for t in ts {
        if !supports(t) {
            return Err(Error::invalid(
                op,
                format!(
                    "the CPU kernels need f32 or f64 tensors on the CPU, got {:?} on {:?}; use \
                     `aimass::ops` (which falls back to candle) for other devices and dtypes",
                    t.dtype(),
                    t.device().location()
                ),
            ));
        }
        if Some(t.dtype()) != first {
            return Err(Error::invalid(
                op,
                format!(
                    "all operands must share one dtype, got {:?} and {:?}",
                    first,
                    t.dtype()
                ),
            ));
        }
    }
    Ok(())
}

fn check_pair(op: &str, name: &str, v: (usize, usize), min: usize) -> Result<()> {
    if v.0 < min || v.1 < min {
        return Err(Error::invalid(
            op,
            format!("{name} must be >= {min} in both dimensions, got {v:?}"),
        ));
    }
    Ok(())
}

/// 2-D convolution (cross-correlation, as torch's `conv2d`) of `x`
/// `(n, c_in, h, w)` with `w` `(c_out, c_in / groups, kh, kw)` plus an
/// optional `bias` `(c_out,)`; `stride`, `padding` and `dilation` are
/// `(height, width)`. Returns `(n, c_out, h_out, w_out)` with
/// `h_out = (h + 2 * padding.0 - dilation.0 * (kh - 1) - 1) / stride.0 + 1`.
///
/// Differentiable in `x`, `w` and `bias`, to any order.
///
/// # Errors
///
/// [`Error::Shape`] when the shapes do not fit each other (channels vs
/// groups, kernel larger than the padded input), [`Error::InvalidArgument`]
/// for a zero stride, dilation or group count, or tensors the kernels do not
/// support (see [`supports`]).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    groups: usize,
) -> Result<Tensor> {
    let p = conv_params(
        "kernels::conv2d",
        x,
        w,
        bias,
        stride,
        padding,
        dilation,
        groups,
    )?;
    conv::conv2d_fused(x, w, bias, p, false).context("conv2d kernel")
}

/// [`conv2d`] followed by ReLU, fused: the ReLU is applied while the output
/// is still in cache, and its backward is folded into the convolution's.
///
/// # Errors
///
/// As [`conv2d`].
pub fn conv2d_relu(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    groups: usize,
) -> Result<Tensor> {
    let p = conv_params(
        "kernels::conv2d_relu",
        x,
        w,
        bias,
        stride,
        padding,
        dilation,
        groups,
    )?;
    conv::conv2d_fused(x, w, bias, p, true).context("conv2d_relu kernel")
}

/// `max(x, 0)` whose backward is a single fused pass (candle's takes three).
/// Differentiable to any order.
///
/// # Errors
///
/// [`Error::InvalidArgument`] for tensors the kernels do not support.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    check_supported("kernels::relu", &[x])?;
    conv::relu(x).context("relu kernel")
}

#[allow(clippy::too_many_arguments)]
fn conv_params(
    op: &str,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    groups: usize,
) -> Result<conv::ConvParams> {
    check_supported(op, &[x, w])?;
    check_pair(op, "stride", stride, 1)?;
    check_pair(op, "dilation", dilation, 1)?;
    if groups == 0 {
        return Err(Error::invalid(op, "groups must be >= 1, got 0"));
    }
    let xd = x
        .dims4()
        .map_err(|_| Error::shape(op, "input (n, c_in, h, w)", x.dims()))?;
    let wd = w
        .dims4()
        .map_err(|_| Error::shape(op, "weight (c_out, c_in / groups, kh, kw)", w.dims()))?;
    let p = conv::ConvParams {
        stride,
        padding,
        dilation,
        groups,
    };
    if let Err(e) = conv::Geom::new(xd, wd, p) {
        return Err(Error::shape(
            op,
            format!("input and weight that fit ({e})"),
            (x.dims(), w.dims()),
        ));
    }
    if let Some(b) = bias {
        if b.dims() != [wd.0] {
            return Err(Error::shape(op, format!("bias ({},)", wd.0), b.dims()));
        }
        check_supported(op, &[x, b])?;
    }
    Ok(p)
}

fn pool_params(
    op: &str,
    x: &Tensor,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
) -> Result<pool::PoolParams> {
    check_supported(op, &[x])?;
    check_pair(op, "kernel", kernel, 1)?;
    check_pair(op, "stride", stride, 1)?;
    if padding.0 > kernel.0 / 2 || padding.1 > kernel.1 / 2 {
        return Err(Error::invalid(
            op,
            format!("padding {padding:?} must be at most half the kernel {kernel:?}"),
        ));
    }
    let p = pool::PoolParams {
        kernel,
        stride,
        padding,
    };
    let d = x
        .dims4()
        .map_err(|_| Error::shape(op, "input (n, c, h, w)", x.dims()))?;
    if let Err(e) = pool::PoolGeom::new(d, p) {
        return Err(Error::shape(
            op,
            format!("an input the window fits ({e})"),
            x.dims(),
        ));
    }
    Ok(p)
}

/// 2-D max pooling of `x` `(n, c, h, w)` with windows `kernel`, steps
/// `stride` and implicit `-inf` padding `padding` (each `(height, width)`),
/// as torch's `max_pool2d` (dilation 1, `ceil_mode=False`). Output height
/// `(h + 2 * padding.0 - kernel.0) / stride.0 + 1`.
///
/// The gradient goes, whole, to the first maximum of each window (as in
/// torch; overlapping windows add up); it is exact to any order.
///
/// # Errors
///
/// [`Error::InvalidArgument`] for a zero kernel or stride, padding over half
/// the kernel, or an unsupported tensor (see [`supports`]); [`Error::Shape`]
/// when `x` is not 4-D or the window does not fit.
pub fn max_pool2d(
    x: &Tensor,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
) -> Result<Tensor> {
    let p = pool_params("kernels::max_pool2d", x, kernel, stride, padding)?;
    pool::max_pool(x, p).context("max_pool2d kernel")
}

/// 2-D average pooling of `x` `(n, c, h, w)`, zero padding counted in the
/// average (torch's default `count_include_pad=True`, `ceil_mode=False`):
/// every output is the window's sum divided by `kernel.0 * kernel.1`.
///
/// Differentiable to any order.
///
/// # Errors
///
/// As [`max_pool2d`].
pub fn avg_pool2d(
    x: &Tensor,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
) -> Result<Tensor> {
    let p = pool_params("kernels::avg_pool2d", x, kernel, stride, padding)?;
    pool::avg_pool(x, p).context("avg_pool2d kernel")
}

/// What [`batch_norm_train`] returns: the normalised output and the batch
/// statistics the caller needs to update its running averages.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BatchNormTrainOutput {
    /// `gamma * (x - mean) / sqrt(var + eps) + beta` (then ReLU, for
    /// [`batch_norm_relu_train`]; plus the shortcut, then ReLU, for
    /// [`batch_norm_add_relu_train`]); same shape as the input.
    /// Differentiable.
    pub output: Tensor,
    /// Per-channel batch mean, shape `(c,)`, detached.
    pub mean: Tensor,
    /// Per-channel biased batch variance (divided by `count`), shape `(c,)`,
    /// detached. torch's running variance uses the unbiased one:
    /// `var * count / (count - 1)`.
    pub var: Tensor,
    /// Values per channel, `n * h * w`.
    pub count: usize,
}

/// BatchNorm in training mode over an `(n, c, ...)` input (BatchNorm1d for
/// `(n, c)` and `(n, c, l)`, BatchNorm2d for `(n, c, h, w)`): normalises each
/// channel with its batch mean and biased variance, then scales by `weight`
/// and shifts by `bias` (`(c,)` each; `None` means 1 and 0).
///
/// Forward and backward are each two fused passes over the data. The
/// backward is exact to first order; in candle's second-order mode
/// (`CANDLE_GRAD_DO_NOT_DETACH` set) it is built from candle's
/// differentiable ops, so gradients of gradients are exact too.
///
/// # Errors
///
/// [`Error::Shape`] when `x` has fewer than 2 dimensions, no values per
/// channel, or `weight`/`bias` are not `(c,)`; [`Error::InvalidArgument`]
/// for a negative or non-finite `eps` or unsupported tensors.
pub fn batch_norm_train(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<BatchNormTrainOutput> {
    bn_impl(
        "kernels::batch_norm_train",
        x,
        weight,
        bias,
        None,
        eps,
        batch_norm::Epilogue::None,
    )
}

/// [`batch_norm_train`] followed by ReLU, fused (saves a pass over the
/// data forward and backward). `mean` and `var` are those of the input.
///
/// # Errors
///
/// As [`batch_norm_train`].
pub fn batch_norm_relu_train(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<BatchNormTrainOutput> {
    bn_impl(
        "kernels::batch_norm_relu_train",
        x,
        weight,
        bias,
        None,
        eps,
        batch_norm::Epilogue::Relu,
    )
}

/// `relu(batch_norm_train(x, weight, bias, eps) + shortcut)`, fused: the end
/// of a ResNet block (BatchNorm of the last convolution, residual add,
/// ReLU). The forward is the statistics pass plus one pass computing
/// `max(a * x + b + shortcut, 0)`; the backward masks the gradient with the
/// output (`g = dy * (output > 0)`, which is also the shortcut's gradient,
/// written in the same pass as the input's). Saves the separate add and ReLU
/// passes over the data, forward and backward. `mean` and `var` are those of
/// `x`.
///
/// Differentiable in `x`, `weight`, `bias` and `shortcut`; in candle's
/// second-order mode the backward is built from candle's differentiable
/// ops, as for [`batch_norm_train`].
///
/// # Errors
///
/// As [`batch_norm_train`], and [`Error::Shape`] when `shortcut` does not
/// have the shape of `x`, [`Error::InvalidArgument`] when it is not a CPU
/// tensor of `x`'s dtype.
pub fn batch_norm_add_relu_train(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    shortcut: &Tensor,
    eps: f64,
) -> Result<BatchNormTrainOutput> {
    bn_impl(
        "kernels::batch_norm_add_relu_train",
        x,
        weight,
        bias,
        Some(shortcut),
        eps,
        batch_norm::Epilogue::AddRelu,
    )
}

/// The three BatchNorm entry points: validates, packs `weight ‖ bias` into
/// one `(2c,)` operand, and applies the fused op (the shortcut, given with
/// [`batch_norm::Epilogue::AddRelu`] only, is its third operand).
fn bn_impl(
    op: &str,
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    shortcut: Option<&Tensor>,
    eps: f64,
    epilogue: batch_norm::Epilogue,
) -> Result<BatchNormTrainOutput> {
    check_supported(op, &[x])?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::invalid(
            op,
            format!("eps must be finite and >= 0, got {eps}"),
        ));
    }
    let d = x.dims();
    if d.len() < 2 {
        return Err(Error::shape(op, "input (n, c, ...)", d));
    }
    let c = d[1];
    let count = x.elem_count() / c.max(1);
    if c == 0 || count == 0 {
        return Err(Error::shape(op, "at least one value per channel", d));
    }
    let ones;
    let zeros;
    let w = match weight {
        Some(w) => w,
        None => {
            ones = Tensor::ones(c, x.dtype(), x.device())?;
            &ones
        }
    };
    let b = match bias {
        Some(b) => b,
        None => {
            zeros = Tensor::zeros(c, x.dtype(), x.device())?;
            &zeros
        }
    };
    for (name, t) in [("weight", w), ("bias", b)] {
        if t.dims() != [c] {
            return Err(Error::shape(op, format!("{name} ({c},)"), t.dims()));
        }
    }
    check_supported(op, &[x, w, b])?;
    if let Some(s) = shortcut {
        if s.dims() != d {
            return Err(Error::shape(
                op,
                format!("shortcut of the input's shape {d:?}"),
                s.dims(),
            ));
        }
        check_supported(op, &[x, s])?;
    }
    let cache = std::sync::Arc::new(std::sync::Mutex::new(None));
    let bn = batch_norm::BatchNormOp {
        eps,
        epilogue,
        stats: cache.clone(),
    };
    let gb = Tensor::cat(&[w, b], 0)?;
    let x = x.contiguous()?;
    let output = match shortcut {
        Some(s) => x.apply_op3(&gb, &s.contiguous()?, bn),
        None => x.apply_op2(&gb, bn),
    }
    .context("batch_norm kernel")?;
    let st = cache
        .lock()
        .ok()
        .and_then(|g| g.clone())
        .ok_or_else(|| Error::invalid(op, "the kernel returned no statistics"))?;
    let mean = Tensor::from_vec(st.mean, c, x.device())?.to_dtype(x.dtype())?;
    let var = Tensor::from_vec(st.var, c, x.device())?.to_dtype(x.dtype())?;
    Ok(BatchNormTrainOutput {
        output,
        mean,
        var,
        count,
    })
}

/// A convolution without bias (one group, no dilation) followed by
/// training-mode BatchNorm: one stage of a [`ResidualBlock`].
#[derive(Clone, Copy, Debug)]
pub struct ConvBn<'a> {
    /// The kernel, `(c_out, c_in, kh, kw)`.
    pub weight: &'a Tensor,
    /// `(height, width)` stride.
    pub stride: (usize, usize),
    /// `(height, width)` zero padding.
    pub padding: (usize, usize),
    /// BatchNorm scale `(c_out,)`; `None` means 1.
    pub bn_weight: Option<&'a Tensor>,
    /// BatchNorm shift `(c_out,)`; `None` means 0.
    pub bn_bias: Option<&'a Tensor>,
    /// Added to the batch variance (torch's default 1e-5).
    pub eps: f64,
}

/// What a [`ResidualBlock`] adds to its last stage's normalised output,
/// before the final ReLU.
#[derive(Clone, Copy, Debug)]
pub enum Shortcut<'a> {
    /// Nothing: every stage ends in a ReLU (a stem: conv, BN, ReLU).
    None,
    /// The block's input (its output must have the input's shape).
    Identity,
    /// A convolution and BatchNorm of the block's input, without ReLU
    /// (torchvision's `downsample`).
    Projection(ConvBn<'a>),
}

/// A residual block in training mode: with input `x`, each stage computes
/// `h = relu(bn(conv(h)))` from `h = x`, except that the last stage adds
/// the shortcut before its ReLU: `y = relu(bn(conv(h)) + shortcut(x))`.
/// ResNet's BasicBlock is two 3x3 stages, its Bottleneck three stages
/// (1x1, 3x3, 1x1).
#[derive(Clone, Debug)]
pub struct ResidualBlock<'a> {
    /// The stages of the main branch, in order (at least one).
    pub stages: Vec<ConvBn<'a>>,
    /// What the last stage adds before its ReLU.
    pub shortcut: Shortcut<'a>,
}

/// The batch statistics of one BatchNorm, for its running averages.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BatchStats {
    /// Per-channel batch mean `(c,)`, detached.
    pub mean: Tensor,
    /// Per-channel biased batch variance `(c,)` (divided by `count`),
    /// detached; torch's running variance uses `var * count / (count - 1)`.
    pub var: Tensor,
    /// Values per channel, `n * h * w`.
    pub count: usize,
}

/// What [`residual_blocks_train`] returns.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ResidualOutput {
    /// The last block's output. Differentiable in the input and in every
    /// weight, BatchNorm scale and shift.
    pub output: Tensor,
    /// The statistics of every BatchNorm: block by block, the main stages
    /// in order, then the projection.
    pub stats: Vec<BatchStats>,
}

/// A chain of residual blocks (see [`ResidualBlock`]) in training mode,
/// run as **one** op: forward and backward of every convolution,
/// BatchNorm, ReLU and shortcut happen inside it, so candle's backward
/// keeps no per-layer gradient (it adds every gradient into a fresh zero
/// tensor, two passes over memory per layer, which at small widths cost as
/// much as the convolutions). The result equals the composition of
/// [`conv2d`], [`batch_norm_relu_train`], [`batch_norm_train`] and
/// [`batch_norm_add_relu_train`] up to rounding.
///
/// In candle's second-order mode (`CANDLE_GRAD_DO_NOT_DETACH` set) the
/// blocks are that composition, so gradients of gradients stay exact.
///
/// ```
/// use aimass::candle::{DType, Device, Tensor, Var};
/// use aimass::ops::kernels::{self, ConvBn, ResidualBlock, Shortcut};
///
/// let dev = Device::Cpu;
/// let x = Tensor::randn(0f32, 1.0, (4, 8, 10, 10), &dev)?;
/// let w1 = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (8, 8, 3, 3), &dev)? * 0.1)?)?;
/// let w2 = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (8, 8, 3, 3), &dev)? * 0.1)?)?;
/// fn stage(w: &Var) -> ConvBn<'_> {
///     ConvBn {
///         weight: w.as_tensor(),
///         stride: (1, 1),
///         padding: (1, 1),
///         bn_weight: None,
///         bn_bias: None,
///         eps: 1e-5,
///     }
/// }
/// // A BasicBlock: conv-BN-ReLU, conv-BN, plus the input, ReLU.
/// let block = ResidualBlock {
///     stages: vec![stage(&w1), stage(&w2)],
///     shortcut: Shortcut::Identity,
/// };
/// let out = kernels::residual_blocks_train(&x, &[block])?;
/// assert_eq!(out.output.dims(), &[4, 8, 10, 10]);
/// assert_eq!(out.stats.len(), 2);
/// let grads = out.output.sqr()?.sum_all()?.backward()?;
/// assert!(grads.get(&w1).is_some() && grads.get(&w2).is_some());
/// # Ok::<(), aimass::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::Shape`] when the shapes do not chain (channels, an identity
/// shortcut whose block changes the shape, a projection whose output
/// differs from the main branch's, BatchNorm parameters that are not
/// `(c_out,)`) or a block has no stage; [`Error::InvalidArgument`] for a
/// zero stride, a negative or non-finite `eps`, or tensors the kernels do
/// not support (see [`supports`]).
pub fn residual_blocks_train(x: &Tensor, blocks: &[ResidualBlock<'_>]) -> Result<ResidualOutput> {
    let op = "kernels::residual_blocks_train";
    let specs = residual_specs(op, x, blocks)?;
    if util::second_order() {
        return residual_composed(x, blocks);
    }
    let xd = x
        .dims4()
        .map_err(|_| Error::shape(op, "input (n, c, h, w)", x.dims()))?;
    let plan = residual::Plan::new(xd, &specs)
        .map_err(|e| Error::shape(op, format!("blocks that chain ({e})"), x.dims()))?;
    let counts = plan.counts();
    let mut parts = Vec::new();
    for b in blocks {
        let proj = match &b.shortcut {
            Shortcut::Projection(p) => Some(p),
            _ => None,
        };
        for s in b.stages.iter().chain(proj) {
            let c = s.weight.dim(0)?;
            parts.push(s.weight.flatten_all()?);
            parts.push(match s.bn_weight {
                Some(g) => g.clone(),
                None => Tensor::ones(c, x.dtype(), x.device())?,
            });
            parts.push(match s.bn_bias {
                Some(b) => b.clone(),
                None => Tensor::zeros(c, x.dtype(), x.device())?,
            });
        }
    }
    let packed = Tensor::cat(&parts, 0)?;
    let stats = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let fused = residual::ResidualOp {
        plan: std::sync::Arc::new(plan),
        saved: std::sync::Arc::new(std::sync::Mutex::new(None)),
        stats: stats.clone(),
    };
    let output = x
        .contiguous()?
        .apply_op2(&packed, fused)
        .context("residual blocks kernel")?;
    let st = stats
        .lock()
        .map(|g| g.clone())
        .map_err(|_| Error::invalid(op, "the kernel's statistics lock was poisoned"))?;
    if st.len() != counts.len() {
        return Err(Error::invalid(op, "the kernel returned no statistics"));
    }
    let mut out = Vec::with_capacity(st.len());
    for (s, count) in st.into_iter().zip(counts) {
        let c = s.mean.len();
        out.push(BatchStats {
            mean: Tensor::from_vec(s.mean, c, &candle_core::Device::Cpu)?.to_dtype(x.dtype())?,
            var: Tensor::from_vec(s.var, c, &candle_core::Device::Cpu)?.to_dtype(x.dtype())?,
            count,
        });
    }
    Ok(ResidualOutput { output, stats: out })
}

/// Checks the operands of [`residual_blocks_train`] and describes its
/// blocks for the fused op.
fn residual_specs(
    op: &str,
    x: &Tensor,
    blocks: &[ResidualBlock<'_>],
) -> Result<Vec<residual::BlockSpec>> {
    check_supported(op, &[x])?;
    if blocks.is_empty() {
        return Err(Error::shape(op, "at least one block", 0));
    }
    let stage = |s: &ConvBn<'_>| -> Result<residual::StageSpec> {
        check_supported(op, &[x, s.weight])?;
        check_pair(op, "stride", s.stride, 1)?;
        if !(s.eps.is_finite() && s.eps >= 0.0) {
            return Err(Error::invalid(
                op,
                format!("eps must be finite and >= 0, got {}", s.eps),
            ));
        }
        let wd = s
            .weight
            .dims4()
            .map_err(|_| Error::shape(op, "weight (c_out, c_in, kh, kw)", s.weight.dims()))?;
        for (name, t) in [("bn_weight", s.bn_weight), ("bn_bias", s.bn_bias)] {
            if let Some(t) = t {
                if t.dims() != [wd.0] {
                    return Err(Error::shape(op, format!("{name} ({},)", wd.0), t.dims()));
                }
                check_supported(op, &[x, t])?;
            }
        }
        Ok(residual::StageSpec {
            weight: wd,
            p: conv::ConvParams {
                stride: s.stride,
                padding: s.padding,
                dilation: (1, 1),
                groups: 1,
            },
            eps: s.eps,
        })
    };
    blocks
        .iter()
        .map(|b| {
            if b.stages.is_empty() {
                return Err(Error::shape(op, "a block with at least one stage", 0));
            }
            Ok(residual::BlockSpec {
                stages: b.stages.iter().map(stage).collect::<Result<_>>()?,
                shortcut: match &b.shortcut {
                    Shortcut::None => residual::ShortcutSpec::None,
                    Shortcut::Identity => residual::ShortcutSpec::Identity,
                    Shortcut::Projection(p) => residual::ShortcutSpec::Projection(stage(p)?),
                },
            })
        })
        .collect()
}

/// [`residual_blocks_train`] composed of the single-layer kernels (second
/// order, and the reference the fused op is tested against).
fn residual_composed(x: &Tensor, blocks: &[ResidualBlock<'_>]) -> Result<ResidualOutput> {
    let mut h = x.clone();
    let mut stats = Vec::new();
    let keep = |o: &BatchNormTrainOutput| BatchStats {
        mean: o.mean.clone(),
        var: o.var.clone(),
        count: o.count,
    };
    for b in blocks {
        let input = h.clone();
        let last = b.stages.len().saturating_sub(1);
        let mut proj_stats = None;
        for (i, s) in b.stages.iter().enumerate() {
            let z = conv2d(&h, s.weight, None, s.stride, s.padding, (1, 1), 1)?;
            let (w, bias) = (s.bn_weight, s.bn_bias);
            let out = match (i == last, &b.shortcut) {
                (false, _) | (true, Shortcut::None) => batch_norm_relu_train(&z, w, bias, s.eps)?,
                (true, Shortcut::Identity) => {
                    batch_norm_add_relu_train(&z, w, bias, &input, s.eps)?
                }
                (true, Shortcut::Projection(p)) => {
                    let zp = conv2d(&input, p.weight, None, p.stride, p.padding, (1, 1), 1)?;
                    let sp = batch_norm_train(&zp, p.bn_weight, p.bn_bias, p.eps)?;
                    proj_stats = Some(keep(&sp));
                    batch_norm_add_relu_train(&z, w, bias, &sp.output, s.eps)?
                }
            };
            stats.push(keep(&out));
            h = out.output;
        }
        stats.extend(proj_stats);
    }
    Ok(ResidualOutput { output: h, stats })
}
