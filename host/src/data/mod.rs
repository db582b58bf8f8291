//! Data: record formats and prompt templates, tokenizers, the synthetic corpus and the built-in
//! federated benchmark.

pub mod builtin;
pub mod corpus;
pub mod formats;
pub mod tokenizer;

pub use formats::{
    Batch, Example, IGNORE_INDEX, Record, Turn, alpaca_prompt, load_examples, load_records,
    make_batch, parse_records, tokenize_records, trainable_examples, write_jsonl,
};
pub use tokenizer::Tokenizer;
