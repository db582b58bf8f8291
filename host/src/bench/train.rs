//! `fedcdd bench train`: tokens/s of LoRA training steps (forward + backward + optimizer),
//! the FLOP rate that implies, against this machine's matmul peak measured in the same run,
//! and peak RSS. `--torch` also runs PyTorch + PEFT on the same model and shapes
//! (scripts/bench_torch_train.py) and prints the ratio.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use fedcdd_kernels::{AdamW, Backend, OpKey, OpTotals, Profiled};

use crate::data::Batch;
use crate::model::config::LlamaConfig;
use crate::model::init::{InitModelOptions, Preset, build_model};
use crate::model::llama::{Lora, Workspace};
use crate::model::load_model;
use crate::model::lora::{LoraConfig, Proj};
use crate::progress::{self, Progress};
use crate::rng::Rng;
use crate::train::{OptState, Optimizer, train_step};

/// What `fedcdd bench train` measures.
#[derive(Debug, Clone)]
pub struct TrainBenchOptions {
    /// Built-in model preset (written to a temporary directory first), unless `model`.
    pub preset: Preset,
    /// An HF LLaMA model directory instead of a preset.
    pub model: Option<PathBuf>,
    pub batch: usize,
    pub seq: usize,
    /// Timed optimizer steps.
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    pub lora: LoraConfig,
    /// CPU worker threads (0 = one per core).
    pub threads: usize,
    /// Seconds spent measuring the machine's matmul peak.
    pub peak_seconds: f64,
    /// Also time PyTorch + PEFT (scripts/bench_torch_train.py) and print the ratio.
    pub torch: bool,
    /// Also time PyTorch + PEFT under bf16 autocast and print that ratio.
    pub torch_bf16: bool,
    /// Then the timed steps again through [`Profiled`]: where a step's time goes.
    pub profile: bool,
    /// JSON instead of a table.
    pub json: bool,
}

/// Writes a preset model into `dir` through `init-model`'s own code path.
pub fn write_preset(preset: Preset, dir: &Path) -> Result<()> {
    build_model(&InitModelOptions::new(preset, dir)).map(|_| ())
}

/// FLOPs of one training step as this engine runs it (causal attention counted as half the
/// square; backward = input gradients of the frozen matmuls + LoRA gradients).
pub fn train_step_flops(c: &LlamaConfig, lora: &LoraConfig, batch: usize, seq: usize) -> f64 {
    let m = (batch * seq) as f64;
    let mut linear = 0.0;
    let mut lora_f = 0.0;
    for p in Proj::ALL {
        let (fin, fout) = p.dims(c);
        linear += 2.0 * m * (fin * fout) as f64;
        if lora.targets(p) {
            lora_f += 2.0 * m * (lora.r * (fin + fout)) as f64;
        }
    }
    let layers = c.num_hidden_layers as f64;
    let attn_fwd =
        2.0 * batch as f64 * c.num_attention_heads as f64 * (seq * seq) as f64 * c.head_dim as f64;
    let lm_head = 2.0 * m * (c.hidden_size * c.vocab_size) as f64;
    // forward + input-gradient backward: 2× each frozen matmul; LoRA: 1× forward, 2× backward;
    // attention backward recomputes scores: 5 matmuls against forward's 2.
    layers * (2.0 * linear + 3.0 * lora_f + attn_fwd * 3.5) + 2.0 * lm_head
}

/// A `/proc/self/status` field in bytes (`VmHWM` = peak RSS, `RssAnon` = private memory
/// now, `RssFile` = file-backed pages now, e.g. the mapped checkpoint), where the OS tells it.
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.split(':').next() == Some(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Bytes of the checkpoint files (`*.safetensors`) in a model directory: the frozen weights
/// as they are mapped.
pub fn checkpoint_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Peak resident set size of this process, in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM")
}

fn random_batch(vocab: usize, batch: usize, seq: usize, seed: u64) -> Batch {
    let mut rng = Rng::new(seed);
    let mut next = || (rng.next_u64() % vocab as u64) as i32;
    let stream: Vec<i32> = (0..batch * (seq + 1)).map(|_| next()).collect();
    let mut ids = Vec::with_capacity(batch * seq);
    let mut targets = Vec::with_capacity(batch * seq);
    for b in 0..batch {
        let row = &stream[b * (seq + 1)..(b + 1) * (seq + 1)];
        ids.extend_from_slice(&row[..seq]);
        targets.extend_from_slice(&row[1..]);
    }
    Batch {
        batch,
        seq,
        n_targets: batch * seq,
        ids,
        targets,
        example_index: (0..batch).collect(),
    }
}

