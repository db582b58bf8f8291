//! The LoRA-factor splits: FFA-LoRA (A frozen at its shared seeded init; only B trained and
//! sent; FedAvg on B) and FedSA-LoRA (A shared and averaged; each client's B stays on the
//! client and is scored by its holder's personal model).

use std::collections::BTreeMap;

use anyhow::Result;
use fedcdd_core::{Algorithm, TensorRole};

use crate::io::{Adapter, Tensor};
use crate::server::{ClientLoader, ServerOptions, ServerStateStore};

use super::api::{ClientJob, ClientRun, ClientState, Evaluated, ServerRound, ServerStep, Strategy};
use super::fedavg::MeanServer;

/// FFA-LoRA (Sun et al. 2024).
pub struct FfaLora {
    server: MeanServer,
}

impl FfaLora {
    pub fn new(opts: &ServerOptions) -> Self {
        FfaLora {
            server: MeanServer::new(Algorithm::FfaLora.name(), opts),
        }
    }
}

impl Strategy for FfaLora {
    fn name(&self) -> &str {
        Algorithm::FfaLora.name()
    }

    fn sends(&self, role: TensorRole) -> bool {
        role != TensorRole::LoraA
    }

    fn frozen(&self, role: TensorRole) -> bool {
        role == TensorRole::LoraA
    }

    fn aggregate_train(
        &mut self,
        global: &Adapter,
        replies: &mut dyn ClientLoader,
        _round: &ServerRound<'_>,
    ) -> Result<ServerStep> {
        let sends = |r: TensorRole| r != TensorRole::LoraA;
        self.server
            .step(Algorithm::FfaLora.name(), global, replies, &sends)
    }

    fn state(&self) -> &ServerStateStore {
        &self.server.state
    }

    fn state_mut(&mut self) -> &mut ServerStateStore {
        &mut self.server.state
    }
}

/// FedSA-LoRA (Guo et al. 2025).
pub struct FedSaLora {
    server: MeanServer,
}

impl FedSaLora {
    pub fn new(opts: &ServerOptions) -> Self {
        FedSaLora {
            server: MeanServer::new(Algorithm::FedSaLora.name(), opts),
        }
    }
}

/// `global` with the B tensors of `state` in place of the global's.
fn with_own_b(global: &[Tensor], state: &ClientState) -> Vec<Tensor> {
    global
        .iter()
        .map(|t| match state.get(&t.name) {
            Some(b) if t.role() == TensorRole::LoraB => Tensor {
                data: b.data.clone(),
                ..t.clone()
            },
            _ => t.clone(),
        })
        .collect()
}

/// Keeps the trained B on the client.
struct KeepB;

impl ClientRun for KeepB {
    fn finish(self: Box<Self>, trained: &[Tensor], state: &mut ClientState) -> Result<Vec<Tensor>> {
        for t in trained.iter().filter(|t| t.role() == TensorRole::LoraB) {
            state.set(t.clone());
        }
        Ok(Vec::new())
    }
}

impl Strategy for FedSaLora {
    fn name(&self) -> &str {
        Algorithm::FedSaLora.name()
    }

    fn sends(&self, role: TensorRole) -> bool {
        role != TensorRole::LoraB
    }

    fn client_start(&self, global: &[Tensor], state: &ClientState) -> Vec<Tensor> {
        with_own_b(global, state)
    }

    fn client_run(&self, _job: &ClientJob<'_>, _state: &ClientState) -> Result<Box<dyn ClientRun>> {
        Ok(Box::new(KeepB))
    }

    fn aggregate_train(
        &mut self,
        global: &Adapter,
        replies: &mut dyn ClientLoader,
        _round: &ServerRound<'_>,
    ) -> Result<ServerStep> {
        let sends = |r: TensorRole| r != TensorRole::LoraB;
        self.server
            .step(Algorithm::FedSaLora.name(), global, replies, &sends)
    }

    /// There is no global B: each client's personal model (global A + own B).
    fn evaluated(&self, global: &[Tensor], clients: &BTreeMap<usize, ClientState>) -> Evaluated {
        let personal: Vec<(usize, Vec<Tensor>)> = clients
            .iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(&k, s)| (k, with_own_b(global, s)))
            .collect();
        if personal.is_empty() {
            Evaluated::Global
        } else {
            Evaluated::PerClient(personal)
        }
    }

    fn state(&self) -> &ServerStateStore {
        &self.server.state
    }

    fn state_mut(&mut self) -> &mut ServerStateStore {
        &mut self.server.state
    }
}
