//! FedProx: each local gradient gets the proximal term's `μ(θ − G)` (the core's
//! `fedprox_gradient`); the server step is FedAvg's.

use anyhow::Result;
use fedcdd_core::Algorithm;

use crate::io::{Adapter, Tensor};
use crate::server::{ClientLoader, ServerOptions, ServerStateStore};

use super::api::{ClientJob, ClientRun, ClientState, ServerRound, ServerStep, Strategy};
use super::fedavg::MeanServer;

pub struct FedProx {
    mu: f32,
    server: MeanServer,
}

impl FedProx {
    pub fn new(mu: f32, opts: &ServerOptions) -> Self {
        FedProx {
            mu,
            server: MeanServer::new(Algorithm::FedProx.name(), opts),
        }
    }
}

/// One client's round: the global parameters to stay close to.
struct ProxClient {
    mu: f32,
    global: Vec<Vec<f32>>,
}

impl ClientRun for ProxClient {
    fn adjusts_gradients(&self) -> bool {
        true
    }

    fn adjust_gradients(&mut self, params: &[Vec<f32>], grads: &mut [Vec<f32>]) -> Result<()> {
        for ((g, p), c) in grads.iter_mut().zip(params).zip(&self.global) {
            fedcdd_core::fedprox_gradient(g, p, c, self.mu)
                .map_err(|e| anyhow::anyhow!("FedProx: {e}"))?;
        }
        Ok(())
    }
}

impl Strategy for FedProx {
    fn name(&self) -> &str {
        Algorithm::FedProx.name()
    }

    fn client_run(&self, job: &ClientJob<'_>, _state: &ClientState) -> Result<Box<dyn ClientRun>> {
        Ok(Box::new(ProxClient {
            mu: self.mu,
            global: job.global.iter().map(|t: &Tensor| t.data.clone()).collect(),
        }))
    }

    fn aggregate_train(
        &mut self,
        global: &Adapter,
        replies: &mut dyn ClientLoader,
        _round: &ServerRound<'_>,
    ) -> Result<ServerStep> {
        self.server
            .step(Algorithm::FedProx.name(), global, replies, &|_| true)
    }

    fn state(&self) -> &ServerStateStore {
        &self.server.state
    }

    fn state_mut(&mut self) -> &mut ServerStateStore {
        &mut self.server.state
    }
}
