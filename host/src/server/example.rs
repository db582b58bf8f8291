//! `fedcdd make-example`: a synthetic federated round on disk — a global PEFT LoRA adapter
//! with LLaMA tensor names and one trained adapter per client — so the aggregation commands
//! can be tried without a training run. Each client's update is a shared ("consensus")
//! component plus a client-specific ("domain") component of comparable size.

use std::path::PathBuf;

use anyhow::{Result, bail};
use fedcdd_core::DType;
use fedcdd_core::mask::Xoshiro256PlusPlus;

use crate::io::{Tensor, save_adapter};
use crate::model::lora::{LoraConfig, Proj, peft_names};

/// What `fedcdd make-example` writes.
#[derive(Debug, Clone)]
pub struct ExampleOptions {
    /// Output directory: gets `global/` and `client-<i>/` adapter directories.
    pub out: PathBuf,
    pub clients: usize,
    /// Transformer layers of the (imaginary) base model.
    pub layers: usize,
    /// Hidden size of the base model.
    pub hidden: usize,
    /// LoRA rank r.
    pub rank: usize,
    pub seed: u64,
}

/// Gaussian-ish values (sum of uniforms), deterministic from the generator.
fn randn(rng: &mut Xoshiro256PlusPlus, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let s: f32 = (0..4)
                .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                .sum();
            s * 1.732 * scale
        })
        .collect()
}

/// Writes the round; returns the number of tensors per adapter.
pub fn make_example(a: &ExampleOptions) -> Result<usize> {
    if a.clients == 0 || a.layers == 0 || a.hidden == 0 || a.rank == 0 {
        bail!("--clients, --layers, --hidden and --rank must be positive");
    }
    let mut rng = Xoshiro256PlusPlus::from_state([a.seed ^ 0x5EED, 7, 11, 13]);
    let lora = LoraConfig {
        r: a.rank,
        alpha: 2.0 * a.rank as f32,
        dropout: 0.05,
        targets: vec![Proj::Q, Proj::V],
        rslora: false,
    };
    let mut global = Vec::new();
    for layer in 0..a.layers {
        for &p in &lora.targets {
            let (name_a, name_b) = peft_names(layer, p);
            let bound = 1.0 / (a.hidden as f32).sqrt();
            global.push(Tensor {
                name: name_a,
                dims: vec![a.rank, a.hidden],
                dtype: DType::F32,
                data: randn(&mut rng, a.rank * a.hidden, bound),
            });
            global.push(Tensor {
                name: name_b,
                dims: vec![a.hidden, a.rank],
                dtype: DType::F32,
                data: randn(&mut rng, a.hidden * a.rank, 1e-3),
            });
        }
    }
    global.sort_by(|x, y| x.name.cmp(&y.name));
    let config = lora.to_peft_json("fedcdd-example");
    save_adapter(&a.out.join("global"), &global, Some(&config))?;
    let consensus: Vec<Vec<f32>> = global
        .iter()
        .map(|t| randn(&mut rng, t.data.len(), 2e-3))
        .collect();
    for c in 0..a.clients {
        let strength = 0.5 + c as f32 / a.clients as f32;
        let local: Vec<Tensor> = global
            .iter()
            .zip(&consensus)
            .map(|(g, shared)| {
                let own = randn(&mut rng, g.data.len(), 2e-3);
                let data = g
                    .data
                    .iter()
                    .zip(shared)
                    .zip(&own)
                    .map(|((gv, s), o)| gv + strength * s + o)
                    .collect();
                Tensor { data, ..g.clone() }
            })
            .collect();
        save_adapter(&a.out.join(format!("client-{c}")), &local, Some(&config))?;
    }
    Ok(global.len())
}
