//! The model a run trains on and its LoRA layout; FLoRA replaces the model after each round.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fedcdd_kernels::Backend;

use crate::io::Tensor;
use crate::model::checkpoint::Checkpoint;
use crate::model::config::LlamaConfig;
use crate::model::llama::{Lora, Model};
use crate::model::lora::LoraConfig;

pub struct Live<B: Backend> {
    pub model: Model<B>,
    pub model_dir: PathBuf,
    pub lcfg: LoraConfig,
}

impl<B: Backend> Live<B> {
    pub fn load(be: &B, dir: &Path, config: &LlamaConfig, lcfg: LoraConfig) -> Result<Self> {
        let ckpt = Checkpoint::open(dir)?;
        let model = Model::load(be, config.clone(), &ckpt)
            .with_context(|| format!("cannot load the model in {}", dir.display()))?;
        Ok(Live {
            model,
            model_dir: dir.to_path_buf(),
            lcfg,
        })
    }

    /// A LoRA holding `tensors` (PEFT names).
    pub fn lora(&self, be: &B, tensors: &[Tensor], origin: &str) -> Result<Lora<B>> {
        let mut l = Lora::init(be, &self.model.config, self.lcfg.clone(), 0)?;
        l.load_tensors(be, tensors, origin)?;
        Ok(l)
    }

    /// PEFT's fresh init, seeded, in the order of the LoRA's parameters.
    pub fn fresh(&self, be: &B, seed: u64) -> Result<Vec<Tensor>> {
        Ok(Lora::init(be, &self.model.config, self.lcfg.clone(), seed)?.to_tensors(be))
    }
}
