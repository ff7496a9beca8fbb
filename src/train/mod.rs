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
mod callback;
mod checkpoint_dir;
mod early_stopping;
mod metrics_log;
#[cfg(feature = "plot")]
mod plot;
mod progress;

pub use callback::{Callback, Control, EpochInfo, StepInfo, TrainingState};
pub use checkpoint_dir::{CheckpointDir, PeriodicCheckpoint};
pub use early_stopping::{EarlyStopping, MonitorMode};
pub use metrics_log::MetricsLog;
#[cfg(feature = "plot")]
pub use plot::CurvePlot;
pub use progress::{Progress, ProgressMode};