/// Loads the model in `dir` on `be` and runs `warmup + steps` training steps on random
/// tokens; returns the timed steps' seconds and the model's config. `after_warmup` runs once,
/// before the first timed step.
fn time_steps<B: Backend>(
    be: &B,
    dir: &Path,
    a: &TrainBenchOptions,
    what: &str,
    after_warmup: impl Fn(),
) -> Result<(Vec<f64>, LlamaConfig)> {
    let lm = load_model(be, dir)?;
    let cfg = &lm.model.config;
    let mut lora = Lora::init(be, cfg, a.lora.clone(), 0)?;
    let mut ws = Workspace::new(be, cfg, &a.lora, a.batch, a.seq);
    let mut opt = OptState::new(be, &mut lora);
    let optimizer = Optimizer::AdamW(AdamW::torch(1e-4, 0.0));
    let bar = Progress::new();
    let total = a.warmup + a.steps;
    let mut step_secs = Vec::with_capacity(a.steps);
    for step in 0..total {
        if step == a.warmup {
            after_warmup();
        }
        let batch = [random_batch(cfg.vocab_size, a.batch, a.seq, step as u64)];
        let t = Instant::now();
        train_step(
            be,
            &lm.model,
            &mut lora,
            &mut opt,
            &mut ws,
            &batch,
            optimizer,
            Some(1.0),
            step as u64,
            |_, _| Ok(()),
        )?;
        if step >= a.warmup {
            step_secs.push(t.elapsed().as_secs_f64());
        }
        bar.update(step + 1, total, what);
    }
    bar.finish();
    Ok((step_secs, cfg.clone()))
}

