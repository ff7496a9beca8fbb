//! BYOL pretraining of resnet_tiny on Fashion-MNIST without labels, then
//! few-label probes of the pretrained features against raw pixels and the
//! randomly initialised network (the program of `examples/ssl.rs` with
//! `--method byol`; the same options).
//!
//! ```text
//! cargo run --release --example byol
//! cargo run --release --example byol -- --data /usr/share/datasets/fashion-mnist --out runs/byol/backbone.safetensors
//! ```
//!
//! Ends with one line `RESULT method=byol knn_acc=... lin_all=... lin_100=... lin_10=... ...`.

#[path = "common/pretrain.rs"]
mod pretrain;

fn main() -> std::process::ExitCode {
    pretrain::main_for(Some(pretrain::Method::Byol))
}
