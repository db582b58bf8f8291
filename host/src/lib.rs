//! fedcdd host: the LLaMA federated LoRA system around `fedcdd-core` and `fedcdd-kernels`.
//!
//! Dependencies point one way: `cli → fl → {client: train/model/kernels; server} → upload →
//! core`; `report`, `io`, `rng`, `progress` are leaves anything may use. See
//! docs/architecture.md.

pub mod bench;
pub mod cli;
pub mod data;
pub mod device;
pub mod fl;
pub mod io;
pub mod model;
pub mod progress;
pub mod report;
pub mod rng;
pub mod server;
pub mod train;
pub mod upload;
