//! LoRA's rank-r products (r is small: 8..64), which a general GEMM tiles badly.
//!
//! Three kernels over a block of rows, each vectorised along the long dimension:
//! - [`dots`]: `out[i,q] = s · Σ_p X[i,p] · W[q,p]` (u = x·Aᵀ, du = s·dy·B);
//! - [`rank_update`]: `Y[i,j] += Σ_q U[i,q] · V[q,j]` (y += s·u·Bᵀ, dx += du·A);
//! - [`rank_reduce`]: `G[q,j] = Σ_i U[i,q] · Y[i,j]` over the block (dB, dA partial sums).
//!
//! Forward and backward are fused per block of rows so the big activations (x, y, dy, dx)
//! pass through the cache once per op. Rows are cut into blocks whose size depends on `m`
//! only, and partial sums of dA/dB are added in block order, so results do not depend on
//! the number of threads.
use rayon::prelude::*;

use super::checks::{check_lora_backward, check_lora_forward};
use super::gemm::{BSrc, GemmCall, Simd, widen};
use super::reference_ops::dropout_scale;
use super::sync_ptr::SyncPtr;
use crate::backend::{DROPOUT_MUL, dropout_keep32, dropout_seed32};
use crate::{LoraDims, LoraDropout};

/// Ranks are processed in groups of this many (matrices are zero-padded to a multiple).
const RG: usize = 8;

/// Rows per block: at least 64, at most 16 blocks (bounding dA/dB partial sums).
fn block_rows(m: usize) -> usize {
    m.div_ceil(16).max(64).div_ceil(8) * 8
}

/// LoRA dropout applied where the kernels read `x` (or add into `dx`): element `(i, j)` of
/// a block whose first row is row `row0` of the `[m, ld]` whole is kept, and scaled, iff
/// `dropout_keep` holds for its flat index `(row0 + i)·ld + j` (the index
/// `Backend::dropout_forward` gives it).
#[derive(Clone, Copy)]
struct Mask {
    seed: u32,
    p: f32,
    scale: f32,
    row0: usize,
    ld: usize,
}

impl Mask {
    fn new(drop: LoraDropout, ld: usize) -> Self {
        Mask {
            seed: dropout_seed32(drop.seed),
            p: drop.p,
            scale: dropout_scale("LoRA dropout", drop.p),
            row0: 0,
            ld,
        }
    }

    /// The mask of the block starting at row `row0`.
    fn at_row(self, row0: usize) -> Self {
        Mask { row0, ..self }
    }

    /// The counter of element `(i, j)` of the block (it wraps at 2³², as `dropout_keep`'s).
    #[inline(always)]
    fn index(&self, i: usize, j: usize) -> u32 {
        ((self.row0 + i) * self.ld + j) as u32
    }

    #[inline(always)]
    fn keep(&self, i: usize, j: usize) -> bool {
        dropout_keep32(self.seed, self.index(i, j), self.p)
    }

    /// `drop(x)` of element `(i, j)` whose value is `v`.
    #[inline(always)]
    fn dropped(&self, v: f32, i: usize, j: usize) -> f32 {
        if self.keep(i, j) { v * self.scale } else { 0.0 }
    }

    /// `dx + t / (1-p)` where element `(i, j)` is kept, else `dx` unchanged (as
    /// `dropout_backward` leaves it).
    #[inline(always)]
    fn add_kept(&self, dx: f32, t: f32, i: usize, j: usize) -> f32 {
        if self.keep(i, j) {
            dx + t * self.scale
        } else {
            dx
        }
    }
}

