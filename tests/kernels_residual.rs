//! `kernels::residual_blocks_train` (chains of ResNet blocks as one op)
//! against the layer-by-layer composition of the single kernels (each
//! tested against its definition in `tests/kernels.rs`) and against
//! finite differences of its own forward.

use aimass::candle::{DType, Device, Tensor, Var};
use aimass::ops::kernels::{self, ConvBn, ResidualBlock, Shortcut};
use rand::Rng;

fn randt(r: &mut aimass::device::SeededRng, dims: &[usize], scale: f64) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| (r.random::<f64>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    let d = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(d <= tol * scale, "{what}: max diff {d} (scale {scale})");
}

/// One stage's parameters: kernel `(o, c, k, k)`, BN scale and shift.
#[derive(Clone, Copy)]
struct StageDef {
    c: usize,
    o: usize,
    k: usize,
    stride: usize,
    /// Whether the BatchNorm has a learnable scale and shift.
    affine: bool,
}

#[derive(Clone)]
enum ShortDef {
    None,
    Identity,
    Projection(StageDef),
}

#[derive(Clone)]
struct BlockDef {
    stages: Vec<StageDef>,
    short: ShortDef,
}

fn st(c: usize, o: usize, k: usize, stride: usize) -> StageDef {
    StageDef {
        c,
        o,
        k,
        stride,
        affine: true,
    }
}

/// The parameters of a chain as variables, stage by stage (weight, then
/// scale and shift when affine), each block's projection after its stages.
struct Params {
    vars: Vec<Var>,
}

impl Params {
    fn new(defs: &[BlockDef], dtype: DType, seed: u64) -> Self {
        let mut r = aimass::device::rng(seed);
        let mut vars = Vec::new();
        for b in defs {
            let proj = match &b.short {
                ShortDef::Projection(p) => Some(p),
                _ => None,
            };
            for s in b.stages.iter().chain(proj) {
                let fan = (s.c * s.k * s.k) as f64;
                let w = randt(&mut r, &[s.o, s.c, s.k, s.k], 1.5 / fan.sqrt());
                vars.push(Var::from_tensor(&w.to_dtype(dtype).unwrap()).unwrap());
                if s.affine {
                    let g = (randt(&mut r, &[s.o], 0.5) + 1.0).unwrap();
                    let b = randt(&mut r, &[s.o], 0.5);
                    vars.push(Var::from_tensor(&g.to_dtype(dtype).unwrap()).unwrap());
                    vars.push(Var::from_tensor(&b.to_dtype(dtype).unwrap()).unwrap());
                }
            }
        }
        Params { vars }
    }

    /// The chain as `kernels` blocks.
    fn blocks<'a>(&'a self, defs: &[BlockDef]) -> Vec<ResidualBlock<'a>> {
        let ts: Vec<&Tensor> = self.vars.iter().map(|v| v.as_tensor()).collect();
        blocks_of(&ts, defs)
    }
}

/// The chain as `kernels` blocks over the tensors `ts` (in the order of
/// [`Params`]).
fn blocks_of<'a>(ts: &[&'a Tensor], defs: &[BlockDef]) -> Vec<ResidualBlock<'a>> {
    let mut it = ts.iter().copied();
    let mut stage = |s: &StageDef| {
        let weight = it.next().unwrap();
        let (bn_weight, bn_bias) = if s.affine {
            (Some(it.next().unwrap()), Some(it.next().unwrap()))
        } else {
            (None, None)
        };
        ConvBn {
            weight,
            stride: (s.stride, s.stride),
            padding: (s.k / 2, s.k / 2),
            bn_weight,
            bn_bias,
            eps: 1e-5,
        }
    };
    defs.iter()
        .map(|b| {
            let stages: Vec<ConvBn> = b.stages.iter().map(&mut stage).collect();
            let shortcut = match &b.short {
                ShortDef::None => Shortcut::None,
                ShortDef::Identity => Shortcut::Identity,
                ShortDef::Projection(p) => Shortcut::Projection(stage(p)),
            };
            ResidualBlock { stages, shortcut }
        })
        .collect()
}

