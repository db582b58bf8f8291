//! The baselines' server rules (FedAvg, FedAvgM, FedAdagrad, FedYogi, FedAdam — Reddi et al.
//! 2021, plus OpenFedLLM's variant behind a switch), SCAFFOLD's server and client updates,
//! FedProx's proximal gradient, and the tensor selection of FFA-LoRA and FedSA-LoRA.
//! All per tensor, slices in and out, no allocation.

use crate::error::{Error, ErrorKind};
use crate::fedcdd::check_weight;
use crate::sweep::{check_all_finite, check_len};
use crate::tensor::{DType, Element, TensorRole, TensorView};
use crate::with_view;

/// Every algorithm the project knows, by its CLI/config name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    FedAvg,
    FedProx,
    Scaffold,
    FedAvgM,
    FedAdagrad,
    FedYogi,
    FedAdam,
    FfaLora,
    FedSaLora,
    FLora,
    FedCdd,
}

impl Algorithm {
    pub const ALL: [Algorithm; 11] = [
        Algorithm::FedAvg,
        Algorithm::FedProx,
        Algorithm::Scaffold,
        Algorithm::FedAvgM,
        Algorithm::FedAdagrad,
        Algorithm::FedYogi,
        Algorithm::FedAdam,
        Algorithm::FfaLora,
        Algorithm::FedSaLora,
        Algorithm::FLora,
        Algorithm::FedCdd,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Algorithm::FedAvg => "fedavg",
            Algorithm::FedProx => "fedprox",
            Algorithm::Scaffold => "scaffold",
            Algorithm::FedAvgM => "fedavgm",
            Algorithm::FedAdagrad => "fedadagrad",
            Algorithm::FedYogi => "fedyogi",
            Algorithm::FedAdam => "fedadam",
            Algorithm::FfaLora => "ffa-lora",
            Algorithm::FedSaLora => "fedsa-lora",
            Algorithm::FLora => "flora",
            Algorithm::FedCdd => "fedcdd",
        }
    }

    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Whether the server aggregates tensors of this role. FFA-LoRA trains and sends only
    /// `lora_B` (A stays at its shared init); FedSA-LoRA shares only `lora_A` (each B stays on
    /// its client). Tensors not aggregated keep the global value.
    pub const fn aggregates(self, role: TensorRole) -> bool {
        match self {
            Algorithm::FfaLora => !matches!(role, TensorRole::LoraA),
            Algorithm::FedSaLora => !matches!(role, TensorRole::LoraB),
            _ => true,
        }
    }

    /// The server optimiser this algorithm uses on `Δ̄` (FedCDD and FLoRA have their own rules).
    pub const fn server_opt(self) -> Option<ServerOpt> {
        match self {
            Algorithm::FedAvg
            | Algorithm::FedProx
            | Algorithm::Scaffold
            | Algorithm::FfaLora
            | Algorithm::FedSaLora => Some(ServerOpt::FedAvg),
            Algorithm::FedAvgM => Some(ServerOpt::FedAvgM),
            Algorithm::FedAdagrad => Some(ServerOpt::FedAdagrad),
            Algorithm::FedYogi => Some(ServerOpt::FedYogi),
            Algorithm::FedAdam => Some(ServerOpt::FedAdam),
            Algorithm::FLora | Algorithm::FedCdd => None,
        }
    }
}

/// A server update rule on the mean client update `Δ̄`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerOpt {
    /// `G ← G + λ·Δ̄` (λ = 1: `Σ p_i θ_i`).
    FedAvg,
    /// `m ← β·m + Δ̄; G ← G + λ·m` (β = `beta1`).
    FedAvgM,
    /// `v ← v + Δ̄²; G ← G + λ·Δ̄/(√v + τ)`.
    FedAdagrad,
    /// `m ← β1 m + (1−β1)Δ̄; v ← v − (1−β2)Δ̄²·sign(v − Δ̄²); G ← G + λ·m/(√v + τ)`.
    FedYogi,
    /// `m ← β1 m + (1−β1)Δ̄; v ← β2 v + (1−β2)Δ̄²; G ← G + λ·m/(√v + τ)`.
    FedAdam,
}

