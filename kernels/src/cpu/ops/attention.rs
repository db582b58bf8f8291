//! Flash-attention style causal GQA on the CPU.
//!
//! Forward: one task per (batch, query head, tile of [`BQ`] queries). The task walks the key
//! tiles of [`BK`] keys its queries can see (fully masked tiles are never visited), computes
//! the score tile `S = Q·Kᵀ` with a register-blocked micro-kernel, folds it into a running
//! max / sum / output per query row (online softmax), and finally writes `O / l` and
//! `lse = m + ln l`. Nothing larger than one `BQ x BK` tile of scores exists at a time.
//!
//! Backward: one task per (batch, KV head), so that the task owns the gradients it writes:
//! `dK`, `dV` of its KV head and `dQ` of the query heads that read it (GQA). For each key
//! tile it keeps `dK`, `dV` accumulators and walks every query tile (of every head in the
//! group) that sees the key tile: it recomputes `P = exp(scale·Q·Kᵀ − lse)` from the saved
//! log-sum-exp, then `dV += Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − Δ)` with
//! `Δ = rowsum(dO ⊙ O)`, `dK += dSᵀ·Q`, `dQ += dS·K` (scale applied once at the end).
//!
//! Each op first copies its inputs, in parallel, into head-major zero-padded buffers that
//! the micro-kernel reads in place (head_dim padded to a multiple of 16, query rows to a
//! multiple of 8, keys to a multiple of [`BK`]; keys also transposed): `[b, h, i, dp]` for
//! queries and output gradients, `[b, kvh, j, dp]` and `[b, kvh, dp, j]` for keys/values.
//! Tasks write into scratch laid out per task, and a final parallel pass moves the results
//! into the `[batch, seq, heads, head_dim]` layout.

use rayon::prelude::*;

use super::scratch::Scratch;
use super::simd::{self, Isa, LANES, Mode, multiversion};
use crate::AttnShape;
use crate::cpu::reference_ops::check_attn;

/// Queries per tile.
const BQ: usize = 64;
/// Keys per tile.
const BK: usize = 64;
/// Rows of every tile are padded to a multiple of this (the micro-kernel's row block).
const ROWS: usize = 8;

fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// `C[m×n] (+)= A·B` for `m % 8 == 0`, `n % 16 == 0`: `A(i,p) = a[i·a_rs + p·a_cs]`,
/// row `p` of B is `b[p·ldb..][..n]`, row `i` of C is `c[i·ldc..][..n]`.
/// AVX-512: 8x32 / 8x16 register tiles; AVX2: 4x16; otherwise plain loops over C's rows.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gemm<M: Mode>(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(
        m.is_multiple_of(ROWS) && n.is_multiple_of(LANES),
        "attention gemm: {m}x{n} is not padded"
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * ldc + n <= c.len(),
        "attention gemm: C is too short"
    );
    if k > 0 {
        assert!(
            (m - 1) * a_rs + (k - 1) * a_cs < a.len(),
            "attention gemm: A is too short"
        );
        assert!(
            (k - 1) * ldb + n <= b.len(),
            "attention gemm: B is too short"
        );
    }
    match M::ISA {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
            let mut j = 0;
            while j < n {
                let wide = j + 32 <= n;
                for i in (0..m).step_by(8) {
                    // SAFETY: `M::ISA == Avx512` only in code `multiversion!` runs after
                    // detecting AVX-512. The tile reads A rows i..i+8 at columns < k, B
                    // rows < k at columns j..j+32 (or +16) ≤ n, and writes C rows i..i+8
                    // at those columns: all inside the bounds asserted above.
                    unsafe {
                        let (a0, b0, c0) = (ap.add(i * a_rs), bp.add(j), cp.add(i * ldc + j));
                        if wide {
                            x86::tile_avx512::<2>(k, a0, a_rs, a_cs, b0, ldb, c0, ldc, accumulate)
                        } else {
                            x86::tile_avx512::<1>(k, a0, a_rs, a_cs, b0, ldb, c0, ldc, accumulate)
                        }
                    }
                }
                j += if wide { 32 } else { 16 };
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
            for j in (0..n).step_by(16) {
                for i in (0..m).step_by(4) {
                    // SAFETY: as above, for AVX2+FMA and 4x16 tiles.
                    unsafe {
                        let (a0, b0, c0) = (ap.add(i * a_rs), bp.add(j), cp.add(i * ldc + j));
                        x86::tile_avx2(k, a0, a_rs, a_cs, b0, ldb, c0, ldc, accumulate)
                    }
                }
            }
        }
        _ => {
            for i in 0..m {
                let crow = &mut c[i * ldc..i * ldc + n];
                if !accumulate {
                    crow.fill(0.0);
                }
                for p in 0..k {
                    let av = a[i * a_rs + p * a_cs];
                    for (y, &x) in crow.iter_mut().zip(&b[p * ldb..p * ldb + n]) {
                        *y = M::fma(av, x, *y);
                    }
                }
            }
        }
    }
}

