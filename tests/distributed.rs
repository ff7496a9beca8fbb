//! Data-parallel training, with ranks as threads (`ThreadCommunicator`):
//! W ranks × batch B/W give the weights of one process × batch B; local
//! SGD with H = 1 is synchronous SGD; the sharded loader covers every
//! sample once per epoch; a rank that fails or hangs makes the others
//! fail with an error. The same scenarios run across processes under
//! `mpirun` in `tests/distributed_mpi.rs` (feature `mpi`).

#[path = "common/dp_scenarios.rs"]
mod scenarios;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aimass::candle::{DType, Device, Tensor};
use aimass::data::{DataLoader, DataLoaderConfig, InMemoryDataset, Shard};
use aimass::distributed::{
    CommConfig, Communicator, DataParallel, DataParallelConfig, SingleProcess, SyncMode,
    ThreadCommunicator,
};
use aimass::train::{Checkpoint, StepOutput, TrainStep};
use aimass::Error;
use scenarios::{max_abs_change, max_rel_diff, train, Net, Scenario};

/// Runs `f` on every rank of a thread group of `world` ranks; returns the
/// ranks' results in rank order.
fn on_ranks<T: Send>(
    world: usize,
    timeout_secs: f64,
    f: impl Fn(Arc<dyn Communicator>) -> aimass::Result<T> + Sync,
) -> Vec<aimass::Result<T>> {
    let comms =
        ThreadCommunicator::group(world, CommConfig::default().with_timeout_secs(timeout_secs))
            .unwrap();
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let c: Arc<dyn Communicator> = Arc::new(c);
                    f(c)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

type Weights = BTreeMap<String, Vec<f64>>;

fn one_process(s: &Scenario) -> Weights {
    train(s, Arc::new(SingleProcess::new())).unwrap()
}

fn ranks(s: &Scenario, world: usize) -> Vec<Weights> {
    on_ranks(world, 60.0, |c| train(s, c))
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

/// W ranks agree with each other exactly and with one process to `tol`.
fn check_equivalent(s: &Scenario, world: usize, tol: f64) {
    let reference = one_process(s);
    let initial = {
        let varmap = aimass::candle_nn::VarMap::new();
        let _ = scenarios::model(s.net, s.dtype, &varmap, 7);
        scenarios::weights(&varmap).unwrap()
    };
    // Training moved the weights (the comparison is not vacuous).
    assert!(max_abs_change(&reference, &initial) > 1e-2);
    let got = ranks(s, world);
    for (r, w) in got.iter().enumerate() {
        assert_eq!(
            max_rel_diff(w, &got[0]),
            0.0,
            "rank {r} differs from rank 0"
        );
        let d = max_rel_diff(w, &reference);
        assert!(
            d < tol,
            "{s:?}, {world} ranks: rel diff {d:e} to one process"
        );
    }
}

#[test]
fn two_ranks_of_half_batches_match_one_process_mlp_f32() {
    check_equivalent(&Scenario::new(Net::Mlp, DType::F32), 2, 1e-5);
}

#[test]
fn two_ranks_of_half_batches_match_one_process_mlp_f64() {
    check_equivalent(&Scenario::new(Net::Mlp, DType::F64), 2, 1e-10);
}

#[test]
fn four_ranks_with_global_norm_clipping_match_one_process() {
    let mut s = Scenario::new(Net::Mlp, DType::F64);
    // A bound the gradients exceed: clipping acts, on the global norm.
    s.clip = Some(0.05);
    check_equivalent(&s, 4, 1e-10);
}

#[test]
fn two_ranks_with_sync_batch_norm_match_one_process_convnet_f32() {
    check_equivalent(&Scenario::new(Net::ConvBn, DType::F32), 2, 1e-5);
}

#[test]
fn two_ranks_with_sync_batch_norm_match_one_process_convnet_f64() {
    check_equivalent(&Scenario::new(Net::ConvBn, DType::F64), 2, 1e-10);
}

#[test]
fn local_batch_norm_is_not_the_global_batch() {
    // Without SyncBN each rank normalises its own half batch: not the
    // one-process run (the test above is not vacuous).
    let mut s = Scenario::new(Net::ConvBn, DType::F64);
    let reference = one_process(&s);
    s.sync_batch_norm = false;
    let got = ranks(&s, 2);
    assert!(max_rel_diff(&got[0], &reference) > 1e-6);
    // Buffers broadcast from rank 0 keep the ranks identical anyway.
    assert_eq!(max_rel_diff(&got[0], &got[1]), 0.0);
}

#[test]
fn local_sgd_every_step_equals_synchronous_sgd() {
    let mut s = Scenario::new(Net::Mlp, DType::F64);
    let sync = ranks(&s, 2);
    s.sync = SyncMode::local_sgd(1);
    let local = ranks(&s, 2);
    let d = max_rel_diff(&local[0], &sync[0]);
    assert!(d < 1e-10, "local SGD H=1 vs synchronous: {d:e}");
    assert_eq!(max_rel_diff(&local[0], &local[1]), 0.0);
}

#[test]
fn local_sgd_every_four_steps_differs_but_agrees_at_averaging_steps() {
    let mut s = Scenario::new(Net::Mlp, DType::F64);
    let sync = ranks(&s, 2);
    s.sync = SyncMode::local_sgd(4); // 20 steps: the last one averages
    let local = ranks(&s, 2);
    assert!(max_rel_diff(&local[0], &sync[0]) > 1e-8);
    assert_eq!(max_rel_diff(&local[0], &local[1]), 0.0);
    // Mid-period the ranks have drifted apart.
    s.steps = 18;
    let mid = ranks(&s, 2);
    assert!(max_rel_diff(&mid[0], &mid[1]) > 1e-8);
}

fn tiny_dataset(n: usize) -> InMemoryDataset {
    InMemoryDataset::new(vec![0; n], (0..n as u32).collect(), (1, 1, 1)).unwrap()
}

fn epoch_indices(
    n: usize,
    batch: usize,
    shard: Shard,
    drop_last: bool,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let cfg = DataLoaderConfig::default()
        .with_batch_size(batch)
        .with_seed(11)
        .with_drop_last(drop_last)
        .with_shard(shard);
    let loader = DataLoader::new(tiny_dataset(n), cfg, &Device::Cpu).unwrap();
    (0..loader.len())
        .map(|b| loader.batch_at(epoch, b).unwrap().indices)
        .collect()
}

#[test]
fn sharded_loader_covers_every_sample_once_per_epoch() {
    for (n, b, w) in [
        (100, 8, 2),
        (100, 8, 3),
        (64, 16, 4),
        (37, 5, 3),
        (10, 1, 2),
    ] {
        for epoch in 0..3 {
            let whole = epoch_indices(n, b * w, Shard::whole(), false, epoch);
            let parts: Vec<Vec<Vec<usize>>> = (0..w)
                .map(|r| epoch_indices(n, b, Shard::new(r, w).unwrap(), false, epoch))
                .collect();
            // Every rank has the same number of batches.
            assert!(
                parts.iter().all(|p| p.len() == whole.len()),
                "n={n} b={b} w={w}"
            );
            let mut all: Vec<usize> = parts.iter().flatten().flatten().copied().collect();
            all.sort();
            assert_eq!(
                all,
                (0..n).collect::<Vec<_>>(),
                "n={n} b={b} w={w} epoch {epoch}"
            );
            // The ranks' batches, in rank order, are the one-process batches.
            for (k, batch) in whole.iter().enumerate() {
                let joined: Vec<usize> = parts.iter().flat_map(|p| p[k].clone()).collect();
                assert_eq!(&joined, batch);
                assert!(parts.iter().all(|p| !p[k].is_empty()));
            }
        }
        // Another epoch, another order.
        let e0 = epoch_indices(n, b, Shard::new(0, w).unwrap(), false, 0);
        let e1 = epoch_indices(n, b, Shard::new(0, w).unwrap(), false, 1);
        assert_ne!(e0, e1);
    }
}

#[test]
fn sharded_loader_with_drop_last_drops_the_partial_global_batch() {
    let parts: Vec<Vec<Vec<usize>>> = (0..3)
        .map(|r| epoch_indices(40, 4, Shard::new(r, 3).unwrap(), true, 0))
        .collect();
    assert!(parts
        .iter()
        .all(|p| p.len() == 3 && p.iter().all(|b| b.len() == 4)));
    let all: BTreeSet<usize> = parts.iter().flatten().flatten().copied().collect();
    assert_eq!(all.len(), 36);
}

#[test]
fn a_shard_that_would_leave_a_rank_an_empty_batch_is_refused() {
    // 9 samples in global batches of 2 × 4 = 8: the last has 1 sample for 4 ranks.
    let cfg = DataLoaderConfig::default()
        .with_batch_size(2)
        .with_shard(Shard::new(1, 4).unwrap());
    let err = DataLoader::new(tiny_dataset(9), cfg.clone(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("drop_last"), "{err}");
    // drop_last makes it fine.
    assert!(DataLoader::new(tiny_dataset(9), cfg.with_drop_last(true), &Device::Cpu).is_ok());
    // Bad shards.
    assert!(Shard::new(2, 2).is_err());
    assert!(Shard::new(0, 0).is_err());
}

#[test]
fn collectives_give_every_rank_the_same_result() {
    let out = on_ranks(3, 30.0, |c| {
        let r = c.rank() as f32;
        let t = Tensor::new(&[r, 2.0 * r + 1.0], &Device::Cpu)?;
        let sum = c.all_reduce_sum(&t)?.to_vec1::<f32>()?;
        let mean = c
            .all_reduce_mean(&t.to_dtype(DType::F64)?)?
            .to_vec1::<f64>()?;
        let root = c
            .broadcast(&Tensor::new(&[r; 3], &Device::Cpu)?, 2)?
            .to_vec1::<f32>()?;
        // Unequal row counts: rank r sends r + 1 rows.
        let rows = Tensor::full(r as u32, (c.rank() + 1, 2), &Device::Cpu)?;
        let gathered = c.all_gather(&rows)?.to_vec2::<u32>()?;
        let bytes = c.broadcast_bytes(format!("from {}", c.rank()).as_bytes(), 1)?;
        assert!(c.broadcast_bytes(&[], 0)?.is_empty());
        let none = aimass::distributed::broadcast_checkpoint(c.as_ref(), None, &Device::Cpu)?;
        assert!(none.is_none());
        c.barrier()?;
        Ok((sum, mean, root, gathered, bytes))
    });
    for r in out {
        let (sum, mean, root, gathered, bytes) = r.unwrap();
        assert_eq!(sum, vec![3.0, 9.0]);
        assert_eq!(mean, vec![1.0, 3.0]);
        assert_eq!(root, vec![2.0; 3]);
        assert_eq!(
            gathered,
            vec![
                vec![0, 0],
                vec![1, 1],
                vec![1, 1],
                vec![2, 2],
                vec![2, 2],
                vec![2, 2]
            ]
        );
        assert_eq!(bytes, b"from 1".to_vec());
    }
}

#[test]
fn mismatched_shapes_and_calls_are_errors_not_garbage() {
    let out = on_ranks(2, 30.0, |c| {
        let n = 2 + c.rank();
        c.all_reduce_sum(&Tensor::zeros(n, DType::F32, &Device::Cpu)?)
    });
    for r in out {
        let e = r.unwrap_err();
        assert!(matches!(e, Error::Communication { .. }), "{e}");
    }
    let out = on_ranks(2, 30.0, |c| {
        let t = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
        if c.rank() == 0 {
            c.all_reduce_sum(&t).map(|_| ())
        } else {
            c.broadcast(&t, 0).map(|_| ())
        }
    });
    for r in out {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("collective calls differ"), "{e}");
    }
    // Bad roots and bad timeouts.
    let comm = SingleProcess::new();
    assert!(comm.broadcast_bytes(b"x", 1).is_err());
    assert!(ThreadCommunicator::group(2, CommConfig::default().with_timeout_secs(0.0)).is_err());
    assert!(ThreadCommunicator::group(0, CommConfig::default()).is_err());
}

#[test]
fn a_rank_that_fails_makes_the_others_stop_with_an_error() {
    let start = Instant::now();
    let out = on_ranks(3, 30.0, |c| {
        if c.rank() == 1 {
            // This rank fails before the collective and returns.
            return Err(Error::invalid("rank 1", "simulated failure"));
        }
        let mut s = Scenario::new(Net::Mlp, DType::F32);
        s.global_batch = 12;
        train(&s, c)
    });
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "waited for the timeout"
    );
    for (r, res) in out.into_iter().enumerate() {
        let e = res.unwrap_err();
        if r == 1 {
            assert!(e.to_string().contains("simulated failure"));
        } else {
            assert!(matches!(e, Error::Communication { .. }), "{e}");
            // Rank 1 left first; a rank may instead see rank 0 leave (after
            // rank 0 stopped on rank 1's departure): either way, no hang.
            let msg = e.to_string();
            assert!(
                msg.contains("rank 1 left the group") || msg.contains("rank 0 left the group"),
                "{e}"
            );
        }
    }
}

#[test]
fn a_rank_that_hangs_makes_the_others_time_out_with_an_error() {
    let start = Instant::now();
    let out = on_ranks(2, 0.5, |c| {
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_secs(3));
            return Ok(());
        }
        c.barrier()
    });
    let waited = start.elapsed();
    let e = out.into_iter().next().unwrap().unwrap_err();
    assert!(matches!(e, Error::Communication { rank: 0, .. }), "{e}");
    assert!(e.to_string().contains("timed out after 0.5 s"), "{e}");
    assert!(waited < Duration::from_secs(10));
}

