//! Data-parallel training on existing engines: MPI across processes and
//! machines, NCCL across GPUs, threads in one process.
//!
//! Each rank (a process, a thread or a GPU) holds a full copy of the model
//! and trains on its shard of every global batch; the ranks stay identical
//! by averaging their gradients before each update (synchronous SGD, as
//! PyTorch's `DistributedDataParallel`) or their weights every few steps
//! (local SGD). The same trainer code runs on one rank or many, and with
//! the same global batch it computes the same weights.
//!
//! | piece | what it does |
//! |---|---|
//! | [`Communicator`] | the collectives: all-reduce (sum, mean), broadcast, all-gather, barrier, with a timeout |
//! | [`SingleProcess`] | world size 1, the default: every collective is free |
//! | [`ThreadCommunicator`] | ranks as threads of one process |
//! | `MpiCommunicator` | feature `mpi`: processes and machines launched by `mpirun` |
//! | `NcclCommunicator` | feature `nccl`: CUDA devices |
//! | [`from_env`] | MPI when launched by an MPI launcher, else [`SingleProcess`] |
//! | [`DistributedOptimizer`] | wraps any optimizer: initial weights from rank 0, gradients averaged in buckets ([`SyncMode::Gradients`]) or local SGD ([`SyncMode::LocalSgd`]) |
//! | [`DataParallel`] | wraps any trainer for [`Fit`](crate::train::Fit): synchronised BatchNorm, global loss and metrics |
//! | [`Shard`](crate::data::Shard) | each rank's part of every global batch (a [`DataLoaderConfig`](crate::data::DataLoaderConfig) field) |
//! | [`RankZero`], [`broadcast_checkpoint`] | only rank 0 writes logs and checkpoints; every rank resumes |
//! | [`replicas`] | differentiable sums and gathers across ranks ([`SyncBatchNormScope`](crate::nn::SyncBatchNormScope)) |
//!
//! A trainer opts in through its optimizer: it calls
//! [`Optimizer::sync_gradients`](crate::optim::Optimizer::sync_gradients)
//! right after its backward pass (one line; [`Classifier`](crate::train::Classifier)
//! does), and a program wraps the optimizer in a [`DistributedOptimizer`]
//! and the trainer in a [`DataParallel`]. One program, launched once per
//! rank (`mpirun -np 2 prog`):
//!
//! ```no_run
//! use std::sync::Arc;
//! use aimass::prelude::*;
//! use aimass::data::{DataLoader, DataLoaderConfig, InMemoryDataset, Shard};
//! use aimass::distributed::*;
//! use aimass::nn::{Mlp, MlpConfig};
//! use aimass::optim::{Sgd, SgdConfig};
//! use aimass::train::{Classifier, ClassifierConfig, Progress, ProgressMode};
//!
//! # fn dataset() -> aimass::Result<InMemoryDataset> { InMemoryDataset::new(vec![0; 64 * 4], vec![0; 64], (1, 2, 2)) }
//! let comm = from_env(CommConfig::default())?; // MPI under mpirun, else one process
//! let (rank, world) = (comm.rank(), comm.world_size());
//! // Every rank: the same model and optimizer (rank 0's weights win).
//! let varmap = VarMap::new();
//! let vb = aimass::nn::init::seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu);
//! let model = aimass::nn::seq().add_fn(|x, _| x.flatten_from(1)).add(Mlp::new(MlpConfig::new(vec![4, 16, 4]), vb)?);
//! let sgd = Sgd::from_varmap(&varmap, SgdConfig::default().with_lr(0.1 * world as f64))?;
//! let opt = DistributedOptimizer::new(sgd, &varmap, comm.clone(), DistributedOptimizerConfig::default())?;
//! let clf = Classifier::new(model, varmap, opt, ClassifierConfig::default())?;
//! let mut trainer = DataParallel::new(clf, comm.clone(), DataParallelConfig::default())?;
//! // Each rank its part of every global batch of 16 × world samples.
//! let cfg = DataLoaderConfig::default().with_batch_size(16).with_shard(Shard::new(rank, world)?);
//! let mut loader = DataLoader::new(dataset()?, cfg, &Device::Cpu)?;
//! Fit::new(&mut trainer, &mut loader, FitConfig::default().with_epochs(5))?
//!     .with_callback(RankZero::new(Progress::new(ProgressMode::Auto, 10), comm.as_ref())?)
//!     .run()?;
//! # Ok::<(), aimass::Error>(())
//! ```
//!
//! `docs/distributed.md` covers launching (one machine, a hostfile, GPUs),
//! how the batch size and learning rate scale, and what is deterministic.

