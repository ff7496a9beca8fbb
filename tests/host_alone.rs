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
    let env_after: Vec<(String, String)> = std::env::vars().collect();
    assert_eq!(env_before, env_after, "the environment changed");
    // The program can still ask for it.
    let tuned = tune_cpu_allocator();
    assert_eq!(cpu_allocator_tuned(), tuned);
    if cfg!(all(target_os = "linux", target_env = "gnu"))
        && std::env::var("AIMASS_CPU_MALLOC").as_deref() != Ok("system")
    {
        assert!(tuned);
    }
}
