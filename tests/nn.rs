#![allow(clippy::needless_range_loop)]
//! Tests of aimass::nn against hand-computed values, torchvision's parameter
//! counts and PyTorch fixtures (tests/fixtures/gen_nn.py).

mod common;

use std::collections::HashMap;

use aimass::candle::{DType, Device, Tensor, Var};
use aimass::candle_nn::{Optimizer, VarMap, SGD};
use aimass::nn::init::{seeded_var_builder, SeededBackend};
use aimass::nn::params::{self, Frozen, ParamKind};
use aimass::nn::*;
use common::read_fixture;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");

fn cpu() -> Device {
    Device::Cpu
}

fn vec1(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    vec1(a)
        .iter()
        .zip(vec1(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

// ------------------------------------------------------------------ BatchNorm

#[test]
fn batch_norm_train_and_eval_match_hand_computed_values() {
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 0, DType::F32, &cpu());
    let bn = BatchNorm::new(2, BatchNormConfig::default(), vb.pp("bn")).unwrap();
    // Channel 0: 1, 2, 3, 6 (mean 3, biased var 3.5, unbiased 14/3).
    // Channel 1: 0, 0, 4, 4 (mean 2, biased var 4, unbiased 16/3).
    let x = Tensor::new(&[[1f32, 0.], [2., 0.], [3., 4.], [6., 4.]], &cpu()).unwrap();
    let y = bn.forward_t(&x, true).unwrap().to_vec2::<f32>().unwrap();
    let eps = 1e-5f64;
    let exp0: Vec<f64> = [1., 2., 3., 6.]
        .iter()
        .map(|v| (v - 3.) / (3.5 + eps).sqrt())
        .collect();
    let exp1: Vec<f64> = [0., 0., 4., 4.]
        .iter()
        .map(|v| (v - 2.) / (4. + eps).sqrt())
        .collect();
    for i in 0..4 {
        assert!((y[i][0] as f64 - exp0[i]).abs() < 1e-5, "{y:?}");
        assert!((y[i][1] as f64 - exp1[i]).abs() < 1e-5, "{y:?}");
    }
    // Running statistics: momentum 0.1, unbiased variance.
    let rm = vec1(bn.running_mean().unwrap());
    let rv = vec1(bn.running_var().unwrap());
    let exp_rm = [0.1 * 3.0, 0.1 * 2.0];
    let exp_rv = [0.9 + 0.1 * 14.0 / 3.0, 0.9 + 0.1 * 16.0 / 3.0];
    for c in 0..2 {
        assert!((rm[c] as f64 - exp_rm[c]).abs() < 1e-6, "{rm:?}");
        assert!((rv[c] as f64 - exp_rv[c]).abs() < 1e-6, "{rv:?}");
    }
    // The VarMap holds the same (updated) running statistics.
    let stored = vm.data().lock().unwrap()["bn.running_mean"]
        .as_tensor()
        .clone();
    assert_eq!(vec1(&stored), rm);

    // Eval mode: running statistics, and nothing changes.
    let ye = bn.forward_t(&x, false).unwrap().to_vec2::<f32>().unwrap();
    for i in 0..4 {
        let xi = x.to_vec2::<f32>().unwrap()[i].clone();
        for c in 0..2 {
            let e = (xi[c] as f64 - exp_rm[c]) / (exp_rv[c] + eps).sqrt();
            assert!((ye[i][c] as f64 - e).abs() < 1e-5);
        }
    }
    assert_eq!(vec1(bn.running_mean().unwrap()), rm);
    assert_eq!(vec1(bn.running_var().unwrap()), rv);
}

#[test]
fn batch_norm_2d_uses_batch_and_spatial_statistics_and_rejects_single_values() {
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 0, DType::F32, &cpu());
    let bn = BatchNorm::new(1, BatchNormConfig::default().with_momentum(0.5), vb).unwrap();
    // One channel, values 0..8 over (N=2, H=2, W=2): mean 3.5, biased var 5.25, unbiased 6.
    let x = Tensor::arange(0f32, 8., &cpu())
        .unwrap()
        .reshape((2, 1, 2, 2))
        .unwrap();
    let y = vec1(&bn.forward_t(&x, true).unwrap());
    for (i, v) in y.iter().enumerate() {
        let e = (i as f64 - 3.5) / (5.25f64 + 1e-5).sqrt();
        assert!((*v as f64 - e).abs() < 1e-5);
    }
    assert!((vec1(bn.running_mean().unwrap())[0] - 1.75).abs() < 1e-6);
    assert!((vec1(bn.running_var().unwrap())[0] - 3.5).abs() < 1e-6);
    // One value per channel in train mode is an error (torch raises too).
    let one = Tensor::ones((1, 1), DType::F32, &cpu()).unwrap();
    let vm = VarMap::new();
    let bn1 = BatchNorm::new(
        1,
        BatchNormConfig::default(),
        seeded_var_builder(&vm, 0, DType::F32, &cpu()),
    )
    .unwrap();
    assert!(matches!(
        bn1.forward_t(&one, true),
        Err(aimass::Error::Shape { .. })
    ));
    assert!(bn1.forward_t(&one, false).is_ok());
    assert!(matches!(
        BatchNorm::new(
            1,
            BatchNormConfig::default().with_momentum(1.5),
            seeded_var_builder(&VarMap::new(), 0, DType::F32, &cpu())
        ),
        Err(aimass::Error::Config { .. })
    ));
}

#[test]
fn batch_norm_add_relu_matches_plain_ops_and_updates_running_statistics() {
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 0, DType::F32, &cpu());
    let bn = BatchNorm::new(3, BatchNormConfig::default(), vb.pp("bn")).unwrap();
    let w = Tensor::new(&[0.5f32, -1.5, 2.0], &cpu()).unwrap();
    let b = Tensor::new(&[0.1f32, 0.3, -0.2], &cpu()).unwrap();
    {
        let data = vm.data().lock().unwrap();
        data["bn.weight"].set(&w).unwrap();
        data["bn.bias"].set(&b).unwrap();
    }
    let wave = |scale: f64, shift: f64| {
        Tensor::arange(0f32, 96., &cpu())
            .unwrap()
            .reshape((4, 3, 2, 4))
            .unwrap()
            .affine(scale, shift)
            .unwrap()
            .sin()
            .unwrap()
    };
    let x = (wave(0.37, 0.0) * 2.0).unwrap().affine(1.0, 1.0).unwrap();
    let s = wave(0.91, 0.5);
    let c = |t: &Tensor| t.reshape((1, 3, 1, 1)).unwrap();
    // y = relu((x - mean) / sqrt(var + eps) * w + b + s), with plain candle ops.
    let reference = |mean: &Tensor, var: &Tensor| {
        x.broadcast_sub(&c(mean))
            .unwrap()
            .broadcast_div(&(c(var) + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&c(&w))
            .unwrap()
            .broadcast_add(&c(&b))
            .unwrap()
            .add(&s)
            .unwrap()
            .relu()
            .unwrap()
    };
    let mean = x.mean_keepdim(0).unwrap().mean_keepdim(2).unwrap();
    let mean = mean.mean_keepdim(3).unwrap().flatten_all().unwrap();
    let var = x.broadcast_sub(&c(&mean)).unwrap().sqr().unwrap();
    let var = var.mean_keepdim(0).unwrap().mean_keepdim(2).unwrap();
    let var = var.mean_keepdim(3).unwrap().flatten_all().unwrap();

    let y = bn.forward_add_relu_t(&x, &s, true).unwrap();
    assert!(max_abs_diff(&y, &reference(&mean, &var)) < 1e-5);
    // Running statistics: momentum 0.1, unbiased variance (32 values per channel).
    let rm = bn.running_mean().unwrap().clone();
    let rv = bn.running_var().unwrap().clone();
    assert!(max_abs_diff(&rm, &(&mean * 0.1).unwrap()) < 1e-6);
    let want_rv = ((&var * (0.1 * 32.0 / 31.0)).unwrap() + 0.9).unwrap();
    assert!(max_abs_diff(&rv, &want_rv) < 1e-6);

    // Eval mode: the running statistics, and nothing changes.
    let ye = bn.forward_add_relu_t(&x, &s, false).unwrap();
    assert!(max_abs_diff(&ye, &reference(&rm, &rv)) < 1e-5);
    assert_eq!(vec1(bn.running_mean().unwrap()), vec1(&rm));
    assert_eq!(vec1(bn.running_var().unwrap()), vec1(&rv));

    // The shortcut must have the input's shape.
    for train in [true, false] {
        let short = s.narrow(0, 0, 2).unwrap();
        assert!(matches!(
            bn.forward_add_relu_t(&x, &short, train),
            Err(aimass::Error::Shape { .. })
        ));
    }
}

// ------------------------------------------------------------------ counts and shapes

fn count(cfg: ResNetConfig) -> usize {
    let vm = VarMap::new();
    ResNet::new(cfg, seeded_var_builder(&vm, 0, DType::F32, &cpu())).unwrap();
    params::num_params(&vm).unwrap()
}

#[test]
fn parameter_counts_equal_torchvision_and_the_reference_protocols() {
    // torchvision: sum(p.numel() for p in resnetXX().parameters())
    assert_eq!(count(ResNetConfig::resnet18()), 11_689_512);
    assert_eq!(count(ResNetConfig::resnet34()), 21_797_672);
    assert_eq!(count(ResNetConfig::resnet50()), 25_557_032);
    // The reference protocols' resnet-tiny / resnet-small (docs/benchmarks.md, "Protocols")
    assert_eq!(count(ResNetConfig::resnet_tiny()), 174_320);
    assert_eq!(count(ResNetConfig::resnet_small()), 694_752);
    // The reference protocols' ConvNet
    let vm = VarMap::new();
    ConvNet::new(
        ConvNetConfig::default(),
        seeded_var_builder(&vm, 0, DType::F32, &cpu()),
    )
    .unwrap();
    assert_eq!(params::num_params(&vm).unwrap(), 421_642);
}

#[test]
fn resnet_names_follow_torchvision() {
    let vm = VarMap::new();
    resnet50(Some(1000), seeded_var_builder(&vm, 0, DType::F32, &cpu())).unwrap();
    let names: Vec<String> = params::named_vars(&vm)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for n in [
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv3.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_var",
        "layer4.2.bn3.bias",
        "fc.weight",
        "fc.bias",
    ] {
        assert!(names.iter().any(|x| x == n), "missing {n}");
    }
    // torchvision resnet50 state_dict has 320 entries of which 53 are num_batches_tracked.
    assert_eq!(names.len(), 320 - 53);
}

#[test]
fn output_shapes_for_28_32_and_224_inputs() {
    let dev = cpu();
    // 28x28x1, small stem, classifier.
    let vm = VarMap::new();
    let cfg = ResNetConfig::resnet_tiny().with_num_classes(Some(10));
    let net = ResNet::new(cfg, seeded_var_builder(&vm, 0, DType::F32, &dev)).unwrap();
    let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &dev).unwrap();
    assert_eq!(net.forward_t(&x, true).unwrap().dims(), &[2, 10]);
    assert_eq!(net.features(&x, false).unwrap().dims(), &[2, 64]);
    let f = net.forward_features(&x, false).unwrap();
    assert_eq!(
        f.names(),
        vec!["stem", "layer1", "layer2", "layer3", "pool", "logits"]
    );
    assert_eq!(net.feature_names(), f.names());
    assert_eq!(f.require("stem").unwrap().dims(), &[2, 16, 28, 28]);
    assert_eq!(f.require("layer2").unwrap().dims(), &[2, 32, 14, 14]);
    assert_eq!(f.require("layer3").unwrap().dims(), &[2, 64, 7, 7]);
    assert!(f.require("layer4").is_err());
    // The recorded last stage is the normal forward.
    assert_eq!(
        max_abs_diff(f.last().unwrap(), &net.forward_t(&x, false).unwrap()),
        0.0
    );

    // 32x32x3, small stem, ResNet-18 stages.
    let vm = VarMap::new();
    let cfg = ResNetConfig::resnet18()
        .with_stem(Stem::Small)
        .with_num_classes(Some(10))
        .with_widths([8, 16, 32, 64]);
    let net = ResNet::new(cfg, seeded_var_builder(&vm, 0, DType::F32, &dev)).unwrap();
    let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &dev).unwrap();
    let f = net.forward_features(&x, false).unwrap();
    assert_eq!(f.require("layer4").unwrap().dims(), &[2, 64, 4, 4]);
    assert_eq!(f.require("logits").unwrap().dims(), &[2, 10]);

    // 224x224x3, torchvision resnet18 layout (ImageNet stem).
    let vm = VarMap::new();
    let net = resnet18(Some(1000), seeded_var_builder(&vm, 0, DType::F32, &dev)).unwrap();
    let x = Tensor::zeros((1, 3, 224, 224), DType::F32, &dev).unwrap();
    let f = net.forward_features(&x, false).unwrap();
    assert_eq!(f.require("stem").unwrap().dims(), &[1, 64, 56, 56]);
    assert_eq!(f.require("layer4").unwrap().dims(), &[1, 512, 7, 7]);
    assert_eq!(f.require("logits").unwrap().dims(), &[1, 1000]);

    // Wrong channel count is a shape error, not a panic.
    let bad = Tensor::zeros((1, 1, 224, 224), DType::F32, &dev).unwrap();
    assert!(matches!(
        net.forward_t(&bad, false),
        Err(aimass::Error::Shape { .. })
    ));
}

