//! What reports are made of: evaluation points, round logs, run and comparison results.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::format::mean;

/// One domain's score at one evaluation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DomainScore {
    pub loss: f64,
    /// Fraction of examples answered exactly, `0..=1`; None for domains with nothing to match.
    pub accuracy: Option<f64>,
    pub examples: usize,
    /// Each question's outcome (for intervals over the questions), as `"1011…"` in JSON.
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "bits")]
    pub correct: Vec<bool>,
}

/// A list of booleans as a string of `0`/`1` (compact in JSON lines).
mod bits {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &[bool], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(
            &v.iter()
                .map(|&b| if b { '1' } else { '0' })
                .collect::<String>(),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<bool>, D::Error> {
        String::deserialize(d)?
            .chars()
            .map(|c| match c {
                '1' => Ok(true),
                '0' => Ok(false),
                o => Err(D::Error::custom(format!("{o:?} is not 0 or 1"))),
            })
            .collect()
    }
}

/// The global model evaluated after `round` rounds (round 0 = the base model + initial adapter).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalPoint {
    pub round: usize,
    pub domains: BTreeMap<String, DomainScore>,
    /// Wall time of this evaluation (loss and greedy answers on every domain).
    #[serde(default)]
    pub seconds: f64,
}

impl EvalPoint {
    /// Mean over domains that have an accuracy; None when none has.
    pub fn mean_accuracy(&self) -> Option<f64> {
        mean(
            self.domains
                .values()
                .filter_map(|d| d.accuracy)
                .filter(|a| a.is_finite()),
        )
    }

    /// Mean of the domains' losses (unweighted, domains with a finite loss); NaN when none
    /// has one, so a broken evaluation stays visible instead of reading as 0.
    pub fn mean_loss(&self) -> f64 {
        mean(
            self.domains
                .values()
                .map(|d| d.loss)
                .filter(|l| l.is_finite()),
        )
        .unwrap_or(f64::NAN)
    }
}

/// What one round did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RoundLog {
    pub round: usize,
    pub clients: Vec<usize>,
    pub train_loss: f64,
    pub upload_bytes: u64,
    pub dense_bytes: u64,
    pub seconds: f64,
    /// Sampled clients that sent no reply (a node gone, a timeout).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<usize>,
    /// Replies the server rejected, with why (a corrupt upload, a NaN).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<String>,
    /// Clients whose update was scaled down by clipping (`clip` or DP), and the bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clipped: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_bound: Option<f64>,
    /// ε of the run's differential-privacy guarantee after this round (at `dp_delta`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
}

/// Everything a run's report shows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunReport {
    /// e.g. "fedcdd on builtin (4 clients, partition domain)"
    pub title: String,
    pub algorithm: String,
    /// Column order; domains found only in the evaluations are appended after these.
    pub domains: Vec<String>,
    /// Increasing round; `evals[0]` may be round 0 (the base).
    pub evals: Vec<EvalPoint>,
    pub rounds: Vec<RoundLog>,
    /// Reference points evaluated once: "centralized", "local-only" (may be empty).
    pub references: BTreeMap<String, EvalPoint>,
}

/// One finished run in a comparison.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CompareResult {
    pub algorithm: String,
    pub seed: u64,
    pub final_eval: EvalPoint,
    pub upload_bytes: u64,
    pub seconds: f64,
}
