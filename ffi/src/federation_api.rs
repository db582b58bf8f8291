//! The C entry points of the federated client and server (see `federation.rs`), and of the
//! tensor-list and byte handles they exchange.

use std::ffi::c_char;
use std::path::Path;

use crate::error::{guard, guard_quiet, invalid};
use crate::federation::{
    fedcdd_bytes, fedcdd_client, fedcdd_client_result, fedcdd_server, fedcdd_tensor_view,
    fedcdd_tensors,
};
use crate::types::*;

/// Boxes `value` into `*out` (set to NULL first, so a failure leaves NULL there).
unsafe fn give<T>(
    out: *mut *mut T,
    value: impl FnOnce() -> crate::error::FfiResult<T>,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { deref_mut(out, "out") }?;
        *out = std::ptr::null_mut();
        *out = Box::into_raw(Box::new(value()?));
        Ok(())
    })
}

/// Frees a handle made by `Box::into_raw` (NULL is ignored).
unsafe fn free<T>(ptr: *mut T) {
    guard_quiet(|| {
        if !ptr.is_null() {
            // SAFETY: the handle came from this library and is freed once.
            drop(unsafe { Box::from_raw(ptr) });
        }
    });
}

/// The tensors behind a nullable list handle (none for NULL).
unsafe fn list_or_empty<'a>(ptr: *const fedcdd_tensors) -> &'a [fedcdd_host::io::Tensor] {
    if ptr.is_null() {
        &[]
    } else {
        // SAFETY: the caller's contract.
        unsafe { &(*ptr).tensors }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor lists and bytes
// ---------------------------------------------------------------------------------------------

/// A new, empty tensor list. Free it with `fedcdd_tensors_free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_tensors_new(out: *mut *mut fedcdd_tensors) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe { give(out, || fedcdd_tensors::from_tensors(Vec::new())) }
}

/// Frees a tensor list (NULL is allowed and ignored).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_tensors_free(tensors: *mut fedcdd_tensors) {
    // SAFETY: the caller's contract.
    unsafe { free(tensors) }
}

/// Appends a copy of `tensor` (any dtype; kept as f32). Names must be unique, values finite.
/// Views handed out earlier are invalid afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_tensors_add(
    tensors: *mut fedcdd_tensors,
    tensor: *const fedcdd_tensor,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let list = unsafe { deref_mut(tensors, "tensors") }?;
        let t = unsafe { deref(tensor, "tensor") }?;
        let t = unsafe { TensorIn::from_c(t, "tensor") }?;
        list.add(&t)
    })
}

/// The number of tensors in the list.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_tensors_count(
    tensors: *const fedcdd_tensors,
    out: *mut usize,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let list = unsafe { deref(tensors, "tensors") }?;
        *unsafe { deref_mut(out, "out") }? = list.tensors.len();
        Ok(())
    })
}

/// A borrowed view of tensor `index`: its name, shape and f32 values, valid until the list
/// is changed or freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_tensors_get(
    tensors: *const fedcdd_tensors,
    index: usize,
    out: *mut fedcdd_tensor_view,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let list = unsafe { deref(tensors, "tensors") }?;
        *unsafe { deref_mut(out, "out") }? = list.view(index)?;
        Ok(())
    })
}

/// The bytes behind `bytes`: `*data` (valid until the handle is freed) and `*len`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_bytes_get(
    bytes: *const fedcdd_bytes,
    data: *mut *const u8,
    len: *mut usize,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let b = unsafe { deref(bytes, "bytes") }?;
        *unsafe { deref_mut(data, "data") }? = b.data.as_ptr();
        *unsafe { deref_mut(len, "len") }? = b.data.len();
        Ok(())
    })
}

/// Frees bytes (NULL is allowed and ignored).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_bytes_free(bytes: *mut fedcdd_bytes) {
    // SAFETY: the caller's contract.
    unsafe { free(bytes) }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// Creates client `client_id` of the federation that `config` describes (the TOML keys of a
/// run's `config.toml`, as `fedcdd run` takes them): opens the base model (an HF LLaMA
/// directory, or the cached built-in one), builds the LoRA layout and the algorithm's client
/// side, and loads its training data: partition `client_id` of the config's data (the
/// built-in benchmark or `data`), or, when `data_path` is not NULL, every record of that
/// JSONL/JSON file. `flora` is refused (it changes the base model every round).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_client_new(
    config: *const c_char,
    client_id: usize,
    data_path: *const c_char,
    out: *mut *mut fedcdd_client,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe {
        give(out, || {
            let config = c_str(config, "config")?;
            let data = if data_path.is_null() {
                None
            } else {
                Some(Path::new(c_str(data_path, "data_path")?))
            };
            fedcdd_client::new(config, client_id, data)
        })
    }
}

/// Frees a client (NULL is allowed and ignored).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_client_free(client: *mut fedcdd_client) {
    // SAFETY: the caller's contract.
    unsafe { free(client) }
}

