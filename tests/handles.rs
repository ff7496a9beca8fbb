//! Model handles (`nn::Model`, `nn::FrozenModel`) and loading weights by
//! name (`nn::params::load_with`): frozen models keep every bit of their
//! state, non-strict loads report exactly what did not match, shapes are
//! always checked, and PyTorch state dicts load into backbones and
//! classifiers.

mod common;

use std::collections::HashMap;

use aimass::candle::{DType, Device, ModuleT, Tensor};
use aimass::candle_nn::{VarBuilder, VarMap};
use aimass::nn::init::seeded_var_builder;
use aimass::nn::params::{self, LoadConfig};
use aimass::nn::*;
use aimass::optim::{Ema, EmaConfig};
use common::{randt, read_fixture};

fn dev() -> Device {
    Device::Cpu
}

fn tiny(vm: &VarMap, classes: Option<usize>, seed: u64) -> ResNet {
    let cfg = ResNetConfig::resnet_tiny().with_num_classes(classes);
    ResNet::new(cfg, seeded_var_builder(vm, seed, DType::F32, &dev())).unwrap()
}

fn bits(vm_entries: Vec<(String, Tensor)>) -> Vec<(String, Vec<u32>)> {
    vm_entries
        .into_iter()
        .map(|(n, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (n, v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

fn state_of<M>(m: &FrozenModel<M>) -> Vec<(String, Vec<u32>)> {
    let mut all = m.named_parameters().unwrap();
    all.extend(m.named_buffers().unwrap());
    bits(all)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn a_frozen_eval_model_ignores_train_and_keeps_every_bit() {
    let vm = VarMap::new();
    let net = tiny(&vm, Some(10), 1);
    let x = randt(&[4, 1, 28, 28], 2).to_dtype(DType::F32).unwrap();
    let model = Model::new(net, vm);
    let reference = model.forward_t(&x, false).unwrap();
    let frozen = model.freeze(ForwardMode::Eval);
    let before = state_of(&frozen);
    for _ in 0..5 {
        let y = frozen.forward_t(&x, true).unwrap(); // generic code asking for train mode
        assert_eq!(max_diff(&y, &reference), 0.0, "must run in eval mode");
        assert!(!y.track_op(), "frozen outputs carry no graph");
        let f = frozen.forward_features(&x, true).unwrap();
        assert!(f.iter().all(|(_, t)| !t.track_op()));
        // A loss through the frozen model produces no gradient at all.
        let loss = y.sqr().unwrap().mean_all().unwrap();
        assert!(!loss.track_op());
    }
    assert_eq!(
        state_of(&frozen),
        before,
        "BatchNorm statistics must be bit-identical"
    );
    // The plain model in train mode does change them: the test can fail.
    let model = frozen.into_model();
    model.forward_t(&x, true).unwrap();
    let changed = model.freeze(ForwardMode::Eval);
    assert_ne!(state_of(&changed), before);
}

#[test]
fn a_frozen_train_mode_model_uses_batch_statistics_without_gradients() {
    let (vm_a, vm_b) = (VarMap::new(), VarMap::new());
    let x = randt(&[4, 1, 28, 28], 3).to_dtype(DType::F32).unwrap();
    let online = Model::new(tiny(&vm_a, None, 5), vm_a);
    let target = Model::new(tiny(&vm_b, None, 5), vm_b).freeze(ForwardMode::Train);
    assert_eq!(target.mode(), ForwardMode::Train);
    let y = target.forward_t(&x, false).unwrap(); // `false` is ignored too
    let want = online.forward_t(&x, true).unwrap();
    assert_eq!(max_diff(&y, &want), 0.0);
    assert!(!y.track_op());
}

#[test]
fn frozen_copies_are_independent_and_change_only_by_ema() {
    let vm = VarMap::new();
    let online = Model::new(tiny(&vm, None, 7), vm);
    let target = online
        .frozen_copy(ForwardMode::Train, |vb: VarBuilder| {
            ResNet::new(ResNetConfig::resnet_tiny(), vb)
        })
        .unwrap();
    assert_eq!(
        state_of(&target),
        state_of(&online.clone().freeze(ForwardMode::Eval))
    );
    // Train the online network a little (change its weights by hand).
    for (_, v) in online.named_parameters().unwrap() {
        v.set(&(v.as_tensor() + 0.5).unwrap()).unwrap();
    }
    let t0: HashMap<String, Tensor> = target.named_parameters().unwrap().into_iter().collect();
    let o: HashMap<String, Tensor> = online
        .named_parameters()
        .unwrap()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
        .collect();
    assert!(
        t0.iter().all(|(n, t)| max_diff(t, &o[n]) > 0.4),
        "the copy is independent"
    );
    let ema = Ema::from_frozen(
        online.varmap(),
        &target,
        EmaConfig::default().with_tau_base(0.9),
    )
    .unwrap();
    ema.update(0).unwrap();
    for (n, t) in target.named_parameters().unwrap() {
        let want = ((&t0[&n] * 0.9).unwrap() + (&o[&n] * 0.1).unwrap()).unwrap();
        assert!(max_diff(&t, &want) < 1e-6, "{n}");
    }
}

#[test]
fn model_handles_name_parameters_and_buffers() {
    let vm = VarMap::new();
    let model = Model::new(tiny(&vm, Some(10), 1), vm);
    let params: Vec<String> = model
        .named_parameters()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let buffers: Vec<String> = model
        .named_buffers()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(params.contains(&"fc.weight".to_string()));
    assert!(params.iter().all(|n| !params::is_buffer(n)));
    assert!(buffers.contains(&"bn1.running_var".to_string()));
    assert!(buffers.iter().all(|n| params::is_buffer(n)));
    assert_eq!(
        model.num_params().unwrap(),
        params::num_params(model.varmap()).unwrap()
    );
    let frozen = model.freeze(ForwardMode::Eval);
    assert_eq!(frozen.named_parameters().unwrap().len(), params.len());
    // Copies: changing one does not change the model.
    let (n, t) = &frozen.named_parameters().unwrap()[0];
    let _ = (t + 1.0).unwrap();
    assert_eq!(
        frozen.named_parameters().unwrap()[0]
            .1
            .to_vec1::<f32>()
            .ok(),
        t.to_vec1::<f32>().ok(),
        "{n}"
    );
}

/// The weights of a fixture (input/output tensors removed).
fn fixture_weights(fx: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    fx.iter()
        .filter(|(k, _)| {
            !["input", "out_", "pool_", "after_train"]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn a_torchvision_state_dict_with_fc_loads_into_a_backbone() {
    let fx = read_fixture("nn_resnet18_w8.safetensors");
    let weights = fixture_weights(&fx);
    let cfg = ResNetConfig::resnet18()
        .with_widths([8, 16, 32, 64])
        .with_num_classes(None);
    let vm = VarMap::new();
    let backbone = ResNet::new(cfg, seeded_var_builder(&vm, 0, DType::F32, &dev())).unwrap();
    // Strict: the classifier's tensors are unexpected.
    let e = params::load_tensors(&vm, &weights, "resnet18_w8")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unexpected: fc.bias, fc.weight"), "{e}");
    let report =
        params::load_tensors_with(&vm, &weights, "resnet18_w8", &LoadConfig::non_strict()).unwrap();
    assert_eq!(report.unexpected_keys, vec!["fc.bias", "fc.weight"]);
    assert!(report.missing_keys.is_empty());
    assert!(!report.is_complete());
    let d = max_diff(
        &backbone.forward_t(&fx["input"], false).unwrap(),
        &fx["pool_eval"],
    );
    assert!(d < 1e-4, "pooled features differ from PyTorch's by {d}");
}

#[test]
fn a_backbone_loads_into_a_classifier_with_a_fresh_head() {
    let fx = read_fixture("nn_resnet_tiny.safetensors");
    let weights = fixture_weights(&fx);
    let vm = VarMap::new();
    let clf = tiny(&vm, Some(10), 9);
    let head_before = vm.data().lock().unwrap()["fc.weight"]
        .as_tensor()
        .copy()
        .unwrap();
    let report =
        params::load_tensors_with(&vm, &weights, "resnet_tiny", &LoadConfig::non_strict()).unwrap();
    assert_eq!(report.missing_keys, vec!["fc.bias", "fc.weight"]);
    assert!(
        report.unexpected_keys.is_empty(),
        "{:?}",
        report.unexpected_keys
    );
    assert_eq!(
        report.loaded.len(),
        params::named_vars(&vm).unwrap().len() - 2
    );
    let head_after = vm.data().lock().unwrap()["fc.weight"].as_tensor().clone();
    assert_eq!(
        max_diff(&head_before, &head_after),
        0.0,
        "the fresh head keeps its init"
    );
    let d = max_diff(&clf.features(&fx["input"], false).unwrap(), &fx["out_eval"]);
    assert!(d < 1e-4, "{d}");
}

#[test]
fn prefix_maps_move_an_encoder_into_a_backbone() {
    let dir = std::env::temp_dir().join(format!("aimass-handles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // An SSL checkpoint: the encoder under `encoder.`, a projection head beside it.
    let ssl = VarMap::new();
    let vb = seeded_var_builder(&ssl, 3, DType::F32, &dev());
    let encoder = ResNet::new(ResNetConfig::resnet_tiny(), vb.pp("encoder")).unwrap();
    let _head = Linear::new(64, 16, true, vb.pp("projection")).unwrap();
    let file = dir.join("ssl.safetensors");
    params::save(&ssl, &file).unwrap();
    // A classifier whose backbone lives under `backbone.` and head under `head.`.
    let clf = VarMap::new();
    let vb = seeded_var_builder(&clf, 4, DType::F32, &dev());
    let backbone = ResNet::new(ResNetConfig::resnet_tiny(), vb.pp("backbone")).unwrap();
    let _head = Linear::new(64, 10, true, vb.pp("head")).unwrap();
    let cfg = LoadConfig::non_strict().with_renamed_prefix("encoder.", "backbone.");
    let report = params::load_with(&clf, &file, &cfg).unwrap();
    assert_eq!(report.missing_keys, vec!["head.bias", "head.weight"]);
    assert_eq!(
        report.unexpected_keys,
        vec!["projection.bias", "projection.weight"]
    );
    let x = randt(&[2, 1, 28, 28], 5).to_dtype(DType::F32).unwrap();
    assert_eq!(
        max_diff(
            &backbone.forward_t(&x, false).unwrap(),
            &encoder.forward_t(&x, false).unwrap()
        ),
        0.0
    );
    // Strict with the map: the head and projection are reported.
    let e = params::load_with(
        &clf,
        &file,
        &LoadConfig::default().with_renamed_prefix("encoder.", "backbone."),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("missing: head.bias, head.weight") && e.contains("unexpected: projection.bias"),
        "{e}"
    );
    // Two file tensors mapped onto one variable are refused, naming both.
    let mut tensors: HashMap<String, Tensor> =
        aimass::candle::safetensors::load(&file, &dev()).unwrap();
    let w = tensors["encoder.conv1.weight"].clone();
    tensors.insert("backbone.conv1.weight".into(), w);
    let e = params::load_tensors_with(&clf, &tensors, "x", &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`backbone.conv1.weight` and `encoder.conv1.weight` both map to `backbone.conv1.weight`"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shape_mismatches_are_always_errors_naming_both_shapes_and_change_nothing() {
    let vm = VarMap::new();
    let _ = tiny(&vm, Some(10), 1);
    let before = bits(
        params::named_vars(&vm)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect(),
    );
    let other = VarMap::new();
    let _ = tiny(&other, Some(7), 2); // a 7-class head
    let tensors: HashMap<String, Tensor> = params::named_vars(&other)
        .unwrap()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    for cfg in [LoadConfig::default(), LoadConfig::non_strict()] {
        let e = params::load_tensors_with(&vm, &tensors, "seven.safetensors", &cfg).unwrap_err();
        if cfg.strict {
            assert!(matches!(e, aimass::Error::Malformed { .. }), "{e}");
        } else {
            assert!(matches!(e, aimass::Error::Shape { .. }), "{e}");
        }
        let msg = e.to_string();
        assert!(
            msg.contains("fc.weight") && msg.contains("[10, 64]") && msg.contains("[7, 64]"),
            "{msg}"
        );
        assert!(msg.contains("seven.safetensors"), "{msg}");
    }
    let after = bits(
        params::named_vars(&vm)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect(),
    );
    assert_eq!(before, after, "nothing may change on error");
}

#[test]
fn model_save_and_load_round_trip_with_a_complete_report() {
    let dir = std::env::temp_dir().join(format!("aimass-handles-rt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (VarMap::new(), VarMap::new());
    let ma = Model::new(tiny(&a, Some(10), 1), a);
    let mb = Model::new(tiny(&b, Some(10), 2), b);
    ma.save(dir.join("a.safetensors")).unwrap();
    let report = mb
        .load(dir.join("a.safetensors"), &LoadConfig::default())
        .unwrap();
    assert!(report.is_complete());
    let x = randt(&[2, 1, 28, 28], 6).to_dtype(DType::F32).unwrap();
    assert_eq!(
        max_diff(
            &ma.forward_t(&x, false).unwrap(),
            &mb.forward_t(&x, false).unwrap()
        ),
        0.0
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A PyTorch model with other module names, converted by
/// `scripts/torch_weights.py` (`tests/fixtures/gen_torch_weights.py`):
/// loads strictly into aimass's `Mlp` and gives PyTorch's output.
#[test]
fn weights_converted_by_the_script_load_and_match_pytorch() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/torch_renamed.safetensors"
    );
    let all = aimass::candle::safetensors::load(path, &dev()).unwrap();
    let vm = VarMap::new();
    let mlp = Mlp::new(
        MlpConfig::new(vec![6, 8, 3]).with_batch_norm(true),
        seeded_var_builder(&vm, 0, DType::F32, &dev()),
    )
    .unwrap();
    let report = params::load_with(&vm, path, &LoadConfig::non_strict()).unwrap();
    assert_eq!(report.unexpected_keys, vec!["input", "out_eval"]);
    assert!(report.missing_keys.is_empty());
    let y = mlp.forward_t(&all["input"], false).unwrap();
    assert!(max_diff(&y, &all["out_eval"]) < 1e-5);
}
