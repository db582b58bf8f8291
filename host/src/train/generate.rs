//! Text generation with a KV cache: greedy, or temperature + nucleus sampling.

use anyhow::{Result, bail};
use fedcdd_kernels::Backend;

use crate::model::llama::{self, KvCache, Lora, Model};
use crate::rng::Rng;

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
    // Each forward runs where the backend's ops are cheapest to call (`Backend::run`).
    let mut logits = be.run(|| llama::forward_cached(be, model, lora, &mut cache, &ids))?;
    let mut rng = Rng::new(sampling.seed);
    let mut out = Vec::new();
    while out.len() < max_tokens {
        check_finite(&logits, cache.len)?;
        let next = sample(&logits, sampling, &mut rng);
        out.push(next);
        on_token(next);
        if stop.contains(&next) || cache.len >= capacity {
            break;
        }
        logits = be.run(|| llama::forward_cached(be, model, lora, &mut cache, &[next as i32]))?;
    }
    Ok(out)
}

/// Greedy (temperature 0) or temperature + nucleus (top-p) sampling.
pub fn sample(logits: &[f32], s: Sampling, rng: &mut Rng) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
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
    let u = rng.unit() * kept_total;
    let mut acc = 0.0;
    for p in kept {
        acc += p.1;
        if u < acc {
            return p.0 as u32;
        }
    }
    kept[kept.len() - 1].0 as u32
}

/// An error when a logit after `tokens` tokens is NaN or infinite (broken weights).
fn check_finite(logits: &[f32], tokens: usize) -> Result<()> {
    if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
        bail!(
            "the logits after {tokens} tokens are not finite (logit {i} is {}): the model or \
             adapter weights hold non-finite values",
            logits[i]
        );
    }
    Ok(())
}

/// The index of the largest logit (the first of ties), as greedy [`sample`] picks it.
fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0 as u32
}

/// Greedy generation for several prompts of the same length at once (one batched forward
/// per step over a shared KV cache): row `i` stops at a `stop` token or after `budgets[i]`
/// tokens. Returns each row's new tokens, as [`generate`] with temperature 0 would.
pub fn generate_greedy_batch<B: Backend>(
    be: &B,
    model: &Model<B>,
    lora: Option<&Lora<B>>,
    prompts: &[Vec<u32>],
    budgets: &[usize],
    stop: &[u32],
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    let t = prompts[0].len();
    if t == 0 || prompts.iter().any(|p| p.len() != t) || budgets.len() != b {
        bail!("a batch needs non-empty prompts of one length and a budget per prompt");
    }
    let most = budgets.iter().copied().max().unwrap_or(0);
    if most == 0 {
        return Ok(vec![Vec::new(); b]);
    }
    let capacity = (t + most).min(model.rope_positions);
    if t >= capacity {
        bail!(
            "the prompts have {t} tokens; max_position_embeddings is {}",
            model.rope_positions
        );
    }
    let vocab = model.config.vocab_size;
    let mut cache = KvCache::batched(be, &model.config, b, capacity);
    let ids: Vec<i32> = prompts.iter().flatten().map(|&x| x as i32).collect();
    let mut logits = be.run(|| llama::forward_cached_batch(be, model, lora, &mut cache, &ids))?;
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done: Vec<bool> = budgets.iter().map(|&n| n == 0).collect();
    loop {
        let mut next = Vec::with_capacity(b);
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            check_finite(row, cache.len)?;
            let tok = argmax(row);
            if !done[i] {
                out[i].push(tok);
                done[i] = stop.contains(&tok) || out[i].len() >= budgets[i];
            }
            next.push(tok as i32);
        }
        if done.iter().all(|&d| d) || cache.len >= capacity {
            break;
        }
        logits = be.run(|| llama::forward_cached_batch(be, model, lora, &mut cache, &next))?;
    }
    Ok(out)
}
