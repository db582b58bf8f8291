//! Training data: records from JSONL / JSON files, the prompt templates, tokenized examples
//! with loss masks, and fixed-length batches.
//!
//! # File formats
//!
//! A data file is either a JSON array of records or a sequence of JSON records (JSONL: one
//! per line; a record may also span lines, records only need whitespace between them). A
//! UTF-8 byte-order mark is skipped. Each record is an object in one of three shapes, tried
//! in this order:
//!
//! - **ShareGPT**: `{"conversations": [{"from": "human", "value": "…"}, {"from": "gpt",
//!   "value": "…"}, …]}`; `"messages"` for `"conversations"`, `"role"` for `"from"` and
//!   `"content"` for `"value"` are accepted too. Roles: `system` (first turn only),
//!   `human`/`user`, `gpt`/`assistant`/`model`/`chatgpt`/`bing`/`bard`. After an optional
//!   system turn, user and assistant turns must alternate starting with the user and end with
//!   an assistant turn.
//! - **Alpaca**: `{"instruction": "…", "input": "…", "output": "…"}`; `input` may be absent,
//!   null or empty.
//! - **Text**: `{"text": "…"}`.
//!
//! Every record may carry `"domain": "…"` (used by the federated benchmark to tell clients'
//! data apart). Other keys are ignored. Errors name the file, the line (1-based) where the
//! record starts, and the field.
//!
//! # Templates and loss masks
//!
//! - Text: `ids = encode(text, add_special_tokens=true)`; every token after the first is a
//!   target.
//! - Alpaca: the Stanford Alpaca prompt ([`alpaca_prompt`], with and without input);
//!   `ids = encode(prompt + output, true) + [eos]`; targets are the response tokens (positions
//!   `≥ len(encode(prompt, true))`) and the eos.
//! - ShareGPT: rendered as a chain of Alpaca-style blocks. Turn 0's prompt is
//!   `{system}\n\n### Instruction:\n{user}\n\n### Response:\n`, where `system` defaults to the
//!   Alpaca no-input preamble ([`ALPACA_PREAMBLE`]), so a one-turn conversation without system
//!   prompt is exactly the Alpaca record `{instruction: user, output: assistant}`. Turn k > 0's
//!   prompt is `\n\n### Instruction:\n{user}\n\n### Response:\n`. Each turn contributes
//!   `encode(prompt_k + answer_k, add_special_tokens = (k == 0)) + [eos]`; its targets are the
//!   answer tokens (positions `≥ len(encode(prompt_k, k == 0))` within the turn) and the eos.
//!
//! The response boundary is the length of the prompt's own encoding. With the byte-level
//! BPE of this crate (and any tokenizer whose pre-tokenizer splits at the prompt's final
//! newline) `encode(prompt + answer)` starts with `encode(prompt)`. When a tokenizer merges
//! across that boundary, the boundary is the longest common prefix of the two encodings: the
//! token that straddles it counts as response.

use std::path::Path;

use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use serde_json::{Map, Value, json};

use crate::io::write_atomic;
use crate::progress;

use super::tokenizer::Tokenizer;

/// The `ignore_index` of the targets of a [`Batch`] (PyTorch's default).
pub const IGNORE_INDEX: i32 = -100;

/// The Alpaca preamble of records without input.
pub const ALPACA_PREAMBLE: &str = "Below is an instruction that describes a task. Write a \
                                   response that appropriately completes the request.";
/// The Alpaca preamble of records with input.
pub const ALPACA_PREAMBLE_INPUT: &str = "Below is an instruction that describes a task, \
                                         paired with an input that provides further context. \
                                         Write a response that appropriately completes the \
                                         request.";

/// One user turn and the assistant's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    pub user: String,
    pub assistant: String,
}

/// One training record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Text {
        text: String,
        domain: Option<String>,
    },
    Alpaca {
        instruction: String,
        /// Empty when the record has no input.
        input: String,
        output: String,
        domain: Option<String>,
    },
    ShareGpt {
        system: Option<String>,
        turns: Vec<Turn>,
        domain: Option<String>,
    },
}

impl Record {
    pub fn domain(&self) -> Option<&str> {
        match self {
            Record::Text { domain, .. }
            | Record::Alpaca { domain, .. }
            | Record::ShareGpt { domain, .. } => domain.as_deref(),
        }
    }

