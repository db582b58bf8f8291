//! What bounds a client's influence on the server: per-client L2 clipping of the whole update
//! (`clip`), client-level differential privacy (DP-FedAvg: clip to `dp_clip`, uniform weights,
//! Gaussian noise of `dp_noise_multiplier · dp_clip` on the sum), and the config values
//! that choose them. The coordinate-wise robust rules are a strategy (`strategy/robust.rs`).
//!
//! Differential privacy is offered for the mean family (FedAvg, FedProx) only. FedCDD's rule
//! is not a sum of bounded per-client terms: the agreement weights `w_i` depend on every
//! client's direction and each column's direction is renormalised to unit length, so one
//! client can turn a column around whatever the clip bound; noising its output would give no
//! guarantee. A DP reading of FedCDD would have to turn the alignment off and noise the two
//! sums it averages (consensus magnitudes, directions) separately; it is not implemented.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use fedcdd_core::clip_scale;

use crate::io::Tensor;
use crate::rng::Rng;
use crate::upload::ClientUpdate;

/// Per-client clipping of the whole update (every tensor together) before aggregation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Clip {
    #[default]
    None,
    /// To a fixed L2 norm.
    Fixed(f32),
    /// To `M ×` the median norm of the round's clients.
    Median(f32),
}

impl FromStr for Clip {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("clip {s:?}: expected none, fixed:C or median:M (C, M > 0)");
        let positive = |v: &str| {
            v.parse::<f32>()
                .ok()
                .filter(|x| *x > 0.0 && x.is_finite())
                .ok_or_else(bad)
        };
        match s.split_once(':') {
            None if s == "none" => Ok(Clip::None),
            Some(("fixed", v)) => Ok(Clip::Fixed(positive(v)?)),
            Some(("median", v)) => Ok(Clip::Median(positive(v)?)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Clip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Clip::None => f.write_str("none"),
            Clip::Fixed(c) => write!(f, "fixed:{c}"),
            Clip::Median(m) => write!(f, "median:{m}"),
        }
    }
}

/// A coordinate-wise rule in place of the (weighted) mean.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RobustRule {
    #[default]
    None,
    Median,
    /// Drop the K largest and K smallest client values at every coordinate.
    TrimmedMean(usize),
}

impl FromStr for RobustRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("robust {s:?}: expected none, median or trimmed_mean:K (K ≥ 1)");
        match s.split_once(':') {
            None if s == "none" => Ok(RobustRule::None),
            None if s == "median" => Ok(RobustRule::Median),
            Some(("trimmed_mean", k)) => match k.parse::<usize>() {
                Ok(k) if k >= 1 => Ok(RobustRule::TrimmedMean(k)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for RobustRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RobustRule::None => f.write_str("none"),
            RobustRule::Median => f.write_str("median"),
            RobustRule::TrimmedMean(k) => write!(f, "trimmed_mean:{k}"),
        }
    }
}

/// Where DP noise is added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DpMode {
    /// The server clips every update and adds `N(0, (σC)²)` to their sum (trusts the server).
    #[default]
    Server,
    /// Each client clips its own update and adds `N(0, (σC)² / m)` (m clients a round), so the
    /// sum carries the same noise and the server never sees an update without noise (trusts
    /// the other clients to add theirs).
    Client,
}

impl FromStr for DpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "server" => Ok(DpMode::Server),
            "client" => Ok(DpMode::Client),
            o => Err(format!("dp_mode {o:?}: expected server or client")),
        }
    }
}

impl fmt::Display for DpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DpMode::Server => "server",
            DpMode::Client => "client",
        })
    }
}

/// L2 norm of a whole update (every tensor), in f64.
pub fn update_norm(deltas: &[Tensor]) -> f64 {
    deltas
        .iter()
        .flat_map(|t| t.data.iter())
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

/// Scales every tensor of an update by `s`.
pub fn scale_update(u: &mut ClientUpdate, s: f32) {
    if s != 1.0 {
        for t in &mut u.deltas {
            t.data.iter_mut().for_each(|v| *v *= s);
        }
    }
}

/// The round's clipping: the bound in force and each client's scale.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipPlan {
    pub bound: f32,
    pub scales: Vec<f32>,
}

impl ClipPlan {
    /// Clients whose update was scaled down.
    pub fn clipped(&self) -> usize {
        self.scales.iter().filter(|&&s| s < 1.0).count()
    }
}

