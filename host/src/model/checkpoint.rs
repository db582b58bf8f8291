//! Memory-mapped safetensors checkpoints (single file or sharded with an index), and a
//! streaming checkpoint writer.
//!
//! Reading: [`Checkpoint::open`] maps `model.safetensors`, or every shard named by
//! `model.safetensors.index.json` (HF's `weight_map`), validates every header (offsets,
//! sizes, the file length) and hands out [`WeightSource`]s that point into the mapping: no
//! weight is ever copied. Like HF, a single `model.safetensors` wins over an index when both
//! are present. Tensors of any dtype may be present; asking for one that is not F32, F16 or
//! BF16 is an error naming the file and the tensor.
//!
//! Writing: [`write_checkpoint`] streams tensors to disk chunk by chunk (at most
//! [`CHUNK_ELEMENTS`] values in memory besides what the caller holds), converts them to one
//! output dtype, shards above [`WriteOptions::max_shard_bytes`] with an HF-style
//! `model.safetensors.index.json`, and is atomic per file: every shard goes to a temp file
//! first and is renamed into place only after all of them were written and synced, so a
//! failure leaves an existing checkpoint as it was. Stale files of another layout (a single
//! `model.safetensors` next to a new sharded set, old shards, an old index) are removed
//! afterwards, so HF never picks up a mix.
//!
//! Safety note on mapping: the files are mapped read-only. If another process truncates a
//! mapped file while it is in use, reads may fault (SIGBUS); that is the accepted risk of
//! every mmap-based safetensors loader (HF's included).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use fedcdd_kernels::SharedBytes;
pub use fedcdd_kernels::{WeightDType, WeightSource};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

/// The single-file checkpoint name.
pub const MODEL_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Default shard size limit of [`write_checkpoint`]: 2 GB (HF's `"2GB"`, decimal).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 2_000_000_000;
/// Values converted or generated per step of [`write_checkpoint`] (rounded to whole rows).
pub const CHUNK_ELEMENTS: usize = 1 << 20;

/// A checkpoint's element type name as safetensors spells it.
pub fn dtype_name(dtype: WeightDType) -> &'static str {
    match dtype {
        WeightDType::F32 => "F32",
        WeightDType::F16 => "F16",
        WeightDType::Bf16 => "BF16",
    }
}

/// The torch name of a dtype, as `config.json`'s `dtype` holds it.
pub fn torch_dtype_name(dtype: WeightDType) -> &'static str {
    match dtype {
        WeightDType::F32 => "float32",
        WeightDType::F16 => "float16",
        WeightDType::Bf16 => "bfloat16",
    }
}

fn weight_dtype(dtype: Dtype) -> Option<WeightDType> {
    match dtype {
        Dtype::F32 => Some(WeightDType::F32),
        Dtype::F16 => Some(WeightDType::F16),
        Dtype::BF16 => Some(WeightDType::Bf16),
        _ => None,
    }
}

struct Shard {
    path: PathBuf,
    bytes: Arc<Mmap>,
}

struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range inside the shard file.
    start: usize,
    end: usize,
}

/// Where a tensor is and what it looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMeta {
    pub name: String,
    /// The safetensors dtype name (`"BF16"`, `"I64"`, …).
    pub dtype_name: String,
    /// `Some` for F32, F16 and BF16.
    pub dtype: Option<WeightDType>,
    pub shape: Vec<usize>,
    pub file: PathBuf,
}

