//! Tokenizers: loading an HF `tokenizer.json` (any model the `tokenizers` crate reads), and
//! training the byte-level BPE the built-in presets ship.
//!
//! Special token ids come from `tokenizer_config.json` (`bos_token`, `eos_token`,
//! `pad_token`, as strings or `{"content": …}` objects) when it is present, else from the
//! usual names in the vocabulary (`<s>`/`</s>`/`<pad>`, Llama 3's
//! `<|begin_of_text|>`/`<|end_of_text|>`). The model's `config.json` may disagree (Llama 3
//! instruct models list several eos ids); [`Tokenizer::set_special_ids`] overrides them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder, TokenizerImpl,
};

/// File name of the tokenizer inside an HF model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// File name of the tokenizer's HF configuration.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// Special tokens of [`train_bpe`] tokenizers, in id order: `<unk>` 0, `<s>` 1, `</s>` 2,
/// `<pad>` 3 (LLaMA 1/2's first three ids, plus a pad token).
pub const SPECIAL_TOKENS: [&str; 4] = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN];
pub const UNK_TOKEN: &str = "<unk>";
pub const BOS_TOKEN: &str = "<s>";
pub const EOS_TOKEN: &str = "</s>";
pub const PAD_TOKEN: &str = "<pad>";

fn tk_err(e: tokenizers::Error) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// A tokenizer with known special ids.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    /// Where it was loaded from, for messages (empty when built in memory).
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .finish()
    }
}

/// `"<s>"` or `{"content": "<s>", …}`.
fn token_content(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(m) => m.get("content").and_then(Value::as_str),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `model_dir/tokenizer.json` (or `model_dir` itself when it is a file) and, when
    /// present, `tokenizer_config.json` beside it for the special tokens.
    pub fn load(model_dir: &Path) -> Result<Self> {
        let path = if model_dir.is_dir() {
            model_dir.join(TOKENIZER_FILE)
        } else {
            model_dir.to_path_buf()
        };
        if !path.is_file() {
            bail!(
                "{}: no tokenizer file (expected {TOKENIZER_FILE} of the `tokenizers` library; \
                 sentencepiece tokenizer.model files are not supported)",
                path.display()
            );
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(tk_err)
            .with_context(|| format!("cannot load tokenizer {}", path.display()))?;
        let mut tok = Tokenizer::from_tokenizer(inner);
        tok.path = path.clone();

        let config_path = path.with_file_name(TOKENIZER_CONFIG_FILE);
        if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("cannot read {}", config_path.display()))?;
            let value: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
            let lookup = |key: &str| -> Result<Option<Option<u32>>> {
                let Some(v) = value.get(key) else {
                    return Ok(None);
                };
                if v.is_null() {
                    return Ok(Some(None));
                }
                let content = token_content(v).with_context(|| {
                    format!(
                        "{}: key \"{key}\": expected a token string or {{\"content\": …}}",
                        config_path.display()
                    )
                })?;
                let id = tok.inner.token_to_id(content).with_context(|| {
                    format!(
                        "{}: key \"{key}\" names the token {content:?}, which is not in {}",
                        config_path.display(),
                        path.display()
                    )
                })?;
                Ok(Some(Some(id)))
            };
            if let Some(id) = lookup("bos_token")? {
                tok.bos = id;
            }
            if let Some(id) = lookup("eos_token")? {
                tok.eos = id;
            }
            if let Some(id) = lookup("pad_token")? {
                tok.pad = id;
            }
        }
        Ok(tok)
    }

    /// Wraps a tokenizer; special ids are found by their usual names.
    pub fn from_tokenizer(inner: tokenizers::Tokenizer) -> Self {
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos = find(&[BOS_TOKEN, "<|begin_of_text|>", "<bos>"]);
        let eos = find(&[EOS_TOKEN, "<|end_of_text|>", "<eos>", "<|endoftext|>"]);
        let pad = find(&[PAD_TOKEN, "<|finetune_right_pad_id|>"]);
        Tokenizer {
            inner,
            bos,
            eos,
            pad,
            path: PathBuf::new(),
        }
    }

    /// Overrides the special ids (e.g. with those of the model's `config.json`).
    pub fn set_special_ids(&mut self, bos: Option<u32>, eos: Option<u32>, pad: Option<u32>) {
        self.bos = bos;
        self.eos = eos;
        self.pad = pad;
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The file it was loaded from (empty when built in memory).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (BOS for LLaMA).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(tk_err)
            .with_context(|| format!("cannot tokenize a text of {} bytes", text.len()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(tk_err)
            .with_context(|| format!("cannot decode {} token ids", ids.len()))
    }

    /// Size of the vocabulary including added tokens (the model's embedding may be larger).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }
}

/// Trains a byte-level BPE on `texts`: GPT-2/Llama-3 style byte-level pre-tokenizer (its
/// regex split, no prefix space) and decoder, no normalizer, all 256 byte symbols in the
/// vocabulary (so nothing is ever unknown), special tokens [`SPECIAL_TOKENS`] with ids 0..3,
/// and a `TemplateProcessing` post-processor that puts `<s>` in front (single: `<s> $A`;
/// pair: `<s> $A <s> $B`). Merges need a pair count of at least 2. The vocabulary has
/// `vocab_size` entries unless the texts run out of pairs first. Deterministic for the same
/// texts.
pub fn train_bpe(texts: &[String], vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let minimum = SPECIAL_TOKENS.len() + alphabet.len();
    if vocab_size < minimum {
        bail!(
            "a byte-level BPE vocabulary needs at least {minimum} entries (4 special tokens and \
             256 bytes), got {vocab_size}"
        );
    }
    if texts.is_empty() {
        bail!("cannot train a tokenizer without texts");
    }
    let byte_level = ByteLevel::new(false, true, true);
    let template = TemplateProcessing::builder()
        .try_single(format!("{BOS_TOKEN} $A"))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .try_pair(format!("{BOS_TOKEN} $A:0 {BOS_TOKEN}:1 $B:1"))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .special_tokens(vec![(BOS_TOKEN, 1)])
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the BOS post-processor: {e}"))?;

    let mut tok: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(byte_level.into()))
        .with_post_processor(Some(template.into()))
        .with_decoder(Some(ByteLevelDecoder::default().into()))
        .build()
        .map_err(tk_err)
        .context("cannot build the tokenizer")?;
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .initial_alphabet(alphabet)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(t.to_string(), true))
                .collect(),
        )
        .build();
    tok.train(&mut trainer, texts.iter())
        .map_err(tk_err)
        .context("BPE training failed")?;
    let tok: tokenizers::Tokenizer = tok.into();
    for (want, name) in SPECIAL_TOKENS.iter().enumerate() {
        if tok.token_to_id(name) != Some(want as u32) {
            bail!("internal: special token {name} did not get id {want}");
        }
    }
    Ok(tok)
}

/// `tokenizer_config.json` for a [`train_bpe`] tokenizer: HF's generic fast tokenizer class
/// (which keeps our post-processor rather than rebuilding one), the special tokens, and
/// `model_max_length`.
pub fn tokenizer_config_json(model_max_length: usize) -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": false,
        "padding_side": "right",
    })
}

/// `special_tokens_map.json` for a [`train_bpe`] tokenizer (read by older transformers).
pub fn special_tokens_map_json() -> Value {
    json!({
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
    })
}
