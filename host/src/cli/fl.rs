//! `fedcdd run` and `fedcdd compare`: argument parsing, the run directory, Ctrl-C, reports.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};
use clap::Args;
use fedcdd_core::Algorithm;

use crate::fl::sweep::{SweepSpec, sweep};
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
    Every key of the run's config.toml can be set: algorithm, seed, model (builtin | \
    builtin-small | DIR), benchmark (v2 | v1), data, client_data, eval_data, partition (domain | \
    iid | dirichlet:A), num_clients, sample_clients, rounds, local_steps, batch, micro_batch, \
    seq, lr, lr_min (default 3e-3 -> 3e-4; 2e-4 -> 2e-5 on your own model), warmup_steps \
    (default 0; local_steps on your own model), optimizer, lora_r, lora_alpha, lora_dropout, lora_targets, fedprox_mu, \
    keep_ratio (default: 0.5 for fedcdd, 1 = dense for the baselines), noise_scale, importance, \
    mask_axis (column | feature), upload_dtype, server_lr, server_beta1, server_beta2, \
    server_tau, fedopt_variant, norm_axis, target, weighting, renormalize, components (both | \
    consensus_only | divergence_only), eval_every, eval_questions, references, ...")]
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
#[command(after_help = "Examples:\n  \
    fedcdd compare --algorithms fedavg,fedcdd --seeds 5     # intervals over 5 seeds, paired test vs fedavg\n  \
    fedcdd compare --algorithms scaffold,fedcdd --seeds 3 --baseline scaffold --set rounds=6")]
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
    /// Seeds per algorithm (seed, seed+1, ...): with 2 or more, intervals over seeds and
    /// paired tests against the baseline.
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Algorithm the others' paired differences are taken against [default: fedavg when it
    /// is compared]; `none` for no paired table.
    #[arg(long)]
    pub baseline: Option<String>,
    /// Directory of the runs and the comparison report; finished runs inside are reused.
    #[arg(long, default_value = "runs/compare")]
    pub out: PathBuf,
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
#[command(
    after_help = "A sweep file is a run config with a [sweep] table:\n\n  \
    rounds = 10\n  \
    [sweep]\n  \
    seeds = 3\n  \
    grid.algorithm = [\"fedavg\", \"fedcdd\"]\n  \
    grid.partition = [\"iid\", \"dirichlet:0.3\", \"domain\"]\n\n\
    Examples:\n  \
    fedcdd sweep experiments/heterogeneity.toml --out runs/heterogeneity\n  \
    fedcdd sweep --grid algorithm=fedavg,fedcdd --grid keep_ratio=0.1,0.5,1 --seeds 3 --set rounds=5\n\n\
    The first grid key is the plot's x groups; each row's difference is taken against the \
    first row (put the default first). Ready-made sweeps are in experiments/."
)]
pub struct SweepArgs {
    /// Sweep file: a run config plus `[sweep]` with `seeds` and `grid.KEY = [values]`.
    pub config: Option<PathBuf>,
    /// A grid key and its values: `--grid keep_ratio=0.1,0.5,1` (repeat for more keys;
    /// replaces the file's values of that key; commas inside [..] or "..." do not split).
    #[arg(long = "grid", value_name = "KEY=V1,V2,...")]
    pub grids: Vec<String>,
    /// Override one shared key: `--set rounds=4`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Seeds per grid point (seed, seed+1, ...) [default: the file's, else 1].
    #[arg(long)]
    pub seeds: Option<u64>,
    /// Directory of the runs (`runs/<config hash>`) and the report; finished runs inside
    /// are reused, interrupted ones resumed.
    #[arg(long, default_value = "runs/sweep")]
    pub out: PathBuf,
    /// Only errors and the final table.
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
    let baseline = match a.baseline.as_deref() {
        Some("none") => None,
        Some(name) => {
            let b = Algorithm::from_name(name)
                .with_context(|| format!("--baseline {name:?}: not an algorithm (or `none`)"))?;
            if !algorithms.contains(&b) {
                bail!("--baseline {name}: it is not among --algorithms");
            }
            Some(b)
        }
        None => algorithms
            .contains(&Algorithm::FedAvg)
            .then_some(Algorithm::FedAvg),
    };
    match compare(&base, &algorithms, a.seeds, baseline, &a.out, &rep)? {
        Some(table) => print_stdout(&table),
        None => std::process::exit(130),
    }
}

pub fn cmd_sweep(a: &SweepArgs) -> Result<()> {
    install_ctrl_c();
    let rep = Reporter::new(a.quiet);
    let spec = SweepSpec::load(a.config.as_deref(), &a.sets, &a.grids, a.seeds)?;
    match sweep(&spec, &a.out, &rep)? {
        Some(table) => print_stdout(&table),
        None => std::process::exit(130),
    }
}
