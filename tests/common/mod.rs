//! Finite-difference gradient checking shared by the test binaries.
#![allow(dead_code)]

use aimass::candle::{DType, Device, Tensor, Var};

/// A deterministic pseudo-random f64 tensor in [-1, 1) (no candle RNG, so
/// tests are reproducible).
pub fn randt(shape: &[usize], seed: u64) -> Tensor {
    use rand::Rng;
    let mut r = aimass::device::rng(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| r.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Checks the autograd gradient of a scalar function `f` at each input
/// against central finite differences (step `h`), to relative tolerance `tol`.
pub fn check_grad<F>(inputs: &[Tensor], f: F, h: f64, tol: f64)
where
    F: Fn(&[Tensor]) -> aimass::Result<Tensor>,
{
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let loss = f(&ts).unwrap();
    assert_eq!(loss.rank(), 0, "check_grad needs a scalar function");
    let grads = loss.backward().unwrap();
    for (i, var) in vars.iter().enumerate() {
        let analytic = values(
            &grads
                .get(var)
                .cloned()
                .unwrap_or_else(|| var.zeros_like().unwrap()),
        );
        let base = values(&inputs[i]);
        for (j, &a) in analytic.iter().enumerate() {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                let mut xs: Vec<Tensor> = inputs.to_vec();
                xs[i] = Tensor::from_vec(v, inputs[i].dims(), &Device::Cpu).unwrap();
                f(&xs).unwrap().to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(h) - eval(-h)) / (2.0 * h);
            let err = (a - numeric).abs() / (1.0 + numeric.abs().max(a.abs()));
            assert!(err < tol, "input {i} element {j}: autograd {a} vs finite difference {numeric} (rel err {err:e})");
        }
    }
}

/// Checks Hessian-vector products of a scalar `f` of one input: the gradient
/// of `sum(grad f(x) * v)` against `(grad f(x + h v) − grad f(x − h v)) / 2h`.
/// Needs `CANDLE_GRAD_DO_NOT_DETACH=1` in the environment of the thread.
pub fn check_hvp<F>(x: &Tensor, f: F, h: f64, tol: f64)
where
    F: Fn(&Tensor) -> aimass::Result<Tensor>,
{
    let v = randt(x.dims(), 991);
    let grad_at = |x: &Tensor| -> (Var, Tensor) {
        let var = Var::from_tensor(x).unwrap();
        let loss = f(var.as_tensor()).unwrap();
        let g = loss.backward().unwrap().get(&var).cloned().unwrap();
        (var, g)
    };
    let (var, g) = grad_at(x);
    let gv = (g * &v).unwrap().sum_all().unwrap();
    let hv = gv
        .backward()
        .unwrap()
        .get(&var)
        .cloned()
        .expect("no second-order gradient: is CANDLE_GRAD_DO_NOT_DETACH set?");
    let plus = grad_at(&(x + (&v * h).unwrap()).unwrap()).1;
    let minus = grad_at(&(x - (&v * h).unwrap()).unwrap()).1;
    let numeric = values(&((plus - minus).unwrap() / (2.0 * h)).unwrap());
    for (j, (a, n)) in values(&hv).iter().zip(numeric.iter()).enumerate() {
        let err = (a - n).abs() / (1.0 + n.abs().max(a.abs()));
        assert!(
            err < tol,
            "element {j}: Hessian-vector {a} vs finite difference {n} (rel err {err:e})"
        );
    }
}

/// Reads a PyTorch fixture of `tests/fixtures/` and dequantises its weights
/// (see gen_nn.py: a `u8` tensor `name` with an f32 `name.__scale` stands
/// for `(q - 128) · scale`).
pub fn read_fixture(name: &str) -> std::collections::HashMap<String, Tensor> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let raw = aimass::candle::safetensors::load(path, &Device::Cpu).unwrap();
    let mut out = std::collections::HashMap::new();
    for (k, t) in &raw {
        if k.ends_with(".__scale") {
            continue;
        }
        let t = if t.dtype() == DType::U8 {
            let s = raw[&format!("{k}.__scale")].to_vec1::<f32>().unwrap()[0];
            let q: Vec<f32> = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| (v - 128.0) * s)
                .collect();
            Tensor::from_vec(q, t.shape(), &Device::Cpu).unwrap()
        } else {
            t.clone()
        };
        out.insert(k.clone(), t);
    }
    out
}