/// A vector of f32 lanes.
trait Vector: Copy {
    const LANES: usize;
    /// # Safety (for all methods)
    /// The CPU has the instructions; pointers are valid for `LANES` values.
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `self · b + c`.
    unsafe fn fma(self, b: Self, c: Self) -> Self;
    unsafe fn sum(self) -> f32;
    /// [`Mask::dropped`] on every lane, lane `t` being element `(i, j + t)`.
    #[inline(always)]
    unsafe fn dropped(self, m: &Mask, i: usize, j: usize) -> Self {
        // SAFETY: `buf` holds LANES values (the portable fallback).
        unsafe {
            let mut buf = [0.0f32; 16];
            self.store(buf.as_mut_ptr());
            for (t, v) in buf[..Self::LANES].iter_mut().enumerate() {
                *v = m.dropped(*v, i, j + t);
            }
            Self::load(buf.as_ptr())
        }
    }
    /// [`Mask::add_kept`] on every lane (`self` is dx), lane `t` being element `(i, j + t)`.
    #[inline(always)]
    unsafe fn add_kept(self, t: Self, m: &Mask, i: usize, j: usize) -> Self {
        // SAFETY: as above.
        unsafe {
            let (mut d, mut g) = ([0.0f32; 16], [0.0f32; 16]);
            self.store(d.as_mut_ptr());
            t.store(g.as_mut_ptr());
            for l in 0..Self::LANES {
                d[l] = m.add_kept(d[l], g[l], i, j + l);
            }
            Self::load(d.as_ptr())
        }
    }
    /// The sums of eight vectors (one reduction tree instead of eight).
    #[inline(always)]
    unsafe fn sum8(v: [Self; 8]) -> [f32; 8] {
        // SAFETY: forwarded contract.
        v.map(|x| unsafe { x.sum() })
    }
}

/// Eight plain lanes; fused only where the target always has FMA.
#[derive(Clone, Copy)]
struct Lanes([f32; 8]);

impl Vector for Lanes {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Lanes([0.0; 8])
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Lanes([x; 8])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 8 readable values.
        Lanes(unsafe { p.cast::<[f32; 8]>().read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 8 writable values.
        unsafe { p.cast::<[f32; 8]>().write_unaligned(self.0) }
    }
    #[inline(always)]
    unsafe fn fma(self, b: Self, c: Self) -> Self {
        const FMA: bool = cfg!(any(target_feature = "fma", target_arch = "aarch64"));
        let mut out = c.0;
        for ((o, &x), &y) in out.iter_mut().zip(&self.0).zip(&b.0) {
            *o = if FMA { x.mul_add(y, *o) } else { *o + x * y };
        }
        Lanes(out)
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        let v = self.0;
        ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{DROPOUT_MUL, Mask, Vector};

    #[derive(Clone, Copy)]
    pub(super) struct Z(__m512);

    /// `dropout_keep32` for counters `first .. first + 16`, as a lane mask.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline(always)]
    unsafe fn keep16(m: &Mask, first: u32) -> __mmask16 {
        // SAFETY: register-only AVX-512F arithmetic.
        unsafe {
            let c = |v: u32| _mm512_set1_epi32(v as i32);
            let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let idx = _mm512_add_epi32(c(first), iota);
            let mut z = _mm512_xor_si512(_mm512_mullo_epi32(idx, c(DROPOUT_MUL[0])), c(m.seed));
            z = _mm512_xor_si512(z, _mm512_srli_epi32::<16>(z));
            z = _mm512_mullo_epi32(z, c(DROPOUT_MUL[1]));
            z = _mm512_xor_si512(z, _mm512_srli_epi32::<13>(z));
            z = _mm512_mullo_epi32(z, c(DROPOUT_MUL[2]));
            z = _mm512_xor_si512(z, _mm512_srli_epi32::<16>(z));
            // the top 24 bits as a fraction in [0, 1), exactly as the scalar hash reads them
            let f = _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_srli_epi32::<8>(z)),
                _mm512_set1_ps(1.0 / 16_777_216.0),
            );
            _mm512_cmp_ps_mask::<_CMP_GE_OQ>(f, _mm512_set1_ps(m.p))
        }
    }

