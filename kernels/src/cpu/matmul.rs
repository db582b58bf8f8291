//! Fast matmul and LoRA ops: the packed SIMD GEMM of `gemm.rs` for the dense products, the
//! skinny kernels of `lora.rs` for the rank-r LoRA products. Every function runs on the rayon
//! pool it is called in (the backend's, via `Cpu::install`) with the best instruction set of
//! this CPU; the `*_with` forms take a [`Simd`] (tests check every set the CPU has).
use std::time::Instant;

use super::checks::{check_linear_backward_input, check_linear_forward, check_matmul};
pub use super::gemm::Simd;
use super::gemm::{self, BSrc, GemmCall, gemm};
use super::lora::skinny_trans_b;
use super::{Cpu, CpuWeight, WeightSlice, lora};
use crate::{Gemm, LoraDims, LoraDropout};

fn weight_src(w: &CpuWeight) -> BSrc<'_> {
    match w.slice() {
        WeightSlice::F32(s) => BSrc::F32(s),
        WeightSlice::F16(s) => BSrc::F16(s),
        WeightSlice::Bf16(s) => BSrc::Bf16(s),
    }
}

/// `y[m,n] (+)= x[m,k] · Wᵀ` with W `[n,k]` in its stored dtype (widened while packing).
pub fn linear_forward(x: &[f32], w: &CpuWeight, y: &mut [f32], m: usize, accumulate: bool) {
    linear_forward_with(Simd::detect(), x, w, y, m, accumulate)
}

/// [`linear_forward`] with `simd`'s kernels (panics when this CPU lacks them).
pub fn linear_forward_with(
    simd: Simd,
    x: &[f32],
    w: &CpuWeight,
    y: &mut [f32],
    m: usize,
    accumulate: bool,
) {
    let (n, k) = (w.rows, w.cols);
    check_linear_forward(x.len(), y.len(), m, n, k);
    gemm(
        simd,
        &linear_call(x, w, m, n, k, true, accumulate),
        y,
        skinny_trans_b,
    );
}

/// The [`GemmCall`] of a linear op: `C[m,n] (+)= A[m,k] · op(W)` with W `[n,k]` or `[k,n]`
/// as stored (`trans_b` or not), all row-major and dense.
fn linear_call<'a>(
    a: &'a [f32],
    w: &'a CpuWeight,
    m: usize,
    n: usize,
    k: usize,
    trans_b: bool,
    accumulate: bool,
) -> GemmCall<'a> {
    GemmCall {
        m,
        n,
        k,
        alpha: 1.0,
        beta: if accumulate { 1.0 } else { 0.0 },
        a,
        lda: k,
        trans_a: false,
        b: weight_src(w),
        ldb: w.cols,
        trans_b,
        ldc: n,
    }
}

/// `dx[m,k] (+)= dy[m,n] · W` with W `[n,k]` in its stored dtype.
pub fn linear_backward_input(
    dy: &[f32],
    w: &CpuWeight,
    dx: &mut [f32],
    m: usize,
    accumulate: bool,
) {
    linear_backward_input_with(Simd::detect(), dy, w, dx, m, accumulate)
}

/// [`linear_backward_input`] with `simd`'s kernels (panics when this CPU lacks them).
pub fn linear_backward_input_with(
    simd: Simd,
    dy: &[f32],
    w: &CpuWeight,
    dx: &mut [f32],
    m: usize,
    accumulate: bool,
) {
    let (n, k) = (w.rows, w.cols);
    check_linear_backward_input(dy.len(), dx.len(), m, n, k);
    gemm(
        simd,
        &linear_call(dy, w, m, k, n, false, accumulate),
        dx,
        skinny_trans_b,
    );
}

/// `C = alpha · op(A) · op(B) + beta · C`, see [`Gemm`].
pub fn matmul(g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    matmul_with(Simd::detect(), g, a, b, c)
}

/// [`matmul`] with `simd`'s kernels (panics when this CPU lacks them).
pub fn matmul_with(simd: Simd, g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    let Gemm {
        m,
        n,
        k,
        trans_a,
        trans_b,
        alpha,
        beta,
    } = g;
    check_matmul(g, a, b, c);
    let call = GemmCall {
        m,
        n,
        k,
        alpha,
        beta,
        a,
        lda: if trans_a { m } else { k },
        trans_a,
        b: BSrc::F32(b),
        ldb: if trans_b { k } else { n },
        trans_b,
        ldc: n,
    };
    gemm(simd, &call, c, skinny_trans_b);
}

