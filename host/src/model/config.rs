//! HF `config.json` of a LLaMA-family model.
//!
//! [`LlamaConfig::from_json`] reads what `transformers` 4.x and 5.x write and follows
//! `transformers.LlamaConfig`'s defaults for absent keys (`num_key_value_heads` = heads,
//! `head_dim` = hidden / heads, `rms_norm_eps` 1e-6, `max_position_embeddings` 2048,
//! `bos_token_id` 1, `eos_token_id` 2, no pad token, untied embeddings, RoPE theta 10000).
//! The five size keys (`vocab_size`, `hidden_size`, `intermediate_size`,
//! `num_hidden_layers`, `num_attention_heads`) are required: a config without them is almost
//! certainly not the file the user meant.
//!
//! RoPE follows transformers 5's `convert_rope_params_to_dict`: the parameters come from
//! `rope_scaling` when it is a non-empty object, else from `rope_parameters`; `rope_theta` is
//! the one inside that object, else the top-level `rope_theta`, else 10000; the type is
//! `rope_type`, else the legacy `type`, else `"default"`. Supported types: `default`, `linear`,
//! `llama3`; anything else (`dynamic`, `yarn`, …) is an error naming the type.
//!
//! Unsupported architecture variants are errors rather than silently wrong numbers:
//! `attention_bias: true`, `mlp_bias: true`, a `hidden_act` other than `silu`, a
//! `partial_rotary_factor` other than 1.

use std::path::Path;

use anyhow::{Context, Result, bail};
pub use fedcdd_kernels::RopeScaling;
use serde_json::{Map, Value, json};

/// File name of the model configuration inside an HF model directory.
pub const CONFIG_FILE: &str = "config.json";

/// The parts of an HF LLaMA config the model graph needs.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// The config's `head_dim`, or `hidden_size / num_attention_heads` when absent.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` as a list (the JSON holds an int, a list or null).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// `dtype` (transformers 5) or `torch_dtype` (4.x), e.g. `"bfloat16"`.
    pub torch_dtype: Option<String>,
}

/// One HF tensor name of the model and its shape (`[out, in]` for linears).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorShape {
    pub name: String,
    pub shape: Vec<usize>,
}

/// What a JSON key holds, for error messages.
fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Reads keys of one JSON object, naming the file and the key in every error.
struct Reader<'a> {
    obj: &'a Map<String, Value>,
    origin: &'a Path,
    /// Prefix for nested objects, e.g. `rope_scaling.`.
    prefix: &'a str,
}

impl<'a> Reader<'a> {
    /// The value of `key`, `None` when absent or null.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn err(&self, key: &str, what: &str, v: &Value) -> anyhow::Error {
        anyhow::anyhow!(
            "{}: key \"{}{key}\": expected {what}, got {}",
            self.origin.display(),
            self.prefix,
            kind(v)
        )
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.err(key, "a non-negative integer", v)),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| {
            anyhow::anyhow!(
                "{}: missing required key \"{}{key}\"",
                self.origin.display(),
                self.prefix
            )
        })
    }

    /// A positive integer (sizes).
    fn positive(&self, key: &str, value: usize) -> Result<usize> {
        if value == 0 {
            bail!(
                "{}: key \"{}{key}\" must be positive, got 0",
                self.origin.display(),
                self.prefix
            );
        }
        Ok(value)
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.err(key, "a number", v)),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, "true or false", v)),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, "a string", v)),
        }
    }

    /// A token id: absent → `default`, null → `None`.
    fn token_id(&self, key: &str, default: Option<u32>) -> Result<Option<u32>> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.err(key, "a token id (non-negative integer) or null", v)),
        }
    }

    /// A token id or a list of them: absent → `default`, null → empty.
    fn token_ids(&self, key: &str, default: &[u32]) -> Result<Vec<u32>> {
        let one = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match self.obj.get(key) {
            None => Ok(default.to_vec()),
            Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| one(item).ok_or_else(|| self.err(key, "a list of token ids", item)))
                .collect(),
            Some(v) => one(v)
                .map(|id| vec![id])
                .ok_or_else(|| self.err(key, "a token id or a list of token ids", v)),
        }
    }
}

