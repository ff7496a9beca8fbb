//! Self-supervised pretraining with any of aimass's six methods, then
//! few-label probes of the pretrained features.
//!
//! ```text
//! cargo run --release --example ssl                          # SimCLR, embedded split: ~9 min on 2 AVX-512 cores, ~23 on 2 AVX2 cores
//! cargo run --release --example ssl -- --method byol         # simclr|byol|simsiam|moco|barlow|vicreg
//! cargo run --release --example ssl -- --data /usr/share/datasets/fashion-mnist   # full 60k / 10k
//! cargo run --release --example ssl -- --recipe reference --epochs 19             # the PyTorch reference recipe
//! ```
//!
//! Pretrains resnet_tiny on the training images without their labels,
//! writes the backbone to `--out` (default
//! `runs/ssl/backbone.safetensors`), then compares its frozen features with
//! raw pixels and with the randomly initialised network: kNN, the linear
//! probe on all labels, and linear probes and kNN with 100 and 10 labelled
//! images per class (5 label subsets, mean ± std). Fine-tune the backbone
//! with `--example supervised -- --init runs/ssl/backbone.safetensors
//! --labels-per-class 10`. Ends with one line `RESULT method=... knn_acc=...`.

#[path = "common/pretrain.rs"]
mod pretrain;

fn main() -> std::process::ExitCode {
    pretrain::main_for(None)
}
