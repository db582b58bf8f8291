//! The bytes a client uploads.
//!
//! ```text
//! upload  = header record{header.num_tensors} crc32
//! header  = postcard(UploadHeader)          magic "FCDU", version, round, client id, samples, count
//! record  = postcard(RecordHead) kept values
//!   kept    = K little-endian u32 column indices, strictly ascending     (masked records only)
//!   values  = little-endian elements of `dtype`: all P values row-major (dense), or the K kept
//!             columns one after another, R values each (masked)
//! crc32   = CRC-32/IEEE of every byte before it, little-endian
//! ```
//! The blob lengths follow from the head (dims, dtype, K), so every length is checked
//! against the remaining bytes before it is used. Decoding validates the whole upload —
//! checksum, header, every record, no trailing bytes — before handing out any record, and
//! fails with an error (never a panic) on any byte string. No allocation, O(1) stack.

use heapless::Vec as HVec;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind};
use crate::mask::{Importance, KeptBytes, KeptColumns, mask_reconstruct};
use crate::sweep::check_len;
use crate::tensor::{DType, Element, Layout, MAX_DIMS, TensorRole};

/// First four bytes of every upload.
pub const MAGIC: [u8; 4] = *b"FCDU";
/// The format version this build writes and reads.
pub const VERSION: u16 = 1;
/// Longest tensor name accepted (bytes).
pub const MAX_NAME_LEN: usize = 1024;
/// Largest tensor (elements) an upload may declare: 2³¹, 8 GiB as f32.
pub const MAX_ELEMENTS: usize = 1 << 31;
/// Bytes of the smallest possible record; bounds the declared tensor count.
const MIN_RECORD_LEN: usize = 7;
/// Upper bound of a serialized [`RecordHead`]: name + varints of dims, K, seed + f32.
const MAX_HEAD_LEN: usize = MAX_NAME_LEN + 5 + MAX_DIMS * 5 + 64;

/// Fixed fields of an upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadHeader {
    pub magic: [u8; 4],
    pub version: u16,
    /// Federated round this update belongs to.
    pub round: u32,
    pub client_id: u32,
    /// The client's sample count `n_i` (its aggregation weight).
    pub num_samples: u64,
    pub num_tensors: u32,
}

impl UploadHeader {
    pub const fn new(round: u32, client_id: u32, num_samples: u64, num_tensors: u32) -> Self {
        UploadHeader {
            magic: MAGIC,
            version: VERSION,
            round,
            client_id,
            num_samples,
            num_tensors,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
enum PayloadHead {
    Dense,
    Masked {
        importance: Importance,
        kept: u32,
        sigma: f32,
        seed: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RecordHead<'a> {
    #[serde(borrow)]
    name: &'a str,
    dims: HVec<u32, MAX_DIMS>,
    dtype: DType,
    payload: PayloadHead,
}

/// A tensor's values inside a validated upload.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Payload<'a> {
    /// All values, row-major, little-endian `dtype`.
    Dense { values: &'a [u8] },
    /// Kept columns exact; the rest regenerated from `(seed, record index)` with `sigma`.
    Masked {
        importance: Importance,
        /// K little-endian u32 indices, ascending.
        kept: &'a [u8],
        /// K·R little-endian values, one kept column after another.
        values: &'a [u8],
        sigma: f32,
        seed: u64,
    },
}

/// One validated tensor record of an upload.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRecord<'a> {
    /// Position in the upload: keys the noise generator.
    pub index: u32,
    pub name: &'a str,
    pub dims: HVec<u32, MAX_DIMS>,
    pub dtype: DType,
    pub layout: Layout,
    pub payload: Payload<'a>,
    /// Bytes this record takes in the upload.
    pub encoded_len: usize,
}

impl TensorRecord<'_> {
    /// Number of kept columns (all of them for a dense record).
    pub fn kept_count(&self) -> usize {
        match self.payload {
            Payload::Dense { .. } => self.layout.cols,
            Payload::Masked { kept, .. } => kept.len() / 4,
        }
    }

    /// Index of the k-th kept column of a masked record.
    pub fn kept_index(&self, k: usize) -> Option<u32> {
        match self.payload {
            Payload::Dense { .. } => None,
            Payload::Masked { kept, .. } => kept
                .get(4 * k..4 * k + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        }
    }

    /// Rebuilds the tensor the client masked: bit-identical to the client's own masked tensor
    /// when `T` is the record's dtype (or wider). `out` must have P elements. Memory: O(1).
    pub fn reconstruct<T: Element>(&self, out: &mut [T]) -> Result<(), Error> {
        check_len(self.layout.len(), out.len()).map_err(|e| e.with_tensor(self.index))?;
        match self.payload {
            Payload::Dense { values } => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = T::from_f32(self.dtype.read_le(values, i));
                }
                Ok(())
            }
            Payload::Masked {
                importance,
                kept,
                values,
                sigma,
                seed,
            } => {
                let src = KeptBytes {
                    kept,
                    values,
                    dtype: self.dtype,
                };
                mask_reconstruct(
                    &self.layout,
                    importance,
                    &src,
                    sigma,
                    seed,
                    self.index,
                    self.dtype,
                    out,
                )
                .map_err(|e| e.with_tensor(self.index))
            }
        }
    }
}

/// A validated upload: its header and a way to walk its records.
#[derive(Clone, Copy, Debug)]
pub struct Upload<'a> {
    pub header: UploadHeader,
    /// Encoded records (after the header, before the checksum).
    records: &'a [u8],
    /// Total encoded size, checksum included.
    pub byte_len: usize,
}

