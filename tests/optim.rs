//! Optimizers, clipping, schedules and EMA against torch.optim fixtures
//! (tests/fixtures/gen_optim.py) and hand-derived values.

use std::collections::HashMap;

use aimass::candle::{backprop::GradStore, DType, Device, Tensor, Var};
use aimass::optim::{self, *};
use aimass::Error;

type Map = HashMap<String, Tensor>;

fn fixtures() -> Map {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/optim.safetensors"
    );
    aimass::candle::safetensors::load(p, &Device::Cpu).unwrap()
}

struct Problem {
    w: Var,
    b: Var,
    x: Tensor,
    y: Tensor,
}

impl Problem {
    fn new(f: &Map, dt: DType) -> Self {
        let g = |k: &str| f[k].to_dtype(dt).unwrap();
        Problem {
            w: Var::from_tensor(&g("W0")).unwrap(),
            b: Var::from_tensor(&g("b0")).unwrap(),
            x: g("x"),
            y: g("y"),
        }
    }
    fn one_group(&self) -> Vec<ParamGroup> {
        vec![ParamGroup::new(vec![
            ("fc.weight".into(), self.w.clone()),
            ("fc.bias".into(), self.b.clone()),
        ])]
    }
    fn vars(&self) -> Vec<Var> {
        vec![self.w.clone(), self.b.clone()]
    }
    fn grads(&self) -> GradStore {
        let pred = self
            .x
            .matmul(&self.w.t().unwrap())
            .unwrap()
            .broadcast_add(&self.b)
            .unwrap();
        let loss = ((pred - &self.y).unwrap().sqr().unwrap().sum_all().unwrap() / 8.0).unwrap();
        loss.backward().unwrap()
    }
    fn flat(&self) -> Vec<f64> {
        let w = self
            .w
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let b = self
            .b
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        w.into_iter().chain(b).collect()
    }
}

/// Relative error per element, with `|want|` floored at 1e-3 (f64) or at
/// 0.1 (f32, whose rounding is ~1e-7 of the weights' scale, about 1).
fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    let floor = if tol > 1e-7 { 0.1 } else { 1e-3 };
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let err = (a - b).abs() / b.abs().max(floor);
        assert!(
            err <= tol,
            "{what}: element {i}: got {a}, torch {b} (rel err {err:e})"
        );
    }
}

/// Runs `opt` on the fixture problem and compares every step with torch.
fn check_traj(case: &str, dt: DType, tol: f64, make: impl FnOnce(&Problem) -> Box<dyn Optimizer>) {
    check_traj_with(case, dt, tol, make, |_, _, _| {});
}

fn check_traj_with(
    case: &str,
    dt: DType,
    tol: f64,
    make: impl FnOnce(&Problem) -> Box<dyn Optimizer>,
    mut before: impl FnMut(usize, &mut dyn Optimizer, &mut GradStore),
) {
    let f = fixtures();
    let traj = f[&format!("traj.{case}")].to_vec2::<f64>().unwrap();
    assert!(traj.len() > 20);
    let pb = Problem::new(&f, dt);
    let mut opt = make(&pb);
    assert_close(&pb.flat(), &traj[0], 0.0, case);
    for (t, row) in traj.iter().enumerate().skip(1) {
        let mut g = pb.grads();
        before(t - 1, opt.as_mut(), &mut g);
        opt.step(&g).unwrap();
        assert_close(&pb.flat(), row, tol, &format!("{case} step {t}"));
    }
    assert_eq!(opt.step_count(), (traj.len() - 1) as u64);
}

const F64_TOL: f64 = 1e-9;

fn sgd(c: SgdConfig) -> impl FnOnce(&Problem) -> Box<dyn Optimizer> {
    move |p| Box::new(Sgd::new(p.one_group(), c).unwrap())
}
fn adam(c: AdamConfig) -> impl FnOnce(&Problem) -> Box<dyn Optimizer> {
    move |p| Box::new(Adam::new(p.one_group(), c).unwrap())
}
fn adamw(c: AdamWConfig) -> impl FnOnce(&Problem) -> Box<dyn Optimizer> {
    move |p| Box::new(AdamW::new(p.one_group(), c).unwrap())
}
fn rms(c: RmsPropConfig) -> impl FnOnce(&Problem) -> Box<dyn Optimizer> {
    move |p| Box::new(RmsProp::new(p.one_group(), c).unwrap())
}

#[test]
fn sgd_matches_torch() {
    for fused in [true, false] {
        let c = SgdConfig::default().with_lr(0.05).with_fused(fused);
        check_traj("sgd", DType::F64, F64_TOL, sgd(c.clone()));
        check_traj(
            "sgd_momentum",
            DType::F64,
            F64_TOL,
            sgd(c.clone().with_momentum(0.9)),
        );
        check_traj(
            "sgd_dampening",
            DType::F64,
            F64_TOL,
            sgd(c.clone().with_momentum(0.9).with_dampening(0.3)),
        );
        check_traj(
            "sgd_nesterov",
            DType::F64,
            F64_TOL,
            sgd(c.clone().with_momentum(0.9).with_nesterov(true)),
        );
        check_traj(
            "sgd_wd",
            DType::F64,
            F64_TOL,
            sgd(c.clone().with_momentum(0.9).with_weight_decay(0.1)),
        );
    }
}

#[test]
fn param_groups_match_torch() {
    // torch: [{W, weight_decay 0.1}, {b, lr 0.025, weight_decay 0}], lr 0.05.
    check_traj("sgd_groups", DType::F64, F64_TOL, |p| {
        let groups = vec![
            ParamGroup::new(vec![("w".into(), p.w.clone())]),
            ParamGroup::new(vec![("b".into(), p.b.clone())])
                .with_lr_scale(0.5)
                .with_weight_decay(0.0),
        ];
        let c = SgdConfig::default()
            .with_lr(0.05)
            .with_momentum(0.9)
            .with_weight_decay(0.1);
        Box::new(Sgd::new(groups, c).unwrap())
    });
}