/// A memory-mapped model checkpoint.
pub struct Checkpoint {
    /// What the user gave (directory or file), for messages.
    origin: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("origin", &self.origin)
            .field("files", &self.files())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Maps `path` and reads its safetensors header (fully validated, file length included).
fn open_shard(path: &Path) -> Result<(Shard, Vec<(String, Entry)>)> {
    // Mapped read-only; see the module docs for the truncation hazard.
    let mmap = crate::io::map_file(path)?;
    let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let data_start = 8 + header_len;
    let mut entries = Vec::new();
    for (name, info) in metadata.tensors() {
        let (s, e) = info.data_offsets;
        entries.push((
            name,
            Entry {
                shard: 0,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + s,
                end: data_start + e,
            },
        ));
    }
    Ok((
        Shard {
            path: path.to_path_buf(),
            bytes: Arc::new(mmap),
        },
        entries,
    ))
}

/// A shard name from an index: a plain file name in the model directory, nothing else.
fn check_shard_name(index: &Path, tensor: &str, file: &str) -> Result<()> {
    let p = Path::new(file);
    let plain = p.file_name().map(|f| f == p.as_os_str()).unwrap_or(false)
        && !file.contains('/')
        && !file.contains('\\');
    if !plain || file == "." || file == ".." {
        bail!(
            "{}: tensor {tensor:?} is mapped to {file:?}, which is not a plain file name in the \
             model directory",
            index.display()
        );
    }
    Ok(())
}

impl Checkpoint {
    /// Opens `model_dir/model.safetensors`, or the shards of
    /// `model_dir/model.safetensors.index.json`; `model_dir` may also be a `.safetensors` file.
    pub fn open(model_dir: &Path) -> Result<Self> {
        let meta = fs::metadata(model_dir)
            .with_context(|| format!("cannot access model {}", model_dir.display()))?;
        if meta.is_file() {
            return Self::from_files(model_dir, &[model_dir.to_path_buf()], None);
        }
        let single = model_dir.join(MODEL_FILE);
        if single.exists() {
            return Self::from_files(model_dir, &[single], None);
        }
        let index = model_dir.join(INDEX_FILE);
        if index.exists() {
            return Self::open_index(model_dir, &index);
        }
        let bin = ["pytorch_model.bin", "pytorch_model.bin.index.json"]
            .iter()
            .any(|f| model_dir.join(f).exists());
        if bin {
            bail!(
                "{}: only pickled pytorch_model.bin weights were found; they are not supported, \
                 re-save the model with `save_pretrained(..., safe_serialization=True)` to get \
                 {MODEL_FILE}",
                model_dir.display()
            );
        }
        bail!(
            "{}: neither {MODEL_FILE} nor {INDEX_FILE} is in this directory",
            model_dir.display()
        )
    }

    fn open_index(model_dir: &Path, index: &Path) -> Result<Self> {
        let text = fs::read_to_string(index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = value
            .get("weight_map")
            .and_then(Value::as_object)
            .with_context(|| {
                format!(
                    "{}: missing key \"weight_map\" (an object of tensor name -> shard file)",
                    index.display()
                )
            })?;
        if map.is_empty() {
            bail!("{}: key \"weight_map\" is empty", index.display());
        }
        let mut wanted: BTreeMap<String, String> = BTreeMap::new();
        for (tensor, file) in map {
            let file = file.as_str().with_context(|| {
                format!(
                    "{}: key \"weight_map\".{tensor:?}: expected a file name string",
                    index.display()
                )
            })?;
            check_shard_name(index, tensor, file)?;
            wanted.insert(tensor.clone(), file.to_string());
        }
        let files: BTreeSet<&String> = wanted.values().collect();
        let paths: Vec<PathBuf> = files.iter().map(|f| model_dir.join(f)).collect();
        Self::from_files(model_dir, &paths, Some((index, &wanted)))
    }

    /// `wanted`: the index and its weight map; only mapped tensors are kept, and each must be
    /// in the shard the map names.
    fn from_files(
        origin: &Path,
        paths: &[PathBuf],
        wanted: Option<(&Path, &BTreeMap<String, String>)>,
    ) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut tensors: BTreeMap<String, Entry> = BTreeMap::new();
        for path in paths {
            let (shard, entries) = open_shard(path)?;
            let idx = shards.len();
            let shard_file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
            for (name, mut entry) in entries {
                if let Some((_, map)) = wanted
                    && map.get(&name).map(String::as_str) != Some(shard_file)
                {
                    // HF loads by the weight map: tensors it does not list here are ignored.
                    continue;
                }
                entry.shard = idx;
                if tensors.contains_key(&name) {
                    bail!(
                        "{}: tensor {name:?} appears in more than one shard",
                        path.display()
                    );
                }
                tensors.insert(name, entry);
            }
            shards.push(shard);
        }
        if let Some((index, map)) = wanted {
            for (name, file) in map {
                if !tensors.contains_key(name) {
                    bail!(
                        "{}: tensor {name:?} is mapped to {file}, but {} does not contain it",
                        index.display(),
                        origin.join(file).display()
                    );
                }
            }
        }
        Ok(Checkpoint {
            origin: origin.to_path_buf(),
            shards,
            tensors,
        })
    }

