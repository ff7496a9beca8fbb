//! One error type for the whole crate.
//!
//! Every public function of aimass returns [`Result<T>`], whose error is
//! [`Error`]. Each variant says *what* went wrong and *where*, and where there
//! is something the caller can do about it, the message says what.
//!
//! Candle errors convert automatically with `?` (they become
//! [`Error::Candle`] with a generic context); use [`Context::context`] to say
//! which operation failed:
//!
//! ```
//! use aimass::candle::{Device, Tensor};
//! use aimass::error::Context;
//!
//! fn add_rows(a: &Tensor, b: &Tensor) -> aimass::Result<Tensor> {
//!     a.broadcast_add(b).context("adding the bias row")
//! }
//!
//! let a = Tensor::zeros((2, 3), aimass::candle::DType::F32, &Device::Cpu)?;
//! let b = Tensor::zeros((2, 4), aimass::candle::DType::F32, &Device::Cpu)?;
//! let err = add_rows(&a, &b).unwrap_err();
//! assert!(err.to_string().contains("adding the bias row"));
//! # Ok::<(), aimass::Error>(())
//! ```

use std::path::{Path, PathBuf};

/// The result type of every fallible aimass function.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in aimass.
///
/// The enum is `#[non_exhaustive]`: match the variants you handle and keep a
/// wildcard arm, so new variants can be added without breaking your code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A candle tensor operation failed.
    #[error("{context}: {source}")]
    Candle {
        /// What aimass was doing when candle failed.
        context: String,
        /// The underlying candle error.
        #[source]
        source: candle_core::Error,
    },

    /// Reading or writing a file failed.
    #[error("I/O error on `{}`: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A data or checkpoint file does not have the expected content.
    #[error("malformed {what} in `{}`: expected {expected}, found {found}", path.display())]
    Malformed {
        /// The file (or a description of the byte source when there is no file).
        path: PathBuf,
        /// Which part of the file is wrong (e.g. "IDX header", "checkpoint metadata").
        what: String,
        /// What the reader expected.
        expected: String,
        /// What it found instead.
        found: String,
    },

    /// A configuration value is invalid.
    #[error("invalid configuration: `{field}` = {value}: {reason}")]
    Config {
        /// The offending field, e.g. `"SgdConfig::momentum"`.
        field: String,
        /// The value that was given, formatted.
        value: String,
        /// Why it is invalid and what would be valid.
        reason: String,
    },

    /// A tensor does not have the shape an operation needs.
    #[error("shape mismatch in {op}: expected {expected}, got {got}")]
    Shape {
        /// The operation that checked the shape.
        op: String,
        /// The shape (or rule) that was expected.
        expected: String,
        /// The shape that was given.
        got: String,
    },

    /// A loss, gradient or weight became NaN or infinite.
    #[error("non-finite {quantity} ({value}){}: lower the learning rate, enable gradient clipping, or check the input data", match step { Some(s) => format!(" at step {s}"), None => String::new() })]
    NonFinite {
        /// Which quantity (e.g. "loss", "gradient norm", "weight `fc.weight`").
        quantity: String,
        /// The offending value, formatted (`NaN`, `inf`, ...).
        value: String,
        /// The optimisation step, when known.
        step: Option<u64>,
    },

    /// A backend (CUDA, Metal) was requested but this build does not include it.
    #[error("the {backend} backend was requested but aimass was built without it: rebuild with `--features {feature}`, or use `AIMASS_DEVICE=cpu`")]
    BackendNotCompiled {
        /// The backend that was asked for.
        backend: String,
        /// The cargo feature that enables it.
        feature: String,
    },

    /// A backend is compiled in but the requested device is not present.
    #[error("device {device} is not available: {reason}")]
    DeviceUnavailable {
        /// The device that was asked for, e.g. `cuda:1`.
        device: String,
        /// Why it could not be opened.
        reason: String,
    },

    /// An argument is outside what the function accepts (other than shapes,
    /// which use [`Error::Shape`]).
    #[error("invalid argument to {op}: {reason}")]
    InvalidArgument {
        /// The function or operation that rejected its argument.
        op: String,
        /// What is wrong and what would be accepted.
        reason: String,
    },
}

impl Error {
    /// Builds an [`Error::Config`].
    pub fn config(
        field: impl Into<String>,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Error::Config {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::Shape`].
    pub fn shape(
        op: impl Into<String>,
        expected: impl Into<String>,
        got: impl std::fmt::Debug,
    ) -> Self {
        Error::Shape {
            op: op.into(),
            expected: expected.into(),
            got: format!("{got:?}"),
        }
    }

    /// Builds an [`Error::Malformed`].
    pub fn malformed(
        path: impl AsRef<Path>,
        what: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        Error::Malformed {
            path: path.as_ref().to_path_buf(),
            what: what.into(),
            expected: expected.into(),
            found: found.into(),
        }
    }

    /// Builds an [`Error::Io`].
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// Builds an [`Error::NonFinite`].
    pub fn non_finite(quantity: impl Into<String>, value: f64, step: Option<u64>) -> Self {
        Error::NonFinite {
            quantity: quantity.into(),
            value: format!("{value}"),
            step,
        }
    }

    /// Builds an [`Error::InvalidArgument`].
    pub fn invalid(op: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op: op.into(),
            reason: reason.into(),
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(source: candle_core::Error) -> Self {
        Error::Candle {
            context: "tensor operation".to_string(),
            source,
        }
    }
}

/// Adds context to a candle result, turning it into an aimass [`Result`].
pub trait Context<T> {
    /// Wraps the error, if any, in [`Error::Candle`] with `context` saying
    /// what was being done.
    fn context(self, context: impl Into<String>) -> Result<T>;

    /// Like [`Context::context`], with the context built lazily.
    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, candle_core::Error> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Candle {
            context: context.into(),
            source,
        })
    }

    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|source| Error::Candle {
            context: context().into(),
            source,
        })
    }
}
