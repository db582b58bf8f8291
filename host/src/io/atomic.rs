//! Atomic file writes: a temp file in the same directory, fsync, rename. An existing file is
//! never truncated or lost when a write fails.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A new, empty temp file beside `path` (`.{name}.tmp-{pid}-{n}`), for a write that is
/// renamed over `path` once complete; returns its path and the open file.
pub fn create_temp_beside(path: &Path) -> Result<(PathBuf, File)> {
    let file_name = path
        .file_name()
        .with_context(|| format!("cannot write {}: the path has no file name", path.display()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(file_name);
    temp_name.push(format!(".tmp-{}-{n}", std::process::id()));
    let temp = dir.join(temp_name);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .with_context(|| {
            format!(
                "cannot write {}: cannot create temp file {}",
                path.display(),
                temp.display()
            )
        })?;
    Ok((temp, file))
}

/// Write to a temp file in the same directory (name like `.{file}.tmp-{pid}`), fsync it,
/// rename over `path`. On error, remove the temp file; an existing `path` is never truncated
/// or lost.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let (temp, mut file) = create_temp_beside(path)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let result = (|| -> Result<()> {
        file.write_all(bytes).with_context(|| {
            format!(
                "cannot write {}: writing {}",
                path.display(),
                temp.display()
            )
        })?;
        file.sync_all().with_context(|| {
            format!(
                "cannot write {}: fsync of {}",
                path.display(),
                temp.display()
            )
        })?;
        drop(file);
        fs::rename(&temp, path).with_context(|| {
            format!(
                "cannot write {}: renaming {} over it failed",
                path.display(),
                temp.display()
            )
        })
    })();
    if let Err(e) = result {
        // Best effort: the original error is what matters.
        let _ = fs::remove_file(&temp);
        return Err(e);
    }

    // Make the rename itself durable; best effort, as not every filesystem allows it.
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
