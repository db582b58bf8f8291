//! The federated loop: rounds of sampled clients. Each round the strategy configures every
//! sampled client, the client trains (with the strategy's client-side hooks) and uploads its
//! masked, wire-encoded update, the server decodes it as from the wire, the strategy
//! aggregates, and the global model is evaluated per domain and checkpointed.
//!
//! Everything random is a pure function of `(seed, round, client)`, so a run resumed from
//! the checkpoint of round `t` computes what the uninterrupted run computed, bit for bit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use fedcdd_core::UploadHeader;
use fedcdd_kernels::Backend;

use crate::io::{Adapter, Tensor};
use crate::model::llama::Workspace;
use crate::progress::Reporter;
use crate::report::{RoundLog, fmt_bytes};
use crate::upload::{ClientUpdate, decode_update, encode_tensors};

use super::client::{LocalPlan, train_local};
use super::live::Live;
use super::scores::{eval_point, evaluate_federation, format_eval_line};
use super::seeds::{SEED_DATA, SEED_INIT, SEED_MASK, sample_round, stream_seed};
use super::session::{RunProgress, RunState, load_checkpoint, reorder, save_checkpoint, sorted};
use super::setup::Setup;
use super::strategy::{ClientJob, ModelContext, NextGlobal, ServerRound, Strategy};

/// Set by Ctrl-C: stop after the current client.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// How a run ended.
pub enum Outcome {
    Finished(Box<RunState>),
    /// Stopped by Ctrl-C; the checkpoint holds the last complete round.
    Interrupted {
        rounds_done: usize,
    },
}

/// What one client sends the server after its local run.
struct Reply {
    update: ClientUpdate,
    loss: f64,
    dense_bytes: u64,
}

/// One sampled client's round: the strategy's configuration, local training from its start
/// adapter, its state updated, the masked upload encoded and decoded as the server would.
#[allow(clippy::too_many_arguments)]
fn client_round<B: Backend>(
    setup: &Setup<B>,
    live: &Live<B>,
    strategy: &dyn Strategy,
    st: &mut RunState,
    ws: &mut Workspace<B>,
    global_adapter: &Adapter,
    round: usize,
    k: usize,
    rep: &Reporter,
    what: &str,
) -> Result<Reply> {
    let cfg = &setup.cfg;
    let be = &setup.be;
    let client = &setup.clients[k];
    let origin = format!("client {k} ({})", client.label);
    let state = st.clients.entry(k).or_default();
    let extras = strategy.configure_train(&st.global);
    let lr = cfg.lr_at_round(round);
    let job = ClientJob {
        round,
        global: &st.global,
        extras: &extras,
        steps: cfg.local_steps,
        lr,
        optimizer: cfg.optimizer,
    };
    let mut run = strategy.client_run(&job, state)?;
    let mut lora = live.lora(be, &strategy.client_start(&st.global, state), &origin)?;
    let lr_fn = |_s: usize| lr;
    let plan = LocalPlan {
        steps: cfg.local_steps,
        lr: &lr_fn,
        seed: stream_seed(cfg.seed, SEED_DATA, round, k),
        frozen: st
            .global
            .iter()
            .map(|t| strategy.frozen(t.role()))
            .collect(),
    };
    let loss = train_local(
        be,
        cfg,
        &live.model,
        &mut lora,
        ws,
        &client.examples,
        &plan,
        Some(run.as_mut()),
        |s, l| {
            rep.bar
                .update(s + 1, cfg.local_steps, &format!("{what}: loss {l:.3}"));
        },
    )
    .with_context(|| format!("{origin}, round {}", round + 1))?;
    let local = lora.to_tensors(be);
    let extras = run
        .finish(&local, state)
        .with_context(|| format!("{origin}, round {}", round + 1))?;
    // Client side: Δ of what the strategy sends, masked and encoded.
    let mut deltas = Vec::new();
    let mut dense_bytes = 0u64;
    for (g, l) in sorted(&st.global).iter().zip(&sorted(&local)) {
        if !strategy.sends(g.role()) {
            continue;
        }
        deltas.push(Tensor {
            name: g.name.clone(),
            dims: g.dims.clone(),
            dtype: cfg.upload_dtype,
            data: l.data.iter().zip(&g.data).map(|(a, b)| a - b).collect(),
        });
        dense_bytes += 4 * g.data.len() as u64;
    }
    let header = UploadHeader::new(
        round as u32,
        k as u32,
        client.examples.len() as u64,
        deltas.len() as u32,
    );
    let (bytes, _) = encode_tensors(
        &deltas,
        header,
        &cfg.mask()?,
        stream_seed(cfg.seed, SEED_MASK, round, k),
    )
    .with_context(|| format!("{origin}: encoding its upload"))?;
    // Server side: decode as from the wire.
    let mut update = decode_update(&bytes, Path::new(&origin), global_adapter)?;
    update.extras = extras;
    Ok(Reply {
        update,
        loss,
        dense_bytes,
    })
}

