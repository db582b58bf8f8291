//! A sweep's report: one row per grid point with the accuracy over seeds (mean and 95 %
//! t-interval per domain, mean, worst domain), the paired difference to the first grid point,
//! the bytes uploaded and the time per run; CSV of every run and of every point; a bar plot by
//! the first grid key and, when the points upload different amounts, accuracy against bytes.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::io::write_atomic;

use super::compare::{LEVEL, RunScores, stat, stat_cell};
use super::format::*;
use super::plot::{PALETTE, Series, grouped_bar_svg, line_plot_svg};
use super::points::CompareResult;
use super::stats::{MeanInterval, PairedTest, paired_t_test};

/// One finished run of a sweep.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SweepResult {
    /// `(grid key, value)` in grid order.
    pub values: Vec<(String, String)>,
    pub run: CompareResult,
    /// The run directory, relative to the sweep's.
    pub run_dir: String,
}

/// What the report says about the sweep besides its runs.
#[derive(Clone, Debug, Default)]
pub struct SweepAbout {
    pub title: Option<String>,
    pub question: Option<String>,
    /// The columns that tell points apart (`case`, then the grid keys), in order.
    pub keys: Vec<String>,
    /// Wall time of the sweep command (runs reused from an earlier call count as 0).
    pub wall_seconds: f64,
}

/// A grid point: its runs (one per seed) summarised.
struct PointRow {
    values: Vec<(String, String)>,
    runs: Vec<RunScores>,
    domains: Vec<Option<MeanInterval>>,
    mean: Option<MeanInterval>,
    worst: Option<MeanInterval>,
    /// Against the first point, on the mean accuracy, over the seeds both ran.
    paired: Option<PairedTest>,
    upload_bytes: Option<f64>,
    seconds: Option<f64>,
}

/// Domains in order of first appearance over the runs.
fn sweep_domains(results: &[SweepResult]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in results {
        for d in r.run.final_eval.domains.keys() {
            if !out.contains(d) {
                out.push(d.clone());
            }
        }
    }
    out
}

fn point_rows(domains: &[String], results: &[SweepResult]) -> Vec<PointRow> {
    // The runs of each point, in order of first appearance.
    type Labels = Vec<(String, String)>;
    let mut groups: Vec<(Labels, Vec<&SweepResult>)> = Vec::new();
    for r in results {
        match groups.iter_mut().find(|(v, _)| *v == r.values) {
            Some((_, g)) => g.push(r),
            None => groups.push((r.values.clone(), vec![r])),
        }
    }
    let mut rows: Vec<PointRow> = groups
        .into_iter()
        .map(|(values, rs)| {
            let runs: Vec<RunScores> = rs
                .iter()
                .map(|r| RunScores::of(r.run.seed, &r.run.final_eval, domains))
                .collect();
            let over = |f: &dyn Fn(&RunScores) -> Option<f64>| {
                stat(&runs.iter().filter_map(f).collect::<Vec<f64>>())
            };
            PointRow {
                domains: (0..domains.len())
                    .map(|d| over(&|r| r.domains.get(d).copied().flatten()))
                    .collect(),
                mean: over(&|r| r.mean),
                worst: over(&|r| r.worst),
                paired: None,
                upload_bytes: mean(rs.iter().map(|r| r.run.upload_bytes as f64)),
                seconds: mean(rs.iter().map(|r| r.run.seconds)),
                values,
                runs,
            }
        })
        .collect();
    if let Some(first) = rows.first().map(|r| r.runs.clone()) {
        for row in rows.iter_mut().skip(1) {
            let (a, b): (Vec<f64>, Vec<f64>) = row
                .runs
                .iter()
                .filter_map(|r| {
                    let base = first.iter().find(|f| f.seed == r.seed)?;
                    Some((r.mean.unwrap_or(f64::NAN), base.mean.unwrap_or(f64::NAN)))
                })
                .unzip();
            row.paired = paired_t_test(&a, &b, LEVEL);
        }
    }
    rows
}

/// A grid value as shown: TOML strings without their quotes.
fn shown(v: &str) -> String {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
        .to_string()
}