/// The `field` of an `Error::Config`, or a panic naming what came instead.
fn config_field<T>(r: aimass::Result<T>) -> String {
    match r {
        Err(aimass::Error::Config { field, .. }) => field,
        Err(e) => panic!("expected a config error, got {e}"),
        Ok(_) => panic!("expected a config error, got Ok"),
    }
}

#[test]
fn conv_and_convnet_configs_reject_zero_sizes_naming_the_field() {
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 0, DType::F32, &cpu());
    for (cfg, field) in [
        (
            Conv2dConfig::default().with_stride(0),
            "Conv2dConfig::stride",
        ),
        (
            Conv2dConfig::default().with_dilation(0),
            "Conv2dConfig::dilation",
        ),
        (
            Conv2dConfig::default().with_groups(0),
            "Conv2dConfig::groups",
        ),
        (
            Conv2dConfig::default().with_groups(3),
            "Conv2dConfig::groups",
        ),
    ] {
        assert_eq!(config_field(Conv2d::new(4, 4, 3, cfg, vb.pp("c"))), field);
    }
    let d = ConvNetConfig::default;
    for (cfg, field) in [
        (d().with_image_size(3), "ConvNetConfig::image_size"),
        (d().with_in_channels(0), "ConvNetConfig::in_channels"),
        (d().with_channels((0, 8)), "ConvNetConfig::channels.0"),
        (d().with_channels((8, 0)), "ConvNetConfig::channels.1"),
        (d().with_hidden(0), "ConvNetConfig::hidden"),
        (d().with_num_classes(0), "ConvNetConfig::num_classes"),
    ] {
        assert_eq!(config_field(ConvNet::new(cfg, vb.pp("n"))), field);
    }
}

