//! FedCDD: consensus (group magnitudes, sample-weighted mean) and divergence (group
//! directions, averaged with weights from cosine agreement), per tensor.
//!
//! Two forms compute the same rule:
//! - [`StreamingFedCdd`]: two passes over the clients, one client in memory at a time, all
//!   state in one caller-provided `f32` buffer of [`StreamingFedCdd::workspace_len`] elements
//!   (at most `5·P + 3·G` for a tensor of `P` elements and `G` groups, whatever the number of clients;
//!   `P` more for the one-part ablations of [`Components`]).
//! - `fedcdd_batch` (feature `alloc`): all clients at once, written literally after the spec
//!   (pairwise cosines); `O(N·P)` memory. It is the cross-check of the streaming form.

use crate::error::{Error, ErrorKind};
use crate::sweep::{
    Groups, check_finite_sumsq, check_len, group_axpy, group_scale_add_into, group_scale_into,
    group_sumsq, group_sumsq_dot,
};
use crate::sweep::{dot_lanes, sqrt, sum_lanes};
use crate::tensor::{Element, Layout, TensorRole, TensorView};
use crate::with_view;

/// ε of the spec: the floor of every norm we divide by.
pub const EPS: f32 = 1e-8;

/// Agreements `v_i` closer to 0 than this count as 0. The streaming form gets `v_i` from
/// `⟨û_i, U⟩ − 1`, whose f32 rounding (~1e-7) is above the spec's ε = 1e-8; without this,
/// orthogonal updates (v = 0 exactly, which must fall back to `p_i`) would get weights from
/// rounding noise.
pub const AGREEMENT_TOL: f32 = 1e-5;

/// An aggregated direction group `D̄_g` (a weighted mean of unit vectors) shorter than this
/// has cancelled: it gets no update rather than f32 rounding noise blown up to unit length.
pub const CANCEL_TOL: f32 = 1e-5;

/// 1/ε², to turn a squared group norm into `min(m/ε, 1)²` without a square root.
const INV_EPS_SQ: f32 = 1.0 / (EPS * EPS);

/// `v` with rounding-level values snapped to 0 ([`AGREEMENT_TOL`]).
fn snap_agreement(v: f32) -> f32 {
    if libm::fabsf(v) < AGREEMENT_TOL {
        0.0
    } else {
        v
    }
}

/// The renormalisation factor of an aggregated direction group of norm `norm`.
fn renorm_factor(norm: f32) -> f32 {
    if norm < CANCEL_TOL {
        0.0
    } else {
        1.0 / norm.max(EPS)
    }
}

/// Which norms make up the consensus ("magnitude") part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NormAxis {
    /// Columns of the stored tensor (`‖X[:, j]‖`).
    #[default]
    Column,
    /// One norm per output unit, i.e. per row of the stored tensor (as DoRA/PEFT).
    Row,
    /// Per rank component: `lora_A` by rows, `lora_B` by columns (other tensors by columns).
    Rank,
}

impl NormAxis {
    /// Every value, in documentation order.
    pub const ALL: [NormAxis; 3] = [NormAxis::Column, NormAxis::Row, NormAxis::Rank];

    /// The config/CLI name (`column`, `row`, `rank`).
    pub const fn name(self) -> &'static str {
        match self {
            NormAxis::Column => "column",
            NormAxis::Row => "row",
            NormAxis::Rank => "rank",
        }
    }

    /// The value [`name`](Self::name) calls `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }
}

impl NormAxis {
    /// The groups this axis means for a tensor of the given role.
    pub const fn groups(self, role: TensorRole) -> Groups {
        match (self, role) {
            (NormAxis::Column, _) => Groups::Columns,
            (NormAxis::Row, _) => Groups::Rows,
            (NormAxis::Rank, TensorRole::LoraA) => Groups::Rows,
            (NormAxis::Rank, _) => Groups::Columns,
        }
    }
}

/// What is decomposed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Target {
    /// The updates `Δ_i = θ_i − G`; result `G + λ·m̄⊙D̂`.
    #[default]
    Delta,
    /// The client weights `θ_i = G + Δ_i`; result `G + λ·(m̄⊙D̂ − G)` (λ = 1: `m̄⊙D̂`).
    Weights,
}

impl Target {
    /// Every value, in documentation order.
    pub const ALL: [Target; 2] = [Target::Delta, Target::Weights];

    /// The config/CLI name (`delta`, `weights`).
    pub const fn name(self) -> &'static str {
        match self {
            Target::Delta => "delta",
            Target::Weights => "weights",
        }
    }

    /// The value [`name`](Self::name) calls `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }
}

