//! Turning on second-order gradients, and checking that they are on.

use candle_core::{Device, Var};

use crate::{Error, Result};

/// The environment variable candle reads, once per thread at the thread's
/// first backward pass, to keep the graph of the gradients it computes.
pub const SECOND_ORDER_ENV_VAR: &str = "CANDLE_GRAD_DO_NOT_DETACH";

/// Whether backward passes on the **calling thread** keep the graph of the
/// gradients they compute, so that gradients can be differentiated again.
///
/// When `CANDLE_GRAD_DO_NOT_DETACH` is set, it runs a small probe (the
/// second derivative of `x·x·x` at 1, which is 6 only when the first
/// gradient kept its graph): the answer is then exact for this thread, also when the
/// thread ran its first backward pass before the variable was set. When
/// the variable is not set the answer is `false` without a probe, so asking
/// never fixes candle's per-thread setting before
/// [`enable_second_order`] had its chance. A thread found on is
/// remembered (candle's setting cannot change afterwards), so later calls
/// cost nothing.
pub fn second_order_enabled() -> bool {
    // candle fixes the setting per thread at the thread's first backward
    // pass, so a thread found on stays on: remember it (the probe is a few
    // tensor operations, and MAML asks once per inner step).
    thread_local! {
        static ON: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if ON.with(std::cell::Cell::get) {
        return true;
    }
    let on = env_set() && probe().unwrap_or(false);
    if on {
        ON.with(|c| c.set(true));
    }
    on
}

fn env_set() -> bool {
    std::env::var(SECOND_ORDER_ENV_VAR)
        .map(|v| !v.is_empty() && v != "0")
        .unwrap_or(false)
}

fn probe() -> Result<bool> {
    // x·x·x through an intermediate node: with the gradients detached, the
    // second derivative at 1 comes out as 4 instead of 6.
    let x = Var::new(1f64, &Device::Cpu)?;
    let y = (x.as_tensor() * x.as_tensor())?.mul(x.as_tensor())?;
    let Some(g) = y.backward()?.get(&x).cloned() else {
        return Ok(false);
    };
    let Some(h) = g.backward()?.get(&x).cloned() else {
        return Ok(false);
    };
    // host-ok: a CPU probe, once per process.
    Ok((h.to_scalar::<f64>()? - 6.0).abs() < 1e-9)
}

/// Turns on second-order gradients for backward passes of threads that
/// have not run one yet, and checks the calling thread.
///
/// candle keeps the graph of computed gradients only when the environment
/// variable `CANDLE_GRAD_DO_NOT_DETACH` is set when a thread runs its first
/// backward pass (the value is read once per thread). This sets it, in the
/// process environment, and then checks that the calling thread sees it.
/// It changes a process-wide setting, which is why aimass never does it
/// unless asked: call it at the start of `main`, before spawning threads
/// (setting an environment variable while another thread reads the
/// environment is unsafe on some platforms) and before the first backward
/// pass. Setting `CANDLE_GRAD_DO_NOT_DETACH=1` in the environment of the
/// program does the same without code.
///
/// The cost: every backward pass of the process then builds the graph of
/// its gradients too (memory for the backward's intermediate results until
/// the gradients are dropped, a little time), also where only first-order
/// gradients are used. Optimizers detach the gradients they keep.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when the calling thread already ran a
/// backward pass before the variable was set: candle's setting is then fixed
/// for this thread (other, new threads get second order). Call this
/// earlier, or set the variable in the environment.
///
/// ```
/// aimass::autograd::enable_second_order()?;
/// assert!(aimass::autograd::second_order_enabled());
/// # Ok::<(), aimass::Error>(())
/// ```
pub fn enable_second_order() -> Result<()> {
    if !env_set() {
        std::env::set_var(SECOND_ORDER_ENV_VAR, "1");
    }
    if probe()? {
        return Ok(());
    }
    Err(Error::invalid(
        "autograd::enable_second_order",
        format!(
            "this thread ran a backward pass before second-order gradients were enabled, and candle fixes the setting per thread at its first backward pass: call enable_second_order() at the start of main, before any backward pass, or start the program with {SECOND_ORDER_ENV_VAR}=1"
        ),
    ))
}

/// Fails with a clear error unless backward passes on this thread keep the
/// graph of their gradients (see [`enable_second_order`]). `op` names the
/// operation that needs second order, for the message.
///
/// Use it before any computation whose result would silently be first
/// order without the setting (MAML's meta-gradient, Hessian-vector
/// products).
///
/// # Errors
///
/// [`Error::InvalidArgument`] saying how to turn second order on, or to
/// ask for first order explicitly.
pub fn require_second_order(op: &str) -> Result<()> {
    if second_order_enabled() {
        return Ok(());
    }
    Err(Error::invalid(
        op,
        format!(
            "second-order gradients are off on this thread, so the result would silently be first order: call aimass::autograd::enable_second_order() at the start of main (before any backward pass), or set {SECOND_ORDER_ENV_VAR}=1 in the environment, or ask for first order explicitly"
        ),
    ))
}
