//! The C-visible types and constants, and the checked conversions from what a caller passes
//! (raw pointers, integer codes) to Rust values.
//!
//! Enumerations cross the boundary as plain integers with `#define`d values, never as Rust
//! enums: a C caller can store any integer in an enum, and an out-of-range Rust enum is
//! undefined behaviour. Every code is checked and an unknown one is an error.
#![allow(non_camel_case_types)]

use std::ffi::{CStr, c_char, c_void};

use fedcdd_core::{
    Algorithm, DType, FedCddConfig, FedOptVariant, Importance, NormAxis, ServerOptConfig, Target,
    Weighting, bf16, f16,
};

use crate::error::{FfiError, FfiResult, invalid, null};
pub use crate::status::*;

/// Element type of a tensor's values (row-major, native byte order).
pub type fedcdd_dtype = u32;
/// IEEE 754 binary32 (`float`).
pub const FEDCDD_DTYPE_F32: fedcdd_dtype = 0;
/// IEEE 754 binary16 (`_Float16`, numpy `float16`), passed as its 16 bits.
pub const FEDCDD_DTYPE_F16: fedcdd_dtype = 1;
/// bfloat16 (the upper 16 bits of a binary32), passed as its 16 bits.
pub const FEDCDD_DTYPE_BF16: fedcdd_dtype = 2;
/// Only for `fedcdd_encode_options.upload_dtype`: send each tensor in its local dtype.
pub const FEDCDD_DTYPE_AS_INPUT: fedcdd_dtype = 255;

/// The aggregation rule (the spec's algorithms; the numbers follow its table).
pub type fedcdd_algorithm = u32;
/// `G ← G + λ·Σ p_i Δ_i`.
pub const FEDCDD_ALG_FEDAVG: fedcdd_algorithm = 0;
/// Server side as FedAvg (the proximal term is the client's business).
pub const FEDCDD_ALG_FEDPROX: fedcdd_algorithm = 1;
/// Not available here: its server step needs the clients' control variates.
pub const FEDCDD_ALG_SCAFFOLD: fedcdd_algorithm = 2;
/// FedAvg with server momentum `beta1`.
pub const FEDCDD_ALG_FEDAVGM: fedcdd_algorithm = 3;
/// FedOpt: Adagrad on the server.
pub const FEDCDD_ALG_FEDADAGRAD: fedcdd_algorithm = 4;
/// FedOpt: Yogi on the server.
pub const FEDCDD_ALG_FEDYOGI: fedcdd_algorithm = 5;
/// FedOpt: Adam on the server.
pub const FEDCDD_ALG_FEDADAM: fedcdd_algorithm = 6;
/// FedAvg on `lora_B` only (`lora_A` stays frozen: those tensors keep the global value).
pub const FEDCDD_ALG_FFA_LORA: fedcdd_algorithm = 7;
/// FedAvg on `lora_A` only (each `lora_B` stays on its client).
pub const FEDCDD_ALG_FEDSA_LORA: fedcdd_algorithm = 8;
/// Not available here: FLoRA merges stacked adapters into the base model.
pub const FEDCDD_ALG_FLORA: fedcdd_algorithm = 9;
/// FedCDD: consensus magnitudes + agreement-weighted directions.
pub const FEDCDD_ALG_FEDCDD: fedcdd_algorithm = 10;

/// How clients reach the aggregator.
pub type fedcdd_mode = u32;
/// Each client is added once and kept in memory until `fedcdd_aggregator_finalize`
/// (memory grows with the number of clients).
pub const FEDCDD_MODE_BATCH: fedcdd_mode = 0;
/// Each client is accumulated as it arrives and not kept (memory independent of the number
/// of clients). FedCDD needs every client twice: pass 1, then
/// `fedcdd_aggregator_begin_pass2`, then pass 2 (see `fedcdd_aggregator_passes`).
pub const FEDCDD_MODE_STREAMING: fedcdd_mode = 1;

