//! The strategy trait is the whole seam an algorithm needs: a toy FedAvg written here, outside
//! the host crate, with nothing but `Strategy` and the server's public mean step, runs through
//! the federated runner and reproduces the built-in FedAvg's final adapter bytes and
//! evaluations exactly; the same toy with another server rate does not.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Result;
use fedcdd_core::{Algorithm, FedOptVariant, TensorView};
use fedcdd_host::data::corpus::{GenCorpusOptions, gen_corpus};
use fedcdd_host::fl::strategy::{ServerRound, ServerStep, Strategy};
use fedcdd_host::fl::{RunConfig, run_one, run_with};
use fedcdd_host::io::Adapter;
use fedcdd_host::model::init::{InitModelOptions, Preset, build_model};
use fedcdd_host::progress::Reporter;
use fedcdd_host::server::{ClientLoader, ServerStateStore, aggregate_mean, tensor_err};

/// `G + λ·Σ w_i Δ_i / Σ w_i` over every tensor, with plain clients.
struct ToyFedAvg {
    server_lr: f32,
    state: ServerStateStore,
}

impl Strategy for ToyFedAvg {
    fn name(&self) -> &str {
        "toy-fedavg"
    }

    fn aggregate_train(
        &mut self,
        global: &Adapter,
        replies: &mut dyn ClientLoader,
        _round: &ServerRound<'_>,
    ) -> Result<ServerStep> {
        let lr = self.server_lr;
        let agg = aggregate_mean(
            global,
            replies,
            &|_| true,
            &|w| w,
            "toy-fedavg",
            false,
            &mut |g, acc, out| {
                acc.apply_fedavg(TensorView::F32(&g.data), lr, out)
                    .map_err(tensor_err(&g.name))
            },
        )?;
        Ok(agg.into())
    }

    fn state(&self) -> &ServerStateStore {
        &self.state
    }

    fn state_mut(&mut self) -> &mut ServerStateStore {
        &mut self.state
    }
}

fn toy(server_lr: f32) -> Box<dyn Strategy> {
    Box::new(ToyFedAvg {
        server_lr,
        state: ServerStateStore::new("toy-fedavg", FedOptVariant::Reddi),
    })
}

fn root() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("strategy_seam")
        .join(std::process::id().to_string());
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).unwrap();
    root
}

fn metrics_without_seconds(run: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if let Some(o) = v.as_object_mut() {
                o.retain(|k, _| !k.contains("second"));
            }
            v
        })
        .collect()
}

#[test]
fn a_toy_strategy_reproduces_fedavg_through_the_trait_alone() {
    let root = root();
    let model = root.join("tiny");
    build_model(&InitModelOptions::new(Preset::Tiny, &model)).unwrap();
    let corpus = |n: usize, seed: u64, name: &str| {
        let out = root.join(name);
        gen_corpus(&GenCorpusOptions {
            domains: Vec::new(),
            n,
            seed,
            out: out.clone(),
            split: false,
        })
        .unwrap();
        out
    };
    let cfg = RunConfig {
        algorithm: Algorithm::FedAvg,
        model: model.display().to_string(),
        data: corpus(12, 0, "train.jsonl").display().to_string(),
        eval_data: corpus(3, 9, "eval.jsonl").display().to_string(),
        threads: 1,
        num_clients: 3,
        sample_clients: 2,
        rounds: 2,
        local_steps: 2,
        batch: 2,
        micro_batch: 1,
        seq: 32,
        eval_questions: 2,
        lr: 0.002,
        references: Vec::new(),
        ..Default::default()
    };
    cfg.validate().unwrap();
    let quiet = Reporter::new(true);
    let builtin = root.join("fedavg");
    let ours = root.join("toy");
    let other = root.join("toy-half");
    run_one(&cfg, &builtin, false, &quiet).unwrap().unwrap();
    run_with(&cfg, toy(1.0), &ours, false, &quiet)
        .unwrap()
        .unwrap();
    run_with(&cfg, toy(0.5), &other, false, &quiet)
        .unwrap()
        .unwrap();
    let adapter = |run: &Path| fs::read(run.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&builtin), adapter(&ours), "adapter bytes differ");
    assert_eq!(
        metrics_without_seconds(&builtin),
        metrics_without_seconds(&ours)
    );
    assert_ne!(
        adapter(&builtin),
        adapter(&other),
        "the server rate must matter"
    );
    let _ = fs::remove_dir_all(&root);
}
