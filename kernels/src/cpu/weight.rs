//! Frozen weights on the CPU: the checkpoint's own bytes (memory-mapped, not copied) when
//! they are aligned for their dtype, an owned aligned copy otherwise.

use half::{bf16, f16};

use crate::{KernelError, SharedBytes, WeightDType, WeightSource};

/// A frozen `[rows, cols]` matrix in its stored dtype.
pub struct CpuWeight {
    pub rows: usize,
    pub cols: usize,
    data: Storage,
}

enum Storage {
    /// Aligned view into shared bytes (`offset` in bytes).
    Shared {
        bytes: SharedBytes,
        offset: usize,
        dtype: WeightDType,
    },
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

/// The elements of a weight, borrowed in their stored type.
#[derive(Clone, Copy)]
pub enum WeightSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl CpuWeight {
    pub fn new(src: &WeightSource) -> Result<Self, KernelError> {
        let raw = src.raw_bytes()?;
        let align = match src.dtype {
            WeightDType::F32 => align_of::<f32>(),
            WeightDType::F16 | WeightDType::Bf16 => align_of::<u16>(),
        };
        // Little-endian targets only read the bytes in place; others copy and convert.
        let data =
            if cfg!(target_endian = "little") && (raw.as_ptr() as usize).is_multiple_of(align) {
                Storage::Shared {
                    bytes: src.bytes.clone(),
                    offset: src.offset,
                    dtype: src.dtype,
                }
            } else {
                match src.dtype {
                    WeightDType::F32 => Storage::F32(
                        raw.chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                            .collect(),
                    ),
                    WeightDType::F16 => Storage::F16(
                        raw.chunks_exact(2)
                            .map(|b| f16::from_le_bytes([b[0], b[1]]))
                            .collect(),
                    ),
                    WeightDType::Bf16 => Storage::Bf16(
                        raw.chunks_exact(2)
                            .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                            .collect(),
                    ),
                }
            };
        Ok(CpuWeight {
            rows: src.rows,
            cols: src.cols,
            data,
        })
    }

    pub fn dtype(&self) -> WeightDType {
        match &self.data {
            Storage::Shared { dtype, .. } => *dtype,
            Storage::F32(_) => WeightDType::F32,
            Storage::F16(_) => WeightDType::F16,
            Storage::Bf16(_) => WeightDType::Bf16,
        }
    }

    /// The stored elements, row-major.
    pub fn slice(&self) -> WeightSlice<'_> {
        let len = self.rows * self.cols;
        match &self.data {
            Storage::Shared {
                bytes,
                offset,
                dtype,
            } => {
                let ptr = (**bytes).as_ref()[*offset..].as_ptr();
                // SAFETY: `new` checked that `offset + len·size` lies inside the bytes, that
                // the pointer is aligned for the element type and that the target is little
                // endian; f32/f16/bf16 accept every bit pattern; the Arc keeps the bytes alive
                // and they are never written through it.
                unsafe {
                    match dtype {
                        WeightDType::F32 => {
                            WeightSlice::F32(std::slice::from_raw_parts(ptr.cast::<f32>(), len))
                        }
                        WeightDType::F16 => {
                            WeightSlice::F16(std::slice::from_raw_parts(ptr.cast::<f16>(), len))
                        }
                        WeightDType::Bf16 => {
                            WeightSlice::Bf16(std::slice::from_raw_parts(ptr.cast::<bf16>(), len))
                        }
                    }
                }
            }
            Storage::F32(v) => WeightSlice::F32(v),
            Storage::F16(v) => WeightSlice::F16(v),
            Storage::Bf16(v) => WeightSlice::Bf16(v),
        }
    }

    /// Row `r` widened to f32 into `out[..cols]`.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        let out = &mut out[..c];
        match self.slice() {
            WeightSlice::F32(s) => out.copy_from_slice(&s[r * c..(r + 1) * c]),
            WeightSlice::F16(s) => {
                for (o, v) in out.iter_mut().zip(&s[r * c..(r + 1) * c]) {
                    *o = v.to_f32();
                }
            }
            WeightSlice::Bf16(s) => {
                for (o, v) in out.iter_mut().zip(&s[r * c..(r + 1) * c]) {
                    *o = v.to_f32();
                }
            }
        }
    }

    /// All elements widened to f32 (tests, merges).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for r in 0..self.rows {
            self.row_f32(r, &mut out[r * self.cols..]);
        }
        out
    }

    /// Whether the weight reads the shared (e.g. memory-mapped) bytes in place.
    pub fn is_zero_copy(&self) -> bool {
        matches!(self.data, Storage::Shared { .. })
    }
}
