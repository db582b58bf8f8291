//! # libfedcdd: the C ABI of fedcdd
//!
//! FedCDD's server aggregation (batch and two-pass streaming), the FedAvg/FedOpt baselines
//! with their server state, and the client-side Gaussian-noise mask and upload format, for
//! C, C++ and Python (ctypes) federated systems; and a deployment's federated client and
//! server (`fedcdd_client_*`, `fedcdd_server_*`: fedcdd-host's runner split in two). Every
//! function is a thin, checked wrapper around `fedcdd-core` or `fedcdd-host`; none
//! re-implements their math.
//!
//! The header `include/fedcdd.h` is generated from this crate by cbindgen (see
//! `cbindgen.toml`) and committed; `tests/header.rs` fails when it is stale, and
//! `FEDCDD_BLESS=1 cargo test -p fedcdd-ffi --test header` rewrites it.
//!
//! Conventions, for every function: a `fedcdd_status` return (0 = `FEDCDD_OK`); on failure
//! `fedcdd_last_error()` explains (naming the client and the tensor where one is at fault);
//! NULL pointers, wrong lengths, NaN values and hostile bytes are errors, never crashes; no
//! Rust panic unwinds into the caller (each entry point catches them: `FEDCDD_ERR_INTERNAL`).
#![allow(non_camel_case_types)]
// Safety contracts are stated once, in the header's preamble (cbindgen.toml): every pointer
// is NULL or valid for the length passed with it.
#![allow(clippy::missing_safety_doc)]

mod aggregator;
mod arena;
mod error;
mod federation;
mod federation_api;
mod state;
mod status;
mod types;
mod upload;

use std::ffi::{c_char, c_void};

pub use aggregator::fedcdd_aggregator;
pub use federation::{
    fedcdd_bytes, fedcdd_client, fedcdd_client_result, fedcdd_server, fedcdd_tensor_view,
    fedcdd_tensors,
};
pub use federation_api::*;
pub use types::*;
pub use upload::fedcdd_upload;

use error::{FfiError, guard};

// ---------------------------------------------------------------------------------------------
// Version and errors
// ---------------------------------------------------------------------------------------------

const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

const fn parse_u32(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut i = 0;
    let mut v = 0u32;
    while i < b.len() {
        v = v * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    v
}

/// The library version as text, e.g. `"0.1.0"` (static storage; never NULL).
#[unsafe(no_mangle)]
pub extern "C" fn fedcdd_version() -> *const c_char {
    VERSION.as_ptr().cast()
}

/// The library version as one number: `major * 1000000 + minor * 1000 + patch`.
#[unsafe(no_mangle)]
pub extern "C" fn fedcdd_version_number() -> u32 {
    const N: u32 = parse_u32(env!("CARGO_PKG_VERSION_MAJOR")) * 1_000_000
        + parse_u32(env!("CARGO_PKG_VERSION_MINOR")) * 1_000
        + parse_u32(env!("CARGO_PKG_VERSION_PATCH"));
    N
}

/// The message of the last failed call on this thread ("" after a successful one). The
/// pointer stays valid until the next `fedcdd_*` call on this thread; copy the text to keep it.
#[unsafe(no_mangle)]
pub extern "C" fn fedcdd_last_error() -> *const c_char {
    error::last_error_ptr()
}

/// Copies the last error message of this thread into `buf` (`capacity` bytes, always
/// NUL-terminated when `capacity > 0`, cut to fit). Returns the message's full length in
/// bytes without the NUL, as `snprintf` does, so a return value `>= capacity` means it was
/// cut. `buf` may be NULL when `capacity` is 0.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_last_error_copy(buf: *mut c_char, capacity: usize) -> usize {
    // SAFETY: the caller's contract (`buf` valid for `capacity` bytes).
    match unsafe { slice_mut(buf.cast::<u8>(), capacity, "buf") } {
        Ok(b) => error::last_error_copy(b),
        Err(_) => error::last_error_copy(&mut []),
    }
}

