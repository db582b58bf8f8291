//! One server step over whole adapters: every aggregated tensor through the core's rules,
//! streamed one client at a time. FedCDD (two passes) and the mean family (FedAvg, FedOpt,
//! SCAFFOLD's model step), each over the tensors a strategy says its clients send.

use anyhow::{Context, Result, bail};
use fedcdd_core::{
    Algorithm, Error as CoreError, FedCddConfig, Layout, MeanAccumulator, ServerOpt,
    ServerOptConfig, ServerState, StreamingFedCdd, TensorRole, TensorView, apply_server_opt,
    init_server_state,
};

use crate::io::{Adapter, Tensor};
use crate::progress::Progress;
use crate::rng::Fnv1a;
use crate::upload::ClientUpdate;

use super::clients::ClientLoader;
use super::state::ServerStateStore;

/// A new global adapter (the global's tensors, order and dtypes) and what the step did.
pub struct Aggregated {
    pub tensors: Vec<Tensor>,
    pub report: AggregateReport,
}

/// What one aggregation did, for the report.
#[derive(Clone, Debug, Default)]
pub struct AggregateReport {
    /// Per client, in order: who it was and what it sent.
    pub clients: Vec<ClientInfo>,
    /// Normalised sample weights `p_i`, per client.
    pub sample_weights: Vec<f64>,
    /// FedCDD only: mean over tensors of each client's agreement `v_i`.
    pub mean_agreement: Vec<Option<f32>>,
    pub tensors_aggregated: usize,
    pub tensors_kept: usize,
    /// FedCDD only: tensors whose agreement weights fell back to `p_i`.
    pub fallbacks: usize,
}

/// One client as the report shows it.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    pub label: String,
    pub source: std::path::PathBuf,
    pub client_id: u32,
    pub samples: Option<u64>,
    pub round: Option<u32>,
    pub bytes: usize,
}

/// Sample counts as weights: all given, or none (equal weights).
pub fn sample_weights(counts: &[Option<u64>], label: impl Fn(usize) -> String) -> Result<Vec<f32>> {
    let given = counts.iter().filter(|c| c.is_some()).count();
    if given == 0 {
        return Ok(vec![1.0; counts.len()]);
    }
    if given != counts.len() {
        let missing: Vec<String> = (0..counts.len())
            .filter(|&i| counts[i].is_none())
            .map(&label)
            .collect();
        bail!(
            "sample counts are given for some clients but not for {}: give PATH:N for every client or for none",
            missing.join(", ")
        );
    }
    let w: Vec<f32> = counts.iter().map(|c| c.unwrap_or(0) as f32).collect();
    if w.iter().sum::<f32>() <= 0.0 {
        bail!("the clients' sample counts sum to zero");
    }
    Ok(w)
}

/// A cheap fingerprint of an update's values, to notice a client file that changed between
/// FedCDD's two passes.
fn fingerprint(u: &ClientUpdate) -> u64 {
    let mut h = Fnv1a::new();
    for t in &u.deltas {
        for v in &t.data {
            h.word(v.to_bits() as u64);
        }
    }
    h.finish()
}

/// The update of one aggregated tensor, or an error naming the client.
fn delta<'u>(u: &'u ClientUpdate, name: &str) -> Result<&'u [f32]> {
    u.get(name)
        .map(|t| t.data.as_slice())
        .with_context(|| format!("{}: tensor {name:?} is missing from its update", u.label()))
}

/// What every rule needs first: the clients' weights, and the tensors it aggregates.
struct Round<'g> {
    global: &'g Adapter,
    n: usize,
    counts: Vec<Option<u64>>,
    weights: Vec<f32>,
    labels: Vec<String>,
    /// (index in the global, layout) of every aggregated tensor.
    slots: Vec<(usize, Layout)>,
    infos: Vec<ClientInfo>,
    bar: Progress,
}

impl<'g> Round<'g> {
    fn new(
        global: &'g Adapter,
        clients: &mut dyn ClientLoader,
        sends: &dyn Fn(TensorRole) -> bool,
        rule: &str,
        progress: bool,
    ) -> Result<Self> {
        let n = clients.count();
        if n == 0 {
            bail!("no clients to aggregate");
        }
        let counts = (0..n)
            .map(|i| clients.samples(i))
            .collect::<Result<Vec<_>>>()?;
        let weights = sample_weights(&counts, |i| clients.label(i))?;
        let mut slots: Vec<(usize, Layout)> = Vec::new();
        for (gi, g) in global.tensors.iter().enumerate() {
            if sends(g.role()) {
                let layout = Layout::from_dims(&g.dims, g.role()).map_err(|e| {
                    anyhow::anyhow!(
                        "global adapter {}: tensor {:?}: {e}",
                        global.path.display(),
                        g.name
                    )
                })?;
                slots.push((gi, layout));
            }
        }
        if slots.is_empty() {
            bail!(
                "no tensor of {} is aggregated by {rule}",
                global.path.display()
            );
        }
        Ok(Round {
            global,
            n,
            labels: (0..n).map(|i| clients.label(i)).collect(),
            counts,
            weights,
            slots,
            infos: Vec::with_capacity(n),
            bar: Progress::shown(progress),
        })
    }