impl<'a> Upload<'a> {
    /// Validates `bytes` completely and returns the upload. Errors name the record
    /// (tensor index) where one is at fault.
    pub fn parse(bytes: &'a [u8]) -> Result<Upload<'a>, Error> {
        if bytes.len() < 4 + 4 {
            return Err(ErrorKind::BadEncoding("too short to be an upload").into());
        }
        if bytes[..4] != MAGIC {
            return Err(ErrorKind::BadEncoding("not a fedcdd upload (bad magic)").into());
        }
        let (body, trailer) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
        if crc32(body) != stored {
            return Err(ErrorKind::Checksum.into());
        }
        let (header, rest) = postcard::take_from_bytes::<UploadHeader>(body)
            .map_err(|_| Error::new(ErrorKind::BadEncoding("truncated or malformed header")))?;
        if header.version != VERSION {
            return Err(ErrorKind::UnsupportedVersion(header.version).into());
        }
        if header.num_tensors as usize > rest.len() / MIN_RECORD_LEN {
            return Err(ErrorKind::BadEncoding("declared tensor count exceeds the bytes").into());
        }
        let upload = Upload {
            header,
            records: rest,
            byte_len: bytes.len(),
        };
        let mut tail = rest;
        for index in 0..header.num_tensors {
            let (_, next) = parse_record(tail, index)?;
            tail = next;
        }
        if !tail.is_empty() {
            return Err(ErrorKind::BadEncoding("trailing bytes after the last tensor").into());
        }
        Ok(upload)
    }

    /// The records, in upload order. The upload was validated by [`parse`](Self::parse).
    pub fn records(&self) -> Records<'a> {
        Records {
            rest: self.records,
            next: 0,
            total: self.header.num_tensors,
        }
    }
}

/// Iterator over the records of a validated [`Upload`].
pub struct Records<'a> {
    rest: &'a [u8],
    next: u32,
    total: u32,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<TensorRecord<'a>, Error>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        let index = self.next;
        self.next += 1;
        Some(parse_record(self.rest, index).map(|(rec, rest)| {
            self.rest = rest;
            rec
        }))
    }
}

fn bad(index: u32, what: &'static str) -> Error {
    Error::new(ErrorKind::BadEncoding(what)).with_tensor(index)
}