#[test]
fn convnet_mlp_and_heads_shapes_and_names() {
    let dev = cpu();
    let vm = VarMap::new();
    let net = ConvNet::new(
        ConvNetConfig::default(),
        seeded_var_builder(&vm, 0, DType::F32, &dev),
    )
    .unwrap();
    let x = Tensor::zeros((3, 1, 28, 28), DType::F32, &dev).unwrap();
    assert_eq!(net.forward_t(&x, true).unwrap().dims(), &[3, 10]);
    let f = net.forward_features(&x, false).unwrap();
    assert_eq!(f.require("conv2").unwrap().dims(), &[3, 64, 7, 7]);
    assert_eq!(f.require("fc1").unwrap().dims(), &[3, 128]);

    // Mlp names follow the torch.nn.Sequential indices (activations and dropout count).
    let vm = VarMap::new();
    let cfg = MlpConfig::new([4, 8, 8, 2])
        .with_batch_norm(true)
        .with_dropout(0.5);
    let mlp = Mlp::new(cfg, seeded_var_builder(&vm, 0, DType::F32, &dev)).unwrap();
    let names: Vec<String> = params::named_vars(&vm)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        [
            "0.bias",
            "0.weight",
            "1.bias",
            "1.running_mean",
            "1.running_var",
            "1.weight",
            "4.bias",
            "4.weight",
            "5.bias",
            "5.running_mean",
            "5.running_var",
            "5.weight",
            "8.bias",
            "8.weight"
        ]
    );
    let x = Tensor::ones((5, 4), DType::F32, &dev).unwrap();
    assert_eq!(mlp.forward_t(&x, true).unwrap().dims(), &[5, 2]);
    let f = mlp.forward_features(&x, false).unwrap();
    assert_eq!(f.names(), vec!["hidden1", "hidden2", "output"]);

    // Heads: Linear-BN-ReLU-Linear.
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 0, DType::F32, &dev);
    let p = ProjectionHead::new(
        HeadConfig::byol_projector()
            .with_input_dim(16)
            .with_hidden_dim(32)
            .with_output_dim(8),
        vb.pp("proj"),
    )
    .unwrap();
    let q = ProjectionHead::new(
        HeadConfig::byol_predictor()
            .with_input_dim(8)
            .with_hidden_dim(32)
            .with_output_dim(8),
        vb.pp("pred"),
    )
    .unwrap();
    let s = ProjectionHead::new(
        HeadConfig::simsiam_projector()
            .with_input_dim(16)
            .with_hidden_dim(32)
            .with_output_dim(8),
        vb.pp("ss"),
    )
    .unwrap();
    let x = Tensor::ones((4, 16), DType::F32, &dev).unwrap();
    let z = p.forward_t(&x, true).unwrap();
    assert_eq!(q.forward_t(&z, true).unwrap().dims(), &[4, 8]);
    assert_eq!(s.forward_t(&x, true).unwrap().dims(), &[4, 8]);
    let names: Vec<String> = params::named_vars(&vm)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(
        names.contains(&"proj.3.weight".to_string())
            && names.contains(&"proj.1.running_var".to_string())
    );
    // SimSiam's last BN has no affine parameters but has running statistics.
    assert!(
        names.contains(&"ss.7.running_mean".to_string())
            && !names.contains(&"ss.7.weight".to_string())
    );
    assert!(matches!(
        ProjectionHead::new(HeadConfig::simclr().with_num_layers(0), vb.pp("bad")),
        Err(aimass::Error::Config { .. })
    ));
}

