//! `fedcdd init-model`: a randomly initialised LLaMA in an HF model directory that
//! `transformers.AutoModelForCausalLM` and `AutoTokenizer` load.
//!
//! Presets ([`Preset`]):
//!
//! | preset | hidden | layers | heads / kv | intermediate | vocab | notes |
//! |---|---|---|---|---|---|---|
//! | `tiny` | 256 | 4 | 8 / 4 | 688 | 2048 | the built-in benchmark model |
//! | `small` | 512 | 8 | 8 / 4 | 1376 | 4096 | |
//! | `llama2-7b` | 4096 | 32 | 32 / 32 | 11008 | 32000 | |
//! | `llama3-8b` | 4096 | 32 | 32 / 8 | 14336 | 128256 | θ 500000, Llama 3.1 rope scaling (8) |
//! | `llama3.2-1b` | 2048 | 16 | 32 / 8 | 8192 | 128256 | tied embeddings, rope scaling 32 |
//! | `tinyllama-1.1b` | 2048 | 22 | 32 / 4 | 5632 | 32000 | |
//! | `smollm2-135m` | 576 | 30 | 9 / 3 | 1536 | 49152 | tied embeddings, θ 100000 |
//!
//! Weights follow HF's `_init_weights` for LLaMA: every linear and the embedding
//! `N(0, 0.02²)`, the embedding row of the pad token zero, RMSNorm weights 1. The values are a
//! pure function of `(seed, tensor name, element index)` (a counter-based generator), so they
//! do not depend on chunking or thread count. Tensors are generated and written chunk by chunk
//! (see [`crate::model::checkpoint::write_checkpoint`]); memory stays at a few MB whatever the
//! model size. Checkpoints above 2 GB are sharded like HF's.
//!
//! The tokenizer of every preset is a byte-level BPE ([`crate::tokenizer::train_bpe`]) trained
//! on the built-in corpus ([`crate::corpus`], all domains, a fixed corpus seed: the tokenizer
//! does not depend on `--seed`). `tiny` has 2048 tokens and `small` 4096, equal to their
//! `vocab_size`. The real-shape presets exist for weight-shape benchmarks; they ship the
//! 4096-token BPE and keep the real `vocab_size`, so their embedding has rows no token uses
//! (HF accepts a config `vocab_size` larger than the tokenizer). Their special ids are the
//! BPE's (`<s>` 1, `</s>` 2, `<pad>` 3), not Meta's.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use fedcdd_kernels::{RopeScaling, WeightDType};
use rayon::prelude::*;
use serde_json::json;

use crate::data::corpus;
use crate::data::tokenizer::{
    TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, special_tokens_map_json, tokenizer_config_json,
    train_bpe,
};
use crate::io::write_atomic;
use crate::progress::Progress;
use crate::rng::{fnv1a, mix};

use super::checkpoint::{
    DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, MODEL_FILE, TensorData, TensorToWrite, WriteOptions,
    torch_dtype_name, write_checkpoint,
};
use super::config::{CONFIG_FILE, LlamaConfig};

/// Records per domain of the tokenizer training corpus (7500 texts, ≈ 2.6 MB in all).
pub const TOKENIZER_CORPUS_PER_DOMAIN: usize = 1500;
/// Seed of the tokenizer training corpus (fixed: the tokenizer does not depend on `--seed`).
pub const TOKENIZER_CORPUS_SEED: u64 = 0;
/// HF's `initializer_range` of LLaMA.
pub const INIT_STD: f64 = 0.02;

/// A model shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    Tiny,
    Small,
    Llama2_7b,
    Llama3_8b,
    Llama3_2_1b,
    TinyLlama1_1b,
    SmolLm2_135m,
}

impl Preset {
    pub const ALL: [Preset; 7] = [
        Preset::Tiny,
        Preset::Small,
        Preset::Llama2_7b,
        Preset::Llama3_8b,
        Preset::Llama3_2_1b,
        Preset::TinyLlama1_1b,
        Preset::SmolLm2_135m,
    ];

