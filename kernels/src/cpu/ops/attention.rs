//! Flash-attention style causal GQA on the CPU.
//!
//! Both directions run on one register-tiled micro-kernel ([`gemm`]: 8x32 / 8x16 AVX-512
//! tiles, 4x16 AVX2, plain loops otherwise) over tiles of [`BQ`] queries by [`BK`] keys;
//! tiles that the causal mask hides entirely are never visited, and inside the diagonal
//! tiles each row block only computes the part the mask can leave non-zero ([`Span`]).
//! Nothing larger than one `BQ x BK` tile of scores exists at a time.
//!
//! Forward: one task per (batch, KV head, tile of [`BQ`] query columns), where the columns
//! are the group's query heads stacked position-major ([`ForwardTile`]), so the group shares
//! every key/value tile and a single generated token still fills `group` columns. The task
//! keeps the score tile transposed (`Sᵀ = K·Qᵀ`, keys by columns), so the online softmax's
//! running max, sum and rescale factors are per-lane vectors; `O += P·V` follows each key
//! tile, and at the end `O / l` and `lse = m + ln l` are written. Keys and values are first
//! copied, in parallel, into head-major zero-padded buffers (`[b, kvh, j, dp]`, head_dim
//! padded to a multiple of 16, keys to a multiple of [`BK`]).
//!
//! Backward: one task per (batch, KV head), so that the task owns the gradients it writes:
//! `dK`, `dV` of its KV head and `dQ` of the query heads that read it. It first copies its
//! inputs into padded buffers of its own (queries and output gradients of the group, keys,
//! keys and values transposed, lse and `Δ = rowsum(dO ⊙ O)`), then for each block of [`KB`]
//! key tiles keeps `dK`, `dV` accumulators and walks every query tile (of every head in the
//! group) that sees the block, and each key tile of the block that the query tile sees: it
//! recomputes `P = exp(scale·Q·Kᵀ − lse)` from the saved log-sum-exp, then
//! `dV += Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − Δ)`, `dK += dSᵀ·Q`, `dQ += dS·K` (the
//! scale applied once at the end).
//!
//! Tasks write into scratch laid out per task; a final parallel pass moves the results into
//! the `[batch, seq, heads, head_dim]` layout. Large temporaries come from [`Scratch`].

use std::ops::Range;

use rayon::prelude::*;

use super::scratch::Scratch;
use super::simd::{self, Isa, LANES, Mode, multiversion};
use crate::AttnShape;
use crate::cpu::reference_ops::{check_attn_backward, check_attn_forward};

/// Queries per tile.
const BQ: usize = 64;
/// Keys per tile.
const BK: usize = 64;
/// Key tiles per block of the backward (whose dK/dV accumulators stay in cache).
const KB: usize = 4;
/// Rows of every tile are padded to a multiple of this (the micro-kernel's row block).
const ROWS: usize = 8;

fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// The part of one row block of a [`gemm`] that can be non-zero (causal masking): the range
/// of the inner dimension that contributes, and the columns to compute (rounded out to
/// multiples of 16 by `gemm`). Entries outside it are left as they are.
struct Span {
    k: Range<usize>,
    n: Range<usize>,
}

