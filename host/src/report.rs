//! Run and comparison reports: metrics as JSONL and CSV, SVG plots and Markdown summaries.
//!
//! The plots are hand-written SVG so that a run directory opens in any browser and the crate
//! needs no plotting dependency. Accuracies are fractions in `0..=1` everywhere in the data
//! and are shown ×100 (percent) in tables and plots.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::adapter::write_atomic;

/// One domain's score at one evaluation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DomainScore {
    pub loss: f64,
    /// Fraction of examples answered exactly, `0..=1`; None for domains with nothing to match.
    pub accuracy: Option<f64>,
    pub examples: usize,
}

/// The global model evaluated after `round` rounds (round 0 = the base model + initial adapter).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalPoint {
    pub round: usize,
    pub domains: BTreeMap<String, DomainScore>,
}

impl EvalPoint {
    /// Mean over domains that have an accuracy; None when none has.
    pub fn mean_accuracy(&self) -> Option<f64> {
        mean(
            self.domains
                .values()
                .filter_map(|d| d.accuracy)
                .filter(|a| a.is_finite()),
        )
    }

    /// Mean of the domains' losses (unweighted, domains with a finite loss); NaN when none
    /// has one, so a broken evaluation stays visible instead of reading as 0.
    pub fn mean_loss(&self) -> f64 {
        mean(
            self.domains
                .values()
                .map(|d| d.loss)
                .filter(|l| l.is_finite()),
        )
        .unwrap_or(f64::NAN)
    }
}

/// What one round did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RoundLog {
    pub round: usize,
    pub clients: Vec<usize>,
    pub train_loss: f64,
    pub upload_bytes: u64,
    pub dense_bytes: u64,
    pub seconds: f64,
}

/// Everything a run's report shows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunReport {
    /// e.g. "fedcdd on builtin (4 clients, partition domain)"
    pub title: String,
    pub algorithm: String,
    /// Column order; domains found only in the evaluations are appended after these.
    pub domains: Vec<String>,
    /// Increasing round; `evals[0]` may be round 0 (the base).
    pub evals: Vec<EvalPoint>,
    pub rounds: Vec<RoundLog>,
    /// Reference points evaluated once: "centralized", "local-only" (may be empty).
    pub references: BTreeMap<String, EvalPoint>,
}

/// One finished run in a comparison.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CompareResult {
    pub algorithm: String,
    pub seed: u64,
    pub final_eval: EvalPoint,
    pub upload_bytes: u64,
    pub seconds: f64,
}

/// One line of a line plot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Series {
    pub name: String,
    /// Non-finite points are skipped when drawing.
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    /// Stroke width in pixels; a non-positive or non-finite width falls back to 2.
    pub width: f64,
}

// ---------------------------------------------------------------------------------------------
// Run report
// ---------------------------------------------------------------------------------------------

/// Write `metrics.jsonl`, `metrics.csv`, `rounds.csv`, `accuracy.svg` (only when some domain
/// has an accuracy), `loss.svg`, `bytes.svg` and `summary.md` into `dir`, each atomically so
/// a reader (or a crash mid-run) never sees half a file.
pub fn write_run_report(dir: &Path, r: &RunReport) -> Result<()> {
    let domains = all_domains(r);
    write_atomic(
        &dir.join("metrics.jsonl"),
        metrics_jsonl(r, &domains).as_bytes(),
    )?;
    write_atomic(
        &dir.join("metrics.csv"),
        metrics_csv(r, &domains).as_bytes(),
    )?;
    write_atomic(&dir.join("rounds.csv"), rounds_csv(r).as_bytes())?;

    let has_accuracy = r
        .evals
        .iter()
        .chain(r.references.values())
        .any(|e| e.mean_accuracy().is_some());
    if has_accuracy {
        let svg = line_plot_svg(
            &format!("Exact-match accuracy: {}", r.title),
            "round",
            "accuracy (%)",
            &metric_series(r, &domains, Metric::Accuracy),
            fmt_percent,
        );
        write_atomic(&dir.join("accuracy.svg"), svg.as_bytes())?;
    }
    let svg = line_plot_svg(
        &format!("Eval loss: {}", r.title),
        "round",
        "loss",
        &metric_series(r, &domains, Metric::Loss),
        fmt_plain,
    );
    write_atomic(&dir.join("loss.svg"), svg.as_bytes())?;
    let svg = line_plot_svg(
        &format!("Cumulative upload: {}", r.title),
        "round",
        "uploaded bytes",
        &bytes_series(r),
        fmt_bytes,
    );
    write_atomic(&dir.join("bytes.svg"), svg.as_bytes())?;
    write_atomic(
        &dir.join("summary.md"),
        summary_md(r, &domains, has_accuracy).as_bytes(),
    )?;
    Ok(())
}

/// The accuracy table of `summary.md` (base, global, references × domains and mean), for the
/// CLI to print at the end of a run.
pub fn summary_table(r: &RunReport) -> String {
    let domains = all_domains(r);
    let rows = summary_rows(r);
    if rows.is_empty() {
        return String::from("(no evaluations)\n");
    }
    score_table(
        &domains,
        &rows,
        |s| pct_cell(s.accuracy),
        |e| pct_cell(e.mean_accuracy()),
    )
}

/// `r.domains` first, then any other domain seen in an evaluation, so no score is dropped.
fn all_domains(r: &RunReport) -> Vec<String> {
    let mut out = r.domains.clone();
    for e in r.evals.iter().chain(r.references.values()) {
        for d in e.domains.keys() {
            if !out.contains(d) {
                out.push(d.clone());
            }
        }
    }
    out
}

fn metrics_jsonl(r: &RunReport, domains: &[String]) -> String {
    let mut out = String::new();
    let mut push = |v: Value| {
        out.push_str(&v.to_string());
        out.push('\n');
    };
    for e in &r.evals {
        for d in domains {
            if let Some(s) = e.domains.get(d) {
                push(json!({
                    "kind": "eval", "round": e.round, "domain": d, "loss": jnum(s.loss),
                    "accuracy": jopt(s.accuracy), "examples": s.examples,
                }));
            }
        }
        push(json!({
            "kind": "eval_mean", "round": e.round, "loss": jnum(e.mean_loss()),
            "accuracy": jopt(e.mean_accuracy()),
        }));
    }
    let mut cumulative = 0u64;
    for l in &r.rounds {
        cumulative = cumulative.saturating_add(l.upload_bytes);
        push(json!({
            "kind": "round", "round": l.round, "clients": l.clients,
            "train_loss": jnum(l.train_loss), "upload_bytes": l.upload_bytes,
            "cumulative_upload_bytes": cumulative, "dense_bytes": l.dense_bytes,
            "seconds": jnum(l.seconds),
        }));
    }
    for (name, e) in &r.references {
        for d in domains {
            if let Some(s) = e.domains.get(d) {
                push(json!({
                    "kind": "reference", "name": name, "round": e.round, "domain": d,
                    "loss": jnum(s.loss), "accuracy": jopt(s.accuracy), "examples": s.examples,
                }));
            }
        }
        push(json!({
            "kind": "reference_mean", "name": name, "round": e.round,
            "loss": jnum(e.mean_loss()), "accuracy": jopt(e.mean_accuracy()),
        }));
    }
    out
}

/// Evaluations only: references have no round to sit in this table (they are in the JSONL).
fn metrics_csv(r: &RunReport, domains: &[String]) -> String {
    let mut out = String::from("round,domain,loss,accuracy,examples\n");
    for e in &r.evals {
        let mut examples = 0usize;
        for d in domains {
            if let Some(s) = e.domains.get(d) {
                examples = examples.saturating_add(s.examples);
                out.push_str(&format!(
                    "{},{},{},{},{}\n",
                    e.round,
                    csv_field(d),
                    csv_num(s.loss),
                    csv_opt(s.accuracy),
                    s.examples
                ));
            }
        }
        out.push_str(&format!(
            "{},mean,{},{},{}\n",
            e.round,
            csv_num(e.mean_loss()),
            csv_opt(e.mean_accuracy()),
            examples
        ));
    }
    out
}