#[test]
fn dropout_is_seeded_and_identity_in_eval() {
    let x = Tensor::ones((1000,), DType::F32, &cpu()).unwrap();
    let cfg = DropoutConfig::default().with_p(0.25).with_seed(3);
    let d = Dropout::new(cfg.clone()).unwrap();
    assert_eq!(vec1(&d.forward_t(&x, false).unwrap()), vec1(&x));
    let y = vec1(&d.forward_t(&x, true).unwrap());
    let zeros = y.iter().filter(|v| **v == 0.0).count();
    assert!((200..300).contains(&zeros), "{zeros}");
    assert!(y
        .iter()
        .all(|v| *v == 0.0 || (*v - 1.0 / 0.75).abs() < 1e-6));
    let y2 = vec1(&Dropout::new(cfg).unwrap().forward_t(&x, true).unwrap());
    assert_eq!(y, y2);
    assert!(matches!(
        Dropout::new(DropoutConfig::default().with_p(1.0)),
        Err(aimass::Error::Config { .. })
    ));
    assert!(Dropout::new(DropoutConfig::default().with_p(-0.1)).is_err());
    assert!(Dropout::new(DropoutConfig::default().with_p(f64::NAN)).is_err());
}

/// Masks are a function of (seed, step, call within the step): a layer
/// rebuilt every step (functional parameters) or after a resume draws the
/// masks of an uninterrupted run, and consecutive steps differ. The old
/// layer kept one generator per instance, so a rebuilt layer replayed its
/// first mask every step.
#[test]
fn dropout_masks_follow_the_step_not_the_instance() {
    let x = Tensor::ones((64,), DType::F64, &cpu()).unwrap();
    let cfg = DropoutConfig::default().with_p(0.5).with_seed(11);
    let mask = |d: &Dropout, step: u64| {
        let _scope = StepScope::enter(step);
        vec1(&d.forward_t(&x, true).unwrap())
    };
    // One layer over steps 0..4, two calls per step (two views).
    let long = Dropout::new(cfg.clone()).unwrap();
    let mut run = Vec::new();
    for step in 0..4 {
        let _scope = StepScope::enter(step);
        let a = vec1(&long.forward_t(&x, true).unwrap());
        let b = vec1(&long.forward_t(&x, true).unwrap());
        assert_ne!(a, b, "two calls in one step must draw two masks");
        run.push((a, b));
    }
    assert_ne!(run[0].0, run[1].0, "consecutive steps must differ");
    // A fresh layer (a rebuild, or a resumed run) at step 2 draws step 2's masks.
    let fresh = Dropout::new(cfg.clone()).unwrap();
    assert_eq!(mask(&fresh, 2), run[2].0);
    {
        let _scope = StepScope::enter(2);
        assert_eq!(vec1(&fresh.forward_t(&x, true).unwrap()), run[2].1);
    }
    // Another seed, other masks; scopes nest and restore.
    assert_ne!(mask(&Dropout::new(cfg.with_seed(12)).unwrap(), 2), run[2].0);
    assert_eq!(StepScope::current(), None);
    {
        let _outer = StepScope::enter(5);
        {
            let _inner = StepScope::enter(6);
            assert_eq!(StepScope::current(), Some(6));
        }
        assert_eq!(StepScope::current(), Some(5));
    }
    assert_eq!(StepScope::current(), None);
}

