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

// ---------------------------------------------------------------- trainers

/// The weights `train` returns on each of two thread ranks.
fn weights_on_two_ranks(
    train: impl Fn(Arc<dyn Communicator>) -> aimass::Result<Weights> + Sync,
) -> Vec<Weights> {
    on_ranks(2, 60.0, train)
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

/// 8 samples × 2 views of 8×8 noise, the global batch of the trainer
/// scenarios; rank `r` of `world` gets its rows `r·8/W ..`.
fn two_view_batch(rank: usize, world: usize) -> aimass::data::Batch {
    let n = 8 / world;
    // Deterministic "noise": sin of a fast ramp, a different phase per view.
    let view = |phase: f64| {
        Tensor::arange(0u32, 8 * 64, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.affine(0.737, phase))
            .and_then(|t| t.sin())
            .and_then(|t| t.reshape((8, 1, 8, 8)))
            .and_then(|t| t.narrow(0, rank * n, n))
            .unwrap()
    };
    let v1 = view(0.0);
    let v2 = view(0.3);
    aimass::data::Batch {
        views: vec![v1, v2],
        labels: Tensor::zeros(n, DType::U32, &Device::Cpu).unwrap(),
        indices: (rank * n..(rank + 1) * n).collect(),
        epoch: 0,
        batch: 0,
    }
}

/// SimCLR (or MoCo) on an MLP without BatchNorm (so the ranks' local
/// batches do not change the normalisation), 3 steps on the ranks of
/// `comm`; the online network's weights (and MoCo's queue).
fn ssl_on_ranks(comm: Arc<dyn Communicator>, gather: bool, moco: bool) -> aimass::Result<Weights> {
    use aimass::nn::{seq, HeadConfig, Mlp, MlpConfig};
    use aimass::ssl::{
        Backbone, MoCo, MoCoConfig, SimClr, SimClrConfig, SslOptimConfig, SslOptimizer, SslTrainer,
    };
    let backbone = Backbone::new(16, |vb| {
        let mlp = Mlp::new(MlpConfig::new(vec![64, 32, 16]), vb)?;
        Ok(seq().add_fn(|x, _| x.flatten_from(1)).add(mlp))
    });
    let cfg = SimClrConfig::default()
        .with_temperature(0.2)
        .with_projector(
            HeadConfig::simclr()
                .with_hidden_dim(16)
                .with_output_dim(8)
                .with_batch_norm(false),
        )
        .with_optim(
            SslOptimConfig::default()
                .with_optimizer(SslOptimizer::Sgd)
                .with_lr(0.5)
                .with_exclude_bias_and_norm(false),
        )
        .with_gather_distributed(gather);
    let (rank, world) = (comm.rank(), comm.world_size());
    let batch = two_view_batch(rank, world);
    if moco {
        let cfg = MoCoConfig::default()
            .with_queue_size(32)
            .with_projector(cfg.projector)
            .with_optim(cfg.optim);
        let mut t =
            MoCo::new(backbone, cfg, &Device::Cpu)?.data_parallel(comm, Default::default())?;
        for step in 0..3 {
            t.train_step(&batch, step)?;
        }
        let mut w = scenarios::weights(t.encoder().varmap())?;
        // The queue too (every rank's keys, in order).
        w.insert(
            "queue".into(),
            t.queue()
                .keys()
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1()?,
        );
        return Ok(w);
    }
    let mut t =
        SimClr::new(backbone, cfg, &Device::Cpu)?.data_parallel(comm, Default::default())?;
    for step in 0..3 {
        t.train_step(&batch, step)?;
    }
    assert_eq!(t.skipped_steps(), 0);
    scenarios::weights(t.encoder().varmap())
}

#[test]
fn simclr_with_gathered_negatives_and_moco_on_two_ranks_match_one_process() {
    let one = ssl_on_ranks(Arc::new(SingleProcess::new()), true, false).unwrap();
    for gather in [true, false] {
        let got = weights_on_two_ranks(|c| ssl_on_ranks(c, gather, false));
        assert_eq!(max_rel_diff(&got[1], &got[0]), 0.0, "ranks disagree");
        let d = max_rel_diff(&got[0], &one);
        if gather {
            assert!(
                d < 1e-5,
                "gathered negatives: rel diff {d:e} to one process"
            );
        } else {
            // Each rank's own negatives: a different loss, visibly.
            assert!(d > 1e-4, "local negatives should differ, rel diff {d:e}");
        }
    }
    let one = ssl_on_ranks(Arc::new(SingleProcess::new()), false, true).unwrap();
    let got = weights_on_two_ranks(|c| ssl_on_ranks(c, false, true));
    assert_eq!(max_rel_diff(&got[1], &got[0]), 0.0, "MoCo ranks disagree");
    let d = max_rel_diff(&got[0], &one);
    assert!(d < 1e-5, "MoCo: rel diff {d:e} to one process");
}

/// Sinusoid tasks 0..4 (global meta-batch); rank `r` of `world` gets its
/// share.
fn sinusoid_share(rank: usize, world: usize) -> aimass::meta::TaskBatch {
    use aimass::meta::{Sinusoid, SinusoidConfig, TaskBatch, TaskSampler};
    let s = Sinusoid::new(SinusoidConfig::default().with_seed(9), &Device::Cpu).unwrap();
    let per = 4 / world;
    let tasks = (rank * per..(rank + 1) * per)
        .map(|i| s.task(i as u64).unwrap())
        .collect();
    TaskBatch::new(tasks).unwrap()
}

fn sine_mlp(vb: aimass::candle_nn::VarBuilder) -> aimass::Result<aimass::nn::Mlp> {
    aimass::nn::Mlp::new(aimass::nn::MlpConfig::new([1, 16, 16, 1]), vb)
}

/// First-order MAML (Adam meta-optimizer) or Reptile, 4 steps, on the
/// ranks of `comm` sharing a meta-batch of 4 tasks; the weights.
fn meta_on_ranks(comm: Arc<dyn Communicator>, reptile: bool) -> aimass::Result<Weights> {
    let share = (comm.rank(), comm.world_size());
    meta_run(comm, reptile, share)
}

/// As [`meta_on_ranks`], on the tasks of `share` = (rank, world).
fn meta_run(
    comm: Arc<dyn Communicator>,
    reptile: bool,
    (rank, world): (usize, usize),
) -> aimass::Result<Weights> {
    use aimass::distributed::{DistributedOptimizer, DistributedOptimizerConfig};
    use aimass::meta::{Maml, MamlConfig, Reptile, ReptileConfig, TaskLoss};
    use aimass::nn::{init::seeded_var_builder, Model};
    use aimass::optim::{Adam, AdamConfig};
    let varmap = aimass::candle_nn::VarMap::new();
    let model = Model::new(
        sine_mlp(seeded_var_builder(&varmap, 4, DType::F32, &Device::Cpu))?,
        varmap.clone(),
    );
    let batch = sinusoid_share(rank, world);
    if reptile {
        let cfg = ReptileConfig::default()
            .with_loss(TaskLoss::Mse)
            .with_inner_steps(3)
            .with_inner_lr(0.01)
            .with_epsilon(0.5);
        let mut r = Reptile::new(model, sine_mlp, cfg)?.data_parallel(comm)?;
        for step in 0..4 {
            r.train_step(&batch, step)?;
        }
    } else {
        let opt = Adam::from_varmap(&varmap, AdamConfig::default().with_lr(0.01))?;
        let opt =
            DistributedOptimizer::new(opt, &varmap, comm, DistributedOptimizerConfig::default())?;
        let cfg = MamlConfig::default()
            .with_loss(TaskLoss::Mse)
            .with_first_order(true)
            .with_inner_lr(0.05);
        let mut m = Maml::new(model, sine_mlp, opt, cfg)?;
        for step in 0..4 {
            m.train_step(&batch, step)?;
        }
    }
    scenarios::weights(&varmap)
}

#[test]
fn maml_and_reptile_on_two_ranks_match_one_process() {
    for reptile in [false, true] {
        let one = meta_on_ranks(Arc::new(SingleProcess::new()), reptile).unwrap();
        let got = weights_on_two_ranks(|c| meta_on_ranks(c, reptile));
        assert_eq!(
            max_rel_diff(&got[1], &got[0]),
            0.0,
            "ranks disagree (reptile {reptile})"
        );
        let d = max_rel_diff(&got[0], &one);
        assert!(d < 1e-5, "reptile {reptile}: rel diff {d:e} to one process");
        // One process on rank 0's share alone is far from it (the other
        // rank's tasks matter).
        let alone = meta_run(Arc::new(SingleProcess::new()), reptile, (0, 2)).unwrap();
        assert!(
            max_rel_diff(&alone, &one) > 1e-3,
            "reptile {reptile}: the shares must matter"
        );
    }
}
