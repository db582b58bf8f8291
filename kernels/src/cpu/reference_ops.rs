//! Plain reference ops: loops written to be obviously right, the yardstick of the fast path.
//!
//! RMSNorm, RoPE, attention, SwiGLU and cross-entropy are written once, generic over
//! [`Float`] (`*_generic`), so tests can run them in f64 (finite differences); the `pub` f32
//! functions with the fast path's signatures call those.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

use super::CpuWeight;
use crate::{AdamW, AttnShape, LossSum, RopeShape, Sgd, dropout_keep};

/// The float types the generic reference runs in (f32 for the backend, f64 for tests).
pub trait Float:
    Copy
    + PartialOrd
    + Debug
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f32(v: f32) -> Self;
    fn from_f64(v: f64) -> Self;
    fn from_usize(v: usize) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
}

macro_rules! impl_float {
    ($t:ty) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn from_usize(v: usize) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
        }
    };
}
impl_float!(f32);
impl_float!(f64);

// ---- elementwise -------------------------------------------------------------------------

/// `y += a · x`.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    check_same_len("axpy", ("y", y.len()), ("x", x.len()));
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `x *= a`.
pub fn scale(x: &mut [f32], a: f32) {
    for v in x.iter_mut() {
        *v *= a;
    }
}

/// `Σ x²` in f64, summed in order.
pub fn sum_squares(x: &[f32]) -> f64 {
    let mut s = 0.0f64;
    for &v in x {
        s += v as f64 * v as f64;
    }
    s
}

/// Panics naming `op` unless the two buffers (name, length) are as long as each other.
pub(crate) fn check_same_len(op: &str, a: (&str, usize), b: (&str, usize)) {
    assert_eq!(
        a.1, b.1,
        "{op}: {} has {} elements, {} {}",
        a.0, a.1, b.0, b.1
    );
}

/// Checks a dropout call (`from` and `to` as long as each other, `p` in [0, 1]); returns the
/// inverted-dropout multiplier `1/(1-p)` (f32, as PyTorch's mask division computes it).
pub(crate) fn check_dropout(op: &str, from: (&str, usize), to: (&str, usize), p: f32) -> f32 {
    check_same_len(op, from, to);
    dropout_scale(op, p)
}

/// Checks a dropout rate is in [0, 1]; returns `1/(1-p)` in f32 (every dropout path scales
/// kept values by exactly this).
pub(crate) fn dropout_scale(op: &str, p: f32) -> f32 {
    assert!((0.0..=1.0).contains(&p), "{op}: p = {p} is not in [0, 1]");
    1.0 / (1.0 - p)
}

/// `out[i] = x[i] / (1-p)` where `dropout_keep(seed, i, p)`, else 0; `p = 0` copies.
pub fn dropout_forward(x: &[f32], out: &mut [f32], p: f32, seed: u64) {
    let scale = check_dropout("dropout_forward", ("x", x.len()), ("out", out.len()), p);
    if p == 0.0 {
        out.copy_from_slice(x);
        return;
    }
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        *o = if dropout_keep(seed, i as u64, p) {
            v * scale
        } else {
            0.0
        };
    }
}

/// `dx[i] += dy[i] / (1-p)` where `dropout_keep(seed, i, p)`.
pub fn dropout_backward(dy: &[f32], dx: &mut [f32], p: f32, seed: u64) {
    let scale = check_dropout("dropout_backward", ("dy", dy.len()), ("dx", dx.len()), p);
    for (i, (d, &g)) in dx.iter_mut().zip(dy).enumerate() {
        if p == 0.0 {
            *d += g;
        } else if dropout_keep(seed, i as u64, p) {
            *d += g * scale;
        }
    }
}

// ---- RMSNorm -----------------------------------------------------------------------------

/// Checks an RMSNorm call: every `[rows, dim]` buffer (name, length) and `rstd` (`rows`).
pub(crate) fn check_norm(op: &str, bufs: &[(&str, usize)], rstd: usize, rows: usize, dim: usize) {
    for &(name, len) in bufs {
        assert_eq!(
            len,
            rows * dim,
            "{op}: {name} has {len} elements, not {rows} x {dim}"
        );
    }
    assert_eq!(rstd, rows, "{op}: rstd has {rstd} elements, not {rows}");
}

