//! Fast matmul and LoRA ops (for now: the reference).
use super::{CpuWeight, reference_matmul as r};
use crate::{Gemm, LoraDims};

#[allow(clippy::too_many_arguments)]
pub fn linear_forward(x: &[f32], w: &CpuWeight, y: &mut [f32], m: usize, accumulate: bool) {
    r::linear_forward(x, w, y, m, accumulate)
}

#[allow(clippy::too_many_arguments)]
pub fn linear_backward_input(dy: &[f32], w: &CpuWeight, dx: &mut [f32], m: usize, accumulate: bool) {
    r::linear_backward_input(dy, w, dx, m, accumulate)
}

#[allow(clippy::too_many_arguments)]
pub fn matmul(g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    r::matmul(g, a, b, c)
}

#[allow(clippy::too_many_arguments)]
pub fn lora_forward(x: &[f32], a: &[f32], b: &[f32], d: LoraDims, u: &mut [f32], y: &mut [f32]) {
    r::lora_forward(x, a, b, d, u, y)
}

#[allow(clippy::too_many_arguments)]
pub fn lora_backward(x: &[f32], a: &[f32], b: &[f32], u: &[f32], dy: &[f32], d: LoraDims, da: &mut [f32], db: &mut [f32], du: &mut [f32], dx: Option<&mut [f32]>) {
    r::lora_backward(x, a, b, u, dy, d, da, db, du, dx)
}