// The AVX-512 intrinsics are stable since Rust 1.89, after the workspace's rust-version.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::incompatible_msrv)]
mod x86 {
    use std::arch::x86_64::*;

    /// `C[8 × 16·NV] (+)= A[8 × k]·B[k × 16·NV]`, accumulated in registers.
    ///
    /// # Safety
    /// AVX-512F must be available; `a` must be readable at `r·a_rs + p·a_cs`, `b` at
    /// `p·ldb + 0..16·NV` and `c` read/writable at `r·ldc + 0..16·NV` for `r < 8`, `p < k`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512<const NV: usize>(
        k: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; 8];
        for p in 0..k {
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                // SAFETY: inside B by the caller's contract.
                *x = unsafe { _mm512_loadu_ps(b.add(p * ldb + 16 * v)) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: inside A by the caller's contract.
                let av = _mm512_set1_ps(unsafe { *a.add(r * a_rs + p * a_cs) });
                for v in 0..NV {
                    acc[v] = _mm512_fmadd_ps(av, bv[v], acc[v]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, &x) in acc.iter().enumerate() {
                // SAFETY: inside C by the caller's contract.
                unsafe {
                    let cp = c.add(r * ldc + 16 * v);
                    let y = if accumulate {
                        _mm512_add_ps(_mm512_loadu_ps(cp), x)
                    } else {
                        x
                    };
                    _mm512_storeu_ps(cp, y);
                }
            }
        }
    }

    /// `C[4 × 16] (+)= A[4 × k]·B[k × 16]` in AVX2 registers.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; bounds as for [`tile_avx512`] with 4 rows, 16 columns.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(
        k: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        for p in 0..k {
            // SAFETY: inside B by the caller's contract.
            let (b0, b1) = unsafe {
                (
                    _mm256_loadu_ps(b.add(p * ldb)),
                    _mm256_loadu_ps(b.add(p * ldb + 8)),
                )
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: inside A by the caller's contract.
                let av = _mm256_set1_ps(unsafe { *a.add(r * a_rs + p * a_cs) });
                acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, &x) in acc.iter().enumerate() {
                // SAFETY: inside C by the caller's contract.
                unsafe {
                    let cp = c.add(r * ldc + 8 * v);
                    let y = if accumulate {
                        _mm256_add_ps(_mm256_loadu_ps(cp), x)
                    } else {
                        x
                    };
                    _mm256_storeu_ps(cp, y);
                }
            }
        }
    }
}

/// Per-task work buffers (a score tile and its gradient, output / dK / dV accumulators).
struct Work {
    /// `[BQ, BK]` scores, then probabilities.
    s: Vec<f32>,
    /// `[BQ, BK]` dP, then dS (backward).
    ds: Vec<f32>,
    /// `[BQ, dp]` queries and output accumulators (forward).
    q: Vec<f32>,
    o: Vec<f32>,
    /// `[BK, dp]` dK and dV accumulators (backward).
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// Per-row running max and sum (forward).
    m: Vec<f32>,
    l: Vec<f32>,
}

