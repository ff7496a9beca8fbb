//! [`MpiCommunicator`]: processes and machines through MPI (feature `mpi`).
//!
//! Built on rsmpi (the `mpi` crate) over the system's MPI (Open MPI or
//! MPICH). Collectives are MPI's non-blocking ones (`MPI_Iallreduce`,
//! `MPI_Ibcast`, `MPI_Iallgatherv`, `MPI_Ibarrier`) polled until they
//! complete or the timeout passes, so that a rank that died or hangs makes
//! the others fail with an error instead of blocking in MPI forever. The
//! buffers of a collective that timed out are leaked (MPI may still write
//! to them) and the communicator is poisoned: it refuses further
//! collectives and, when dropped, does not call `MPI_Finalize` (which
//! would wait for the lost rank); the process exits and `mpirun` ends the
//! job.

use std::os::raw::{c_int, c_void};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mpi::environment::Universe;
use mpi::ffi;
use mpi::traits::{AsRaw, Communicator as _};

use super::communicator::{CommConfig, HostValues};
use super::host_collectives::{self as hc, HostCollectives};
use crate::{Error, Result};

/// MPI's state: the universe (finalised on drop unless poisoned).
struct State {
    universe: Option<Universe>,
    world: ffi::MPI_Comm,
    poisoned: Option<String>,
}

// SAFETY: MPI is initialised with at least MPI_THREAD_SERIALIZED and every
// call goes through the mutex that owns this state, so MPI is never called
// from two threads at once.
unsafe impl Send for State {}

/// The MPI world as a [`Communicator`](super::Communicator): every process of an `mpirun` (or
/// `srun`) launch is one rank.
///
/// ```no_run
/// use std::sync::Arc;
/// use aimass::distributed::{CommConfig, Communicator, MpiCommunicator};
///
/// // mpirun -np 2 target/release/examples/data_parallel
/// let comm: Arc<dyn Communicator> = Arc::new(MpiCommunicator::init(CommConfig::default())?);
/// println!("rank {} of {}", comm.rank(), comm.world_size());
/// # Ok::<(), aimass::Error>(())
/// ```
///
/// MPI is initialised once per process (`MPI_THREAD_SERIALIZED`); share the
/// communicator (`Arc`) rather than initialising twice. Tensors on a GPU
/// are staged through host memory; use `NcclCommunicator` between GPUs.
pub struct MpiCommunicator {
    state: Mutex<State>,
    rank: usize,
    world_size: usize,
    timeout: Duration,
}