/// FedCDD's norm groups (spec switch `norm_axis`).
pub type fedcdd_norm_axis = u32;
/// One norm per column of the stored tensor (default).
pub const FEDCDD_NORM_COLUMN: fedcdd_norm_axis = 0;
/// One norm per row (output unit), as DoRA.
pub const FEDCDD_NORM_ROW: fedcdd_norm_axis = 1;
/// Per rank component: `lora_A` by rows, `lora_B` by columns.
pub const FEDCDD_NORM_RANK: fedcdd_norm_axis = 2;

/// What FedCDD decomposes (spec switch `target`).
pub type fedcdd_target = u32;
/// The updates `Δ_i` (default); result `G + λ·m̄⊙D̂`.
pub const FEDCDD_TARGET_DELTA: fedcdd_target = 0;
/// The client weights `θ_i = G + Δ_i`; result `G + λ·(m̄⊙D̂ − G)`.
pub const FEDCDD_TARGET_WEIGHTS: fedcdd_target = 1;

/// FedCDD's direction weights from the agreements `v_i` (spec switch `weighting`).
pub type fedcdd_weighting = u32;
/// `w_i ∝ p_i·max(v_i, 0)` (default).
pub const FEDCDD_WEIGHTING_P_RELU: fedcdd_weighting = 0;
/// `w_i ∝ max(v_i, 0)`.
pub const FEDCDD_WEIGHTING_RELU: fedcdd_weighting = 1;
/// `w_i ∝ p_i·exp(v_i/τ)`, τ = `fedcdd_config.softmax_temperature`.
pub const FEDCDD_WEIGHTING_SOFTMAX: fedcdd_weighting = 2;
/// `w_i = p_i` (alignment off).
pub const FEDCDD_WEIGHTING_SAMPLES: fedcdd_weighting = 3;
/// `w_i = 1/N`.
pub const FEDCDD_WEIGHTING_UNIFORM: fedcdd_weighting = 4;

/// Which reading of the FedOpt rules.
pub type fedcdd_fedopt_variant = u32;
/// Reddi et al. 2021, as in the spec (default).
pub const FEDCDD_FEDOPT_REDDI: fedcdd_fedopt_variant = 0;
/// As OpenFedLLM's server code (uniform mean, `m²` in the second moment, ...).
pub const FEDCDD_FEDOPT_OPENFEDLLM: fedcdd_fedopt_variant = 1;

/// How the client-side mask ranks columns.
pub type fedcdd_importance = u32;
/// `‖X[:, j]‖₂` per column (default).
pub const FEDCDD_IMPORTANCE_COLUMN_L2: fedcdd_importance = 0;
/// `|x|` per element (the tensor as one row).
pub const FEDCDD_IMPORTANCE_ELEMENT_ABS: fedcdd_importance = 1;
/// `‖X[i, :]‖₂` per row (whole rows kept or masked).
pub const FEDCDD_IMPORTANCE_ROW_L2: fedcdd_importance = 2;

/// Pass to `fedcdd_aggregator_add_upload` as `num_samples` to use the sample count in the
/// upload's header.
pub const FEDCDD_SAMPLES_FROM_UPLOAD: f64 = -1.0;

/// Most dimensions a tensor may have.
pub const FEDCDD_MAX_DIMS: usize = 4;

/// An aggregator's configuration: the rule and every switch of the spec. Fill it with
/// `fedcdd_config_default`, then change what you need.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct fedcdd_config {
    /// `FEDCDD_ALG_*`.
    pub algorithm: fedcdd_algorithm,
    /// `FEDCDD_MODE_BATCH` (default) or `FEDCDD_MODE_STREAMING`.
    pub mode: fedcdd_mode,
    /// FedCDD: `FEDCDD_NORM_*`.
    pub norm_axis: fedcdd_norm_axis,
    /// FedCDD: `FEDCDD_TARGET_*`.
    pub target: fedcdd_target,
    /// FedCDD: `FEDCDD_WEIGHTING_*`.
    pub weighting: fedcdd_weighting,
    /// FedCDD with `FEDCDD_WEIGHTING_SOFTMAX`: the temperature τ (> 0; default 1).
    pub softmax_temperature: f32,
    /// FedCDD: re-normalise each aggregated direction group (nonzero = on, the default).
    pub renormalize: i32,
    /// λ / η, the server rate: 1 for FedCDD and the FedAvg family, 1e-3 for FedOpt.
    pub server_lr: f32,
    /// FedAvgM momentum β / FedYogi, FedAdam β1 (default 0.9).
    pub beta1: f32,
    /// FedYogi, FedAdam β2 (default 0.99).
    pub beta2: f32,
    /// FedAdagrad, FedYogi, FedAdam τ (default 1e-3; `v` starts at τ²).
    pub tau: f32,
    /// `FEDCDD_FEDOPT_*`.
    pub fedopt_variant: fedcdd_fedopt_variant,
}