/// Runs the benchmark on the CPU; returns the table (or JSON) to print.
pub fn run_train_bench(a: &TrainBenchOptions) -> Result<String> {
    if a.steps == 0 || a.batch == 0 || a.seq == 0 {
        bail!("--steps, --batch and --seq must be at least 1");
    }
    let be = crate::device::cpu(a.threads)?;
    let tmp;
    let (dir, label) = match &a.model {
        Some(d) => (d.clone(), d.display().to_string()),
        None => {
            tmp = TempDir::new("fedcdd-bench-model")?;
            progress::line(&format!(
                "writing the {} preset to {}",
                a.preset.name(),
                tmp.0.display()
            ));
            write_preset(a.preset, &tmp.0)?;
            (tmp.0.clone(), format!("preset {}", a.preset.name()))
        }
    };
    let (step_secs, config) = time_steps(&be, &dir, a, "steps", || {})?;
    let cfg = &config;
    let lcfg = a.lora.clone();
    let rss = peak_rss_bytes();
    let weight_bytes = checkpoint_bytes(&dir);
    let (anon, file) = (proc_status_bytes("RssAnon"), proc_status_bytes("RssFile"));
    progress::line(&format!(
        "measuring this machine's f32 matmul peak ({:.1}s)",
        a.peak_seconds
    ));
    let peak_gflops = fedcdd_kernels::cpu::matmul::measure_matmul_peak(&be, a.peak_seconds);
    let mut sorted = step_secs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let tokens = (a.batch * a.seq) as f64;
    let flops = train_step_flops(cfg, &lcfg, a.batch, a.seq);
    let tps_median = tokens / median;
    let gflops = flops / median / 1e9;
    let torch = if a.torch {
        Some(run_torch(&dir, a, false)?)
    } else {
        None
    };
    let torch_bf16 = if a.torch_bf16 {
        Some(run_torch(&dir, a, true)?)
    } else {
        None
    };
    let profile = if a.profile {
        progress::line("the timed steps again, with a timer around every op");
        let pbe = Profiled::new(crate::device::cpu(a.threads)?);
        let (secs, _) = time_steps(&pbe, &dir, a, "profiled steps", || {
            pbe.take();
        })?;
        Some(StepProfile::new(pbe.take(), &secs, cfg.vocab_size))
    } else {
        None
    };
    let json = serde_json::json!({
        "model": label,
        "backend": be.name(),
        "batch": a.batch,
        "seq": a.seq,
        "lora_r": lcfg.r,
        "lora_targets": lcfg.targets.iter().map(|p| p.module_name()).collect::<Vec<_>>(),
        "steps": a.steps,
        "step_seconds": {"min": sorted[0], "median": median, "max": sorted[sorted.len() - 1]},
        "tokens_per_second": {"min": tokens / sorted[sorted.len() - 1], "median": tps_median, "max": tokens / sorted[0]},
        "gflop_per_step": flops / 1e9,
        "achieved_gflops": gflops,
        "matmul_peak_gflops": peak_gflops,
        "fraction_of_peak": gflops / peak_gflops,
        "peak_rss_bytes": rss,
        "weight_bytes": weight_bytes,
        "peak_rss_above_weights_bytes": rss.map(|r| r as i64 - weight_bytes as i64),
        "rss_anon_bytes": anon,
        "rss_file_bytes": file,
        "torch_tokens_per_second": torch,
        "speedup_vs_torch": torch.map(|t| tps_median / t),
        "torch_bf16_autocast_tokens_per_second": torch_bf16,
        "speedup_vs_torch_bf16_autocast": torch_bf16.map(|t| tps_median / t),
        "profile": profile.as_ref().map(StepProfile::to_json),
    });
    if a.json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&json)?));
    }
    let mut out = String::new();
    writeln!(
        out,
        "model          {label} ({} layers, hidden {}, vocab {})",
        cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    )?;
    writeln!(out, "backend        {}", be.name())?;
    writeln!(
        out,
        "shape          batch {} x seq {}, LoRA r={} on {} projections",
        a.batch,
        a.seq,
        lcfg.r,
        lcfg.targets.len()
    )?;
    writeln!(
        out,
        "step time      {:.4} / {:.4} / {:.4} s (min / median / max of {})",
        sorted[0],
        median,
        sorted[sorted.len() - 1],
        a.steps
    )?;
    writeln!(out, "tokens/s       {tps_median:.0} (median step)")?;
    writeln!(
        out,
        "compute        {:.2} GFLOP/step -> {gflops:.1} GFLOP/s = {:.0}% of this machine's f32 matmul peak ({peak_gflops:.1} GFLOP/s, measured now)",
        flops / 1e9,
        100.0 * gflops / peak_gflops
    )?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    if let Some(rss) = rss {
        writeln!(
            out,
            "peak RSS       {:.1} MiB = weights {:.1} MiB (checkpoint files) + {:.1} MiB",
            mib(rss),
            mib(weight_bytes),
            (rss as f64 - weight_bytes as f64) / (1 << 20) as f64
        )?;
    }
    if let (Some(anon), Some(file)) = (anon, file) {
        writeln!(
            out,
            "resident now   {:.1} MiB private + {:.1} MiB file-backed (the mapped checkpoint)",
            mib(anon),
            mib(file)
        )?;
    }
    if let Some(t) = torch {
        writeln!(
            out,
            "PyTorch+PEFT   {t:.0} tokens/s (f32 eager, same model and shapes) -> fedcdd is {:.2}x",
            tps_median / t
        )?;
    }
    if let Some(t) = torch_bf16 {
        writeln!(
            out,
            "PyTorch bf16   {t:.0} tokens/s (PEFT, bf16 autocast, f32 weights) -> fedcdd f32 is {:.2}x",
            tps_median / t
        )?;
    }
    if let Some(p) = &profile {
        out.push('\n');
        out.push_str(&p.table(peak_gflops));
    }
    Ok(out)
}

/// Where a training step's time goes: per-op totals from a [`Profiled`] run, per step.
#[derive(Debug, Clone)]
pub struct StepProfile {
    /// Mean wall time of a profiled step (the op totals are means too).
    pub step_seconds: f64,
    pub steps: usize,
    /// `(category, key, totals per step)`, slowest first.
    pub rows: Vec<(&'static str, OpKey, OpTotals)>,
}

/// The part of a step an op belongs to. A frozen weight with `vocab` rows is the LM head (the
/// tied embedding when the model ties them).
pub fn op_category(key: &OpKey, vocab: usize) -> &'static str {
    match key.op {
        "linear_forward" | "linear_backward_input" if key.weight.map(|w| w.0) == Some(vocab) => {
            "LM head (vocab matmul)"
        }
        "linear_forward" | "linear_backward_input" => "frozen projections",
        "lora_forward"
        | "lora_backward"
        | "lora_forward_dropout"
        | "lora_backward_dropout"
        | "dropout_forward"
        | "dropout_backward" => "LoRA side path",
        "attention_forward" | "attention_backward" | "rope" => "attention + RoPE",
        "cross_entropy" => "cross-entropy",
        "rmsnorm_forward" | "rmsnorm_backward" | "swiglu_forward" | "swiglu_backward"
        | "embedding_forward" | "embedding_backward" | "axpy" => {
            "norms, SwiGLU, embedding, residuals"
        }
        "adamw_step" | "sgd_step" | "sum_squares" | "scale" => "optimizer + clipping",
        "matmul" => "other matmuls",
        _ => "buffers (alloc, fill, copy, upload)",
    }
}

