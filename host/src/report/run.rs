//! One run's report: metrics as JSONL and CSV, plots and a Markdown summary.

use std::path::Path;

use anyhow::Result;
use serde_json::{Value, json};

use crate::io::write_atomic;

use super::format::*;
use super::plot::{Series, line_plot_svg};
use super::points::{DomainScore, EvalPoint, RunReport};

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
pub(super) fn all_domains(r: &RunReport) -> Vec<String> {
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

pub(super) fn metrics_jsonl(r: &RunReport, domains: &[String]) -> String {
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
        let mut line = json!({
            "kind": "round", "round": l.round, "clients": l.clients,
            "train_loss": jnum(l.train_loss), "upload_bytes": l.upload_bytes,
            "cumulative_upload_bytes": cumulative, "dense_bytes": l.dense_bytes,
            "seconds": jnum(l.seconds),
        });
        if !l.missing.is_empty() {
            line["missing_clients"] = json!(l.missing);
        }
        if !l.rejected.is_empty() {
            line["rejected"] = json!(l.rejected);
        }
        push(line);
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
pub(super) fn metrics_csv(r: &RunReport, domains: &[String]) -> String {
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

pub(super) fn rounds_csv(r: &RunReport) -> String {
    let mut out = String::from(
        "round,clients,train_loss,upload_bytes,cumulative_upload_bytes,dense_bytes,seconds,\
         clipped,clip_bound,epsilon\n",
    );
    let mut cumulative = 0u64;
    for l in &r.rounds {
        cumulative = cumulative.saturating_add(l.upload_bytes);
        let clients: Vec<String> = l.clients.iter().map(|c| c.to_string()).collect();
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            l.round,
            clients.join(";"),
            csv_num(l.train_loss),
            l.upload_bytes,
            cumulative,
            l.dense_bytes,
            csv_num(l.seconds),
            l.clipped.map_or_else(String::new, |n| n.to_string()),
            csv_opt(l.clip_bound),
            csv_opt(l.epsilon)
        ));
    }
    out
}

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Metric {
    Accuracy,
    Loss,
}

/// Per-domain lines, a thick mean line and each reference's mean as a dashed horizontal line.
pub(super) fn metric_series(r: &RunReport, domains: &[String], metric: Metric) -> Vec<Series> {
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

pub(super) fn bytes_series(r: &RunReport) -> Vec<Series> {
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
pub(super) fn summary_rows(r: &RunReport) -> Vec<(String, &EvalPoint)> {
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

pub(super) fn score_table(
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

pub(super) fn summary_md(r: &RunReport, domains: &[String], has_accuracy: bool) -> String {
    let mut out = format!("# {}\n\n", md_line(&r.title));
    out.push_str(&format!(
        "Algorithm: `{}` · {} rounds · {} evaluations\n\n",
        md_line(&r.algorithm).replace('`', "'"),
        r.rounds.len(),
        r.evals.len()
    ));
    let faults: Vec<String> = r
        .rounds
        .iter()
        .flat_map(|l| {
            let missing = l
                .missing
                .iter()
                .map(move |c| format!("- round {}: client {c} sent no reply\n", l.round));
            let rejected = l.rejected.iter().map(move |why| {
                format!(
                    "- round {}: rejected the reply of {}\n",
                    l.round,
                    md_line(why)
                )
            });
            missing.chain(rejected)
        })
        .collect();
    if !faults.is_empty() {
        out.push_str("## Faults (these clients did not count in their round)\n\n");
        out.push_str(&faults.concat());
        out.push('\n');
    }
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
    let clipped: Vec<String> = r
        .rounds
        .iter()
        .filter_map(|l| {
            let (n, b) = (l.clipped?, l.clip_bound?);
            Some(format!("{}: {n} of {} to {b:.4}", l.round, l.clients.len()))
        })
        .collect();
    if !clipped.is_empty() {
        out.push_str(&format!(
            "\n\n## Clipping\n\nClients whose update was scaled down, by round: {}.",
            clipped.join("; ")
        ));
    }
    if let Some(e) = r.rounds.iter().rev().find_map(|l| l.epsilon) {
        out.push_str(&format!(
            "\n\n## Differential privacy\n\nClient-level (ε, δ)-DP after {} rounds: ε = {e:.3} \
             (Rényi-DP accountant of the sampled Gaussian mechanism; δ as configured; \
             `rounds.csv` has ε after every round).",
            r.rounds.len()
        ));
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