/// One tensor a caller hands in: a global tensor, a client's update `Δ_i = θ_i − G`, or a
/// local adapter's tensor (for encoding).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct fedcdd_tensor {
    /// NUL-terminated UTF-8 name, e.g. PEFT's
    /// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Names ending in
    /// `lora_A.weight` / `lora_B.weight` mark the LoRA factors (norm axis `rank`, FFA-LoRA,
    /// FedSA-LoRA).
    pub name: *const c_char,
    /// `ndim` dimensions (1 to `FEDCDD_MAX_DIMS`, each ≥ 1).
    pub shape: *const usize,
    pub ndim: usize,
    /// `FEDCDD_DTYPE_F32`, `_F16` or `_BF16`.
    pub dtype: fedcdd_dtype,
    /// `len` elements of `dtype`, row-major, aligned for the element type.
    pub data: *const c_void,
    /// Number of elements: must equal the product of `shape`.
    pub len: usize,
}

/// A caller buffer that receives one tensor of the new global adapter.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct fedcdd_output {
    /// NUL-terminated name of a global tensor.
    pub name: *const c_char,
    /// Element type to write (`FEDCDD_DTYPE_F32`, `_F16`, `_BF16`).
    pub dtype: fedcdd_dtype,
    /// Room for `len` elements of `dtype`.
    pub data: *mut c_void,
    /// Must equal the tensor's number of elements.
    pub len: usize,
}

/// What a client puts in its upload, and how it masks it. Fill it with
/// `fedcdd_encode_options_default`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct fedcdd_encode_options {
    /// Federated round the update belongs to.
    pub round: u32,
    pub client_id: u32,
    /// The client's sample count `n_i` (its aggregation weight; 0 = unknown).
    pub num_samples: u64,
    /// Seed of the mask's noise. Use a fresh one per (round, client), e.g.
    /// `fedcdd_default_seed(round, client_id)` (the `fedcdd encode` CLI's default).
    pub seed: u64,
    /// ρ ∈ (0, 1]: share of columns kept exactly (1 = mask off; default 1).
    pub keep_ratio: f32,
    /// η ≥ 0: noise scale relative to the rms of the masked columns (default 0).
    pub noise_scale: f32,
    /// `FEDCDD_IMPORTANCE_*`.
    pub importance: fedcdd_importance,
    /// Element type of the uploaded values, or `FEDCDD_DTYPE_AS_INPUT` (default): each local
    /// tensor's own.
    pub upload_dtype: fedcdd_dtype,
    /// Which tensors are sent: all, except under FFA-LoRA (only `lora_B`) and FedSA-LoRA
    /// (only `lora_A`). Default `FEDCDD_ALG_FEDCDD`.
    pub algorithm: fedcdd_algorithm,
}

/// The header of a parsed upload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct fedcdd_upload_header {
    /// Upload format version.
    pub version: u32,
    pub round: u32,
    pub client_id: u32,
    /// 0 = unknown.
    pub num_samples: u64,
    pub num_tensors: usize,
    /// Size of the upload in bytes.
    pub byte_len: usize,
}

