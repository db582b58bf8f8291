//! PEFT adapter and server-state file IO: safetensors in and out, widened to f32.
//!
//! Every error names the file it is about and, where one is involved, the tensor.
//! Files are always written atomically (temp file in the same directory, fsync, rename),
//! so an existing file is never truncated or lost when a write fails.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use fedcdd_core::{DType, MAX_DIMS, TensorRole};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

/// File name of the weights inside a PEFT adapter directory.
pub const ADAPTER_MODEL_FILE: &str = "adapter_model.safetensors";
/// File name of the configuration inside a PEFT adapter directory.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// The pickled weights file older PEFT versions write; not supported.
const ADAPTER_BIN_FILE: &str = "adapter_model.bin";

/// One tensor of an adapter, values widened to f32; `dtype` remembers the storage type.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: DType,
    pub data: Vec<f32>,
}

impl Tensor {
    /// The LoRA role read from the tensor's name.
    pub fn role(&self) -> TensorRole {
        TensorRole::from_name(&self.name)
    }
}

/// A loaded adapter: its tensors sorted by name, and its PEFT config when there is one.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// Sorted by name.
    pub tensors: Vec<Tensor>,
    /// `adapter_config.json` if present.
    pub config: Option<serde_json::Value>,
    /// The path the user gave (directory or file).
    pub path: PathBuf,
}

impl Adapter {
    /// The tensor called `name` (binary search over the sorted tensors).
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .and_then(|i| self.tensors.get(i))
    }
}

/// `path` is a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) or a
/// bare .safetensors file.
pub fn load_adapter(path: &Path) -> Result<Adapter> {
    let meta =
        fs::metadata(path).with_context(|| format!("cannot access adapter {}", path.display()))?;
    if !meta.is_dir() {
        let (tensors, _) = read_safetensors(path)?;
        return Ok(Adapter {
            tensors,
            config: None,
            path: path.to_path_buf(),
        });
    }

    let model = path.join(ADAPTER_MODEL_FILE);
    if !model.is_file() {
        if path.join(ADAPTER_BIN_FILE).exists() {
            bail!(
                "{}: only a pickled {ADAPTER_BIN_FILE} was found; pickled .bin adapters are not \
                 supported, re-save the adapter with `save_pretrained(..., \
                 safe_serialization=True)` to get {ADAPTER_MODEL_FILE}",
                path.display()
            );
        }
        bail!(
            "{}: no {ADAPTER_MODEL_FILE} in this directory (expected a PEFT adapter directory \
             or a .safetensors file)",
            path.display()
        );
    }
    let (tensors, _) = read_safetensors(&model)?;

    let config_path = path.join(ADAPTER_CONFIG_FILE);
    let config = if config_path.exists() {
        let text = fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
        Some(value)
    } else {
        None
    };

    Ok(Adapter {
        tensors,
        config,
        path: path.to_path_buf(),
    })
}

/// Reads a safetensors file (mmap) into tensors sorted by name, plus its `__metadata__`.
pub fn read_safetensors(path: &Path) -> Result<(Vec<Tensor>, HashMap<String, String>)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    // SAFETY: the file is opened read-only and every byte we use is copied out of the
    // mapping (into owned `Tensor`s and strings) before this function returns; the mapping
    // never escapes. The remaining hazard, another process truncating the file while we copy,
    // is the usual accepted risk of mmap-based safetensors loading.
    let mmap = unsafe { Mmap::map(&file) }
        .with_context(|| format!("cannot memory-map {}", path.display()))?;
    let bytes: &[u8] = &mmap;

    let (_, header) = SafeTensors::read_metadata(bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let st = SafeTensors::deserialize(bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;

    let mut tensors = Vec::with_capacity(st.len());
    for (name, view) in st.iter() {
        tensors.push(decode_tensor(path, name, &view)?);
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));

    let metadata = header.metadata().clone().unwrap_or_default();
    Ok((tensors, metadata))
}

