//! The federated loop, as two roles that run in one process (`fedcdd run`) or on different
//! machines (the Flower app, through the C ABI):
//!
//! - a client's round ([`client_round`]): the strategy's client-side hooks, local training
//!   from its start adapter, its state updated, its update masked and wire-encoded;
//! - the server ([`Server`]): samples the round's clients, configures them (the global
//!   adapter and the strategy's extra arrays), keeps their compact uploads, runs the
//!   strategy's aggregation over them (decoded one at a time), evaluates the global model per
//!   domain and checkpoints.
//!
//! Everything random is a pure function of `(seed, round, client)`, so a run resumed from
//! the checkpoint of round `t`, or run across machines, computes what the uninterrupted
//! in-process run computed, bit for bit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use fedcdd_core::UploadHeader;
use fedcdd_kernels::Backend;

use crate::io::{Adapter, Tensor};
use crate::model::llama::Workspace;
use crate::model::lora::LoraConfig;
use crate::progress::Reporter;
use crate::report::{RoundLog, fmt_bytes};
use crate::server::ClientLoader;
use crate::upload::{ClientUpdate, decode_update, encode_tensors, parse_upload};

use super::client::{LocalPlan, train_local};
use super::config::RunConfig;
use super::defense::{
    Clip, DpMode, add_gaussian, plan_clipping, privatize_update, scale_update, update_norm,
};
use super::live::Live;
use super::privacy::epsilon;
use super::scores::{eval_point, evaluate_federation, format_eval_line};
use super::seeds::{SEED_DATA, SEED_DP, SEED_INIT, SEED_MASK, sample_round, stream_seed};
use super::session::{RunProgress, RunState, load_checkpoint, reorder, save_checkpoint, sorted};
use super::setup::{Client, Setup};
use super::strategy::{ClientJob, ClientState, ModelContext, NextGlobal, ServerRound, Strategy};

/// Set by Ctrl-C: stop after the current client.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// How a run ended.
pub enum Outcome {
    Finished,
    /// Stopped by Ctrl-C; the checkpoint holds the last complete round.
    Interrupted {
        rounds_done: usize,
    },
}

/// What one client sends the server after its local run.
pub struct ClientReply {
    /// The masked, wire-encoded update of the tensors the strategy sends.
    pub upload: Vec<u8>,
    /// Arrays the strategy's client side sends beside it (SCAFFOLD: `c_i⁺ − c_i`).
    pub extras: Vec<Tensor>,
    /// The trained adapter (what a dense, FlowerTune-style reply sends).
    pub trained: Vec<Tensor>,
    /// Mean local training loss.
    pub loss: f64,
    /// The update's dense f32 size, for the bytes report.
    pub dense_bytes: u64,
    /// The client's sample count (its aggregation weight).
    pub samples: u64,
}

