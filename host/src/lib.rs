//! fedcdd host: PEFT adapter IO, client updates (mask + wire format), the server step over
//! whole adapters, benchmarks and the `fedcdd` command-line tool.

pub mod adapter;
pub mod aggregate;
pub mod bench;
pub mod cli;
pub mod example;
pub mod update;