/// The client's number of training examples (its aggregation weight).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_client_num_examples(
    client: *const fedcdd_client,
    out: *mut u64,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let c = unsafe { deref(client, "client") }?;
        *unsafe { deref_mut(out, "out") }? = c.num_examples();
        Ok(())
    })
}

/// Replaces the client's training records with `len` bytes of JSONL (or a JSON array) of
/// text, Alpaca or ShareGPT records, as `fedcdd train` reads files.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_client_set_records(
    client: *mut fedcdd_client,
    data: *const u8,
    len: usize,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let c = unsafe { deref_mut(client, "client") }?;
        let bytes = unsafe { slice(data, len, "data") }?;
        c.set_records(bytes)
    })
}

/// The federation's round-0 global adapter (PEFT's seeded init, the same in every process),
/// e.g. the initial arrays of a stock Flower strategy. Free it with `fedcdd_tensors_free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_client_initial_adapter(
    client: *const fedcdd_client,
    out: *mut *mut fedcdd_tensors,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe {
        give(out, || {
            let c = deref(client, "client")?;
            c.initial_adapter()
        })
    }
}

/// Trains one round (`round` from 0) from the global adapter `global` (every LoRA tensor, by
/// PEFT name) with the server's `extras` (NULL for none): the algorithm's client side
/// (FedProx's proximal term, SCAFFOLD's correction, FFA-LoRA's frozen A, FedSA-LoRA's own B),
/// `local_steps` optimizer steps at the round's learning rate, then the masked upload of the
/// update. `state` (NULL for a stateless client) holds what the client keeps between rounds
/// (SCAFFOLD's `c_i`, FedSA-LoRA's B): it is read and replaced. `*out` gets the result; free
/// it with `fedcdd_client_result_free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_client_train_round(
    client: *mut fedcdd_client,
    round: u32,
    global: *const fedcdd_tensors,
    extras: *const fedcdd_tensors,
    state: *mut fedcdd_tensors,
    out: *mut *mut fedcdd_client_result,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe {
        give(out, || {
            let c = deref_mut(client, "client")?;
            let global = &deref(global, "global")?.tensors;
            let extras = list_or_empty(extras);
            let mut scratch = Vec::new();
            let state_tensors = if state.is_null() {
                &mut scratch
            } else {
                &mut (*state).tensors
            };
            let r = c.train_round(round as usize, global, extras, state_tensors);
            if !state.is_null() {
                let tensors = std::mem::take(&mut (*state).tensors);
                *state = fedcdd_tensors::from_tensors(tensors)?;
            }
            r
        })
    }
}

/// Frees a round's result (NULL is allowed and ignored).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_client_result_free(result: *mut fedcdd_client_result) {
    // SAFETY: the caller's contract.
    unsafe { free(result) }
}

/// The result's upload bytes (valid until the result is freed).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_client_result_upload(
    result: *const fedcdd_client_result,
    data: *mut *const u8,
    len: *mut usize,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let r = unsafe { deref(result, "result") }?;
        *unsafe { deref_mut(data, "data") }? = r.upload.as_ptr();
        *unsafe { deref_mut(len, "len") }? = r.upload.len();
        Ok(())
    })
}

/// The arrays the client sends beside its upload (SCAFFOLD: `c_i⁺ − c_i`; else empty) and
/// its trained adapter, both borrowed (valid until the result is freed); the mean local
/// loss and the sample count. Any output pointer may be NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_client_result_parts(
    result: *const fedcdd_client_result,
    extras: *mut *const fedcdd_tensors,
    adapter: *mut *const fedcdd_tensors,
    loss: *mut f64,
    num_samples: *mut u64,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let r = unsafe { deref(result, "result") }?;
        unsafe {
            if !extras.is_null() {
                *extras = &r.extras;
            }
            if !adapter.is_null() {
                *adapter = &r.adapter;
            }
            if !loss.is_null() {
                *loss = r.loss;
            }
            if !num_samples.is_null() {
                *num_samples = r.samples;
            }
        }
        Ok(())
    })
}

