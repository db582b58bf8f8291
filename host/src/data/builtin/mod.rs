//! The built-in heterogeneous benchmarks: domains that need different skills, each with a
//! training split, a held-out split and an exact-match scorer, plus the prose corpus the
//! benchmark's base model is pre-trained on.
//!
//! Two versions, chosen by name (the run config's `benchmark` key):
//! - [`v2`] (default): four rules over the same question format that conflict: each client
//!   learns "rule X maps a digit string to ...", so updates of different domains pull the
//!   shared LoRA in different directions. Thousands of held-out questions per domain.
//! - [`v1`]: the first benchmark (arithmetic, strings, facts, sorting), kept as it was for
//!   reproducing older results.
//!
//! Every item is a pure function of the seed (SplitMix64 streams); a hash of the question
//! decides whether it is held out, so the splits are disjoint.

pub mod v1;
pub mod v2;

use crate::rng::{Rng, fnv1a, mix};

use super::formats::Record;

/// One in `HELD_OUT_EVERY` items is held out.
const HELD_OUT_EVERY: u64 = 5;

/// A built-in benchmark version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Benchmark {
    V1,
    #[default]
    V2,
}

impl Benchmark {
    /// Every version, in documentation order.
    pub const ALL: [Benchmark; 2] = [Benchmark::V1, Benchmark::V2];

    /// The config name (`v1`, `v2`).
    pub const fn name(self) -> &'static str {
        match self {
            Benchmark::V1 => "v1",
            Benchmark::V2 => "v2",
        }
    }

    /// The version [`name`](Self::name) calls `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }

    /// The domains, in report order.
    pub fn domains(self) -> &'static [&'static str] {
        match self {
            Benchmark::V1 => &v1::DOMAINS,
            Benchmark::V2 => &v2::DOMAINS,
        }
    }

    /// `n` items of `domain` from `split`, deterministic in `(domain, split, n, seed)`.
    /// Items may repeat. An unknown domain has none.
    pub fn items(self, domain: &str, split: Split, n: usize, seed: u64) -> Vec<Item> {
        match self {
            Benchmark::V1 => v1::items(domain, split, n, seed),
            Benchmark::V2 => v2::items(domain, split, n, seed),
        }
    }

    /// Distinct held-out items of `domain`, up to `n` (fewer where the domain has fewer).
    pub fn held_out_distinct(self, domain: &str, n: usize, seed: u64) -> Vec<Item> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for it in self.items(domain, Split::HeldOut, n * 20, seed) {
            if out.len() == n {
                break;
            }
            if seen.insert(it.instruction.clone()) {
                out.push(it);
            }
        }
        out
    }

    /// `n` lines of pre-training prose, each a few question/answer sentences in the
    /// [`WRAPPERS`] formats (never the Alpaca template).
    pub fn pretrain_texts(self, n: usize, sentences_per_line: usize, seed: u64) -> Vec<String> {
        match self {
            Benchmark::V1 => v1::pretrain_texts(n, sentences_per_line, seed),
            Benchmark::V2 => v2::pretrain_texts(n, sentences_per_line, seed),
        }
    }

    /// Texts the benchmark tokenizer's merges are learned from (never digits or random
    /// letters, so those stay one token per character).
    pub fn tokenizer_texts(self) -> Vec<String> {
        match self {
            Benchmark::V1 => v1::tokenizer_texts(),
            Benchmark::V2 => v2::tokenizer_texts(),
        }
    }
}

impl std::fmt::Display for Benchmark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The train or held-out split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    HeldOut,
}

/// One question with its exact answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub domain: &'static str,
    pub instruction: String,
    pub answer: String,
}

impl Item {
    pub fn to_record(&self) -> Record {
        Record::Alpaca {
            instruction: self.instruction.clone(),
            input: String::new(),
            output: self.answer.clone(),
            domain: Some(self.domain.to_string()),
        }
    }
}

/// Question/answer markers of the pre-training prose. Several formats teach the base that
/// answering does not depend on one wrapper (none of them is the Alpaca template).
const WRAPPERS: [(&str, &str); 4] = [
    ("Q: ", "A: "),
    ("Question: ", "Answer: "),
    ("User: ", "Assistant: "),
    ("Input: ", "Output: "),
];

/// The stream of `(seed, stream name)`.
fn stream(seed: u64, name: &str) -> Rng {
    Rng::new(seed ^ fnv1a(name.as_bytes()).rotate_left(23))
}

/// Which split an item (its question text) belongs to, for a benchmark seed.
fn is_held_out(seed: u64, question: &str) -> bool {
    mix(fnv1a(question.as_bytes()) ^ seed.wrapping_mul(0xD2B7_4407_B1CE_6E93))
        .is_multiple_of(HELD_OUT_EVERY)
}

/// Characters separated by single spaces (`a b c`): one token each.
fn spaced(chars: &[u8]) -> String {
    let mut s = String::with_capacity(chars.len() * 2);
    for (i, &c) in chars.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push(c as char);
    }
    s
}

/// Exact match after trimming surrounding whitespace and one trailing full stop.
pub fn exact_match(generated: &str, answer: &str) -> bool {
    let norm = |s: &str| {
        let s = s.trim();
        s.strip_suffix('.').unwrap_or(s).trim().to_string()
    };
    norm(generated) == norm(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scorer() {
        assert!(exact_match(" 19.\n", "19"));
        assert!(!exact_match("190", "19"));
        assert!(exact_match("D O G", "D O G"));
        assert!(!exact_match("DOG", "D O G"));
    }

    /// Every version: splits disjoint and deterministic; v2 has at least 200 distinct
    /// held-out questions in every domain.
    #[test]
    fn splits_are_disjoint_and_deterministic() {
        for b in Benchmark::ALL {
            for d in b.domains() {
                let train = b.items(d, Split::Train, 400, 7);
                let held = b.items(d, Split::HeldOut, 100, 7);
                assert_eq!(train, b.items(d, Split::Train, 400, 7));
                let train_q: std::collections::HashSet<_> =
                    train.iter().map(|i| &i.instruction).collect();
                assert!(
                    held.iter().all(|h| !train_q.contains(&h.instruction)),
                    "{b} {d}"
                );
                assert!(!held.is_empty());
            }
        }
        for d in Benchmark::V2.domains() {
            assert_eq!(Benchmark::V2.held_out_distinct(d, 500, 3).len(), 500, "{d}");
        }
    }
}