fn rounds_csv(r: &RunReport) -> String {
    let mut out = String::from(
        "round,clients,train_loss,upload_bytes,cumulative_upload_bytes,dense_bytes,seconds\n",
    );
    let mut cumulative = 0u64;
    for l in &r.rounds {
        cumulative = cumulative.saturating_add(l.upload_bytes);
        let clients: Vec<String> = l.clients.iter().map(|c| c.to_string()).collect();
        out.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            l.round,
            clients.join(";"),
            csv_num(l.train_loss),
            l.upload_bytes,
            cumulative,
            l.dense_bytes,
            csv_num(l.seconds)
        ));
    }
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Metric {
    Accuracy,
    Loss,
}

/// Per-domain lines, a thick mean line and each reference's mean as a dashed horizontal line.
fn metric_series(r: &RunReport, domains: &[String], metric: Metric) -> Vec<Series> {
    let domain_value = |s: &DomainScore| match metric {
        Metric::Accuracy => s.accuracy.map(|a| a * 100.0),
        Metric::Loss => Some(s.loss),
    };
    let mean_value = |e: &EvalPoint| match metric {
        Metric::Accuracy => e.mean_accuracy().map(|a| a * 100.0),
        Metric::Loss => Some(e.mean_loss()),
    };
    let finite = |v: Option<f64>| v.filter(|v| v.is_finite());

    let mut out = Vec::new();
    for d in domains {
        let points: Vec<(f64, f64)> = r
            .evals
            .iter()
            .filter_map(|e| {
                let v = finite(domain_value(e.domains.get(d)?))?;
                Some((e.round as f64, v))
            })
            .collect();
        if !points.is_empty() {
            out.push(Series {
                name: d.clone(),
                points,
                dashed: false,
                width: 1.8,
            });
        }
    }
    let mean_points: Vec<(f64, f64)> = r
        .evals
        .iter()
        .filter_map(|e| Some((e.round as f64, finite(mean_value(e))?)))
        .collect();
    if !mean_points.is_empty() {
        out.push(Series {
            name: String::from("mean"),
            points: mean_points,
            dashed: false,
            width: 3.5,
        });
    }
    let first = r.evals.first().map_or(0.0, |e| e.round as f64);
    let last = r.evals.last().map_or(1.0, |e| e.round as f64);
    let (x0, x1) = if last > first {
        (first, last)
    } else {
        (first, first + 1.0)
    };
    for (name, e) in &r.references {
        if let Some(v) = finite(mean_value(e)) {
            out.push(Series {
                name: format!("{name} (mean)"),
                points: vec![(x0, v), (x1, v)],
                dashed: true,
                width: 1.8,
            });
        }
    }
    out
}

fn bytes_series(r: &RunReport) -> Vec<Series> {
    if r.rounds.is_empty() {
        return Vec::new();
    }
    // Start both lines at zero so the first round's upload shows as a rise.
    let start: Vec<(f64, f64)> = match r.rounds.first() {
        Some(l) if l.round > 0 => vec![((l.round - 1) as f64, 0.0)],
        _ => Vec::new(),
    };
    let mut upload = start.clone();
    let mut dense = start;
    let (mut cu, mut cd) = (0u64, 0u64);
    for l in &r.rounds {
        cu = cu.saturating_add(l.upload_bytes);
        cd = cd.saturating_add(l.dense_bytes);
        upload.push((l.round as f64, cu as f64));
        dense.push((l.round as f64, cd as f64));
    }
    vec![
        Series {
            name: String::from("uploaded"),
            points: upload,
            dashed: false,
            width: 2.5,
        },
        Series {
            name: String::from("dense equivalent"),
            points: dense,
            dashed: true,
            width: 2.0,
        },
    ]
}

/// Base (if round 0 was evaluated), the last global model, then the references.
fn summary_rows(r: &RunReport) -> Vec<(String, &EvalPoint)> {
    let mut rows = Vec::new();
    let has_base = r.evals.first().is_some_and(|e| e.round == 0);
    if let Some(first) = r.evals.first().filter(|_| has_base) {
        rows.push((String::from("base (round 0)"), first));
    }
    if let Some(last) = r.evals.last()
        && (!has_base || r.evals.len() > 1)
    {
        rows.push((format!("global (round {})", last.round), last));
    }
    for (name, e) in &r.references {
        rows.push((name.clone(), e));
    }
    rows
}

fn score_table(
    domains: &[String],
    rows: &[(String, &EvalPoint)],
    cell: impl Fn(&DomainScore) -> String,
    mean_cell: impl Fn(&EvalPoint) -> String,
) -> String {
    let mut out = String::from("| model |");
    for d in domains {
        out.push_str(&format!(" {} |", md_escape(d)));
    }
    out.push_str(" mean |\n|:---|");
    out.push_str(&"---:|".repeat(domains.len() + 1));
    out.push('\n');
    for (name, e) in rows {
        out.push_str(&format!("| {} |", md_escape(name)));
        for d in domains {
            let c = e.domains.get(d).map_or_else(|| String::from("–"), &cell);
            out.push_str(&format!(" {c} |"));
        }
        out.push_str(&format!(" {} |\n", mean_cell(e)));
    }
    out
}

fn summary_md(r: &RunReport, domains: &[String], has_accuracy: bool) -> String {
    let mut out = format!("# {}\n\n", md_line(&r.title));
    out.push_str(&format!(
        "Algorithm: `{}` · {} rounds · {} evaluations\n\n",
        md_line(&r.algorithm).replace('`', "'"),
        r.rounds.len(),
        r.evals.len()
    ));
    let rows = summary_rows(r);
    if rows.is_empty() {
        out.push_str("No evaluations.\n\n");
    } else {
        out.push_str("## Exact-match accuracy (%)\n\n");
        out.push_str(&score_table(
            domains,
            &rows,
            |s| pct_cell(s.accuracy),
            |e| pct_cell(e.mean_accuracy()),
        ));
        out.push_str("\n## Eval loss\n\n");
        out.push_str(&score_table(
            domains,
            &rows,
            |s| loss_cell(s.loss),
            |e| loss_cell(e.mean_loss()),
        ));
        out.push('\n');
    }

    let upload: u64 = r
        .rounds
        .iter()
        .fold(0u64, |a, l| a.saturating_add(l.upload_bytes));
    let dense: u64 = r
        .rounds
        .iter()
        .fold(0u64, |a, l| a.saturating_add(l.dense_bytes));
    let seconds: f64 = r
        .rounds
        .iter()
        .map(|l| l.seconds)
        .filter(|s| s.is_finite())
        .sum();
    out.push_str("## Communication\n\n");
    out.push_str(&format!(
        "Uploaded {} ({upload} bytes) over {} rounds; the dense (unmasked) equivalent is {} \
         ({dense} bytes).",
        fmt_bytes(upload as f64),
        r.rounds.len(),
        fmt_bytes(dense as f64)
    ));
    if dense > 0 && upload > 0 {
        let ratio = upload as f64 / dense as f64;
        out.push_str(&format!(
            " Ratio uploaded/dense: {ratio:.3} ({:.1}× less).",
            1.0 / ratio
        ));
    } else if dense > 0 {
        out.push_str(" Ratio uploaded/dense: 0.000.");
    }
    out.push_str(&format!(
        "\n\nTraining wall time: {seconds:.1} s.\n\n## Plots\n\n"
    ));
    if has_accuracy {
        out.push_str("![accuracy](accuracy.svg)\n\n");
    }
    out.push_str("![loss](loss.svg)\n\n![uploaded bytes](bytes.svg)\n");
    out
}