/// A trainer whose rank 1 skips step 0 (as a non-finite guard would).
struct SkipOnRank1 {
    rank: usize,
}

impl TrainStep for SkipOnRank1 {
    type Batch = ();
    fn train_step(&mut self, _: &(), step: u64) -> aimass::Result<StepOutput> {
        Ok(StepOutput::new(1.0, 4)
            .with_metric("acc", self.rank as f64)
            .skipped(self.rank == 1 && step == 0))
    }
    fn set_learning_rate(&mut self, _: f64) -> aimass::Result<()> {
        Ok(())
    }
    fn learning_rate(&self) -> f64 {
        0.1
    }
    fn kind(&self) -> &str {
        "skip"
    }
    fn save_state(&self, _: &mut Checkpoint) -> aimass::Result<()> {
        Ok(())
    }
    fn load_state(&mut self, _: &Checkpoint) -> aimass::Result<()> {
        Ok(())
    }
}

#[test]
fn step_reports_are_averaged_and_disagreeing_skips_are_errors() {
    let out = on_ranks(2, 30.0, |c| {
        let mut dp = DataParallel::new(
            SkipOnRank1 { rank: c.rank() },
            c.clone(),
            DataParallelConfig::default(),
        )?;
        let first = dp.train_step(&(), 0);
        let second = dp.train_step(&(), 1)?;
        Ok((first, second))
    });
    for r in out {
        let (first, second) = r.unwrap();
        let e = first.unwrap_err().to_string();
        assert!(e.contains("1 of 2 ranks skipped step 0"), "{e}");
        assert_eq!(second.samples, 8); // the global batch
        assert_eq!(second.metrics["acc"], 0.5); // the mean over ranks
        assert_eq!(second.loss, 1.0);
    }
}
