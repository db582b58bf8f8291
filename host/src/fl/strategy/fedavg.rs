//! FedAvg and the FedOpt family (FedAvgM, FedAdagrad, FedYogi, FedAdam): plain clients, the
//! server optimiser of the core on the weighted mean update. [`MeanServer`] is that server
//! step, which FedProx, FFA-LoRA and FedSA-LoRA reuse.

use anyhow::Result;
use fedcdd_core::{ServerOptConfig, TensorRole};

use crate::io::Adapter;
use crate::server::{
    ClientLoader, ServerOptions, ServerStateStore, aggregate_mean, server_opt_step,
};

use super::api::{ServerRound, ServerStep, Strategy};

/// The mean family's server step and its state (moments per tensor).
pub struct MeanServer {
    pub opt: ServerOptConfig,
    pub state: ServerStateStore,
    pub progress: bool,
}

impl MeanServer {
    /// For the algorithm `name`, with `opts.opt`'s rule.
    pub fn new(name: &str, opts: &ServerOptions) -> Self {
        MeanServer {
            opt: opts.opt,
            state: ServerStateStore::new(name, opts.opt.variant),
            progress: opts.progress,
        }
    }

    /// Aggregates the tensors `sends` selects: `G ← rule(G, Σ w_i Δ_i / Σ w_i)`.
    pub fn step(
        &mut self,
        name: &str,
        global: &Adapter,
        replies: &mut dyn ClientLoader,
        sends: &dyn Fn(TensorRole) -> bool,
    ) -> Result<ServerStep> {
        let cfg = self.opt;
        let state = &mut self.state;
        let agg = aggregate_mean(
            global,
            replies,
            sends,
            &|w| cfg.client_weight(w),
            name,
            self.progress,
            &mut |g, acc, out| server_opt_step(&cfg, state, g, acc, out),
        )?;
        self.state.steps += 1;
        Ok(agg.into())
    }
}

/// FedAvg (`G ← Σ p_i θ_i`, or `G + λ·Δ̄`) and FedAvgM/FedAdagrad/FedYogi/FedAdam: which
/// one is `opts.opt.rule`.
pub struct FedAvg {
    name: &'static str,
    server: MeanServer,
}

impl FedAvg {
    pub fn new(name: &'static str, opts: &ServerOptions) -> Self {
        FedAvg {
            name,
            server: MeanServer::new(name, opts),
        }
    }
}

impl Strategy for FedAvg {
    fn name(&self) -> &str {
        self.name
    }

    fn aggregate_train(
        &mut self,
        global: &Adapter,
        replies: &mut dyn ClientLoader,
        _round: &ServerRound<'_>,
    ) -> Result<ServerStep> {
        self.server.step(self.name, global, replies, &|_| true)
    }

    fn state(&self) -> &ServerStateStore {
        &self.server.state
    }

    fn state_mut(&mut self) -> &mut ServerStateStore {
        &mut self.server.state
    }
}
