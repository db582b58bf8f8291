//! The built-in base model: a small LLaMA pre-trained on the benchmark's prose
//! ([`Benchmark::pretrain_texts`]), built once and cached on disk.
//!
//! The training engine trains LoRA factors only, so pre-training is a full-rank LoRA
//! (`r` = hidden size on every projection, rsLoRA scaling) merged into the randomly
//! initialised weights at the end. Embedding and LM head stay at their random init: with a
//! vocabulary of a few hundred tokens and an embedding width close to it they are fixed but
//! expressive features. The recipe is versioned: a changed recipe gets a new cache entry.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use fedcdd_kernels::{AdamW, RopeScaling, WeightDType};

use crate::data::builtin::Benchmark;
use crate::data::tokenizer::train_bpe;
use crate::data::{Record, Tokenizer, tokenize_records};
use crate::io::write_atomic;
use crate::model::checkpoint::{Checkpoint, torch_dtype_name};
use crate::model::config::LlamaConfig;
use crate::model::init::{INIT_STD, Preset, write_model_dir};
use crate::model::llama::{Lora, Model};
use crate::model::lora::{LoraConfig, Proj};
use crate::model::merge::merge_lora_into;
use crate::progress::Progress;
use crate::rng::fnv1a;
use crate::train::{Optimizer, TrainOptions, train};

/// The LM head is never trained (LoRA covers the projections only) and the final RMSNorm
/// bounds the hidden state, so the head's scale caps the logit margin: with HF's 0.02 the best
/// reachable loss over a few hundred tokens is about 3.5 nats. 0.1 allows margins above 10.
const LM_HEAD_STD: f64 = 0.1;

/// The built-in model sizes (the run config's `model = builtin | builtin-small`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuiltinSize {
    /// The default base model of each benchmark.
    Base,
    /// A smaller model (fewer layers, narrower), for studies over model size.
    Small,
}

impl BuiltinSize {
    pub const ALL: [BuiltinSize; 2] = [BuiltinSize::Base, BuiltinSize::Small];

    pub const fn name(self) -> &'static str {
        match self {
            BuiltinSize::Base => "builtin",
            BuiltinSize::Small => "builtin-small",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }
}

/// Everything that decides the built-in base model's weights.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BaseRecipe {
    /// The benchmark whose prose the model is pre-trained on (absent from the cache key of
    /// `v1`, whose recipe predates the field, so its cached models stay valid).
    #[serde(skip_serializing_if = "is_v1")]
    pub benchmark: Benchmark,
    pub version: u32,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub tokenizer_vocab: usize,
    pub lm_head_std: f64,
    pub rank: usize,
    pub steps: usize,
    pub batch: usize,
    pub seq: usize,
    pub lr: f32,
    pub sentences_per_line: usize,
    pub lines: usize,
    pub seed: u64,
}

fn is_v1(b: &Benchmark) -> bool {
    *b == Benchmark::V1
}

impl Default for BaseRecipe {
    /// The base model of the default benchmark.
    fn default() -> Self {
        Self::builtin(Benchmark::default(), BuiltinSize::Base)
    }
}

impl BaseRecipe {
    /// The recipe of the built-in model of `size` for `benchmark`.
    pub fn builtin(benchmark: Benchmark, size: BuiltinSize) -> Self {
        let v1 = Self::v1();
        match (benchmark, size) {
            (Benchmark::V1, BuiltinSize::Base) => v1,
            (Benchmark::V2, BuiltinSize::Base) => BaseRecipe {
                benchmark,
                version: 7,
                ..v1
            },
            (_, BuiltinSize::Small) => BaseRecipe {
                benchmark,
                version: 7,
                hidden: 64,
                layers: 2,
                heads: 2,
                kv_heads: 1,
                intermediate: 192,
                rank: 32,
                ..v1
            },
        }
    }

    /// The first benchmark's recipe, unchanged since it was tuned (its cache key must not move).
    fn v1() -> Self {
        BaseRecipe {
            benchmark: Benchmark::V1,
            version: 6,
            hidden: 128,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            intermediate: 384,
            tokenizer_vocab: 448,
            lm_head_std: LM_HEAD_STD,
            rank: 64,
            steps: 600,
            batch: 32,
            seq: 80,
            lr: 3e-3,
            sentences_per_line: 2,
            lines: 20_000,
            seed: 0,
        }
    }

    /// A short stable hash of the recipe (the cache key).
    pub fn key(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        format!(
            "builtin-base-v{}-{:016x}",
            self.version,
            fnv1a(text.as_bytes())
        )
    }

    fn config(&self, vocab: usize) -> LlamaConfig {
        let mut c = Preset::Tiny.config();
        c.vocab_size = vocab;
        c.hidden_size = self.hidden;
        c.intermediate_size = self.intermediate;
        c.num_hidden_layers = self.layers;
        c.num_attention_heads = self.heads;
        c.num_key_value_heads = self.kv_heads;
        c.head_dim = self.hidden / self.heads;
        c.max_position_embeddings = 256;
        c.rope_scaling = RopeScaling::None;
        c.tie_word_embeddings = false;
        c.torch_dtype = Some(torch_dtype_name(WeightDType::F32).to_string());
        c
    }
}

