//! Shared helpers of the test suite:
//! - [`Rng`]: a SplitMix64 generator for test data (independent of core's own generators);
//! - comparison helpers;
//! - plain-f64 reference implementations of FedCDD and of the server rules of the baselines,
//!   written straight from `fedcdd-spec.md` (and the documented readings in core's docs), with
//!   no code shared with `fedcdd-core`: only core's *configuration* types are read.
#![allow(dead_code)]

use fedcdd_core::{
    Components, FedCddConfig, FedOptVariant, NormAxis, ServerOpt, Target, TensorRole, Weighting,
};

// ---------------------------------------------------------------------------------------------
// Test-data generator
// ---------------------------------------------------------------------------------------------

/// SplitMix64 (Steele, Lea, Flood 2014), used only to generate test inputs.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// Standard normal (Box–Muller, std's f64 math).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// `n` values `N(0, scale²)` as f32.
    pub fn normal_vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (scale * self.normal()) as f32).collect()
    }

    /// A random permutation of `0..n` (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i + 1);
            p.swap(i, j);
        }
        p
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------------------------

pub fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

pub fn norm(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// `‖a − b‖ / ‖b‖` (or `‖a − b‖` when `b = 0`).
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let nb = norm(b);
    if nb > 0.0 { d / nb } else { d }
}

/// `‖a − b‖ / ‖b‖` for f32 `a` and f64 `b`.
pub fn rel_err_32(a: &[f32], b: &[f64]) -> f64 {
    rel_err(&to_f64(a), b)
}

/// `‖a − b‖ / ‖b‖` for two f32 slices.
pub fn rel_err_3232(a: &[f32], b: &[f32]) -> f64 {
    rel_err(&to_f64(a), &to_f64(b))
}

/// `out − g` in f64.
pub fn step_of(out: &[f32], g: &[f64]) -> Vec<f64> {
    out.iter().zip(g).map(|(&o, &g)| o as f64 - g).collect()
}

pub fn sub(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// Whether an error measure fails its tolerance (NaN fails too).
pub fn bad(err: f64, tol: f64) -> bool {
    err.is_nan() || err > tol
}

pub fn assert_close(what: &str, got: f64, want: f64, rel: f64) {
    let tol = rel * want.abs().max(1e-30);
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, want {want} (rel tol {rel})"
    );
}

