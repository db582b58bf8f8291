//! Server state kept between rounds (FedOpt moments, SCAFFOLD's control), per tensor, and
//! its safetensors file.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use fedcdd_core::FedOptVariant;

use crate::io::{Tensor, read_safetensors, write_safetensors};

/// Server state of the stateful rules, per tensor, saved between rounds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerStateStore {
    pub algorithm: String,
    pub variant: String,
    /// Server steps taken so far.
    pub steps: u64,
    /// First moments (FedAvgM, FedYogi, FedAdam), per tensor name.
    pub m: HashMap<String, Vec<f32>>,
    /// Second moments (FedAdagrad, FedYogi, FedAdam).
    pub v: HashMap<String, Vec<f32>>,
    /// SCAFFOLD's server control variate `c`.
    pub c: HashMap<String, Vec<f32>>,
}

const STATE_FORMAT: &str = "fedcdd-server-state";

fn variant_name(v: FedOptVariant) -> &'static str {
    match v {
        FedOptVariant::Reddi => "reddi",
        FedOptVariant::OpenFedLlm => "openfedllm",
    }
}

impl ServerStateStore {
    /// An empty state of the rule `algorithm` (its name) in FedOpt reading `variant`.
    pub fn new(algorithm: &str, variant: FedOptVariant) -> Self {
        ServerStateStore {
            algorithm: algorithm.to_string(),
            variant: variant_name(variant).to_string(),
            ..Default::default()
        }
    }

    /// Reads a state file written by [`save`](Self::save); it must belong to the rule of
    /// `want` (its algorithm and variant).
    pub fn load(path: &Path, want: &ServerStateStore) -> Result<Self> {
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
                Some(("c", name)) => store.c.insert(name.to_string(), t.data),
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
        for (prefix, map) in [("m", &self.m), ("v", &self.v), ("c", &self.c)] {
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
