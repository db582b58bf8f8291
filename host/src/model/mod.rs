//! The LLaMA model: HF config, checkpoint (memory-mapped safetensors), LoRA layout and the
//! forward / explicit backward graph over a kernels `Backend`.

pub mod checkpoint;
pub mod config;
pub mod llama;
pub mod lora;
