//! fedcdd host: PEFT adapter IO, client updates (mask + wire format), the server step over
//! whole adapters, benchmarks and the `fedcdd` command-line tool.

pub mod adapter;
pub mod aggregate;
pub mod bench;
pub mod bench_train;
pub mod cli;
pub mod cli_model;
pub mod corpus;
pub mod data;
pub mod example;
pub mod fl;
pub mod init_model;
pub mod merge;
pub mod model;
pub mod report;
pub mod tokenizer;
pub mod train;
pub mod update;
