//! FLoRA (Wang et al. 2024): the server stacks the clients' whole adapters
//! (`A = [p_1A_1; …]`, `B = [B_1 … B_N]`), i.e. `ΔW = s·Σ p_i B_i A_i`, merges that into the
//! base model's weights as a new checkpoint, and LoRA starts afresh on it.

use anyhow::{Context, Result, bail};
use fedcdd_core::{Algorithm, DType, FedOptVariant, TensorRole};

use crate::io::{Adapter, Tensor};
use crate::model::checkpoint::Checkpoint;
use crate::model::merge::{checkpoint_dtype, merge_lora_into};
use crate::server::{AggregateReport, ClientLoader, ServerStateStore};
use crate::upload::apply_update;

use super::api::{NextGlobal, ServerRound, ServerStep, Strategy};

pub struct FLora {
    state: ServerStateStore,
}

impl FLora {
    pub fn new() -> Self {
        FLora {
            state: ServerStateStore::new(Algorithm::FLora.name(), FedOptVariant::Reddi),
        }
    }
}

impl Default for FLora {
    fn default() -> Self {
        Self::new()
    }
}

impl Strategy for FLora {
    fn name(&self) -> &str {
        Algorithm::FLora.name()
    }

    fn aggregate_train(
        &mut self,
        global: &Adapter,
        replies: &mut dyn ClientLoader,
        round: &ServerRound<'_>,
    ) -> Result<ServerStep> {
        let Some(model) = &round.model else {
            bail!(
                "FLoRA merges the stacked client adapters into the base model weights; it is \
                 part of the federated training loop, not of `fedcdd aggregate`"
            );
        };
        let n = replies.count();
        if n == 0 {
            bail!("no clients to aggregate");
        }
        let updates = (0..n)
            .map(|i| replies.load(i))
            .collect::<Result<Vec<_>>>()?;
        let total: f64 = updates.iter().map(|u| u.samples.unwrap_or(1) as f64).sum();
        let locals: Vec<(f32, Vec<Tensor>)> = updates
            .iter()
            .map(|u| {
                (
                    (u.samples.unwrap_or(1) as f64 / total) as f32,
                    apply_update(global, u),
                )
            })
            .collect();
        let r = model.lora.r;
        let mut stacked = Vec::new();
        for g in &global.tensors {
            let is_a = g.role() == TensorRole::LoraA;
            let (rows, cols) = (g.dims[0], g.dims[1]);
            let data = if is_a {
                // [n·r, in]: client blocks of rows, scaled by p_i.
                let mut d = Vec::with_capacity(n * rows * cols);
                for (p, t) in &locals {
                    let a = t
                        .iter()
                        .find(|t| t.name == g.name)
                        .context("stacking: A missing")?;
                    d.extend(a.data.iter().map(|v| v * p));
                }
                d
            } else {
                // [out, n·r]: client blocks of columns.
                let mut d = vec![0.0f32; rows * n * r];
                for (i, (_, t)) in locals.iter().enumerate() {
                    let b = t
                        .iter()
                        .find(|t| t.name == g.name)
                        .context("stacking: B missing")?;
                    for o in 0..rows {
                        d[o * n * r + i * r..o * n * r + (i + 1) * r]
                            .copy_from_slice(&b.data[o * r..(o + 1) * r]);
                    }
                }
                d
            };
            let dims = if is_a {
                vec![n * rows, cols]
            } else {
                vec![rows, n * r]
            };
            stacked.push(Tensor {
                name: g.name.clone(),
                dims,
                dtype: DType::F32,
                data,
            });
        }
        // The stacked adapter has rank n·r; keep the clients' scale s.
        let mut scfg = model.lora.clone();
        scfg.r = n * r;
        scfg.rslora = false;
        scfg.alpha = model.lora.scale() * scfg.r as f32;
        let ckpt = Checkpoint::open(model.dir)?;
        let dtype = checkpoint_dtype(&ckpt)?;
        let name = format!("flora-base-{:04}", round.round + 1);
        let tmp = model.run_dir.join(format!("{name}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        merge_lora_into(
            model.dir,
            model.config,
            &ckpt,
            &scfg,
            &stacked,
            "FLoRA stack",
            &tmp,
            dtype,
        )?;
        let dst = model.run_dir.join(&name);
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::rename(&tmp, &dst).with_context(|| format!("cannot move {}", tmp.display()))?;
        self.state.steps += 1;
        Ok(ServerStep {
            next: NextGlobal::NewBase(dst),
            report: AggregateReport {
                sample_weights: locals.iter().map(|(p, _)| *p as f64).collect(),
                mean_agreement: vec![None; n],
                tensors_aggregated: global.tensors.len(),
                ..Default::default()
            },
        })
    }

    fn state(&self) -> &ServerStateStore {
        &self.state
    }

    fn state_mut(&mut self) -> &mut ServerStateStore {
        &mut self.state
    }
}