/// `u[m,r] = x·Aᵀ`; `y[m,n] += scale · u·Bᵀ`.
pub fn lora_forward(x: &[f32], a: &[f32], b: &[f32], d: LoraDims, u: &mut [f32], y: &mut [f32]) {
    lora::forward(Simd::detect(), x, a, b, d, u, y, None)
}

/// [`lora_forward`] with `simd`'s kernels (panics when this CPU lacks them).
#[allow(clippy::too_many_arguments)]
pub fn lora_forward_with(
    simd: Simd,
    x: &[f32],
    a: &[f32],
    b: &[f32],
    d: LoraDims,
    u: &mut [f32],
    y: &mut [f32],
) {
    lora::forward(simd, x, a, b, d, u, y, None)
}

/// [`lora_forward`] on `drop(x)`, the mask applied as the kernels read `x` (the same bits
/// as `dropout_forward` into a buffer and [`lora_forward`] on it).
#[allow(clippy::too_many_arguments)]
pub fn lora_forward_dropout_with(
    simd: Simd,
    x: &[f32],
    drop: LoraDropout,
    a: &[f32],
    b: &[f32],
    d: LoraDims,
    u: &mut [f32],
    y: &mut [f32],
) {
    lora::forward(simd, x, a, b, d, u, y, Some(drop))
}

/// `dB += scale · dyᵀ·u`; `du = scale · dy·B`; `dA += duᵀ·x`; `dx += du·A` when given.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
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
    lora::backward(Simd::detect(), x, a, b, u, dy, d, da, db, du, dx, None)
}

/// [`lora_backward`] with `simd`'s kernels (panics when this CPU lacks them).
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_with(
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
    lora::backward(simd, x, a, b, u, dy, d, da, db, du, dx, None)
}

/// [`lora_backward`] on `drop(x)`, `du·A` reaching `dx` through the same mask, all inside
/// the kernels (the same bits as the separate `dropout_forward`, [`lora_backward`] into a
/// zeroed buffer and `dropout_backward`).
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_dropout_with(
    simd: Simd,
    x: &[f32],
    drop: LoraDropout,
    a: &[f32],
    b: &[f32],
    u: &[f32],
    dy: &[f32],
    d: LoraDims,
    da: &mut [f32],
    db: &mut [f32],
    du: &mut [f32],
    dx: &mut [f32],
) {
    lora::backward(simd, x, a, b, u, dy, d, da, db, du, Some(dx), Some(drop))
}

/// This machine's f32 matmul rate in GFLOP/s: the best of repeated `C = A·B` products on a
/// 1024² square problem with the fast GEMM on `cpu`'s threads, run for about `seconds`
/// (at least three products). It is the yardstick `fedcdd bench train` divides by.
pub fn measure_matmul_peak(cpu: &Cpu, seconds: f64) -> f64 {
    const N: usize = 1024;
    let a: Vec<f32> = (0..N * N)
        .map(|i| ((i * 7 + 3) % 17) as f32 / 17.0 - 0.5)
        .collect();
    let b: Vec<f32> = (0..N * N)
        .map(|i| ((i * 5 + 1) % 13) as f32 / 13.0 - 0.5)
        .collect();
    let mut c = vec![0.0f32; N * N];
    let g = Gemm {
        m: N,
        n: N,
        k: N,
        trans_a: false,
        trans_b: false,
        alpha: 1.0,
        beta: 0.0,
    };
    let flops = 2.0 * (N * N * N) as f64;
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut runs = 0;
    while runs < 3 || start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        cpu.install(|| matmul(g, &a, &b, &mut c));
        best = best.min(t.elapsed().as_secs_f64());
        runs += 1;
    }
    std::hint::black_box(&c);
    flops / best / 1e9
}

/// The arithmetic peak of `cpu`'s threads in GFLOP/s: independent f32 fused multiply-adds in
/// registers (the widest this CPU has) on every thread at once for about `seconds`. No
/// matmul reaches it; it says how far from the hardware's limit the GEMM is.
pub fn measure_fma_peak(cpu: &Cpu, seconds: f64) -> f64 {
    // Calibrate one thread's rate, then run every thread of the pool for the given time.
    let probe = 1_000_000u64;
    let t = Instant::now();
    std::hint::black_box(gemm::fma_loop(probe));
    let per_iter = t.elapsed().as_secs_f64() / probe as f64;
    let iters = ((seconds / per_iter.max(1e-12)) as u64).max(probe);
    let t = Instant::now();
    let flops: f64 = cpu
        .install(|| rayon::broadcast(|_| std::hint::black_box(gemm::fma_loop(iters))))
        .iter()
        .sum();
    flops / t.elapsed().as_secs_f64() / 1e9
}
