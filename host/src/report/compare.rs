//! A comparison's report: per algorithm and domain the mean over seeds with a 95 % t-interval,
//! the worst domain next to the mean, average ranks, each algorithm's paired difference to a
//! baseline over the same seeds (interval and paired t-test), per-question bootstrap
//! intervals within each run, the cost, and a bar plot.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;

use crate::io::write_atomic;

use super::format::*;
use super::plot::grouped_bar_svg;
use super::points::{CompareResult, EvalPoint};
use super::stats::{MeanInterval, PairedTest, bootstrap_accuracy, mean_interval, paired_t_test};

/// Confidence level of every interval in the report.
pub const LEVEL: f64 = 0.95;
/// Resamples of the per-question bootstrap.
const BOOTSTRAP_REPS: usize = 2000;
/// Seed of the bootstrap resampling (fixed: the report is a pure function of the runs).
const BOOTSTRAP_SEED: u64 = 0xB007_57A9;

/// Mean, std and t-interval of the finite values.
pub(super) fn stat(values: &[f64]) -> Option<MeanInterval> {
    mean_interval(values, LEVEL)
}

/// Means closer than this are a tie: the same accuracies summed in another order differ in
/// the last bits, and `0.7 * 100.0` is not exactly 70.
pub(super) const TIE_TOLERANCE: f64 = 1e-9;

/// Rank of each value, highest = 1; tied values share the average of the ranks they span.
pub(super) fn average_ranks(values: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i + 1;
        while j < idx.len() && (values[idx[j]] - values[idx[i]]).abs() <= TIE_TOLERANCE {
            j += 1;
        }
        // Positions i..j hold ranks i+1..=j; their average is (i+1+j)/2.
        let avg = (i + 1 + j) as f64 / 2.0;
        for &k in &idx[i..j] {
            ranks[k] = avg;
        }
        i = j;
    }
    ranks
}

/// One run's accuracies (%) on the comparison's domains.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct RunScores {
    pub(super) seed: u64,
    pub(super) domains: Vec<Option<f64>>,
    /// Mean over the domains with an accuracy.
    pub(super) mean: Option<f64>,
    /// The lowest domain accuracy (fairness across domains).
    pub(super) worst: Option<f64>,
}