impl Work {
    fn forward(dp: usize) -> Self {
        Work {
            s: vec![0.0; BQ * BK],
            ds: Vec::new(),
            q: vec![0.0; BQ * dp],
            o: vec![0.0; BQ * dp],
            dk: Vec::new(),
            dv: Vec::new(),
            m: vec![0.0; BQ],
            l: vec![0.0; BQ],
        }
    }

    fn backward(dp: usize) -> Self {
        Work {
            s: vec![0.0; BQ * BK],
            ds: vec![0.0; BQ * BK],
            q: Vec::new(),
            o: Vec::new(),
            dk: vec![0.0; BK * dp],
            dv: vec![0.0; BK * dp],
            m: Vec::new(),
            l: Vec::new(),
        }
    }
}

/// Shape facts every task needs.
#[derive(Clone, Copy)]
struct Geometry {
    s: AttnShape,
    d: usize,
    /// head_dim padded to a multiple of 16.
    dp: usize,
    group: usize,
    /// Query rows per (batch, head) in the padded copies (a multiple of 8).
    tq_pad: usize,
    /// Key rows per (batch, KV head) in the padded copies (a multiple of BK, ≥ kv_len).
    kv_pad: usize,
}

impl Geometry {
    fn new(s: AttnShape, group: usize) -> Self {
        let d = s.head_dim;
        Geometry {
            s,
            d,
            dp: round_up(d, LANES),
            group,
            tq_pad: round_up(s.q_len, ROWS),
            kv_pad: round_up(s.kv_len, BK),
        }
    }

    /// The last key index query `i` may see, relative to key `j0`, capped at the last valid
    /// key of the tile (`nk` keys from `j0`); negative when it sees none of them.
    fn last_visible(&self, i: usize, j0: usize, nk: usize) -> isize {
        let causal = (self.s.q_pos0 + i) as isize - j0 as isize;
        causal.min(nk as isize - 1)
    }
}

multiversion! { fn copy_rows(dst: &mut [f32], dp: usize, src: &[f32], stride: usize, d: usize) = copy_rows_impl; }
/// Copies rows of `d` floats, row `t` from `src[t·stride..]`, to `dst[t·dp..]` for as many
/// rows as `dst` holds (`dst.len() / dp`, and no more than `src` has).
#[inline(always)]
fn copy_rows_impl<M: Mode>(dst: &mut [f32], dp: usize, src: &[f32], stride: usize, d: usize) {
    for (t, row) in dst.chunks_exact_mut(dp).enumerate() {
        let Some(from) = src.get(t * stride..t * stride + d) else {
            break;
        };
        let (to, from) = (&mut row[..d], from);
        let mut to16 = to.chunks_exact_mut(LANES);
        let mut from16 = from.chunks_exact(LANES);
        for (x, y) in (&mut to16).zip(&mut from16) {
            let x: &mut [f32; LANES] = x.try_into().expect("16");
            let y: &[f32; LANES] = y.try_into().expect("16");
            *x = *y;
        }
        for (x, y) in to16.into_remainder().iter_mut().zip(from16.remainder()) {
            *x = *y;
        }
    }
}

/// `[batch, len, heads, d]` (rows `0..rows` of each batch) → `[batch, heads, rows_pad, dp]`,
/// zero-padded.
#[allow(clippy::too_many_arguments)]
fn pad_head_major(
    src: &[f32],
    batch: usize,
    len: usize,
    rows: usize,
    heads: usize,
    d: usize,
    rows_pad: usize,
    dp: usize,
) -> Scratch {
    let mut out = Scratch::zeroed(batch * heads * rows_pad * dp);
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(rows_pad * dp)
        .enumerate()
        .for_each(|(bh, o)| {
            let (b, h) = (bh / heads, bh % heads);
            let start = (b * len * heads + h) * d;
            let end = start + rows.saturating_sub(1) * heads * d + d;
            if rows > 0 {
                copy_rows(&mut o[..rows * dp], dp, &src[start..end], heads * d, d);
            }
        });
    out
}