    /// A core error, named by client (where it is about one) and tensor.
    fn err(&self, e: CoreError, gi: usize) -> anyhow::Error {
        let tensor = &self.global.tensors[gi].name;
        match e.client.and_then(|i| self.labels.get(i as usize)) {
            Some(who) => anyhow::anyhow!("{who}: tensor {tensor:?}: {}", e.kind),
            None => anyhow::anyhow!("tensor {tensor:?}: {}", e.kind),
        }
    }

    fn record(&mut self, u: &ClientUpdate, i: usize) {
        self.infos.push(ClientInfo {
            label: u.label(),
            source: u.source.clone(),
            client_id: u.client_id,
            samples: self.counts[i],
            round: u.round,
            bytes: u.bytes,
        });
    }

    fn outputs(&self) -> Vec<Vec<f32>> {
        self.slots
            .iter()
            .map(|(_, l)| vec![0.0f32; l.len()])
            .collect()
    }

    /// The new adapter: aggregated tensors from `outs`, the others kept, and the report.
    fn finish(
        self,
        outs: Vec<Vec<f32>>,
        mean_agreement: Vec<Option<f32>>,
        fallbacks: usize,
    ) -> Result<Aggregated> {
        self.bar.finish();
        let mut outs = outs.into_iter();
        let mut next_slot = self.slots.iter().map(|(gi, _)| *gi).peekable();
        let mut tensors = Vec::with_capacity(self.global.tensors.len());
        for (gi, g) in self.global.tensors.iter().enumerate() {
            if next_slot.peek() == Some(&gi) {
                next_slot.next();
                let data = outs
                    .next()
                    .context("internal: one output per aggregated tensor")?;
                tensors.push(Tensor { data, ..g.clone() });
            } else {
                tensors.push(g.clone());
            }
        }
        let total: f64 = self.weights.iter().map(|w| *w as f64).sum();
        let report = AggregateReport {
            clients: self.infos,
            sample_weights: self.weights.iter().map(|w| *w as f64 / total).collect(),
            mean_agreement: if mean_agreement.is_empty() {
                vec![None; self.n]
            } else {
                mean_agreement
            },
            tensors_aggregated: self.slots.len(),
            tensors_kept: self.global.tensors.len() - self.slots.len(),
            fallbacks,
        };
        Ok(Aggregated { tensors, report })
    }
}

/// FedCDD's server step (the core's two-pass streaming form) over the tensors `sends`
/// selects. Memory: the global, one client, and at most 5·P + 3·G floats per tensor.
pub fn aggregate_fedcdd(
    global: &Adapter,
    clients: &mut dyn ClientLoader,
    cfg: &FedCddConfig,
    sends: &dyn Fn(TensorRole) -> bool,
    progress: bool,
) -> Result<Aggregated> {
    let mut r = Round::new(global, clients, sends, Algorithm::FedCdd.name(), progress)?;
    let n = r.n;
    let mut workspaces: Vec<Vec<f32>> = r
        .slots
        .iter()
        .map(|(_, l)| vec![0.0f32; StreamingFedCdd::workspace_len(cfg, l)])
        .collect();
    let mut aggs = Vec::with_capacity(r.slots.len());
    for ((gi, layout), ws) in r.slots.iter().zip(workspaces.iter_mut()) {
        let g = TensorView::F32(&global.tensors[*gi].data);
        aggs.push(StreamingFedCdd::new(*cfg, *layout, g, ws).map_err(|e| r.err(e, *gi))?);
    }
    let mut prints = Vec::with_capacity(n);
    for i in 0..n {
        r.bar.update(i + 1, n, "pass 1 over the clients");
        let u = clients.load(i)?;
        for ((gi, _), agg) in r.slots.iter().zip(aggs.iter_mut()) {
            let x = delta(&u, &global.tensors[*gi].name)?;
            agg.pass1(i as u32, r.weights[i], TensorView::F32(x))
                .map_err(|e| r.err(e, *gi))?;
        }
        prints.push(fingerprint(&u));
        r.record(&u, i);
    }
    let mut agreement_sums = vec![0.0f32; n];
    for (i, &print) in prints.iter().enumerate() {
        r.bar.update(i + 1, n, "pass 2 over the clients");
        let u = clients.load(i)?;
        if fingerprint(&u) != print {
            bail!(
                "{}: its update changed between the two passes over the clients",
                u.label()
            );
        }
        for ((gi, _), agg) in r.slots.iter().zip(aggs.iter_mut()) {
            let x = delta(&u, &global.tensors[*gi].name)?;
            let a = agg
                .pass2(i as u32, r.weights[i], TensorView::F32(x))
                .map_err(|e| r.err(e, *gi))?;
            agreement_sums[i] += a.v;
        }
    }
    let mut outs = r.outputs();
    let mut fallbacks = 0;
    for ((agg, (gi, _)), out) in aggs.into_iter().zip(&r.slots).zip(outs.iter_mut()) {
        let summary = agg.finish(out).map_err(|e| r.err(e, *gi))?;
        fallbacks += summary.fell_back as usize;
    }
    let k = r.slots.len() as f32;
    let agreement = agreement_sums.iter().map(|s| Some(s / k)).collect();
    r.finish(outs, agreement, fallbacks)
}