// ---------------------------------------------------------------------------------------------
// Comparison report
// ---------------------------------------------------------------------------------------------

/// Mean and sample standard deviation (n−1; 0 for one value) of finite values.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Stat {
    mean: f64,
    std: f64,
    n: usize,
}

fn stat(values: &[f64]) -> Option<Stat> {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let m = mean(v.iter().copied())?;
    let std = if v.len() > 1 {
        let ss: f64 = v.iter().map(|x| (x - m) * (x - m)).sum();
        (ss / (v.len() - 1) as f64).sqrt()
    } else {
        0.0
    };
    Some(Stat {
        mean: m,
        std,
        n: v.len(),
    })
}

/// Means closer than this are a tie: the same accuracies summed in another order differ in
/// the last bits, and `0.7 * 100.0` is not exactly 70.
const TIE_TOLERANCE: f64 = 1e-9;

/// Rank of each value, highest = 1; tied values share the average of the ranks they span.
fn average_ranks(values: &[f64]) -> Vec<f64> {
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

#[derive(Clone, Debug)]
struct CompareRow {
    name: String,
    reference: bool,
    runs: usize,
    /// Accuracy in %, per domain of the comparison.
    cells: Vec<Option<Stat>>,
    /// Per-run mean over the domains, then mean ± std over runs.
    mean: Option<Stat>,
    domain_ranks: Vec<Option<f64>>,
    rank: Option<f64>,
    upload_bytes: Option<f64>,
    seconds: Option<f64>,
}

/// Per-run accuracy (%) averaged over the comparison's domains (all of the run's when none are
/// named), so the mean column is a per-seed quantity whose spread is meaningful.
fn run_mean_accuracy(e: &EvalPoint, domains: &[String]) -> Option<f64> {
    if domains.is_empty() {
        return e.mean_accuracy().map(|a| a * 100.0);
    }
    mean(
        domains
            .iter()
            .filter_map(|d| e.domains.get(d)?.accuracy)
            .filter(|a| a.is_finite())
            .map(|a| a * 100.0),
    )
}

fn stat_row(name: &str, evals: &[&EvalPoint], domains: &[String], reference: bool) -> CompareRow {
    let cells = domains
        .iter()
        .map(|d| {
            let v: Vec<f64> = evals
                .iter()
                .filter_map(|e| e.domains.get(d)?.accuracy)
                .map(|a| a * 100.0)
                .collect();
            stat(&v)
        })
        .collect();
    let per_run: Vec<f64> = evals
        .iter()
        .filter_map(|e| run_mean_accuracy(e, domains))
        .collect();
    CompareRow {
        name: name.to_string(),
        reference,
        runs: evals.len(),
        cells,
        mean: stat(&per_run),
        domain_ranks: vec![None; domains.len()],
        rank: None,
        upload_bytes: None,
        seconds: None,
    }
}

/// Algorithms in first-appearance order with their ranks, then the references (unranked).
fn compare_rows(
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
            let evals: Vec<&EvalPoint> = rs.iter().map(|r| &r.final_eval).collect();
            let mut row = stat_row(alg, &evals, domains, false);
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
        let evals: Vec<&EvalPoint> = evals.iter().collect();
        rows.push(stat_row(name, &evals, domains, true));
    }
    rows
}

fn stat_cell(s: Option<Stat>) -> String {
    s.map_or_else(
        || String::from("–"),
        |s| format!("{:.1} ± {:.1}", s.mean, s.std),
    )
}

fn row_label(row: &CompareRow) -> String {
    if row.reference {
        format!("{} (reference)", row.name)
    } else {
        row.name.clone()
    }
}

fn compare_table(domains: &[String], rows: &[CompareRow]) -> String {
    let mut out = String::from("| algorithm | runs |");
    for d in domains {
        out.push_str(&format!(" {} |", md_escape(d)));
    }
    out.push_str(" mean | avg rank |\n|:---|---:|");
    out.push_str(&"---:|".repeat(domains.len() + 2));
    out.push('\n');
    for row in rows {
        out.push_str(&format!(
            "| {} | {} |",
            md_escape(&row_label(row)),
            row.runs
        ));
        for c in &row.cells {
            out.push_str(&format!(" {} |", stat_cell(*c)));
        }
        let rank = row
            .rank
            .map_or_else(|| String::from("–"), |r| format!("{r:.2}"));
        out.push_str(&format!(" {} | {rank} |\n", stat_cell(row.mean)));
    }
    out
}

/// Write `compare.md`, `compare.csv`, `compare.svg` and `compare.jsonl` into `dir` and return
/// the Markdown table for the CLI to print.
pub fn write_compare_report(
    dir: &Path,
    domains: &[String],
    results: &[CompareResult],
    references: &BTreeMap<String, Vec<EvalPoint>>,
) -> Result<String> {
    let rows = compare_rows(domains, results, references);
    let table = compare_table(domains, &rows);

    let mut md = String::from("# Comparison\n\n");
    md.push_str(&table);
    md.push_str(
        "\nCells: final exact-match accuracy in %, mean ± sample standard deviation (n−1) over \
         runs (seeds); `mean` averages each run over its domains with an accuracy first. \
         Average rank: in each domain where every algorithm has an accuracy, algorithms are \
         ranked by mean accuracy (1 = best; tied means share the average of the ranks they \
         span), and a row's rank is the mean over those domains. References are not ranked.\n\n## Cost\n\n\
         | algorithm | runs | mean upload | mean seconds |\n|:---|---:|---:|---:|\n",
    );
    for row in rows.iter().filter(|r| !r.reference) {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            md_escape(&row.name),
            row.runs,
            row.upload_bytes
                .map_or_else(|| String::from("–"), fmt_bytes),
            row.seconds
                .map_or_else(|| String::from("–"), |s| format!("{s:.1}"))
        ));
    }
    md.push_str("\n![accuracy by domain](compare.svg)\n");
    write_atomic(&dir.join("compare.md"), md.as_bytes())?;

    let mut csv = String::from("algorithm,domain,mean,std,n,rank\n");
    for row in &rows {
        let name = csv_field(&row.name);
        let line = |domain: &str, s: Option<Stat>, rank: Option<f64>| {
            let (m, sd, n) = s.map_or((String::new(), String::new(), 0), |s| {
                (csv_num(s.mean), csv_num(s.std), s.n)
            });
            format!(
                "{name},{},{m},{sd},{n},{}\n",
                csv_field(domain),
                csv_opt(rank)
            )
        };
        for (di, d) in domains.iter().enumerate() {
            csv.push_str(&line(d, row.cells[di], row.domain_ranks[di]));
        }
        csv.push_str(&line("mean", row.mean, row.rank));
    }
    write_atomic(&dir.join("compare.csv"), csv.as_bytes())?;

    let mut groups: Vec<String> = domains.to_vec();
    groups.push(String::from("mean"));
    let bars: Vec<(String, Vec<(f64, f64)>)> = rows
        .iter()
        .map(|row| {
            let vals = row
                .cells
                .iter()
                .chain(std::iter::once(&row.mean))
                .map(|s| s.map_or((f64::NAN, 0.0), |s| (s.mean, s.std)))
                .collect();
            (row_label(row), vals)
        })
        .collect();
    let svg = grouped_bar_svg(
        "Final exact-match accuracy by domain",
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
    Ok(table)
}

// ---------------------------------------------------------------------------------------------
// Formatting helpers
// ---------------------------------------------------------------------------------------------

fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// JSON has no NaN or infinity; null keeps the line parseable and the gap visible.
fn jnum(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

fn jopt(x: Option<f64>) -> Value {
    x.map_or(Value::Null, jnum)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        String::new()
    }
}

fn csv_opt(x: Option<f64>) -> String {
    x.map_or_else(String::new, csv_num)
}

fn pct_cell(a: Option<f64>) -> String {
    match a.filter(|a| a.is_finite()) {
        Some(a) => format!("{:.1}", a * 100.0),
        None => String::from("–"),
    }
}

fn loss_cell(l: f64) -> String {
    if l.is_finite() {
        format!("{l:.3}")
    } else {
        String::from("–")
    }
}

/// One line of Markdown text: newlines would end a table row or heading early.
fn md_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Text for a Markdown table cell: a raw `|` would split the cell.
fn md_escape(s: &str) -> String {
    md_line(s).replace('|', "\\|")
}

/// Escape text for SVG/XML; control characters XML 1.0 forbids become U+FFFD.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(' '),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// Fixed-point with at most `decimals` decimals, trailing zeros dropped (0.6000000001 → "0.6").
fn trim_fixed(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    if s == "-0" {
        String::from("0")
    } else {
        s.to_string()
    }
}

/// A tick label: short, no float noise.
pub fn fmt_plain(v: f64) -> String {
    if !v.is_finite() {
        return String::from("–");
    }
    let a = v.abs();
    if a != 0.0 && !(1e-4..1e15).contains(&a) {
        return format!("{v:e}");
    }
    trim_fixed(v, 6)
}

/// A value already in percent: `20` → "20%".
pub fn fmt_percent(v: f64) -> String {
    format!("{}%", fmt_plain(v))
}

/// Decimal units (1 KB = 1000 B) so that round byte ticks get round labels.
pub fn fmt_bytes(v: f64) -> String {
    if !v.is_finite() {
        return String::from("–");
    }
    const UNITS: [&str; 6] = ["B", "KB", "MB", "GB", "TB", "PB"];
    let mut x = v;
    let mut u = 0;
    while x.abs() >= 1000.0 && u + 1 < UNITS.len() {
        x /= 1000.0;
        u += 1;
    }
    format!("{} {}", trim_fixed(x, if u == 0 { 0 } else { 3 }), UNITS[u])
}

// ---------------------------------------------------------------------------------------------
// SVG plots
// ---------------------------------------------------------------------------------------------

/// Okabe–Ito, reordered so the low-contrast yellow comes last.
const PALETTE: [&str; 8] = [
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442",
];

/// Round tick values (1, 2 or 5 × 10^k apart) covering `lo..=hi`, about `target` intervals.
/// Always at least two distinct finite values, so an axis built on them has a nonzero span.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let (mut lo, mut hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
    if !lo.is_finite() || !hi.is_finite() {
        return vec![0.0, 1.0];
    }
    if hi - lo <= f64::EPSILON * lo.abs().max(hi.abs()) {
        if lo == 0.0 {
            hi = 1.0;
        } else {
            let pad = lo.abs() * 0.1;
            lo -= pad;
            hi += pad;
        }
    }
    let span = hi - lo;
    if !span.is_finite() || span <= 0.0 {
        return if lo < hi && hi.is_finite() && lo.is_finite() {
            vec![lo, hi]
        } else {
            vec![0.0, 1.0]
        };
    }
    let raw = span / target.max(2) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let step = mag
        * if norm <= 1.0 {
            1.0
        } else if norm <= 2.0 {
            2.0
        } else if norm <= 5.0 {
            5.0
        } else {
            10.0
        };
    let start = (lo / step).floor();
    let end = (hi / step).ceil();
    let n = end - start;
    if !step.is_finite() || step <= 0.0 || !n.is_finite() || !(1.0..=1000.0).contains(&n) {
        return vec![lo, hi];
    }
    // Snap to the step's decimals: 3 * 0.2 is 0.6000000000000001 in binary.
    let decimals = (-step.log10().floor()).clamp(0.0, 300.0) as i32;
    let scale = 10f64.powi(decimals);
    (0..=n as usize)
        .map(|i| {
            let v = (start + i as f64) * step;
            let v = if decimals > 0 {
                (v * scale).round() / scale
            } else {
                v
            };
            if v == 0.0 { 0.0 } else { v }
        })
        .collect()
}

/// Ticks for integer data (rounds): never a fractional tick like 0.2.
fn integer_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let t = nice_ticks(lo, hi, target);
    if t.len() >= 2 && t[1] - t[0] >= 1.0 {
        return t;
    }
    let (mut a, mut b) = (lo.floor(), hi.ceil());
    if a == b {
        if a >= 1.0 {
            a -= 1.0;
        }
        b += 1.0;
    }
    let n = (b - a).clamp(1.0, 1000.0) as usize;
    (0..=n).map(|i| a + i as f64).collect()
}