    /// The record as JSON in the format [`load_records`] reads (ShareGPT with
    /// `from`/`value`).
    pub fn to_json(&self) -> Value {
        let mut obj = match self {
            Record::Text { text, .. } => json!({ "text": text }),
            Record::Alpaca {
                instruction,
                input,
                output,
                ..
            } => json!({ "instruction": instruction, "input": input, "output": output }),
            Record::ShareGpt { system, turns, .. } => {
                let mut conv = Vec::new();
                if let Some(s) = system {
                    conv.push(json!({"from": "system", "value": s}));
                }
                for t in turns {
                    conv.push(json!({"from": "human", "value": t.user}));
                    conv.push(json!({"from": "gpt", "value": t.assistant}));
                }
                json!({ "conversations": conv })
            }
        };
        if let (Some(d), Value::Object(m)) = (self.domain(), &mut obj) {
            m.insert("domain".into(), json!(d));
        }
        obj
    }

    /// Parses one record; the error says which field is wrong (without a location).
    pub fn from_json(value: &Value) -> std::result::Result<Record, String> {
        let Value::Object(obj) = value else {
            return Err(format!("expected a JSON object, got {}", kind(value)));
        };
        let domain = opt_string(obj, "domain")?;
        for key in ["conversations", "messages"] {
            if let Some(conv) = obj.get(key) {
                return parse_sharegpt(key, conv, domain);
            }
        }
        if obj.contains_key("instruction") {
            let instruction = req_string(obj, "instruction")?;
            let input = opt_string(obj, "input")?.unwrap_or_default();
            let output = req_string(obj, "output")?;
            return Ok(Record::Alpaca {
                instruction,
                input,
                output,
                domain,
            });
        }
        if obj.contains_key("text") {
            let text = req_string(obj, "text")?;
            if text.is_empty() {
                return Err("field \"text\" is empty".into());
            }
            return Ok(Record::Text { text, domain });
        }
        Err(
            "the record has none of the fields \"text\" (plain text), \"instruction\"/\"output\" \
             (Alpaca) or \"conversations\" (ShareGPT)"
                .into(),
        )
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn req_string(obj: &Map<String, Value>, key: &str) -> std::result::Result<String, String> {
    match obj.get(key) {
        None => Err(format!("missing field {key:?}")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(format!("field {key:?} must be a string, got {}", kind(v))),
    }
}

fn opt_string(obj: &Map<String, Value>, key: &str) -> std::result::Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(format!("field {key:?} must be a string, got {}", kind(v))),
    }
}

#[derive(PartialEq)]
enum Role {
    System,
    User,
    Assistant,
}

fn parse_sharegpt(
    key: &str,
    conv: &Value,
    domain: Option<String>,
) -> std::result::Result<Record, String> {
    let Value::Array(items) = conv else {
        return Err(format!(
            "field {key:?} must be an array, got {}",
            kind(conv)
        ));
    };
    let mut system = None;
    let mut turns: Vec<Turn> = Vec::new();
    let mut pending_user: Option<String> = None;
    for (i, item) in items.iter().enumerate() {
        let Value::Object(m) = item else {
            return Err(format!("{key}[{i}] must be an object, got {}", kind(item)));
        };
        let (role_key, role) = match (m.get("from"), m.get("role")) {
            (Some(v), _) => ("from", v),
            (None, Some(v)) => ("role", v),
            (None, None) => return Err(format!("{key}[{i}] has no field \"from\" or \"role\"")),
        };
        let role_name = role
            .as_str()
            .ok_or_else(|| format!("{key}[{i}].{role_key} must be a string, got {}", kind(role)))?;
        let role = match role_name.to_ascii_lowercase().as_str() {
            "system" => Role::System,
            "human" | "user" => Role::User,
            "gpt" | "assistant" | "model" | "chatgpt" | "bing" | "bard" => Role::Assistant,
            _ => {
                return Err(format!(
                    "{key}[{i}].{role_key} is {role_name:?}; expected system, human/user or \
                     gpt/assistant"
                ));
            }
        };
        let (text_key, text) = match (m.get("value"), m.get("content")) {
            (Some(v), _) => ("value", v),
            (None, Some(v)) => ("content", v),
            (None, None) => {
                return Err(format!("{key}[{i}] has no field \"value\" or \"content\""));
            }
        };
        let text = text
            .as_str()
            .ok_or_else(|| format!("{key}[{i}].{text_key} must be a string, got {}", kind(text)))?
            .to_string();
        match role {
            Role::System if i == 0 => system = Some(text),
            Role::System => {
                return Err(format!(
                    "{key}[{i}] is a system turn; only the first turn may be one"
                ));
            }
            Role::User if pending_user.is_none() => pending_user = Some(text),
            Role::User => {
                return Err(format!(
                    "{key}[{i}] is a second user turn in a row; user and assistant turns must \
                     alternate"
                ));
            }
            Role::Assistant => match pending_user.take() {
                Some(user) => turns.push(Turn {
                    user,
                    assistant: text,
                }),
                None => {
                    return Err(format!(
                        "{key}[{i}] is an assistant turn without a user turn before it; \
                         conversations start with the user and alternate"
                    ));
                }
            },
        }
    }
    if pending_user.is_some() {
        return Err(format!(
            "{key} ends with a user turn that has no answer (the last turn must be the \
             assistant's)"
        ));
    }
    if turns.is_empty() {
        return Err(format!(
            "{key} has no user/assistant exchange (nothing to train on)"
        ));
    }
    Ok(Record::ShareGpt {
        system,
        turns,
        domain,
    })
}

/// 1-based line of byte offset `pos` in `text`.
fn line_of(text: &str, pos: usize) -> usize {
    1 + text.as_bytes()[..pos.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

/// Line numbers of increasing byte offsets in linear time overall.
struct Lines<'a> {
    bytes: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Self {
        Lines {
            bytes: text.as_bytes(),
            pos: 0,
            line: 1,
        }
    }

    /// 1-based line of byte offset `pos` (offsets asked for never decrease).
    fn at(&mut self, pos: usize) -> usize {
        let pos = pos.min(self.bytes.len());
        if pos < self.pos {
            self.pos = 0;
            self.line = 1;
        }
        self.line += self.bytes[self.pos..pos]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        self.pos = pos;
        self.line
    }
}

/// Byte offset of the first non-whitespace byte at or after `pos`.
fn skip_ws(text: &str, mut pos: usize) -> usize {
    let b = text.as_bytes();
    while pos < b.len() && b[pos].is_ascii_whitespace() {
        pos += 1;
    }
    pos
}

/// The JSON values of `text` with the 1-based line each starts on: either the elements of a
/// top-level array, or a whitespace-separated sequence of values (JSONL).
fn json_values(text: &str, path: &Path) -> Result<Vec<(usize, Value)>> {
    let start = skip_ws(text, 0);
    let is_array = text.as_bytes().get(start) == Some(&b'[');
    let mut out = Vec::new();
    let mut lines = Lines::new(text);
    // Parse one value at byte offset `pos`; returns it and the offset after it.
    let parse_at = |pos: usize| -> Result<(Value, usize)> {
        let mut stream = serde_json::Deserializer::from_str(&text[pos..]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(v)) => Ok((v, pos + stream.byte_offset())),
            Some(Err(e)) => {
                // serde_json counts from `pos`; report positions in the whole file.
                let line = line_of(text, pos) + e.line().saturating_sub(1);
                let column = if e.line() <= 1 {
                    let line_start = text[..pos].rfind('\n').map_or(0, |i| i + 1);
                    pos - line_start + e.column()
                } else {
                    e.column()
                };
                let msg = e.to_string();
                let msg = msg.rfind(" at line ").map_or(msg.as_str(), |i| &msg[..i]);
                bail!(
                    "{}:{line}: invalid JSON (column {column}): {msg}",
                    path.display()
                )
            }
            None => bail!(
                "{}:{}: unexpected end of file",
                path.display(),
                line_of(text, pos)
            ),
        }
    };
    if is_array {
        let mut pos = skip_ws(text, start + 1);
        if text.as_bytes().get(pos) == Some(&b']') {
            pos += 1;
        } else {
            loop {
                let line = lines.at(pos);
                let (v, next) = parse_at(pos)?;
                out.push((line, v));
                pos = skip_ws(text, next);
                match text.as_bytes().get(pos) {
                    Some(b',') => pos = skip_ws(text, pos + 1),
                    Some(b']') => {
                        pos += 1;
                        break;
                    }
                    Some(_) => bail!(
                        "{}:{}: expected ',' or ']' after an array element",
                        path.display(),
                        line_of(text, pos)
                    ),
                    None => bail!(
                        "{}:{}: the JSON array is not closed (missing ']')",
                        path.display(),
                        line_of(text, pos)
                    ),
                }
            }
        }
        let rest = skip_ws(text, pos);
        if rest < text.len() {
            bail!(
                "{}:{}: unexpected text after the JSON array",
                path.display(),
                line_of(text, rest)
            );
        }
    } else {
        let mut pos = start;
        while pos < text.len() {
            let line = lines.at(pos);
            let (v, next) = parse_at(pos)?;
            out.push((line, v));
            pos = skip_ws(text, next);
        }
    }
    Ok(out)
}

/// Reads the records of a JSONL or JSON-array file (see the module docs).
pub fn load_records(path: &Path) -> Result<Vec<Record>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_records(&bytes, path)
}