/// Mean token loss, overall and per domain, of `adapter` on `len` bytes of records (JSONL or
/// a JSON array), as JSON (`{"overall": {"loss", "perplexity", "tokens"}, "domains": {…}}`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_client_evaluate(
    client: *const fedcdd_client,
    adapter: *const fedcdd_tensors,
    records: *const u8,
    len: usize,
    out: *mut *mut fedcdd_bytes,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe {
        give(out, || {
            let c = deref(client, "client")?;
            let adapter = &deref(adapter, "adapter")?.tensors;
            let bytes = slice(records, len, "records")?;
            Ok(fedcdd_bytes {
                data: c.evaluate(adapter, bytes)?,
            })
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// Creates the server of the federation `config` describes, writing into `run_dir` (created;
/// `resume` != 0 continues its checkpoint): the base model and the per-domain evaluation
/// sets (no client data), the algorithm's strategy. Unless resuming, the base model is
/// evaluated first (round 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_server_new(
    config: *const c_char,
    run_dir: *const c_char,
    resume: i32,
    out: *mut *mut fedcdd_server,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe {
        give(out, || {
            let config = c_str(config, "config")?;
            let dir = c_str(run_dir, "run_dir")?;
            fedcdd_server::new(config, Path::new(dir), resume != 0)
        })
    }
}

/// Frees a server (NULL is allowed and ignored).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_server_free(server: *mut fedcdd_server) {
    // SAFETY: the caller's contract.
    unsafe { free(server) }
}

/// Rounds done, rounds in all, and clients in the federation. Any pointer may be NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_server_counts(
    server: *const fedcdd_server,
    rounds_done: *mut usize,
    num_rounds: *mut usize,
    num_clients: *mut usize,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let s = unsafe { deref(server, "server") }?;
        let (done, rounds, clients) = s.counts();
        unsafe {
            for (p, v) in [
                (rounds_done, done),
                (num_rounds, rounds),
                (num_clients, clients),
            ] {
                if !p.is_null() {
                    *p = v;
                }
            }
        }
        Ok(())
    })
}

/// Starts round `round` (from 0; the next one): writes the ids of the sampled clients into
/// `clients` (`capacity` entries; `*count` gets how many, also when the buffer is too small).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_server_begin_round(
    server: *mut fedcdd_server,
    round: u32,
    clients: *mut usize,
    capacity: usize,
    count: *mut usize,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let s = unsafe { deref_mut(server, "server") }?;
        let count = unsafe { deref_mut(count, "count") }?;
        let ids = s.begin_round(round as usize)?;
        *count = ids.len();
        if capacity < ids.len() {
            return Err(crate::error::FfiError::new(
                FEDCDD_ERR_BUFFER_TOO_SMALL,
                format!(
                    "{} clients were sampled, the buffer holds {capacity}",
                    ids.len()
                ),
            ));
        }
        let out = unsafe { slice_mut(clients, capacity, "clients") }?;
        out[..ids.len()].copy_from_slice(&ids);
        Ok(())
    })
}

/// A copy of the global adapter (sorted by name). Free it with `fedcdd_tensors_free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_server_global(
    server: *const fedcdd_server,
    out: *mut *mut fedcdd_tensors,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe { give(out, || deref(server, "server")?.global()) }
}

/// The arrays the strategy sends every sampled client with the global adapter (SCAFFOLD:
/// the server control `c`; else empty). Free it with `fedcdd_tensors_free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_server_configure_train(
    server: *const fedcdd_server,
    out: *mut *mut fedcdd_tensors,
) -> fedcdd_status {
    // SAFETY: the caller's contract.
    unsafe { give(out, || deref(server, "server")?.configure_train()) }
}

/// Takes client `client`'s reply for the round in progress: its upload (`len` bytes), the
/// arrays it sent beside it (`extras`, NULL for none) and its mean local loss. A reply that
/// does not decode against the global adapter, holds NaN, belongs to another round or client,
/// or comes twice is rejected (`FEDCDD_ERR_BAD_ENCODING`, the message names the client and
/// the tensor); the round goes on without it and the report lists it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_server_add_reply(
    server: *mut fedcdd_server,
    client: usize,
    upload: *const u8,
    len: usize,
    extras: *const fedcdd_tensors,
    loss: f64,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let s = unsafe { deref_mut(server, "server") }?;
        let bytes = unsafe { slice(upload, len, "upload") }?;
        let extras = unsafe { list_or_empty(extras) }.to_vec();
        if !loss.is_finite() {
            return Err(invalid(format!(
                "client {client}: the loss {loss} is not finite"
            )));
        }
        s.add_reply(client, bytes, extras, loss)
    })
}

/// Ends the round in progress: the strategy aggregates the kept replies, the global model is
/// evaluated per domain (when due) and the checkpoint written; sampled clients without a reply
/// are reported missing. `*log` (may be NULL) gets the round's log line.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_server_finish_round(
    server: *mut fedcdd_server,
    log: *mut *mut fedcdd_bytes,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let s = unsafe { deref_mut(server, "server") }?;
        let line = s.finish_round()?;
        if !log.is_null() {
            unsafe { *log = Box::into_raw(Box::new(fedcdd_bytes { data: line })) };
        }
        Ok(())
    })
}

/// After the last round: writes the final adapter (`adapter/`, PEFT format) and the report
/// (`summary.md`, `metrics.jsonl`/`.csv`, `rounds.csv`, plots) into the run directory. `*table`
/// (may be NULL) gets the accuracy table as Markdown.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedcdd_server_finish(
    server: *mut fedcdd_server,
    table: *mut *mut fedcdd_bytes,
) -> fedcdd_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let s = unsafe { deref_mut(server, "server") }?;
        let text = s.finish()?;
        if !table.is_null() {
            unsafe { *table = Box::into_raw(Box::new(fedcdd_bytes { data: text })) };
        }
        Ok(())
    })
}
