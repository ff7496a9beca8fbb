//! Data-parallel training scenarios shared by the thread-backend tests
//! (`tests/distributed.rs`) and the MPI tests (`tests/distributed_mpi.rs`):
//! each trains on one rank of a group and returns the final weights, so a
//! test can compare W ranks × batch B/W with one process × batch B.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use aimass::candle::{DType, Device, Tensor};
use aimass::candle_nn::VarMap;
use aimass::data::{DataLoader, DataLoaderConfig, InMemoryDataset, Shard};
use aimass::distributed::{
    Communicator, DataParallel, DataParallelConfig, DistributedOptimizer,
    DistributedOptimizerConfig, SyncMode,
};
use aimass::nn::{
    init::seeded_var_builder, seq, BatchNorm, BatchNormConfig, Conv2d, Conv2dConfig, MaxPool2d,
    Mlp, MlpConfig, SequentialT,
};
use aimass::optim::{GradClip, Sgd, SgdConfig};
use aimass::train::{Classifier, ClassifierConfig, Fit, FitConfig};

/// Which model a scenario trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Net {
    /// 16 → 32 → 4 MLP.
    Mlp,
    /// conv(1→4) + BN + ReLU, pool, conv(4→6) + BN + ReLU, pool, linear.
    ConvBn,
}

/// A scenario: the model, dtype, data and how the ranks synchronise.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub net: Net,
    pub dtype: DType,
    /// The global batch (split over the ranks).
    pub global_batch: usize,
    pub steps: u64,
    pub sync: SyncMode,
    pub sync_batch_norm: bool,
    /// Gradient clipping by the global norm.
    pub clip: Option<f64>,
}

impl Scenario {
    pub fn new(net: Net, dtype: DType) -> Self {
        Scenario {
            net,
            dtype,
            global_batch: 16,
            steps: 20,
            sync: SyncMode::Gradients,
            sync_batch_norm: net == Net::ConvBn,
            clip: None,
        }
    }
}

/// 72 images 1×4×4 (MLP) or 1×8×8 (ConvBn) of 4 classes: a deterministic
/// pattern plus noise, so the loss is neither trivial nor hopeless.
pub fn dataset(net: Net) -> InMemoryDataset {
    let side = match net {
        Net::Mlp => 4,
        Net::ConvBn => 8,
    };
    let n = 72;
    let mut pixels = Vec::with_capacity(n * side * side);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let c = (i * 7 + i / 5) % 4;
        for p in 0..side * side {
            let on = (p % 4) == c;
            let noise = (i * 31 + p * 17) % 53;
            pixels.push(if on {
                180 + noise as u8
            } else {
                20 + noise as u8
            });
        }
        labels.push(c as u32);
    }
    InMemoryDataset::new(pixels, labels, (1, side, side)).unwrap()
}

fn to_candle(e: aimass::Error) -> aimass::candle::Error {
    aimass::candle::Error::wrap(e)
}

/// The model, initialised from `seed`.
pub fn model(net: Net, dtype: DType, varmap: &VarMap, seed: u64) -> SequentialT {
    let vb = seeded_var_builder(varmap, seed, dtype, &Device::Cpu);
    let cast = move |x: &Tensor, _: bool| x.to_dtype(dtype);
    match net {
        Net::Mlp => seq()
            .add_fn(move |x, t| cast(&x.flatten_from(1)?, t))
            .add(Mlp::new(MlpConfig::new(vec![16, 32, 4]), vb).unwrap()),
        Net::ConvBn => {
            let pad = Conv2dConfig::default().with_padding(1);
            let c1 = Conv2d::new(1, 4, 3, pad, vb.pp("conv1")).unwrap();
            let b1 = BatchNorm::new(4, BatchNormConfig::default(), vb.pp("bn1")).unwrap();
            let c2 = Conv2d::new(4, 6, 3, pad, vb.pp("conv2")).unwrap();
            let b2 = BatchNorm::new(6, BatchNormConfig::default(), vb.pp("bn2")).unwrap();
            let fc = aimass::nn::linear(6 * 2 * 2, 4, vb.pp("fc")).unwrap();
            let pool = MaxPool2d::new(2, 2, 0).unwrap();
            let pool2 = pool;
            seq()
                .add_fn(cast)
                .add(c1)
                .add_fn(move |x, t| b1.forward_relu_t(x, t).map_err(to_candle))
                .add_fn(move |x, _| pool.forward(x).map_err(to_candle))
                .add(c2)
                .add_fn(move |x, t| {
                    b2.forward_t(x, t)
                        .and_then(|y| aimass::ops::relu(&y))
                        .map_err(to_candle)
                })
                .add_fn(move |x, _| pool2.forward(x).map_err(to_candle))
                .add_fn(|x, _| x.flatten_from(1))
                .add(fc)
        }
    }
}