/// One tensor record of a parsed upload.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct fedcdd_record_info {
    /// NUL-terminated name, owned by the upload handle (valid until `fedcdd_upload_free`).
    pub name: *const c_char,
    pub ndim: usize,
    /// The first `ndim` entries are the shape; the rest are 0.
    pub shape: [usize; FEDCDD_MAX_DIMS],
    /// Number of elements (the `len` `fedcdd_upload_decode` needs).
    pub numel: usize,
    /// Element type the client sent.
    pub dtype: fedcdd_dtype,
    /// 1 if masked (kept columns + regenerated noise), 0 if dense.
    pub masked: i32,
    /// Columns (units) sent exactly, and the total: they are equal for a dense record.
    pub kept_columns: usize,
    pub columns: usize,
    /// σ of the regenerated noise (0 for a dense record).
    pub sigma: f32,
    /// Noise seed (0 for a dense record).
    pub seed: u64,
}

// ---------------------------------------------------------------------------------------------
// Checked conversions
// ---------------------------------------------------------------------------------------------

pub(crate) fn dtype_of(code: fedcdd_dtype) -> FfiResult<DType> {
    match code {
        FEDCDD_DTYPE_F32 => Ok(DType::F32),
        FEDCDD_DTYPE_F16 => Ok(DType::F16),
        FEDCDD_DTYPE_BF16 => Ok(DType::BF16),
        other => Err(invalid(format!(
            "unknown dtype {other} (expected FEDCDD_DTYPE_F32 = 0, _F16 = 1 or _BF16 = 2)"
        ))),
    }
}

pub(crate) fn dtype_code(d: DType) -> fedcdd_dtype {
    match d {
        DType::F32 => FEDCDD_DTYPE_F32,
        DType::F16 => FEDCDD_DTYPE_F16,
        DType::BF16 => FEDCDD_DTYPE_BF16,
    }
}

pub(crate) fn algorithm_of(code: fedcdd_algorithm) -> FfiResult<Algorithm> {
    Algorithm::ALL
        .get(code as usize)
        .copied()
        .ok_or_else(|| invalid(format!("unknown algorithm {code} (expected 0..=10)")))
}

pub(crate) fn algorithm_code(a: Algorithm) -> fedcdd_algorithm {
    Algorithm::ALL.iter().position(|x| *x == a).unwrap_or(0) as fedcdd_algorithm
}

pub(crate) fn importance_of(code: fedcdd_importance) -> FfiResult<Importance> {
    match code {
        FEDCDD_IMPORTANCE_COLUMN_L2 => Ok(Importance::ColumnL2),
        FEDCDD_IMPORTANCE_ELEMENT_ABS => Ok(Importance::ElementAbs),
        FEDCDD_IMPORTANCE_ROW_L2 => Ok(Importance::RowL2),
        other => Err(invalid(format!("unknown importance {other}"))),
    }
}

/// Batch or streaming.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Batch,
    Streaming,
}

/// A checked configuration.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    pub algorithm: Algorithm,
    pub mode: Mode,
    pub fedcdd: FedCddConfig,
    /// The FedAvg family's rule and hyper-parameters (`rule` from the algorithm).
    pub opt: ServerOptConfig,
}

/// The defaults of `algorithm` (the spec's; the CLI's).
pub(crate) fn default_config(algorithm: Algorithm) -> fedcdd_config {
    let opt = ServerOptConfig::defaults(
        algorithm
            .server_opt()
            .unwrap_or(fedcdd_core::ServerOpt::FedAvg),
    );
    let cdd = FedCddConfig::default();
    fedcdd_config {
        algorithm: algorithm_code(algorithm),
        mode: FEDCDD_MODE_BATCH,
        norm_axis: FEDCDD_NORM_COLUMN,
        target: FEDCDD_TARGET_DELTA,
        weighting: FEDCDD_WEIGHTING_P_RELU,
        softmax_temperature: 1.0,
        renormalize: 1,
        server_lr: if algorithm == Algorithm::FedCdd {
            cdd.server_lr
        } else {
            opt.server_lr
        },
        beta1: opt.beta1,
        beta2: opt.beta2,
        tau: opt.tau,
        fedopt_variant: FEDCDD_FEDOPT_REDDI,
    }
}

