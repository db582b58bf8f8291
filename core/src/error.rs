//! One error type for every fallible core function. It names the client and the tensor
//! (by index: the core has no allocator; the host maps indices to file and tensor names).

use core::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A client's tensor does not have the global tensor's shape (or a slice has the wrong length).
    ShapeMismatch { expected: usize, found: usize },
    /// A dimension list that is empty, has a zero, too many axes, or overflows.
    BadShape,
    /// A value is NaN or ±Inf.
    NonFinite,
    /// Values are finite but so large that a squared norm overflows f32.
    Overflow,
    /// An aggregation with no clients (or all of them rejected).
    NoClients,
    /// A sample weight that is negative, NaN or Inf, or weights that sum to zero.
    BadWeight,
    /// A configuration value out of range (keep ratio, noise scale, rates, τ...).
    BadConfig(&'static str),
    /// A caller-provided buffer is too small; `needed` elements (or bytes) are required.
    BufferTooSmall { needed: usize },
    /// The streaming aggregator was called out of order (e.g. pass 2 before pass 1 ended).
    Protocol(&'static str),
    /// Pass 2 did not see the same clients as pass 1.
    PassMismatch,
    /// A byte string is not a valid upload; the text says which check failed.
    BadEncoding(&'static str),
    /// The upload's checksum does not match its bytes.
    Checksum,
    /// The upload's version is not one this build reads.
    UnsupportedVersion(u16),
}

/// An error with the index of the client and tensor it concerns, where known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub client: Option<u32>,
    pub tensor: Option<u32>,
}

impl Error {
    pub const fn new(kind: ErrorKind) -> Error {
        Error {
            kind,
            client: None,
            tensor: None,
        }
    }
    pub const fn with_client(mut self, client: u32) -> Error {
        self.client = Some(client);
        self
    }
    pub const fn with_tensor(mut self, tensor: u32) -> Error {
        self.tensor = Some(tensor);
        self
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Error {
        Error::new(kind)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::ShapeMismatch { expected, found } => {
                write!(
                    f,
                    "shape mismatch: expected {expected} elements, found {found}"
                )
            }
            ErrorKind::BadShape => {
                write!(f, "bad shape (empty, zero-sized, over 4 axes or too large)")
            }
            ErrorKind::NonFinite => write!(f, "value is NaN or infinite"),
            ErrorKind::Overflow => write!(f, "values too large: squared norm overflows f32"),
            ErrorKind::NoClients => write!(f, "no clients to aggregate"),
            ErrorKind::BadWeight => write!(
                f,
                "sample weight must be finite and >= 0, with a positive sum"
            ),
            ErrorKind::BadConfig(what) => write!(f, "bad configuration: {what}"),
            ErrorKind::BufferTooSmall { needed } => write!(f, "buffer too small: {needed} needed"),
            ErrorKind::Protocol(what) => write!(f, "call out of order: {what}"),
            ErrorKind::PassMismatch => write!(
                f,
                "pass 2 did not see the same clients and weights as pass 1"
            ),
            ErrorKind::BadEncoding(what) => write!(f, "bad upload encoding: {what}"),
            ErrorKind::Checksum => write!(
                f,
                "bad upload encoding: checksum mismatch (corrupted or truncated)"
            ),
            ErrorKind::UnsupportedVersion(v) => write!(f, "unsupported upload version {v}"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(c) = self.client {
            write!(f, "client #{c}: ")?;
        }
        if let Some(t) = self.tensor {
            write!(f, "tensor #{t}: ")?;
        }
        write!(f, "{}", self.kind)
    }
}

impl core::error::Error for Error {}