impl LlamaConfig {
    /// Parses and validates the text of a `config.json`; `origin` is only used in messages.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .with_context(|| format!("{} is not valid JSON", origin.display()))?;
        let Value::Object(obj) = &value else {
            bail!(
                "{}: expected a JSON object at the top level, got {}",
                origin.display(),
                kind(&value)
            );
        };
        let r = Reader {
            obj,
            origin,
            prefix: "",
        };

        if let Some(model_type) = r.str_opt("model_type")?
            && model_type != "llama"
        {
            bail!(
                "{}: key \"model_type\" is {model_type:?}; only \"llama\" models are supported",
                origin.display()
            );
        }
        if let Some(arch) = r.get("architectures") {
            let names = arch
                .as_array()
                .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
                .ok_or_else(|| r.err("architectures", "a list of strings", arch))?;
            if !names.is_empty() && !names.contains(&"LlamaForCausalLM") {
                bail!(
                    "{}: key \"architectures\" is {names:?}; only LlamaForCausalLM is supported",
                    origin.display()
                );
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if r.bool_opt(key)? == Some(true) {
                bail!(
                    "{}: key \"{key}\" is true; LLaMA variants with biases are not supported",
                    origin.display()
                );
            }
        }
        if let Some(act) = r.str_opt("hidden_act")?
            && act != "silu"
        {
            bail!(
                "{}: key \"hidden_act\" is {act:?}; only \"silu\" (SwiGLU) is supported",
                origin.display()
            );
        }

        let vocab_size = r.positive("vocab_size", r.usize_req("vocab_size")?)?;
        let hidden_size = r.positive("hidden_size", r.usize_req("hidden_size")?)?;
        let intermediate_size =
            r.positive("intermediate_size", r.usize_req("intermediate_size")?)?;
        let num_hidden_layers =
            r.positive("num_hidden_layers", r.usize_req("num_hidden_layers")?)?;
        let num_attention_heads =
            r.positive("num_attention_heads", r.usize_req("num_attention_heads")?)?;
        let num_key_value_heads = match r.usize_opt("num_key_value_heads")? {
            Some(n) => r.positive("num_key_value_heads", n)?,
            None => num_attention_heads,
        };
        if hidden_size % num_attention_heads != 0 {
            bail!(
                "{}: key \"hidden_size\" ({hidden_size}) is not a multiple of \
                 \"num_attention_heads\" ({num_attention_heads})",
                origin.display()
            );
        }
        if num_attention_heads % num_key_value_heads != 0 {
            bail!(
                "{}: key \"num_attention_heads\" ({num_attention_heads}) is not a multiple of \
                 \"num_key_value_heads\" ({num_key_value_heads})",
                origin.display()
            );
        }
        let head_dim = match r.usize_opt("head_dim")? {
            Some(d) => r.positive("head_dim", d)?,
            None => hidden_size / num_attention_heads,
        };
        if head_dim % 2 != 0 {
            bail!(
                "{}: key \"head_dim\" ({head_dim}) must be even for rotary embeddings",
                origin.display()
            );
        }

        let rms_norm_eps = r.f64_opt("rms_norm_eps")?.unwrap_or(1e-6);
        if rms_norm_eps < 0.0 {
            bail!(
                "{}: key \"rms_norm_eps\" must not be negative, got {rms_norm_eps}",
                origin.display()
            );
        }
        let max_position_embeddings = match r.usize_opt("max_position_embeddings")? {
            Some(n) => r.positive("max_position_embeddings", n)?,
            None => 2048,
        };
        let tie_word_embeddings = r.bool_opt("tie_word_embeddings")?.unwrap_or(false);
        let bos_token_id = r.token_id("bos_token_id", Some(1))?;
        let eos_token_ids = r.token_ids("eos_token_id", &[2])?;
        let pad_token_id = r.token_id("pad_token_id", None)?;
        let torch_dtype = match r.str_opt("dtype")? {
            Some(d) => Some(d.to_string()),
            None => r.str_opt("torch_dtype")?.map(str::to_string),
        };

        let (rope_theta, rope_scaling) = parse_rope(&r, max_position_embeddings)?;

        Ok(LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings,
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            torch_dtype,
        })
    }

    /// Reads `model_dir/config.json` (or `model_dir` itself when it is a file).
    pub fn load(model_dir: &Path) -> Result<Self> {
        let path = if model_dir.is_dir() {
            model_dir.join(CONFIG_FILE)
        } else {
            model_dir.to_path_buf()
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json(&text, &path)
    }

    /// An HF `config.json` that transformers 4.x and 5.x load as this config: the RoPE
    /// parameters are written both the 5.x way (`rope_parameters` with `rope_theta` inside)
    /// and the 4.x way (`rope_theta` + `rope_scaling`).
    pub fn to_json(&self) -> Value {
        let mut rope_parameters = Map::new();
        let rope_scaling = match self.rope_scaling {
            RopeScaling::None => {
                rope_parameters.insert("rope_type".into(), json!("default"));
                Value::Null
            }
            RopeScaling::Linear { factor } => {
                rope_parameters.insert("rope_type".into(), json!("linear"));
                rope_parameters.insert("factor".into(), json!(factor));
                Value::Object(rope_parameters.clone())
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                rope_parameters.insert("rope_type".into(), json!("llama3"));
                rope_parameters.insert("factor".into(), json!(factor));
                rope_parameters.insert("low_freq_factor".into(), json!(low_freq_factor));
                rope_parameters.insert("high_freq_factor".into(), json!(high_freq_factor));
                // An integer in every published Llama 3 config.
                let omp = if original_max_position_embeddings.fract() == 0.0
                    && (0.0..9.0e15).contains(&original_max_position_embeddings)
                {
                    json!(original_max_position_embeddings as u64)
                } else {
                    json!(original_max_position_embeddings)
                };
                rope_parameters.insert("original_max_position_embeddings".into(), omp);
                Value::Object(rope_parameters.clone())
            }
        };
        rope_parameters.insert("rope_theta".into(), json!(self.rope_theta));
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let mut obj = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": 0.02,
            "rms_norm_eps": self.rms_norm_eps,
            "use_cache": true,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "pretraining_tp": 1,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "rope_parameters": Value::Object(rope_parameters),
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
        });
        if let (Some(dtype), Value::Object(map)) = (&self.torch_dtype, &mut obj) {
            map.insert("dtype".into(), json!(dtype));
            map.insert("torch_dtype".into(), json!(dtype));
        }
        obj
    }

    /// Width of the query projection's output, `num_attention_heads · head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key and value projections' outputs, `num_key_value_heads · head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Every tensor of an HF `LlamaForCausalLM` checkpoint with its shape, in the order
    /// HF's state dict lists them (embeddings, layer by layer, final norm, `lm_head` unless
    /// tied).
    pub fn tensor_shapes(&self) -> Vec<TensorShape> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let mut out = Vec::with_capacity(self.num_hidden_layers * 9 + 3);
        let mut push = |name: String, shape: Vec<usize>| out.push(TensorShape { name, shape });
        push("model.embed_tokens.weight".into(), vec![v, h]);
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            push(
                format!("{p}.self_attn.q_proj.weight"),
                vec![self.q_dim(), h],
            );
            push(
                format!("{p}.self_attn.k_proj.weight"),
                vec![self.kv_dim(), h],
            );
            push(
                format!("{p}.self_attn.v_proj.weight"),
                vec![self.kv_dim(), h],
            );
            push(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, self.q_dim()],
            );
            push(format!("{p}.mlp.gate_proj.weight"), vec![i, h]);
            push(format!("{p}.mlp.up_proj.weight"), vec![i, h]);
            push(format!("{p}.mlp.down_proj.weight"), vec![h, i]);
            push(format!("{p}.input_layernorm.weight"), vec![h]);
            push(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        }
        push("model.norm.weight".into(), vec![h]);
        if !self.tie_word_embeddings {
            push("lm_head.weight".into(), vec![v, h]);
        }
        out
    }

    /// Number of parameters of the model (what `model.num_parameters()` reports in HF,
    /// counting tied embeddings once).
    pub fn num_parameters(&self) -> u64 {
        self.tensor_shapes()
            .iter()
            .map(|t| t.shape.iter().map(|&d| d as u64).product::<u64>())
            .sum()
    }
}

