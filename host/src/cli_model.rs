//! The model commands: `train`, `eval`, `generate`, and their shared loading code.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use fedcdd_kernels::{AdamW, Backend, Cpu, Sgd};

use crate::adapter::write_atomic;
use crate::data::{Example, load_records, tokenize_records};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::LlamaConfig;
use crate::model::llama::{Lora, Model};
use crate::model::lora::{LoraConfig, parse_targets};
use crate::tokenizer::Tokenizer;
use crate::train::{
    EvalReport, Optimizer, Sampling, TrainOptions, evaluate, generate, load_lora, save_lora, train,
};

/// Where the model runs.
#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    /// CPU worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Compute device. `cuda` checks for a GPU and says why it cannot be used.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
}

/// Where the compute runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

impl ComputeArgs {
    /// The CPU backend; `--device cuda` is an error here (for the commands that run on the
    /// CPU only).
    pub fn backend(&self) -> Result<Cpu> {
        if self.device == Device::Cuda {
            cuda_unavailable()?;
        }
        Cpu::new(self.threads).map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// The CUDA backend on GPU 0, or why there is none (no driver, no device).
pub fn cuda_backend() -> Result<fedcdd_kernels::cuda::Cuda> {
    fedcdd_kernels::cuda::Cuda::new(0).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))
}

/// The error of `--device cuda` where a command has no CUDA path yet (`run`, `compare`,
/// `bench train`); without a GPU it names the missing driver or device instead.
pub fn cuda_unavailable() -> Result<()> {
    let dev = cuda_backend()?;
    bail!(
        "--device cuda: found {}, but this command runs on the CPU only so far (train, eval \
         and generate take --device cuda); use --device cpu",
        dev.info().name
    )
}

/// A model directory opened on a backend: config, memory-mapped weights, tokenizer.
pub struct LoadedModel<B: Backend> {
    pub model: Model<B>,
    pub tokenizer: Tokenizer,
    pub dir: PathBuf,
}

pub fn load_model<B: Backend>(be: &B, dir: &Path) -> Result<LoadedModel<B>> {
    let config = LlamaConfig::load(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let model = Model::load(be, config, &ckpt)
        .with_context(|| format!("cannot load the model in {}", dir.display()))?;
    let tokenizer = Tokenizer::load(dir)?;
    if tokenizer.vocab_size() > model.config.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the model's vocab_size is {}",
            dir.display(),
            tokenizer.vocab_size(),
            model.config.vocab_size
        );
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        dir: dir.to_path_buf(),
    })
}

/// Reads and tokenizes a data file.
pub fn load_examples(path: &Path, tok: &Tokenizer) -> Result<Vec<Example>> {
    let records = load_records(path)?;
    if records.is_empty() {
        bail!("{}: no records", path.display());
    }
    tokenize_records(&records, tok).with_context(|| format!("cannot tokenize {}", path.display()))
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
        Ok(match self.optimizer {
            OptimizerArg::Adamw => Optimizer::AdamW(AdamW {
                lr: self.lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: self.weight_decay,
            }),
            OptimizerArg::Sgd => Optimizer::Sgd(Sgd {
                lr: self.lr,
                momentum: self.momentum,
                dampening: 0.0,
                weight_decay: self.weight_decay,
                nesterov: false,
            }),
        })
    }
}

