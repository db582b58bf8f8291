//! A LoRA on a backend to and from a PEFT adapter directory.

use std::path::Path;

use anyhow::{Context, Result};
use fedcdd_kernels::Backend;

use crate::io::{load_adapter, save_adapter};
use crate::model::llama::{Lora, Model};
use crate::model::lora::LoraConfig;

/// Saves `lora` as a PEFT adapter directory.
pub fn save_lora<B: Backend>(be: &B, lora: &Lora<B>, dir: &Path, base_model: &str) -> Result<()> {
    let tensors = lora.to_tensors(be);
    save_adapter(dir, &tensors, Some(&lora.config.to_peft_json(base_model)))
}

/// Loads a PEFT adapter directory into a LoRA on `be`.
pub fn load_lora<B: Backend>(be: &B, model: &Model<B>, dir: &Path) -> Result<Lora<B>> {
    let adapter = load_adapter(dir)?;
    let origin = dir.display().to_string();
    let config = adapter.config.as_ref().with_context(|| {
        format!("{origin}: no adapter_config.json (need r, lora_alpha, target_modules)")
    })?;
    let cfg = LoraConfig::from_peft_json(config, &origin)?;
    let mut lora = Lora::init(be, &model.config, cfg, 0)?;
    lora.load_tensors(be, &adapter.tensors, &origin)?;
    Ok(lora)
}
