//! `fedcdd sweep`: the cross product of a grid of config values × seeds, each point one run.
//!
//! A sweep file is a run config plus a `[sweep]` table:
//!
//! ```toml
//! rounds = 10
//! [sweep]
//! seeds = 3
//! grid.algorithm = ["fedavg", "fedcdd"]
//! grid.partition = ["iid", "dirichlet:0.3", "domain"]
//! ```
//!
//! `--grid key=v1,v2` adds (or replaces) a grid key from the command line. Every run lives in
//! `OUT/runs/<hash of its resolved config>`: points whose resolved configs are identical share
//! one run, a finished run is reused, an interrupted one resumes from its checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::progress::Reporter;
use crate::report::{CompareResult, SweepAbout, SweepResult, write_sweep_report};

use super::config::{RunConfig, apply_sets, parse_value};
use super::run::run_or_reuse;

/// A sweep: the shared run keys, the cases (sets of keys changed together, one row each),
/// the grid (keys in order, each with its values) crossed with them, and seeds.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepSpec {
    pub base: toml::Table,
    pub cases: Vec<toml::Table>,
    pub grid: Vec<(String, Vec<toml::Value>)>,
    pub seeds: u64,
    /// Shown at the top of the report.
    pub title: Option<String>,
    /// The question the sweep answers, shown under the title.
    pub question: Option<String>,
}

