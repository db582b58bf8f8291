//! One server step over whole adapters: every tensor through the core's rule, with the
//! server state (momentum etc.) kept in a safetensors file between rounds.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use fedcdd_core::{
    Algorithm, Error as CoreError, FedCddConfig, FedOptVariant, Layout, MeanAccumulator, ServerOpt,
    ServerOptConfig, ServerState, StreamingFedCdd, TensorView, apply_server_opt, init_server_state,
};

use crate::adapter::{Adapter, Tensor, read_safetensors, write_safetensors};
use crate::update::ClientUpdate;

/// The rule and its switches.
#[derive(Clone, Debug)]
pub struct AggregateOptions {
    pub algorithm: Algorithm,
    pub fedcdd: FedCddConfig,
    /// Used by the FedAvg family (its `rule` is taken from `algorithm`).
    pub opt: ServerOptConfig,
    /// Show which client each pass is at (on stderr).
    pub progress: bool,
}

/// Server state of the stateful rules, per tensor, saved between rounds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerStateStore {
    pub algorithm: String,
    pub variant: String,
    /// Server steps taken so far.
    pub steps: u64,
    pub m: HashMap<String, Vec<f32>>,
    pub v: HashMap<String, Vec<f32>>,
}

const STATE_FORMAT: &str = "fedcdd-server-state";

fn variant_name(v: FedOptVariant) -> &'static str {
    match v {
        FedOptVariant::Reddi => "reddi",
        FedOptVariant::OpenFedLlm => "openfedllm",
    }
}

impl ServerStateStore {
    pub fn new(opts: &AggregateOptions) -> Self {
        ServerStateStore {
            algorithm: opts.algorithm.name().to_string(),
            variant: variant_name(opts.opt.variant).to_string(),
            ..Default::default()
        }
    }

