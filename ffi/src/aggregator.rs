//! The server: the global adapter, the server state, and one round of client updates at a
//! time, aggregated per tensor by the core (`StreamingFedCdd`, `fedcdd_batch`,
//! `MeanAccumulator`, `apply_server_opt`).

use std::collections::HashMap;
use std::fmt::Write as _;

use fedcdd_core::{
    Algorithm, ClientInput, DType, Error as CoreError, Layout, MeanAccumulator, ServerOpt,
    ServerState, StreamingFedCdd, TensorRole, TensorView, apply_server_opt, bf16, f16,
    fedcdd_batch, init_server_state,
};

use crate::arena::Arena;
use crate::error::{FfiError, FfiResult, core_kind, invalid};
use crate::types::*;

/// One tensor of the global adapter, with its server state.
pub(crate) struct GlobalTensor {
    pub name: String,
    pub dims: Vec<usize>,
    /// The dtype the caller declared: the new global is rounded to it.
    pub dtype: DType,
    pub layout: Layout,
    /// Values in f32 (exact for every dtype).
    pub data: Vec<f32>,
    /// Whether the rule aggregates it (FFA-LoRA and FedSA-LoRA leave some tensors alone).
    pub aggregated: bool,
    /// First and second server moments, once the rule has taken a step (or state was loaded).
    pub m: Option<Vec<f32>>,
    pub v: Option<Vec<f32>>,
}

/// A FedCDD / FedOpt aggregator (opaque to C). Create it with `fedcdd_aggregator_new`, free
/// it with `fedcdd_aggregator_free`. Not thread-safe: use one handle from one thread at a time.
pub struct fedcdd_aggregator {
    pub(crate) settings: Settings,
    pub(crate) globals: Vec<GlobalTensor>,
    by_name: HashMap<String, usize>,
    /// Indices (into `globals`) of the aggregated tensors.
    slots: Vec<usize>,
    /// Server steps taken (finalised rounds, plus those of a loaded state).
    pub(crate) steps: u64,
    round: Option<Round>,
    /// Set while a call works on the handle; still set on entry means a call panicked half way.
    busy: bool,
}

struct ClientEntry {
    id: u32,
    samples: f32,
    fingerprint: u64,
    seen_in_pass2: bool,
}

enum Engine {
    /// Streaming FedCDD: one two-pass aggregator per slot.
    Cdd(Vec<StreamingFedCdd<'static, 'static>>),
    /// Streaming FedAvg family: one running weighted sum per slot.
    Mean(Vec<MeanAccumulator<'static>>),
    /// Batch: every client's updates, per client then per slot.
    Batch(Vec<Vec<Vec<f32>>>),
}

/// The clients of the round in progress.
struct Round {
    // `engine` borrows from `_arenas`, so it is declared (and dropped) first.
    engine: Engine,
    _arenas: Vec<Arena<f32>>,
    clients: Vec<ClientEntry>,
    by_id: HashMap<u32, usize>,
    pass2: bool,
    /// Why the round can no longer be finalised (a client was accumulated for some tensors
    /// and rejected for a later one).
    broken: Option<String>,
}

/// A cheap fingerprint of a client's values, to notice a client that changed between the
/// two passes.
fn fingerprint(views: &[TensorView<'_>]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut mix = |bits: u64| h = (h ^ bits).wrapping_mul(0x0000_0100_0000_01b3);
    for v in views {
        match v {
            TensorView::F32(s) => s.iter().for_each(|x| mix(x.to_bits() as u64)),
            TensorView::F16(s) => s.iter().for_each(|x| mix(x.to_bits() as u64)),
            TensorView::BF16(s) => s.iter().for_each(|x| mix(x.to_bits() as u64)),
        }
    }
    h
}

/// A view's values in f32 (exact for every dtype).
fn to_f32_vec(v: &TensorView<'_>) -> Vec<f32> {
    match v {
        TensorView::F32(s) => s.to_vec(),
        TensorView::F16(s) => s.iter().map(|x| x.to_f32()).collect(),
        TensorView::BF16(s) => s.iter().map(|x| x.to_f32()).collect(),
    }
}

/// `x` rounded to what `dtype` holds.
fn round_to(dtype: DType, x: &mut [f32]) {
    match dtype {
        DType::F32 => {}
        DType::F16 => x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
        DType::BF16 => x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32()),
    }
}

fn shape_err(message: String) -> FfiError {
    FfiError::new(FEDCDD_ERR_SHAPE, message)
}

fn name_err(message: String) -> FfiError {
    FfiError::new(FEDCDD_ERR_TENSOR_NAME, message)
}

fn order_err(message: impl Into<String>) -> FfiError {
    FfiError::new(FEDCDD_ERR_CALL_ORDER, message)
}

impl fedcdd_aggregator {
    pub(crate) fn new(settings: Settings) -> fedcdd_aggregator {
        fedcdd_aggregator {
            settings,
            globals: Vec::new(),
            by_name: HashMap::new(),
            slots: Vec::new(),
            steps: 0,
            round: None,
            busy: false,
        }
    }

