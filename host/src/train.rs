//! LoRA training, evaluation and generation over a kernels backend: the optimizer loop,
//! gradient accumulation, clipping, per-domain evaluation, sampling with a KV cache.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use fedcdd_kernels::{AdamW, Backend, Sgd, clip_grad_norm};

use crate::adapter::{load_adapter, save_adapter};
use crate::data::{Batch, Example, make_batch};
use crate::model::llama::{self, KvCache, Lora, Mode, Model, Workspace};
use crate::model::lora::LoraConfig;

/// The client optimizer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    AdamW(AdamW),
    Sgd(Sgd),
}

impl Optimizer {
    pub fn lr(&self) -> f32 {
        match self {
            Optimizer::AdamW(h) => h.lr,
            Optimizer::Sgd(h) => h.lr,
        }
    }

    pub fn with_lr(self, lr: f32) -> Self {
        match self {
            Optimizer::AdamW(h) => Optimizer::AdamW(AdamW { lr, ..h }),
            Optimizer::Sgd(h) => Optimizer::Sgd(Sgd { lr, ..h }),
        }
    }
}

/// Optimizer moments, one pair per LoRA parameter in `Lora::params_mut` order.
pub struct OptState<B: Backend> {
    m: Vec<B::Buf>,
    v: Vec<B::Buf>,
    /// Steps taken (AdamW bias correction; SGD's first momentum use).
    pub steps: u64,
    /// Parameters (same order) the optimizer leaves alone, e.g. FFA-LoRA's shared A.
    pub frozen: Vec<bool>,
}

impl<B: Backend> OptState<B> {
    pub fn new(be: &B, lora: &mut Lora<B>) -> Self {
        let sizes: Vec<usize> = lora
            .params_mut()
            .iter()
            .map(|(p, _)| be.buf_len(p))
            .collect();
        OptState {
            m: sizes.iter().map(|&n| be.zeros(n)).collect(),
            v: sizes.iter().map(|&n| be.zeros(n)).collect(),
            steps: 0,
            frozen: vec![false; sizes.len()],
        }
    }
}

/// Statistics of one optimizer step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    /// Mean token loss over the step's target tokens.
    pub loss: f64,
    /// Target tokens the loss covered.
    pub targets: usize,
    /// Input tokens processed (batch · seq · micro-batches), padding included.
    pub tokens: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
}

/// One optimizer step over `micro` batches (gradient accumulation): the loss is the mean over
/// all their target tokens. `grad_hook` may edit the gradients before clipping (FedProx,
/// SCAFFOLD); pass `|_, _| {}` for none.
#[allow(clippy::too_many_arguments)]
pub fn train_step<B: Backend>(
    be: &B,
    model: &Model<B>,
    lora: &mut Lora<B>,
    opt: &mut OptState<B>,
    ws: &mut Workspace<B>,
    micro: &[Batch],
    optimizer: Optimizer,
    max_grad_norm: Option<f32>,
    step_seed: u64,
    mut grad_hook: impl FnMut(&B, &mut Lora<B>),
) -> Result<StepStats> {
    let total_targets: usize = micro.iter().map(|b| b.n_targets).sum();
    if total_targets == 0 {
        bail!("the step's batches hold no target tokens (every label is masked)");
    }
    lora.zero_grads(be);
    let scale = 1.0 / total_targets as f32;
    let mut loss_sum = 0.0;
    let mut tokens = 0;
    for (i, b) in micro.iter().enumerate() {
        let mode = Mode {
            dropout_seed: Some(step_seed ^ (i as u64).wrapping_mul(0x9E37_79B9)),
        };
        let l = llama::forward(be, model, lora, ws, &b.ids, &b.targets, mode, Some(scale))?;
        loss_sum += l.sum;
        tokens += b.ids.len();
        llama::backward(be, model, lora, ws, mode);
    }
    grad_hook(be, lora);
    // Frozen parameters get no gradient, so they count for nothing in the clipping norm.
    for (i, (_, g)) in lora.params_mut().into_iter().enumerate() {
        if opt.frozen.get(i).copied().unwrap_or(false) {
            be.fill(g, 0.0);
        }
    }
    let grad_norm = {
        let mut grads: Vec<&mut B::Buf> = lora.params_mut().into_iter().map(|(_, g)| g).collect();
        match max_grad_norm {
            Some(max) => clip_grad_norm(be, &mut grads, max),
            None => grads.iter().map(|g| be.sum_squares(g)).sum::<f64>().sqrt() as f32,
        }
    };
    if !grad_norm.is_finite() {
        bail!("the gradient is not finite (norm {grad_norm}); lower the learning rate");
    }
    opt.steps += 1;
    let step = opt.steps;
    for (i, (p, g)) in lora.params_mut().into_iter().enumerate() {
        if opt.frozen.get(i).copied().unwrap_or(false) {
            continue;
        }
        match optimizer {
            Optimizer::AdamW(hp) => be.adamw_step(p, g, &mut opt.m[i], &mut opt.v[i], hp, step),
            Optimizer::Sgd(hp) => be.sgd_step(p, g, &mut opt.m[i], hp, step == 1),
        }
    }
    Ok(StepStats {
        loss: loss_sum / total_targets as f64,
        targets: total_targets,
        tokens,
        grad_norm,
    })
}