// ------------------------------------------------------------------ init

#[test]
fn seeded_init_is_reproducible_and_matches_torch_defaults() {
    let dev = cpu();
    let make = |seed| {
        let vm = VarMap::new();
        resnet_tiny(seeded_var_builder(&vm, seed, DType::F32, &dev)).unwrap();
        vm
    };
    let (a, b, c) = (make(5), make(5), make(6));
    let get = |vm: &VarMap, n: &str| vec1(vm.data().lock().unwrap()[n].as_tensor());
    for n in [
        "conv1.weight",
        "layer3.1.conv2.weight",
        "layer2.0.downsample.0.weight",
    ] {
        assert_eq!(get(&a, n), get(&b, n));
        assert_ne!(get(&a, n), get(&c, n));
    }
    // kaiming_uniform(a=sqrt 5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)); layer3 conv2 fan_in = 64*9.
    let w = get(&a, "layer3.1.conv2.weight");
    let bound = 1.0 / (64.0f32 * 9.0).sqrt();
    assert!(w.iter().all(|v| v.abs() <= bound));
    let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(max > 0.99 * bound);
    let mean = w.iter().sum::<f32>() / w.len() as f32;
    let var = w.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / w.len() as f32;
    assert!(
        (var / (bound * bound / 3.0) - 1.0).abs() < 0.05,
        "variance {var}"
    );
    assert!(get(&a, "bn1.weight").iter().all(|v| *v == 1.0));
    assert!(get(&a, "bn1.bias").iter().all(|v| *v == 0.0));
    assert!(get(&a, "bn1.running_var").iter().all(|v| *v == 1.0));
    // Linear bias: U(-1/sqrt(in), 1/sqrt(in)).
    let vm = VarMap::new();
    Linear::new(
        100,
        50,
        true,
        seeded_var_builder(&vm, 0, DType::F32, &dev).pp("fc"),
    )
    .unwrap();
    let bias = get(&vm, "fc.bias");
    assert!(bias.iter().all(|v| v.abs() <= 0.1) && bias.iter().any(|v| v.abs() > 0.05));
}

// ------------------------------------------------------------------ params

#[test]
fn classification_of_parameters_and_buffers() {
    assert!(params::is_buffer("layer1.0.bn1.running_mean"));
    assert!(params::is_buffer("bn1.num_batches_tracked"));
    assert!(!params::is_buffer("bn1.weight"));
    assert!(params::is_no_decay("fc.bias", &[10]));
    assert!(params::is_no_decay("bn1.weight", &[64]));
    assert!(!params::is_no_decay("fc.weight", &[10, 64]));
    assert!(!params::is_no_decay("bn1.running_var", &[64]));
    assert_eq!(
        params::classify("conv1.weight", &[16, 1, 3, 3]),
        ParamKind::Weight
    );
    assert_eq!(
        params::classify("bn1.running_var", &[16]),
        ParamKind::Buffer
    );

    let vm = VarMap::new();
    resnet_tiny(seeded_var_builder(&vm, 0, DType::F32, &cpu())).unwrap();
    let all = params::named_vars(&vm).unwrap();
    let trainable = params::trainable_vars(&vm, &Frozen::none()).unwrap();
    let buffers = params::buffer_vars(&vm).unwrap();
    assert_eq!(trainable.len() + buffers.len(), all.len());
    assert_eq!(buffers.len(), 2 * 15); // 15 BatchNorms (stem, 12 in blocks, 2 downsample)
    let (decay, no_decay) = params::split_decay(&vm, &Frozen::none()).unwrap();
    assert_eq!(decay.len(), 15); // 15 convolutions
    assert_eq!(no_decay.len(), 2 * 15);
    assert!(decay.iter().all(|(n, _)| n.ends_with("weight")));
}

#[test]
fn deep_copy_does_not_share_storage() {
    let vm = VarMap::new();
    Linear::new(
        3,
        2,
        true,
        seeded_var_builder(&vm, 0, DType::F32, &cpu()).pp("fc"),
    )
    .unwrap();
    let copy = params::deep_copy(&vm).unwrap();
    let shallow = vm.clone();
    let before = vec1(copy.data().lock().unwrap()["fc.weight"].as_tensor());
    vm.data().lock().unwrap()["fc.weight"]
        .set(&Tensor::zeros((2, 3), DType::F32, &cpu()).unwrap())
        .unwrap();
    assert_eq!(
        vec1(copy.data().lock().unwrap()["fc.weight"].as_tensor()),
        before
    );
    assert_eq!(
        vec1(shallow.data().lock().unwrap()["fc.weight"].as_tensor()),
        vec![0.0; 6]
    );
    params::copy_into(&vm, &copy).unwrap();
    assert_eq!(
        vec1(copy.data().lock().unwrap()["fc.weight"].as_tensor()),
        vec![0.0; 6]
    );
}

