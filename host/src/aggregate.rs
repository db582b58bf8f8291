//! One server step over whole adapters: every tensor through the core's rule, with the
//! server state (momentum etc.) kept in a safetensors file between rounds.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use fedcdd_core::{
    Algorithm, ClientView, Error as CoreError, FedCddConfig, FedOptVariant, Layout,
    MeanAccumulator, ServerOptConfig, ServerState, StreamingFedCdd, TensorView, apply_server_opt,
    init_server_state,
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
    /// Normalised sample weights `p_i`, per client.
    pub sample_weights: Vec<f64>,
    /// FedCDD only: mean over tensors of each client's agreement `v_i`.
    pub mean_agreement: Vec<Option<f32>>,
    pub tensors_aggregated: usize,
    pub tensors_kept: usize,
    /// FedCDD only: tensors whose agreement weights fell back to `p_i`.
    pub fallbacks: usize,
}

/// Sample counts as weights: all given, or none (equal weights).
pub fn sample_weights(clients: &[ClientUpdate]) -> Result<Vec<f32>> {
    let given = clients.iter().filter(|c| c.samples.is_some()).count();
    if given == 0 {
        return Ok(vec![1.0; clients.len()]);
    }
    if given != clients.len() {
        let missing: Vec<String> = clients
            .iter()
            .filter(|c| c.samples.is_none())
            .map(|c| c.label())
            .collect();
        bail!(
            "sample counts are given for some clients but not for {}: give PATH:N for every client or for none",
            missing.join(", ")
        );
    }
    let w: Vec<f32> = clients
        .iter()
        .map(|c| c.samples.unwrap_or(0) as f32)
        .collect();
    if w.iter().sum::<f32>() <= 0.0 {
        bail!("the clients' sample counts sum to zero");
    }
    Ok(w)
}

/// Aggregates `clients` into a new global adapter (tensors in the global's order and dtypes).
pub fn aggregate(
    global: &Adapter,
    clients: &[ClientUpdate],
    opts: &AggregateOptions,
    state: &mut ServerStateStore,
) -> Result<(Vec<Tensor>, AggregateReport)> {
    if clients.is_empty() {
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
    let weights = sample_weights(clients)?;
    let total: f64 = weights.iter().map(|w| *w as f64).sum();
    let mut report = AggregateReport {
        sample_weights: weights.iter().map(|w| *w as f64 / total).collect(),
        mean_agreement: vec![None; clients.len()],
        ..Default::default()
    };
    let mut agreement_sums = vec![0.0f32; clients.len()];
    let mut out_tensors = Vec::with_capacity(global.tensors.len());
    for g in &global.tensors {
        if !alg.aggregates(g.role()) {
            out_tensors.push(g.clone());
            report.tensors_kept += 1;
            continue;
        }
        let mut inputs: Vec<&[f32]> = Vec::with_capacity(clients.len());
        for c in clients {
            let d = c.get(&g.name).with_context(|| {
                format!(
                    "{}: tensor {:?} is missing from its update",
                    c.label(),
                    g.name
                )
            })?;
            inputs.push(&d.data);
        }
        let layout = Layout::from_dims(&g.dims, g.role()).map_err(|e| {
            anyhow::anyhow!(
                "global adapter {}: tensor {:?}: {e}",
                global.path.display(),
                g.name
            )
        })?;
        let name_err = |e: CoreError| -> anyhow::Error {
            match e.client {
                Some(i) => anyhow::anyhow!(
                    "{}: tensor {:?}: {}",
                    clients[i as usize].label(),
                    g.name,
                    e.kind
                ),
                None => anyhow::anyhow!("tensor {:?}: {}", g.name, e.kind),
            }
        };
        let mut new = vec![0.0f32; layout.len()];
        if alg == Algorithm::FedCdd {
            let mut ws = vec![0.0f32; StreamingFedCdd::workspace_len(&opts.fedcdd, &layout)];
            let mut agg =
                StreamingFedCdd::new(opts.fedcdd, layout, TensorView::F32(&g.data), &mut ws)
                    .map_err(name_err)?;
            for (i, (x, w)) in inputs.iter().zip(&weights).enumerate() {
                agg.pass1(i as u32, *w, TensorView::F32(x))
                    .map_err(name_err)?;
            }
            for (i, (x, w)) in inputs.iter().zip(&weights).enumerate() {
                agreement_sums[i] += agg
                    .pass2(i as u32, *w, TensorView::F32(x))
                    .map_err(name_err)?
                    .v;
            }
            let summary = agg.finish(&mut new).map_err(name_err)?;
            report.fallbacks += summary.fell_back as usize;
        } else {
            let mut cfg = opts.opt;
            cfg.rule = alg
                .server_opt()
                .context("algorithm has no server optimiser")?;
            let mut acc_buf = vec![0.0f32; MeanAccumulator::buffer_len(layout.len())];
            let mut acc = MeanAccumulator::new(layout.len(), &mut acc_buf).map_err(name_err)?;
            let views: Vec<ClientView<'_>> = inputs
                .iter()
                .zip(&weights)
                .enumerate()
                .map(|(i, (x, w))| ClientView {
                    id: i as u32,
                    weight: cfg.client_weight(*w),
                    values: TensorView::F32(x),
                })
                .collect();
            acc.add_group(&views).map_err(name_err)?;
            let mut mean = vec![0.0f32; layout.len()];
            acc.mean_into(&mut mean).map_err(name_err)?;
            let (uses_m, uses_v) = cfg.state_slots();
            let mut fresh_m = vec![0.0f32; layout.len()];
            let mut fresh_v = vec![0.0f32; layout.len()];
            init_server_state(&cfg, &mut fresh_m, &mut fresh_v);
            let mut m = if uses_m {
                state.m.remove(&g.name).unwrap_or(fresh_m)
            } else {
                Vec::new()
            };
            let mut v = if uses_v {
                state.v.remove(&g.name).unwrap_or(fresh_v)
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
            apply_server_opt(&cfg, &mut st, TensorView::F32(&g.data), &mean, &mut new)
                .map_err(name_err)?;
            if uses_m {
                state.m.insert(g.name.clone(), m);
            }
            if uses_v {
                state.v.insert(g.name.clone(), v);
            }
        }
        report.tensors_aggregated += 1;
        out_tensors.push(Tensor {
            data: new,
            ..g.clone()
        });
    }
    if report.tensors_aggregated == 0 {
        bail!(
            "no tensor of {} is aggregated by {}",
            global.path.display(),
            alg.name()
        );
    }
    if alg == Algorithm::FedCdd {
        let n = report.tensors_aggregated as f32;
        report.mean_agreement = agreement_sums.iter().map(|s| Some(s / n)).collect();
    }
    state.steps += 1;
    Ok((out_tensors, report))
}