/// The weight of a `[1, dim]` (or `[dim, 1]`) norm widened to f32.
pub(crate) fn norm_weight(op: &str, w: &CpuWeight, dim: usize) -> Vec<f32> {
    assert_eq!(
        w.rows * w.cols,
        dim,
        "{op}: weight is {}x{}, not {dim} values",
        w.rows,
        w.cols
    );
    w.to_f32_vec()
}

/// HF `LlamaRMSNorm`: `rstd = 1/sqrt(mean(x²) + eps)`, `y = w · (x · rstd)`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward_generic<F: Float>(
    x: &[F],
    w: &[F],
    y: &mut [F],
    rstd: &mut [F],
    rows: usize,
    dim: usize,
    eps: F,
) {
    let op = "rmsnorm_forward";
    check_norm(op, &[("x", x.len()), ("y", y.len())], rstd.len(), rows, dim);
    assert_eq!(
        w.len(),
        dim,
        "{op}: weight has {} values, not {dim}",
        w.len()
    );
    for r in 0..rows {
        let xr = &x[r * dim..(r + 1) * dim];
        let mut ss = F::ZERO;
        for &v in xr {
            ss += v * v;
        }
        let rs = F::ONE / (ss / F::from_usize(dim) + eps).sqrt();
        rstd[r] = rs;
        for c in 0..dim {
            y[r * dim + c] = w[c] * (xr[c] * rs);
        }
    }
}

