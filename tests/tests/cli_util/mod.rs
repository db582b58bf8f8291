//! Helpers of the end-to-end tests of the `fedcdd` binary (`cli.rs`, `peft_interop.rs`):
//! locating (and if needed building) the binary, temp directories, running commands, a
//! test-data generator, an independent safetensors writer for crafting inputs, and plain-f64
//! comparison helpers. Nothing here calls the code under test except
//! `fedcdd_host::io::read_safetensors` for reading outputs back.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use fedcdd_host::io::{Tensor, read_safetensors};
use half::f16;

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

/// The workspace root (`tests/..`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `target/<profile>/fedcdd`, next to the `deps/` folder holding this test executable.
///
/// `cargo test` does not build the binary of a dependency crate (`fedcdd-host` has no
/// integration tests, so not even `cargo test` at the workspace root writes
/// `target/debug/fedcdd`), so when the test runs under cargo (`$CARGO` set) it first runs
/// `cargo build -p fedcdd-host --bin fedcdd` for the same profile and target directory: a
/// no-op when the binary is fresh, and never a stale binary. `FEDCDD_TEST_NO_BUILD=1` skips
/// that step (then the binary must already be there); `FEDCDD_BIN=PATH` tests that binary
/// instead.
pub fn fedcdd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("FEDCDD_BIN") {
            // An explicitly chosen binary (an installed one, or a wrapper).
            return PathBuf::from(bin);
        }
        let name = format!("fedcdd{}", std::env::consts::EXE_SUFFIX);
        built_artifact(&name, &["-p", "fedcdd-host", "--bin", "fedcdd"])
    })
}

/// `target/<profile>/libfedcdd.so` (the C library of fedcdd-ffi), built like [`fedcdd_bin`].
pub fn fedcdd_lib() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        if let Some(lib) = std::env::var_os("FEDCDD_LIB") {
            return PathBuf::from(lib);
        }
        let name = format!(
            "{}fedcdd{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        );
        built_artifact(&name, &["-p", "fedcdd-ffi", "--lib"])
    })
}

/// `file` in `target/<profile>` next to the `deps/` folder holding this test executable;
/// built first with `cargo build <build_args>` when the tests run under cargo (and
/// `FEDCDD_TEST_NO_BUILD` is unset).
fn built_artifact(file: &str, build_args: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().expect("cannot find the test executable's path");
    let deps = exe
        .parent()
        .expect("the test executable has no parent directory");
    let profile_dir = if deps.file_name() == Some(OsStr::new("deps")) {
        deps.parent().expect("deps/ has a parent")
    } else {
        deps
    };
    let path = profile_dir.join(file);
    let cargo = std::env::var_os("CARGO");
    if let (Some(cargo), None) = (cargo, std::env::var_os("FEDCDD_TEST_NO_BUILD")) {
        let mut cmd = Command::new(cargo);
        cmd.arg("build")
            .arg("--quiet")
            .arg("--manifest-path")
            .arg(workspace_root().join("Cargo.toml"))
            .args(build_args);
        match profile_dir.file_name().and_then(OsStr::to_str) {
            Some("debug") | None => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(other) => {
                cmd.args(["--profile", other]);
            }
        }
        if let Some(target_dir) = profile_dir.parent() {
            cmd.arg("--target-dir").arg(target_dir);
        }
        let what = format!("cargo build {}", build_args.join(" "));
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run `{what}`: {e}"));
        assert!(
            out.status.success(),
            "`{what}` failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        path.is_file(),
        "{} is missing: build it first from the workspace root {} (then run `cargo test`; \
         the tests build it themselves when run by cargo without FEDCDD_TEST_NO_BUILD)",
        path.display(),
        workspace_root().display()
    );
    path
}

/// What one run of the binary did.
#[derive(Debug)]
pub struct RunOutput {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    /// Panics with the command and its output unless it exited 0.
    pub fn ok(self) -> RunOutput {
        assert!(self.status.success(), "command failed: {self}");
        self
    }

    /// Every line of stderr starting with `error:`.
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect()
    }
}

