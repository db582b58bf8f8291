//! The strategy trait: one algorithm's client-side and server-side parts, with hooks in the
//! shape Flower users know (configure a client's round → the client's local run → aggregate
//! the round's replies → server state to checkpoint). The federated runner, `fedcdd
//! aggregate` and the Flower integration drive every algorithm through it alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use fedcdd_core::TensorRole;

use crate::io::{Adapter, Tensor};
use crate::model::config::LlamaConfig;
use crate::model::lora::LoraConfig;
use crate::server::{AggregateReport, Aggregated, ClientLoader, ServerStateStore};
use crate::train::OptimizerKind;

/// What a client keeps between the rounds it is sampled in (SCAFFOLD: its control `c_i`;
/// FedSA-LoRA: its own B), as named tensors; empty for stateless algorithms.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientState {
    pub tensors: Vec<Tensor>,
}

impl ClientState {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Adds `t`, or replaces the tensor of the same name.
    pub fn set(&mut self, t: Tensor) {
        match self.tensors.iter_mut().find(|x| x.name == t.name) {
            Some(x) => *x = t,
            None => self.tensors.push(t),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

/// One client's job in one round, as the server configured it.
pub struct ClientJob<'a> {
    /// 0-based.
    pub round: usize,
    /// The global adapter, in the order of the client's trainable parameters (A then B of
    /// each module; PEFT names).
    pub global: &'a [Tensor],
    /// What [`Strategy::configure_train`] sent with it.
    pub extras: &'a [Tensor],
    /// Local optimizer steps, their mean learning rate (the rate itself unless the run is
    /// warming up) and optimizer.
    pub steps: usize,
    pub lr: f32,
    pub optimizer: OptimizerKind,
}

/// The client-side part of one round on one client (Flower: the ClientApp's fit), created by
/// [`Strategy::client_run`].
pub trait ClientRun {
    /// Whether [`adjust_gradients`](Self::adjust_gradients) wants to be called.
    fn adjusts_gradients(&self) -> bool {
        false
    }

    /// Called at every local step with the parameters and their raw gradients (in
    /// [`ClientJob::global`]'s order), before clipping; may change the gradients.
    fn adjust_gradients(&mut self, _params: &[Vec<f32>], _grads: &mut [Vec<f32>]) -> Result<()> {
        Ok(())
    }

    /// After local training, with the trained adapter (same order): updates the client's
    /// state and returns the arrays it sends beside its upload.
    fn finish(
        self: Box<Self>,
        _trained: &[Tensor],
        _state: &mut ClientState,
    ) -> Result<Vec<Tensor>> {
        Ok(Vec::new())
    }
}

/// A client that trains plainly and sends its upload only.
pub struct PlainClient;

impl ClientRun for PlainClient {}

/// The base model a server step may need (FLoRA merges into it).
pub struct ModelContext<'a> {
    /// The current base model directory.
    pub dir: &'a Path,
    pub config: &'a LlamaConfig,
    pub lora: &'a LoraConfig,
    /// Where a new base goes.
    pub run_dir: &'a Path,
}

/// Where a server step runs.
pub struct ServerRound<'a> {
    /// 0-based.
    pub round: usize,
    /// Clients in the federation (sampled or not).
    pub total_clients: usize,
    /// None for `fedcdd aggregate`, which has adapters and uploads only.
    pub model: Option<ModelContext<'a>>,
}

/// What comes after a server step.
pub enum NextGlobal {
    /// The next global adapter (the global's tensors, order and dtypes).
    Adapter(Vec<Tensor>),
    /// The clients' adapters were merged into a new base model in this directory; LoRA
    /// starts afresh (FLoRA).
    NewBase(PathBuf),
}

/// A server step's result.
pub struct ServerStep {
    pub next: NextGlobal,
    pub report: AggregateReport,
}

impl From<Aggregated> for ServerStep {
    /// A server step that produced the next global adapter.
    fn from(agg: Aggregated) -> Self {
        ServerStep {
            next: NextGlobal::Adapter(agg.tensors),
            report: agg.report,
        }
    }
}

/// The adapters that stand for the federation in evaluation.
pub enum Evaluated {
    /// The global adapter.
    Global,
    /// One personal adapter per client (FedSA-LoRA: global A + the client's own B); each
    /// domain is scored by the clients holding it.
    PerClient(Vec<(usize, Vec<Tensor>)>),
}

/// One federated algorithm. Server state lives in the strategy (`state`); client state is
/// kept by whoever runs the clients and handed to the client-side hooks.
pub trait Strategy {
    /// The algorithm's name (`fedavg`, `fedcdd`, …).
    fn name(&self) -> &str;

    /// Whether clients train and upload tensors of this role (FFA-LoRA: B; FedSA-LoRA: A).
    fn sends(&self, _role: TensorRole) -> bool {
        true
    }

    /// Server → client: arrays sent with the global adapter (SCAFFOLD: the control `c`).
    fn configure_train(&self, _global: &[Tensor]) -> Vec<Tensor> {
        Vec::new()
    }

    /// The adapter a client starts from (FedSA-LoRA: the global with its own B).
    fn client_start(&self, global: &[Tensor], _state: &ClientState) -> Vec<Tensor> {
        global.to_vec()
    }

    /// Parameters of this role stay as they are during local training (FFA-LoRA: A).
    fn frozen(&self, _role: TensorRole) -> bool {
        false
    }

    /// The client-side part of one round (FedProx's proximal term, SCAFFOLD's correction).
    fn client_run(&self, _job: &ClientJob<'_>, _state: &ClientState) -> Result<Box<dyn ClientRun>> {
        Ok(Box::new(PlainClient))
    }

    /// The server step over the round's replies, loaded one at a time.
    fn aggregate_train(
        &mut self,
        global: &Adapter,
        replies: &mut dyn ClientLoader,
        round: &ServerRound<'_>,
    ) -> Result<ServerStep>;

    /// What evaluation scores, given every client's state.
    fn evaluated(&self, _global: &[Tensor], _clients: &BTreeMap<usize, ClientState>) -> Evaluated {
        Evaluated::Global
    }

    /// The server state to checkpoint.
    fn state(&self) -> &ServerStateStore;

    fn state_mut(&mut self) -> &mut ServerStateStore;
}