#[test]
fn adam_and_adamw_match_torch() {
    for fused in [true, false] {
        let c = AdamConfig::default().with_lr(0.05).with_fused(fused);
        check_traj("adam", DType::F64, F64_TOL, adam(c.clone()));
        check_traj(
            "adam_wd",
            DType::F64,
            F64_TOL,
            adam(c.clone().with_weight_decay(0.1)),
        );
        check_traj(
            "adam_amsgrad",
            DType::F64,
            F64_TOL,
            adam(c.clone().with_betas((0.8, 0.99)).with_amsgrad(true)),
        );
        let c = AdamWConfig::default()
            .with_lr(0.05)
            .with_weight_decay(0.1)
            .with_fused(fused);
        check_traj("adamw", DType::F64, F64_TOL, adamw(c.clone()));
        check_traj(
            "adamw_amsgrad",
            DType::F64,
            F64_TOL,
            adamw(c.clone().with_amsgrad(true)),
        );
        check_traj("adamw_f32", DType::F32, 1e-5, adamw(c.clone()));
    }
}

#[test]
fn adamw_with_cosine_schedule_matches_torch() {
    let s = CosineAnnealingLr::new(0.05, 25, 0.001).unwrap();
    let c = AdamWConfig::default().with_lr(0.05).with_weight_decay(0.1);
    check_traj_with(
        "adamw_cosine",
        DType::F64,
        F64_TOL,
        adamw(c),
        |t, opt, _| opt.set_lr(s.lr(t as u64)).unwrap(),
    );
}

#[test]
fn rmsprop_matches_torch() {
    let c = RmsPropConfig::default().with_lr(0.01);
    check_traj("rmsprop", DType::F64, F64_TOL, rms(c.clone()));
    check_traj(
        "rmsprop_momentum",
        DType::F64,
        F64_TOL,
        rms(c.clone().with_momentum(0.9)),
    );
    check_traj(
        "rmsprop_centered",
        DType::F64,
        F64_TOL,
        rms(c.clone().with_centered(true)),
    );
    check_traj(
        "rmsprop_all",
        DType::F64,
        F64_TOL,
        rms(c
            .with_alpha(0.9)
            .with_momentum(0.5)
            .with_centered(true)
            .with_weight_decay(0.1)),
    );
}

fn lars_groups(p: &Problem) -> Vec<ParamGroup> {
    // The default split: W adapted and decayed, the bias neither.
    let mut m = HashMap::new();
    m.insert("fc.weight".to_string(), p.w.clone());
    m.insert("fc.bias".to_string(), p.b.clone());
    default_param_groups(&m)
}

#[test]
fn lars_matches_reference_formula() {
    let c = LarsConfig::default()
        .with_lr(1.0)
        .with_momentum(0.9)
        .with_weight_decay(0.1)
        .with_eta(0.01);
    check_traj("lars", DType::F64, F64_TOL, |p| {
        Box::new(Lars::new(lars_groups(p), c.clone()).unwrap())
    });
    let c = c.clone().with_nesterov(true);
    check_traj("lars_nesterov", DType::F64, F64_TOL, |p| {
        Box::new(Lars::new(lars_groups(p), c).unwrap())
    });
}

#[test]
fn clipping_option_and_standalone_match_torch() {
    let c = SgdConfig::default().with_lr(0.05).with_momentum(0.9);
    check_traj(
        "sgd_clip_norm",
        DType::F64,
        F64_TOL,
        sgd(c.clone().with_grad_clip(GradClip::norm(1.0))),
    );
    let inf = GradClip::Norm {
        max_norm: 0.3,
        norm_type: f64::INFINITY,
    };
    check_traj(
        "sgd_clip_norm_inf",
        DType::F64,
        F64_TOL,
        sgd(SgdConfig::default().with_lr(0.05).with_grad_clip(inf)),
    );
    let a = AdamConfig::default().with_lr(0.05);
    check_traj(
        "adam_clip_value",
        DType::F64,
        F64_TOL,
        adam(a.clone().with_grad_clip(GradClip::Value(0.5))),
    );

    // The same with the standalone functions on the GradStore.
    let f = fixtures();
    let mut norms = Vec::new();
    let pb = Problem::new(&f, DType::F64);
    let traj = f["traj.adam_clip_value"].to_vec2::<f64>().unwrap();
    let mut opt = Adam::new(pb.one_group(), a).unwrap();
    for row in traj.iter().skip(1) {
        let mut g = pb.grads();
        clip_grad_value(&mut g, &pb.vars(), 0.5).unwrap();
        optim::Optimizer::step(&mut opt, &g).unwrap();
        assert_close(&pb.flat(), row, F64_TOL, "standalone clip_grad_value");
    }
    let pb = Problem::new(&f, DType::F64);
    let traj = f["traj.sgd_clip_norm"].to_vec2::<f64>().unwrap();
    let mut opt = Sgd::new(
        pb.one_group(),
        SgdConfig::default().with_lr(0.05).with_momentum(0.9),
    )
    .unwrap();
    for row in traj.iter().skip(1) {
        let mut g = pb.grads();
        norms.push(clip_grad_norm(&mut g, &pb.vars(), 1.0, 2.0).unwrap());
        optim::Optimizer::step(&mut opt, &g).unwrap();
        assert_close(&pb.flat(), row, F64_TOL, "standalone clip_grad_norm");
    }
    assert!(
        norms[0] > 1.0,
        "the fixture must actually clip: norm {}",
        norms[0]
    );
}

