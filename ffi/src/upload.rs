//! The client side (mask + encode an upload) and the parsed-upload handle (decode).

use std::collections::HashMap;
use std::ffi::{CString, c_void};

use fedcdd_core::mask::SplitMix64;
use fedcdd_core::{
    Algorithm, DType, DeltaTensor, MaskConfig, Payload, TensorRecord, TensorRole, Upload,
    UploadHeader, UploadPlan, bf16, f16,
};

use crate::arena::Arena;
use crate::error::{FfiError, FfiResult, core_kind, invalid};
use crate::types::*;

/// The `fedcdd encode` CLI's default seed for `(round, client)`.
pub(crate) fn default_seed(round: u32, client_id: u32) -> u64 {
    SplitMix64(((round as u64) << 32) | client_id as u64).next_u64()
}

pub(crate) fn default_encode_options() -> fedcdd_encode_options {
    let mask = MaskConfig::default();
    fedcdd_encode_options {
        round: 0,
        client_id: 0,
        num_samples: 0,
        seed: default_seed(0, 0),
        keep_ratio: mask.keep_ratio,
        noise_scale: mask.noise_scale,
        importance: FEDCDD_IMPORTANCE_COLUMN_L2,
        upload_dtype: FEDCDD_DTYPE_AS_INPUT,
        algorithm: FEDCDD_ALG_FEDCDD,
    }
}