#[test]
fn save_then_load_gives_identical_outputs_and_clear_errors() {
    let dev = cpu();
    let dir = std::env::temp_dir().join(format!("aimass_nn_test_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.safetensors");
    let cfg = ResNetConfig::resnet_tiny().with_num_classes(Some(10));
    let x = Tensor::arange(0f32, 2. * 28. * 28., &dev)
        .unwrap()
        .reshape((2, 1, 28, 28))
        .unwrap()
        .affine(1e-3, -0.5)
        .unwrap();

    let vm = VarMap::new();
    let net = ResNet::new(cfg.clone(), seeded_var_builder(&vm, 1, DType::F32, &dev)).unwrap();
    net.forward_t(&x, true).unwrap(); // move the running statistics away from 0/1
    let y = net.forward_t(&x, false).unwrap();
    params::save(&vm, &path).unwrap();

    let vm2 = VarMap::new();
    let net2 = ResNet::new(cfg.clone(), seeded_var_builder(&vm2, 2, DType::F32, &dev)).unwrap();
    assert!(max_abs_diff(&net2.forward_t(&x, false).unwrap(), &y) > 0.0);
    params::load(&vm2, &path).unwrap();
    assert_eq!(max_abs_diff(&net2.forward_t(&x, false).unwrap(), &y), 0.0);

    // A different architecture: the error names what is missing / unexpected / mis-shaped.
    let vm3 = VarMap::new();
    let other = ResNetConfig::resnet_tiny()
        .with_num_classes(Some(5))
        .with_layers([2, 2, 3]);
    ResNet::new(other, seeded_var_builder(&vm3, 0, DType::F32, &dev)).unwrap();
    let before = vec1(vm3.data().lock().unwrap()["conv1.weight"].as_tensor());
    let msg = params::load(&vm3, &path).unwrap_err().to_string();
    assert!(msg.contains("missing: layer3.2."), "{msg}");
    assert!(
        msg.contains("mis-shaped: fc.bias (model [5], file [10])"),
        "{msg}"
    );
    let vm4 = VarMap::new();
    ResNet::new(
        ResNetConfig::resnet_tiny(),
        seeded_var_builder(&vm4, 0, DType::F32, &dev),
    )
    .unwrap();
    let msg = params::load(&vm4, &path).unwrap_err().to_string();
    assert!(msg.contains("unexpected: fc.bias, fc.weight"), "{msg}");
    // Nothing was changed by the failed load.
    assert_eq!(
        vec1(vm3.data().lock().unwrap()["conv1.weight"].as_tensor()),
        before
    );
    // A missing file is an I/O error naming it.
    let e = params::load(&vm4, dir.join("nope.safetensors")).unwrap_err();
    assert!(matches!(e, aimass::Error::Io { .. }) && e.to_string().contains("nope.safetensors"));
    std::fs::remove_dir_all(&dir).ok();
}

// ------------------------------------------------------------------ freezing

#[test]
fn frozen_parameters_get_no_gradient_and_stay_bit_identical() {
    let dev = cpu();
    let vm = VarMap::new();
    let frozen = Frozen::prefixes(["conv1", "bn1", "layer1"]);
    let vb = SeededBackend::new(&vm, 0)
        .with_frozen(frozen.clone())
        .into_var_builder(DType::F32, &dev);
    let net = ResNet::new(
        ResNetConfig::resnet_tiny()
            .with_num_classes(Some(3))
            .with_layers([1, 1, 1]),
        vb,
    )
    .unwrap();
    let all = params::named_vars(&vm).unwrap();
    let snapshot: HashMap<String, Vec<f32>> = all
        .iter()
        .map(|(n, v)| (n.clone(), vec1(v.as_tensor())))
        .collect();
    let trainable = params::trainable_vars(&vm, &frozen).unwrap();
    assert!(trainable
        .iter()
        .all(|(n, _)| !frozen.contains(n) && !params::is_buffer(n)));
    assert!(trainable.iter().any(|(n, _)| n == "layer2.0.conv1.weight"));
    let vars: Vec<Var> = trainable.iter().map(|(_, v)| v.clone()).collect();
    let mut sgd = SGD::new(vars, 0.1).unwrap();
    let x = Tensor::arange(0f32, 4. * 12. * 12., &dev)
        .unwrap()
        .reshape((4, 1, 12, 12))
        .unwrap()
        .sin()
        .unwrap();
    let target = Tensor::new(&[0u32, 1, 2, 0], &dev).unwrap();
    for _ in 0..3 {
        let logits = net.forward_t(&x, true).unwrap();
        let loss = aimass::candle_nn::loss::cross_entropy(&logits, &target).unwrap();
        let grads = loss.backward().unwrap();
        // No gradient flows into frozen parameters.
        for (n, v) in &all {
            if frozen.contains(n) {
                assert!(grads.get(v.as_tensor()).is_none(), "{n} got a gradient");
            }
        }
        assert!(grads.get(trainable[0].1.as_tensor()).is_some());
        sgd.step(&grads).unwrap();
    }
    for (n, v) in &all {
        let now = vec1(v.as_tensor());
        if frozen.contains(n) && !params::is_buffer(n) {
            assert_eq!(now, snapshot[n], "{n} changed");
        }
    }
    assert_ne!(
        vec1(vm.data().lock().unwrap()["layer2.0.conv1.weight"].as_tensor()),
        snapshot["layer2.0.conv1.weight"]
    );
    // Running statistics of frozen BatchNorms still follow train mode, as in torch.
    assert_ne!(
        vec1(vm.data().lock().unwrap()["bn1.running_mean"].as_tensor()),
        snapshot["bn1.running_mean"]
    );
}

// ------------------------------------------------------------------ PyTorch fixtures

fn check_resnet_fixture(file: &str, cfg: ResNetConfig) {
    let fx = read_fixture(file);
    let mut weights = fx.clone();
    let io_keys: Vec<String> = fx
        .keys()
        .filter(|k| {
            ["input", "out_", "pool_", "after_train"]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .cloned()
        .collect();
    for k in &io_keys {
        weights.remove(k);
    }
    assert!(weights.keys().any(|k| k.ends_with("num_batches_tracked")));
    let vm = VarMap::new();
    let net = ResNet::new(cfg, seeded_var_builder(&vm, 0, DType::F32, &cpu())).unwrap();
    params::load_tensors(&vm, &weights, file).unwrap();
    let x = &fx["input"];
    let y = net.forward_t(x, false).unwrap();
    let d = max_abs_diff(&y, &fx["out_eval"]);
    assert!(d < 1e-4, "{file}: eval output differs by {d}");
    if let Some(p) = fx.get("pool_eval") {
        let d = max_abs_diff(&net.features(x, false).unwrap(), p);
        assert!(d < 1e-4, "{file}: pooled features differ by {d}");
    }
    // One train-mode forward: batch statistics and the running-statistics update.
    let y = net.forward_t(x, true).unwrap();
    let d = max_abs_diff(&y, &fx["out_train"]);
    assert!(d < 1e-4, "{file}: train output differs by {d}");
    let bn = |n: &str| vm.data().lock().unwrap()[n].as_tensor().clone();
    assert!(max_abs_diff(&bn("bn1.running_mean"), &fx["after_train.bn1.running_mean"]) < 1e-5);
    assert!(max_abs_diff(&bn("bn1.running_var"), &fx["after_train.bn1.running_var"]) < 1e-5);
}

#[test]
fn resnet_tiny_matches_pytorch() {
    check_resnet_fixture("nn_resnet_tiny.safetensors", ResNetConfig::resnet_tiny());
}

#[test]
fn resnet18_layout_at_reduced_widths_matches_pytorch() {
    let cfg = ResNetConfig::resnet18()
        .with_widths([8, 16, 32, 64])
        .with_num_classes(Some(10));
    check_resnet_fixture("nn_resnet18_w8.safetensors", cfg);
}

#[test]
fn torch_sequential_head_state_dict_loads_from_file() {
    // The file is a torch state dict (with num_batches_tracked) plus test tensors;
    // copy the state dict part into its own file and load it with params::load.
    let fx =
        aimass::candle::safetensors::load(format!("{FIX}nn_head.safetensors"), &cpu()).unwrap();
    let state: HashMap<String, Tensor> = fx
        .iter()
        .filter(|(k, _)| k.starts_with(|c: char| c.is_ascii_digit()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert!(state.contains_key("1.num_batches_tracked"));
    let path =
        std::env::temp_dir().join(format!("aimass_nn_head_{}.safetensors", std::process::id()));
    aimass::candle::safetensors::save(&state, &path).unwrap();
    let vm = VarMap::new();
    let head = ProjectionHead::new(
        HeadConfig::simclr()
            .with_input_dim(8)
            .with_hidden_dim(16)
            .with_output_dim(4),
        seeded_var_builder(&vm, 0, DType::F32, &cpu()),
    )
    .unwrap();
    params::load(&vm, &path).unwrap();
    std::fs::remove_file(&path).ok();
    let x = &fx["input"];
    assert!(max_abs_diff(&head.forward_t(x, false).unwrap(), &fx["out_eval"]) < 1e-5);
    assert!(max_abs_diff(&head.forward_t(x, true).unwrap(), &fx["out_train"]) < 1e-5);
    let rv = vm.data().lock().unwrap()["1.running_var"]
        .as_tensor()
        .clone();
    assert!(max_abs_diff(&rv, &fx["after_train.1.running_var"]) < 1e-5);
}

// ------------------------------------------------------------------ gradients

/// Central finite differences of `loss()` with respect to a few entries of
/// `var`, compared with the autograd gradient `g` (f64).
fn check_fd(name: &str, var: &Var, g: &Tensor, loss: &dyn Fn() -> f64) {
    let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let gv: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-6;
    for i in (0..base.len()).step_by((base.len() / 4).max(1)).take(4) {
        let mut p = base.clone();
        p[i] += h;
        var.set(&Tensor::from_vec(p.clone(), var.shape(), &cpu()).unwrap())
            .unwrap();
        let lp = loss();
        p[i] -= 2.0 * h;
        var.set(&Tensor::from_vec(p, var.shape(), &cpu()).unwrap())
            .unwrap();
        let lm = loss();
        var.set(&Tensor::from_vec(base.clone(), var.shape(), &cpu()).unwrap())
            .unwrap();
        let fd = (lp - lm) / (2.0 * h);
        assert!(
            (fd - gv[i]).abs() < 1e-6 * (1.0 + fd.abs()),
            "{name}[{i}]: autograd {} vs finite difference {fd}",
            gv[i]
        );
    }
}

/// Train-mode gradients of `cfg`'s ResNet (f64, seeded) on a fixed input
/// (`wave` of a ramp) against finite differences, for the parameters
/// `names`.
fn check_resnet_train_grads(
    cfg: ResNetConfig,
    seed: u64,
    wave: fn(&Tensor) -> Tensor,
    names: &[&str],
) {
    let dev = cpu();
    let vm = VarMap::new();
    let net = ResNet::new(cfg, seeded_var_builder(&vm, seed, DType::F64, &dev)).unwrap();
    let ramp = Tensor::arange(0f64, 2. * 16. * 16., &dev)
        .unwrap()
        .reshape((2, 1, 16, 16))
        .unwrap();
    let x = wave(&ramp);
    let wts = Tensor::new(&[[0.3f64, -1.2, 0.7], [1.1, 0.4, -0.5]], &dev).unwrap();
    let loss = || -> Tensor {
        (net.forward_t(&x, true).unwrap() * &wts)
            .unwrap()
            .sum_all()
            .unwrap()
            .sqr()
            .unwrap()
    };
    let grads = loss().backward().unwrap();
    let lf = || loss().to_scalar::<f64>().unwrap();
    let vars = params::named_vars(&vm).unwrap();
    for n in names {
        let v = &vars.iter().find(|(k, _)| k == n).unwrap().1;
        check_fd(n, v, grads.get(v.as_tensor()).unwrap(), &lf);
    }
}

#[test]
fn train_mode_gradients_match_finite_differences() {
    // ImageNet stem (7x7/2 conv, max pool), both stage kinds, downsample, classifier.
    let cfg = ResNetConfig::resnet18()
        .with_layers([1, 1])
        .with_widths([2, 4])
        .with_in_channels(1)
        .with_num_classes(Some(3));
    check_resnet_train_grads(
        cfg,
        3,
        |r| r.affine(0.37, 0.0).unwrap().sin().unwrap(),
        &[
            "conv1.weight",
            "bn1.weight",
            "layer1.0.conv2.weight",
            "layer2.0.downsample.0.weight",
            "layer2.0.bn1.bias",
            "fc.weight",
        ],
    );
}

#[test]
fn bottleneck_train_mode_gradients_match_finite_differences() {
    // Bottleneck blocks, each with a downsample; bn3 ends every block (fused
    // with the residual add and the ReLU in train mode).
    let cfg = ResNetConfig::resnet50()
        .with_layers([1, 1])
        .with_widths([2, 3])
        .with_in_channels(1)
        .with_num_classes(Some(3));
    check_resnet_train_grads(
        cfg,
        4,
        |r| r.affine(0.29, 0.3).unwrap().cos().unwrap(),
        &[
            "conv1.weight",
            "layer1.0.conv3.weight",
            "layer1.0.bn3.weight",
            "layer1.0.bn3.bias",
            "layer1.0.downsample.0.weight",
            "layer2.0.bn3.weight",
            "layer2.0.downsample.1.bias",
        ],
    );
}

#[test]
fn layer_norm_matches_hand_computed_values() {
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 0, DType::F32, &cpu());
    let ln = LayerNorm::new(4, LayerNormConfig::default(), vb.pp("ln")).unwrap();
    // Row 1, 2, 3, 6: mean 3, biased var 3.5.
    let x = Tensor::new(&[[1f32, 2., 3., 6.]], &cpu()).unwrap();
    let y = vec1(&ln.forward(&x).unwrap());
    for (v, xi) in y.iter().zip([1f64, 2., 3., 6.]) {
        assert!((*v as f64 - (xi - 3.) / (3.5f64 + 1e-5).sqrt()).abs() < 1e-5);
    }
    let names: Vec<String> = params::named_vars(&vm)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["ln.bias", "ln.weight"]);

    // Without affine parameters and with a larger eps: no variables, and
    // eps enters the denominator.
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 0, DType::F32, &cpu());
    let cfg = LayerNormConfig::default().with_affine(false).with_eps(0.5);
    let y = vec1(
        &LayerNorm::new(4, cfg, vb.pp("ln"))
            .unwrap()
            .forward(&x)
            .unwrap(),
    );
    for (v, xi) in y.iter().zip([1f64, 2., 3., 6.]) {
        assert!((*v as f64 - (xi - 3.) / 4f64.sqrt()).abs() < 1e-5);
    }
    assert!(params::named_vars(&vm).unwrap().is_empty());
    for eps in [0.0, -1.0, f64::NAN] {
        let cfg = LayerNormConfig::default().with_eps(eps);
        assert_eq!(
            config_field(LayerNorm::new(4, cfg, vb.pp("bad"))),
            "LayerNormConfig::eps"
        );
    }
    assert_eq!(
        config_field(LayerNorm::new(0, LayerNormConfig::default(), vb.pp("bad"))),
        "LayerNorm dim"
    );
}