/// Which of FedCDD's two parts replace FedAvg's. FedAvg's step per group is
/// `‖Δ̄_g‖ · Δ̄_g/‖Δ̄_g‖` (`Δ̄ = Σ p_i Δ_i`); FedCDD replaces the magnitude by the consensus
/// `m̄_g = Σ p_i ‖Δ_i,g‖` and the direction by the agreement-weighted mean direction `D̂_g`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Components {
    /// `m̄ ⊙ D̂`: the spec's FedCDD.
    #[default]
    Both,
    /// `m̄ ⊙ Δ̄/‖Δ̄‖`: consensus magnitude, FedAvg's direction (`weighting` and
    /// `renormalize` have no effect).
    ConsensusOnly,
    /// `‖Δ̄‖ ⊙ D̂`: FedAvg's magnitude, the aligned direction.
    DivergenceOnly,
}

impl Components {
    /// Every value, in documentation order.
    pub const ALL: [Components; 3] = [
        Components::Both,
        Components::ConsensusOnly,
        Components::DivergenceOnly,
    ];

    /// The config/CLI name (`both`, `consensus_only`, `divergence_only`).
    pub const fn name(self) -> &'static str {
        match self {
            Components::Both => "both",
            Components::ConsensusOnly => "consensus_only",
            Components::DivergenceOnly => "divergence_only",
        }
    }

    /// The value [`name`](Self::name) calls `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }

    /// Whether FedAvg's mean `Σ n_i X_i` is needed.
    const fn needs_mean(self) -> bool {
        !matches!(self, Components::Both)
    }
}

impl core::fmt::Display for Weighting {
    /// The form [`Weighting::parse`] reads.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Weighting::PRelu => f.write_str("p_relu"),
            Weighting::Relu => f.write_str("relu"),
            Weighting::Softmax { tau } => write!(f, "softmax:{tau}"),
            Weighting::Samples => f.write_str("samples"),
            Weighting::Uniform => f.write_str("uniform"),
        }
    }
}

/// How the direction weights `w_i` come from the agreement scores `v_i`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Weighting {
    /// `w_i ∝ p_i·max(v_i, 0)`; falls back to `p_i` when the sum is below ε.
    #[default]
    PRelu,
    /// `w_i ∝ max(v_i, 0)` (ignores sample counts); same fallback.
    Relu,
    /// `w_i ∝ p_i·exp(v_i/τ)`, computed as `exp((v_i − max_k v_k)/τ)` so that no term overflows
    /// and the largest is 1 (the streaming form keeps a running maximum and rescales its
    /// accumulator when it grows, as online softmax does).
    Softmax { tau: f32 },
    /// `w_i = p_i`: alignment off.
    Samples,
    /// `w_i = 1/N`.
    Uniform,
}

impl Weighting {
    /// Reads `p_relu | relu | softmax:T | samples | uniform` (T > 0).
    pub fn parse(s: &str) -> Result<Weighting, &'static str> {
        match s {
            "p_relu" => Ok(Weighting::PRelu),
            "relu" => Ok(Weighting::Relu),
            "samples" => Ok(Weighting::Samples),
            "uniform" => Ok(Weighting::Uniform),
            _ => match s.strip_prefix("softmax:") {
                Some(t) => match t.parse::<f32>() {
                    Ok(tau) if tau > 0.0 && tau.is_finite() => Ok(Weighting::Softmax { tau }),
                    _ => Err("the softmax temperature must be a number > 0"),
                },
                None => Err("expected p_relu, relu, softmax:T, samples or uniform"),
            },
        }
    }

    /// Whether this weighting can fall back to `p_i`, which needs a second accumulator.
    const fn has_fallback(self) -> bool {
        matches!(
            self,
            Weighting::PRelu | Weighting::Relu | Weighting::Softmax { .. }
        )
    }

    /// Unnormalised weight of a client with sample weight `n` and agreement `v`;
    /// `v_max` is the softmax shift (the largest agreement so far).
    fn raw(self, n: f32, v: f32, v_max: f32) -> f32 {
        match self {
            Weighting::PRelu => n * v.max(0.0),
            Weighting::Relu => v.max(0.0),
            Weighting::Softmax { tau } => n * libm::expf((v - v_max) / tau),
            Weighting::Samples => n,
            Weighting::Uniform => 1.0,
        }
    }

    /// Whether the weights must fall back to `p_i`, given `Σ raw` and `Σ n` over `count` clients.
    fn falls_back(self, raw_sum: f32, n_sum: f32) -> bool {
        match self {
            Weighting::PRelu => !(raw_sum / n_sum >= EPS),
            Weighting::Relu => !(raw_sum >= EPS),
            Weighting::Softmax { .. } => !(raw_sum > 0.0 && raw_sum.is_finite()),
            Weighting::Samples | Weighting::Uniform => false,
        }
    }
}

