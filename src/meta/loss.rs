//! The loss a task is adapted with and judged by.

use candle_core::{DType, Tensor};

use crate::loss::{CrossEntropyLoss, CrossEntropyLossConfig, Reduction};
use crate::{Error, Result};

/// The loss of a task's predictions against its targets, averaged over
/// every example (of every task, for stacked tasks with a leading task
/// dimension: with equal task sizes that is the mean of the per-task
/// losses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TaskLoss {
    /// Cross-entropy of logits `(..., C)` against class indices `(...)`
    /// (few-shot classification; default).
    #[default]
    CrossEntropy,
    /// Mean squared error of predictions against targets of the same shape
    /// (regression, e.g. the sinusoids).
    Mse,
}

impl TaskLoss {
    /// The mean loss of `pred` against `targets`.
    ///
    /// ```
    /// use aimass::candle::{Device, Tensor};
    /// use aimass::meta::TaskLoss;
    ///
    /// let p = Tensor::new(&[[1.0f32], [3.0]], &Device::Cpu)?;
    /// let y = Tensor::new(&[[0.0f32], [1.0]], &Device::Cpu)?;
    /// assert_eq!(TaskLoss::Mse.loss(&p, &y)?.to_scalar::<f32>()?, 2.5);
    /// # Ok::<(), aimass::Error>(())
    /// ```
    pub fn loss(&self, pred: &Tensor, targets: &Tensor) -> Result<Tensor> {
        match self {
            TaskLoss::Mse => crate::loss::mse_loss(pred, targets),
            TaskLoss::CrossEntropy => {
                let (logits, labels) = rows(pred, targets)?;
                crate::loss::cross_entropy_loss(&logits, &labels)
            }
        }
    }

    /// Per-task losses and accuracies (accuracy for cross-entropy only) of
    /// `tasks` stacked tasks (a leading task dimension; 1 for a plain task).
    pub(crate) fn per_task(
        &self,
        pred: &Tensor,
        targets: &Tensor,
        tasks: usize,
    ) -> Result<(Vec<f64>, Option<Vec<f64>>)> {
        let per = |t: Tensor| -> Result<Vec<f64>> {
            let acc = crate::host::accumulator(&t);
            let m = t.to_dtype(acc)?.reshape((tasks, ()))?.mean(1)?;
            // host-ok: one value per task, in one read (evaluation, Reptile's
            // report); f64 only where the tensor already is.
            Ok(if acc == DType::F64 {
                m.to_vec1::<f64>()? // host-ok: as above.
            } else {
                let v = m.to_vec1::<f32>()?; // host-ok: as above.
                v.into_iter().map(f64::from).collect()
            })
        };
        match self {
            TaskLoss::Mse => {
                let sq = crate::loss::MseLoss::new(
                    crate::loss::MseLossConfig::default().with_reduction(Reduction::None),
                )?
                .forward(pred, targets)?;
                Ok((per(sq)?, None))
            }
            TaskLoss::CrossEntropy => {
                let (logits, labels) = rows(pred, targets)?;
                let ce = CrossEntropyLoss::new(
                    CrossEntropyLossConfig::default().with_reduction(Reduction::None),
                )?
                .forward(&logits, &labels)?;
                let hit = logits
                    .argmax(1)?
                    .to_dtype(DType::U32)?
                    .eq(&labels.to_dtype(DType::U32)?)?;
                Ok((per(ce)?, Some(per(hit)?)))
            }
        }
    }
}

/// Logits `(..., C)` and labels `(...)` as rows `(n, C)` and `(n,)`.
fn rows(pred: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let c = pred.dims().last().copied().unwrap_or(0);
    if pred.rank() < 2 || targets.rank() + 1 != pred.rank() {
        return Err(Error::shape(
            "TaskLoss::CrossEntropy",
            format!(
                "logits (..., C) with class indices of one rank less, got logits {:?} and targets",
                pred.dims()
            ),
            targets.dims(),
        ));
    }
    Ok((pred.reshape(((), c))?, targets.flatten_all()?))
}
