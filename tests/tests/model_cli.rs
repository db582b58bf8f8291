//! End-to-end tests of the model commands of the `fedcdd` binary: `init-model`, `gen-corpus`,
//! `train`, `eval`, `generate` and `merge`, run on the tiny preset with small batches so the
//! whole file stays fast in a debug build.
//!
//! The checks are behavioural and computed here, never copied from the code under test:
//! training lowers the loss it logs, the trained adapter beats the base on its domain, equal
//! seeds give equal bytes, gradient accumulation equals the larger batch, a merged model
//! evaluates like base + adapter, and every bad input ends with exit status 1, an `error:`
//! line naming the culprit, no panic and no partially written `--out`. Files the tests read
//! back (config, safetensors headers, logs, JSON reports) are parsed here by hand or with
//! serde_json; `fedcdd_host::io::read_safetensors` is used only to read adapters back.

mod cli_util;

use std::collections::BTreeSet;
use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use cli_util::*;
use serde_json::{Value, json};

/// Worker threads of every run: the test harness already runs tests in parallel.
const THREADS: &str = "1";

// ---------------------------------------------------------------------------------------------
// Shared fixtures
// ---------------------------------------------------------------------------------------------

/// Written once per test process under cargo's per-target temp dir: the tiny model and the
/// generated corpora. (Statics are never dropped, so stale folders of earlier runs are removed
/// when the next run starts.)
struct Shared {
    model: PathBuf,
    /// `gen-corpus --split`: `<domain>.jsonl` per domain.
    corpus: PathBuf,
    /// `gen-corpus` into one file: every domain, a few records each.
    all: PathBuf,
}

impl Shared {
    fn domain(&self, d: &str) -> PathBuf {
        self.corpus.join(format!("{d}.jsonl"))
    }
}

fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("model_cli");
        remove_stale(&base);
        let root = base.join(std::process::id().to_string());
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).expect("cannot create the shared fixture folder");
        let model = root.join("tiny");
        fedcdd([
            "init-model",
            "--preset",
            "tiny",
            "--out",
            &s(&model),
            "--quiet",
        ])
        .ok();
        let corpus = root.join("corpus");
        fedcdd([
            "gen-corpus",
            "--n",
            "30",
            "--seed",
            "0",
            "--out",
            &s(&corpus),
            "--split",
        ])
        .ok();
        let all = root.join("all.jsonl");
        fedcdd(["gen-corpus", "--n", "6", "--seed", "1", "--out", &s(&all)]).ok();
        Shared { model, corpus, all }
    })
}

/// Removes the fixture folders of earlier test processes (older than ten minutes).
fn remove_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    let cutoff = SystemTime::now() - Duration::from_secs(600);
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < cutoff);
        if old {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// The adapter trained once on the recipes domain, with its run and log.
struct Trained {
    dir: PathBuf,
    data: PathBuf,
}

const TRAIN_STEPS: usize = 20;
const TRAIN_BATCH: usize = 2;
const TRAIN_SEQ: usize = 32;

fn trained() -> &'static Trained {
    static T: OnceLock<Trained> = OnceLock::new();
    T.get_or_init(|| {
        let sh = shared();
        let data = sh.domain("recipes");
        let dir = sh.model.parent().unwrap().join("trained-recipes");
        let _ = fs::remove_dir_all(&dir);
        fedcdd(train_args(
            &sh.model,
            &data,
            &dir,
            &[
                "--steps",
                &TRAIN_STEPS.to_string(),
                "--batch",
                &TRAIN_BATCH.to_string(),
                "--seq",
                &TRAIN_SEQ.to_string(),
                "--lr",
                "0.01",
                "--seed",
                "0",
            ],
        ))
        .ok();
        Trained { dir, data }
    })
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn train_args(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--model",
        &s(model),
        "--data",
        &s(data),
        "--out",
        &s(out),
        "--threads",
        THREADS,
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

/// `train` with small defaults (3 steps of 2×32 tokens) for the flags `extra` does not give.
fn train_small(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> RunOutput {
    let mut e = Vec::new();
    for (flag, value) in [("--steps", "3"), ("--batch", "2"), ("--seq", "32")] {
        if !extra.contains(&flag) {
            e.extend([flag, value]);
        }
    }
    e.extend_from_slice(extra);
    fedcdd(train_args(model, data, out, &e))
}

fn eval_json(model: &Path, adapter: Option<&Path>, data: &Path) -> Value {
    let mut args = vec![
        "eval".to_string(),
        "--model".into(),
        s(model),
        "--data".into(),
        s(data),
        "--json".into(),
        "--threads".into(),
        THREADS.into(),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter".to_string(), s(a)]);
    }
    let out = fedcdd(&args).ok();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("eval --json printed invalid JSON ({e}):\n{out}"))
}

fn generate(model: &Path, adapter: Option<&Path>, prompt: &str, extra: &[&str]) -> RunOutput {
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        s(model),
        "--prompt".into(),
        prompt.into(),
        "--threads".into(),
        THREADS.into(),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter".to_string(), s(a)]);
    }
    args.extend(extra.iter().map(|x| x.to_string()));
    fedcdd(&args)
}

fn f(v: &Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

fn u(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what} is not a count: {v}"))
}

fn rel_diff(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// One row of `train_log.csv`, read by column name.
#[derive(Debug)]
struct LogRow {
    step: usize,
    loss: f64,
    grad_norm: f64,
    target_tokens: usize,
}

fn read_log(adapter_dir: &Path) -> Vec<LogRow> {
    let path = adapter_dir.join("train_log.csv");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .expect("train_log.csv is empty")
        .split(',')
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("train_log.csv has no column {name}: {header:?}"))
    };
    let (c_step, c_loss, c_norm, c_tok) = (
        col("step"),
        col("loss"),
        col("grad_norm"),
        col("target_tokens"),
    );
    lines
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            assert_eq!(cells.len(), header.len(), "train_log.csv row {l:?}");
            LogRow {
                step: cells[c_step].parse().expect("step"),
                loss: cells[c_loss].parse().expect("loss"),
                grad_norm: cells[c_norm].parse().expect("grad_norm"),
                target_tokens: cells[c_tok].parse().expect("target_tokens"),
            }
        })
        .collect()
}