/// `dx (+)= rstd · (w ⊙ dy − x · rstd² · Σ(dy ⊙ w ⊙ x) / dim)` (the weight is frozen).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward_generic<F: Float>(
    dy: &[F],
    x: &[F],
    w: &[F],
    rstd: &[F],
    dx: &mut [F],
    rows: usize,
    dim: usize,
    accumulate: bool,
) {
    let op = "rmsnorm_backward";
    let bufs = [("dy", dy.len()), ("x", x.len()), ("dx", dx.len())];
    check_norm(op, &bufs, rstd.len(), rows, dim);
    assert_eq!(
        w.len(),
        dim,
        "{op}: weight has {} values, not {dim}",
        w.len()
    );
    for (r, &rs) in rstd.iter().enumerate() {
        let o = r * dim;
        let mut dot = F::ZERO;
        for c in 0..dim {
            dot += dy[o + c] * w[c] * x[o + c];
        }
        let coef = dot * rs * rs / F::from_usize(dim);
        for c in 0..dim {
            let g = rs * (w[c] * dy[o + c] - x[o + c] * coef);
            if accumulate {
                dx[o + c] += g;
            } else {
                dx[o + c] = g;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward(
    x: &[f32],
    w: &CpuWeight,
    y: &mut [f32],
    rstd: &mut [f32],
    rows: usize,
    dim: usize,
    eps: f32,
) {
    let w = norm_weight("rmsnorm_forward", w, dim);
    rmsnorm_forward_generic(x, &w, y, rstd, rows, dim, eps)
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dy: &[f32],
    x: &[f32],
    w: &CpuWeight,
    rstd: &[f32],
    dx: &mut [f32],
    rows: usize,
    dim: usize,
    accumulate: bool,
) {
    let w = norm_weight("rmsnorm_backward", w, dim);
    rmsnorm_backward_generic(dy, x, &w, rstd, dx, rows, dim, accumulate)
}

// ---- RoPE --------------------------------------------------------------------------------

/// Checks a RoPE call; returns `head_dim / 2`.
pub(crate) fn check_rope(x_len: usize, cos_len: usize, sin_len: usize, s: RopeShape) -> usize {
    let op = "rope";
    assert!(
        s.head_dim.is_multiple_of(2),
        "{op}: head_dim {} is odd",
        s.head_dim
    );
    let len = s.batch * s.seq * s.heads * s.head_dim;
    assert_eq!(
        x_len, len,
        "{op}: x has {x_len} elements, not {len} ({s:?})"
    );
    let half = s.head_dim / 2;
    let need = (s.pos0 + s.seq) * half;
    assert!(
        cos_len >= need && sin_len >= need,
        "{op}: positions {}..{} need {need} table entries, cos has {cos_len}, sin {sin_len}",
        s.pos0,
        s.pos0 + s.seq
    );
    half
}

/// HF `rotate_half` RoPE in place; `inverse` rotates by the negative angle.
pub fn rope_generic<F: Float>(x: &mut [F], cos: &[F], sin: &[F], s: RopeShape, inverse: bool) {
    let half = check_rope(x.len(), cos.len(), sin.len(), s);
    let d = s.head_dim;
    for b in 0..s.batch {
        for t in 0..s.seq {
            let pos = s.pos0 + t;
            for h in 0..s.heads {
                let base = ((b * s.seq + t) * s.heads + h) * d;
                for i in 0..half {
                    let c = cos[pos * half + i];
                    let sn = if inverse {
                        -sin[pos * half + i]
                    } else {
                        sin[pos * half + i]
                    };
                    let x1 = x[base + i];
                    let x2 = x[base + half + i];
                    x[base + i] = x1 * c - x2 * sn;
                    x[base + half + i] = x2 * c + x1 * sn;
                }
            }
        }
    }
}

pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], s: RopeShape, inverse: bool) {
    rope_generic(x, cos, sin, s, inverse)
}

// ---- attention ---------------------------------------------------------------------------

/// Checks an attention call's buffers against its shape; returns the GQA group size.
pub(crate) fn check_attn(
    op: &str,
    s: AttnShape,
    q: usize,
    kv: (usize, usize),
    out: usize,
) -> usize {
    assert!(
        s.kv_heads > 0 && s.q_heads.is_multiple_of(s.kv_heads),
        "{op}: {} query heads do not split into {} KV heads",
        s.q_heads,
        s.kv_heads
    );
    assert!(s.head_dim > 0, "{op}: head_dim is 0");
    assert!(
        s.kv_len <= s.kv_stride,
        "{op}: kv_len {} exceeds kv_stride {}",
        s.kv_len,
        s.kv_stride
    );
    let q_len = s.batch * s.q_len * s.q_heads * s.head_dim;
    let kv_len = s.batch * s.kv_stride * s.kv_heads * s.head_dim;
    assert_eq!(q, q_len, "{op}: q has {q} elements, not {q_len} ({s:?})");
    assert_eq!(
        out, q_len,
        "{op}: output has {out} elements, not {q_len} ({s:?})"
    );
    assert_eq!(
        kv.0, kv_len,
        "{op}: k has {} elements, not {kv_len} ({s:?})",
        kv.0
    );
    assert_eq!(
        kv.1, kv_len,
        "{op}: v has {} elements, not {kv_len} ({s:?})",
        kv.1
    );
    s.q_heads / s.kv_heads
}

/// Checks an attention forward (buffer lengths); returns the GQA group size.
pub(crate) fn check_attn_forward(
    s: AttnShape,
    q: usize,
    kv: (usize, usize),
    out: usize,
    lse: usize,
) -> usize {
    let op = "attention_forward";
    let group = check_attn(op, s, q, kv, out);
    check_lse(op, s, lse);
    group
}

fn check_lse(op: &str, s: AttnShape, lse: usize) {
    let want = s.batch * s.q_heads * s.q_len;
    assert_eq!(
        lse, want,
        "{op}: lse has {lse} elements, not {want} ({s:?})"
    );
}

/// Checks an attention backward (buffer lengths); returns the GQA group size.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_attn_backward(
    s: AttnShape,
    q: usize,
    kv: (usize, usize),
    out: usize,
    lse: usize,
    dout: usize,
    dq: usize,
    dkv: (usize, usize),
) -> usize {
    let op = "attention_backward";
    let group = check_attn(op, s, q, kv, out);
    for (name, len, want) in [
        ("dout", dout, q),
        ("dq", dq, q),
        ("dk", dkv.0, kv.0),
        ("dv", dkv.1, kv.1),
    ] {
        assert_eq!(
            len, want,
            "{op}: {name} has {len} elements, not {want} ({s:?})"
        );
    }
    check_lse(op, s, lse);
    group
}

/// Number of keys query `i` sees: `min(q_pos0 + i + 1, kv_len)`.
pub(crate) fn visible_keys(s: AttnShape, i: usize) -> usize {
    (s.q_pos0 + i + 1).min(s.kv_len)
}

/// Causal GQA attention, one query at a time: scores, max, exponentials, weighted sum.
/// A query that sees no key (`kv_len = 0`) gets a zero output and `lse = -inf`.
pub fn attention_forward_generic<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    out: &mut [F],
    lse: &mut [F],
    s: AttnShape,
) {
    let (kv, lse_len) = ((k.len(), v.len()), lse.len());
    let group = check_attn_forward(s, q.len(), kv, out.len(), lse_len);
    let d = s.head_dim;
    let scale = F::from_f32(s.scale);
    let mut scores = Vec::with_capacity(s.kv_len);
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            let kvh = h / group;
            for i in 0..s.q_len {
                let qo = ((b * s.q_len + i) * s.q_heads + h) * d;
                let qr = &q[qo..qo + d];
                let n = visible_keys(s, i);
                scores.clear();
                for j in 0..n {
                    let ko = ((b * s.kv_stride + j) * s.kv_heads + kvh) * d;
                    let mut dot = F::ZERO;
                    for c in 0..d {
                        dot += qr[c] * k[ko + c];
                    }
                    scores.push(dot * scale);
                }
                let mut m = F::NEG_INFINITY;
                for &sc in &scores {
                    if sc > m {
                        m = sc;
                    }
                }
                let o = &mut out[qo..qo + d];
                o.fill(F::ZERO);
                let li = (b * s.q_heads + h) * s.q_len + i;
                if n == 0 {
                    lse[li] = F::NEG_INFINITY;
                    continue;
                }
                let mut l = F::ZERO;
                for (j, &sc) in scores.iter().enumerate() {
                    let p = (sc - m).exp();
                    l += p;
                    let vo = ((b * s.kv_stride + j) * s.kv_heads + kvh) * d;
                    for c in 0..d {
                        o[c] += p * v[vo + c];
                    }
                }
                for x in o.iter_mut() {
                    *x = *x / l;
                }
                lse[li] = m + l.ln();
            }
        }
    }
}