/// The blocks composed layer by layer from the single kernels; returns the
/// output and the statistics (mean, var) in the fused op's order.
fn composed(x: &Tensor, blocks: &[ResidualBlock]) -> (Tensor, Vec<(Tensor, Tensor)>) {
    let mut h = x.clone();
    let mut stats = Vec::new();
    for b in blocks {
        let input = h.clone();
        let last = b.stages.len() - 1;
        let mut proj = None;
        for (i, s) in b.stages.iter().enumerate() {
            let z = kernels::conv2d(&h, s.weight, None, s.stride, s.padding, (1, 1), 1).unwrap();
            let (g, bb) = (s.bn_weight, s.bn_bias);
            let out = match (i == last, &b.shortcut) {
                (false, _) | (true, Shortcut::None) => {
                    kernels::batch_norm_relu_train(&z, g, bb, s.eps).unwrap()
                }
                (true, Shortcut::Identity) => {
                    kernels::batch_norm_add_relu_train(&z, g, bb, &input, s.eps).unwrap()
                }
                (true, Shortcut::Projection(p)) => {
                    let zp =
                        kernels::conv2d(&input, p.weight, None, p.stride, p.padding, (1, 1), 1)
                            .unwrap();
                    let sp = kernels::batch_norm_train(&zp, p.bn_weight, p.bn_bias, p.eps).unwrap();
                    proj = Some((sp.mean.clone(), sp.var.clone()));
                    kernels::batch_norm_add_relu_train(&z, g, bb, &sp.output, s.eps).unwrap()
                }
            };
            stats.push((out.mean.clone(), out.var.clone()));
            h = out.output;
        }
        stats.extend(proj);
    }
    (h, stats)
}

/// Output, statistics and gradients (of the input, then of every
/// parameter) of `sum(out * r)` through `f`.
struct Run {
    out: Vec<f64>,
    stats: Vec<Vec<f64>>,
    grads: Vec<Vec<f64>>,
}

/// The output and each stage's BatchNorm statistics (mean, variance).
type Outputs = (Tensor, Vec<(Tensor, Tensor)>);

