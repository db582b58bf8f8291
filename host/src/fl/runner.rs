//! The federated loop: rounds of sampled clients training the global LoRA adapter, every
//! upload masked and wire-encoded by the client and decoded as a server would, the server
//! rule always `fedcdd-core`'s, evaluation per domain, a resumable checkpoint after every
//! round.
//!
//! Everything random is a pure function of `(seed, round, client)`, so a run resumed from
//! the checkpoint of round `t` computes what the uninterrupted run computed, bit for bit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use fedcdd_core::{Algorithm, UploadHeader};
use fedcdd_kernels::{AdamW, Backend, Cpu, Sgd};
use serde::{Deserialize, Serialize};

use crate::adapter::{Adapter, Tensor, read_safetensors, save_adapter, write_safetensors};
use crate::aggregate::{AggregateOptions, ServerStateStore, aggregate};
use crate::cli_model::Progress;
use crate::data::{Batch, Example, make_batch};
use crate::merge::{checkpoint_dtype, merge_lora_into};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::LlamaConfig;
use crate::model::llama::{Lora, Model, Workspace};
use crate::model::lora::LoraConfig;
use crate::report::{DomainScore, EvalPoint, RoundLog};
use crate::train::{OptState, Optimizer, Sampler, pad_id, train_step};
use crate::update::{apply_update, decode_update, encode_tensors};

use super::config::RunConfig;
use super::eval::{EvalSet, evaluate_sets};

/// One client's local data.
pub struct Client {
    pub id: usize,
    /// The domains it holds, for reports (`arithmetic`, `arithmetic+facts`, a file name).
    pub label: String,
    pub examples: Vec<Example>,
}

/// What stays fixed during a run: configuration, tokenizer, data, evaluation sets.
pub struct Setup {
    pub cfg: RunConfig,
    pub be: Cpu,
    /// The base model directory the run starts from.
    pub base_dir: PathBuf,
    pub model_config: LlamaConfig,
    pub tok: crate::tokenizer::Tokenizer,
    pub clients: Vec<Client>,
    pub eval_sets: Vec<EvalSet>,
    pub domains: Vec<String>,
}

/// Set by Ctrl-C: stop after the current client.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// SplitMix64's step from `z` (the core's generator).
fn splitmix(z: u64) -> u64 {
    fedcdd_core::mask::SplitMix64(z).next_u64()
}

/// The seed of one (purpose, round, client) stream.
pub fn stream_seed(seed: u64, purpose: u64, round: usize, client: usize) -> u64 {
    splitmix(
        splitmix(splitmix(seed ^ purpose.wrapping_mul(0xA24B_AED4_963E_E407)) ^ round as u64)
            ^ client as u64,
    )
}

const SEED_SAMPLE: u64 = 1;
const SEED_DATA: u64 = 2;
const SEED_MASK: u64 = 3;
const SEED_INIT: u64 = 4;

/// The clients of round `round`: `sample_clients` of `num_clients`, seeded by (seed, round),
/// in increasing id order.
pub fn sample_round(seed: u64, round: usize, num_clients: usize, sample: usize) -> Vec<usize> {
    let mut ids: Vec<usize> = (0..num_clients).collect();
    let mut s = stream_seed(seed, SEED_SAMPLE, round, 0);
    for i in 0..sample.min(num_clients) {
        s = splitmix(s);
        let j = i + (s % (num_clients - i) as u64) as usize;
        ids.swap(i, j);
    }
    let mut chosen = ids[..sample.min(num_clients)].to_vec();
    chosen.sort_unstable();
    chosen
}

/// The model in use and its LoRA layout; FLoRA replaces the model after each round.
pub struct Live {
    pub model: Model<Cpu>,
    pub model_dir: PathBuf,
    pub lcfg: LoraConfig,
}

impl Live {
    pub fn load(be: &Cpu, dir: &Path, config: &LlamaConfig, lcfg: LoraConfig) -> Result<Live> {
        let ckpt = Checkpoint::open(dir)?;
        let model = Model::load(be, config.clone(), &ckpt)
            .with_context(|| format!("cannot load the model in {}", dir.display()))?;
        Ok(Live {
            model,
            model_dir: dir.to_path_buf(),
            lcfg,
        })
    }

    /// A LoRA holding `tensors` (PEFT names).
    pub fn lora(&self, be: &Cpu, tensors: &[Tensor], origin: &str) -> Result<Lora<Cpu>> {
        let mut l = Lora::init(be, &self.model.config, self.lcfg.clone(), 0)?;
        l.load_tensors(be, tensors, origin)?;
        Ok(l)
    }