/// Options of a local training run.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub steps: usize,
    pub batch: usize,
    pub seq: usize,
    pub grad_accum: usize,
    pub optimizer: Optimizer,
    pub max_grad_norm: Option<f32>,
    /// Linear warmup steps, then constant (0 = constant).
    pub warmup: usize,
    /// After warmup, cosine decay to `lr · min_lr_ratio` at the last step (1 = constant).
    pub min_lr_ratio: f32,
    pub seed: u64,
}

impl TrainOptions {
    /// The learning rate of step `step` (from 0): linear warmup, then constant.
    pub fn lr_at(&self, step: usize) -> f32 {
        let lr = self.optimizer.lr();
        if self.warmup > 0 && step < self.warmup {
            lr * (step + 1) as f32 / self.warmup as f32
        } else if self.min_lr_ratio < 1.0 && self.steps > self.warmup + 1 {
            let t = (step - self.warmup) as f32 / (self.steps - self.warmup - 1) as f32;
            let c = 0.5 * (1.0 + (std::f32::consts::PI * t.min(1.0)).cos());
            lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * c)
        } else {
            lr
        }
    }
}

/// The token that fills batch rows past an example's end: `pad_token_id`, else the first
/// EOS, else 0 (its positions are never targets, so only its attention inputs see it).
pub fn pad_id(c: &crate::model::config::LlamaConfig) -> u32 {
    c.pad_token_id
        .or(c.eos_token_ids.first().copied())
        .unwrap_or(0)
}

/// Deterministic example order: shuffled epochs (SplitMix64-driven Fisher–Yates).
pub struct Sampler {
    order: Vec<usize>,
    next: usize,
    state: u64,
}

impl Sampler {
    pub fn new(n: usize, seed: u64) -> Self {
        let mut s = Sampler {
            order: (0..n).collect(),
            next: n,
            state: seed,
        };
        s.reshuffle();
        s
    }

