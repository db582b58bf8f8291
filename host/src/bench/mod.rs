//! Benchmarks, each reported next to this machine's own reference figure measured in the same
//! run (never against a hard-coded number).

pub mod aggregate;
pub mod train;

pub use aggregate::{AggregateBenchOptions, run_aggregate_bench};
pub use train::{TempDir, TrainBenchOptions, run_train_bench, write_preset};