    /// Runs `f` on the handle, refusing a handle an earlier call left half way (a panic).
    pub(crate) fn enter<R>(&mut self, f: impl FnOnce(&mut Self) -> FfiResult<R>) -> FfiResult<R> {
        self.check_usable()?;
        self.busy = true;
        let r = f(self);
        self.busy = false;
        r
    }

    pub(crate) fn check_usable(&self) -> FfiResult<()> {
        if self.busy {
            return Err(FfiError::new(
                FEDCDD_ERR_INTERNAL,
                "this aggregator was left inconsistent by an earlier internal error; free it",
            ));
        }
        Ok(())
    }

    /// Rounds FedCDD needs twice per client (streaming FedCDD) or once.
    pub(crate) fn passes(&self) -> usize {
        match (self.settings.mode, self.settings.algorithm) {
            (Mode::Streaming, Algorithm::FedCdd) => 2,
            _ => 1,
        }
    }

    pub(crate) fn global(&self, name: &str) -> FfiResult<&GlobalTensor> {
        self.by_name
            .get(name)
            .map(|&i| &self.globals[i])
            .ok_or_else(|| name_err(format!("\"{name}\" is not a global tensor")))
    }

    pub(crate) fn global_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Replaces the global adapter. Server state is kept for tensors of the same name and size.
    pub(crate) fn set_global(&mut self, tensors: Vec<TensorIn<'_>>) -> FfiResult<()> {
        if self.round.is_some() {
            return Err(order_err(
                "a round is in progress: finalise or reset it before setting the global tensors",
            ));
        }
        if tensors.is_empty() {
            return Err(invalid("the global adapter needs at least one tensor"));
        }
        let alg = self.settings.algorithm;
        let mut globals = Vec::with_capacity(tensors.len());
        let mut by_name = HashMap::with_capacity(tensors.len());
        for t in tensors {
            let at = format!("global tensor \"{}\"", t.name);
            if by_name.insert(t.name.to_string(), globals.len()).is_some() {
                return Err(name_err(format!("{at} appears twice")));
            }
            if let Some(i) = t.first_non_finite() {
                return Err(FfiError::new(
                    FEDCDD_ERR_NON_FINITE,
                    format!("{at}: value is NaN or infinite (element {i})"),
                ));
            }
            let role = TensorRole::from_name(t.name);
            let layout = Layout::from_dims(&t.dims, role).map_err(|e| core_kind(e).context(&at))?;
            let data = t.to_f32();
            // Keep the state of a tensor that is still there, with the same size.
            let old = self
                .by_name
                .get(t.name)
                .map(|&i| &mut self.globals[i])
                .filter(|g| g.layout.len() == layout.len());
            let (m, v) = match old {
                Some(g) => (g.m.take(), g.v.take()),
                None => (None, None),
            };
            globals.push(GlobalTensor {
                name: t.name.to_string(),
                dims: t.dims.clone(),
                dtype: t.dtype,
                layout,
                data,
                aggregated: alg.aggregates(role),
                m,
                v,
            });
        }
        let slots: Vec<usize> = (0..globals.len())
            .filter(|&i| globals[i].aggregated)
            .collect();
        if slots.is_empty() {
            return Err(name_err(format!(
                "no global tensor is aggregated by {} (FFA-LoRA aggregates only lora_B tensors, \
                 FedSA-LoRA only lora_A: their names end in lora_B.weight / lora_A.weight)",
                alg.name()
            )));
        }
        self.globals = globals;
        self.by_name = by_name;
        self.slots = slots;
        Ok(())
    }

