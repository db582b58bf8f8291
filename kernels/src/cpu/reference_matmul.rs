//! Plain reference matmul and LoRA ops: straight loops with f64 accumulation, written to be
//! obviously right. They are the yardstick the fast path (`matmul.rs`) is tested against.
use super::CpuWeight;
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
    assert!(
        x.len() >= m * k,
        "linear_forward: x has {} < {m}x{k} values",
        x.len()
    );
    assert!(
        y.len() >= m * n,
        "linear_forward: y has {} < {m}x{n} values",
        y.len()
    );
    let wf = w.to_f32_vec();
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                s += x[i * k + p] as f64 * wf[j * k + p] as f64;
            }
            put(&mut y[i * n + j], s, accumulate);
        }
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
    assert!(
        dy.len() >= m * n,
        "linear_backward_input: dy has {} < {m}x{n} values",
        dy.len()
    );
    assert!(
        dx.len() >= m * k,
        "linear_backward_input: dx has {} < {m}x{k} values",
        dx.len()
    );
    let wf = w.to_f32_vec();
    for i in 0..m {
        for p in 0..k {
            let mut s = 0.0f64;
            for j in 0..n {
                s += dy[i * n + j] as f64 * wf[j * k + p] as f64;
            }
            put(&mut dx[i * k + p], s, accumulate);
        }
    }
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
    assert!(
        a.len() >= m * k,
        "matmul: A has {} < {m}x{k} values",
        a.len()
    );
    assert!(
        b.len() >= k * n,
        "matmul: B has {} < {k}x{n} values",
        b.len()
    );
    assert!(
        c.len() >= m * n,
        "matmul: C has {} < {m}x{n} values",
        c.len()
    );
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

fn check_lora(op: &str, d: LoraDims, x: &[f32], a: &[f32], b: &[f32]) {
    let LoraDims { m, k, n, r, .. } = d;
    assert!(x.len() >= m * k, "{op}: x has {} < {m}x{k} values", x.len());
    assert!(a.len() >= r * k, "{op}: A has {} < {r}x{k} values", a.len());
    assert!(b.len() >= n * r, "{op}: B has {} < {n}x{r} values", b.len());
}

/// `u[m,r] = x·Aᵀ`; `y[m,n] += scale · u·Bᵀ` (x `[m,k]`, A `[r,k]`, B `[n,r]`).
pub fn lora_forward(x: &[f32], a: &[f32], b: &[f32], d: LoraDims, u: &mut [f32], y: &mut [f32]) {
    let LoraDims { m, k, n, r, scale } = d;
    check_lora("lora_forward", d, x, a, b);
    assert!(
        u.len() >= m * r,
        "lora_forward: u has {} < {m}x{r} values",
        u.len()
    );
    assert!(
        y.len() >= m * n,
        "lora_forward: y has {} < {m}x{n} values",
        y.len()
    );
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
    check_lora("lora_backward", d, x, a, b);
    assert!(
        u.len() >= m * r,
        "lora_backward: u has {} < {m}x{r} values",
        u.len()
    );
    assert!(
        dy.len() >= m * n,
        "lora_backward: dy has {} < {m}x{n} values",
        dy.len()
    );
    assert!(
        da.len() >= r * k,
        "lora_backward: dA has {} < {r}x{k} values",
        da.len()
    );
    assert!(
        db.len() >= n * r,
        "lora_backward: dB has {} < {n}x{r} values",
        db.len()
    );
    assert!(
        du.len() >= m * r,
        "lora_backward: du has {} < {m}x{r} values",
        du.len()
    );
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
        assert!(
            dx.len() >= m * k,
            "lora_backward: dx has {} < {m}x{k} values",
            dx.len()
        );
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