/// One client's round: the strategy's configuration, local training from its start adapter
/// (`global` in the LoRA's parameter order), its `state` updated, the update of what the
/// strategy sends masked and encoded. The same function runs in `fedcdd run` and on a
/// Flower SuperNode.
#[allow(clippy::too_many_arguments)]
pub fn client_round<B: Backend>(
    cfg: &RunConfig,
    be: &B,
    live: &Live<B>,
    client: &Client,
    strategy: &dyn Strategy,
    state: &mut ClientState,
    ws: &mut Workspace<B>,
    global: &[Tensor],
    extras: &[Tensor],
    round: usize,
    on_step: impl FnMut(usize, f64),
) -> Result<ClientReply> {
    let k = client.id;
    let origin = format!("client {k} ({})", client.label);
    let lr_fn = |s: usize| cfg.lr_at(round, s, cfg.local_steps);
    // The mean rate of the round's steps (SCAFFOLD divides the change by Σ lr = K · mean);
    // the f64 sum is exact, so a constant rate comes back bit for bit.
    let steps = cfg.local_steps.max(1);
    let lr = ((0..steps).map(|s| lr_fn(s) as f64).sum::<f64>() / steps as f64) as f32;
    let job = ClientJob {
        round,
        global,
        extras,
        steps: cfg.local_steps,
        lr,
        optimizer: cfg.optimizer,
    };
    let mut run = strategy.client_run(&job, state)?;
    let mut lora = live.lora(be, &strategy.client_start(global, state), &origin)?;
    let plan = LocalPlan {
        steps: cfg.local_steps,
        lr: &lr_fn,
        seed: stream_seed(cfg.seed, SEED_DATA, round, k),
        frozen: global.iter().map(|t| strategy.frozen(t.role())).collect(),
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
        on_step,
    )
    .with_context(|| format!("{origin}, round {}", round + 1))?;
    let trained = lora.to_tensors(be);
    let extras = run
        .finish(&trained, state)
        .with_context(|| format!("{origin}, round {}", round + 1))?;
    // Δ of what the strategy sends, masked and encoded.
    let mut deltas = Vec::new();
    let mut dense_bytes = 0u64;
    for (g, l) in sorted(global).iter().zip(&sorted(&trained)) {
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
    if cfg.dp() && cfg.dp_mode == DpMode::Client {
        privatize_update(
            &mut deltas,
            cfg.dp_clip,
            cfg.dp_noise_multiplier,
            cfg.sample_clients,
            stream_seed(cfg.seed, SEED_DP, round, k),
        )
        .with_context(|| format!("{origin}: differential privacy"))?;
    }
    let federation = if cfg.client_data.is_empty() {
        cfg.num_clients
    } else {
        cfg.client_data.len()
    };
    if cfg.attack.attackers(cfg.seed, federation).contains(&k) {
        cfg.attack.corrupt_update(&mut deltas, cfg.seed, round, k);
    }
    let samples = client.examples.len() as u64;
    let header = UploadHeader::new(round as u32, k as u32, samples, deltas.len() as u32);
    let (upload, _) = encode_tensors(
        &deltas,
        header,
        &cfg.mask()?,
        stream_seed(cfg.seed, SEED_MASK, round, k),
    )
    .with_context(|| format!("{origin}: encoding its upload"))?;
    Ok(ClientReply {
        upload,
        extras,
        trained,
        loss,
        dense_bytes,
        samples,
    })
}

/// A client's reply as the server keeps it: the compact upload, decoded only when the
/// strategy reads it (so the server never holds N dense updates).
struct Kept {
    client: usize,
    upload: Vec<u8>,
    extras: Vec<Tensor>,
    loss: f64,
    dense_bytes: u64,
}

/// The round's kept replies, decoded one at a time for the strategy, each scaled by its
/// clipping factor; under DP every client weighs the same.
struct KeptReplies<'a> {
    global: &'a Adapter,
    replies: &'a [Kept],
    scales: Option<&'a [f32]>,
    uniform: bool,
}

impl KeptReplies<'_> {
    fn origin(&self, index: usize) -> String {
        format!("client {}", self.replies[index].client)
    }
}

impl ClientLoader for KeptReplies<'_> {
    fn count(&self) -> usize {
        self.replies.len()
    }

    fn label(&self, index: usize) -> String {
        self.origin(index)
    }

    fn samples(&mut self, index: usize) -> Result<Option<u64>> {
        if self.uniform {
            return Ok(Some(1));
        }
        let h = parse_upload(&self.replies[index].upload, Path::new(&self.origin(index)))?.header;
        Ok((h.num_samples > 0).then_some(h.num_samples))
    }

    fn load(&mut self, index: usize) -> Result<ClientUpdate> {
        let r = &self.replies[index];
        let mut u = decode_update(&r.upload, Path::new(&self.origin(index)), self.global)?;
        if let Some(s) = self.scales {
            scale_update(&mut u, s[index]);
        }
        if self.uniform {
            u.samples = Some(1);
        }
        u.extras = r.extras.clone();
        Ok(u)
    }
}

/// The server of a federation: the global model, the strategy, the run state, the round in
/// progress. It owns the run's [`Setup`] (which holds the client data when clients run in
/// the same process).
pub struct Server<B: Backend> {
    pub setup: Setup<B>,
    pub strategy: Box<dyn Strategy>,
    pub live: Live<B>,
    pub st: RunState,
    run_dir: PathBuf,
    lcfg: LoraConfig,
    base_name: String,
    /// The round being collected: its sampled clients, start time and replies so far.
    round: Option<(usize, Vec<usize>, Instant)>,
    kept: Vec<Kept>,
    /// The round's rejected replies: client id and why.
    rejected: Vec<(usize, String)>,
}