/// Backward of [`attention_forward_generic`], one query at a time:
/// `p = exp(s − lse)`, `Δ = dO·O`, `dv += p·dO`, `ds = p·(dO·v − Δ)`, `dq += scale·ds·k`,
/// `dk += scale·ds·q`. Overwrites `dq`, `dk`, `dv` (rows `kv_len..kv_stride` get zeros).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_generic<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    out: &[F],
    lse: &[F],
    dout: &[F],
    dq: &mut [F],
    dk: &mut [F],
    dv: &mut [F],
    s: AttnShape,
) {
    let (kv, dkv) = ((k.len(), v.len()), (dk.len(), dv.len()));
    let group = check_attn_backward(
        s,
        q.len(),
        kv,
        out.len(),
        lse.len(),
        dout.len(),
        dq.len(),
        dkv,
    );
    let d = s.head_dim;
    let scale = F::from_f32(s.scale);
    dq.fill(F::ZERO);
    dk.fill(F::ZERO);
    dv.fill(F::ZERO);
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            let kvh = h / group;
            for i in 0..s.q_len {
                let n = visible_keys(s, i);
                if n == 0 {
                    continue;
                }
                let qo = ((b * s.q_len + i) * s.q_heads + h) * d;
                let l = lse[(b * s.q_heads + h) * s.q_len + i];
                let mut delta = F::ZERO;
                for c in 0..d {
                    delta += dout[qo + c] * out[qo + c];
                }
                for j in 0..n {
                    let ko = ((b * s.kv_stride + j) * s.kv_heads + kvh) * d;
                    let mut dot = F::ZERO;
                    let mut dp = F::ZERO;
                    for c in 0..d {
                        dot += q[qo + c] * k[ko + c];
                        dp += dout[qo + c] * v[ko + c];
                    }
                    let p = (dot * scale - l).exp();
                    let ds = p * (dp - delta) * scale;
                    for c in 0..d {
                        dv[ko + c] += p * dout[qo + c];
                        dq[qo + c] += ds * k[ko + c];
                        dk[ko + c] += ds * q[qo + c];
                    }
                }
            }
        }
    }
}

pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
    s: AttnShape,
) {
    attention_forward_generic(q, k, v, out, lse, s)
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    s: AttnShape,
) {
    attention_backward_generic(q, k, v, out, lse, dout, dq, dk, dv, s)
}

// ---- SwiGLU ------------------------------------------------------------------------------

pub(crate) fn check_swiglu_forward(gate: usize, up: usize, out: usize) {
    assert!(
        gate == up && up == out,
        "swiglu_forward: gate {gate}, up {up}, out {out} elements"
    );
}

