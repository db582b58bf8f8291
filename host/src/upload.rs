//! Whole-adapter uploads: a client's update masked and encoded (the core's `UploadPlan`,
//! shared with the C ABI), and the update a server gets back from upload bytes or from a
//! client's whole adapter.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fedcdd_core::wire::MAGIC;
use fedcdd_core::{
    Algorithm, DType, DeltaTensor, MaskConfig, PlannedTensor, Upload, UploadHeader, UploadPlan,
};

use crate::io::{Adapter, Tensor, load_adapter};
use crate::rng::SplitMix64;

/// One client's contribution to a round: `Δ_i` per tensor (f32; `dtype` is what was sent).
#[derive(Clone, Debug)]
pub struct ClientUpdate {
    /// Where it came from (for error messages).
    pub source: PathBuf,
    pub client_id: u32,
    /// Sample count, if known (from `PATH:N` or the upload header).
    pub samples: Option<u64>,
    pub round: Option<u32>,
    /// Sorted by name.
    pub deltas: Vec<Tensor>,
    /// Bytes the client uploaded (the upload's size; for an adapter, its dense f32 size).
    pub bytes: usize,
    /// Dense arrays a strategy's client side sends beside the update (SCAFFOLD: its
    /// control-variate change); empty for uploads and adapters read from files.
    pub extras: Vec<Tensor>,
}

impl ClientUpdate {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.deltas
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.deltas[i])
    }

    /// How errors name this client.
    pub fn label(&self) -> String {
        format!("client {} ({})", self.client_id, self.source.display())
    }
}

/// Mask and header settings of `fedcdd encode`.
#[derive(Clone, Debug)]
pub struct EncodeOptions {
    pub mask: MaskConfig,
    /// Noise seed; `None` derives one from (round, client id).
    pub seed: Option<u64>,
    pub round: u32,
    pub client_id: u32,
    pub samples: u64,
    /// Storage type of the uploaded values; `None` keeps each local tensor's own.
    pub dtype: Option<DType>,
    /// Tensors the algorithm uploads (FFA-LoRA: only B; FedSA-LoRA: only A).
    pub algorithm: Algorithm,
}

/// Default seed: a mix of round and client id, so uploads differ without a seed flag yet stay
/// reproducible.
pub fn default_seed(round: u32, client_id: u32) -> u64 {
    SplitMix64(((round as u64) << 32) | client_id as u64).next_u64()
}

/// Computes `Δ = local − global`, masks it and encodes the upload.
/// Returns the bytes and, per tensor, what was kept.
pub fn encode_update(
    global: &Adapter,
    local: &Adapter,
    opts: &EncodeOptions,
) -> Result<(Vec<u8>, Vec<PlannedTensor>)> {
    opts.mask.validate()?;
    let lpath = local.path.display();
    let gpath = global.path.display();
    for t in &local.tensors {
        if global.get(&t.name).is_none() {
            bail!(
                "local adapter {lpath}: tensor {:?} is not in the global adapter {gpath}",
                t.name
            );
        }
    }
    let mut deltas = Vec::new();
    for g in &global.tensors {
        if !opts.algorithm.aggregates(g.role()) {
            continue;
        }
        let l = local
            .get(&g.name)
            .with_context(|| format!("local adapter {lpath}: tensor {:?} is missing", g.name))?;
        if l.dims != g.dims {
            bail!(
                "local adapter {lpath}: tensor {:?} has shape {:?}, the global adapter {gpath} has {:?}",
                g.name,
                l.dims,
                g.dims
            );
        }
        if let Some(i) = l.data.iter().position(|v| !v.is_finite()) {
            bail!(
                "local adapter {lpath}: tensor {:?} holds a non-finite value at index {i}",
                g.name
            );
        }
        let data: Vec<f32> = l.data.iter().zip(&g.data).map(|(a, b)| a - b).collect();
        let dtype = opts.dtype.unwrap_or(l.dtype);
        deltas.push(Tensor {
            name: g.name.clone(),
            dims: g.dims.clone(),
            dtype,
            data,
        });
    }
    if deltas.is_empty() {
        bail!(
            "nothing to upload: no tensor of {gpath} is sent by {}",
            opts.algorithm.name()
        );
    }
    let seed = opts
        .seed
        .unwrap_or_else(|| default_seed(opts.round, opts.client_id));
    let header = UploadHeader::new(
        opts.round,
        opts.client_id,
        opts.samples,
        deltas.len() as u32,
    );
    encode_tensors(&deltas, header, &opts.mask, seed)
}

/// Masks and encodes already-computed updates into upload bytes (the header's tensor count
/// is set from `deltas`). Returns the bytes and, per tensor, what was sent.
pub fn encode_tensors(
    deltas: &[Tensor],
    header: UploadHeader,
    mask: &MaskConfig,
    seed: u64,
) -> Result<(Vec<u8>, Vec<PlannedTensor>)> {
    let views: Vec<DeltaTensor<'_>> = deltas
        .iter()
        .map(|t| DeltaTensor {
            name: &t.name,
            dims: &t.dims,
            dtype: t.dtype,
            values: &t.data,
        })
        .collect();
    let name_of = |e: fedcdd_core::Error| match e.tensor.and_then(|i| deltas.get(i as usize)) {
        Some(t) => anyhow::anyhow!("tensor {:?} with shape {:?}: {}", t.name, t.dims, e.kind),
        None => anyhow::anyhow!("{e}"),
    };
    let plan = UploadPlan::new(&views, header, mask, seed).map_err(name_of)?;
    let bytes = plan.to_bytes().map_err(name_of)?;
    Ok((bytes, plan.tensors))
}

