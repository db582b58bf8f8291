//! Model inputs: `config.json` parsing, memory-mapped checkpoints (read and streaming write),
//! the byte-level BPE tokenizer, `init-model` presets, and (when python3 with torch and
//! transformers is available) loading the written directories with HF transformers.
//!
//! Safetensors inputs for the reader are crafted here by hand (8-byte header length, JSON
//! header, raw bytes), independently of the host's writer; the writer's output is checked
//! with the same hand-rolled parser.

mod python_util;
use python_util::{PY_ENV, python, python_has_modules};

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use fedcdd_host::data::tokenizer::{Tokenizer, train_bpe};
use fedcdd_host::model::checkpoint::{
    Checkpoint, INDEX_FILE, MODEL_FILE, TensorData, TensorToWrite, WeightDType, WriteOptions,
    parse_size, write_checkpoint,
};
use fedcdd_host::model::config::{LlamaConfig, RopeScaling};
use fedcdd_host::model::init::{InitModelOptions, Preset, build_model};
use half::{bf16, f16};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("fedcdd-model-io-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The whole error chain.
fn msg<E: std::fmt::Display>(e: &E) -> String {
    format!("{e:#}")
}

/// The error chain of a result that must be an error.
fn err_of<T, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn origin() -> &'static Path {
    Path::new("/models/x/config.json")
}

/// A raw tensor for the hand-written safetensors files.
struct Raw {
    name: &'static str,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
        .collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
        .collect()
}

/// Writes a safetensors file by hand.
fn write_raw(path: &Path, tensors: &[Raw]) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut data = Vec::new();
    for t in tensors {
        let start = data.len();
        data.extend_from_slice(&t.bytes);
        header.insert(
            t.name.into(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut head = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut bytes = (head.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&head);
    bytes.extend_from_slice(&data);
    fs::write(path, bytes).unwrap();
}

/// Parses a safetensors file by hand: name → (dtype, shape, bytes); also checks the layout
/// (offsets contiguous from 0, data section exactly covered, 8-byte aligned start).
fn read_raw(path: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(
        (8 + n) % 8,
        0,
        "{}: data not 8-byte aligned",
        path.display()
    );
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = BTreeMap::new();
    let mut spans = Vec::new();
    for (k, v) in header.as_object().unwrap() {
        if k == "__metadata__" {
            assert_eq!(v["format"], "pt");
            continue;
        }
        let offs: Vec<usize> = v["data_offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        spans.push((offs[0], offs[1]));
        let shape = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        out.insert(
            k.clone(),
            (
                v["dtype"].as_str().unwrap().to_string(),
                shape,
                data[offs[0]..offs[1]].to_vec(),
            ),
        );
    }
    spans.sort();
    let mut pos = 0;
    for (s, e) in spans {
        assert_eq!(s, pos, "{}: offsets not contiguous", path.display());
        pos = e;
    }
    assert_eq!(
        pos,
        data.len(),
        "{}: data section not covered",
        path.display()
    );
    out
}

fn base_config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 1000,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096
    })
}

fn parse(v: &Value) -> Result<LlamaConfig, String> {
    LlamaConfig::from_json(&v.to_string(), origin()).map_err(|e| format!("{e:#}"))
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    v.as_object_mut().unwrap().insert(key.into(), value);
    v
}

fn without(mut v: Value, key: &str) -> Value {
    v.as_object_mut().unwrap().remove(key);
    v
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

#[test]
fn config_gqa_and_hf_defaults() {
    let c = parse(&base_config()).unwrap();
    assert_eq!(c.vocab_size, 1000);
    assert_eq!(c.hidden_size, 256);
    assert_eq!(c.num_attention_heads, 8);
    assert_eq!(c.num_key_value_heads, 2);
    assert_eq!(c.head_dim, 32, "head_dim absent: hidden / heads");
    assert_eq!(c.q_dim(), 256);
    assert_eq!(c.kv_dim(), 64);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.max_position_embeddings, 4096);
    // transformers.LlamaConfig defaults for what is absent
    assert_eq!(c.rope_theta, 10000.0);
    assert_eq!(c.rope_scaling, RopeScaling::None);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_ids, vec![2]);
    assert_eq!(c.pad_token_id, None);
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.torch_dtype, None);

    // kv heads absent → MHA; model_type and architectures may be absent.
    let c = parse(&without(
        without(without(base_config(), "num_key_value_heads"), "model_type"),
        "architectures",
    ))
    .unwrap();
    assert_eq!(c.num_key_value_heads, 8);
    let c = parse(&without(base_config(), "rms_norm_eps")).unwrap();
    assert_eq!(c.rms_norm_eps, 1e-6);
}

#[test]
fn config_head_dim_present_overrides_hidden_over_heads() {
    let c = parse(&with(base_config(), "head_dim", json!(64))).unwrap();
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.q_dim(), 512);
    assert_eq!(c.kv_dim(), 128);
    // null means absent (transformers writes it so)
    let c = parse(&with(base_config(), "head_dim", Value::Null)).unwrap();
    assert_eq!(c.head_dim, 32);
    let e = msg(&parse(&with(base_config(), "head_dim", json!(33))).unwrap_err());
    assert!(e.contains("head_dim") && e.contains("even"), "{e}");
}

#[test]
fn config_rope_parameters_and_rope_scaling() {
    // transformers 5: everything inside rope_parameters.
    let v = with(
        base_config(),
        "rope_parameters",
        json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}),
    );
    let c = parse(&v).unwrap();
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(
        c.rope_scaling,
        RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0
        }
    );
    // transformers 5 default rope
    let v = with(
        base_config(),
        "rope_parameters",
        json!({"rope_type": "default", "rope_theta": 1234.5}),
    );
    let c = parse(&v).unwrap();
    assert_eq!((c.rope_theta, c.rope_scaling), (1234.5, RopeScaling::None));

    // transformers 4: top-level rope_theta, legacy "type" key.
    let v = with(
        with(base_config(), "rope_theta", json!(20000)),
        "rope_scaling",
        json!({"type": "linear", "factor": 4}),
    );
    let c = parse(&v).unwrap();
    assert_eq!(c.rope_theta, 20000.0);
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 4.0 });

    // rope_scaling wins over rope_parameters (transformers 5's rule); original max positions
    // default to max_position_embeddings.
    let v = with(
        with(
            base_config(),
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0}),
        ),
        "rope_parameters",
        json!({"rope_type": "default", "rope_theta": 77.0}),
    );
    let c = parse(&v).unwrap();
    assert_eq!(
        c.rope_scaling,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 4096.0
        }
    );
    assert_eq!(c.rope_theta, 10000.0);
    // null rope_scaling falls through to rope_parameters
    let v = with(
        with(base_config(), "rope_scaling", Value::Null),
        "rope_parameters",
        json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 99.0}),
    );
    let c = parse(&v).unwrap();
    assert_eq!(
        (c.rope_theta, c.rope_scaling),
        (99.0, RopeScaling::Linear { factor: 2.0 })
    );

    // unsupported types name the type
    for t in ["yarn", "dynamic", "longrope"] {
        let v = with(
            base_config(),
            "rope_scaling",
            json!({"rope_type": t, "factor": 2.0}),
        );
        let e = msg(&parse(&v).unwrap_err());
        assert!(e.contains(t) && e.contains("rope_scaling"), "{e}");
    }
    // missing llama3 keys name the key
    let v = with(
        base_config(),
        "rope_parameters",
        json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}),
    );
    let e = msg(&parse(&v).unwrap_err());
    assert!(e.contains("rope_parameters.high_freq_factor"), "{e}");
    let v = with(base_config(), "rope_scaling", json!({"type": "linear"}));
    assert!(msg(&parse(&v).unwrap_err()).contains("rope_scaling.factor"));
}