/// The name of a status code (`"FEDCDD_ERR_SHAPE"`, ...; static storage; never NULL).
#[unsafe(no_mangle)]
pub extern "C" fn fedcdd_status_name(status: fedcdd_status) -> *const c_char {
    let s: &'static str = match status {
        FEDCDD_OK => "FEDCDD_OK\0",
        FEDCDD_ERR_NULL_POINTER => "FEDCDD_ERR_NULL_POINTER\0",
        FEDCDD_ERR_INVALID_ARGUMENT => "FEDCDD_ERR_INVALID_ARGUMENT\0",
        FEDCDD_ERR_SHAPE => "FEDCDD_ERR_SHAPE\0",
        FEDCDD_ERR_NON_FINITE => "FEDCDD_ERR_NON_FINITE\0",
        FEDCDD_ERR_BAD_WEIGHT => "FEDCDD_ERR_BAD_WEIGHT\0",
        FEDCDD_ERR_NO_CLIENTS => "FEDCDD_ERR_NO_CLIENTS\0",
        FEDCDD_ERR_TENSOR_NAME => "FEDCDD_ERR_TENSOR_NAME\0",
        FEDCDD_ERR_BAD_ENCODING => "FEDCDD_ERR_BAD_ENCODING\0",
        FEDCDD_ERR_BUFFER_TOO_SMALL => "FEDCDD_ERR_BUFFER_TOO_SMALL\0",
        FEDCDD_ERR_CALL_ORDER => "FEDCDD_ERR_CALL_ORDER\0",
        FEDCDD_ERR_IO => "FEDCDD_ERR_IO\0",
        FEDCDD_ERR_RUN => "FEDCDD_ERR_RUN\0",
        FEDCDD_ERR_INTERNAL => "FEDCDD_ERR_INTERNAL\0",
        _ => "unknown status\0",
    };
    s.as_ptr().cast()
}

/// The CLI/config name of an algorithm (`"fedavg"`, `"fedcdd"`, `"ffa-lora"`, ...), or NULL
/// for an unknown code. Static storage.
#[unsafe(no_mangle)]
pub extern "C" fn fedcdd_algorithm_name(algorithm: fedcdd_algorithm) -> *const c_char {
    const NAMES: [&str; 11] = [
        "fedavg\0",
        "fedprox\0",
        "scaffold\0",
        "fedavgm\0",
        "fedadagrad\0",
        "fedyogi\0",
        "fedadam\0",
        "ffa-lora\0",
        "fedsa-lora\0",
        "flora\0",
        "fedcdd\0",
    ];
    NAMES
        .get(algorithm as usize)
        .map_or(std::ptr::null(), |s| s.as_ptr().cast())
}

/// The algorithm code of a name as `fedcdd_algorithm_name` spells it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_algorithm_from_name(
    name: *const c_char,
    out: *mut fedcdd_algorithm,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let name = unsafe { c_str(name, "name") }?;
        let out = unsafe { deref_mut(out, "out") }?;
        *out = upload::algorithm_by_name(name)?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Aggregator
// ---------------------------------------------------------------------------------------------

/// Fills `*out` with the defaults of `algorithm`: batch mode; FedCDD's norm axis `column`,
/// target `delta`, weighting `p_relu` (softmax temperature 1), renormalize on; server rate
/// 1 for FedCDD and the FedAvg family and 1e-3 for FedOpt; β1 = 0.9, β2 = 0.99, τ = 1e-3;
/// variant Reddi.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_config_default(
    algorithm: fedcdd_algorithm,
    out: *mut fedcdd_config,
) -> fedcdd_status {
    guard(|| {
        let alg = algorithm_of(algorithm)?;
        // SAFETY: the caller's contract.
        let out = unsafe { deref_mut(out, "out") }?;
        *out = default_config(alg);
        Ok(())
    })
}

/// Creates an aggregator from `config` (checked: unknown codes and out-of-range values are
/// errors; SCAFFOLD and FLoRA are not available here). On success `*out` owns a new handle
/// (free it with `fedcdd_aggregator_free`); on failure `*out` is set to NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_aggregator_new(
    config: *const fedcdd_config,
    out: *mut *mut fedcdd_aggregator,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { deref_mut(out, "out") }?;
        *out = std::ptr::null_mut();
        let config = unsafe { deref(config, "config") }?;
        let settings = settings_of(config)?;
        *out = Box::into_raw(Box::new(fedcdd_aggregator::new(settings)));
        Ok(())
    })
}