    /// The preset called `name` (as [`name`](Self::name) writes it).
    pub fn from_name(name: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The preset's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Llama2_7b => "llama2-7b",
            Preset::Llama3_8b => "llama3-8b",
            Preset::Llama3_2_1b => "llama3.2-1b",
            Preset::TinyLlama1_1b => "tinyllama-1.1b",
            Preset::SmolLm2_135m => "smollm2-135m",
        }
    }

    /// f32 for the small presets, bf16 for the real shapes.
    pub fn default_dtype(self) -> WeightDType {
        match self {
            Preset::Tiny | Preset::Small => WeightDType::F32,
            _ => WeightDType::Bf16,
        }
    }

    /// Size of the BPE vocabulary shipped with the preset.
    pub fn tokenizer_vocab(self) -> usize {
        match self {
            Preset::Tiny => 2048,
            _ => 4096,
        }
    }

    /// The preset's config (`torch_dtype` unset; [`build_model`] fills it in).
    pub fn config(self) -> LlamaConfig {
        let llama3_rope = |factor: f64| RopeScaling::Llama3 {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        // (vocab, hidden, inter, layers, heads, kv, max_pos, theta, eps, tied, rope)
        let (v, h, i, l, nh, kv, mp, theta, eps, tied, rope) = match self {
            Preset::Tiny => (
                2048,
                256,
                688,
                4,
                8,
                4,
                2048,
                1e4,
                1e-5,
                false,
                RopeScaling::None,
            ),
            Preset::Small => (
                4096,
                512,
                1376,
                8,
                8,
                4,
                2048,
                1e4,
                1e-5,
                false,
                RopeScaling::None,
            ),
            Preset::Llama2_7b => (
                32000,
                4096,
                11008,
                32,
                32,
                32,
                4096,
                1e4,
                1e-5,
                false,
                RopeScaling::None,
            ),
            Preset::Llama3_8b => (
                128256,
                4096,
                14336,
                32,
                32,
                8,
                131072,
                5e5,
                1e-5,
                false,
                llama3_rope(8.0),
            ),
            Preset::Llama3_2_1b => (
                128256,
                2048,
                8192,
                16,
                32,
                8,
                131072,
                5e5,
                1e-5,
                true,
                llama3_rope(32.0),
            ),
            Preset::TinyLlama1_1b => (
                32000,
                2048,
                5632,
                22,
                32,
                4,
                2048,
                1e4,
                1e-5,
                false,
                RopeScaling::None,
            ),
            Preset::SmolLm2_135m => (
                49152,
                576,
                1536,
                30,
                9,
                3,
                8192,
                1e5,
                1e-5,
                true,
                RopeScaling::None,
            ),
        };
        LlamaConfig {
            vocab_size: v,
            hidden_size: h,
            intermediate_size: i,
            num_hidden_layers: l,
            num_attention_heads: nh,
            num_key_value_heads: kv,
            head_dim: h / nh,
            rms_norm_eps: eps,
            rope_theta: theta,
            rope_scaling: rope,
            max_position_embeddings: mp,
            tie_word_embeddings: tied,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            pad_token_id: Some(3),
            torch_dtype: None,
        }
    }
}

/// What `fedcdd init-model` writes.
#[derive(Debug, Clone)]
pub struct InitModelOptions {
    pub preset: Preset,
    /// Output directory (created; must be empty or absent unless `force`).
    pub out: PathBuf,
    /// Seed of the random weights.
    pub seed: u64,
    /// Storage dtype [default: f32 for tiny/small, bf16 for the real shapes].
    pub dtype: Option<WeightDType>,
    /// Overwrite the model files of an existing directory.
    pub force: bool,
    /// Shard the weights above this many bytes.
    pub max_shard_size: u64,
    /// A progress bar while the weights are written (large models).
    pub progress: bool,
}

impl InitModelOptions {
    /// Defaults for `preset` written to `out`.
    pub fn new(preset: Preset, out: impl Into<PathBuf>) -> Self {
        InitModelOptions {
            preset,
            out: out.into(),
            seed: 0,
            dtype: None,
            force: false,
            max_shard_size: DEFAULT_MAX_SHARD_BYTES,
            progress: false,
        }
    }
}

/// What [`build_model`] wrote.
#[derive(Clone, Debug)]
pub struct InitSummary {
    pub config: LlamaConfig,
    pub dtype: WeightDType,
    pub parameters: u64,
    /// Entries of the trained tokenizer.
    pub tokenizer_vocab: usize,
    pub files: Vec<PathBuf>,
    pub tokenizer_seconds: f64,
    pub total_seconds: f64,
}