#[test]
fn config_bos_eos_int_list_null_and_dtype() {
    let v = with(
        with(
            with(base_config(), "bos_token_id", json!(128000)),
            "eos_token_id",
            json!([128001, 128008, 128009]),
        ),
        "pad_token_id",
        json!(5),
    );
    let c = parse(&v).unwrap();
    assert_eq!(c.bos_token_id, Some(128000));
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    assert_eq!(c.pad_token_id, Some(5));

    let v = with(
        with(base_config(), "bos_token_id", Value::Null),
        "eos_token_id",
        json!(7),
    );
    let c = parse(&v).unwrap();
    assert_eq!((c.bos_token_id, c.eos_token_ids), (None, vec![7]));
    let c = parse(&with(base_config(), "eos_token_id", Value::Null)).unwrap();
    assert!(c.eos_token_ids.is_empty());

    let c = parse(&with(base_config(), "torch_dtype", json!("float16"))).unwrap();
    assert_eq!(c.torch_dtype.as_deref(), Some("float16"));
    let c = parse(&with(
        with(base_config(), "torch_dtype", json!("float16")),
        "dtype",
        json!("bfloat16"),
    ))
    .unwrap();
    assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"), "dtype wins");

    for bad in [json!("2"), json!(-1), json!([1, "x"]), json!(1.5)] {
        let e = msg(&parse(&with(base_config(), "eos_token_id", bad.clone())).unwrap_err());
        assert!(e.contains("\"eos_token_id\""), "{bad}: {e}");
    }
}