/// Checks a tensor's dtype and shape and widens its little-endian bytes to f32.
fn decode_tensor(
    path: &Path,
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<Tensor> {
    let dtype = match view.dtype() {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        other => bail!(
            "{}: tensor {name:?} has unsupported dtype {other}; only F32, F16 and BF16 are \
             supported",
            path.display()
        ),
    };
    let dims = view.shape().to_vec();
    let count = check_dims(&dims).with_context(|| {
        format!(
            "{}: tensor {name:?} has unsupported shape {dims:?}",
            path.display()
        )
    })?;
    let raw = view.data();
    if count.checked_mul(dtype.size()) != Some(raw.len()) {
        bail!(
            "{}: tensor {name:?} holds {} bytes, but shape {dims:?} of {} needs {count} elements",
            path.display(),
            raw.len(),
            dtype.name()
        );
    }
    let data = decode_le(dtype, raw);
    Ok(Tensor {
        name: name.to_string(),
        dims,
        dtype,
        data,
    })
}

/// Element count of `dims`; fails on a 0-d (scalar) shape, a zero dimension, more than
/// [`MAX_DIMS`] dimensions, or an overflowing count.
fn check_dims(dims: &[usize]) -> Result<usize> {
    if dims.is_empty() {
        bail!("0-dimensional (scalar) tensors are not supported");
    }
    if dims.len() > MAX_DIMS {
        bail!(
            "{} dimensions, at most {MAX_DIMS} are supported",
            dims.len()
        );
    }
    if dims.contains(&0) {
        bail!("the tensor has no elements");
    }
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .context("the element count overflows")
}

/// Little-endian bytes to f32; no alignment assumed. `raw.len()` is a multiple of the size.
fn decode_le(dtype: DType, raw: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => {
            let (chunks, _) = raw.as_chunks::<4>();
            chunks.iter().map(|&c| f32::from_le_bytes(c)).collect()
        }
        DType::F16 => {
            let (chunks, _) = raw.as_chunks::<2>();
            chunks
                .iter()
                .map(|&c| f16::from_bits(u16::from_le_bytes(c)).to_f32())
                .collect()
        }
        DType::BF16 => {
            let (chunks, _) = raw.as_chunks::<2>();
            chunks
                .iter()
                .map(|&c| bf16::from_bits(u16::from_le_bytes(c)).to_f32())
                .collect()
        }
    }
}

/// f32 values to little-endian bytes of `dtype`, rounding to nearest even.
fn encode_le(dtype: DType, data: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * dtype.size());
    match dtype {
        DType::F32 => data
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        DType::F16 => data
            .iter()
            .for_each(|&x| out.extend_from_slice(&f16::from_f32(x).to_bits().to_le_bytes())),
        DType::BF16 => data
            .iter()
            .for_each(|&x| out.extend_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes())),
    }
    out
}

fn st_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    }
}

/// Serializes tensors (each converted from f32 back to its `dtype`, round-to-nearest-even via
/// `half`) with optional metadata, written atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[Tensor],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    // Validate everything first, and keep a deterministic (name) order.
    let mut order: Vec<&Tensor> = tensors.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    for pair in order.windows(2) {
        if pair[0].name == pair[1].name {
            bail!(
                "{}: cannot write tensor {:?} twice",
                path.display(),
                pair[0].name
            );
        }
    }
    let mut encoded: Vec<(&str, Vec<u8>)> = Vec::with_capacity(order.len());
    for t in &order {
        let count = check_dims(&t.dims).with_context(|| {
            format!(
                "{}: cannot write tensor {:?} with shape {:?}",
                path.display(),
                t.name,
                t.dims
            )
        })?;
        if count != t.data.len() {
            bail!(
                "{}: cannot write tensor {:?}: shape {:?} needs {count} values but it has {}",
                path.display(),
                t.name,
                t.dims,
                t.data.len()
            );
        }
        encoded.push((t.name.as_str(), encode_le(t.dtype, &t.data)));
    }

    let mut views = Vec::with_capacity(order.len());
    for (t, (name, bytes)) in order.iter().zip(&encoded) {
        let view = safetensors::tensor::TensorView::new(st_dtype(t.dtype), t.dims.clone(), bytes)
            .with_context(|| format!("{}: cannot write tensor {name:?}", path.display()))?;
        views.push((*name, view));
    }
    let bytes = safetensors::serialize(views, metadata)
        .with_context(|| format!("cannot serialize safetensors for {}", path.display()))?;
    write_atomic(path, &bytes)
}