pub(crate) fn settings_of(c: &fedcdd_config) -> FfiResult<Settings> {
    let algorithm = algorithm_of(c.algorithm)?;
    match algorithm {
        Algorithm::Scaffold => {
            return Err(invalid(
                "SCAFFOLD's server step also needs the clients' control variates, which this \
                 aggregator does not take; it is part of the federated training loop",
            ));
        }
        Algorithm::FLora => {
            return Err(invalid(
                "FLoRA merges the stacked client adapters into the base model weights; it is \
                 part of the federated training loop, not of this aggregator",
            ));
        }
        _ => {}
    }
    let mode = match c.mode {
        FEDCDD_MODE_BATCH => Mode::Batch,
        FEDCDD_MODE_STREAMING => Mode::Streaming,
        other => return Err(invalid(format!("unknown mode {other}"))),
    };
    let norm_axis = match c.norm_axis {
        FEDCDD_NORM_COLUMN => NormAxis::Column,
        FEDCDD_NORM_ROW => NormAxis::Row,
        FEDCDD_NORM_RANK => NormAxis::Rank,
        other => return Err(invalid(format!("unknown norm_axis {other}"))),
    };
    let target = match c.target {
        FEDCDD_TARGET_DELTA => Target::Delta,
        FEDCDD_TARGET_WEIGHTS => Target::Weights,
        other => return Err(invalid(format!("unknown target {other}"))),
    };
    let weighting = match c.weighting {
        FEDCDD_WEIGHTING_P_RELU => Weighting::PRelu,
        FEDCDD_WEIGHTING_RELU => Weighting::Relu,
        FEDCDD_WEIGHTING_SOFTMAX => Weighting::Softmax {
            tau: c.softmax_temperature,
        },
        FEDCDD_WEIGHTING_SAMPLES => Weighting::Samples,
        FEDCDD_WEIGHTING_UNIFORM => Weighting::Uniform,
        other => return Err(invalid(format!("unknown weighting {other}"))),
    };
    let variant = match c.fedopt_variant {
        FEDCDD_FEDOPT_REDDI => FedOptVariant::Reddi,
        FEDCDD_FEDOPT_OPENFEDLLM => FedOptVariant::OpenFedLlm,
        other => return Err(invalid(format!("unknown fedopt_variant {other}"))),
    };
    let fedcdd = FedCddConfig {
        norm_axis,
        target,
        weighting,
        renormalize: c.renormalize != 0,
        server_lr: c.server_lr,
        components: fedcdd_core::Components::Both,
    };
    let opt = ServerOptConfig {
        rule: algorithm
            .server_opt()
            .unwrap_or(fedcdd_core::ServerOpt::FedAvg),
        server_lr: c.server_lr,
        beta1: c.beta1,
        beta2: c.beta2,
        tau: c.tau,
        variant,
    };
    let check = if algorithm == Algorithm::FedCdd {
        fedcdd.validate()
    } else {
        opt.validate()
    };
    check.map_err(|e| invalid(format!("config: {}", e.kind)))?;
    Ok(Settings {
        algorithm,
        mode,
        fedcdd,
        opt,
    })
}

// ---------------------------------------------------------------------------------------------
// Pointers
// ---------------------------------------------------------------------------------------------

/// `&*ptr`, or an error naming `what` when it is NULL.
///
/// # Safety
/// `ptr` is NULL or valid for reads of a `T` for `'a`.
pub(crate) unsafe fn deref<'a, T>(ptr: *const T, what: &str) -> FfiResult<&'a T> {
    // SAFETY: non-null is checked; validity is the caller's contract.
    unsafe { ptr.as_ref() }.ok_or_else(|| null(what))
}

/// `&mut *ptr`, or an error naming `what` when it is NULL.
///
/// # Safety
/// `ptr` is NULL or valid for reads and writes of a `T` for `'a`, and not aliased.
pub(crate) unsafe fn deref_mut<'a, T>(ptr: *mut T, what: &str) -> FfiResult<&'a mut T> {
    // SAFETY: as `deref`.
    unsafe { ptr.as_mut() }.ok_or_else(|| null(what))
}