fn paired_cell(t: Option<PairedTest>) -> String {
    match t {
        None => String::from("–"),
        Some(t) if t.diff.n < 2 || !t.p_value.is_finite() => format!("{:+.1}", t.diff.mean),
        Some(t) => format!(
            "{:+.1} ± {:.1} (p={:.3})",
            t.diff.mean, t.diff.half_width, t.p_value
        ),
    }
}

fn sweep_table(keys: &[String], domains: &[String], rows: &[PointRow]) -> String {
    let mut out = String::from("|");
    for k in keys {
        out.push_str(&format!(" {} |", md_escape(k)));
    }
    out.push_str(" runs |");
    for d in domains {
        out.push_str(&format!(" {} |", md_escape(d)));
    }
    out.push_str(" mean | worst domain | Δ mean vs first row | upload / run | s / run |\n|");
    out.push_str(&":---|".repeat(keys.len()));
    out.push_str(&"---:|".repeat(domains.len() + 6));
    out.push('\n');
    for row in rows {
        out.push('|');
        for (_, v) in &row.values {
            out.push_str(&format!(" {} |", md_escape(&shown(v))));
        }
        out.push_str(&format!(" {} |", row.runs.len()));
        for c in &row.domains {
            out.push_str(&format!(" {} |", stat_cell(*c)));
        }
        out.push_str(&format!(
            " {} | {} | {} | {} | {} |\n",
            stat_cell(row.mean),
            stat_cell(row.worst),
            paired_cell(row.paired),
            row.upload_bytes
                .map_or_else(|| String::from("–"), fmt_bytes),
            row.seconds
                .map_or_else(|| String::from("–"), |s| format!("{s:.0}"))
        ));
    }
    out
}

/// How an algorithm fares against the baseline at one setting of the other keys.
fn verdict(t: Option<PairedTest>) -> &'static str {
    match t {
        Some(t) if t.diff.n >= 2 && t.diff.half_width.is_finite() => {
            if t.diff.mean - t.diff.half_width > 0.0 {
                "wins"
            } else if t.diff.mean + t.diff.half_width < 0.0 {
                "loses"
            } else {
                "tie (interval holds 0)"
            }
        }
        Some(t) if t.diff.n >= 2 && t.diff.std == 0.0 => {
            if t.diff.mean > 0.0 {
                "wins (every seed)"
            } else if t.diff.mean < 0.0 {
                "loses (every seed)"
            } else {
                "tie (equal on every seed)"
            }
        }
        _ => "– (needs 2+ seeds)",
    }
}

/// Where the grid has an `algorithm` key: every other algorithm against its first value at
/// each setting of the other keys, on the mean and the worst domain (paired over seeds).
fn verdict_table(keys: &[String], rows: &[PointRow]) -> Option<String> {
    let ai = keys.iter().position(|k| k == "algorithm")?;
    let base_alg = rows.first()?.values.get(ai)?.1.clone();
    let others = |r: &PointRow| -> Vec<(String, String)> {
        r.values
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != ai)
            .map(|(_, kv)| kv.clone())
            .collect()
    };
    let paired = |a: &PointRow, b: &PointRow, f: &dyn Fn(&RunScores) -> Option<f64>| {
        let (x, y): (Vec<f64>, Vec<f64>) = a
            .runs
            .iter()
            .filter_map(|r| {
                let base = b.runs.iter().find(|q| q.seed == r.seed)?;
                Some((f(r).unwrap_or(f64::NAN), f(base).unwrap_or(f64::NAN)))
            })
            .unzip();
        paired_t_test(&x, &y, LEVEL)
    };
    let mut lines = Vec::new();
    for row in rows.iter().filter(|r| r.values[ai].1 != base_alg) {
        let setting = others(row);
        let Some(base) = rows
            .iter()
            .find(|b| b.values[ai].1 == base_alg && others(b) == setting)
        else {
            continue;
        };
        let m = paired(row, base, &|r| r.mean);
        let w = paired(row, base, &|r| r.worst);
        let setting = if setting.is_empty() {
            String::from("–")
        } else {
            setting
                .iter()
                .map(|(k, v)| format!("{k}={}", shown(v)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        lines.push(format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            md_escape(&row.values[ai].1),
            md_escape(&setting),
            paired_cell(m),
            verdict(m),
            paired_cell(w),
            verdict(w)
        ));
    }
    if lines.is_empty() {
        return None;
    }
    Some(format!(
        "| algorithm | setting | Δ mean vs {0} | on the mean | Δ worst domain vs {0} | on the \
         worst domain |\n|:---|:---|---:|:---|---:|:---|\n{1}",
        md_escape(&base_alg),
        lines.concat()
    ))
}

/// `k=v, …` of the keys other than `skip`.
fn series_name(values: &[(String, String)], skip: usize) -> String {
    let parts: Vec<String> = values
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != skip)
        .map(|(_, (k, v))| format!("{k}={}", shown(v)))
        .collect();
    if parts.is_empty() {
        String::from("accuracy")
    } else {
        parts.join(", ")
    }
}