    /// The directory or file this checkpoint was opened from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The mapped files (one, or the shards).
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).with_context(|| {
            format!(
                "{}: the checkpoint has no tensor {name:?} ({} tensors in {})",
                self.origin.display(),
                self.tensors.len(),
                self.files()
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    /// Shape, dtype and file of a tensor.
    pub fn meta(&self, name: &str) -> Option<TensorMeta> {
        let e = self.tensors.get(name)?;
        Some(TensorMeta {
            name: name.to_string(),
            dtype_name: e.dtype.to_string(),
            dtype: weight_dtype(e.dtype),
            shape: e.shape.clone(),
            file: self.shards[e.shard].path.clone(),
        })
    }

    /// The dtype, shape and little-endian bytes of a float tensor (inside the mapping).
    pub fn raw(&self, name: &str) -> Result<(WeightDType, &[usize], &[u8])> {
        let e = self.entry(name)?;
        let shard = &self.shards[e.shard];
        let dtype = weight_dtype(e.dtype).with_context(|| {
            format!(
                "{}: tensor {name:?} has dtype {}; only F32, F16 and BF16 are supported",
                shard.path.display(),
                e.dtype
            )
        })?;
        let bytes: &[u8] = &shard.bytes;
        Ok((dtype, &e.shape, &bytes[e.start..e.end]))
    }

    /// A frozen weight pointing into the mapping, after checking its shape is exactly
    /// `expected_shape` (1-D or 2-D). A 1-D tensor `[n]` comes back as `rows = 1, cols = n`.
    pub fn weight(&self, name: &str, expected_shape: &[usize]) -> Result<WeightSource> {
        let e = self.entry(name)?;
        let shard = &self.shards[e.shard];
        if e.shape != expected_shape {
            bail!(
                "{}: tensor {name:?} has shape {:?}, but the model config expects {:?}",
                shard.path.display(),
                e.shape,
                expected_shape
            );
        }
        let dtype = weight_dtype(e.dtype).with_context(|| {
            format!(
                "{}: tensor {name:?} has dtype {}; only F32, F16 and BF16 weights are supported",
                shard.path.display(),
                e.dtype
            )
        })?;
        let (rows, cols) = match e.shape[..] {
            [n] => (1, n),
            [r, c] => (r, c),
            _ => bail!(
                "{}: tensor {name:?} has shape {:?}; only 1-D and 2-D weights are supported",
                shard.path.display(),
                e.shape
            ),
        };
        let bytes: SharedBytes = shard.bytes.clone();
        Ok(WeightSource {
            bytes,
            offset: e.start,
            dtype,
            rows,
            cols,
        })
    }

    /// A float tensor widened to f32 (a copy; for small tensors, tests and merges).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let (dtype, _, bytes) = self.raw(name)?;
        let mut out = vec![0f32; bytes.len() / dtype.size()];
        decode_into(dtype, bytes, &mut out);
        Ok(out)
    }
}

/// Little-endian `dtype` bytes to f32 (`out.len()` elements).
pub fn decode_into(dtype: WeightDType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        WeightDType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.as_chunks::<4>().0) {
                *o = f32::from_le_bytes(*c);
            }
        }
        WeightDType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.as_chunks::<2>().0) {
                *o = f16::from_bits(u16::from_le_bytes(*c)).to_f32();
            }
        }
        WeightDType::Bf16 => {
            for (o, c) in out.iter_mut().zip(bytes.as_chunks::<2>().0) {
                *o = bf16::from_bits(u16::from_le_bytes(*c)).to_f32();
            }
        }
    }
}

/// f32 to little-endian `dtype` bytes, appended to `out` (round to nearest even).
pub fn encode_into(dtype: WeightDType, values: &[f32], out: &mut Vec<u8>) {
    out.reserve(values.len() * dtype.size());
    match dtype {
        WeightDType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        WeightDType::F16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes())),
        WeightDType::Bf16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes())),
    }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// A chunk producer: called with `(first_element, out)`; fills `out` with the row-major
/// elements `first_element .. first_element + out.len()` of the tensor.
pub type Generator<'a> = Box<dyn FnMut(usize, &mut [f32]) -> Result<()> + 'a>;