/// Writes `dir/adapter_model.safetensors` (metadata {"format": "pt"} as PEFT does) and, when
/// `config` is Some, `dir/adapter_config.json` (pretty JSON); creates `dir` if missing; each
/// file atomically.
pub fn save_adapter(
    dir: &Path,
    tensors: &[Tensor],
    config: Option<&serde_json::Value>,
) -> Result<()> {
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create adapter directory {}", dir.display()))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join(ADAPTER_MODEL_FILE), tensors, Some(metadata))?;
    if let Some(config) = config {
        let path = dir.join(ADAPTER_CONFIG_FILE);
        let mut text = serde_json::to_vec_pretty(config)
            .with_context(|| format!("cannot serialize JSON for {}", path.display()))?;
        text.push(b'\n');
        write_atomic(&path, &text)?;
    }
    Ok(())
}

/// Distinguishes temp files of concurrent writes within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Write to a temp file in the same directory (name like `.{file}.tmp-{pid}`), fsync it,
/// rename over `path`. On error, remove the temp file; an existing `path` is never truncated
/// or lost.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = path
        .file_name()
        .with_context(|| format!("cannot write {}: the path has no file name", path.display()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(file_name);
    temp_name.push(format!(".tmp-{}-{n}", std::process::id()));
    let temp = dir.join(temp_name);

    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .with_context(|| {
            format!(
                "cannot write {}: cannot create temp file {}",
                path.display(),
                temp.display()
            )
        })?;

    let result = (|| -> Result<()> {
        file.write_all(bytes).with_context(|| {
            format!(
                "cannot write {}: writing {}",
                path.display(),
                temp.display()
            )
        })?;
        file.sync_all().with_context(|| {
            format!(
                "cannot write {}: fsync of {}",
                path.display(),
                temp.display()
            )
        })?;
        drop(file);
        fs::rename(&temp, path).with_context(|| {
            format!(
                "cannot write {}: renaming {} over it failed",
                path.display(),
                temp.display()
            )
        })
    })();
    if let Err(e) = result {
        // Best effort: the original error is what matters.
        let _ = fs::remove_file(&temp);
        return Err(e);
    }

    // Make the rename itself durable; best effort, as not every filesystem allows it.
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty directory under the system temp dir; removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "fedcdd-host-adapter-{tag}-{}-{n}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tensor(name: &str, dims: &[usize], dtype: DType, data: &[f32]) -> Tensor {
        Tensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            dtype,
            data: data.to_vec(),
        }
    }

    fn sample_tensors() -> Vec<Tensor> {
        vec![
            tensor(
                "base_model.model.q_proj.lora_B.weight",
                &[3, 2],
                DType::F32,
                &[0.1, -0.2, 0.3, 1e-8, f32::MAX, -0.0],
            ),
            tensor(
                "base_model.model.q_proj.lora_A.weight",
                &[2, 3],
                DType::F16,
                &[1.0, -2.5, 0.375, 1024.0, -0.0009765625, 65504.0],
            ),
            tensor(
                "base_model.model.v_proj.lora_A.weight",
                &[2, 2],
                DType::BF16,
                &[1.0, -3.0, 0.15625, 2f32.powi(100)],
            ),
            tensor(
                "base_model.model.norm.bias",
                &[4],
                DType::F32,
                &[1.0, 2.0, 3.0, 4.0],
            ),
        ]
    }

    fn sorted(mut v: Vec<Tensor>) -> Vec<Tensor> {
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The whole error chain, so assertions see every context.
    fn msg(e: &anyhow::Error) -> String {
        format!("{e:#}")
    }

    fn leftover_temp_files(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn round_trip_f32_f16_bf16() {
        let dir = TempDir::new("roundtrip");
        let path = dir.path().join("t.safetensors");
        let tensors = sample_tensors();
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        write_safetensors(&path, &tensors, Some(meta.clone())).unwrap();
        let (back, back_meta) = read_safetensors(&path).unwrap();
        assert_eq!(back, sorted(tensors));
        assert_eq!(back_meta, meta);
        assert!(back.windows(2).all(|w| w[0].name < w[1].name));
        // -0.0 keeps its sign bit.
        let b = back
            .iter()
            .find(|t| t.dtype == DType::F32 && t.dims == [3, 2])
            .unwrap();
        assert!(b.data[5].is_sign_negative());
        assert!(leftover_temp_files(dir.path()).is_empty());
    }

    #[test]
    fn write_rounds_to_nearest_even_and_keeps_nan() {
        let dir = TempDir::new("rne");
        let path = dir.path().join("t.safetensors");
        let tensors = vec![
            // bf16 has 7 mantissa bits: 1 + 2^-8 is a tie -> 1.0 (even); 1 + 3·2^-8 -> 1 + 2^-6.
            tensor(
                "b",
                &[3],
                DType::BF16,
                &[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), f32::NAN],
            ),
            // f16 has 10 mantissa bits: the same ties one level down.
            tensor(
                "h",
                &[3],
                DType::F16,
                &[
                    1.0 + 2f32.powi(-11),
                    1.0 + 3.0 * 2f32.powi(-11),
                    f32::INFINITY,
                ],
            ),
        ];
        write_safetensors(&path, &tensors, None).unwrap();
        let (back, meta) = read_safetensors(&path).unwrap();
        assert!(meta.is_empty());
        assert_eq!(back[0].data[..2], [1.0, 1.0 + 2f32.powi(-6)]);
        assert!(back[0].data[2].is_nan());
        assert_eq!(back[1].data, [1.0, 1.0 + 2f32.powi(-9), f32::INFINITY]);
    }

    #[test]
    fn peft_dir_round_trip_with_config() {
        let dir = TempDir::new("peft");
        let adapter_dir = dir.path().join("nested").join("adapter");
        let config = serde_json::json!({
            "peft_type": "LORA", "r": 8, "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj"]
        });
        let tensors = sample_tensors();
        save_adapter(&adapter_dir, &tensors, Some(&config)).unwrap();
        assert!(adapter_dir.join(ADAPTER_CONFIG_FILE).is_file());

        let a = load_adapter(&adapter_dir).unwrap();
        assert_eq!(a.path, adapter_dir);
        assert_eq!(a.config.as_ref(), Some(&config));
        assert_eq!(a.tensors, sorted(tensors.clone()));
        let (_, meta) = read_safetensors(&adapter_dir.join(ADAPTER_MODEL_FILE)).unwrap();
        assert_eq!(meta.get("format").map(String::as_str), Some("pt"));

        let q_a = a.get("base_model.model.q_proj.lora_A.weight").unwrap();
        assert_eq!(q_a.role(), TensorRole::LoraA);
        assert_eq!(q_a.dtype, DType::F16);
        assert_eq!(
            a.get("base_model.model.q_proj.lora_B.weight")
                .unwrap()
                .role(),
            TensorRole::LoraB
        );
        assert_eq!(
            a.get("base_model.model.norm.bias").unwrap().role(),
            TensorRole::Other
        );
        assert!(a.get("missing").is_none());

        // Without a config; a bare file loads too.
        let plain = dir.path().join("plain");
        save_adapter(&plain, &tensors, None).unwrap();
        assert!(!plain.join(ADAPTER_CONFIG_FILE).exists());
        assert!(load_adapter(&plain).unwrap().config.is_none());
        let bare = load_adapter(&plain.join(ADAPTER_MODEL_FILE)).unwrap();
        assert!(bare.config.is_none());
        assert_eq!(bare.tensors, a.tensors);

        // Saving again over an existing adapter replaces it.
        let one = vec![tensor("x.lora_A.weight", &[1, 1], DType::F32, &[5.0])];
        save_adapter(&adapter_dir, &one, Some(&config)).unwrap();
        assert_eq!(load_adapter(&adapter_dir).unwrap().tensors, one);
        assert!(leftover_temp_files(&adapter_dir).is_empty());
    }

    #[test]
    fn truncated_file_is_an_error_naming_the_path() {
        let dir = TempDir::new("trunc");
        let good = dir.path().join("good.safetensors");
        write_safetensors(&good, &sample_tensors(), None).unwrap();
        let bytes = fs::read(&good).unwrap();
        let path = dir.path().join("cut.safetensors");
        for cut in [
            0,
            1,
            7,
            8,
            9,
            20,
            bytes.len() / 2,
            bytes.len() - 4,
            bytes.len() - 1,
        ] {
            fs::write(&path, &bytes[..cut]).unwrap();
            let e = read_safetensors(&path).unwrap_err();
            assert!(
                e.to_string().contains(&path.display().to_string()),
                "cut {cut}: {e:#}"
            );
        }
        // One byte too many is just as wrong.
        let mut long = bytes.clone();
        long.push(0);
        fs::write(&path, &long).unwrap();
        assert!(read_safetensors(&path).is_err());
    }

    #[test]
    fn garbage_is_an_error() {
        let dir = TempDir::new("garbage");
        let path = dir.path().join("junk.safetensors");
        let mut huge_header = u64::MAX.to_le_bytes().to_vec();
        huge_header.extend_from_slice(b"{}");
        let bad_offsets = {
            let h = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
            let mut v = (h.len() as u64).to_le_bytes().to_vec();
            v.extend_from_slice(h);
            v.extend_from_slice(&[0u8; 8]);
            v
        };
        let not_json = {
            let h = b"this is not json";
            let mut v = (h.len() as u64).to_le_bytes().to_vec();
            v.extend_from_slice(h);
            v
        };
        for junk in [
            b"hello, this is certainly not a safetensors file".to_vec(),
            huge_header,
            bad_offsets,
            not_json,
            vec![0xff; 64],
        ] {
            fs::write(&path, &junk).unwrap();
            let e = read_safetensors(&path).unwrap_err();
            assert!(e.to_string().contains(&path.display().to_string()), "{e:#}");
            assert!(load_adapter(&path).is_err());
        }
        // Missing file and a directory given to read_safetensors.
        let missing = dir.path().join("nope.safetensors");
        assert!(msg(&read_safetensors(&missing).unwrap_err()).contains("nope.safetensors"));
        assert!(msg(&load_adapter(&missing).unwrap_err()).contains("nope.safetensors"));
        let e = read_safetensors(dir.path()).unwrap_err();
        assert!(msg(&e).contains(&dir.path().display().to_string()), "{e:#}");
    }

    fn write_raw(path: &Path, name: &str, dtype: Dtype, shape: Vec<usize>, bytes: &[u8]) {
        let view = safetensors::tensor::TensorView::new(dtype, shape, bytes).unwrap();
        let ok =
            safetensors::tensor::TensorView::new(Dtype::F32, vec![1], &[0, 0, 128, 63]).unwrap();
        let buf = safetensors::serialize([(name, view), ("fine.weight", ok)], None).unwrap();
        fs::write(path, buf).unwrap();
    }

    #[test]
    fn unsupported_dtype_names_tensor() {
        let dir = TempDir::new("dtype");
        let path = dir.path().join("i64.safetensors");
        let bytes: Vec<u8> = [1i64, 2].iter().flat_map(|x| x.to_le_bytes()).collect();
        write_raw(&path, "layer.lora_A.weight", Dtype::I64, vec![2], &bytes);
        let e = msg(&read_safetensors(&path).unwrap_err());
        assert!(e.contains("layer.lora_A.weight"), "{e}");
        assert!(e.contains("I64"), "{e}");
        assert!(e.contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn empty_scalar_and_too_many_dims_are_rejected() {
        let dir = TempDir::new("shapes");
        let path = dir.path().join("s.safetensors");
        let cases: [(Vec<usize>, Vec<u8>); 3] = [
            (vec![], 1f32.to_le_bytes().to_vec()),
            (vec![0, 4], vec![]),
            (vec![1, 1, 1, 1, 1], 1f32.to_le_bytes().to_vec()),
        ];
        for (shape, bytes) in cases {
            write_raw(&path, "odd.weight", Dtype::F32, shape.clone(), &bytes);
            let e = msg(&read_safetensors(&path).unwrap_err());
            assert!(e.contains("odd.weight"), "{shape:?}: {e}");
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
        // The writer refuses what the reader would refuse, and mismatched lengths.
        let out = dir.path().join("out.safetensors");
        for t in [
            tensor("a", &[], DType::F32, &[1.0]),
            tensor("a", &[0], DType::F32, &[]),
            tensor("a", &[2, 2], DType::F32, &[1.0, 2.0, 3.0]),
        ] {
            let e = msg(&write_safetensors(&out, &[t], None).unwrap_err());
            assert!(e.contains("\"a\"") && e.contains("out.safetensors"), "{e}");
        }
        let dup = [
            tensor("a", &[1], DType::F32, &[1.0]),
            tensor("a", &[1], DType::F16, &[2.0]),
        ];
        assert!(write_safetensors(&out, &dup, None).is_err());
        assert!(!out.exists());
        assert!(leftover_temp_files(dir.path()).is_empty());
    }

    #[test]
    fn bin_only_dir_gives_helpful_error() {
        let dir = TempDir::new("bin");
        fs::write(dir.path().join(ADAPTER_BIN_FILE), b"pickle").unwrap();
        let e = msg(&load_adapter(dir.path()).unwrap_err());
        assert!(e.contains("safe_serialization=True"), "{e}");
        assert!(e.contains(&dir.path().display().to_string()), "{e}");

        let empty = TempDir::new("emptydir");
        let e = msg(&load_adapter(empty.path()).unwrap_err());
        assert!(e.contains(ADAPTER_MODEL_FILE), "{e}");
        assert!(e.contains(&empty.path().display().to_string()), "{e}");
    }

    #[test]
    fn invalid_config_json_is_an_error() {
        let dir = TempDir::new("badcfg");
        save_adapter(dir.path(), &sample_tensors(), None).unwrap();
        let cfg = dir.path().join(ADAPTER_CONFIG_FILE);
        fs::write(&cfg, b"{ not json").unwrap();
        let e = load_adapter(dir.path()).unwrap_err();
        assert!(e.to_string().contains(&cfg.display().to_string()), "{e:#}");
    }

    #[test]
    fn write_atomic_replaces_and_cleans_up() {
        let dir = TempDir::new("atomic");
        let path = dir.path().join("state.bin");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new contents").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new contents");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_atomic_missing_directory_fails_cleanly() {
        let dir = TempDir::new("atomic-missing");
        let old = dir.path().join("keep.bin");
        write_atomic(&old, b"old").unwrap();
        let target = dir.path().join("no-such-dir").join("keep.bin");
        let e = msg(&write_atomic(&target, b"new").unwrap_err());
        assert!(e.contains(&target.display().to_string()), "{e}");
        assert_eq!(fs::read(&old).unwrap(), b"old");
        assert!(!dir.path().join("no-such-dir").exists());
        assert!(leftover_temp_files(dir.path()).is_empty());
    }

    #[test]
    fn write_atomic_failed_rename_keeps_old_and_removes_temp() {
        let dir = TempDir::new("atomic-rename");
        // The target is an existing, non-empty directory: the rename must fail.
        let target = dir.path().join("target");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inner"), b"old").unwrap();
        let e = msg(&write_atomic(&target, b"new").unwrap_err());
        assert!(e.contains(&target.display().to_string()), "{e}");
        assert_eq!(fs::read(target.join("inner")).unwrap(), b"old");
        assert!(leftover_temp_files(dir.path()).is_empty());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        // A failed write_safetensors leaves an existing file alone too.
        let st = dir.path().join("a.safetensors");
        write_safetensors(&st, &sample_tensors(), None).unwrap();
        let before = fs::read(&st).unwrap();
        let bad = [tensor("a", &[2], DType::F32, &[1.0])];
        assert!(write_safetensors(&st, &bad, None).is_err());
        assert_eq!(fs::read(&st).unwrap(), before);
        assert!(leftover_temp_files(dir.path()).is_empty());
    }
}
