//! `fedcdd run` and `fedcdd compare`: argument parsing, the run directory, Ctrl-C, reports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use fedcdd_core::Algorithm;

use crate::adapter::{save_adapter, write_atomic};
use crate::cli_model::Progress;
use crate::report::{
    CompareResult, EvalPoint, RunReport, summary_table, write_compare_report, write_run_report,
};

use super::config::RunConfig;
use super::runner::{Outcome, Reporter, STOP, reference_point, run_rounds};
use super::setup::build_setup;

#[derive(Args, Debug, Clone)]
#[command(after_help = "Examples:\n  \
    fedcdd run                                   # FedCDD on the built-in benchmark and base model\n  \
    fedcdd run --set algorithm=fedavg --set rounds=4\n  \
    fedcdd run exp.toml --out runs/exp1          # your config (flat TOML, keys as in config.toml of any run)\n  \
    fedcdd run --resume runs/exp1                # continue after the last complete round\n\n\
    Every key of the run's config.toml can be set: algorithm, seed, model, data, client_data, \
    eval_data, partition (domain | iid | dirichlet:A), num_clients, sample_clients, rounds, \
    local_steps, batch, micro_batch, seq, lr, lr_min, optimizer, lora_r, lora_alpha, \
    lora_dropout, lora_targets, fedprox_mu, keep_ratio, noise_scale, importance, upload_dtype, \
    server_lr, server_beta1, server_beta2, server_tau, fedopt_variant, norm_axis, target, \
    weighting, renormalize, eval_every, eval_questions, references, ...")]
pub struct RunArgs {
    /// Run configuration (flat TOML); default: the built-in benchmark with FedCDD.
    pub config: Option<PathBuf>,
    /// Override one key: `--set rounds=4 --set algorithm=fedavg`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    #[command(flatten)]
    pub shortcuts: Shortcuts,
    /// Run directory [default: runs/<algorithm>-s<seed>, numbered if taken].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in this directory from its last complete round (its own config).
    #[arg(long, conflicts_with_all = ["config", "sets", "out", "model", "data", "eval_data", "algorithm", "rounds", "seed"])]
    pub resume: Option<PathBuf>,
    /// Only errors and the final table.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Example:\n  fedcdd compare --algorithms fedavg,fedcdd --seeds 3 --set rounds=6"
)]
pub struct CompareArgs {
    /// Shared run configuration (flat TOML); default: the built-in benchmark.
    pub config: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    #[command(flatten)]
    pub shortcuts: Shortcuts,
    /// Algorithms to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fedavg,fedprox,scaffold,fedavgm,fedadam,fedyogi,fedadagrad,ffa-lora,fedsa-lora,flora,fedcdd"
    )]
    pub algorithms: Vec<String>,
    /// Seeds per algorithm (seed, seed+1, ...).
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Directory of the runs and the comparison report; finished runs inside are reused.
    #[arg(long, default_value = "runs/compare")]
    pub out: PathBuf,
    #[arg(long)]
    pub quiet: bool,
}

/// Shortcuts for the most used keys (the same as `--set model=...` etc.).
#[derive(Args, Debug, Clone, Default)]
pub struct Shortcuts {
    /// HF LLaMA model directory (key `model`; default: the built-in base model).
    #[arg(long)]
    pub model: Option<String>,
    /// Training records with a domain field, partitioned among clients (key `data`).
    #[arg(long)]
    pub data: Option<String>,
    /// Held-out records with a domain field (key `eval_data`).
    #[arg(long)]
    pub eval_data: Option<String>,
    /// Key `algorithm`.
    #[arg(long)]
    pub algorithm: Option<String>,
    /// Key `rounds`.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Key `seed`.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl Shortcuts {
    /// The shortcuts as `--set` values (after the explicit ones, so they win).
    fn sets(&self, explicit: &[String]) -> Vec<String> {
        let q = |v: &str| toml::Value::String(v.to_string()).to_string();
        let mut out = explicit.to_vec();
        for (k, v) in [
            ("model", &self.model),
            ("data", &self.data),
            ("eval_data", &self.eval_data),
            ("algorithm", &self.algorithm),
        ] {
            if let Some(v) = v {
                out.push(format!("{k}={}", q(v)));
            }
        }
        if let Some(r) = self.rounds {
            out.push(format!("rounds={r}"));
        }
        if let Some(s) = self.seed {
            out.push(format!("seed={s}"));
        }
        out
    }
}

