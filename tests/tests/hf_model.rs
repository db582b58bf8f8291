//! The LLaMA + LoRA engine against the real thing: random HF LLaMA models (GQA, tied
//! embeddings with an explicit head_dim, llama3 RoPE scaling) and PEFT adapters made by
//! `tests/interop/hf_train_check.py` with transformers + peft + torch (f32, CPU).
//! Checks: the loss matches transformers to 1e-4 relative; one SGD step on the LoRA
//! parameters matches PyTorch + PEFT's step; an adapter written here gives PEFT the same loss.
//! Both the fast CPU path and the plain reference backend are checked.
//!
//! Needs python3 (or `$FEDCDD_PYTHON`) with torch, transformers and peft; without them each
//! test prints a `SKIPPED:` line and passes.

mod cli_util;
mod python_util;

use std::path::Path;
use std::process::Command;

use cli_util::{TempDir, workspace_root};
use fedcdd_host::data::Batch;
use fedcdd_host::io::load_adapter;
use fedcdd_host::model::checkpoint::Checkpoint;
use fedcdd_host::model::config::LlamaConfig;
use fedcdd_host::model::llama::{self, Mode, Model, Workspace};
use fedcdd_host::model::merge::{MergeOptions, merge_adapter};
use fedcdd_host::train::{OptState, Optimizer, load_lora, save_lora, train_step};
use fedcdd_kernels::{Backend, Cpu, Sgd};
use python_util::{PY_ENV, python};