fn mean(x: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = x.collect();
    v.iter().sum::<f64>() / v.len() as f64
}

/// The JSON header of a safetensors file, read by hand (8-byte little-endian length + JSON).
fn safetensors_header(path: &Path) -> serde_json::Map<String, Value> {
    let mut file = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut len = [0u8; 8];
    file.read_exact(&mut len).unwrap();
    let mut head = vec![0u8; u64::from_le_bytes(len) as usize];
    file.read_exact(&mut head).unwrap();
    match serde_json::from_slice(&head) {
        Ok(Value::Object(m)) => m,
        other => panic!("{}: bad safetensors header: {other:?}", path.display()),
    }
}

fn shape_of(header: &serde_json::Map<String, Value>, name: &str) -> Vec<u64> {
    let t = header
        .get(name)
        .unwrap_or_else(|| panic!("tensor {name} is missing"));
    t["shape"]
        .as_array()
        .unwrap_or_else(|| panic!("tensor {name} has no shape"))
        .iter()
        .map(|d| d.as_u64().unwrap())
        .collect()
}

/// The model shape read from config.json.
struct Dims {
    layers: u64,
    hidden: u64,
    inter: u64,
    q: u64,
    kv: u64,
    vocab: u64,
    max_pos: u64,
}

fn dims(model: &Path) -> Dims {
    let c = read_json(&model.join("config.json"));
    let g = |k: &str| u(&c[k], k);
    let head_dim = c["head_dim"]
        .as_u64()
        .unwrap_or(g("hidden_size") / g("num_attention_heads"));
    Dims {
        layers: g("num_hidden_layers"),
        hidden: g("hidden_size"),
        inter: g("intermediate_size"),
        q: g("num_attention_heads") * head_dim,
        kv: g("num_key_value_heads") * head_dim,
        vocab: g("vocab_size"),
        max_pos: g("max_position_embeddings"),
    }
}

/// `(module path, in_features, out_features)` of the seven LLaMA projections.
fn projections(d: &Dims) -> [(&'static str, u64, u64); 7] {
    [
        ("self_attn.q_proj", d.hidden, d.q),
        ("self_attn.k_proj", d.hidden, d.kv),
        ("self_attn.v_proj", d.hidden, d.kv),
        ("self_attn.o_proj", d.q, d.hidden),
        ("mlp.gate_proj", d.hidden, d.inter),
        ("mlp.up_proj", d.hidden, d.inter),
        ("mlp.down_proj", d.inter, d.hidden),
    ]
}

/// Copies the model directory except `skip` into a fresh temp dir.
fn model_copy(tag: &str, skip: &[&str]) -> TempDir {
    let dir = TempDir::new(tag);
    for e in fs::read_dir(&shared().model).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if !skip.contains(&name.as_str()) {
            fs::copy(&p, dir.join(&name)).unwrap();
        }
    }
    dir
}

/// Exit status 1, an `error:` line holding every one of `needles`, no panic.
#[track_caller]
fn expect_error(out: &RunOutput, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(1), "expected exit status 1: {out}");
    assert!(
        !out.stderr.contains("panicked"),
        "the binary panicked: {out}"
    );
    let lines = out.error_lines();
    assert!(
        lines.iter().any(|l| needles.iter().all(|n| l.contains(n))),
        "no error line names all of {needles:?}: {out}"
    );
}

#[track_caller]
fn expect_no_out(out: &RunOutput, path: &Path) {
    assert!(
        !path.exists(),
        "{} was written by a failed run: {out}",
        path.display()
    );
}

/// JSONL of text records, `n` of them, each `words` random words (≥ 1 token per word).
fn text_records(n: usize, words: usize, seed: u64) -> String {
    const WORDS: [&str; 24] = [
        "the", "onion", "stir", "oven", "salt", "butter", "slowly", "minutes", "garlic", "pan",
        "bake", "serve", "fresh", "pepper", "water", "boil", "mix", "bowl", "warm", "sugar",
        "cream", "slice", "lemon", "rice",
    ];
    let mut rng = Rng::new(seed);
    let mut out = String::new();
    for _ in 0..n {
        let text: Vec<&str> = (0..words)
            .map(|_| WORDS[(rng.next_u64() % WORDS.len() as u64) as usize])
            .collect();
        out.push_str(&json!({ "text": text.join(" ") }).to_string());
        out.push('\n');
    }
    out
}