    impl Vector for Z {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            // SAFETY: callers run with AVX-512F.
            Z(unsafe { _mm512_setzero_ps() })
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            // SAFETY: as above.
            Z(unsafe { _mm512_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: as above; 16 readable values.
            Z(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: as above; 16 writable values.
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn fma(self, b: Self, c: Self) -> Self {
            // SAFETY: as above.
            Z(unsafe { _mm512_fmadd_ps(self.0, b.0, c.0) })
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            // SAFETY: as above.
            unsafe { _mm512_reduce_add_ps(self.0) }
        }
        #[inline(always)]
        unsafe fn dropped(self, m: &Mask, i: usize, j: usize) -> Self {
            // SAFETY: as above (register-only).
            unsafe {
                let keep = keep16(m, m.index(i, j));
                Z(_mm512_maskz_mul_ps(keep, self.0, _mm512_set1_ps(m.scale)))
            }
        }
        #[inline(always)]
        unsafe fn add_kept(self, t: Self, m: &Mask, i: usize, j: usize) -> Self {
            // SAFETY: as above.
            unsafe {
                let keep = keep16(m, m.index(i, j));
                let g = _mm512_mul_ps(t.0, _mm512_set1_ps(m.scale));
                Z(_mm512_mask_add_ps(self.0, keep, self.0, g))
            }
        }
        #[inline(always)]
        unsafe fn sum8(v: [Self; 8]) -> [f32; 8] {
            // SAFETY: as above (register-only shuffles and adds, one 32-byte store).
            unsafe {
                // Halve the width three times, two vectors at a time: 512-bit halves, then
                // 128-bit quarters, then pairs inside each 128-bit lane.
                let half = |a: Z, b: Z| {
                    _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0x44>(a.0, b.0),
                        _mm512_shuffle_f32x4::<0xEE>(a.0, b.0),
                    )
                };
                let (t01, t23, t45, t67) = (
                    half(v[0], v[1]),
                    half(v[2], v[3]),
                    half(v[4], v[5]),
                    half(v[6], v[7]),
                );
                let quarter = |a: __m512, b: __m512| {
                    _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0x88>(a, b),
                        _mm512_shuffle_f32x4::<0xDD>(a, b),
                    )
                };
                // Lane L (128 bits) of u0 holds four partial sums of v[L], of u1 of v[4 + L].
                let (u0, u1) = (quarter(t01, t23), quarter(t45, t67));
                let p = _mm512_add_ps(
                    _mm512_shuffle_ps::<0b10_00_10_00>(u0, u1),
                    _mm512_shuffle_ps::<0b11_01_11_01>(u0, u1),
                );
                let r = _mm512_add_ps(p, _mm512_shuffle_ps::<0b10_11_00_01>(p, p));
                // Element 0 of lane L is the sum of v[L], element 2 that of v[4 + L].
                let idx = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
                let s = _mm512_permutexvar_ps(idx, r);
                let mut out = [0.0f32; 8];
                _mm256_storeu_ps(out.as_mut_ptr(), _mm512_castps512_ps256(s));
                out
            }
        }
    }

    #[derive(Clone, Copy)]
    pub(super) struct Y(__m256);

    /// `dropout_keep32` for counters `first .. first + 8`, as all-ones / all-zeros lanes.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[inline(always)]
    unsafe fn keep8(m: &Mask, first: u32) -> __m256 {
        // SAFETY: register-only AVX2 arithmetic.
        unsafe {
            let c = |v: u32| _mm256_set1_epi32(v as i32);
            let idx = _mm256_add_epi32(c(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            let mut z = _mm256_xor_si256(_mm256_mullo_epi32(idx, c(DROPOUT_MUL[0])), c(m.seed));
            z = _mm256_xor_si256(z, _mm256_srli_epi32::<16>(z));
            z = _mm256_mullo_epi32(z, c(DROPOUT_MUL[1]));
            z = _mm256_xor_si256(z, _mm256_srli_epi32::<13>(z));
            z = _mm256_mullo_epi32(z, c(DROPOUT_MUL[2]));
            z = _mm256_xor_si256(z, _mm256_srli_epi32::<16>(z));
            let f = _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_srli_epi32::<8>(z)),
                _mm256_set1_ps(1.0 / 16_777_216.0),
            );
            _mm256_cmp_ps::<_CMP_GE_OQ>(f, _mm256_set1_ps(m.p))
        }
    }

    impl Vector for Y {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            // SAFETY: callers run with AVX2+FMA.
            Y(unsafe { _mm256_setzero_ps() })
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            // SAFETY: as above.
            Y(unsafe { _mm256_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: as above; 8 readable values.
            Y(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: as above; 8 writable values.
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn fma(self, b: Self, c: Self) -> Self {
            // SAFETY: as above.
            Y(unsafe { _mm256_fmadd_ps(self.0, b.0, c.0) })
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let mut t = [0.0f32; 8];
            // SAFETY: as above; `t` holds 8 values.
            unsafe { _mm256_storeu_ps(t.as_mut_ptr(), self.0) };
            ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]))
        }
        #[inline(always)]
        unsafe fn dropped(self, m: &Mask, i: usize, j: usize) -> Self {
            // SAFETY: as above (register-only); dropped lanes become +0.
            unsafe {
                let keep = keep8(m, m.index(i, j));
                Y(_mm256_and_ps(
                    keep,
                    _mm256_mul_ps(self.0, _mm256_set1_ps(m.scale)),
                ))
            }
        }
        #[inline(always)]
        unsafe fn add_kept(self, t: Self, m: &Mask, i: usize, j: usize) -> Self {
            // SAFETY: as above.
            unsafe {
                let keep = keep8(m, m.index(i, j));
                let sum = _mm256_add_ps(self.0, _mm256_mul_ps(t.0, _mm256_set1_ps(m.scale)));
                Y(_mm256_blendv_ps(self.0, sum, keep))
            }
        }
    }
}

/// A row-major matrix view (`ld` = row stride).
#[derive(Clone, Copy)]
struct Mat<'a> {
    d: &'a [f32],
    ld: usize,
}