pub fn assert_slice_close(what: &str, got: &[f32], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs().max(1.0);
        assert!(
            (g as f64 - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (tol {tol})\n  got  {got:?}\n  want {want:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Reference FedCDD (plain f64, from the spec)
// ---------------------------------------------------------------------------------------------

/// ε of the spec.
pub const REF_EPS: f64 = 1e-8;

/// Whether the norm groups of `axis` are the rows (else the columns) of a tensor of `role`
/// (spec, "Ablation switches": `rank` = A by rows, B by columns; others by columns).
pub fn ref_groups_by_row(axis: NormAxis, role: TensorRole) -> bool {
    match axis {
        NormAxis::Column => false,
        NormAxis::Row => true,
        NormAxis::Rank => role == TensorRole::LoraA,
    }
}

/// What the reference computes.
#[derive(Clone, Debug)]
pub struct RefFedCdd {
    /// The new global tensor.
    pub out: Vec<f64>,
    /// `v_i`.
    pub agreement: Vec<f64>,
    /// Normalised direction weights `w_i` used.
    pub weights: Vec<f64>,
    /// Whether the `p_i` fallback was used.
    pub fell_back: bool,
    /// Conditioning of the re-normalisation: the smallest `‖D̄_g‖ / Σ_i w_i ‖D_i,g‖` over the
    /// groups (1 = all directions agree, 0 = a group's directions cancel exactly, where
    /// `D̂_g = D̄_g / max(‖D̄_g‖, ε)` turns rounding noise into a unit vector).
    pub cancellation: f64,
    /// The same for FedAvg's mean `Δ̄`: the smallest `‖Δ̄_g‖ / Σ_i p_i ‖X_i,g‖`.
    pub mean_cancellation: f64,
}

/// FedCDD on one `rows × cols` tensor (row-major), all in f64:
/// clients are `(n_i, Δ_i)`.
pub fn ref_fedcdd(
    cfg: &FedCddConfig,
    rows: usize,
    cols: usize,
    role: TensorRole,
    global: &[f64],
    clients: &[(f64, Vec<f64>)],
) -> RefFedCdd {
    let len = rows * cols;
    assert_eq!(global.len(), len);
    let by_row = ref_groups_by_row(cfg.norm_axis, role);
    let ng = if by_row { rows } else { cols };
    let group = |e: usize| if by_row { e / cols } else { e % cols };
    let nc = clients.len();
    assert!(nc > 0);
    let n_sum: f64 = clients.iter().map(|c| c.0).sum();
    let p: Vec<f64> = clients.iter().map(|c| c.0 / n_sum).collect();

    // What is decomposed: Δ_i or θ_i = G + Δ_i.
    let xs: Vec<Vec<f64>> = clients
        .iter()
        .map(|(_, d)| {
            assert_eq!(d.len(), len);
            match cfg.target {
                Target::Delta => d.clone(),
                Target::Weights => d.iter().zip(global).map(|(d, g)| d + g).collect(),
            }
        })
        .collect();

    // 1. Decompose.
    let mut mags = Vec::with_capacity(nc);
    let mut dirs = Vec::with_capacity(nc);
    for x in &xs {
        let mut sq = vec![0.0f64; ng];
        for (e, v) in x.iter().enumerate() {
            sq[group(e)] += v * v;
        }
        let m: Vec<f64> = sq.iter().map(|s| s.sqrt()).collect();
        let d: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(e, v)| v / m[group(e)].max(REF_EPS))
            .collect();
        mags.push(m);
        dirs.push(d);
    }

    // 3. Agreement: mean cosine to the others.
    let units: Vec<Vec<f64>> = dirs
        .iter()
        .map(|d| {
            let nd = norm(d);
            if nd > 0.0 {
                d.iter().map(|v| v / nd).collect()
            } else {
                vec![0.0; len]
            }
        })
        .collect();
    let mut agreement = vec![0.0f64; nc];
    if nc > 1 {
        for i in 0..nc {
            let mut s = 0.0;
            for k in 0..nc {
                if k != i {
                    s += units[i]
                        .iter()
                        .zip(&units[k])
                        .map(|(a, b)| a * b)
                        .sum::<f64>();
                }
            }
            agreement[i] = s / (nc - 1) as f64;
        }
    }

    // Weights (core's `Weighting` docs: p_relu/relu fall back to p_i when Σ < ε; softmax is
    // the exact softmax here, computed stably).
    let mut fell_back = false;
    let weights: Vec<f64> = if nc == 1 {
        vec![1.0]
    } else {
        let normalise = |raw: Vec<f64>| {
            let s: f64 = raw.iter().sum();
            raw.iter().map(|r| r / s).collect::<Vec<f64>>()
        };
        match cfg.weighting {
            Weighting::PRelu => {
                let raw: Vec<f64> = (0..nc).map(|i| p[i] * agreement[i].max(0.0)).collect();
                if raw.iter().sum::<f64>() < REF_EPS {
                    fell_back = true;
                    p.clone()
                } else {
                    normalise(raw)
                }
            }
            Weighting::Relu => {
                let raw: Vec<f64> = agreement.iter().map(|v| v.max(0.0)).collect();
                if raw.iter().sum::<f64>() < REF_EPS {
                    fell_back = true;
                    p.clone()
                } else {
                    normalise(raw)
                }
            }
            Weighting::Softmax { tau } => {
                let tau = tau as f64;
                let vmax = agreement.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                normalise(
                    (0..nc)
                        .map(|i| p[i] * ((agreement[i] - vmax) / tau).exp())
                        .collect(),
                )
            }
            Weighting::Samples => p.clone(),
            Weighting::Uniform => vec![1.0 / nc as f64; nc],
        }
    };

    // 2. Consensus magnitudes, 4. aggregated direction.
    let mut mbar = vec![0.0f64; ng];
    for (m, pi) in mags.iter().zip(&p) {
        for (a, v) in mbar.iter_mut().zip(m) {
            *a += pi * v;
        }
    }
    let mut dbar = vec![0.0f64; len];
    for (d, w) in dirs.iter().zip(&weights) {
        for (a, v) in dbar.iter_mut().zip(d) {
            *a += w * v;
        }
    }
    let mut cancellation = 1.0f64;
    {
        let mut sq = vec![0.0f64; ng];
        for (e, v) in dbar.iter().enumerate() {
            sq[group(e)] += v * v;
        }
        let mut total = vec![0.0f64; ng];
        for (d, w) in dirs.iter().zip(&weights) {
            let mut dsq = vec![0.0f64; ng];
            for (e, v) in d.iter().enumerate() {
                dsq[group(e)] += v * v;
            }
            for (t, s) in total.iter_mut().zip(&dsq) {
                *t += w.abs() * s.sqrt();
            }
        }
        for (s, t) in sq.iter().zip(&total) {
            if *t > 0.0 {
                cancellation = cancellation.min(s.sqrt() / t);
            }
        }
    }
    if cfg.renormalize {
        let mut sq = vec![0.0f64; ng];
        for (e, v) in dbar.iter().enumerate() {
            sq[group(e)] += v * v;
        }
        for (e, v) in dbar.iter_mut().enumerate() {
            *v /= sq[group(e)].sqrt().max(REF_EPS);
        }
    }

    // One-part readings: FedAvg's mean supplies the other part.
    let mut mean = vec![0.0f64; len];
    for (x, pi) in xs.iter().zip(&p) {
        for (a, v) in mean.iter_mut().zip(x) {
            *a += pi * v;
        }
    }
    let mut mean_sq = vec![0.0f64; ng];
    for (e, v) in mean.iter().enumerate() {
        mean_sq[group(e)] += v * v;
    }
    let mut mean_cancellation = 1.0f64;
    for (s, m) in mean_sq.iter().zip(&mbar) {
        if *m > 0.0 {
            mean_cancellation = mean_cancellation.min(s.sqrt() / m);
        }
    }
    match cfg.components {
        Components::Both => {}
        Components::ConsensusOnly => {
            for (e, v) in dbar.iter_mut().enumerate() {
                *v = mean[e] / mean_sq[group(e)].sqrt().max(REF_EPS);
            }
        }
        Components::DivergenceOnly => {
            for (m, s) in mbar.iter_mut().zip(&mean_sq) {
                *m = s.sqrt();
            }
        }
    }

    // 5. Recombine.
    let lr = cfg.server_lr as f64;
    let out: Vec<f64> = (0..len)
        .map(|e| {
            let agg = mbar[group(e)] * dbar[e];
            match cfg.target {
                Target::Delta => global[e] + lr * agg,
                Target::Weights => global[e] + lr * (agg - global[e]),
            }
        })
        .collect();
    RefFedCdd {
        out,
        agreement,
        weights,
        fell_back,
        cancellation,
        mean_cancellation,
    }
}

/// FedAvg's update `Σ p_i Δ_i` in f64.
pub fn ref_weighted_mean(clients: &[(f64, Vec<f64>)]) -> Vec<f64> {
    let n_sum: f64 = clients.iter().map(|c| c.0).sum();
    let len = clients[0].1.len();
    let mut out = vec![0.0; len];
    for (n, d) in clients {
        for (o, v) in out.iter_mut().zip(d) {
            *o += n / n_sum * v;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Reference server rules (plain f64)
// ---------------------------------------------------------------------------------------------

/// Hyper-parameters of a reference server step.
#[derive(Clone, Copy, Debug)]
pub struct RefOpt {
    pub rule: ServerOpt,
    pub variant: FedOptVariant,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
}

/// Server state: `m`, `v` (v₀ = τ²), steps taken.
#[derive(Clone, Debug)]
pub struct RefOptState {
    pub m: Vec<f64>,
    pub v: Vec<f64>,
    pub steps: u64,
}

impl RefOptState {
    pub fn new(len: usize, tau: f64) -> RefOptState {
        RefOptState {
            m: vec![0.0; len],
            v: vec![tau * tau; len],
            steps: 0,
        }
    }
}

/// One server step on `mean_delta`, returning the new global tensor.
///
/// Reddi (the spec's table): FedAvg `G + λΔ̄`; FedAvgM `m ← βm + Δ̄, G + λm`;
/// FedAdagrad `v ← v + Δ̄², G + ηΔ̄/(√v+τ)`; FedYogi/FedAdam with `m ← β1 m + (1−β1)Δ̄`.
/// OpenFedLLM (its `fed_global.py`): FedYogi/FedAdam first round `m = Δ̄`, later
/// `m ← β1 m + (1−β1)Δ̄`, second moment fed `m²`; FedAdagrad as Reddi (no momentum);
/// FedAvgM `m ← βm + (1−β)Δ̄, G + m`.
pub fn ref_server_step(
    o: &RefOpt,
    st: &mut RefOptState,
    global: &[f64],
    mean_delta: &[f64],
) -> Vec<f64> {
    let ofl = o.variant == FedOptVariant::OpenFedLlm;
    let first = st.steps == 0;
    let mut out = global.to_vec();
    for i in 0..global.len() {
        let d = mean_delta[i];
        let ema = |m: f64| {
            if ofl && first {
                d
            } else {
                o.beta1 * m + (1.0 - o.beta1) * d
            }
        };
        match o.rule {
            ServerOpt::FedAvg => out[i] += o.lr * d,
            ServerOpt::FedAvgM => {
                if ofl {
                    st.m[i] = ema(st.m[i]);
                    out[i] += st.m[i];
                } else {
                    st.m[i] = o.beta1 * st.m[i] + d;
                    out[i] += o.lr * st.m[i];
                }
            }
            ServerOpt::FedAdagrad => {
                st.v[i] += d * d;
                out[i] += o.lr * d / (st.v[i].sqrt() + o.tau);
            }
            ServerOpt::FedYogi | ServerOpt::FedAdam => {
                st.m[i] = ema(st.m[i]);
                let m = st.m[i];
                let sq = if ofl { m * m } else { d * d };
                let v = st.v[i];
                st.v[i] = match o.rule {
                    ServerOpt::FedYogi => {
                        let s = v - sq;
                        let sign = if s > 0.0 {
                            1.0
                        } else if s < 0.0 {
                            -1.0
                        } else {
                            0.0
                        };
                        v - (1.0 - o.beta2) * sq * sign
                    }
                    _ => o.beta2 * v + (1.0 - o.beta2) * sq,
                };
                out[i] += o.lr * m / (st.v[i].sqrt() + o.tau);
            }
        }
    }
    st.steps += 1;
    out
}

// ---------------------------------------------------------------------------------------------
// CRC-32/IEEE (independent bitwise-table implementation, for patching mutated uploads)
// ---------------------------------------------------------------------------------------------

pub struct Crc32 {
    table: [u32; 256],
}

impl Crc32 {
    pub fn new() -> Crc32 {
        let mut table = [0u32; 256];
        for (i, t) in table.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *t = c;
        }
        Crc32 { table }
    }

    pub fn checksum(&self, bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c = self.table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
        }
        !c
    }

    /// Rewrites the last 4 bytes of `bytes` as the CRC of everything before them.
    pub fn patch(&self, bytes: &mut [u8]) {
        if bytes.len() >= 4 {
            let n = bytes.len() - 4;
            let c = self.checksum(&bytes[..n]);
            bytes[n..].copy_from_slice(&c.to_le_bytes());
        }
    }
}

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}
