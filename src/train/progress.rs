//! A progress display on stderr: a live bar on a terminal, plain lines
//! otherwise, or nothing.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::callback::{Callback, Control, EpochInfo, StepInfo, TrainingState};
use crate::Result;

/// How [`Progress`] shows itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ProgressMode {
    /// A live bar when stderr is a terminal, plain lines otherwise (default).
    #[default]
    Auto,
    /// Always plain lines (one every `every` steps and one per epoch).
    Lines,
    /// Nothing at all.
    Silent,
}

/// Shows step, epoch, loss, learning rate, images/s and ETA on stderr.
pub struct Progress {
    mode: ProgressMode,
    every: u64,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A progress display; in line mode, one line every `every` steps (0:
    /// only at the end of each epoch).
    pub fn new(mode: ProgressMode, every: u64) -> Self {
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Auto,
            ProgressMode::Auto => ProgressMode::Lines,
            m => m,
        };
        Progress {
            mode,
            every,
            bar: None,
        }
    }

    /// Silent progress (for tests and library use).
    pub fn silent() -> Self {
        Progress::new(ProgressMode::Silent, 0)
    }

    fn bar(&mut self, info: &StepInfo<'_>) -> &ProgressBar {
        self.bar.get_or_insert_with(|| {
            let total = info.steps_left.map(|l| l + info.step).unwrap_or(0);
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            ) {
                b.set_style(style);
            }
            b.set_position(info.step.saturating_sub(1));
            b
        })
    }
}

fn rate(info: &StepInfo<'_>) -> f64 {
    info.samples_seen as f64 / info.elapsed.as_secs_f64().max(1e-9)
}

fn eta(info: &StepInfo<'_>) -> String {
    match info.steps_left {
        Some(left) if info.samples_seen > 0 => {
            let per_step = info.elapsed.as_secs_f64()
                / (info.samples_seen as f64 / info.samples.max(1) as f64);
            format!("{:.0}s", per_step * left as f64)
        }
        _ => "?".to_string(),
    }
}

impl Callback for Progress {
    fn on_step(&mut self, info: &StepInfo<'_>) -> Result<Control> {
        match self.mode {
            ProgressMode::Silent => {}
            ProgressMode::Auto => {
                let msg = format!(
                    "epoch {}/{} loss {:.4} lr {:.3e} {:.0} img/s",
                    info.epoch,
                    info.epochs,
                    info.loss,
                    info.lr,
                    rate(info)
                );
                let bar = self.bar(info);
                bar.set_message(msg);
                bar.set_position(info.step);
            }
            ProgressMode::Lines => {
                if self.every > 0 && info.step.is_multiple_of(self.every) {
                    let batch = match info.batches_per_epoch {
                        Some(n) => format!("{}/{n}", info.batch),
                        None => info.batch.to_string(),
                    };
                    eprintln!(
                        "step {} epoch {}/{} batch {batch} loss {:.4} lr {:.3e} {:.0} img/s eta {}{}",
                        info.step,
                        info.epoch,
                        info.epochs,
                        info.loss,
                        info.lr,
                        rate(info),
                        eta(info),
                        if info.skipped { " (skipped: non-finite)" } else { "" }
                    );
                }
            }
        }
        Ok(Control::Continue)
    }

    fn on_epoch_end(&mut self, info: &EpochInfo<'_>) -> Result<Control> {
        if self.mode == ProgressMode::Silent {
            return Ok(Control::Continue);
        }
        let metrics: Vec<String> = info
            .metrics
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect();
        let line = format!(
            "epoch {}/{} step {} train_loss {:.4} lr {:.3e} {} t={:.0}s",
            info.epoch,
            info.epochs,
            info.step,
            info.train_loss,
            info.lr,
            metrics.join(" "),
            info.elapsed.as_secs_f64()
        );
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
        Ok(Control::Continue)
    }

    fn on_end(&mut self, _state: &dyn TrainingState) -> Result<()> {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        Ok(())
    }
}