fn install_ctrl_c() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if STOP.swap(true, Ordering::SeqCst) {
                // Second Ctrl-C: leave now; the last checkpoint is complete on disk.
                eprintln!("\nstopped");
                std::process::exit(130);
            }
            eprintln!("\nstopping after the current client (Ctrl-C again to quit now)");
        });
    });
}

fn reporter(quiet: bool) -> Reporter {
    let mut bar = Progress::new();
    bar.live &= !quiet;
    Reporter { quiet, bar }
}

/// A free default run directory: `runs/<algorithm>-s<seed>`, then `-2`, `-3`, ...
fn default_run_dir(cfg: &RunConfig) -> PathBuf {
    let base = PathBuf::from("runs").join(format!("{}-s{}", cfg.algorithm, cfg.seed));
    let mut p = base.clone();
    let mut i = 2;
    while p.exists() {
        p = PathBuf::from(format!("{}-{i}", base.display()));
        i += 1;
    }
    p
}

/// Runs one configuration into `run_dir` (resuming when it has a checkpoint and `resume`),
/// writes the report and returns it; `None` when interrupted.
pub fn run_one(
    cfg: &RunConfig,
    run_dir: &Path,
    resume: bool,
    rep: &Reporter,
) -> Result<Option<RunReport>> {
    let start = Instant::now();
    let setup = build_setup(cfg, &mut |s| rep.line(s))?;
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    write_atomic(&run_dir.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    rep.line(&format!(
        "{} on {} clients ({}), {} rounds of {} sampled x {} local steps; run directory {}",
        cfg.algorithm,
        setup.clients.len(),
        setup
            .clients
            .iter()
            .map(|c| format!("{}:{} ({} ex)", c.id, c.label, c.examples.len()))
            .collect::<Vec<_>>()
            .join(", "),
        cfg.rounds,
        cfg.sample_clients.min(setup.clients.len()),
        cfg.local_steps,
        run_dir.display()
    ));
    let st = match run_rounds(&setup, run_dir, resume, rep)? {
        Outcome::Finished(st) => *st,
        Outcome::Interrupted { rounds_done } => {
            eprintln!(
                "interrupted: the checkpoint holds {rounds_done} complete rounds; continue with\n  fedcdd run --resume {}",
                run_dir.display()
            );
            return Ok(None);
        }
    };
    // Reference points, computed once per run directory.
    let refs_path = run_dir.join("references.json");
    let mut references: BTreeMap<String, EvalPoint> = std::fs::read(&refs_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for kind in &cfg.references {
        if !references.contains_key(kind) {
            rep.line(&format!("reference point: {kind}"));
            let p = reference_point(&setup, kind, rep)?;
            rep.line(&format!("{kind}: {}", super::runner::format_eval_line(&p)));
            references.insert(kind.clone(), p);
            write_atomic(&refs_path, &serde_json::to_vec_pretty(&references)?)?;
        }
        if STOP.load(Ordering::SeqCst) {
            return Ok(None);
        }
    }
    let mut st = st;
    st.global.sort_by(|a, b| a.name.cmp(&b.name));
    save_adapter(
        &run_dir.join("adapter"),
        &st.global,
        Some(
            &cfg.lora()?
                .to_peft_json(&setup.base_dir.display().to_string()),
        ),
    )?;
    let report = RunReport {
        title: format!(
            "{} on {} ({} clients, partition {})",
            cfg.algorithm,
            if cfg.builtin_data() {
                "the built-in benchmark"
            } else {
                cfg.data.as_str()
            },
            setup.clients.len(),
            cfg.partition
        ),
        algorithm: cfg.algorithm.clone(),
        domains: setup.domains.clone(),
        evals: st.progress.evals.clone(),
        rounds: st.progress.rounds.clone(),
        references,
    };
    write_run_report(run_dir, &report)?;
    rep.line(&format!(
        "done in {:.0} s: report in {}/summary.md, adapter in {}/adapter",
        start.elapsed().as_secs_f64(),
        run_dir.display(),
        run_dir.display()
    ));
    Ok(Some(report))
}

pub fn cmd_run(a: &RunArgs) -> Result<()> {
    install_ctrl_c();
    let rep = reporter(a.quiet);
    let (cfg, run_dir, resume) = match &a.resume {
        Some(dir) => {
            let path = dir.join("config.toml");
            if !path.is_file() {
                bail!("{} is not a run directory (no config.toml)", dir.display());
            }
            (RunConfig::load(Some(&path), &[])?, dir.clone(), true)
        }
        None => {
            let cfg = RunConfig::load(a.config.as_deref(), &a.shortcuts.sets(&a.sets))?;
            let dir = a.out.clone().unwrap_or_else(|| default_run_dir(&cfg));
            if dir.join("checkpoint").exists() {
                bail!(
                    "{} already holds a run; continue it with --resume {0}, or choose another --out",
                    dir.display()
                );
            }
            (cfg, dir, false)
        }
    };
    match run_one(&cfg, &run_dir, resume, &rep)? {
        Some(report) => crate::cli::print_stdout(&summary_table(&report)),
        None => std::process::exit(130),
    }
}

pub fn cmd_compare(a: &CompareArgs) -> Result<()> {
    install_ctrl_c();
    let rep = reporter(a.quiet);
    let base = RunConfig::load(a.config.as_deref(), &a.shortcuts.sets(&a.sets))?;
    if a.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    for alg in &a.algorithms {
        if Algorithm::from_name(alg).is_none() {
            bail!(
                "unknown algorithm {alg:?}; expected some of {}",
                Algorithm::ALL.map(|x| x.name()).join(",")
            );
        }
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let mut results = Vec::new();
    let mut references: BTreeMap<String, Vec<EvalPoint>> = BTreeMap::new();
    let mut domains = Vec::new();
    for s in 0..a.seeds {
        for (i, alg) in a.algorithms.iter().enumerate() {
            let mut cfg = base.clone();
            cfg.algorithm = alg.clone();
            cfg.seed = base.seed + s;
            // Reference points do not depend on the algorithm: the first run of a seed has them.
            if i > 0 {
                cfg.references.clear();
            }
            let dir = a.out.join(format!("{alg}-s{}", cfg.seed));
            let done = finished_report(&dir, &cfg);
            let report = match done {
                Some(r) => {
                    rep.line(&format!(
                        "{alg} seed {}: reusing the finished run in {}",
                        cfg.seed,
                        dir.display()
                    ));
                    r
                }
                None => {
                    let resume = dir.join("checkpoint").join("state.json").is_file();
                    match run_one(&cfg, &dir, resume, &rep)? {
                        Some(r) => r,
                        None => std::process::exit(130),
                    }
                }
            };
            let last = report
                .evals
                .last()
                .cloned()
                .context("the run has no evaluation")?;
            if domains.is_empty() {
                domains = report.domains.clone();
            }
            for (k, p) in &report.references {
                references.entry(k.clone()).or_default().push(p.clone());
            }
            results.push(CompareResult {
                algorithm: alg.clone(),
                seed: cfg.seed,
                final_eval: last,
                upload_bytes: report.rounds.iter().map(|r| r.upload_bytes).sum(),
                seconds: report.rounds.iter().map(|r| r.seconds).sum(),
            });
        }
    }
    let table = write_compare_report(&a.out, &domains, &results, &references)?;
    rep.line(&format!("comparison in {}/compare.md", a.out.display()));
    crate::cli::print_stdout(&table)
}

/// The report of a finished run in `dir` with exactly this config, if there is one.
fn finished_report(dir: &Path, cfg: &RunConfig) -> Option<RunReport> {
    let text = std::fs::read_to_string(dir.join("config.toml")).ok()?;
    if text != cfg.to_toml().ok()? {
        return None;
    }
    let state: super::runner::RunProgress =
        serde_json::from_slice(&std::fs::read(dir.join("checkpoint").join("state.json")).ok()?)
            .ok()?;
    if state.rounds_done != cfg.rounds || !dir.join("summary.md").is_file() {
        return None;
    }
    let references: BTreeMap<String, EvalPoint> = std::fs::read(dir.join("references.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    Some(RunReport {
        title: String::new(),
        algorithm: cfg.algorithm.clone(),
        domains: state
            .evals
            .first()
            .map(|e| e.domains.keys().cloned().collect())
            .unwrap_or_default(),
        evals: state.evals,
        rounds: state.rounds,
        references,
    })
}