impl std::fmt::Display for RunOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fedcdd {}\n  status: {}\n  stdout:\n{}\n  stderr:\n{}",
            self.args.join(" "),
            self.status,
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `fedcdd ARGS...` and captures its output.
pub fn fedcdd<I, S>(args: I) -> RunOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = Command::new(fedcdd_bin())
        .args(&args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("cannot start the fedcdd binary");
    RunOutput {
        args: args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `path` as an argument string (tests use UTF-8 temp paths).
pub fn s(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_string()
}

/// `PATH:N`.
pub fn with_samples(path: &Path, n: u64) -> String {
    format!("{}:{n}", s(path))
}

// ---------------------------------------------------------------------------------------------
// Temp directories
// ---------------------------------------------------------------------------------------------

/// A fresh, empty directory under the system temp dir, unique per process and call; removed
/// when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "fedcdd-e2e-{tag}-{}-{n}-{nanos}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("cannot create a temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Every file under `dir` (recursively), relative path → bytes.
pub fn snapshot_dir(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let bytes = fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), bytes);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------------------------

/// SplitMix64 for test inputs (independent of the generators of the code under test).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0xA076_1D64_78BD_642F)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    pub fn normal_vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| scale * self.normal()).collect()
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next_u64() >> 56) as u8).collect()
    }
}

/// Storage type of a crafted tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dt {
    F32,
    F16,
}

/// A tensor to write; `data` is rounded to `dt` when written (use [`Dt::round`] to know the
/// stored values).
#[derive(Clone, Debug)]
pub struct T {
    pub name: String,
    pub dims: Vec<usize>,
    pub dt: Dt,
    pub data: Vec<f32>,
}

impl Dt {
    pub fn round(self, x: f32) -> f32 {
        match self {
            Dt::F32 => x,
            Dt::F16 => f16::from_f32(x).to_f32(),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Dt::F32 => "F32",
            Dt::F16 => "F16",
        }
    }
}

/// Writes a safetensors file by hand (8-byte little-endian header length, JSON header,
/// data), independently of the host's writer.
pub fn write_safetensors(path: &Path, tensors: &[T]) {
    let mut sorted: Vec<&T> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut data = Vec::new();
    for t in sorted {
        assert_eq!(
            t.dims.iter().product::<usize>(),
            t.data.len(),
            "crafted tensor {} has inconsistent dims",
            t.name
        );
        let start = data.len();
        for &v in &t.data {
            match t.dt {
                Dt::F32 => data.extend_from_slice(&v.to_le_bytes()),
                Dt::F16 => data.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes()),
            }
        }
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": t.dt.name(),
                "shape": t.dims,
                "data_offsets": [start, data.len()],
            }),
        );
    }
    let mut head = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut bytes = (head.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&head);
    bytes.extend_from_slice(&data);
    fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A PEFT adapter directory: `adapter_model.safetensors` (+ `adapter_config.json`).
pub fn write_adapter(dir: &Path, tensors: &[T], config: Option<&serde_json::Value>) {
    fs::create_dir_all(dir).unwrap();
    write_safetensors(&dir.join("adapter_model.safetensors"), tensors);
    if let Some(c) = config {
        fs::write(
            dir.join("adapter_config.json"),
            serde_json::to_vec_pretty(c).unwrap(),
        )
        .unwrap();
    }
}

/// Reads an adapter directory or a .safetensors file: name → tensor (values widened to f32).
pub fn read_adapter(path: &Path) -> BTreeMap<String, Tensor> {
    let file = if path.is_dir() {
        path.join("adapter_model.safetensors")
    } else {
        path.to_path_buf()
    };
    let (tensors, _) =
        read_safetensors(&file).unwrap_or_else(|e| panic!("cannot read {}: {e:#}", file.display()));
    tensors.into_iter().map(|t| (t.name.clone(), t)).collect()
}

/// A PEFT LoRA config like the ones `save_pretrained` writes.
pub fn lora_config(r: usize) -> serde_json::Value {
    serde_json::json!({
        "base_model_name_or_path": "tiny-llama",
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false,
        "revision": null
    })
}

/// Shape of the synthetic adapters.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub layers: usize,
    pub rank: usize,
    pub d_in: usize,
    pub d_out: usize,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            layers: 2,
            rank: 4,
            d_in: 24,
            d_out: 32,
        }
    }
}

