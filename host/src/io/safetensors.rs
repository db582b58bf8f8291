//! safetensors files in and out, values widened to f32, and the one memory-mapping path
//! every reader here uses (adapters, server state, model checkpoints).
//!
//! Every error names the file it is about and, where one is involved, the tensor.
//! Files are written atomically (see [`super::atomic`]).

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result, bail};
use fedcdd_core::{DType, MAX_DIMS, TensorRole};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::atomic::write_atomic;

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

/// Opens `path` read-only and memory-maps it. Callers copy out what they keep, or hold the
/// map for as long as they read it (model checkpoints).
pub fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    // SAFETY: the file is opened read-only and the mapping is only read. The remaining hazard,
    // another process truncating the file while it is mapped, is the usual accepted risk of
    // mmap-based safetensors loading (HF's loaders included).
    unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))
}

/// Reads a safetensors file (mmap) into tensors sorted by name, plus its `__metadata__`.
pub fn read_safetensors(path: &Path) -> Result<(Vec<Tensor>, HashMap<String, String>)> {
    // Every byte used is copied out of the mapping before this function returns.
    let mmap = map_file(path)?;
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
