//! Element types, tensor views and the matrix layout every rule works on.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind};

/// Storage type of a tensor's values. All arithmetic happens in f32 whatever the storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name safetensors and PyTorch use (`F32`, `F16`, `BF16`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    /// The lower-case name configs and the CLI use (`f32`, `f16`, `bf16`).
    pub const fn short_name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// The type [`short_name`](Self::short_name) (or [`name`](Self::name)) calls `name`.
    pub fn from_name(name: &str) -> Option<DType> {
        [DType::F32, DType::F16, DType::BF16]
            .into_iter()
            .find(|d| d.short_name() == name || d.name() == name)
    }

    /// Decodes element `i` of little-endian `bytes` (caller guarantees the bounds).
    #[inline]
    pub(crate) fn read_le(self, bytes: &[u8], i: usize) -> f32 {
        match self {
            DType::F32 => {
                let o = i * 4;
                f32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]])
            }
            DType::F16 => {
                f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
            }
            DType::BF16 => {
                bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
            }
        }
    }
}

/// A storage element: f32, f16 or bf16. Converts to and from f32, where all the math happens.
pub trait Element: Copy + Default + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    /// Round-to-nearest-even conversion from f32.
    fn from_f32(x: f32) -> Self;
    /// Little-endian bytes of the value.
    fn write_le(self, out: &mut [u8]);
    /// The slice inside `v` if it holds this element type.
    fn slice_of(v: TensorView<'_>) -> Option<&[Self]>;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn slice_of(v: TensorView<'_>) -> Option<&[Self]> {
        match v {
            TensorView::F32(s) => Some(s),
            _ => None,
        }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn write_le(self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.to_le_bytes());
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn slice_of(v: TensorView<'_>) -> Option<&[Self]> {
        match v {
            TensorView::F16(s) => Some(s),
            _ => None,
        }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline]
    fn write_le(self, out: &mut [u8]) {
        out[..2].copy_from_slice(&self.to_bits().to_le_bytes());
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn slice_of(v: TensorView<'_>) -> Option<&[Self]> {
        match v {
            TensorView::BF16(s) => Some(s),
            _ => None,
        }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    #[inline]
    fn write_le(self, out: &mut [u8]) {
        out[..2].copy_from_slice(&self.to_bits().to_le_bytes());
    }
}

/// A borrowed tensor of any supported element type, row-major.
#[derive(Clone, Copy, Debug)]
pub enum TensorView<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl<'a> TensorView<'a> {
    pub fn len(&self) -> usize {
        match self {
            TensorView::F32(s) => s.len(),
            TensorView::F16(s) => s.len(),
            TensorView::BF16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            TensorView::F32(_) => DType::F32,
            TensorView::F16(_) => DType::F16,
            TensorView::BF16(_) => DType::BF16,
        }
    }
    /// Element `i` as f32 (slow path: one match per call; hot loops match once and loop over the typed slice).
    pub fn get(&self, i: usize) -> f32 {
        match self {
            TensorView::F32(s) => s[i],
            TensorView::F16(s) => s[i].to_f32(),
            TensorView::BF16(s) => s[i].to_f32(),
        }
    }
}

impl<'a> From<&'a [f32]> for TensorView<'a> {
    fn from(s: &'a [f32]) -> Self {
        TensorView::F32(s)
    }
}
impl<'a> From<&'a [f16]> for TensorView<'a> {
    fn from(s: &'a [f16]) -> Self {
        TensorView::F16(s)
    }
}
impl<'a> From<&'a [bf16]> for TensorView<'a> {
    fn from(s: &'a [bf16]) -> Self {
        TensorView::BF16(s)
    }
}

/// Runs `$body` with `$s` bound to the typed slice inside a [`TensorView`], so hot loops are
/// monomorphised per element type instead of matching per element.
#[macro_export]
#[doc(hidden)]
macro_rules! with_view {
    ($view:expr, |$s:ident| $body:expr) => {
        match $view {
            $crate::TensorView::F32($s) => $body,
            $crate::TensorView::F16($s) => $body,
            $crate::TensorView::BF16($s) => $body,
        }
    };
}

/// What a tensor is inside a LoRA adapter; decides the `rank` norm axis and the tensor
/// selection of FFA-LoRA / FedSA-LoRA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorRole {
    /// `lora_A`, shape `[r, d_in]` (down projection).
    LoraA,
    /// `lora_B`, shape `[d_out, r]` (up projection).
    LoraB,
    /// Anything else (biases, DoRA magnitudes, modules_to_save).
    Other,
}

impl TensorRole {
    /// Reads the role from a PEFT tensor name (`...lora_A.weight`, `...lora_embedding_B`, ...).
    pub fn from_name(name: &str) -> TensorRole {
        // Look at the last components only: a module path may itself contain "lora".
        for part in name.rsplit('.').take(3) {
            match part {
                "lora_A" | "lora_embedding_A" => return TensorRole::LoraA,
                "lora_B" | "lora_embedding_B" => return TensorRole::LoraB,
                _ => {}
            }
        }
        TensorRole::Other
    }
}

/// Most dimensions a tensor may have (PEFT adapters hold 1-D and 2-D tensors; conv LoRA 4-D).
pub const MAX_DIMS: usize = 4;

/// The 2-D matrix every per-tensor rule works on: `rows × cols`, row-major.
/// A 1-D tensor `[n]` is `1 × n`; a k-D tensor `[d0, d1, ...]` is `d0 × (d1·...)`,
/// which matches how PEFT's column (input) axis is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub rows: usize,
    pub cols: usize,
    pub role: TensorRole,
}

impl Layout {
    pub const fn new(rows: usize, cols: usize, role: TensorRole) -> Layout {
        Layout { rows, cols, role }
    }

    /// The matrix view of a shape. Fails on an empty shape, a zero dimension, more than
    /// [`MAX_DIMS`] dimensions, or an element count that overflows `usize`.
    pub fn from_dims(dims: &[usize], role: TensorRole) -> Result<Layout, Error> {
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(Error::new(ErrorKind::BadShape));
        }
        let mut cols: usize = 1;
        for &d in &dims[1..] {
            cols = cols.checked_mul(d).ok_or(Error::new(ErrorKind::BadShape))?;
        }
        let (rows, cols) = if dims.len() == 1 {
            (1, dims[0])
        } else {
            (dims[0], cols)
        };
        if rows == 0 || cols == 0 {
            return Err(Error::new(ErrorKind::BadShape));
        }
        rows.checked_mul(cols)
            .ok_or(Error::new(ErrorKind::BadShape))?;
        Ok(Layout { rows, cols, role })
    }

    /// Number of elements.
    pub const fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
