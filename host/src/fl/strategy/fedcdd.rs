//! FedCDD: plain clients (their uploads go through the Gaussian-noise mask like every
//! algorithm's); the server's consensus-divergence rule is the core's streaming form.

use anyhow::Result;
use fedcdd_core::{Algorithm, FedCddConfig};

use crate::io::Adapter;
use crate::server::{ClientLoader, ServerOptions, ServerStateStore, aggregate_fedcdd};

use super::api::{ServerRound, ServerStep, Strategy};

pub struct FedCdd {
    cfg: FedCddConfig,
    state: ServerStateStore,
    progress: bool,
}

impl FedCdd {
    pub fn new(opts: &ServerOptions) -> Self {
        FedCdd {
            cfg: opts.fedcdd,
            state: ServerStateStore::new(Algorithm::FedCdd.name(), opts.opt.variant),
            progress: opts.progress,
        }
    }
}

impl Strategy for FedCdd {
    fn name(&self) -> &str {
        Algorithm::FedCdd.name()
    }

    fn aggregate_train(
        &mut self,
        global: &Adapter,
        replies: &mut dyn ClientLoader,
        _round: &ServerRound<'_>,
    ) -> Result<ServerStep> {
        let agg = aggregate_fedcdd(global, replies, &self.cfg, &|_| true, self.progress)?;
        self.state.steps += 1;
        Ok(agg.into())
    }

    fn state(&self) -> &ServerStateStore {
        &self.state
    }

    fn state_mut(&mut self) -> &mut ServerStateStore {
        &mut self.state
    }
}
