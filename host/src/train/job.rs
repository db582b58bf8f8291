//! The `train` and `eval` jobs on a model directory: load, run, write the outputs (a PEFT
//! adapter with its log and summary; an evaluation report).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use fedcdd_kernels::Backend;

use crate::data::{load_examples, trainable_examples};
use crate::io::write_atomic;
use crate::model::llama::Lora;
use crate::model::load_model;
use crate::model::lora::LoraConfig;
use crate::progress::{self, Progress};

use super::adapter::{load_lora, save_lora};
use super::eval::{EvalReport, evaluate};
use super::step::{TrainOptions, train};

/// One centralized LoRA fine-tuning job (`fedcdd train`).
#[derive(Clone, Debug)]
pub struct TrainJob {
    pub model: PathBuf,
    pub data: PathBuf,
    /// Output PEFT adapter directory (also gets train_log.csv and train_summary.json).
    pub out: PathBuf,
    /// Start from this adapter instead of PEFT's fresh init of `lora`.
    pub adapter_init: Option<PathBuf>,
    pub lora: LoraConfig,
    pub opts: TrainOptions,
}

/// What a train job did.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub steps: usize,
    pub first_loss: f64,
    pub final_loss: f64,
    pub tokens: usize,
    pub seconds: f64,
}

/// Runs `job` on `be`: progress on stderr, the adapter and its log in `job.out`.
pub fn run_train_job<B: Backend>(be: &B, job: &TrainJob) -> Result<TrainSummary> {
    let opts = &job.opts;
    let lm = load_model(be, &job.model)?;
    if opts.seq > lm.model.rope_positions {
        bail!(
            "--seq {} exceeds max_position_embeddings {} of {}",
            opts.seq,
            lm.model.rope_positions,
            job.model.join("config.json").display()
        );
    }
    let examples = trainable_examples(
        load_examples(&job.data, &lm.tokenizer)?,
        opts.seq,
        &job.data,
    )?;
    let mut lora = match &job.adapter_init {
        Some(dir) => load_lora(be, &lm.model, dir)?,
        None => Lora::init(be, &lm.model.config, job.lora.clone(), opts.seed)?,
    };
    progress::line(&format!(
        "training {} LoRA parameters (r={}, {} modules) on {} examples, {} steps of {}x{} tokens, {}",
        lora.num_parameters(),
        lora.config.r,
        lora.config.targets.len(),
        examples.len(),
        opts.steps,
        opts.batch * opts.grad_accum,
        opts.seq,
        be.name()
    ));
    let bar = Progress::new();
    let start = Instant::now();
    let mut log = String::from("step,loss,grad_norm,lr,target_tokens,seconds\n");
    let history = train(be, &lm.model, &mut lora, &examples, opts, |step, s| {
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
        bar.update(step + 1, opts.steps, &format!("loss {:.4}", s.loss));
        if !bar.is_live() && ((step + 1) % 10 == 0 || step + 1 == opts.steps) {
            progress::line(&format!(
                "step {}/{}: loss {:.4}",
                step + 1,
                opts.steps,
                s.loss
            ));
        }
    })?;
    bar.finish();
    let seconds = start.elapsed().as_secs_f64();
    save_lora(be, &lora, &job.out, &lm.dir.display().to_string())?;
    write_atomic(&job.out.join("train_log.csv"), log.as_bytes())?;
    let tokens: usize = history.iter().map(|s| s.tokens).sum();
    let summary = TrainSummary {
        steps: history.len(),
        first_loss: history.first().map_or(f64::NAN, |s| s.loss),
        final_loss: history.last().map_or(f64::NAN, |s| s.loss),
        tokens,
        seconds,
    };
    let json = serde_json::json!({
        "model": lm.dir.display().to_string(),
        "data": job.data.display().to_string(),
        "steps": summary.steps,
        "first_loss": history.first().map(|s| s.loss),
        "final_loss": history.last().map(|s| s.loss),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens as f64 / seconds,
        "lora_parameters": lora.num_parameters(),
        "backend": be.name(),
    });
    let mut text = serde_json::to_vec_pretty(&json)?;
    text.push(b'\n');
    write_atomic(&job.out.join("train_summary.json"), &text)?;
    Ok(summary)
}

/// One evaluation job (`fedcdd eval`).
#[derive(Clone, Debug)]
pub struct EvalJob {
    pub model: PathBuf,
    /// None = the base model alone.
    pub adapter: Option<PathBuf>,
    pub data: PathBuf,
    pub batch: usize,
    pub seq: usize,
}

/// Runs `job` on `be`; an error when nothing could be scored or the loss is not finite.
pub fn run_eval_job<B: Backend>(be: &B, job: &EvalJob) -> Result<EvalReport> {
    for (flag, v) in [("--batch", job.batch), ("--seq", job.seq)] {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    let lm = load_model(be, &job.model)?;
    let examples = load_examples(&job.data, &lm.tokenizer)?;
    let lora = match &job.adapter {
        Some(dir) => load_lora(be, &lm.model, dir)?,
        None => Lora::none(&lm.model.config),
    };
    let bar = Progress::new();
    let report = evaluate(
        be,
        &lm.model,
        &lora,
        &examples,
        job.batch,
        job.seq,
        |d, t| bar.update(d.min(t), t, "examples"),
    )?;
    bar.finish();
    if report.overall.tokens == 0 {
        bail!(
            "{}: no target tokens to evaluate (every label is masked or cut by --seq {})",
            job.data.display(),
            job.seq
        );
    }
    if !report.overall.loss.is_finite() {
        bail!(
            "the loss on {} is not finite ({}): the weights in {}{} hold non-finite values",
            job.data.display(),
            report.overall.loss,
            job.model.display(),
            job.adapter
                .as_ref()
                .map(|d| format!(" or the adapter {}", d.display()))
                .unwrap_or_default()
        );
    }
    Ok(report)
}