/// The `tokenizer.json` text and vocabulary size of the preset BPE with `vocab` entries.
/// Training is deterministic, so the result is cached for the life of the process (tests and
/// tools that write several models train each size once).
pub fn preset_tokenizer(vocab: usize) -> Result<(String, usize)> {
    static CACHE: Mutex<Vec<(usize, String, usize)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, json, n)) = cache.iter().find(|(v, _, _)| *v == vocab) {
        return Ok((json.clone(), *n));
    }
    let texts: Vec<String> =
        corpus::generate_all(TOKENIZER_CORPUS_PER_DOMAIN, TOKENIZER_CORPUS_SEED)
            .iter()
            .map(corpus::record_texts)
            .collect();
    let tok = train_bpe(&texts, vocab)?;
    let n = tok.get_vocab_size(true);
    let json = tok
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("cannot serialize the tokenizer: {e}"))?;
    cache.push((vocab, json.clone(), n));
    Ok((json, n))
}

/// The key of one tensor's stream: the seed and an FNV-1a hash of its name.
pub fn tensor_key(seed: u64, name: &str) -> u64 {
    mix(seed.wrapping_add(0x9E37_79B9_7F4A_7C15) ^ fnv1a(name.as_bytes()))
}

/// The pair `(z₀, z₁)` of independent standard normals number `j` of the stream `key`
/// (Box–Muller on two 53-bit uniforms). Element `i` of a tensor is `z_{i mod 2}` of pair
/// `i / 2`.
#[inline]
pub fn normal_pair(key: u64, j: u64) -> (f64, f64) {
    let a = mix(key ^ j.wrapping_mul(0xD2B7_4407_B1CE_6E93));
    let b = mix(a ^ 0x9E37_79B9_7F4A_7C15);
    let u1 = ((a >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64); // (0, 1]
    let u2 = (b >> 11) as f64 * (1.0 / (1u64 << 53) as f64); // [0, 1)
    let r = (-2.0 * u1.ln()).sqrt();
    let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
    (r * c, r * s)
}

/// Fills `out` with elements `start..start + out.len()` of `std · N(0,1)` stream `key`.
pub fn fill_normal(key: u64, std: f64, start: usize, out: &mut [f32]) {
    const BLOCK: usize = 8192;
    out.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(bi, block)| {
            let first = start + bi * BLOCK;
            let end = first + block.len();
            // One Box–Muller pair per two elements; the pair of element i is i / 2.
            for j in first / 2..end.div_ceil(2) {
                let (z0, z1) = normal_pair(key, j as u64);
                let (i0, i1) = (2 * j, 2 * j + 1);
                if i0 >= first {
                    block[i0 - first] = (std * z0) as f32;
                }
                if i1 < end {
                    block[i1 - first] = (std * z1) as f32;
                }
            }
        });
}