/// A one-line progress display on a terminal, nothing otherwise.
pub struct Progress {
    pub live: bool,
    start: Instant,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            live: std::io::stderr().is_terminal(),
            start: Instant::now(),
        }
    }

    pub fn update(&self, done: usize, total: usize, what: &str) {
        if self.live {
            let width = 30;
            let filled = (done * width)
                .checked_div(total)
                .unwrap_or(width)
                .min(width);
            eprint!(
                "\r[{}{}] {done}/{total} {what} ({:.1}s)   ",
                "#".repeat(filled),
                "-".repeat(width - filled),
                self.start.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        }
    }

    pub fn finish(&self) {
        if self.live {
            eprintln!();
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps the examples with at least one target token within their first `seq + 1` tokens
/// (the part a training row sees); fails when none is left, naming the data file.
pub fn trainable_examples(examples: Vec<Example>, seq: usize, data: &Path) -> Result<Vec<Example>> {
    let total = examples.len();
    let kept: Vec<Example> = examples
        .into_iter()
        .filter(|e| e.is_target.iter().take(seq + 1).skip(1).any(|&t| t))
        .collect();
    if kept.is_empty() {
        bail!(
            "{}: none of the {total} examples has a target token within the first --seq {seq} \
             tokens (prompts are masked from the loss); raise --seq",
            data.display()
        );
    }
    if kept.len() < total {
        eprintln!(
            "warning: {}: skipping {} of {total} examples with no target token within the \
             first --seq {seq} tokens",
            data.display(),
            total - kept.len()
        );
    }
    Ok(kept)
}

pub fn run_train(a: &TrainArgs) -> Result<()> {
    a.validate()?;
    match a.compute.device {
        Device::Cpu => train_on(&a.compute.backend()?, a),
        Device::Cuda => train_on(&cuda_backend()?, a),
    }
}

fn train_on<B: Backend>(be: &B, a: &TrainArgs) -> Result<()> {
    let lm = load_model(be, &a.model)?;
    if a.seq > lm.model.rope_positions {
        bail!(
            "--seq {} exceeds max_position_embeddings {} of {}",
            a.seq,
            lm.model.rope_positions,
            a.model.join("config.json").display()
        );
    }
    let examples = trainable_examples(load_examples(&a.data, &lm.tokenizer)?, a.seq, &a.data)?;
    let mut lora = match &a.adapter_init {
        Some(dir) => load_lora(be, &lm.model, dir)?,
        None => Lora::init(be, &lm.model.config, a.lora.config()?, a.seed)?,
    };
    let opts = TrainOptions {
        steps: a.steps,
        batch: a.batch,
        seq: a.seq,
        grad_accum: a.grad_accum,
        optimizer: a.optimizer()?,
        max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
        warmup: a.warmup,
        min_lr_ratio: 1.0,
        seed: a.seed,
    };
    eprintln!(
        "training {} LoRA parameters (r={}, {} modules) on {} examples, {} steps of {}x{} tokens, {}",
        lora.num_parameters(),
        lora.config.r,
        lora.config.targets.len(),
        examples.len(),
        a.steps,
        a.batch * a.grad_accum,
        a.seq,
        be.name()
    );
    let progress = Progress::new();
    let start = Instant::now();
    let mut log = String::from("step,loss,grad_norm,lr,target_tokens,seconds\n");
    let history = train(be, &lm.model, &mut lora, &examples, &opts, |step, s| {
        let lr = opts.lr_at(step);
        let secs = start.elapsed().as_secs_f64();
        log.push_str(&format!(
            "{},{:.6},{:.6},{:e},{},{:.3}\n",
            step + 1,
            s.loss,
            s.grad_norm,
            lr,
            s.targets,
            secs
        ));
        progress.update(step + 1, opts.steps, &format!("loss {:.4}", s.loss));
        if !progress.live && ((step + 1) % 10 == 0 || step + 1 == opts.steps) {
            eprintln!("step {}/{}: loss {:.4}", step + 1, opts.steps, s.loss);
        }
    })?;
    progress.finish();
    let secs = start.elapsed().as_secs_f64();
    save_lora(be, &lora, &a.out, &lm.dir.display().to_string())?;
    write_atomic(&a.out.join("train_log.csv"), log.as_bytes())?;
    let tokens: usize = history.iter().map(|s| s.tokens).sum();
    let summary = serde_json::json!({
        "model": lm.dir.display().to_string(),
        "data": a.data.display().to_string(),
        "steps": history.len(),
        "first_loss": history.first().map(|s| s.loss),
        "final_loss": history.last().map(|s| s.loss),
        "tokens": tokens,
        "seconds": secs,
        "tokens_per_second": tokens as f64 / secs,
        "lora_parameters": lora.num_parameters(),
        "backend": be.name(),
    });
    let mut text = serde_json::to_vec_pretty(&summary)?;
    text.push(b'\n');
    write_atomic(&a.out.join("train_summary.json"), &text)?;
    eprintln!(
        "done in {secs:.1}s ({:.0} tokens/s); loss {:.4} -> {:.4}; adapter in {}",
        tokens as f64 / secs,
        history.first().map_or(f64::NAN, |s| s.loss),
        history.last().map_or(f64::NAN, |s| s.loss),
        a.out.display()
    );
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
    for (flag, v) in [("--batch", a.batch), ("--seq", a.seq)] {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    match a.compute.device {
        Device::Cpu => eval_on(&a.compute.backend()?, a),
        Device::Cuda => eval_on(&cuda_backend()?, a),
    }
}

fn eval_on<B: Backend>(be: &B, a: &EvalArgs) -> Result<EvalReport> {
    let lm = load_model(be, &a.model)?;
    let examples = load_examples(&a.data, &lm.tokenizer)?;
    let lora = match &a.adapter {
        Some(dir) => load_lora(be, &lm.model, dir)?,
        None => no_lora(&lm.model),
    };
    let progress = Progress::new();
    let report = evaluate(be, &lm.model, &lora, &examples, a.batch, a.seq, |d, t| {
        progress.update(d.min(t), t, "examples")
    })?;
    progress.finish();
    if report.overall.tokens == 0 {
        bail!(
            "{}: no target tokens to evaluate (every label is masked or cut by --seq {})",
            a.data.display(),
            a.seq
        );
    }
    if !report.overall.loss.is_finite() {
        bail!(
            "the loss on {} is not finite ({}): the weights in {}{} hold non-finite values",
            a.data.display(),
            report.overall.loss,
            a.model.display(),
            a.adapter
                .as_ref()
                .map(|d| format!(" or the adapter {}", d.display()))
                .unwrap_or_default()
        );
    }
    Ok(report)
}

/// No adapter: an empty target list (a zero-B LoRA would still cost compute).
pub fn no_lora<B: Backend>(model: &Model<B>) -> Lora<B> {
    Lora {
        config: LoraConfig {
            r: 1,
            alpha: 1.0,
            dropout: 0.0,
            targets: vec![],
            rslora: false,
        },
        modules: (0..model.config.num_hidden_layers)
            .map(|_| std::array::from_fn(|_| None))
            .collect(),
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
        Device::Cpu => generate_on(&a.compute.backend()?, a),
        Device::Cuda => generate_on(&cuda_backend()?, a),
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
    eprintln!(
        "wrote a fresh LoRA adapter ({} parameters, r={}, {} modules per layer) to {}",
        lora.num_parameters(),
        lora.config.r,
        lora.config.targets.len(),
        a.out.display()
    );
    Ok(())
}