/// An Alpaca record whose prompt alone is far longer than a short `--seq`.
fn long_prompt_alpaca() -> String {
    json!({
        "instruction": "Describe in great detail, step by step, how to prepare a slow cooked \
                        onion and garlic soup with fresh lemon, warm rice and sliced pepper.",
        "input": "",
        "output": "Boil the water.",
    })
    .to_string()
}

// ---------------------------------------------------------------------------------------------
// init-model, train, eval
// ---------------------------------------------------------------------------------------------

#[test]
fn init_model_tiny_writes_an_hf_directory() {
    let m = &shared().model;
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(m.join(f).is_file(), "init-model did not write {f}");
    }
    let c = read_json(&m.join("config.json"));
    assert_eq!(c["model_type"], "llama");
    let d = dims(m);
    // Every weight a LLaMA needs, with the shapes config.json implies.
    let h = safetensors_header(&m.join("model.safetensors"));
    assert_eq!(
        shape_of(&h, "model.embed_tokens.weight"),
        [d.vocab, d.hidden]
    );
    assert_eq!(shape_of(&h, "model.norm.weight"), [d.hidden]);
    if c["tie_word_embeddings"] != true {
        assert_eq!(shape_of(&h, "lm_head.weight"), [d.vocab, d.hidden]);
    }
    for l in 0..d.layers {
        for (p, fin, fout) in projections(&d) {
            assert_eq!(
                shape_of(&h, &format!("model.layers.{l}.{p}.weight")),
                [fout, fin],
                "layer {l} {p}"
            );
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            assert_eq!(
                shape_of(&h, &format!("model.layers.{l}.{n}.weight")),
                [d.hidden]
            );
        }
    }
    let tok = read_json(&m.join("tokenizer.json"));
    let vocab = tok["model"]["vocab"]
        .as_object()
        .expect("tokenizer.json has a model.vocab");
    assert!(
        !vocab.is_empty() && vocab.len() as u64 <= d.vocab,
        "tokenizer vocab {} vs vocab_size {}",
        vocab.len(),
        d.vocab
    );
    assert!(read_json(&m.join("tokenizer_config.json")).is_object());
}

