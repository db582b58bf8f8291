//! fedcdd host: PEFT adapter IO, client updates (mask + wire format), the server step over
//! whole adapters, benchmarks and the `fedcdd` command-line tool.

pub mod adapter;
pub mod aggregate;
pub mod bench;
pub mod bench_train;
pub mod cli;
pub mod cli_model;
pub mod example;
pub mod model;
pub mod train;
pub mod update;
pub mod tokenizer;
pub mod data;
pub mod corpus;
pub mod init_model;
pub mod merge;