/// A value as a label: strings without TOML quotes.
fn label_of(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A case as a label: `k=v, k2=v2`, or `default` for no keys.
fn case_label(case: &toml::Table) -> String {
    if case.is_empty() {
        return String::from("default");
    }
    case.iter()
        .map(|(k, v)| format!("{k}={}", label_of(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One run of the sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepPoint {
    /// `(key, value)` of every grid key, in grid order, values as written in TOML.
    pub values: Vec<(String, String)>,
    pub seed: u64,
    /// The resolved config, with defaults that depend on other keys made explicit.
    pub cfg: RunConfig,
    /// [`RunConfig::id`] of the resolved config: the run directory's name.
    pub id: String,
}

/// Splits `v1,v2,…` at the commas outside brackets, braces and quotes (TOML arrays and
/// strings may hold commas).
fn split_values(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth, mut quote) = (Vec::new(), String::new(), 0i32, None);
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter().map(|v| v.trim().to_string()).collect()
}

/// Parses one `--grid key=v1,v2,…`.
pub fn parse_grid_arg(arg: &str) -> Result<(String, Vec<toml::Value>)> {
    let (key, values) = arg
        .split_once('=')
        .with_context(|| format!("--grid {arg:?}: expected key=value1,value2,..."))?;
    let key = key.trim();
    if key.is_empty() {
        bail!("--grid {arg:?}: the key is empty");
    }
    let values = split_values(values);
    if values.iter().any(String::is_empty) {
        bail!("--grid {key}: an empty value in {arg:?}");
    }
    Ok((
        key.to_string(),
        values.iter().map(|v| parse_value(v)).collect(),
    ))
}

impl SweepSpec {
    /// Reads the sweep file (if any; its `[sweep]` table holds `seeds` and `grid`), applies
    /// `--set` to the shared keys, then the `--grid` keys (a key given again replaces the
    /// file's values) and `--seeds`. Every key and value is checked: an error names it.
    pub fn load(
        path: Option<&Path>,
        sets: &[String],
        grids: &[String],
        seeds: Option<u64>,
    ) -> Result<SweepSpec> {
        let origin = path.map_or_else(
            || "the command line".to_string(),
            |p| p.display().to_string(),
        );
        let mut base = match path {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the sweep file {}", p.display()))?
                .parse::<toml::Table>()
                .with_context(|| format!("{}: not valid TOML", p.display()))?,
            None => toml::Table::new(),
        };
        let mut spec = SweepSpec {
            base: toml::Table::new(),
            cases: Vec::new(),
            grid: Vec::new(),
            seeds: 1,
            title: None,
            question: None,
        };
        if let Some(sweep) = base.remove("sweep") {
            let toml::Value::Table(mut sweep) = sweep else {
                bail!("{origin}: `sweep` must be a table ([sweep])");
            };
            if let Some(s) = sweep.remove("seeds") {
                spec.seeds = s
                    .as_integer()
                    .and_then(|s| u64::try_from(s).ok())
                    .with_context(|| format!("{origin}: sweep.seeds must be a positive integer"))?;
            }
            if let Some(g) = sweep.remove("grid") {
                let toml::Value::Table(g) = g else {
                    bail!("{origin}: sweep.grid must be a table of key = [values]");
                };
                for (k, v) in g {
                    let toml::Value::Array(values) = v else {
                        bail!("{origin}: sweep.grid.{k} must be an array of values");
                    };
                    spec.grid.push((k, values));
                }
            }
            if let Some(c) = sweep.remove("cases") {
                let toml::Value::Array(cases) = c else {
                    bail!("{origin}: sweep.cases must be an array of tables");
                };
                for (i, c) in cases.into_iter().enumerate() {
                    let toml::Value::Table(t) = c else {
                        bail!("{origin}: sweep.cases[{i}] must be a table ({{ key = value }})");
                    };
                    spec.cases.push(t);
                }
            }
            for (key, slot) in [("title", &mut spec.title), ("question", &mut spec.question)] {
                if let Some(v) = sweep.remove(key) {
                    let toml::Value::String(text) = v else {
                        bail!("{origin}: sweep.{key} must be a string");
                    };
                    *slot = Some(text);
                }
            }
            if let Some(k) = sweep.keys().next() {
                bail!(
                    "{origin}: unknown key sweep.{k} (expected seeds, grid, cases, title, question)"
                );
            }
        }
        apply_sets(&mut base, sets)?;
        spec.base = base;
        for g in grids {
            let (k, values) = parse_grid_arg(g)?;
            match spec.grid.iter_mut().find(|(key, _)| *key == k) {
                Some(slot) => slot.1 = values,
                None => spec.grid.push((k, values)),
            }
        }
        if let Some(s) = seeds {
            spec.seeds = s;
        }
        spec.check(&origin)?;
        Ok(spec)
    }

    /// Every key and value loads as a run config on its own (so an error names it), and
    /// there is at least one seed.
    fn check(&self, origin: &str) -> Result<()> {
        if self.seeds == 0 {
            bail!("{origin}: seeds must be at least 1");
        }
        load_table(self.base.clone(), &format!("{origin} (shared keys)"))?;
        for case in &self.cases {
            let mut t = self.base.clone();
            for (k, v) in case {
                if self.grid.iter().any(|(g, _)| g == k) {
                    bail!("case {{{}}}: {k} is also a grid key", case_label(case));
                }
                t.insert(k.clone(), v.clone());
            }
            load_table(t, &format!("case {{{}}}", case_label(case)))?;
        }
        for (k, values) in &self.grid {
            if values.is_empty() {
                bail!("grid {k}: no values");
            }
            for v in values {
                let mut t = self.base.clone();
                t.insert(k.clone(), v.clone());
                load_table(t, &format!("grid {k} = {v}"))?;
            }
        }
        Ok(())
    }

    /// The report's columns: `case` (when there are cases), then the grid keys.
    pub fn keys(&self) -> Vec<String> {
        let case = (!self.cases.is_empty()).then(|| String::from("case"));
        case.into_iter()
            .chain(self.grid.iter().map(|(k, _)| k.clone()))
            .collect()
    }

    /// Every point of cases × the grid's cross product (cases outermost, then the first
    /// grid key), each for every seed. A combination of values that is invalid together
    /// (e.g. more sampled clients than clients) is an error that names the values.
    pub fn points(&self) -> Result<Vec<SweepPoint>> {
        // Each combination: the keys to set, and its labels.
        type Combo = (Vec<(String, toml::Value)>, Vec<(String, String)>);
        let mut combos: Vec<Combo> = if self.cases.is_empty() {
            vec![(Vec::new(), Vec::new())]
        } else {
            self.cases
                .iter()
                .map(|c| {
                    let set = c.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                    (set, vec![(String::from("case"), case_label(c))])
                })
                .collect()
        };
        for (k, values) in &self.grid {
            combos = combos
                .into_iter()
                .flat_map(|(set, label)| {
                    values.iter().map(move |v| {
                        let (mut set, mut label) = (set.clone(), label.clone());
                        set.push((k.clone(), v.clone()));
                        label.push((k.clone(), label_of(v)));
                        (set, label)
                    })
                })
                .collect();
        }
        let mut out = Vec::new();
        for (set, label) in combos {
            let mut t = self.base.clone();
            for (k, v) in &set {
                t.insert(k.clone(), v.clone());
            }
            let what = label
                .iter()
                .map(|(k, v)| format!("{k} = {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let cfg = load_table(t, &format!("grid point {what}"))?.resolved();
            for s in 0..self.seeds {
                let mut cfg = cfg.clone();
                cfg.seed = cfg.seed.wrapping_add(s);
                out.push(SweepPoint {
                    values: label.clone(),
                    seed: cfg.seed,
                    id: cfg.id()?,
                    cfg,
                });
            }
        }
        Ok(out)
    }
}

fn load_table(t: toml::Table, origin: &str) -> Result<RunConfig> {
    let text = toml::to_string(&t).context("cannot write the config as TOML")?;
    RunConfig::from_toml(&text, origin)
}

/// Runs (or reuses) every point of `spec` into `out` and writes the sweep report; returns the
/// Markdown table, or None when stopped by Ctrl-C.
pub fn sweep(spec: &SweepSpec, out: &Path, rep: &Reporter) -> Result<Option<String>> {
    let points = spec.points()?;
    let runs = out.join("runs");
    std::fs::create_dir_all(&runs).with_context(|| format!("cannot create {}", runs.display()))?;
    let distinct = {
        let mut ids: Vec<&str> = points.iter().map(|p| p.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    };
    rep.line(&format!(
        "sweep: {} points × {} seeds = {} runs ({distinct} distinct configs) in {}",
        points.len() as u64 / spec.seeds,
        spec.seeds,
        points.len(),
        runs.display()
    ));
    let t0 = Instant::now();
    let (mut ran, mut ran_seconds) = (0usize, 0.0f64);
    let mut done_ids: Vec<String> = Vec::new();
    let mut results = Vec::new();
    let quiet = Reporter::new(true);
    for (i, p) in points.iter().enumerate() {
        let dir: PathBuf = runs.join(&p.id);
        let started = Instant::now();
        let Some((report, reused)) = run_or_reuse(&p.cfg, &dir, &quiet)? else {
            return Ok(None);
        };
        if !reused {
            ran += 1;
            ran_seconds += started.elapsed().as_secs_f64();
        }
        if !done_ids.contains(&p.id) {
            done_ids.push(p.id.clone());
        }
        let last = report
            .evals
            .last()
            .cloned()
            .with_context(|| format!("the run in {} has no evaluation", dir.display()))?;
        let run = CompareResult {
            algorithm: p.cfg.algorithm.name().to_string(),
            seed: p.seed,
            final_eval: last,
            upload_bytes: report.rounds.iter().map(|r| r.upload_bytes).sum(),
            seconds: report.rounds.iter().map(|r| r.seconds).sum(),
        };
        let left = distinct - done_ids.len();
        let eta = if ran > 0 && left > 0 {
            format!(
                ", about {} left",
                fmt_duration(ran_seconds / ran as f64 * left as f64)
            )
        } else {
            String::new()
        };
        rep.line(&format!(
            "[{}/{}] {} seed {}: mean acc {} ({}){eta}",
            i + 1,
            points.len(),
            p.values
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
            p.seed,
            run.final_eval
                .mean_accuracy()
                .map_or_else(|| "–".to_string(), |a| format!("{:.1}%", 100.0 * a)),
            if reused {
                "reused".to_string()
            } else {
                format!("{:.0} s", started.elapsed().as_secs_f64())
            },
        ));
        results.push(SweepResult {
            values: p.values.clone(),
            run,
            run_dir: format!("runs/{}", p.id),
        });
    }
    let about = SweepAbout {
        title: spec.title.clone(),
        question: spec.question.clone(),
        keys: spec.keys(),
        wall_seconds: t0.elapsed().as_secs_f64(),
    };
    let table = write_sweep_report(out, &about, &results)?;
    rep.line(&format!("sweep report in {}/sweep.md", out.display()));
    Ok(Some(table))
}

fn fmt_duration(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.0} s")
    } else if s < 5400.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_split_outside_brackets_and_quotes() {
        assert_eq!(split_values("1,2, 3"), ["1", "2", "3"]);
        assert_eq!(
            split_values(r#"["a","b"],[],"x,y""#),
            [r#"["a","b"]"#, "[]", r#""x,y""#]
        );
        let (k, v) = parse_grid_arg("keep_ratio=0.1,1").unwrap();
        assert_eq!(k, "keep_ratio");
        assert_eq!(v, [toml::Value::Float(0.1), toml::Value::Integer(1)]);
    }

    #[test]
    fn grid_errors_name_the_key() {
        let err = |grids: &[&str]| {
            let g: Vec<String> = grids.iter().map(|s| s.to_string()).collect();
            format!("{:#}", SweepSpec::load(None, &[], &g, Some(1)).unwrap_err())
        };
        let e = err(&["keep_ratio=0.5,abc"]);
        assert!(e.contains("keep_ratio") && e.contains("abc"), "{e}");
        let e = err(&["kep_ratio=0.5"]);
        assert!(e.contains("kep_ratio"), "{e}");
        let e = err(&["partition=domain,dirichlet:-1"]);
        assert!(e.contains("partition") && e.contains("dirichlet:-1"), "{e}");
        let e = err(&["rounds"]);
        assert!(e.contains("rounds") && e.contains("key=value"), "{e}");
        let e = err(&["rounds=4,"]);
        assert!(e.contains("rounds") && e.contains("empty"), "{e}");
        let e = err(&["keep_ratio=2"]);
        assert!(e.contains("keep_ratio"), "{e}");
    }

    #[test]
    fn points_are_the_cross_product_and_share_identical_configs() {
        let g = |s: &str| s.to_string();
        let spec = SweepSpec::load(
            None,
            &[g("rounds=2")],
            &[g("algorithm=fedavg,fedcdd"), g("keep_ratio=1,0.5")],
            Some(2),
        )
        .unwrap();
        let points = spec.points().unwrap();
        assert_eq!(points.len(), 2 * 2 * 2);
        assert_eq!(
            points[0].values,
            [(g("algorithm"), g("fedavg")), (g("keep_ratio"), g("1"))]
        );
        assert_eq!((points[0].seed, points[1].seed), (0, 1));
        // Every point has its own config, except FedCDD with keep_ratio 0.5, which is
        // also what FedCDD without the key resolves to.
        let mut ids: Vec<&str> = points.iter().map(|p| p.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 8);
        let unset = SweepSpec::load(None, &[g("rounds=2")], &[g("algorithm=fedcdd")], Some(1))
            .unwrap()
            .points()
            .unwrap();
        let explicit = points
            .iter()
            .find(|p| p.cfg.algorithm.name() == "fedcdd" && p.seed == 0 && p.values[1].1 == "0.5")
            .unwrap();
        assert_eq!(unset[0].id, explicit.id);
    }

    #[test]
    fn cases_are_rows_crossed_with_the_grid() {
        let dir = std::env::temp_dir().join(format!("fedcdd-cases-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "[sweep]\ntitle = \"T\"\ncases = [{}, { num_clients = 8, sample_clients = 8 }]\n\
             grid.algorithm = [\"fedavg\", \"fedcdd\"]\n",
        )
        .unwrap();
        let spec = SweepSpec::load(Some(&path), &[], &[], None).unwrap();
        assert_eq!(spec.keys(), ["case", "algorithm"]);
        assert_eq!(spec.title.as_deref(), Some("T"));
        let p = spec.points().unwrap();
        assert_eq!(p.len(), 4);
        assert_eq!(p[2].values[0].1, "num_clients=8, sample_clients=8");
        assert_eq!(p[0].values[0].1, "default");
        assert_eq!((p[2].cfg.num_clients, p[2].cfg.sample_clients), (8, 8));
        // A case key that is also a grid key, and an invalid case, are errors naming them.
        let e = SweepSpec::load(Some(&path), &[], &["num_clients=4".into()], None).unwrap_err();
        assert!(format!("{e:#}").contains("num_clients"), "{e:#}");
        std::fs::write(&path, "[sweep]\ncases = [{ sample_clients = 9 }]\n").unwrap();
        let e = SweepSpec::load(Some(&path), &[], &[], None).unwrap_err();
        assert!(format!("{e:#}").contains("sample_clients"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sweep_file_holds_seeds_and_grid_in_order() {
        let dir = std::env::temp_dir().join(format!("fedcdd-sweep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.toml");
        std::fs::write(
            &path,
            "rounds = 3\n[sweep]\nseeds = 2\ngrid.partition = [\"iid\", \"domain\"]\n\
             grid.algorithm = [\"fedavg\"]\n",
        )
        .unwrap();
        let spec =
            SweepSpec::load(Some(&path), &[], &["algorithm=fedcdd,fedavg".into()], None).unwrap();
        let keys: Vec<&str> = spec.grid.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["partition", "algorithm"]);
        assert_eq!(spec.grid[1].1.len(), 2);
        assert_eq!(spec.seeds, 2);
        std::fs::write(&path, "[sweep]\nseed = 2\n").unwrap();
        let e = format!(
            "{:#}",
            SweepSpec::load(Some(&path), &[], &[], None).unwrap_err()
        );
        assert!(e.contains("sweep.seed"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
