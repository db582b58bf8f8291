use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::compare::*;
use super::format::*;
use super::plot::*;
use super::run::*;
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
        correct: Vec::new(),
    }
}

fn point(round: usize, scores: &[(&str, f64, Option<f64>)]) -> EvalPoint {
    EvalPoint {
        round,
        domains: scores
            .iter()
            .map(|&(d, l, a)| (d.to_string(), score(l, a)))
            .collect(),
        seconds: 0.0,
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
                missing: Vec::new(),
                rejected: Vec::new(),
                clipped: None,
                clip_bound: None,
                epsilon: None,
            },
            RoundLog {
                round: 2,
                clients: vec![1],
                train_loss: f64::INFINITY,
                upload_bytes: 500,
                dense_bytes: 5_000,
                seconds: 1.0,
                missing: vec![0],
                rejected: vec![String::from("client 2: tensor \"x\": bad upload encoding")],
                clipped: None,
                clip_bound: None,
                epsilon: None,
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
fn stat_is_mean_sample_std_and_t_interval() {
    // 2, 4, 6: mean 4, sample variance (4 + 0 + 4) / 2 = 4; t(0.975, 2) = 4.302652729749462.
    let s = stat(&[2.0, 4.0, f64::NAN, 6.0]).unwrap();
    assert_eq!((s.mean, s.std, s.n), (4.0, 2.0, 3));
    assert!(close(s.half_width, 4.302652729749462 * 2.0 / 3f64.sqrt()));
    let one = stat(&[7.0]).unwrap();
    assert_eq!((one.mean, one.std, one.n), (7.0, 0.0, 1));
    assert!(one.half_width.is_nan());
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
            seconds: 0.0,
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

/// t(0.975, 1) = 12.706204736174694 (scipy `stats.t.ppf(0.975, 1)`).
const T975_1: f64 = 12.706204736174694;

#[test]
fn compare_rows_mean_interval_worst_rank() {
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

    assert_eq!(a.runs.len(), 2);
    let a1 = a.cells[0].unwrap();
    assert!(close(a1.mean, 60.0) && close(a1.std, 200f64.sqrt()) && a1.n == 2);
    // Half-width t·s/√n with s = √200, n = 2: 10·t.
    assert!(close(a1.half_width, 10.0 * T975_1));
    let a2 = a.cells[1].unwrap();
    assert!(close(a2.mean, 30.0) && close(a2.std, 200f64.sqrt()));
    let am = a.mean.unwrap();
    // Per-run means over d1..d3: (50+20+90)/3 = 53.33.., (70+40+10)/3 = 40.
    assert!(close(am.mean, (160.0 / 3.0 + 40.0) / 2.0));
    // Worst domain per run: 20 and 10.
    assert!(close(a.worst.unwrap().mean, 15.0));
    assert_eq!(b.cells[2], None);
    let bm = b.mean.unwrap();
    assert!(close(bm.mean, 35.0) && bm.std == 0.0 && bm.n == 1);
    assert!(close(b.worst.unwrap().mean, 10.0));

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
        table.contains("| A | 2 | 60.0 ± 127.1 | 30.0 ± 127.1 |"),
        "{table}"
    );
    assert!(
        table.contains("| B | 1 | 60.0 | 10.0 | – | 35.0 | 10.0 | 2.25 |"),
        "{table}"
    );
    assert!(table.contains("| centralized (reference) | 2 | 85.0 ± 63.5 | – | – |"));
    assert!(table.contains(" – |\n"), "unranked reference shows –");
}

/// Paired differences against a baseline, over the seeds both ran, pinned to scipy:
/// `ttest_rel([60, 70, 65], [50, 66, 61])` = (t 3.0, p 0.09546596626670913); the interval's
/// half-width is t(0.975, 2)·√12/√3 = 8.605305459498924. A seed only one side ran is left out.
#[test]
fn paired_differences_match_scipy() {
    let one = |alg: &str, seed: u64, a: f64| result(alg, seed, &[("d1", Some(a))], 1);
    let results = vec![
        one("Y", 1, 0.50),
        one("Y", 2, 0.66),
        one("Y", 3, 0.61),
        one("X", 1, 0.60),
        one("X", 2, 0.70),
        one("X", 3, 0.65),
        one("X", 4, 0.99),
    ];
    let domains = vec!["d1".to_string()];
    let rows = compare_rows(&domains, &results, &BTreeMap::new());
    let paired = paired_rows(&rows, "Y");
    assert_eq!(paired.len(), 1);
    let x = &paired[0];
    assert_eq!((x.name.as_str(), x.pairs), ("X", 3));
    for t in [x.domains[0].unwrap(), x.mean.unwrap(), x.worst.unwrap()] {
        assert!(close(t.diff.mean, 6.0), "{t:?}");
        assert!(close(t.t, 3.0) && (t.p_value - 0.09546596626670913).abs() < 1e-9);
        assert!((t.diff.half_width - 8.605305459498924).abs() < 1e-9);
    }
    assert!(paired_rows(&rows, "Z").is_empty());
}

#[test]
fn write_compare_report_writes_files() {
    let (domains, mut results) = compare_fixture();
    // Per-question outcomes for one run: 2 of 4 right on d1 (its accuracy 0.5).
    results[0].final_eval.domains.get_mut("d1").unwrap().correct = vec![true, false, false, true];
    let tmp = TempDir::new("compare");
    let notes = CompareNotes {
        baseline: Some("A".to_string()),
        wall_seconds: Some(12.0),
    };
    let table = write_compare_report(&tmp.0, &domains, &results, &BTreeMap::new(), &notes).unwrap();
    assert!(table.starts_with("| algorithm |"));
    let md = std::fs::read_to_string(tmp.0.join("compare.md")).unwrap();
    assert!(md.contains("Average rank") && md.contains("## Paired difference to A"));
    assert!(md.contains("Wall time of this comparison: 12 s"));
    assert!(md.contains("per-question bootstrap"));

    let csv = std::fs::read_to_string(tmp.0.join("compare.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    // Header + 3 algorithms × (3 domains + mean + worst).
    assert_eq!(lines.len(), 1 + 3 * 5);
    assert_eq!(lines[0], "algorithm,domain,mean,std,n,ci_low,ci_high,rank");
    assert!(lines.contains(&"B,d3,,,0,,,"));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("A,mean,46.66") && l.ends_with(",1.75")),
        "{csv}"
    );
    let paired = std::fs::read_to_string(tmp.0.join("compare_paired.csv")).unwrap();
    assert!(paired.starts_with("algorithm,baseline,domain,pairs,diff,std,ci_low,ci_high,t,p\n"));
    // B and C against A on seed 1: one pair each, d1: 60 − 50 and 40 − 50.
    assert!(paired.contains("B,A,d1,1,10,"), "{paired}");
    assert!(paired.contains("C,A,d1,1,-10,"), "{paired}");
    let questions = std::fs::read_to_string(tmp.0.join("compare_questions.csv")).unwrap();
    let q: Vec<&str> = questions.lines().collect();
    assert_eq!(q.len(), 2, "{questions}");
    assert!(q[1].starts_with("A,1,d1,4,50,"), "{questions}");

    let jsonl = std::fs::read_to_string(tmp.0.join("compare.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), results.len());
    for line in jsonl.lines() {
        let back: CompareResult = serde_json::from_str(line).unwrap();
        assert!(results.contains(&back));
    }

    let svg = std::fs::read_to_string(tmp.0.join("compare.svg")).unwrap();
    assert_clean_svg(&svg);
    // 3 algorithms × 5 groups, minus B's missing d3.
    assert_eq!(svg.matches(r#"<rect class="bar""#).count(), 14);
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
    assert!(
        rounds.contains("\n1,0;1,1.7,1000,1000,10000,1.5,,,\n"),
        "{rounds}"
    );
    assert!(rounds.contains("\n2,1,,500,1500,5000,1,,,\n"), "{rounds}");

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
