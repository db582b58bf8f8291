//! The Python side, run by `cargo test`: the `fedcdd` package's pytest suite (python/tests)
//! over the freshly built libfedcdd, and the Flower app on a real deployment (flower/tests:
//! a SuperLink and SuperNodes on 127.0.0.1, `flwr run`, compared with `fedcdd run`). Each
//! skips with `SKIPPED:` when the interpreter lacks what it needs (numpy, pytest; flwr).

mod cli_util;
mod python_util;

use std::process::Command;
use std::time::{Duration, Instant};

use cli_util::{fedcdd_bin, fedcdd_lib, workspace_root};
use python_util::{PY_ENV, python, python_has_modules};

/// Runs `python3 -m pytest <dir>` with the package importable and the built library and
/// binary named, bounded by `timeout`; panics with pytest's output on failure.
fn pytest(dir: &str, modules: &str, timeout: Duration) {
    if let Err(why) = python_has_modules(modules) {
        eprintln!("SKIPPED: {dir}: python lacks {modules}: {why}");
        return;
    }
    let root = workspace_root();
    let (bin, lib) = (fedcdd_bin(), fedcdd_lib());
    let start = Instant::now();
    let out = Command::new("timeout")
        .arg("--kill-after=30")
        .arg(timeout.as_secs().to_string())
        .arg(python())
        .args(["-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", dir])
        .current_dir(&root)
        .envs(PY_ENV)
        .env("PYTHONPATH", root.join("python"))
        .env("FEDCDD_BIN", bin)
        .env("FEDCDD_LIB", lib)
        .output()
        .expect("cannot run pytest");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in text
        .lines()
        .filter(|l| l.starts_with("PERF") || l.contains("passed"))
    {
        eprintln!("{line}");
    }
    assert!(
        out.status.success(),
        "pytest {dir} failed after {:.0} s (status {:?}):\n{text}",
        start.elapsed().as_secs_f64(),
        out.status.code()
    );
}

#[test]
fn python_package() {
    pytest("python/tests", "numpy, pytest", Duration::from_secs(1200));
}

#[test]
fn flower_deployment() {
    pytest(
        "flower/tests",
        "numpy, pytest, flwr",
        Duration::from_secs(1800),
    );
}
