//! The protocol's reference points: `centralized` (every client's data pooled, the federated
//! run's token budget: rounds × sampled clients × local steps) and `local-only` (each client
//! alone for rounds × local steps; the mean over clients of its evaluation on every domain).
//! Plain training with the same LoRA init and learning-rate schedule.

use anyhow::Result;
use fedcdd_kernels::Backend;

use crate::data::Example;
use crate::io::Tensor;
use crate::model::llama::Workspace;
use crate::progress::Reporter;
use crate::report::EvalPoint;

use super::client::{LocalPlan, train_local};
use super::config::Reference;
use super::live::Live;
use super::scores::{eval_point, mean_points};
use super::seeds::{SEED_DATA, SEED_INIT, stream_seed};
use super::setup::Setup;

pub fn reference_point<B: Backend>(
    setup: &Setup<B>,
    kind: Reference,
    rep: &Reporter,
) -> Result<EvalPoint> {
    let cfg = &setup.cfg;
    let be = &setup.be;
    let lcfg = cfg.lora()?;
    let live = Live::load(be, &setup.base_dir, &setup.model_config, lcfg.clone())?;
    let init = live.fresh(be, stream_seed(cfg.seed, SEED_INIT, 0, 0))?;
    let mut ws = Workspace::new(be, &setup.model_config, &lcfg, cfg.micro_batch, cfg.seq);
    let train_one = |examples: &[Example],
                     steps: usize,
                     steps_per_round: usize,
                     seed: u64,
                     ws: &mut Workspace<B>,
                     what: &str|
     -> Result<Vec<Tensor>> {
        let mut lora = live.lora(be, &init, what)?;
        let per = steps_per_round.max(1);
        let lr = move |s: usize| cfg.lr_at(s / per, s % per, per);
        let plan = LocalPlan {
            steps,
            lr: &lr,
            seed,
            frozen: vec![false; init.len()],
        };
        train_local(
            be,
            cfg,
            &live.model,
            &mut lora,
            ws,
            examples,
            &plan,
            None,
            |s, l| {
                rep.bar
                    .update(s + 1, steps, &format!("{what}: loss {l:.3}"));
            },
        )?;
        rep.bar.finish();
        Ok(lora.to_tensors(be))
    };
    match kind {
        Reference::Centralized => {
            let pooled: Vec<Example> = setup
                .clients
                .iter()
                .flat_map(|c| c.examples.iter().cloned())
                .collect();
            let per = cfg.sample_clients.min(setup.clients.len()) * cfg.local_steps;
            let t = train_one(
                &pooled,
                cfg.rounds * per,
                per,
                stream_seed(cfg.seed, SEED_DATA, usize::MAX, 0),
                &mut ws,
                "centralized",
            )?;
            eval_point(setup, &live, &t, cfg.rounds)
        }
        Reference::LocalOnly => {
            let mut points = Vec::new();
            for c in &setup.clients {
                let what = format!("local-only client {}", c.id);
                let t = train_one(
                    &c.examples,
                    cfg.rounds * cfg.local_steps,
                    cfg.local_steps,
                    stream_seed(cfg.seed, SEED_DATA, usize::MAX, c.id + 1),
                    &mut ws,
                    &what,
                )?;
                points.push(eval_point(setup, &live, &t, cfg.rounds)?);
            }
            Ok(mean_points(&points, cfg.rounds))
        }
    }
}