mod buckets;
mod communicator;
mod data_parallel;
mod host_collectives;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
mod optimizer;
mod rank_zero;
mod replicas;
mod single;
mod threads;

use std::sync::Arc;

pub use communicator::{CommConfig, Communicator};
pub use data_parallel::{DataParallel, DataParallelConfig};
#[cfg(feature = "mpi")]
pub use mpi::MpiCommunicator;
#[cfg(feature = "nccl")]
pub use nccl::NcclCommunicator;
pub use optimizer::{CommStats, DistributedOptimizer, DistributedOptimizerConfig, SyncMode};
pub use rank_zero::{broadcast_checkpoint, RankZero};
pub use replicas::replicas;
pub use single::SingleProcess;
pub use threads::ThreadCommunicator;

use crate::Result;

/// Bucket size of the collectives of trainers that synchronise without a
/// [`DistributedOptimizer`] (Reptile): the optimizer's default.
pub(crate) const TRAINER_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Sets every variable of `vars` to rank 0's value, in buckets of at most
/// `cap` bytes (a collective).
pub(crate) fn broadcast_vars(
    comm: &dyn Communicator,
    vars: &[candle_core::Var],
    cap: usize,
) -> Result<()> {
    if comm.world_size() == 1 || vars.is_empty() {
        return Ok(());
    }
    let ts: Vec<candle_core::Tensor> = vars.iter().map(|v| v.as_tensor().detach()).collect();
    let refs: Vec<&candle_core::Tensor> = ts.iter().collect();
    let mut moved = buckets::Moved::default();
    let got = buckets::broadcast(comm, &refs, 0, cap, &mut moved)?;
    for (v, t) in vars.iter().zip(got) {
        v.set(&t)?;
    }
    Ok(())
}

/// The elementwise mean over the ranks of every tensor of `ts`, bucketed
/// (a collective).
pub(crate) fn mean_over_ranks(
    comm: &dyn Communicator,
    ts: &[&candle_core::Tensor],
) -> Result<Vec<candle_core::Tensor>> {
    if comm.world_size() == 1 {
        return Ok(ts.iter().map(|t| (*t).clone()).collect());
    }
    let mut moved = buckets::Moved::default();
    buckets::all_reduce_mean(comm, ts, TRAINER_BUCKET_BYTES, &mut moved)
}

/// Environment variables an MPI launcher sets in every rank (Open MPI,
/// MPICH / Intel MPI / PMI, PMIx, Slurm's `srun --mpi`).
const MPI_LAUNCH_VARS: &[&str] = &[
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_RANK",
    "MPI_LOCALNRANKS",
];

/// Whether this process was started by an MPI launcher (`mpirun`,
/// `mpiexec`, `srun`).
pub fn launched_by_mpi() -> bool {
    MPI_LAUNCH_VARS
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// The communicator of this process: the MPI world when it was started by
/// an MPI launcher, else [`SingleProcess`]. So one program runs alone
/// (`cargo run`) or data-parallel (`mpirun -np 4 ...`) unchanged.
///
/// # Errors
///
/// [`Error::BackendNotCompiled`](crate::Error::BackendNotCompiled) when launched by `mpirun` in a build
/// without the `mpi` feature (each process would otherwise train alone,
/// silently); [`Error::Communication`](crate::Error::Communication) when MPI cannot start.
pub fn from_env(config: CommConfig) -> Result<Arc<dyn Communicator>> {
    config.validate()?;
    if !launched_by_mpi() {
        return Ok(Arc::new(SingleProcess::new()));
    }
    #[cfg(feature = "mpi")]
    {
        Ok(Arc::new(MpiCommunicator::init(config)?))
    }
    #[cfg(not(feature = "mpi"))]
    {
        Err(crate::Error::BackendNotCompiled {
            backend: "MPI (this process was started by mpirun)".into(),
            feature: "mpi".into(),
        })
    }
}

/// Ends the job after a failure on this rank: with MPI, aborts every rank
/// at once (`MPI_Abort`) and exits with status `code`; with another
/// backend, returns (the caller exits, and the other ranks' collectives
/// fail at once or at their timeout). Call it from a rank's error path,
/// after printing the error.
pub fn abort_on_failure(comm: &dyn Communicator, code: i32) {
    #[cfg(feature = "mpi")]
    if comm.world_size() > 1 && comm.backend() == "mpi" {
        // SAFETY: an MPI communicator exists, so MPI is initialised;
        // MPI_Abort ends every rank of the job.
        unsafe {
            ::mpi::ffi::MPI_Abort(::mpi::ffi::RSMPI_COMM_WORLD, code);
        }
        std::process::exit(code);
    }
    let _ = (comm, code);
}