pub(crate) fn check_swiglu_backward(n: usize, up: usize, dout: usize, dgate: usize, dup: usize) {
    assert!(
        up == n && dout == n && dgate == n && dup == n,
        "swiglu_backward: gate {n}, up {up}, dout {dout}, dgate {dgate}, dup {dup} elements"
    );
}

/// `out = silu(gate) · up` with `silu(g) = g / (1 + exp(−g))` (PyTorch's form).
pub fn swiglu_forward_generic<F: Float>(gate: &[F], up: &[F], out: &mut [F]) {
    check_swiglu_forward(gate.len(), up.len(), out.len());
    for i in 0..out.len() {
        let g = gate[i];
        out[i] = g / (F::ONE + (-g).exp()) * up[i];
    }
}

/// `dgate = dout · up · σ(g) · (1 + g · (1 − σ(g)))`, `dup = dout · silu(g)`.
pub fn swiglu_backward_generic<F: Float>(
    gate: &[F],
    up: &[F],
    dout: &[F],
    dgate: &mut [F],
    dup: &mut [F],
) {
    let n = gate.len();
    check_swiglu_backward(n, up.len(), dout.len(), dgate.len(), dup.len());
    for i in 0..n {
        let g = gate[i];
        let sig = F::ONE / (F::ONE + (-g).exp());
        dgate[i] = dout[i] * up[i] * sig * (F::ONE + g * (F::ONE - sig));
        dup[i] = dout[i] * (g * sig);
    }
}

pub fn swiglu_forward(gate: &[f32], up: &[f32], out: &mut [f32]) {
    swiglu_forward_generic(gate, up, out)
}

pub fn swiglu_backward(gate: &[f32], up: &[f32], dout: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    swiglu_backward_generic(gate, up, dout, dgate, dup)
}

// ---- embedding and loss ------------------------------------------------------------------

/// Checks every id against a `vocab`-row table; panics naming `op` otherwise.
pub(crate) fn check_ids(op: &str, ids: &[i32], vocab: usize) {
    for (t, &id) in ids.iter().enumerate() {
        assert!(
            id >= 0 && (id as usize) < vocab,
            "{op}: id {id} at position {t} is outside the table of {vocab} rows"
        );
    }
}

/// Checks an embedding lookup (`out` holds `ids.len()` rows of the table's); returns `dim`.
pub(crate) fn check_embedding_forward(table: &CpuWeight, ids: &[i32], out: usize) -> usize {
    let op = "embedding_forward";
    let dim = table.cols;
    assert_eq!(
        out,
        ids.len() * dim,
        "{op}: out has {out} elements, not {} x {dim}",
        ids.len()
    );
    check_ids(op, ids, table.rows);
    dim
}

/// `out[t, :] = table[ids[t], :]`.
pub fn embedding_forward(table: &CpuWeight, ids: &[i32], out: &mut [f32]) {
    let dim = check_embedding_forward(table, ids, out.len());
    for (t, &id) in ids.iter().enumerate() {
        table.row_f32(id as usize, &mut out[t * dim..(t + 1) * dim]);
    }
}

/// Checks an embedding backward; returns `(vocab, dim)`.
pub(crate) fn check_embedding_backward(
    ids: &[i32],
    dout_len: usize,
    dtable_len: usize,
) -> (usize, usize) {
    let op = "embedding_backward";
    if ids.is_empty() {
        assert_eq!(dout_len, 0, "{op}: no ids but dout has {dout_len} elements");
        return (0, 0);
    }
    assert!(
        dout_len.is_multiple_of(ids.len()),
        "{op}: dout has {dout_len} elements for {} ids",
        ids.len()
    );
    let dim = dout_len / ids.len();
    assert!(
        dim > 0 && dtable_len.is_multiple_of(dim),
        "{op}: dtable has {dtable_len} elements, not a multiple of dim {dim}"
    );
    let vocab = dtable_len / dim;
    check_ids(op, ids, vocab);
    (vocab, dim)
}

/// `dtable[ids[t], :] += dout[t, :]`, in token order.
pub fn embedding_backward(ids: &[i32], dout: &[f32], dtable: &mut [f32]) {
    let (_, dim) = check_embedding_backward(ids, dout.len(), dtable.len());
    for (t, &id) in ids.iter().enumerate() {
        let row = &mut dtable[id as usize * dim..(id as usize + 1) * dim];
        for (d, &g) in row.iter_mut().zip(&dout[t * dim..(t + 1) * dim]) {
            *d += g;
        }
    }
}