/// Which reading of the FedOpt rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FedOptVariant {
    /// Reddi et al. 2021 as in the spec's table.
    #[default]
    Reddi,
    /// As OpenFedLLM's server code: for FedAdagrad/FedYogi/FedAdam `Δ̄` is the uniform mean of
    /// the client updates; FedYogi/FedAdam set `m = Δ̄` in the first round and feed `m²`
    /// instead of `Δ̄²` to the second moment (FedAdagrad keeps no momentum, as Reddi's);
    /// FedAvgM's momentum is an average, `m ← β m + (1−β)Δ̄` (first round `m = Δ̄`), and
    /// `G ← G + m` without a server rate.
    OpenFedLlm,
}

impl FedOptVariant {
    /// Every value, in documentation order.
    pub const ALL: [FedOptVariant; 2] = [FedOptVariant::Reddi, FedOptVariant::OpenFedLlm];

    /// The config/CLI name (`reddi`, `openfedllm`).
    pub const fn name(self) -> &'static str {
        match self {
            FedOptVariant::Reddi => "reddi",
            FedOptVariant::OpenFedLlm => "openfedllm",
        }
    }

    /// The value [`name`](Self::name) calls `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }
}

/// Hyper-parameters of a [`ServerOpt`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ServerOptConfig {
    pub rule: ServerOpt,
    /// λ / η, the server rate.
    pub server_lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub tau: f32,
    pub variant: FedOptVariant,
}

impl ServerOptConfig {
    /// The spec's defaults for `rule`: FedAvg/FedAvgM λ = 1, FedOpt η = 1e-3; β1 = 0.9,
    /// β2 = 0.99, τ = 1e-3.
    pub const fn defaults(rule: ServerOpt) -> Self {
        let server_lr = match rule {
            ServerOpt::FedAvg | ServerOpt::FedAvgM => 1.0,
            _ => 1e-3,
        };
        ServerOptConfig {
            rule,
            server_lr,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
            variant: FedOptVariant::Reddi,
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        let unit = |b: f32| (0.0..=1.0).contains(&b);
        if !self.server_lr.is_finite() {
            return Err(ErrorKind::BadConfig("server_lr must be finite").into());
        }
        if !unit(self.beta1) || !unit(self.beta2) {
            return Err(ErrorKind::BadConfig("beta1 and beta2 must be in [0, 1]").into());
        }
        if !(self.tau > 0.0 && self.tau.is_finite()) {
            return Err(ErrorKind::BadConfig("tau must be > 0").into());
        }
        Ok(())
    }

    /// Whether the rule keeps a first moment `m` / a second moment `v`.
    pub const fn state_slots(&self) -> (bool, bool) {
        match (self.rule, self.variant) {
            (ServerOpt::FedAvg, _) => (false, false),
            (ServerOpt::FedAvgM, _) => (true, false),
            (ServerOpt::FedAdagrad, _) => (false, true),
            (ServerOpt::FedYogi | ServerOpt::FedAdam, _) => (true, true),
        }
    }

    /// The aggregation weight of a client with `n` samples: `n`, or 1 under OpenFedLLM's
    /// uniform FedOpt mean.
    pub fn client_weight(&self, n: f32) -> f32 {
        match (self.variant, self.rule) {
            (
                FedOptVariant::OpenFedLlm,
                ServerOpt::FedAdagrad | ServerOpt::FedYogi | ServerOpt::FedAdam,
            ) => 1.0,
            _ => n,
        }
    }
}

/// Server state of one tensor: first and second moments (empty slices where the rule has
/// none) and the number of server steps taken so far. The caller owns and persists it.
pub struct ServerState<'s> {
    pub m: &'s mut [f32],
    pub v: &'s mut [f32],
    pub steps: u64,
}

/// Sets a fresh state: `m = 0`, `v = τ²` (Reddi et al.'s `v₀`).
pub fn init_server_state(cfg: &ServerOptConfig, m: &mut [f32], v: &mut [f32]) {
    m.fill(0.0);
    v.fill(cfg.tau * cfg.tau);
}