    /// Reads a state file written by [`save`](Self::save); it must belong to the same rule.
    pub fn load(path: &Path, opts: &AggregateOptions) -> Result<Self> {
        let (tensors, meta) = read_safetensors(path)?;
        let get = |k: &str| {
            meta.get(k).cloned().with_context(|| {
                format!(
                    "server state {}: metadata {k:?} is missing (not a fedcdd state file?)",
                    path.display()
                )
            })
        };
        if get("format")? != STATE_FORMAT {
            bail!(
                "server state {}: not a fedcdd server-state file",
                path.display()
            );
        }
        let mut store = ServerStateStore {
            algorithm: get("algorithm")?,
            variant: get("variant")?,
            steps: get("steps")?.parse().with_context(|| {
                format!(
                    "server state {}: metadata \"steps\" is not a number",
                    path.display()
                )
            })?,
            ..Default::default()
        };
        let want = ServerStateStore::new(opts);
        if store.algorithm != want.algorithm || store.variant != want.variant {
            bail!(
                "server state {} belongs to {} ({}), not {} ({}); use another --state file",
                path.display(),
                store.algorithm,
                store.variant,
                want.algorithm,
                want.variant
            );
        }
        for t in tensors {
            match t.name.split_once('/') {
                Some(("m", name)) => store.m.insert(name.to_string(), t.data),
                Some(("v", name)) => store.v.insert(name.to_string(), t.data),
                _ => bail!(
                    "server state {}: unexpected tensor {:?}",
                    path.display(),
                    t.name
                ),
            };
        }
        Ok(store)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for (prefix, map) in [("m", &self.m), ("v", &self.v)] {
            for (name, data) in map {
                tensors.push(Tensor {
                    name: format!("{prefix}/{name}"),
                    dims: vec![data.len()],
                    dtype: fedcdd_core::DType::F32,
                    data: data.clone(),
                });
            }
        }
        let meta = HashMap::from([
            ("format".to_string(), STATE_FORMAT.to_string()),
            ("algorithm".to_string(), self.algorithm.clone()),
            ("variant".to_string(), self.variant.clone()),
            ("steps".to_string(), self.steps.to_string()),
        ]);
        write_safetensors(path, &tensors, Some(meta))
    }
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

/// Hands the server one client's update at a time: FedCDD asks for every client twice (its
/// two passes), the other rules once. So `fedcdd aggregate` holds one client in memory,
/// whatever the number of clients.
pub trait ClientLoader {
    fn count(&self) -> usize;
    /// How errors name client `index`.
    fn label(&self, index: usize) -> String;
    /// Client `index`'s sample count, if known, without loading its whole update.
    fn samples(&mut self, index: usize) -> Result<Option<u64>>;
    fn load(&mut self, index: usize) -> Result<ClientUpdate>;
}

/// Updates already in memory.
impl ClientLoader for &[ClientUpdate] {
    fn count(&self) -> usize {
        self.len()
    }
    fn label(&self, index: usize) -> String {
        self[index].label()
    }
    fn samples(&mut self, index: usize) -> Result<Option<u64>> {
        Ok(self[index].samples)
    }
    fn load(&mut self, index: usize) -> Result<ClientUpdate> {
        Ok(self[index].clone())
    }
}

/// Sample counts as weights: all given, or none (equal weights).
fn sample_weights(counts: &[Option<u64>], label: impl Fn(usize) -> String) -> Result<Vec<f32>> {
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
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for t in &u.deltas {
        for v in &t.data {
            h = (h ^ v.to_bits() as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The update of one aggregated tensor, or an error naming the client.
fn delta<'u>(u: &'u ClientUpdate, name: &str) -> Result<&'u [f32]> {
    u.get(name)
        .map(|t| t.data.as_slice())
        .with_context(|| format!("{}: tensor {name:?} is missing from its update", u.label()))
}

/// Aggregates the clients into a new global adapter (tensors in the global's order and
/// dtypes). Clients are loaded one at a time: memory is the global, one client, and the
/// per-tensor accumulators (2·P floats, FedCDD at most 5·P), whatever the number of clients.
pub fn aggregate(
    global: &Adapter,
    clients: &mut dyn ClientLoader,
    opts: &AggregateOptions,
    state: &mut ServerStateStore,
) -> Result<(Vec<Tensor>, AggregateReport)> {
    let n = clients.count();
    if n == 0 {
        bail!("no clients to aggregate");
    }
    let alg = opts.algorithm;
    match alg {
        Algorithm::Scaffold => bail!(
            "SCAFFOLD's server step also needs the clients' control variates, which adapters and uploads do not carry; it is part of the federated training loop, not of `fedcdd aggregate`"
        ),
        Algorithm::FLora => bail!(
            "FLoRA merges the stacked client adapters into the base model weights; it is part of the federated training loop, not of `fedcdd aggregate`"
        ),
        _ => {}
    }
    let counts = (0..n)
        .map(|i| clients.samples(i))
        .collect::<Result<Vec<_>>>()?;
    let weights = sample_weights(&counts, |i| clients.label(i))?;
    let total: f64 = weights.iter().map(|w| *w as f64).sum();

    // The tensors this rule aggregates, with their layouts.
    let mut slots: Vec<(usize, Layout)> = Vec::new();
    for (gi, g) in global.tensors.iter().enumerate() {
        if alg.aggregates(g.role()) {
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
            "no tensor of {} is aggregated by {}",
            global.path.display(),
            alg.name()
        );
    }
    let name_err = |e: CoreError, gi: usize, labels: &[String]| -> anyhow::Error {
        let tensor = &global.tensors[gi].name;
        match e.client.and_then(|i| labels.get(i as usize)) {
            Some(who) => anyhow::anyhow!("{who}: tensor {tensor:?}: {}", e.kind),
            None => anyhow::anyhow!("tensor {tensor:?}: {}", e.kind),
        }
    };
    let labels: Vec<String> = (0..n).map(|i| clients.label(i)).collect();
    let mut infos = Vec::with_capacity(n);
    let mut record = |u: &ClientUpdate, i: usize| {
        infos.push(ClientInfo {
            label: u.label(),
            source: u.source.clone(),
            client_id: u.client_id,
            samples: counts[i],
            round: u.round,
            bytes: u.bytes,
        })
    };
    let progress = |pass: &str, i: usize| {
        if opts.progress {
            eprint!("\r{pass}: client {}/{n}   ", i + 1);
            if i + 1 == n {
                eprintln!();
            }
        }
    };
    let mut outs: Vec<Vec<f32>> = slots.iter().map(|(_, l)| vec![0.0f32; l.len()]).collect();
    let mut mean_agreement = vec![None; n];
    let mut fallbacks = 0;

    if alg == Algorithm::FedCdd {
        let mut workspaces: Vec<Vec<f32>> = slots
            .iter()
            .map(|(_, l)| vec![0.0f32; StreamingFedCdd::workspace_len(&opts.fedcdd, l)])
            .collect();
        let mut aggs = Vec::with_capacity(slots.len());
        for ((gi, layout), ws) in slots.iter().zip(workspaces.iter_mut()) {
            let g = TensorView::F32(&global.tensors[*gi].data);
            aggs.push(
                StreamingFedCdd::new(opts.fedcdd, *layout, g, ws)
                    .map_err(|e| name_err(e, *gi, &labels))?,
            );
        }
        let mut prints = Vec::with_capacity(n);
        for (i, &w) in weights.iter().enumerate() {
            progress("pass 1", i);
            let u = clients.load(i)?;
            for ((gi, _), agg) in slots.iter().zip(aggs.iter_mut()) {
                let x = delta(&u, &global.tensors[*gi].name)?;
                agg.pass1(i as u32, w, TensorView::F32(x))
                    .map_err(|e| name_err(e, *gi, &labels))?;
            }
            prints.push(fingerprint(&u));
            record(&u, i);
        }
        let mut agreement_sums = vec![0.0f32; n];
        for (i, (&w, &print)) in weights.iter().zip(&prints).enumerate() {
            progress("pass 2", i);
            let u = clients.load(i)?;
            if fingerprint(&u) != print {
                bail!(
                    "{}: its update changed between the two passes over the clients",
                    u.label()
                );
            }
            for ((gi, _), agg) in slots.iter().zip(aggs.iter_mut()) {
                let x = delta(&u, &global.tensors[*gi].name)?;
                let a = agg
                    .pass2(i as u32, w, TensorView::F32(x))
                    .map_err(|e| name_err(e, *gi, &labels))?;
                agreement_sums[i] += a.v;
            }
        }
        for ((agg, (gi, _)), out) in aggs.into_iter().zip(&slots).zip(outs.iter_mut()) {
            let summary = agg.finish(out).map_err(|e| name_err(e, *gi, &labels))?;
            fallbacks += summary.fell_back as usize;
        }
        let k = slots.len() as f32;
        mean_agreement = agreement_sums.iter().map(|s| Some(s / k)).collect();
    } else {
        let mut cfg = opts.opt;
        cfg.rule = alg
            .server_opt()
            .context("algorithm has no server optimiser")?;
        let mut bufs: Vec<Vec<f32>> = slots
            .iter()
            .map(|(_, l)| vec![0.0f32; MeanAccumulator::buffer_len(l.len())])
            .collect();
        let mut accs = Vec::with_capacity(slots.len());
        for ((gi, layout), buf) in slots.iter().zip(bufs.iter_mut()) {
            accs.push(
                MeanAccumulator::new(layout.len(), buf).map_err(|e| name_err(e, *gi, &labels))?,
            );
        }
        for (i, &w) in weights.iter().enumerate() {
            progress("clients", i);
            let u = clients.load(i)?;
            for ((gi, _), acc) in slots.iter().zip(accs.iter_mut()) {
                let x = delta(&u, &global.tensors[*gi].name)?;
                acc.add(i as u32, cfg.client_weight(w), TensorView::F32(x))
                    .map_err(|e| name_err(e, *gi, &labels))?;
            }
            record(&u, i);
        }
        for ((acc, (gi, layout)), out) in accs.iter().zip(&slots).zip(outs.iter_mut()) {
            let g = &global.tensors[*gi];
            let fail = |e: CoreError| name_err(e, *gi, &labels);
            if cfg.rule == ServerOpt::FedAvg {
                // Stateless: straight from the sum.
                acc.apply_fedavg(TensorView::F32(&g.data), cfg.server_lr, out)
                    .map_err(fail)?;
                continue;
            }
            let mut mean = vec![0.0f32; layout.len()];
            acc.mean_into(&mut mean).map_err(fail)?;
            let (uses_m, uses_v) = cfg.state_slots();
            // A moment missing from the state starts fresh (m = 0, v = τ²); only then is one built.
            let fresh = |first: bool| {
                let mut buf = vec![0.0f32; layout.len()];
                if first {
                    init_server_state(&cfg, &mut buf, &mut []);
                } else {
                    init_server_state(&cfg, &mut [], &mut buf);
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
                if !buf.is_empty() && buf.len() != layout.len() {
                    bail!(
                        "server state: {what} of tensor {:?} has {} values, the tensor {}",
                        g.name,
                        buf.len(),
                        layout.len()
                    );
                }
            }
            let mut st = ServerState {
                m: &mut m,
                v: &mut v,
                steps: state.steps,
            };
            apply_server_opt(&cfg, &mut st, TensorView::F32(&g.data), &mean, out).map_err(fail)?;
            if uses_m {
                state.m.insert(g.name.clone(), m);
            }
            if uses_v {
                state.v.insert(g.name.clone(), v);
            }
        }
    }

    // Assemble the new adapter: aggregated tensors from `outs`, the others kept.
    let mut outs = outs.into_iter();
    let mut next_slot = slots.iter().map(|(gi, _)| *gi).peekable();
    let mut tensors = Vec::with_capacity(global.tensors.len());
    for (gi, g) in global.tensors.iter().enumerate() {
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
    state.steps += 1;
    let report = AggregateReport {
        clients: infos,
        sample_weights: weights.iter().map(|w| *w as f64 / total).collect(),
        mean_agreement,
        tensors_aggregated: slots.len(),
        tensors_kept: global.tensors.len() - slots.len(),
        fallbacks,
    };
    Ok((tensors, report))
}
