//! Progress bars and log lines on stderr. On a terminal a bar is drawn (indicatif) and log
//! lines are printed above it; when stderr is piped there is no bar, only the lines, so logs
//! stay readable. Library code reports through here, never with `eprintln!` of its own.

use std::io::IsTerminal as _;
use std::sync::{Mutex, OnceLock};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The one place every bar of this process is drawn, so lines go above all of them.
fn multi() -> &'static MultiProgress {
    static MULTI: OnceLock<MultiProgress> = OnceLock::new();
    MULTI.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// Whether bars are drawn: stderr is a terminal.
pub fn live() -> bool {
    std::io::stderr().is_terminal()
}

/// Prints one line on stderr, above any live bar.
pub fn line(text: &str) {
    if live() {
        // MultiProgress prints nothing when its target is hidden; it is not here.
        if multi().println(text).is_ok() {
            return;
        }
    }
    eprintln!("{text}");
}

/// Prints `warning: {text}` on stderr.
pub fn warn(text: &str) {
    line(&format!("warning: {text}"));
}

/// A progress bar: `[####----] done/total message (elapsed)` on a terminal, nothing otherwise.
/// After [`finish`](Self::finish) the next update starts a fresh bar (a new phase).
pub struct Progress {
    show: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Progress {
    /// A bar when stderr is a terminal, none otherwise.
    pub fn new() -> Self {
        Self::shown(true)
    }

    /// A bar only when `show` (and stderr is a terminal).
    pub fn shown(show: bool) -> Self {
        Progress {
            show: show && live(),
            bar: Mutex::new(None),
        }
    }

    /// Whether this bar is drawn.
    pub fn is_live(&self) -> bool {
        self.show
    }

    /// Shows `done` of `total` with a message.
    pub fn update(&self, done: usize, total: usize, what: &str) {
        if !self.show {
            return;
        }
        let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        let bar = slot.get_or_insert_with(|| {
            let style = ProgressStyle::with_template(
                "[{bar:30}] {pos}/{len} {wide_msg} ({elapsed_precise})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("#-");
            multi().add(ProgressBar::new(total as u64).with_style(style))
        });
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(what.to_string());
    }

    /// Clears the bar.
    pub fn finish(&self) {
        let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = slot.take() {
            b.finish_and_clear();
            multi().remove(&b);
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Log lines and progress bars of a long job (a federated run): lines on stderr unless
/// `quiet`, a bar on a terminal.
pub struct Reporter {
    pub quiet: bool,
    pub bar: Progress,
}

impl Reporter {
    pub fn new(quiet: bool) -> Self {
        Reporter {
            quiet,
            bar: Progress::shown(!quiet),
        }
    }

    pub fn line(&self, s: &str) {
        if !self.quiet {
            line(s);
        }
    }
}
