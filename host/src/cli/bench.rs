//! `fedcdd bench …`: benchmarks, each next to this machine's own reference figure.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::bench::{
    AggregateBenchOptions, TrainBenchOptions, run_aggregate_bench, run_train_bench,
};
use crate::device;
use crate::model::init::Preset;

use super::model::{DeviceArg, LoraArgs, parse_preset};
use super::output::print_stdout;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Times batch and streaming FedCDD and FedAvg on random data against this machine's
    /// memory-read bandwidth, measured in the same run.
    Aggregate(AggregateBenchArgs),
    /// Tokens/s of LoRA training steps (forward + backward + optimizer), peak RSS, and
    /// GFLOP/s against this machine's matmul peak, measured in the same run.
    Train(TrainBenchArgs),
    /// Time of each hand-written CUDA kernel (median) with GB/s or TFLOP/s against the
    /// device's peak bandwidth and a cuBLAS GEMM rate measured in the same run.
    Kernels(KernelBenchArgs),
}

/// `fedcdd bench kernels`: shapes of one Llama-3-8B layer by default.
#[derive(Args, Debug)]
pub struct KernelBenchArgs {
    /// Only `cuda` has kernels to time (the CPU ops: `fedcdd bench train`).
    #[arg(long, value_enum, default_value = "cuda")]
    pub device: DeviceArg,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    pub ordinal: usize,
    /// Timed runs per kernel.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Tokens per call (batch · seq).
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Sequence length of the attention kernels.
    #[arg(long, default_value_t = 2048)]
    pub seq: usize,
}

fn cmd_bench_kernels(a: &KernelBenchArgs) -> Result<()> {
    if a.device == DeviceArg::Cpu {
        anyhow::bail!(
            "bench kernels times the CUDA kernels (--device cuda); for the CPU ops use `fedcdd bench train`"
        );
    }
    let opts = fedcdd_kernels::cuda::bench::BenchOptions {
        ordinal: a.ordinal,
        iters: a.iters.max(1),
        tokens: a.tokens,
        seq: a.seq,
        ..Default::default()
    };
    let table = fedcdd_kernels::cuda::bench::run(&opts)
        .map_err(|e| anyhow::anyhow!("bench kernels --device cuda: {e}"))?;
    print_stdout(&table)
}

#[derive(Args, Debug, Clone)]
pub struct AggregateBenchArgs {
    /// Number of clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Parameters per client (rounded up to whole 16×4096 / 4096×16 LoRA tensor pairs).
    /// The default makes the client data (clients × params × 4 bytes) 1 GiB, beyond any cache.
    #[arg(long, default_value_t = 32 << 20)]
    pub params: usize,
    /// Timed repetitions of each measurement; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Skip the batch form (it needs memory for every client's decomposition).
    #[arg(long)]
    pub no_batch: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct TrainBenchArgs {
    /// Built-in model preset (written to a temporary directory first).
    #[arg(long, default_value = "tiny", value_parser = parse_preset, conflicts_with = "model")]
    pub preset: Preset,
    /// An HF LLaMA model directory instead of a preset.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Timed optimizer steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// CPU worker threads (0 = one per core).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// `cuda` is not wired into this benchmark yet (an error says why).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Seconds spent measuring the machine's matmul peak.
    #[arg(long, default_value_t = 1.0)]
    pub peak_seconds: f64,
    /// Also time PyTorch + PEFT (f32, eager) on the same model and shapes with
    /// scripts/bench_torch_train.py, and print the ratio.
    #[arg(long)]
    pub torch: bool,
    /// Also time PyTorch + PEFT under bf16 autocast (f32 weights, bf16 matmuls), and print
    /// that ratio.
    #[arg(long)]
    pub torch_bf16: bool,
    /// Then run the timed steps again with a timer around every compute op, and print where
    /// a step's time goes (by op and weight shape, with the FLOP rate of each).
    #[arg(long)]
    pub profile: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(c: BenchCommand) -> Result<()> {
    let text = match c {
        BenchCommand::Aggregate(a) => run_aggregate_bench(&AggregateBenchOptions {
            clients: a.clients,
            params: a.params,
            repeats: a.repeats,
            no_batch: a.no_batch,
            json: a.json,
        })?,
        BenchCommand::Train(a) => {
            if a.device == DeviceArg::Cuda {
                device::cuda_unsupported("bench train")?;
            }
            run_train_bench(&TrainBenchOptions {
                preset: a.preset,
                model: a.model,
                batch: a.batch,
                seq: a.seq,
                steps: a.steps,
                warmup: a.warmup,
                lora: a.lora.config()?,
                threads: a.threads,
                peak_seconds: a.peak_seconds,
                torch: a.torch,
                torch_bf16: a.torch_bf16,
                profile: a.profile,
                json: a.json,
            })?
        }
        BenchCommand::Kernels(a) => return cmd_bench_kernels(&a),
    };
    print_stdout(&text)
}
