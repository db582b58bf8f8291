//! The server state (FedOpt moments and the step count) as bytes.
//!
//! ```text
//! state   = "FCDS" u32:version algorithm variant u64:steps u32:count tensor{count} u32:crc32
//! algorithm, variant = u8:length, ASCII name           ("fedadam", "reddi", ...)
//! tensor  = u32:name_length name u8:slots u64:numel f32{numel}:m? f32{numel}:v?
//!           slots: bit 0 = m present, bit 1 = v present
//! crc32   = CRC-32/IEEE of every byte before it
//! ```
//! All integers and floats little-endian. The reader checks every length against the bytes
//! left before it allocates, and every name and size against the aggregator's global tensors.

use std::collections::HashSet;

use fedcdd_core::FedOptVariant;
use fedcdd_core::wire::crc32;

use crate::aggregator::fedcdd_aggregator;
use crate::error::{FfiError, FfiResult, invalid};
use crate::types::*;

const MAGIC: &[u8; 4] = b"FCDS";
const VERSION: u32 = 1;

fn variant_name(v: FedOptVariant) -> &'static str {
    match v {
        FedOptVariant::Reddi => "reddi",
        FedOptVariant::OpenFedLlm => "openfedllm",
    }
}

/// The state of `agg` as bytes.
pub(crate) fn save(agg: &fedcdd_aggregator) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    for name in [
        agg.settings.algorithm.name(),
        variant_name(agg.settings.opt.variant),
    ] {
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
    }
    out.extend_from_slice(&agg.steps.to_le_bytes());
    let with_state: Vec<_> = agg
        .globals
        .iter()
        .filter(|g| g.m.is_some() || g.v.is_some())
        .collect();
    out.extend_from_slice(&(with_state.len() as u32).to_le_bytes());
    for g in with_state {
        out.extend_from_slice(&(g.name.len() as u32).to_le_bytes());
        out.extend_from_slice(g.name.as_bytes());
        let slots = g.m.is_some() as u8 | (g.v.is_some() as u8) << 1;
        out.push(slots);
        out.extend_from_slice(&(g.layout.len() as u64).to_le_bytes());
        for values in [&g.m, &g.v].into_iter().flatten() {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn bad(what: impl Into<String>) -> FfiError {
    FfiError::new(
        FEDCDD_ERR_BAD_ENCODING,
        format!("saved server state: {}", what.into()),
    )
}

/// A cursor over untrusted bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> FfiResult<&'a [u8]> {
        let left = self.bytes.len() - self.pos;
        if n > left {
            return Err(bad(format!(
                "truncated: {what} needs {n} bytes at offset {}, {left} left",
                self.pos
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> FfiResult<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> FfiResult<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &str) -> FfiResult<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> FfiResult<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn str(&mut self, len: usize, what: &str) -> FfiResult<&'a str> {
        std::str::from_utf8(self.take(len, what)?).map_err(|_| bad(format!("{what} is not UTF-8")))
    }

    fn f32s(&mut self, n: usize, what: &str) -> FfiResult<Vec<f32>> {
        let bytes = self.take(n.saturating_mul(4), what)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// Replaces the state of `agg` with the one in `bytes` (all or nothing).
pub(crate) fn load(agg: &mut fedcdd_aggregator, bytes: &[u8]) -> FfiResult<()> {
    if agg.round_open() {
        return Err(FfiError::new(
            FEDCDD_ERR_CALL_ORDER,
            "a round is in progress: finalise or reset it before loading a state",
        ));
    }
    if agg.slots().is_empty() {
        return Err(FfiError::new(
            FEDCDD_ERR_CALL_ORDER,
            "no global tensors yet: call fedcdd_aggregator_set_global before loading a state",
        ));
    }
    if bytes.len() < 8 {
        return Err(bad(format!("too short ({} bytes)", bytes.len())));
    }
    if &bytes[..4] != MAGIC {
        return Err(bad("not a fedcdd server state (bad magic)"));
    }
    let (body, trailer) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    if crc32(body) != stored {
        return Err(bad("checksum mismatch (corrupted or truncated)"));
    }
    let mut r = Reader {
        bytes: body,
        pos: 4,
    };
    let version = r.u32("version")?;
    if version != VERSION {
        return Err(bad(format!("unsupported version {version}")));
    }
    let alg_len = r.u8("algorithm length")? as usize;
    let alg = r.str(alg_len, "algorithm")?;
    let var_len = r.u8("variant length")? as usize;
    let variant = r.str(var_len, "variant")?;
    let (want_alg, want_var) = (
        agg.settings.algorithm.name(),
        variant_name(agg.settings.opt.variant),
    );
    if alg != want_alg || variant != want_var {
        return Err(invalid(format!(
            "saved server state belongs to {alg} ({variant}), this aggregator runs {want_alg} ({want_var})"
        )));
    }
    let steps = r.u64("steps")?;
    let count = r.u32("tensor count")? as usize;
    // Smallest tensor entry: name length, a 1-byte name, slots, numel.
    if count > (body.len() - r.pos) / (4 + 1 + 1 + 8) {
        return Err(bad("declared tensor count exceeds the bytes"));
    }
    let (uses_m, uses_v) = agg.settings.opt.state_slots();
    let mut seen = HashSet::new();
    let mut loaded = Vec::with_capacity(count);
    for i in 0..count {
        let name_len = r.u32("tensor name length")? as usize;
        let name = r.str(name_len, "tensor name")?;
        let at = format!("tensor #{i} \"{name}\"");
        let gi = agg
            .global_index(name)
            .filter(|&gi| agg.globals[gi].aggregated)
            .ok_or_else(|| {
                FfiError::new(
                    FEDCDD_ERR_TENSOR_NAME,
                    format!("saved server state: {at} is not an aggregated global tensor"),
                )
            })?;
        if !seen.insert(gi) {
            return Err(bad(format!("{at} appears twice")));
        }
        let slots = r.u8("slots")?;
        let (has_m, has_v) = (slots & 1 != 0, slots & 2 != 0);
        if slots & !3 != 0 || (has_m && !uses_m) || (has_v && !uses_v) {
            return Err(bad(format!(
                "{at}: holds moments that {want_alg} does not keep"
            )));
        }
        let numel = r.u64("element count")?;
        let p = agg.globals[gi].layout.len();
        if numel != p as u64 {
            return Err(FfiError::new(
                FEDCDD_ERR_SHAPE,
                format!("saved server state: {at} has {numel} elements, the global tensor {p}"),
            ));
        }
        let mut read = |present: bool, what: &str| -> FfiResult<Option<Vec<f32>>> {
            if !present {
                return Ok(None);
            }
            let values = r.f32s(p, what)?;
            if let Some(j) = values.iter().position(|v| !v.is_finite()) {
                return Err(FfiError::new(
                    FEDCDD_ERR_NON_FINITE,
                    format!("saved server state: {at}: {what} holds NaN or Inf at element {j}"),
                ));
            }
            Ok(Some(values))
        };
        let m = read(has_m, "m")?;
        let v = read(has_v, "v")?;
        loaded.push((gi, m, v));
    }
    if r.pos != body.len() {
        return Err(bad("trailing bytes after the last tensor"));
    }
    // Everything checked: replace the state.
    for g in agg.globals.iter_mut() {
        g.m = None;
        g.v = None;
    }
    for (gi, m, v) in loaded {
        agg.globals[gi].m = m;
        agg.globals[gi].v = v;
    }
    agg.steps = steps;
    Ok(())
}
