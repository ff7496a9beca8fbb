//! Atomic file writes: temporary file, fsync, rename, directory fsync.
//!
//! A crash at any moment leaves either the old file or the new one at the
//! target path, never a torn one. Used by every writer of weights and
//! checkpoints (`nn::params::save`, `train::Checkpoint::save`).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Writes `bytes` to `path` atomically.
pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = write_temp(path, bytes)?;
    commit(&tmp, path)
}

/// The first half of [`write`]: writes and fsyncs a temporary file next to
/// `path` and returns its path. Until [`commit`], `path` is untouched.
pub(crate) fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let tmp = temp_path(path);
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    Ok(tmp)
}

/// The second half of [`write`]: renames the temporary file over `path` and
/// fsyncs the directory so the rename is durable.
pub(crate) fn commit(tmp: &Path, path: &Path) -> Result<()> {
    fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
    sync_dir(path);
    Ok(())
}

/// `<name>.tmp-<pid>` next to `path`.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Fsyncs the directory holding `path` (best effort: not every platform can
/// open a directory).
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}