/// Parses and validates one record at the start of `bytes`.
fn parse_record(bytes: &[u8], index: u32) -> Result<(TensorRecord<'_>, &[u8]), Error> {
    let (head, rest) = postcard::take_from_bytes::<RecordHead<'_>>(bytes)
        .map_err(|_| bad(index, "truncated or malformed tensor record"))?;
    if head.name.is_empty() || head.name.len() > MAX_NAME_LEN {
        return Err(bad(index, "tensor name empty or too long"));
    }
    let mut dims = [0usize; MAX_DIMS];
    for (d, &v) in dims.iter_mut().zip(head.dims.iter()) {
        *d = v as usize;
    }
    let layout = Layout::from_dims(&dims[..head.dims.len()], TensorRole::from_name(head.name))
        .map_err(|_| bad(index, "bad tensor shape"))?;
    if layout.len() > MAX_ELEMENTS {
        return Err(bad(index, "tensor larger than the format allows"));
    }
    let size = head.dtype.size();
    let (payload, rest) = match head.payload {
        PayloadHead::Dense => {
            let n = layout.len() * size;
            let (values, rest) = take(rest, n).ok_or(bad(index, "dense values truncated"))?;
            (Payload::Dense { values }, rest)
        }
        PayloadHead::Masked {
            importance,
            kept,
            sigma,
            seed,
        } => {
            let (rows, cols) = importance.units(&layout);
            let k = kept as usize;
            if k == 0 || k > cols {
                return Err(bad(index, "kept column count out of range"));
            }
            if !(sigma >= 0.0 && sigma.is_finite()) {
                return Err(bad(index, "noise sigma must be finite and >= 0"));
            }
            let (kept_bytes, rest) =
                take(rest, 4 * k).ok_or(bad(index, "kept indices truncated"))?;
            // k ≤ cols and rows·cols ≤ MAX_ELEMENTS, so this cannot overflow.
            let (values, rest) =
                take(rest, k * rows * size).ok_or(bad(index, "kept values truncated"))?;
            let src = KeptBytes {
                kept: kept_bytes,
                values,
                dtype: head.dtype,
            };
            let mut prev: Option<usize> = None;
            for i in 0..k {
                let j = src.index(i);
                if j >= cols || prev.is_some_and(|p| j <= p) {
                    return Err(bad(index, "kept column indices not ascending and in range"));
                }
                prev = Some(j);
            }
            (
                Payload::Masked {
                    importance,
                    kept: kept_bytes,
                    values,
                    sigma,
                    seed,
                },
                rest,
            )
        }
    };
    let encoded_len = bytes.len() - rest.len();
    let record = TensorRecord {
        index,
        name: head.name,
        dims: head.dims,
        dtype: head.dtype,
        layout,
        payload,
        encoded_len,
    };
    Ok((record, rest))
}

fn take(bytes: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    if n <= bytes.len() {
        Some(bytes.split_at(n))
    } else {
        None
    }
}

/// Writes an upload into a caller buffer, record by record. With no buffer
/// ([`UploadWriter::measure`]) it only counts, which answers "how many bytes".
pub struct UploadWriter<'b> {
    buf: Option<&'b mut [u8]>,
    pos: usize,
    declared: u32,
    written: u32,
}

impl<'b> UploadWriter<'b> {
    /// Starts writing into `buf`.
    pub fn new(buf: &'b mut [u8], header: UploadHeader) -> Result<Self, Error> {
        Self::start(Some(buf), header)
    }

