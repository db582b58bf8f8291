//! Status codes, the thread-local last-error message, and the guard every entry point runs
//! its body in (no Rust panic crosses the C boundary).

use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};

use fedcdd_core::{Error as CoreError, ErrorKind};

use crate::status::*;

/// An error on its way to the caller: a status code and the message `fedcdd_last_error`
/// returns.
#[derive(Debug)]
pub(crate) struct FfiError {
    pub status: fedcdd_status,
    pub message: String,
}

pub(crate) type FfiResult<T> = Result<T, FfiError>;

impl FfiError {
    pub fn new(status: fedcdd_status, message: impl Into<String>) -> FfiError {
        FfiError {
            status,
            message: message.into(),
        }
    }

    /// Puts `context` (who: a client, a tensor) in front of the message.
    pub fn context(mut self, context: impl fmt::Display) -> FfiError {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

pub(crate) fn null(what: &str) -> FfiError {
    FfiError::new(FEDCDD_ERR_NULL_POINTER, format!("{what} is NULL"))
}

pub(crate) fn invalid(message: impl Into<String>) -> FfiError {
    FfiError::new(FEDCDD_ERR_INVALID_ARGUMENT, message)
}

/// The status a core error maps to.
pub(crate) fn status_of(kind: &ErrorKind) -> fedcdd_status {
    match kind {
        ErrorKind::ShapeMismatch { .. } | ErrorKind::BadShape => FEDCDD_ERR_SHAPE,
        ErrorKind::NonFinite | ErrorKind::Overflow => FEDCDD_ERR_NON_FINITE,
        ErrorKind::NoClients => FEDCDD_ERR_NO_CLIENTS,
        ErrorKind::BadWeight => FEDCDD_ERR_BAD_WEIGHT,
        ErrorKind::BadConfig(_) => FEDCDD_ERR_INVALID_ARGUMENT,
        ErrorKind::BufferTooSmall { .. } => FEDCDD_ERR_BUFFER_TOO_SMALL,
        ErrorKind::Protocol(_) | ErrorKind::PassMismatch => FEDCDD_ERR_CALL_ORDER,
        ErrorKind::BadEncoding(_) | ErrorKind::Checksum | ErrorKind::UnsupportedVersion(_) => {
            FEDCDD_ERR_BAD_ENCODING
        }
    }
}

/// A core error whose client and tensor the caller names itself (core only knows indices).
pub(crate) fn core_kind(e: CoreError) -> FfiError {
    FfiError::new(status_of(&e.kind), e.kind.to_string())
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // A NUL inside a message (from a caller's name) would cut it short in C: escape it.
    let text = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

fn clear_last_error() {
    LAST_ERROR.with(|e| {
        let mut e = e.borrow_mut();
        if !e.as_bytes().is_empty() {
            *e = CString::default();
        }
    });
}

/// The current thread's message; the pointer stays valid until the next call into the
/// library on this thread.
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Copies the current thread's message into `buf` (NUL-terminated, cut to fit); returns the
/// message's full length in bytes, without the NUL.
pub(crate) fn last_error_copy(buf: &mut [u8]) -> usize {
    LAST_ERROR.with(|e| {
        let e = e.borrow();
        let bytes = e.as_bytes();
        if let Some(room) = buf.len().checked_sub(1) {
            let n = bytes.len().min(room);
            buf[..n].copy_from_slice(&bytes[..n]);
            buf[n] = 0;
        }
        bytes.len()
    })
}

/// Runs an entry point's body: clears the last error, catches any panic, and turns the
/// outcome into a status code (setting the last error on failure).
pub(crate) fn guard(body: impl FnOnce() -> FfiResult<()>) -> fedcdd_status {
    clear_last_error();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => FEDCDD_OK,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            set_last_error(&format!(
                "internal error in libfedcdd (please report it): {what}"
            ));
            FEDCDD_ERR_INTERNAL
        }
    }
}

/// Runs a function that cannot fail (the `free` functions) without touching the last error,
/// so a caller can free a handle before reporting the error of an earlier call. A panic is
/// caught and dropped.
pub(crate) fn guard_quiet(body: impl FnOnce()) {
    let _ = catch_unwind(AssertUnwindSafe(body));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let status = guard(|| panic!("boom {}", 42));
        assert_eq!(status, FEDCDD_ERR_INTERNAL);
        let mut buf = [0u8; 128];
        let n = last_error_copy(&mut buf);
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(text.contains("boom 42"), "{text}");
        // The next call clears it.
        assert_eq!(guard(|| Ok(())), FEDCDD_OK);
        assert_eq!(last_error_copy(&mut buf), 0);
        assert_eq!(buf[0], 0);
    }

    #[test]
    fn copy_cuts_to_fit_and_reports_the_full_length() {
        let status = guard(|| Err(invalid("a\0b message")));
        assert_eq!(status, FEDCDD_ERR_INVALID_ARGUMENT);
        let mut small = [0xFFu8; 4];
        let n = last_error_copy(&mut small);
        assert_eq!(n, "a\\0b message".len());
        assert_eq!(&small, b"a\\0\0");
        assert_eq!(last_error_copy(&mut []), n);
    }
}