/// Writes `sweep.md`, `sweep.csv` (one line per run), `sweep_points.csv` (one per grid
/// point), `sweep.svg` and, where the points upload different amounts, `sweep_bytes.svg`
/// into `dir`; returns the Markdown table.
pub fn write_sweep_report(
    dir: &Path,
    about: &SweepAbout,
    results: &[SweepResult],
) -> Result<String> {
    let keys = &about.keys[..];
    let domains = sweep_domains(results);
    let rows = point_rows(&domains, results);
    let table = sweep_table(keys, &domains, &rows);
    let level = 100.0 * LEVEL;
    let seeds = rows.iter().map(|r| r.runs.len()).max().unwrap_or(0);
    let bytes_vary = {
        let b: Vec<f64> = rows.iter().filter_map(|r| r.upload_bytes).collect();
        b.iter().any(|x| (x - b[0]).abs() > 0.01 * b[0].abs())
    };

    let mut md = format!("# {}\n\n", about.title.as_deref().unwrap_or("Sweep"));
    if let Some(q) = &about.question {
        md.push_str(&format!("{}\n\n", md_line(q)));
    }
    md.push_str(&format!(
        "{} points × up to {seeds} seeds. Wall time of this sweep: {} (runs reused from an \
         earlier call count as 0).\n\n",
        rows.len(),
        fmt_wall(about.wall_seconds)
    ));
    md.push_str(&table);
    md.push_str(&format!(
        "\nCells: final exact-match accuracy in %, mean over seeds ± the half-width of its \
         {level:.0} % t-interval (one seed: the bare value). `worst domain`: each run's lowest \
         domain accuracy, averaged over seeds. `Δ mean vs first row`: the mean accuracy minus \
         the first row's over the seeds both ran, ± the half-width of its {level:.0} % \
         t-interval, with the paired t-test's p-value. `upload / run`: bytes the clients \
         uploaded over the whole run (read rows at equal bytes against each other). Seeds \
         change the partition, sampling, init and masks together. Every run's directory is in \
         `sweep.csv`.\n"
    ));
    let verdicts = verdict_table(keys, &rows);
    if let Some(v) = &verdicts {
        md.push_str(&format!(
            "\n## Against the first algorithm, setting by setting\n\n{v}\nA verdict is \
             `wins` / `loses` when the whole {level:.0} % interval of the paired difference \
             (over the seeds both ran) lies above / below 0, and a tie when it holds 0: more \
             seeds narrow the interval.\n"
        ));
    }
    md.push_str("\n![accuracy](sweep.svg)\n");
    if bytes_vary {
        md.push_str("\n![accuracy against uploaded bytes](sweep_bytes.svg)\n");
    }
    write_atomic(&dir.join("sweep.md"), md.as_bytes())?;

    let mut csv = String::new();
    for k in keys {
        csv.push_str(&format!("{},", csv_field(k)));
    }
    csv.push_str("seed,");
    for d in &domains {
        csv.push_str(&format!("{},", csv_field(d)));
    }
    csv.push_str("mean,worst,upload_bytes,seconds,run_dir\n");
    for r in results {
        for (_, v) in &r.values {
            csv.push_str(&format!("{},", csv_field(&shown(v))));
        }
        let s = RunScores::of(r.run.seed, &r.run.final_eval, &domains);
        csv.push_str(&format!("{},", r.run.seed));
        for a in &s.domains {
            csv.push_str(&format!("{},", csv_opt(*a)));
        }
        csv.push_str(&format!(
            "{},{},{},{},{}\n",
            csv_opt(s.mean),
            csv_opt(s.worst),
            r.run.upload_bytes,
            csv_num(r.run.seconds),
            csv_field(&r.run_dir)
        ));
    }
    write_atomic(&dir.join("sweep.csv"), csv.as_bytes())?;

    let mut csv = String::new();
    for k in keys {
        csv.push_str(&format!("{},", csv_field(k)));
    }
    csv.push_str("runs,metric,mean,std,ci_low,ci_high,diff_vs_first,p_vs_first,upload_bytes\n");
    for row in &rows {
        let prefix: String = row
            .values
            .iter()
            .map(|(_, v)| format!("{},", csv_field(&shown(v))))
            .collect();
        let named = domains
            .iter()
            .map(String::as_str)
            .zip(&row.domains)
            .chain([("mean", &row.mean), ("worst", &row.worst)]);
        for (metric, s) in named {
            let Some(s) = s else { continue };
            let (diff, p) = match (metric, row.paired) {
                ("mean", Some(t)) => (csv_num(t.diff.mean), csv_num(t.p_value)),
                _ => (String::new(), String::new()),
            };
            csv.push_str(&format!(
                "{prefix}{},{},{},{},{},{},{diff},{p},{}\n",
                row.runs.len(),
                csv_field(metric),
                csv_num(s.mean),
                csv_num(s.std),
                csv_num(s.mean - s.half_width),
                csv_num(s.mean + s.half_width),
                csv_opt(row.upload_bytes)
            ));
        }
    }
    write_atomic(&dir.join("sweep_points.csv"), csv.as_bytes())?;

    // Bars: groups are the first key's values, one bar per combination of the other keys.
    let mut groups: Vec<String> = Vec::new();
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for row in &rows {
        let g = row
            .values
            .first()
            .map_or_else(String::new, |(_, v)| shown(v));
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    for row in &rows {
        let name = series_name(&row.values, 0);
        let gi = row
            .values
            .first()
            .and_then(|(_, v)| groups.iter().position(|g| *g == shown(v)))
            .unwrap_or(0);
        let idx = match series.iter().position(|(n, _)| *n == name) {
            Some(i) => i,
            None => {
                series.push((name, vec![(f64::NAN, 0.0); groups.len()]));
                series.len() - 1
            }
        };
        if let Some(m) = row.mean {
            series[idx].1[gi] = (m.mean, m.half_width);
        }
    }
    let title = match keys.first() {
        Some(k) => format!("Mean accuracy by {k} (bars: {level:.0} % t-interval)"),
        None => String::from("Mean accuracy"),
    };
    let svg = grouped_bar_svg(&title, &groups, &series, "mean accuracy (%)");
    write_atomic(&dir.join("sweep.svg"), svg.as_bytes())?;

    if bytes_vary {
        // Accuracy against uploaded MB: one line per combination of the keys other than the
        // one that changes the bytes most (keep_ratio when it is a grid key).
        let skip = keys.iter().position(|k| k == "keep_ratio").unwrap_or(0);
        let mut lines: Vec<Series> = Vec::new();
        for row in &rows {
            let (Some(m), Some(b)) = (row.mean, row.upload_bytes) else {
                continue;
            };
            let name = series_name(&row.values, skip);
            match lines.iter_mut().find(|s| s.name == name) {
                Some(s) => s.points.push((b / 1e6, m.mean)),
                None => lines.push(Series {
                    name,
                    points: vec![(b / 1e6, m.mean)],
                    dashed: false,
                    width: 2.0,
                }),
            }
        }
        for (i, s) in lines.iter_mut().enumerate() {
            s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
            s.dashed = i >= PALETTE.len();
        }
        let svg = line_plot_svg(
            "Mean accuracy against bytes uploaded per run",
            "uploaded per run (MB)",
            "mean accuracy (%)",
            &lines,
            fmt_plain,
        );
        write_atomic(&dir.join("sweep_bytes.svg"), svg.as_bytes())?;
    }
    Ok(match verdicts {
        Some(v) => format!("{table}\n{v}"),
        None => table,
    })
}

fn fmt_wall(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0} s")
    } else {
        format!("{:.1} min", s / 60.0)
    }
}