/// `[batch, len, heads, d]` (rows `0..rows`) → `[batch, heads, dp, cols_pad]`: each head
/// transposed, zero-padded.
#[allow(clippy::too_many_arguments)]
fn transpose_head_major(
    src: &[f32],
    batch: usize,
    len: usize,
    rows: usize,
    heads: usize,
    d: usize,
    cols_pad: usize,
    dp: usize,
) -> Scratch {
    let mut out = Scratch::zeroed(batch * heads * dp * cols_pad);
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(dp * cols_pad)
        .enumerate()
        .for_each(|(bh, o)| {
            let (b, h) = (bh / heads, bh % heads);
            for j in 0..rows {
                let s = ((b * len + j) * heads + h) * d;
                for (dd, &x) in src[s..s + d].iter().enumerate() {
                    o[dd * cols_pad + j] = x;
                }
            }
        });
    out
}

// ---- forward -----------------------------------------------------------------------------

/// One forward task's inputs: its head's queries (`q[i·q_stride..][..d]` is query `i`), its
/// KV head's transposed keys `[dp, kv_pad]` and padded values `[kv_pad, dp]`.
struct ForwardTile<'a> {
    q: &'a [f32],
    q_stride: usize,
    kt: &'a [f32],
    v: &'a [f32],
    i0: usize,
}

