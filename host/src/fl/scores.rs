//! Report points from evaluations: the global adapter (or a strategy's personal adapters)
//! scored on every domain, means over several models, and the one-line summary.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use fedcdd_kernels::Backend;

use crate::io::Tensor;
use crate::report::{DomainScore, EvalPoint};

use super::evaluate::{DomainResult, EvalSet, evaluate_sets};
use super::live::Live;
use super::setup::Setup;
use super::strategy::Evaluated;

fn score(x: DomainResult) -> DomainScore {
    DomainScore {
        loss: x.loss,
        accuracy: x.accuracy,
        examples: x.examples,
        correct: x.correct,
    }
}

/// `tensors` scored on `sets`.
fn evaluate_on<B: Backend>(
    setup: &Setup<B>,
    live: &Live<B>,
    tensors: &[Tensor],
    sets: &[EvalSet],
    what: &str,
) -> Result<BTreeMap<String, DomainResult>> {
    let lora = live.lora(&setup.be, tensors, what)?;
    evaluate_sets(
        &setup.be,
        &live.model,
        &lora,
        &setup.tok,
        sets,
        setup.cfg.seq.max(256),
    )
}

/// Loss and accuracy of `tensors` on every domain, as a report point.
pub fn eval_point<B: Backend>(
    setup: &Setup<B>,
    live: &Live<B>,
    tensors: &[Tensor],
    round: usize,
) -> Result<EvalPoint> {
    let t0 = Instant::now();
    let r = evaluate_on(setup, live, tensors, &setup.eval_sets, "global adapter")?;
    Ok(EvalPoint {
        round,
        domains: r.into_iter().map(|(d, x)| (d, score(x))).collect(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The mean of several evaluations, domain by domain (local-only clients).
pub fn mean_points(points: &[EvalPoint], round: usize) -> EvalPoint {
    let mut domains: BTreeMap<String, DomainScore> = BTreeMap::new();
    let n = points.len().max(1) as f64;
    for p in points {
        for (d, s) in &p.domains {
            let e = domains.entry(d.clone()).or_insert(DomainScore {
                loss: 0.0,
                accuracy: s.accuracy.map(|_| 0.0),
                examples: s.examples,
                correct: Vec::new(),
            });
            e.correct.extend_from_slice(&s.correct);
            e.loss += s.loss / n;
            if let (Some(a), Some(b)) = (e.accuracy.as_mut(), s.accuracy) {
                *a += b / n;
            }
        }
    }
    let seconds = points.iter().map(|p| p.seconds).sum();
    EvalPoint {
        round,
        domains,
        seconds,
    }
}

/// The federation's evaluation: the global adapter, or per client (a strategy's personal
/// adapters): each domain is the mean over the clients holding it of their model's score; a
/// domain no client holds is scored by every client's model.
pub fn evaluate_federation<B: Backend>(
    setup: &Setup<B>,
    live: &Live<B>,
    global: &[Tensor],
    evaluated: Evaluated,
    round: usize,
) -> Result<EvalPoint> {
    let t0 = Instant::now();
    let personal = match evaluated {
        Evaluated::Global => return eval_point(setup, live, global, round),
        Evaluated::PerClient(p) => p,
    };
    let holders = |domain: &str| -> Vec<usize> {
        personal
            .iter()
            .map(|(k, _)| *k)
            .filter(|&k| {
                setup.clients[k]
                    .examples
                    .iter()
                    .any(|e| e.domain.as_deref() == Some(domain))
            })
            .collect()
    };
    let mut scores: BTreeMap<String, Vec<DomainScore>> = BTreeMap::new();
    for (k, tensors) in &personal {
        let sets: Vec<EvalSet> = setup
            .eval_sets
            .iter()
            .filter(|s| {
                let h = holders(&s.domain);
                h.is_empty() || h.contains(k)
            })
            .cloned()
            .collect();
        if sets.is_empty() {
            continue;
        }
        for (d, x) in evaluate_on(setup, live, tensors, &sets, "personal adapter")? {
            scores.entry(d).or_default().push(score(x));
        }
    }
    let domains = scores
        .into_iter()
        .map(|(d, v)| {
            let n = v.len() as f64;
            let acc = v.iter().map(|x| x.accuracy).collect::<Option<Vec<f64>>>();
            (
                d,
                DomainScore {
                    loss: v.iter().map(|x| x.loss).sum::<f64>() / n,
                    accuracy: acc.map(|a| a.iter().sum::<f64>() / n),
                    examples: v[0].examples,
                    correct: v.iter().flat_map(|x| x.correct.iter().copied()).collect(),
                },
            )
        })
        .collect();
    Ok(EvalPoint {
        round,
        domains,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// `eval: mean acc 45.0% (arithmetic 40.0, …), loss 0.512`.
pub fn format_eval_line(p: &EvalPoint) -> String {
    let per: Vec<String> = p
        .domains
        .iter()
        .map(|(d, s)| match s.accuracy {
            Some(a) => format!("{d} {:.1}", 100.0 * a),
            None => format!("{d} loss {:.3}", s.loss),
        })
        .collect();
    match p.mean_accuracy() {
        Some(a) => format!(
            "eval: mean acc {:.1}% ({}), loss {:.3} [{:.1} s]",
            100.0 * a,
            per.join(", "),
            p.mean_loss(),
            p.seconds
        ),
        None => format!(
            "eval: mean loss {:.3} ({}) [{:.1} s]",
            p.mean_loss(),
            per.join(", "),
            p.seconds
        ),
    }
}