impl<B: Backend> Server<B> {
    /// Opens (or resumes) the run in `run_dir`: the checkpoint's state, or a fresh adapter
    /// and the base model's evaluation (round 0).
    pub fn open(
        setup: Setup<B>,
        mut strategy: Box<dyn Strategy>,
        run_dir: &Path,
        resume: bool,
        rep: &Reporter,
    ) -> Result<Self> {
        let cfg = &setup.cfg;
        let be = &setup.be;
        let lcfg = cfg.lora()?;
        let config_text = cfg.to_toml()?;
        let base_name = setup.base_dir.display().to_string();
        let mut live = Live::load(be, &setup.base_dir, &setup.model_config, lcfg.clone())?;
        let init = live.fresh(be, stream_seed(cfg.seed, SEED_INIT, 0, 0))?;
        let mut st = if resume {
            let mut st = load_checkpoint(run_dir, strategy.as_mut())?;
            if st.progress.config != config_text {
                bail!(
                    "{}: the checkpoint belongs to another configuration; resume with the run's \
                     own config.toml (no other --set values)",
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
                    config: config_text,
                    ..Default::default()
                },
                global: init,
                clients: Default::default(),
            }
        };
        let mut server = Server {
            strategy,
            live,
            run_dir: run_dir.to_path_buf(),
            lcfg,
            base_name,
            round: None,
            kept: Vec::new(),
            rejected: Vec::new(),
            st: RunState {
                progress: RunProgress::default(),
                global: Vec::new(),
                clients: Default::default(),
            },
            setup,
        };
        if st.progress.rounds_done == 0 && st.progress.evals.is_empty() {
            rep.line("evaluating the base model (round 0)");
            let p = eval_point(&server.setup, &server.live, &st.global, 0)?;
            rep.line(&format_eval_line(&p));
            st.progress.evals.push(p);
            save_checkpoint(
                run_dir,
                &st,
                server.strategy.state(),
                &server.lcfg,
                &server.base_name,
            )?;
        }
        server.st = st;
        Ok(server)
    }

    pub fn cfg(&self) -> &RunConfig {
        &self.setup.cfg
    }

    pub fn rounds_done(&self) -> usize {
        self.st.progress.rounds_done
    }

    /// Starts round `round` (0-based, the next one): the clients sampled for it.
    pub fn begin_round(&mut self, round: usize) -> Result<Vec<usize>> {
        if round != self.rounds_done() {
            bail!(
                "round {} cannot start: {} rounds are done",
                round + 1,
                self.rounds_done()
            );
        }
        let n = self.setup.num_clients;
        let chosen = sample_round(self.cfg().seed, round, n, self.cfg().sample_clients.min(n));
        self.round = Some((round, chosen.clone(), Instant::now()));
        self.kept.clear();
        self.rejected.clear();
        Ok(chosen)
    }

    /// The global adapter, in the LoRA's parameter order.
    pub fn global(&self) -> &[Tensor] {
        &self.st.global
    }

    /// The arrays the strategy sends every sampled client with the global adapter.
    pub fn configure_train(&self) -> Vec<Tensor> {
        self.strategy.configure_train(&self.st.global)
    }

    fn global_adapter(&self, round: usize) -> Adapter {
        Adapter {
            tensors: sorted(&self.st.global),
            config: None,
            path: PathBuf::from(format!("global adapter (round {round})")),
        }
    }

    /// Takes client `k`'s reply for the round in progress. A reply that does not decode
    /// against the global adapter (corrupt bytes, NaN, wrong shapes, another round, a client
    /// not sampled) is rejected: the error is returned (naming the client and the tensor),
    /// kept for the report, and the round goes on without it.
    pub fn add_reply(
        &mut self,
        k: usize,
        upload: Vec<u8>,
        extras: Vec<Tensor>,
        loss: f64,
    ) -> Result<()> {
        let Some((round, chosen, _)) = &self.round else {
            bail!("no round in progress: call begin_round first");
        };
        let round = *round;
        let check = || -> Result<()> {
            if !chosen.contains(&k) {
                bail!("client {k} was not sampled in round {}", round + 1);
            }
            if self.kept.iter().any(|r| r.client == k) {
                bail!("client {k} replied twice in round {}", round + 1);
            }
            let origin = format!("client {k}");
            let u = decode_update(&upload, Path::new(&origin), &self.global_adapter(round))?;
            if u.round != Some(round as u32) || u.client_id != k as u32 {
                bail!(
                    "{origin}: the upload is for round {} client {}, not round {} client {k}",
                    u.round.map_or(0, |r| r + 1),
                    u.client_id,
                    round + 1
                );
            }
            if let Some(t) = extras
                .iter()
                .find(|t| t.data.iter().any(|v| !v.is_finite()))
            {
                bail!(
                    "{origin}: extra array {:?} holds a non-finite value",
                    t.name
                );
            }
            Ok(())
        };
        if let Err(e) = check() {
            self.rejected.push((k, format!("{e:#}")));
            return Err(e);
        }
        // The update's dense f32 size: every tensor the strategy sends.
        let dense_bytes = self
            .st
            .global
            .iter()
            .filter(|t| self.strategy.sends(t.role()))
            .map(|t| 4 * t.data.len() as u64)
            .sum();
        self.kept.push(Kept {
            client: k,
            upload,
            extras,
            loss,
            dense_bytes,
        });
        Ok(())
    }

