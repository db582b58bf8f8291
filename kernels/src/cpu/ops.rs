//! Fast ops (for now: the reference).
use super::{CpuWeight, reference_ops as r};
use crate::{AdamW, AttnShape, LossSum, RopeShape, Sgd};

#[allow(clippy::too_many_arguments)]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    r::axpy(y, a, x)
}

#[allow(clippy::too_many_arguments)]
pub fn scale(x: &mut [f32], a: f32) {
    r::scale(x, a)
}

#[allow(clippy::too_many_arguments)]
pub fn sum_squares(x: &[f32]) -> f64 {
    r::sum_squares(x)
}

#[allow(clippy::too_many_arguments)]
pub fn dropout_forward(x: &[f32], out: &mut [f32], p: f32, seed: u64) {
    r::dropout_forward(x, out, p, seed)
}

#[allow(clippy::too_many_arguments)]
pub fn dropout_backward(dy: &[f32], dx: &mut [f32], p: f32, seed: u64) {
    r::dropout_backward(dy, dx, p, seed)
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward(x: &[f32], w: &CpuWeight, y: &mut [f32], rstd: &mut [f32], rows: usize, dim: usize, eps: f32) {
    r::rmsnorm_forward(x, w, y, rstd, rows, dim, eps)
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(dy: &[f32], x: &[f32], w: &CpuWeight, rstd: &[f32], dx: &mut [f32], rows: usize, dim: usize, accumulate: bool) {
    r::rmsnorm_backward(dy, x, w, rstd, dx, rows, dim, accumulate)
}

#[allow(clippy::too_many_arguments)]
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], s: RopeShape, inverse: bool) {
    r::rope(x, cos, sin, s, inverse)
}

#[allow(clippy::too_many_arguments)]
pub fn attention_forward(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32], s: AttnShape) {
    r::attention_forward(q, k, v, out, lse, s)
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward(q: &[f32], k: &[f32], v: &[f32], out: &[f32], lse: &[f32], dout: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], s: AttnShape) {
    r::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, s)
}

#[allow(clippy::too_many_arguments)]
pub fn swiglu_forward(gate: &[f32], up: &[f32], out: &mut [f32]) {
    r::swiglu_forward(gate, up, out)
}

#[allow(clippy::too_many_arguments)]
pub fn swiglu_backward(gate: &[f32], up: &[f32], dout: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    r::swiglu_backward(gate, up, dout, dgate, dup)
}

#[allow(clippy::too_many_arguments)]
pub fn embedding_forward(table: &CpuWeight, ids: &[i32], out: &mut [f32]) {
    r::embedding_forward(table, ids, out)
}

#[allow(clippy::too_many_arguments)]
pub fn embedding_backward(ids: &[i32], dout: &[f32], dtable: &mut [f32]) {
    r::embedding_backward(ids, dout, dtable)
}

#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(logits: &mut [f32], targets: &[i32], row_loss: &mut [f32], vocab: usize, ignore_index: i32, grad_scale: Option<f32>) -> LossSum {
    r::cross_entropy(logits, targets, row_loss, vocab, ignore_index, grad_scale)
}

#[allow(clippy::too_many_arguments)]
pub fn adamw_step(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamW, step: u64) {
    r::adamw_step(param, grad, m, v, hp, step)
}

#[allow(clippy::too_many_arguments)]
pub fn sgd_step(param: &mut [f32], grad: &[f32], momentum_buf: &mut [f32], hp: Sgd, first: bool) {
    r::sgd_step(param, grad, momentum_buf, hp, first)
}
