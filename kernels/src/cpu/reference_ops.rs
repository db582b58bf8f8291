//! Plain reference ops (TODO: written by the kernels work).
#![allow(unused_variables)]
use super::CpuWeight;
use crate::{AdamW, AttnShape, LossSum, RopeShape, Sgd};

#[allow(clippy::too_many_arguments)]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    unimplemented!("reference axpy")
}

#[allow(clippy::too_many_arguments)]
pub fn scale(x: &mut [f32], a: f32) {
    unimplemented!("reference scale")
}

#[allow(clippy::too_many_arguments)]
pub fn sum_squares(x: &[f32]) -> f64 {
    unimplemented!("reference sum_squares")
}

#[allow(clippy::too_many_arguments)]
pub fn dropout_forward(x: &[f32], out: &mut [f32], p: f32, seed: u64) {
    unimplemented!("reference dropout_forward")
}

#[allow(clippy::too_many_arguments)]
pub fn dropout_backward(dy: &[f32], dx: &mut [f32], p: f32, seed: u64) {
    unimplemented!("reference dropout_backward")
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward(x: &[f32], w: &CpuWeight, y: &mut [f32], rstd: &mut [f32], rows: usize, dim: usize, eps: f32) {
    unimplemented!("reference rmsnorm_forward")
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(dy: &[f32], x: &[f32], w: &CpuWeight, rstd: &[f32], dx: &mut [f32], rows: usize, dim: usize, accumulate: bool) {
    unimplemented!("reference rmsnorm_backward")
}

#[allow(clippy::too_many_arguments)]
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], s: RopeShape, inverse: bool) {
    unimplemented!("reference rope")
}

#[allow(clippy::too_many_arguments)]
pub fn attention_forward(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32], s: AttnShape) {
    unimplemented!("reference attention_forward")
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward(q: &[f32], k: &[f32], v: &[f32], out: &[f32], lse: &[f32], dout: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], s: AttnShape) {
    unimplemented!("reference attention_backward")
}

#[allow(clippy::too_many_arguments)]
pub fn swiglu_forward(gate: &[f32], up: &[f32], out: &mut [f32]) {
    unimplemented!("reference swiglu_forward")
}

#[allow(clippy::too_many_arguments)]
pub fn swiglu_backward(gate: &[f32], up: &[f32], dout: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    unimplemented!("reference swiglu_backward")
}

#[allow(clippy::too_many_arguments)]
pub fn embedding_forward(table: &CpuWeight, ids: &[i32], out: &mut [f32]) {
    unimplemented!("reference embedding_forward")
}

#[allow(clippy::too_many_arguments)]
pub fn embedding_backward(ids: &[i32], dout: &[f32], dtable: &mut [f32]) {
    unimplemented!("reference embedding_backward")
}

#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(logits: &mut [f32], targets: &[i32], row_loss: &mut [f32], vocab: usize, ignore_index: i32, grad_scale: Option<f32>) -> LossSum {
    unimplemented!("reference cross_entropy")
}

#[allow(clippy::too_many_arguments)]
pub fn adamw_step(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamW, step: u64) {
    unimplemented!("reference adamw_step")
}

#[allow(clippy::too_many_arguments)]
pub fn sgd_step(param: &mut [f32], grad: &[f32], momentum_buf: &mut [f32], hp: Sgd, first: bool) {
    unimplemented!("reference sgd_step")
}
