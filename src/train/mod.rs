//! The training loop shared by every trainer.
//!
//! A trainer defines one optimisation step ([`TrainStep`]); [`Fit`] runs it
//! over epochs of a [`DataLoader`](crate::data::DataLoader) (or any
//! [`BatchSource`]), advancing the learning-rate [`Schedule`](crate::optim::Schedule)
//! per step and calling [`Callback`]s: a [`Progress`] display, a
//! [`MetricsLog`] of JSON lines, [`EarlyStopping`], [`PeriodicCheckpoint`]s
//! and, with the `plot` feature, a [`CurvePlot`] of the curves.
//!
//! [`Checkpoint`]s are safetensors files written atomically, never with
//! non-finite weights, and verified on load (a checksum over every
//! metadata entry and tensor); [`Fit::checkpoint`] and [`Fit::resume`]
//! continue a run exactly, callback state included, and
//! [`CheckpointDir::load_latest_valid`] finds the newest checkpoint that
//! verifies.
//! The [`NonFiniteGuard`] stops (or skips) a step whose loss or gradient is
//! not finite before it reaches the weights. [`LossScaler`] is the dynamic
//! loss scale of f16 training. Evaluation: [`evaluate_accuracy`],
//! [`extract_features`], [`knn_accuracy`], [`linear_probe`] (mini-batch
//! AdamW) and [`logistic_regression`] (L-BFGS to convergence), the
//! yardsticks of self-supervised learning.
//!
//! [`Classifier`] is the supervised trainer (see its docs for a complete
//! program); `examples/supervised.rs` trains a ResNet on Fashion-MNIST with
//! all of the above.

mod callback;
mod checkpoint;
mod checkpoint_dir;
mod checkpoint_format;
mod classifier;
mod early_stopping;
mod episodes;
mod eval;
mod fit;
mod fit_state;
mod guard;
mod knn;
mod logistic;
mod metrics_log;
mod mixed;
#[cfg(feature = "plot")]
mod plot;
mod progress;
mod scaler;

pub use callback::{Callback, Control, EpochInfo, StepInfo, TrainingState};
pub use checkpoint::Checkpoint;
pub use checkpoint_dir::{CheckpointDir, LatestValid, PeriodicCheckpoint, SkippedCheckpoint};
pub use checkpoint_format::FORMAT_VERSION;
pub(crate) use classifier::{optimizer_and_guard_steps, BufferSnapshot};
pub use classifier::{Classifier, ClassifierConfig};
pub use early_stopping::{EarlyStopping, EarlyStoppingConfig, MonitorMode};
pub use episodes::EpisodeEpochs;
pub use eval::{
    evaluate_accuracy, extract, extract_features, linear_probe, LinearProbeConfig,
    LinearProbeResult,
};
pub use fit::{BatchSource, Evaluator, Fit, FitConfig, FitSummary, StepOutput, TrainStep};
pub use guard::{GuardAction, NonFiniteGuard, NonFinitePolicy};
pub use knn::{accuracy_of, knn_accuracy, knn_predict, KnnConfig};
pub use logistic::{logistic_regression, LogisticRegressionConfig, LogisticRegressionResult};
pub use metrics_log::MetricsLog;
pub use mixed::{MixedPrecision, MixedPrecisionConfig, Precision};
#[cfg(feature = "plot")]
pub use plot::CurvePlot;
pub use progress::{Progress, ProgressMode};
pub use scaler::{LossScaler, LossScalerConfig};