fn run(
    x: &Var,
    p: &Params,
    r: &Tensor,
    f: &dyn Fn(&Tensor, &[ResidualBlock]) -> Outputs,
    defs: &[BlockDef],
) -> Run {
    let blocks = p.blocks(defs);
    let (out, st) = f(x.as_tensor(), &blocks);
    let g = (&out * r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut grads = vec![flat(g.get(x).expect("input gradient"))];
    for v in &p.vars {
        grads.push(flat(g.get(v).expect("parameter gradient")));
    }
    Run {
        out: flat(&out),
        stats: st.iter().flat_map(|(m, v)| [flat(m), flat(v)]).collect(),
        grads,
    }
}

fn fused(x: &Tensor, blocks: &[ResidualBlock]) -> (Tensor, Vec<(Tensor, Tensor)>) {
    let o = kernels::residual_blocks_train(x, blocks).unwrap();
    let st = o
        .stats
        .iter()
        .map(|s| (s.mean.clone(), s.var.clone()))
        .collect();
    (o.output, st)
}

/// The chains under test with their input shape `(n, c, h, w)`.
fn chains() -> Vec<(&'static str, [usize; 4], Vec<BlockDef>)> {
    let basic = |c: usize, o: usize, stride: usize| BlockDef {
        stages: vec![st(c, o, 3, stride), st(o, o, 3, 1)],
        short: if stride == 1 && c == o {
            ShortDef::Identity
        } else {
            ShortDef::Projection(st(c, o, 1, stride))
        },
    };
    let stem = |c: usize, o: usize| BlockDef {
        stages: vec![st(c, o, 3, 1)],
        short: ShortDef::None,
    };
    vec![
        ("stem 1->8 (im2col)", [3, 1, 7, 7], vec![stem(1, 8)]),
        (
            "basic 8->8 identity (Winograd)",
            [2, 8, 6, 5],
            vec![basic(8, 8, 1)],
        ),
        (
            "basic 8->16 stride 2, projection",
            [3, 8, 7, 6],
            vec![basic(8, 16, 2)],
        ),
        (
            "bottleneck with a strided middle stage",
            [2, 6, 8, 8],
            vec![BlockDef {
                stages: vec![st(6, 3, 1, 1), st(3, 3, 3, 2), st(3, 12, 1, 1)],
                short: ShortDef::Projection(st(6, 12, 1, 2)),
            }],
        ),
        (
            "resnet_tiny-like chain: stem, identity, projection, identity",
            [2, 1, 9, 9],
            vec![
                stem(1, 8),
                basic(8, 8, 1),
                basic(8, 16, 2),
                basic(16, 16, 1),
            ],
        ),
        (
            "no affine BatchNorm",
            [2, 4, 5, 5],
            vec![BlockDef {
                stages: vec![
                    StageDef {
                        affine: false,
                        ..st(4, 4, 3, 1)
                    },
                    st(4, 4, 3, 1),
                ],
                short: ShortDef::Identity,
            }],
        ),
    ]
}

#[test]
fn fused_blocks_match_the_layer_by_layer_composition() {
    for dtype in [DType::F64, DType::F32] {
        let tol = if dtype == DType::F64 { 1e-9 } else { 2e-4 };
        for (i, (what, dims, defs)) in chains().into_iter().enumerate() {
            let mut r = aimass::device::rng(10 + i as u64);
            let x = Var::from_tensor(&randt(&mut r, &dims, 1.0).to_dtype(dtype).unwrap()).unwrap();
            let p = Params::new(&defs, dtype, 20 + i as u64);
            let blocks = p.blocks(&defs);
            let out_dims = kernels::residual_blocks_train(x.as_tensor(), &blocks)
                .unwrap()
                .output
                .dims()
                .to_vec();
            let rr = randt(&mut r, &out_dims, 1.0).to_dtype(dtype).unwrap();
            let a = run(&x, &p, &rr, &fused, &defs);
            let b = run(&x, &p, &rr, &composed, &defs);
            let what = format!("{what} ({dtype:?})");
            assert_close(&a.out, &b.out, tol, &format!("{what}: output"));
            assert_eq!(a.stats.len(), b.stats.len(), "{what}: statistics");
            for (k, (sa, sb)) in a.stats.iter().zip(&b.stats).enumerate() {
                assert_close(sa, sb, tol, &format!("{what}: statistic {k}"));
            }
            for (k, (ga, gb)) in a.grads.iter().zip(&b.grads).enumerate() {
                assert_close(ga, gb, tol, &format!("{what}: gradient {k}"));
            }
        }
    }
}

#[test]
fn statistic_counts_follow_each_stage_resolution() {
    let defs = &chains()[3].2;
    let p = Params::new(defs, DType::F64, 3);
    let x = Tensor::zeros((2, 6, 8, 8), DType::F64, &Device::Cpu).unwrap();
    let o = kernels::residual_blocks_train(&x, &p.blocks(defs)).unwrap();
    let counts: Vec<usize> = o.stats.iter().map(|s| s.count).collect();
    // 1x1 at 8x8, then stride 2: 4x4 for the rest and the projection.
    assert_eq!(counts, vec![128, 32, 32, 32]);
}

/// Central finite differences of `sum(f(x) * r)` in f64 against the fused
/// op's gradients of the input and of every parameter.
#[test]
fn fused_gradients_match_finite_differences() {
    let defs = vec![
        BlockDef {
            stages: vec![st(2, 3, 3, 1)],
            short: ShortDef::None,
        },
        BlockDef {
            stages: vec![st(3, 3, 3, 1), st(3, 3, 3, 1)],
            short: ShortDef::Identity,
        },
        BlockDef {
            stages: vec![st(3, 4, 3, 2), st(4, 4, 3, 1)],
            short: ShortDef::Projection(st(3, 4, 1, 2)),
        },
    ];
    let mut r = aimass::device::rng(7);
    let x0 = randt(&mut r, &[2, 2, 5, 5], 1.0);
    let p = Params::new(&defs, DType::F64, 8);
    let rr = randt(&mut r, &[2, 4, 3, 3], 1.0);
    let x = Var::from_tensor(&x0).unwrap();
    let got = run(&x, &p, &rr, &fused, &defs);
    // The loss with tensor `k` (0: the input, then the parameters) replaced.
    let loss = |k: usize, t: &Tensor| -> f64 {
        let mut ts: Vec<Tensor> = std::iter::once(x0.clone())
            .chain(p.vars.iter().map(|v| v.as_tensor().clone()))
            .collect();
        ts[k] = t.clone();
        let q = Params {
            vars: ts[1..]
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect(),
        };
        let out = kernels::residual_blocks_train(&ts[0], &q.blocks(&defs))
            .unwrap()
            .output;
        (out * &rr)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let tensors: Vec<Tensor> = std::iter::once(x0.clone())
        .chain(p.vars.iter().map(|v| v.as_tensor().clone()))
        .collect();
    for (k, t0) in tensors.iter().enumerate() {
        let v0 = flat(t0);
        let eps = 1e-6;
        let want: Vec<f64> = (0..v0.len())
            .map(|i| {
                let mut v = v0.clone();
                v[i] = v0[i] + eps;
                let a = loss(
                    k,
                    &Tensor::from_vec(v.clone(), t0.dims(), &Device::Cpu).unwrap(),
                );
                v[i] = v0[i] - eps;
                let b = loss(k, &Tensor::from_vec(v, t0.dims(), &Device::Cpu).unwrap());
                (a - b) / (2.0 * eps)
            })
            .collect();
        assert_close(&got.grads[k], &want, 1e-5, &format!("tensor {k}"));
    }
}

#[test]
fn gradients_only_where_autograd_wants_them() {
    let defs = &chains()[1].2;
    let p = Params::new(defs, DType::F32, 4);
    let mut r = aimass::device::rng(5);
    // A plain input (no variable): parameter gradients only.
    let x = randt(&mut r, &[2, 8, 6, 5], 1.0)
        .to_dtype(DType::F32)
        .unwrap();
    let out = kernels::residual_blocks_train(&x, &p.blocks(defs)).unwrap();
    let g = out.output.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_none());
    assert!(p.vars.iter().all(|v| g.get(v).is_some()));
    // Constant parameters and a variable input: the input's gradient only,
    // equal to the one with variable parameters.
    let consts: Vec<Tensor> = p.vars.iter().map(|v| v.as_tensor().detach()).collect();
    let refs: Vec<&Tensor> = consts.iter().collect();
    let xv = Var::from_tensor(&x).unwrap();
    let out = kernels::residual_blocks_train(xv.as_tensor(), &blocks_of(&refs, defs)).unwrap();
    let g = out.output.sum_all().unwrap().backward().unwrap();
    let dx_const = flat(g.get(&xv).expect("input gradient"));
    let out = kernels::residual_blocks_train(xv.as_tensor(), &p.blocks(defs)).unwrap();
    let g = out.output.sum_all().unwrap().backward().unwrap();
    assert_eq!(dx_const, flat(g.get(&xv).unwrap()));
}

#[test]
fn residual_blocks_reject_bad_arguments() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 4, 6, 6), DType::F32, &dev).unwrap();
    let w = |o: usize, c: usize, k: usize| Tensor::zeros((o, c, k, k), DType::F32, &dev).unwrap();
    let (w44, w48, w84, w11) = (w(4, 4, 3), w(4, 8, 3), w(8, 4, 3), w(8, 4, 1));
    let s = |weight: &Tensor, stride: usize| ConvBn {
        weight: leak(weight),
        stride: (stride, stride),
        padding: (weight.dim(2).unwrap() / 2, weight.dim(2).unwrap() / 2),
        bn_weight: None,
        bn_bias: None,
        eps: 1e-5,
    };
    let block = |stages: Vec<ConvBn<'static>>, shortcut: Shortcut<'static>| ResidualBlock {
        stages,
        shortcut,
    };
    let gamma5 = Tensor::ones(5, DType::F32, &dev).unwrap();
    let cases: Vec<(&str, Vec<ResidualBlock<'static>>, bool)> = vec![
        ("no block", vec![], true),
        (
            "a block without stages",
            vec![block(vec![], Shortcut::None)],
            true,
        ),
        (
            "channels that do not chain",
            vec![block(vec![s(&w48, 1)], Shortcut::None)],
            true,
        ),
        (
            "an identity shortcut around a change of width",
            vec![block(vec![s(&w84, 1)], Shortcut::Identity)],
            true,
        ),
        (
            "an identity shortcut around a stride",
            vec![block(vec![s(&w44, 2)], Shortcut::Identity)],
            true,
        ),
        (
            "a projection of the wrong stride",
            vec![block(vec![s(&w84, 2)], Shortcut::Projection(s(&w11, 1)))],
            true,
        ),
        (
            "a BatchNorm scale of the wrong size",
            vec![block(
                vec![ConvBn {
                    bn_weight: Some(leak(&gamma5)),
                    ..s(&w44, 1)
                }],
                Shortcut::None,
            )],
            true,
        ),
        (
            "a zero stride",
            vec![block(vec![s(&w44, 0)], Shortcut::None)],
            false,
        ),
        (
            "a negative eps",
            vec![block(
                vec![ConvBn {
                    eps: -1.0,
                    ..s(&w44, 1)
                }],
                Shortcut::None,
            )],
            false,
        ),
    ];
    for (what, blocks, shape) in cases {
        match kernels::residual_blocks_train(&x, &blocks) {
            Err(aimass::Error::Shape { .. }) if shape => {}
            Err(aimass::Error::InvalidArgument { .. }) if !shape => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    // Unsupported dtypes and mixed dtypes.
    let xh = x.to_dtype(DType::F16).unwrap();
    let ok = vec![block(vec![s(&w44, 1)], Shortcut::None)];
    assert!(matches!(
        kernels::residual_blocks_train(&xh, &ok),
        Err(aimass::Error::InvalidArgument { .. })
    ));
    let x64 = x.to_dtype(DType::F64).unwrap();
    assert!(matches!(
        kernels::residual_blocks_train(&x64, &ok),
        Err(aimass::Error::InvalidArgument { .. })
    ));
    let x3 = Tensor::zeros((2, 4, 6), DType::F32, &dev).unwrap();
    assert!(matches!(
        kernels::residual_blocks_train(&x3, &ok),
        Err(aimass::Error::Shape { .. })
    ));
}

/// A `'static` borrow of a tensor for the table of bad cases (leaked, in a
/// test process).
fn leak(t: &Tensor) -> &'static Tensor {
    Box::leak(Box::new(t.clone()))
}
