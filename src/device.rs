//! Choosing the device, and seeding everything random.
//!
//! # Devices
//!
//! [`best_device`] picks, in one call, the fastest device this build and this
//! machine offer: CUDA if the `cuda` feature is compiled in and a GPU is
//! present, else Metal likewise, else the CPU. The environment variable
//! `AIMASS_DEVICE` (`cpu`, `cuda`, `cuda:N`, `metal`, `auto`) overrides the
//! choice, and [`select_device`] takes an explicit request that overrides
//! both. Asking for a backend that is not compiled in, or for a GPU that is
//! not there, is an [`Error`], never a silent fallback to the CPU.
//!
//! ```
//! use aimass::device::{select_device, DeviceRequest};
//!
//! let cpu = select_device(DeviceRequest::Cpu)?;
//! assert!(cpu.is_cpu());
//! // Parsing follows the `AIMASS_DEVICE` syntax.
//! let req: DeviceRequest = "cuda:1".parse()?;
//! assert_eq!(req, DeviceRequest::Cuda(1));
//! # Ok::<(), aimass::Error>(())
//! ```
//!
//! # The CPU allocator
//!
//! Training allocates and frees the same large activation buffers every
//! step. With glibc's default settings, freed memory at the top of the heap
//! is returned to the kernel, and every block above a (dynamic) threshold
//! is a fresh `mmap`, so each step page-faults its whole working set again:
//! a quarter of a CPU ResNet step went to the kernel zeroing pages.
//! [`tune_cpu_allocator`] serves blocks up to 32 MiB from the heap and keeps
//! freed memory for reuse: the process keeps its peak memory instead of
//! giving it back. That is the right trade for a training program and the
//! wrong one for a server or a GUI that embeds aimass for a short job, so
//! it is a process-wide setting that aimass never changes by itself: a
//! kernel call, a model or an optimizer leaves the allocator alone. The
//! training loop [`crate::train::Fit`] turns it on when its config says so,
//! and the examples do; a program calls [`tune_cpu_allocator`] itself
//! otherwise. `AIMASS_CPU_MALLOC=system` makes it a no-op. It does nothing
//! outside Linux with glibc; a binary can also install an allocator of its
//! own (jemalloc, mimalloc) with `#[global_allocator]`.
//!
//! aimass does not set environment variables or build rayon's global
//! thread pool either (it uses the pool the program has, sized by
//! `RAYON_NUM_THREADS` by default); second-order gradients, which need an
//! environment variable, are turned on by the program
//! ([`crate::autograd::enable_second_order`]).
//!
//! One such setting matters for programs of many small operations:
//! candle 0.11 looks up the number of CPU cores for **every** matrix
//! product on the CPU, reading `/proc/cpuinfo` on Linux, unless
//! `RAYON_NUM_THREADS` is set. For the 40-unit MLP of MAML's sinusoids that
//! lookup took most of the time: 16.0 ms against 4.7 ms per second-order
//! meta-iteration (on 2 busy cores). [`fix_cpu_thread_count`] sets the
//! variable once, to the
//! count rayon uses anyway; a training program calls it at the start of
//! `main`, as the examples do.
//!
//! # Seeding
//!
//! Everything random in aimass (initialisation, shuffling, augmentation,
//! episode sampling) draws from a [`SeededRng`] made by [`rng`] or
//! [`rng_stream`]. The generator is ChaCha8 (crate `rand_chacha`): the same
//! seed gives the same numbers on every platform, and independent streams can
//! be derived from one seed without correlation (e.g. one per sample so that
//! augmentations do not depend on the number of threads).
//!
//! ```
//! use aimass::device::{rng, rng_stream};
//! use rand::Rng;
//!
//! let a: f32 = rng(42).random();
//! let b: f32 = rng(42).random();
//! assert_eq!(a, b);
//! let c: f32 = rng_stream(42, 1).random();
//! assert_ne!(a, c);
//! ```

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use rand::SeedableRng;

use crate::{Error, Result};

/// The name of the environment variable that overrides the automatic choice.
pub const DEVICE_ENV_VAR: &str = "AIMASS_DEVICE";