/// `out[i, q] = s · Σ_p x[i,p] · w[q,p]` for `i < rows`, `q < r` (`w` has `⌈r/RG⌉·RG`
/// zero-padded rows of `k`, `out` row stride `ldo`); with `mask`, `x` is read as `drop(x)`.
///
/// # Safety
/// The CPU has `V`'s instructions; `x` holds `rows` rows of `k` at its stride, `out` `rows`
/// rows of `r` at `ldo`, `w` `⌈r/RG⌉·RG · k` values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dots<V: Vector>(
    x: Mat<'_>,
    rows: usize,
    k: usize,
    w: &[f32],
    r: usize,
    s: f32,
    out: &mut [f32],
    ldo: usize,
    mask: Option<&Mask>,
) {
    let l = V::LANES;
    let kv = k / l * l;
    let xp = x.d.as_ptr();
    let wp = w.as_ptr();
    let mut i = 0;
    while i < rows {
        // Two rows at a time; a lone last row is computed twice and stored once.
        let i1 = if i + 1 < rows { i + 1 } else { i };
        let mut q0 = 0;
        while q0 < r {
            // SAFETY: row offsets < rows·ld, column offsets < k; w rows q0..q0+RG exist.
            unsafe {
                let x0 = xp.add(i * x.ld);
                let x1 = xp.add(i1 * x.ld);
                let wq = wp.add(q0 * k);
                let mut a0 = [V::zero(); RG];
                let mut a1 = [V::zero(); RG];
                let mut p = 0;
                while p < kv {
                    let mut v0 = V::load(x0.add(p));
                    let mut v1 = V::load(x1.add(p));
                    if let Some(mk) = mask {
                        v0 = v0.dropped(mk, i, p);
                        v1 = v1.dropped(mk, i1, p);
                    }
                    for q in 0..RG {
                        let wv = V::load(wq.add(q * k + p));
                        a0[q] = v0.fma(wv, a0[q]);
                        a1[q] = v1.fma(wv, a1[q]);
                    }
                    p += l;
                }
                let (h0, h1) = (V::sum8(a0), V::sum8(a1));
                for q in 0..RG.min(r - q0) {
                    let (mut s0, mut s1) = (h0[q], h1[q]);
                    for pp in kv..k {
                        let wv = *wq.add(q * k + pp);
                        let (mut e0, mut e1) = (*x0.add(pp), *x1.add(pp));
                        if let Some(mk) = mask {
                            e0 = mk.dropped(e0, i, pp);
                            e1 = mk.dropped(e1, i1, pp);
                        }
                        s0 += e0 * wv;
                        s1 += e1 * wv;
                    }
                    out[i * ldo + q0 + q] = s * s0;
                    if i1 != i {
                        out[i1 * ldo + q0 + q] = s * s1;
                    }
                }
            }
            q0 += RG;
        }
        i += 2;
    }
}