/// Reads the records of JSONL or JSON-array bytes; errors name `origin` and the line.
pub fn parse_records(bytes: &[u8], origin: &Path) -> Result<Vec<Record>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        anyhow::anyhow!("{}:{line}: the file is not valid UTF-8", origin.display())
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let values = json_values(text, origin)?;
    let mut records = Vec::with_capacity(values.len());
    for (line, v) in values {
        let r = Record::from_json(&v)
            .map_err(|e| anyhow::anyhow!("{}:{line}: {e}", origin.display()))?;
        records.push(r);
    }
    if records.is_empty() {
        bail!("{}: the file holds no records", origin.display());
    }
    Ok(records)
}

/// Records as JSONL text (one compact JSON object per line).
pub fn records_to_jsonl(records: &[Record]) -> String {
    let mut out = String::new();
    for r in records {
        out.push_str(&r.to_json().to_string());
        out.push('\n');
    }
    out
}

/// Writes records as JSONL, atomically.
pub fn write_jsonl(path: &Path, records: &[Record]) -> Result<()> {
    write_atomic(path, records_to_jsonl(records).as_bytes())
}

/// The Stanford Alpaca prompt (ending with `### Response:\n`).
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!("{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Response:\n")
    } else {
        format!(
            "{ALPACA_PREAMBLE_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n\
             ### Response:\n"
        )
    }
}