/// Every switch of the spec's FedCDD.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FedCddConfig {
    pub norm_axis: NormAxis,
    pub target: Target,
    pub weighting: Weighting,
    /// Re-normalise each group of the aggregated direction to unit length.
    pub renormalize: bool,
    /// λ, the server rate.
    pub server_lr: f32,
    /// Both parts, or one of them on top of FedAvg (an ablation; not in the spec's table).
    pub components: Components,
}

impl Default for FedCddConfig {
    fn default() -> Self {
        FedCddConfig {
            norm_axis: NormAxis::Column,
            target: Target::Delta,
            weighting: Weighting::PRelu,
            renormalize: true,
            server_lr: 1.0,
            components: Components::Both,
        }
    }
}

impl FedCddConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if !self.server_lr.is_finite() {
            return Err(ErrorKind::BadConfig("server_lr must be finite").into());
        }
        if let Weighting::Softmax { tau } = self.weighting
            && !(tau > 0.0 && tau.is_finite())
        {
            return Err(ErrorKind::BadConfig("softmax temperature must be > 0").into());
        }
        Ok(())
    }
}

/// Sample weight check shared by every rule: finite and `>= 0`.
pub(crate) fn check_weight(n: f32) -> Result<(), Error> {
    if n.is_finite() && n >= 0.0 {
        Ok(())
    } else {
        Err(ErrorKind::BadWeight.into())
    }
}

/// What pass 2 learned about one client.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClientAgreement {
    /// `v_i`: mean cosine similarity of this client's direction to the others'.
    pub v: f32,
    /// Unnormalised direction weight at the time of the call; [`FedCddSummary::weight_of`]
    /// turns it into the weight `w_i` actually used.
    pub raw_weight: f32,
    /// The client's sample weight `n_i`.
    pub samples: f32,
    /// Softmax only: the shift (largest agreement so far) `raw_weight` is relative to.
    pub shift: f32,
}

/// What [`StreamingFedCdd::finish`] reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FedCddSummary {
    pub clients: usize,
    /// Sum of the unnormalised direction weights (before any fallback).
    pub weight_sum: f32,
    /// True when the agreement weights summed below ε and `w_i = p_i` was used.
    pub fell_back: bool,
    /// Sum of the sample weights `Σ n_i`.
    pub sample_sum: f32,
    /// Softmax only: the final shift (largest agreement).
    pub shift: f32,
    pub weighting: Weighting,
}