/// The default benchmark's base model as built by its recipe on the project's machine, shipped
/// inside the binary so that a first run needs no pre-training (`fedcdd base --rebuild`
/// rebuilds it from the recipe and compares).
mod shipped {
    /// The recipe key the shipped files belong to ([`super::BaseRecipe::key`]).
    pub const KEY: &str = "builtin-base-v7-7ff3acce9e38545d";
    /// SHA-256 of `model.safetensors`.
    pub const MODEL_SHA256: &str =
        "414b7e68339bf8653c795c7df62b0fbd126db7b41c88dcb8b567b2ca13c0f52e";

    macro_rules! asset {
        ($name:literal) => {
            (
                $name,
                include_bytes!(concat!("../../assets/builtin-base-v7/", $name)).as_slice(),
            )
        };
    }

    /// Every file of the model directory.
    pub const FILES: [(&str, &[u8]); 7] = [
        asset!("config.json"),
        asset!("generation_config.json"),
        asset!("model.safetensors"),
        asset!("special_tokens_map.json"),
        asset!("tokenizer.json"),
        asset!("tokenizer_config.json"),
        asset!("pretrain.json"),
    ];
}

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether the binary carries a built model for `recipe`.
pub fn is_shipped(recipe: &BaseRecipe) -> bool {
    recipe.key() == shipped::KEY
}

/// The SHA-256 the shipped `model.safetensors` has.
pub fn shipped_model_sha256() -> &'static str {
    shipped::MODEL_SHA256
}

