//! Checks the upload format's specification, `docs/wire-format.md`, against a second reader:
//! `tests/interop/fcdu_reader.py` (Python standard library only, written from that page
//! alone). Uploads written by the real `fedcdd encode` — and by `UploadWriter` for shapes the
//! CLI does not make — are read by both readers and compared: header fields, names, shapes,
//! dtypes, kept columns, σ and seeds exactly; dense values and kept columns bit for bit; the
//! regenerated noise to within one unit in the last place of the record's dtype (the spec
//! allows libm differences in the last bit) and at least 99 % bit-identical. Malformed uploads
//! must be rejected by both readers, and randomly mutated uploads (with a valid checksum)
//! must be judged alike.
//!
//! Skipped (with a `SKIPPED:` line) when `python3` cannot be run.

mod cli_util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use cli_util::*;
use fedcdd_core::wire::crc32;
use fedcdd_core::{
    DType, Element, Importance, Payload, TensorRecord, Upload, UploadHeader, UploadWriter, bf16,
    f16,
};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// The Python reader
// ---------------------------------------------------------------------------------------------

fn python_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        Command::new("python3")
            .args(["-c", "import json, math, struct, sys, zlib"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

/// Returns early (passing) with a `SKIPPED:` line when python3 is not runnable.
macro_rules! require_python {
    () => {
        if !python_available() {
            println!("SKIPPED: python3 is not runnable; the Python reader was not checked");
            return;
        }
    };
}

fn reader_script() -> PathBuf {
    workspace_root().join("tests/interop/fcdu_reader.py")
}

/// Elements the Python reader reconstructs at most in these tests (beyond: exit status 3).
const PY_MAX_ELEMENTS: usize = 200_000;

struct PyRun {
    code: Option<i32>,
    stderr: String,
    json: Option<Value>,
}

impl PyRun {
    fn describe(&self) -> String {
        format!("exit {:?}, stderr: {}", self.code, self.stderr.trim_end())
    }
}

/// Runs the Python reader on `upload` (`extra`: more arguments, e.g. `--no-values`).
fn run_py(upload: &Path, extra: &[&str]) -> PyRun {
    static N: AtomicU64 = AtomicU64::new(0);
    let json = upload.with_extension(format!("py{}.json", N.fetch_add(1, Ordering::Relaxed)));
    let max = PY_MAX_ELEMENTS.to_string();
    let out = Command::new("python3")
        .arg("-S")
        .arg(reader_script())
        .arg(upload)
        .arg("--json")
        .arg(&json)
        .args(["--max-elements", &max])
        .args(extra)
        .output()
        .expect("cannot run python3");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = if out.status.success() {
        let text = fs::read(&json).unwrap_or_else(|e| panic!("python wrote no JSON: {e}"));
        let _ = fs::remove_file(&json);
        Some(serde_json::from_slice(&text).expect("the Python reader wrote invalid JSON"))
    } else {
        None
    };
    PyRun {
        code: out.status.code(),
        stderr,
        json,
    }
}

/// Runs the Python reader once on many uploads (`--batch`): for each, the exit status and
/// `error:` line the single-file mode would give, and its JSON.
fn run_py_batch(dir: &TempDir, uploads: &[PathBuf], extra: &[&str]) -> Vec<PyRun> {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let list = dir.join(format!("batch{n}.txt"));
    let json = dir.join(format!("batch{n}.json"));
    let text: String = uploads.iter().map(|p| s(p) + "\n").collect();
    fs::write(&list, text).unwrap();
    let max = PY_MAX_ELEMENTS.to_string();
    let out = Command::new("python3")
        .arg("-S")
        .arg(reader_script())
        .arg("--batch")
        .arg(&list)
        .arg(&json)
        .args(["--max-elements", &max])
        .args(extra)
        .output()
        .expect("cannot run python3");
    assert!(
        out.status.success(),
        "the Python reader's --batch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&fs::read(&json).unwrap()).expect("batch JSON");
    let items = v.as_array().expect("a list");
    assert_eq!(items.len(), uploads.len(), "batch: one result per upload");
    items
        .iter()
        .zip(uploads)
        .map(|(it, p)| {
            assert_eq!(it["path"].as_str(), Some(s(p).as_str()), "batch order");
            let code = it["status"].as_i64().map(|c| c as i32);
            PyRun {
                code,
                stderr: it["error"]
                    .as_str()
                    .map(|m| format!("error: {m}\n"))
                    .unwrap_or_default(),
                json: (code == Some(0)).then(|| it["result"].clone()),
            }
        })
        .collect()
}

/// Asserts that the Python reader rejected an upload the documented way.
fn assert_py_rejects(what: &str, py: &PyRun) {
    assert_eq!(
        py.code,
        Some(2),
        "{what}: the Python reader should exit 2, got {}",
        py.describe()
    );
    assert!(
        py.stderr.lines().any(|l| l.starts_with("error:")),
        "{what}: the Python reader printed no `error:` line: {}",
        py.describe()
    );
    assert!(
        !py.stderr.contains("Traceback"),
        "{what}: the Python reader crashed: {}",
        py.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// Comparing the two readers
// ---------------------------------------------------------------------------------------------

#[derive(Default, Debug)]
struct Stats {
    uploads: usize,
    tensors: usize,
    /// Values compared bit for bit (dense, kept, σ = 0 fill).
    exact: usize,
    /// Regenerated noise values compared.
    noise: usize,
    /// Noise values whose bits differ (by one unit in the last place at most).
    noise_diff: usize,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.uploads += o.uploads;
        self.tensors += o.tensors;
        self.exact += o.exact;
        self.noise += o.noise;
        self.noise_diff += o.noise_diff;
    }

    fn report(&self, what: &str) {
        println!(
            "{what}: {} uploads, {} tensors, {} values bit-identical as required, {} noise values \
             compared, {} of them not bit-identical (≤ 1 ulp)",
            self.uploads, self.tensors, self.exact, self.noise, self.noise_diff
        );
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
    }
}

fn importance_name(i: Importance) -> &'static str {
    match i {
        Importance::ColumnL2 => "column_l2",
        Importance::ElementAbs => "element_abs",
        Importance::RowL2 => "row_l2",
    }
}

fn num_elements(rec: &TensorRecord<'_>) -> usize {
    rec.dims.iter().map(|&d| d as usize).product()
}

/// `reconstruct` into the record's own dtype, widened to f32 bit patterns.
fn reconstruct_native<T: Element>(rec: &TensorRecord<'_>) -> Vec<u32> {
    let mut out = vec![T::default(); num_elements(rec)];
    rec.reconstruct::<T>(&mut out)
        .unwrap_or_else(|e| panic!("reconstruct {}: {e:?}", rec.name));
    out.iter().map(|v| v.to_f32().to_bits()).collect()
}

/// The Rust reader's values: `reconstruct::<f32>`, checked against `reconstruct` into the
/// record's own dtype (the spec rounds every value to that dtype).
fn rust_values(rec: &TensorRecord<'_>) -> Vec<u32> {
    let mut wide = vec![0f32; num_elements(rec)];
    rec.reconstruct::<f32>(&mut wide)
        .unwrap_or_else(|e| panic!("reconstruct {}: {e:?}", rec.name));
    let wide: Vec<u32> = wide.iter().map(|v| v.to_bits()).collect();
    let native = match rec.dtype {
        DType::F32 => return wide,
        DType::F16 => reconstruct_native::<f16>(rec),
        DType::BF16 => reconstruct_native::<bf16>(rec),
    };
    assert!(
        native == wide,
        "{}: reconstruct::<f32> differs from reconstruct::<{}> widened",
        rec.name,
        dtype_name(rec.dtype)
    );
    wide
}

/// A value of `dtype` (given widened to f32 bits) as an integer that orders like the value:
/// adjacent values of the dtype differ by 1.
fn ordered(dtype: DType, bits: u32) -> i64 {
    let x = f32::from_bits(bits);
    let (b, sign) = match dtype {
        DType::F32 => (bits as i64, 1i64 << 31),
        DType::F16 => (f16::from_f32(x).to_bits() as i64, 1 << 15),
        DType::BF16 => (bf16::from_f32(x).to_bits() as i64, 1 << 15),
    };
    if b & sign != 0 { -(b & (sign - 1)) } else { b }
}

fn as_u64(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what}: {v} is not an unsigned integer"))
}

/// Compares the Python reader's JSON with the Rust reader on the same bytes.
fn compare(label: &str, bytes: &[u8], py: &Value) -> Stats {
    let up = Upload::parse(bytes).unwrap_or_else(|e| panic!("{label}: Rust rejects: {e:?}"));
    let h = &up.header;
    assert_eq!(
        as_u64(&py["version"], label),
        h.version as u64,
        "{label}: version"
    );
    assert_eq!(
        as_u64(&py["round"], label),
        h.round as u64,
        "{label}: round"
    );
    assert_eq!(
        as_u64(&py["client_id"], label),
        h.client_id as u64,
        "{label}: client_id"
    );
    assert_eq!(
        as_u64(&py["num_samples"], label),
        h.num_samples,
        "{label}: num_samples"
    );
    assert_eq!(
        as_u64(&py["byte_len"], label),
        up.byte_len as u64,
        "{label}: byte_len"
    );
    let tensors = py["tensors"].as_array().expect("tensors");
    assert_eq!(
        tensors.len(),
        h.num_tensors as usize,
        "{label}: tensor count"
    );
    let mut st = Stats {
        uploads: 1,
        ..Stats::default()
    };
    let mut count = 0;
    for (t, rec) in up.records().enumerate() {
        let rec = rec.unwrap_or_else(|e| panic!("{label}: record {t}: {e:?}"));
        let pt = &tensors[t];
        let what = format!("{label}: tensor {t} ({})", rec.name);
        count += 1;
        st.tensors += 1;
        assert_eq!(rec.index as usize, t, "{what}: index");
        assert_eq!(pt["name"].as_str(), Some(rec.name), "{what}: name");
        let dims: Vec<u64> = pt["dims"]
            .as_array()
            .expect("dims")
            .iter()
            .map(|d| as_u64(d, &what))
            .collect();
        let rdims: Vec<u64> = rec.dims.iter().map(|&d| d as u64).collect();
        assert_eq!(dims, rdims, "{what}: dims");
        assert_eq!(
            pt["dtype"].as_str(),
            Some(dtype_name(rec.dtype)),
            "{what}: dtype"
        );
        let p = num_elements(&rec);
        let rows = if rdims.len() == 1 {
            1
        } else {
            rdims[0] as usize
        };
        let cols = p / rows;
        // Which elements the noise fills: masked units when σ ≠ 0. `None`: none.
        let noise_of: Option<(Vec<u32>, bool)> = match rec.payload {
            Payload::Dense { .. } => {
                assert_eq!(pt["kind"].as_str(), Some("dense"), "{what}: kind");
                for f in ["importance", "kept", "sigma", "sigma_bits", "seed"] {
                    assert!(pt[f].is_null(), "{what}: {f} of a dense record");
                }
                None
            }
            Payload::Masked {
                importance,
                sigma,
                seed,
                ..
            } => {
                assert_eq!(pt["kind"].as_str(), Some("masked"), "{what}: kind");
                assert_eq!(
                    pt["importance"].as_str(),
                    Some(importance_name(importance)),
                    "{what}: importance"
                );
                let kept: Vec<u32> = (0..rec.kept_count())
                    .map(|k| rec.kept_index(k).expect("kept index"))
                    .collect();
                let py_kept: Vec<u32> = pt["kept"]
                    .as_array()
                    .expect("kept")
                    .iter()
                    .map(|v| as_u64(v, &what) as u32)
                    .collect();
                assert_eq!(py_kept, kept, "{what}: kept indices");
                assert_eq!(
                    as_u64(&pt["sigma_bits"], &what),
                    sigma.to_bits() as u64,
                    "{what}: sigma bits"
                );
                // serde_json's default float parser is not correctly rounded: the bits above
                // are the exact check, this one only that `sigma` holds the same number.
                let py_sigma = pt["sigma"].as_f64().expect("sigma");
                assert!(
                    (py_sigma - sigma as f64).abs() <= 1e-12 * (sigma as f64).abs(),
                    "{what}: sigma {py_sigma} vs {sigma}"
                );
                assert_eq!(as_u64(&pt["seed"], &what), seed, "{what}: seed");
                (sigma != 0.0).then_some((kept, importance == Importance::ElementAbs))
            }
        };
        // Element e is noise when its unit's column is not kept.
        let is_noise = |e: usize| match &noise_of {
            None => false,
            Some((kept, elementwise)) => {
                let unit_col = if *elementwise { e } else { e % cols };
                kept.binary_search(&(unit_col as u32)).is_err()
            }
        };
        if pt["bits"].is_null() {
            continue;
        }
        let py_bits: Vec<u32> = pt["bits"]
            .as_array()
            .expect("bits")
            .iter()
            .map(|v| as_u64(v, &what) as u32)
            .collect();
        let rs_bits = rust_values(&rec);
        assert_eq!(py_bits.len(), rs_bits.len(), "{what}: number of values");
        for (e, (&a, &b)) in py_bits.iter().zip(&rs_bits).enumerate() {
            if !is_noise(e) {
                st.exact += 1;
                assert!(
                    a == b,
                    "{what}: element {e} (stored or zero) differs: Python {a:#010x} ({}), \
                     Rust {b:#010x} ({})",
                    f32::from_bits(a),
                    f32::from_bits(b)
                );
                continue;
            }
            st.noise += 1;
            if a != b {
                st.noise_diff += 1;
                let d = (ordered(rec.dtype, a) - ordered(rec.dtype, b)).abs();
                assert!(
                    d <= 1,
                    "{what}: noise element {e} differs by {d} ulps of {}: Python {a:#010x} ({}), \
                     Rust {b:#010x} ({})",
                    dtype_name(rec.dtype),
                    f32::from_bits(a),
                    f32::from_bits(b)
                );
            }
        }
    }
    assert_eq!(count, tensors.len(), "{label}: records walked");
    assert!(
        st.noise_diff * 100 <= st.noise,
        "{label}: {} of {} noise values are not bit-identical (more than 1 %)",
        st.noise_diff,
        st.noise
    );
    st
}

/// Both readers on one valid upload file; returns the comparison's counts.
fn check_valid(label: &str, path: &Path) -> Stats {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let py = run_py(path, &[]);
    let json = py
        .json
        .as_ref()
        .unwrap_or_else(|| panic!("{label}: the Python reader failed: {}", py.describe()));
    compare(label, &bytes, json)
}

// ---------------------------------------------------------------------------------------------
// Uploads from the CLI
// ---------------------------------------------------------------------------------------------

fn encode(dir: &TempDir, global: &Path, local: &Path, name: &str, args: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut a = vec![
        "encode".to_string(),
        "--global".into(),
        s(global),
        "--local".into(),
        s(local),
        "--out".into(),
        s(&out),
    ];
    a.extend(args.iter().map(|x| x.to_string()));
    fedcdd(&a).ok();
    out
}

#[test]
fn cli_uploads_read_alike() {
    require_python!();
    let dir = TempDir::new("wire-py-cli");
    let ex = dir.join("ex");
    fedcdd([
        "make-example",
        "--out",
        &s(&ex),
        "--layers",
        "2",
        "--hidden",
        "128",
        "--rank",
        "8",
        "--clients",
        "2",
        "--seed",
        "5",
    ])
    .ok();
    let g = ex.join("global");
    let c0 = ex.join("client-0");
    let c1 = ex.join("client-1");
    let noisy = |extra: &[&'static str]| -> Vec<&'static str> {
        ["--keep-ratio", "0.3", "--noise-scale", "0.5"]
            .iter()
            .chain(extra)
            .copied()
            .collect()
    };
    let cases: Vec<(&str, &PathBuf, Vec<&str>)> = vec![
        ("dense", &c0, vec!["--keep-ratio", "1", "--samples", "120"]),
        (
            "dense-f16",
            &c1,
            vec!["--keep-ratio", "1", "--dtype", "f16"],
        ),
        ("dense-bf16", &c0, vec!["--dtype", "bf16", "--round", "3"]),
        (
            "masked-sigma0",
            &c0,
            vec!["--keep-ratio", "0.25", "--noise-scale", "0"],
        ),
        (
            "masked-sigma0-elem-f16",
            &c1,
            vec![
                "--keep-ratio",
                "0.25",
                "--noise-scale",
                "0",
                "--importance",
                "element_abs",
                "--dtype",
                "f16",
            ],
        ),
        ("noisy-f32", &c0, noisy(&["--dtype", "f32", "--seed", "1"])),
        ("noisy-f16", &c0, noisy(&["--dtype", "f16", "--seed", "2"])),
        (
            "noisy-bf16",
            &c0,
            noisy(&["--dtype", "bf16", "--seed", "3"]),
        ),
        (
            "noisy-elem-f32",
            &c1,
            noisy(&["--importance", "element_abs", "--seed", "4"]),
        ),
        (
            "noisy-elem-bf16",
            &c1,
            noisy(&[
                "--importance",
                "element_abs",
                "--dtype",
                "bf16",
                "--seed",
                "0",
            ]),
        ),
        (
            "noisy-derived-seed",
            &c1,
            noisy(&["--round", "7", "--client-id", "300", "--samples", "99999"]),
        ),
        (
            "noisy-max-seed",
            &c0,
            noisy(&["--seed", "18446744073709551615", "--dtype", "f16"]),
        ),
        (
            "sparse-loud-f16",
            &c1,
            vec![
                "--keep-ratio",
                "0.05",
                "--noise-scale",
                "3",
                "--dtype",
                "f16",
                "--seed",
                "77",
            ],
        ),
        (
            "ffa-lora",
            &c0,
            noisy(&["--algorithm", "ffa-lora", "--seed", "8"]),
        ),
    ];
    let mut total = Stats::default();
    for (name, local, args) in &cases {
        let up = encode(&dir, &g, local, &format!("{name}.fcdu"), args);
        let st = check_valid(name, &up);
        println!(
            "  {name}: {} tensors, {} exact values, {} noise values, {} not bit-identical",
            st.tensors, st.exact, st.noise, st.noise_diff
        );
        total.add(&st);
    }
    total.report("CLI uploads");
    assert!(total.noise > 40_000, "too little noise compared: {total:?}");
}

/// An adapter with 1-D and 4-D tensors (a DoRA-style magnitude vector, a conv LoRA pair), if
/// the CLI accepts them; otherwise the shapes are covered by `writer_uploads_read_alike`.
#[test]
fn cli_uploads_of_unusual_shapes() {
    require_python!();
    let dir = TempDir::new("wire-py-shapes");
    let mut rng = Rng::new(42);
    let base = "base_model.model.model.layers.0";
    let specs: Vec<(String, Vec<usize>)> = vec![
        (
            format!("{base}.self_attn.q_proj.lora_A.weight"),
            vec![4, 24],
        ),
        (
            format!("{base}.self_attn.q_proj.lora_B.weight"),
            vec![32, 4],
        ),
        (
            format!("{base}.self_attn.q_proj.lora_magnitude_vector"),
            vec![32],
        ),
        (format!("{base}.conv.lora_A.weight"), vec![4, 3, 3, 3]),
        (format!("{base}.conv.lora_B.weight"), vec![8, 4, 1, 1]),
    ];
    let global: Vec<T> = specs
        .iter()
        .map(|(name, dims)| T {
            name: name.clone(),
            dims: dims.clone(),
            dt: Dt::F32,
            data: f32s(&rng.normal_vec(dims.iter().product(), 0.2)),
        })
        .collect();
    let local: Vec<T> = global
        .iter()
        .map(|t| T {
            data: t
                .data
                .iter()
                .map(|&v| v + 0.01 * rng.normal() as f32)
                .collect(),
            ..t.clone()
        })
        .collect();
    let g = dir.join("global");
    let l = dir.join("local");
    write_adapter(&g, &global, Some(&lora_config(4)));
    write_adapter(&l, &local, Some(&lora_config(4)));
    let mut total = Stats::default();
    for (i, args) in [
        vec!["--keep-ratio", "0.5", "--noise-scale", "1", "--seed", "9"],
        vec![
            "--keep-ratio",
            "0.3",
            "--noise-scale",
            "1",
            "--importance",
            "element_abs",
            "--dtype",
            "f16",
        ],
    ]
    .iter()
    .enumerate()
    {
        let out = dir.join(format!("shapes{i}.fcdu"));
        let mut a = vec![
            "encode".to_string(),
            "--global".into(),
            s(&g),
            "--local".into(),
            s(&l),
            "--out".into(),
            s(&out),
        ];
        a.extend(args.iter().map(|x| x.to_string()));
        let run = fedcdd(&a);
        if !run.status.success() {
            println!(
                "note: `fedcdd encode` refuses the 1-D/4-D adapter ({}); those shapes are \
                 covered by writer_uploads_read_alike",
                run.error_lines().join(" ")
            );
            return;
        }
        let bytes = fs::read(&out).unwrap();
        let up = Upload::parse(&bytes).unwrap();
        let ranks: Vec<usize> = up.records().map(|r| r.unwrap().dims.len()).collect();
        println!("  shapes{i}: tensor ranks {ranks:?}");
        total.add(&check_valid(&format!("shapes{i}"), &out));
    }
    total.report("CLI uploads of 1-D/4-D adapters");
}

// ---------------------------------------------------------------------------------------------
// Uploads from UploadWriter (shapes and values the CLI does not produce)
// ---------------------------------------------------------------------------------------------

enum Rec {
    Dense {
        name: String,
        dims: Vec<usize>,
        dtype: DType,
        values: Vec<f32>,
    },
    Masked {
        name: String,
        dims: Vec<usize>,
        dtype: DType,
        importance: Importance,
        kept: Vec<u32>,
        values: Vec<f32>,
        sigma: f32,
        seed: u64,
    },
}

fn conv<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn write_rec(w: &mut UploadWriter<'_>, r: &Rec) {
    let res = match r {
        Rec::Dense {
            name,
            dims,
            dtype,
            values,
        } => match dtype {
            DType::F32 => w.dense(name, dims, values),
            DType::F16 => w.dense(name, dims, &conv::<f16>(values)),
            DType::BF16 => w.dense(name, dims, &conv::<bf16>(values)),
        },
        Rec::Masked {
            name,
            dims,
            dtype,
            importance,
            kept,
            values,
            sigma,
            seed,
        } => match dtype {
            DType::F32 => w.masked(name, dims, *importance, kept, values, *sigma, *seed),
            DType::F16 => w.masked(
                name,
                dims,
                *importance,
                kept,
                &conv::<f16>(values),
                *sigma,
                *seed,
            ),
            DType::BF16 => w.masked(
                name,
                dims,
                *importance,
                kept,
                &conv::<bf16>(values),
                *sigma,
                *seed,
            ),
        },
    };
    res.unwrap_or_else(|e| panic!("UploadWriter refused a record: {e:?}"));
}

/// Writes an upload with `UploadWriter` (measure, then write).
fn build(header: UploadHeader, recs: &[Rec]) -> Vec<u8> {
    let mut m = UploadWriter::measure(header).expect("measure");
    for r in recs {
        write_rec(&mut m, r);
    }
    let len = m.finish().expect("finish (measure)");
    let mut buf = vec![0u8; len];
    let mut w = UploadWriter::new(&mut buf, header).expect("writer");
    for r in recs {
        write_rec(&mut w, r);
    }
    assert_eq!(w.finish().expect("finish"), len);
    buf
}

/// A masked record with `k` kept units chosen at random, values ~ N(0, 1).
#[allow(clippy::too_many_arguments)]
fn rand_masked(
    rng: &mut Rng,
    name: &str,
    dims: &[usize],
    dtype: DType,
    importance: Importance,
    k: usize,
    sigma: f32,
    seed: u64,
) -> Rec {
    let p: usize = dims.iter().product();
    let rows = if dims.len() == 1 { 1 } else { dims[0] };
    let (r, c) = match importance {
        Importance::ColumnL2 => (rows, p / rows),
        Importance::ElementAbs => (1, p),
        Importance::RowL2 => (p / rows, rows),
    };
    let mut cols: Vec<u32> = (0..c as u32).collect();
    // Partial Fisher–Yates for K distinct columns.
    for i in 0..k {
        let j = i + (rng.next_u64() % (c - i) as u64) as usize;
        cols.swap(i, j);
    }
    let mut kept = cols[..k].to_vec();
    kept.sort_unstable();
    Rec::Masked {
        name: name.to_string(),
        dims: dims.to_vec(),
        dtype,
        importance,
        kept,
        values: f32s(&rng.normal_vec(k * r, 1.0)),
        sigma,
        seed,
    }
}

fn dense(rng: &mut Rng, name: &str, dims: &[usize], dtype: DType, scale: f64) -> Rec {
    Rec::Dense {
        name: name.to_string(),
        dims: dims.to_vec(),
        dtype,
        values: f32s(&rng.normal_vec(dims.iter().product(), scale)),
    }
}

/// Uploads exercising every shape rank, every importance, every dtype, K = C, σ = 0,
/// σ so small the noise is subnormal, σ so large it overflows, extreme seeds, non-ASCII names
/// and record indices past 127.
fn writer_uploads() -> Vec<(String, Vec<u8>)> {
    use DType::*;
    use Importance::*;
    let mut rng = Rng::new(2024);
    let mut out = Vec::new();

    let mut recs = vec![
        dense(&mut rng, "bias.1d", &[7], F32, 1.0),
        dense(&mut rng, "dense.f16.subnormal", &[3, 5], F16, 1e-6),
        dense(&mut rng, "dense.bf16.huge", &[2, 2, 2], BF16, 1e30),
        dense(&mut rng, "dense.4d.f16", &[2, 3, 2, 2], F16, 100.0),
    ];
    let shapes: [&[usize]; 5] = [&[9], &[5, 12], &[4, 3, 5], &[3, 2, 2, 4], &[1, 1]];
    let mut n = 0u64;
    for dims in shapes {
        for dtype in [F32, F16, BF16] {
            for importance in [ColumnL2, ElementAbs, RowL2] {
                let p: usize = dims.iter().product();
                let rows = if dims.len() == 1 { 1 } else { dims[0] };
                let c = match importance {
                    ColumnL2 => p / rows,
                    ElementAbs => p,
                    RowL2 => rows,
                };
                let k = 1 + (n as usize % c);
                n += 1;
                recs.push(rand_masked(
                    &mut rng,
                    &format!("m{n}.{dims:?}.ŵ"),
                    dims,
                    dtype,
                    importance,
                    k,
                    0.75,
                    n.wrapping_mul(0x1234_5678_9abc_def1),
                ));
            }
        }
    }
    out.push((
        "writer-shapes".to_string(),
        build(
            UploadHeader::new(u32::MAX, u32::MAX, u64::MAX, recs.len() as u32),
            &recs,
        ),
    ));

    // K = C (nothing masked), σ = 0 with noise absent, extreme σ, extreme seeds.
    let mut recs = vec![
        rand_masked(&mut rng, "all.kept", &[6, 8], F32, ColumnL2, 8, 1.0, 1),
        rand_masked(&mut rng, "sigma0.bf16", &[6, 8], BF16, ColumnL2, 2, 0.0, 2),
        rand_masked(
            &mut rng,
            "tiny.sigma.f16",
            &[16, 64],
            F16,
            ColumnL2,
            3,
            1e-6,
            0,
        ),
        rand_masked(
            &mut rng,
            "tiny.sigma.f32",
            &[16, 64],
            F32,
            ColumnL2,
            3,
            1e-40,
            u64::MAX,
        ),
        rand_masked(
            &mut rng,
            "huge.sigma.f16",
            &[16, 64],
            F16,
            ColumnL2,
            3,
            30000.0,
            5,
        ),
        rand_masked(
            &mut rng,
            "huge.sigma.bf16",
            &[16, 64],
            BF16,
            ElementAbs,
            3,
            1e38,
            6,
        ),
        rand_masked(
            &mut rng,
            "max.sigma.f32",
            &[16, 64],
            F32,
            ElementAbs,
            3,
            f32::MAX,
            7,
        ),
        rand_masked(&mut rng, "big", &[64, 1024], F16, ColumnL2, 100, 0.01, 8),
    ];
    out.push((
        "writer-extremes".to_string(),
        build(UploadHeader::new(1, 2, 0, recs.len() as u32), &recs),
    ));

    // Many records: the record index keys the noise generator, and the smallest records
    // (a 1-byte name, one f16/bf16 value) test the `num_tensors` bound.
    recs = (0..300)
        .map(|i| {
            if i % 3 == 0 {
                rand_masked(&mut rng, "x", &[2, 3], F32, ColumnL2, 1, 1.0, 99)
            } else {
                dense(
                    &mut rng,
                    "y",
                    &[1],
                    if i % 2 == 0 { F16 } else { BF16 },
                    1.0,
                )
            }
        })
        .collect();
    out.push((
        "writer-300-records".to_string(),
        build(UploadHeader::new(0, 0, 7, recs.len() as u32), &recs),
    ));
    recs = (0..200)
        .map(|_| dense(&mut rng, "z", &[1], F16, 1.0))
        .collect();
    out.push((
        "writer-minimal-records".to_string(),
        build(UploadHeader::new(0, 0, 0, recs.len() as u32), &recs),
    ));
    out.push((
        "writer-empty".to_string(),
        build(UploadHeader::new(9, 9, 9, 0), &[]),
    ));
    out
}

#[test]
fn writer_uploads_read_alike() {
    require_python!();
    let dir = TempDir::new("wire-py-writer");
    let mut total = Stats::default();
    for (name, bytes) in writer_uploads() {
        let path = dir.join(format!("{name}.fcdu"));
        fs::write(&path, &bytes).unwrap();
        let st = check_valid(&name, &path);
        println!(
            "  {name}: {} bytes, {} tensors, {} exact values, {} noise values, {} not \
             bit-identical",
            bytes.len(),
            st.tensors,
            st.exact,
            st.noise,
            st.noise_diff
        );
        total.add(&st);
    }
    total.report("UploadWriter uploads");
}

// ---------------------------------------------------------------------------------------------
// Rounding
// ---------------------------------------------------------------------------------------------

/// The Python reader's f32 → f16 / bf16 rounding (struct 'e' and bit arithmetic) against the
/// `half` crate on every f16 tie and its neighbours, subnormals, overflow, infinities, NaNs
/// and random patterns; plus the reader's own self-test.
#[test]
fn rounding_matches_half() {
    require_python!();
    let dir = TempDir::new("wire-py-round");
    let st = Command::new("python3")
        .arg(reader_script())
        .arg("--self-test")
        .output()
        .expect("python3");
    assert!(
        st.status.success(),
        "self-test failed:\n{}{}",
        String::from_utf8_lossy(&st.stdout),
        String::from_utf8_lossy(&st.stderr)
    );

    let mut bits: Vec<u32> = vec![
        0,
        0x8000_0000,
        0x7F80_0000,
        0xFF80_0000,
        0x7F7F_FFFF,
        0xFF7F_FFFF,
        0x7FC0_0000,
        0xFFC0_0001,
        0x7F80_0001,
        0x7FA0_1234,
        0x0000_0001,
        0x477F_E000,
        0x477F_F000,
        0x477F_EFFF,
        0x3300_0000,
        0x3300_0001,
        0x32FF_FFFF,
    ];
    for h in 0u16..0x7C00 {
        let lo = f16::from_bits(h).to_f32();
        let hi = f16::from_bits(h + 1).to_f32();
        let mid = ((lo as f64 + hi as f64) / 2.0) as f32;
        for b in [
            lo.to_bits(),
            mid.to_bits() - 1,
            mid.to_bits(),
            mid.to_bits() + 1,
        ] {
            bits.push(b);
            bits.push(b | 0x8000_0000);
        }
    }
    let mut rng = Rng::new(3);
    for e in 0u32..256 {
        // bf16 ties and neighbours in every binade.
        let base = (e << 23) | ((rng.next_u64() as u32 & 0x7F) << 16);
        for low in [0x7FFF, 0x8000, 0x8001, 0x0000, 0xFFFF] {
            bits.push(base | low);
            bits.push(base | low | 0x1_0000);
            bits.push(base | low | 0x8000_0000);
        }
    }
    for _ in 0..20_000 {
        bits.push(rng.next_u64() as u32);
    }
    let input = dir.join("in.json");
    let output = dir.join("out.json");
    fs::write(&input, serde_json::to_vec(&bits).unwrap()).unwrap();
    let run = Command::new("python3")
        .arg(reader_script())
        .arg("--round-check")
        .arg(&input)
        .arg(&output)
        .output()
        .expect("python3");
    assert!(
        run.status.success(),
        "--round-check failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let res: Value = serde_json::from_slice(&fs::read(&output).unwrap()).unwrap();
    let get = |k: &str| -> Vec<u32> {
        res[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let (py16, pyb16) = (get("f16"), get("bf16"));
    let (mut bad, mut bad_nan) = (Vec::new(), 0usize);
    for (i, &b) in bits.iter().enumerate() {
        let x = f32::from_bits(b);
        let want16 = f16::from_f32(x).to_f32().to_bits();
        let wantb16 = bf16::from_f32(x).to_f32().to_bits();
        if py16[i] != want16 || pyb16[i] != wantb16 {
            if x.is_nan() {
                bad_nan += 1;
            } else {
                bad.push(format!(
                    "{b:#010x}: f16 py {:#010x} half {want16:#010x}, bf16 py {:#010x} half \
                     {wantb16:#010x}",
                    py16[i], pyb16[i]
                ));
            }
        }
    }
    println!(
        "rounding: {} f32 patterns rounded to f16 and bf16; {} non-NaN mismatches, {} NaN \
         payload mismatches",
        bits.len(),
        bad.len(),
        bad_nan
    );
    assert!(
        bad.is_empty(),
        "rounding differs from `half`:\n{}",
        bad.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Malformed uploads
// ---------------------------------------------------------------------------------------------

fn varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn read_varint(b: &[u8], pos: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let byte = b[*pos];
        *pos += 1;
        v |= ((byte & 0x7F) as u64) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

/// Byte offsets of the header fields and of the first record's fields (from the spec).
#[derive(Debug, Clone, Copy)]
struct Offsets {
    version: usize,
    round: usize,
    num_tensors: usize,
    name_len: usize,
    name: usize,
    ndims: usize,
    dims: usize,
    dtype: usize,
    kind: usize,
    importance: usize,
    k: usize,
    sigma: usize,
    seed: usize,
    kept: usize,
}

fn offsets(b: &[u8]) -> Offsets {
    let mut p = 4;
    let version = p;
    read_varint(b, &mut p);
    let round = p;
    read_varint(b, &mut p);
    read_varint(b, &mut p);
    read_varint(b, &mut p);
    let num_tensors = p;
    read_varint(b, &mut p);
    let name_len = p;
    let n = read_varint(b, &mut p) as usize;
    let name = p;
    p += n;
    let ndims = p;
    let nd = read_varint(b, &mut p);
    let dims = p;
    for _ in 0..nd {
        read_varint(b, &mut p);
    }
    let dtype = p;
    read_varint(b, &mut p);
    let kind = p;
    assert_eq!(
        read_varint(b, &mut p),
        1,
        "the base's first record is masked"
    );
    let importance = p;
    read_varint(b, &mut p);
    let k = p;
    read_varint(b, &mut p);
    let sigma = p;
    p += 4;
    let seed = p;
    read_varint(b, &mut p);
    Offsets {
        version,
        round,
        num_tensors,
        name_len,
        name,
        ndims,
        dims,
        dtype,
        kind,
        importance,
        k,
        sigma,
        seed,
        kept: p,
    }
}

/// `body` followed by its CRC.
fn with_crc(mut body: Vec<u8>) -> Vec<u8> {
    let c = crc32(&body);
    body.extend_from_slice(&c.to_le_bytes());
    body
}

/// The upload without its CRC.
fn body(b: &[u8]) -> Vec<u8> {
    b[..b.len() - 4].to_vec()
}

/// `body` with bytes `at..at + len` replaced by `with`, CRC recomputed.
fn splice(b: &[u8], at: usize, len: usize, with: &[u8]) -> Vec<u8> {
    let mut v = body(b);
    v.splice(at..at + len, with.iter().copied());
    with_crc(v)
}

/// A small upload whose first record is masked (`[6, 10]`, column L2, K = 3, f32) with every
/// field a one-byte varint, followed by a dense record.
fn small_base() -> Vec<u8> {
    let mut rng = Rng::new(11);
    let recs = vec![
        Rec::Masked {
            name: "base_model.model.a.lora_A.weight".into(),
            dims: vec![6, 10],
            dtype: DType::F32,
            importance: Importance::ColumnL2,
            kept: vec![1, 4, 8],
            values: f32s(&rng.normal_vec(18, 1.0)),
            sigma: 0.5,
            seed: 3,
        },
        dense(
            &mut rng,
            "base_model.model.a.lora_B.weight",
            &[5, 6],
            DType::F16,
            0.1,
        ),
    ];
    build(UploadHeader::new(2, 4, 10, 2), &recs)
}

fn malformed_cases(base: &[u8]) -> Vec<(String, Vec<u8>)> {
    let o = offsets(base);
    let len = base.len();
    let f = |b: &[u8], at: usize, byte: u8| splice(b, at, 1, &[byte]);
    let mut c: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), vec![]),
        ("3 bytes".into(), base[..3].to_vec()),
        ("4 bytes (CRC only)".into(), with_crc(vec![])),
        ("truncated by 1".into(), base[..len - 1].to_vec()),
        ("truncated to half".into(), base[..len / 2].to_vec()),
        (
            "truncated body, CRC recomputed".into(),
            with_crc(base[..len - 5].to_vec()),
        ),
        (
            "header only, CRC recomputed".into(),
            with_crc(base[..o.name_len].to_vec()),
        ),
        ("flipped byte (CRC mismatch)".into(), {
            let mut v = base.to_vec();
            v[len / 2] ^= 0x10;
            v
        }),
        ("flipped CRC byte".into(), {
            let mut v = base.to_vec();
            v[len - 2] ^= 0x01;
            v
        }),
        ("wrong magic".into(), f(base, 0, b'G')),
        ("version 0".into(), f(base, o.version, 0)),
        ("version 2".into(), f(base, o.version, 2)),
        (
            "version overflows u16".into(),
            splice(base, o.version, 1, &[0x81, 0x80, 0x80, 0x80, 0x00]),
        ),
        (
            "round overflows u32".into(),
            splice(base, o.round, 1, &[0x80, 0x80, 0x80, 0x80, 0x10]),
        ),
        ("num_tensors + 1".into(), f(base, o.num_tensors, 3)),
        (
            "num_tensors 1 (trailing record)".into(),
            f(base, o.num_tensors, 1),
        ),
        ("num_tensors 0".into(), f(base, o.num_tensors, 0)),
        (
            "num_tensors 2^32 - 1".into(),
            splice(base, o.num_tensors, 1, &[0xFF, 0xFF, 0xFF, 0xFF, 0x0F]),
        ),
        (
            "empty name".into(),
            splice(base, o.name_len, o.ndims - o.name_len, &[0]),
        ),
        ("name not UTF-8".into(), f(base, o.name, 0xFF)),
        (
            "name with a lone continuation byte".into(),
            f(base, o.name + 3, 0x80),
        ),
        ("name with an encoded surrogate".into(), {
            splice(base, o.name, 3, &[0xED, 0xA0, 0x80])
        }),
        ("name of 1025 bytes".into(), {
            let mut with = Vec::new();
            varint(&mut with, 1025);
            with.extend(std::iter::repeat_n(b'a', 1025));
            splice(base, o.name_len, o.ndims - o.name_len, &with)
        }),
        (
            "0 dims".into(),
            splice(base, o.ndims, o.dtype - o.ndims, &[0]),
        ),
        (
            "5 dims".into(),
            splice(base, o.ndims, o.dtype - o.ndims, &[5, 6, 10, 1, 1, 1]),
        ),
        ("zero dimension".into(), f(base, o.dims, 0)),
        ("zero second dimension".into(), f(base, o.dims + 1, 0)),
        ("more than 2^31 elements".into(), {
            let mut with = vec![2];
            varint(&mut with, 65536);
            varint(&mut with, 32769);
            splice(base, o.ndims, o.dtype - o.ndims, &with)
        }),
        ("dim overflows u32".into(), {
            splice(base, o.dims, 1, &[0x86, 0x80, 0x80, 0x80, 0x10])
        }),
        ("dtype 3".into(), f(base, o.dtype, 3)),
        ("payload kind 2".into(), f(base, o.kind, 2)),
        ("importance 2".into(), f(base, o.importance, 2)),
        ("K = 0".into(), f(base, o.k, 0)),
        ("K = C + 1".into(), f(base, o.k, 11)),
        (
            "K = P under column L2 (K > C)".into(),
            splice(base, o.k, 1, &[60]),
        ),
        (
            "sigma NaN".into(),
            splice(base, o.sigma, 4, &f32::NAN.to_le_bytes()),
        ),
        (
            "sigma +inf".into(),
            splice(base, o.sigma, 4, &f32::INFINITY.to_le_bytes()),
        ),
        (
            "sigma -1".into(),
            splice(base, o.sigma, 4, &(-1.0f32).to_le_bytes()),
        ),
        (
            "sigma negative subnormal".into(),
            splice(base, o.sigma, 4, &0x8000_0001u32.to_le_bytes()),
        ),
        (
            "seed overflows u64".into(),
            splice(
                base,
                o.seed,
                1,
                &[0x83, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02],
            ),
        ),
        ("kept indices not ascending".into(), {
            let mut with = Vec::new();
            for i in [4u32, 1, 8] {
                with.extend_from_slice(&i.to_le_bytes());
            }
            splice(base, o.kept, 12, &with)
        }),
        ("kept indices repeated".into(), {
            let mut with = Vec::new();
            for i in [1u32, 4, 4] {
                with.extend_from_slice(&i.to_le_bytes());
            }
            splice(base, o.kept, 12, &with)
        }),
        ("kept index = C".into(), {
            let mut with = Vec::new();
            for i in [1u32, 4, 10] {
                with.extend_from_slice(&i.to_le_bytes());
            }
            splice(base, o.kept, 12, &with)
        }),
        ("kept index 2^32 - 1".into(), {
            splice(base, o.kept + 8, 4, &u32::MAX.to_le_bytes())
        }),
        ("byte appended before the CRC".into(), {
            let mut v = body(base);
            v.push(0);
            with_crc(v)
        }),
        ("byte appended before the CRC, CRC not updated".into(), {
            let mut v = body(base);
            v.push(0);
            v.extend_from_slice(&base[len - 4..]);
            v
        }),
        ("byte appended after the CRC".into(), {
            let mut v = base.to_vec();
            v.push(0);
            v
        }),
        ("a whole record appended, CRC recomputed".into(), {
            let mut v = body(base);
            v.extend_from_slice(&body(base)[o.name_len..]);
            with_crc(v)
        }),
    ];
    let mut rng = Rng::new(77);
    for i in 0..12 {
        let n = (rng.next_u64() % 200) as usize;
        c.push((format!("random bytes #{i} ({n})"), rng.bytes(n)));
        let mut v = b"FCDU".to_vec();
        v.extend(rng.bytes(n));
        c.push((
            format!("FCDU + random bytes #{i}, CRC recomputed"),
            with_crc(v),
        ));
    }
    c
}

#[test]
fn malformed_uploads_are_rejected_by_both() {
    require_python!();
    let dir = TempDir::new("wire-py-bad");
    let mut bases = vec![("small".to_string(), small_base())];
    // Also a CLI upload (its dims are 2-byte varints: only the layout-independent cases).
    let ex = dir.join("ex");
    fedcdd([
        "make-example",
        "--out",
        &s(&ex),
        "--layers",
        "1",
        "--hidden",
        "64",
    ])
    .ok();
    let up = encode(
        &dir,
        &ex.join("global"),
        &ex.join("client-0"),
        "cli.fcdu",
        &["--keep-ratio", "0.3", "--noise-scale", "0.5", "--seed", "4"],
    );
    bases.push(("cli".to_string(), fs::read(&up).unwrap()));
    let mut n = 0;
    for (bname, base) in &bases {
        // The base itself is valid for both.
        let path = dir.join(format!("{bname}-base.fcdu"));
        fs::write(&path, base).unwrap();
        check_valid(bname, &path);
        let small = bname == "small";
        let cases: Vec<(String, Vec<u8>)> = malformed_cases(base)
            .into_iter()
            .filter(|(w, _)| {
                small || !(w.contains("dim") || w.contains("kept") || w.starts_with("K ="))
            })
            .collect();
        let mut paths = Vec::new();
        for (i, (what, bytes)) in cases.iter().enumerate() {
            assert!(
                Upload::parse(bytes).is_err(),
                "{bname}: {what}: the Rust reader accepts it"
            );
            let path = dir.join(format!("{bname}-bad{i}.fcdu"));
            fs::write(&path, bytes).unwrap();
            paths.push(path);
        }
        // One process per file for the small base (exit status and stderr as a user sees
        // them); the CLI base's cases in one batch.
        let runs: Vec<PyRun> = if small {
            paths.iter().map(|p| run_py(p, &[])).collect()
        } else {
            run_py_batch(&dir, &paths, &[])
        };
        for ((what, _), py) in cases.iter().zip(&runs) {
            assert_py_rejects(&format!("{bname}: {what}"), py);
            n += 1;
        }
    }
    println!("malformed: {n} invalid uploads rejected by both readers");
}

/// Inputs on which the spec is silent or borderline: both readers must at least agree.
#[test]
fn borderline_uploads_are_judged_alike() {
    require_python!();
    let dir = TempDir::new("wire-py-border");
    let base = small_base();
    let o = offsets(&base);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // Postcard accepts non-minimal varints; the spec does not say.
        (
            "round as non-minimal varint 82 00",
            splice(&base, o.round, 1, &[0x82, 0x00]),
        ),
        ("version as non-minimal varint 81 80 00", {
            splice(&base, o.version, 1, &[0x81, 0x80, 0x00])
        }),
        (
            "dims count as non-minimal varint",
            splice(&base, o.ndims, 1, &[0x82, 0x00]),
        ),
        // "a non-finite or negative σ": is −0.0 negative?
        (
            "sigma -0.0",
            splice(&base, o.sigma, 4, &(-0.0f32).to_le_bytes()),
        ),
        // The largest tensor the format allows (2³¹ elements), masked and filled with noise.
        ("2^31 elements (masked, element importance)", {
            let mut body = Vec::new();
            body.extend_from_slice(&base[..o.name_len]);
            body.extend_from_slice(&base[o.name_len..o.ndims]);
            body.push(2);
            varint(&mut body, 65536);
            varint(&mut body, 32768);
            body.extend_from_slice(&[0, 1, 1, 1]); // f32, masked, element importance, K = 1
            body.extend_from_slice(&0.5f32.to_le_bytes());
            body.push(3);
            body.extend_from_slice(&(u32::MAX >> 1).to_le_bytes()); // the last element
            body.extend_from_slice(&1.5f32.to_le_bytes());
            // The second (dense) record, unchanged: it starts after the first record's
            // K = 3 kept indices and 3 × 6 f32 values.
            body.extend_from_slice(&base[o.kept + 12 + 18 * 4..base.len() - 4]);
            with_crc(body)
        }),
        // A duplicated tensor name (the spec does not forbid it).
        ("two records with the same name", {
            let mut rng = Rng::new(5);
            build(
                UploadHeader::new(0, 0, 0, 2),
                &[
                    dense(&mut rng, "same", &[2], DType::F32, 1.0),
                    dense(&mut rng, "same", &[3], DType::F16, 1.0),
                ],
            )
        }),
        // NaN (quiet and signalling), ±inf and −0 stored as values, encoded by hand (the
        // writer may refuse non-finite values).
        ("non-finite stored values", {
            let mut b = b"FCDU".to_vec();
            b.extend_from_slice(&[1, 0, 0, 0, 3]);
            let rec = |b: &mut Vec<u8>, name: &str, dims: &[u64], dtype: u8, head: &[u8]| {
                varint(b, name.len() as u64);
                b.extend_from_slice(name.as_bytes());
                varint(b, dims.len() as u64);
                for &d in dims {
                    varint(b, d);
                }
                b.push(dtype);
                b.extend_from_slice(head);
            };
            rec(&mut b, "nan.f16", &[6], 1, &[0]);
            for h in [0x7E00u16, 0x7C01, 0xFD55, 0x7C00, 0xFC00, 0x8000] {
                b.extend_from_slice(&h.to_le_bytes());
            }
            rec(&mut b, "nan.f32", &[4], 0, &[0]);
            for w in [0x7FC0_0000u32, 0x7F80_0001, 0xFFBF_FFFF, 0x8000_0000] {
                b.extend_from_slice(&w.to_le_bytes());
            }
            let mut head = vec![1, 0, 1];
            head.extend_from_slice(&1.0f32.to_le_bytes());
            head.push(1);
            head.extend_from_slice(&0u32.to_le_bytes());
            rec(&mut b, "nan.kept.bf16", &[2, 3], 2, &head);
            for h in [0x7FC0u16, 0x7F81] {
                b.extend_from_slice(&h.to_le_bytes());
            }
            with_crc(b)
        }),
    ];
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let path = dir.join(format!("border{i}.fcdu"));
        fs::write(&path, bytes).unwrap();
        let rust = Upload::parse(bytes);
        let py = run_py(&path, &[]);
        let verdict = match (&rust, py.code) {
            (Err(e), Some(2)) => format!("both reject (Rust: {e:?})"),
            (Ok(up), Some(0)) => {
                compare(what, bytes, py.json.as_ref().unwrap());
                format!("both accept ({} tensors)", up.header.num_tensors)
            }
            (Ok(up), Some(3)) => {
                let meta = run_py(&path, &["--no-values"]);
                compare(what, bytes, meta.json.as_ref().expect("--no-values"));
                format!(
                    "both accept ({} tensors; too large for the Python reader to rebuild)",
                    up.header.num_tensors
                )
            }
            (r, _) => panic!(
                "{what}: the readers disagree: Rust {:?}, Python {}",
                r.as_ref().map(|u| u.header),
                py.describe()
            ),
        };
        println!("borderline: {what}: {verdict}");
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------------------------

/// One random edit of `base` with the checksum recomputed: a byte changed (mostly in the
/// heads, where the structure is), inserted or deleted, a varint made larger, or a cut.
fn mutate(rng: &mut Rng, base: &[u8], head_len: usize) -> Vec<u8> {
    let mut v = body(base);
    let pick = |rng: &mut Rng, len: usize| (rng.next_u64() % len.max(1) as u64) as usize;
    let at = if rng.next_u64().is_multiple_of(4) {
        pick(rng, v.len())
    } else {
        pick(rng, head_len.min(v.len()))
    };
    match rng.next_u64() % 7 {
        0 | 1 => v[at] = (rng.next_u64() >> 56) as u8,
        2 => v[at] ^= 1 << (rng.next_u64() % 8),
        3 => v.insert(at, (rng.next_u64() >> 56) as u8),
        4 => {
            v.remove(at);
        }
        5 => {
            v[at] = v[at].wrapping_add(if rng.next_u64().is_multiple_of(2) {
                1
            } else {
                255
            })
        }
        _ => v.truncate(at),
    }
    with_crc(v)
}

#[test]
fn mutated_uploads_are_judged_alike() {
    require_python!();
    let dir = TempDir::new("wire-py-mut");
    let mut rng = Rng::new(2718);
    let small = small_base();
    let ex = dir.join("ex");
    fedcdd([
        "make-example",
        "--out",
        &s(&ex),
        "--layers",
        "1",
        "--hidden",
        "32",
        "--rank",
        "4",
    ])
    .ok();
    let cli = fs::read(encode(
        &dir,
        &ex.join("global"),
        &ex.join("client-1"),
        "cli.fcdu",
        &[
            "--keep-ratio",
            "0.4",
            "--noise-scale",
            "1",
            "--dtype",
            "f16",
            "--seed",
            "6",
        ],
    ))
    .unwrap();
    let small_head = offsets(&small).kept + 12;
    let bases = [(&small, small_head, 400usize), (&cli, 120, 200)];
    let (mut rejected, mut accepted, mut too_large) = (0, 0, 0);
    let mut total = Stats::default();
    let mut disagree = Vec::new();
    let mut muts: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for (base, head_len, count) in bases {
        for _ in 0..count {
            let bytes = mutate(&mut rng, base, head_len);
            let path = dir.join(format!("mut{}.fcdu", muts.len()));
            fs::write(&path, &bytes).unwrap();
            muts.push((path, bytes));
        }
    }
    let n = muts.len();
    let paths: Vec<PathBuf> = muts.iter().map(|(p, _)| p.clone()).collect();
    let runs = run_py_batch(&dir, &paths, &[]);
    for (i, ((path, bytes), py)) in muts.iter().zip(&runs).enumerate() {
        let label = format!("mutation {i}");
        // Every 10th also as its own process: the same verdict as in the batch.
        if i % 10 == 0 {
            let single = run_py(path, &[]);
            assert_eq!(
                single.code, py.code,
                "{label}: batch and single-file verdicts"
            );
            if py.code == Some(2) {
                assert_py_rejects(&label, &single);
            }
        }
        let rust = Upload::parse(bytes);
        match (&rust, py.code) {
            (Err(_), Some(2)) => rejected += 1,
            (Ok(_), Some(0)) => {
                total.add(&compare(&label, bytes, py.json.as_ref().unwrap()));
                accepted += 1;
            }
            (Ok(up), Some(3)) => {
                let p: usize = up.records().map(|r| num_elements(&r.unwrap())).sum();
                assert!(
                    p > PY_MAX_ELEMENTS,
                    "the Python reader's size limit misfired"
                );
                let meta = run_py(path, &["--no-values"]);
                compare(&label, bytes, meta.json.as_ref().expect("--no-values"));
                too_large += 1;
            }
            (r, _) => disagree.push(format!(
                "{label} ({}): Rust {}, Python {}",
                path.display(),
                match r {
                    Ok(_) => "accepts".to_string(),
                    Err(e) => format!("rejects ({e:?})"),
                },
                py.describe()
            )),
        }
    }
    println!(
        "mutations: {n} mutated uploads (CRC recomputed): {rejected} rejected by both, \
         {accepted} accepted by both and compared, {too_large} accepted by both but too large \
         to rebuild in Python, {} disagreements",
        disagree.len()
    );
    total.report("accepted mutations");
    if !disagree.is_empty() {
        // Keep the files for inspection.
        let keep = std::env::temp_dir().join("fedcdd-wire-python-disagreements");
        let _ = fs::create_dir_all(&keep);
        for d in &disagree {
            if let Some(p) = d.split(" (").nth(1).and_then(|r| r.split(')').next()) {
                let p = Path::new(p);
                let _ = fs::copy(p, keep.join(p.file_name().unwrap()));
            }
        }
        panic!(
            "the readers disagree (files copied to {}):\n{}",
            keep.display(),
            disagree.join("\n")
        );
    }
}
