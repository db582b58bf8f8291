//! The buffer-length checks of the matmul and LoRA ops, shared by the fast path
//! (`matmul.rs`, `lora.rs`) and the reference (`reference_matmul.rs`) so both panic alike,
//! each message naming the op.
use crate::{Gemm, LoraDims};

/// Panics naming `op` unless the buffer `name` (`len` values) holds `rows x cols` or more.
fn at_least(op: &str, name: &str, len: usize, rows: usize, cols: usize) {
    assert!(
        len >= rows * cols,
        "{op}: {name} has {len} < {rows}x{cols} values"
    );
}

/// `linear_forward`: x `[m,k]`, y `[m,n]` for W `[n,k]`.
pub(crate) fn check_linear_forward(x: usize, y: usize, m: usize, n: usize, k: usize) {
    let op = "linear_forward";
    at_least(op, "x", x, m, k);
    at_least(op, "y", y, m, n);
}

/// `linear_backward_input`: dy `[m,n]`, dx `[m,k]` for W `[n,k]`.
pub(crate) fn check_linear_backward_input(dy: usize, dx: usize, m: usize, n: usize, k: usize) {
    let op = "linear_backward_input";
    at_least(op, "dy", dy, m, n);
    at_least(op, "dx", dx, m, k);
}

/// `matmul`: A `[m,k]`, B `[k,n]`, C `[m,n]` (as many values whichever way they are stored).
pub(crate) fn check_matmul(g: Gemm, a: &[f32], b: &[f32], c: &[f32]) {
    let Gemm { m, n, k, .. } = g;
    let op = "matmul";
    at_least(op, "A", a.len(), m, k);
    at_least(op, "B", b.len(), k, n);
    at_least(op, "C", c.len(), m, n);
}

/// The operands both LoRA ops read: x `[m,k]`, A `[r,k]`, B `[n,r]`.
fn check_lora_inputs(op: &str, d: LoraDims, x: &[f32], a: &[f32], b: &[f32]) {
    let LoraDims { m, k, n, r, .. } = d;
    at_least(op, "x", x.len(), m, k);
    at_least(op, "A", a.len(), r, k);
    at_least(op, "B", b.len(), n, r);
}

/// `lora_forward`: the inputs, u `[m,r]` and y `[m,n]`.
pub(crate) fn check_lora_forward(
    d: LoraDims,
    x: &[f32],
    a: &[f32],
    b: &[f32],
    u: &[f32],
    y: &[f32],
) {
    let op = "lora_forward";
    let LoraDims { m, n, r, .. } = d;
    check_lora_inputs(op, d, x, a, b);
    at_least(op, "u", u.len(), m, r);
    at_least(op, "y", y.len(), m, n);
}

/// `lora_backward`: the inputs, u and du `[m,r]`, dy `[m,n]`, dA `[r,k]`, dB `[n,r]`, and
/// dx `[m,k]` when given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_lora_backward(
    d: LoraDims,
    x: &[f32],
    a: &[f32],
    b: &[f32],
    u: &[f32],
    dy: &[f32],
    da: &[f32],
    db: &[f32],
    du: &[f32],
    dx: Option<&[f32]>,
) {
    let op = "lora_backward";
    let LoraDims { m, k, n, r, .. } = d;
    check_lora_inputs(op, d, x, a, b);
    at_least(op, "u", u.len(), m, r);
    at_least(op, "dy", dy.len(), m, n);
    at_least(op, "dA", da.len(), r, k);
    at_least(op, "dB", db.len(), n, r);
    at_least(op, "du", du.len(), m, r);
    if let Some(dx) = dx {
        at_least(op, "dx", dx.len(), m, k);
    }
}