/// The prompt of turn `k` of a ShareGPT conversation (see the module docs).
pub fn sharegpt_prompt(system: Option<&str>, k: usize, user: &str) -> String {
    if k == 0 {
        let system = system.unwrap_or(ALPACA_PREAMBLE);
        format!("{system}\n\n### Instruction:\n{user}\n\n### Response:\n")
    } else {
        format!("\n\n### Instruction:\n{user}\n\n### Response:\n")
    }
}

/// A tokenized record: `is_target[t]` says the loss predicts token `t` (from tokens `< t`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub is_target: Vec<bool>,
    pub domain: Option<String>,
}

impl Example {
    pub fn n_targets(&self) -> usize {
        self.is_target.iter().filter(|&&t| t).count()
    }
}

/// Appends one prompt/answer block: `encode(prompt + answer, special) + [eos]`, the answer
/// and eos as targets.
fn push_block(
    tok: &Tokenizer,
    prompt: &str,
    answer: &str,
    special: bool,
    eos: u32,
    ids: &mut Vec<u32>,
    is_target: &mut Vec<bool>,
) -> Result<()> {
    let full = tok.encode(&format!("{prompt}{answer}"), special)?;
    let prompt_ids = tok.encode(prompt, special)?;
    let boundary = full
        .iter()
        .zip(&prompt_ids)
        .take_while(|(a, b)| a == b)
        .count();
    is_target.extend((0..full.len()).map(|t| t >= boundary));
    ids.extend_from_slice(&full);
    ids.push(eos);
    is_target.push(true);
    Ok(())
}

/// Tokenizes records with the templates and masks of the module docs (records in parallel;
/// the output keeps the input order).
pub fn tokenize_records(records: &[Record], tok: &Tokenizer) -> Result<Vec<Example>> {
    records
        .par_iter()
        .enumerate()
        .map(|(i, r)| tokenize_record(i, r, tok))
        .collect()
}