fn check_ptr<T>(ptr: *const T, len: usize, what: &str) -> FfiResult<()> {
    if ptr.is_null() {
        return Err(null(what));
    }
    if !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(invalid(format!(
            "{what} is not aligned for its element type ({} bytes)",
            std::mem::align_of::<T>()
        )));
    }
    if len
        .checked_mul(std::mem::size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(invalid(format!("{what}: length {len} is too large")));
    }
    Ok(())
}

/// Checks a caller's output buffer of `len` elements of `dtype` (NULL, alignment, size)
/// without touching it, so a bad buffer is found before any work is done.
pub(crate) fn check_buffer(
    data: *mut c_void,
    len: usize,
    dtype: DType,
    what: &str,
) -> FfiResult<()> {
    match dtype {
        DType::F32 => check_ptr(data.cast::<f32>().cast_const(), len, what),
        DType::F16 | DType::BF16 => check_ptr(data.cast::<u16>().cast_const(), len, what),
    }
}

/// A slice from a caller pointer and element count; NULL, misaligned or oversized is an
/// error naming `what`.
///
/// # Safety
/// A non-null `ptr` must be valid for reads of `len` elements for `'a`.
pub(crate) unsafe fn slice<'a, T>(ptr: *const T, len: usize, what: &str) -> FfiResult<&'a [T]> {
    check_ptr(ptr, len, what)?;
    // SAFETY: non-null, aligned, size in range; validity is the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// As [`slice`], mutable.
///
/// # Safety
/// A non-null `ptr` must be valid for reads and writes of `len` elements for `'a`, unaliased.
pub(crate) unsafe fn slice_mut<'a, T>(
    ptr: *mut T,
    len: usize,
    what: &str,
) -> FfiResult<&'a mut [T]> {
    check_ptr(ptr, len, what)?;
    // SAFETY: as `slice`.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// A NUL-terminated UTF-8 string.
///
/// # Safety
/// A non-null `ptr` must point to a NUL-terminated string valid for `'a`.
pub(crate) unsafe fn c_str<'a>(ptr: *const c_char, what: &str) -> FfiResult<&'a str> {
    if ptr.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null; NUL termination is the caller's contract.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str()
        .map_err(|_| invalid(format!("{what} is not valid UTF-8")))
}

/// The values of a caller tensor as a typed view.
pub(crate) enum Values<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl<'a> Values<'a> {
    /// # Safety
    /// A non-null `data` must be valid for reads of `len` elements of `dtype`.
    pub unsafe fn from_raw(
        data: *const c_void,
        len: usize,
        dtype: DType,
        what: &str,
    ) -> FfiResult<Values<'a>> {
        // SAFETY (all arms): f16 and bf16 are `repr(transparent)` over u16, so a u16 buffer
        // is a valid [f16]/[bf16]; `slice` checks null, alignment and size.
        Ok(match dtype {
            DType::F32 => Values::F32(unsafe { slice(data.cast::<f32>(), len, what) }?),
            DType::F16 => Values::F16(unsafe { slice(data.cast::<f16>(), len, what) }?),
            DType::BF16 => Values::BF16(unsafe { slice(data.cast::<bf16>(), len, what) }?),
        })
    }

    pub fn view(&self) -> fedcdd_core::TensorView<'a> {
        match *self {
            Values::F32(s) => s.into(),
            Values::F16(s) => s.into(),
            Values::BF16(s) => s.into(),
        }
    }
}

/// Writes f32 `values` into a caller buffer of `dtype` (round to nearest even).
///
/// # Safety
/// A non-null `data` must be valid for writes of `len` elements of `dtype`.
pub(crate) unsafe fn write_values(
    values: &[f32],
    dtype: DType,
    data: *mut c_void,
    len: usize,
    what: &str,
) -> FfiResult<()> {
    if len != values.len() {
        return Err(FfiError::new(
            FEDCDD_ERR_SHAPE,
            format!(
                "{what}: buffer holds {len} elements, the tensor has {}",
                values.len()
            ),
        ));
    }
    // SAFETY (all arms): see `Values::from_raw`; `slice_mut` checks the pointer.
    match dtype {
        DType::F32 => unsafe { slice_mut(data.cast::<f32>(), len, what) }?.copy_from_slice(values),
        DType::F16 => {
            let out = unsafe { slice_mut(data.cast::<f16>(), len, what) }?;
            for (o, v) in out.iter_mut().zip(values) {
                *o = f16::from_f32(*v);
            }
        }
        DType::BF16 => {
            let out = unsafe { slice_mut(data.cast::<bf16>(), len, what) }?;
            for (o, v) in out.iter_mut().zip(values) {
                *o = bf16::from_f32(*v);
            }
        }
    }
    Ok(())
}

