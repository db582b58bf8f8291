//! Encoding a whole client upload (feature `alloc`): every tensor's update masked once and
//! written in the wire format. The host's `fedcdd encode`, its federated runner and the C
//! ABI all go through this one pipeline.
//!
//! Memory: each tensor's kept columns (at most its size) plus the mask scratch, and the
//! output bytes; the caller's updates are only read.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use half::{bf16, f16};

use crate::error::Error;
use crate::mask::{Importance, MaskConfig, MaskScratch, mask_encode};
use crate::tensor::{DType, Element, Layout, TensorRole};
use crate::wire::{UploadHeader, UploadWriter};

/// One tensor's update `Δ = θ − G` in f32 and the element type its values are sent in.
#[derive(Clone, Copy, Debug)]
pub struct DeltaTensor<'a> {
    pub name: &'a str,
    pub dims: &'a [usize],
    pub dtype: DType,
    pub values: &'a [f32],
}

/// One tensor as it will be sent.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: DType,
    /// How its units were ranked (the mask's importance, or rows for `lora_B` with
    /// `mask_axis = feature`).
    pub importance: Importance,
    /// Kept column indices, ascending (every column when `dense`).
    pub kept: Vec<u32>,
    /// Columns of the importance grid.
    pub columns: usize,
    /// All values (dense) or the kept columns one after another, rounded to `dtype`.
    pub values: Vec<f32>,
    /// σ of the regenerated noise (0 when dense).
    pub sigma: f32,
    /// Every column is kept: the tensor goes as a dense record.
    pub dense: bool,
}

/// An upload masked once, ready to be measured and written (possibly several times).
#[derive(Clone, Debug, PartialEq)]
pub struct UploadPlan {
    pub header: UploadHeader,
    pub importance: Importance,
    /// Seed of the noise of the masked columns.
    pub seed: u64,
    pub tensors: Vec<PlannedTensor>,
}

/// `x` rounded to the values `dtype` holds.
fn round_to(dtype: DType, x: &mut [f32]) {
    match dtype {
        DType::F32 => {}
        DType::F16 => x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
        DType::BF16 => x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32()),
    }
}

impl UploadPlan {
    /// Masks every tensor of `deltas` (values rounded to the dtype sent first, so the kept
    /// columns and σ are those of the tensor actually sent). The header's tensor count is
    /// set to `deltas.len()`. An error names the tensor by its index in `deltas`.
    pub fn new(
        deltas: &[DeltaTensor<'_>],
        header: UploadHeader,
        mask: &MaskConfig,
        seed: u64,
    ) -> Result<Self, Error> {
        mask.validate()?;
        let mut tensors = Vec::with_capacity(deltas.len());
        for (i, t) in deltas.iter().enumerate() {
            let at = |e: Error| e.with_tensor(i as u32);
            let layout = Layout::from_dims(t.dims, TensorRole::from_name(t.name)).map_err(at)?;
            let mut sent = t.values.to_vec();
            round_to(t.dtype, &mut sent);
            let importance = mask.axis.importance_for(mask.importance, layout.role);
            let (rows, cols) = importance.units(&layout);
            let k = mask.kept_count(cols);
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
            .map_err(at)?;
            let dense = s.kept == cols;
            tensors.push(PlannedTensor {
                name: String::from(t.name),
                dims: t.dims.to_vec(),
                dtype: t.dtype,
                importance,
                kept,
                columns: cols,
                values: if dense { sent } else { values },
                sigma: if dense { 0.0 } else { s.sigma },
                dense,
            });
        }
        let mut header = header;
        header.num_tensors = u32::try_from(tensors.len())
            .map_err(|_| Error::from(crate::ErrorKind::BadConfig("too many tensors")))?;
        Ok(UploadPlan {
            header,
            importance: mask.importance,
            seed,
            tensors,
        })
    }

    /// The upload's size in bytes.
    pub fn byte_len(&self) -> Result<usize, Error> {
        let mut w = UploadWriter::measure(self.header)?;
        self.write_records(&mut w)?;
        w.finish()
    }

    /// Writes the upload into `out` (at least [`byte_len`](Self::byte_len) bytes); returns
    /// the bytes written.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = UploadWriter::new(out, self.header)?;
        self.write_records(&mut w)?;
        w.finish()
    }

    /// The upload's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        let mut buf = vec![0u8; self.byte_len()?];
        let n = self.write(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    fn write_records(&self, w: &mut UploadWriter<'_>) -> Result<(), Error> {
        for p in &self.tensors {
            match p.dtype {
                DType::F32 => self.write_record(w, p, &p.values),
                DType::F16 => self.write_record(w, p, &narrow::<f16>(&p.values)),
                DType::BF16 => self.write_record(w, p, &narrow::<bf16>(&p.values)),
            }?;
        }
        Ok(())
    }

    /// One tensor with its values in the upload dtype `T`: dense, or its kept columns.
    fn write_record<T: Element>(
        &self,
        w: &mut UploadWriter<'_>,
        p: &PlannedTensor,
        values: &[T],
    ) -> Result<(), Error> {
        if p.dense {
            w.dense(&p.name, &p.dims, values)
        } else {
            w.masked(
                &p.name,
                &p.dims,
                p.importance,
                &p.kept,
                values,
                p.sigma,
                self.seed,
            )
        }
    }
}

fn narrow<T: Element>(x: &[f32]) -> Vec<T> {
    x.iter().map(|v| T::from_f32(*v)).collect()
}
