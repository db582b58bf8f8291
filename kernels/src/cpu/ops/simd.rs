//! Instruction-set tiers of the fast CPU ops and the helpers their kernels share.
//!
//! Every kernel is written once as an `#[inline(always)]` function generic over a [`Mode`]
//! (plain loops over fixed-size chunks that LLVM vectorises). [`multiversion!`] compiles it
//! three times — with AVX-512, with AVX2+FMA, and for the baseline target — and picks one
//! at run time from what the CPU reports. A kernel must not call rayon (closures do not
//! inherit the target features): the multiversioned unit is one task's worth of work.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set tier of the fast CPU ops, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// The compile target's baseline (SSE2 on x86-64): plain multiply and add.
    Generic = 0,
    /// AVX2 with FMA.
    Avx2 = 1,
    /// AVX-512 (F, VL, DQ, BW) with FMA: 16-wide vectors, 32 registers.
    Avx512 = 2,
}

impl Isa {
    fn from_u8(v: u8) -> Isa {
        match v {
            0 => Isa::Generic,
            1 => Isa::Avx2,
            _ => Isa::Avx512,
        }
    }

    /// Parses `generic`, `avx2` or `avx512`.
    pub fn parse(name: &str) -> Option<Isa> {
        match name.trim().to_ascii_lowercase().as_str() {
            "generic" | "scalar" | "none" => Some(Isa::Generic),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            _ => None,
        }
    }
}

static CAP: AtomicU8 = AtomicU8::new(u8::MAX);

/// The best tier this CPU supports, lowered by the `FEDCDD_CPU_ISA` environment variable
/// (`generic`, `avx2`, `avx512`) when that names a lower one.
pub fn detected_isa() -> Isa {
    static DETECTED: OnceLock<Isa> = OnceLock::new();
    *DETECTED.get_or_init(|| hardware_isa().min(env_cap()))
}

/// The `FEDCDD_CPU_ISA` cap (read once; `Isa::Avx512` when unset or not understood).
fn env_cap() -> Isa {
    static ENV: OnceLock<Isa> = OnceLock::new();
    *ENV.get_or_init(|| {
        std::env::var("FEDCDD_CPU_ISA")
            .ok()
            .as_deref()
            .and_then(Isa::parse)
            .unwrap_or(Isa::Avx512)
    })
}

/// The cap on every fast CPU kernel, whatever the hardware: `FEDCDD_CPU_ISA` and
/// [`set_max_isa`] together. Kernels with their own feature checks (the GEMM's) honour it.
pub fn isa_cap() -> Isa {
    env_cap().min(Isa::from_u8(CAP.load(Ordering::Relaxed)))
}

fn hardware_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512bw");
        if avx512 {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Generic
}

/// The tier the fast ops use now: [`detected_isa`], capped by [`set_max_isa`].
pub fn isa() -> Isa {
    detected_isa().min(Isa::from_u8(CAP.load(Ordering::Relaxed)))
}

/// Caps the tier of every later fast op in this process (tests and benchmarks compare
/// tiers with it); `Isa::Avx512` removes the cap.
pub fn set_max_isa(cap: Isa) {
    CAP.store(cap as u8, Ordering::Relaxed);
}

/// How a kernel instance multiplies and adds, and which tier it is compiled for.
pub(crate) trait Mode: Copy + Send + Sync + 'static {
    /// The tier: a kernel instantiated with a mode runs only where [`isa`] allows it (see
    /// [`multiversion!`]), so code generic over `M` may use `M::ISA`'s intrinsics.
    const ISA: Isa;
    /// `a·b + c`: fused where the tier has FMA, else a multiply and an add.
    fn fma(a: f32, b: f32, c: f32) -> f32;
}

#[derive(Clone, Copy)]
pub(crate) struct Avx512;
#[derive(Clone, Copy)]
pub(crate) struct Avx2;
#[derive(Clone, Copy)]
pub(crate) struct Plain;

impl Mode for Avx512 {
    const ISA: Isa = Isa::Avx512;
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl Mode for Avx2 {
    const ISA: Isa = Isa::Avx2;
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl Mode for Plain {
    const ISA: Isa = Isa::Generic;
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// Defines `fn $name(args) -> ret` that runs `$body::<M>(args)` compiled for the best
/// [`Isa`] available (see the module docs). `$body` must be `#[inline(always)]`, and so must
/// everything it calls on its hot path.
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:ident;) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            use $crate::cpu::ops::simd as simd_;
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body::<simd_::Avx512>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body::<simd_::Avx2>($($arg),*)
                }
                match simd_::isa() {
                    // SAFETY: `isa()` returns `Avx512` only when the CPU reports every
                    // feature this function is compiled with.
                    simd_::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: likewise for AVX2 and FMA.
                    simd_::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    simd_::Isa::Generic => {}
                }
            }
            $body::<simd_::Plain>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Lanes of the chunked loops (one AVX-512 vector).
