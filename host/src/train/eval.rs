//! Token-level evaluation: mean loss and perplexity overall and per domain.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use fedcdd_kernels::Backend;

use crate::data::{Example, make_batch};
use crate::model::llama::{self, Lora, Mode, Model, Workspace};

use super::step::pad_id;

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
        // On the CPU, inside its thread pool (`Backend::run`).
        let l = be.run(|| {
            llama::forward(
                be,
                model,
                lora,
                w,
                &b.ids,
                &b.targets,
                Mode { dropout_seed: None },
                None,
            )
        })?;
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
