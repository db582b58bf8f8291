//! Federated fine-tuning: the typed run configuration, clients and their data, the strategy
//! layer (every algorithm's client and server parts), the rounds, reference points, and the
//! built-in benchmark's base model.

pub mod attack;
pub mod base;
pub mod client;
pub mod config;
pub mod defense;
pub mod evaluate;
pub mod live;
pub mod privacy;
pub mod references;
pub mod run;
pub mod runner;
pub mod scores;
pub mod seeds;
pub mod session;
pub mod setup;
pub mod strategy;
pub mod sweep;

pub use config::{Partition, Reference, RunConfig};
pub use run::{compare, default_run_dir, run_one, run_with, strategy_for};
pub use runner::STOP;
