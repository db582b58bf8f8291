//! Whole runs: one configuration into a run directory (setup, rounds, reference points,
//! report, final adapter), and a comparison of several algorithms and seeds. The one place a
//! backend is chosen for a run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use fedcdd_core::Algorithm;
use fedcdd_kernels::Backend;

use crate::device::{self, Device};
use crate::io::{save_adapter, write_atomic};
use crate::progress::Reporter;
use crate::report::{
    CompareNotes, CompareResult, EvalPoint, RunReport, write_compare_report, write_run_report,
};

use super::config::RunConfig;
use super::defense::RobustRule;
use super::references::reference_point;
use super::runner::{Outcome, STOP, Server, run_rounds};
use super::scores::format_eval_line;
use super::session::{CHECKPOINT, load_progress, sorted};
use super::setup::build_setup;
use super::strategy::{Robust, Strategy, StrategyOptions, for_algorithm};

/// The strategy `cfg` names, with its options.
pub fn strategy_for(cfg: &RunConfig) -> Result<Box<dyn Strategy>> {
    let server = cfg.server_options()?;
    let strategy = for_algorithm(
        cfg.algorithm,
        &StrategyOptions {
            server,
            fedprox_mu: cfg.fedprox_mu,
        },
    );
    Ok(match cfg.robust {
        RobustRule::None => strategy,
        rule => Box::new(Robust::new(strategy, rule)),
    })
}

/// A free default run directory: `runs/<algorithm>-s<seed>`, then `-2`, `-3`, ...
pub fn default_run_dir(cfg: &RunConfig) -> PathBuf {
    let base = PathBuf::from("runs").join(format!("{}-s{}", cfg.algorithm.name(), cfg.seed));
    let mut p = base.clone();
    let mut i = 2;
    while p.exists() {
        p = PathBuf::from(format!("{}-{i}", base.display()));
        i += 1;
    }
    p
}

/// Runs `cfg` with its own algorithm's strategy; see [`run_with`].
pub fn run_one(
    cfg: &RunConfig,
    run_dir: &Path,
    resume: bool,
    rep: &Reporter,
) -> Result<Option<RunReport>> {
    run_with(cfg, strategy_for(cfg)?, run_dir, resume, rep)
}

/// Runs one configuration with `strategy` into `run_dir` (resuming from its checkpoint when
/// `resume`), writes the report and returns it; `None` when interrupted (Ctrl-C).
pub fn run_with(
    cfg: &RunConfig,
    strategy: Box<dyn Strategy>,
    run_dir: &Path,
    resume: bool,
    rep: &Reporter,
) -> Result<Option<RunReport>> {
    match cfg.device {
        Device::Cpu => run_on(
            device::cpu(cfg.threads)?,
            cfg,
            strategy,
            run_dir,
            resume,
            rep,
        ),
        // The generic path compiles for CUDA; it has not run on a GPU yet, so it is opt-in.
        Device::Cuda if std::env::var_os("FEDCDD_CUDA_UNVERIFIED").is_some() => {
            run_on(device::cuda()?, cfg, strategy, run_dir, resume, rep)
        }
        Device::Cuda => {
            device::cuda_unsupported("the federated runner (run, compare)")?;
            unreachable!("cuda_unsupported always fails")
        }
    }
}