#[test]
fn train_lowers_the_loss_and_writes_a_peft_adapter() {
    let t = trained();
    let log = read_log(&t.dir);
    assert_eq!(log.len(), TRAIN_STEPS, "one log row per step");
    for (i, r) in log.iter().enumerate() {
        assert_eq!(r.step, i + 1);
        assert!(
            r.loss.is_finite() && r.loss > 0.0,
            "step {}: loss {}",
            r.step,
            r.loss
        );
        assert!(r.grad_norm.is_finite(), "step {}: grad norm", r.step);
        assert!(
            r.target_tokens > 0 && r.target_tokens <= TRAIN_BATCH * TRAIN_SEQ,
            "step {}: {} target tokens in a {TRAIN_BATCH}x{TRAIN_SEQ} batch",
            r.step,
            r.target_tokens
        );
    }
    // The loss goes down: the last five steps against the first five.
    let first = mean(log[..5].iter().map(|r| r.loss));
    let last = mean(log[TRAIN_STEPS - 5..].iter().map(|r| r.loss));
    assert!(
        last < first - 0.25,
        "the loss did not go down: first 5 steps {first:.4}, last 5 {last:.4}\n{log:?}"
    );
    let summary = read_json(&t.dir.join("train_summary.json"));
    assert_eq!(u(&summary["steps"], "steps"), TRAIN_STEPS as u64);
    assert!(rel_diff(f(&summary["first_loss"], "first_loss"), log[0].loss) < 1e-5);
    assert!(
        rel_diff(
            f(&summary["final_loss"], "final_loss"),
            log[TRAIN_STEPS - 1].loss
        ) < 1e-5
    );

    // A PEFT adapter: config with r and the seven modules; A [r, in] and B [out, r] per
    // layer and module, named like PEFT names them.
    let cfg = read_json(&t.dir.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    let r = u(&cfg["r"], "r");
    assert_eq!(r, 8, "the default --lora-r");
    let modules: BTreeSet<&str> = cfg["target_modules"]
        .as_array()
        .expect("target_modules")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let d = dims(&shared().model);
    let expected: BTreeSet<&str> = projections(&d)
        .iter()
        .map(|(p, _, _)| p.rsplit('.').next().unwrap())
        .collect();
    assert_eq!(modules, expected);
    let h = safetensors_header(&t.dir.join("adapter_model.safetensors"));
    let mut names = BTreeSet::new();
    for l in 0..d.layers {
        for (p, fin, fout) in projections(&d) {
            let base = format!("base_model.model.model.layers.{l}.{p}");
            let (a, b) = (
                format!("{base}.lora_A.weight"),
                format!("{base}.lora_B.weight"),
            );
            assert_eq!(shape_of(&h, &a), [r, fin], "{a}");
            assert_eq!(shape_of(&h, &b), [fout, r], "{b}");
            names.insert(a);
            names.insert(b);
        }
    }
    let stored: BTreeSet<String> = h.keys().filter(|k| *k != "__metadata__").cloned().collect();
    assert_eq!(stored, names, "the adapter holds exactly the LoRA tensors");
    // Training moved B away from PEFT's zero init.
    let adapter = read_adapter(&t.dir);
    let moved = adapter
        .iter()
        .filter(|(n, _)| n.contains("lora_B"))
        .all(|(_, t)| t.data.iter().any(|&v| v != 0.0));
    assert!(moved, "some lora_B stayed zero after {TRAIN_STEPS} steps");
}

#[test]
fn eval_with_the_trained_adapter_beats_the_base_on_its_domain() {
    let t = trained();
    let m = &shared().model;
    let base = eval_json(m, None, &t.data);
    let tuned = eval_json(m, Some(&t.dir), &t.data);
    let (lb, lt) = (
        f(&base["overall"]["loss"], "base loss"),
        f(&tuned["overall"]["loss"], "adapter loss"),
    );
    assert_eq!(
        base["overall"]["tokens"], tuned["overall"]["tokens"],
        "the same data has the same target tokens"
    );
    assert!(
        lt < lb - 0.05,
        "the adapter trained on {} does not beat the base there: {lt:.4} vs {lb:.4}",
        t.data.display()
    );
}

#[test]
fn eval_json_reports_every_domain_and_the_overall_token_count() {
    let sh = shared();
    let report = eval_json(&sh.model, None, &sh.all);
    let text = fs::read_to_string(&sh.all).unwrap();
    let records: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let data_domains: BTreeSet<String> = records
        .iter()
        .map(|r| {
            r["domain"]
                .as_str()
                .expect("gen-corpus writes domains")
                .to_string()
        })
        .collect();
    assert!(data_domains.len() >= 2, "gen-corpus wrote several domains");
    let domains = report["domains"].as_object().expect("domains object");
    let keys: BTreeSet<String> = domains.keys().cloned().collect();
    assert_eq!(keys, data_domains, "one entry per domain of the data");
    assert_eq!(u(&report["examples"], "examples"), records.len() as u64);

    let mut tokens = 0u64;
    let mut weighted = 0.0f64;
    for (name, d) in domains {
        let n = u(&d["tokens"], name);
        let loss = f(&d["loss"], name);
        assert!(n > 0 && loss.is_finite() && loss > 0.0, "{name}: {d}");
        assert!(
            rel_diff(f(&d["perplexity"], name), loss.exp()) < 1e-9,
            "{name}"
        );
        tokens += n;
        weighted += n as f64 * loss;
    }
    let overall = &report["overall"];
    assert_eq!(u(&overall["tokens"], "overall tokens"), tokens);
    let loss = f(&overall["loss"], "overall loss");
    assert!(
        rel_diff(loss, weighted / tokens as f64) < 1e-5,
        "overall loss {loss} is not the token-weighted mean {} of the domains",
        weighted / tokens as f64
    );
    assert!(rel_diff(f(&overall["perplexity"], "ppl"), loss.exp()) < 1e-9);

    // The table lists the same domains and the overall row.
    let table = fedcdd([
        "eval",
        "--model",
        &s(&sh.model),
        "--data",
        &s(&sh.all),
        "--threads",
        THREADS,
    ])
    .ok();
    for name in keys.iter().map(String::as_str).chain(["overall"]) {
        assert!(
            table
                .stdout
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "the table has no row {name}:\n{}",
            table.stdout
        );
    }
}

#[test]
fn train_with_the_same_seed_is_byte_identical() {
    let sh = shared();
    let data = sh.domain("medical");
    let tmp = TempDir::new("seed");
    let run = |seed: &str, out: &str| {
        train_small(&sh.model, &data, &tmp.join(out), &["--seed", seed]).ok();
        fs::read(tmp.join(out).join("adapter_model.safetensors")).unwrap()
    };
    let a = run("7", "a");
    let b = run("7", "b");
    let c = run("8", "c");
    assert!(a == b, "the same --seed gave different adapter bytes");
    assert!(a != c, "a different --seed gave the same adapter bytes");
    let losses =
        |out: &str| -> Vec<f64> { read_log(&tmp.join(out)).iter().map(|r| r.loss).collect() };
    assert_eq!(losses("a"), losses("b"));
    assert_eq!(
        fs::read(tmp.join("a/adapter_config.json")).unwrap(),
        fs::read(tmp.join("b/adapter_config.json")).unwrap()
    );
}

#[test]
fn adapter_init_continues_from_the_adapter_and_keeps_its_layout() {
    let sh = shared();
    let data = sh.domain("weather");
    let tmp = TempDir::new("init");
    let layout = [
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--targets",
        "q,v",
        "--lora-dropout",
        "0",
        "--seed",
        "1",
    ];
    // The starting adapter: 12 steps on the data.
    let mut first = layout.to_vec();
    first.extend(["--steps", "12", "--lr", "0.02"]);
    train_small(&sh.model, &data, &tmp.join("init"), &first).ok();
    // Continued with the default layout flags (r 8, all modules): the adapter's layout wins.
    train_small(
        &sh.model,
        &data,
        &tmp.join("cont"),
        &["--adapter-init", &s(&tmp.join("init")), "--seed", "1"],
    )
    .ok();
    // A fresh start with the same layout and seed sees the same first batch.
    train_small(&sh.model, &data, &tmp.join("fresh"), &layout).ok();

    let cfg = read_json(&tmp.join("cont/adapter_config.json"));
    assert_eq!(u(&cfg["r"], "r"), 4);
    let modules: BTreeSet<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(modules, BTreeSet::from(["q_proj", "v_proj"]));
    let init = read_adapter(&tmp.join("init"));
    let cont = read_adapter(&tmp.join("cont"));
    assert_eq!(
        init.keys().collect::<Vec<_>>(),
        cont.keys().collect::<Vec<_>>(),
        "the continued adapter has the starting adapter's tensors"
    );
    for (name, t) in &init {
        assert_eq!(cont[name].dims, t.dims, "{name}");
    }
    assert!(
        init.iter().any(|(n, t)| t.data != cont[n].data),
        "continuing did not change the adapter"
    );
    // The continued run starts from the trained adapter, so its first loss is below the fresh
    // run's (whose B is zero: the base model's loss on the same batch).
    let l_cont = read_log(&tmp.join("cont"))[0].loss;
    let l_fresh = read_log(&tmp.join("fresh"))[0].loss;
    assert!(
        l_cont < l_fresh - 0.05,
        "--adapter-init did not start from the adapter: first loss {l_cont} vs fresh {l_fresh}"
    );
}

#[test]
fn gradient_accumulation_equals_the_larger_batch() {
    let sh = shared();
    let tmp = TempDir::new("accum");
    // Four records of 60 words (> 33 tokens each): a step of 4 sequences is exactly one epoch
    // whatever the shuffle, so `--batch 4` and `--batch 2 --grad-accum 2` see the same data.
    // Dropout off (its masks are drawn per micro-batch) and no clipping (it would hide a
    // wrongly scaled gradient); SGD's step is linear in the gradient.
    let data = tmp.join("four.jsonl");
    fs::write(&data, text_records(4, 60, 11)).unwrap();
    let common = [
        "--steps",
        "2",
        "--seq",
        "32",
        "--optimizer",
        "sgd",
        "--lr",
        "0.5",
        "--lora-dropout",
        "0",
        "--max-grad-norm",
        "0",
        "--seed",
        "3",
    ];
    let run = |out: &str, batch: &str, accum: &str| {
        let mut e = common.to_vec();
        e.extend(["--batch", batch, "--grad-accum", accum]);
        train_small(&sh.model, &data, &tmp.join(out), &e).ok();
        (read_log(&tmp.join(out)), read_adapter(&tmp.join(out)))
    };
    let (log_big, big) = run("big", "4", "1");
    let (log_acc, acc) = run("acc", "2", "2");
    let (log_half, half) = run("half", "2", "1");
    for (b, a) in log_big.iter().zip(&log_acc) {
        // Every row is 32 targets long (no padding, no masked prompt).
        assert_eq!(b.target_tokens, 4 * 32, "step {}", b.step);
        assert_eq!(a.target_tokens, 4 * 32, "accumulated step {}", a.step);
        assert!(
            rel_diff(a.loss, b.loss) < 1e-5,
            "step {}: accumulated loss {} vs batch-4 loss {}",
            a.step,
            a.loss,
            b.loss
        );
    }
    assert!(log_half.iter().all(|r| r.target_tokens == 2 * 32));
    for (name, t) in &big {
        assert_allclose(
            &format!("accumulated {name}"),
            &acc[name].data,
            &f64s(&t.data),
            1e-4,
        );
    }
    // Half the data per step gives another adapter (the second micro-batch counts).
    let worst = big
        .iter()
        .filter(|(n, _)| n.contains("lora_B"))
        .map(|(n, t)| {
            let d: Vec<f64> = t
                .data
                .iter()
                .zip(&half[n].data)
                .map(|(&x, &y)| x as f64 - y as f64)
                .collect();
            rms(&d) / rms(&f64s(&t.data)).max(1e-30)
        })
        .fold(0.0, f64::max);
    assert!(
        worst > 1e-3,
        "--batch 2 without accumulation gave the batch-4 adapter (rel. diff {worst:.2e})"
    );
}

#[test]
fn train_skips_examples_whose_targets_lie_beyond_seq() {
    let sh = shared();
    let tmp = TempDir::new("mask");
    let mixed = tmp.join("mixed.jsonl");
    fs::write(
        &mixed,
        format!("{}{}\n", text_records(1, 40, 5), long_prompt_alpaca()),
    )
    .unwrap();
    let out = train_small(&sh.model, &mixed, &tmp.join("a"), &["--seq", "16"]).ok();
    assert!(
        out.stderr.contains("skipping 1 of 2"),
        "no warning about the example without targets: {out}"
    );
    let log = read_log(&tmp.join("a"));
    assert!(log.iter().all(|r| r.target_tokens > 0));
}

// ---------------------------------------------------------------------------------------------
// generate, merge
// ---------------------------------------------------------------------------------------------

#[test]
fn generate_greedy_is_deterministic_and_max_tokens_bounds_it() {
    let t = trained();
    let m = &shared().model;
    let prompt = "Recipe: Simple";
    let short = generate(m, Some(&t.dir), prompt, &["--max-tokens", "4"]).ok();
    let long = generate(m, Some(&t.dir), prompt, &["--max-tokens", "16"]).ok();
    let again = generate(m, Some(&t.dir), prompt, &["--max-tokens", "16"]).ok();
    assert_eq!(
        long.stdout, again.stdout,
        "greedy decoding is not deterministic"
    );
    let short_text = short.stdout.trim_end_matches('\n');
    let long_text = long.stdout.trim_end_matches('\n');
    // Greedy with fewer tokens is a prefix of greedy with more (a cut multi-byte character
    // decodes to U+FFFD at the end).
    let stem = short_text.trim_end_matches('\u{FFFD}');
    assert!(
        long_text.starts_with(stem),
        "4 greedy tokens {short_text:?} are not a prefix of 16 {long_text:?}"
    );
    // Each token belongs to at most one word.
    let words = short_text.split_whitespace().count();
    assert!(
        words <= 4,
        "--max-tokens 4 gave {words} words: {short_text:?}"
    );
    assert!(
        long_text.len() > short_text.len() || long_text.split_whitespace().count() < 16,
        "16 tokens are not longer than 4: {short_text:?} vs {long_text:?}"
    );
    // The adapter changes what the model says.
    let base = generate(m, None, prompt, &["--max-tokens", "16"]).ok();
    assert_ne!(
        base.stdout, long.stdout,
        "the adapter did not change greedy output"
    );
}

#[test]
fn generate_sampling_depends_on_the_seed() {
    let m = &shared().model;
    let run = |seed: &str| {
        generate(
            m,
            None,
            "The weather",
            &[
                "--max-tokens",
                "12",
                "--temperature",
                "1.0",
                "--top-p",
                "0.95",
                "--seed",
                seed,
            ],
        )
        .ok()
        .stdout
    };
    let (a, a2, b) = (run("1"), run("1"), run("2"));
    assert!(!a.trim().is_empty(), "sampling produced nothing");
    assert_eq!(a, a2, "the same --seed sampled different text");
    assert_ne!(a, b, "different seeds sampled the same 12 tokens");
}

#[test]
fn merge_evaluates_like_base_plus_adapter() {
    let t = trained();
    let sh = shared();
    let tmp = TempDir::new("merge");
    let merged = tmp.join("merged");
    fedcdd([
        "merge",
        "--model",
        &s(&sh.model),
        "--adapter",
        &s(&t.dir),
        "--out",
        &s(&merged),
    ])
    .ok();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(merged.join(f).is_file(), "merge did not write {f}");
    }
    let (c_base, c_merged) = (
        read_json(&sh.model.join("config.json")),
        read_json(&merged.join("config.json")),
    );
    for k in [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "intermediate_size",
    ] {
        assert_eq!(c_base[k], c_merged[k], "config {k}");
    }
    let with_adapter = eval_json(&sh.model, Some(&t.dir), &sh.all);
    let folded = eval_json(&merged, None, &sh.all);
    let base = eval_json(&sh.model, None, &sh.all);
    let loss = |r: &Value, k: &str| f(&r["domains"][k]["loss"], k);
    let (la, lm) = (
        f(&with_adapter["overall"]["loss"], "adapter"),
        f(&folded["overall"]["loss"], "merged"),
    );
    assert!(
        rel_diff(lm, la) < 1e-4,
        "merged model loss {lm} vs base+adapter {la}"
    );
    for k in with_adapter["domains"].as_object().unwrap().keys() {
        assert!(
            rel_diff(loss(&folded, k), loss(&with_adapter, k)) < 1e-4,
            "{k}"
        );
    }
    let lb = f(&base["overall"]["loss"], "base");
    assert!(
        rel_diff(lm, lb) > 1e-3,
        "the merged model evaluates like the base ({lm} vs {lb}): nothing was folded in"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad inputs
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_model_directories_fail_cleanly() {
    let sh = shared();
    let data = sh.domain("recipes");
    let tmp = TempDir::new("badmodel");
    let out = tmp.join("out");

    let missing = tmp.join("no-such-model");
    let r = train_small(&missing, &data, &out, &[]);
    expect_error(&r, &["no-such-model"]);
    expect_no_out(&r, &out);

    let bad_json = model_copy("badjson", &[]);
    fs::write(bad_json.join("config.json"), "{\"hidden_size\": 256,\n").unwrap();
    let r = train_small(bad_json.path(), &data, &out, &[]);
    expect_error(&r, &["config.json"]);
    expect_no_out(&r, &out);

    let trunc = model_copy("trunc", &["model.safetensors"]);
    let bytes = fs::read(sh.model.join("model.safetensors")).unwrap();
    fs::write(trunc.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let r = train_small(trunc.path(), &data, &out, &[]);
    expect_error(&r, &["model.safetensors"]);
    expect_no_out(&r, &out);
    let r = fedcdd(["eval", "--model", &s(trunc.path()), "--data", &s(&data)]);
    expect_error(&r, &["model.safetensors"]);

    let no_tok = model_copy("notok", &["tokenizer.json"]);
    let r = train_small(no_tok.path(), &data, &out, &[]);
    expect_error(&r, &["tokenizer.json"]);
    expect_no_out(&r, &out);
    let r = generate(no_tok.path(), None, "Hello", &[]);
    expect_error(&r, &["tokenizer.json"]);
}

#[test]
fn non_finite_base_weights_are_reported_not_evaluated() {
    let sh = shared();
    let data = sh.domain("recipes");
    let path = sh.model.join("model.safetensors");
    let header = safetensors_header(&path);
    let t = &header["model.layers.0.self_attn.q_proj.weight"];
    assert_eq!(t["dtype"], "F32", "the tiny preset stores f32");
    let a = u(&t["data_offsets"][0], "start") as usize;
    // One value is enough: a single +inf, then a single NaN, in one q_proj element.
    for (tag, bad) in [("infbase", f32::INFINITY), ("nanbase", f32::NAN)] {
        let copy = model_copy(tag, &["model.safetensors"]);
        let mut bytes = fs::read(&path).unwrap();
        let start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let at = start + a + 4 * 1234;
        bytes[at..at + 4].copy_from_slice(&bad.to_le_bytes());
        fs::write(copy.join("model.safetensors"), bytes).unwrap();
        let r = fedcdd([
            "eval",
            "--model",
            &s(copy.path()),
            "--data",
            &s(&data),
            "--threads",
            THREADS,
        ]);
        expect_error(
            &r,
            &["model.layers.0.self_attn.q_proj.weight", "NaN or infinite"],
        );
        let r = generate(copy.path(), None, "Recipe", &["--max-tokens", "3"]);
        expect_error(
            &r,
            &["model.layers.0.self_attn.q_proj.weight", "NaN or infinite"],
        );
    }
}

#[test]
fn bad_data_files_fail_cleanly() {
    let sh = shared();
    let tmp = TempDir::new("baddata");
    let out = tmp.join("out");
    let check = |name: &str, text: &str, extra: &[&str], needles: &[&str]| {
        let data = tmp.join(name);
        fs::write(&data, text).unwrap();
        let r = train_small(&sh.model, &data, &out, extra);
        expect_error(&r, needles);
        expect_no_out(&r, &out);
        r
    };
    // A malformed second line: the error names file:line.
    check(
        "malformed.jsonl",
        "{\"text\": \"one two\"}\n{\"text\": \"three\" \"four\"}\n{\"text\": \"five\"}\n",
        &[],
        &["malformed.jsonl:2"],
    );
    check("empty.jsonl", "", &[], &["empty.jsonl"]);
    check("blank.jsonl", "\n  \n", &[], &["blank.jsonl"]);
    // Only prompt tokens within --seq: no token is a target.
    check(
        "masked.jsonl",
        &format!("{}\n", long_prompt_alpaca()),
        &["--seq", "8"],
        &["masked.jsonl", "--seq"],
    );
    let missing = tmp.join("missing.jsonl");
    let r = train_small(&sh.model, &missing, &out, &[]);
    expect_error(&r, &["missing.jsonl"]);

    // eval on data with no target token in reach.
    let masked = tmp.join("masked.jsonl");
    let r = fedcdd([
        "eval",
        "--model",
        &s(&sh.model),
        "--data",
        &s(&masked),
        "--seq",
        "8",
        "--threads",
        THREADS,
    ]);
    expect_error(&r, &["masked.jsonl", "no target tokens"]);
}

#[test]
fn bad_train_flags_fail_cleanly() {
    let sh = shared();
    let data = sh.domain("recipes");
    let tmp = TempDir::new("badflags");
    let out = tmp.join("out");
    let max_pos = dims(&sh.model).max_pos;
    let too_long = (max_pos + 1).to_string();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--lora-r", "0"], vec!["rank r"]),
        (vec!["--lr", "-1"], vec!["--lr"]),
        (vec!["--lr", "0"], vec!["--lr"]),
        (vec!["--targets", "bogus"], vec!["bogus"]),
        (
            vec!["--seq", &too_long],
            vec!["--seq", "max_position_embeddings"],
        ),
        (vec!["--steps", "0"], vec!["--steps"]),
        (vec!["--batch", "0"], vec!["--batch"]),
        (vec!["--grad-accum", "0"], vec!["--grad-accum"]),
        (vec!["--lora-dropout", "1.5"], vec!["lora_dropout"]),
        (vec!["--weight-decay", "-1"], vec!["--weight-decay"]),
        (vec!["--max-grad-norm", "NaN"], vec!["--max-grad-norm"]),
    ];
    for (flags, needles) in cases {
        let r = train_small(&sh.model, &data, &out, &flags);
        expect_error(&r, &needles);
        expect_no_out(&r, &out);
    }
    // --out names an existing file: refused before training.
    let file = tmp.join("file");
    fs::write(&file, "keep").unwrap();
    let r = train_small(&sh.model, &data, &file, &[]);
    expect_error(&r, &["--out", "not a directory"]);
    assert_eq!(fs::read(&file).unwrap(), b"keep");
}

#[test]
fn bad_adapters_fail_cleanly() {
    let t = trained();
    let sh = shared();
    let tmp = TempDir::new("badadapter");
    let good = read_adapter(&t.dir);
    let config: Value = read_json(&t.dir.join("adapter_config.json"));
    let as_written = |edit: &dyn Fn(&str, &mut T)| -> Vec<T> {
        good.values()
            .map(|x| {
                let mut w = T {
                    name: x.name.clone(),
                    dims: x.dims.clone(),
                    dt: Dt::F32,
                    data: x.data.clone(),
                };
                edit(&x.name, &mut w);
                w
            })
            .collect()
    };
    let victim = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight";
    assert!(good.contains_key(victim));

    let shape = tmp.join("shape");
    let swapped = as_written(&|n, w| {
        if n == victim {
            w.dims.reverse();
        }
    });
    write_adapter(&shape, &swapped, Some(&config));
    let nan = tmp.join("nan");
    let with_nan = as_written(&|n, w| {
        if n == victim {
            w.data[5] = f32::NAN;
        }
    });
    write_adapter(&nan, &with_nan, Some(&config));
    let no_cfg = tmp.join("nocfg");
    write_adapter(&no_cfg, &as_written(&|_, _| {}), None);

    let data = &t.data;
    for (dir, needles) in [
        (&shape, vec![victim, "shape"]),
        (&nan, vec![victim]),
        (&no_cfg, vec!["adapter_config.json"]),
    ] {
        let r = fedcdd([
            "eval",
            "--model",
            &s(&sh.model),
            "--adapter",
            &s(dir),
            "--data",
            &s(data),
            "--threads",
            THREADS,
        ]);
        expect_error(&r, &needles);
        let out = tmp.join("out");
        let r = train_small(&sh.model, data, &out, &["--adapter-init", &s(dir)]);
        expect_error(&r, &needles);
        expect_no_out(&r, &out);
        let r = generate(&sh.model, Some(dir), "Hello", &["--max-tokens", "2"]);
        expect_error(&r, &needles);
        let r = fedcdd([
            "merge",
            "--model",
            &s(&sh.model),
            "--adapter",
            &s(dir),
            "--out",
            &s(&out),
        ]);
        expect_error(&r, &needles);
        expect_no_out(&r, &out);
    }
}

#[test]
fn bad_generate_and_eval_flags_fail_cleanly() {
    let sh = shared();
    let m = &sh.model;
    for (extra, needles) in [
        (vec!["--max-tokens", "0"], vec!["--max-tokens"]),
        (vec!["--temperature", "-0.5"], vec!["--temperature"]),
        (vec!["--temperature", "NaN"], vec!["--temperature"]),
        (
            vec!["--top-p", "1.5", "--temperature", "1"],
            vec!["--top-p"],
        ),
    ] {
        expect_error(&generate(m, None, "Hello", &extra), &needles);
    }
    expect_error(&generate(m, None, "", &[]), &["--prompt"]);
    for flag in ["--batch", "--seq"] {
        let r = fedcdd(["eval", "--model", &s(m), "--data", &s(&sh.all), flag, "0"]);
        expect_error(&r, &[&format!("{flag} must be at least 1")]);
    }
}

#[test]
fn merge_refuses_out_equal_to_model() {
    let tmp = TempDir::new("mergeself");
    let model = model_copy("mergeself-model", &[]);
    let before = snapshot_dir(model.path());
    let adapter = &trained().dir;
    // The same directory spelled through its parent.
    let name = model.path().file_name().unwrap();
    let dot = model.path().join("..").join(name);
    let link = tmp.join("link");
    #[cfg(unix)]
    std::os::unix::fs::symlink(model.path(), &link).unwrap();
    let mut outs = vec![model.path().to_path_buf(), dot];
    if link.exists() {
        outs.push(link);
    }
    for out in outs {
        let r = fedcdd([
            "merge",
            "--model",
            &s(model.path()),
            "--adapter",
            &s(adapter),
            "--out",
            &s(&out),
        ]);
        expect_error(&r, &["--out", "--model"]);
    }
    assert!(
        snapshot_dir(model.path()) == before,
        "a refused merge changed the model directory"
    );
}

#[test]
fn train_help_mentions_every_flag() {
    let help = fedcdd(["train", "--help"]).ok().stdout;
    for flag in [
        "--model",
        "--data",
        "--out",
        "--adapter-init",
        "--steps",
        "--batch",
        "--seq",
        "--grad-accum",
        "--lr",
        "--optimizer",
        "--weight-decay",
        "--momentum",
        "--max-grad-norm",
        "--warmup",
        "--lora-r",
        "--lora-alpha",
        "--lora-dropout",
        "--targets",
        "--rslora",
        "--seed",
        "--threads",
    ] {
        assert!(
            help.split(|c: char| c.is_whitespace() || c == ',')
                .any(|w| w == flag),
            "train --help does not mention {flag}:\n{help}"
        );
    }
}

/// `fedcdd base`: the shipped base model unpacks into an empty cache with no pre-training; the
/// checksum it prints is `sha256sum`'s of the file; `--out` copies a directory that loads as
/// a model; unknown sizes are errors naming the flag.
#[test]
fn base_unpacks_the_shipped_model_with_its_checksum() {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("base_cmd")
        .join(std::process::id().to_string());
    let _ = fs::remove_dir_all(&root);
    let (cache, copy) = (root.join("cache"), root.join("copy"));
    let out = std::process::Command::new(fedcdd_bin())
        .env("FEDCDD_CACHE", &cache)
        .args(["base", "--out", &s(&copy)])
        .output()
        .expect("run fedcdd base");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("unpacked the shipped base model"),
        "{stderr}"
    );
    assert!(!stderr.contains("pre-train"), "{stderr}");
    let printed = stdout
        .split("sha256 ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .expect("a sha256 in the output")
        .to_string();
    assert_eq!(printed.len(), 64);
    match std::process::Command::new("sha256sum")
        .arg(copy.join("model.safetensors"))
        .output()
    {
        Ok(o) if o.status.success() => {
            let line = String::from_utf8_lossy(&o.stdout).to_string();
            assert!(line.starts_with(&printed), "sha256sum says {line}");
        }
        _ => eprintln!("skipping the sha256sum check: sha256sum is not installed"),
    }
    fedcdd_host::model::config::LlamaConfig::load(&copy).expect("the copy loads as a model");
    let bad = fedcdd(["base", "--size", "huge"]);
    assert!(!bad.status.success());
    assert!(bad.stderr.contains("--size"), "{bad}");
    let _ = fs::remove_dir_all(&root);
}
