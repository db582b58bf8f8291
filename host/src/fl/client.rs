//! One client's local run: LoRA training from its start adapter on its own examples, with a
//! strategy's client-side hooks (frozen factors, gradient adjustments).

use anyhow::{Context, Result, bail};
use fedcdd_kernels::Backend;

use crate::data::{Batch, Example, make_batch};
use crate::model::llama::{Lora, Model, Workspace};
use crate::train::{OptState, Optimizer, Sampler, pad_id, train_step};

use super::config::RunConfig;
use super::seeds::splitmix;
use super::strategy::ClientRun;

/// How a client's local training is shaped.
pub struct LocalPlan<'a> {
    pub steps: usize,
    /// Learning rate of local step `s`.
    pub lr: &'a dyn Fn(usize) -> f32,
    pub seed: u64,
    /// Per trainable parameter (`Lora::params_mut` order): the strategy freezes it.
    pub frozen: Vec<bool>,
}

/// Trains `lora` in place on `examples`; `hooks` (a strategy's client run) may adjust each
/// step's gradients. Returns the mean step loss.
#[allow(clippy::too_many_arguments)]
pub fn train_local<B: Backend>(
    be: &B,
    cfg: &RunConfig,
    model: &Model<B>,
    lora: &mut Lora<B>,
    ws: &mut Workspace<B>,
    examples: &[Example],
    plan: &LocalPlan,
    mut hooks: Option<&mut dyn ClientRun>,
    mut on_step: impl FnMut(usize, f64),
) -> Result<f64> {
    if examples.is_empty() {
        bail!("the client has no training examples");
    }
    let pad = pad_id(&model.config);
    let mut opt = OptState::new(be, lora);
    for (f, &frozen) in opt.frozen.iter_mut().zip(&plan.frozen) {
        *f = frozen;
    }
    let optimizer = Optimizer::new(cfg.optimizer, cfg.lr, cfg.weight_decay, 0.0);
    let mut sampler = Sampler::new(examples.len(), plan.seed);
    let accum = cfg.grad_accum();
    let mut loss_sum = 0.0;
    for step in 0..plan.steps {
        let micro: Vec<Batch> = (0..accum)
            .map(|_| {
                let idx = sampler.take(cfg.micro_batch);
                let chosen: Vec<&Example> = idx.iter().map(|&i| &examples[i]).collect();
                make_batch(&chosen, cfg.seq, pad)
            })
            .collect();
        let step_seed = splitmix(plan.seed ^ (step as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
        let stats = train_step(
            be,
            model,
            lora,
            &mut opt,
            ws,
            &micro,
            optimizer.with_lr((plan.lr)(step)),
            (cfg.max_grad_norm > 0.0).then_some(cfg.max_grad_norm),
            step_seed,
            |be, lora| match hooks.as_deref_mut() {
                Some(h) if h.adjusts_gradients() => adjust(be, lora, h),
                _ => Ok(()),
            },
        )
        .with_context(|| format!("local step {}", step + 1))?;
        loss_sum += stats.loss;
        on_step(step, stats.loss);
    }
    Ok(loss_sum / plan.steps.max(1) as f64)
}

/// Runs a client's gradient hook on host copies of the parameters and gradients.
fn adjust<B: Backend>(be: &B, lora: &mut Lora<B>, hook: &mut dyn ClientRun) -> Result<()> {
    let mut pairs = lora.params_mut();
    let download = |b: &B::Buf| {
        let mut v = vec![0.0f32; be.buf_len(b)];
        be.download(b, &mut v);
        v
    };
    let params: Vec<Vec<f32>> = pairs.iter().map(|(p, _)| download(p)).collect();
    let mut grads: Vec<Vec<f32>> = pairs.iter().map(|(_, g)| download(g)).collect();
    hook.adjust_gradients(&params, &mut grads)?;
    for ((_, g), v) in pairs.iter_mut().zip(&grads) {
        **g = be.upload(v);
    }
    Ok(())
}