/// Frees an aggregator (NULL is allowed and ignored). Leaves the last error as it was.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_aggregator_free(aggregator: *mut fedcdd_aggregator) {
    error::guard_quiet(|| {
        if !aggregator.is_null() {
            // SAFETY: the handle came from `fedcdd_aggregator_new` and is freed once.
            drop(unsafe { Box::from_raw(aggregator) });
        }
    });
}

/// Runs `f` on the aggregator behind `ptr`.
unsafe fn with_aggregator(
    ptr: *mut fedcdd_aggregator,
    f: impl FnOnce(&mut fedcdd_aggregator) -> Result<(), FfiError>,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract (a live handle, used by one thread at a time).
        let agg = unsafe { deref_mut(ptr, "aggregator") }?;
        agg.enter(f)
    })
}

/// Read-only access to the aggregator behind `ptr`.
unsafe fn with_aggregator_ref(
    ptr: *const fedcdd_aggregator,
    f: impl FnOnce(&fedcdd_aggregator) -> Result<(), FfiError>,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let agg = unsafe { deref(ptr, "aggregator") }?;
        agg.check_usable()?;
        f(agg)
    })
}

/// Writes `get(aggregator)` into `*out` (the body of the read-only getters).
unsafe fn read_aggregator<T>(
    ptr: *const fedcdd_aggregator,
    out: *mut T,
    get: impl FnOnce(&fedcdd_aggregator) -> T,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe {
        with_aggregator_ref(ptr, |agg| {
            *deref_mut(out, "out")? = get(agg);
            Ok(())
        })
    }
}

/// Sets the global adapter: `n` tensors (names unique; values finite). Replaces any earlier
/// global; server state is kept for tensors of the same name and size. Not allowed while a
/// round is in progress. The values are copied.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_aggregator_set_global(
    aggregator: *mut fedcdd_aggregator,
    tensors: *const fedcdd_tensor,
    n: usize,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe {
        with_aggregator(aggregator, |agg| {
            let tensors = tensors_in(tensors, n, "tensors")?;
            agg.set_global(tensors)
        })
    }
}

/// Copies the current global tensor `name` into `out` (`len` elements of `dtype`). After
/// `fedcdd_aggregator_finalize` this is the new global.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_aggregator_get_global(
    aggregator: *const fedcdd_aggregator,
    name: *const c_char,
    dtype: fedcdd_dtype,
    out: *mut c_void,
    len: usize,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe {
        with_aggregator_ref(aggregator, |agg| {
            let name = c_str(name, "name")?;
            let dtype = dtype_of(dtype)?;
            let g = agg.global(name)?;
            write_values(&g.data, dtype, out, len, &format!("tensor \"{name}\""))
        })
    }
}

/// How many times each client must be added per round: 2 for FedCDD in
/// `FEDCDD_MODE_STREAMING` (pass 1, `fedcdd_aggregator_begin_pass2`, pass 2), else 1. A
/// one-pass streaming aggregator also accepts a pass 2; it then only checks that the same
/// clients come again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_aggregator_passes(
    aggregator: *const fedcdd_aggregator,
    out: *mut usize,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe { read_aggregator(aggregator, out, |agg| agg.passes()) }
}

/// Adds one client's update to the round: `n` tensors holding `Δ_i = θ_i − G` (every tensor
/// the rule aggregates must be there; other global tensors are ignored), with its sample
/// count `num_samples` (finite, >= 0; the weights are `n_i / Σ n_j`). `client_id` names the
/// client in errors and matches it between the passes of a streaming round; it must be unique
/// within a round. The values are read during the call only (batch mode copies them).
///
/// A rejected client (unknown/missing tensor, wrong shape, NaN, bad count) leaves the round
/// as it was: carry on without it (in streaming mode leave it out of pass 2 as well).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_aggregator_add_client(
    aggregator: *mut fedcdd_aggregator,
    client_id: u32,
    num_samples: f64,
    tensors: *const fedcdd_tensor,
    n: usize,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe {
        with_aggregator(aggregator, |agg| {
            let tensors = tensors_in(tensors, n, "tensors")
                .map_err(|e| e.context(format!("client {client_id}")))?;
            agg.add_client(client_id, num_samples, tensors)
        })
    }
}