    fn rand(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn reshuffle(&mut self) {
        for i in (1..self.order.len()).rev() {
            let j = (self.rand() % (i as u64 + 1)) as usize;
            self.order.swap(i, j);
        }
        self.next = 0;
    }

    /// The next `k` example indices (wrapping into a new shuffled epoch).
    pub fn take(&mut self, k: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        while out.len() < k && !self.order.is_empty() {
            if self.next == self.order.len() {
                self.reshuffle();
            }
            out.push(self.order[self.next]);
            self.next += 1;
        }
        out
    }
}

/// Trains `lora` on `examples` for `opts.steps` steps; `on_step(step, stats)` sees each one.
pub fn train<B: Backend>(
    be: &B,
    model: &Model<B>,
    lora: &mut Lora<B>,
    examples: &[Example],
    opts: &TrainOptions,
    mut on_step: impl FnMut(usize, &StepStats),
) -> Result<Vec<StepStats>> {
    if examples.is_empty() {
        bail!("no training examples");
    }
    if opts.batch == 0 || opts.seq < 1 || opts.grad_accum == 0 {
        bail!("batch, seq and grad-accum must be at least 1");
    }
    let pad = pad_id(&model.config);
    let mut ws = Workspace::new(be, &model.config, &lora.config, opts.batch, opts.seq);
    let mut opt = OptState::new(be, lora);
    let mut sampler = Sampler::new(examples.len(), opts.seed);
    let mut history = Vec::with_capacity(opts.steps);
    for step in 0..opts.steps {
        let micro: Vec<Batch> = (0..opts.grad_accum)
            .map(|_| {
                let idx = sampler.take(opts.batch);
                let chosen: Vec<&Example> = idx.iter().map(|&i| &examples[i]).collect();
                make_batch(&chosen, opts.seq, pad)
            })
            .collect();
        let lr = opts.lr_at(step);
        let step_seed = opts
            .seed
            .wrapping_mul(0x2545_F491_4F6C_DD1D)
            .wrapping_add(step as u64);
        let stats = train_step(
            be,
            model,
            lora,
            &mut opt,
            &mut ws,
            &micro,
            opts.optimizer.with_lr(lr),
            opts.max_grad_norm,
            step_seed,
            |_, _| {},
        )
        .with_context(|| format!("training step {}", step + 1))?;
        on_step(step, &stats);
        history.push(stats);
    }
    Ok(history)
}

/// Loss of one group of tokens.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct LossReport {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
}

impl LossReport {
    fn from_sum(sum: f64, tokens: usize) -> Self {
        let loss = if tokens == 0 {
            f64::NAN
        } else {
            sum / tokens as f64
        };
        LossReport {
            loss,
            perplexity: loss.exp(),
            tokens,
        }
    }
}

/// Mean token loss overall and per domain (`"-"` for examples without one).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct EvalReport {
    pub overall: LossReport,
    pub domains: BTreeMap<String, LossReport>,
    pub examples: usize,
    /// Examples cut to `seq + 1` tokens.
    pub truncated: usize,
}

/// Evaluates every example once (no dropout), in batches of `batch` sequences of at most
/// `seq` inputs (longer examples are truncated and counted).
pub fn evaluate<B: Backend>(
    be: &B,
    model: &Model<B>,
    lora: &Lora<B>,
    examples: &[Example],
    batch: usize,
    max_seq: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    if examples.is_empty() {
        bail!("no evaluation examples");
    }
    let longest = examples
        .iter()
        .map(|e| e.ids.len().saturating_sub(1))
        .max()
        .unwrap_or(1);
    let seq = longest.clamp(1, max_seq.max(1)).min(model.rope_positions);
    let truncated = examples.iter().filter(|e| e.ids.len() > seq + 1).count();
    let pad = pad_id(&model.config);
    // Sort by length so padding stays small; shape the workspace per distinct length.
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].ids.len());
    let mut per_domain: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let (mut total, mut count) = (0.0f64, 0usize);
    let mut row_loss = Vec::new();
    let mut ws: Option<Workspace<B>> = None;
    for (done, chunk) in order.chunks(batch.max(1)).enumerate() {
        let chosen: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
        let chunk_seq = chosen
            .iter()
            .map(|e| e.ids.len().saturating_sub(1))
            .max()
            .unwrap_or(1)
            .clamp(1, seq);
        // Round up so a handful of workspace shapes serve the whole run.
        let chunk_seq = chunk_seq.next_power_of_two().min(seq);
        let b = make_batch(&chosen, chunk_seq, pad);
        if ws
            .as_ref()
            .is_none_or(|w| w.batch != b.batch || w.seq != chunk_seq)
        {
            ws = Some(Workspace::new(
                be,
                &model.config,
                &lora.config,
                b.batch,
                chunk_seq,
            ));
        }
        let w = ws.as_mut().context("workspace")?;
        let l = llama::forward(
            be,
            model,
            lora,
            w,
            &b.ids,
            &b.targets,
            Mode { dropout_seed: None },
            None,
        )?;
        row_loss.resize(b.ids.len(), 0.0);
        be.download(w.row_loss(), &mut row_loss);
        for (r, &ex) in b.example_index.iter().enumerate() {
            let rows = &row_loss[r * chunk_seq..(r + 1) * chunk_seq];
            let tg = &b.targets[r * chunk_seq..(r + 1) * chunk_seq];
            let n = tg.iter().filter(|&&t| t != llama::IGNORE_INDEX).count();
            let s: f64 = rows.iter().map(|&v| v as f64).sum();
            // example_index counts within the slice given to make_batch.
            let key = examples[chunk[ex]]
                .domain
                .clone()
                .unwrap_or_else(|| "-".into());
            let e = per_domain.entry(key).or_default();
            e.0 += s;
            e.1 += n;
        }
        total += l.sum;
        count += l.count;
        progress((done + 1) * batch.max(1), examples.len());
    }
    Ok(EvalReport {
        overall: LossReport::from_sum(total, count),
        domains: per_domain
            .into_iter()
            .map(|(k, (s, n))| (k, LossReport::from_sum(s, n)))
            .collect(),
        examples: examples.len(),
        truncated,
    })
}