/// One client's tensor, as the accumulators take it.
#[derive(Clone, Copy, Debug)]
pub struct ClientView<'a> {
    /// Labels errors.
    pub id: u32,
    /// Aggregation weight (sample count, or 1).
    pub weight: f32,
    pub values: TensorView<'a>,
}

/// How many clients [`MeanAccumulator::add_group`] fuses into one sweep.
pub const GROUP: usize = 4;

/// Weighted mean of client tensors, streamed a client (or a group of clients) at a time.
///
/// Memory: the caller's buffer of [`buffer_len`](Self::buffer_len)`(P) = 2·P` floats. Each
/// step writes `sum + Σ w_k x_k` into the other half and swaps halves only when every value
/// was finite, so validation costs no second read and a rejected client leaves the sum as
/// it was. Adding clients in groups gives bit-identical sums to adding them one by one.
pub struct MeanAccumulator<'w> {
    sum: &'w mut [f32],
    next: &'w mut [f32],
    count: usize,
    weight_sum: f32,
}

impl<'w> MeanAccumulator<'w> {
    /// Buffer length for tensors of `p` elements.
    pub const fn buffer_len(p: usize) -> usize {
        2 * p
    }

    /// Starts an empty sum over tensors of `p` elements in `buf` (at least `2·p` floats).
    pub fn new(p: usize, buf: &'w mut [f32]) -> Result<Self, Error> {
        let needed = Self::buffer_len(p);
        if buf.len() < needed {
            return Err(ErrorKind::BufferTooSmall { needed }.into());
        }
        let (sum, rest) = buf.split_at_mut(p);
        let next = &mut rest[..p];
        sum.fill(0.0);
        Ok(MeanAccumulator {
            sum,
            next,
            count: 0,
            weight_sum: 0.0,
        })
    }

    /// Adds `weight · x`; a rejected client leaves the sum as it was.
    pub fn add(&mut self, client: u32, weight: f32, x: TensorView<'_>) -> Result<(), Error> {
        self.add_group(&[ClientView {
            id: client,
            weight,
            values: x,
        }])
    }

