//! Second order off: asking for a graph-keeping gradient fails fast instead
//! of silently returning first-order gradients. One test, in its own
//! process, because turning second order on changes the process
//! environment.

use aimass::autograd::{enable_second_order, require_second_order, second_order_enabled};
use aimass::candle::{DType, Device, Tensor, Var};
use aimass::candle_nn::VarMap;
use aimass::nn::{init::seeded_var_builder, Activation, Mlp, MlpConfig, ParamMap};

#[test]
fn second_order_off_is_an_error_and_on_is_per_thread() {
    std::env::remove_var(aimass::autograd::SECOND_ORDER_ENV_VAR);
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let build = |vb| {
        Mlp::new(
            MlpConfig::new(vec![2, 3, 1]).with_activation(Activation::Tanh),
            vb,
        )
    };
    let net = build(seeded_var_builder(&varmap, 0, DType::F64, &dev)).unwrap();
    let x = Tensor::new(&[[0.5f64, -1.0]], &dev).unwrap();
    let loss = net
        .forward_t(&x, true)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let theta = ParamMap::from_varmap(&varmap).unwrap();

    // Asking does not fix the thread's setting.
    assert!(!second_order_enabled());
    let e = theta.grad(&loss, true).unwrap_err().to_string();
    assert!(e.contains("enable_second_order"), "{e}");
    assert!(require_second_order("MAML").is_err());
    // First order is always available.
    assert_eq!(theta.grad(&loss, false).unwrap().len(), 4);

    // This thread has now run a backward pass with the setting off: enabling
    // it later cannot take effect here, and says so.
    let e = enable_second_order().unwrap_err().to_string();
    assert!(e.contains("before any backward pass"), "{e}");
    assert!(!second_order_enabled());

    // A new thread picks it up (the variable is now set).
    std::thread::spawn(|| {
        assert!(second_order_enabled());
        enable_second_order().unwrap();
        let v = Var::new(2f64, &Device::Cpu).unwrap();
        let t = v.as_tensor();
        let g = (t * t).unwrap().mul(t).unwrap().backward().unwrap();
        let g = g.get(&v).unwrap().clone();
        let h = g
            .backward()
            .unwrap()
            .get(&v)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (h - 12.0).abs() < 1e-12,
            "d²(x·x·x)/dx² at 2 = {h} (8 when detached)"
        );
    })
    .join()
    .unwrap();
}