    /// Ends the round in progress: the strategy aggregates the kept replies (in client
    /// order), the global model is evaluated when due, the checkpoint written. Sampled
    /// clients without a reply are reported missing. Returns the round's log line.
    pub fn finish_round(&mut self) -> Result<String> {
        let (round, chosen, t0) = self.round.take().context("no round in progress")?;
        let cfg = self.setup.cfg.clone();
        let be = &self.setup.be;
        self.kept.sort_by_key(|r| r.client);
        let missing: Vec<usize> = chosen
            .iter()
            .copied()
            .filter(|k| !self.kept.iter().any(|r| r.client == *k))
            .filter(|k| !self.rejected.iter().any(|(c, _)| c == k))
            .collect();
        let rejected: Vec<String> = self
            .rejected
            .drain(..)
            .map(|(k, why)| format!("client {k}: {why}"))
            .collect();
        if self.kept.is_empty() {
            bail!(
                "round {}: no client reply could be used (missing {missing:?}; rejected: {})",
                round + 1,
                rejected.join("; ")
            );
        }
        let global_adapter = self.global_adapter(round);
        let server_round = ServerRound {
            round,
            total_clients: self.setup.num_clients,
            model: Some(ModelContext {
                dir: &self.live.model_dir,
                config: &self.setup.model_config,
                lora: &self.lcfg,
                run_dir: &self.run_dir,
            }),
        };
        // Clipping (`clip`, or DP's bound when the server adds the noise): one pass over the
        // replies for their norms.
        let server_dp = cfg.dp() && cfg.dp_mode == DpMode::Server;
        let clipping = if cfg.clip != Clip::None || server_dp {
            let mut norms = Vec::with_capacity(self.kept.len());
            for r in &self.kept {
                let origin = format!("client {}", r.client);
                let u = decode_update(&r.upload, Path::new(&origin), &global_adapter)?;
                norms.push(update_norm(&u.deltas));
            }
            let dp_bound = if server_dp { cfg.dp_clip } else { 0.0 };
            plan_clipping(&norms, cfg.clip, dp_bound)
                .with_context(|| format!("round {}", round + 1))?
        } else {
            None
        };
        let mut replies = KeptReplies {
            global: &global_adapter,
            replies: &self.kept,
            scales: clipping.as_ref().map(|p| p.scales.as_slice()),
            uniform: cfg.dp(),
        };
        let step = self
            .strategy
            .aggregate_train(&global_adapter, &mut replies, &server_round)
            .with_context(|| format!("server step of round {}", round + 1))?;
        match step.next {
            NextGlobal::Adapter(mut tensors) => {
                if server_dp {
                    // The Gaussian mechanism on the mean of the clipped updates: σ·C on the
                    // sum, σ·C/N on the mean, times the server rate.
                    let rate = cfg.server_settings().server_lr.unwrap_or(1.0) as f64;
                    let std = rate * (cfg.dp_noise_multiplier * cfg.dp_clip) as f64
                        / self.kept.len() as f64;
                    let mut sent: Vec<Tensor> = Vec::new();
                    let mut rest: Vec<Tensor> = Vec::new();
                    for t in tensors {
                        if self.strategy.sends(t.role()) {
                            sent.push(t);
                        } else {
                            rest.push(t);
                        }
                    }
                    sent.sort_by(|a, b| a.name.cmp(&b.name));
                    add_gaussian(
                        &mut sent,
                        std,
                        stream_seed(cfg.seed, SEED_DP, round, usize::MAX),
                    );
                    tensors = sent.into_iter().chain(rest).collect();
                }
                self.st.global = reorder(tensors, &self.st.global)?
            }
            NextGlobal::NewBase(dir) => {
                self.live = Live::load(be, &dir, &self.setup.model_config, self.lcfg.clone())?;
                self.st.progress.base = dir.file_name().map(|n| n.to_string_lossy().into_owned());
                self.st.global = self
                    .live
                    .fresh(be, stream_seed(cfg.seed, SEED_INIT, round + 1, 0))?;
            }
        }
        let clients: Vec<usize> = self.kept.iter().map(|r| r.client).collect();
        let up_bytes: u64 = self.kept.iter().map(|r| r.upload.len() as u64).sum();
        let dense_bytes: u64 = self.kept.iter().map(|r| r.dense_bytes).sum();
        let loss_sum: f64 = self.kept.iter().map(|r| r.loss).sum();
        let log = RoundLog {
            round: round + 1,
            clients: clients.clone(),
            train_loss: loss_sum / clients.len().max(1) as f64,
            upload_bytes: up_bytes,
            dense_bytes,
            seconds: t0.elapsed().as_secs_f64(),
            missing: missing.clone(),
            rejected,
            clipped: clipping.as_ref().map(|p| p.clipped()),
            clip_bound: clipping.as_ref().map(|p| p.bound as f64),
            epsilon: cfg.dp().then(|| {
                let q = cfg.sample_clients as f64 / self.setup.num_clients.max(1) as f64;
                epsilon(q, cfg.dp_noise_multiplier as f64, round + 1, cfg.dp_delta)
            }),
        };
        let mut line = format!(
            "round {}/{}: clients {:?}, train loss {:.3}, uploaded {} ({:.0}% of dense)",
            round + 1,
            cfg.rounds,
            clients,
            log.train_loss,
            fmt_bytes(up_bytes as f64),
            100.0 * up_bytes as f64 / dense_bytes.max(1) as f64
        );
        if !missing.is_empty() {
            line.push_str(&format!(", missing {missing:?}"));
        }
        if !log.rejected.is_empty() {
            line.push_str(&format!(", {} rejected", log.rejected.len()));
        }
        if let (Some(n), Some(b)) = (log.clipped, log.clip_bound) {
            line.push_str(&format!(", {n} of {} clipped to {b:.3}", clients.len()));
        }
        if let Some(e) = log.epsilon {
            line.push_str(&format!(", DP ε = {e:.2} (δ = {})", cfg.dp_delta));
        }
        self.st.progress.rounds.push(log);
        self.kept.clear();
        if (round + 1) % cfg.eval_every == 0 || round + 1 == cfg.rounds {
            let evaluated = self.strategy.evaluated(&self.st.global, &self.st.clients);
            let p = evaluate_federation(
                &self.setup,
                &self.live,
                &self.st.global,
                evaluated,
                round + 1,
            )?;
            line.push_str(&format!("; {}", format_eval_line(&p)));
            self.st.progress.evals.push(p);
        }
        self.st.progress.rounds_done = round + 1;
        save_checkpoint(
            &self.run_dir,
            &self.st,
            self.strategy.state(),
            &self.lcfg,
            &self.base_name,
        )?;
        // Merged bases older than the checkpoint's are not needed any more.
        remove_stale_bases(&self.run_dir, self.st.progress.base.as_deref());
        Ok(line)
    }
}