impl std::fmt::Debug for MpiCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl MpiCommunicator {
    /// Initialises MPI and returns the world communicator.
    ///
    /// # Errors
    ///
    /// [`Error::Communication`] when MPI was already initialised in this
    /// process, or its library cannot call it from a thread other than the
    /// one that initialised it in turn (`MPI_THREAD_SERIALIZED`).
    pub fn init(config: CommConfig) -> Result<Self> {
        config.validate()?;
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| {
                Error::communication(
                    "MpiCommunicator::init",
                    0,
                    "MPI is already initialised in this process: create one MpiCommunicator and share it (Arc<dyn Communicator>)",
                )
            })?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if matches!(threading, mpi::Threading::Single | mpi::Threading::Funneled) {
            return Err(Error::communication(
                "MpiCommunicator::init",
                rank,
                format!("this MPI library provides only {threading:?} threading; aimass needs MPI_THREAD_SERIALIZED"),
            ));
        }
        Ok(MpiCommunicator {
            state: Mutex::new(State {
                world: world.as_raw(),
                universe: Some(universe),
                poisoned: None,
            }),
            rank,
            world_size: size,
            timeout: config.timeout(),
        })
    }

    /// Ends the whole job at once (`MPI_Abort`) with exit status `code`:
    /// what a rank that failed should do, so that the others stop now
    /// rather than at their timeout.
    pub fn abort(&self, code: i32) -> ! {
        let world = self.lock().world;
        // SAFETY: MPI is initialised; MPI_Abort does not return.
        unsafe {
            ffi::MPI_Abort(world, code as c_int);
        }
        std::process::exit(code)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, op: &str, reason: impl Into<String>) -> Error {
        Error::communication(op, self.rank, reason)
    }

    /// Starts a non-blocking collective with `start` and polls it until it
    /// completes or the timeout passes. `keep` owns the buffers MPI works
    /// on: on a timeout it is leaked, so MPI may still write to them.
    fn run<K>(
        &self,
        op: &str,
        keep: K,
        start: impl FnOnce(&mut K, ffi::MPI_Comm, *mut ffi::MPI_Request) -> c_int,
    ) -> Result<K> {
        let mut st = self.lock();
        if let Some(why) = &st.poisoned {
            return Err(self.err(
                op,
                format!(
                    "an earlier collective failed ({why}); this communicator cannot be used again"
                ),
            ));
        }
        let mut keep = keep;
        // SAFETY: RSMPI_REQUEST_NULL is a constant of the MPI library.
        let mut req: ffi::MPI_Request = unsafe { ffi::RSMPI_REQUEST_NULL };
        let rc = start(&mut keep, st.world, &mut req);
        if rc != ffi::MPI_SUCCESS as c_int {
            return Err(self.err(op, format!("MPI returned error code {rc}")));
        }
        let begin = Instant::now();
        loop {
            let mut flag: c_int = 0;
            // SAFETY: `req` is the live request started above.
            let rc = unsafe { ffi::MPI_Test(&mut req, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
            if rc != ffi::MPI_SUCCESS as c_int {
                std::mem::forget(keep);
                let why = format!("MPI_Test returned error code {rc}");
                st.poisoned = Some(why.clone());
                return Err(self.err(op, why));
            }
            if flag != 0 {
                return Ok(keep);
            }
            let waited = begin.elapsed();
            if waited >= self.timeout {
                std::mem::forget(keep);
                let why = format!(
                    "timed out after {:.1} s waiting for the other ranks: a rank failed, hangs, or makes different collective calls (raise CommConfig::timeout_secs if a rank legitimately works alone that long)",
                    waited.as_secs_f64()
                );
                st.poisoned = Some(format!("{op} timed out"));
                return Err(self.err(op, why));
            }
            // Spin briefly (a collective between processes of one machine
            // takes microseconds), then yield the core.
            if waited > Duration::from_millis(2) {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn count(&self, op: &str, n: usize) -> Result<c_int> {
        c_int::try_from(n).map_err(|_| {
            self.err(
                op,
                format!(
                    "{n} elements in one MPI call (at most {}): use smaller buckets",
                    c_int::MAX
                ),
            )
        })
    }
}

impl Drop for MpiCommunicator {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if st.poisoned.is_some() || std::thread::panicking() {
            // MPI_Finalize would wait for the lost rank: leave without it,
            // and mpirun ends the job.
            std::mem::forget(st.universe.take());
        }
    }
}

impl HostCollectives for MpiCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn sum_values(&self, op: &str, values: &mut HostValues) -> Result<()> {
        let len = match values {
            HostValues::F32(v) => v.len(),
            HostValues::F64(v) => v.len(),
        };
        if len == 0 {
            return Ok(());
        }
        match values {
            HostValues::F32(v) => {
                let n = self.count(op, v.len())?;
                let bufs = (v.clone(), vec![0f32; v.len()]);
                let (_, recv) = self.run(op, bufs, |b, comm, req| unsafe {
                    // SAFETY: both buffers hold `n` f32 and live in `keep`
                    // until the request completes (or are leaked).
                    ffi::MPI_Iallreduce(
                        b.0.as_ptr() as *const c_void,
                        b.1.as_mut_ptr() as *mut c_void,
                        n,
                        ffi::RSMPI_FLOAT,
                        ffi::RSMPI_SUM,
                        comm,
                        req,
                    )
                })?;
                *v = recv;
            }
            HostValues::F64(v) => {
                let n = self.count(op, v.len())?;
                let bufs = (v.clone(), vec![0f64; v.len()]);
                let (_, recv) = self.run(op, bufs, |b, comm, req| unsafe {
                    // SAFETY: as above, with f64.
                    ffi::MPI_Iallreduce(
                        b.0.as_ptr() as *const c_void,
                        b.1.as_mut_ptr() as *mut c_void,
                        n,
                        ffi::RSMPI_DOUBLE,
                        ffi::RSMPI_SUM,
                        comm,
                        req,
                    )
                })?;
                *v = recv;
            }
        }
        Ok(())
    }

    fn broadcast_bytes(&self, op: &str, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        let root_c = root as c_int;
        let len = self.run(op, [bytes.len() as u64], |b, comm, req| unsafe {
            // SAFETY: one u64 in `keep`.
            ffi::MPI_Ibcast(
                b.as_mut_ptr() as *mut c_void,
                1,
                ffi::RSMPI_UINT64_T,
                root_c,
                comm,
                req,
            )
        })?[0] as usize;
        let n = self.count(op, len)?;
        let mut buf = std::mem::take(bytes);
        buf.resize(len, 0);
        if len == 0 {
            // Open MPI refuses an empty broadcast (MPI_ERR_ARG).
            return Ok(());
        }
        *bytes = self.run(op, buf, |b, comm, req| unsafe {
            // SAFETY: `len` bytes in `keep`.
            ffi::MPI_Ibcast(
                b.as_mut_ptr() as *mut c_void,
                n,
                ffi::RSMPI_UINT8_T,
                root_c,
                comm,
                req,
            )
        })?;
        Ok(())
    }

    fn gather_bytes(&self, op: &str, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let w = self.world_size;
        let lens = self
            .run(
                op,
                ([bytes.len() as u64], vec![0u64; w]),
                |b, comm, req| unsafe {
                    // SAFETY: one u64 sent, `w` received, in `keep`.
                    ffi::MPI_Iallgather(
                        b.0.as_ptr() as *const c_void,
                        1,
                        ffi::RSMPI_UINT64_T,
                        b.1.as_mut_ptr() as *mut c_void,
                        1,
                        ffi::RSMPI_UINT64_T,
                        comm,
                        req,
                    )
                },
            )?
            .1;
        let counts = lens
            .iter()
            .map(|&l| self.count(op, l as usize))
            .collect::<Result<Vec<c_int>>>()?;
        let mut displs = Vec::with_capacity(w);
        let mut total: usize = 0;
        for &c in &counts {
            displs.push(self.count(op, total)?);
            total += c as usize;
        }
        if total == 0 {
            return Ok(vec![Vec::new(); w]);
        }
        let mine = self.count(op, bytes.len())?;
        let keep = (bytes.to_vec(), vec![0u8; total], counts, displs);
        let (_, all, counts, displs) = self.run(op, keep, |b, comm, req| unsafe {
            // SAFETY: the send buffer, the receive buffer of `total` bytes
            // and the counts and displacements live in `keep`.
            ffi::MPI_Iallgatherv(
                b.0.as_ptr() as *const c_void,
                mine,
                ffi::RSMPI_UINT8_T,
                b.1.as_mut_ptr() as *mut c_void,
                b.2.as_ptr(),
                b.3.as_ptr(),
                ffi::RSMPI_UINT8_T,
                comm,
                req,
            )
        })?;
        Ok(counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| all[d as usize..d as usize + c as usize].to_vec())
            .collect())
    }

    fn wait_all(&self) -> Result<()> {
        self.run("barrier", (), |_, comm, req| unsafe {
            // SAFETY: no buffers.
            ffi::MPI_Ibarrier(comm, req)
        })
    }
}

hc::impl_host_communicator!(MpiCommunicator, "mpi");
