//! Malicious clients for robustness experiments (`attack = …`): K of the federation's clients,
//! chosen by the run's seed, corrupt what they send. Update attacks change the client's
//! update `Δ` before it is masked and uploaded; `labelflip` trains on wrong answers.

use std::fmt;
use std::str::FromStr;

use crate::data::Example;
use crate::io::Tensor;
use crate::rng::Rng;

use super::seeds::{SEED_ATTACK, stream_seed};

/// An attack and how many clients carry it out.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Attack {
    #[default]
    None,
    /// Send `−Δ`.
    SignFlip(usize),
    /// Send `F·Δ` (F may be negative: a scaled sign flip).
    Scale(usize, f32),
    /// Send `Δ + N(0, σ²)` per value.
    Noise(usize, f32),
    /// Train on the client's questions with their answers shuffled among them.
    LabelFlip(usize),
}

impl Attack {
    /// How many clients attack.
    pub fn count(&self) -> usize {
        match *self {
            Attack::None => 0,
            Attack::SignFlip(k)
            | Attack::Scale(k, _)
            | Attack::Noise(k, _)
            | Attack::LabelFlip(k) => k,
        }
    }

    /// The attacking clients of a federation of `num_clients`: `count()` of them, chosen by
    /// `seed`, in increasing order.
    pub fn attackers(&self, seed: u64, num_clients: usize) -> Vec<usize> {
        let k = self.count().min(num_clients);
        let mut ids: Vec<usize> = (0..num_clients).collect();
        Rng::new(stream_seed(seed, SEED_ATTACK, 0, 0)).shuffle(&mut ids);
        let mut chosen = ids[..k].to_vec();
        chosen.sort_unstable();
        chosen
    }

    /// Corrupts client `client`'s update of round `round` in place (update attacks only).
    pub fn corrupt_update(&self, deltas: &mut [Tensor], seed: u64, round: usize, client: usize) {
        let mut rng = Rng::new(stream_seed(seed, SEED_ATTACK, round + 1, client));
        for t in deltas {
            for v in &mut t.data {
                *v = match *self {
                    Attack::SignFlip(_) => -*v,
                    Attack::Scale(_, f) => f * *v,
                    Attack::Noise(_, s) => *v + (s as f64 * rng.normal()) as f32,
                    Attack::None | Attack::LabelFlip(_) => *v,
                };
            }
        }
    }
}

impl FromStr for Attack {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "attack {s:?}: expected none, signflip:K, scale:K:F, noise:K:SIGMA or labelflip:K \
                 (K ≥ 1 clients)"
            )
        };
        if s == "none" {
            return Ok(Attack::None);
        }
        let parts: Vec<&str> = s.split(':').collect();
        let k = parts
            .get(1)
            .and_then(|k| k.parse::<usize>().ok())
            .filter(|&k| k >= 1)
            .ok_or_else(bad)?;
        let num = |i: usize| {
            parts
                .get(i)
                .and_then(|v| v.parse::<f32>().ok())
                .filter(|v| v.is_finite())
                .ok_or_else(bad)
        };
        let attack = match (parts[0], parts.len()) {
            ("signflip", 2) => Attack::SignFlip(k),
            ("labelflip", 2) => Attack::LabelFlip(k),
            ("scale", 3) => Attack::Scale(k, num(2)?),
            ("noise", 3) => {
                let sigma = num(2)?;
                if sigma < 0.0 {
                    return Err(bad());
                }
                Attack::Noise(k, sigma)
            }
            _ => return Err(bad()),
        };
        Ok(attack)
    }
}

impl fmt::Display for Attack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attack::None => f.write_str("none"),
            Attack::SignFlip(k) => write!(f, "signflip:{k}"),
            Attack::Scale(k, x) => write!(f, "scale:{k}:{x}"),
            Attack::Noise(k, x) => write!(f, "noise:{k}:{x}"),
            Attack::LabelFlip(k) => write!(f, "labelflip:{k}"),
        }
    }
}