/// A GradStore holding `values[i]` as the gradient of `vars[i]`.
fn store(vars: &[Var], values: &[Vec<f64>]) -> GradStore {
    let mut loss = Tensor::new(0f64, &Device::Cpu).unwrap();
    for (v, g) in vars.iter().zip(values) {
        let g = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
        loss = (loss + (v.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
    }
    loss.backward().unwrap()
}

fn vals(g: &GradStore, v: &Var) -> Vec<f64> {
    g.get(v).unwrap().to_vec1::<f64>().unwrap()
}

#[test]
fn clip_grad_norm_hand_values() {
    let dev = Device::Cpu;
    let a = Var::zeros(2, DType::F64, &dev).unwrap();
    let b = Var::zeros(1, DType::F64, &dev).unwrap();
    let vars = [a.clone(), b.clone()];
    // 2-norm of [3, 4, 12] is 13.
    let mut g = store(&vars, &[vec![3.0, 4.0], vec![12.0]]);
    let n = clip_grad_norm(&mut g, &vars, 6.5, 2.0).unwrap();
    assert!((n - 13.0).abs() < 1e-12);
    let s = 6.5 / (13.0 + 1e-6);
    assert_close(&vals(&g, &a), &[3.0 * s, 4.0 * s], 1e-12, "clipped a");
    assert_close(&vals(&g, &b), &[12.0 * s], 1e-12, "clipped b");
    // Below the threshold: returned norm, gradients unchanged.
    let mut g = store(&vars, &[vec![3.0, 4.0], vec![12.0]]);
    assert!((clip_grad_norm(&mut g, &vars, 100.0, 2.0).unwrap() - 13.0).abs() < 1e-12);
    assert_eq!(vals(&g, &a), [3.0, 4.0]);
    // inf-norm = max |g|; 1-norm = sum |g|.
    let mut g = store(&vars, &[vec![3.0, -14.0], vec![12.0]]);
    assert_eq!(grad_norm(&g, &vars, f64::INFINITY).unwrap(), 14.0);
    assert!((grad_norm(&g, &vars, 1.0).unwrap() - 29.0).abs() < 1e-12);
    let p3 = (27.0f64 + 14f64.powi(3) + 12f64.powi(3)).powf(1.0 / 3.0);
    assert!((grad_norm(&g, &vars, 3.0).unwrap() - p3).abs() < 1e-9);
    let n = clip_grad_norm(&mut g, &vars, 7.0, f64::INFINITY).unwrap();
    assert_eq!(n, 14.0);
    assert!((vals(&g, &a)[1] + 7.0).abs() < 1e-5);
    // By value.
    let mut g = store(&vars, &[vec![3.0, -14.0], vec![0.5]]);
    clip_grad_value(&mut g, &vars, 1.0).unwrap();
    assert_eq!(vals(&g, &a), [1.0, -1.0]);
    assert_eq!(vals(&g, &b), [0.5]);
    // Bad arguments.
    assert!(matches!(
        clip_grad_norm(&mut g, &vars, 1.0, 0.0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        clip_grad_value(&mut g, &vars, -1.0),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn non_finite_gradients_are_reported_and_not_applied() {
    let dev = Device::Cpu;
    let a = Var::new(&[1.0f64, 2.0], &dev).unwrap();
    let b = Var::new(&[3.0f64], &dev).unwrap();
    let vars = [a.clone(), b.clone()];
    for bad in [f64::NAN, f64::INFINITY] {
        let mut g = store(&vars, &[vec![1.0, bad], vec![2.0]]);
        let e = clip_grad_norm(&mut g, &vars, 1.0, 2.0).unwrap_err();
        assert!(matches!(e, Error::NonFinite { .. }), "{e}");
        assert_eq!(vals(&g, &b), [2.0], "gradients left unchanged");
        assert!(matches!(grad_norm(&g, &vars, f64::INFINITY), Ok(n) if !n.is_finite()));
        // As an optimizer option: the step fails and nothing moves.
        let groups = vec![ParamGroup::new(vec![
            ("a".into(), a.clone()),
            ("b".into(), b.clone()),
        ])];
        let mut opt = Sgd::new(
            groups,
            SgdConfig::default()
                .with_lr(0.1)
                .with_grad_clip(GradClip::norm(1.0)),
        )
        .unwrap();
        let e = optim::Optimizer::step(&mut opt, &g).unwrap_err();
        assert!(matches!(e, Error::NonFinite { .. }), "{e}");
        assert_eq!(a.to_vec1::<f64>().unwrap(), [1.0, 2.0]);
        assert_eq!(b.to_vec1::<f64>().unwrap(), [3.0]);
        assert_eq!(optim::Optimizer::step_count(&opt), 0);
    }
}

#[test]
fn vars_without_gradient_are_untouched() {
    let f = fixtures();
    let pb = Problem::new(&f, DType::F64);
    let extra = Var::new(&[[1.0f64, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
    let mut groups = pb.one_group();
    groups.push(ParamGroup::new(vec![("unused".into(), extra.clone())]));
    let traj = f["traj.adamw"].to_vec2::<f64>().unwrap();
    let mut opt = AdamW::new(
        groups,
        AdamWConfig::default().with_lr(0.05).with_weight_decay(0.1),
    )
    .unwrap();
    for row in traj.iter().skip(1) {
        optim::Optimizer::step(&mut opt, &pb.grads()).unwrap();
        assert_close(&pb.flat(), row, F64_TOL, "adamw with an unused var");
    }
    assert_eq!(extra.to_vec2::<f64>().unwrap(), [[1.0, 2.0], [3.0, 4.0]]);
    let st = opt.state_dict().unwrap();
    assert!(
        !st.keys().any(|k| k.starts_with("unused")),
        "{:?}",
        st.keys()
    );
}

/// Runs `split` steps, exports the state (through a safetensors file),
/// rebuilds a fresh optimizer on fresh vars, imports, and finishes the
/// torch trajectory.
fn check_resume(case: &str, split: usize, make: &dyn Fn(&Problem) -> Box<dyn Optimizer>) {
    let f = fixtures();
    let traj = f[&format!("traj.{case}")].to_vec2::<f64>().unwrap();
    let pb = Problem::new(&f, DType::F64);
    let mut opt = make(&pb);
    for _ in 0..split {
        opt.step(&pb.grads()).unwrap();
    }
    let state = opt.state_dict().unwrap();
    let dir = std::env::temp_dir().join(format!("aimass-optim-{}-{case}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.safetensors");
    aimass::candle::safetensors::save(&state, &path).unwrap();
    let loaded = aimass::candle::safetensors::load(&path, &Device::Cpu).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    // Fresh vars holding the current weights, fresh optimizer.
    let pb2 = Problem {
        w: Var::from_tensor(&pb.w.as_tensor().copy().unwrap()).unwrap(),
        b: Var::from_tensor(&pb.b.as_tensor().copy().unwrap()).unwrap(),
        x: pb.x.clone(),
        y: pb.y.clone(),
    };
    let mut opt2 = make(&pb2);
    opt2.load_state_dict(&loaded).unwrap();
    assert_eq!(opt2.step_count(), split as u64);
    for row in traj.iter().skip(split + 1) {
        opt2.step(&pb2.grads()).unwrap();
        assert_close(&pb2.flat(), row, F64_TOL, &format!("{case} resumed"));
    }
}

#[test]
fn state_export_import_continues_the_trajectory() {
    check_resume("sgd_nesterov", 7, &|p| {
        Box::new(
            Sgd::new(
                p.one_group(),
                SgdConfig::default()
                    .with_lr(0.05)
                    .with_momentum(0.9)
                    .with_nesterov(true),
            )
            .unwrap(),
        )
    });
    check_resume("adam_amsgrad", 11, &|p| {
        let c = AdamConfig::default()
            .with_lr(0.05)
            .with_betas((0.8, 0.99))
            .with_amsgrad(true);
        Box::new(Adam::new(p.one_group(), c).unwrap())
    });
    check_resume("adamw", 5, &|p| {
        Box::new(
            AdamW::new(
                p.one_group(),
                AdamWConfig::default().with_lr(0.05).with_weight_decay(0.1),
            )
            .unwrap(),
        )
    });
    check_resume("rmsprop_all", 9, &|p| {
        let c = RmsPropConfig::default()
            .with_lr(0.01)
            .with_alpha(0.9)
            .with_momentum(0.5)
            .with_centered(true)
            .with_weight_decay(0.1);
        Box::new(RmsProp::new(p.one_group(), c).unwrap())
    });
    check_resume("lars", 13, &|p| {
        let c = LarsConfig::default()
            .with_lr(1.0)
            .with_momentum(0.9)
            .with_weight_decay(0.1)
            .with_eta(0.01);
        Box::new(Lars::new(lars_groups(p), c).unwrap())
    });
}

#[test]
fn state_names_and_import_errors() {
    let f = fixtures();
    let pb = Problem::new(&f, DType::F64);
    let c = AdamConfig::default().with_amsgrad(true);
    let mut opt = Adam::new(pb.one_group(), c.clone()).unwrap();
    optim::Optimizer::step(&mut opt, &pb.grads()).unwrap();
    let st = opt.state_dict().unwrap();
    let mut keys: Vec<_> = st.keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "fc.bias.exp_avg",
            "fc.bias.exp_avg_sq",
            "fc.bias.max_exp_avg_sq",
            "fc.bias.step",
            "fc.weight.exp_avg",
            "fc.weight.exp_avg_sq",
            "fc.weight.max_exp_avg_sq",
            "fc.weight.step",
            "step"
        ]
    );
    // Exported tensors are copies: later steps do not change them.
    let before = st["fc.weight.exp_avg"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    optim::Optimizer::step(&mut opt, &pb.grads()).unwrap();
    assert_eq!(
        st["fc.weight.exp_avg"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap(),
        before
    );

    let mut bad = st.clone();
    bad.insert(
        "fc.weight.exp_avg".into(),
        Tensor::zeros((5, 4), DType::F64, &Device::Cpu).unwrap(),
    );
    assert!(matches!(
        opt.load_state_dict(&bad),
        Err(Error::Shape { .. })
    ));
    let mut bad = st.clone();
    bad.insert(
        "conv.weight.exp_avg".into(),
        Tensor::zeros((4, 5), DType::F64, &Device::Cpu).unwrap(),
    );
    let e = opt.load_state_dict(&bad).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { .. }) && e.to_string().contains("conv.weight"),
        "{e}"
    );
    let mut bad = st.clone();
    bad.insert(
        "fc.weight.momentum_buffer".into(),
        Tensor::zeros((4, 5), DType::F64, &Device::Cpu).unwrap(),
    );
    assert!(matches!(
        opt.load_state_dict(&bad),
        Err(Error::InvalidArgument { .. })
    ));
    let mut bad = st.clone();
    bad.remove("step");
    assert!(matches!(
        opt.load_state_dict(&bad),
        Err(Error::InvalidArgument { .. })
    ));
    // A failed import changed nothing.
    assert_eq!(optim::Optimizer::step_count(&opt), 2);
}

#[test]
fn candle_nn_optimizer_interface() {
    let f = fixtures();
    let traj = f["traj.sgd_momentum"].to_vec2::<f64>().unwrap();
    let pb = Problem::new(&f, DType::F64);
    let mut opt = Sgd::new_unnamed(&pb);
    for row in traj.iter().skip(1) {
        aimass::candle_nn::Optimizer::step(&mut opt, &pb.grads()).unwrap();
        assert_close(&pb.flat(), row, F64_TOL, "candle_nn::Optimizer for Sgd");
    }
    assert_eq!(aimass::candle_nn::Optimizer::learning_rate(&opt), 0.05);
    assert_eq!(optim::Optimizer::param_names(&opt), ["param.0", "param.1"]);

    let traj = f["traj.adamw"].to_vec2::<f64>().unwrap();
    let pb = Problem::new(&f, DType::F64);
    let c = AdamWConfig::default().with_lr(0.05).with_weight_decay(0.1);
    let mut opt = <AdamW as aimass::candle_nn::Optimizer>::new(pb.vars(), c).unwrap();
    for row in traj.iter().skip(1) {
        let loss_grads = pb.grads();
        aimass::candle_nn::Optimizer::step(&mut opt, &loss_grads).unwrap();
        assert_close(&pb.flat(), row, F64_TOL, "candle_nn::Optimizer for AdamW");
    }
}

trait NewUnnamed {
    fn new_unnamed(p: &Problem) -> Self;
}
impl NewUnnamed for Sgd {
    fn new_unnamed(p: &Problem) -> Self {
        let c = SgdConfig::default().with_lr(0.05).with_momentum(0.9);
        <Sgd as aimass::candle_nn::Optimizer>::new(p.vars(), c).unwrap()
    }
}

#[test]
fn varmap_default_groups_skip_buffers_and_decay() {
    use aimass::candle_nn::{VarBuilder, VarMap};
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
    let _lin = aimass::candle_nn::linear(3, 2, vb.pp("fc")).unwrap();
    let _bn = aimass::candle_nn::batch_norm(2, 1e-5, vb.pp("bn")).unwrap();
    let opt = Sgd::from_varmap(&vm, SgdConfig::default().with_weight_decay(0.1)).unwrap();
    assert_eq!(
        optim::Optimizer::param_names(&opt),
        ["fc.weight", "bn.bias", "bn.weight", "fc.bias"]
    );
    // Every optimizer accepts the split.
    assert!(Lars::from_varmap(&vm, LarsConfig::default()).is_ok());
    assert!(AdamW::from_varmap(&vm, AdamWConfig::default()).is_ok());
}

fn config_field(e: Error) -> String {
    match e {
        Error::Config { field, .. } => field,
        other => panic!("expected Error::Config, got {other}"),
    }
}

#[test]
fn bad_configs_name_the_field() {
    let f = fixtures();
    let pb = Problem::new(&f, DType::F64);
    let g = || pb.one_group();
    let sgd = |c: SgdConfig| config_field(Sgd::new(g(), c).err().unwrap());
    assert_eq!(sgd(SgdConfig::default().with_lr(-1.0)), "SgdConfig::lr");
    assert_eq!(sgd(SgdConfig::default().with_lr(f64::NAN)), "SgdConfig::lr");
    assert_eq!(
        sgd(SgdConfig::default().with_momentum(1.0)),
        "SgdConfig::momentum"
    );
    assert_eq!(
        sgd(SgdConfig::default().with_momentum(-0.1)),
        "SgdConfig::momentum"
    );
    assert_eq!(
        sgd(SgdConfig::default().with_nesterov(true)),
        "SgdConfig::nesterov"
    );
    assert_eq!(
        sgd(SgdConfig::default()
            .with_momentum(0.9)
            .with_dampening(0.1)
            .with_nesterov(true)),
        "SgdConfig::nesterov"
    );
    assert_eq!(
        sgd(SgdConfig::default().with_weight_decay(-1e-4)),
        "SgdConfig::weight_decay"
    );
    assert_eq!(
        sgd(SgdConfig::default().with_grad_clip(GradClip::norm(0.0))),
        "SgdConfig::grad_clip.max_norm"
    );
    let adam = |c: AdamConfig| config_field(Adam::new(g(), c).err().unwrap());
    assert_eq!(
        adam(AdamConfig::default().with_betas((1.0, 0.999))),
        "AdamConfig::betas.0"
    );
    assert_eq!(
        adam(AdamConfig::default().with_betas((0.9, -0.1))),
        "AdamConfig::betas.1"
    );
    assert_eq!(adam(AdamConfig::default().with_eps(0.0)), "AdamConfig::eps");
    let adamw = |c: AdamWConfig| config_field(AdamW::new(g(), c).err().unwrap());
    assert_eq!(
        adamw(AdamWConfig::default().with_weight_decay(-0.01)),
        "AdamWConfig::weight_decay"
    );
    let rms = |c: RmsPropConfig| config_field(RmsProp::new(g(), c).err().unwrap());
    assert_eq!(
        rms(RmsPropConfig::default().with_alpha(1.5)),
        "RmsPropConfig::alpha"
    );
    assert_eq!(
        rms(RmsPropConfig::default().with_momentum(1.0)),
        "RmsPropConfig::momentum"
    );
    let lars = |c: LarsConfig| config_field(Lars::new(g(), c).err().unwrap());
    assert_eq!(lars(LarsConfig::default().with_eta(0.0)), "LarsConfig::eta");
    assert_eq!(
        lars(LarsConfig::default().with_momentum(0.0).with_nesterov(true)),
        "LarsConfig::nesterov"
    );
    let grp = vec![ParamGroup::new(vec![("w".into(), pb.w.clone())]).with_lr_scale(-1.0)];
    assert!(
        config_field(Sgd::new(grp, SgdConfig::default()).err().unwrap())
            .starts_with("ParamGroup::lr_scale")
    );
    // Duplicate names / vars are rejected.
    let dup = vec![ParamGroup::new(vec![
        ("w".into(), pb.w.clone()),
        ("w2".into(), pb.w.clone()),
    ])];
    assert!(matches!(
        Sgd::new(dup, SgdConfig::default()),
        Err(Error::InvalidArgument { .. })
    ));
    // Schedules.
    assert_eq!(
        config_field(CosineAnnealingLr::new(0.1, 0, 0.0).unwrap_err()),
        "CosineAnnealingLr::t_max"
    );
    assert_eq!(
        config_field(StepLr::new(0.1, 0, 0.1).unwrap_err()),
        "StepLr::step_size"
    );
    assert_eq!(
        config_field(ExponentialLr::new(-0.1, 0.9).unwrap_err()),
        "ExponentialLr::base_lr"
    );
    assert_eq!(
        config_field(
            OneCycleLr::new(OneCycleConfig::new(0.1, 100).with_pct_start(1.5)).unwrap_err()
        ),
        "OneCycleConfig::pct_start"
    );
    assert_eq!(
        config_field(
            ReduceLrOnPlateau::new(0.1, ReduceLrOnPlateauConfig::default().with_factor(1.0))
                .unwrap_err()
        ),
        "ReduceLrOnPlateauConfig::factor"
    );
    assert_eq!(
        config_field(
            LinearWarmup::new(0.0, 5, ConstantLr::new(0.1).unwrap())
                .err()
                .unwrap()
        ),
        "LinearWarmup::start_factor"
    );
    assert_eq!(
        config_field(
            Ema::from_pairs(vec![], EmaConfig::default().with_tau_base(1.5))
                .err()
                .unwrap()
        ),
        "EmaConfig::tau_base"
    );
}

fn check_schedule(case: &str, s: &dyn Schedule) {
    let f = fixtures();
    let want = f[&format!("sched.{case}")].to_vec1::<f64>().unwrap();
    assert!(want.len() > 300);
    for (t, w) in want.iter().enumerate() {
        let got = s.lr(t as u64);
        let err = (got - w).abs() / w.abs().max(1e-12);
        assert!(err < 1e-9, "{case} at step {t}: got {got}, torch {w}");
    }
}

#[test]
fn schedules_match_torch() {
    check_schedule("constant", &ConstantLr::scaled(0.1, 0.5, 10).unwrap());
    check_schedule("step", &StepLr::new(0.1, 30, 0.5).unwrap());
    check_schedule(
        "multistep",
        &MultiStepLr::new(0.1, &[50, 120, 120, 200], 0.3).unwrap(),
    );
    check_schedule("exponential", &ExponentialLr::new(0.1, 0.99).unwrap());
    check_schedule("cosine", &CosineAnnealingLr::new(0.1, 300, 1e-4).unwrap());
    check_schedule(
        "cosine_periodic",
        &CosineAnnealingLr::new(0.1, 70, 1e-3).unwrap(),
    );
    check_schedule(
        "warmup_cosine",
        &LinearWarmup::new(0.01, 20, CosineAnnealingLr::new(0.1, 280, 1e-5).unwrap()).unwrap(),
    );
    check_schedule(
        "warmup_step",
        &LinearWarmup::new(0.1, 15, StepLr::new(0.1, 50, 0.5).unwrap()).unwrap(),
    );
    let oc = OneCycleLr::new(OneCycleConfig::new(0.1, 300)).unwrap();
    check_schedule("onecycle", &oc);
    let oc3 = OneCycleLr::new(
        OneCycleConfig::new(0.2, 300)
            .with_pct_start(0.25)
            .with_cos_anneal(false)
            .with_three_phase(true),
    )
    .unwrap();
    check_schedule("onecycle_3", &oc3);
    let f = fixtures();
    for (case, s) in [("onecycle", &oc), ("onecycle_3", &oc3)] {
        let want = f[&format!("sched.{case}.momentum")]
            .to_vec1::<f64>()
            .unwrap();
        for (t, w) in want.iter().enumerate() {
            assert!(
                (s.momentum(t as u64) - w).abs() < 1e-12,
                "{case} momentum at {t}"
            );
        }
    }
    // Boxed schedules compose.
    let boxed: Box<dyn Schedule> = Box::new(StepLr::new(0.1, 50, 0.5).unwrap());
    check_schedule("warmup_step", &LinearWarmup::new(0.1, 15, boxed).unwrap());
}

#[test]
fn reduce_on_plateau_matches_torch() {
    let f = fixtures();
    let metric = f["plateau.metric"].to_vec1::<f64>().unwrap();
    let cases = [
        (
            "min_rel",
            1.0,
            ReduceLrOnPlateauConfig::default()
                .with_factor(0.5)
                .with_patience(3)
                .with_cooldown(2)
                .with_min_lr(1e-3),
        ),
        (
            "max_abs",
            -1.0,
            ReduceLrOnPlateauConfig::default()
                .with_mode(PlateauMode::Max)
                .with_factor(0.3)
                .with_patience(5)
                .with_threshold(0.02)
                .with_threshold_mode(ThresholdMode::Abs),
        ),
        ("default", 1.0, ReduceLrOnPlateauConfig::default()),
    ];
    for (case, sign, cfg) in cases.clone() {
        let want = f[&format!("plateau.{case}")].to_vec1::<f64>().unwrap();
        let mut s = ReduceLrOnPlateau::new(0.1, cfg).unwrap();
        let mut reductions = 0;
        for (t, (m, w)) in metric.iter().zip(&want).enumerate() {
            let before = s.lr();
            let got = s.step(sign * m);
            reductions += usize::from(got < before);
            assert!(
                (got - w).abs() <= 1e-15 * w.abs(),
                "{case} at {t}: got {got}, torch {w}"
            );
        }
        assert!(
            reductions >= 1,
            "{case}: the fixture must exercise a reduction"
        );
    }
    // Checkpoint mid-run (inside a cooldown) and resume in a fresh scheduler.
    let want = f["plateau.min_rel"].to_vec1::<f64>().unwrap();
    let cfg = cases[0].2.clone();
    let mut s = ReduceLrOnPlateau::new(0.1, cfg.clone()).unwrap();
    for m in &metric[..40] {
        s.step(*m);
    }
    let st = s.state_dict().unwrap();
    let mut r = ReduceLrOnPlateau::new(0.5, cfg).unwrap();
    r.load_state_dict(&st).unwrap();
    for (t, m) in metric.iter().enumerate().skip(40) {
        assert!(
            (r.step(*m) - want[t]).abs() <= 1e-15 * want[t],
            "resumed plateau at {t}"
        );
    }
    let mut bad = st.clone();
    bad.remove("best");
    assert!(r.load_state_dict(&bad).is_err());
}

#[test]
fn ema_hand_values() {
    // BYOL: tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2.
    assert!((byol_tau(0.996, 0, 100) - 0.996).abs() < 1e-15);
    assert!((byol_tau(0.996, 50, 100) - 0.998).abs() < 1e-15);
    assert!((byol_tau(0.996, 100, 100) - 1.0).abs() < 1e-15);
    assert!((byol_tau(0.996, 500, 100) - 1.0).abs() < 1e-15);

    use aimass::candle_nn::VarMap;
    let dev = Device::Cpu;
    let online = VarMap::new();
    let target = VarMap::new();
    let put = |m: &VarMap, n: &str, v: &[f64]| {
        m.data()
            .lock()
            .unwrap()
            .insert(n.to_string(), Var::new(v, &dev).unwrap());
    };
    put(&online, "fc.weight", &[1.0, 2.0]);
    put(&online, "bn.running_mean", &[5.0]);
    put(&target, "fc.weight", &[0.0, 0.0]);
    put(&target, "bn.running_mean", &[0.0]);
    let ema = Ema::new(&online, &target, EmaConfig::default().with_tau_base(0.9)).unwrap();
    assert_eq!(ema.names(), ["fc.weight"]);
    assert_eq!(ema.update(0).unwrap(), 0.9);
    let tw = |m: &VarMap, n: &str| m.data().lock().unwrap()[n].to_vec1::<f64>().unwrap();
    assert_close(&tw(&target, "fc.weight"), &[0.1, 0.2], 1e-12, "ema step 1");
    ema.update(1).unwrap();
    assert_close(
        &tw(&target, "fc.weight"),
        &[0.19, 0.38],
        1e-12,
        "ema step 2",
    );
    assert_eq!(tw(&target, "bn.running_mean"), [0.0]);
    // Cosine schedule and buffers.
    let ema = Ema::new(
        &online,
        &target,
        EmaConfig::default()
            .with_total_steps(10)
            .with_include_buffers(true),
    )
    .unwrap();
    ema.copy_online_to_target().unwrap();
    assert_eq!(tw(&target, "bn.running_mean"), [5.0]);
    assert!((ema.tau(5) - 0.998).abs() < 1e-15);
    // Mismatched maps.
    put(&target, "extra", &[1.0]);
    assert!(Ema::new(&online, &target, EmaConfig::default()).is_err());
}

/// Optimizer state never references the forward graph: candle's weight
/// gradients do (the gradient of `w2` in `x·w1·w2` is built from the
/// activation `x·w1`), and a momentum buffer built from them would keep
/// every step's activations alive.
#[test]
fn optimizer_state_does_not_hold_the_graph() {
    let named = |v: Vec<Var>| {
        vec![ParamGroup::new(
            v.into_iter()
                .enumerate()
                .map(|(i, v)| (format!("w{i}"), v))
                .collect(),
        )]
    };
    let dev = Device::Cpu;
    let x = Tensor::new(&[[1.0f32, -2.0, 0.5], [0.3, 0.7, -1.1]], &dev).unwrap();
    type Make<'a> = Box<dyn Fn(Vec<Var>) -> Box<dyn Optimizer> + 'a>;
    let makes: Vec<(&str, Make)> = vec![
        (
            "sgd",
            Box::new(|v| {
                Box::new(
                    Sgd::new(
                        named(v),
                        SgdConfig::default().with_momentum(0.9).with_fused(false),
                    )
                    .unwrap(),
                )
            }),
        ),
        (
            "sgd fused",
            Box::new(|v| {
                Box::new(Sgd::new(named(v), SgdConfig::default().with_momentum(0.9)).unwrap())
            }),
        ),
        (
            "adam",
            Box::new(|v| {
                Box::new(Adam::new(named(v), AdamConfig::default().with_fused(false)).unwrap())
            }),
        ),
        (
            "rmsprop",
            Box::new(|v| {
                Box::new(
                    RmsProp::new(named(v), RmsPropConfig::default().with_momentum(0.9)).unwrap(),
                )
            }),
        ),
        (
            "lars",
            Box::new(|v| Box::new(Lars::new(named(v), LarsConfig::default()).unwrap())),
        ),
    ];
    for (name, make) in makes {
        let w1 = Var::from_tensor(
            &Tensor::new(&[[0.1f32, 0.2], [0.3, -0.4], [0.5, 0.6]], &dev).unwrap(),
        )
        .unwrap();
        let w2 = Var::from_tensor(&Tensor::new(&[[0.7f32], [-0.8]], &dev).unwrap()).unwrap();
        let mut opt = make(vec![w1.clone(), w2.clone()]);
        for _ in 0..2 {
            let loss = x
                .matmul(&w1)
                .unwrap()
                .matmul(&w2)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            assert!(
                grads.get(&w2).unwrap().track_op(),
                "premise: candle's gradient tracks"
            );
            opt.step(&grads).unwrap();
        }
        let state = opt.state_dict().unwrap();
        assert!(state.len() > 1, "{name}: no state");
        for (k, t) in &state {
            assert!(!t.track_op(), "{name}: state `{k}` references the graph");
        }
    }
}

/// `set_lr` refuses a bad rate and keeps the old one; candle_nn's setter,
/// which cannot fail, makes the next step fail instead, changing nothing.
fn refuses_bad_rates<O: optim::Optimizer + aimass::candle_nn::Optimizer>(
    name: &str,
    mut opt: O,
    pb: &Problem,
) {
    let before = pb.flat();
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.1] {
        let e = optim::Optimizer::set_lr(&mut opt, bad).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{name}: {e}");
        assert!(e.to_string().contains(&format!("{name}::set_lr")), "{e}");
        assert!(e.to_string().contains("it stays 0.05"), "{e}");
        assert_eq!(optim::Optimizer::lr(&opt), 0.05, "{name}");
    }
    aimass::candle_nn::Optimizer::set_learning_rate(&mut opt, f64::NAN);
    let e = optim::Optimizer::step(&mut opt, &pb.grads()).unwrap_err();
    assert!(
        e.to_string().contains(&format!("{name}::step")) && e.to_string().contains("NaN"),
        "{e}"
    );
    assert!(aimass::candle_nn::Optimizer::step(&mut opt, &pb.grads()).is_err());
    aimass::candle_nn::Optimizer::set_learning_rate(&mut opt, -1.0);
    assert!(optim::Optimizer::step(&mut opt, &pb.grads()).is_err());
    assert_eq!(
        pb.flat(),
        before,
        "{name}: a refused step changed the weights"
    );
    assert_eq!(optim::Optimizer::step_count(&opt), 0, "{name}");
    // A valid rate (0 included) lets it step again.
    optim::Optimizer::set_lr(&mut opt, 0.0).unwrap();
    optim::Optimizer::step(&mut opt, &pb.grads()).unwrap();
    assert_eq!(optim::Optimizer::step_count(&opt), 1, "{name}");
}

#[test]
fn bad_learning_rates_are_refused() {
    let f = fixtures();
    let pb = Problem::new(&f, DType::F64);
    let g = || pb.one_group();
    refuses_bad_rates(
        "Sgd",
        Sgd::new(g(), SgdConfig::default().with_lr(0.05).with_momentum(0.9)).unwrap(),
        &pb,
    );
    refuses_bad_rates(
        "Adam",
        Adam::new(g(), AdamConfig::default().with_lr(0.05)).unwrap(),
        &pb,
    );
    refuses_bad_rates(
        "AdamW",
        AdamW::new(g(), AdamWConfig::default().with_lr(0.05)).unwrap(),
        &pb,
    );
    refuses_bad_rates(
        "RmsProp",
        RmsProp::new(g(), RmsPropConfig::default().with_lr(0.05)).unwrap(),
        &pb,
    );
    refuses_bad_rates(
        "Lars",
        Lars::new(lars_groups(&pb), LarsConfig::default().with_lr(0.05)).unwrap(),
        &pb,
    );
}

/// tests/fixtures/schedule.json (gen_schedule.py).
fn schedule_fixtures() -> serde_json::Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schedule.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    serde_json::from_value(v.clone()).unwrap()
}

fn assert_lrs(what: &str, s: &dyn Schedule, want: &[f64]) {
    for (t, w) in want.iter().enumerate() {
        let got = s.lr(t as u64);
        assert!(
            (got - w).abs() <= 1e-12 * w.abs().max(1e-3),
            "{what} at step {t}: got {got}, torch {w}"
        );
    }
}

#[test]
fn warm_restarts_match_torch() {
    let f = schedule_fixtures();
    let cases = f["sgdr"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for c in cases {
        let (t_0, t_mult) = (c["t_0"].as_u64().unwrap(), c["t_mult"].as_u64().unwrap());
        let s = CosineAnnealingWarmRestarts::new(
            c["base_lr"].as_f64().unwrap(),
            t_0,
            t_mult,
            c["eta_min"].as_f64().unwrap(),
        )
        .unwrap();
        let want = f64s(&c["lrs"]);
        assert!(want.len() > 60);
        assert_lrs(&format!("SGDR t_0={t_0} t_mult={t_mult}"), &s, &want);
    }
    // Far-away steps: cycles of 1, 3, 9, ... restart at (3^n - 1) / 2.
    let s = CosineAnnealingWarmRestarts::new(0.1, 1, 3, 0.0).unwrap();
    assert_eq!(s.lr((3u64.pow(30) - 1) / 2), 0.1);
    assert!(s.lr(u64::MAX).is_finite());
    let e = CosineAnnealingWarmRestarts::new(0.1, 0, 1, 0.0).unwrap_err();
    assert_eq!(config_field(e), "CosineAnnealingWarmRestarts::t_0");
    let e = CosineAnnealingWarmRestarts::new(0.1, 5, 0, 0.0).unwrap_err();
    assert_eq!(config_field(e), "CosineAnnealingWarmRestarts::t_mult");
    let e = CosineAnnealingWarmRestarts::new(0.1, 5, 1, f64::NAN).unwrap_err();
    assert_eq!(config_field(e), "CosineAnnealingWarmRestarts::eta_min");
}

/// OneCycleLr refuses exactly the configs where torch raises (a phase of
/// zero length), and matches torch's rates at every step of the others.
#[test]
fn one_cycle_phase_boundaries_match_torch() {
    let f = schedule_fixtures();
    let grid = f["onecycle_grid"].as_array().unwrap();
    let mut refused = 0;
    for c in grid {
        let total = c["total_steps"].as_u64().unwrap();
        let pct = c["pct_start"].as_f64().unwrap();
        let three = c["three_phase"].as_bool().unwrap();
        let what = format!("OneCycle total_steps={total} pct_start={pct} three_phase={three}");
        let r = OneCycleLr::new(
            OneCycleConfig::new(0.1, total)
                .with_pct_start(pct)
                .with_three_phase(three)
                .with_cos_anneal(c["cos"].as_bool().unwrap()),
        );
        if c["raises"].as_bool().unwrap() {
            let e = r
                .err()
                .unwrap_or_else(|| panic!("{what}: accepted, torch raises"));
            assert!(e.to_string().contains("zero steps"), "{e}");
            assert_eq!(config_field(e), "OneCycleConfig::pct_start");
            refused += 1;
        } else {
            let s = r.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_lrs(&what, &s, &f64s(&c["lrs"]));
        }
    }
    assert_eq!((refused, grid.len()), (22, 480));
    // The case of the report: pct_start × total_steps = 1.
    let e = OneCycleLr::new(OneCycleConfig::new(0.1, 10).with_pct_start(0.1)).unwrap_err();
    assert!(e.to_string().contains("must not be 1"), "{e}");
}