/// Checks a cross-entropy call's shapes and targets.
pub(crate) fn check_cross_entropy(
    logits: usize,
    targets: &[i32],
    row_loss: usize,
    vocab: usize,
    ignore_index: i32,
) {
    let op = "cross_entropy";
    let rows = targets.len();
    assert_eq!(
        logits,
        rows * vocab,
        "{op}: logits have {logits} elements, not {rows} x {vocab}"
    );
    assert_eq!(
        row_loss, rows,
        "{op}: row_loss has {row_loss} elements for {rows} rows"
    );
    for (r, &t) in targets.iter().enumerate() {
        assert!(
            t == ignore_index || (t >= 0 && (t as usize) < vocab),
            "{op}: target {t} of row {r} is outside the vocabulary of {vocab} (ignore_index {ignore_index})"
        );
    }
}

/// Softmax cross-entropy, each row in f64: `loss = m + ln Σ exp(x − m) − x[target]`;
/// with `grad_scale = g` the row becomes `g · (softmax − onehot)`.
pub fn cross_entropy_generic<F: Float>(
    logits: &mut [F],
    targets: &[i32],
    row_loss: &mut [F],
    vocab: usize,
    ignore_index: i32,
    grad_scale: Option<F>,
) -> LossSum {
    check_cross_entropy(logits.len(), targets, row_loss.len(), vocab, ignore_index);
    let mut total = LossSum { sum: 0.0, count: 0 };
    for (r, &t) in targets.iter().enumerate() {
        let row = &mut logits[r * vocab..(r + 1) * vocab];
        if t == ignore_index {
            row_loss[r] = F::ZERO;
            if grad_scale.is_some() {
                row.fill(F::ZERO);
            }
            continue;
        }
        let t = t as usize;
        let mut m = f64::NEG_INFINITY;
        for &x in row.iter() {
            m = m.max(x.to_f64());
        }
        let mut sum = 0.0f64;
        for &x in row.iter() {
            sum += (x.to_f64() - m).exp();
        }
        let lse = m + sum.ln();
        let loss = lse - row[t].to_f64();
        row_loss[r] = F::from_f64(loss);
        total.sum += loss;
        total.count += 1;
        if let Some(g) = grad_scale {
            let g = g.to_f64();
            for (j, x) in row.iter_mut().enumerate() {
                let p = (x.to_f64() - lse).exp();
                let onehot = if j == t { 1.0 } else { 0.0 };
                *x = F::from_f64(g * (p - onehot));
            }
        }
    }
    total
}

pub fn cross_entropy(
    logits: &mut [f32],
    targets: &[i32],
    row_loss: &mut [f32],
    vocab: usize,
    ignore_index: i32,
    grad_scale: Option<f32>,
) -> LossSum {
    cross_entropy_generic(logits, targets, row_loss, vocab, ignore_index, grad_scale)
}

// ---- optimizers --------------------------------------------------------------------------

/// The per-step scalars of `torch.optim.AdamW`, computed as Python floats (f64) and passed
/// to tensor ops as f32, as PyTorch does.
#[derive(Clone, Copy)]
pub(crate) struct AdamScalars {
    pub(crate) decay: Option<f32>,
    /// `1 − β1`: the weight of `exp_avg.lerp_(grad, 1 − β1)`.
    pub(crate) lerp_w: f32,
    pub(crate) beta2: f32,
    pub(crate) one_minus_beta2: f32,
    pub(crate) neg_step_size: f32,
    pub(crate) bias_correction2_sqrt: f32,
    pub(crate) eps: f32,
}

impl AdamScalars {
    pub(crate) fn new(hp: AdamW, step: u64) -> Self {
        assert!(step >= 1, "adamw_step: step counts from 1, got {step}");
        let (lr, b1, b2) = (hp.lr as f64, hp.beta1 as f64, hp.beta2 as f64);
        let wd = hp.weight_decay as f64;
        // `beta ** step` with a float exponent, as Python evaluates it.
        let t = step as f64;
        let bias_correction1 = 1.0 - b1.powf(t);
        let bias_correction2 = 1.0 - b2.powf(t);
        AdamScalars {
            decay: (wd != 0.0).then_some((1.0 - lr * wd) as f32),
            lerp_w: (1.0 - b1) as f32,
            beta2: hp.beta2,
            one_minus_beta2: (1.0 - b2) as f32,
            neg_step_size: (-(lr / bias_correction1)) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: hp.eps,
        }
    }

