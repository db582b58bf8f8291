//! Client updates: the masked upload a client encodes, and the update the server gets back
//! from an upload or from a client's whole adapter.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fedcdd_core::mask::{MaskScratch, SplitMix64};
use fedcdd_core::wire::MAGIC;
use fedcdd_core::{
    Algorithm, DType, Element, Layout, MaskConfig, Upload, UploadHeader, UploadWriter, bf16, f16,
    mask_encode,
};

use crate::adapter::{Adapter, Tensor, load_adapter};

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

/// What [`encode_update`] produced, per tensor.
#[derive(Clone, Debug)]
pub struct EncodedTensor {
    pub name: String,
    pub kept: usize,
    pub cols: usize,
    pub sigma: f32,
}

/// Computes `Δ = local − global`, masks it and encodes the upload.
/// Returns the bytes and, per tensor, what was kept.
pub fn encode_update(
    global: &Adapter,
    local: &Adapter,
    opts: &EncodeOptions,
) -> Result<(Vec<u8>, Vec<EncodedTensor>)> {
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

/// Masks and encodes already-computed updates (sorted by name) into upload bytes.
pub fn encode_tensors(
    deltas: &[Tensor],
    header: UploadHeader,
    mask: &MaskConfig,
    seed: u64,
) -> Result<(Vec<u8>, Vec<EncodedTensor>)> {
    // First a dry run to size the buffer, then the real write: the same code path twice.
    let mut summary = Vec::new();
    let plan = mask_all(deltas, mask, &mut summary)?;
    let mut dry = UploadWriter::measure(header)?;
    write_records(&mut dry, deltas, &plan, mask, seed)?;
    let len = dry.finish()?;
    let mut buf = vec![0u8; len];
    let mut w = UploadWriter::new(&mut buf, header)?;
    write_records(&mut w, deltas, &plan, mask, seed)?;
    let written = w.finish()?;
    debug_assert_eq!(written, len);
    Ok((buf, summary))
}

/// The kept columns of one tensor, computed once for both writes.
struct MaskPlan {
    kept: Vec<u32>,
    values: Vec<f32>,
    sigma: f32,
    dense: bool,
}

fn layout_of(t: &Tensor) -> Result<Layout> {
    Layout::from_dims(&t.dims, t.role())
        .map_err(|e| anyhow::anyhow!("tensor {:?} with shape {:?}: {e}", t.name, t.dims))
}

fn mask_all(
    deltas: &[Tensor],
    mask: &MaskConfig,
    summary: &mut Vec<EncodedTensor>,
) -> Result<Vec<MaskPlan>> {
    let mut plans = Vec::with_capacity(deltas.len());
    for t in deltas {
        let layout = layout_of(t)?;
        let (rows, cols) = mask.importance.units(&layout);
        let k = mask.kept_count(cols);
        // Values are rounded to the upload dtype first, so the kept columns and σ are those
        // of the tensor actually sent.
        let sent = round_to(t.dtype, &t.data);
        let mut norms = vec![0.0f32; cols];
        let mut order = vec![0u32; cols];
        let mut kept = vec![0u32; k];
        let mut values = vec![0.0f32; k * rows];
        let s = mask_encode(
            &sent,
            &layout,
            mask,
            MaskScratch {
                norms: &mut norms,
                order: &mut order,
            },
            &mut kept,
            &mut values,
        )
        .map_err(|e| anyhow::anyhow!("tensor {:?}: {e}", t.name))?;
        summary.push(EncodedTensor {
            name: t.name.clone(),
            kept: s.kept,
            cols,
            sigma: s.sigma,
        });
        plans.push(MaskPlan {
            kept,
            values,
            sigma: s.sigma,
            dense: s.kept == cols,
        });
    }
    Ok(plans)
}

fn write_records(
    w: &mut UploadWriter<'_>,
    deltas: &[Tensor],
    plans: &[MaskPlan],
    mask: &MaskConfig,
    seed: u64,
) -> Result<()> {
    for (t, p) in deltas.iter().zip(plans) {
        let r = match (t.dtype, p.dense) {
            (DType::F32, true) => w.dense(&t.name, &t.dims, &t.data),
            (DType::F16, true) => w.dense(&t.name, &t.dims, &narrow::<f16>(&t.data)),
            (DType::BF16, true) => w.dense(&t.name, &t.dims, &narrow::<bf16>(&t.data)),
            (DType::F32, false) => w.masked(
                &t.name,
                &t.dims,
                mask.importance,
                &p.kept,
                &p.values,
                p.sigma,
                seed,
            ),
            (DType::F16, false) => w.masked(
                &t.name,
                &t.dims,
                mask.importance,
                &p.kept,
                &narrow::<f16>(&p.values),
                p.sigma,
                seed,
            ),
            (DType::BF16, false) => w.masked(
                &t.name,
                &t.dims,
                mask.importance,
                &p.kept,
                &narrow::<bf16>(&p.values),
                p.sigma,
                seed,
            ),
        };
        r.map_err(|e| anyhow::anyhow!("tensor {:?}: {e}", t.name))?;
    }
    Ok(())
}

fn narrow<T: Element>(x: &[f32]) -> Vec<T> {
    x.iter().map(|v| T::from_f32(*v)).collect()
}

/// `x` rounded to the values `dtype` can hold.
fn round_to(dtype: DType, x: &[f32]) -> Vec<f32> {
    match dtype {
        DType::F32 => x.to_vec(),
        DType::F16 => x.iter().map(|v| f16::from_f32(*v).to_f32()).collect(),
        DType::BF16 => x.iter().map(|v| bf16::from_f32(*v).to_f32()).collect(),
    }
}

/// Whether `bytes` start like a safetensors file: a little-endian u64 header length that
/// fits the file, then a JSON object.
fn looks_like_safetensors(bytes: &[u8]) -> bool {
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
    })
}

/// Clients given on the command line: adapters or uploads, each optionally with a sample
/// count that overrides the upload's. Each is read from disk when the server asks for it.
pub struct FileClients<'a> {
    pub global: &'a Adapter,
    /// Path and sample count (`PATH:N`) of each client.
    pub specs: Vec<(PathBuf, Option<u64>)>,
}

impl crate::aggregate::ClientLoader for FileClients<'_> {
    fn count(&self) -> usize {
        self.specs.len()
    }

    fn label(&self, index: usize) -> String {
        format!("client {index} ({})", self.specs[index].0.display())
    }

    fn samples(&mut self, index: usize) -> Result<Option<u64>> {
        // Also a cheap first look at every client, so that a wrong path is reported as such
        // rather than as a missing sample count.
        let (path, given) = &self.specs[index];
        if path.is_dir() {
            if !path.join(crate::adapter::ADAPTER_MODEL_FILE).is_file() {
                load_adapter(path)?; // its error says what is missing
            }
            return Ok(*given);
        }
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read client {}", path.display()))?;
        if !looks_like_upload(&bytes) {
            if !looks_like_safetensors(&bytes) {
                bail!(
                    "client file {} is neither a fedcdd upload nor a safetensors adapter",
                    path.display()
                );
            }
            return Ok(*given);
        }
        let h = parse_upload(&bytes, path)?.header;
        Ok(given.or((h.num_samples > 0).then_some(h.num_samples)))
    }

    fn load(&mut self, index: usize) -> Result<ClientUpdate> {
        let (path, given) = &self.specs[index];
        let mut update = load_client(path, index as u32, self.global)?;
        if given.is_some() {
            update.samples = *given;
        }
        Ok(update)
    }
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
