//! The model commands: `init-model`, `gen-corpus`, `init-adapter`, `train`, `merge`, `eval`,
//! `generate`: flags to option structs, the library's job, a summary printed.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use fedcdd_kernels::{Backend, Cpu, WeightDType};

use crate::data::corpus::{GenCorpusOptions, gen_corpus};
use crate::device::{self, Device};
use crate::model::checkpoint::{parse_size, torch_dtype_name};
use crate::model::config::LlamaConfig;
use crate::model::init::{InitModelOptions, Preset, build_model};
use crate::model::llama::Lora;
use crate::model::load_model;
use crate::model::lora::{LoraConfig, parse_targets};
use crate::model::merge::{MergeOptions, merge_adapter};
use crate::progress;
use crate::train::{
    EvalJob, EvalReport, Optimizer, OptimizerKind, Sampling, TrainJob, TrainOptions, generate,
    load_lora, run_eval_job, run_train_job, save_lora,
};

/// Where the model runs.
#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    /// CPU worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Compute device. `cuda` checks for a GPU and says why it cannot be used.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
}

/// `--device`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

impl From<DeviceArg> for Device {
    fn from(d: DeviceArg) -> Device {
        match d {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda,
        }
    }
}

/// Storage dtype of written weights (`--dtype`).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDTypeArg {
    F32,
    F16,
    Bf16,
}

impl From<WeightDTypeArg> for WeightDType {
    fn from(d: WeightDTypeArg) -> Self {
        match d {
            WeightDTypeArg::F32 => WeightDType::F32,
            WeightDTypeArg::F16 => WeightDType::F16,
            WeightDTypeArg::Bf16 => WeightDType::Bf16,
        }
    }
}

/// A preset name (`tiny`, `small`, `llama2-7b`, …).
pub fn parse_preset(s: &str) -> Result<Preset, String> {
    Preset::from_name(s).ok_or_else(|| {
        let all: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
        format!("unknown preset {s:?}; expected one of {}", all.join(", "))
    })
}

/// Arguments of `fedcdd init-model`.
#[derive(Args, Debug, Clone)]
pub struct InitModelArgs {
    /// Model shape: tiny, small, llama2-7b, llama3-8b, llama3.2-1b, tinyllama-1.1b,
    /// smollm2-135m.
    #[arg(long, value_parser = parse_preset)]
    pub preset: Preset,
    /// Output directory (created; must be empty or absent unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Storage dtype [default: f32 for tiny/small, bf16 for the real shapes].
    #[arg(long, value_enum)]
    pub dtype: Option<WeightDTypeArg>,
    /// Overwrite the model files of an existing directory.
    #[arg(long)]
    pub force: bool,
    /// Shard the weights above this size (like HF's max_shard_size: 2GB, 500MB, bytes).
    #[arg(long, value_parser = |s: &str| parse_size(s).map_err(|e| e.to_string()), default_value = "2GB")]
    pub max_shard_size: u64,
    /// No progress on stderr.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run_init_model(a: &InitModelArgs) -> Result<()> {
    let s = build_model(&InitModelOptions {
        preset: a.preset,
        out: a.out.clone(),
        seed: a.seed,
        dtype: a.dtype.map(Into::into),
        force: a.force,
        max_shard_size: a.max_shard_size,
        progress: !a.quiet,
    })?;
    if !a.quiet {
        progress::line(&format!(
            "wrote {} model to {}: {:.1}M parameters, {}, tokenizer {} tokens ({:.1} s), \
             {:.1} s in all",
            a.preset.name(),
            a.out.display(),
            s.parameters as f64 / 1e6,
            torch_dtype_name(s.dtype),
            s.tokenizer_vocab,
            s.tokenizer_seconds,
            s.total_seconds
        ));
    }
    Ok(())
}

/// Arguments of `fedcdd gen-corpus`: writes the synthetic corpus as JSONL.
#[derive(Args, Debug, Clone)]
pub struct GenCorpusArgs {
    /// Domains to generate (repeat or comma-separate); default: all.
    #[arg(long = "domain", value_delimiter = ',')]
    pub domains: Vec<String>,
    /// Records per domain.
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output: a directory that gets `<domain>.jsonl` per domain (with --split), else one
    /// JSONL file.
    #[arg(long)]
    pub out: PathBuf,
    /// One file per domain inside --out.
    #[arg(long)]
    pub split: bool,
}

