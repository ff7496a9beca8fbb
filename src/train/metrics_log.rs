//! A metrics log as JSON lines: one object per step and per epoch.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::callback::{Callback, Control, EpochInfo, StepInfo};
use crate::{Error, Result};

/// Appends `{"event":"step",...}` and `{"event":"epoch",...}` lines to a file.
pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
    every: u64,
}

impl MetricsLog {
    /// Opens (appending to) `path`; a step line is written every `every`
    /// steps (0: epochs only). Appending keeps the history of resumed runs.
    pub fn new(path: impl AsRef<Path>, every: u64) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog {
            path,
            out: BufWriter::new(f),
            every,
        })
    }

    fn write(&mut self, fields: &[(&str, String)]) -> Result<()> {
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}:{v}", json_string(k)))
            .collect();
        writeln!(self.out, "{{{}}}", body.join(",")).map_err(|e| Error::io(&self.path, e))?;
        self.out.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// A JSON string literal.
fn json_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A JSON number (non-finite values become `null`, which JSON requires).
fn json_number(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".to_string()
    }
}

impl Callback for MetricsLog {
    fn on_step(&mut self, info: &StepInfo<'_>) -> Result<Control> {
        if self.every > 0 && info.step.is_multiple_of(self.every) {
            let mut f = vec![
                ("event", json_string("step")),
                ("step", info.step.to_string()),
                ("epoch", info.epoch.to_string()),
                ("loss", json_number(info.loss)),
                ("lr", json_number(info.lr)),
                ("skipped", info.skipped.to_string()),
                ("secs", json_number(info.elapsed.as_secs_f64())),
            ];
            f.extend(
                info.metrics
                    .iter()
                    .map(|(k, v)| (k.as_str(), json_number(*v))),
            );
            self.write(&f)?;
        }
        Ok(Control::Continue)
    }

    fn on_epoch_end(&mut self, info: &EpochInfo<'_>) -> Result<Control> {
        let mut f = vec![
            ("event", json_string("epoch")),
            ("epoch", info.epoch.to_string()),
            ("step", info.step.to_string()),
            ("train_loss", json_number(info.train_loss)),
            ("lr", json_number(info.lr)),
            ("secs", json_number(info.elapsed.as_secs_f64())),
        ];
        f.extend(
            info.metrics
                .iter()
                .map(|(k, v)| (k.as_str(), json_number(*v))),
        );
        self.write(&f)?;
        Ok(Control::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_numbers() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        assert_eq!(json_number(f64::NAN), "null");
        assert_eq!(json_number(0.5), "0.5");
    }
}