/// Whether `bytes` start like a safetensors file: a little-endian u64 header length that
/// fits the file, then a JSON object.
pub fn looks_like_safetensors(bytes: &[u8]) -> bool {
    match bytes.get(..9) {
        Some(b) => {
            let len = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
            len <= bytes.len() as u64 - 8 && b[8] == b'{'
        }
        None => false,
    }
}

/// Whether `bytes` start like an upload (rather than a safetensors file).
pub fn looks_like_upload(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && bytes[..4] == MAGIC
}

/// Validates upload bytes; errors name the file and the faulty tensor record.
pub fn parse_upload<'a>(bytes: &'a [u8], source: &Path) -> Result<Upload<'a>> {
    Upload::parse(bytes).map_err(|e| {
        let at = e
            .tensor
            .map(|i| format!(" (tensor record #{i})"))
            .unwrap_or_default();
        anyhow::anyhow!("upload {}{at}: {}", source.display(), e.kind)
    })
}

/// Decodes an upload into per-tensor updates (reconstructing masked tensors).
/// `expected` (the global adapter) bounds every declared shape before anything is allocated.
pub fn decode_update(bytes: &[u8], source: &Path, expected: &Adapter) -> Result<ClientUpdate> {
    let src = source.display();
    let upload = parse_upload(bytes, source)?;
    let h = upload.header;
    let mut deltas: Vec<Tensor> = Vec::with_capacity(h.num_tensors as usize);
    for rec in upload.records() {
        let rec = rec.map_err(|e| anyhow::anyhow!("upload {src}: {e}"))?;
        let g = expected.get(rec.name).with_context(|| {
            format!(
                "upload {src}: tensor {:?} is not in the global adapter {}",
                rec.name,
                expected.path.display()
            )
        })?;
        let dims: Vec<usize> = rec.dims.iter().map(|d| *d as usize).collect();
        if dims != g.dims {
            bail!(
                "upload {src}: tensor {:?} has shape {:?}, the global adapter has {:?}",
                rec.name,
                dims,
                g.dims
            );
        }
        let mut data = vec![0.0f32; rec.layout.len()];
        rec.reconstruct(&mut data)
            .map_err(|e| anyhow::anyhow!("upload {src}: tensor {:?}: {}", rec.name, e.kind))?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            bail!(
                "upload {src}: tensor {:?} holds a non-finite value at index {i}",
                rec.name
            );
        }
        deltas.push(Tensor {
            name: rec.name.to_string(),
            dims,
            dtype: rec.dtype,
            data,
        });
    }
    deltas.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = deltas.windows(2).find(|w| w[0].name == w[1].name) {
        bail!("upload {src}: tensor {:?} appears twice", w[0].name);
    }
    Ok(ClientUpdate {
        source: source.to_path_buf(),
        client_id: h.client_id,
        samples: (h.num_samples > 0).then_some(h.num_samples),
        round: Some(h.round),
        deltas,
        bytes: bytes.len(),
        extras: Vec::new(),
    })
}

/// Loads a client given as an adapter (directory or .safetensors; `Δ = θ − G`) or an upload.
pub fn load_client(path: &Path, index: u32, global: &Adapter) -> Result<ClientUpdate> {
    if path.is_file() {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read client file {}", path.display()))?;
        if looks_like_upload(&bytes) {
            return decode_update(&bytes, path, global);
        }
    }
    let local = load_adapter(path)?;
    let mut deltas = Vec::with_capacity(local.tensors.len());
    let mut bytes = 0;
    for t in &local.tensors {
        let g = global.get(&t.name).with_context(|| {
            format!(
                "client adapter {}: tensor {:?} is not in the global adapter {}",
                path.display(),
                t.name,
                global.path.display()
            )
        })?;
        if t.dims != g.dims {
            bail!(
                "client adapter {}: tensor {:?} has shape {:?}, the global adapter has {:?}",
                path.display(),
                t.name,
                t.dims,
                g.dims
            );
        }
        let data = t.data.iter().zip(&g.data).map(|(a, b)| a - b).collect();
        bytes += t.data.len() * t.dtype.size();
        deltas.push(Tensor {
            name: t.name.clone(),
            dims: t.dims.clone(),
            dtype: t.dtype,
            data,
        });
    }
    Ok(ClientUpdate {
        source: path.to_path_buf(),
        client_id: index,
        samples: None,
        round: None,
        deltas,
        bytes,
        extras: Vec::new(),
    })
}

/// `G + Δ` for every tensor of the global adapter (tensors absent from the update keep G).
pub fn apply_update(global: &Adapter, update: &ClientUpdate) -> Vec<Tensor> {
    global
        .tensors
        .iter()
        .map(|g| match update.get(&g.name) {
            Some(d) => Tensor {
                data: g.data.iter().zip(&d.data).map(|(a, b)| a + b).collect(),
                ..g.clone()
            },
            None => g.clone(),
        })
        .collect()
}
