//! The training loop: one optimizer step (gradient accumulation, a gradient hook, clipping,
//! AdamW/SGD), the example sampler, and a whole local run.

use anyhow::{Context, Result, bail};
use fedcdd_kernels::{AdamW, Backend, Sgd, clip_grad_norm};

use crate::data::{Batch, Example, make_batch};
use crate::model::config::LlamaConfig;
use crate::model::llama::{self, Lora, Mode, Model, Workspace};
use crate::rng::Rng;

/// Which client optimizer (config `optimizer = "adamw" | "sgd"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OptimizerKind {
    #[default]
    AdamW,
    Sgd,
}

impl OptimizerKind {
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::AdamW => "adamw",
            OptimizerKind::Sgd => "sgd",
        }
    }
}

impl std::str::FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "adamw" => Ok(OptimizerKind::AdamW),
            "sgd" => Ok(OptimizerKind::Sgd),
            o => Err(format!("{o:?}: expected adamw or sgd")),
        }
    }
}

impl std::fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The client optimizer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    AdamW(AdamW),
    Sgd(Sgd),
}

impl Optimizer {
    /// `kind` with PyTorch's defaults at rate `lr`, weight decay and (SGD) momentum.
    pub fn new(kind: OptimizerKind, lr: f32, weight_decay: f32, momentum: f32) -> Self {
        match kind {
            OptimizerKind::AdamW => Optimizer::AdamW(AdamW::torch(lr, weight_decay)),
            OptimizerKind::Sgd => Optimizer::Sgd(Sgd::torch(lr, momentum, weight_decay)),
        }
    }

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
/// SCAFFOLD); pass `|_, _| Ok(())` for none.
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
    mut grad_hook: impl FnMut(&B, &mut Lora<B>) -> Result<()>,
) -> Result<StepStats> {
    let total_targets: usize = micro.iter().map(|b| b.n_targets).sum();
    if total_targets == 0 {
        bail!("the step's batches hold no target tokens (every label is masked)");
    }
    lora.zero_grads(be);
    let scale = 1.0 / total_targets as f32;
    // Forward and backward run where the backend's ops are cheapest to call (on the CPU:
    // inside its thread pool); the gradient hook stays on this thread.
    let (loss_sum, tokens) = be.run(|| -> Result<(f64, usize)> {
        let (mut loss_sum, mut tokens) = (0.0, 0);
        for (i, b) in micro.iter().enumerate() {
            let mode = Mode {
                dropout_seed: Some(step_seed ^ (i as u64).wrapping_mul(0x9E37_79B9)),
            };
            let l = llama::forward(be, model, lora, ws, &b.ids, &b.targets, mode, Some(scale))?;
            loss_sum += l.sum;
            tokens += b.ids.len();
            llama::backward(be, model, lora, ws, mode);
        }
        Ok((loss_sum, tokens))
    })?;
    grad_hook(be, lora)?;
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
pub fn pad_id(c: &LlamaConfig) -> u32 {
    c.pad_token_id
        .or(c.eos_token_ids.first().copied())
        .unwrap_or(0)
}

/// Deterministic example order: shuffled epochs (a SplitMix64 stream's Fisher–Yates).
pub struct Sampler {
    order: Vec<usize>,
    next: usize,
    rng: Rng,
}

impl Sampler {
    pub fn new(n: usize, seed: u64) -> Self {
        let mut s = Sampler {
            order: (0..n).collect(),
            next: n,
            rng: Rng::new(seed),
        };
        s.reshuffle();
        s
    }

    fn reshuffle(&mut self) {
        self.rng.shuffle(&mut self.order);
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
            |_, _| Ok(()),
        )
        .with_context(|| format!("training step {}", step + 1))?;
        on_step(step, &stats);
        history.push(stats);
    }
    Ok(history)
}
