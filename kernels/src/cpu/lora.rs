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
use super::sync_ptr::SyncPtr;
use crate::LoraDims;

/// Ranks are processed in groups of this many (matrices are zero-padded to a multiple).
const RG: usize = 8;

/// Rows per block: at least 64, at most 16 blocks (bounding dA/dB partial sums).
fn block_rows(m: usize) -> usize {
    m.div_ceil(16).max(64).div_ceil(8) * 8
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

    use super::Vector;

    #[derive(Clone, Copy)]
    pub(super) struct Z(__m512);

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
    }
}

/// A row-major matrix view (`ld` = row stride).
#[derive(Clone, Copy)]
struct Mat<'a> {
    d: &'a [f32],
    ld: usize,
}

/// `out[i, q] = s · Σ_p x[i,p] · w[q,p]` for `i < rows`, `q < r` (`w` has `⌈r/RG⌉·RG`
/// zero-padded rows of `k`, `out` row stride `ldo`).
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
                    let v0 = V::load(x0.add(p));
                    let v1 = V::load(x1.add(p));
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
                        s0 += *x0.add(pp) * wv;
                        s1 += *x1.add(pp) * wv;
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
/// (a multiple of RG, zeros past r), `v` `rp` rows of `n`.
///
/// # Safety
/// The CPU has `V`'s instructions; the views hold what they describe.
#[inline(always)]
unsafe fn rank_update<V: Vector>(
    u: &[f32],
    rp: usize,
    rows: usize,
    v: &[f32],
    n: usize,
    y: &mut [f32],
    ldy: usize,
) {
    let l = V::LANES;
    let nv = n / l * l;
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
                    let mut t0 = V::load(y0.add(j));
                    let mut t1 = V::load(y1.add(j));
                    for q in 0..RG {
                        let w = V::load(vq.add(q * n + j));
                        t0 = b0[q].fma(w, t0);
                        t1 = b1[q].fma(w, t1);
                    }
                    t0.store(y0.add(j));
                    if two {
                        t1.store(y1.add(j));
                    }
                    j += l;
                }
                for j in nv..n {
                    let mut t0 = *y0.add(j);
                    let mut t1 = *y1.add(j);
                    for q in 0..RG {
                        let w = *vq.add(q * n + j);
                        t0 += u[i * rp + q0 + q] * w;
                        t1 += u[i1 * rp + q0 + q] * w;
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
/// `g` is `rp × n`.
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
                    let yv = V::load(yp.add(i * y.ld + j));
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
                    let yv = *yp.add(i * y.ld + j);
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

dispatch!(dots_any, dots, (x: Mat<'_>, rows: usize, k: usize, w: &[f32], r: usize, s: f32, out: &mut [f32], ldo: usize));
dispatch!(rank_update_any, rank_update, (u: &[f32], rp: usize, rows: usize, v: &[f32], n: usize, y: &mut [f32], ldy: usize));
dispatch!(rank_reduce_any, rank_reduce, (u: &[f32], rp: usize, rows: usize, y: Mat<'_>, n: usize, g: &mut [f32]));

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

/// `u[m,r] = x·Aᵀ`; `y[m,n] += scale · u·Bᵀ`.
pub(crate) fn forward(
    simd: Simd,
    x: &[f32],
    a: &[f32],
    b: &[f32],
    d: LoraDims,
    u: &mut [f32],
    y: &mut [f32],
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
    for_blocks(m, bm, |_, i0, rows| {
        // SAFETY: blocks are disjoint row ranges inside u (m·r) and y (m·n).
        let (ub, yb) = unsafe { (up.rows(i0, rows, r), yp.rows(i0, rows, n)) };
        let xb = Mat {
            d: &x[i0 * k..(i0 + rows) * k],
            ld: k,
        };
        dots_any(simd, xb, rows, k, &a_pad, r, 1.0, ub, r);
        let mut upad = Vec::new();
        pad_cols(ub, rows, r, rp, &mut upad);
        rank_update_any(simd, &upad, rp, rows, &bt, n, yb, n);
    });
}

/// `dB[n,r] += scale · dyᵀ·u`; `du[m,r] = scale · dy·B`; `dA[r,k] += duᵀ·x`; and, when
/// `dx` is given, `dx[m,k] += du·A`.
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
    for_blocks(m, bm, |blk, i0, rows| {
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
        dots_any(simd, dyb, rows, n, &bt, r, scale, dub, r);
        let mut pad = Vec::new();
        pad_cols(&u[i0 * r..(i0 + rows) * r], rows, r, rp, &mut pad);
        rank_reduce_any(simd, &pad, rp, rows, dyb, n, gbb);
        pad_cols(dub, rows, r, rp, &mut pad);
        rank_reduce_any(simd, &pad, rp, rows, xb, k, gab);
        if let Some(dxp) = dxp {
            // SAFETY: as above (rows of dx, checked to hold m·k values).
            let dxb = unsafe { dxp.rows(i0, rows, k) };
            rank_update_any(simd, &pad, rp, rows, &a_pad, k, dxb, k);
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
            dots_any(simd, x, m, k, rows, w, 1.0, &mut out, RG);
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
