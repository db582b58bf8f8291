//! `fedcdd make-example`: a synthetic federated round on disk — a global PEFT LoRA adapter
//! with LLaMA tensor names and one trained adapter per client — so the aggregation commands
//! can be tried without a training run. Each client's update is a shared ("consensus")
//! component plus a client-specific ("domain") component of comparable size.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use fedcdd_core::DType;
use fedcdd_core::mask::Xoshiro256PlusPlus;

use crate::adapter::{Tensor, save_adapter};

#[derive(Args, Debug)]
pub struct ExampleArgs {
    /// Output directory: writes `global/` and `client-<i>/` adapter directories.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Transformer layers of the (imaginary) base model.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Hidden size of the base model.
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 0)]
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

pub fn make_example(a: &ExampleArgs) -> Result<()> {
    if a.clients == 0 || a.layers == 0 || a.hidden == 0 || a.rank == 0 {
        bail!("--clients, --layers, --hidden and --rank must be positive");
    }
    let mut rng = Xoshiro256PlusPlus::from_state([a.seed ^ 0x5EED, 7, 11, 13]);
    let modules = ["q_proj", "v_proj"];
    let mut global = Vec::new();
    for layer in 0..a.layers {
        for m in modules {
            let base = format!("base_model.model.model.layers.{layer}.self_attn.{m}");
            let bound = 1.0 / (a.hidden as f32).sqrt();
            global.push(Tensor {
                name: format!("{base}.lora_A.weight"),
                dims: vec![a.rank, a.hidden],
                dtype: DType::F32,
                data: randn(&mut rng, a.rank * a.hidden, bound),
            });
            global.push(Tensor {
                name: format!("{base}.lora_B.weight"),
                dims: vec![a.hidden, a.rank],
                dtype: DType::F32,
                data: randn(&mut rng, a.hidden * a.rank, 1e-3),
            });
        }
    }
    global.sort_by(|x, y| x.name.cmp(&y.name));
    let config = serde_json::json!({
        "base_model_name_or_path": "fedcdd-example",
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": a.rank,
        "lora_alpha": 2 * a.rank,
        "lora_dropout": 0.05,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null
    });
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
    eprintln!(
        "wrote {}/global and {} client adapters ({} tensors each)",
        a.out.display(),
        a.clients,
        global.len()
    );
    Ok(())
}