impl RunScores {
    pub(super) fn of(seed: u64, e: &EvalPoint, domains: &[String]) -> Self {
        let per: Vec<Option<f64>> = if domains.is_empty() {
            e.domains.values().map(|s| s.accuracy).collect()
        } else {
            domains
                .iter()
                .map(|d| e.domains.get(d).and_then(|s| s.accuracy))
                .collect()
        };
        let per: Vec<Option<f64>> = per
            .into_iter()
            .map(|a| a.filter(|a| a.is_finite()).map(|a| a * 100.0))
            .collect();
        let present: Vec<f64> = per.iter().flatten().copied().collect();
        RunScores {
            seed,
            mean: mean(present.iter().copied()),
            worst: present.iter().copied().reduce(f64::min),
            domains: if domains.is_empty() { Vec::new() } else { per },
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct CompareRow {
    pub(super) name: String,
    pub(super) reference: bool,
    pub(super) runs: Vec<RunScores>,
    /// Accuracy in %, per domain of the comparison: mean and interval over runs.
    pub(super) cells: Vec<Option<MeanInterval>>,
    /// Per-run mean over the domains, then over runs.
    pub(super) mean: Option<MeanInterval>,
    /// Per-run worst domain, then over runs.
    pub(super) worst: Option<MeanInterval>,
    pub(super) domain_ranks: Vec<Option<f64>>,
    pub(super) rank: Option<f64>,
    pub(super) upload_bytes: Option<f64>,
    pub(super) seconds: Option<f64>,
}

pub(super) fn stat_row(
    name: &str,
    runs: Vec<RunScores>,
    domains: &[String],
    reference: bool,
) -> CompareRow {
    let over_runs = |f: &dyn Fn(&RunScores) -> Option<f64>| {
        stat(&runs.iter().filter_map(f).collect::<Vec<f64>>())
    };
    let cells = (0..domains.len())
        .map(|d| over_runs(&|r| r.domains.get(d).copied().flatten()))
        .collect();
    CompareRow {
        name: name.to_string(),
        reference,
        cells,
        mean: over_runs(&|r| r.mean),
        worst: over_runs(&|r| r.worst),
        runs,
        domain_ranks: vec![None; domains.len()],
        rank: None,
        upload_bytes: None,
        seconds: None,
    }
}

/// Algorithms in first-appearance order with their ranks, then the references (unranked).
pub(super) fn compare_rows(
    domains: &[String],
    results: &[CompareResult],
    references: &BTreeMap<String, Vec<EvalPoint>>,
) -> Vec<CompareRow> {
    let mut groups: Vec<(&str, Vec<&CompareResult>)> = Vec::new();
    for res in results {
        match groups.iter_mut().find(|(a, _)| *a == res.algorithm) {
            Some((_, g)) => g.push(res),
            None => groups.push((&res.algorithm, vec![res])),
        }
    }
    let mut rows: Vec<CompareRow> = groups
        .iter()
        .map(|(alg, rs)| {
            let runs = rs
                .iter()
                .map(|r| RunScores::of(r.seed, &r.final_eval, domains))
                .collect();
            let mut row = stat_row(alg, runs, domains, false);
            row.upload_bytes = mean(rs.iter().map(|r| r.upload_bytes as f64));
            row.seconds = mean(rs.iter().map(|r| r.seconds).filter(|s| s.is_finite()));
            row
        })
        .collect();

    // Rank only where every algorithm has a score: averaging ranks over different domain sets
    // would favour an algorithm that is missing its hard domains.
    for di in 0..domains.len() {
        let means: Option<Vec<f64>> = rows.iter().map(|r| r.cells[di].map(|s| s.mean)).collect();
        if let Some(means) = means {
            for (row, rank) in rows.iter_mut().zip(average_ranks(&means)) {
                row.domain_ranks[di] = Some(rank);
            }
        }
    }
    for row in &mut rows {
        row.rank = mean(row.domain_ranks.iter().flatten().copied());
    }

    for (name, evals) in references {
        // A reference point per seed, in seed order (the seeds are not recorded with it).
        let runs = evals
            .iter()
            .enumerate()
            .map(|(i, e)| RunScores::of(i as u64, e, domains))
            .collect();
        rows.push(stat_row(name, runs, domains, true));
    }
    rows
}

/// `mean ± half-width` of the interval; the bare mean for one run.
pub(super) fn stat_cell(s: Option<MeanInterval>) -> String {
    match s {
        None => String::from("–"),
        Some(s) if s.n < 2 => format!("{:.1}", s.mean),
        Some(s) => format!("{:.1} ± {:.1}", s.mean, s.half_width),
    }
}

pub(super) fn row_label(row: &CompareRow) -> String {
    if row.reference {
        format!("{} (reference)", row.name)
    } else {
        row.name.clone()
    }
}

pub(super) fn compare_table(domains: &[String], rows: &[CompareRow]) -> String {
    let mut out = String::from("| algorithm | runs |");
    for d in domains {
        out.push_str(&format!(" {} |", md_escape(d)));
    }
    out.push_str(" mean | worst domain | avg rank |\n|:---|---:|");
    out.push_str(&"---:|".repeat(domains.len() + 3));
    out.push('\n');
    for row in rows {
        out.push_str(&format!(
            "| {} | {} |",
            md_escape(&row_label(row)),
            row.runs.len()
        ));
        for c in &row.cells {
            out.push_str(&format!(" {} |", stat_cell(*c)));
        }
        let rank = row
            .rank
            .map_or_else(|| String::from("–"), |r| format!("{r:.2}"));
        out.push_str(&format!(
            " {} | {} | {rank} |\n",
            stat_cell(row.mean),
            stat_cell(row.worst)
        ));
    }
    out
}

/// One algorithm's paired differences to the baseline: per domain, mean, worst domain.
#[derive(Clone, Debug)]
pub(super) struct PairedRow {
    pub(super) name: String,
    /// Seeds both have.
    pub(super) pairs: usize,
    pub(super) domains: Vec<Option<PairedTest>>,
    pub(super) mean: Option<PairedTest>,
    pub(super) worst: Option<PairedTest>,
}

/// Paired differences `algorithm − baseline` over the seeds both ran (same seed = same
/// partition, sampling and init).
pub(super) fn paired_rows(rows: &[CompareRow], baseline: &str) -> Vec<PairedRow> {
    let Some(base) = rows.iter().find(|r| !r.reference && r.name == baseline) else {
        return Vec::new();
    };
    rows.iter()
        .filter(|r| !r.reference && r.name != baseline)
        .map(|row| {
            let pairs: Vec<(&RunScores, &RunScores)> = row
                .runs
                .iter()
                .filter_map(|a| Some((a, base.runs.iter().find(|b| b.seed == a.seed)?)))
                .collect();
            let test = |f: &dyn Fn(&RunScores) -> Option<f64>| {
                let (a, b): (Vec<f64>, Vec<f64>) = pairs
                    .iter()
                    .map(|(a, b)| (f(a).unwrap_or(f64::NAN), f(b).unwrap_or(f64::NAN)))
                    .unzip();
                paired_t_test(&a, &b, LEVEL)
            };
            let n_domains = row.cells.len();
            PairedRow {
                name: row.name.clone(),
                pairs: pairs.len(),
                domains: (0..n_domains)
                    .map(|d| test(&|r| r.domains.get(d).copied().flatten()))
                    .collect(),
                mean: test(&|r| r.mean),
                worst: test(&|r| r.worst),
            }
        })
        .collect()
}

/// `+d ± h` (the difference and its interval's half-width); the bare difference for one pair.
fn diff_cell(t: Option<PairedTest>) -> String {
    match t {
        None => String::from("–"),
        Some(t) if t.diff.n < 2 => format!("{:+.1}", t.diff.mean),
        Some(t) => format!("{:+.1} ± {:.1}", t.diff.mean, t.diff.half_width),
    }
}

fn p_cell(t: Option<PairedTest>) -> String {
    match t {
        Some(t) if t.p_value.is_finite() => {
            if t.p_value < 1e-4 {
                String::from("<0.0001")
            } else {
                format!("{:.4}", t.p_value)
            }
        }
        _ => String::from("–"),
    }
}

fn paired_table(domains: &[String], rows: &[PairedRow]) -> String {
    let mut out = String::from("| algorithm | pairs |");
    for d in domains {
        out.push_str(&format!(" {} |", md_escape(d)));
    }
    out.push_str(" mean | p (mean) | worst domain | p (worst) |\n|:---|---:|");
    out.push_str(&"---:|".repeat(domains.len() + 4));
    out.push('\n');
    for row in rows {
        out.push_str(&format!("| {} | {} |", md_escape(&row.name), row.pairs));
        for c in &row.domains {
            out.push_str(&format!(" {} |", diff_cell(*c)));
        }
        out.push_str(&format!(
            " {} | {} | {} | {} |\n",
            diff_cell(row.mean),
            p_cell(row.mean),
            diff_cell(row.worst),
            p_cell(row.worst)
        ));
    }
    out
}

/// Per-question bootstrap intervals of every run's accuracy (%), per domain:
/// `(algorithm, seed, domain, questions, accuracy, low, high)`.
type QuestionInterval = (String, u64, String, usize, f64, f64, f64);

fn question_intervals(domains: &[String], results: &[CompareResult]) -> Vec<QuestionInterval> {
    let mut out = Vec::new();
    for r in results {
        for d in domains {
            let Some(s) = r.final_eval.domains.get(d) else {
                continue;
            };
            let (Some(acc), Some((lo, hi))) = (
                s.accuracy,
                bootstrap_accuracy(&s.correct, LEVEL, BOOTSTRAP_REPS, BOOTSTRAP_SEED),
            ) else {
                continue;
            };
            out.push((
                r.algorithm.clone(),
                r.seed,
                d.clone(),
                s.correct.len(),
                100.0 * acc,
                100.0 * lo,
                100.0 * hi,
            ));
        }
    }
    out
}

/// What a comparison report says besides the runs.
#[derive(Clone, Debug, Default)]
pub struct CompareNotes {
    /// Algorithm the paired differences are taken against (none: no paired table).
    pub baseline: Option<String>,
    /// Wall time of the comparison command (runs reused from earlier count as 0).
    pub wall_seconds: Option<f64>,
}

/// Write `compare.md`, `compare.csv`, `compare_paired.csv`, `compare_questions.csv`,
/// `compare.svg` and `compare.jsonl` into `dir` and return the Markdown tables for the CLI to
/// print.
pub fn write_compare_report(
    dir: &Path,
    domains: &[String],
    results: &[CompareResult],
    references: &BTreeMap<String, Vec<EvalPoint>>,
    notes: &CompareNotes,
) -> Result<String> {
    let rows = compare_rows(domains, results, references);
    let table = compare_table(domains, &rows);
    let level = 100.0 * LEVEL;
    let mut printed = table.clone();

    let mut md = String::from("# Comparison\n\n## Accuracy\n\n");
    md.push_str(&table);
    md.push_str(&format!(
        "\nCells: final exact-match accuracy in %, mean over runs (seeds) ± the half-width of its \
         {level:.0} % t-interval (`t(0.975, n−1)·s/√n`, s the sample standard deviation; \
         `compare.csv` has s and the bounds); one run shows the bare value. `mean` averages each \
         run over its domains first; `worst domain` is each run's lowest domain accuracy, then \
         averaged over runs. Every column is an accuracy in %: nothing is summed across \
         different scales. Seeds change the data partition, client sampling, LoRA init and \
         masks together; each run's seed is in `compare.jsonl`. Average rank: in each domain \
         where every algorithm has an accuracy, algorithms are ranked by mean accuracy (1 = \
         best; tied means share the average of the ranks they span), and a row's rank is the \
         mean over those domains. References are not ranked.\n"
    ));

    let paired = notes
        .baseline
        .as_deref()
        .map(|b| (b, paired_rows(&rows, b)));
    if let Some((base, prows)) = &paired
        && !prows.is_empty()
    {
        let t = paired_table(domains, prows);
        md.push_str(&format!(
            "\n## Paired difference to {}\n\n{t}\nCells: accuracy of the algorithm minus {0}'s, \
             in percentage points, over the seeds both ran (the same seed gives both the same \
             partition and sampling) ± the half-width of the {level:.0} % t-interval of the \
             mean difference; p: two-sided paired t-test of a zero mean difference (as scipy's \
             `ttest_rel`). An interval that contains 0 (or p ≥ 0.05) does not show a \
             difference at this number of seeds.\n",
            md_escape(base)
        ));
        printed.push_str(&format!("\nPaired difference to {base}:\n\n{t}"));
    }

    let questions = question_intervals(domains, results);
    if !questions.is_empty() {
        md.push_str(&format!(
            "\n## Within one run: per-question bootstrap\n\n{level:.0} % percentile bootstrap \
             intervals ({BOOTSTRAP_REPS} resamples of the questions) of each run's accuracy: the \
             uncertainty from the finite question set alone. Every run is in \
             `compare_questions.csv`; the first seed of each algorithm is shown.\n\n\
             | algorithm | seed |"
        ));
        for d in domains {
            md.push_str(&format!(" {} |", md_escape(d)));
        }
        md.push_str("\n|:---|---:|");
        md.push_str(&"---:|".repeat(domains.len()));
        md.push('\n');
        for row in rows.iter().filter(|r| !r.reference) {
            let Some(seed) = row.runs.iter().map(|r| r.seed).min() else {
                continue;
            };
            md.push_str(&format!("| {} | {seed} |", md_escape(&row.name)));
            for d in domains {
                let cell = questions
                    .iter()
                    .find(|q| q.0 == row.name && q.1 == seed && &q.2 == d)
                    .map_or_else(
                        || String::from("–"),
                        |q| format!("{:.1} [{:.1}, {:.1}] (n={})", q.4, q.5, q.6, q.3),
                    );
                md.push_str(&format!(" {cell} |"));
            }
            md.push('\n');
        }
    }

    md.push_str(
        "\n## Cost\n\n| algorithm | runs | mean upload | mean seconds |\n|:---|---:|---:|---:|\n",
    );
    for row in rows.iter().filter(|r| !r.reference) {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            md_escape(&row.name),
            row.runs.len(),
            row.upload_bytes
                .map_or_else(|| String::from("–"), fmt_bytes),
            row.seconds
                .map_or_else(|| String::from("–"), |s| format!("{s:.1}"))
        ));
    }
    if let Some(s) = notes.wall_seconds {
        md.push_str(&format!(
            "\nWall time of this comparison: {s:.0} s (runs reused from an earlier call count \
             as 0).\n"
        ));
    }
    md.push_str("\n![accuracy by domain](compare.svg)\n");
    write_atomic(&dir.join("compare.md"), md.as_bytes())?;

    let mut csv = String::from("algorithm,domain,mean,std,n,ci_low,ci_high,rank\n");
    for row in &rows {
        let name = csv_field(&row.name);
        let line = |domain: &str, s: Option<MeanInterval>, rank: Option<f64>| {
            let (m, sd, n, lo, hi) = s.map_or(
                (
                    String::new(),
                    String::new(),
                    0,
                    String::new(),
                    String::new(),
                ),
                |s| {
                    (
                        csv_num(s.mean),
                        csv_num(s.std),
                        s.n,
                        csv_num(s.mean - s.half_width),
                        csv_num(s.mean + s.half_width),
                    )
                },
            );
            format!(
                "{name},{},{m},{sd},{n},{lo},{hi},{}\n",
                csv_field(domain),
                csv_opt(rank)
            )
        };
        for (di, d) in domains.iter().enumerate() {
            csv.push_str(&line(d, row.cells[di], row.domain_ranks[di]));
        }
        csv.push_str(&line("mean", row.mean, row.rank));
        csv.push_str(&line("worst", row.worst, None));
    }
    write_atomic(&dir.join("compare.csv"), csv.as_bytes())?;

    if let Some((base, prows)) = &paired {
        let mut csv = String::from("algorithm,baseline,domain,pairs,diff,std,ci_low,ci_high,t,p\n");
        for row in prows {
            let named = domains
                .iter()
                .map(String::as_str)
                .zip(&row.domains)
                .chain([("mean", &row.mean), ("worst", &row.worst)]);
            for (d, t) in named {
                let Some(t) = t else { continue };
                csv.push_str(&format!(
                    "{},{},{},{},{},{},{},{},{},{}\n",
                    csv_field(&row.name),
                    csv_field(base),
                    csv_field(d),
                    t.diff.n,
                    csv_num(t.diff.mean),
                    csv_num(t.diff.std),
                    csv_num(t.diff.mean - t.diff.half_width),
                    csv_num(t.diff.mean + t.diff.half_width),
                    csv_num(t.t),
                    csv_num(t.p_value)
                ));
            }
        }
        write_atomic(&dir.join("compare_paired.csv"), csv.as_bytes())?;
    }

    let mut csv = String::from("algorithm,seed,domain,questions,accuracy,boot_low,boot_high\n");
    for (alg, seed, d, n, acc, lo, hi) in &questions {
        csv.push_str(&format!(
            "{},{seed},{},{n},{},{},{}\n",
            csv_field(alg),
            csv_field(d),
            csv_num(*acc),
            csv_num(*lo),
            csv_num(*hi)
        ));
    }
    write_atomic(&dir.join("compare_questions.csv"), csv.as_bytes())?;

    let mut groups: Vec<String> = domains.to_vec();
    groups.push(String::from("mean"));
    groups.push(String::from("worst"));
    let bars: Vec<(String, Vec<(f64, f64)>)> = rows
        .iter()
        .map(|row| {
            let vals = row
                .cells
                .iter()
                .chain([&row.mean, &row.worst])
                .map(|s| s.map_or((f64::NAN, 0.0), |s| (s.mean, s.half_width)))
                .collect();
            (row_label(row), vals)
        })
        .collect();
    let svg = grouped_bar_svg(
        &format!("Final exact-match accuracy by domain (bars: {level:.0} % t-interval)"),
        &groups,
        &bars,
        "accuracy (%)",
    );
    write_atomic(&dir.join("compare.svg"), svg.as_bytes())?;

    let mut jsonl = String::new();
    for res in results {
        jsonl.push_str(&serde_json::to_string(res)?);
        jsonl.push('\n');
    }
    write_atomic(&dir.join("compare.jsonl"), jsonl.as_bytes())?;
    Ok(printed)
}