/// The client's examples with their answers shuffled among them (a derangement where there
/// are two or more): example `i` keeps its prompt and gets another example's answer tokens.
/// An example's answer is everything from its first target token on.
pub fn flip_labels(examples: &[Example], seed: u64) -> Vec<Example> {
    let n = examples.len();
    if n < 2 {
        return examples.to_vec();
    }
    // A random cyclic shift of a random order: nobody keeps their own answer.
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(stream_seed(seed, SEED_ATTACK, 0, usize::MAX)).shuffle(&mut order);
    let split = |e: &Example| e.is_target.iter().position(|&t| t).unwrap_or(e.ids.len());
    let mut out = examples.to_vec();
    for w in 0..n {
        let (to, from) = (order[w], order[(w + 1) % n]);
        let (a, b) = (&examples[to], &examples[from]);
        let (cut_a, cut_b) = (split(a), split(b));
        let mut ids = a.ids[..cut_a].to_vec();
        let mut is_target = a.is_target[..cut_a].to_vec();
        ids.extend_from_slice(&b.ids[cut_b..]);
        is_target.extend_from_slice(&b.is_target[cut_b..]);
        out[to] = Example {
            ids,
            is_target,
            domain: a.domain.clone(),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attacks_parse_print_and_refuse_nonsense() {
        for s in [
            "none",
            "signflip:2",
            "scale:1:-10",
            "noise:3:0.5",
            "labelflip:1",
        ] {
            assert_eq!(s.parse::<Attack>().unwrap().to_string(), s);
        }
        for bad in [
            "signflip",
            "signflip:0",
            "signflip:x",
            "scale:1",
            "scale:1:inf",
            "noise:1:-1",
            "noise:1:nan",
            "labelflip:1:2",
            "flip:1",
            "",
        ] {
            assert!(bad.parse::<Attack>().is_err(), "{bad}");
        }
    }

    #[test]
    fn attackers_are_seeded_and_counted() {
        let a = Attack::SignFlip(2);
        assert_eq!(a.attackers(7, 8), a.attackers(7, 8));
        assert_eq!(a.attackers(7, 8).len(), 2);
        assert_eq!(Attack::SignFlip(9).attackers(7, 3), vec![0, 1, 2]);
        assert!(Attack::None.attackers(7, 8).is_empty());
    }

    #[test]
    fn update_attacks() {
        let t = |v: &[f32]| Tensor {
            name: "x".into(),
            dims: vec![v.len()],
            dtype: fedcdd_core::DType::F32,
            data: v.to_vec(),
        };
        let mut d = vec![t(&[1.0, -2.0])];
        Attack::SignFlip(1).corrupt_update(&mut d, 0, 0, 0);
        assert_eq!(d[0].data, vec![-1.0, 2.0]);
        Attack::Scale(1, -10.0).corrupt_update(&mut d, 0, 0, 0);
        assert_eq!(d[0].data, vec![10.0, -20.0]);
        Attack::Noise(1, 0.0).corrupt_update(&mut d, 0, 0, 0);
        assert_eq!(d[0].data, vec![10.0, -20.0]);
    }

    #[test]
    fn labelflip_moves_every_answer() {
        let ex = |p: u32, a: u32| Example {
            ids: vec![p, p, a, a + 1],
            is_target: vec![false, false, true, true],
            domain: None,
        };
        let examples: Vec<Example> = (0..6).map(|i| ex(i, 100 + 10 * i)).collect();
        let flipped = flip_labels(&examples, 3);
        let mut answers: Vec<u32> = flipped.iter().map(|e| e.ids[2]).collect();
        for (i, e) in flipped.iter().enumerate() {
            assert_eq!(e.ids[..2], examples[i].ids[..2], "the prompt stays");
            assert_ne!(e.ids[2], examples[i].ids[2], "example {i} kept its answer");
            assert_eq!(e.is_target, examples[i].is_target);
        }
        answers.sort_unstable();
        assert_eq!(
            answers,
            vec![100, 110, 120, 130, 140, 150],
            "a permutation of the answers"
        );
    }
}