/// `y[i, j] += Σ_q u[i,q] · v[q,j]` for `i < rows`, `j < n`; `u` rows padded to `rp`
/// (a multiple of RG, zeros past r), `v` `rp` rows of `n`. With `mask` (`y` is dx under
/// LoRA dropout, `rp = RG`): `y[i, j] += (Σ_q u[i,q] · v[q,j]) / (1-p)` where kept.
///
/// # Safety
/// The CPU has `V`'s instructions; the views hold what they describe.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rank_update<V: Vector>(
    u: &[f32],
    rp: usize,
    rows: usize,
    v: &[f32],
    n: usize,
    y: &mut [f32],
    ldy: usize,
    mask: Option<&Mask>,
) {
    let l = V::LANES;
    let nv = n / l * l;
    // The masked form sums from zero and then adds through the mask; one group of RG ranks
    // keeps that a single sum (LoRA's r ≤ RG on this path's callers is checked below).
    debug_assert!(mask.is_none() || rp == RG);
    let vp = v.as_ptr();
    let yp = y.as_mut_ptr();
    let mut i = 0;
    while i < rows {
        let two = i + 1 < rows;
        let i1 = if two { i + 1 } else { i };
        let mut q0 = 0;
        while q0 < rp {
            // SAFETY: indices stay below rows·ldy, rp·n and rows·rp.
            unsafe {
                let mut b0 = [V::zero(); RG];
                let mut b1 = [V::zero(); RG];
                for q in 0..RG {
                    b0[q] = V::splat(u[i * rp + q0 + q]);
                    b1[q] = V::splat(u[i1 * rp + q0 + q]);
                }
                let y0 = yp.add(i * ldy);
                let y1 = yp.add(i1 * ldy);
                let vq = vp.add(q0 * n);
                let mut j = 0;
                while j < nv {
                    let (mut t0, mut t1) = match mask {
                        Some(_) => (V::zero(), V::zero()),
                        None => (V::load(y0.add(j)), V::load(y1.add(j))),
                    };
                    for q in 0..RG {
                        let w = V::load(vq.add(q * n + j));
                        t0 = b0[q].fma(w, t0);
                        t1 = b1[q].fma(w, t1);
                    }
                    if let Some(mk) = mask {
                        t0 = V::load(y0.add(j)).add_kept(t0, mk, i, j);
                        t1 = V::load(y1.add(j)).add_kept(t1, mk, i1, j);
                    }
                    t0.store(y0.add(j));
                    if two {
                        t1.store(y1.add(j));
                    }
                    j += l;
                }
                for j in nv..n {
                    let (mut t0, mut t1) = match mask {
                        Some(_) => (0.0, 0.0),
                        None => (*y0.add(j), *y1.add(j)),
                    };
                    for q in 0..RG {
                        let w = *vq.add(q * n + j);
                        t0 += u[i * rp + q0 + q] * w;
                        t1 += u[i1 * rp + q0 + q] * w;
                    }
                    if let Some(mk) = mask {
                        t0 = mk.add_kept(*y0.add(j), t0, i, j);
                        t1 = mk.add_kept(*y1.add(j), t1, i1, j);
                    }
                    *y0.add(j) = t0;
                    if two {
                        *y1.add(j) = t1;
                    }
                }
            }
            q0 += RG;
        }
        i += 2;
    }
}

/// `g[q, j] = Σ_{i<rows} u[i,q] · y[i,j]` for `q < rp` (u rows padded to `rp`), `j < n`;
/// `g` is `rp × n`. With `mask`, `y` is read as `drop(y)`.
///
/// # Safety
/// The CPU has `V`'s instructions; the views hold what they describe.
#[inline(always)]
unsafe fn rank_reduce<V: Vector>(
    u: &[f32],
    rp: usize,
    rows: usize,
    y: Mat<'_>,
    n: usize,
    g: &mut [f32],
    mask: Option<&Mask>,
) {
    const JV: usize = 3;
    let l = V::LANES;
    let up = u.as_ptr();
    let yp = y.d.as_ptr();
    let gp = g.as_mut_ptr();
    let mut q0 = 0;
    while q0 < rp {
        let mut j = 0;
        // SAFETY (whole loop): indices stay below rows·rp, rows·ld and rp·n.
        unsafe {
            while j + JV * l <= n {
                let mut acc = [[V::zero(); JV]; RG];
                for i in 0..rows {
                    let yr = yp.add(i * y.ld + j);
                    let mut yv = [V::zero(); JV];
                    for (t, v) in yv.iter_mut().enumerate() {
                        *v = V::load(yr.add(t * l));
                        if let Some(mk) = mask {
                            *v = v.dropped(mk, i, j + t * l);
                        }
                    }
                    let ur = up.add(i * rp + q0);
                    for (q, a) in acc.iter_mut().enumerate() {
                        let b = V::splat(*ur.add(q));
                        for t in 0..JV {
                            a[t] = b.fma(yv[t], a[t]);
                        }
                    }
                }
                for (q, a) in acc.iter().enumerate() {
                    for (t, v) in a.iter().enumerate() {
                        v.store(gp.add((q0 + q) * n + j + t * l));
                    }
                }
                j += JV * l;
            }
            while j + l <= n {
                let mut acc = [V::zero(); RG];
                for i in 0..rows {
                    let mut yv = V::load(yp.add(i * y.ld + j));
                    if let Some(mk) = mask {
                        yv = yv.dropped(mk, i, j);
                    }
                    let ur = up.add(i * rp + q0);
                    for (q, a) in acc.iter_mut().enumerate() {
                        *a = V::splat(*ur.add(q)).fma(yv, *a);
                    }
                }
                for (q, a) in acc.iter().enumerate() {
                    a.store(gp.add((q0 + q) * n + j));
                }
                j += l;
            }
            while j < n {
                let mut acc = [0.0f32; RG];
                for i in 0..rows {
                    let mut yv = *yp.add(i * y.ld + j);
                    if let Some(mk) = mask {
                        yv = mk.dropped(yv, i, j);
                    }
                    let ur = up.add(i * rp + q0);
                    for (q, a) in acc.iter_mut().enumerate() {
                        *a += *ur.add(q) * yv;
                    }
                }
                for (q, a) in acc.iter().enumerate() {
                    *gp.add((q0 + q) * n + j) = *a;
                }
                j += 1;
            }
        }
        q0 += RG;
    }
}

