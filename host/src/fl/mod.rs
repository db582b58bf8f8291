//! Federated fine-tuning: the built-in benchmark and base model, clients, rounds, the
//! client-side parts of every algorithm (the server rule is always `fedcdd-core`'s).

pub mod base;
pub mod builtin;
pub mod cli;
pub mod config;
pub mod eval;
pub mod rng;
pub mod runner;
pub mod setup;