/// Where the values of a tensor come from.
pub enum TensorData<'a> {
    /// f32 values the caller holds.
    F32(&'a [f32]),
    /// Little-endian bytes of `dtype` (e.g. [`Checkpoint::raw`] of a mapped checkpoint):
    /// copied as they are when `dtype` is the output dtype, converted otherwise.
    Raw { dtype: WeightDType, bytes: &'a [u8] },
    /// Values produced on demand, chunk by chunk: the chunks are consecutive, in order, cover
    /// the tensor exactly once, hold whole rows (of the last dimension) unless one row is
    /// longer than [`CHUNK_ELEMENTS`], and each is at most [`CHUNK_ELEMENTS`] long (or one
    /// row).
    Generate(Generator<'a>),
}

impl<'a> TensorData<'a> {
    /// [`TensorData::Generate`] from an infallible producer.
    pub fn generate(mut f: impl FnMut(usize, &mut [f32]) + 'a) -> Self {
        TensorData::Generate(Box::new(move |start, out| {
            f(start, out);
            Ok(())
        }))
    }

    /// [`TensorData::Generate`] from a fallible producer (its error aborts the write).
    pub fn try_generate(f: impl FnMut(usize, &mut [f32]) -> Result<()> + 'a) -> Self {
        TensorData::Generate(Box::new(f))
    }
}

/// One tensor to write.
pub struct TensorToWrite<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData<'a>,
}

impl<'a> TensorToWrite<'a> {
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: TensorData<'a>) -> Self {
        TensorToWrite {
            name: name.into(),
            shape,
            data,
        }
    }
}

/// How [`write_checkpoint`] writes.
pub struct WriteOptions<'p> {
    /// Every tensor is stored in this dtype.
    pub dtype: WeightDType,
    /// Start a new shard when the next tensor would push the current one past this many
    /// bytes of tensor data (a single larger tensor gets a shard of its own, as in HF).
    pub max_shard_bytes: u64,
    /// Extra `__metadata__` entries (`"format": "pt"` is always written).
    pub metadata: BTreeMap<String, String>,
    /// Called after each tensor with `(bytes written so far, total bytes)`.
    pub progress: Option<&'p mut dyn FnMut(u64, u64)>,
}

impl WriteOptions<'_> {
    pub fn new(dtype: WeightDType) -> Self {
        WriteOptions {
            dtype,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            metadata: BTreeMap::new(),
            progress: None,
        }
    }
}

/// A file written under a temp name in its target's directory; renamed by `commit`,
/// removed when dropped uncommitted.
struct PendingFile {
    target: PathBuf,
    temp: PathBuf,
    writer: Option<BufWriter<File>>,
    committed: bool,
}