/// Trains `s` as rank `comm.rank()` of `comm`'s group (initialised from a
/// rank-dependent seed: the broadcast from rank 0 must make them agree)
/// and returns every variable of the model (BatchNorm statistics
/// included) by name, in f64.
pub fn train(
    s: &Scenario,
    comm: Arc<dyn Communicator>,
) -> aimass::Result<BTreeMap<String, Vec<f64>>> {
    let (rank, world) = (comm.rank(), comm.world_size());
    assert_eq!(s.global_batch % world, 0);
    let varmap = VarMap::new();
    let net = model(s.net, s.dtype, &varmap, 7 + 1000 * rank as u64);
    let mut cfg = SgdConfig::default()
        .with_lr(0.05)
        .with_momentum(0.9)
        .with_weight_decay(1e-3);
    if let Some(c) = s.clip {
        cfg = cfg.with_grad_clip(GradClip::norm(c));
    }
    let sgd = Sgd::from_varmap(&varmap, cfg)?;
    let dcfg = DistributedOptimizerConfig::default()
        .with_sync(s.sync)
        // Small buckets: several all-reduces per step.
        .with_bucket_mb(0.0005)
        .with_broadcast_buffers(!s.sync_batch_norm);
    let opt = DistributedOptimizer::new(sgd, &varmap, comm.clone(), dcfg)?;
    let clf = Classifier::new(net, varmap.clone(), opt, ClassifierConfig::default())?;
    let mut trainer = DataParallel::new(
        clf,
        comm.clone(),
        DataParallelConfig::default().with_sync_batch_norm(s.sync_batch_norm),
    )?;
    let lcfg = DataLoaderConfig::default()
        .with_batch_size(s.global_batch / world)
        .with_seed(3)
        .with_prefetch(0)
        .with_shard(Shard::new(rank, world)?);
    let mut loader = DataLoader::new(dataset(s.net), lcfg, &Device::Cpu)?;
    let fit_cfg = FitConfig::default()
        .with_epochs(100)
        .with_max_steps(Some(s.steps))
        .with_tune_cpu_allocator(false);
    let summary = Fit::new(&mut trainer, &mut loader, fit_cfg)?.run()?;
    assert_eq!(summary.steps, s.steps);
    weights(&varmap)
}

/// Every variable of `varmap` by name, in f64.
pub fn weights(varmap: &VarMap) -> aimass::Result<BTreeMap<String, Vec<f64>>> {
    let mut out = BTreeMap::new();
    for (name, var) in aimass::nn::params::named_vars(varmap)? {
        let v = var
            .as_tensor()
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        out.insert(name, v);
    }
    Ok(out)
}

/// The largest relative difference between two weight sets, relative to
/// each tensor's largest magnitude; panics when the names differ.
pub fn max_rel_diff(a: &BTreeMap<String, Vec<f64>>, b: &BTreeMap<String, Vec<f64>>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut worst: f64 = 0.0;
    for (name, x) in a {
        let y = &b[name];
        assert_eq!(x.len(), y.len(), "{name}");
        let scale = x.iter().chain(y).fold(1e-12f64, |m, v| m.max(v.abs()));
        for (p, q) in x.iter().zip(y) {
            assert!(p.is_finite() && q.is_finite(), "{name}: {p} vs {q}");
            worst = worst.max((p - q).abs() / scale);
        }
    }
    worst
}

/// The largest absolute change of any weight between two sets.
pub fn max_abs_change(a: &BTreeMap<String, Vec<f64>>, b: &BTreeMap<String, Vec<f64>>) -> f64 {
    a.iter()
        .flat_map(|(n, x)| x.iter().zip(&b[n]).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f64::max)
}