fn run_on<B: Backend>(
    be: B,
    cfg: &RunConfig,
    strategy: Box<dyn Strategy>,
    run_dir: &Path,
    resume: bool,
    rep: &Reporter,
) -> Result<Option<RunReport>> {
    let start = Instant::now();
    let setup = build_setup(cfg, be, &mut |s| rep.line(s))?;
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    write_atomic(&run_dir.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    rep.line(&format!(
        "{} on {} clients ({}), {} rounds of {} sampled x {} local steps; run directory {}",
        strategy.name(),
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
    rep.line(&format!(
        "client lr {:e} -> {:e} (cosine over rounds){}",
        cfg.lr,
        cfg.lr_min,
        if cfg.warmup_steps > 0 {
            format!(", warm-up over the first {} local steps", cfg.warmup_steps)
        } else {
            String::new()
        }
    ));
    let mut server = Server::open(setup, strategy, run_dir, resume, rep)?;
    if let Outcome::Interrupted { rounds_done } = run_rounds(&mut server, rep)? {
        crate::progress::line(&format!(
            "interrupted: the checkpoint holds {rounds_done} complete rounds; continue with\n  fedcdd run --resume {}",
            run_dir.display()
        ));
        return Ok(None);
    }
    match finish_run(&server, run_dir, rep)? {
        Some(report) => {
            rep.line(&format!(
                "done in {:.0} s: report in {}/summary.md, adapter in {}/adapter",
                start.elapsed().as_secs_f64(),
                run_dir.display(),
                run_dir.display()
            ));
            Ok(Some(report))
        }
        None => Ok(None),
    }
}

/// After the last round: the reference points the config asks for (computed once per run
/// directory; they need the clients' data in this process, so a deployment's server skips
/// them), the final adapter in PEFT format and the report. `None` when interrupted.
pub fn finish_run<B: Backend>(
    server: &Server<B>,
    run_dir: &Path,
    rep: &Reporter,
) -> Result<Option<RunReport>> {
    let setup = &server.setup;
    let cfg = &setup.cfg;
    let refs_path = run_dir.join("references.json");
    let mut references: BTreeMap<String, EvalPoint> = std::fs::read(&refs_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let has_data = setup.clients.len() == setup.num_clients;
    for &kind in cfg.references.iter().filter(|_| has_data) {
        if let std::collections::btree_map::Entry::Vacant(slot) =
            references.entry(kind.name().to_string())
        {
            rep.line(&format!("reference point: {kind}"));
            let p = reference_point(setup, kind, rep)?;
            rep.line(&format!("{kind}: {}", format_eval_line(&p)));
            slot.insert(p);
            write_atomic(&refs_path, &serde_json::to_vec_pretty(&references)?)?;
        }
        if STOP.load(Ordering::SeqCst) {
            return Ok(None);
        }
    }
    let global = sorted(server.global());
    save_adapter(
        &run_dir.join("adapter"),
        &global,
        Some(
            &cfg.lora()?
                .to_peft_json(&setup.base_dir.display().to_string()),
        ),
    )?;
    let name = server.strategy.name().to_string();
    let clients = if has_data {
        setup.clients.len().to_string()
    } else {
        setup.num_clients.to_string()
    };
    let report = RunReport {
        title: format!(
            "{name} on {} ({clients} clients, partition {})",
            if cfg.builtin_data() {
                "the built-in benchmark"
            } else {
                cfg.data.as_str()
            },
            cfg.partition
        ),
        algorithm: name,
        domains: setup.domains.clone(),
        evals: server.st.progress.evals.clone(),
        rounds: server.st.progress.rounds.clone(),
        references,
    };
    write_run_report(run_dir, &report)?;
    Ok(Some(report))
}

/// The same setup for several algorithms and seeds, into `out` (finished runs there are
/// reused); returns the comparison table, or `None` when interrupted.
pub fn compare(
    base: &RunConfig,
    algorithms: &[Algorithm],
    seeds: u64,
    baseline: Option<Algorithm>,
    out: &Path,
    rep: &Reporter,
) -> Result<Option<String>> {
    if seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let t0 = std::time::Instant::now();
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut results = Vec::new();
    let mut references: BTreeMap<String, Vec<EvalPoint>> = BTreeMap::new();
    let mut domains = Vec::new();
    for s in 0..seeds {
        for (i, &alg) in algorithms.iter().enumerate() {
            let mut cfg = base.clone();
            cfg.algorithm = alg;
            cfg.seed = base.seed + s;
            // Reference points do not depend on the algorithm: the first run of a seed has them.
            if i > 0 {
                cfg.references.clear();
            }
            let dir = out.join(format!("{}-s{}", alg.name(), cfg.seed));
            let report = match run_or_reuse(&cfg, &dir, rep)? {
                Some((r, reused)) => {
                    if reused {
                        rep.line(&format!(
                            "{} seed {}: reusing the finished run in {}",
                            alg.name(),
                            cfg.seed,
                            dir.display()
                        ));
                    }
                    r
                }
                None => return Ok(None),
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
                algorithm: alg.name().to_string(),
                seed: cfg.seed,
                final_eval: last,
                upload_bytes: report.rounds.iter().map(|r| r.upload_bytes).sum(),
                seconds: report.rounds.iter().map(|r| r.seconds).sum(),
            });
        }
    }
    let notes = CompareNotes {
        baseline: baseline.map(|b| b.name().to_string()),
        wall_seconds: Some(t0.elapsed().as_secs_f64()),
    };
    let table = write_compare_report(out, &domains, &results, &references, &notes)?;
    rep.line(&format!("comparison in {}/compare.md", out.display()));
    Ok(Some(table))
}

/// The finished run in `dir` if it has exactly this config (`true`: reused), else the run
/// (resumed from its checkpoint when there is one); None when stopped by Ctrl-C.
pub fn run_or_reuse(
    cfg: &RunConfig,
    dir: &Path,
    rep: &Reporter,
) -> Result<Option<(RunReport, bool)>> {
    if let Some(r) = finished_report(dir, cfg) {
        return Ok(Some((r, true)));
    }
    let resume = dir.join(CHECKPOINT).join("state.json").is_file();
    Ok(run_one(cfg, dir, resume, rep)?.map(|r| (r, false)))
}

/// The report of a finished run in `dir` with exactly this config, if there is one.
fn finished_report(dir: &Path, cfg: &RunConfig) -> Option<RunReport> {
    // The same settings (a key added since, at its default, reads back as the default).
    let text = std::fs::read_to_string(dir.join("config.toml")).ok()?;
    if RunConfig::from_toml(&text, "config.toml").ok()? != *cfg {
        return None;
    }
    let state = load_progress(dir).ok()?;
    if state.rounds_done != cfg.rounds || !dir.join("summary.md").is_file() {
        return None;
    }
    let references: BTreeMap<String, EvalPoint> = std::fs::read(dir.join("references.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    Some(RunReport {
        title: String::new(),
        algorithm: cfg.algorithm.name().to_string(),
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