impl PendingFile {
    fn create(target: &Path) -> Result<Self> {
        let (temp, file) = crate::io::create_temp_beside(target)?;
        Ok(PendingFile {
            target: target.to_path_buf(),
            temp,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
            committed: false,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let w = self
            .writer
            .as_mut()
            .context("internal: write after finish")?;
        w.write_all(bytes).with_context(|| {
            format!(
                "cannot write {}: writing {}",
                self.target.display(),
                self.temp.display()
            )
        })
    }

    /// Flush and fsync (still under the temp name).
    fn finish(&mut self) -> Result<()> {
        if let Some(w) = self.writer.take() {
            let file = w
                .into_inner()
                .map_err(|e| e.into_error())
                .with_context(|| {
                    format!(
                        "cannot write {}: flushing {}",
                        self.target.display(),
                        self.temp.display()
                    )
                })?;
            file.sync_all().with_context(|| {
                format!(
                    "cannot write {}: fsync of {}",
                    self.target.display(),
                    self.temp.display()
                )
            })?;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        self.finish()?;
        fs::rename(&self.temp, &self.target).with_context(|| {
            format!(
                "cannot write {}: renaming {} over it failed",
                self.target.display(),
                self.temp.display()
            )
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed {
            drop(self.writer.take());
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// HF's shard names: `model-00001-of-00003.safetensors`.
pub fn shard_file_name(index: usize, count: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", index + 1, count)
}

/// `model-NNNNN-of-MMMMM.safetensors`.
fn is_shard_name(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let Some((a, b)) = rest.split_once("-of-") else {
        return false;
    };
    !a.is_empty()
        && !b.is_empty()
        && a.bytes().all(|c| c.is_ascii_digit())
        && b.bytes().all(|c| c.is_ascii_digit())
}

/// Validated plan of one tensor.
struct Planned {
    elements: usize,
    bytes: u64,
    shard: usize,
    /// Offset inside its shard's data section.
    offset: u64,
}

/// Writes a checkpoint into `dir` (created if missing): `model.safetensors`, or shards plus
/// `model.safetensors.index.json` when the data exceeds `opts.max_shard_bytes`. Tensors are
/// stored in the order given. Returns the files written (shards first, then the index).
pub fn write_checkpoint(
    dir: &Path,
    tensors: Vec<TensorToWrite<'_>>,
    opts: WriteOptions<'_>,
) -> Result<Vec<PathBuf>> {
    let WriteOptions {
        dtype,
        max_shard_bytes,
        metadata,
        mut progress,
    } = opts;
    let esize = dtype.size();
    if tensors.is_empty() {
        bail!(
            "{}: cannot write a checkpoint without tensors",
            dir.display()
        );
    }

    // Validate and plan the shards before touching the disk.
    let mut seen = BTreeSet::new();
    let mut plan = Vec::with_capacity(tensors.len());
    let mut shard_sizes: Vec<u64> = vec![0];
    for t in &tensors {
        if t.name.is_empty() || t.name == "__metadata__" {
            bail!(
                "{}: cannot write a tensor named {:?}",
                dir.display(),
                t.name
            );
        }
        if !seen.insert(t.name.as_str()) {
            bail!("{}: tensor {:?} is listed twice", dir.display(), t.name);
        }
        let elements = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n > 0 && !t.shape.is_empty())
            .with_context(|| {
                format!(
                    "{}: tensor {:?} has an unsupported shape {:?} (no elements, a scalar, or \
                     an overflowing size)",
                    dir.display(),
                    t.name,
                    t.shape
                )
            })?;
        match &t.data {
            TensorData::F32(v) if v.len() != elements => bail!(
                "{}: tensor {:?} of shape {:?} needs {elements} values, got {}",
                dir.display(),
                t.name,
                t.shape,
                v.len()
            ),
            TensorData::Raw { dtype: d, bytes } if bytes.len() != elements * d.size() => bail!(
                "{}: tensor {:?} of shape {:?} needs {} bytes of {}, got {}",
                dir.display(),
                t.name,
                t.shape,
                elements * d.size(),
                dtype_name(*d),
                bytes.len()
            ),
            _ => {}
        }
        let bytes = (elements as u64) * esize as u64;
        let last = shard_sizes.len() - 1;
        if shard_sizes[last] > 0 && shard_sizes[last] + bytes > max_shard_bytes {
            shard_sizes.push(0);
        }
        let shard = shard_sizes.len() - 1;
        plan.push(Planned {
            elements,
            bytes,
            shard,
            offset: shard_sizes[shard],
        });
        shard_sizes[shard] += bytes;
    }
    let n_shards = shard_sizes.len();
    let total: u64 = shard_sizes.iter().sum();
    let names: Vec<String> = if n_shards == 1 {
        vec![MODEL_FILE.to_string()]
    } else {
        (0..n_shards)
            .map(|i| shard_file_name(i, n_shards))
            .collect()
    };

    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create model directory {}", dir.display()))?;

    // One header per shard.
    let mut headers: Vec<serde_json::Map<String, Value>> = (0..n_shards)
        .map(|_| {
            let mut meta = serde_json::Map::new();
            meta.insert("format".into(), json!("pt"));
            for (k, v) in &metadata {
                meta.insert(k.clone(), json!(v));
            }
            let mut h = serde_json::Map::new();
            h.insert("__metadata__".into(), Value::Object(meta));
            h
        })
        .collect();
    for (t, p) in tensors.iter().zip(&plan) {
        headers[p.shard].insert(
            t.name.clone(),
            json!({
                "dtype": dtype_name(dtype),
                "shape": t.shape,
                "data_offsets": [p.offset, p.offset + p.bytes],
            }),
        );
    }

    let mut pending: Vec<PendingFile> = Vec::with_capacity(n_shards + 1);
    let mut written = 0u64;
    let mut buf_f32: Vec<f32> = Vec::new();
    let mut buf_bytes: Vec<u8> = Vec::new();
    let mut tensors = tensors;
    for (t, p) in tensors.iter_mut().zip(&plan) {
        if p.shard == pending.len() {
            let target = dir.join(&names[p.shard]);
            let mut file = PendingFile::create(&target)?;
            let mut header = serde_json::to_vec(&headers[p.shard])
                .with_context(|| format!("cannot serialize the header of {}", target.display()))?;
            // Pad with spaces so the data starts 8-byte aligned (as safetensors does).
            while header.len() % 8 != 0 {
                header.push(b' ');
            }
            file.write(&(header.len() as u64).to_le_bytes())?;
            file.write(&header)?;
            pending.push(file);
        }
        let file = pending.last_mut().context("internal: no shard open")?;
        let row = t.shape.last().copied().unwrap_or(1).max(1);
        let rows_per_chunk = (CHUNK_ELEMENTS / row).max(1);
        let chunk = rows_per_chunk * row;
        let mut start = 0usize;
        while start < p.elements {
            let len = chunk.min(p.elements - start);
            buf_bytes.clear();
            match &mut t.data {
                TensorData::F32(values) => {
                    encode_into(dtype, &values[start..start + len], &mut buf_bytes);
                }
                TensorData::Raw { dtype: d, bytes } => {
                    let src = &bytes[start * d.size()..(start + len) * d.size()];
                    if *d == dtype {
                        buf_bytes.extend_from_slice(src);
                    } else {
                        buf_f32.resize(len, 0.0);
                        decode_into(*d, src, &mut buf_f32);
                        encode_into(dtype, &buf_f32, &mut buf_bytes);
                    }
                }
                TensorData::Generate(generate) => {
                    buf_f32.resize(len, 0.0);
                    generate(start, &mut buf_f32).with_context(|| {
                        format!(
                            "{}: cannot produce tensor {:?} (elements {start}..{})",
                            dir.display(),
                            t.name,
                            start + len
                        )
                    })?;
                    encode_into(dtype, &buf_f32, &mut buf_bytes);
                }
            }
            file.write(&buf_bytes)?;
            start += len;
        }
        written += p.bytes;
        if let Some(cb) = progress.as_mut() {
            cb(written, total);
        }
    }
    for f in &mut pending {
        f.finish()?;
    }

    // Everything is on disk under temp names: put it in place.
    let mut out: Vec<PathBuf> = Vec::with_capacity(n_shards + 1);
    for f in &mut pending {
        f.commit()?;
        out.push(f.target.clone());
    }
    let index_path = dir.join(INDEX_FILE);
    if n_shards > 1 {
        let mut weight_map = serde_json::Map::new();
        for (t, p) in tensors.iter().zip(&plan) {
            weight_map.insert(t.name.clone(), json!(names[p.shard]));
        }
        let index = json!({
            "metadata": {"total_size": total},
            "weight_map": Value::Object(weight_map),
        });
        let mut text = serde_json::to_vec_pretty(&index)
            .with_context(|| format!("cannot serialize {}", index_path.display()))?;
        text.push(b'\n');
        crate::io::write_atomic(&index_path, &text)?;
        out.push(index_path.clone());
    }

    // Remove what belongs to another layout, so that no reader mixes old and new.
    let keep: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let stale = if keep.contains(name) {
                false
            } else if name == MODEL_FILE {
                true
            } else if name == INDEX_FILE {
                n_shards == 1
            } else {
                is_shard_name(name)
            };
            if stale {
                fs::remove_file(entry.path()).with_context(|| {
                    format!(
                        "wrote {} but cannot remove the stale {}",
                        dir.display(),
                        entry.path().display()
                    )
                })?;
            }
        }
    }
    Ok(out)
}

/// Parses a size like HF's `max_shard_size`: `"2GB"`, `"500MB"`, `"10KiB"`, or plain bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .parse()
        .with_context(|| format!("invalid size {text:?} (expected e.g. 2GB, 500MB, 1048576)"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("invalid size {text:?}: unknown unit {other:?}"),
    };
    let v = num * mult;
    if !(1.0..1.8e19).contains(&v) {
        bail!("invalid size {text:?}: must be at least one byte");
    }
    Ok(v as u64)
}
