//! Evaluation of a global model on every domain: token loss on the held-out split and
//! exact-match accuracy of greedy answers where the domain has answers.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use fedcdd_kernels::Backend;

use crate::data::builtin::exact_match;
use crate::data::formats::alpaca_prompt;
use crate::data::{Example, Record, Tokenizer, tokenize_records};
use crate::model::llama::{Lora, Model};
use crate::train::{Sampling, evaluate, generate};

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
    let stop: Vec<u32> = tok.eos_id().into_iter().collect();
    for set in sets {
        let loss = if set.examples.is_empty() {
            f64::NAN
        } else {
            evaluate(be, model, lora, &set.examples, 16, seq, |_, _| {})?
                .overall
                .loss
        };
        let accuracy = if set.questions.is_empty() {
            None
        } else {
            let mut right = 0usize;
            for q in &set.questions {
                let budget = tok.encode(&q.answer, false)?.len() + 4;
                let ids = generate(
                    be,
                    model,
                    Some(lora),
                    &q.prompt_ids,
                    budget,
                    Sampling {
                        temperature: 0.0,
                        top_p: 1.0,
                        seed: 0,
                    },
                    &stop,
                    |_| {},
                )?;
                let text = tok.decode(&ids, true)?;
                if exact_match(&text, &q.answer) {
                    right += 1;
                }
            }
            Some(right as f64 / set.questions.len() as f64)
        };
        out.insert(
            set.domain.clone(),
            DomainResult {
                loss,
                accuracy,
                examples: set.examples.len(),
            },
        );
    }
    Ok(out)
}