/// Runs (or resumes) the federated rounds in `run_dir` with `strategy`; evaluation and
/// checkpoint after each round.
pub fn run_rounds<B: Backend>(
    setup: &Setup<B>,
    strategy: &mut dyn Strategy,
    run_dir: &Path,
    resume: bool,
    rep: &Reporter,
) -> Result<Outcome> {
    let cfg = &setup.cfg;
    let be = &setup.be;
    let lcfg = cfg.lora()?;
    let config_text = cfg.to_toml()?;
    let base_name = setup.base_dir.display().to_string();

    let mut live = Live::load(be, &setup.base_dir, &setup.model_config, lcfg.clone())?;
    let init = live.fresh(be, stream_seed(cfg.seed, SEED_INIT, 0, 0))?;
    let mut st = if resume {
        let mut st = load_checkpoint(run_dir, strategy)?;
        if st.progress.config != config_text {
            bail!(
                "{}: the checkpoint belongs to another configuration; resume with the run's own \
                 config.toml (no other --set values)",
                run_dir.display()
            );
        }
        st.global = reorder(st.global, &init)?;
        if let Some(b) = &st.progress.base {
            live = Live::load(be, &run_dir.join(b), &setup.model_config, lcfg.clone())?;
        }
        rep.line(&format!(
            "resuming {} after round {}",
            run_dir.display(),
            st.progress.rounds_done
        ));
        st
    } else {
        RunState {
            progress: RunProgress {
                config: config_text.clone(),
                ..Default::default()
            },
            global: init.clone(),
            clients: Default::default(),
        }
    };
    if st.progress.rounds_done == 0 && st.progress.evals.is_empty() {
        rep.line("evaluating the base model (round 0)");
        let p = eval_point(setup, &live, &st.global, 0)?;
        rep.line(&format_eval_line(&p));
        st.progress.evals.push(p);
        save_checkpoint(run_dir, &st, strategy.state(), &lcfg, &base_name)?;
    }
    let n_clients = setup.clients.len();
    let mut ws = Workspace::new(be, &setup.model_config, &lcfg, cfg.micro_batch, cfg.seq);

    for round in st.progress.rounds_done..cfg.rounds {
        let t0 = Instant::now();
        let chosen = sample_round(
            cfg.seed,
            round,
            n_clients,
            cfg.sample_clients.min(n_clients),
        );
        let global_adapter = Adapter {
            tensors: sorted(&st.global),
            config: None,
            path: PathBuf::from(format!("global adapter (round {round})")),
        };
        let mut updates = Vec::with_capacity(chosen.len());
        let mut loss_sum = 0.0;
        let (mut up_bytes, mut dense_bytes) = (0u64, 0u64);
        for (ci, &k) in chosen.iter().enumerate() {
            let what = format!(
                "round {}/{} client {} ({}/{})",
                round + 1,
                cfg.rounds,
                k,
                ci + 1,
                chosen.len()
            );
            let reply = client_round(
                setup,
                &live,
                strategy,
                &mut st,
                &mut ws,
                &global_adapter,
                round,
                k,
                rep,
                &what,
            )?;
            loss_sum += reply.loss;
            up_bytes += reply.update.bytes as u64;
            dense_bytes += reply.dense_bytes;
            updates.push(reply.update);
            if STOP.load(Ordering::SeqCst) {
                rep.bar.finish();
                return Ok(Outcome::Interrupted {
                    rounds_done: st.progress.rounds_done,
                });
            }
        }
        rep.bar.finish();

        // Server step.
        let server_round = ServerRound {
            round,
            total_clients: n_clients,
            model: Some(ModelContext {
                dir: &live.model_dir,
                config: &setup.model_config,
                lora: &lcfg,
                run_dir,
            }),
        };
        let step = strategy
            .aggregate_train(&global_adapter, &mut updates.as_slice(), &server_round)
            .with_context(|| format!("server step of round {}", round + 1))?;
        match step.next {
            NextGlobal::Adapter(tensors) => st.global = reorder(tensors, &st.global)?,
            NextGlobal::NewBase(dir) => {
                live = Live::load(be, &dir, &setup.model_config, lcfg.clone())?;
                st.progress.base = dir.file_name().map(|n| n.to_string_lossy().into_owned());
                st.global = live.fresh(be, stream_seed(cfg.seed, SEED_INIT, round + 1, 0))?;
            }
        }
        let log = RoundLog {
            round: round + 1,
            clients: chosen.clone(),
            train_loss: loss_sum / chosen.len().max(1) as f64,
            upload_bytes: up_bytes,
            dense_bytes,
            seconds: t0.elapsed().as_secs_f64(),
        };
        let mut line = format!(
            "round {}/{}: clients {:?}, train loss {:.3}, uploaded {} ({:.0}% of dense)",
            round + 1,
            cfg.rounds,
            chosen,
            log.train_loss,
            fmt_bytes(up_bytes as f64),
            100.0 * up_bytes as f64 / dense_bytes.max(1) as f64
        );
        st.progress.rounds.push(log);
        if (round + 1) % cfg.eval_every == 0 || round + 1 == cfg.rounds {
            let evaluated = strategy.evaluated(&st.global, &st.clients);
            let p = evaluate_federation(setup, &live, &st.global, evaluated, round + 1)?;
            line.push_str(&format!("; {}", format_eval_line(&p)));
            st.progress.evals.push(p);
        }
        rep.line(&line);
        st.progress.rounds_done = round + 1;
        save_checkpoint(run_dir, &st, strategy.state(), &lcfg, &base_name)?;
        // Merged bases older than the checkpoint's are not needed any more.
        remove_stale_bases(run_dir, st.progress.base.as_deref());
    }
    Ok(Outcome::Finished(Box::new(st)))
}

fn remove_stale_bases(run_dir: &Path, keep: Option<&str>) {
    if let Ok(entries) = std::fs::read_dir(run_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("flora-base-") && Some(name.as_str()) != keep {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}
