//! `fedcdd run` and `fedcdd compare`: argument parsing, the run directory, Ctrl-C, reports.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};
use clap::Args;
use fedcdd_core::Algorithm;

use crate::fl::{RunConfig, STOP, compare, default_run_dir, run_one};
use crate::progress::Reporter;
use crate::report::summary_table;

use super::output::print_stdout;

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

pub fn cmd_run(a: &RunArgs) -> Result<()> {
    install_ctrl_c();
    let rep = Reporter::new(a.quiet);
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
        Some(report) => print_stdout(&summary_table(&report)),
        None => std::process::exit(130),
    }
}

pub fn cmd_compare(a: &CompareArgs) -> Result<()> {
    install_ctrl_c();
    let rep = Reporter::new(a.quiet);
    let base = RunConfig::load(a.config.as_deref(), &a.shortcuts.sets(&a.sets))?;
    let mut algorithms = Vec::new();
    for name in &a.algorithms {
        algorithms.push(Algorithm::from_name(name).with_context(|| {
            format!(
                "unknown algorithm {name:?}; expected some of {}",
                Algorithm::ALL.map(|x| x.name()).join(",")
            )
        })?);
    }
    match compare(&base, &algorithms, a.seeds, &a.out, &rep)? {
        Some(table) => print_stdout(&table),
        None => std::process::exit(130),
    }
}