multiversion! {
    fn forward_tile(g: &Geometry, w: &mut Work, x: &ForwardTile<'_>, out: &mut [f32], lse: &mut [f32])
        = forward_tile_impl;
}

/// One forward task: queries `i0..i0 + lse.len()` of one head; writes their outputs to
/// `out` (`[rows, d]`) and log-sum-exps to `lse`.
#[inline(always)]
fn forward_tile_impl<M: Mode>(
    g: &Geometry,
    w: &mut Work,
    x: &ForwardTile<'_>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (s, d, dp) = (g.s, g.d, g.dp);
    let (i0, rows) = (x.i0, lse.len());
    let mp = round_up(rows, ROWS);
    let scale = s.scale;
    w.q[rows * dp..mp * dp].fill(0.0);
    let q_end = (i0 + rows - 1) * x.q_stride + d;
    copy_rows_impl::<M>(
        &mut w.q[..rows * dp],
        dp,
        &x.q[i0 * x.q_stride..q_end],
        x.q_stride,
        d,
    );
    let q = &w.q[..mp * dp];
    w.o[..mp * dp].fill(0.0);
    w.m[..mp].fill(f32::NEG_INFINITY);
    w.l[..mp].fill(0.0);
    let kv_end = (s.q_pos0 + i0 + rows).min(s.kv_len);
    for j0 in (0..kv_end).step_by(BK) {
        let nk = BK.min(kv_end - j0);
        gemm::<M>(
            mp,
            BK,
            dp,
            q,
            dp,
            1,
            &x.kt[j0..],
            g.kv_pad,
            &mut w.s,
            BK,
            false,
        );
        for r in 0..mp {
            let srow: &mut [f32; BK] = (&mut w.s[r * BK..(r + 1) * BK]).try_into().expect("BK");
            let last = g.last_visible(i0 + r, j0, nk);
            if last < 0 {
                // This query sees none of these keys: no contribution.
                srow.fill(0.0);
                continue;
            }
            if last as usize >= BK - 1 {
                for x in srow.iter_mut() {
                    *x *= scale;
                }
            } else {
                for (c, x) in srow.iter_mut().enumerate() {
                    *x = if c as isize <= last {
                        *x * scale
                    } else {
                        f32::NEG_INFINITY
                    };
                }
            }
            let m_old = w.m[r];
            let m_tile = simd::max::<M>(srow);
            let m_new = if m_tile > m_old { m_tile } else { m_old };
            let mut acc = [0.0f32; LANES];
            for ch in srow.chunks_exact_mut(LANES) {
                for l in 0..LANES {
                    let p = simd::exp::<M>(ch[l] - m_new);
                    ch[l] = p;
                    acc[l] += p;
                }
            }
            // m_old = −∞ on the first tile: alpha = 0 (and o, l are still 0).
            let alpha = simd::exp::<M>(m_old - m_new);
            w.l[r] = w.l[r] * alpha + simd::hsum(&acc);
            w.m[r] = m_new;
            if alpha != 1.0 {
                for x in &mut w.o[r * dp..(r + 1) * dp] {
                    *x *= alpha;
                }
            }
        }
        gemm::<M>(
            mp,
            dp,
            BK,
            &w.s,
            BK,
            1,
            &x.v[j0 * dp..],
            dp,
            &mut w.o,
            dp,
            true,
        );
    }
    for r in 0..rows {
        let l = w.l[r];
        let o = &mut out[r * d..(r + 1) * d];
        if l > 0.0 {
            let inv = 1.0 / l;
            for (x, &y) in o.iter_mut().zip(&w.o[r * dp..r * dp + d]) {
                *x = y * inv;
            }
            lse[r] = w.m[r] + l.ln();
        } else {
            // kv_len = 0: no key at all.
            o.fill(0.0);
            lse[r] = f32::NEG_INFINITY;
        }
    }
}

/// Causal GQA attention forward (see the module docs).
pub fn forward(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32], s: AttnShape) {
    let op = "attention_forward";
    let group = check_attn(op, s, q.len(), (k.len(), v.len()), out.len());
    assert_eq!(
        lse.len(),
        s.batch * s.q_heads * s.q_len,
        "{op}: lse has {} elements ({s:?})",
        lse.len()
    );
    if out.is_empty() {
        return;
    }
    let g = Geometry::new(s, group);
    let (tq, d, dp) = (s.q_len, g.d, g.dp);
    let (b_, hq, hkv) = (s.batch, s.q_heads, s.kv_heads);
    let kt = transpose_head_major(k, b_, s.kv_stride, s.kv_len, hkv, d, g.kv_pad, dp);
    let vp = pad_head_major(v, b_, s.kv_stride, s.kv_len, hkv, d, g.kv_pad, dp);
    // scratch[b, h, i, :] = out[b, i, h, :]
    let mut scratch = Scratch::zeroed(out.len());
    scratch
        .par_chunks_mut(tq * d)
        .zip(lse.par_chunks_mut(tq))
        .enumerate()
        .for_each(|(bh, (o_bh, l_bh))| {
            let (b, h) = (bh / hq, bh % hq);
            let kvh = h / group;
            let q = &q[(b * tq * hq + h) * d..];
            let bk = b * hkv + kvh;
            let kt = &kt[bk * dp * g.kv_pad..(bk + 1) * dp * g.kv_pad];
            let v = &vp[bk * g.kv_pad * dp..(bk + 1) * g.kv_pad * dp];
            o_bh.par_chunks_mut(BQ * d)
                .zip(l_bh.par_chunks_mut(BQ))
                .enumerate()
                .for_each_init(
                    || Work::forward(dp),
                    |w, (t, (o, l))| {
                        let x = ForwardTile {
                            q,
                            q_stride: hq * d,
                            kt,
                            v,
                            i0: t * BQ,
                        };
                        forward_tile(&g, w, &x, o, l)
                    },
                );
        });
    to_token_major(&scratch, tq, d, out, tq, hq, d, 1.0);
}