/// Writes the model directory (`fedcdd init-model`), with a progress bar when
/// `args.progress` and the weights are large.
pub fn build_model(args: &InitModelOptions) -> Result<InitSummary> {
    let bar = Progress::shown(args.progress);
    let mut progress = |done: u64, total: u64| {
        if total >= 200_000_000 {
            bar.update(
                (done >> 20) as usize,
                (total >> 20) as usize,
                "MiB of weights written",
            );
        }
    };
    let t0 = Instant::now();
    let out = &args.out;
    if out.exists() {
        if !out.is_dir() {
            bail!("{} exists and is not a directory", out.display());
        }
        let ours = [
            CONFIG_FILE,
            MODEL_FILE,
            INDEX_FILE,
            TOKENIZER_FILE,
            TOKENIZER_CONFIG_FILE,
        ];
        let occupied = std::fs::read_dir(out)
            .with_context(|| format!("cannot list {}", out.display()))?
            .flatten()
            .any(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                ours.contains(&n.as_ref())
            });
        if occupied && !args.force {
            bail!(
                "{} already holds a model; pass --force to overwrite it",
                out.display()
            );
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;

    let dtype = args.dtype.unwrap_or_else(|| args.preset.default_dtype());
    let mut config = args.preset.config();
    config.torch_dtype = Some(torch_dtype_name(dtype).to_string());

    // Tokenizer.
    let tt = Instant::now();
    let (tok_json, tokenizer_vocab) = preset_tokenizer(args.preset.tokenizer_vocab())?;
    let tokenizer_seconds = tt.elapsed().as_secs_f64();
    let files = write_model_dir(
        out,
        &config,
        &tok_json,
        tokenizer_vocab,
        args.seed,
        dtype,
        args.max_shard_size,
        &|_| INIT_STD,
        &mut progress,
    )?;
    bar.finish();
    Ok(InitSummary {
        parameters: config.num_parameters(),
        config,
        dtype,
        tokenizer_vocab,
        files,
        tokenizer_seconds,
        total_seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Writes a randomly initialised model (HF init, see the module docs) into `out`: weights
/// (`init_std` gives each tensor's standard deviation; `config.torch_dtype` should name
/// `dtype`), config.json, generation_config.json and the tokenizer `tok_json`'s files.
/// Returns the files written.
#[allow(clippy::too_many_arguments)]
pub fn write_model_dir(
    out: &Path,
    config: &LlamaConfig,
    tok_json: &str,
    tokenizer_vocab: usize,
    seed: u64,
    dtype: WeightDType,
    max_shard_size: u64,
    init_std: &(dyn Fn(&str) -> f64 + Sync),
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<PathBuf>> {
    if tokenizer_vocab > config.vocab_size {
        bail!(
            "internal: the tokenizer has {tokenizer_vocab} tokens, more than the model's \
             vocab_size {}",
            config.vocab_size
        );
    }

    // Weights.
    let pad_row = config
        .pad_token_id
        .map(|p| p as usize)
        .filter(|&p| p < config.vocab_size);
    let hidden = config.hidden_size;
    let tensors: Vec<TensorToWrite<'_>> = config
        .tensor_shapes()
        .into_iter()
        .map(|t| {
            let is_norm = t.shape.len() == 1;
            let key = tensor_key(seed, &t.name);
            let std = init_std(&t.name);
            let zero_row = if t.name == "model.embed_tokens.weight" {
                pad_row
            } else {
                None
            };
            let generate = move |start: usize, buf: &mut [f32]| -> Result<()> {
                if is_norm {
                    buf.fill(1.0);
                } else {
                    fill_normal(key, std, start, buf);
                    if let Some(row) = zero_row {
                        let (lo, hi) = (row * hidden, (row + 1) * hidden);
                        let end = start + buf.len();
                        if lo < end && hi > start {
                            let a = lo.max(start) - start;
                            let b = hi.min(end) - start;
                            buf[a..b].fill(0.0);
                        }
                    }
                }
                Ok(())
            };
            TensorToWrite::new(t.name, t.shape, TensorData::Generate(Box::new(generate)))
        })
        .collect();
    let mut opts = WriteOptions::new(dtype);
    opts.max_shard_bytes = max_shard_size;
    opts.progress = Some(progress);
    let mut files = write_checkpoint(out, tensors, opts)?;

    // Configs and tokenizer.
    let write_json = |name: &str, value: &serde_json::Value| -> Result<PathBuf> {
        let path = out.join(name);
        let mut text = serde_json::to_vec_pretty(value)
            .with_context(|| format!("cannot serialize {}", path.display()))?;
        text.push(b'\n');
        write_atomic(&path, &text)?;
        Ok(path)
    };
    files.push(write_json(CONFIG_FILE, &config.to_json())?);
    let eos = match config.eos_token_ids.as_slice() {
        [one] => json!(one),
        many => json!(many),
    };
    files.push(write_json(
        "generation_config.json",
        &json!({
            "_from_model_config": true,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": config.pad_token_id,
        }),
    )?);
    let tok_path = out.join(TOKENIZER_FILE);
    write_atomic(&tok_path, tok_json.as_bytes())?;
    files.push(tok_path);
    files.push(write_json(
        TOKENIZER_CONFIG_FILE,
        &tokenizer_config_json(config.max_position_embeddings),
    )?);
    files.push(write_json(
        "special_tokens_map.json",
        &special_tokens_map_json(),
    )?);

    Ok(files)
}