pub(crate) const LANES: usize = 16;

/// `e^x` in f32 to about 2 ulp, branch-free so loops over it vectorise (Cephes' `expf`
/// polynomial with Cody–Waite range reduction). Below −87.3 it returns 0 (also for −∞);
/// above 88 it saturates at `e^88`; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp<M: Mode>(x: f32) -> f32 {
    const LO: f32 = -87.336_54;
    const HI: f32 = 88.0;
    // 1.5·2^23: adding it rounds to an integer kept in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // clamp keeps NaN
    let xc = x.clamp(LO, HI);
    let t = M::fma(xc, std::f32::consts::LOG2_E, MAGIC);
    let n = t - MAGIC;
    let r = M::fma(n, -LN2_HI, xc);
    let r = M::fma(n, -LN2_LO, r);
    let mut p = 1.987_569_1e-4;
    p = M::fma(p, r, 1.398_199_9e-3);
    p = M::fma(p, r, 8.333_452e-3);
    p = M::fma(p, r, 4.166_579_6e-2);
    p = M::fma(p, r, 1.666_666_5e-1);
    p = M::fma(p, r, 0.5);
    let y = M::fma(p, r * r, r) + 1.0;
    // 2^n from the integer in t's mantissa; n lies in [-126, 127].
    let n_bits = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let pow2n = f32::from_bits((n_bits.wrapping_add(127) << 23) as u32);
    let e = y * pow2n;
    if x < LO { 0.0 } else { e }
}

/// The largest element (−∞ for an empty slice), lane by lane then across lanes.
#[inline(always)]
pub(crate) fn max<M: Mode>(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let (chunks, tail) = x.as_chunks::<LANES>();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] = if acc[l + w] > acc[l] {
                acc[l + w]
            } else {
                acc[l]
            };
        }
        w /= 2;
    }
    let mut m = acc[0];
    for &v in tail {
        m = if v > m { v } else { m };
    }
    m
}

/// `Σ a·b` in f32, lane by lane then across lanes.
#[inline(always)]
pub(crate) fn dot<M: Mode>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (ca, ta) = a[..n].as_chunks::<LANES>();
    let (cb, tb) = b[..n].as_chunks::<LANES>();
    let mut acc = [0.0f32; LANES];
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..LANES {
            acc[l] = M::fma(x[l], y[l], acc[l]);
        }
    }
    let mut s = 0.0f32;
    for (x, y) in ta.iter().zip(tb) {
        s = M::fma(*x, *y, s);
    }
    hsum(&acc) + s
}

/// The sum of the lanes, pairwise.
///
/// The lanes pass through `black_box` first: when LLVM's SLP vectoriser sees the pairwise
/// tree it vectorises it together with the loop that filled the lanes, at its default
/// width of 128 bits, so the whole 16-lane accumulation ends up in 4-wide registers (seen
/// on AVX-512: 8 `vfmaddps xmm` per step instead of one `zmm`). The barrier costs a store
/// and reloads.
#[inline(always)]
pub(crate) fn hsum(acc: &[f32; LANES]) -> f32 {
    let mut h = std::hint::black_box(*acc);
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            h[l] += h[l + w];
        }
        w /= 2;
    }
    h[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_rel_error<M: Mode>() -> f64 {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp::<M>(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        worst
    }

    #[test]
    fn exp_is_accurate_to_a_few_ulp() {
        // 2^-23 is one f32 ulp at the top of a binade.
        let ulp = 1.0 / 8_388_608.0;
        assert!(
            max_rel_error::<Plain>() < 3.0 * ulp,
            "{}",
            max_rel_error::<Plain>()
        );
        assert!(
            max_rel_error::<Avx2>() < 3.0 * ulp,
            "{}",
            max_rel_error::<Avx2>()
        );
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp::<Plain>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp::<Plain>(-100.0), 0.0);
        assert_eq!(exp::<Plain>(0.0), 1.0);
        assert!(exp::<Plain>(f32::NAN).is_nan());
        assert!(exp::<Plain>(f32::INFINITY).is_finite());
        assert!(exp::<Plain>(-87.0) > 0.0);
    }

    #[test]
    fn reductions_match_plain_sums() {
        let x: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
        assert_eq!(max::<Plain>(&x), 50.0);
        assert_eq!(max::<Plain>(&[]), f32::NEG_INFINITY);
        let want: f32 = x.iter().map(|v| v * v).sum();
        assert_eq!(dot::<Plain>(&x, &x), want);
    }
}