/// One record; `i` is its index, for messages.
fn tokenize_record(i: usize, r: &Record, tok: &Tokenizer) -> Result<Example> {
    let mut ids = Vec::new();
    let mut is_target = Vec::new();
    let need_eos = || {
        tok.eos_id().with_context(|| {
            format!(
                "record {i}: instruction records need an end-of-sequence token, but the \
                 tokenizer {} has none",
                tok.path().display()
            )
        })
    };
    match r {
        Record::Text { text, .. } => {
            ids = tok
                .encode(text, true)
                .with_context(|| format!("record {i}"))?;
            is_target = (0..ids.len()).map(|t| t > 0).collect();
        }
        Record::Alpaca {
            instruction,
            input,
            output,
            ..
        } => {
            let eos = need_eos()?;
            let prompt = alpaca_prompt(instruction, input);
            push_block(tok, &prompt, output, true, eos, &mut ids, &mut is_target)
                .with_context(|| format!("record {i}"))?;
        }
        Record::ShareGpt { system, turns, .. } => {
            let eos = need_eos()?;
            for (k, turn) in turns.iter().enumerate() {
                let prompt = sharegpt_prompt(system.as_deref(), k, &turn.user);
                push_block(
                    tok,
                    &prompt,
                    &turn.assistant,
                    k == 0,
                    eos,
                    &mut ids,
                    &mut is_target,
                )
                .with_context(|| format!("record {i}, turn {k}"))?;
            }
        }
    }
    // Position 0 is never predicted.
    if let Some(first) = is_target.first_mut() {
        *first = false;
    }
    Ok(Example {
        ids,
        is_target,
        domain: r.domain().map(str::to_string),
    })
}

/// A `[batch, seq]` block of inputs and next-token targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    /// `ids[b·seq + t]`: input token `t` of row `b` (pad past the example's end).
    pub ids: Vec<i32>,
    /// `targets[b·seq + t]`: the token at `t + 1` when it is within the example (truncated to
    /// `seq + 1` tokens) and a target, else [`IGNORE_INDEX`].
    pub targets: Vec<i32>,
    /// Number of targets that are not [`IGNORE_INDEX`].
    pub n_targets: usize,
    /// `example_index[b]`: the position in the `examples` argument that row `b` came from.
    pub example_index: Vec<usize>,
}

/// One row per example; examples longer than `seq + 1` tokens are truncated (their first
/// `seq + 1` tokens are used: `seq` inputs, `seq` next-token targets).
pub fn make_batch(examples: &[&Example], seq: usize, pad_id: u32) -> Batch {
    let batch = examples.len();
    let mut ids = vec![pad_id as i32; batch * seq];
    let mut targets = vec![IGNORE_INDEX; batch * seq];
    let mut n_targets = 0;
    for (b, ex) in examples.iter().enumerate() {
        let n = ex.ids.len().min(seq + 1);
        let row = b * seq;
        for t in 0..seq.min(n) {
            ids[row + t] = ex.ids[t] as i32;
        }
        for t in 0..seq {
            let next = t + 1;
            if next < n && ex.is_target.get(next).copied().unwrap_or(false) {
                targets[row + t] = ex.ids[next] as i32;
                n_targets += 1;
            }
        }
    }
    Batch {
        batch,
        seq,
        ids,
        targets,
        n_targets,
        example_index: (0..batch).collect(),
    }
}

/// Reads and tokenizes a data file (an error when it holds no record).
pub fn load_examples(path: &Path, tok: &Tokenizer) -> Result<Vec<Example>> {
    let records = load_records(path)?;
    if records.is_empty() {
        bail!("{}: no records", path.display());
    }
    tokenize_records(&records, tok).with_context(|| format!("cannot tokenize {}", path.display()))
}

/// Keeps the examples with at least one target token within their first `seq + 1` tokens
/// (the part a training row sees); fails when none is left, naming the data file.
pub fn trainable_examples(examples: Vec<Example>, seq: usize, data: &Path) -> Result<Vec<Example>> {
    let total = examples.len();
    let kept: Vec<Example> = examples
        .into_iter()
        .filter(|e| e.is_target.iter().take(seq + 1).skip(1).any(|&t| t))
        .collect();
    if kept.is_empty() {
        bail!(
            "{}: none of the {total} examples has a target token within the first --seq {seq} \
             tokens (prompts are masked from the loss); raise --seq",
            data.display()
        );
    }
    if kept.len() < total {
        progress::warn(&format!(
            "{}: skipping {} of {total} examples with no target token within the first --seq \
             {seq} tokens",
            data.display(),
            total - kept.len()
        ));
    }
    Ok(kept)
}