/// A caller's tensor, checked: name, shape and values.
pub(crate) struct TensorIn<'a> {
    pub name: &'a str,
    pub dims: Vec<usize>,
    pub dtype: DType,
    pub values: Values<'a>,
}

impl<'a> TensorIn<'a> {
    /// Checks everything but the values' finiteness. `what` names the tensor in errors
    /// (e.g. `tensors[2]`) until its name is known.
    ///
    /// # Safety
    /// The pointers inside `t` must be NULL or valid as `fedcdd_tensor` documents.
    pub unsafe fn from_c(t: &fedcdd_tensor, what: &str) -> FfiResult<TensorIn<'a>> {
        // SAFETY: the caller's contract.
        let name = unsafe { c_str(t.name, &format!("{what}.name")) }?;
        if name.is_empty() {
            return Err(invalid(format!("{what}: the name is empty")));
        }
        let at = |e: FfiError| e.context(format!("tensor \"{name}\""));
        if t.ndim == 0 || t.ndim > FEDCDD_MAX_DIMS {
            return Err(at(FfiError::new(
                FEDCDD_ERR_SHAPE,
                format!("ndim is {}, must be 1 to {FEDCDD_MAX_DIMS}", t.ndim),
            )));
        }
        // SAFETY: the caller's contract.
        let dims = unsafe { slice(t.shape, t.ndim, "shape") }.map_err(at)?;
        let mut numel: usize = 1;
        for &d in dims {
            numel = numel.checked_mul(d).unwrap_or(0);
        }
        if numel == 0 {
            return Err(at(FfiError::new(
                FEDCDD_ERR_SHAPE,
                format!("bad shape {dims:?} (a zero or overflowing dimension)"),
            )));
        }
        if numel != t.len {
            return Err(at(FfiError::new(
                FEDCDD_ERR_SHAPE,
                format!("len is {}, the shape {dims:?} has {numel} elements", t.len),
            )));
        }
        let dtype = dtype_of(t.dtype).map_err(at)?;
        // SAFETY: the caller's contract.
        let values = unsafe { Values::from_raw(t.data, t.len, dtype, "data") }.map_err(at)?;
        Ok(TensorIn {
            name,
            dims: dims.to_vec(),
            dtype,
            values,
        })
    }

    /// The index of the first NaN or infinite value.
    pub fn first_non_finite(&self) -> Option<usize> {
        match self.values {
            Values::F32(s) => s.iter().position(|v| !v.is_finite()),
            Values::F16(s) => s.iter().position(|v| !v.is_finite()),
            Values::BF16(s) => s.iter().position(|v| !v.is_finite()),
        }
    }

    /// The values in f32 (exact for every dtype).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.values {
            Values::F32(s) => s.to_vec(),
            Values::F16(s) => s.iter().map(|v| v.to_f32()).collect(),
            Values::BF16(s) => s.iter().map(|v| v.to_f32()).collect(),
        }
    }
}

/// Reads `n` caller tensors.
///
/// # Safety
/// `tensors` is NULL or valid for `n` `fedcdd_tensor`s whose pointers are valid.
pub(crate) unsafe fn tensors_in<'a>(
    tensors: *const fedcdd_tensor,
    n: usize,
    what: &str,
) -> FfiResult<Vec<TensorIn<'a>>> {
    // SAFETY: the caller's contract.
    let raw = unsafe { slice(tensors, n, what) }?;
    raw.iter()
        .enumerate()
        // SAFETY: the caller's contract.
        .map(|(i, t)| unsafe { TensorIn::from_c(t, &format!("{what}[{i}]")) })
        .collect()
}