#[test]
fn config_errors_name_the_file_and_key() {
    let file = origin().display().to_string();
    // bad JSON
    let e = msg(&LlamaConfig::from_json("{\"vocab_size\": 12,", origin()).unwrap_err());
    assert!(e.contains(&file) && e.contains("JSON"), "{e}");
    let e = msg(&LlamaConfig::from_json("[1, 2]", origin()).unwrap_err());
    assert!(e.contains(&file), "{e}");
    // each required key
    for key in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ] {
        let e = msg(&parse(&without(base_config(), key)).unwrap_err());
        assert!(
            e.contains(&file) && e.contains(&format!("\"{key}\"")) && e.contains("missing"),
            "{key}: {e}"
        );
        let e = msg(&parse(&with(base_config(), key, json!("256"))).unwrap_err());
        assert!(e.contains(&format!("\"{key}\"")), "{key}: {e}");
        let e = msg(&parse(&with(base_config(), key, json!(0))).unwrap_err());
        assert!(e.contains(&format!("\"{key}\"")), "{key}: {e}");
    }
    let cases: Vec<(Value, &str)> = vec![
        (
            with(base_config(), "num_attention_heads", json!(6)),
            "hidden_size",
        ),
        (
            with(base_config(), "num_key_value_heads", json!(3)),
            "num_key_value_heads",
        ),
        (
            with(base_config(), "attention_bias", json!(true)),
            "attention_bias",
        ),
        (with(base_config(), "mlp_bias", json!(true)), "mlp_bias"),
        (
            with(base_config(), "hidden_act", json!("gelu")),
            "hidden_act",
        ),
        (
            with(base_config(), "model_type", json!("mistral")),
            "model_type",
        ),
        (
            with(
                base_config(),
                "architectures",
                json!(["LlamaForSequenceClassification"]),
            ),
            "architectures",
        ),
        (
            with(base_config(), "rms_norm_eps", json!("small")),
            "rms_norm_eps",
        ),
        (
            with(base_config(), "tie_word_embeddings", json!(1)),
            "tie_word_embeddings",
        ),
        (with(base_config(), "rope_theta", json!(-1.0)), "rope_theta"),
        (
            with(base_config(), "rope_scaling", json!("linear")),
            "rope_scaling",
        ),
    ];
    for (v, key) in cases {
        let e = msg(&parse(&v).unwrap_err());
        assert!(e.contains(&file) && e.contains(key), "{key}: {e}");
    }
    // biases set to false are fine
    parse(&with(
        with(base_config(), "attention_bias", json!(false)),
        "mlp_bias",
        json!(false),
    ))
    .unwrap();
    // load names the missing file
    let dir = TempDir::new("cfg-missing");
    let e = msg(&LlamaConfig::load(dir.path()).unwrap_err());
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn config_to_json_round_trips_every_preset() {
    let presets = [
        Preset::Tiny,
        Preset::Small,
        Preset::Llama2_7b,
        Preset::Llama3_8b,
        Preset::Llama3_2_1b,
        Preset::TinyLlama1_1b,
        Preset::SmolLm2_135m,
    ];
    for p in presets {
        let mut c = p.config();
        c.torch_dtype = Some("bfloat16".into());
        let text = c.to_json().to_string();
        let back = LlamaConfig::from_json(&text, origin()).unwrap();
        assert_eq!(back, c, "{p:?}");
    }
    // several eos ids and no bos survive too
    let mut c = Preset::Tiny.config();
    c.eos_token_ids = vec![2, 9];
    c.bos_token_id = None;
    c.rope_scaling = RopeScaling::Linear { factor: 2.5 };
    let back = LlamaConfig::from_json(&c.to_json().to_string(), origin()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn parameter_counts_match_the_published_models() {
    // Published parameter counts of the real models (HF `num_parameters()`).
    let count = |p: Preset| p.config().num_parameters();
    assert_eq!(count(Preset::Llama2_7b), 6_738_415_616);
    assert_eq!(count(Preset::Llama3_8b), 8_030_261_248);
    assert_eq!(count(Preset::Llama3_2_1b), 1_235_814_400);
    assert_eq!(count(Preset::TinyLlama1_1b), 1_100_048_384);
    assert_eq!(count(Preset::SmolLm2_135m), 134_515_008);
    // tiny: embed + lm_head 2·2048·256, 4 layers of (q 256² + k,v 2·128·256 + o 256² +
    // 3·256·688 + 2·256), final norm 256.
    let layer = 256 * 256 + 2 * 128 * 256 + 256 * 256 + 3 * 256 * 688 + 2 * 256;
    assert_eq!(count(Preset::Tiny), 2 * 2048 * 256 + 4 * layer + 256);
    let shapes = Preset::Llama3_2_1b.config().tensor_shapes();
    assert!(!shapes.iter().any(|t| t.name == "lm_head.weight"), "tied");
    assert_eq!(shapes.len(), 1 + 16 * 9 + 1);
    let k = shapes
        .iter()
        .find(|t| t.name == "model.layers.3.self_attn.k_proj.weight")
        .unwrap();
    assert_eq!(k.shape, vec![8 * 64, 2048]);
}

// ---------------------------------------------------------------------------------------------
// Checkpoint reading
// ---------------------------------------------------------------------------------------------

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect()
}

fn weight_f32(w: &fedcdd_host::model::checkpoint::WeightSource) -> Vec<f32> {
    let bytes: &[u8] = (*w.bytes).as_ref();
    let b = &bytes[w.offset..w.offset + w.byte_len()];
    match w.dtype {
        WeightDType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        WeightDType::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        WeightDType::Bf16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

#[test]
fn checkpoint_single_file_all_dtypes() {
    let dir = TempDir::new("ck-single");
    let a = values(12, 0.0);
    let b = values(6, 1.0);
    let c = values(4, 2.0);
    write_raw(
        &dir.join(MODEL_FILE),
        &[
            Raw {
                name: "a.weight",
                dtype: "F32",
                shape: vec![3, 4],
                bytes: f32_bytes(&a),
            },
            Raw {
                name: "b.weight",
                dtype: "F16",
                shape: vec![2, 3],
                bytes: f16_bytes(&b),
            },
            Raw {
                name: "norm.weight",
                dtype: "BF16",
                shape: vec![4],
                bytes: bf16_bytes(&c),
            },
            Raw {
                name: "ids",
                dtype: "I64",
                shape: vec![2],
                bytes: vec![0; 16],
            },
        ],
    );
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(
        ck.names(),
        vec!["a.weight", "b.weight", "ids", "norm.weight"]
    );
    assert!(ck.has("a.weight") && !ck.has("lm_head.weight"));

    let w = ck.weight("a.weight", &[3, 4]).unwrap();
    assert_eq!((w.rows, w.cols, w.dtype), (3, 4, WeightDType::F32));
    assert_eq!(weight_f32(&w), a);
    let w = ck.weight("b.weight", &[2, 3]).unwrap();
    assert_eq!((w.rows, w.cols, w.dtype), (2, 3, WeightDType::F16));
    let want: Vec<f32> = b.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    assert_eq!(weight_f32(&w), want);
    let w = ck.weight("norm.weight", &[4]).unwrap();
    assert_eq!(
        (w.rows, w.cols, w.dtype),
        (1, 4, WeightDType::Bf16),
        "1-D is rows = 1"
    );
    let want: Vec<f32> = c.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    assert_eq!(weight_f32(&w), want);
    assert_eq!(ck.read_f32("norm.weight").unwrap(), want);

    // no copy: the weight points into one shared mapping
    let w1 = ck.weight("a.weight", &[3, 4]).unwrap();
    let w2 = ck.weight("b.weight", &[2, 3]).unwrap();
    assert!(std::sync::Arc::ptr_eq(&w1.bytes, &w2.bytes));

    // wrong shape names the tensor, the file and both shapes
    let e = err_of(ck.weight("a.weight", &[4, 3]));
    assert!(
        e.contains("\"a.weight\"") && e.contains("[3, 4]") && e.contains("[4, 3]"),
        "{e}"
    );
    assert!(e.contains(MODEL_FILE), "{e}");
    let e = err_of(ck.weight("norm.weight", &[1, 4]));
    assert!(e.contains("norm.weight"), "{e}");
    // unsupported dtype and missing tensors
    let e = err_of(ck.weight("ids", &[2]));
    assert!(
        e.contains("\"ids\"") && e.contains("I64") && e.contains(MODEL_FILE),
        "{e}"
    );
    let e = err_of(ck.weight("lm_head.weight", &[3, 4]));
    assert!(e.contains("lm_head.weight"), "{e}");
    let meta = ck.meta("ids").unwrap();
    assert_eq!((meta.dtype, meta.dtype_name.as_str()), (None, "I64"));

    // a direct file path opens too
    let ck2 = Checkpoint::open(&dir.join(MODEL_FILE)).unwrap();
    assert_eq!(ck2.names().len(), 4);
}

#[test]
fn checkpoint_sharded_index() {
    let dir = TempDir::new("ck-shards");
    let a = values(8, 0.0);
    let b = values(8, 5.0);
    let c = values(3, 9.0);
    write_raw(
        &dir.join("model-00001-of-00002.safetensors"),
        &[
            Raw {
                name: "a",
                dtype: "F32",
                shape: vec![2, 4],
                bytes: f32_bytes(&a),
            },
            // listed in the file but mapped elsewhere by the index: ignored like HF does
            Raw {
                name: "c",
                dtype: "F32",
                shape: vec![3],
                bytes: f32_bytes(&values(3, 0.5)),
            },
        ],
    );
    write_raw(
        &dir.join("model-00002-of-00002.safetensors"),
        &[
            Raw {
                name: "b",
                dtype: "BF16",
                shape: vec![8],
                bytes: bf16_bytes(&b),
            },
            Raw {
                name: "c",
                dtype: "F32",
                shape: vec![3],
                bytes: f32_bytes(&c),
            },
        ],
    );
    let index = json!({"metadata": {"total_size": 60}, "weight_map": {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"}});
    fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.names(), vec!["a", "b", "c"]);
    assert_eq!(ck.files().len(), 2);
    assert_eq!(weight_f32(&ck.weight("a", &[2, 4]).unwrap()), a);
    assert_eq!(ck.read_f32("c").unwrap(), c);
    assert!(
        ck.meta("b")
            .unwrap()
            .file
            .ends_with("model-00002-of-00002.safetensors")
    );

    // an index naming a tensor its shard lacks
    let bad = json!({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                    "zz": "model-00001-of-00002.safetensors"}});
    fs::write(dir.join(INDEX_FILE), bad.to_string()).unwrap();
    let e = msg(&Checkpoint::open(dir.path()).unwrap_err());
    assert!(e.contains("\"zz\"") && e.contains(INDEX_FILE), "{e}");
    // hostile shard names
    for name in [
        "../model.safetensors",
        "/etc/passwd",
        "sub/x.safetensors",
        "..",
    ] {
        let bad = json!({"weight_map": {"a": name}});
        fs::write(dir.join(INDEX_FILE), bad.to_string()).unwrap();
        let e = msg(&Checkpoint::open(dir.path()).unwrap_err());
        assert!(e.contains("plain file name"), "{name}: {e}");
    }
    // a missing shard, an empty or wrong weight map, bad JSON
    let bad = json!({"weight_map": {"a": "model-00009-of-00009.safetensors"}});
    fs::write(dir.join(INDEX_FILE), bad.to_string()).unwrap();
    let e = msg(&Checkpoint::open(dir.path()).unwrap_err());
    assert!(e.contains("model-00009-of-00009.safetensors"), "{e}");
    for bad in [
        json!({}),
        json!({"weight_map": {}}),
        json!({"weight_map": {"a": 3}}),
    ] {
        fs::write(dir.join(INDEX_FILE), bad.to_string()).unwrap();
        let e = msg(&Checkpoint::open(dir.path()).unwrap_err());
        assert!(
            e.contains(INDEX_FILE) && e.contains("weight_map"),
            "{bad}: {e}"
        );
    }
    fs::write(dir.join(INDEX_FILE), "{not json").unwrap();
    let e = msg(&Checkpoint::open(dir.path()).unwrap_err());
    assert!(e.contains(INDEX_FILE), "{e}");
}

#[test]
fn checkpoint_truncated_or_garbage_files_are_errors() {
    let dir = TempDir::new("ck-trunc");
    let good = dir.join("good.safetensors");
    write_raw(
        &good,
        &[
            Raw {
                name: "a",
                dtype: "F32",
                shape: vec![4, 4],
                bytes: f32_bytes(&values(16, 0.0)),
            },
            Raw {
                name: "b",
                dtype: "BF16",
                shape: vec![5],
                bytes: bf16_bytes(&values(5, 0.0)),
            },
        ],
    );
    let bytes = fs::read(&good).unwrap();
    let model = dir.join(MODEL_FILE);
    let cuts = [
        0,
        1,
        7,
        8,
        9,
        30,
        bytes.len() / 2,
        bytes.len() - 2,
        bytes.len() - 1,
    ];
    for cut in cuts {
        fs::write(&model, &bytes[..cut]).unwrap();
        let e = msg(&Checkpoint::open(dir.path()).unwrap_err());
        assert!(e.contains(MODEL_FILE), "cut {cut}: {e}");
    }
    let mut long = bytes.clone();
    long.extend_from_slice(&[0, 0]);
    fs::write(&model, &long).unwrap();
    assert!(Checkpoint::open(dir.path()).is_err(), "trailing bytes");

    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    let overlapping = {
        let h = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        let mut v = (h.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(h);
        v.extend_from_slice(&[0; 12]);
        v
    };
    let overflow = {
        let h = br#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#;
        let mut v = (h.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(h);
        v.extend_from_slice(&[0; 8]);
        v
    };
    for junk in [
        b"certainly not a safetensors file".to_vec(),
        huge,
        overlapping,
        overflow,
        vec![0xff; 64],
    ] {
        fs::write(&model, &junk).unwrap();
        let e = msg(&Checkpoint::open(dir.path()).unwrap_err());
        assert!(e.contains(MODEL_FILE), "{e}");
    }
    // nothing there, or only pickles
    let empty = TempDir::new("ck-empty");
    let e = msg(&Checkpoint::open(empty.path()).unwrap_err());
    assert!(e.contains(MODEL_FILE) && e.contains(INDEX_FILE), "{e}");
    fs::write(empty.join("pytorch_model.bin"), b"pickle").unwrap();
    let e = msg(&Checkpoint::open(empty.path()).unwrap_err());
    assert!(e.contains("safe_serialization=True"), "{e}");
    let e = msg(&Checkpoint::open(&empty.join("nope")).unwrap_err());
    assert!(e.contains("nope"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Checkpoint writing
// ---------------------------------------------------------------------------------------------

#[test]
fn write_checkpoint_single_converts_and_is_parseable() {
    let dir = TempDir::new("wr-single");
    let a = values(6, 0.0);
    let b = values(5, 3.0);
    let b_bf16 = bf16_bytes(&b);
    for (dtype, name, enc) in [
        (WeightDType::F32, "F32", f32_bytes as fn(&[f32]) -> Vec<u8>),
        (WeightDType::F16, "F16", f16_bytes),
        (WeightDType::Bf16, "BF16", bf16_bytes),
    ] {
        let tensors = vec![
            TensorToWrite::new("x.a", vec![2, 3], TensorData::F32(&a)),
            TensorToWrite::new(
                "x.b",
                vec![5],
                TensorData::Raw {
                    dtype: WeightDType::Bf16,
                    bytes: &b_bf16,
                },
            ),
            TensorToWrite::new(
                "x.c",
                vec![3, 2],
                TensorData::generate(|start, out: &mut [f32]| {
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = (start + i) as f32 * 0.5;
                    }
                }),
            ),
        ];
        let files = write_checkpoint(dir.path(), tensors, WriteOptions::new(dtype)).unwrap();
        assert_eq!(files, vec![dir.join(MODEL_FILE)]);
        let raw = read_raw(&dir.join(MODEL_FILE));
        let b_round: Vec<f32> = b.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        let gen_vals: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        assert_eq!(raw["x.a"], (name.to_string(), vec![2, 3], enc(&a)));
        assert_eq!(raw["x.b"], (name.to_string(), vec![5], enc(&b_round)));
        assert_eq!(raw["x.c"], (name.to_string(), vec![3, 2], enc(&gen_vals)));
        // and our reader agrees
        let ck = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ck.meta("x.a").unwrap().dtype, Some(dtype));
        drop(ck);
    }
    assert!(!dir.join(INDEX_FILE).exists());
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, vec![MODEL_FILE.to_string()]);
}

fn mk(data: &[Vec<f32>]) -> Vec<TensorToWrite<'_>> {
    data.iter()
        .enumerate()
        .map(|(i, d)| TensorToWrite::new(format!("t{i}"), vec![10, 10], TensorData::F32(d)))
        .collect()
}

#[test]
fn write_checkpoint_shards_like_hf_and_removes_stale_layouts() {
    let dir = TempDir::new("wr-shards");
    let data: Vec<Vec<f32>> = (0..5).map(|i| values(100, i as f32)).collect();
    // 400 bytes each; limit 1000 → shards of 2, 2, 1 tensors
    let mut opts = WriteOptions::new(WeightDType::F32);
    opts.max_shard_bytes = 1000;
    let files = write_checkpoint(dir.path(), mk(&data), opts).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec![
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
            INDEX_FILE
        ]
    );
    let index: Value = serde_json::from_slice(&fs::read(dir.join(INDEX_FILE)).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], 2000);
    assert_eq!(
        index["weight_map"]["t0"],
        "model-00001-of-00003.safetensors"
    );
    assert_eq!(
        index["weight_map"]["t1"],
        "model-00001-of-00003.safetensors"
    );
    assert_eq!(
        index["weight_map"]["t2"],
        "model-00002-of-00003.safetensors"
    );
    assert_eq!(
        index["weight_map"]["t4"],
        "model-00003-of-00003.safetensors"
    );
    let raw = read_raw(&dir.join("model-00002-of-00003.safetensors"));
    assert_eq!(raw.keys().collect::<Vec<_>>(), vec!["t2", "t3"]);
    let ck = Checkpoint::open(dir.path()).unwrap();
    for (i, d) in data.iter().enumerate() {
        assert_eq!(&ck.read_f32(&format!("t{i}")).unwrap(), d);
    }
    drop(ck);

    // A single tensor above the limit gets its own shard.
    let mut opts = WriteOptions::new(WeightDType::F32);
    opts.max_shard_bytes = 300;
    let files = write_checkpoint(dir.path(), mk(&data[..2]), opts).unwrap();
    assert_eq!(files.len(), 3);
    // old shards of the 3-shard layout are gone
    assert!(!dir.join("model-00003-of-00003.safetensors").exists());
    assert!(!dir.join("model-00001-of-00003.safetensors").exists());

    // Rewriting as one file removes the shards and the index, and vice versa.
    fs::write(dir.join("notes.txt"), b"keep me").unwrap();
    write_checkpoint(dir.path(), mk(&data), WriteOptions::new(WeightDType::Bf16)).unwrap();
    let mut left: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec![MODEL_FILE, "notes.txt"]);
    let mut opts = WriteOptions::new(WeightDType::F32);
    opts.max_shard_bytes = 1000;
    write_checkpoint(dir.path(), mk(&data), opts).unwrap();
    assert!(!dir.join(MODEL_FILE).exists());
    assert!(dir.join(INDEX_FILE).exists());
    assert!(dir.join("notes.txt").exists());
}

#[test]
fn write_checkpoint_generates_in_bounded_whole_row_chunks() {
    use fedcdd_host::model::checkpoint::CHUNK_ELEMENTS;
    let dir = TempDir::new("wr-chunks");
    let rows = 3 * CHUNK_ELEMENTS / 1000 + 7;
    let cols = 1000;
    let calls = std::cell::RefCell::new(Vec::new());
    let tensors = vec![TensorToWrite::new(
        "big",
        vec![rows, cols],
        TensorData::generate(|start, out: &mut [f32]| {
            calls.borrow_mut().push((start, out.len()));
            for (i, o) in out.iter_mut().enumerate() {
                *o = ((start + i) % 251) as f32;
            }
        }),
    )];
    write_checkpoint(dir.path(), tensors, WriteOptions::new(WeightDType::Bf16)).unwrap();
    let calls = calls.into_inner();
    assert!(calls.len() >= 4, "{calls:?}");
    let mut next = 0;
    for &(start, len) in &calls {
        assert_eq!(start, next, "consecutive");
        assert!(
            len <= CHUNK_ELEMENTS && len % cols == 0,
            "whole rows, bounded: {len}"
        );
        next += len;
    }
    assert_eq!(next, rows * cols);
    let ck = Checkpoint::open(dir.path()).unwrap();
    let v = ck.read_f32("big").unwrap();
    assert!(v.iter().enumerate().all(|(i, &x)| x == (i % 251) as f32));
}

#[test]
fn write_checkpoint_failure_keeps_the_old_checkpoint() {
    let dir = TempDir::new("wr-fail");
    let old = values(4, 0.0);
    write_checkpoint(
        dir.path(),
        vec![TensorToWrite::new("a", vec![4], TensorData::F32(&old))],
        WriteOptions::new(WeightDType::F32),
    )
    .unwrap();
    let before = fs::read(dir.join(MODEL_FILE)).unwrap();
    let good = values(4, 1.0);
    let failing = || {
        vec![
            TensorToWrite::new("a", vec![4], TensorData::F32(&good)),
            TensorToWrite::new(
                "b",
                vec![4],
                TensorData::try_generate(|_, _: &mut [f32]| {
                    Err(std::io::Error::other("generator exploded").into())
                }),
            ),
        ]
    };
    for max in [u64::MAX, 16] {
        let mut opts = WriteOptions::new(WeightDType::F32);
        opts.max_shard_bytes = max;
        let e = msg(&write_checkpoint(dir.path(), failing(), opts).unwrap_err());
        assert!(
            e.contains("generator exploded") && e.contains("\"b\""),
            "{e}"
        );
        assert_eq!(fs::read(dir.join(MODEL_FILE)).unwrap(), before);
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![MODEL_FILE.to_string()], "no temp files left");
    }
    // invalid inputs are refused before anything is written
    let short = values(3, 0.0);
    let bad_sets: Vec<(Vec<TensorToWrite<'_>>, &str)> = vec![
        (
            vec![TensorToWrite::new("a", vec![4], TensorData::F32(&short))],
            "\"a\"",
        ),
        (
            vec![
                TensorToWrite::new("a", vec![3], TensorData::F32(&short)),
                TensorToWrite::new("a", vec![3], TensorData::F32(&short)),
            ],
            "twice",
        ),
        (
            vec![TensorToWrite::new("z", vec![0, 3], TensorData::F32(&[]))],
            "\"z\"",
        ),
        (
            vec![TensorToWrite::new(
                "s",
                vec![],
                TensorData::F32(&short[..1]),
            )],
            "\"s\"",
        ),
        (
            vec![TensorToWrite::new(
                "r",
                vec![4],
                TensorData::Raw {
                    dtype: WeightDType::F16,
                    bytes: &[0; 6],
                },
            )],
            "\"r\"",
        ),
        (vec![], "without tensors"),
    ];
    for (set, want) in bad_sets {
        let e = msg(
            &write_checkpoint(dir.path(), set, WriteOptions::new(WeightDType::F32)).unwrap_err(),
        );
        assert!(e.contains(want), "{want}: {e}");
        assert_eq!(fs::read(dir.join(MODEL_FILE)).unwrap(), before);
    }
}

#[test]
fn parse_size_accepts_hf_spellings() {
    assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
    assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
    assert_eq!(parse_size("1.5 GiB").unwrap(), 1_610_612_736);
    assert_eq!(parse_size("4096").unwrap(), 4096);
    for bad in ["", "GB", "12XB", "0", "-5MB", "abc"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

fn corpus_texts() -> Vec<String> {
    fedcdd_host::data::corpus::generate_all(300, 0)
        .iter()
        .map(fedcdd_host::data::corpus::record_texts)
        .collect()
}

/// The tiny preset written once per test process for the tests that only read it. A static
/// has no destructor, so each run removes the copies earlier runs left behind (those older
/// than an hour: a concurrent run's copy is younger).
fn tiny_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = std::env::temp_dir();
        let prefix = "fedcdd-model-io-tiny-";
        if let Ok(entries) = fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 3600);
                if old && e.file_name().to_string_lossy().starts_with(prefix) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = tmp.join(format!("{prefix}{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let t = Instant::now();
        let s = build_model(&InitModelOptions::new(Preset::Tiny, &dir)).unwrap();
        println!(
            "init-model tiny: {:.2} s (tokenizer training {:.2} s), {} parameters",
            t.elapsed().as_secs_f64(),
            s.tokenizer_seconds,
            s.parameters
        );
        dir
    })
}

const SAMPLE_TEXTS: [&str; 8] = [
    "Alice has 12 apples. She buys 7 more at the market.",
    "def sum_values(values):\n    total = 0\n    return total\n",
    "Weather report. Monday in Paris: sunny, with a high of 24 degrees Celsius.",
    "Ünïcödé text, emoji 🚀 and CJK 日本語 are bytes too.",
    "  leading spaces,\ttabs\nand\n\nblank lines  ",
    "<s> literal special tokens </s> inside text",
    "",
    "x",
];

#[test]
fn bpe_training_is_deterministic_and_round_trips() {
    let texts = corpus_texts();
    let t = Instant::now();
    let tok = train_bpe(&texts, 1024).unwrap();
    println!(
        "train_bpe(vocab 1024, {} texts): {:.2} s",
        texts.len(),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(tok.get_vocab_size(true), 1024);
    let again = train_bpe(&texts, 1024).unwrap();
    assert_eq!(
        tok.to_string(false).unwrap(),
        again.to_string(false).unwrap()
    );

    let tok = Tokenizer::from_tokenizer(tok);
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (Some(1), Some(2), Some(3))
    );
    assert_eq!(tok.token_to_id("<unk>"), Some(0));
    for text in SAMPLE_TEXTS {
        let with = tok.encode(text, true).unwrap();
        let plain = tok.encode(text, false).unwrap();
        assert_eq!(with[0], 1, "BOS first: {text:?}");
        assert_eq!(&with[1..], &plain[..], "{text:?}");
        assert_eq!(
            tok.decode(&plain, false).unwrap(),
            text,
            "round trip {text:?}"
        );
        if !text.contains("<s>") {
            assert_eq!(
                tok.decode(&with, true).unwrap(),
                text,
                "round trip {text:?}"
            );
        }
        assert!(plain.iter().all(|&id| (id as usize) < 1024));
    }
    // learned merges: a frequent corpus word is one token
    let ids = tok.encode(" degrees", false).unwrap();
    assert_eq!(ids.len(), 1, "{ids:?}");
    // specials in the text are special tokens (as in HF)
    let ids = tok.encode("<s>", false).unwrap();
    assert_eq!(ids, vec![1]);
    assert!(
        train_bpe(&texts, 100).is_err(),
        "below 4 specials + 256 bytes"
    );
    assert!(train_bpe(&[], 1024).is_err());
}

#[test]
fn tokenizer_load_reads_tokenizer_config_specials() {
    let dir = TempDir::new("tok-load");
    let tok = train_bpe(&corpus_texts(), 400).unwrap();
    fs::write(dir.join("tokenizer.json"), tok.to_string(false).unwrap()).unwrap();
    let t = Tokenizer::load(dir.path()).unwrap();
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.pad_id()),
        (Some(1), Some(2), Some(3))
    );
    assert_eq!(t.vocab_size(), 400);
    // tokenizer_config.json wins: objects, strings, null
    fs::write(
        dir.join("tokenizer_config.json"),
        json!({"bos_token": {"content": "</s>", "lstrip": false}, "eos_token": "<unk>",
               "pad_token": null})
        .to_string(),
    )
    .unwrap();
    let t = Tokenizer::load(dir.path()).unwrap();
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.pad_id()),
        (Some(2), Some(0), None)
    );
    fs::write(
        dir.join("tokenizer_config.json"),
        json!({"eos_token": "<nope>"}).to_string(),
    )
    .unwrap();
    let e = msg(&Tokenizer::load(dir.path()).unwrap_err());
    assert!(
        e.contains("eos_token") && e.contains("<nope>") && e.contains("tokenizer_config.json"),
        "{e}"
    );
    fs::write(dir.join("tokenizer_config.json"), "{oops").unwrap();
    assert!(msg(&Tokenizer::load(dir.path()).unwrap_err()).contains("tokenizer_config.json"));
    // broken tokenizer.json, missing file
    fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
    fs::write(dir.join("tokenizer.json"), "{\"model\": 1}").unwrap();
    let e = msg(&Tokenizer::load(dir.path()).unwrap_err());
    assert!(e.contains("tokenizer.json"), "{e}");
    let empty = TempDir::new("tok-none");
    let e = msg(&Tokenizer::load(empty.path()).unwrap_err());
    assert!(e.contains("tokenizer.json"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// init-model
// ---------------------------------------------------------------------------------------------

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[test]
fn init_model_tiny_writes_a_complete_directory() {
    let dir = tiny_model();
    for f in [
        "config.json",
        MODEL_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let cfg = LlamaConfig::load(dir).unwrap();
    let mut want = Preset::Tiny.config();
    want.torch_dtype = Some("float32".into());
    assert_eq!(cfg, want);
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads
        ),
        (256, 4, 8, 4)
    );
    assert_eq!(
        (
            cfg.intermediate_size,
            cfg.vocab_size,
            cfg.max_position_embeddings
        ),
        (688, 2048, 2048)
    );

    let tok = Tokenizer::load(dir).unwrap();
    assert_eq!(tok.vocab_size(), 2048, "the BPE reaches the preset's vocab");
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (Some(1), Some(2), Some(3))
    );
    assert_eq!(tok.encode("Hello", true).unwrap()[0], 1);

    let ck = Checkpoint::open(dir).unwrap();
    let shapes = cfg.tensor_shapes();
    assert_eq!(ck.names().len(), shapes.len());
    for t in &shapes {
        let w = ck.weight(&t.name, &t.shape).unwrap();
        assert_eq!(w.dtype, WeightDType::F32);
        let v = weight_f32(&w);
        if t.shape.len() == 1 {
            assert!(v.iter().all(|&x| x == 1.0), "{} is ones", t.name);
        } else {
            let (m, s) = mean_std(&v);
            assert!(
                m.abs() < 0.002 && (s - 0.02).abs() < 0.001,
                "{}: mean {m}, std {s}",
                t.name
            );
        }
    }
    let emb = ck.read_f32("model.embed_tokens.weight").unwrap();
    assert!(
        emb[3 * 256..4 * 256].iter().all(|&x| x == 0.0),
        "pad row zero"
    );
    assert!(emb[2 * 256..3 * 256].iter().any(|&x| x != 0.0));
    let q0 = ck
        .read_f32("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    let q1 = ck
        .read_f32("model.layers.1.self_attn.q_proj.weight")
        .unwrap();
    assert_ne!(q0, q1, "each tensor has its own stream");

    let gen_cfg: Value =
        serde_json::from_slice(&fs::read(dir.join("generation_config.json")).unwrap()).unwrap();
    assert_eq!(
        (
            gen_cfg["bos_token_id"].as_u64(),
            gen_cfg["eos_token_id"].as_u64()
        ),
        (Some(1), Some(2))
    );
}

#[test]
fn init_model_is_deterministic_and_refuses_to_overwrite() {
    let a = TempDir::new("init-a");
    let out = a.join("m");
    let mut args = InitModelOptions::new(Preset::Tiny, &out);
    args.seed = 7;
    args.dtype = Some(fedcdd_kernels::WeightDType::Bf16);
    build_model(&args).unwrap();
    let first = fs::read(out.join(MODEL_FILE)).unwrap();
    let tok_first = fs::read(out.join("tokenizer.json")).unwrap();
    // refuses an occupied directory without --force
    let e = msg(&build_model(&args).unwrap_err());
    assert!(
        e.contains("--force") && e.contains(&out.display().to_string()),
        "{e}"
    );
    args.force = true;
    build_model(&args).unwrap();
    assert_eq!(
        fs::read(out.join(MODEL_FILE)).unwrap(),
        first,
        "same seed, same bytes"
    );
    // another seed: other weights, same tokenizer
    args.seed = 8;
    build_model(&args).unwrap();
    assert_ne!(fs::read(out.join(MODEL_FILE)).unwrap(), first);
    assert_eq!(fs::read(out.join("tokenizer.json")).unwrap(), tok_first);
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(
        ck.meta("model.norm.weight").unwrap().dtype,
        Some(WeightDType::Bf16)
    );
    assert_eq!(
        LlamaConfig::load(&out).unwrap().torch_dtype.as_deref(),
        Some("bfloat16")
    );
    drop(ck);
    // the output path is a file
    let file = a.join("file");
    fs::write(&file, b"x").unwrap();
    let e = msg(&build_model(&InitModelOptions::new(Preset::Tiny, &file)).unwrap_err());
    assert!(e.contains("not a directory"), "{e}");
}

#[test]
fn init_model_sharded_equals_single() {
    let a = TempDir::new("init-shard");
    let mut args = InitModelOptions::new(Preset::Tiny, a.join("sharded"));
    args.max_shard_size = 4_000_000;
    let s = build_model(&args).unwrap();
    assert!(a.join("sharded").join(INDEX_FILE).is_file());
    let shards = s
        .files
        .iter()
        .filter(|f| f.to_string_lossy().contains("-of-"))
        .count();
    assert!(shards >= 4, "{:?}", s.files);
    let single = Checkpoint::open(tiny_model()).unwrap();
    let sharded = Checkpoint::open(&a.join("sharded")).unwrap();
    assert_eq!(single.names(), sharded.names());
    for n in single.names() {
        assert_eq!(
            single.read_f32(&n).unwrap(),
            sharded.read_f32(&n).unwrap(),
            "{n}"
        );
    }
}

#[test]
fn random_init_does_not_depend_on_chunking() {
    use fedcdd_host::model::init::{fill_normal, tensor_key};
    let key = tensor_key(5, "model.layers.0.mlp.up_proj.weight");
    let n = 50_001;
    let mut whole = vec![0f32; n];
    fill_normal(key, 0.02, 0, &mut whole);
    // odd and even starts, lengths across the internal block size
    for (start, len) in [(1, 7), (3, 8193), (8191, 16_385), (20_000, 1), (49_999, 2)] {
        let mut part = vec![0f32; len];
        fill_normal(key, 0.02, start, &mut part);
        assert_eq!(
            &part[..],
            &whole[start..start + len],
            "start {start}, len {len}"
        );
    }
    let (m, s) = mean_std(&whole);
    assert!(
        m.abs() < 3e-4 && (s - 0.02).abs() < 3e-4,
        "mean {m}, std {s}"
    );
    // neighbours are uncorrelated (the two halves of a Box–Muller pair included)
    let corr: f64 = whole
        .windows(2)
        .map(|w| w[0] as f64 * w[1] as f64)
        .sum::<f64>()
        / (n as f64 * 0.02 * 0.02);
    assert!(corr.abs() < 0.02, "lag-1 correlation {corr}");
    let other = tensor_key(6, "model.layers.0.mlp.up_proj.weight");
    let mut b = vec![0f32; 16];
    fill_normal(other, 0.02, 0, &mut b);
    assert_ne!(&b[..], &whole[..16]);
}

/// Writes `small` and `tinyllama-1.1b` (2.2 GB of bf16, sharded) and checks them; slow: run
/// with `cargo test --release -p fedcdd-tests --test model_io -- --ignored`.
#[test]
#[ignore]
fn init_model_small_and_tinyllama_real_shapes() {
    let a = TempDir::new("init-tinyllama");
    let t = Instant::now();
    let s = build_model(&InitModelOptions::new(Preset::Small, a.join("small"))).unwrap();
    println!(
        "init-model small: {:.1} s (tokenizer {:.1} s)",
        t.elapsed().as_secs_f64(),
        s.tokenizer_seconds
    );
    assert_eq!(
        s.tokenizer_vocab, 4096,
        "the BPE reaches the small preset's vocab"
    );
    assert_eq!(
        Tokenizer::load(&a.join("small")).unwrap().vocab_size(),
        4096
    );
    let t = Instant::now();
    let s = build_model(&InitModelOptions::new(Preset::TinyLlama1_1b, a.join("m"))).unwrap();
    println!(
        "init-model tinyllama-1.1b: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(s.parameters, 1_100_048_384);
    let ck = Checkpoint::open(&a.join("m")).unwrap();
    assert!(ck.files().len() >= 2, "sharded above 2 GB");
    let cfg = LlamaConfig::load(&a.join("m")).unwrap();
    for t in cfg.tensor_shapes() {
        let w = ck.weight(&t.name, &t.shape).unwrap();
        assert_eq!(w.dtype, WeightDType::Bf16);
    }
}

// ---------------------------------------------------------------------------------------------
// HF transformers interop
// ---------------------------------------------------------------------------------------------

#[test]
fn transformers_loads_init_model_directories() {
    if let Err(why) = python_has_modules("torch, transformers, safetensors") {
        println!(
            "SKIPPED: transformers interop needs python3 with torch, transformers and \
             safetensors ({why})"
        );
        return;
    }
    let work = TempDir::new("hf");
    let single = tiny_model().to_path_buf();
    // sharded f32, and a bf16 copy
    let sharded = work.join("sharded");
    let mut args = InitModelOptions::new(Preset::Tiny, &sharded);
    args.max_shard_size = 3_000_000;
    build_model(&args).unwrap();
    let bf = work.join("bf16");
    let mut args = InitModelOptions::new(Preset::Tiny, &bf);
    args.dtype = Some(fedcdd_kernels::WeightDType::Bf16);
    build_model(&args).unwrap();
    // a tied-embedding variant written through the library: tiny config with tied weights
    let tied = work.join("tied");
    fs::create_dir_all(&tied).unwrap();
    let mut tied_cfg = Preset::Tiny.config();
    tied_cfg.tie_word_embeddings = true;
    tied_cfg.torch_dtype = Some("float32".into());
    let ck = Checkpoint::open(&single).unwrap();
    let tensors: Vec<TensorToWrite<'_>> = tied_cfg
        .tensor_shapes()
        .into_iter()
        .map(|t| {
            let (dtype, _, bytes) = ck.raw(&t.name).unwrap();
            TensorToWrite::new(t.name, t.shape, TensorData::Raw { dtype, bytes })
        })
        .collect();
    write_checkpoint(&tied, tensors, WriteOptions::new(WeightDType::F32)).unwrap();
    fs::write(tied.join("config.json"), tied_cfg.to_json().to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        fs::copy(single.join(f), tied.join(f)).unwrap();
    }
    // config-only directories of the real shapes for the resave round trip
    let mut resave = Vec::new();
    for p in [Preset::Llama3_2_1b, Preset::Llama3_8b, Preset::Llama2_7b] {
        let d = work.join(p.name());
        fs::create_dir_all(&d).unwrap();
        let mut c = p.config();
        c.torch_dtype = Some("bfloat16".into());
        fs::write(d.join("config.json"), c.to_json().to_string()).unwrap();
        resave.push((d, c));
    }

    let tok = Tokenizer::load(&single).unwrap();
    let mut texts: Vec<String> = SAMPLE_TEXTS.iter().map(|s| s.to_string()).collect();
    texts.extend(
        fedcdd_host::data::corpus::generate_all(4, 99)
            .iter()
            .map(fedcdd_host::data::corpus::record_texts),
    );
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t, true).unwrap()).collect();
    let ids_plain: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tok.encode(t, false).unwrap())
        .collect();
    let probe = [
        "model.embed_tokens.weight",
        "model.layers.2.self_attn.k_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ];
    let cfg = LlamaConfig::load(&single).unwrap();
    let out_json = work.join("out.json");
    let spec = json!({
        "models": [
            {"name": "tiny f32", "dir": single, "dtype": "float32", "tied": false},
            {"name": "tiny sharded", "dir": sharded, "dtype": "float32", "tied": false},
            {"name": "tiny bf16", "dir": bf, "dtype": "bfloat16", "tied": false},
            {"name": "tiny tied", "dir": tied, "dtype": "float32", "tied": true},
        ],
        "same_weights": [[single, sharded]],
        "texts": texts,
        "ids": ids,
        "ids_plain": ids_plain,
        "special_ids": [1, 2, 3],
        "config": {
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "rms_norm_eps": cfg.rms_norm_eps,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 3, "model_type": "llama", "hidden_act": "silu",
        },
        "rope_theta": cfg.rope_theta,
        "resave": resave.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
        "probe": probe,
        "out": out_json,
    });
    let spec_path = work.join("spec.json");
    fs::write(&spec_path, spec.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/model_check.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(&spec_path)
        .envs(PY_ENV)
        .output()
        .expect("cannot run the model interop script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        script.display(),
        out.status
    );
    assert!(
        stdout.contains("all model interop checks passed"),
        "{stdout}\n{stderr}"
    );

    // What torch loaded is what our reader reads.
    let result: Value = serde_json::from_slice(&fs::read(&out_json).unwrap()).unwrap();
    let ck = Checkpoint::open(&single).unwrap();
    for name in probe {
        let ours = ck.read_f32(name).unwrap();
        let theirs = &result["probe"][name];
        let first: Vec<f32> = theirs["first"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&ours[..first.len()], &first[..], "{name}");
        assert_eq!(
            theirs["numel"].as_u64().unwrap() as usize,
            ours.len(),
            "{name}"
        );
        let sum: f64 = ours.iter().map(|&x| x as f64).sum();
        let hf_sum = theirs["sum"].as_f64().unwrap();
        assert!(
            (sum - hf_sum).abs() <= 1e-9 * (1.0 + hf_sum.abs()) + 1e-6,
            "{name}: {sum} vs {hf_sum}"
        );
    }
    // transformers' own re-save of our configs parses back to the same config
    for (d, c) in &resave {
        let back = LlamaConfig::load(&d.join("resaved")).unwrap();
        assert_eq!(&back, c, "{}", d.display());
    }
}
