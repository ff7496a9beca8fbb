//! Models, tasks and an independent post-adaptation loss shared by the
//! meta-learning test binaries (which also declare `mod common`).
#![allow(dead_code)]

use std::collections::BTreeMap;

use aimass::autograd::Gradients;
use aimass::candle::{DType, Device, ModuleT, Tensor};
use aimass::candle_nn::{VarBuilder, VarMap};
use aimass::meta::{Task, TaskLoss};
use aimass::nn::init::seeded_var_builder;
use aimass::nn::*;
use aimass::Result;
use rand::Rng;

pub use crate::common::randt;

/// Labels `0..classes` repeated, `(n,)` u32.
pub fn labels(n: usize, classes: u32) -> Tensor {
    let v: Vec<u32> = (0..n as u32).map(|i| i % classes).collect();
    Tensor::from_vec(v, n, &Device::Cpu).unwrap()
}

/// MLP 3-5-2 with tanh (smooth: true second-order terms everywhere).
pub fn tanh_mlp(vb: VarBuilder) -> Result<Mlp> {
    Mlp::new(
        MlpConfig::new(vec![3, 5, 2]).with_activation(Activation::Tanh),
        vb,
    )
}

/// A regression task for [`tanh_mlp`]: 4 support and 5 query examples.
pub fn mlp_task(seed: u64) -> Task {
    Task::new(
        randt(&[4, 3], seed),
        randt(&[4, 2], seed + 1),
        randt(&[5, 3], seed + 2),
        randt(&[5, 2], seed + 3),
    )
    .unwrap()
}

/// conv 1→3 3×3 – BatchNorm (train mode: batch statistics) – tanh –
/// global average pool – linear 3→2 (`head`).
pub struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
    head: Linear,
}

pub fn conv_bn(vb: VarBuilder) -> Result<ConvBn> {
    Ok(ConvBn {
        conv: Conv2d::new(
            1,
            3,
            3,
            Conv2dConfig::default().with_padding(1),
            vb.pp("conv"),
        )?,
        bn: BatchNorm::new(3, BatchNormConfig::default(), vb.pp("bn"))?,
        head: Linear::new(3, 2, true, vb.pp("head"))?,
    })
}

impl ModuleT for ConvBn {
    fn forward_t(&self, x: &Tensor, train: bool) -> aimass::candle::Result<Tensor> {
        let h = self.conv.forward(x).map_err(aimass::candle::Error::wrap)?;
        let h = self
            .bn
            .forward_t(&h, train)
            .map_err(aimass::candle::Error::wrap)?
            .tanh()?;
        let p = global_avg_pool(&h).map_err(aimass::candle::Error::wrap)?;
        self.head.forward(&p).map_err(aimass::candle::Error::wrap)
    }
}

/// A 2-way classification task for [`conv_bn`]: 4 support and 6 query images.
pub fn conv_task(seed: u64) -> Task {
    Task::new(
        randt(&[4, 1, 4, 4], seed),
        labels(4, 2),
        randt(&[6, 1, 4, 4], seed + 1),
        labels(6, 2),
    )
    .unwrap()
}

/// A model handle built by `build` with seeded f64 weights.
pub fn model<M>(build: impl Fn(VarBuilder) -> Result<M>, seed: u64) -> Model<M> {
    model_of(build, seed, DType::F64)
}

/// A model handle built by `build` with seeded weights of `dtype`.
pub fn model_of<M>(build: impl Fn(VarBuilder) -> Result<M>, seed: u64, dtype: DType) -> Model<M> {
    let varmap = VarMap::new();
    let m = build(seeded_var_builder(&varmap, seed, dtype, &Device::Cpu)).unwrap();
    Model::new(m, varmap)
}

/// 4 classes × 10 random 1×4×4 images.
pub fn image_dataset(seed: u64) -> aimass::data::InMemoryDataset {
    let mut r = aimass::device::rng(seed);
    let px: Vec<u8> = (0..40 * 16).map(|_| r.random_range(0..=255u8)).collect();
    let y: Vec<u32> = (0..40).map(|i| i % 4).collect();
    aimass::data::InMemoryDataset::new(px, y, (1, 4, 4)).unwrap()
}

/// 2-way 2-shot 3-query episodes over [`image_dataset`].
pub fn episodes(seed: u64) -> aimass::data::EpisodeSampler {
    let cfg = aimass::data::EpisodeConfig::default()
        .with_n_way(2)
        .with_k_shot(2)
        .with_q_query(3)
        .with_seed(seed);
    aimass::data::EpisodeSampler::new(image_dataset(1), &[0, 1, 2, 3], cfg, &Device::Cpu).unwrap()
}

/// Every variable's values, by name.
pub fn values(varmap: &VarMap) -> BTreeMap<String, Vec<f64>> {
    params::named_vars(varmap)
        .unwrap()
        .into_iter()
        .map(|(n, v)| (n, flat(v.as_tensor())))
        .collect()
}

pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Sets the variables of `varmap` to `vals`.
pub fn set_values(varmap: &VarMap, vals: &BTreeMap<String, Vec<f64>>) {
    for (n, v) in params::named_vars(varmap).unwrap() {
        v.set(&Tensor::from_vec(vals[&n].clone(), v.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
}

/// The inner loop's options for [`post_adaptation_loss`].
#[derive(Clone, Copy)]
pub struct Inner<'a> {
    pub steps: usize,
    pub lr: f64,
    /// Adapt only parameters with this prefix (ANIL).
    pub only: Option<&'a str>,
    /// Learned rates `meta_sgd.lr.<p>` in the VarMap (Meta-SGD).
    pub learned_rates: bool,
    pub loss: TaskLoss,
}

/// The mean over `tasks` of the query loss after the inner loop, computed
/// without the meta module: plain first-order gradients of the support loss
/// on a detached copy of `varmap` (exact values of the function the
/// meta-gradient differentiates).
pub fn post_adaptation_loss<M: ModuleT>(
    varmap: &VarMap,
    build: &dyn Fn(VarBuilder<'static>) -> Result<M>,
    tasks: &[Task],
    inner: Inner,
) -> f64 {
    let all = ParamMap::detached_copy(varmap).unwrap();
    let rates: BTreeMap<String, Tensor> = all
        .params()
        .filter_map(|(n, t)| {
            n.strip_prefix("meta_sgd.lr.")
                .map(|p| (p.to_string(), t.clone()))
        })
        .collect();
    let theta = all.select(|n| !n.starts_with("meta_sgd.lr."));
    let mut total = 0.0;
    for task in tasks {
        let mut fast = theta.clone();
        for _ in 0..inner.steps {
            let net = fast.build(build).unwrap();
            let l = inner
                .loss
                .loss(
                    &net.forward_t(&task.support, true).unwrap(),
                    &task.support_targets,
                )
                .unwrap();
            let g: Gradients = fast
                .grad(&l, false)
                .unwrap()
                .into_iter()
                .filter(|(n, _)| inner.only.is_none_or(|p| n.starts_with(p)))
                .collect();
            fast = if inner.learned_rates {
                fast.sgd_step_with_rates(&g, &rates).unwrap()
            } else {
                fast.sgd_step(&g, inner.lr).unwrap()
            };
        }
        let net = fast.build(build).unwrap();
        let q = inner
            .loss
            .loss(
                &net.forward_t(&task.query, true).unwrap(),
                &task.query_targets,
            )
            .unwrap();
        total += q.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    }
    total / tasks.len() as f64
}

/// Central finite differences (step `h`) of `f` with respect to every
/// element of the variables of `varmap` whose name satisfies `keep`; the
/// variables are restored afterwards.
pub fn finite_differences(
    varmap: &VarMap,
    keep: impl Fn(&str) -> bool,
    h: f64,
    f: impl Fn() -> f64,
) -> BTreeMap<String, Vec<f64>> {
    let base = values(varmap);
    let mut out = BTreeMap::new();
    for (name, v0) in &base {
        if !keep(name) || params::is_buffer(name) {
            continue;
        }
        let mut g = Vec::with_capacity(v0.len());
        for j in 0..v0.len() {
            let at = |d: f64| {
                let mut vals = base.clone();
                vals.get_mut(name).unwrap()[j] += d;
                set_values(varmap, &vals);
                f()
            };
            g.push((at(h) - at(-h)) / (2.0 * h));
        }
        out.insert(name.clone(), g);
    }
    set_values(varmap, &base);
    out
}

/// max over parameters of ‖a − n‖ / ‖n‖; a parameter whose true gradient
/// is (nearly) zero is measured against the whole gradient's norm.
pub fn rel_error(a: &BTreeMap<String, Vec<f64>>, n: &BTreeMap<String, Vec<f64>>) -> f64 {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        n.keys().collect::<Vec<_>>(),
        "every parameter needs a gradient"
    );
    let norm = |v: &[f64]| v.iter().map(|y| y * y).sum::<f64>().sqrt();
    let total = n.values().map(|v| norm(v).powi(2)).sum::<f64>().sqrt();
    let mut worst = 0.0f64;
    for (name, nv) in n {
        let diff: Vec<f64> = a[name].iter().zip(nv).map(|(x, y)| x - y).collect();
        let rel = norm(&diff) / norm(nv).max(1e-3 * total);
        if std::env::var("DEBUG_META").is_ok() {
            eprintln!("{name}: rel {rel:e}");
        }
        worst = worst.max(rel);
    }
    worst
}

/// `before − after` by name: the update of an SGD step with lr 1, i.e. the
/// gradient it applied.
pub fn applied_gradient(
    before: &BTreeMap<String, Vec<f64>>,
    after: &BTreeMap<String, Vec<f64>>,
    keep: impl Fn(&str) -> bool,
) -> BTreeMap<String, Vec<f64>> {
    before
        .iter()
        .filter(|(n, _)| keep(n) && !params::is_buffer(n))
        .map(|(n, b)| {
            let a = &after[n];
            (n.clone(), b.iter().zip(a).map(|(x, y)| x - y).collect())
        })
        .collect()
}
