//! Device selection through `AIMASS_DEVICE` (one test, so the environment
//! is never changed while another test reads it).

use aimass::device::{best_device, select_device, DeviceRequest, DEVICE_ENV_VAR};
use aimass::Error;

#[test]
fn aimass_device_env_var() {
    std::env::set_var(DEVICE_ENV_VAR, "cpu");
    assert!(best_device().unwrap().is_cpu());

    // An explicit request overrides the variable.
    std::env::set_var(DEVICE_ENV_VAR, "tpu");
    assert!(select_device(DeviceRequest::Cpu).unwrap().is_cpu());
    // A malformed value is a configuration error naming the variable.
    match best_device() {
        Err(Error::Config { field, .. }) => assert_eq!(field, DEVICE_ENV_VAR),
        other => panic!("expected Error::Config, got {other:?}"),
    }

    #[cfg(not(feature = "cuda"))]
    for v in ["cuda", "cuda:1"] {
        std::env::set_var(DEVICE_ENV_VAR, v);
        match best_device() {
            Err(e @ Error::BackendNotCompiled { .. }) => {
                assert!(e.to_string().contains("--features cuda"), "{e}")
            }
            other => panic!("AIMASS_DEVICE={v} on a CPU-only build must fail, got {other:?}"),
        }
    }
    #[cfg(not(feature = "metal"))]
    {
        std::env::set_var(DEVICE_ENV_VAR, "metal");
        assert!(matches!(
            best_device(),
            Err(Error::BackendNotCompiled { .. })
        ));
    }

    // Unset or `auto`: the automatic choice, which on a CPU-only build is the CPU.
    std::env::set_var(DEVICE_ENV_VAR, "auto");
    let auto = best_device().unwrap();
    std::env::remove_var(DEVICE_ENV_VAR);
    #[cfg(not(any(feature = "cuda", feature = "metal")))]
    assert!(auto.is_cpu() && best_device().unwrap().is_cpu());
    let _ = auto;
}

/// The allocator settings take effect on Linux with glibc (unless opted
/// out), nowhere else, and the answer does not change between calls.
#[test]
fn cpu_allocator_tuning() {
    let first = aimass::device::tune_cpu_allocator();
    let opted_out = std::env::var("AIMASS_CPU_MALLOC").is_ok_and(|v| v == "system");
    let expected = cfg!(all(target_os = "linux", target_env = "gnu")) && !opted_out;
    assert_eq!(first, expected);
    assert_eq!(aimass::device::tune_cpu_allocator(), first);
    // Allocation still works after the change, large blocks included.
    let v = vec![1.0f32; 40 << 20];
    assert_eq!(v[v.len() - 1], 1.0);
}
