//! The `fedcdd` command line: clap only. Each command's flags become the library's plain
//! option structs, the library runs, the command prints. clap types never leave this folder.

pub mod base;
pub mod bench;
pub mod fl;
pub mod model;
mod output;
pub mod server;

use anyhow::Result;
use clap::{Parser, Subcommand};

pub use output::print_stdout;

#[derive(Parser, Debug)]
#[command(
    name = "fedcdd",
    version,
    about = "Federated LoRA fine-tuning with FedCDD (consensus-divergence decoupling) and its baselines",
    long_about = "Federated LoRA fine-tuning with FedCDD (consensus-divergence decoupling) and its baselines.\n\n\
Adapters are PEFT adapter directories (adapter_config.json + adapter_model.safetensors) or bare \
.safetensors files with PEFT tensor names. Client uploads are the compact masked format written \
by `fedcdd encode`.",
    after_help = "Examples:\n  fedcdd encode --global g/ --local c1/ --out c1.fcdu --keep-ratio 0.3 --noise-scale 0.5 --samples 120\n  fedcdd aggregate --algorithm fedcdd --global g/ --client c1.fcdu --client c2/:80 --out g_next/\n  fedcdd inspect c1.fcdu"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// One server step: combine client adapters/uploads into the next global adapter.
    Aggregate(server::AggregateArgs),
    /// Client side: mask the update (local − global) and write the upload.
    Encode(server::EncodeArgs),
    /// Rebuild the client's masked adapter (global + reconstructed update) from an upload.
    Decode(server::DecodeArgs),
    /// Print an upload's header, tensors, kept columns and byte size.
    Inspect(server::InspectArgs),
    /// Write a synthetic round (a global PEFT adapter and client adapters) to try the commands on.
    MakeExample(server::MakeExampleArgs),
    /// Write an HF LLaMA model directory (config, random weights, tokenizer) from a preset.
    InitModel(model::InitModelArgs),
    /// The built-in base models: path and checksum, a copy, or a rebuild from the recipe
    /// compared with the shipped model.
    Base(base::BaseArgs),
    /// Write the built-in synthetic multi-domain corpus as JSONL (all domains or some).
    GenCorpus(model::GenCorpusArgs),
    /// Write PEFT's fresh init of a LoRA adapter for a model (round 0's global adapter).
    InitAdapter(model::InitAdapterArgs),
    /// One client: centralized LoRA fine-tuning; writes a PEFT adapter.
    Train(model::TrainArgs),
    /// Fold a PEFT LoRA adapter into its base model and write an HF model directory.
    Merge(model::MergeArgs),
    /// Mean token loss and perplexity, overall and per domain.
    Eval(model::EvalArgs),
    /// Generate text with a KV cache (greedy, temperature, top-p).
    Generate(model::GenerateArgs),
    /// Federated LoRA fine-tuning: rounds of clients, any algorithm, per-domain report.
    /// With no arguments: FedCDD on the built-in benchmark and base model (CPU, minutes).
    Run(fl::RunArgs),
    /// The same setup for several algorithms and seeds: 95 % intervals over seeds, paired
    /// tests against a baseline, worst domain, ranks, plot.
    Compare(fl::CompareArgs),
    /// A grid of config values × seeds, one run per point (finished runs reused,
    /// interrupted ones resumed): a table with intervals, CSV and plots
    Sweep(fl::SweepArgs),
    /// Benchmarks (reported next to this machine's own reference figures).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// The `fedcdd` program: parses the command line (clap prints usage errors itself and
/// exits with status 2), runs it, and reports an error on stderr with status 1.
pub fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Aggregate(a) => server::cmd_aggregate(a),
        Command::Encode(a) => server::cmd_encode(a),
        Command::Decode(a) => server::cmd_decode(a),
        Command::Inspect(a) => server::cmd_inspect(a),
        Command::MakeExample(a) => server::cmd_make_example(&a),
        Command::Bench(c) => bench::run(c),
        Command::InitModel(a) => model::run_init_model(&a),
        Command::GenCorpus(a) => model::run_gen_corpus(&a),
        Command::Train(a) => model::run_train(&a),
        Command::Run(a) => fl::cmd_run(&a),
        Command::Compare(a) => fl::cmd_compare(&a),
        Command::Base(a) => base::cmd_base(&a),
        Command::Sweep(a) => fl::cmd_sweep(&a),
        Command::InitAdapter(a) => model::run_init_adapter(&a),
        Command::Merge(a) => model::run_merge(&a),
        Command::Eval(a) => {
            let report = model::run_eval(&a)?;
            let text = if a.json {
                let mut t = serde_json::to_string_pretty(&report)?;
                t.push('\n');
                t
            } else {
                model::format_eval(&report)
            };
            print_stdout(&text)
        }
        Command::Generate(a) => {
            let text = model::run_generate(&a)?;
            print_stdout(&format!("{text}\n"))
        }
    }
}
