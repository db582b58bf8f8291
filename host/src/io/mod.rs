//! File formats users already have on disk: safetensors, PEFT adapter directories, and the
//! atomic write every output goes through.

mod atomic;
mod peft;
mod safetensors;
#[cfg(test)]
mod tests;

pub use atomic::{create_temp_beside, write_atomic};
pub use peft::{ADAPTER_CONFIG_FILE, ADAPTER_MODEL_FILE, Adapter, load_adapter, save_adapter};
pub use safetensors::{Tensor, map_file, read_safetensors, write_safetensors};
