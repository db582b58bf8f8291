//! Plain reference matmul and LoRA ops: straight loops with f64 accumulation, written to be
//! obviously right. They are the yardstick the fast path (`matmul.rs`) is tested against.
use super::CpuWeight;
use super::checks::{
    check_linear_backward_input, check_linear_forward, check_lora_backward, check_lora_forward,
    check_matmul,
};
use crate::{Gemm, LoraDims};

/// `out[i] = if accumulate { out[i] + v } else { v }`, the one place "accumulate" is decided.
fn put(out: &mut f32, v: f64, accumulate: bool) {
    *out = if accumulate {
        (*out as f64 + v) as f32
    } else {
        v as f32
    };
}

/// `y[m,n] (+)= x[m,k] · Wᵀ` with W `[n,k]` widened from its stored dtype.
pub fn linear_forward(x: &[f32], w: &CpuWeight, y: &mut [f32], m: usize, accumulate: bool) {
    let (n, k) = (w.rows, w.cols);
    check_linear_forward(x.len(), y.len(), m, n, k);
    let g = linear_gemm(m, n, k, true, accumulate);
    matmul(g, x, &w.to_f32_vec(), y);
}

/// The [`Gemm`] of a linear op: `C[m,n] (+)= A[m,k] · op(W)` (`beta` 1 or 0; `C + s` and
/// `s` in f64 are the bits `put` gives).
fn linear_gemm(m: usize, n: usize, k: usize, trans_b: bool, accumulate: bool) -> Gemm {
    Gemm {
        m,
        n,
        k,
        trans_a: false,
        trans_b,
        alpha: 1.0,
        beta: if accumulate { 1.0 } else { 0.0 },
    }
}

/// `dx[m,k] (+)= dy[m,n] · W` with W `[n,k]` widened from its stored dtype.
pub fn linear_backward_input(
    dy: &[f32],
    w: &CpuWeight,
    dx: &mut [f32],
    m: usize,
    accumulate: bool,
) {
    let (n, k) = (w.rows, w.cols);
    check_linear_backward_input(dy.len(), dx.len(), m, n, k);
    let g = linear_gemm(m, k, n, false, accumulate);
    matmul(g, dy, &w.to_f32_vec(), dx);
}

/// `C = alpha · op(A) · op(B) + beta · C`, see [`Gemm`]; `beta = 0` overwrites C.
pub fn matmul(g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
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
    let a_at = |i: usize, p: usize| if trans_a { a[p * m + i] } else { a[i * k + p] };
    let b_at = |p: usize, j: usize| if trans_b { b[j * k + p] } else { b[p * n + j] };
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                s += a_at(i, p) as f64 * b_at(p, j) as f64;
            }
            let prev = if beta == 0.0 {
                0.0
            } else {
                beta as f64 * c[i * n + j] as f64
            };
            c[i * n + j] = (alpha as f64 * s + prev) as f32;
        }
    }
}

/// `u[m,r] = x·Aᵀ`; `y[m,n] += scale · u·Bᵀ` (x `[m,k]`, A `[r,k]`, B `[n,r]`).
pub fn lora_forward(x: &[f32], a: &[f32], b: &[f32], d: LoraDims, u: &mut [f32], y: &mut [f32]) {
    let LoraDims { m, k, n, r, scale } = d;
    check_lora_forward(d, x, a, b, u, y);
    for i in 0..m {
        for q in 0..r {
            let mut s = 0.0f64;
            for p in 0..k {
                s += x[i * k + p] as f64 * a[q * k + p] as f64;
            }
            u[i * r + q] = s as f32;
        }
    }
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for q in 0..r {
                s += u[i * r + q] as f64 * b[j * r + q] as f64;
            }
            put(&mut y[i * n + j], scale as f64 * s, true);
        }
    }
}

/// Given `dy[m,n]`: `dB[n,r] += scale · dyᵀ·u`; `du[m,r] = scale · dy·B`;
/// `dA[r,k] += duᵀ·x`; and, when `dx` is given, `dx[m,k] += du·A`.
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
    let LoraDims { m, k, n, r, scale } = d;
    let scale = scale as f64;
    check_lora_backward(d, x, a, b, u, dy, da, db, du, dx.as_deref());
    for j in 0..n {
        for q in 0..r {
            let mut s = 0.0f64;
            for i in 0..m {
                s += dy[i * n + j] as f64 * u[i * r + q] as f64;
            }
            put(&mut db[j * r + q], scale * s, true);
        }
    }
    for i in 0..m {
        for q in 0..r {
            let mut s = 0.0f64;
            for j in 0..n {
                s += dy[i * n + j] as f64 * b[j * r + q] as f64;
            }
            du[i * r + q] = (scale * s) as f32;
        }
    }
    for q in 0..r {
        for p in 0..k {
            let mut s = 0.0f64;
            for i in 0..m {
                s += du[i * r + q] as f64 * x[i * k + p] as f64;
            }
            put(&mut da[q * k + p], s, true);
        }
    }
    if let Some(dx) = dx {
        for i in 0..m {
            for p in 0..k {
                let mut s = 0.0f64;
                for q in 0..r {
                    s += du[i * r + q] as f64 * a[q * k + p] as f64;
                }
                put(&mut dx[i * k + p], s, true);
            }
        }
    }
}
