//! Loss and metric curves written as an SVG image (feature `plot`).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::callback::{Callback, Control, EpochInfo, StepInfo, TrainingState};
use crate::{Error, Result};

/// Records the training loss per step and every epoch metric, and redraws
/// `path` (an SVG file: the training loss on the left, epoch metrics on the
/// right) after every epoch and at the end.
pub struct CurvePlot {
    path: PathBuf,
    losses: Vec<(u64, f64)>,
    metrics: std::collections::BTreeMap<String, Vec<(usize, f64)>>,
}

impl CurvePlot {
    /// A plot written to `path` (use an `.svg` extension).
    pub fn new(path: impl AsRef<Path>) -> Self {
        CurvePlot {
            path: path.as_ref().to_path_buf(),
            losses: Vec::new(),
            metrics: Default::default(),
        }
    }

    /// Draws the current curves into the file.
    pub fn draw(&self) -> Result<()> {
        let err = |e: String| Error::io(&self.path, std::io::Error::other(e));
        let root = SVGBackend::new(&self.path, (1100, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let (left, right) = root.split_horizontally(550);

        let finite: Vec<(u64, f64)> = self
            .losses
            .iter()
            .copied()
            .filter(|(_, l)| l.is_finite())
            .collect();
        let max_step = finite.last().map_or(1, |(s, _)| *s).max(1);
        let (lo, hi) = bounds(finite.iter().map(|(_, l)| *l));
        let mut chart = ChartBuilder::on(&left)
            .caption("training loss", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0u64..max_step, lo..hi)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(LineSeries::new(finite, &BLUE))
            .map_err(|e| err(e.to_string()))?;

        let max_epoch = self
            .metrics
            .values()
            .flat_map(|v| v.iter().map(|(e, _)| *e))
            .max()
            .unwrap_or(1)
            .max(1);
        let (lo, hi) = bounds(
            self.metrics
                .values()
                .flat_map(|v| v.iter().map(|(_, m)| *m)),
        );
        let mut chart = ChartBuilder::on(&right)
            .caption("epoch metrics", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0usize..max_epoch, lo..hi)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (i, (name, pts)) in self.metrics.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    pts.iter().copied().filter(|(_, v)| v.is_finite()),
                    color,
                ))
                .map_err(|e| err(e.to_string()))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        if !self.metrics.is_empty() {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(e.to_string()))?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
        Ok(())
    }
}

/// A padded [lo, hi] range of the finite values (0..1 when there are none).
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo - pad, hi + pad)
}

impl Callback for CurvePlot {
    fn on_step(&mut self, info: &StepInfo<'_>) -> Result<Control> {
        self.losses.push((info.step, info.loss));
        Ok(Control::Continue)
    }

    fn on_epoch_end(&mut self, info: &EpochInfo<'_>) -> Result<Control> {
        for (k, v) in info.metrics {
            self.metrics
                .entry(k.clone())
                .or_default()
                .push((info.epoch, *v));
        }
        self.draw()?;
        Ok(Control::Continue)
    }

    fn on_end(&mut self, _state: &dyn TrainingState) -> Result<()> {
        self.draw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg() {
        let p = std::env::temp_dir().join(format!("aimass-plot-{}.svg", std::process::id()));
        let mut c = CurvePlot::new(&p);
        c.losses = (1..50).map(|s| (s, 1.0 / s as f64)).collect();
        c.metrics
            .insert("test_acc".into(), vec![(1, 0.5), (2, 0.7), (3, 0.8)]);
        c.draw().unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.contains("<svg") && svg.contains("test_acc") && svg.contains("polyline"));
        std::fs::remove_file(p).unwrap();
    }
}