/// `dst[b, t, h, :] = factor · src[b, h, t, ..d]` where `src` holds `src_seq ≥ seq` rows of
/// `src_row ≥ d` floats per (batch, head).
#[allow(clippy::too_many_arguments)]
fn to_token_major(
    src: &[f32],
    src_seq: usize,
    src_row: usize,
    dst: &mut [f32],
    seq: usize,
    heads: usize,
    d: usize,
    factor: f32,
) {
    if dst.is_empty() {
        return;
    }
    dst.par_chunks_mut(heads * d)
        .enumerate()
        .with_min_len(16)
        .for_each(|(bt, row)| {
            let (b, t) = (bt / seq, bt % seq);
            for h in 0..heads {
                let o = ((b * heads + h) * src_seq + t) * src_row;
                for (x, &y) in row[h * d..(h + 1) * d].iter_mut().zip(&src[o..o + d]) {
                    *x = y * factor;
                }
            }
        });
}

// ---- backward ----------------------------------------------------------------------------

/// What one backward task reads: padded, head-major copies of its group's queries and
/// output gradients (`[group, tq_pad, dp]`), its KV head's keys (`[kv_pad, dp]`) and
/// transposed keys and values (`[dp, kv_pad]`), the group's `lse` (`[group, tq]`) and
/// `Δ = rowsum(dO ⊙ O)` (`[group, tq]`).
struct BackwardTask<'a> {
    q: &'a [f32],
    dout: &'a [f32],
    k: &'a [f32],
    kt: &'a [f32],
    vt: &'a [f32],
    lse: &'a [f32],
    delta: &'a [f32],
}