/// Which device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum DeviceRequest {
    /// The best available: CUDA GPU 0, else Metal, else CPU. Honours
    /// `AIMASS_DEVICE` when it is set.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The CUDA GPU with this ordinal (requires the `cuda` feature).
    Cuda(usize),
    /// The default Metal GPU (requires the `metal` feature).
    Metal,
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Auto => write!(f, "auto"),
            DeviceRequest::Cpu => write!(f, "cpu"),
            DeviceRequest::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceRequest::Metal => write!(f, "metal"),
        }
    }
}

impl FromStr for DeviceRequest {
    type Err = Error;

    /// Parses `auto`, `cpu`, `cuda`, `cuda:N`, `metal` (case-insensitive,
    /// surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let bad = || {
            Error::config(
                DEVICE_ENV_VAR,
                format!("{s:?}"),
                "expected one of `auto`, `cpu`, `cuda`, `cuda:N` (N a GPU ordinal), `metal`",
            )
        };
        match t.as_str() {
            "" | "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu" => Ok(DeviceRequest::Cuda(0)),
            "metal" | "mps" => Ok(DeviceRequest::Metal),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map(DeviceRequest::Cuda)
                    .map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

/// The request given by `AIMASS_DEVICE`, or `None` when it is unset or empty.
///
/// A value that does not parse is an [`Error::Config`] naming the variable.
pub fn env_request() -> Result<Option<DeviceRequest>> {
    match std::env::var(DEVICE_ENV_VAR) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => v.parse().map(Some),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(Error::config(
            DEVICE_ENV_VAR,
            format!("{v:?}"),
            "the value is not valid UTF-8",
        )),
    }
}

/// The best device: `AIMASS_DEVICE` if set, else CUDA, Metal, CPU in that order.
pub fn best_device() -> Result<Device> {
    select_device(DeviceRequest::Auto)
}

/// Opens the requested device.
///
/// `Auto` consults `AIMASS_DEVICE` first, then probes the compiled-in GPU
/// backends for a present device, then falls back to the CPU. Any explicit
/// request either opens exactly that device or returns an error:
/// [`Error::BackendNotCompiled`] when the backend's feature is off,
/// [`Error::DeviceUnavailable`] when the hardware is absent.
pub fn select_device(request: DeviceRequest) -> Result<Device> {
    match request {
        DeviceRequest::Auto => match env_request()? {
            Some(DeviceRequest::Auto) | None => Ok(auto_device()),
            Some(explicit) => select_device(explicit),
        },
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Cuda(ordinal) => open_cuda(ordinal),
        DeviceRequest::Metal => open_metal(),
    }
}

