//! The LLaMA model: HF config, checkpoint (memory-mapped safetensors), LoRA layout, the
//! forward / explicit backward graph over a kernels `Backend`, random init of presets, and
//! merging an adapter into the base weights.

pub mod checkpoint;
pub mod config;
pub mod init;
pub mod llama;
pub mod lora;
pub mod merge;
pub mod open;

pub use open::{LoadedModel, load_model};