    /// One element, with PyTorch's CPU kernels' rounding: `lerp` and `addcmul` fuse their
    /// multiply-add, `addcdiv` computes `p + (value·m)/denom`.
    #[inline(always)]
    pub(crate) fn update(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        if let Some(decay) = self.decay {
            *p *= decay;
        }
        // ATen's lerp: `self + w·(end − self)` for |w| < 0.5, else `end + (w − 1)·(end − self)`.
        let w = self.lerp_w;
        *m = if w.abs() < 0.5 {
            w.mul_add(g - *m, *m)
        } else {
            (w - 1.0).mul_add(g - *m, g)
        };
        *v = (self.one_minus_beta2 * g).mul_add(g, *v * self.beta2);
        let denom = v.sqrt() / self.bias_correction2_sqrt + self.eps;
        *p += self.neg_step_size * *m / denom;
    }
}

/// `torch.optim.AdamW`'s single-tensor step, element by element.
pub fn adamw_step(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    hp: AdamW,
    step: u64,
) {
    check_optimizer("adamw_step", param.len(), grad.len(), &[m.len(), v.len()]);
    let k = AdamScalars::new(hp, step);
    for i in 0..param.len() {
        k.update(&mut param[i], grad[i], &mut m[i], &mut v[i]);
    }
}

pub(crate) fn check_optimizer(op: &str, param: usize, grad: usize, state: &[usize]) {
    assert_eq!(grad, param, "{op}: grad has {grad} elements, param {param}");
    for &s in state {
        assert_eq!(
            s, param,
            "{op}: optimizer state has {s} elements, param {param}"
        );
    }
}

/// The scalars of `torch.optim.SGD` as f32 tensor-op arguments.
#[derive(Clone, Copy)]
pub(crate) struct SgdScalars {
    weight_decay: Option<f32>,
    momentum: Option<f32>,
    one_minus_dampening: f32,
    nesterov: bool,
    neg_lr: f32,
    first: bool,
}

impl SgdScalars {
    pub(crate) fn new(hp: Sgd, first: bool) -> Self {
        SgdScalars {
            weight_decay: (hp.weight_decay != 0.0).then_some(hp.weight_decay),
            momentum: (hp.momentum != 0.0).then_some(hp.momentum),
            one_minus_dampening: (1.0 - hp.dampening as f64) as f32,
            nesterov: hp.nesterov,
            neg_lr: -hp.lr,
            first,
        }
    }

    pub(crate) fn uses_buffer(&self) -> bool {
        self.momentum.is_some()
    }

    /// One element; `add(x, alpha=a)` is ATen's fused `x·a + self`.
    #[inline(always)]
    pub(crate) fn update(&self, p: &mut f32, g: f32, buf: &mut f32) {
        let mut g = g;
        if let Some(wd) = self.weight_decay {
            g = p.mul_add(wd, g);
        }
        if let Some(mu) = self.momentum {
            *buf = if self.first {
                g
            } else {
                g.mul_add(self.one_minus_dampening, *buf * mu)
            };
            g = if self.nesterov {
                buf.mul_add(mu, g)
            } else {
                *buf
            };
        }
        *p = g.mul_add(self.neg_lr, *p);
    }
}

/// `torch.optim.SGD`'s single-tensor step, element by element.
pub fn sgd_step(param: &mut [f32], grad: &[f32], momentum_buf: &mut [f32], hp: Sgd, first: bool) {
    let k = SgdScalars::new(hp, first);
    if k.uses_buffer() {
        check_optimizer("sgd_step", param.len(), grad.len(), &[momentum_buf.len()]);
        for i in 0..param.len() {
            k.update(&mut param[i], grad[i], &mut momentum_buf[i]);
        }
    } else {
        check_optimizer("sgd_step", param.len(), grad.len(), &[]);
        let mut unused = 0.0;
        for i in 0..param.len() {
            k.update(&mut param[i], grad[i], &mut unused);
        }
    }
}