fn auto_device() -> Device {
    if let Ok(d) = open_cuda(0) {
        return d;
    }
    if let Ok(d) = open_metal() {
        return d;
    }
    Device::Cpu
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| Error::DeviceUnavailable {
        device: format!("cuda:{ordinal}"),
        reason: format!("{e}; check `nvidia-smi` and the GPU ordinal"),
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> Result<Device> {
    Err(Error::BackendNotCompiled {
        backend: "CUDA".to_string(),
        feature: "cuda".to_string(),
    })
}

#[cfg(feature = "metal")]
fn open_metal() -> Result<Device> {
    Device::new_metal(0).map_err(|e| Error::DeviceUnavailable {
        device: "metal".to_string(),
        reason: e.to_string(),
    })
}

#[cfg(not(feature = "metal"))]
fn open_metal() -> Result<Device> {
    Err(Error::BackendNotCompiled {
        backend: "Metal".to_string(),
        feature: "metal".to_string(),
    })
}

/// A short human-readable name for a device (`cpu`, `cuda:0`, `metal`).
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The seeded random number generator used everywhere in aimass (ChaCha8).
pub type SeededRng = rand_chacha::ChaCha8Rng;

/// A generator seeded with `seed`: the single seeding entry point of aimass.
pub fn rng(seed: u64) -> SeededRng {
    SeededRng::seed_from_u64(seed)
}

/// An independent stream `stream` of the generator seeded with `seed`.
///
/// Streams of one seed do not overlap, so per-sample or per-worker randomness
/// can be drawn in any order, on any number of threads, with identical results.
pub fn rng_stream(seed: u64, stream: u64) -> SeededRng {
    let mut r = SeededRng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

static TUNED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Tunes glibc's `malloc` for training (see the module docs): blocks up to
/// 32 MiB come from the heap, and freed memory is never trimmed. A
/// process-wide setting that only a training program should ask for; runs
/// once per process; returns whether the settings are in effect (false on
/// other platforms and C libraries, or when `AIMASS_CPU_MALLOC=system`).
pub fn tune_cpu_allocator() -> bool {
    *TUNED.get_or_init(|| {
        if std::env::var("AIMASS_CPU_MALLOC").is_ok_and(|v| v == "system") {
            return false;
        }
        set_malloc_options()
    })
}

/// Whether [`tune_cpu_allocator`] has changed the allocator's settings in
/// this process (it never runs unless called).
pub fn cpu_allocator_tuned() -> bool {
    TUNED.get().copied().unwrap_or(false)
}

/// Sets `RAYON_NUM_THREADS` to the number of threads rayon would use
/// (`std::thread::available_parallelism`) unless it is set already, and
/// returns the value in effect (see the module docs: candle otherwise
/// counts the CPU cores again at every matrix product). A process-wide
/// setting that aimass never changes by itself: call it at the start of
/// `main`, before spawning threads. An unparsable value already set is
/// left alone and reported as 0.
///
/// ```
/// let n = aimass::device::fix_cpu_thread_count();
/// assert_eq!(std::env::var("RAYON_NUM_THREADS").unwrap(), n.to_string());
/// ```
pub fn fix_cpu_thread_count() -> usize {
    const VAR: &str = "RAYON_NUM_THREADS";
    if let Some(v) = std::env::var_os(VAR) {
        return v.to_str().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    }
    let n = std::thread::available_parallelism().map_or(1, usize::from);
    std::env::set_var(VAR, n.to_string());
    n
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_malloc_options() -> bool {
    // SAFETY: mallopt only changes allocator parameters; glibc accepts it
    // at any time, from any thread. 32 MiB is the largest mmap threshold
    // glibc takes on 64-bit targets; -1 disables trimming (mallopt(3)).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, -1) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_malloc_options() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_requests() {
        assert_eq!("cpu".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cpu);
        assert_eq!(
            " CUDA ".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(3)
        );
        assert_eq!(
            "metal".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Metal
        );
        assert_eq!(
            "auto".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Auto
        );
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1"] {
            let e = bad.parse::<DeviceRequest>().unwrap_err();
            assert!(
                matches!(e, Error::Config { ref field, .. } if field == DEVICE_ENV_VAR),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for r in [
            DeviceRequest::Auto,
            DeviceRequest::Cpu,
            DeviceRequest::Cuda(2),
            DeviceRequest::Metal,
        ] {
            assert_eq!(r.to_string().parse::<DeviceRequest>().unwrap(), r);
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_typed_error() {
        let e = select_device(DeviceRequest::Cuda(0)).unwrap_err();
        assert!(matches!(e, Error::BackendNotCompiled { .. }), "{e}");
        assert!(e.to_string().contains("--features cuda"));
    }

    #[cfg(not(feature = "metal"))]
    #[test]
    fn metal_without_feature_is_typed_error() {
        let e = select_device(DeviceRequest::Metal).unwrap_err();
        assert!(matches!(e, Error::BackendNotCompiled { .. }), "{e}");
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        use rand::Rng;
        let a: Vec<u32> = (0..8)
            .map(|_| 0)
            .scan(rng_stream(7, 3), |r, _: u32| Some(r.random()))
            .collect();
        let b: Vec<u32> = (0..8)
            .map(|_| 0)
            .scan(rng_stream(7, 3), |r, _: u32| Some(r.random()))
            .collect();
        let c: Vec<u32> = (0..8)
            .map(|_| 0)
            .scan(rng_stream(7, 4), |r, _: u32| Some(r.random()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