/// Runs (or resumes) the rounds of `server` with every client in this process.
pub fn run_rounds<B: Backend>(server: &mut Server<B>, rep: &Reporter) -> Result<Outcome> {
    let rounds = server.cfg().rounds;
    let mut ws = Workspace::new(
        &server.setup.be,
        &server.setup.model_config,
        &server.lcfg,
        server.cfg().micro_batch,
        server.cfg().seq,
    );
    for round in server.rounds_done()..rounds {
        let chosen = server.begin_round(round)?;
        let extras = server.configure_train();
        for (ci, &k) in chosen.iter().enumerate() {
            let what = format!(
                "round {}/{rounds} client {k} ({}/{})",
                round + 1,
                ci + 1,
                chosen.len()
            );
            let mut state = server.st.clients.remove(&k).unwrap_or_default();
            let setup = &server.setup;
            let client = setup
                .client(k)
                .with_context(|| format!("client {k} has no data in this process"))?;
            let local_steps = setup.cfg.local_steps;
            let reply = client_round(
                &setup.cfg,
                &setup.be,
                &server.live,
                client,
                server.strategy.as_ref(),
                &mut state,
                &mut ws,
                &server.st.global,
                &extras,
                round,
                |s, l| {
                    rep.bar
                        .update(s + 1, local_steps, &format!("{what}: loss {l:.3}"));
                },
            );
            server.st.clients.insert(k, state);
            let reply = reply?;
            // In one process a reply that does not decode is a bug: stop.
            server.add_reply(k, reply.upload, reply.extras, reply.loss)?;
            if STOP.load(Ordering::SeqCst) {
                rep.bar.finish();
                return Ok(Outcome::Interrupted {
                    rounds_done: server.rounds_done(),
                });
            }
        }
        rep.bar.finish();
        let line = server.finish_round()?;
        rep.line(&line);
    }
    Ok(Outcome::Finished)
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
