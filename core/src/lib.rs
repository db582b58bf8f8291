//! # fedcdd-core
//!
//! The federated math of FedCDD and its baselines, the client-side Gaussian-noise mask and
//! the wire format of a client upload. `#![no_std]`, no allocator needed: every function takes
//! caller-provided buffers, documents its memory bound and returns `Result` on bad input.
//! The normative description is the project's `fedcdd-spec.md`.
//!
//! ## Memory bounds
//!
//! | API | memory besides its inputs and outputs |
//! |---|---|
//! | [`StreamingFedCdd`] | the caller's workspace, [`StreamingFedCdd::workspace_len`] floats (≤ 5·P + 3·G for a tensor of P elements and G norm groups; +P for a one-part `Components` ablation), whatever the number of clients |
//! | `fedcdd_batch` (feature `alloc`) | O(N·P) on the heap |
//! | [`MeanAccumulator`] | the caller's 2·P floats |
//! | [`apply_server_opt`], [`init_server_state`], SCAFFOLD and FedProx helpers | none (the caller's state slices) |
//! | [`clip_scale`], [`median_in_place`] | none |
//! | [`coordinate_median`], [`trimmed_mean`] | the caller's N views (every client at once) and N floats of scratch |
//! | [`mask_encode`] | the caller's scratch of 2·C words (C columns) |
//! | `UploadPlan` (feature `alloc`) | each tensor's kept columns and mask scratch, and the output bytes |
//! | [`mask_reconstruct`], [`TensorRecord::reconstruct`] | O(1) |
//! | [`Upload::parse`], [`Upload::records`], [`UploadWriter`] | O(1): no allocation, a stack buffer of about 1.2 KB for a record head |
//!
//! Every fallible function returns [`Error`], which names the client and the tensor (by
//! index) where one is at fault; no function panics on bad input.
#![no_std]
#![forbid(unsafe_code)]
// `!(x > 0.0)` is deliberate throughout: unlike `x <= 0.0` it is also true for NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

#[cfg(feature = "alloc")]
pub mod encode;
pub mod error;
pub mod fedcdd;
pub mod fedopt;
pub mod mask;
pub mod robust;
pub mod sweep;
pub mod tensor;
pub mod wire;

#[cfg(feature = "alloc")]
pub use encode::{DeltaTensor, PlannedTensor, UploadPlan};
pub use error::{Error, ErrorKind};
#[cfg(feature = "alloc")]
pub use fedcdd::{BatchReport, ClientInput, fedcdd_batch};
pub use fedcdd::{
    ClientAgreement, Components, EPS, FedCddConfig, FedCddSummary, NormAxis, StreamingFedCdd,
    Target, Weighting,
};
pub use fedopt::{
    Algorithm, ClientView, FedOptVariant, GROUP, MeanAccumulator, ServerOpt, ServerOptConfig,
    ServerState, apply_server_opt, fedprox_gradient, init_server_state, scaffold_client_control,
    scaffold_correct_gradient, scaffold_server_update,
};
pub use half::{bf16, f16};
pub use mask::{
    Importance, MaskAxis, MaskConfig, MaskScratch, MaskedSummary, mask_encode, mask_reconstruct,
};
pub use robust::{clip_scale, coordinate_median, median_in_place, trimmed_mean};
pub use sweep::Groups;
pub use tensor::{DType, Element, Layout, MAX_DIMS, TensorRole, TensorView};
pub use wire::{Payload, TensorRecord, Upload, UploadHeader, UploadWriter};