pub fn run_gen_corpus(a: &GenCorpusArgs) -> Result<()> {
    let files = gen_corpus(&GenCorpusOptions {
        domains: a.domains.clone(),
        n: a.n,
        seed: a.seed,
        out: a.out.clone(),
        split: a.split,
    })?;
    for path in files {
        progress::line(&format!("wrote {}", path.display()));
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    /// Base HF LLaMA model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory to fold in.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output HF model directory (config, merged weights, tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
    /// Storage dtype of the merged weights (default: the base checkpoint's).
    #[arg(long, value_enum)]
    pub dtype: Option<WeightDTypeArg>,
}

pub fn run_merge(a: &MergeArgs) -> Result<()> {
    let s = merge_adapter(&MergeOptions {
        model: a.model.clone(),
        adapter: a.adapter.clone(),
        out: a.out.clone(),
        dtype: a.dtype.map(Into::into),
    })?;
    progress::line(&format!(
        "merged {} LoRA projections (r={}, scale {}) into {}",
        s.projections,
        s.lora.r,
        s.lora.scale(),
        a.out.display()
    ));
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum OptimizerArg {
    Adamw,
    Sgd,
}

/// LoRA layout flags.
#[derive(Args, Debug, Clone)]
pub struct LoraArgs {
    /// LoRA rank r.
    #[arg(long = "lora-r", default_value_t = 8)]
    pub r: usize,
    /// LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with --rslora).
    #[arg(
        long = "lora-alpha",
        default_value_t = 16.0,
        allow_negative_numbers = true
    )]
    pub alpha: f32,
    /// Dropout on the LoRA input (PEFT's lora_dropout).
    #[arg(
        long = "lora-dropout",
        default_value_t = 0.05,
        allow_negative_numbers = true
    )]
    pub dropout: f32,
    /// Projections that get adapters: a comma list of q,k,v,o,gate,up,down, or all.
    #[arg(long, default_value = "q,k,v,o,gate,up,down")]
    pub targets: String,
    /// rsLoRA scaling (alpha / sqrt(r)).
    #[arg(long)]
    pub rslora: bool,
}

