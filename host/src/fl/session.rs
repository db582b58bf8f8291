//! A run's state between rounds and its checkpoint: written atomically after every round
//! (a new directory, then renamed over the old one), read back by `--resume`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::io::{
    Tensor, load_adapter, read_safetensors, save_adapter, write_atomic, write_safetensors,
};
use crate::model::lora::LoraConfig;
use crate::report::{EvalPoint, RoundLog};
use crate::server::ServerStateStore;

use super::strategy::{ClientState, Strategy};

/// What the checkpoint's state.json holds besides tensors.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunProgress {
    /// Rounds completed.
    pub rounds_done: usize,
    pub evals: Vec<EvalPoint>,
    pub rounds: Vec<RoundLog>,
    /// FLoRA: the merged base model directory (inside the run dir), when merged.
    pub base: Option<String>,
    /// The resolved config the checkpoint belongs to (must match on resume).
    pub config: String,
}

/// The run's state between rounds (the server's is in its strategy).
pub struct RunState {
    pub progress: RunProgress,
    /// Global LoRA tensors in `Lora::params_mut` order (PEFT names).
    pub global: Vec<Tensor>,
    /// Each client's own state (SCAFFOLD's `c_i`, FedSA-LoRA's B), by client id.
    pub clients: BTreeMap<usize, ClientState>,
}

pub const CHECKPOINT: &str = "checkpoint";
const CLIENTS_FILE: &str = "clients.safetensors";
const SERVER_FILE: &str = "server_state.safetensors";

/// `tensors` sorted by name.
pub fn sorted(tensors: &[Tensor]) -> Vec<Tensor> {
    let mut t = tensors.to_vec();
    t.sort_by(|a, b| a.name.cmp(&b.name));
    t
}

/// Puts `tensors` in the order of `order` (names).
pub fn reorder(tensors: Vec<Tensor>, order: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut by_name: BTreeMap<String, Tensor> =
        tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    order
        .iter()
        .map(|o| {
            by_name
                .remove(&o.name)
                .with_context(|| format!("checkpoint: tensor {:?} is missing", o.name))
        })
        .collect()
}

/// Writes the checkpoint of `run_dir` atomically.
pub fn save_checkpoint(
    run_dir: &Path,
    st: &RunState,
    server: &ServerStateStore,
    lcfg: &LoraConfig,
    base_model: &str,
) -> Result<()> {
    let tmp = run_dir.join(format!("{CHECKPOINT}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    save_adapter(
        &tmp.join("global"),
        &sorted(&st.global),
        Some(&lcfg.to_peft_json(base_model)),
    )?;
    server.save(&tmp.join(SERVER_FILE))?;
    let clients: Vec<Tensor> = st
        .clients
        .iter()
        .flat_map(|(k, s)| {
            s.tensors.iter().map(move |t| Tensor {
                name: format!("client{k}/{}", t.name),
                ..t.clone()
            })
        })
        .collect();
    if !clients.is_empty() {
        write_safetensors(&tmp.join(CLIENTS_FILE), &clients, None)?;
    }
    let mut text = serde_json::to_vec_pretty(&st.progress)?;
    text.push(b'\n');
    write_atomic(&tmp.join("state.json"), &text)?;
    let dst = run_dir.join(CHECKPOINT);
    let old = run_dir.join(format!("{CHECKPOINT}.old"));
    let _ = std::fs::remove_dir_all(&old);
    if dst.exists() {
        std::fs::rename(&dst, &old).with_context(|| format!("cannot move {}", dst.display()))?;
    }
    std::fs::rename(&tmp, &dst).with_context(|| format!("cannot move {}", tmp.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The checkpoint directory of `run_dir` (or the previous one when a save was cut short).
fn checkpoint_dir(run_dir: &Path) -> std::path::PathBuf {
    let dir = run_dir.join(CHECKPOINT);
    if dir.join("state.json").is_file() {
        dir
    } else {
        run_dir.join(format!("{CHECKPOINT}.old"))
    }
}

/// Reads the run progress of `run_dir`'s checkpoint.
pub fn load_progress(run_dir: &Path) -> Result<RunProgress> {
    let state_path = checkpoint_dir(run_dir).join("state.json");
    let text = std::fs::read_to_string(&state_path).with_context(|| {
        format!(
            "{} has no checkpoint (no {CHECKPOINT}/state.json): nothing to resume",
            run_dir.display()
        )
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a fedcdd run state", state_path.display()))
}

/// Reads the checkpoint of `run_dir`; the server state goes into `strategy`.
pub fn load_checkpoint(run_dir: &Path, strategy: &mut dyn Strategy) -> Result<RunState> {
    let progress = load_progress(run_dir)?;
    let dir = checkpoint_dir(run_dir);
    let global = load_adapter(&dir.join("global"))?;
    let server = ServerStateStore::load(&dir.join(SERVER_FILE), strategy.state())?;
    *strategy.state_mut() = server;
    let mut clients: BTreeMap<usize, ClientState> = BTreeMap::new();
    let clients_path = dir.join(CLIENTS_FILE);
    if clients_path.is_file() {
        let (tensors, _) = read_safetensors(&clients_path)?;
        for t in tensors {
            let parsed = t
                .name
                .strip_prefix("client")
                .and_then(|r| r.split_once('/'))
                .and_then(|(k, name)| Some((k.parse::<usize>().ok()?, name.to_string())));
            let Some((k, name)) = parsed else {
                bail!("{}: unexpected tensor {:?}", clients_path.display(), t.name);
            };
            clients
                .entry(k)
                .or_default()
                .tensors
                .push(Tensor { name, ..t });
        }
    }
    Ok(RunState {
        progress,
        global: global.tensors,
        clients,
    })
}