/// Adds one client's encoded upload (`len` bytes, as `fedcdd_encode_upload` or the
/// `fedcdd encode` CLI writes it): validated in full, masked tensors reconstructed from their
/// seeds, then added as `fedcdd_aggregator_add_client` would. The client id is the upload's;
/// `num_samples` overrides its sample count, or pass a negative value
/// (`FEDCDD_SAMPLES_FROM_UPLOAD`) to use the header's. Hostile bytes are an error.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_aggregator_add_upload(
    aggregator: *mut fedcdd_aggregator,
    bytes: *const u8,
    len: usize,
    num_samples: f64,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe {
        with_aggregator(aggregator, |agg| {
            let bytes = slice(bytes, len, "bytes")?;
            agg.add_upload(bytes, num_samples)
        })
    }
}

/// Streaming mode: ends pass 1 and begins pass 2, in which every client of pass 1 is added
/// again, unchanged (any order). Needed by streaming FedCDD (`fedcdd_aggregator_passes`
/// says 2); an error in batch mode.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_aggregator_begin_pass2(
    aggregator: *mut fedcdd_aggregator,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe { with_aggregator(aggregator, |agg| agg.begin_pass2()) }
}

/// The number of clients accepted in this round so far (pass 1).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_aggregator_num_clients(
    aggregator: *const fedcdd_aggregator,
    out: *mut usize,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe { read_aggregator(aggregator, out, |agg| agg.num_clients()) }
}

/// Ends the round: aggregates every tensor, makes the result the new global (rounded to each
/// global tensor's dtype), updates the server state, and writes the tensors named in
/// `outputs` (`n` of them, any subset of the global, each `len` = its element count) into the
/// caller's buffers. Non-aggregated tensors (FFA-LoRA's A, FedSA-LoRA's B) keep their value.
///
/// The outputs are checked before anything is computed. If the aggregation itself fails the
/// round is discarded and the global and the state stay as they were; a missing pass 2 is a
/// `FEDCDD_ERR_CALL_ORDER` that leaves the round open.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_aggregator_finalize(
    aggregator: *mut fedcdd_aggregator,
    outputs: *const fedcdd_output,
    n: usize,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe {
        with_aggregator(aggregator, |agg| {
            let outputs = if n == 0 {
                &[][..]
            } else {
                slice(outputs, n, "outputs")?
            };
            let mut resolved = Vec::with_capacity(n);
            for (i, o) in outputs.iter().enumerate() {
                let what = format!("outputs[{i}]");
                let name = c_str(o.name, &format!("{what}.name"))?;
                let at = format!("{what} (tensor \"{name}\")");
                let g = agg.global(name).map_err(|e| e.context(&what))?;
                let dtype = dtype_of(o.dtype).map_err(|e| e.context(&at))?;
                if o.len != g.layout.len() {
                    return Err(FfiError::new(
                        FEDCDD_ERR_SHAPE,
                        format!(
                            "{at}: len is {}, the tensor has {} elements",
                            o.len,
                            g.layout.len()
                        ),
                    ));
                }
                check_buffer(o.data, o.len, dtype, &format!("{at}.data"))?;
                resolved.push((name, dtype, o.data, o.len, at));
            }
            agg.finalize()?;
            for (name, dtype, data, len, at) in resolved {
                let g = agg.global(name)?;
                write_values(&g.data, dtype, data, len, &at)?;
            }
            Ok(())
        })
    }
}

/// Drops the round in progress (its clients), keeping the global and the server state.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_aggregator_reset_round(
    aggregator: *mut fedcdd_aggregator,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe {
        with_aggregator(aggregator, |agg| {
            agg.reset_round();
            Ok(())
        })
    }
}

