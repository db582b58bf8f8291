//! The server side over whole adapters: client updates loaded one at a time, the core's
//! rules applied tensor by tensor, the state kept between rounds.

mod aggregate;
mod clients;
pub mod example;
mod options;
mod state;

pub use aggregate::{
    AggregateReport, Aggregated, ClientInfo, MeanStep, aggregate_fedcdd, aggregate_mean,
    sample_weights, server_opt_step, tensor_err,
};
pub use clients::{ClientLoader, FileClients};
pub use options::{ServerOptions, ServerSettings};
pub use state::ServerStateStore;
