//! The training loop shared by every trainer: checkpoints, the non-finite
//! guard, loss scaling and evaluation.

mod checkpoint;
mod guard;
mod knn;
mod scaler;

pub use checkpoint::{Checkpoint, FORMAT_VERSION};
pub use guard::{GuardAction, NonFiniteGuard, NonFinitePolicy};
pub use knn::{accuracy_of, knn_accuracy, knn_predict, KnnConfig};
pub use scaler::{LossScaler, LossScalerConfig};