    /// Starts a dry run that only counts bytes.
    pub fn measure(header: UploadHeader) -> Result<UploadWriter<'static>, Error> {
        UploadWriter::start(None, header)
    }

    fn start(buf: Option<&'b mut [u8]>, header: UploadHeader) -> Result<Self, Error> {
        if header.magic != MAGIC || header.version != VERSION {
            return Err(ErrorKind::BadConfig("header must carry MAGIC and VERSION").into());
        }
        let mut w = UploadWriter {
            buf,
            pos: 0,
            declared: header.num_tensors,
            written: 0,
        };
        w.put_postcard(&header)?;
        Ok(w)
    }

    fn put_postcard<S: Serialize>(&mut self, value: &S) -> Result<(), Error> {
        let mut scratch = [0u8; MAX_HEAD_LEN];
        let used = postcard::to_slice(value, &mut scratch)
            .map_err(|_| Error::new(ErrorKind::BadConfig("record head too large")))?
            .len();
        self.put(&scratch[..used])
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let end = self.pos + bytes.len();
        if let Some(buf) = self.buf.as_deref_mut() {
            let dst = buf
                .get_mut(self.pos..end)
                .ok_or(ErrorKind::BufferTooSmall { needed: end })?;
            dst.copy_from_slice(bytes);
        }
        self.pos = end;
        Ok(())
    }

    fn put_values<T: Element>(&mut self, values: impl Iterator<Item = T>) -> Result<(), Error> {
        let size = T::DTYPE.size();
        for v in values {
            let end = self.pos + size;
            if let Some(buf) = self.buf.as_deref_mut() {
                let dst = buf
                    .get_mut(self.pos..end)
                    .ok_or(ErrorKind::BufferTooSmall { needed: end })?;
                v.write_le(dst);
            }
            self.pos = end;
        }
        Ok(())
    }

    /// Appends a tensor with all its values (row-major).
    pub fn dense<T: Element>(
        &mut self,
        name: &str,
        dims: &[usize],
        values: &[T],
    ) -> Result<(), Error> {
        // Check the values before writing anything: a rejected call leaves no partial record.
        let index = self.written;
        let layout =
            Layout::from_dims(dims, TensorRole::Other).map_err(|e| e.with_tensor(index))?;
        check_len(layout.len(), values.len()).map_err(|e| e.with_tensor(index))?;
        self.write_head::<T>(name, dims, PayloadHead::Dense)?;
        self.put_values(values.iter().copied())?;
        self.written += 1;
        Ok(())
    }

    /// Appends a masked tensor: the output of [`crate::mask::mask_encode`] (`kept` ascending,
    /// `values` the kept columns one after another) plus σ and the seed.
    #[allow(clippy::too_many_arguments)]
    pub fn masked<T: Element>(
        &mut self,
        name: &str,
        dims: &[usize],
        importance: Importance,
        kept: &[u32],
        values: &[T],
        sigma: f32,
        seed: u64,
    ) -> Result<(), Error> {
        let index = self.written;
        let k = u32::try_from(kept.len()).map_err(|_| bad(index, "too many kept columns"))?;
        let layout =
            Layout::from_dims(dims, TensorRole::Other).map_err(|e| e.with_tensor(index))?;
        let (rows, cols) = importance.units(&layout);
        if kept.is_empty()
            || kept.len() > cols
            || kept.windows(2).any(|w| w[0] >= w[1])
            || kept[kept.len() - 1] as usize >= cols
        {
            return Err(bad(index, "kept column indices not ascending and in range"));
        }
        check_len(kept.len() * rows, values.len()).map_err(|e| e.with_tensor(index))?;
        if !(sigma >= 0.0 && sigma.is_finite()) {
            return Err(bad(index, "noise sigma must be finite and >= 0"));
        }
        self.write_head::<T>(
            name,
            dims,
            PayloadHead::Masked {
                importance,
                kept: k,
                sigma,
                seed,
            },
        )?;
        for &j in kept {
            self.put(&j.to_le_bytes())?;
        }
        self.put_values(values.iter().copied())?;
        self.written += 1;
        Ok(())
    }

    fn write_head<T: Element>(
        &mut self,
        name: &str,
        dims: &[usize],
        payload: PayloadHead,
    ) -> Result<Layout, Error> {
        let index = self.written;
        if self.written >= self.declared {
            return Err(bad(index, "more tensors than the header declares"));
        }
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(bad(index, "tensor name empty or too long"));
        }
        let layout = Layout::from_dims(dims, TensorRole::from_name(name))
            .map_err(|e| e.with_tensor(index))?;
        if layout.len() > MAX_ELEMENTS {
            return Err(bad(index, "tensor larger than the format allows"));
        }
        let mut hdims: HVec<u32, MAX_DIMS> = HVec::new();
        for &d in dims {
            let d = u32::try_from(d).map_err(|_| bad(index, "dimension exceeds u32"))?;
            hdims
                .push(d)
                .map_err(|_| bad(index, "too many dimensions"))?;
        }
        self.put_postcard(&RecordHead {
            name,
            dims: hdims,
            dtype: T::DTYPE,
            payload,
        })?;
        Ok(layout)
    }

    /// Appends the checksum. Returns the total length in bytes (for a dry run: the length
    /// the buffer needs).
    pub fn finish(mut self) -> Result<usize, Error> {
        if self.written != self.declared {
            return Err(
                ErrorKind::BadConfig("fewer tensors written than the header declares").into(),
            );
        }
        let crc = match self.buf.as_deref() {
            Some(buf) => crc32(&buf[..self.pos]),
            None => 0,
        };
        self.put(&crc.to_le_bytes())?;
        Ok(self.pos)
    }
}

/// CRC-32/IEEE (the zlib/PNG/Ethernet checksum), bitwise-table form.
pub fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in bytes {
        crc = TABLE[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}