/// Masks `local − global` per tensor and writes the upload into `out` (or only measures it
/// when `out` is `None`). Returns the upload's size in bytes.
pub(crate) fn encode(
    opts: &fedcdd_encode_options,
    global: &[TensorIn<'_>],
    local: &[TensorIn<'_>],
    out: Option<&mut [u8]>,
) -> FfiResult<usize> {
    let algorithm = algorithm_of(opts.algorithm)?;
    let mask = MaskConfig {
        keep_ratio: opts.keep_ratio,
        noise_scale: opts.noise_scale,
        importance: importance_of(opts.importance)?,
        axis: fedcdd_core::MaskAxis::Column,
    };
    mask.validate()
        .map_err(|e| invalid(format!("encode options: {}", e.kind)))?;
    let upload_dtype = match opts.upload_dtype {
        FEDCDD_DTYPE_AS_INPUT => None,
        code => Some(dtype_of(code)?),
    };
    let mut local_by_name = HashMap::with_capacity(local.len());
    for l in local {
        if local_by_name.insert(l.name, l).is_some() {
            return Err(FfiError::new(
                FEDCDD_ERR_TENSOR_NAME,
                format!("local tensor \"{}\" appears twice", l.name),
            ));
        }
    }
    let mut global_names = HashMap::with_capacity(global.len());
    for g in global {
        if global_names.insert(g.name, ()).is_some() {
            return Err(FfiError::new(
                FEDCDD_ERR_TENSOR_NAME,
                format!("global tensor \"{}\" appears twice", g.name),
            ));
        }
    }
    if let Some(l) = local.iter().find(|l| !global_names.contains_key(l.name)) {
        return Err(FfiError::new(
            FEDCDD_ERR_TENSOR_NAME,
            format!("local tensor \"{}\" is not a global tensor", l.name),
        ));
    }
    let mut deltas = Vec::new();
    for g in global {
        let role = TensorRole::from_name(g.name);
        if !algorithm.aggregates(role) {
            continue;
        }
        let at = format!("tensor \"{}\"", g.name);
        let l = local_by_name.get(g.name).ok_or_else(|| {
            FfiError::new(
                FEDCDD_ERR_TENSOR_NAME,
                format!("local {at} is missing ({} sends it)", algorithm.name()),
            )
        })?;
        if l.dims != g.dims {
            return Err(FfiError::new(
                FEDCDD_ERR_SHAPE,
                format!(
                    "local {at} has shape {:?}, the global tensor has {:?}",
                    l.dims, g.dims
                ),
            ));
        }
        for (which, t) in [("global", g), ("local", *l)] {
            if let Some(i) = t.first_non_finite() {
                return Err(FfiError::new(
                    FEDCDD_ERR_NON_FINITE,
                    format!("{which} {at}: value is NaN or infinite (element {i})"),
                ));
            }
        }
        // Δ = θ − G in f32; the plan rounds it to the dtype sent.
        let delta: Vec<f32> = l
            .to_f32()
            .iter()
            .zip(g.to_f32())
            .map(|(a, b)| a - b)
            .collect();
        deltas.push((g.name, &g.dims, upload_dtype.unwrap_or(l.dtype), delta));
    }
    if deltas.is_empty() {
        return Err(invalid(format!(
            "nothing to upload: no global tensor is sent by {}",
            algorithm.name()
        )));
    }
    let views: Vec<DeltaTensor<'_>> = deltas
        .iter()
        .map(|(name, dims, dtype, values)| DeltaTensor {
            name,
            dims,
            dtype: *dtype,
            values,
        })
        .collect();
    let header = UploadHeader::new(opts.round, opts.client_id, opts.num_samples, 0);
    let at = |e: fedcdd_core::Error| match e.tensor.and_then(|i| views.get(i as usize)) {
        Some(t) => core_kind(e).context(format!("tensor \"{}\"", t.name)),
        None => core_kind(e).context("upload"),
    };
    let plan = UploadPlan::new(&views, header, &mask, opts.seed).map_err(at)?;
    let len = plan.byte_len().map_err(at)?;
    let Some(out) = out else {
        return Ok(len);
    };
    if out.len() < len {
        return Err(FfiError::new(
            FEDCDD_ERR_BUFFER_TOO_SMALL,
            format!(
                "the upload needs {len} bytes, the buffer has {} (ask fedcdd_encode_upload_size)",
                out.len()
            ),
        ));
    }
    plan.write(&mut out[..len]).map_err(at)
}

/// A parsed, fully validated upload (opaque to C). Create it with `fedcdd_upload_parse`,
/// free it with `fedcdd_upload_free`.
pub struct fedcdd_upload {
    // `upload` and `records` borrow from `_bytes`: declared (and dropped) first.
    upload: Upload<'static>,
    records: Vec<TensorRecord<'static>>,
    names: Vec<CString>,
    _bytes: Arena<u8>,
}

fn record_err(index: usize, name: &str, message: impl std::fmt::Display) -> FfiError {
    FfiError::new(
        FEDCDD_ERR_BAD_ENCODING,
        format!("upload: tensor record #{index} \"{name}\": {message}"),
    )
}

/// Parses and validates upload bytes; an error names the tensor record it is about.
pub(crate) fn parse_upload(bytes: &[u8]) -> FfiResult<Upload<'_>> {
    Upload::parse(bytes).map_err(|e| {
        let at = e
            .tensor
            .map(|i| format!(" (tensor record #{i})"))
            .unwrap_or_default();
        core_kind(e).context(format!("upload{at}"))
    })
}

impl fedcdd_upload {
    /// Copies and validates `bytes`.
    pub(crate) fn parse(bytes: &[u8]) -> FfiResult<Box<fedcdd_upload>> {
        // SAFETY: the lent slice is only borrowed by `upload` and `records`, which the handle
        // declares before `_bytes` and never hands out beyond `&self`.
        let (arena, lent) = unsafe { Arena::lend(bytes.to_vec()) };
        let lent: &'static [u8] = lent;
        let upload = parse_upload(lent)?;
        let mut records = Vec::with_capacity(upload.header.num_tensors as usize);
        let mut names = Vec::with_capacity(records.capacity());
        let mut seen = HashMap::new();
        for (i, rec) in upload.records().enumerate() {
            let rec = rec.map_err(|e| core_kind(e).context("upload"))?;
            let name = CString::new(rec.name)
                .map_err(|_| record_err(i, rec.name, "the name holds a NUL byte"))?;
            if seen.insert(rec.name, i).is_some() {
                return Err(record_err(i, rec.name, "the name appears twice"));
            }
            names.push(name);
            records.push(rec);
        }
        Ok(Box::new(fedcdd_upload {
            upload,
            records,
            names,
            _bytes: arena,
        }))
    }

    pub(crate) fn header(&self) -> fedcdd_upload_header {
        let h = self.upload.header;
        fedcdd_upload_header {
            version: h.version as u32,
            round: h.round,
            client_id: h.client_id,
            num_samples: h.num_samples,
            num_tensors: self.records.len(),
            byte_len: self.upload.byte_len,
        }
    }

    fn record(&self, index: usize) -> FfiResult<&TensorRecord<'static>> {
        self.records.get(index).ok_or_else(|| {
            invalid(format!(
                "tensor index {index} is out of range (the upload holds {})",
                self.records.len()
            ))
        })
    }

    pub(crate) fn find(&self, name: &str) -> FfiResult<usize> {
        self.records
            .iter()
            .position(|r| r.name == name)
            .ok_or_else(|| {
                FfiError::new(
                    FEDCDD_ERR_TENSOR_NAME,
                    format!("the upload holds no tensor \"{name}\""),
                )
            })
    }

    pub(crate) fn info(&self, index: usize) -> FfiResult<fedcdd_record_info> {
        let r = self.record(index)?;
        let mut shape = [0usize; FEDCDD_MAX_DIMS];
        for (s, d) in shape.iter_mut().zip(r.dims.iter()) {
            *s = *d as usize;
        }
        let (masked, columns, sigma, seed) = match r.payload {
            Payload::Dense { .. } => (0, r.layout.cols, 0.0, 0),
            Payload::Masked {
                importance,
                sigma,
                seed,
                ..
            } => (1, importance.units(&r.layout).1, sigma, seed),
        };
        Ok(fedcdd_record_info {
            name: self.names[index].as_ptr(),
            ndim: r.dims.len(),
            shape,
            numel: r.layout.len(),
            dtype: dtype_code(r.dtype),
            masked,
            kept_columns: r.kept_count(),
            columns,
            sigma,
            seed,
        })
    }

    /// Reconstructs tensor `index` into a caller buffer of `dtype`.
    ///
    /// # Safety
    /// A non-null `data` must be valid for writes of `len` elements of `dtype`.
    pub(crate) unsafe fn decode(
        &self,
        index: usize,
        dtype: DType,
        data: *mut c_void,
        len: usize,
    ) -> FfiResult<()> {
        let r = self.record(index)?;
        let at = format!("tensor record #{index} \"{}\"", r.name);
        if len != r.layout.len() {
            return Err(FfiError::new(
                FEDCDD_ERR_SHAPE,
                format!(
                    "{at}: the buffer holds {len} elements, the tensor has {}",
                    r.layout.len()
                ),
            ));
        }
        // SAFETY (all arms): the caller's contract; `slice_mut` checks null and alignment,
        // and f16/bf16 are `repr(transparent)` over u16.
        let bad = match dtype {
            DType::F32 => {
                let out = unsafe { slice_mut(data.cast::<f32>(), len, "out") }?;
                r.reconstruct(out).map_err(|e| core_kind(e).context(&at))?;
                out.iter().position(|v| !v.is_finite())
            }
            DType::F16 => {
                let out = unsafe { slice_mut(data.cast::<f16>(), len, "out") }?;
                r.reconstruct(out).map_err(|e| core_kind(e).context(&at))?;
                out.iter().position(|v| !v.is_finite())
            }
            DType::BF16 => {
                let out = unsafe { slice_mut(data.cast::<bf16>(), len, "out") }?;
                r.reconstruct(out).map_err(|e| core_kind(e).context(&at))?;
                out.iter().position(|v| !v.is_finite())
            }
        };
        if let Some(i) = bad {
            return Err(FfiError::new(
                FEDCDD_ERR_NON_FINITE,
                format!("{at}: value is NaN or infinite at element {i} (in the requested dtype)"),
            ));
        }
        Ok(())
    }
}

/// The algorithm a name means (`fedavg`, `fedcdd`, `ffa-lora`, ...).
pub(crate) fn algorithm_by_name(name: &str) -> FfiResult<fedcdd_algorithm> {
    Algorithm::from_name(name)
        .map(algorithm_code)
        .ok_or_else(|| invalid(format!("unknown algorithm name \"{name}\"")))
}