/// Instantiates a kernel for every [`Simd`] behind one safe dispatching function (its
/// callers checked the `Simd` is available).
macro_rules! dispatch {
    ($name:ident, $kernel:ident, ($($arg:ident : $ty:ty),*)) => {
        #[allow(clippy::too_many_arguments)]
        fn $name(simd: Simd, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) {
                    // SAFETY: forwarded; compiled and run with AVX-512F.
                    unsafe { $kernel::<x86::Z>($($arg),*) }
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) {
                    // SAFETY: forwarded; compiled and run with AVX2+FMA.
                    unsafe { $kernel::<x86::Y>($($arg),*) }
                }
                match simd {
                    // SAFETY: `forward`/`backward` checked that this CPU has `simd`; the
                    // callers below pass views that hold what the kernel reads and writes.
                    Simd::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Simd::Avx2 => return unsafe { avx2($($arg),*) },
                    Simd::Portable => {}
                }
            }
            // Other targets have only the portable kernels (`Simd::check` refused the rest).
            let _ = simd;
            // SAFETY: plain Rust lanes; views checked by the callers.
            unsafe { $kernel::<Lanes>($($arg),*) }
        }
    };
}

dispatch!(dots_any, dots, (x: Mat<'_>, rows: usize, k: usize, w: &[f32], r: usize, s: f32, out: &mut [f32], ldo: usize, mask: Option<&Mask>));
dispatch!(rank_update_any, rank_update, (u: &[f32], rp: usize, rows: usize, v: &[f32], n: usize, y: &mut [f32], ldy: usize, mask: Option<&Mask>));
dispatch!(rank_reduce_any, rank_reduce, (u: &[f32], rp: usize, rows: usize, y: Mat<'_>, n: usize, g: &mut [f32], mask: Option<&Mask>));

/// `rows × cols` row-major `src` (row stride `ld`) transposed into `cols` rows of `rows`,
/// scaled, and zero-padded to `pad_rows` rows.
fn transpose_pad(src: &[f32], rows: usize, cols: usize, s: f32, pad_rows: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; pad_rows * rows];
    for (i, row) in src.chunks_exact(cols).take(rows).enumerate() {
        for (q, &v) in row.iter().enumerate() {
            out[q * rows + i] = s * v;
        }
    }
    out
}

/// `src` (`rows × cols`) copied with zero rows appended up to `pad_rows`.
fn pad_rows(src: &[f32], rows: usize, cols: usize, pad_rows: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; pad_rows * cols];
    out[..rows * cols].copy_from_slice(&src[..rows * cols]);
    out
}

/// `rows × r` block of `u` (row stride r) into `rows × rp` (zeros past r).
fn pad_cols(u: &[f32], rows: usize, r: usize, rp: usize, out: &mut Vec<f32>) {
    out.clear();
    out.resize(rows * rp, 0.0);
    for i in 0..rows {
        out[i * rp..i * rp + r].copy_from_slice(&u[i * r..(i + 1) * r]);
    }
}

/// Runs `f(block, first_row, rows)` over the row blocks, in parallel when the pool has
/// threads to spare.
fn for_blocks(m: usize, bm: usize, f: impl Fn(usize, usize, usize) + Sync) {
    let blocks = m.div_ceil(bm);
    let run = |b: usize| f(b, b * bm, bm.min(m - b * bm));
    if rayon::current_num_threads() > 1 && blocks > 1 {
        (0..blocks).into_par_iter().for_each(run);
    } else {
        (0..blocks).for_each(run);
    }
}

/// `u[m,r] = x·Aᵀ`; `y[m,n] += scale · u·Bᵀ`; with `drop`, `x` is read as `drop(x)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    simd: Simd,
    x: &[f32],
    a: &[f32],
    b: &[f32],
    d: LoraDims,
    u: &mut [f32],
    y: &mut [f32],
    drop: Option<LoraDropout>,
) {
    let LoraDims { m, k, n, r, scale } = d;
    simd.check();
    check_lora_forward(d, x, a, b, u, y);
    if m == 0 || r == 0 {
        return;
    }
    let rp = r.div_ceil(RG) * RG;
    let a_pad = pad_rows(a, r, k, rp);
    let bt = transpose_pad(b, n, r, scale, rp);
    let (up, yp) = (SyncPtr(u.as_mut_ptr()), SyncPtr(y.as_mut_ptr()));
    let bm = block_rows(m);
    let mask = drop.map(|dr| Mask::new(dr, k));
    for_blocks(m, bm, |_, i0, rows| {
        // SAFETY: blocks are disjoint row ranges inside u (m·r) and y (m·n).
        let (ub, yb) = unsafe { (up.rows(i0, rows, r), yp.rows(i0, rows, n)) };
        let xb = Mat {
            d: &x[i0 * k..(i0 + rows) * k],
            ld: k,
        };
        let mask = mask.map(|mk| mk.at_row(i0));
        dots_any(simd, xb, rows, k, &a_pad, r, 1.0, ub, r, mask.as_ref());
        let mut upad = Vec::new();
        pad_cols(ub, rows, r, rp, &mut upad);
        rank_update_any(simd, &upad, rp, rows, &bt, n, yb, n, None);
    });
}

/// `dB[n,r] += scale · dyᵀ·u`; `du[m,r] = scale · dy·B`; `dA[r,k] += duᵀ·x`; and, when
/// `dx` is given, `dx[m,k] += du·A`. With `drop`, `x` is read as `drop(x)` and `du·A`
/// reaches `dx` through the same mask.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    simd: Simd,
    x: &[f32],
    a: &[f32],
    b: &[f32],
    u: &[f32],
    dy: &[f32],
    d: LoraDims,
    da: &mut [f32],
    db: &mut [f32],
    du: &mut [f32],
    dx: Option<&mut [f32]>,
    drop: Option<LoraDropout>,
) {
    let LoraDims { m, k, n, r, scale } = d;
    simd.check();
    check_lora_backward(d, x, a, b, u, dy, da, db, du, dx.as_deref());
    if m == 0 || r == 0 {
        return;
    }
    let rp = r.div_ceil(RG) * RG;
    let a_pad = pad_rows(a, r, k, rp);
    let bt = transpose_pad(b, n, r, 1.0, rp);
    let bm = block_rows(m);
    let blocks = m.div_ceil(bm);
    // Per block: G_B (rp × n, = uᵀ·dy) then G_A (rp × k, = duᵀ·x).
    let part = rp * (n + k);
    let mut parts = vec![0.0f32; blocks * part];
    let pp = SyncPtr(parts.as_mut_ptr());
    let dup = SyncPtr(du.as_mut_ptr());
    let dxp = dx.map(|v| SyncPtr(v.as_mut_ptr()));
    let mask = drop.map(|dr| Mask::new(dr, k));
    for_blocks(m, bm, |blk, i0, rows| {
        let mask = mask.map(|mk| mk.at_row(i0));
        // SAFETY: blocks own disjoint rows of du and dx and their own slice of `parts`.
        let (dub, gb) = unsafe { (dup.rows(i0, rows, r), pp.rows(blk, 1, part)) };
        let (gbb, gab) = gb.split_at_mut(rp * n);
        let dyb = Mat {
            d: &dy[i0 * n..(i0 + rows) * n],
            ld: n,
        };
        let xb = Mat {
            d: &x[i0 * k..(i0 + rows) * k],
            ld: k,
        };
        dots_any(simd, dyb, rows, n, &bt, r, scale, dub, r, None);
        let mut pad = Vec::new();
        pad_cols(&u[i0 * r..(i0 + rows) * r], rows, r, rp, &mut pad);
        rank_reduce_any(simd, &pad, rp, rows, dyb, n, gbb, None);
        pad_cols(dub, rows, r, rp, &mut pad);
        rank_reduce_any(simd, &pad, rp, rows, xb, k, gab, mask.as_ref());
        if let Some(dxp) = dxp {
            // SAFETY: as above (rows of dx, checked to hold m·k values).
            let dxb = unsafe { dxp.rows(i0, rows, k) };
            match mask {
                // Several rank groups: their whole sum first, then through the mask (the
                // masked kernel adds one group's sum).
                Some(mk) if rp > RG => {
                    let mut t = vec![0.0f32; rows * k];
                    rank_update_any(simd, &pad, rp, rows, &a_pad, k, &mut t, k, None);
                    for (e, (dv, &tv)) in dxb.iter_mut().zip(&t).enumerate() {
                        *dv = mk.add_kept(*dv, tv, e / k, e % k);
                    }
                }
                _ => rank_update_any(simd, &pad, rp, rows, &a_pad, k, dxb, k, mask.as_ref()),
            }
        }
    });
    // Block partial sums, added in block order.
    let mut tot = vec![0.0f32; part];
    for p in parts.chunks_exact(part) {
        for (t, v) in tot.iter_mut().zip(p) {
            *t += v;
        }
    }
    let (gb, ga) = tot.split_at(rp * n);
    for j in 0..n {
        for q in 0..r {
            db[j * r + q] += scale * gb[q * n + j];
        }
    }
    for (dv, gv) in da[..r * k].iter_mut().zip(&ga[..r * k]) {
        *dv += gv;
    }
}