impl FedCddSummary {
    /// The normalised direction weight `w_i` a client of pass 2 got.
    pub fn weight_of(&self, a: &ClientAgreement) -> f32 {
        if self.fell_back {
            return a.samples / self.sample_sum;
        }
        let raw = match self.weighting {
            Weighting::Softmax { tau } if self.clients > 1 => {
                a.raw_weight * libm::expf((a.shift - self.shift) / tau)
            }
            _ => a.raw_weight,
        };
        raw / self.weight_sum
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Pass1,
    Pass2,
}

/// The two-pass streaming form of FedCDD for one tensor.
///
/// Call [`pass1`](Self::pass1) for every client, then [`pass2`](Self::pass2) for the same
/// clients with the same weights (any order), then [`finish`](Self::finish).
/// A client rejected by a pass leaves the state untouched (its data is validated before
/// anything is accumulated): skip it in the other pass too.
///
/// Memory: the `workspace` slice only ([`workspace_len`](Self::workspace_len) f32s, at most
/// `5·P + 3·G`, `P` more for a one-part [`Components`] reading); nothing grows with the number of clients. Each pass reads a client's tensor
/// twice back to back (norms, then accumulation), so the second read comes from cache.
pub struct StreamingFedCdd<'w, 'g> {
    cfg: FedCddConfig,
    layout: Layout,
    groups: Groups,
    global: TensorView<'g>,
    phase: Phase,
    // Accumulators, all carved out of the caller's workspace.
    unit_sum: &'w mut [f32],     // U = Σ û_i                      (P)
    dir_acc: &'w mut [f32],      // Σ raw_i · D_i                  (P)
    dir_fallback: &'w mut [f32], // Σ n_i · D_i, if weighting has a fallback (P or 0)
    global_f32: &'w mut [f32],   // G in f32, for target = weights   (P or 0)
    theta: &'w mut [f32],        // θ_i scratch, for target = weights (P or 0)
    mean_acc: &'w mut [f32],     // Σ n_i · X_i, for one-part components (P or 0)
    mag_acc: &'w mut [f32],      // Σ n_i · m_i                    (G)
    sq: &'w mut [f32],           // per-client group sums of squares (G)
    dot: &'w mut [f32],          // per-client group dots / coefficients (G)
    count1: usize,
    /// Clients of pass 1 whose direction is not all zero (‖û_i‖ = 1).
    nonzero1: usize,
    /// Smallest sample weight of pass 1.
    n_min1: f32,
    /// Whether pass 2 must also accumulate `Σ n_i D_i` for the `w_i = p_i` fallback.
    track_fallback: bool,
    count2: usize,
    n_sum1: f32,
    n_sum2: f32,
    raw_sum: f32,
    /// Largest agreement of pass 2 so far (the softmax shift).
    v_max: f32,
}

impl<'w, 'g> StreamingFedCdd<'w, 'g> {
    /// Number of f32 elements the workspace needs for this tensor and configuration.
    pub fn workspace_len(cfg: &FedCddConfig, layout: &Layout) -> usize {
        let p = layout.len();
        let g = cfg.norm_axis.groups(layout.role).count(layout);
        let fallback = if cfg.weighting.has_fallback() { p } else { 0 };
        let weights = if cfg.target == Target::Weights {
            2 * p
        } else {
            0
        };
        let mean = if cfg.components.needs_mean() { p } else { 0 };
        2 * p + fallback + weights + mean + 3 * g
    }

    /// Starts the aggregation of one tensor whose current global value is `global`.
    pub fn new(
        cfg: FedCddConfig,
        layout: Layout,
        global: TensorView<'g>,
        workspace: &'w mut [f32],
    ) -> Result<Self, Error> {
        cfg.validate()?;
        check_len(layout.len(), global.len())?;
        let needed = Self::workspace_len(&cfg, &layout);
        if workspace.len() < needed {
            return Err(ErrorKind::BufferTooSmall { needed }.into());
        }
        let p = layout.len();
        let groups = cfg.norm_axis.groups(layout.role);
        let g = groups.count(&layout);
        let (unit_sum, rest) = workspace.split_at_mut(p);
        let (dir_acc, rest) = rest.split_at_mut(p);
        let (dir_fallback, rest) =
            rest.split_at_mut(if cfg.weighting.has_fallback() { p } else { 0 });
        let wp = if cfg.target == Target::Weights { p } else { 0 };
        let (global_f32, rest) = rest.split_at_mut(wp);
        let (theta, rest) = rest.split_at_mut(wp);
        let (mean_acc, rest) = rest.split_at_mut(if cfg.components.needs_mean() { p } else { 0 });
        let (mag_acc, rest) = rest.split_at_mut(g);
        let (sq, rest) = rest.split_at_mut(g);
        let (dot, _) = rest.split_at_mut(g);
        for buf in [
            &mut *unit_sum,
            &mut *dir_acc,
            &mut *dir_fallback,
            &mut *mean_acc,
            &mut *mag_acc,
        ] {
            buf.fill(0.0);
        }
        if cfg.target == Target::Weights {
            with_view!(global, |s| {
                for (o, v) in global_f32.iter_mut().zip(s.iter()) {
                    *o = v.to_f32();
                }
            });
            crate::sweep::check_all_finite(&*global_f32)?;
        }
        Ok(StreamingFedCdd {
            cfg,
            layout,
            groups,
            global,
            phase: Phase::Pass1,
            unit_sum,
            dir_acc,
            dir_fallback,
            global_f32,
            theta,
            mean_acc,
            mag_acc,
            sq,
            dot,
            count1: 0,
            nonzero1: 0,
            n_min1: f32::INFINITY,
            track_fallback: true,
            count2: 0,
            n_sum1: 0.0,
            n_sum2: 0.0,
            raw_sum: 0.0,
            v_max: f32::NEG_INFINITY,
        })
    }