/// `C[m×n] (+)= A·B` for `m % 8 == 0`, `n % 16 == 0`: `A(i,p) = a[i·a_rs + p·a_cs]`,
/// row `p` of B is `b[p·ldb..][..n]`, row `i` of C is `c[i·ldc..][..n]`. `span(i, rows)`
/// restricts the block of rows `i..i + rows` (see [`Span`]).
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
    span: impl Fn(usize, usize) -> Span,
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
    // The span, clamped into the asserted bounds and rounded out to whole vectors.
    let clamp = |i: usize, rows: usize| {
        let s = span(i, rows);
        let k_hi = s.k.end.min(k);
        let k_lo = s.k.start.min(k_hi);
        let n_hi = round_up(s.n.end, LANES).min(n);
        let n_lo = (s.n.start / LANES * LANES).min(n_hi);
        (k_lo, k_hi - k_lo, n_lo, n_hi)
    };
    match M::ISA {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
            for i in (0..m).step_by(8) {
                let (k0, kn, n_lo, n_hi) = clamp(i, 8);
                let mut j = n_lo;
                while j < n_hi {
                    let wide = j + 32 <= n_hi;
                    // SAFETY: `M::ISA == Avx512` only in code `multiversion!` runs after
                    // detecting AVX-512. The tile reads A rows i..i+8 at columns
                    // k0..k0+kn ⊆ 0..k, B rows k0..k0+kn at columns j..j+32 (or +16) ≤ n,
                    // and writes C rows i..i+8 at those columns: inside the bounds asserted
                    // above.
                    unsafe {
                        let a0 = ap.add(i * a_rs + k0 * a_cs);
                        let (b0, c0) = (bp.add(k0 * ldb + j), cp.add(i * ldc + j));
                        if wide {
                            x86::tile_avx512::<2>(kn, a0, a_rs, a_cs, b0, ldb, c0, ldc, accumulate)
                        } else {
                            x86::tile_avx512::<1>(kn, a0, a_rs, a_cs, b0, ldb, c0, ldc, accumulate)
                        }
                    }
                    j += if wide { 32 } else { 16 };
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
            for i in (0..m).step_by(4) {
                let (k0, kn, n_lo, n_hi) = clamp(i, 4);
                for j in (n_lo..n_hi).step_by(16) {
                    // SAFETY: as above, for AVX2+FMA and 4x16 tiles.
                    unsafe {
                        let a0 = ap.add(i * a_rs + k0 * a_cs);
                        let (b0, c0) = (bp.add(k0 * ldb + j), cp.add(i * ldc + j));
                        x86::tile_avx2(kn, a0, a_rs, a_cs, b0, ldb, c0, ldc, accumulate)
                    }
                }
            }
        }
        _ => {
            for i in 0..m {
                let (k0, kn, n_lo, n_hi) = clamp(i, 1);
                let crow = &mut c[i * ldc + n_lo..i * ldc + n_hi];
                if !accumulate {
                    crow.fill(0.0);
                }
                for p in k0..k0 + kn {
                    let av = a[i * a_rs + p * a_cs];
                    let brow = &b[p * ldb + n_lo..p * ldb + n_hi];
                    for (y, &x) in crow.iter_mut().zip(brow) {
                        *y = M::fma(av, x, *y);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
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

/// A forward task's buffers.
struct ForwardWork {
    /// `[dp, BQ]` transposed queries.
    q: Scratch,
    /// `[BK, BQ]` scores, then probabilities, keys by queries.
    s: Scratch,
    /// `[BQ, dp]` output accumulators.
    o: Scratch,
    /// Per-query running max and sum.
    m: [f32; BQ],
    l: [f32; BQ],
}

impl ForwardWork {
    fn new(dp: usize) -> Self {
        ForwardWork {
            q: Scratch::zeroed(dp * BQ),
            s: Scratch::zeroed(BK * BQ),
            o: Scratch::zeroed(BQ * dp),
            m: [0.0; BQ],
            l: [0.0; BQ],
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
        let (to, tail_to) = row[..d].as_chunks_mut::<LANES>();
        let (from, tail_from) = from.as_chunks::<LANES>();
        for (x, y) in to.iter_mut().zip(from) {
            *x = *y;
        }
        tail_to.copy_from_slice(tail_from);
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

/// `dst[dd·cols_pad + j] = src[j·stride + dd]` for `j < rows`, `dd < d` (the rest of `dst`
/// is left as it is).
#[inline(always)]
fn transpose_rows_impl<M: Mode>(
    dst: &mut [f32],
    cols_pad: usize,
    src: &[f32],
    stride: usize,
    d: usize,
    rows: usize,
) {
    assert!(
        rows <= cols_pad && dst.len() >= d * cols_pad,
        "attention transpose: {rows} rows"
    );
    for (j, row) in src.chunks(stride).take(rows).enumerate() {
        for (col, &y) in dst.chunks_exact_mut(cols_pad).zip(&row[..d]) {
            col[j] = y;
        }
    }
}

// ---- forward -----------------------------------------------------------------------------

/// One forward task: a tile of up to [`BQ`] query columns of one KV head in one batch row.
/// The columns of a (batch, KV head) are its query heads stacked position-major — column
/// `c` is position `c / group` of head `kvh·group + c % group` — so a tile shares each key
/// and value tile among the group, a single generated token still fills `group` columns,
/// and a column's position grows with `c` (causal masks stay thresholds).
struct ForwardTile<'a> {
    /// The op's queries, `[batch, q_len, q_heads, d]`.
    q: &'a [f32],
    /// This KV head's padded keys and values, `[kv_pad, dp]` each.
    k: &'a [f32],
    v: &'a [f32],
    b: usize,
    kvh: usize,
    /// First column of the tile.
    c0: usize,
}

multiversion! {
    fn forward_tile(g: &Geometry, w: &mut ForwardWork, x: &ForwardTile<'_>, out: &mut [f32], lse: &mut [f32])
        = forward_tile_impl;
}

/// One forward task (see [`ForwardTile`]): columns `c0..c0 + lse.len()`; writes their
/// outputs to `out` (`[cols, d]`) and log-sum-exps to `lse`.
///
/// The score tile is kept transposed — `Sᵀ = K·Qᵀ` as `[keys, columns]` — so each query's
/// running max, sum and rescale factor sit in vector lanes and the softmax needs no
/// horizontal reductions; `O += P·V` reads `Pᵀ` by columns.
#[inline(always)]
fn forward_tile_impl<M: Mode>(
    g: &Geometry,
    w: &mut ForwardWork,
    x: &ForwardTile<'_>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (s, d, dp, group) = (g.s, g.d, g.dp, g.group);
    let (c0, cols) = (x.c0, lse.len());
    // score columns (whole vectors) and output rows (whole row blocks)
    let (np, mr) = (round_up(cols, LANES), round_up(cols, ROWS));
    let scale = s.scale;
    // Qᵀ [d, BQ]; columns past the tile's are zero.
    assert!(cols <= BQ && w.q.len() >= d * BQ);
    for c in 0..cols {
        let (i, hg) = ((c0 + c) / group, (c0 + c) % group);
        let o = ((x.b * s.q_len + i) * s.q_heads + x.kvh * group + hg) * d;
        for (col, &y) in w.q.chunks_exact_mut(BQ).zip(&x.q[o..o + d]) {
            col[c] = y;
        }
    }
    for col in w.q.chunks_exact_mut(BQ).take(d) {
        col[cols..].fill(0.0);
    }
    w.o[..mr * dp].fill(0.0);
    let (m, l) = (&mut w.m, &mut w.l);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    // Column c (of the tile) sees key j iff q_pos0 + (c0 + c) / group ≥ j, i.e. iff
    // c ≥ group·(j − q_pos0) − c0 =: first(j).
    let first = |j: usize| (group * j) as isize - (group * s.q_pos0 + c0) as isize;
    let last_pos = (c0 + cols - 1) / group;
    let kv_end = (s.q_pos0 + last_pos + 1).min(s.kv_len);
    for j0 in (0..kv_end).step_by(BK) {
        let nk = BK.min(kv_end - j0);
        let mk = round_up(nk, ROWS);
        let seen_by = |j: usize, _: usize| {
            let from = first(j0 + j).max(0) as usize;
            Span {
                k: 0..d,
                n: from..np,
            }
        };
        let (k_t, q_t) = (&x.k[j0 * dp..], &w.q[..]);
        gemm::<M>(mk, np, d, k_t, dp, 1, q_t, BQ, &mut w.s, BQ, false, seen_by);
        // Only the first `np` columns matter; the softmax runs on 16, 32 or 64.
        let alpha = match np {
            0..=16 => online_softmax::<M, 16>(&mut w.s, nk, j0, &first, scale, m, l),
            17..=32 => online_softmax::<M, 32>(&mut w.s, nk, j0, &first, scale, m, l),
            _ => online_softmax::<M, BQ>(&mut w.s, nk, j0, &first, scale, m, l),
        };
        for (c, row) in w.o[..mr * dp].chunks_exact_mut(dp).enumerate() {
            let a = alpha[c];
            for y in row.iter_mut() {
                *y *= a;
            }
        }
        // O += P·V (A(c, j) = Pᵀ[j][c]); columns c..c+n see the keys up to the position
        // of column c+n−1.
        let sees = |c: usize, n: usize| {
            let pos = s.q_pos0 + (c0 + c + n - 1) / group;
            Span {
                k: 0..(pos + 1).saturating_sub(j0).min(nk),
                n: 0..dp,
            }
        };
        let v_t = &x.v[j0 * dp..];
        gemm::<M>(mr, dp, nk, &w.s, 1, BQ, v_t, dp, &mut w.o, dp, true, sees);
    }
    for c in 0..cols {
        let o = &mut out[c * d..(c + 1) * d];
        if l[c] > 0.0 {
            let inv = 1.0 / l[c];
            for (y, &v) in o.iter_mut().zip(&w.o[c * dp..c * dp + d]) {
                *y = v * inv;
            }
            lse[c] = m[c] + l[c].ln();
        } else {
            // kv_len = 0: no key at all.
            o.fill(0.0);
            lse[c] = f32::NEG_INFINITY;
        }
    }
}

/// One key tile of the forward's online softmax over the first `W` columns of the
/// transposed score tile `s` (`[BK, BQ]`, keys `j0..j0 + nk`; column `c` sees key `j` iff
/// `c ≥ first(j)`): scales and masks the scores, turns them into `exp(s − m_new)`, updates
/// the running max `m` and sum `l`, and returns each column's rescale factor
/// `exp(m_old − m_new)`. Columns past the tile's hold garbage nobody reads.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn online_softmax<M: Mode, const W: usize>(
    s: &mut [f32],
    nk: usize,
    j0: usize,
    first: &impl Fn(usize) -> isize,
    scale: f32,
    m: &mut [f32; BQ],
    l: &mut [f32; BQ],
) -> [f32; BQ] {
    let (m, l) = (
        <&mut [f32; W]>::try_from(&mut m[..W]).expect("W"),
        <&mut [f32; W]>::try_from(&mut l[..W]).expect("W"),
    );
    // Scale, mask, column max.
    let mut m_new = *m;
    for j in 0..nk {
        let row: &mut [f32; W] = (&mut s[j * BQ..j * BQ + W]).try_into().expect("W");
        let first = first(j0 + j);
        if first <= 0 {
            for (y, mx) in row.iter_mut().zip(m_new.iter_mut()) {
                *y *= scale;
                *mx = if *y > *mx { *y } else { *mx };
            }
        } else {
            for (c, (y, mx)) in row.iter_mut().zip(m_new.iter_mut()).enumerate() {
                *y = if c as isize >= first {
                    *y * scale
                } else {
                    f32::NEG_INFINITY
                };
                *mx = if *y > *mx { *y } else { *mx };
            }
        }
    }
    // P = exp(S − m_new); l = l·alpha + Σ P. A column whose first tile masks it entirely
    // would have m = −∞ on both sides; only padding columns do (key 0 is seen by all).
    let mut alpha = [0.0f32; BQ];
    for c in 0..W {
        alpha[c] = simd::exp::<M>(m[c] - m_new[c]);
    }
    let mut sum = [0.0f32; W];
    for j in 0..nk {
        let row: &mut [f32; W] = (&mut s[j * BQ..j * BQ + W]).try_into().expect("W");
        for c in 0..W {
            let p = simd::exp::<M>(row[c] - m_new[c]);
            row[c] = p;
            sum[c] += p;
        }
    }
    for c in 0..W {
        l[c] = M::fma(l[c], alpha[c], sum[c]);
    }
    *m = m_new;
    alpha
}

/// Causal GQA attention forward (see the module docs).
pub fn forward(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32], s: AttnShape) {
    let (kv, lse_len) = ((k.len(), v.len()), lse.len());
    let group = check_attn_forward(s, q.len(), kv, out.len(), lse_len);
    if out.is_empty() {
        return;
    }
    let g = Geometry::new(s, group);
    let (tq, d, dp) = (s.q_len, g.d, g.dp);
    let (hq, hkv) = (s.q_heads, s.kv_heads);
    let kp = pad_head_major(k, s.batch, s.kv_stride, s.kv_len, hkv, d, g.kv_pad, dp);
    let vp = pad_head_major(v, s.batch, s.kv_stride, s.kv_len, hkv, d, g.kv_pad, dp);
    let kv_block = g.kv_pad * dp;
    // Per (batch, KV head): `cols` columns (see `ForwardTile`) of outputs and lse.
    let cols = tq * group;
    let mut o_s = Scratch::reused(out.len());
    let mut lse_s = Scratch::reused(lse.len());
    o_s.par_chunks_mut(cols * d)
        .zip(lse_s.par_chunks_mut(cols))
        .enumerate()
        .for_each(|(bk, (o_bk, l_bk))| {
            let k = &kp[bk * kv_block..(bk + 1) * kv_block];
            let v = &vp[bk * kv_block..(bk + 1) * kv_block];
            let (b, kvh) = (bk / hkv, bk % hkv);
            o_bk.par_chunks_mut(BQ * d)
                .zip(l_bk.par_chunks_mut(BQ))
                .enumerate()
                .for_each_init(
                    || ForwardWork::new(dp),
                    |w, (t, (o, l))| {
                        let x = ForwardTile {
                            q,
                            k,
                            v,
                            b,
                            kvh,
                            c0: t * BQ,
                        };
                        forward_tile(&g, w, &x, o, l)
                    },
                );
        });
    // o_s[b, kvh, i, hg, :] is out[b, i, h, :]: per (b, i), KV head by KV head.
    out.par_chunks_mut(hq * d)
        .enumerate()
        .with_min_len(16)
        .for_each(|(bi, row)| {
            let (b, i) = (bi / tq, bi % tq);
            for (kvh, dst) in row.chunks_exact_mut(group * d).enumerate() {
                let o = ((b * hkv + kvh) * cols + i * group) * d;
                dst.copy_from_slice(&o_s[o..o + group * d]);
            }
        });
    // lse[b, h, i] = lse_s[b, kvh, i, hg]
    lse.par_chunks_mut(tq).enumerate().for_each(|(bh, l)| {
        let (b, h) = (bh / hq, bh % hq);
        let o = (b * hkv + h / group) * cols + h % group;
        for (i, y) in l.iter_mut().enumerate() {
            *y = lse_s[o + i * group];
        }
    });
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

/// A backward task's buffers: padded copies of its inputs (made by the task itself, so they
/// are produced and consumed in its cache), the score tiles and the dK/dV accumulators.
/// Created zeroed once per rayon job; every task of one call writes the same regions, so
/// the padding stays zero.
struct BackwardWork {
    /// `[group, tq_pad, dp]` queries and output gradients of the group's heads.
    q: Scratch,
    dout: Scratch,
    /// `[group, tq]` log-sum-exps and `Δ = rowsum(dO ⊙ O)`.
    lse: Scratch,
    delta: Scratch,
    /// `[kv_pad, dp]` keys; `[dp, kv_pad]` keys and values transposed.
    k: Scratch,
    kt: Scratch,
    vt: Scratch,
    /// `[BQ, BK]` probabilities and dP / dS.
    p: Scratch,
    ds: Scratch,
    /// `[KB·BK, dp]` dK and dV accumulators of one block of key tiles.
    dk: Scratch,
    dv: Scratch,
}

impl BackwardWork {
    fn new(g: &Geometry) -> Self {
        let (dp, gq) = (g.dp, g.group * g.tq_pad * g.dp);
        BackwardWork {
            q: Scratch::zeroed(gq),
            dout: Scratch::zeroed(gq),
            lse: Scratch::zeroed(g.group * g.s.q_len),
            delta: Scratch::zeroed(g.group * g.s.q_len),
            k: Scratch::zeroed(g.kv_pad * dp),
            kt: Scratch::zeroed(g.kv_pad * dp),
            vt: Scratch::zeroed(g.kv_pad * dp),
            p: Scratch::zeroed(BQ * BK),
            ds: Scratch::zeroed(BQ * BK),
            dk: Scratch::zeroed(KB * BK * dp),
            dv: Scratch::zeroed(KB * BK * dp),
        }
    }
}

/// The backward op's inputs as given.
struct BackwardInputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a [f32],
    lse: &'a [f32],
    dout: &'a [f32],
}

multiversion! {
    fn backward_group(
        g: &Geometry,
        w: &mut BackwardWork,
        x: &BackwardInputs<'_>,
        b: usize,
        kvh: usize,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) = backward_group_impl;
}

/// One backward task: KV head `kvh` of batch row `b` with the query heads that read it.
/// `dq` is `[group, tq_pad, dp]` (unscaled), `dk`/`dv` are `[kv_len, d]`, written for the
/// keys some query sees.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_group_impl<M: Mode>(
    g: &Geometry,
    w: &mut BackwardWork,
    x: &BackwardInputs<'_>,
    b: usize,
    kvh: usize,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (s, d, dp) = (g.s, g.d, g.dp);
    let (tq, tq_pad, kv_pad) = (s.q_len, g.tq_pad, g.kv_pad);
    let (hq, hkv) = (s.q_heads, s.kv_heads);
    let scale = s.scale;
    let kv_end = (s.q_pos0 + tq).min(s.kv_len);
    // Padded copies of this task's inputs (keys past kv_end are never needed).
    for hg in 0..g.group {
        let h = kvh * g.group + hg;
        let o = (b * tq * hq + h) * d;
        let end = o + (tq - 1) * hq * d + d;
        let rows = hg * tq_pad * dp..(hg * tq_pad + tq) * dp;
        copy_rows_impl::<M>(&mut w.q[rows.clone()], dp, &x.q[o..end], hq * d, d);
        copy_rows_impl::<M>(&mut w.dout[rows], dp, &x.dout[o..end], hq * d, d);
        let lse_h = &x.lse[(b * hq + h) * tq..(b * hq + h + 1) * tq];
        w.lse[hg * tq..(hg + 1) * tq].copy_from_slice(lse_h);
        for (i, dl) in w.delta[hg * tq..(hg + 1) * tq].iter_mut().enumerate() {
            let r = o + i * hq * d..o + i * hq * d + d;
            *dl = simd::dot::<M>(&x.dout[r.clone()], &x.out[r]);
        }
    }
    if kv_end > 0 {
        let o = (b * s.kv_stride * hkv + kvh) * d;
        let end = o + (kv_end - 1) * hkv * d + d;
        copy_rows_impl::<M>(&mut w.k[..kv_end * dp], dp, &x.k[o..end], hkv * d, d);
        transpose_rows_impl::<M>(&mut w.kt, kv_pad, &x.k[o..end], hkv * d, d, kv_end);
        transpose_rows_impl::<M>(&mut w.vt, kv_pad, &x.v[o..end], hkv * d, d, kv_end);
    }
    dq.fill(0.0);
    // Key tiles go in blocks of KB whose dK/dV accumulators stay in cache, so the group's
    // queries and output gradients stream through once per block, not once per tile.
    for jb in (0..kv_end).step_by(KB * BK) {
        let jb_end = (jb + KB * BK).min(kv_end);
        w.dk[..(jb_end - jb) * dp].fill(0.0);
        w.dv[..(jb_end - jb) * dp].fill(0.0);
        // The first query that sees key jb, rounded down to the row block.
        let i_first = jb.saturating_sub(s.q_pos0) / ROWS * ROWS;
        for hg in 0..g.group {
            let q_h = &w.q[hg * tq_pad * dp..(hg + 1) * tq_pad * dp];
            let do_h = &w.dout[hg * tq_pad * dp..(hg + 1) * tq_pad * dp];
            let lse_h = &w.lse[hg * tq..(hg + 1) * tq];
            let delta_h = &w.delta[hg * tq..(hg + 1) * tq];
            for i0 in (i_first..tq).step_by(BQ) {
                let rows = BQ.min(tq - i0);
                let mp = round_up(rows, ROWS);
                let q_t = &q_h[i0 * dp..(i0 + mp) * dp];
                let do_t = &do_h[i0 * dp..(i0 + mp) * dp];
                let qpos = (s.q_pos0 + i0) as isize;
                // Key tiles of the block that the tile's last query sees.
                let j_end = (s.q_pos0 + i0 + rows).min(jb_end);
                for j0 in (jb..j_end).step_by(BK) {
                    let nk = BK.min(kv_end - j0);
                    // Queries r..r+n see keys < qpos + r + n − j0; key j is seen by
                    // queries r ≥ j0 + j − qpos. Entries outside are masked or multiply
                    // zeros.
                    let sees = |r: usize, n: usize| {
                        let keys = (qpos + (r + n) as isize - j0 as isize).clamp(0, BK as isize);
                        Span {
                            k: 0..d,
                            n: 0..keys as usize,
                        }
                    };
                    let sees_k = |r: usize, n: usize| Span {
                        k: sees(r, n).n,
                        n: 0..dp,
                    };
                    let seen_by = |j: usize, _: usize| {
                        let first = ((j0 + j) as isize - qpos).clamp(0, mp as isize) as usize;
                        Span {
                            k: first..mp,
                            n: 0..dp,
                        }
                    };
                    // S = Q·Kᵀ, then P = exp(scale·S − lse) on visible entries, 0 elsewhere.
                    let (kt, vt) = (&w.kt[j0..], &w.vt[j0..]);
                    gemm::<M>(mp, BK, d, q_t, dp, 1, kt, kv_pad, &mut w.p, BK, false, sees);
                    for r in 0..mp {
                        let prow: &mut [f32; BK] =
                            (&mut w.p[r * BK..(r + 1) * BK]).try_into().expect("BK");
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
                    let (dk_t, dv_t) = (&mut w.dk[(j0 - jb) * dp..], &mut w.dv[(j0 - jb) * dp..]);
                    // dV += Pᵀ·dO
                    gemm::<M>(BK, dp, mp, &w.p, 1, BK, do_t, dp, dv_t, dp, true, seen_by);
                    // dP = dO·Vᵀ; dS = P ⊙ (dP − Δ)
                    gemm::<M>(
                        mp, BK, d, do_t, dp, 1, vt, kv_pad, &mut w.ds, BK, false, sees,
                    );
                    for r in 0..mp {
                        let dl = if r < rows { delta_h[i0 + r] } else { 0.0 };
                        let prow: &[f32; BK] = (&w.p[r * BK..(r + 1) * BK]).try_into().expect("BK");
                        let dsrow: &mut [f32; BK] =
                            (&mut w.ds[r * BK..(r + 1) * BK]).try_into().expect("BK");
                        for (ds, &p) in dsrow.iter_mut().zip(prow) {
                            *ds = p * (*ds - dl);
                        }
                    }
                    // dK += dSᵀ·Q; dQ += dS·K
                    gemm::<M>(BK, dp, mp, &w.ds, 1, BK, q_t, dp, dk_t, dp, true, seen_by);
                    let dq_t = &mut dq[(hg * tq_pad + i0) * dp..(hg * tq_pad + i0 + mp) * dp];
                    let k_t = &w.k[j0 * dp..];
                    gemm::<M>(mp, dp, BK, &w.ds, BK, 1, k_t, dp, dq_t, dp, true, sees_k);
                }
            }
        }
        for j in jb..jb_end {
            let c = j - jb;
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
    let g = Geometry::new(s, group);
    let (d, dp, tq, tq_pad) = (g.d, g.dp, s.q_len, g.tq_pad);
    let (hq, hkv) = (s.q_heads, s.kv_heads);
    let tasks = s.batch * hkv;
    if tasks == 0 || tq == 0 {
        dq.fill(0.0);
        dk.fill(0.0);
        dv.fill(0.0);
        return;
    }
    // Per task: dq as [hg, i, dp] (so all of it is [b, h, i, dp]), dk and dv as [j, d].
    let kv_end = (s.q_pos0 + tq).min(s.kv_len);
    let kv_rows = kv_end.max(1);
    let mut dq_s = Scratch::reused(tasks * group * tq_pad * dp);
    let mut dk_s = Scratch::reused(tasks * kv_rows * d);
    let mut dv_s = Scratch::reused(tasks * kv_rows * d);
    let x = BackwardInputs {
        q,
        k,
        v,
        out,
        lse,
        dout,
    };
    dq_s.par_chunks_mut(group * tq_pad * dp)
        .zip(dk_s.par_chunks_mut(kv_rows * d))
        .zip(dv_s.par_chunks_mut(kv_rows * d))
        .enumerate()
        .for_each_init(
            || BackwardWork::new(&g),
            |w, (t, ((dq_t, dk_t), dv_t))| {
                backward_group(&g, w, &x, t / hkv, t % hkv, dq_t, dk_t, dv_t);
            },
        );
    to_token_major(&dq_s, tq_pad, dp, dq, tq, hq, d, s.scale);
    // Keys no query sees (and spare cache rows) get zero gradients.
    for (src, dst) in [(&*dk_s, &mut *dk), (&*dv_s, &mut *dv)] {
        dst.par_chunks_mut(hkv * d)
            .enumerate()
            .with_min_len(16)
            .for_each(|(bj, row)| {
                let (b, j) = (bj / s.kv_stride, bj % s.kv_stride);
                if j >= kv_end {
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
