//! Data-parallel training across processes with MPI (feature `mpi`): the
//! scenarios of `tests/distributed.rs` run by `mpirun -np 2`.
//!
//! Each test launches `mpirun -np 2` on this test binary, with
//! `AIMASS_MPI_WORKER` naming what the two ranks do (the `worker` test,
//! which does nothing otherwise). Without `mpirun` on the PATH the tests
//! print why and pass: `.ci/run` installs Open MPI, or says it could not.

#[path = "common/dp_scenarios.rs"]
mod scenarios;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aimass::candle::{DType, Device, Tensor};
use aimass::distributed::{from_env, CommConfig, Communicator, SingleProcess, SyncMode};
use scenarios::{max_rel_diff, train, Net, Scenario};

const WORKER_ENV: &str = "AIMASS_MPI_WORKER";

/// Runs `mpirun -np 2` on this binary's `worker` test with `scenario`;
/// returns (success, combined output, wall time), or `None` (after saying
/// why) when there is no `mpirun`.
fn mpirun(scenario: &str) -> Option<(bool, String, Duration)> {
    if Command::new("mpirun").arg("--version").output().is_err() {
        println!(
            "SKIPPED: no `mpirun` on the PATH (Debian: apt-get install openmpi-bin libopenmpi-dev)"
        );
        return None;
    }
    let exe = std::env::current_exe().unwrap();
    let start = Instant::now();
    let out = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe"])
        .arg(exe)
        .args(["--exact", "worker", "--nocapture", "--test-threads=1"])
        .env(WORKER_ENV, scenario)
        // Open MPI refuses to run as root without these (CI runs as root);
        // set for the child only.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // One thread per rank: 2 ranks on a 2-core machine.
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text, start.elapsed()))
}

#[test]
fn two_processes_match_one_process() {
    if let Some((ok, out, _)) = mpirun("equivalence") {
        assert!(ok, "mpirun failed:\n{out}");
        assert_eq!(out.matches("EQUIVALENT").count(), 2, "{out}");
    }
}

#[test]
fn a_rank_that_hangs_makes_the_other_time_out_with_an_error() {
    if let Some((ok, out, waited)) = mpirun("hang") {
        assert!(!ok, "{out}");
        assert!(out.contains("timed out after"), "{out}");
        assert!(waited < Duration::from_secs(60), "{waited:?}\n{out}");
    }
}

#[test]
fn a_rank_that_exits_with_an_error_ends_the_job() {
    if let Some((ok, out, waited)) = mpirun("exit") {
        assert!(!ok, "{out}");
        assert!(out.contains("rank 1 fails"), "{out}");
        assert!(waited < Duration::from_secs(60), "{waited:?}\n{out}");
    }
}

/// What a rank does under `mpirun` (nothing when run directly).
#[test]
fn worker() {
    let Ok(scenario) = std::env::var(WORKER_ENV) else {
        return;
    };
    let cfg = match scenario.as_str() {
        "hang" => CommConfig::default().with_timeout_secs(2.0),
        _ => CommConfig::default().with_timeout_secs(120.0),
    };
    let comm = from_env(cfg).unwrap();
    assert_eq!(comm.backend(), "mpi");
    assert_eq!(comm.world_size(), 2);
    match scenario.as_str() {
        "equivalence" => equivalence(comm),
        "hang" => {
            if comm.rank() == 1 {
                std::thread::sleep(Duration::from_secs(30));
                return;
            }
            let t = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
            let e = comm.all_reduce_sum(&t).unwrap_err();
            eprintln!("rank 0: {e}");
            // Leave without MPI_Finalize (it would wait for rank 1):
            // mpirun ends the job.
            std::process::exit(3);
        }
        "exit" => {
            if comm.rank() == 1 {
                eprintln!("rank 1 fails");
                aimass::distributed::abort_on_failure(comm.as_ref(), 4);
            }
            let t = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
            let _ = comm.all_reduce_sum(&t);
            std::process::exit(5);
        }
        other => panic!("unknown scenario {other}"),
    }
}

fn equivalence(comm: Arc<dyn Communicator>) {
    let rank = comm.rank();
    // Collectives of the MPI backend.
    let r = rank as f32;
    let sum = comm
        .all_reduce_sum(&Tensor::new(&[r, 1.0], &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(sum.to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    let rows = Tensor::full(rank as u32, (rank + 1, 2), &Device::Cpu).unwrap();
    let g = comm.all_gather(&rows).unwrap().to_vec2::<u32>().unwrap();
    assert_eq!(g, vec![vec![0, 0], vec![1, 1], vec![1, 1]]);
    let b = comm
        .broadcast_bytes(format!("rank {rank}").as_bytes(), 1)
        .unwrap();
    assert_eq!(b, b"rank 1".to_vec());
    // Nothing to send (a run that resumes from no checkpoint).
    assert!(comm.broadcast_bytes(&[], 0).unwrap().is_empty());
    let none =
        aimass::distributed::broadcast_checkpoint(comm.as_ref(), None, &Device::Cpu).unwrap();
    assert!(none.is_none());
    comm.barrier().unwrap();

    let cases = [
        (Scenario::new(Net::Mlp, DType::F32), 1e-5),
        (Scenario::new(Net::Mlp, DType::F64), 1e-10),
        (Scenario::new(Net::ConvBn, DType::F32), 1e-5),
        (Scenario::new(Net::ConvBn, DType::F64), 1e-10),
    ];
    for (s, tol) in &cases {
        let mine = train(s, comm.clone()).unwrap();
        let one = train(s, Arc::new(SingleProcess::new())).unwrap();
        let d = max_rel_diff(&mine, &one);
        assert!(
            d < *tol,
            "rank {rank}, {s:?}: rel diff {d:e} to one process"
        );
        eprintln!("rank {rank}: {:?} {:?}: rel diff {d:e}", s.net, s.dtype);
    }
    let mut s = Scenario::new(Net::Mlp, DType::F64);
    let sync = train(&s, comm.clone()).unwrap();
    s.sync = SyncMode::local_sgd(1);
    let local = train(&s, comm.clone()).unwrap();
    let d = max_rel_diff(&local, &sync);
    assert!(
        d < 1e-10,
        "rank {rank}: local SGD H=1 vs synchronous: {d:e}"
    );
    println!("EQUIVALENT rank {rank}");
}