    /// Adds several clients, [`GROUP`] per sweep over memory. On an error naming client k,
    /// the clients before k in `clients` were added and k and those after it were not.
    pub fn add_group(&mut self, clients: &[ClientView<'_>]) -> Result<(), Error> {
        for (i, c) in clients.iter().enumerate() {
            let fail = |e: Error| e.with_client(c.id);
            if let Err(e) = check_weight(c.weight)
                .and_then(|_| check_len(self.sum.len(), c.values.len()))
                .map_err(fail)
            {
                // Honour the "clients before k were added" contract.
                self.add_group(&clients[..i])?;
                return Err(e);
            }
        }
        for chunk in same_type_runs(clients) {
            if !self.try_fused(chunk) {
                // Some value was not finite: add the clients before the culprit one by one.
                for c in chunk {
                    let fail = |e: Error| e.with_client(c.id);
                    with_view!(c.values, |s| check_all_finite(s)).map_err(fail)?;
                    if !self.try_fused(core::slice::from_ref(c)) {
                        return Err(fail(ErrorKind::NonFinite.into()));
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes `sum + Σ w_k x_k` into `next` and swaps if all finite. False if some value was
    /// not finite (nothing changed then).
    fn try_fused(&mut self, chunk: &[ClientView<'_>]) -> bool {
        let fused = match chunk[0].values.dtype() {
            DType::F32 => fused_typed::<f32>(self.next, self.sum, chunk),
            DType::F16 => fused_typed::<crate::f16>(self.next, self.sum, chunk),
            DType::BF16 => fused_typed::<crate::bf16>(self.next, self.sum, chunk),
        };
        let ok = match fused {
            Some(ok) => ok,
            // Mixed element types: one client per sweep.
            None => {
                return chunk
                    .iter()
                    .all(|c| self.try_fused(core::slice::from_ref(c)));
            }
        };
        if ok {
            core::mem::swap(&mut self.sum, &mut self.next);
            self.count += chunk.len();
            self.weight_sum += chunk.iter().map(|c| c.weight).sum::<f32>();
        }
        ok
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// The running sum `Σ w_i x_i`.
    pub fn sum(&self) -> &[f32] {
        self.sum
    }

    /// FedAvg's server step straight from the sum, in one sweep:
    /// `out = G + λ·Σ w_i x_i / Σ w_i` (same as [`mean_into`](Self::mean_into) followed by
    /// [`apply_server_opt`] with [`ServerOpt::FedAvg`], one pass over memory fewer).
    pub fn apply_fedavg(
        &self,
        global: TensorView<'_>,
        server_lr: f32,
        out: &mut [f32],
    ) -> Result<(), Error> {
        check_len(self.sum.len(), out.len())?;
        check_len(self.sum.len(), global.len())?;
        if self.count == 0 {
            return Err(ErrorKind::NoClients.into());
        }
        if !(self.weight_sum > 0.0) {
            return Err(ErrorKind::BadWeight.into());
        }
        if !server_lr.is_finite() {
            return Err(ErrorKind::BadConfig("server_lr must be finite").into());
        }
        let scale = server_lr / self.weight_sum;
        with_view!(global, |g| {
            for ((o, gv), a) in out.iter_mut().zip(g.iter()).zip(self.sum.iter()) {
                *o = gv.to_f32() + scale * a;
            }
        });
        check_all_finite(&*out)
    }

    /// Writes `Σ w_i x_i / Σ w_i` into `out`.
    pub fn mean_into(&self, out: &mut [f32]) -> Result<(), Error> {
        check_len(self.sum.len(), out.len())?;
        if self.count == 0 {
            return Err(ErrorKind::NoClients.into());
        }
        if !(self.weight_sum > 0.0) {
            return Err(ErrorKind::BadWeight.into());
        }
        let inv = 1.0 / self.weight_sum;
        for (o, a) in out.iter_mut().zip(self.sum.iter()) {
            *o = a * inv;
        }
        Ok(())
    }
}

/// Splits `clients` into runs of at most [`GROUP`] clients with one element type.
fn same_type_runs<'c, 'a>(
    clients: &'c [ClientView<'a>],
) -> impl Iterator<Item = &'c [ClientView<'a>]> {
    let mut rest = clients;
    core::iter::from_fn(move || {
        let first = rest.first()?.values.dtype();
        let len = rest
            .iter()
            .take(GROUP)
            .take_while(|c| c.values.dtype() == first)
            .count();
        let (chunk, tail) = rest.split_at(len);
        rest = tail;
        Some(chunk)
    })
}

/// Runs [`fused_axpy`] when every client of `chunk` holds `T` values; `None` otherwise.
fn fused_typed<T: Element>(dst: &mut [f32], src: &[f32], chunk: &[ClientView<'_>]) -> Option<bool> {
    let mut xs: [&[T]; GROUP] = [&[]; GROUP];
    let mut ws = [0.0f32; GROUP];
    for (k, c) in chunk.iter().enumerate() {
        xs[k] = T::slice_of(c.values)?;
        ws[k] = c.weight;
    }
    Some(match chunk.len() {
        1 => fused_axpy::<1, T>(dst, src, [xs[0]], [ws[0]]),
        2 => fused_axpy::<2, T>(dst, src, [xs[0], xs[1]], [ws[0], ws[1]]),
        3 => fused_axpy::<3, T>(dst, src, [xs[0], xs[1], xs[2]], [ws[0], ws[1], ws[2]]),
        _ => fused_axpy::<4, T>(dst, src, xs, ws),
    })
}

/// `dst = src + Σ_k w_k·x_k`, adding the clients in order (so the rounding equals adding
/// them one at a time), and whether every `x` was finite (`x·0` is NaN exactly when `x` is
/// not finite; summing those products cannot overflow).
fn fused_axpy<const K: usize, T: Element>(
    dst: &mut [f32],
    src: &[f32],
    xs: [&[T]; K],
    ws: [f32; K],
) -> bool {
    const B: usize = 16;
    let mut probe = [0.0f32; B];
    let n = dst.len();
    let full = n - n % B;
    for o in (0..full).step_by(B) {
        let d = &mut dst[o..o + B];
        let s = &src[o..o + B];
        let xb: [&[T]; K] = core::array::from_fn(|k| &xs[k][o..o + B]);
        for j in 0..B {
            let mut acc = s[j];
            let mut z = 0.0f32;
            for k in 0..K {
                let v = xb[k][j].to_f32();
                acc += ws[k] * v;
                z += v * 0.0;
            }
            d[j] = acc;
            probe[j] += z;
        }
    }
    let mut tail = 0.0f32;
    for i in full..n {
        let mut acc = src[i];
        for k in 0..K {
            let v = xs[k][i].to_f32();
            acc += ws[k] * v;
            tail += v * 0.0;
        }
        dst[i] = acc;
    }
    !(probe.iter().sum::<f32>() + tail).is_nan()
}

/// One server step of `cfg.rule` on the mean update `mean_delta`: updates `state` and writes
/// the new global tensor into `out`. `state.m`/`state.v` must have P elements where
/// [`ServerOptConfig::state_slots`] says the rule uses them. Memory: O(1).
pub fn apply_server_opt(
    cfg: &ServerOptConfig,
    state: &mut ServerState<'_>,
    global: TensorView<'_>,
    mean_delta: &[f32],
    out: &mut [f32],
) -> Result<(), Error> {
    cfg.validate()?;
    let p = global.len();
    check_len(p, mean_delta.len())?;
    check_len(p, out.len())?;
    let (uses_m, uses_v) = cfg.state_slots();
    if uses_m {
        check_len(p, state.m.len())?;
    }
    if uses_v {
        check_len(p, state.v.len())?;
    }
    if cfg.rule == ServerOpt::FedAvg {
        // Stateless: one fused pass; a NaN in Δ̄ shows up in the output check below.
        let lr = cfg.server_lr;
        with_view!(global, |g| {
            for ((o, v), d) in out.iter_mut().zip(g.iter()).zip(mean_delta) {
                *o = v.to_f32() + lr * d;
            }
        });
        state.steps += 1;
        return check_all_finite(&*out);
    }
    // Stateful rules: check before the state is touched.
    check_all_finite(mean_delta)?;
    with_view!(global, |g| {
        for (o, v) in out.iter_mut().zip(g.iter()) {
            *o = v.to_f32();
        }
    });
    let (lr, b1, b2, tau) = (cfg.server_lr, cfg.beta1, cfg.beta2, cfg.tau);
    let first = state.steps == 0;
    let openfedllm = cfg.variant == FedOptVariant::OpenFedLlm;
    // OpenFedLLM: m starts as Δ̄ and is always an average; Reddi: m starts at 0.
    let ema = |m: f32, d: f32| {
        if openfedllm && first {
            d
        } else {
            b1 * m + (1.0 - b1) * d
        }
    };
    match cfg.rule {
        // Returned above.
        ServerOpt::FedAvg => {}
        ServerOpt::FedAvgM => {
            for ((o, d), m) in out.iter_mut().zip(mean_delta).zip(state.m.iter_mut()) {
                if openfedllm {
                    *m = ema(*m, *d);
                    *o += *m;
                } else {
                    *m = b1 * *m + d;
                    *o += lr * *m;
                }
            }
        }
        ServerOpt::FedAdagrad => {
            for ((o, d), v) in out.iter_mut().zip(mean_delta).zip(state.v.iter_mut()) {
                *v += d * d;
                *o += lr * d / (crate::sweep::sqrt(*v) + tau);
            }
        }
        ServerOpt::FedYogi | ServerOpt::FedAdam => {
            for (((o, d), m), v) in out
                .iter_mut()
                .zip(mean_delta)
                .zip(state.m.iter_mut())
                .zip(state.v.iter_mut())
            {
                *m = ema(*m, *d);
                // The second moment's input: Δ̄² (Reddi) or m² (OpenFedLLM).
                let sq = if openfedllm { *m * *m } else { d * d };
                *v = if cfg.rule == ServerOpt::FedYogi {
                    *v - (1.0 - b2) * sq * sign(*v - sq)
                } else {
                    b2 * *v + (1.0 - b2) * sq
                };
                *o += lr * *m / (crate::sweep::sqrt(*v) + tau);
            }
        }
    }
    state.steps += 1;
    check_all_finite(&*out)
}

/// `sign` with `sign(0) = 0`, as `torch.sign`.
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// SCAFFOLD's server step for one tensor: `G ← G + λ·Δ̄` into `out`, and
/// `c ← c + (|S|/N_total)·mean_dc` where `mean_dc = mean_i(c_i⁺ − c_i)` over the sampled clients.
#[allow(clippy::too_many_arguments)]
pub fn scaffold_server_update(
    global: TensorView<'_>,
    mean_delta: &[f32],
    server_lr: f32,
    control: &mut [f32],
    mean_control_delta: &[f32],
    sampled: usize,
    total_clients: usize,
    out: &mut [f32],
) -> Result<(), Error> {
    let p = global.len();
    for len in [
        mean_delta.len(),
        control.len(),
        mean_control_delta.len(),
        out.len(),
    ] {
        check_len(p, len)?;
    }
    if sampled == 0 || sampled > total_clients {
        return Err(ErrorKind::BadConfig("sampled clients must be in 1..=total").into());
    }
    check_all_finite(mean_delta)?;
    check_all_finite(mean_control_delta)?;
    let frac = sampled as f32 / total_clients as f32;
    with_view!(global, |g| {
        for ((o, gv), d) in out.iter_mut().zip(g.iter()).zip(mean_delta) {
            *o = gv.to_f32() + server_lr * d;
        }
    });
    for (c, dc) in control.iter_mut().zip(mean_control_delta) {
        *c += frac * dc;
    }
    Ok(())
}

/// SCAFFOLD client: corrects a local gradient in place, `grad += c − c_i`.
pub fn scaffold_correct_gradient(
    grad: &mut [f32],
    control: &[f32],
    client_control: &[f32],
) -> Result<(), Error> {
    check_len(grad.len(), control.len())?;
    check_len(grad.len(), client_control.len())?;
    for ((g, c), ci) in grad.iter_mut().zip(control).zip(client_control) {
        *g += c - ci;
    }
    Ok(())
}

/// SCAFFOLD client after `steps` local steps at rate `lr` (option II of Karimireddy et al.):
/// `c_i⁺ = c_i − c + (G − θ_i)/(K·η)`, written into `client_control` in place.
pub fn scaffold_client_control(
    client_control: &mut [f32],
    control: &[f32],
    global: &[f32],
    local: &[f32],
    steps: usize,
    lr: f32,
) -> Result<(), Error> {
    let p = client_control.len();
    for len in [control.len(), global.len(), local.len()] {
        check_len(p, len)?;
    }
    if steps == 0 || !(lr > 0.0 && lr.is_finite()) {
        return Err(ErrorKind::BadConfig("SCAFFOLD needs steps > 0 and lr > 0").into());
    }
    let inv = 1.0 / (steps as f32 * lr);
    for (((ci, c), g), t) in client_control
        .iter_mut()
        .zip(control)
        .zip(global)
        .zip(local)
    {
        *ci = *ci - c + (g - t) * inv;
    }
    Ok(())
}

/// FedProx: adds the proximal term's gradient `μ(θ − G)` to `grad` and returns the term
/// `(μ/2)·‖θ − G‖²` for the loss.
pub fn fedprox_gradient(
    grad: &mut [f32],
    local: &[f32],
    global: &[f32],
    mu: f32,
) -> Result<f32, Error> {
    check_len(grad.len(), local.len())?;
    check_len(grad.len(), global.len())?;
    if !(mu >= 0.0 && mu.is_finite()) {
        return Err(ErrorKind::BadConfig("FedProx mu must be finite and >= 0").into());
    }
    let mut sq = 0.0f32;
    for ((gr, t), g) in grad.iter_mut().zip(local).zip(global) {
        let d = t - g;
        *gr += mu * d;
        sq += d * d;
    }
    Ok(0.5 * mu * sq)
}