    fn require_global(&self) -> FfiResult<()> {
        if self.slots.is_empty() {
            return Err(order_err(
                "no global tensors yet: call fedcdd_aggregator_set_global first",
            ));
        }
        Ok(())
    }

    /// A core error of slot `k`, naming the client and the tensor.
    fn slot_err(&self, e: CoreError, k: usize) -> FfiError {
        let tensor = &self.globals[self.slots[k]].name;
        let mut who = String::new();
        if let Some(c) = e.client {
            let _ = write!(who, "client {c}: ");
        }
        let _ = write!(who, "tensor \"{tensor}\"");
        core_kind(e).context(who)
    }

    fn new_round(&self) -> FfiResult<Round> {
        let s = &self.settings;
        let mut arenas = Vec::new();
        let engine = match (s.mode, s.algorithm) {
            (Mode::Batch, _) => Engine::Batch(Vec::new()),
            (Mode::Streaming, Algorithm::FedCdd) => {
                let mut aggs = Vec::with_capacity(self.slots.len());
                for (k, &gi) in self.slots.iter().enumerate() {
                    let g = &self.globals[gi];
                    let len = StreamingFedCdd::workspace_len(&s.fedcdd, &g.layout);
                    // SAFETY: the lent slices only live inside `aggs`, which the Round keeps
                    // in a field dropped before `_arenas`.
                    let (a1, ws) = unsafe { Arena::lend(vec![0.0f32; len]) };
                    let (a2, global) = unsafe { Arena::lend(g.data.clone()) };
                    arenas.push(a1);
                    arenas.push(a2);
                    let global: &'static [f32] = global;
                    aggs.push(
                        StreamingFedCdd::new(s.fedcdd, g.layout, TensorView::F32(global), ws)
                            .map_err(|e| self.slot_err(e, k))?,
                    );
                }
                Engine::Cdd(aggs)
            }
            (Mode::Streaming, _) => {
                let mut accs = Vec::with_capacity(self.slots.len());
                for (k, &gi) in self.slots.iter().enumerate() {
                    let p = self.globals[gi].layout.len();
                    // SAFETY: as above.
                    let (a, buf) =
                        unsafe { Arena::lend(vec![0.0f32; MeanAccumulator::buffer_len(p)]) };
                    arenas.push(a);
                    accs.push(MeanAccumulator::new(p, buf).map_err(|e| self.slot_err(e, k))?);
                }
                Engine::Mean(accs)
            }
        };
        Ok(Round {
            engine,
            _arenas: arenas,
            clients: Vec::new(),
            by_id: HashMap::new(),
            pass2: false,
            broken: None,
        })
    }