/// Data → pixel mapping of one plot area.
struct Axes {
    left: f64,
    top: f64,
    w: f64,
    h: f64,
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Axes {
    fn px(&self, x: f64) -> f64 {
        pixel(self.left + (x - self.x0) / (self.x1 - self.x0) * self.w)
    }
    fn py(&self, y: f64) -> f64 {
        pixel(self.top + self.h - (y - self.y0) / (self.y1 - self.y0) * self.h)
    }
}

/// Keeps extreme inputs from writing "inf"/"NaN" coordinates into the SVG.
fn pixel(v: f64) -> f64 {
    if v.is_finite() {
        v.clamp(-1e6, 1e6)
    } else {
        0.0
    }
}

fn svg_open(width: f64, height: f64, title: &str) -> String {
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    s.push('\n');
    s.push_str(&format!(
        r#"<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="white"/>"#
    ));
    s.push('\n');
    s.push_str(&format!(
        r#"<text x="{:.1}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        width / 2.0,
        xml_escape(&truncate(title, 90))
    ));
    s.push('\n');
    s
}

fn no_data_svg(title: &str) -> String {
    let (w, h) = (640.0, 360.0);
    let mut s = svg_open(w, h, title);
    s.push_str(&format!(
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="16" fill="#666666">no data</text>"##,
        w / 2.0,
        h / 2.0
    ));
    s.push_str("\n</svg>\n");
    s
}

fn truncate(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max_chars.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Gridlines, tick labels, frame and axis labels.
fn draw_axes(
    s: &mut String,
    ax: &Axes,
    x_ticks: &[(f64, String)],
    y_ticks: &[f64],
    y_format: fn(f64) -> String,
    x_label: &str,
    y_label: &str,
) {
    for &t in y_ticks {
        let y = ax.py(t);
        s.push_str(&format!(
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/>"##,
            ax.left,
            ax.left + ax.w
        ));
        s.push_str(&format!(
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            ax.left - 6.0,
            y + 4.0,
            xml_escape(&y_format(t))
        ));
        s.push('\n');
    }
    for (t, label) in x_ticks {
        let x = ax.px(*t);
        s.push_str(&format!(
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#e3e3e3"/>"##,
            ax.top,
            ax.top + ax.h
        ));
        s.push_str(&format!(
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            ax.top + ax.h + 18.0,
            xml_escape(label)
        ));
        s.push('\n');
    }
    s.push_str(&format!(
        r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#444444"/>"##,
        ax.left, ax.top, ax.w, ax.h
    ));
    s.push('\n');
    if !x_label.is_empty() {
        s.push_str(&format!(
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">{}</text>"#,
            ax.left + ax.w / 2.0,
            ax.top + ax.h + 40.0,
            xml_escape(x_label)
        ));
    }
    s.push_str(&format!(
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle" font-size="13">{}</text>"#,
        ax.top + ax.h / 2.0,
        xml_escape(y_label)
    ));
    s.push('\n');
}

fn finite_points(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect()
}

fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// A line chart: one `<polyline>` per series with two or more finite points, one marker
/// `<path>` per series with exactly one, a legend on the right; dashed horizontal series
/// (reference lines) are also labelled at their right end. No finite point at all → a
/// "no data" plot.
pub fn line_plot_svg(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_format: fn(f64) -> String,
) -> String {
    let clean: Vec<Vec<(f64, f64)>> = series.iter().map(|s| finite_points(&s.points)).collect();
    let all = || clean.iter().flatten();
    let (Some((xmin, xmax)), Some((ymin, ymax))) =
        (min_max(all().map(|p| p.0)), min_max(all().map(|p| p.1)))
    else {
        return no_data_svg(title);
    };
    let x_is_int = all().all(|p| p.0.fract() == 0.0);
    let x_ticks = if x_is_int {
        integer_ticks(xmin, xmax, 8)
    } else {
        nice_ticks(xmin, xmax, 6)
    };
    let y_ticks = nice_ticks(ymin, ymax, 5);
    let (left, top, plot_w, plot_h, legend_w, bottom): (f64, f64, f64, f64, f64, f64) =
        (80.0, 44.0, 500.0, 330.0, 210.0, 56.0);
    let width = left + plot_w + legend_w;
    let height = (top + plot_h + bottom).max(top + 24.0 + 20.0 * series.len() as f64);
    let ax = Axes {
        left,
        top,
        w: plot_w,
        h: plot_h,
        x0: x_ticks[0],
        x1: x_ticks[x_ticks.len() - 1],
        y0: y_ticks[0],
        y1: y_ticks[y_ticks.len() - 1],
    };
    let mut s = svg_open(width, height, title);
    let labelled: Vec<(f64, String)> = x_ticks.iter().map(|&t| (t, fmt_plain(t))).collect();
    draw_axes(&mut s, &ax, &labelled, &y_ticks, y_format, x_label, y_label);

    for (i, (ser, pts)) in series.iter().zip(&clean).enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let width = if ser.width.is_finite() && ser.width > 0.0 {
            ser.width.min(12.0)
        } else {
            2.0
        };
        let dash = if ser.dashed {
            r#" stroke-dasharray="7 4""#
        } else {
            ""
        };
        let name = xml_escape(&ser.name);
        match pts.as_slice() {
            [] => {}
            [(x, y)] => {
                let (cx, cy, r) = (ax.px(*x), ax.py(*y), (width + 2.0).max(4.0));
                s.push_str(&format!(
                    r#"<g><title>{name}</title><path d="M{:.1},{cy:.1} a{r:.1},{r:.1} 0 1,0 {:.1},0 a{r:.1},{r:.1} 0 1,0 {:.1},0" fill="{colour}"/></g>"#,
                    cx - r,
                    2.0 * r,
                    -2.0 * r
                ));
                s.push('\n');
            }
            _ => {
                let coords: Vec<String> = pts
                    .iter()
                    .map(|&(x, y)| format!("{:.1},{:.1}", ax.px(x), ax.py(y)))
                    .collect();
                s.push_str(&format!(
                    r#"<g><title>{name}</title><polyline fill="none" stroke="{colour}" stroke-width="{width:.1}"{dash} stroke-linejoin="round" points="{}"/>"#,
                    coords.join(" ")
                ));
                if !ser.dashed && pts.len() <= 40 {
                    for &(x, y) in pts {
                        s.push_str(&format!(
                            r#"<circle cx="{:.1}" cy="{:.1}" r="{:.1}" fill="{colour}"/>"#,
                            ax.px(x),
                            ax.py(y),
                            (width * 0.9).max(2.2)
                        ));
                    }
                }
                s.push_str("</g>\n");
                let horizontal = pts.iter().all(|p| p.1 == pts[0].1);
                if let (true, true, Some(&(x, y))) = (ser.dashed, horizontal, pts.last()) {
                    s.push_str(&format!(
                        r#"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="{colour}">{}</text>"#,
                        ax.px(x) - 4.0,
                        ax.py(y) - 5.0,
                        xml_escape(&truncate(&ser.name, 40))
                    ));
                    s.push('\n');
                }
            }
        }
        // Legend entry: a short line in the series' style (a <line>, not counted as a series).
        let ly = top + 10.0 + 20.0 * i as f64;
        let lx = left + plot_w + 16.0;
        s.push_str(&format!(
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="{:.1}"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 26.0,
            width.min(5.0),
            lx + 32.0,
            ly + 4.0,
            xml_escape(&truncate(&ser.name, 26))
        ));
        s.push('\n');
    }
    s.push_str("</svg>\n");
    s
}

/// A grouped bar chart: one cluster per group, one `<rect class="bar">` per finite value,
/// error bars of ± err (skipped when err is not finite), legend on the right. The y axis
/// always includes 0, where bars start. No finite value → a "no data" plot.
pub fn grouped_bar_svg(
    title: &str,
    groups: &[String],
    bars: &[(String, Vec<(f64, f64)>)],
    y_label: &str,
) -> String {
    let value = |b: usize, g: usize| -> Option<(f64, f64)> {
        let &(v, e) = bars.get(b)?.1.get(g)?;
        v.is_finite()
            .then_some((v, if e.is_finite() { e.abs() } else { 0.0 }))
    };
    let cells =
        || (0..bars.len()).flat_map(move |b| (0..groups.len()).filter_map(move |g| value(b, g)));
    // Error bars extend the axis only away from zero: a nonnegative quantity such as accuracy
    // keeps its axis at 0 and the bar's lower whisker is clipped there.
    let extent = |(v, e): (f64, f64)| {
        if v >= 0.0 {
            [v, v + e, 0.0]
        } else {
            [v - e, v, 0.0]
        }
    };
    let Some((lo, hi)) = min_max(cells().flat_map(extent)) else {
        return no_data_svg(title);
    };
    let y_ticks = nice_ticks(lo, hi, 5);

    let bar_w = 16.0;
    let group_w = (bars.len() as f64 * bar_w + 24.0).max(60.0);
    let plot_w = (groups.len() as f64 * group_w).max(420.0);
    let group_w = plot_w / groups.len() as f64;
    let max_label = groups
        .iter()
        .map(|g| g.chars().count().min(30))
        .max()
        .unwrap_or(0);
    let rotate = max_label as f64 * 7.0 > group_w - 4.0;
    let (left, top, plot_h, legend_w): (f64, f64, f64, f64) = (80.0, 44.0, 320.0, 230.0);
    let bottom = if rotate {
        50.0 + max_label as f64 * 5.5
    } else {
        56.0
    };
    let width = left + plot_w + legend_w;
    let height = (top + plot_h + bottom).max(top + 24.0 + 20.0 * bars.len() as f64);
    let ax = Axes {
        left,
        top,
        w: plot_w,
        h: plot_h,
        x0: 0.0,
        x1: groups.len() as f64,
        y0: y_ticks[0],
        y1: y_ticks[y_ticks.len() - 1],
    };
    let mut s = svg_open(width, height, title);
    // Group labels are drawn below (rotated when long), so the axes get no x tick labels.
    draw_axes(&mut s, &ax, &[], &y_ticks, fmt_plain, "", y_label);

    let zero = ax.py(0.0);
    s.push_str(&format!(
        r##"<line x1="{:.1}" y1="{zero:.1}" x2="{:.1}" y2="{zero:.1}" stroke="#444444"/>"##,
        ax.left,
        ax.left + ax.w
    ));
    s.push('\n');
    let cluster_w = bars.len() as f64 * bar_w;
    for (g, name) in groups.iter().enumerate() {
        let gx = ax.left + g as f64 * group_w;
        let x0 = gx + (group_w - cluster_w) / 2.0;
        for (b, (series, _)) in bars.iter().enumerate() {
            let Some((v, e)) = value(b, g) else { continue };
            let colour = PALETTE[b % PALETTE.len()];
            let x = x0 + b as f64 * bar_w;
            let (y_top, y_bot) = (ax.py(v.max(0.0)), ax.py(v.min(0.0)));
            s.push_str(&format!(
                r#"<rect class="bar" x="{:.1}" y="{y_top:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>{}: {}</title></rect>"#,
                x + 1.0,
                bar_w - 2.0,
                (y_bot - y_top).max(0.0),
                xml_escape(series),
                xml_escape(&format!("{} ± {}", trim_fixed(v, 2), trim_fixed(e, 2)))
            ));
            if e > 0.0 {
                let cx = x + bar_w / 2.0;
                let clip = |y: f64| ax.py(y.clamp(ax.y0, ax.y1));
                let (ya, yb) = (clip(v + e), clip(v - e));
                s.push_str(&format!(
                    r##"<line x1="{cx:.1}" y1="{ya:.1}" x2="{cx:.1}" y2="{yb:.1}" stroke="#222222"/><line x1="{:.1}" y1="{ya:.1}" x2="{:.1}" y2="{ya:.1}" stroke="#222222"/><line x1="{:.1}" y1="{yb:.1}" x2="{:.1}" y2="{yb:.1}" stroke="#222222"/>"##,
                    cx - 4.0,
                    cx + 4.0,
                    cx - 4.0,
                    cx + 4.0
                ));
            }
            s.push('\n');
        }
        let lx = gx + group_w / 2.0;
        let ly = ax.top + ax.h + 18.0;
        let label = xml_escape(&truncate(name, 30));
        if rotate {
            s.push_str(&format!(
                r#"<text transform="translate({lx:.1},{ly:.1}) rotate(-35)" text-anchor="end">{label}</text>"#
            ));
        } else {
            s.push_str(&format!(
                r#"<text x="{lx:.1}" y="{ly:.1}" text-anchor="middle">{label}</text>"#
            ));
        }
        s.push('\n');
    }
    for (b, (series, _)) in bars.iter().enumerate() {
        let colour = PALETTE[b % PALETTE.len()];
        let ly = top + 10.0 + 20.0 * b as f64;
        let lx = left + plot_w + 16.0;
        s.push_str(&format!(
            r#"<rect x="{lx:.1}" y="{:.1}" width="14" height="12" fill="{colour}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            ly - 6.0,
            lx + 20.0,
            ly + 4.0,
            xml_escape(&truncate(series, 28))
        ));
        s.push('\n');
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "fedcdd-host-report-{tag}-{}-{n}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn score(loss: f64, accuracy: Option<f64>) -> DomainScore {
        DomainScore {
            loss,
            accuracy,
            examples: 10,
        }
    }

    fn point(round: usize, scores: &[(&str, f64, Option<f64>)]) -> EvalPoint {
        EvalPoint {
            round,
            domains: scores
                .iter()
                .map(|&(d, l, a)| (d.to_string(), score(l, a)))
                .collect(),
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn sample_run() -> RunReport {
        RunReport {
            title: String::from("fedcdd on builtin (2 clients, partition domain)"),
            algorithm: String::from("fedcdd"),
            domains: vec![String::from("math"), String::from("code")],
            evals: vec![
                point(0, &[("math", 2.0, Some(0.1)), ("code", 3.0, None)]),
                point(1, &[("math", 1.5, Some(0.3)), ("code", f64::NAN, None)]),
                point(2, &[("math", 1.0, Some(0.5)), ("code", 2.0, None)]),
            ],
            rounds: vec![
                RoundLog {
                    round: 1,
                    clients: vec![0, 1],
                    train_loss: 1.7,
                    upload_bytes: 1000,
                    dense_bytes: 10_000,
                    seconds: 1.5,
                },
                RoundLog {
                    round: 2,
                    clients: vec![1],
                    train_loss: f64::INFINITY,
                    upload_bytes: 500,
                    dense_bytes: 5_000,
                    seconds: 1.0,
                },
            ],
            references: [(
                String::from("centralized"),
                point(2, &[("math", 0.9, Some(0.7)), ("code", 1.8, None)]),
            )]
            .into_iter()
            .collect(),
        }
    }

    fn series_count(svg: &str) -> usize {
        svg.matches("<polyline").count() + svg.matches("<path").count()
    }

    fn assert_clean_svg(svg: &str) {
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        for bad in ["NaN", "nan", "inf"] {
            assert!(!svg.contains(bad), "`{bad}` in {svg}");
        }
    }

    #[test]
    fn mean_accuracy_skips_domains_without_one() {
        let e = point(
            3,
            &[
                ("a", 1.0, Some(0.5)),
                ("b", 3.0, None),
                ("c", f64::NAN, Some(1.0)),
            ],
        );
        assert_eq!(e.mean_accuracy(), Some(0.75));
        // NaN loss left out: (1 + 3) / 2.
        assert_eq!(e.mean_loss(), 2.0);
        let none = point(0, &[("a", 1.0, None)]);
        assert_eq!(none.mean_accuracy(), None);
        assert!(point(0, &[]).mean_loss().is_nan());
        assert_eq!(point(0, &[]).mean_accuracy(), None);
    }

    #[test]
    fn stat_is_mean_and_sample_std() {
        // 2, 4, 6: mean 4, sample variance (4 + 0 + 4) / 2 = 4.
        let s = stat(&[2.0, 4.0, f64::NAN, 6.0]).unwrap();
        assert_eq!((s.mean, s.std, s.n), (4.0, 2.0, 3));
        let one = stat(&[7.0]).unwrap();
        assert_eq!((one.mean, one.std, one.n), (7.0, 0.0, 1));
        assert_eq!(stat(&[]), None);
        assert_eq!(stat(&[f64::NAN]), None);
    }

    #[test]
    fn average_ranks_share_ties() {
        assert_eq!(average_ranks(&[60.0, 60.0, 40.0]), vec![1.5, 1.5, 3.0]);
        assert_eq!(
            average_ranks(&[1.0, 3.0, 2.0, 3.0]),
            vec![4.0, 1.5, 3.0, 1.5]
        );
        assert_eq!(average_ranks(&[5.0, 5.0, 5.0]), vec![2.0, 2.0, 2.0]);
        assert!(average_ranks(&[]).is_empty());
    }

    fn result(alg: &str, seed: u64, d: &[(&str, Option<f64>)], bytes: u64) -> CompareResult {
        CompareResult {
            algorithm: alg.to_string(),
            seed,
            final_eval: EvalPoint {
                round: 5,
                domains: d
                    .iter()
                    .map(|&(n, a)| (n.to_string(), score(1.0, a)))
                    .collect(),
            },
            upload_bytes: bytes,
            seconds: 2.0,
        }
    }

    /// A: d1 {50, 70} → 60 ± 14.142, d2 {20, 40} → 30 ± 14.142, d3 {90, 10};
    /// per-run means over d1..d3 {53.33, 40} → 46.67 ± 9.43.
    /// B (one seed): d1 60, d2 10, d3 none → mean (of d1, d2) 35 ± 0. C: 40, 50, 0 → 30.
    /// d1 ranks: A and B tie at 60 → 1.5 each, C 3. d2: C 1, A 2, B 3.
    /// Average: A 1.75, B 2.25, C 2.0. d3: B has no accuracy → not ranked for anyone.
    fn compare_fixture() -> (Vec<String>, Vec<CompareResult>) {
        let domains = vec!["d1".to_string(), "d2".to_string(), "d3".to_string()];
        let results = vec![
            result(
                "A",
                1,
                &[("d1", Some(0.5)), ("d2", Some(0.2)), ("d3", Some(0.9))],
                100,
            ),
            result(
                "B",
                1,
                &[("d1", Some(0.6)), ("d2", Some(0.1)), ("d3", None)],
                300,
            ),
            result(
                "A",
                2,
                &[("d1", Some(0.7)), ("d2", Some(0.4)), ("d3", Some(0.1))],
                200,
            ),
            result(
                "C",
                1,
                &[("d1", Some(0.4)), ("d2", Some(0.5)), ("d3", Some(0.0))],
                50,
            ),
        ];
        (domains, results)
    }

    #[test]
    fn compare_rows_mean_std_rank() {
        let (domains, results) = compare_fixture();
        let refs: BTreeMap<String, Vec<EvalPoint>> = [(
            "centralized".to_string(),
            vec![
                point(0, &[("d1", 1.0, Some(0.8))]),
                point(0, &[("d1", 1.0, Some(0.9))]),
            ],
        )]
        .into_iter()
        .collect();
        let rows = compare_rows(&domains, &results, &refs);
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["A", "B", "C", "centralized"]);
        let (a, b, c, r) = (&rows[0], &rows[1], &rows[2], &rows[3]);

        assert_eq!(a.runs, 2);
        let a1 = a.cells[0].unwrap();
        assert!(close(a1.mean, 60.0) && close(a1.std, 200f64.sqrt()) && a1.n == 2);
        let a2 = a.cells[1].unwrap();
        assert!(close(a2.mean, 30.0) && close(a2.std, 200f64.sqrt()));
        let am = a.mean.unwrap();
        // Per-run means over d1..d3: (50+20+90)/3 = 53.33.., (70+40+10)/3 = 40.
        assert!(close(am.mean, (160.0 / 3.0 + 40.0) / 2.0));
        assert_eq!(b.cells[2], None);
        let bm = b.mean.unwrap();
        assert!(close(bm.mean, 35.0) && bm.std == 0.0 && bm.n == 1);

        assert_eq!(a.domain_ranks, vec![Some(1.5), Some(2.0), None]);
        assert_eq!(b.domain_ranks, vec![Some(1.5), Some(3.0), None]);
        assert_eq!(c.domain_ranks, vec![Some(3.0), Some(1.0), None]);
        assert_eq!(a.rank, Some(1.75));
        assert_eq!(b.rank, Some(2.25));
        assert_eq!(c.rank, Some(2.0));
        assert_eq!(a.upload_bytes, Some(150.0));

        assert!(r.reference && r.rank.is_none());
        let r1 = r.cells[0].unwrap();
        assert!(close(r1.mean, 85.0) && r1.n == 2);
        assert_eq!(r.cells[1], None);

        let table = compare_table(&domains, &rows);
        assert!(
            table.contains("| A | 2 | 60.0 ± 14.1 | 30.0 ± 14.1 |"),
            "{table}"
        );
        assert!(table.contains("| B | 1 | 60.0 ± 0.0 | 10.0 ± 0.0 | – | 35.0 ± 0.0 | 2.25 |"));
        assert!(table.contains("| centralized (reference) | 2 | 85.0 ± 7.1 | – | – |"));
        assert!(table.contains(" – |\n"), "unranked reference shows –");
    }

    #[test]
    fn write_compare_report_writes_files() {
        let (domains, results) = compare_fixture();
        let tmp = TempDir::new("compare");
        let table = write_compare_report(&tmp.0, &domains, &results, &BTreeMap::new()).unwrap();
        assert!(table.starts_with("| algorithm |"));
        let md = std::fs::read_to_string(tmp.0.join("compare.md")).unwrap();
        assert!(md.contains(&table) && md.contains("Average rank"));

        let csv = std::fs::read_to_string(tmp.0.join("compare.csv")).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        // Header + 3 algorithms × (3 domains + mean).
        assert_eq!(lines.len(), 1 + 3 * 4);
        assert_eq!(lines[0], "algorithm,domain,mean,std,n,rank");
        assert!(lines.contains(&"B,d3,,,0,"));
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("A,mean,46.66") && l.ends_with(",2,1.75")),
            "{csv}"
        );

        let jsonl = std::fs::read_to_string(tmp.0.join("compare.jsonl")).unwrap();
        assert_eq!(jsonl.lines().count(), results.len());
        for line in jsonl.lines() {
            let back: CompareResult = serde_json::from_str(line).unwrap();
            assert!(results.contains(&back));
        }

        let svg = std::fs::read_to_string(tmp.0.join("compare.svg")).unwrap();
        assert_clean_svg(&svg);
        // 3 algorithms × 4 groups, minus B's missing d3.
        assert_eq!(svg.matches(r#"<rect class="bar""#).count(), 11);
    }

    #[test]
    fn nice_ticks_are_round_and_cover() {
        assert_eq!(nice_ticks(0.0, 0.87, 5), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!(
            nice_ticks(3.0, 97.0, 5),
            vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        );
        assert_eq!(
            nice_ticks(-0.3, 0.3, 6),
            vec![-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3]
        );
        for (lo, hi) in [
            (0.0, 0.0),
            (5.0, 5.0),
            (-2.0, -2.0),
            (1e-7, 3e-7),
            (12345.0, 98765.0),
            (0.8, 0.2),
            (f64::NAN, 1.0),
            (-1e308, 1e308),
        ] {
            let t = nice_ticks(lo, hi, 5);
            assert!(t.len() >= 2 && t.len() <= 20, "{lo}..{hi}: {t:?}");
            assert!(t.iter().all(|v| v.is_finite()));
            assert!(t.windows(2).all(|w| w[1] > w[0]), "{t:?}");
            if lo.is_finite() && hi.is_finite() && (hi - lo).abs() < 1e300 {
                assert!(
                    t[0] <= lo.min(hi) && *t.last().unwrap() >= lo.max(hi),
                    "{t:?}"
                );
                let step = t[1] - t[0];
                let mantissa = step / 10f64.powf(step.log10().floor());
                assert!(
                    [1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 1e-6),
                    "{step}"
                );
            }
        }
        assert_eq!(integer_ticks(0.0, 2.0, 8), vec![0.0, 1.0, 2.0]);
        assert_eq!(integer_ticks(0.0, 0.0, 8), vec![0.0, 1.0]);
        assert_eq!(integer_ticks(5.0, 5.0, 8), vec![4.0, 5.0, 6.0]);
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_plain(0.6000000000000001), "0.6");
        assert_eq!(fmt_plain(-0.0), "0");
        assert_eq!(fmt_plain(20.0), "20");
        assert_eq!(fmt_percent(12.5), "12.5%");
        assert_eq!(fmt_bytes(512.0), "512 B");
        assert_eq!(fmt_bytes(1.5e6), "1.5 MB");
        assert_eq!(fmt_bytes(2e9), "2 GB");
        assert_eq!(fmt_bytes(1234.0), "1.234 KB");
        assert_eq!(
            xml_escape("<a&b>\"'\u{1}"),
            "&lt;a&amp;b&gt;&quot;&apos;\u{FFFD}"
        );
        assert_eq!(csv_field("a,b\"c"), "\"a,b\"\"c\"");
        assert_eq!(md_escape("a|b\nc"), "a\\|b c");
    }

    #[test]
    fn line_plot_escapes_and_skips_non_finite() {
        let hostile = "<script>&x</script>";
        let series = vec![
            Series {
                name: hostile.to_string(),
                points: vec![
                    (0.0, 1.0),
                    (1.0, f64::NAN),
                    (2.0, 3.0),
                    (f64::INFINITY, 2.0),
                ],
                dashed: false,
                width: 2.0,
            },
            Series {
                name: "single".to_string(),
                points: vec![(1.0, 2.0)],
                dashed: false,
                width: f64::NAN,
            },
            Series {
                name: "ref".to_string(),
                points: vec![(0.0, 2.5), (2.0, 2.5)],
                dashed: true,
                width: 1.5,
            },
        ];
        let svg = line_plot_svg("t <&>", "round", "y", &series, fmt_plain);
        assert_clean_svg(&svg);
        assert!(!svg.contains("<script>"));
        assert!(svg.contains("&lt;script&gt;&amp;x&lt;/script&gt;"));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        assert_eq!(series_count(&svg), 3);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("stroke-dasharray"));

        // One distinct x, and one distinct y.
        let flat = vec![Series {
            name: "a".into(),
            points: vec![(3.0, 0.5), (3.0, 0.5)],
            dashed: false,
            width: 2.0,
        }];
        let svg = line_plot_svg("flat", "x", "y", &flat, fmt_percent);
        assert_clean_svg(&svg);
        assert_eq!(series_count(&svg), 1);

        for empty in [
            Vec::new(),
            vec![Series {
                name: "nan".into(),
                points: vec![(f64::NAN, f64::NAN)],
                dashed: false,
                width: 1.0,
            }],
        ] {
            let svg = line_plot_svg("e", "x", "y", &empty, fmt_plain);
            assert!(svg.starts_with("<svg") && svg.contains("no data"));
        }
    }

    #[test]
    fn bar_plot_escapes_and_skips_non_finite() {
        let groups = vec!["a<&>b".to_string(), "mean".to_string()];
        let bars = vec![
            ("x".to_string(), vec![(10.0, 2.0), (f64::NAN, 1.0)]),
            ("y&z".to_string(), vec![(-5.0, f64::INFINITY), (20.0, 0.0)]),
            // Shorter than the groups: the missing value is simply not drawn.
            ("short".to_string(), vec![(1.0, 0.5)]),
        ];
        let svg = grouped_bar_svg("bars", &groups, &bars, "acc (%)");
        assert_clean_svg(&svg);
        assert!(svg.contains("a&lt;&amp;&gt;b") && svg.contains("y&amp;z"));
        assert_eq!(svg.matches(r#"<rect class="bar""#).count(), 4);
        assert!(grouped_bar_svg("e", &[], &bars, "y").contains("no data"));
        assert!(grouped_bar_svg("e", &groups, &[], "y").contains("no data"));
    }

    #[test]
    fn jsonl_lines_parse_and_nan_is_null() {
        let r = sample_run();
        let text = metrics_jsonl(&r, &all_domains(&r));
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // 3 evals × (2 domains + mean) + 2 rounds + 1 reference × (2 domains + mean).
        assert_eq!(lines.len(), 9 + 2 + 3);
        let nan_line = lines
            .iter()
            .find(|v| v["kind"] == "eval" && v["round"] == 1 && v["domain"] == "code")
            .unwrap();
        assert_eq!(nan_line["loss"], Value::Null);
        assert_eq!(nan_line["accuracy"], Value::Null);
        let mean1 = lines
            .iter()
            .find(|v| v["kind"] == "eval_mean" && v["round"] == 1)
            .unwrap();
        assert_eq!(mean1["loss"], json!(1.5));
        assert_eq!(mean1["accuracy"], json!(0.3));
        let round2 = lines
            .iter()
            .find(|v| v["kind"] == "round" && v["round"] == 2)
            .unwrap();
        assert_eq!(round2["train_loss"], Value::Null);
        assert_eq!(round2["cumulative_upload_bytes"], json!(1500));
        assert_eq!(round2["clients"], json!([1]));
        assert!(
            lines
                .iter()
                .any(|v| v["kind"] == "reference" && v["name"] == "centralized")
        );
    }

    #[test]
    fn write_run_report_writes_all_files() {
        let r = sample_run();
        let tmp = TempDir::new("run");
        write_run_report(&tmp.0, &r).unwrap();
        let read = |name: &str| std::fs::read_to_string(tmp.0.join(name)).unwrap();

        let csv = read("metrics.csv");
        assert_eq!(csv.lines().count(), 1 + 3 * 3);
        assert!(csv.starts_with("round,domain,loss,accuracy,examples\n"));
        assert!(csv.contains("\n1,code,,,10\n"));
        assert!(csv.contains("\n2,mean,1.5,0.5,20\n"));
        let rounds = read("rounds.csv");
        assert_eq!(rounds.lines().count(), 1 + 2);
        assert!(rounds.contains("\n1,0;1,1.7,1000,1000,10000,1.5\n"));
        assert!(rounds.contains("\n2,1,,500,1500,5000,1\n"));

        let acc = read("accuracy.svg");
        assert_clean_svg(&acc);
        // math, mean, centralized (code has no accuracy).
        assert_eq!(series_count(&acc), 3);
        let loss = read("loss.svg");
        assert_clean_svg(&loss);
        assert_eq!(series_count(&loss), 4);
        let bytes = read("bytes.svg");
        assert_clean_svg(&bytes);
        assert_eq!(series_count(&bytes), 2);
        assert!(bytes.contains("KB"));

        let md = read("summary.md");
        assert!(md.starts_with("# fedcdd on builtin"));
        assert!(md.contains("| base (round 0) | 10.0 | – | 10.0 |"), "{md}");
        assert!(md.contains("| global (round 2) | 50.0 | – | 50.0 |"));
        assert!(md.contains("| centralized | 70.0 | – | 70.0 |"));
        assert!(md.contains("| global (round 2) | 1.000 | 2.000 | 1.500 |"));
        assert!(md.contains("Ratio uploaded/dense: 0.100"));
        assert!(md.contains("accuracy.svg") && md.contains("bytes.svg"));
        assert!(md.contains(&summary_table(&r)));
        let names: Vec<String> = std::fs::read_dir(&tmp.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 7, "no temp files left behind: {names:?}");

        // No accuracy anywhere → no accuracy.svg, and no link to it.
        let mut no_acc = sample_run();
        for e in no_acc
            .evals
            .iter_mut()
            .chain(no_acc.references.values_mut())
        {
            for s in e.domains.values_mut() {
                s.accuracy = None;
            }
        }
        let tmp2 = TempDir::new("run-noacc");
        write_run_report(&tmp2.0, &no_acc).unwrap();
        assert!(!tmp2.0.join("accuracy.svg").exists());
        let md = std::fs::read_to_string(tmp2.0.join("summary.md")).unwrap();
        assert!(!md.contains("accuracy.svg"));
        assert!(md.contains("| base (round 0) | – | – | – |"));

        // Empty report: every file still written, plots say "no data".
        let empty = RunReport {
            title: String::new(),
            algorithm: String::new(),
            domains: Vec::new(),
            evals: Vec::new(),
            rounds: Vec::new(),
            references: BTreeMap::new(),
        };
        let tmp3 = TempDir::new("run-empty");
        write_run_report(&tmp3.0, &empty).unwrap();
        assert!(
            std::fs::read_to_string(tmp3.0.join("loss.svg"))
                .unwrap()
                .contains("no data")
        );
        assert_eq!(summary_table(&empty), "(no evaluations)\n");
    }

    #[test]
    fn summary_rows_base_only_is_not_repeated() {
        let mut r = sample_run();
        r.evals.truncate(1);
        let rows: Vec<String> = summary_rows(&r).into_iter().map(|(n, _)| n).collect();
        assert_eq!(rows, ["base (round 0)", "centralized"]);
        r.evals[0].round = 4;
        let rows: Vec<String> = summary_rows(&r).into_iter().map(|(n, _)| n).collect();
        assert_eq!(rows, ["global (round 4)", "centralized"]);
    }
}
