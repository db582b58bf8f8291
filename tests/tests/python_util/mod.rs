//! Running the Python side of the interop tests: which interpreter, its environment, and
//! whether it has the packages a test needs (tests skip with `SKIPPED:` when it has not).
#![allow(dead_code)]

use std::process::Command;

/// Offline, quiet, single-threaded Python: nothing may reach the network.
pub const PY_ENV: [(&str, &str); 4] = [
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
    ("OMP_NUM_THREADS", "1"),
];

/// `$FEDCDD_PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("FEDCDD_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// `Err(reason)` when the interpreter or one of `modules` (comma-separated) is missing.
pub fn python_has_modules(modules: &str) -> Result<(), String> {
    let out = Command::new(python())
        .args(["-c", &format!("import {modules}")])
        .envs(PY_ENV)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python()))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(err
            .lines()
            .last()
            .unwrap_or("import failed")
            .trim()
            .to_string())
    }
}