/// One aggregated tensor's server step from the weighted sum of its client updates: writes
/// the new global tensor into `out`.
pub type MeanStep<'f> = dyn FnMut(&Tensor, &MeanAccumulator, &mut [f32]) -> Result<()> + 'f;

/// The mean family's server step: the weighted sum of the clients' updates of every tensor
/// `sends` selects (client weights through `client_weight`), then `step` per tensor. Memory:
/// the global, one client, and 2·P floats per tensor.
pub fn aggregate_mean(
    global: &Adapter,
    clients: &mut dyn ClientLoader,
    sends: &dyn Fn(TensorRole) -> bool,
    client_weight: &dyn Fn(f32) -> f32,
    rule: &str,
    progress: bool,
    step: &mut MeanStep<'_>,
) -> Result<Aggregated> {
    let mut r = Round::new(global, clients, sends, rule, progress)?;
    let n = r.n;
    let mut bufs: Vec<Vec<f32>> = r
        .slots
        .iter()
        .map(|(_, l)| vec![0.0f32; MeanAccumulator::buffer_len(l.len())])
        .collect();
    let mut accs = Vec::with_capacity(r.slots.len());
    for ((gi, layout), buf) in r.slots.iter().zip(bufs.iter_mut()) {
        accs.push(MeanAccumulator::new(layout.len(), buf).map_err(|e| r.err(e, *gi))?);
    }
    for i in 0..n {
        r.bar.update(i + 1, n, "clients");
        let u = clients.load(i)?;
        for ((gi, _), acc) in r.slots.iter().zip(accs.iter_mut()) {
            let x = delta(&u, &global.tensors[*gi].name)?;
            acc.add(i as u32, client_weight(r.weights[i]), TensorView::F32(x))
                .map_err(|e| r.err(e, *gi))?;
        }
        r.record(&u, i);
    }
    let mut outs = r.outputs();
    for ((acc, (gi, _)), out) in accs.iter().zip(&r.slots).zip(outs.iter_mut()) {
        step(&global.tensors[*gi], acc, out)?;
    }
    r.finish(outs, Vec::new(), 0)
}

/// A core error about one tensor of the global adapter.
pub fn tensor_err(name: &str) -> impl Fn(CoreError) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("tensor {name:?}: {}", e.kind)
}

/// The FedAvg/FedOpt step of `cfg.rule` for one tensor, with its moments in `state`
/// (a moment missing from the state starts fresh: m = 0, v = τ²).
pub fn server_opt_step(
    cfg: &ServerOptConfig,
    state: &mut ServerStateStore,
    g: &Tensor,
    acc: &MeanAccumulator,
    out: &mut [f32],
) -> Result<()> {
    let fail = tensor_err(&g.name);
    if cfg.rule == ServerOpt::FedAvg {
        // Stateless: straight from the sum.
        return acc
            .apply_fedavg(TensorView::F32(&g.data), cfg.server_lr, out)
            .map_err(fail);
    }
    let len = g.data.len();
    let mut mean = vec![0.0f32; len];
    acc.mean_into(&mut mean).map_err(&fail)?;
    let (uses_m, uses_v) = cfg.state_slots();
    let fresh = |first: bool| {
        let mut buf = vec![0.0f32; len];
        if first {
            init_server_state(cfg, &mut buf, &mut []);
        } else {
            init_server_state(cfg, &mut [], &mut buf);
        }
        buf
    };
    let mut m = if uses_m {
        state.m.remove(&g.name).unwrap_or_else(|| fresh(true))
    } else {
        Vec::new()
    };
    let mut v = if uses_v {
        state.v.remove(&g.name).unwrap_or_else(|| fresh(false))
    } else {
        Vec::new()
    };
    for (what, buf) in [("m", &m), ("v", &v)] {
        if !buf.is_empty() && buf.len() != len {
            bail!(
                "server state: {what} of tensor {:?} has {} values, the tensor {len}",
                g.name,
                buf.len(),
            );
        }
    }
    let mut st = ServerState {
        m: &mut m,
        v: &mut v,
        steps: state.steps,
    };
    apply_server_opt(cfg, &mut st, TensorView::F32(&g.data), &mean, out).map_err(fail)?;
    if uses_m {
        state.m.insert(g.name.clone(), m);
    }
    if uses_v {
        state.v.insert(g.name.clone(), v);
    }
    Ok(())
}
