//! What a meta-learner does on new tasks: losses and accuracies after a
//! number of adaptation steps, with confidence intervals.

use crate::{Error, Result};

/// The mean of `values` and the half-width of its 95 % confidence interval,
/// `1.96 · s / √n` with `s` the sample standard deviation (`n − 1`), the
/// few-shot literature's "± 95 % CI" over test episodes. Empty input gives
/// NaN; one value gives a zero half-width.
///
/// ```
/// let (m, ci) = aimass::meta::mean_ci95(&[1.0, 2.0, 3.0]);
/// assert_eq!(m, 2.0);
/// assert!((ci - 1.96 / 3f64.sqrt()).abs() < 1e-12);
/// ```
pub fn mean_ci95(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, 1.96 * var.sqrt() / (n as f64).sqrt())
}

/// Query losses (and accuracies, for classification) of every evaluated
/// task after each requested number of adaptation steps, as returned by
/// `evaluate` of [`Maml`](crate::meta::Maml), [`Anil`](crate::meta::Anil)
/// and [`MetaSgd`](crate::meta::MetaSgd).
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    steps: Vec<usize>,
    loss: Vec<Vec<f64>>,
    accuracy: Option<Vec<Vec<f64>>>,
}

impl Evaluation {
    /// An evaluation for `steps` (strictly increasing step counts), empty.
    pub(crate) fn new(steps: &[usize], classification: bool) -> Result<Self> {
        if steps.is_empty() || steps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::invalid(
                "evaluate",
                format!(
                    "the step counts must be a non-empty, strictly increasing list, got {steps:?}"
                ),
            ));
        }
        Ok(Evaluation {
            steps: steps.to_vec(),
            loss: vec![Vec::new(); steps.len()],
            accuracy: classification.then(|| vec![Vec::new(); steps.len()]),
        })
    }

    /// Adds per-task results after `self.steps()[i]` steps.
    pub(crate) fn push(&mut self, i: usize, loss: &[f64], accuracy: Option<&[f64]>) {
        self.loss[i].extend_from_slice(loss);
        if let (Some(all), Some(a)) = (self.accuracy.as_mut(), accuracy) {
            all[i].extend_from_slice(a);
        }
    }

    /// The step counts, as requested.
    pub fn steps(&self) -> &[usize] {
        &self.steps
    }

    /// The number of tasks evaluated.
    pub fn num_tasks(&self) -> usize {
        self.loss.first().map_or(0, Vec::len)
    }

    fn index(&self, steps: usize) -> Result<usize> {
        self.steps.iter().position(|s| *s == steps).ok_or_else(|| {
            Error::invalid(
                "Evaluation",
                format!(
                    "no results after {steps} steps; evaluated after {:?}",
                    self.steps
                ),
            )
        })
    }

    /// Each task's query loss after `steps` adaptation steps.
    pub fn losses(&self, steps: usize) -> Result<&[f64]> {
        Ok(&self.loss[self.index(steps)?])
    }

    /// Each task's query accuracy (a fraction) after `steps` steps;
    /// an error for regression tasks.
    pub fn accuracies(&self, steps: usize) -> Result<&[f64]> {
        let i = self.index(steps)?;
        match &self.accuracy {
            Some(a) => Ok(&a[i]),
            None => Err(Error::invalid(
                "Evaluation::accuracies",
                "accuracy is measured for classification (TaskLoss::CrossEntropy) only",
            )),
        }
    }

    /// Mean query loss after `steps` steps and its 95 % CI half-width
    /// across tasks ([`mean_ci95`]).
    pub fn mean_loss(&self, steps: usize) -> Result<(f64, f64)> {
        Ok(mean_ci95(self.losses(steps)?))
    }

    /// Mean query accuracy after `steps` steps, in percent, and its 95 % CI
    /// half-width across tasks.
    pub fn mean_accuracy(&self, steps: usize) -> Result<(f64, f64)> {
        let pct: Vec<f64> = self.accuracies(steps)?.iter().map(|a| 100.0 * a).collect();
        Ok(mean_ci95(&pct))
    }
}