/// The clip bound (`clip`, or `dp_clip` when DP is on, which takes precedence) and each
/// client's scale, from the clients' update norms.
pub fn plan_clipping(norms: &[f64], clip: Clip, dp_clip: f32) -> Result<Option<ClipPlan>> {
    let bound = if dp_clip > 0.0 {
        dp_clip
    } else {
        match clip {
            Clip::None => return Ok(None),
            Clip::Fixed(c) => c,
            Clip::Median(m) => {
                let mut v: Vec<f32> = norms.iter().map(|&n| n as f32).collect();
                let med = fedcdd_core::median_in_place(&mut v)
                    .map_err(|e| anyhow::anyhow!("clip: the median client norm: {e}"))?;
                if med <= 0.0 {
                    // Every update (or most) is zero: nothing to clip against.
                    return Ok(None);
                }
                m * med
            }
        }
    };
    let scales = norms
        .iter()
        .map(|&n| clip_scale(n as f32, bound))
        .collect::<Result<Vec<f32>, _>>()
        .map_err(|e| anyhow::anyhow!("clip: {e}"))?;
    Ok(Some(ClipPlan { bound, scales }))
}

/// Adds `N(0, std²)` to every value of `tensors` (seeded).
pub fn add_gaussian(tensors: &mut [Tensor], std: f64, seed: u64) {
    if std.is_nan() || std <= 0.0 {
        return;
    }
    let mut rng = Rng::new(seed);
    for t in tensors {
        for v in &mut t.data {
            *v += (std * rng.normal()) as f32;
        }
    }
}

/// A client's own DP step (`dp_mode = client`): clip the update to `bound`, then add its share
/// `N(0, (σ·bound)² / m)` of the round's noise.
pub fn privatize_update(
    deltas: &mut [Tensor],
    bound: f32,
    sigma: f32,
    m: usize,
    seed: u64,
) -> Result<()> {
    let norm = update_norm(deltas);
    let s = clip_scale(norm as f32, bound).map_err(|e| anyhow::anyhow!("dp_clip: {e}"))?;
    for t in deltas.iter_mut() {
        t.data.iter_mut().for_each(|v| *v *= s);
    }
    if m == 0 {
        bail!("dp: no clients in the round");
    }
    add_gaussian(
        deltas,
        sigma as f64 * bound as f64 / (m as f64).sqrt(),
        seed,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_print_and_refuse_nonsense() {
        for s in ["none", "fixed:2.5", "median:1.5"] {
            assert_eq!(s.parse::<Clip>().unwrap().to_string(), s);
        }
        for s in ["none", "median", "trimmed_mean:2"] {
            assert_eq!(s.parse::<RobustRule>().unwrap().to_string(), s);
        }
        for bad in [
            "fixed",
            "fixed:0",
            "fixed:-1",
            "fixed:nan",
            "median:inf",
            "max:3",
            "",
        ] {
            assert!(bad.parse::<Clip>().is_err(), "{bad}");
        }
        for bad in [
            "trimmed_mean",
            "trimmed_mean:0",
            "trimmed_mean:-1",
            "mean",
            "median:2",
        ] {
            assert!(bad.parse::<RobustRule>().is_err(), "{bad}");
        }
        assert!("both".parse::<DpMode>().is_err());
    }

    /// Random strings never panic the parsers.
    #[test]
    fn hostile_values_are_errors_not_panics() {
        let mut rng = Rng::new(5);
        let alphabet: Vec<char> = "none:fixedmediantrimmed_ 0123456789.-+eEinfNaN\u{0}\u{ffff}é"
            .chars()
            .collect();
        for _ in 0..5000 {
            let len = rng.below(24);
            let s: String = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let _ = s.parse::<Clip>();
            let _ = s.parse::<RobustRule>();
            let _ = s.parse::<DpMode>();
            let _ = s.parse::<super::super::attack::Attack>();
        }
    }

    #[test]
    fn clipping_plans() {
        let norms = [1.0, 2.0, 4.0, 8.0];
        assert_eq!(plan_clipping(&norms, Clip::None, 0.0).unwrap(), None);
        let p = plan_clipping(&norms, Clip::Fixed(3.0), 0.0)
            .unwrap()
            .unwrap();
        assert_eq!(p.scales, vec![1.0, 1.0, 0.75, 0.375]);
        assert_eq!(p.clipped(), 2);
        // Median of 1, 2, 4, 8 is 3; ×2 = 6.
        let p = plan_clipping(&norms, Clip::Median(2.0), 0.0)
            .unwrap()
            .unwrap();
        assert_eq!(p.bound, 6.0);
        assert_eq!(p.scales, vec![1.0, 1.0, 1.0, 0.75]);
        // dp_clip takes precedence.
        let p = plan_clipping(&norms, Clip::Fixed(3.0), 1.0)
            .unwrap()
            .unwrap();
        assert_eq!(p.bound, 1.0);
        assert!(plan_clipping(&[f64::NAN], Clip::Fixed(1.0), 0.0).is_err());
    }
}