/// Writes the shipped model directory to `dir` (beside it, then renamed), after checking the
/// model's checksum.
fn unpack_shipped(dir: &Path) -> Result<()> {
    let model = shipped::FILES
        .iter()
        .find(|(n, _)| *n == "model.safetensors")
        .map(|(_, b)| *b)
        .unwrap_or_default();
    let sum = sha256_hex(model);
    if sum != shipped::MODEL_SHA256 {
        bail!(
            "the shipped base model is damaged (sha256 {sum}, expected {}); rebuild it with \
             `fedcdd base --rebuild`",
            shipped::MODEL_SHA256
        );
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create the cache directory {}", parent.display()))?;
    let work = parent.join(format!("{}.unpacking-{}", shipped::KEY, std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    for (name, bytes) in shipped::FILES {
        write_atomic(&work.join(name), bytes)?;
    }
    match std::fs::rename(&work, dir) {
        Ok(()) => Ok(()),
        // Another process finished first: use its copy.
        Err(_) if dir.join("pretrain.json").is_file() => {
            let _ = std::fs::remove_dir_all(&work);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            Err(e).with_context(|| format!("cannot move the base model to {}", dir.display()))
        }
    }
}

/// Where cached base models live: `$FEDCDD_CACHE`, else `$XDG_CACHE_HOME/fedcdd`, else
/// `~/.cache/fedcdd`, else a `fedcdd-cache` folder in the temp dir.
pub fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("FEDCDD_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("fedcdd");
    }
    if let Some(p) = std::env::var_os("HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join(".cache").join("fedcdd");
    }
    std::env::temp_dir().join("fedcdd-cache")
}

/// The cached base model directory for `recipe` under `root`, building it first when it is
/// missing. `log` gets one-line messages.
pub fn ensure_base(
    root: &Path,
    recipe: &BaseRecipe,
    threads: usize,
    log: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let dir = root.join(recipe.key());
    if dir.join("pretrain.json").is_file() {
        return Ok(dir);
    }
    if is_shipped(recipe) {
        unpack_shipped(&dir)?;
        log(&format!(
            "unpacked the shipped base model into {} (model.safetensors sha256 {})",
            dir.display(),
            shipped::MODEL_SHA256
        ));
        return Ok(dir);
    }
    std::fs::create_dir_all(root)
        .with_context(|| format!("cannot create the cache directory {}", root.display()))?;
    log(&format!(
        "building the built-in base model (once; cached in {})",
        dir.display()
    ));
    // Build beside the final place, then rename: an interrupted build leaves no half model.
    let work = root.join(format!("{}.building-{}", recipe.key(), std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let result = build_base(&work, recipe, threads, log);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&work);
        return Err(e);
    }
    let built = work.join("model");
    match std::fs::rename(&built, &dir) {
        Ok(()) => {}
        // Another process finished first: use its model.
        Err(_) if dir.join("pretrain.json").is_file() => {}
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e)
                .with_context(|| format!("cannot move the base model to {}", dir.display()));
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(dir)
}

/// Builds the base model into `work/model`: tokenizer, random init, full-rank LoRA
/// pre-training on the prose, merge.
pub fn build_base(
    work: &Path,
    recipe: &BaseRecipe,
    threads: usize,
    log: &mut dyn FnMut(&str),
) -> Result<()> {
    let t0 = Instant::now();
    let tok = train_bpe(&recipe.benchmark.tokenizer_texts(), recipe.tokenizer_vocab)?;
    let tok_vocab = tok.get_vocab_size(true);
    let tok_json = tok
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("cannot serialize the tokenizer: {e}"))?;
    let vocab = tok_vocab.next_multiple_of(64);
    let config = recipe.config(vocab);
    let init = work.join("init");
    std::fs::create_dir_all(&init).with_context(|| format!("cannot create {}", init.display()))?;
    write_model_dir(
        &init,
        &config,
        &tok_json,
        tok_vocab,
        recipe.seed,
        WeightDType::F32,
        u64::MAX,
        &|name| {
            if name == "lm_head.weight" {
                recipe.lm_head_std
            } else {
                INIT_STD
            }
        },
        &mut |_, _| {},
    )?;

    let be = crate::device::cpu(threads)?;
    let ckpt = Checkpoint::open(&init)?;
    let model = Model::load(&be, config.clone(), &ckpt)?;
    let tokenizer = Tokenizer::load(&init)?;
    let records: Vec<Record> = recipe
        .benchmark
        .pretrain_texts(recipe.lines, recipe.sentences_per_line, recipe.seed)
        .into_iter()
        .map(|text| Record::Text { text, domain: None })
        .collect();
    let examples = tokenize_records(&records, &tokenizer)?;
    let longest = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    if longest > recipe.seq + 1 {
        log(&format!(
            "note: the longest pre-training line has {longest} tokens; rows are cut at {}",
            recipe.seq + 1
        ));
    }
    let lcfg = LoraConfig {
        r: recipe.rank,
        alpha: 1.0,
        dropout: 0.0,
        targets: Proj::ALL.to_vec(),
        rslora: true,
    };
    let mut lora = Lora::init(&be, &config, lcfg.clone(), recipe.seed)?;
    let opts = TrainOptions {
        steps: recipe.steps,
        batch: recipe.batch,
        seq: recipe.seq,
        grad_accum: 1,
        optimizer: Optimizer::AdamW(AdamW {
            lr: recipe.lr,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.0,
        }),
        max_grad_norm: Some(1.0),
        warmup: recipe.steps / 10,
        min_lr_ratio: 0.1,
        seed: recipe.seed,
    };
    let progress = Progress::new();
    let mut first = f64::NAN;
    let mut last = f64::NAN;
    let history = train(&be, &model, &mut lora, &examples, &opts, |step, s| {
        if step == 0 {
            first = s.loss;
        }
        last = s.loss;
        progress.update(
            step + 1,
            recipe.steps,
            &format!("pre-training the base model, loss {:.3}", s.loss),
        );
    })?;
    progress.finish();
    if !last.is_finite() {
        bail!("pre-training the base model diverged (loss {last})");
    }
    let tensors = lora.to_tensors(&be);
    let out = work.join("model");
    merge_lora_into(
        &init,
        &config,
        &ckpt,
        &lcfg,
        &tensors,
        "base pre-training",
        &out,
        WeightDType::F32,
    )?;
    let tokens: usize = history.iter().map(|s| s.tokens).sum();
    let secs = t0.elapsed().as_secs_f64();
    let summary = serde_json::json!({
        "recipe": recipe,
        "first_loss": first,
        "final_loss": last,
        "tokens": tokens,
        "seconds": secs,
        "threads": threads,
        "loss_curve": history.iter().step_by(10).map(|s| s.loss).collect::<Vec<_>>(),
    });
    let mut text = serde_json::to_vec_pretty(&summary)?;
    text.push(b'\n');
    write_atomic(&out.join("pretrain.json"), &text)?;
    log(&format!(
        "base model pre-trained in {secs:.0} s: {} steps, loss {first:.3} -> {last:.3}",
        history.len()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped files are the default recipe's, and the model is the one checksummed: a
    /// changed recipe needs a rebuilt, re-shipped model.
    #[test]
    fn shipped_model_matches_the_default_recipe_and_its_checksum() {
        assert_eq!(BaseRecipe::default().key(), shipped::KEY);
        let model = shipped::FILES
            .iter()
            .find(|(n, _)| *n == "model.safetensors")
            .unwrap()
            .1;
        assert_eq!(sha256_hex(model), shipped::MODEL_SHA256);
        let info: serde_json::Value = serde_json::from_slice(
            shipped::FILES
                .iter()
                .find(|(n, _)| *n == "pretrain.json")
                .unwrap()
                .1,
        )
        .unwrap();
        assert_eq!(info["recipe"]["version"], 7);
    }

    #[test]
    fn sha256_of_a_known_string() {
        // `printf abc | sha256sum`
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