/// Runs the reference script; `Ok(None)` = the Python packages are missing (skip).
fn script(args: &[&str]) -> Result<Option<String>, String> {
    let path = workspace_root().join("tests/interop/hf_train_check.py");
    let out = Command::new(python())
        .arg(path)
        .args(args)
        .envs(PY_ENV)
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) => {
            println!(
                "SKIPPED: needs python3 with torch, transformers and peft (cannot run {}: {e})",
                python()
            );
            return Ok(None);
        }
    };
    match out.status.code() {
        Some(0) => Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned())),
        Some(3) => {
            println!(
                "SKIPPED: needs python3 with torch, transformers and peft ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Ok(None)
        }
        _ => Err(format!(
            "hf_train_check.py {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

fn json_file(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("reference output exists");
    serde_json::from_str(&text).expect("reference output is JSON")
}

fn read_batch(path: &Path) -> Batch {
    let v = json_file(path);
    let rows = |key: &str| -> Vec<Vec<i32>> {
        v[key]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                r.as_array()
                    .expect("row")
                    .iter()
                    .map(|x| x.as_i64().expect("int") as i32)
                    .collect()
            })
            .collect()
    };
    let ids = rows("ids");
    let targets = rows("targets");
    let (batch, seq) = (ids.len(), ids[0].len());
    let targets: Vec<i32> = targets.concat();
    Batch {
        batch,
        seq,
        n_targets: targets
            .iter()
            .filter(|&&t| t != llama::IGNORE_INDEX)
            .count(),
        ids: ids.concat(),
        targets,
        example_index: (0..batch).collect(),
    }
}

/// transformers' (+ PEFT's, unless `adapter` is "none") loss on the test's batch.
fn python_loss(model: &Path, adapter: &Path, dir: &Path) -> f64 {
    let printed = script(&[
        "loss",
        &model.display().to_string(),
        &adapter.display().to_string(),
        &dir.join("batch.json").display().to_string(),
    ])
    .expect("loss script runs")
    .expect("packages present");
    serde_json::from_str::<serde_json::Value>(printed.trim()).expect("json")["loss"]
        .as_f64()
        .expect("loss")
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn check_variant<B: Backend>(be: &B, variant: &str, dir: &Path) {
    let model_dir = dir.join("model");
    let config = LlamaConfig::load(&model_dir).expect("HF config parses");
    let ckpt = Checkpoint::open(&model_dir).expect("HF checkpoint opens");
    let model = Model::load(be, config, &ckpt).expect("model loads");
    let reference = json_file(&dir.join("ref.json"));
    let torch_loss = reference["loss"].as_f64().expect("loss");
    let lr = reference["sgd_lr"].as_f64().expect("lr") as f32;
    let batch = read_batch(&dir.join("batch.json"));

    // 1. the loss of the PEFT adapter matches transformers + peft
    let mut lora = load_lora(be, &model, &dir.join("adapter")).expect("PEFT adapter loads");
    let mut ws = Workspace::new(be, &model.config, &lora.config, batch.batch, batch.seq);
    let l = llama::forward(
        be,
        &model,
        &lora,
        &mut ws,
        &batch.ids,
        &batch.targets,
        Mode { dropout_seed: None },
        None,
    )
    .expect("forward runs");
    let ours = l.sum / l.count as f64;
    assert_eq!(l.count, batch.n_targets);
    assert!(
        rel(ours, torch_loss) < 1e-4,
        "{variant} on {}: loss {ours} vs transformers {torch_loss}",
        be.name()
    );

    // 2. one SGD step on the LoRA parameters matches PyTorch's step
    let mut opt = OptState::new(be, &mut lora);
    let sgd = Optimizer::Sgd(Sgd {
        lr,
        momentum: 0.0,
        dampening: 0.0,
        weight_decay: 0.0,
        nesterov: false,
    });
    let stats = train_step(
        be,
        &model,
        &mut lora,
        &mut opt,
        &mut ws,
        std::slice::from_ref(&batch),
        sgd,
        None,
        0,
        |_, _| Ok(()),
    )
    .expect("train step runs");
    assert!(rel(stats.loss, torch_loss) < 1e-4);
    let stepped = load_adapter(&dir.join("sgd_adapter")).expect("torch's stepped adapter loads");
    let before = load_adapter(&dir.join("adapter")).expect("adapter loads");
    let ours_after = lora.to_tensors(be);
    assert_eq!(ours_after.len(), stepped.tensors.len());
    let mut worst: f64 = 0.0;
    for t in &ours_after {
        let theirs = stepped
            .get(&t.name)
            .unwrap_or_else(|| panic!("torch adapter lacks {}", t.name));
        let start = before.get(&t.name).expect("same names");
        // compare the update (after − before): that is where the gradients show
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for ((a, b), s) in t.data.iter().zip(&theirs.data).zip(&start.data) {
            let (ua, ub) = ((a - s) as f64, (b - s) as f64);
            diff += (ua - ub).powi(2);
            norm += ub.powi(2);
        }
        let r = (diff / norm.max(1e-30)).sqrt();
        worst = worst.max(r);
        assert!(
            r < 1e-3,
            "{variant} on {}: SGD update of {} differs by {r:.2e} (relative L2)",
            be.name(),
            t.name
        );
    }
    println!(
        "{variant} on {}: loss rel err {:.2e}, worst SGD-update rel err {worst:.2e}",
        be.name(),
        rel(ours, torch_loss)
    );

    // 3. our adapter, loaded by PEFT, gives the loss we compute for it
    let ours_dir = dir.join(format!("ours-{}", be.name().replace(' ', "_")));
    save_lora(be, &lora, &ours_dir, "test").expect("adapter saves");
    let l2 = llama::forward(
        be,
        &model,
        &lora,
        &mut ws,
        &batch.ids,
        &batch.targets,
        Mode { dropout_seed: None },
        None,
    )
    .expect("forward runs");
    let ours_new = l2.sum / l2.count as f64;
    let peft_loss = python_loss(&model_dir, &ours_dir, dir);
    assert!(
        rel(ours_new, peft_loss) < 1e-4,
        "{variant}: our adapter's loss {ours_new} vs PEFT's {peft_loss}"
    );
    assert!(
        ours_new < ours,
        "one SGD step should lower the loss on its own batch"
    );

    // 4. merged into the base (W + scale·B·A) and exported, transformers alone gives that loss
    let merged_dir = dir.join(format!("merged-{}", be.name().replace(' ', "_")));
    merge_adapter(&MergeOptions {
        model: model_dir.clone(),
        adapter: ours_dir.clone(),
        out: merged_dir.clone(),
        dtype: None,
    })
    .expect("merge runs");
    let merged_loss = python_loss(&merged_dir, Path::new("none"), dir);
    assert!(
        rel(merged_loss, ours_new) < 1e-4,
        "{variant}: merged model's loss {merged_loss} vs adapter {ours_new}"
    );
    println!(
        "{variant} on {}: merged model in transformers: loss rel err {:.2e}",
        be.name(),
        rel(merged_loss, ours_new)
    );
}

fn run(variant: &str) {
    let work = TempDir::new(&format!("hf-{variant}"));
    match script(&["make", &work.path().display().to_string(), variant]) {
        Ok(Some(_)) => {}
        Ok(None) => return,
        Err(e) => panic!("{e}"),
    }
    check_variant(&Cpu::new(2).expect("cpu"), variant, work.path());
    check_variant(&Cpu::reference(), variant, work.path());
}

#[test]
fn gqa_untied_matches_transformers() {
    run("gqa");
}

#[test]
fn tied_embeddings_explicit_head_dim_match_transformers() {
    run("tied");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    run("llama3");
}
