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
//!
//! A program's `main` can return [`Result`] and use `?` on the standard
//! library's I/O and number-parsing errors too. They become
//! [`Error::Io`] (without a path: use [`Error::io`] where the file is known,
//! so the message names it) and [`Error::InvalidArgument`]:
//!
//! ```no_run
//! fn main() -> aimass::Result<()> {
//!     let epochs: usize = std::env::args().nth(1).unwrap_or("10".into()).parse()?;
//!     let lr: f64 = "0.1".parse()?;
//!     std::fs::create_dir_all("runs")?;
//!     let labels = std::fs::read_to_string("labels.txt")
//!         .map_err(|e| aimass::Error::io("labels.txt", e))?;
//!     println!("{epochs} epochs at lr {lr}, {} labels", labels.lines().count());
//!     Ok(())
//! }
//! ```

use std::path::{Path, PathBuf};

/// The result type of every fallible aimass function.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in aimass.
///
/// The enum is `#[non_exhaustive]`: match the variants you handle and keep a
/// wildcard arm, so new variants can be added without breaking your code.
#[derive(thiserror::Error)]
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
    #[error("I/O error{}: {source}", io_location(path))]
    Io {
        /// The file or directory involved; empty when it is not known (an
        /// `std::io::Error` converted with `?`, see [`Error::io`] to name it).
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

    /// A collective operation of data-parallel training failed: it timed
    /// out waiting for the other ranks, a rank left the group, or the
    /// communication backend (MPI, NCCL) reported an error.
    #[error("collective {op} failed on rank {rank}: {reason}")]
    Communication {
        /// The collective (e.g. `all_reduce_sum`, `barrier`).
        op: String,
        /// The rank that reports the failure.
        rank: usize,
        /// What happened and what to do.
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

    /// Builds an [`Error::Communication`].
    pub fn communication(op: impl Into<String>, rank: usize, reason: impl Into<String>) -> Self {
        Error::Communication {
            op: op.into(),
            rank,
            reason: reason.into(),
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

/// Where an I/O error happened, for [`Error::Io`]'s message.
fn io_location(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        " (file not known: the error was converted with `?`; use `aimass::Error::io(path, e)` to name it)"
            .to_string()
    } else {
        format!(" on `{}`", path.display())
    }
}

/// `?` on an `std::io::Error` (e.g. in `fn main() -> aimass::Result<()>`):
/// an [`Error::Io`] without a path. Prefer [`Error::io`] where the path is
/// known, so the message names the file.
impl From<std::io::Error> for Error {
    fn from(source: std::io::Error) -> Self {
        Error::Io {
            path: PathBuf::new(),
            source,
        }
    }
}

/// `?` on a failed integer parse (e.g. of a command-line argument): an
/// [`Error::InvalidArgument`].
impl From<std::num::ParseIntError> for Error {
    fn from(e: std::num::ParseIntError) -> Self {
        Error::invalid("parsing an integer", format!("{e}"))
    }
}

/// `?` on a failed float parse (e.g. of a command-line argument): an
/// [`Error::InvalidArgument`].
impl From<std::num::ParseFloatError> for Error {
    fn from(e: std::num::ParseFloatError) -> Self {
        Error::invalid("parsing a number", format!("{e}"))
    }
}

/// `Debug` prints the same message as `Display`, so that a program whose
/// `main` returns [`Result`] reports a failure in words (`Error: malformed
/// checkpoint data in ...`) rather than as a struct dump.
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &str) -> Result<Vec<u8>> {
        Ok(std::fs::read(path)?)
    }

    fn parse(v: &str) -> Result<(u32, f64)> {
        Ok((v.parse()?, v.parse()?))
    }

    #[test]
    fn std_errors_convert_with_question_mark() {
        let e = read("/nonexistent/aimass-no-such-file").unwrap_err();
        assert!(matches!(&e, Error::Io { path, .. } if path.as_os_str().is_empty()));
        let msg = e.to_string();
        assert!(msg.starts_with("I/O error (file not known"), "{msg}");
        assert!(msg.contains("Error::io(path, e)"), "{msg}");
        // With a path, the message names it.
        let e = Error::io(
            "a/b.bin",
            std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        );
        assert_eq!(e.to_string(), "I/O error on `a/b.bin`: gone");

        let e = parse("x").unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
        assert!(e.to_string().contains("invalid digit"), "{e}");
        let e = parse("1.5").unwrap_err();
        assert!(e.to_string().contains("parsing an integer"), "{e}");
        let e: Error = "1.5x".parse::<f64>().unwrap_err().into();
        assert!(e.to_string().contains("parsing a number"), "{e}");
        assert_eq!(parse("3").unwrap(), (3, 3.0));
    }

    /// What `fn main() -> aimass::Result<()>` prints on failure is the
    /// `Debug` form: it must be the message, not a struct dump.
    #[test]
    fn debug_is_the_message() {
        let e = Error::config("SgdConfig::lr", -1.0, "must be >= 0");
        assert_eq!(format!("{e:?}"), e.to_string());
        assert!(!format!("{e:?}").contains("Config {"));
    }
}