/// The number of server steps taken: finalised rounds, counting those of a loaded state.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_aggregator_steps(
    aggregator: *const fedcdd_aggregator,
    out: *mut u64,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe { read_aggregator(aggregator, out, |agg| agg.steps) }
}

/// The size in bytes of the server state `fedcdd_aggregator_save_state` writes now.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_aggregator_state_size(
    aggregator: *const fedcdd_aggregator,
    out: *mut usize,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe { read_aggregator(aggregator, out, |agg| state::save(agg).len()) }
}

/// Saves the server state (the algorithm, the step count, the FedOpt moments `m`, `v` per
/// tensor) into `out` (`capacity` bytes); `*written` receives its size. A too small buffer
/// gives `FEDCDD_ERR_BUFFER_TOO_SMALL` with `*written` set to the size needed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_aggregator_save_state(
    aggregator: *const fedcdd_aggregator,
    out: *mut u8,
    capacity: usize,
    written: *mut usize,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe {
        with_aggregator_ref(aggregator, |agg| {
            let written = deref_mut(written, "written")?;
            let bytes = state::save(agg);
            *written = bytes.len();
            let out = slice_mut(out, capacity, "out")?;
            if capacity < bytes.len() {
                return Err(FfiError::new(
                    FEDCDD_ERR_BUFFER_TOO_SMALL,
                    format!(
                        "the state needs {} bytes, the buffer has {capacity}",
                        bytes.len()
                    ),
                ));
            }
            out[..bytes.len()].copy_from_slice(&bytes);
            Ok(())
        })
    }
}

/// Loads a server state saved by `fedcdd_aggregator_save_state` (from an aggregator of the
/// same algorithm and FedOpt variant). The global tensors must be set first; every saved
/// tensor must be one of them with the same size. Checked in full before anything changes;
/// corrupt bytes are `FEDCDD_ERR_BAD_ENCODING`. Not allowed while a round is in progress.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_aggregator_load_state(
    aggregator: *mut fedcdd_aggregator,
    bytes: *const u8,
    len: usize,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe {
        with_aggregator(aggregator, |agg| {
            let bytes = slice(bytes, len, "bytes")?;
            state::load(agg, bytes)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Client side: mask and encode
// ---------------------------------------------------------------------------------------------

/// Fills `*out` with the encode defaults: mask off (keep ratio 1, noise 0, column L2),
/// each tensor sent in its own dtype, algorithm FedCDD (every tensor sent), round, client
/// and sample count 0, seed `fedcdd_default_seed(0, 0)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_encode_options_default(
    out: *mut fedcdd_encode_options,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        *unsafe { deref_mut(out, "out") }? = upload::default_encode_options();
        Ok(())
    })
}

/// The noise seed the `fedcdd encode` CLI uses by default for a (round, client) pair.
#[unsafe(no_mangle)]
pub extern "C" fn fedcdd_default_seed(round: u32, client_id: u32) -> u64 {
    upload::default_seed(round, client_id)
}

/// Shared part of the two encode entry points.
unsafe fn encode_impl(
    options: *const fedcdd_encode_options,
    global: *const fedcdd_tensor,
    n_global: usize,
    local: *const fedcdd_tensor,
    n_local: usize,
    out: Option<&mut [u8]>,
) -> Result<usize, FfiError> {
    // SAFETY: the caller's contract.
    let opts = unsafe { deref(options, "options") }?;
    let global = unsafe { tensors_in(global, n_global, "global") }?;
    let local = unsafe { tensors_in(local, n_local, "local") }?;
    upload::encode(opts, &global, &local, out)
}

/// How many bytes `fedcdd_encode_upload` needs for these arguments (it runs the mask to
/// find out; the arguments are the same).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_encode_upload_size(
    options: *const fedcdd_encode_options,
    global: *const fedcdd_tensor,
    n_global: usize,
    local: *const fedcdd_tensor,
    n_local: usize,
    out_size: *mut usize,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out_size = unsafe { deref_mut(out_size, "out_size") }?;
        *out_size = unsafe { encode_impl(options, global, n_global, local, n_local, None) }?;
        Ok(())
    })
}

