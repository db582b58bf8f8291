//! What commands print on stdout.

use std::io::Write as _;

use anyhow::{Context, Result};

/// Writes to stdout; a closed pipe (`fedcdd inspect X | head`) is not an error.
pub fn print_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write to stdout"),
    }
}