/// Sampling settings for generation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

/// Generates up to `max_tokens` after `prompt` (ids incl. BOS), stopping at any of `stop`.
/// `on_token` sees each new token as it is produced.
#[allow(clippy::too_many_arguments)]
pub fn generate<B: Backend>(
    be: &B,
    model: &Model<B>,
    lora: Option<&Lora<B>>,
    prompt: &[u32],
    max_tokens: usize,
    sampling: Sampling,
    stop: &[u32],
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    if max_tokens == 0 {
        bail!("max_tokens must be at least 1");
    }
    let capacity = (prompt.len() + max_tokens).min(model.rope_positions);
    if prompt.len() >= capacity {
        bail!(
            "the prompt has {} tokens; max_position_embeddings is {}",
            prompt.len(),
            model.rope_positions
        );
    }
    let mut cache = KvCache::new(be, &model.config, capacity);
    let ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let mut logits = llama::forward_cached(be, model, lora, &mut cache, &ids)?;
    let mut rng = Sampler::new(0, sampling.seed);
    let mut out = Vec::new();
    while out.len() < max_tokens {
        if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
            bail!(
                "the logits after {} tokens are not finite (logit {i} is {}): the model or \
                 adapter weights hold non-finite values",
                cache.len,
                logits[i]
            );
        }
        let next = sample(&logits, sampling, &mut rng);
        out.push(next);
        on_token(next);
        if stop.contains(&next) || cache.len >= capacity {
            break;
        }
        logits = llama::forward_cached(be, model, lora, &mut cache, &[next as i32])?;
    }
    Ok(out)
}

/// Greedy (temperature 0) or temperature + nucleus (top-p) sampling.
pub fn sample(logits: &[f32], s: Sampling, rng: &mut Sampler) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 { (i, v) } else { best }
            })
            .0 as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, (((v - max) / s.temperature) as f64).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top_p = s.top_p.clamp(0.0, 1.0) as f64;
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1 / total;
        if mass >= top_p {
            break;
        }
    }
    let kept = &probs[..kept.max(1)];
    let kept_total: f64 = kept.iter().map(|p| p.1).sum();
    let u = (rng.rand() >> 11) as f64 / (1u64 << 53) as f64 * kept_total;
    let mut acc = 0.0;
    for p in kept {
        acc += p.1;
        if u < acc {
            return p.0 as u32;
        }
    }
    kept[kept.len() - 1].0 as u32
}

/// Saves `lora` as a PEFT adapter directory.
pub fn save_lora<B: Backend>(be: &B, lora: &Lora<B>, dir: &Path, base_model: &str) -> Result<()> {
    let tensors = lora.to_tensors(be);
    save_adapter(dir, &tensors, Some(&lora.config.to_peft_json(base_model)))
}

/// Loads a PEFT adapter directory into a LoRA on `be`.
pub fn load_lora<B: Backend>(be: &B, model: &Model<B>, dir: &Path) -> Result<Lora<B>> {
    let adapter = load_adapter(dir)?;
    let origin = dir.display().to_string();
    let config = adapter.config.as_ref().with_context(|| {
        format!("{origin}: no adapter_config.json (need r, lora_alpha, target_modules)")
    })?;
    let cfg = LoraConfig::from_peft_json(config, &origin)?;
    let mut lora = Lora::init(be, &model.config, cfg, 0)?;
    lora.load_tensors(be, &adapter.tensors, &origin)?;
    Ok(lora)
}
