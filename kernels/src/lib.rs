//! fedcdd-kernels: every compute op of LLaMA + LoRA training behind one [`Backend`] trait.
//!
//! Conventions shared by every backend (CPU now, CUDA later):
//! - Activations are f32, row-major, one row per token: a `[rows, cols]` buffer holds
//!   `rows · cols` floats. `[batch, seq, heads, head_dim]` is the natural layout of a
//!   projection's output (`[batch·seq, heads·head_dim]`).
//! - Frozen weights ([`Backend::Weight`]) keep their stored dtype (f32, f16 or bf16) and the
//!   PyTorch `nn.Linear` layout `[out_features, in_features]`; every op widens them to f32
//!   and accumulates in f32.
//! - LoRA matrices, gradients and optimizer moments are ordinary f32 buffers.
//! - "accumulate" means `out += result`; otherwise `out = result`.
//! - Shapes are the caller's contract; a mismatch is a programming error and panics with the
//!   op's name (the host validates checkpoints and configs before they reach a kernel).

mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod profile;
pub mod rope;

pub use backend::{
    AdamW, AttnShape, Backend, Copy2d, Gemm, KernelError, LoraDims, LoraDropout, LossSum,
    RopeShape, Sgd, SharedBytes, WeightDType, WeightSource, clip_grad_norm, dropout_keep,
    lora_backward_dropout_unfused, lora_forward_dropout_unfused,
};
pub use cpu::{Cpu, CpuWeight};
pub use profile::{OpKey, OpTotals, Profiled};
pub use rope::{RopeScaling, RopeTable};

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch's `clip_grad_norm_`: total norm over all tensors, scale by max/(norm+1e-6)
    /// only when that is below 1; written out in f64 here.
    #[test]
    fn clip_grad_norm_follows_pytorch() {
        let cpu = Cpu::reference();
        let a0 = vec![3.0f32, -4.0, 0.5];
        let b0 = vec![1.0f32, 2.0];
        let norm64 = a0
            .iter()
            .chain(&b0)
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        for max in [1.0f32, 100.0] {
            let (mut a, mut b) = (cpu.upload(&a0), cpu.upload(&b0));
            let norm = clip_grad_norm(&cpu, &mut [&mut a, &mut b], max);
            assert!((norm as f64 - norm64).abs() < 1e-5 * norm64);
            let coef = (max as f64 / (norm64 + 1e-6)).min(1.0);
            for (got, want) in a.iter().chain(&b).zip(a0.iter().chain(&b0)) {
                let want = *want as f64 * coef;
                assert!(
                    (*got as f64 - want).abs() < 1e-6 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
            }
        }
    }
}
