//! Differentiable tensor ops that candle lacks or gets wrong.
pub mod kernels;
