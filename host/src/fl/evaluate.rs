//! Evaluation of a global model on every domain: token loss on the held-out split and
//! exact-match accuracy of greedy answers where the domain has answers.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use fedcdd_kernels::Backend;

use crate::data::builtin::exact_match;
use crate::data::formats::alpaca_prompt;
use crate::data::{Example, Record, Tokenizer, tokenize_records};
use crate::model::llama::{Lora, Model};
use crate::train::{evaluate, generate_greedy_batch};

/// A question with its reference answer (Alpaca records with an output).
#[derive(Clone, Debug)]
pub struct QA {
    pub prompt_ids: Vec<u32>,
    pub answer: String,
}

/// One domain's held-out data, tokenized once.
#[derive(Clone, Debug)]
pub struct EvalSet {
    pub domain: String,
    pub examples: Vec<Example>,
    pub questions: Vec<QA>,
}

/// Builds a domain's evaluation set from records: every record counts for the loss; the
/// first `max_questions` Alpaca records (with an output) are also asked for accuracy.
pub fn eval_set(
    domain: &str,
    records: &[Record],
    tok: &Tokenizer,
    max_questions: usize,
) -> Result<EvalSet> {
    let examples = tokenize_records(records, tok)
        .with_context(|| format!("evaluation data of domain {domain:?}"))?;
    let mut questions = Vec::new();
    for r in records {
        if questions.len() == max_questions {
            break;
        }
        if let Record::Alpaca {
            instruction,
            input,
            output,
            ..
        } = r
        {
            if output.trim().is_empty() {
                continue;
            }
            let prompt_ids = tok.encode(&alpaca_prompt(instruction, input), true)?;
            questions.push(QA {
                prompt_ids,
                answer: output.clone(),
            });
        }
    }
    Ok(EvalSet {
        domain: domain.to_string(),
        examples,
        questions,
    })
}

/// One domain's result.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainResult {
    pub loss: f64,
    pub accuracy: Option<f64>,
    pub examples: usize,
    /// Whether each question was answered exactly, in question order.
    pub correct: Vec<bool>,
}

/// Questions answered per batched decoding call.
const DECODE_BATCH: usize = 64;

/// Greedy answers to `questions`, decoded in batches of prompts of one length (batched
/// forward passes over a KV cache); whether each matches its reference exactly.
fn answer_all<B: Backend>(
    be: &B,
    model: &Model<B>,
    lora: &Lora<B>,
    tok: &Tokenizer,
    questions: &[QA],
) -> Result<Vec<bool>> {
    let stop: Vec<u32> = tok.eos_id().into_iter().collect();
    let mut order: Vec<usize> = (0..questions.len()).collect();
    order.sort_by_key(|&i| (questions[i].prompt_ids.len(), i));
    let mut correct = vec![false; questions.len()];
    let mut start = 0;
    while start < order.len() {
        let len = questions[order[start]].prompt_ids.len();
        let mut end = start;
        while end < order.len()
            && end - start < DECODE_BATCH
            && questions[order[end]].prompt_ids.len() == len
        {
            end += 1;
        }
        let group = &order[start..end];
        let prompts: Vec<Vec<u32>> = group
            .iter()
            .map(|&i| questions[i].prompt_ids.clone())
            .collect();
        let budgets = group
            .iter()
            .map(|&i| Ok(tok.encode(&questions[i].answer, false)?.len() + 4))
            .collect::<Result<Vec<usize>>>()?;
        let answers = generate_greedy_batch(be, model, Some(lora), &prompts, &budgets, &stop)?;
        for (&i, ids) in group.iter().zip(answers) {
            let text = tok.decode(&ids, true)?;
            correct[i] = exact_match(&text, &questions[i].answer);
        }
        start = end;
    }
    Ok(correct)
}

/// Loss and accuracy on every set. Greedy answers stop at EOS or after the reference
/// answer's token count + 4 tokens.
pub fn evaluate_sets<B: Backend>(
    be: &B,
    model: &Model<B>,
    lora: &Lora<B>,
    tok: &Tokenizer,
    sets: &[EvalSet],
    seq: usize,
) -> Result<BTreeMap<String, DomainResult>> {
    let mut out = BTreeMap::new();
    for set in sets {
        let loss = if set.examples.is_empty() {
            f64::NAN
        } else {
            evaluate(be, model, lora, &set.examples, 16, seq, |_, _| {})?
                .overall
                .loss
        };
        let correct = answer_all(be, model, lora, tok, &set.questions)?;
        let accuracy = (!correct.is_empty())
            .then(|| correct.iter().filter(|&&c| c).count() as f64 / correct.len() as f64);
        out.insert(
            set.domain.clone(),
            DomainResult {
                loss,
                accuracy,
                examples: set.examples.len(),
                correct,
            },
        );
    }
    Ok(out)
}