/// `C = alpha · A · op(B) + beta · C` for a few rows of A with B stored `[n, k]` (`trans_b`,
/// e.g. an `nn.Linear` weight in its dtype) and A row-major: B is read once, 8 rows at a
/// time (widened to f32 when it is not f32 already), each dotted with every row of A. No
/// packing: for a handful of rows, packing B would cost more than the products (decoding one
/// token through `lm_head`). Threads split B's rows. The caller (`gemm`) checked every bound.
pub(crate) fn skinny_trans_b(simd: Simd, g: &GemmCall<'_>, c: &mut [f32]) {
    let GemmCall {
        m,
        n,
        k,
        alpha,
        beta,
        a,
        lda,
        b,
        ldb,
        ldc,
        ..
    } = *g;
    debug_assert!(g.trans_b && !g.trans_a);
    // B rows per task.
    const JB: usize = 64;
    let cp = SyncPtr(c.as_mut_ptr());
    let run = |t: usize| {
        let (j0, j1) = (t * JB, ((t + 1) * JB).min(n));
        let mut wbuf: Vec<f32> = Vec::new();
        let mut out = vec![0.0f32; m * RG];
        let x = Mat { d: a, ld: lda };
        let mut j = j0;
        while j < j1 {
            let w = RG.min(j1 - j);
            let direct = match b {
                BSrc::F32(s) if w == RG && ldb == k => Some(&s[j * k..(j + RG) * k]),
                _ => None,
            };
            let rows: &[f32] = match direct {
                Some(r) => r,
                None => {
                    wbuf.resize(RG * k, 0.0);
                    wbuf[w * k..].fill(0.0);
                    // The rows a piece at a time, so the memory system streams all of them
                    // at once (one row after another waits on each page).
                    const PIECE: usize = 512;
                    for p in (0..k).step_by(PIECE) {
                        let len = PIECE.min(k - p);
                        for q in 0..w {
                            let dst = &mut wbuf[q * k + p..q * k + p + len];
                            widen(simd, b, (j + q) * ldb + p, dst);
                        }
                    }
                    &wbuf
                }
            };
            dots_any(simd, x, m, k, rows, w, 1.0, &mut out, RG, None);
            for i in 0..m {
                // SAFETY: columns j..j+w of row i are inside C (checked by `gemm`) and this
                // task's alone (tasks own disjoint column ranges).
                let crow = unsafe { cp.at(i * ldc + j, w) };
                for (cv, &o) in crow.iter_mut().zip(&out[i * RG..i * RG + w]) {
                    *cv = if beta == 0.0 {
                        alpha * o
                    } else {
                        alpha * o + beta * *cv
                    };
                }
            }
            j += RG;
        }
    };
    let tasks = n.div_ceil(JB);
    if rayon::current_num_threads() > 1 && tasks > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}