/// The global adapter's tensors: `lora_A` `[r, d_in]`, `lora_B` `[d_out, r]` of q/v_proj.
pub fn global_tensors(shape: Shape, rng: &mut Rng) -> Vec<T> {
    let mut out = Vec::new();
    for layer in 0..shape.layers {
        for m in ["q_proj", "v_proj"] {
            let base = format!("base_model.model.model.layers.{layer}.self_attn.{m}");
            out.push(T {
                name: format!("{base}.lora_A.weight"),
                dims: vec![shape.rank, shape.d_in],
                dt: Dt::F32,
                data: f32s(&rng.normal_vec(shape.rank * shape.d_in, 0.2)),
            });
            out.push(T {
                name: format!("{base}.lora_B.weight"),
                dims: vec![shape.d_out, shape.rank],
                dt: Dt::F32,
                data: f32s(&rng.normal_vec(shape.d_out * shape.rank, 0.05)),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

pub fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// A round on disk: a global adapter and client adapters `θ_i = G + s_i·shared + own_i`.
pub struct Fixture {
    pub dir: TempDir,
    pub global: PathBuf,
    pub clients: Vec<PathBuf>,
    pub config: serde_json::Value,
    pub shape: Shape,
    /// The global's tensors as written.
    pub global_t: Vec<T>,
    /// Each client's tensors as written.
    pub client_t: Vec<Vec<T>>,
}

impl Fixture {
    /// `n` clients; `seed` varies the data.
    pub fn new(tag: &str, n: usize, seed: u64) -> Fixture {
        Fixture::with(tag, n, seed, Shape::default(), |_, _| {})
    }

    /// Like [`new`](Self::new); `edit(i, tensors)` may change client `i`'s tensors before
    /// they are written.
    pub fn with(
        tag: &str,
        n: usize,
        seed: u64,
        shape: Shape,
        mut edit: impl FnMut(usize, &mut Vec<T>),
    ) -> Fixture {
        let dir = TempDir::new(tag);
        let mut rng = Rng::new(seed);
        let config = lora_config(shape.rank);
        let global = global_tensors(shape, &mut rng);
        let gdir = dir.join("global");
        write_adapter(&gdir, &global, Some(&config));
        let shared: Vec<Vec<f64>> = global
            .iter()
            .map(|t| rng.normal_vec(t.data.len(), 0.02))
            .collect();
        let mut clients = Vec::new();
        let mut client_t = Vec::new();
        for i in 0..n {
            let strength = 0.5 + i as f64 / n.max(1) as f64;
            let mut tensors: Vec<T> = global
                .iter()
                .zip(&shared)
                .map(|(g, sh)| {
                    let own = rng.normal_vec(g.data.len(), 0.015);
                    let data = g
                        .data
                        .iter()
                        .zip(sh)
                        .zip(&own)
                        .map(|((&gv, s), o)| (gv as f64 + strength * s + o) as f32)
                        .collect();
                    T { data, ..g.clone() }
                })
                .collect();
            edit(i, &mut tensors);
            let cdir = dir.join(format!("client{i}"));
            write_adapter(&cdir, &tensors, Some(&config));
            clients.push(cdir);
            client_t.push(tensors);
        }
        Fixture {
            dir,
            global: gdir,
            clients,
            config,
            shape,
            global_t: global,
            client_t,
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }
}

// ---------------------------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------------------------

pub fn rms(x: &[f64]) -> f64 {
    (x.iter().map(|v| v * v).sum::<f64>() / x.len().max(1) as f64).sqrt()
}

/// Element-wise `|a − e| ≤ rtol·(|e| + rms(e))`: relative to each element, with the
/// tensor's rms as the floor for elements near zero.
pub fn assert_allclose(what: &str, actual: &[f32], expected: &[f64], rtol: f64) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let floor = rms(expected);
    let mut worst = (0.0f64, 0usize);
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let err = (a as f64 - e).abs() / (e.abs() + floor).max(1e-300);
        if err.is_nan() || err > worst.0 {
            worst = (err, i);
        }
    }
    let (err, i) = worst;
    assert!(
        err <= rtol,
        "{what}: element {i} is {} but {} was expected (relative error {err:.3e} > {rtol:.1e})",
        actual[i],
        expected[i]
    );
}

/// Compares the steps `actual − global` and `expected − global` (in f64) with
/// [`assert_allclose`]'s criterion: for updates much smaller than the weights.
pub fn assert_step_close(what: &str, actual: &[f32], expected: &[f64], global: &[f32], rtol: f64) {
    let step_a: Vec<f32> = actual
        .iter()
        .zip(global)
        .map(|(&a, &g)| (a as f64 - g as f64) as f32)
        .collect();
    let step_e: Vec<f64> = expected
        .iter()
        .zip(global)
        .map(|(&e, &g)| e - g as f64)
        .collect();
    assert_allclose(what, &step_a, &step_e, rtol);
}