/// GFLOP/s of `flops` done in `seconds`, for the ops that count FLOPs (memory-bound ones
/// have none).
fn gflop_rate(seconds: f64, flops: f64) -> Option<f64> {
    (seconds > 0.0 && flops > 0.0).then(|| flops / seconds / 1e9)
}

impl StepProfile {
    /// Totals over `step_secs.len()` steps, turned into per-step figures.
    pub fn new(totals: Vec<(OpKey, OpTotals)>, step_secs: &[f64], vocab: usize) -> Self {
        let steps = step_secs.len().max(1);
        let per = steps as f64;
        let mut rows: Vec<_> = totals
            .into_iter()
            .map(|(k, t)| {
                let per_step = OpTotals {
                    calls: t.calls / steps as u64,
                    seconds: t.seconds / per,
                    flops: t.flops / per,
                };
                (op_category(&k, vocab), k, per_step)
            })
            .collect();
        rows.sort_by(|a, b| b.2.seconds.total_cmp(&a.2.seconds));
        StepProfile {
            step_seconds: step_secs.iter().sum::<f64>() / per,
            steps: step_secs.len(),
            rows,
        }
    }

    /// Per-category totals `(category, seconds, flops)`, slowest first, then the time outside
    /// every op (host code, waits) as its own line.
    pub fn categories(&self) -> Vec<(&'static str, f64, f64)> {
        let mut cats: Vec<(&'static str, f64, f64)> = Vec::new();
        for (c, _, t) in &self.rows {
            match cats.iter_mut().find(|(name, _, _)| name == c) {
                Some(e) => {
                    e.1 += t.seconds;
                    e.2 += t.flops;
                }
                None => cats.push((c, t.seconds, t.flops)),
            }
        }
        cats.sort_by(|a, b| b.1.total_cmp(&a.1));
        let in_ops: f64 = cats.iter().map(|c| c.1).sum();
        cats.push((
            "outside the ops (host code)",
            (self.step_seconds - in_ops).max(0.0),
            0.0,
        ));
        cats
    }

    pub fn to_json(&self) -> serde_json::Value {
        let rate = gflop_rate;
        serde_json::json!({
            "steps": self.steps,
            "step_seconds_mean": self.step_seconds,
            "categories": self.categories().iter().map(|(c, s, f)| serde_json::json!({
                "category": c, "seconds_per_step": s, "gflop_per_step": f / 1e9,
                "gflops": rate(*s, *f),
            })).collect::<Vec<_>>(),
            "ops": self.rows.iter().map(|(c, k, t)| serde_json::json!({
                "category": c, "op": k.op, "shape": k.shape, "calls_per_step": t.calls,
                "seconds_per_step": t.seconds, "gflop_per_step": t.flops / 1e9,
                "gflops": rate(t.seconds, t.flops),
            })).collect::<Vec<_>>(),
        })
    }

    /// Two tables: by category, then the slowest ops (those above 0.5 % of a step).
    pub fn table(&self, peak_gflops: f64) -> String {
        let mut out = String::new();
        let step = self.step_seconds.max(1e-12);
        let rate = |s: f64, f: f64| {
            gflop_rate(s, f).map_or(String::new(), |g| {
                format!("{g:7.1} GFLOP/s {:3.0}%", 100.0 * g / peak_gflops)
            })
        };
        let _ = writeln!(
            out,
            "profile        mean step {:.4} s over {} profiled steps; % of peak against {peak_gflops:.1} GFLOP/s",
            self.step_seconds, self.steps
        );
        let _ = writeln!(
            out,
            "  {:<38} {:>9} {:>6}",
            "part of the step", "ms/step", "share"
        );
        for (c, s, f) in self.categories() {
            let _ = writeln!(
                out,
                "  {c:<38} {:9.1} {:5.1}%  {}",
                1e3 * s,
                100.0 * s / step,
                rate(s, f)
            );
        }
        let _ = writeln!(
            out,
            "\n  {:<22} {:<42} {:>6} {:>9} {:>6}",
            "op", "shape", "calls", "ms/step", "share"
        );
        for (_, k, t) in self.rows.iter().filter(|r| r.2.seconds > 0.005 * step) {
            let _ = writeln!(
                out,
                "  {:<22} {:<42} {:>6} {:9.1} {:5.1}%  {}",
                k.op,
                k.shape,
                t.calls,
                1e3 * t.seconds,
                100.0 * t.seconds / step,
                rate(t.seconds, t.flops)
            );
        }
        out
    }
}

/// Runs scripts/bench_torch_train.py (under bf16 autocast with `autocast`) and returns its
/// tokens/s.
fn run_torch(dir: &Path, a: &TrainBenchOptions, autocast: bool) -> Result<f64> {
    let targets: Vec<&str> = a.lora.targets.iter().map(|p| p.module_name()).collect();
    let targets = targets.join(",");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench_torch_train.py");
    if !script.is_file() {
        bail!(
            "--torch needs {} (from the fedcdd source tree this binary was built in)",
            script.display()
        );
    }
    progress::line(&format!(
        "timing PyTorch + PEFT{} with {}",
        if autocast { " (bf16 autocast)" } else { "" },
        script.display()
    ));
    let out = Command::new("python3")
        .arg(&script)
        .args(autocast.then_some("--autocast-bf16"))
        .args(["--model", &dir.display().to_string()])
        .args(["--batch", &a.batch.to_string(), "--seq", &a.seq.to_string()])
        .args([
            "--steps",
            &a.steps.to_string(),
            "--warmup",
            &a.warmup.to_string(),
        ])
        .args([
            "--lora-r",
            &a.lora.r.to_string(),
            "--lora-dropout",
            &a.lora.dropout.to_string(),
            "--targets",
            &targets,
        ])
        .args(["--threads", &a.threads.to_string()])
        .output()
        .context("cannot run python3 for --torch")?;
    if !out.status.success() {
        bail!(
            "the PyTorch benchmark failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .with_context(|| format!("the PyTorch benchmark printed no JSON: {text}"))?;
    v["tokens_per_second"]
        .as_f64()
        .context("the PyTorch benchmark printed no tokens_per_second")
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let base = std::env::temp_dir();
        for i in 0..1000u32 {
            let p = base.join(format!("{prefix}-{}-{i}", std::process::id()));
            if std::fs::create_dir(&p).is_ok() {
                return Ok(TempDir(p));
            }
        }
        bail!("cannot create a temporary directory in {}", base.display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(op: &'static str, weight: Option<(usize, usize)>) -> OpKey {
        OpKey {
            op,
            shape: String::new(),
            weight,
        }
    }

    fn totals(calls: u64, seconds: f64, flops: f64) -> OpTotals {
        OpTotals {
            calls,
            seconds,
            flops,
        }
    }

    #[test]
    fn the_vocab_matmul_is_the_head_and_other_weights_are_projections() {
        assert_eq!(
            op_category(&op("linear_forward", Some((1000, 64))), 1000),
            "LM head (vocab matmul)"
        );
        assert_eq!(
            op_category(&op("linear_backward_input", Some((64, 64))), 1000),
            "frozen projections"
        );
        assert_eq!(
            op_category(&op("zeros", None), 1000),
            "buffers (alloc, fill, copy, upload)"
        );
    }

    #[test]
    fn a_profile_is_per_step_and_names_the_time_outside_the_ops() {
        // Two steps of 1.0 s and 3.0 s: the mean step is 2.0 s.
        let p = StepProfile::new(
            vec![
                (op("linear_forward", Some((8, 4))), totals(4, 1.0, 8e9)),
                (op("lora_forward", None), totals(2, 0.5, 0.0)),
                (op("lora_backward", None), totals(2, 1.5, 0.0)),
            ],
            &[1.0, 3.0],
            1000,
        );
        assert_eq!(p.step_seconds, 2.0);
        assert_eq!(p.rows[0].1.op, "lora_backward", "slowest first");
        assert_eq!(p.rows[0].2, totals(1, 0.75, 0.0));
        let cats = p.categories();
        assert_eq!(cats[0], ("LoRA side path", 1.0, 0.0));
        assert_eq!(cats[1], ("frozen projections", 0.5, 4e9));
        assert_eq!(cats[2], ("outside the ops (host code)", 0.5, 0.0));
        let j = p.to_json();
        assert_eq!(j["categories"][1]["gflops"], 8.0);
        assert!(p.table(100.0).contains("8.0 GFLOP/s"));
    }
}
