//! A comparison's report: mean ± std per algorithm and domain, average ranks, a bar plot.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;

use crate::io::write_atomic;

use super::format::*;
use super::plot::grouped_bar_svg;
use super::points::{CompareResult, EvalPoint};

/// Mean and sample standard deviation (n−1; 0 for one value) of finite values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Stat {
    pub(super) mean: f64,
    pub(super) std: f64,
    pub(super) n: usize,
}

pub(super) fn stat(values: &[f64]) -> Option<Stat> {
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

#[derive(Clone, Debug)]
pub(super) struct CompareRow {
    pub(super) name: String,
    pub(super) reference: bool,
    pub(super) runs: usize,
    /// Accuracy in %, per domain of the comparison.
    pub(super) cells: Vec<Option<Stat>>,
    /// Per-run mean over the domains, then mean ± std over runs.
    pub(super) mean: Option<Stat>,
    pub(super) domain_ranks: Vec<Option<f64>>,
    pub(super) rank: Option<f64>,
    pub(super) upload_bytes: Option<f64>,
    pub(super) seconds: Option<f64>,
}

/// Per-run accuracy (%) averaged over the comparison's domains (all of the run's when none are
/// named), so the mean column is a per-seed quantity whose spread is meaningful.
pub(super) fn run_mean_accuracy(e: &EvalPoint, domains: &[String]) -> Option<f64> {
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

pub(super) fn stat_row(
    name: &str,
    evals: &[&EvalPoint],
    domains: &[String],
    reference: bool,
) -> CompareRow {
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

pub(super) fn stat_cell(s: Option<Stat>) -> String {
    s.map_or_else(
        || String::from("–"),
        |s| format!("{:.1} ± {:.1}", s.mean, s.std),
    )
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