    /// PEFT's fresh init, seeded.
    pub fn fresh(&self, be: &Cpu, seed: u64) -> Result<Vec<Tensor>> {
        Ok(Lora::init(be, &self.model.config, self.lcfg.clone(), seed)?.to_tensors(be))
    }
}

/// How a client's local training is shaped.
pub struct LocalPlan<'a> {
    pub steps: usize,
    /// Learning rate of local step `s`.
    pub lr: &'a dyn Fn(usize) -> f32,
    pub seed: u64,
    /// FFA-LoRA: A frozen.
    pub freeze_a: bool,
    /// FedProx μ and the global parameters (params order).
    pub prox: Option<(f32, &'a [Vec<f32>])>,
    /// SCAFFOLD: `c − c_i` per parameter (params order).
    pub scaffold: Option<&'a [Vec<f32>]>,
    /// Also return the mean over the steps of the raw (uncorrected) gradients.
    pub mean_gradient: bool,
}

/// What a client's local training returns.
pub struct LocalResult {
    /// Mean step loss.
    pub loss: f64,
    /// With `mean_gradient`: per parameter, the mean raw gradient over the steps.
    pub mean_gradient: Option<Vec<Vec<f32>>>,
}

/// Trains `lora` in place on `examples`.
pub fn train_local(
    setup: &Setup,
    model: &Model<Cpu>,
    lora: &mut Lora<Cpu>,
    ws: &mut Workspace<Cpu>,
    examples: &[Example],
    plan: &LocalPlan,
    mut on_step: impl FnMut(usize, f64),
) -> Result<LocalResult> {
    let cfg = &setup.cfg;
    let be = &setup.be;
    if examples.is_empty() {
        bail!("the client has no training examples");
    }
    let pad = pad_id(&model.config);
    let mut opt = OptState::new(be, lora);
    if plan.freeze_a {
        // params_mut order: A then B of each module.
        for (i, f) in opt.frozen.iter_mut().enumerate() {
            *f = i % 2 == 0;
        }
    }
    let optimizer = match cfg.optimizer.as_str() {
        "sgd" => Optimizer::Sgd(Sgd {
            lr: cfg.lr,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: cfg.weight_decay,
            nesterov: false,
        }),
        _ => Optimizer::AdamW(AdamW {
            lr: cfg.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: cfg.weight_decay,
        }),
    };
    let prox_bufs: Option<(f32, Vec<_>)> = plan
        .prox
        .map(|(mu, g)| (mu, g.iter().map(|v| be.upload(v)).collect()));
    let scaffold_bufs: Option<Vec<_>> = plan
        .scaffold
        .map(|d| d.iter().map(|v| be.upload(v)).collect());
    let mut grad_sums: Option<Vec<_>> = plan.mean_gradient.then(|| {
        lora.params_mut()
            .iter()
            .map(|(p, _)| be.zeros(be.buf_len(p)))
            .collect()
    });
    let mut sampler = Sampler::new(examples.len(), plan.seed);
    let accum = cfg.grad_accum();
    let mut loss_sum = 0.0;
    for step in 0..plan.steps {
        let micro: Vec<Batch> = (0..accum)
            .map(|_| {
                let idx = sampler.take(cfg.micro_batch);
                let chosen: Vec<&Example> = idx.iter().map(|&i| &examples[i]).collect();
                make_batch(&chosen, cfg.seq, pad)
            })
            .collect();
        let step_seed = splitmix(plan.seed ^ (step as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
        let stats = train_step(
            be,
            model,
            lora,
            &mut opt,
            ws,
            &micro,
            optimizer.with_lr((plan.lr)(step)),
            (cfg.max_grad_norm > 0.0).then_some(cfg.max_grad_norm),
            step_seed,
            |be, lora| {
                if let Some(sums) = grad_sums.as_mut() {
                    for ((_, grad), sum) in lora.params_mut().into_iter().zip(sums.iter_mut()) {
                        be.axpy(sum, 1.0, grad);
                    }
                }
                if let Some((mu, g)) = &prox_bufs {
                    for ((p, grad), gb) in lora.params_mut().into_iter().zip(g) {
                        be.axpy(grad, *mu, p);
                        be.axpy(grad, -*mu, gb);
                    }
                }
                if let Some(d) = &scaffold_bufs {
                    for ((_, grad), db) in lora.params_mut().into_iter().zip(d) {
                        be.axpy(grad, 1.0, db);
                    }
                }
            },
        )
        .with_context(|| format!("local step {}", step + 1))?;
        loss_sum += stats.loss;
        on_step(step, stats.loss);
    }
    let mean_gradient = grad_sums.map(|sums| {
        let k = plan.steps.max(1) as f32;
        sums.iter()
            .map(|b| {
                let mut v = vec![0.0f32; be.buf_len(b)];
                be.download(b, &mut v);
                v.iter_mut().for_each(|x| *x /= k);
                v
            })
            .collect()
    });
    Ok(LocalResult {
        loss: loss_sum / plan.steps.max(1) as f64,
        mean_gradient,
    })
}

/// Loss and accuracy of `tensors` on every domain, as a report point.
pub fn eval_point(
    setup: &Setup,
    live: &Live,
    tensors: &[Tensor],
    round: usize,
) -> Result<EvalPoint> {
    let lora = live.lora(&setup.be, tensors, "global adapter")?;
    let r = evaluate_sets(
        &setup.be,
        &live.model,
        &lora,
        &setup.tok,
        &setup.eval_sets,
        setup.cfg.seq.max(256),
    )?;
    Ok(EvalPoint {
        round,
        domains: r
            .into_iter()
            .map(|(d, x)| {
                (
                    d,
                    DomainScore {
                        loss: x.loss,
                        accuracy: x.accuracy,
                        examples: x.examples,
                    },
                )
            })
            .collect(),
    })
}

/// The mean of several evaluations, domain by domain (local-only, FedSA-LoRA's personal models).
pub fn mean_points(points: &[EvalPoint], round: usize) -> EvalPoint {
    let mut domains: BTreeMap<String, DomainScore> = BTreeMap::new();
    let n = points.len().max(1) as f64;
    for p in points {
        for (d, s) in &p.domains {
            let e = domains.entry(d.clone()).or_insert(DomainScore {
                loss: 0.0,
                accuracy: s.accuracy.map(|_| 0.0),
                examples: s.examples,
            });
            e.loss += s.loss / n;
            if let (Some(a), Some(b)) = (e.accuracy.as_mut(), s.accuracy) {
                *a += b / n;
            }
        }
    }
    EvalPoint { round, domains }
}

/// What the checkpoint's state.json holds besides tensors.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunProgress {
    /// Rounds completed.
    pub rounds_done: usize,
    pub evals: Vec<EvalPoint>,
    pub rounds: Vec<RoundLog>,
    /// FLoRA: the merged base model directory (inside the run dir), when merged.
    pub base: Option<String>,
    /// The resolved config the checkpoint belongs to (must match on resume).
    pub config: String,
}

/// The run's state between rounds.
pub struct RunState {
    pub progress: RunProgress,
    /// Global LoRA tensors in `Lora::params_mut` order (PEFT names).
    pub global: Vec<Tensor>,
    pub server: ServerStateStore,
    /// SCAFFOLD: server control `c` and each client's `c_i` (params order).
    pub control: Vec<Vec<f32>>,
    pub client_control: BTreeMap<usize, Vec<Vec<f32>>>,
    /// FedSA-LoRA: each client's own B tensors (by name).
    pub local_b: BTreeMap<usize, Vec<Tensor>>,
}

fn sorted(tensors: &[Tensor]) -> Vec<Tensor> {
    let mut t = tensors.to_vec();
    t.sort_by(|a, b| a.name.cmp(&b.name));
    t
}

fn f32_tensor(name: String, dims: Vec<usize>, data: Vec<f32>) -> Tensor {
    Tensor {
        name,
        dims,
        dtype: fedcdd_core::DType::F32,
        data,
    }
}

const CHECKPOINT: &str = "checkpoint";

/// Writes the checkpoint atomically: a new directory, then renamed over the old one.
fn save_checkpoint(
    run_dir: &Path,
    st: &RunState,
    lcfg: &LoraConfig,
    base_model: &str,
) -> Result<()> {
    let tmp = run_dir.join(format!("{CHECKPOINT}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    save_adapter(
        &tmp.join("global"),
        &sorted(&st.global),
        Some(&lcfg.to_peft_json(base_model)),
    )?;
    st.server.save(&tmp.join("server_state.safetensors"))?;
    let mut extra = Vec::new();
    for (i, c) in st.control.iter().enumerate() {
        extra.push(f32_tensor(format!("control.{i}"), vec![c.len()], c.clone()));
    }
    for (k, cs) in &st.client_control {
        for (i, c) in cs.iter().enumerate() {
            extra.push(f32_tensor(
                format!("client{k}.control.{i}"),
                vec![c.len()],
                c.clone(),
            ));
        }
    }
    for (k, bs) in &st.local_b {
        for t in bs {
            extra.push(Tensor {
                name: format!("client{k}.{}", t.name),
                ..t.clone()
            });
        }
    }
    if !extra.is_empty() {
        write_safetensors(&tmp.join("clients.safetensors"), &extra, None)?;
    }
    let mut text = serde_json::to_vec_pretty(&st.progress)?;
    text.push(b'\n');
    crate::adapter::write_atomic(&tmp.join("state.json"), &text)?;
    let dst = run_dir.join(CHECKPOINT);
    let old = run_dir.join(format!("{CHECKPOINT}.old"));
    let _ = std::fs::remove_dir_all(&old);
    if dst.exists() {
        std::fs::rename(&dst, &old).with_context(|| format!("cannot move {}", dst.display()))?;
    }
    std::fs::rename(&tmp, &dst).with_context(|| format!("cannot move {}", tmp.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Reads the checkpoint of `run_dir` (or the previous one when a save was cut short).
fn load_checkpoint(run_dir: &Path, opts: &AggregateOptions) -> Result<RunState> {
    let mut dir = run_dir.join(CHECKPOINT);
    if !dir.join("state.json").is_file() {
        dir = run_dir.join(format!("{CHECKPOINT}.old"));
    }
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).with_context(|| {
        format!(
            "{} has no checkpoint (no {CHECKPOINT}/state.json): nothing to resume",
            run_dir.display()
        )
    })?;
    let progress: RunProgress = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a fedcdd run state", state_path.display()))?;
    let global_adapter = crate::adapter::load_adapter(&dir.join("global"))?;
    let server_path = dir.join("server_state.safetensors");
    let server = ServerStateStore::load(&server_path, opts)?;
    let mut control = Vec::new();
    let mut client_control: BTreeMap<usize, Vec<Vec<f32>>> = BTreeMap::new();
    let mut local_b: BTreeMap<usize, Vec<Tensor>> = BTreeMap::new();
    let clients_path = dir.join("clients.safetensors");
    if clients_path.is_file() {
        let (tensors, _) = read_safetensors(&clients_path)?;
        let mut ctl: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
        let mut cctl: BTreeMap<(usize, usize), Vec<f32>> = BTreeMap::new();
        for t in tensors {
            let bad =
                || anyhow::anyhow!("{}: unexpected tensor {:?}", clients_path.display(), t.name);
            if let Some(i) = t.name.strip_prefix("control.") {
                ctl.insert(i.parse().map_err(|_| bad())?, t.data.clone());
            } else if let Some(rest) = t.name.strip_prefix("client") {
                let (k, tail) = rest.split_once('.').ok_or_else(bad)?;
                let k: usize = k.parse().map_err(|_| bad())?;
                if let Some(i) = tail.strip_prefix("control.") {
                    cctl.insert((k, i.parse().map_err(|_| bad())?), t.data.clone());
                } else {
                    local_b.entry(k).or_default().push(Tensor {
                        name: tail.to_string(),
                        ..t.clone()
                    });
                }
            } else {
                return Err(bad());
            }
        }
        control = ctl.into_values().collect();
        for ((k, _), v) in cctl {
            client_control.entry(k).or_default().push(v);
        }
    }
    // Back to params order: the order of a fresh LoRA's tensors.
    Ok(RunState {
        progress,
        global: global_adapter.tensors,
        server,
        control,
        client_control,
        local_b,
    })
}

/// Puts `tensors` in the order of `order` (names).
fn reorder(tensors: Vec<Tensor>, order: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut by_name: BTreeMap<String, Tensor> =
        tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    order
        .iter()
        .map(|o| {
            by_name
                .remove(&o.name)
                .with_context(|| format!("checkpoint: tensor {:?} is missing", o.name))
        })
        .collect()
}

/// How a run ended.
pub enum Outcome {
    Finished(Box<RunState>),
    /// Stopped by Ctrl-C; the checkpoint holds the last complete round.
    Interrupted {
        rounds_done: usize,
    },
}

/// Log lines and progress bars of a run.
pub struct Reporter {
    pub quiet: bool,
    pub bar: Progress,
}

impl Reporter {
    pub fn line(&self, s: &str) {
        if !self.quiet {
            if self.bar.live {
                eprint!("\r\x1b[2K");
            }
            eprintln!("{s}");
        }
    }
}

/// Runs (or resumes) the federated rounds in `run_dir`; evaluation and checkpoint after
/// each round.
pub fn run_rounds(setup: &Setup, run_dir: &Path, resume: bool, rep: &Reporter) -> Result<Outcome> {
    let cfg = &setup.cfg;
    let be = &setup.be;
    let alg = cfg.algorithm()?;
    let mut opts = cfg.aggregate_options()?;
    if matches!(alg, Algorithm::Scaffold) {
        // SCAFFOLD's model step is FedAvg's; its control update is done below.
        opts.algorithm = Algorithm::FedAvg;
    }
    let lcfg = cfg.lora()?;
    let config_text = cfg.to_toml()?;
    let base_name = setup.base_dir.display().to_string();

    let mut live = Live::load(be, &setup.base_dir, &setup.model_config, lcfg.clone())?;
    let init = live.fresh(be, stream_seed(cfg.seed, SEED_INIT, 0, 0))?;
    let mut st = if resume {
        let mut st = load_checkpoint(run_dir, &opts)?;
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
            server: ServerStateStore::new(&opts),
            control: Vec::new(),
            client_control: BTreeMap::new(),
            local_b: BTreeMap::new(),
        }
    };
    if st.progress.rounds_done == 0 && st.progress.evals.is_empty() {
        rep.line("evaluating the base model (round 0)");
        let p = eval_point(setup, &live, &st.global, 0)?;
        rep.line(&format_eval_line(&p));
        st.progress.evals.push(p);
        save_checkpoint(run_dir, &st, &lcfg, &base_name)?;
    }
    if matches!(alg, Algorithm::Scaffold) && st.control.is_empty() {
        st.control = st.global.iter().map(|t| vec![0.0; t.data.len()]).collect();
    }
    let n_clients = setup.clients.len();
    let mut ws = Workspace::new(be, &setup.model_config, &lcfg, cfg.micro_batch, cfg.seq);
    let upload_dtype = cfg.upload_dtype()?;
    let mask = cfg.mask()?;

    for round in st.progress.rounds_done..cfg.rounds {
        let t0 = Instant::now();
        let chosen = sample_round(
            cfg.seed,
            round,
            n_clients,
            cfg.sample_clients.min(n_clients),
        );
        let lr = cfg.lr_at_round(round);
        let global_sorted = sorted(&st.global);
        let global_adapter = Adapter {
            tensors: global_sorted.clone(),
            config: None,
            path: PathBuf::from(format!("global adapter (round {round})")),
        };
        let global_params: Vec<Vec<f32>> = st.global.iter().map(|t| t.data.clone()).collect();
        let mut updates = Vec::with_capacity(chosen.len());
        let mut new_controls: Vec<(usize, Vec<Vec<f32>>)> = Vec::new();
        let mut new_local_b: Vec<(usize, Vec<Tensor>)> = Vec::new();
        let mut loss_sum = 0.0;
        let (mut up_bytes, mut dense_bytes) = (0u64, 0u64);
        for (ci, &k) in chosen.iter().enumerate() {
            let client = &setup.clients[k];
            let origin = format!("client {k} ({})", client.label);
            // Start from the global adapter (FedSA-LoRA: with the client's own B).
            let mut start = st.global.clone();
            if alg == Algorithm::FedSaLora
                && let Some(bs) = st.local_b.get(&k)
            {
                for t in start.iter_mut() {
                    if let Some(b) = bs.iter().find(|b| b.name == t.name) {
                        t.data.clone_from(&b.data);
                    }
                }
            }
            let mut lora = live.lora(be, &start, &origin)?;
            let ci_ctl = st
                .client_control
                .get(&k)
                .cloned()
                .unwrap_or_else(|| st.control.iter().map(|c| vec![0.0; c.len()]).collect());
            let c_minus_ci: Vec<Vec<f32>> = st
                .control
                .iter()
                .zip(&ci_ctl)
                .map(|(c, cik)| c.iter().zip(cik).map(|(a, b)| a - b).collect())
                .collect();
            let lr_fn = |_s: usize| lr;
            let plan = LocalPlan {
                steps: cfg.local_steps,
                lr: &lr_fn,
                seed: stream_seed(cfg.seed, SEED_DATA, round, k),
                freeze_a: alg == Algorithm::FfaLora,
                prox: (alg == Algorithm::FedProx).then_some((cfg.fedprox_mu, &global_params[..])),
                scaffold: (alg == Algorithm::Scaffold).then_some(&c_minus_ci[..]),
                mean_gradient: alg == Algorithm::Scaffold && cfg.optimizer != "sgd",
            };
            let what = format!(
                "round {}/{} client {} ({}/{})",
                round + 1,
                cfg.rounds,
                k,
                ci + 1,
                chosen.len()
            );
            let local_run = train_local(
                setup,
                &live.model,
                &mut lora,
                &mut ws,
                &client.examples,
                &plan,
                |s, l| {
                    rep.bar
                        .update(s + 1, cfg.local_steps, &format!("{what}: loss {l:.3}"));
                },
            )
            .with_context(|| format!("{origin}, round {}", round + 1))?;
            loss_sum += local_run.loss;
            let local = lora.to_tensors(be);
            if alg == Algorithm::Scaffold
                && let Some(g) = local_run.mean_gradient
            {
                // Adaptive client optimizer: option II's (G − θ_i)/(K·η) assumes SGD steps,
                // so the client's control is option I's gradient estimate, the mean raw
                // gradient of its local steps.
                new_controls.push((k, g));
            } else if alg == Algorithm::Scaffold {
                let mut next = ci_ctl.clone();
                for (i, c) in next.iter_mut().enumerate() {
                    fedcdd_core::fedopt::scaffold_client_control(
                        c,
                        &st.control[i],
                        &global_params[i],
                        &local[i].data,
                        cfg.local_steps,
                        lr,
                    )
                    .map_err(|e| anyhow::anyhow!("{origin}: SCAFFOLD control: {e}"))?;
                }
                new_controls.push((k, next));
            }
            if alg == Algorithm::FedSaLora {
                let bs = local
                    .iter()
                    .filter(|t| t.role() == fedcdd_core::TensorRole::LoraB)
                    .cloned()
                    .collect();
                new_local_b.push((k, bs));
            }
            // Client side: Δ of what the algorithm sends, masked and encoded.
            let local_sorted = sorted(&local);
            let mut deltas = Vec::new();
            for (g, l) in global_sorted.iter().zip(&local_sorted) {
                if !alg.aggregates(g.role()) {
                    continue;
                }
                deltas.push(Tensor {
                    name: g.name.clone(),
                    dims: g.dims.clone(),
                    dtype: upload_dtype,
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
                &mask,
                stream_seed(cfg.seed, SEED_MASK, round, k),
            )
            .with_context(|| format!("{origin}: encoding its upload"))?;
            up_bytes += bytes.len() as u64;
            // Server side: decode as from the wire.
            let update = decode_update(&bytes, Path::new(&origin), &global_adapter)?;
            updates.push(update);
            if STOP.load(Ordering::SeqCst) {
                rep.bar.finish();
                return Ok(Outcome::Interrupted {
                    rounds_done: st.progress.rounds_done,
                });
            }
        }
        rep.bar.finish();

        // Server step.
        if alg == Algorithm::FLora {
            let merged_dir = flora_merge(setup, &live, &global_adapter, &updates, run_dir, round)?;
            live = Live::load(be, &merged_dir, &setup.model_config, lcfg.clone())?;
            st.progress.base = Some(
                merged_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            st.global = live.fresh(be, stream_seed(cfg.seed, SEED_INIT, round + 1, 0))?;
        } else {
            let (tensors, _report) = aggregate(
                &global_adapter,
                &mut updates.as_slice(),
                &opts,
                &mut st.server,
            )
            .with_context(|| format!("server step of round {}", round + 1))?;
            st.global = reorder(tensors, &st.global)?;
        }
        if alg == Algorithm::Scaffold {
            // c ← c + (|S|/N)·mean(c_i⁺ − c_i)
            let frac = chosen.len() as f32 / n_clients as f32;
            let n = new_controls.len() as f32;
            for (k, next) in &new_controls {
                let old = st.client_control.get(k);
                for (i, c) in st.control.iter_mut().enumerate() {
                    for (j, cv) in c.iter_mut().enumerate() {
                        let prev = old.map_or(0.0, |o| o[i][j]);
                        *cv += frac * (next[i][j] - prev) / n;
                    }
                }
            }
            for (k, next) in new_controls {
                st.client_control.insert(k, next);
            }
        }
        for (k, bs) in new_local_b {
            st.local_b.insert(k, bs);
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
            crate::report::fmt_bytes(up_bytes as f64),
            100.0 * up_bytes as f64 / dense_bytes.max(1) as f64
        );
        st.progress.rounds.push(log);
        if (round + 1) % cfg.eval_every == 0 || round + 1 == cfg.rounds {
            let p = global_eval(setup, &live, &st, round + 1, alg)?;
            line.push_str(&format!("; {}", format_eval_line(&p)));
            st.progress.evals.push(p);
        }
        rep.line(&line);
        st.progress.rounds_done = round + 1;
        save_checkpoint(run_dir, &st, &lcfg, &base_name)?;
        // Merged bases older than the checkpoint's are not needed any more.
        if alg == Algorithm::FLora {
            remove_stale_bases(run_dir, st.progress.base.as_deref());
        }
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

/// The global model's evaluation. FedSA-LoRA has no global B (each client keeps its own):
/// its point is, per domain, the mean over the clients holding that domain of their personal
/// model (global A + own B); a domain no client holds is scored by every client's model.
fn global_eval(
    setup: &Setup,
    live: &Live,
    st: &RunState,
    round: usize,
    alg: Algorithm,
) -> Result<EvalPoint> {
    if alg != Algorithm::FedSaLora || st.local_b.is_empty() {
        return eval_point(setup, live, &st.global, round);
    }
    let holders = |domain: &str| -> Vec<usize> {
        st.local_b
            .keys()
            .copied()
            .filter(|&k| {
                setup.clients[k]
                    .examples
                    .iter()
                    .any(|e| e.domain.as_deref() == Some(domain))
            })
            .collect()
    };
    let mut scores: BTreeMap<String, Vec<DomainScore>> = BTreeMap::new();
    for (k, bs) in &st.local_b {
        let sets: Vec<EvalSet> = setup
            .eval_sets
            .iter()
            .filter(|s| {
                let h = holders(&s.domain);
                h.is_empty() || h.contains(k)
            })
            .cloned()
            .collect();
        if sets.is_empty() {
            continue;
        }
        let mut t = st.global.clone();
        for x in t.iter_mut() {
            if let Some(b) = bs.iter().find(|b| b.name == x.name) {
                x.data.clone_from(&b.data);
            }
        }
        let lora = live.lora(&setup.be, &t, "personal adapter")?;
        let r = evaluate_sets(
            &setup.be,
            &live.model,
            &lora,
            &setup.tok,
            &sets,
            setup.cfg.seq.max(256),
        )?;
        for (d, x) in r {
            scores.entry(d).or_default().push(DomainScore {
                loss: x.loss,
                accuracy: x.accuracy,
                examples: x.examples,
            });
        }
    }
    let domains = scores
        .into_iter()
        .map(|(d, v)| {
            let n = v.len() as f64;
            let acc = v.iter().map(|x| x.accuracy).collect::<Option<Vec<f64>>>();
            (
                d,
                DomainScore {
                    loss: v.iter().map(|x| x.loss).sum::<f64>() / n,
                    accuracy: acc.map(|a| a.iter().sum::<f64>() / n),
                    examples: v[0].examples,
                },
            )
        })
        .collect();
    Ok(EvalPoint { round, domains })
}

/// FLoRA's server step: stack the clients' full adapters (`A = [p_1A_1; …]`, `B = [B_1 …]`),
/// i.e. `ΔW = s·Σ p_i B_i A_i`, and merge into the base; returns the new base directory.
fn flora_merge(
    setup: &Setup,
    live: &Live,
    global: &Adapter,
    updates: &[crate::update::ClientUpdate],
    run_dir: &Path,
    round: usize,
) -> Result<PathBuf> {
    let lcfg = &live.lcfg;
    let n = updates.len();
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
    let r = lcfg.r;
    let mut stacked = Vec::new();
    for g in &global.tensors {
        let is_a = g.role() == fedcdd_core::TensorRole::LoraA;
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
        stacked.push(f32_tensor(g.name.clone(), dims, data));
    }
    // The stacked adapter has rank n·r; keep the clients' scale s.
    let mut scfg = lcfg.clone();
    scfg.r = n * r;
    scfg.rslora = false;
    scfg.alpha = lcfg.scale() * scfg.r as f32;
    let ckpt = Checkpoint::open(&live.model_dir)?;
    let dtype = checkpoint_dtype(&ckpt)?;
    let name = format!("flora-base-{:04}", round + 1);
    let tmp = run_dir.join(format!("{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    merge_lora_into(
        &live.model_dir,
        &setup.model_config,
        &ckpt,
        &scfg,
        &stacked,
        "FLoRA stack",
        &tmp,
        dtype,
    )?;
    let dst = run_dir.join(&name);
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::rename(&tmp, &dst).with_context(|| format!("cannot move {}", tmp.display()))?;
    Ok(dst)
}

/// `acc 45.0% (arithmetic 40.0, …), loss 0.512`.
pub fn format_eval_line(p: &EvalPoint) -> String {
    let per: Vec<String> = p
        .domains
        .iter()
        .map(|(d, s)| match s.accuracy {
            Some(a) => format!("{d} {:.1}", 100.0 * a),
            None => format!("{d} loss {:.3}", s.loss),
        })
        .collect();
    match p.mean_accuracy() {
        Some(a) => format!(
            "eval: mean acc {:.1}% ({}), loss {:.3}",
            100.0 * a,
            per.join(", "),
            p.mean_loss()
        ),
        None => format!("eval: mean loss {:.3} ({})", p.mean_loss(), per.join(", ")),
    }
}

/// A reference point of the protocol: `centralized` (every client's data pooled, the
/// federated run's token budget: rounds × sampled clients × local steps) or `local-only`
/// (each client alone for rounds × local steps; the mean over clients of its evaluation on
/// every domain). Plain training, the same LoRA init and learning-rate schedule.
pub fn reference_point(setup: &Setup, kind: &str, rep: &Reporter) -> Result<EvalPoint> {
    let cfg = &setup.cfg;
    let be = &setup.be;
    let lcfg = cfg.lora()?;
    let live = Live::load(be, &setup.base_dir, &setup.model_config, lcfg.clone())?;
    let init = live.fresh(be, stream_seed(cfg.seed, SEED_INIT, 0, 0))?;
    let mut ws = Workspace::new(be, &setup.model_config, &lcfg, cfg.micro_batch, cfg.seq);
    let per_round = |steps_per_round: usize| move |s: usize| cfg.lr_at_round(s / steps_per_round);
    let train_one = |examples: &[Example],
                     steps: usize,
                     steps_per_round: usize,
                     seed: u64,
                     ws: &mut Workspace<Cpu>,
                     what: &str|
     -> Result<Vec<Tensor>> {
        let mut lora = live.lora(be, &init, what)?;
        let lr = per_round(steps_per_round.max(1));
        let plan = LocalPlan {
            steps,
            lr: &lr,
            seed,
            freeze_a: false,
            prox: None,
            scaffold: None,
            mean_gradient: false,
        };
        train_local(
            setup,
            &live.model,
            &mut lora,
            ws,
            examples,
            &plan,
            |s, l| {
                rep.bar
                    .update(s + 1, steps, &format!("{what}: loss {l:.3}"));
            },
        )?;
        rep.bar.finish();
        Ok(lora.to_tensors(be))
    };
    match kind {
        "centralized" => {
            let pooled: Vec<Example> = setup
                .clients
                .iter()
                .flat_map(|c| c.examples.iter().cloned())
                .collect();
            let per = cfg.sample_clients.min(setup.clients.len()) * cfg.local_steps;
            let steps = cfg.rounds * per;
            let t = train_one(
                &pooled,
                steps,
                per,
                stream_seed(cfg.seed, SEED_DATA, usize::MAX, 0),
                &mut ws,
                "centralized",
            )?;
            eval_point(setup, &live, &t, cfg.rounds)
        }
        "local-only" => {
            let mut points = Vec::new();
            for c in &setup.clients {
                let steps = cfg.rounds * cfg.local_steps;
                let what = format!("local-only client {}", c.id);
                let t = train_one(
                    &c.examples,
                    steps,
                    cfg.local_steps,
                    stream_seed(cfg.seed, SEED_DATA, usize::MAX, c.id + 1),
                    &mut ws,
                    &what,
                )?;
                points.push(eval_point(setup, &live, &t, cfg.rounds)?);
            }
            Ok(mean_points(&points, cfg.rounds))
        }
        other => bail!("unknown reference point {other:?}; expected centralized or local-only"),
    }
}
