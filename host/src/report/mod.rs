//! Run and comparison reports: metrics as JSONL and CSV, SVG plots and Markdown summaries.
//!
//! Accuracies are fractions in `0..=1` everywhere in the data and are shown ×100 (percent) in
//! tables and plots.

mod compare;
mod format;
mod plot;
mod points;
mod run;
pub mod stats;
mod sweep;
#[cfg(test)]
mod tests;

pub use compare::{CompareNotes, write_compare_report};
pub use format::{fmt_bytes, fmt_percent, fmt_plain, xml_escape};
pub use plot::{Series, grouped_bar_svg, line_plot_svg, nice_ticks};
pub use points::{CompareResult, DomainScore, EvalPoint, RoundLog, RunReport};
pub use run::{summary_table, write_run_report};
pub use sweep::{SweepAbout, SweepResult, write_sweep_report};
