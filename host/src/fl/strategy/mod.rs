//! The algorithms, one file per family, behind one trait ([`Strategy`]). Adding an algorithm
//! is one new file implementing the trait and one line in [`for_algorithm`].

mod api;
mod fedavg;
mod fedcdd;
mod fedprox;
mod flora;
mod lora_split;
mod robust;
mod scaffold;

use fedcdd_core::Algorithm;

pub use api::{
    ClientJob, ClientRun, ClientState, Evaluated, ModelContext, NextGlobal, PlainClient,
    ServerRound, ServerStep, Strategy,
};
pub use fedavg::{FedAvg, MeanServer};
pub use fedcdd::FedCdd;
pub use fedprox::FedProx;
pub use flora::FLora;
pub use lora_split::{FedSaLora, FfaLora};
pub use robust::Robust;
pub use scaffold::Scaffold;

use crate::server::ServerOptions;

/// What every strategy may be built from.
#[derive(Clone, Copy, Debug)]
pub struct StrategyOptions {
    pub server: ServerOptions,
    /// FedProx's μ.
    pub fedprox_mu: f32,
}

/// The registry: the strategy of `algorithm`.
pub fn for_algorithm(algorithm: Algorithm, o: &StrategyOptions) -> Box<dyn Strategy> {
    let s = &o.server;
    match algorithm {
        Algorithm::FedAvg
        | Algorithm::FedAvgM
        | Algorithm::FedAdagrad
        | Algorithm::FedYogi
        | Algorithm::FedAdam => Box::new(FedAvg::new(algorithm.name(), s)),
        Algorithm::FedProx => Box::new(FedProx::new(o.fedprox_mu, s)),
        Algorithm::Scaffold => Box::new(Scaffold::new(s)),
        Algorithm::FfaLora => Box::new(FfaLora::new(s)),
        Algorithm::FedSaLora => Box::new(FedSaLora::new(s)),
        Algorithm::FLora => Box::new(FLora::new()),
        Algorithm::FedCdd => Box::new(FedCdd::new(s)),
    }
}
