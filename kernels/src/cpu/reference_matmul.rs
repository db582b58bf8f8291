//! Plain reference matmul and LoRA ops (TODO: written by the kernels work).
#![allow(unused_variables)]
use super::CpuWeight;
use crate::{Gemm, LoraDims};

#[allow(clippy::too_many_arguments)]
pub fn linear_forward(x: &[f32], w: &CpuWeight, y: &mut [f32], m: usize, accumulate: bool) {
    unimplemented!("reference linear_forward")
}

#[allow(clippy::too_many_arguments)]
pub fn linear_backward_input(dy: &[f32], w: &CpuWeight, dx: &mut [f32], m: usize, accumulate: bool) {
    unimplemented!("reference linear_backward_input")
}

#[allow(clippy::too_many_arguments)]
pub fn matmul(g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    unimplemented!("reference matmul")
}

#[allow(clippy::too_many_arguments)]
pub fn lora_forward(x: &[f32], a: &[f32], b: &[f32], d: LoraDims, u: &mut [f32], y: &mut [f32]) {
    unimplemented!("reference lora_forward")
}

#[allow(clippy::too_many_arguments)]
pub fn lora_backward(x: &[f32], a: &[f32], b: &[f32], u: &[f32], dy: &[f32], d: LoraDims, da: &mut [f32], db: &mut [f32], du: &mut [f32], dx: Option<&mut [f32]>) {
    unimplemented!("reference lora_backward")
}
