//! The status codes every fallible function returns (a leaf module: the error handling and
//! the C-visible types both use it).
#![allow(non_camel_case_types)]

/// Status code every fallible function returns: `FEDCDD_OK` (0) or one of the
/// `FEDCDD_ERR_*` codes; `fedcdd_last_error()` then says what went wrong.
pub type fedcdd_status = i32;
/// Success.
pub const FEDCDD_OK: fedcdd_status = 0;
/// A required pointer argument was NULL.
pub const FEDCDD_ERR_NULL_POINTER: fedcdd_status = 1;
/// An argument or configuration value is out of range (unknown code, bad hyper-parameter,
/// misaligned pointer, name not UTF-8, ...).
pub const FEDCDD_ERR_INVALID_ARGUMENT: fedcdd_status = 2;
/// A shape or length does not match (the global tensor's, or the product of the shape).
pub const FEDCDD_ERR_SHAPE: fedcdd_status = 3;
/// A value is NaN or infinite (or so large that a norm overflows).
pub const FEDCDD_ERR_NON_FINITE: fedcdd_status = 4;
/// A sample count is negative, NaN or infinite, or all counts are zero.
pub const FEDCDD_ERR_BAD_WEIGHT: fedcdd_status = 5;
/// There is nothing to aggregate (no client in this round).
pub const FEDCDD_ERR_NO_CLIENTS: fedcdd_status = 6;
/// A tensor name is unknown, missing or repeated.
pub const FEDCDD_ERR_TENSOR_NAME: fedcdd_status = 7;
/// Bytes (an upload or a saved server state) are corrupt, truncated or hostile.
pub const FEDCDD_ERR_BAD_ENCODING: fedcdd_status = 8;
/// The caller's buffer is too small; the function's size output says how many are needed.
pub const FEDCDD_ERR_BUFFER_TOO_SMALL: fedcdd_status = 9;
/// A call out of order (e.g. a second pass on a batch aggregator, a client missing from
/// pass 2, a new global while a round is open, or a round broken by an earlier error).
pub const FEDCDD_ERR_CALL_ORDER: fedcdd_status = 10;
/// A file could not be read or written, or does not hold what it should (a model
/// directory, a data file, a run directory).
pub const FEDCDD_ERR_IO: fedcdd_status = 11;
/// The federated run failed (local training, evaluation, the server step); the message says
/// where and why.
pub const FEDCDD_ERR_RUN: fedcdd_status = 12;
/// A bug in libfedcdd (a caught Rust panic). The handle involved should be freed.
pub const FEDCDD_ERR_INTERNAL: fedcdd_status = 99;