    /// Pass 1 for one client: accumulates `Σ n_i m_i` and `U = Σ û_i`.
    /// `client` only labels errors; `n` is the client's sample count (any positive scale).
    pub fn pass1(&mut self, client: u32, n: f32, update: TensorView<'_>) -> Result<(), Error> {
        if self.phase != Phase::Pass1 {
            return Err(ErrorKind::Protocol("pass1 after pass2 began").into());
        }
        self.checked(client, n, update, Self::pass1_typed)
    }

    /// Pass 2 for one client (same weight as in pass 1): computes its agreement `v_i` with the
    /// others from `U`, and accumulates its direction with weight `w_i`.
    pub fn pass2(
        &mut self,
        client: u32,
        n: f32,
        update: TensorView<'_>,
    ) -> Result<ClientAgreement, Error> {
        if self.phase == Phase::Pass1 {
            if self.count1 == 0 {
                return Err(ErrorKind::NoClients.into());
            }
            self.phase = Phase::Pass2;
            self.track_fallback = self.fallback_possible();
        }
        self.checked(client, n, update, Self::pass2_typed)
    }

    /// Checks weight and length, forms θ_i for `target = weights`, and runs `step` on the
    /// typed values; errors name `client`.
    fn checked<R>(
        &mut self,
        client: u32,
        n: f32,
        update: TensorView<'_>,
        step: fn(&mut Self, f32, Values<'_>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let fail = |e: Error| e.with_client(client);
        check_weight(n).map_err(fail)?;
        check_len(self.layout.len(), update.len()).map_err(fail)?;
        if self.cfg.target == Target::Weights {
            with_view!(update, |s| load_theta(s, self.global_f32, self.theta));
            let theta = core::mem::take(&mut self.theta);
            let result = step(self, n, Values::F32(&*theta));
            self.theta = theta;
            return result.map_err(fail);
        }
        let values = match update {
            TensorView::F32(s) => Values::F32(s),
            TensorView::F16(s) => Values::F16(s),
            TensorView::BF16(s) => Values::BF16(s),
        };
        step(self, n, values).map_err(fail)
    }

    fn pass1_typed(&mut self, n: f32, x: Values<'_>) -> Result<(), Error> {
        match x {
            Values::F32(s) => self.pass1_slice(n, s),
            Values::F16(s) => self.pass1_slice(n, s),
            Values::BF16(s) => self.pass1_slice(n, s),
        }
    }

    fn pass2_typed(&mut self, n: f32, x: Values<'_>) -> Result<ClientAgreement, Error> {
        match x {
            Values::F32(s) => self.pass2_slice(n, s),
            Values::F16(s) => self.pass2_slice(n, s),
            Values::BF16(s) => self.pass2_slice(n, s),
        }
    }

    fn pass1_slice<T: Element>(&mut self, n: f32, x: &[T]) -> Result<(), Error> {
        group_sumsq(x, &self.layout, self.groups, self.sq);
        check_finite_sumsq(x, self.sq)?;
        // From here on nothing fails: the client is counted.
        // ‖D_i‖² = Σ_g (m_g / max(m_g, ε))² = Σ_g min(s_g/ε², 1).
        let dsq = sum_lanes(self.sq, |s| (s * INV_EPS_SQ).min(1.0));
        for ((s, c), m_acc) in self
            .sq
            .iter()
            .zip(self.dot.iter_mut())
            .zip(self.mag_acc.iter_mut())
        {
            let m = sqrt(*s);
            *m_acc += n * m;
            *c = 1.0 / m.max(EPS);
        }
        let dnorm = sqrt(dsq);
        if dnorm > 0.0 {
            // û_i = D_i/‖D_i‖; an all-zero update contributes nothing.
            let inv_d = 1.0 / dnorm;
            for c in self.dot.iter_mut() {
                *c *= inv_d;
            }
            group_axpy(x, self.dot, &self.layout, self.groups, self.unit_sum);
            self.nonzero1 += 1;
        }
        for (a, v) in self.mean_acc.iter_mut().zip(x) {
            *a += n * v.to_f32();
        }
        self.count1 += 1;
        self.n_min1 = self.n_min1.min(n);
        self.n_sum1 += n;
        Ok(())
    }

    fn pass2_slice<T: Element>(&mut self, n: f32, x: &[T]) -> Result<ClientAgreement, Error> {
        group_sumsq_dot(
            x,
            self.unit_sum,
            &self.layout,
            self.groups,
            self.sq,
            self.dot,
        );
        check_finite_sumsq(x, self.sq)?;
        // dot[g] = ⟨X_g, U_g⟩. ‖D_i‖² as in pass 1, then sq becomes 1/max(m, ε), and
        // ⟨D_i, U⟩ = Σ_g dot_g / max(m_g, ε).
        let dsq = sum_lanes(self.sq, |s| (s * INV_EPS_SQ).min(1.0));
        for s in self.sq.iter_mut() {
            *s = 1.0 / sqrt(*s).max(EPS);
        }
        let udot = dot_lanes(self.sq, self.dot);
        let dnorm = sqrt(dsq);
        let count = self.count1;
        let v = if dnorm > 0.0 && count > 1 {
            // Σ_{k≠i} ⟨û_i, û_k⟩ = ⟨û_i, U⟩ − ‖û_i‖², and ‖û_i‖ = 1.
            snap_agreement((udot / dnorm - 1.0) / (count - 1) as f32)
        } else {
            0.0
        };
        if let Weighting::Softmax { tau } = self.cfg.weighting
            && v > self.v_max
        {
            // Online softmax: re-base what was accumulated on the new maximum.
            if self.v_max.is_finite() {
                let scale = libm::expf((self.v_max - v) / tau);
                for d in self.dir_acc.iter_mut() {
                    *d *= scale;
                }
                self.raw_sum *= scale;
            }
            self.v_max = v;
        }
        let raw = if count == 1 {
            1.0
        } else {
            self.cfg.weighting.raw(n, v, self.v_max)
        };
        // Direction coefficient per group: raw · 1/max(m, ε).
        for (c, inv) in self.dot.iter_mut().zip(self.sq.iter()) {
            *c = raw * inv;
        }
        group_axpy(x, self.dot, &self.layout, self.groups, self.dir_acc);
        if self.track_fallback {
            for (c, inv) in self.dot.iter_mut().zip(self.sq.iter()) {
                *c = n * inv;
            }
            group_axpy(x, self.dot, &self.layout, self.groups, self.dir_fallback);
        }
        self.count2 += 1;
        self.n_sum2 += n;
        self.raw_sum += raw;
        Ok(ClientAgreement {
            v,
            raw_weight: raw,
            samples: n,
            shift: self.v_max,
        })
    }

    /// After pass 1: can the agreement weights still sum below ε? `Σ_i v_i` is known from
    /// `U` alone (`Σ_i ⟨û_i, U⟩ = ‖U‖²`), and the largest `v_i` is at least the mean, so
    /// `Σ p_i max(v_i, 0) ≥ p_min · mean(v)`. When that bound clears ε with a wide margin for
    /// f32 rounding, pass 2 skips the second accumulator and reads a third less memory.
    fn fallback_possible(&self) -> bool {
        let n = self.count1;
        if !self.cfg.weighting.has_fallback() || n <= 1 {
            return false;
        }
        if let Weighting::Softmax { .. } = self.cfg.weighting {
            // The largest term is n·exp(0): the sum can only vanish with a zero sample weight.
            return !(self.n_min1 > 0.0);
        }
        let u_sq: f32 = self.unit_sum.iter().map(|u| u * u).sum();
        let mean_v = (u_sq - self.nonzero1 as f32) / (n as f32 * (n - 1) as f32);
        let margin = mean_v - 1e-3;
        let bound = match self.cfg.weighting {
            Weighting::PRelu => self.n_min1 / self.n_sum1 * margin,
            _ => margin,
        };
        !(bound > 4.0 * EPS)
    }

    /// Writes the new global tensor (f32) into `out` (length P).
    pub fn finish(self, out: &mut [f32]) -> Result<FedCddSummary, Error> {
        check_len(self.layout.len(), out.len())?;
        if self.count1 == 0 {
            return Err(ErrorKind::NoClients.into());
        }
        if self.phase != Phase::Pass2
            || self.count2 != self.count1
            || !(libm::fabsf(self.n_sum2 - self.n_sum1) <= 1e-5 * self.n_sum1)
        {
            return Err(ErrorKind::PassMismatch.into());
        }
        if !(self.n_sum1 > 0.0) {
            return Err(ErrorKind::BadWeight.into());
        }
        let fell_back = self.count1 > 1 && self.cfg.weighting.falls_back(self.raw_sum, self.n_sum1);
        let inv_n = 1.0 / self.n_sum1;
        // The magnitude per group into `dot`: m̄, or ‖Δ̄_g‖ for divergence only.
        if self.cfg.components == Components::DivergenceOnly {
            group_sumsq(&*self.mean_acc, &self.layout, self.groups, self.sq);
            for (c, s) in self.dot.iter_mut().zip(self.sq.iter()) {
                *c = sqrt(*s) * inv_n;
            }
        } else {
            for (c, m) in self.dot.iter_mut().zip(self.mag_acc.iter()) {
                *c = m * inv_n;
            }
        }
        let consensus_only = self.cfg.components == Components::ConsensusOnly;
        let (dir, wsum): (&mut [f32], f32) = if consensus_only {
            (self.mean_acc, self.n_sum1)
        } else if fell_back {
            (self.dir_fallback, self.n_sum1)
        } else {
            (self.dir_acc, self.raw_sum)
        };
        let inv_wsum = 1.0 / wsum;
        // Coefficient per group: m̄_g / max(‖D̄_g‖, ε) with D̄ = dir / wsum.
        if self.cfg.renormalize || consensus_only {
            group_sumsq(&*dir, &self.layout, self.groups, self.sq);
            for (c, s) in self.dot.iter_mut().zip(self.sq.iter()) {
                let norm = sqrt(*s) * inv_wsum;
                *c *= inv_wsum * renorm_factor(norm);
            }
        } else {
            for c in self.dot.iter_mut() {
                *c *= inv_wsum;
            }
        }
        let lr = self.cfg.server_lr;
        match self.cfg.target {
            Target::Delta => {
                // One sweep: out = G + λ·coef_g·dir.
                for c in self.dot.iter_mut() {
                    *c *= lr;
                }
                with_view!(self.global, |g| {
                    group_scale_add_into(dir, self.dot, &self.layout, self.groups, g, out)
                });
            }
            Target::Weights => {
                group_scale_into(dir, &self.layout, self.groups, self.dot, out);
                for (o, g) in out.iter_mut().zip(self.global_f32.iter()) {
                    *o = g + lr * (*o - g);
                }
            }
        }
        crate::sweep::check_all_finite(&*out)?;
        Ok(FedCddSummary {
            clients: self.count1,
            weight_sum: self.raw_sum,
            fell_back,
            sample_sum: self.n_sum1,
            shift: self.v_max,
            weighting: self.cfg.weighting,
        })
    }
}

/// A client's values with the element type resolved (θ_i is always f32).
#[derive(Clone, Copy)]
enum Values<'a> {
    F32(&'a [f32]),
    F16(&'a [crate::f16]),
    BF16(&'a [crate::bf16]),
}

/// `theta = global + update` in f32.
fn load_theta<T: Element>(update: &[T], global: &[f32], theta: &mut [f32]) {
    for ((t, u), g) in theta.iter_mut().zip(update).zip(global) {
        *t = g + u.to_f32();
    }
}

#[cfg(feature = "alloc")]
pub use batch::{BatchReport, ClientInput, fedcdd_batch};

#[cfg(feature = "alloc")]
mod batch {
    use alloc::vec;
    use alloc::vec::Vec;

    use super::*;

    /// One client of a batch aggregation.
    #[derive(Clone, Copy, Debug)]
    pub struct ClientInput<'a> {
        /// Labels errors.
        pub id: u32,
        /// Sample count `n_i`.
        pub samples: f32,
        pub update: TensorView<'a>,
    }

    /// Per-client quantities of a batch aggregation.
    #[derive(Clone, Debug, PartialEq)]
    pub struct BatchReport {
        /// `v_i`.
        pub agreement: Vec<f32>,
        /// Normalised direction weights `w_i` actually used.
        pub weights: Vec<f32>,
        pub fell_back: bool,
    }

    /// FedCDD over all clients at once, written after the spec's formulas (pairwise cosines).
    /// Memory: `O(N·P)`. Writes the new global tensor (f32) into `out`.
    pub fn fedcdd_batch(
        cfg: &FedCddConfig,
        layout: Layout,
        global: TensorView<'_>,
        clients: &[ClientInput<'_>],
        out: &mut [f32],
    ) -> Result<BatchReport, Error> {
        cfg.validate()?;
        let p = layout.len();
        check_len(p, global.len())?;
        check_len(p, out.len())?;
        if clients.is_empty() {
            return Err(ErrorKind::NoClients.into());
        }
        let groups = cfg.norm_axis.groups(layout.role);
        let ng = groups.count(&layout);
        let g: Vec<f32> = (0..p).map(|i| global.get(i)).collect();
        crate::sweep::check_all_finite(&g[..])?;

        let mut n_sum = 0.0f32;
        let mut mean = vec![0.0f32; p]; // Σ n_i X_i
        let mut mags: Vec<Vec<f32>> = Vec::with_capacity(clients.len());
        let mut dirs: Vec<Vec<f32>> = Vec::with_capacity(clients.len());
        for c in clients {
            let fail = |e: Error| e.with_client(c.id);
            check_weight(c.samples).map_err(fail)?;
            check_len(p, c.update.len()).map_err(fail)?;
            let mut x: Vec<f32> = (0..p).map(|i| c.update.get(i)).collect();
            if cfg.target == Target::Weights {
                for (v, gv) in x.iter_mut().zip(&g) {
                    *v += gv;
                }
            }
            let mut sq = vec![0.0; ng];
            group_sumsq(&x[..], &layout, groups, &mut sq);
            check_finite_sumsq(&x[..], &sq).map_err(fail)?;
            let m: Vec<f32> = sq.iter().map(|s| sqrt(*s)).collect();
            let inv: Vec<f32> = m.iter().map(|m| 1.0 / m.max(EPS)).collect();
            let mut d = vec![0.0; p];
            group_scale_into(&x, &layout, groups, &inv, &mut d);
            n_sum += c.samples;
            for (a, v) in mean.iter_mut().zip(&x) {
                *a += c.samples * v;
            }
            mags.push(m);
            dirs.push(d);
        }
        if !(n_sum > 0.0) {
            return Err(ErrorKind::BadWeight.into());
        }
        let nc = clients.len();
        let p_i: Vec<f32> = clients.iter().map(|c| c.samples / n_sum).collect();

        // v_i = 1/(N−1) Σ_{k≠i} ⟨û_i, û_k⟩.
        let units: Vec<Vec<f32>> = dirs
            .iter()
            .map(|d| {
                let norm = sqrt(d.iter().map(|v| v * v).sum::<f32>());
                if norm > 0.0 {
                    d.iter().map(|v| v / norm).collect()
                } else {
                    vec![0.0; p]
                }
            })
            .collect();
        let mut agreement = vec![0.0f32; nc];
        if nc > 1 {
            for i in 0..nc {
                let mut s = 0.0f32;
                for k in 0..nc {
                    if k != i {
                        s += units[i]
                            .iter()
                            .zip(&units[k])
                            .map(|(a, b)| a * b)
                            .sum::<f32>();
                    }
                }
                agreement[i] = snap_agreement(s / (nc - 1) as f32);
            }
        }
        let raw: Vec<f32> = if nc == 1 {
            vec![1.0]
        } else {
            let v_max = agreement.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            (0..nc)
                .map(|i| cfg.weighting.raw(clients[i].samples, agreement[i], v_max))
                .collect()
        };
        let raw_sum: f32 = raw.iter().sum();
        let fell_back = nc > 1 && cfg.weighting.falls_back(raw_sum, n_sum);
        let weights: Vec<f32> = if fell_back {
            p_i.clone()
        } else {
            raw.iter().map(|r| r / raw_sum).collect()
        };

        // m̄ and D̄.
        let mut mbar = vec![0.0f32; ng];
        for (m, pi) in mags.iter().zip(&p_i) {
            for (a, v) in mbar.iter_mut().zip(m) {
                *a += pi * v;
            }
        }
        let mut dbar = vec![0.0f32; p];
        for (d, w) in dirs.iter().zip(&weights) {
            for (a, v) in dbar.iter_mut().zip(d) {
                *a += w * v;
            }
        }
        for a in mean.iter_mut() {
            *a /= n_sum;
        }
        let mut mean_sq = vec![0.0; ng];
        group_sumsq(&mean[..], &layout, groups, &mut mean_sq);
        match cfg.components {
            Components::Both => {}
            Components::ConsensusOnly => dbar = mean,
            Components::DivergenceOnly => mbar = mean_sq.iter().map(|s| sqrt(*s)).collect(),
        }
        let mut coef = mbar;
        if cfg.renormalize || cfg.components == Components::ConsensusOnly {
            let mut sq = vec![0.0; ng];
            group_sumsq(&dbar[..], &layout, groups, &mut sq);
            for (c, s) in coef.iter_mut().zip(&sq) {
                *c *= renorm_factor(sqrt(*s));
            }
        }
        group_scale_into(&dbar, &layout, groups, &coef, out);
        let lr = cfg.server_lr;
        for (o, gv) in out.iter_mut().zip(&g) {
            *o = match cfg.target {
                Target::Delta => gv + lr * *o,
                Target::Weights => gv + lr * (*o - gv),
            };
        }
        crate::sweep::check_all_finite(&*out)?;
        Ok(BatchReport {
            agreement,
            weights,
            fell_back,
        })
    }
}