    /// Adds a client given as caller tensors (`Δ_i` per tensor).
    pub(crate) fn add_client(
        &mut self,
        id: u32,
        samples: f64,
        tensors: Vec<TensorIn<'_>>,
    ) -> FfiResult<()> {
        self.require_global()?;
        let who = format!("client {id}");
        let mut views: Vec<Option<TensorView<'_>>> = vec![None; self.globals.len()];
        for t in &tensors {
            let gi = self.global_index(t.name).ok_or_else(|| {
                name_err(format!(
                    "{who}: tensor \"{}\" is not a global tensor",
                    t.name
                ))
            })?;
            let g = &self.globals[gi];
            if views[gi].is_some() {
                return Err(name_err(format!(
                    "{who}: tensor \"{}\" appears twice",
                    t.name
                )));
            }
            if t.dims != g.dims {
                return Err(shape_err(format!(
                    "{who}: tensor \"{}\" has shape {:?}, the global tensor has {:?}",
                    t.name, t.dims, g.dims
                )));
            }
            if g.aggregated
                && let Some(i) = t.first_non_finite()
            {
                return Err(FfiError::new(
                    FEDCDD_ERR_NON_FINITE,
                    format!(
                        "{who}: tensor \"{}\": value is NaN or infinite (element {i})",
                        t.name
                    ),
                ));
            }
            views[gi] = Some(t.values.view());
        }
        let views = self.slot_views(&views, &who)?;
        self.add_views(id, samples, &views)
    }

    /// Adds a client given as upload bytes; the client id comes from the upload's header,
    /// the sample count too when `samples` is negative.
    pub(crate) fn add_upload(&mut self, bytes: &[u8], samples: f64) -> FfiResult<()> {
        self.require_global()?;
        let upload = crate::upload::parse_upload(bytes)?;
        let h = upload.header;
        let who = format!("client {} (upload)", h.client_id);
        let samples = if samples < 0.0 {
            if h.num_samples == 0 {
                return Err(FfiError::new(
                    FEDCDD_ERR_BAD_WEIGHT,
                    format!(
                        "{who}: the upload carries no sample count (0 in its header); pass num_samples"
                    ),
                ));
            }
            h.num_samples as f64
        } else {
            samples
        };
        let mut decoded: Vec<Option<Vec<f32>>> = vec![None; self.globals.len()];
        let mut present = vec![false; self.globals.len()];
        for rec in upload.records() {
            let rec = rec.map_err(|e| core_kind(e).context(&who))?;
            let at = format!("{who}: tensor \"{}\"", rec.name);
            let gi = self
                .global_index(rec.name)
                .ok_or_else(|| name_err(format!("{at} is not a global tensor")))?;
            let g = &self.globals[gi];
            if std::mem::replace(&mut present[gi], true) {
                return Err(name_err(format!("{at} appears twice")));
            }
            let dims: Vec<usize> = rec.dims.iter().map(|&d| d as usize).collect();
            if dims != g.dims {
                return Err(shape_err(format!(
                    "{at} has shape {dims:?}, the global tensor has {:?}",
                    g.dims
                )));
            }
            if !g.aggregated {
                continue;
            }
            // The shape equals the global's, so this allocation is bounded by the caller's.
            let mut data = vec![0.0f32; g.layout.len()];
            rec.reconstruct(&mut data)
                .map_err(|e| core_kind(e).context(&at))?;
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(FfiError::new(
                    FEDCDD_ERR_NON_FINITE,
                    format!("{at}: value is NaN or infinite (element {i})"),
                ));
            }
            decoded[gi] = Some(data);
        }
        let views: Vec<Option<TensorView<'_>>> = decoded
            .iter()
            .map(|d| d.as_deref().map(TensorView::F32))
            .collect();
        let views = self.slot_views(&views, &who)?;
        self.add_views(h.client_id, samples, &views)
    }