/// Client side: computes the update `Δ = local − global` of every tensor the algorithm
/// sends, masks it (keep the `ceil(keep_ratio·C)` most important columns exactly; the rest
/// become seeded Gaussian noise that the server regenerates) and writes the upload into `out`
/// (`capacity` bytes). `*written` receives the upload's size; a too small buffer gives
/// `FEDCDD_ERR_BUFFER_TOO_SMALL` with `*written` set to the size needed. `local` tensors are
/// matched to `global` tensors by name and must have their shapes.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn fedcdd_encode_upload(
    options: *const fedcdd_encode_options,
    global: *const fedcdd_tensor,
    n_global: usize,
    local: *const fedcdd_tensor,
    n_local: usize,
    out: *mut u8,
    capacity: usize,
    written: *mut usize,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let written = unsafe { deref_mut(written, "written") }?;
        *written = 0;
        let buf = unsafe { slice_mut(out, capacity, "out") }?;
        match unsafe { encode_impl(options, global, n_global, local, n_local, Some(buf)) } {
            Ok(len) => {
                *written = len;
                Ok(())
            }
            Err(e) if e.status == FEDCDD_ERR_BUFFER_TOO_SMALL => {
                // Report the size needed.
                *written = unsafe { encode_impl(options, global, n_global, local, n_local, None) }?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Decoding an upload
// ---------------------------------------------------------------------------------------------

/// Validates an upload completely (checksum, header, every record, no trailing bytes) and
/// returns a handle on a copy of it in `*out` (free it with `fedcdd_upload_free`); on failure
/// `*out` is NULL. Hostile bytes are `FEDCDD_ERR_BAD_ENCODING`, never a crash.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_upload_parse(
    bytes: *const u8,
    len: usize,
    out: *mut *mut fedcdd_upload,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { deref_mut(out, "out") }?;
        *out = std::ptr::null_mut();
        let bytes = unsafe { slice(bytes, len, "bytes") }?;
        *out = Box::into_raw(fedcdd_upload::parse(bytes)?);
        Ok(())
    })
}

/// Frees an upload handle (NULL is allowed and ignored). Leaves the last error as it was.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_upload_free(upload: *mut fedcdd_upload) {
    error::guard_quiet(|| {
        if !upload.is_null() {
            // SAFETY: the handle came from `fedcdd_upload_parse` and is freed once.
            drop(unsafe { Box::from_raw(upload) });
        }
    });
}

/// The upload's header: round, client id, sample count, number of tensors.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_upload_get_header(
    upload: *const fedcdd_upload,
    out: *mut fedcdd_upload_header,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let upload = unsafe { deref(upload, "upload") }?;
        *unsafe { deref_mut(out, "out") }? = upload.header();
        Ok(())
    })
}

/// What tensor `index` (0-based, in upload order) is: name, shape, dtype, masked or dense.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_upload_tensor_info(
    upload: *const fedcdd_upload,
    index: usize,
    out: *mut fedcdd_record_info,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let upload = unsafe { deref(upload, "upload") }?;
        let out = unsafe { deref_mut(out, "out") }?;
        *out = upload.info(index)?;
        Ok(())
    })
}

/// The index of the tensor called `name` (`FEDCDD_ERR_TENSOR_NAME` if there is none).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_upload_find(
    upload: *const fedcdd_upload,
    name: *const c_char,
    out_index: *mut usize,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let upload = unsafe { deref(upload, "upload") }?;
        let name = unsafe { c_str(name, "name") }?;
        *unsafe { deref_mut(out_index, "out_index") }? = upload.find(name)?;
        Ok(())
    })
}

/// Decodes tensor `index` into `out` (`len` = its element count, values of `dtype`): the
/// client's update `Δ`, masked columns regenerated bit-identically to the client's own masked
/// tensor. A value that is not finite (in the requested dtype) is an error.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_upload_decode(
    upload: *const fedcdd_upload,
    index: usize,
    dtype: fedcdd_dtype,
    out: *mut c_void,
    len: usize,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let upload = unsafe { deref(upload, "upload") }?;
        let dtype = dtype_of(dtype)?;
        unsafe { upload.decode(index, dtype, out, len) }
    })
}