multiversion! {
    fn backward_group(
        g: &Geometry,
        w: &mut Work,
        x: &BackwardTask<'_>,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) = backward_group_impl;
}

/// One backward task: a KV head of one batch row with the query heads that read it.
/// `dq` is `[group, tq_pad, dp]` (accumulated into, unscaled), `dk`/`dv` are `[kv_len, d]`
/// (written for the keys some query sees; the rest stays zero).
#[inline(always)]
fn backward_group_impl<M: Mode>(
    g: &Geometry,
    w: &mut Work,
    x: &BackwardTask<'_>,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (s, d, dp) = (g.s, g.d, g.dp);
    let (tq, tq_pad, kv_pad) = (s.q_len, g.tq_pad, g.kv_pad);
    let scale = s.scale;
    let kv_end = (s.q_pos0 + tq).min(s.kv_len);
    for j0 in (0..kv_end).step_by(BK) {
        let nk = BK.min(kv_end - j0);
        w.dk.fill(0.0);
        w.dv.fill(0.0);
        // The first query that sees key j0, rounded down to the row block.
        let i_first = j0.saturating_sub(s.q_pos0) / ROWS * ROWS;
        for hg in 0..g.group {
            let q_h = &x.q[hg * tq_pad * dp..(hg + 1) * tq_pad * dp];
            let do_h = &x.dout[hg * tq_pad * dp..(hg + 1) * tq_pad * dp];
            let lse_h = &x.lse[hg * tq..(hg + 1) * tq];
            let delta_h = &x.delta[hg * tq..(hg + 1) * tq];
            for i0 in (i_first..tq).step_by(BQ) {
                let rows = BQ.min(tq - i0);
                let mp = round_up(rows, ROWS);
                let (q_t, do_t) = (
                    &q_h[i0 * dp..(i0 + mp) * dp],
                    &do_h[i0 * dp..(i0 + mp) * dp],
                );
                // S = Q·Kᵀ, then P = exp(scale·S − lse) on visible entries, 0 elsewhere.
                gemm::<M>(
                    mp,
                    BK,
                    dp,
                    q_t,
                    dp,
                    1,
                    &x.kt[j0..],
                    kv_pad,
                    &mut w.s,
                    BK,
                    false,
                );
                for r in 0..mp {
                    let prow: &mut [f32; BK] =
                        (&mut w.s[r * BK..(r + 1) * BK]).try_into().expect("BK");
                    let last = if r < rows {
                        g.last_visible(i0 + r, j0, nk)
                    } else {
                        -1
                    };
                    if last < 0 {
                        prow.fill(0.0);
                        continue;
                    }
                    let l = lse_h[i0 + r];
                    if last as usize >= BK - 1 {
                        for p in prow.iter_mut() {
                            *p = simd::exp::<M>(M::fma(*p, scale, -l));
                        }
                    } else {
                        for (c, p) in prow.iter_mut().enumerate() {
                            let e = simd::exp::<M>(M::fma(*p, scale, -l));
                            *p = if c as isize <= last { e } else { 0.0 };
                        }
                    }
                }
                // dV += Pᵀ·dO
                gemm::<M>(BK, dp, mp, &w.s, 1, BK, do_t, dp, &mut w.dv, dp, true);
                // dP = dO·Vᵀ; dS = P ⊙ (dP − Δ)
                gemm::<M>(
                    mp,
                    BK,
                    dp,
                    do_t,
                    dp,
                    1,
                    &x.vt[j0..],
                    kv_pad,
                    &mut w.ds,
                    BK,
                    false,
                );
                for r in 0..mp {
                    let dl = if r < rows { delta_h[i0 + r] } else { 0.0 };
                    let prow: &[f32; BK] = (&w.s[r * BK..(r + 1) * BK]).try_into().expect("BK");
                    let dsrow: &mut [f32; BK] =
                        (&mut w.ds[r * BK..(r + 1) * BK]).try_into().expect("BK");
                    for (ds, &p) in dsrow.iter_mut().zip(prow) {
                        *ds = p * (*ds - dl);
                    }
                }
                // dK += dSᵀ·Q; dQ += dS·K
                gemm::<M>(BK, dp, mp, &w.ds, 1, BK, q_t, dp, &mut w.dk, dp, true);
                let dq_t = &mut dq[(hg * tq_pad + i0) * dp..(hg * tq_pad + i0 + mp) * dp];
                gemm::<M>(
                    mp,
                    dp,
                    BK,
                    &w.ds,
                    BK,
                    1,
                    &x.k[j0 * dp..],
                    dp,
                    dq_t,
                    dp,
                    true,
                );
            }
        }
        for c in 0..nk {
            let j = j0 + c;
            for (y, &x) in dk[j * d..(j + 1) * d]
                .iter_mut()
                .zip(&w.dk[c * dp..c * dp + d])
            {
                *y = x * scale;
            }
            dv[j * d..(j + 1) * d].copy_from_slice(&w.dv[c * dp..c * dp + d]);
        }
    }
}

multiversion! { fn row_dots(a: &[f32], b: &[f32], d: usize, stride: usize, out: &mut [f32]) = row_dots_impl; }
/// `out[t] = a[t·stride..][..d] · b[t·stride..][..d]`.
#[inline(always)]
fn row_dots_impl<M: Mode>(a: &[f32], b: &[f32], d: usize, stride: usize, out: &mut [f32]) {
    for (t, o) in out.iter_mut().enumerate() {
        let r = t * stride..t * stride + d;
        *o = simd::dot::<M>(&a[r.clone()], &b[r]);
    }
}

/// Backward of [`forward`] (see the module docs); overwrites `dq`, `dk`, `dv`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
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
    let op = "attention_backward";
    let group = check_attn(op, s, q.len(), (k.len(), v.len()), out.len());
    assert_eq!(
        dout.len(),
        q.len(),
        "{op}: dout has {} elements, not {}",
        dout.len(),
        q.len()
    );
    assert_eq!(
        dq.len(),
        q.len(),
        "{op}: dq has {} elements, not {}",
        dq.len(),
        q.len()
    );
    assert_eq!(
        dk.len(),
        k.len(),
        "{op}: dk has {} elements, not {}",
        dk.len(),
        k.len()
    );
    assert_eq!(
        dv.len(),
        v.len(),
        "{op}: dv has {} elements, not {}",
        dv.len(),
        v.len()
    );
    assert_eq!(
        lse.len(),
        s.batch * s.q_heads * s.q_len,
        "{op}: lse has {} elements ({s:?})",
        lse.len()
    );
    let g = Geometry::new(s, group);
    let (d, dp, tq, tq_pad, kv_pad) = (g.d, g.dp, s.q_len, g.tq_pad, g.kv_pad);
    let (b_, hq, hkv) = (s.batch, s.q_heads, s.kv_heads);
    let tasks = b_ * hkv;
    if tasks == 0 || tq == 0 {
        dq.fill(0.0);
        dk.fill(0.0);
        dv.fill(0.0);
        return;
    }
    let qp = pad_head_major(q, b_, tq, tq, hq, d, tq_pad, dp);
    let dop = pad_head_major(dout, b_, tq, tq, hq, d, tq_pad, dp);
    let kp = pad_head_major(k, b_, s.kv_stride, s.kv_len, hkv, d, kv_pad, dp);
    let kt = transpose_head_major(k, b_, s.kv_stride, s.kv_len, hkv, d, kv_pad, dp);
    let vt = transpose_head_major(v, b_, s.kv_stride, s.kv_len, hkv, d, kv_pad, dp);
    // Δ[b, h, i] = dO·O, laid out like lse.
    let mut delta = Scratch::zeroed(lse.len());
    delta.par_chunks_mut(tq).enumerate().for_each(|(bh, dl)| {
        let (b, h) = (bh / hq, bh % hq);
        let o = (b * tq * hq + h) * d;
        let end = o + (tq - 1) * hq * d + d;
        row_dots(&dout[o..end], &out[o..end], d, hq * d, dl);
    });
    let mut dq_s = Scratch::zeroed(tasks * group * tq_pad * dp);
    let kv_rows = s.kv_len.max(1);
    let mut dk_s = Scratch::zeroed(tasks * kv_rows * d);
    let mut dv_s = Scratch::zeroed(tasks * kv_rows * d);
    let (gq, gk) = (group * tq_pad * dp, kv_pad * dp);
    dq_s.par_chunks_mut(gq)
        .zip(dk_s.par_chunks_mut(kv_rows * d))
        .zip(dv_s.par_chunks_mut(kv_rows * d))
        .enumerate()
        .for_each_init(
            || Work::backward(dp),
            |w, (t, ((dq_t, dk_t), dv_t))| {
                let x = BackwardTask {
                    q: &qp[t * gq..(t + 1) * gq],
                    dout: &dop[t * gq..(t + 1) * gq],
                    k: &kp[t * gk..(t + 1) * gk],
                    kt: &kt[t * gk..(t + 1) * gk],
                    vt: &vt[t * gk..(t + 1) * gk],
                    lse: &lse[t * group * tq..(t + 1) * group * tq],
                    delta: &delta[t * group * tq..(t + 1) * group * tq],
                };
                backward_group(&g, w, &x, dq_t, dk_t, dv_t);
            },
        );
    // dq_s is [b, kvh, hg, i, dp] = [b, h, i, dp]
    to_token_major(&dq_s, tq_pad, dp, dq, tq, hq, d, s.scale);
    // dk_s, dv_s are [b, kvh, j, d]; rows kv_len..kv_stride of dk, dv are zero.
    for (src, dst) in [(&*dk_s, &mut *dk), (&*dv_s, &mut *dv)] {
        dst.par_chunks_mut(hkv * d)
            .enumerate()
            .with_min_len(16)
            .for_each(|(bj, row)| {
                let (b, j) = (bj / s.kv_stride, bj % s.kv_stride);
                if j >= s.kv_len {
                    row.fill(0.0);
                    return;
                }
                for kvh in 0..hkv {
                    let o = ((b * hkv + kvh) * kv_rows + j) * d;
                    row[kvh * d..(kvh + 1) * d].copy_from_slice(&src[o..o + d]);
                }
            });
    }
}
