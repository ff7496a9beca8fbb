//! `cargo fuzz run cifar`: the CIFAR-10/100 parser on arbitrary bytes.
#![no_main]

use aimass::data::cifar::{parse_cifar, CifarKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for kind in [CifarKind::Cifar10, CifarKind::Cifar100Fine, CifarKind::Cifar100Coarse] {
        let _ = parse_cifar(data, kind, "fuzz");
    }
});