/// `(rope_theta, scaling)` following transformers 5 (see the module docs).
fn parse_rope(r: &Reader<'_>, max_position_embeddings: usize) -> Result<(f64, RopeScaling)> {
    let origin = r.origin;
    let non_empty_object = |key: &str| -> Result<Option<&Map<String, Value>>> {
        match r.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) if m.is_empty() => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(r.err(key, "an object or null", v)),
        }
    };
    let (section, params) = match non_empty_object("rope_scaling")? {
        Some(m) => ("rope_scaling", Some(m)),
        None => ("rope_parameters", non_empty_object("rope_parameters")?),
    };
    let top_theta = r.f64_opt("rope_theta")?;
    let Some(params) = params else {
        return Ok((
            check_theta(origin, top_theta.unwrap_or(10_000.0))?,
            RopeScaling::None,
        ));
    };
    let prefix = format!("{section}.");
    let p = Reader {
        obj: params,
        origin,
        prefix: &prefix,
    };
    let theta = match p.f64_opt("rope_theta")? {
        Some(t) => t,
        None => top_theta.unwrap_or(10_000.0),
    };
    let theta = check_theta(origin, theta)?;
    if let Some(f) = p.f64_opt("partial_rotary_factor")?
        && f != 1.0
    {
        bail!(
            "{}: key \"{section}.partial_rotary_factor\" is {f}; partial rotary embeddings are \
             not supported by LLaMA",
            origin.display()
        );
    }
    let rope_type = match p.str_opt("rope_type")? {
        Some(t) => t,
        None => p.str_opt("type")?.unwrap_or("default"),
    };
    let factor = |p: &Reader<'_>| -> Result<f64> {
        let f = p.f64_opt("factor")?.ok_or_else(|| {
            anyhow::anyhow!(
                "{}: missing required key \"{section}.factor\" (rope type {rope_type:?})",
                origin.display()
            )
        })?;
        if f < 1.0 {
            bail!(
                "{}: key \"{section}.factor\" must be at least 1, got {f}",
                origin.display()
            );
        }
        Ok(f)
    };
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: factor(&p)?,
        },
        "llama3" => {
            let factor = factor(&p)?;
            let need = |key: &str| -> Result<f64> {
                p.f64_opt(key)?.ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: missing required key \"{section}.{key}\" (rope type \"llama3\")",
                        origin.display()
                    )
                })
            };
            let low_freq_factor = need("low_freq_factor")?;
            let high_freq_factor = need("high_freq_factor")?;
            if !(high_freq_factor > low_freq_factor && low_freq_factor > 0.0) {
                bail!(
                    "{}: keys \"{section}.low_freq_factor\" ({low_freq_factor}) and \
                     \"{section}.high_freq_factor\" ({high_freq_factor}) need 0 < low < high",
                    origin.display()
                );
            }
            let original = match p.f64_opt("original_max_position_embeddings")? {
                Some(v) if v > 0.0 => v,
                Some(v) => bail!(
                    "{}: key \"{section}.original_max_position_embeddings\" must be positive, \
                     got {v}",
                    origin.display()
                ),
                None => max_position_embeddings as f64,
            };
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            }
        }
        other => bail!(
            "{}: key \"{section}.rope_type\" is {other:?}; supported RoPE types are \"default\", \
             \"linear\" and \"llama3\"",
            origin.display()
        ),
    };
    Ok((theta, scaling))
}

fn check_theta(origin: &Path, theta: f64) -> Result<f64> {
    if theta <= 0.0 {
        bail!(
            "{}: key \"rope_theta\" must be positive, got {theta}",
            origin.display()
        );
    }
    Ok(theta)
}