impl LoraArgs {
    pub fn config(&self) -> Result<LoraConfig> {
        let cfg = LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            targets: parse_targets(&self.targets)?,
            rslora: self.rslora,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config without validation (for `--adapter-init`, whose own layout wins).
    fn config_unchecked(&self) -> LoraConfig {
        self.config().unwrap_or(LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            targets: Vec::new(),
            rslora: self.rslora,
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// HF LLaMA model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Training data: JSONL or a JSON array of {"text"}, Alpaca or ShareGPT records.
    #[arg(long)]
    pub data: PathBuf,
    /// Output PEFT adapter directory (also gets train_log.csv and train_summary.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Start from this PEFT adapter instead of PEFT's fresh init (its LoRA layout wins).
    #[arg(long)]
    pub adapter_init: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence (longer examples are cut, shorter padded).
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-3, allow_negative_numbers = true)]
    pub lr: f32,
    #[arg(long, value_enum, default_value_t = OptimizerArg::Adamw)]
    pub optimizer: OptimizerArg,
    /// Weight decay (AdamW: decoupled; SGD: L2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub weight_decay: f32,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub momentum: f32,
    /// Clip the global gradient norm to this (0 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub max_grad_norm: f32,
    /// Linear learning-rate warmup steps.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Seed of the LoRA init, the data order and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

impl TrainArgs {
    /// Checks the numeric flags (before any file is read).
    pub fn validate(&self) -> Result<()> {
        for (flag, v) in [
            ("--steps", self.steps),
            ("--batch", self.batch),
            ("--seq", self.seq),
            ("--grad-accum", self.grad_accum),
        ] {
            if v == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        self.optimizer()?;
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!(
                "--weight-decay must be a non-negative number, got {}",
                self.weight_decay
            );
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            bail!("--momentum must be in [0, 1), got {}", self.momentum);
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            bail!(
                "--max-grad-norm must be a non-negative number (0 = off), got {}",
                self.max_grad_norm
            );
        }
        if self.adapter_init.is_none() {
            self.lora.config()?;
        }
        if self.out.exists() && !self.out.is_dir() {
            bail!("--out {} exists and is not a directory", self.out.display());
        }
        Ok(())
    }

    pub fn optimizer(&self) -> Result<Optimizer> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        let kind = match self.optimizer {
            OptimizerArg::Adamw => OptimizerKind::AdamW,
            OptimizerArg::Sgd => OptimizerKind::Sgd,
        };
        Ok(Optimizer::new(
            kind,
            self.lr,
            self.weight_decay,
            self.momentum,
        ))
    }

    /// The job this command runs.
    pub fn job(&self) -> Result<TrainJob> {
        self.validate()?;
        Ok(TrainJob {
            model: self.model.clone(),
            data: self.data.clone(),
            out: self.out.clone(),
            adapter_init: self.adapter_init.clone(),
            lora: self.lora.config_unchecked(),
            opts: TrainOptions {
                steps: self.steps,
                batch: self.batch,
                seq: self.seq,
                grad_accum: self.grad_accum,
                optimizer: self.optimizer()?,
                max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
                warmup: self.warmup,
                min_lr_ratio: 1.0,
                seed: self.seed,
            },
        })
    }
}

pub fn run_train(a: &TrainArgs) -> Result<()> {
    let job = a.job()?;
    let s = match a.compute.device {
        DeviceArg::Cpu => run_train_job(&device::cpu(a.compute.threads)?, &job)?,
        DeviceArg::Cuda => run_train_job(&device::cuda()?, &job)?,
    };
    progress::line(&format!(
        "done in {:.1}s ({:.0} tokens/s); loss {:.4} -> {:.4}; adapter in {}",
        s.seconds,
        s.tokens as f64 / s.seconds,
        s.first_loss,
        s.final_loss,
        a.out.display()
    ));
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// HF LLaMA model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter directory to apply (none = the base model).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Evaluation data (same formats as `train`); records may carry a "domain".
    #[arg(long)]
    pub data: PathBuf,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Longest sequence evaluated (longer examples are cut and counted).
    #[arg(long, default_value_t = 2048)]
    pub seq: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run_eval(a: &EvalArgs) -> Result<EvalReport> {
    let job = EvalJob {
        model: a.model.clone(),
        adapter: a.adapter.clone(),
        data: a.data.clone(),
        batch: a.batch,
        seq: a.seq,
    };
    match a.compute.device {
        DeviceArg::Cpu => run_eval_job(&device::cpu(a.compute.threads)?, &job),
        DeviceArg::Cuda => run_eval_job(&device::cuda()?, &job),
    }
}

pub fn format_eval(r: &EvalReport) -> String {
    let mut s = format!(
        "{:<20} {:>10} {:>12} {:>10}\n",
        "domain", "loss", "perplexity", "tokens"
    );
    for (name, d) in &r.domains {
        s.push_str(&format!(
            "{:<20} {:>10.4} {:>12.3} {:>10}\n",
            name, d.loss, d.perplexity, d.tokens
        ));
    }
    s.push_str(&format!(
        "{:<20} {:>10.4} {:>12.3} {:>10}\n",
        "overall", r.overall.loss, r.overall.perplexity, r.overall.tokens
    ));
    if r.truncated > 0 {
        s.push_str(&format!(
            "({} of {} examples were truncated)\n",
            r.truncated, r.examples
        ));
    }
    s
}

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// HF LLaMA model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt (a BOS token is added as the tokenizer's post-processor says).
    #[arg(long)]
    pub prompt: String,
    /// New tokens at most.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability.
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run_generate(a: &GenerateArgs) -> Result<String> {
    if a.prompt.is_empty() {
        bail!("--prompt is empty");
    }
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        bail!(
            "--temperature must be a non-negative number (0 = greedy), got {}",
            a.temperature
        );
    }
    if !(0.0..=1.0).contains(&a.top_p) {
        bail!("--top-p must be in [0, 1], got {}", a.top_p);
    }
    match a.compute.device {
        DeviceArg::Cpu => generate_on(&device::cpu(a.compute.threads)?, a),
        DeviceArg::Cuda => generate_on(&device::cuda()?, a),
    }
}

fn generate_on<B: Backend>(be: &B, a: &GenerateArgs) -> Result<String> {
    let lm = load_model(be, &a.model)?;
    let lora = match &a.adapter {
        Some(dir) => Some(load_lora(be, &lm.model, dir)?),
        None => None,
    };
    let prompt = lm.tokenizer.encode(&a.prompt, true)?;
    let stop: Vec<u32> = lm.model.config.eos_token_ids.clone();
    let sampling = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    };
    let ids = generate(
        be,
        &lm.model,
        lora.as_ref(),
        &prompt,
        a.max_tokens,
        sampling,
        &stop,
        |_| {},
    )?;
    lm.tokenizer.decode(&ids, true)
}

#[derive(Args, Debug, Clone)]
pub struct InitAdapterArgs {
    /// HF LLaMA model directory the adapter is for.
    #[arg(long)]
    pub model: PathBuf,
    /// Output PEFT adapter directory.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Seed of PEFT's init (A kaiming-uniform; B = 0).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Writes PEFT's fresh init of a LoRA adapter (the global adapter of round 0).
pub fn run_init_adapter(a: &InitAdapterArgs) -> Result<()> {
    let cfg = a.lora.config()?;
    if a.out.exists() && !a.out.is_dir() {
        bail!("--out {} exists and is not a directory", a.out.display());
    }
    let config = LlamaConfig::load(&a.model)?;
    let be = Cpu::reference();
    let lora = Lora::init(&be, &config, cfg, a.seed)?;
    save_lora(&be, &lora, &a.out, &a.model.display().to_string())?;
    progress::line(&format!(
        "wrote a fresh LoRA adapter ({} parameters, r={}, {} modules per layer) to {}",
        lora.num_parameters(),
        lora.config.r,
        lora.config.targets.len(),
        a.out.display()
    ));
    Ok(())
}
