//! An embeddable library leaves its host alone: running the CPU kernels
//! (convolution, pooling, BatchNorm) and a training step changes no
//! process-wide setting. Before, the first kernel call tuned glibc's
//! `malloc` by itself. Its own process, so nothing else tuned it first.

use aimass::candle::{DType, Device, Tensor};
use aimass::candle_nn::VarMap;
use aimass::device::{cpu_allocator_tuned, tune_cpu_allocator};
use aimass::nn::{init::seeded_var_builder, ResNet, ResNetConfig};

#[test]
fn kernels_and_training_steps_leave_the_allocator_and_environment_alone() {
    let env_before: Vec<(String, String)> = std::env::vars().collect();
    let vm = VarMap::new();
    let net = ResNet::new(
        ResNetConfig::resnet_tiny().with_num_classes(Some(10)),
        seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let x = Tensor::zeros((8, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
    // Train-mode forward and backward: conv (Winograd and im2col), pooling,
    // the fused BatchNorm kernels.
    let loss = net
        .forward_t(&x, true)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    loss.backward().unwrap();
    assert!(!cpu_allocator_tuned(), "a kernel call tuned the allocator");
    // A Fit run told to leave the allocator alone does.
    fit_one_epoch(false);
    assert!(
        !cpu_allocator_tuned(),
        "Fit tuned the allocator against its config"
    );
    let env_after: Vec<(String, String)> = std::env::vars().collect();
    assert_eq!(env_before, env_after, "the environment changed");
    // Fit turns it on by default (a training program), and a program can ask.
    fit_one_epoch(true);
    let tuned = tune_cpu_allocator();
    assert_eq!(cpu_allocator_tuned(), tuned);
    if cfg!(all(target_os = "linux", target_env = "gnu"))
        && std::env::var("AIMASS_CPU_MALLOC").as_deref() != Ok("system")
    {
        assert!(tuned);
    }
}

fn fit_one_epoch(tune: bool) {
    use aimass::data::{DataLoader, DataLoaderConfig, InMemoryDataset};
    use aimass::nn::{seq, Mlp, MlpConfig};
    use aimass::optim::{Sgd, SgdConfig};
    use aimass::train::{Classifier, ClassifierConfig, Fit, FitConfig};
    let ds = InMemoryDataset::new(
        vec![7u8; 16 * 4],
        vec![0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 1, 0],
        (1, 2, 2),
    )
    .unwrap();
    let mut loader = DataLoader::new(
        ds,
        DataLoaderConfig::default().with_batch_size(8),
        &Device::Cpu,
    )
    .unwrap();
    let varmap = VarMap::new();
    let mlp = Mlp::new(
        MlpConfig::new(vec![4, 4, 2]),
        seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let model = seq().add_fn(|x, _| x.flatten_from(1)).add(mlp);
    let opt = Sgd::from_varmap(&varmap, SgdConfig::default()).unwrap();
    let mut clf = Classifier::new(model, varmap, opt, ClassifierConfig::default()).unwrap();
    Fit::new(
        &mut clf,
        &mut loader,
        FitConfig::default().with_tune_cpu_allocator(tune),
    )
    .unwrap()
    .run()
    .unwrap();
}