    /// One view per slot; a missing aggregated tensor is an error.
    fn slot_views<'v>(
        &self,
        by_global: &[Option<TensorView<'v>>],
        who: &str,
    ) -> FfiResult<Vec<TensorView<'v>>> {
        self.slots
            .iter()
            .map(|&gi| {
                by_global[gi].ok_or_else(|| {
                    name_err(format!(
                        "{who}: tensor \"{}\" is missing ({} aggregates it)",
                        self.globals[gi].name,
                        self.settings.algorithm.name()
                    ))
                })
            })
            .collect()
    }

    /// Feeds one validated client (one view per slot) to the round.
    fn add_views(&mut self, id: u32, samples: f64, views: &[TensorView<'_>]) -> FfiResult<()> {
        let who = format!("client {id}");
        let n = samples as f32;
        if !(samples >= 0.0 && n.is_finite()) {
            return Err(FfiError::new(
                FEDCDD_ERR_BAD_WEIGHT,
                format!("{who}: num_samples must be finite and >= 0 (got {samples})"),
            ));
        }
        let print = fingerprint(views);
        if self.round.is_none() {
            self.round = Some(self.new_round()?);
        }
        let mode = self.settings.mode;
        let opt = self.settings.opt;
        // Temporarily take the round so errors can borrow `self`.
        let Some(mut round) = self.round.take() else {
            return Err(order_err("internal: no round"));
        };
        let result = self.feed(&mut round, mode, &opt, id, n, print, views);
        self.round = Some(round);
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn feed(
        &self,
        round: &mut Round,
        mode: Mode,
        opt: &fedcdd_core::ServerOptConfig,
        id: u32,
        n: f32,
        print: u64,
        views: &[TensorView<'_>],
    ) -> FfiResult<()> {
        let who = format!("client {id}");
        if let Some(why) = &round.broken {
            return Err(order_err(format!(
                "this round is broken ({why}); call fedcdd_aggregator_reset_round"
            )));
        }
        if !round.pass2 {
            if round.by_id.contains_key(&id) {
                return Err(order_err(format!(
                    "{who} was already added in this round{} (client ids must be unique \
                     within a round)",
                    if mode == Mode::Streaming {
                        " (pass 1)"
                    } else {
                        ""
                    }
                )));
            }
            // Feeds slot by slot. Every value was checked finite, so a core rejection here is
            // rare (a norm overflowing f32); after the first slot it breaks the round.
            let fed = (|| -> Result<(), (usize, CoreError)> {
                match &mut round.engine {
                    Engine::Batch(stored) => stored.push(views.iter().map(to_f32_vec).collect()),
                    Engine::Cdd(aggs) => {
                        for (k, (agg, v)) in aggs.iter_mut().zip(views).enumerate() {
                            agg.pass1(id, n, *v).map_err(|e| (k, e))?;
                        }
                    }
                    Engine::Mean(accs) => {
                        let w = opt.client_weight(n);
                        for (k, (acc, v)) in accs.iter_mut().zip(views).enumerate() {
                            acc.add(id, w, *v).map_err(|e| (k, e))?;
                        }
                    }
                }
                Ok(())
            })();
            if let Err((k, e)) = fed {
                let err = self.slot_err(e, k);
                if k > 0 {
                    round.broken = Some(format!("{who} was rejected after part of it was added"));
                    return Err(err.context("the round is now broken"));
                }
                return Err(err);
            }
            round.by_id.insert(id, round.clients.len());
            round.clients.push(ClientEntry {
                id,
                samples: n,
                fingerprint: print,
                seen_in_pass2: false,
            });
            return Ok(());
        }
        // Pass 2.
        let Some(&ci) = round.by_id.get(&id) else {
            return Err(order_err(format!("{who} was not added in pass 1")));
        };
        let entry = &round.clients[ci];
        if entry.seen_in_pass2 {
            return Err(order_err(format!("{who} was already added in pass 2")));
        }
        if entry.samples != n {
            return Err(order_err(format!(
                "{who}: num_samples is {n} in pass 2 but was {} in pass 1",
                entry.samples
            )));
        }
        if entry.fingerprint != print {
            return Err(order_err(format!(
                "{who}: its tensors changed between pass 1 and pass 2"
            )));
        }
        if let Engine::Cdd(aggs) = &mut round.engine {
            for (k, (agg, v)) in aggs.iter_mut().zip(views).enumerate() {
                if let Err(e) = agg.pass2(id, n, *v) {
                    let err = self.slot_err(e, k);
                    if k > 0 {
                        round.broken = Some(format!("{who} was rejected half way in pass 2"));
                        return Err(err.context("the round is now broken"));
                    }
                    return Err(err);
                }
            }
        }
        round.clients[ci].seen_in_pass2 = true;
        Ok(())
    }

    pub(crate) fn begin_pass2(&mut self) -> FfiResult<()> {
        if self.settings.mode == Mode::Batch {
            return Err(order_err(
                "a batch aggregator takes each client once; pass 2 is for FEDCDD_MODE_STREAMING",
            ));
        }
        let round = match &mut self.round {
            Some(r) if !r.clients.is_empty() => r,
            _ => {
                return Err(FfiError::new(
                    FEDCDD_ERR_NO_CLIENTS,
                    "pass 1 has no client yet",
                ));
            }
        };
        if round.pass2 {
            return Err(order_err("pass 2 has already begun"));
        }
        round.pass2 = true;
        Ok(())
    }

    pub(crate) fn num_clients(&self) -> usize {
        self.round.as_ref().map_or(0, |r| r.clients.len())
    }

    pub(crate) fn reset_round(&mut self) {
        self.round = None;
    }

    /// Checks that the round can be finalised, without consuming it.
    fn check_finalisable(&self) -> FfiResult<()> {
        self.require_global()?;
        let round = match &self.round {
            Some(r) if !r.clients.is_empty() => r,
            _ => {
                return Err(FfiError::new(
                    FEDCDD_ERR_NO_CLIENTS,
                    "no client was added in this round",
                ));
            }
        };
        if let Some(why) = &round.broken {
            return Err(order_err(format!(
                "this round is broken ({why}); call fedcdd_aggregator_reset_round"
            )));
        }
        if self.passes() == 2 && !round.pass2 {
            return Err(order_err(
                "streaming FedCDD reads every client twice: call fedcdd_aggregator_begin_pass2, \
                 add every client again, then finalise",
            ));
        }
        if round.pass2 {
            let missing: Vec<String> = round
                .clients
                .iter()
                .filter(|c| !c.seen_in_pass2)
                .map(|c| c.id.to_string())
                .collect();
            if !missing.is_empty() {
                return Err(order_err(format!(
                    "client(s) {} were added in pass 1 but not in pass 2",
                    missing.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Aggregates the round into the new global adapter and updates the server state. On an
    /// error the round is discarded and the global and the state are unchanged; a call-order
    /// error (a missing pass) leaves the round as it was.
    pub(crate) fn finalize(&mut self) -> FfiResult<()> {
        self.check_finalisable()?;
        let Some(mut round) = self.round.take() else {
            return Err(order_err("internal: no round"));
        };
        let engine = std::mem::replace(&mut round.engine, Engine::Batch(Vec::new()));
        let outcome = self.compute(engine, &round.clients);
        // The engine is consumed; the round (and its arenas) can go.
        drop(round);
        let steps = outcome.map_err(|e| e.context("round discarded"))?;
        for (k, (mut values, m, v)) in steps.into_iter().enumerate() {
            let g = &mut self.globals[self.slots[k]];
            round_to(g.dtype, &mut values);
            g.data = values;
            if m.is_some() {
                g.m = m;
            }
            if v.is_some() {
                g.v = v;
            }
        }
        self.steps += 1;
        Ok(())
    }

    /// Per slot: the new values and the new moments (where the rule keeps them).
    #[allow(clippy::type_complexity)]
    fn compute(
        &self,
        engine: Engine,
        clients: &[ClientEntry],
    ) -> FfiResult<Vec<(Vec<f32>, Option<Vec<f32>>, Option<Vec<f32>>)>> {
        let s = &self.settings;
        let mut results = Vec::with_capacity(self.slots.len());
        match engine {
            Engine::Cdd(aggs) => {
                for (k, agg) in aggs.into_iter().enumerate() {
                    let mut out = vec![0.0f32; self.globals[self.slots[k]].layout.len()];
                    agg.finish(&mut out).map_err(|e| self.slot_err(e, k))?;
                    results.push((out, None, None));
                }
            }
            Engine::Mean(accs) => {
                for (k, acc) in accs.iter().enumerate() {
                    results.push(self.server_step(k, acc)?);
                }
            }
            Engine::Batch(stored) => {
                for (k, &gi) in self.slots.iter().enumerate() {
                    let g = &self.globals[gi];
                    let p = g.layout.len();
                    if s.algorithm == Algorithm::FedCdd {
                        let inputs: Vec<ClientInput<'_>> = clients
                            .iter()
                            .zip(&stored)
                            .map(|(c, x)| ClientInput {
                                id: c.id,
                                samples: c.samples,
                                update: TensorView::F32(&x[k]),
                            })
                            .collect();
                        let mut out = vec![0.0f32; p];
                        fedcdd_batch(
                            &s.fedcdd,
                            g.layout,
                            TensorView::F32(&g.data),
                            &inputs,
                            &mut out,
                        )
                        .map_err(|e| self.slot_err(e, k))?;
                        results.push((out, None, None));
                    } else {
                        let mut buf = vec![0.0f32; MeanAccumulator::buffer_len(p)];
                        let mut acc =
                            MeanAccumulator::new(p, &mut buf).map_err(|e| self.slot_err(e, k))?;
                        for (c, x) in clients.iter().zip(&stored) {
                            acc.add(c.id, s.opt.client_weight(c.samples), TensorView::F32(&x[k]))
                                .map_err(|e| self.slot_err(e, k))?;
                        }
                        results.push(self.server_step(k, &acc)?);
                    }
                }
            }
        }
        Ok(results)
    }

    /// The FedAvg family's server step of slot `k` from its client sum, on copies of the
    /// moments (committed only when every slot succeeded).
    #[allow(clippy::type_complexity)]
    fn server_step(
        &self,
        k: usize,
        acc: &MeanAccumulator<'_>,
    ) -> FfiResult<(Vec<f32>, Option<Vec<f32>>, Option<Vec<f32>>)> {
        let opt = &self.settings.opt;
        let g = &self.globals[self.slots[k]];
        let p = g.layout.len();
        let fail = |e: CoreError| self.slot_err(e, k);
        let mut out = vec![0.0f32; p];
        if opt.rule == ServerOpt::FedAvg {
            acc.apply_fedavg(TensorView::F32(&g.data), opt.server_lr, &mut out)
                .map_err(fail)?;
            return Ok((out, None, None));
        }
        let mut mean = vec![0.0f32; p];
        acc.mean_into(&mut mean).map_err(fail)?;
        let (uses_m, uses_v) = opt.state_slots();
        let fresh = |first: bool| {
            let mut buf = vec![0.0f32; p];
            if first {
                init_server_state(opt, &mut buf, &mut []);
            } else {
                init_server_state(opt, &mut [], &mut buf);
            }
            buf
        };
        let mut m = if uses_m {
            g.m.clone().unwrap_or_else(|| fresh(true))
        } else {
            Vec::new()
        };
        let mut v = if uses_v {
            g.v.clone().unwrap_or_else(|| fresh(false))
        } else {
            Vec::new()
        };
        let mut st = ServerState {
            m: &mut m,
            v: &mut v,
            steps: self.steps,
        };
        apply_server_opt(opt, &mut st, TensorView::F32(&g.data), &mean, &mut out).map_err(fail)?;
        Ok((out, uses_m.then_some(m), uses_v.then_some(v)))
    }

    pub(crate) fn round_open(&self) -> bool {
        self.round.is_some()
    }

    pub(crate) fn slots(&self) -> &[usize] {
        &self.slots
    }
}
