//! Opening an HF model directory on a backend: config, memory-mapped weights, tokenizer.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fedcdd_kernels::Backend;

use crate::data::Tokenizer;

use super::checkpoint::Checkpoint;
use super::config::LlamaConfig;
use super::llama::Model;

/// A model directory opened on a backend.
pub struct LoadedModel<B: Backend> {
    pub model: Model<B>,
    pub tokenizer: Tokenizer,
    pub dir: PathBuf,
}

/// Opens `dir`; the tokenizer must fit the model's vocabulary.
pub fn load_model<B: Backend>(be: &B, dir: &Path) -> Result<LoadedModel<B>> {
    let config = LlamaConfig::load(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let model = Model::load(be, config, &ckpt)
        .with_context(|| format!("cannot load the model in {}", dir.display()))?;
    let tokenizer = Tokenizer::load(dir)?;
    if tokenizer.vocab_size() > model.config.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the model's vocab_size is {}",
            dir.display(),
            tokenizer.vocab_size(),
            model.config.vocab_size
        );
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        dir: dir.to_path_buf(),
    })
}
