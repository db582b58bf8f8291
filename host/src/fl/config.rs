//! The run configuration: one flat TOML table (every key optional), `--set key=value`
//! overrides on top, validated once; the resolved table is saved with the run.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use fedcdd_core::{
    Algorithm, Components, DType, FedOptVariant, Importance, MaskAxis, MaskConfig, NormAxis,
    ServerOpt, Target, Weighting,
};
use serde::{Deserialize, Serialize};

use crate::data::builtin::Benchmark;
use crate::device::Device;
use crate::fl::attack::Attack;
use crate::fl::base::BuiltinSize;
use crate::fl::defense::{Clip, DpMode, RobustRule};
use crate::fl::privacy::noise_for_epsilon;
use crate::model::lora::{LoraConfig, parse_targets};
use crate::server::{ServerOptions, ServerSettings};
use crate::train::OptimizerKind;

/// Every setting of a federated run. Names are the TOML keys; every value is parsed and
/// validated once, at load, and written back as the same text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// fedavg, fedprox, scaffold, fedavgm, fedadagrad, fedyogi, fedadam, ffa-lora,
    /// fedsa-lora, flora, fedcdd.
    #[serde(with = "named")]
    pub algorithm: Algorithm,
    /// Seeds client sampling, data order, dropout, masks, LoRA init and the built-in data.
    pub seed: u64,
    /// CPU threads (0 = one per core).
    pub threads: usize,
    /// `cpu`; `cuda` is not verified on a GPU yet (an error says so).
    #[serde(with = "named")]
    pub device: Device,
    /// `builtin` (the built-in base model of `benchmark`), `builtin-small` (a smaller one,
    /// built on first use) or an HF LLaMA model directory.
    pub model: String,
    /// The built-in benchmark: `v2` (conflicting rules, the default) or `v1` (the first
    /// benchmark, for reproducing older results).
    #[serde(with = "named")]
    pub benchmark: Benchmark,
    /// `builtin` (the built-in benchmark) or a JSONL/JSON file of records with a `domain`
    /// (or `category`) field, partitioned by `partition`.
    pub data: String,
    /// One data file per client instead of `data` + `partition` (then `num_clients` is its
    /// length).
    pub client_data: Vec<String>,
    /// Held-out records with a domain field (required with your own `data`).
    pub eval_data: String,
    /// `domain` (each client one domain), `iid`, or `dirichlet:α` over domains.
    #[serde(with = "named")]
    pub partition: Partition,
    pub num_clients: usize,
    /// Clients sampled per round (seeded by seed and round).
    pub sample_clients: usize,
    pub rounds: usize,
    /// Optimizer steps per client per round.
    pub local_steps: usize,
    /// Sequences per optimizer step.
    pub batch: usize,
    /// Sequences per forward/backward (batch / micro_batch steps are accumulated).
    pub micro_batch: usize,
    /// Tokens per training row.
    pub seq: usize,
    /// Client learning rate: cosine from `lr` (round 1) to `lr_min` (last round).
    /// Default 3e-3 → 3e-4 (tuned for the built-in benchmark); with your own `model`,
    /// 2e-4 → 2e-5 (the usual LoRA rate).
    pub lr: f32,
    pub lr_min: f32,
    /// Linear learning-rate warm-up over the federation's first `warmup_steps` local steps
    /// (round · local_steps + step), then the cosine. Default 0; with your own `model`, the
    /// first round (`local_steps`).
    pub warmup_steps: usize,
    /// `adamw` or `sgd`.
    #[serde(with = "named")]
    pub optimizer: OptimizerKind,
    pub weight_decay: f32,
    /// Global gradient-norm clip (0 = off).
    pub max_grad_norm: f32,
    pub lora_r: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    pub lora_targets: String,
    pub rslora: bool,
    /// FedProx μ.
    pub fedprox_mu: f32,
    /// Upload mask ρ (1 = off). Unset: 0.5 for FedCDD (its mask), 1 (dense, as papers
    /// compare against) for every baseline.
    pub keep_ratio: Option<f32>,
    /// η, the noise of the masked columns relative to their rms.
    pub noise_scale: f32,
    /// `column_l2`, `element_abs` or `row_l2`.
    #[serde(with = "named")]
    pub importance: Importance,
    /// Which axis of `lora_B` the mask ranks: `column` (its r rank components) or `feature`
    /// (its d_out rows).
    #[serde(with = "named")]
    pub mask_axis: MaskAxis,
    /// `f32`, `f16` or `bf16` values in uploads.
    #[serde(with = "named")]
    pub upload_dtype: DType,
    /// Server rate λ/η. Default per rule: 1 (FedAvg, FedCDD, SCAFFOLD, ...), 0.3 for
    /// FedAvgM, 0.01 for FedAdagrad/FedYogi/FedAdam (tuned on the built-in benchmark; the
    /// spec's 1e-3 is `fedcdd aggregate`'s default).
    pub server_lr: Option<f32>,
    pub server_beta1: f32,
    pub server_beta2: f32,
    pub server_tau: f32,
    /// `reddi` or `openfedllm`.
    #[serde(with = "named")]
    pub fedopt_variant: FedOptVariant,
    /// FedCDD switches (see the spec).
    #[serde(with = "named")]
    pub norm_axis: NormAxis,
    #[serde(with = "named")]
    pub target: Target,
    #[serde(with = "named")]
    pub weighting: Weighting,
    pub renormalize: bool,
    /// `both` (FedCDD), `consensus_only` (consensus magnitude, FedAvg's direction) or
    /// `divergence_only` (FedAvg's magnitude, the aligned direction).
    #[serde(with = "named")]
    pub components: Components,
    /// Per-client L2 clipping of the whole update before aggregation: `none`, `fixed:C`, or
    /// `median:M` (M × the round's median client norm).
    #[serde(with = "named")]
    pub clip: Clip,
    /// A coordinate-wise robust rule in place of the mean (fedavg, fedprox): `none`,
    /// `median`, `trimmed_mean:K` (drop the K largest and K smallest values).
    #[serde(with = "named")]
    pub robust: RobustRule,
    /// Malicious clients, for robustness experiments: `none`, `signflip:K`, `scale:K:F`,
    /// `noise:K:SIGMA`, `labelflip:K` (K clients, chosen by the seed).
    #[serde(with = "named")]
    pub attack: Attack,
    /// Client-level differential privacy (DP-FedAvg; fedavg, fedprox): every update clipped to
    /// this L2 norm C and averaged with equal weights, plus Gaussian noise of
    /// `dp_noise_multiplier · C` on the sum; 0 = off.
    pub dp_clip: f32,
    pub dp_noise_multiplier: f32,
    /// A target ε instead of a noise multiplier: > 0 sets `dp_noise_multiplier` to the
    /// smallest one that keeps all `rounds` rounds within this ε at `dp_delta` (0 = off).
    pub dp_epsilon: f64,
    /// δ of the (ε, δ) guarantee the accountant reports.
    pub dp_delta: f64,
    /// `server` (the server adds the noise) or `client` (each client adds its share).
    #[serde(with = "named")]
    pub dp_mode: DpMode,
    /// Evaluate the global model every this many rounds (and after the last).
    pub eval_every: usize,
    /// Questions per domain asked for exact-match accuracy (the loss uses up to four times
    /// as many held-out records per domain).
    pub eval_questions: usize,
    /// Reference points: `centralized`, `local-only`.
    #[serde(with = "named_list")]
    pub references: Vec<Reference>,
    /// Built-in benchmark: training items per domain.
    pub builtin_train_items: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            algorithm: Algorithm::FedCdd,
            seed: 0,
            threads: 0,
            device: Device::Cpu,
            model: "builtin".into(),
            benchmark: Benchmark::V2,
            data: "builtin".into(),
            client_data: Vec::new(),
            eval_data: String::new(),
            partition: Partition::Domain,
            num_clients: 4,
            sample_clients: 4,
            rounds: 10,
            local_steps: 16,
            batch: 16,
            micro_batch: 16,
            seq: 64,
            lr: 3e-3,
            lr_min: 3e-4,
            warmup_steps: 0,
            optimizer: OptimizerKind::AdamW,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            lora_targets: "q,k,v,o,gate,up,down".into(),
            rslora: false,
            fedprox_mu: 0.01,
            keep_ratio: None,
            noise_scale: 0.1,
            importance: Importance::ColumnL2,
            mask_axis: MaskAxis::Column,
            upload_dtype: DType::F32,
            server_lr: None,
            server_beta1: 0.9,
            server_beta2: 0.99,
            server_tau: 1e-3,
            fedopt_variant: FedOptVariant::Reddi,
            norm_axis: NormAxis::Column,
            target: Target::Delta,
            weighting: Weighting::PRelu,
            renormalize: true,
            components: Components::Both,
            clip: Clip::None,
            robust: RobustRule::None,
            attack: Attack::None,
            dp_clip: 0.0,
            dp_noise_multiplier: 1.0,
            dp_epsilon: 0.0,
            dp_delta: 1e-5,
            dp_mode: DpMode::Server,
            eval_every: 1,
            eval_questions: 200,
            references: vec![Reference::Centralized],
            builtin_train_items: 2000,
        }
    }
}

/// `(key, value)` defaults of a run on the user's own model (a `model` that is a directory,
/// not a built-in name), where the table does not set them: the built-in benchmark's tuned
/// rate (3e-3) is far too high for a pre-trained checkpoint. Applied to the table before it
/// is read, so the saved config (and every Flower process given it) carries the values.
pub fn user_model_defaults(table: &toml::Table) -> Vec<(&'static str, toml::Value)> {
    let own_model = match table.get("model") {
        Some(toml::Value::String(m)) => BuiltinSize::from_name(m).is_none(),
        _ => false,
    };
    if !own_model {
        return Vec::new();
    }
    let local_steps = match table.get("local_steps") {
        Some(toml::Value::Integer(n)) if *n >= 0 => *n,
        _ => RunConfig::default().local_steps as i64,
    };
    [
        ("lr", toml::Value::Float(2e-4)),
        ("lr_min", toml::Value::Float(2e-5)),
        ("warmup_steps", toml::Value::Integer(local_steps)),
    ]
    .into_iter()
    .filter(|(k, _)| !table.contains_key(*k))
    .collect()
}

/// Reads a config table: the user-model defaults, then the keys.
fn config_from_table(mut table: toml::Table, origin: &str) -> Result<RunConfig> {
    for (k, v) in user_model_defaults(&table) {
        table.insert(k.to_string(), v);
    }
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| anyhow::anyhow!("{origin}: {}", with_key(&e)))
}

/// Applies `key=value` overrides to a TOML table. The value is read as TOML (`3`, `0.5`,
/// `true`, `["a"]`, `"x"`); anything else is taken as a string.
pub fn apply_sets(table: &mut toml::Table, sets: &[String]) -> Result<()> {
    for s in sets {
        let (k, v) = s
            .split_once('=')
            .with_context(|| format!("--set {s:?}: expected key=value"))?;
        table.insert(k.trim().to_string(), parse_value(v));
    }
    Ok(())
}

/// A value as `--set` reads it: TOML (`3`, `0.5`, `true`, `["a"]`, `"x"`), else a string.
pub fn parse_value(v: &str) -> toml::Value {
    format!("x = {v}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("x"))
        .unwrap_or_else(|| toml::Value::String(v.to_string()))
}

impl RunConfig {
    /// Reads `path` (if any), applies the overrides and validates.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<RunConfig> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read the config {}", p.display()))?;
                text.parse::<toml::Table>()
                    .with_context(|| format!("{}: not valid TOML", p.display()))?
            }
            None => toml::Table::new(),
        };
        apply_sets(&mut table, sets)?;
        let origin = path.map_or("the --set values".to_string(), |p| {
            format!("{} (with --set)", p.display())
        });
        let mut cfg = config_from_table(table, &origin)?;
        cfg.validate()?;
        cfg.resolve_dp_target();
        Ok(cfg)
    }

    /// Reads a config from TOML text (`origin` names it in errors) and validates it.
    pub fn from_toml(text: &str, origin: &str) -> Result<RunConfig> {
        let table = text
            .parse::<toml::Table>()
            .with_context(|| format!("{origin}: not valid TOML"))?;
        let mut cfg = config_from_table(table, origin)?;
        cfg.validate().with_context(|| origin.to_string())?;
        cfg.resolve_dp_target();
        Ok(cfg)
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).context("cannot write the config as TOML")
    }

    pub fn builtin_model(&self) -> bool {
        self.builtin_size().is_some()
    }

    /// The built-in model size `model` names, if it names one.
    pub fn builtin_size(&self) -> Option<BuiltinSize> {
        BuiltinSize::from_name(&self.model)
    }

    pub fn builtin_data(&self) -> bool {
        self.data == "builtin" && self.client_data.is_empty()
    }

    pub fn grad_accum(&self) -> usize {
        self.batch / self.micro_batch.max(1)
    }

    /// The client learning rate of round `round` (0-based): cosine from lr to lr_min.
    pub fn lr_at_round(&self, round: usize) -> f32 {
        if self.rounds <= 1 {
            return self.lr;
        }
        let t = round as f64 / (self.rounds - 1) as f64;
        let c = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
        (self.lr_min as f64 + (self.lr - self.lr_min) as f64 * c) as f32
    }

    /// The learning rate of local step `step` (of `steps_in_round`) in round `round`: the
    /// round's cosine rate, scaled down linearly while the federation is in its first
    /// `warmup_steps` local steps (a reference that runs `steps_in_round` steps per round
    /// advances through the warm-up at the clients' pace).
    pub fn lr_at(&self, round: usize, step: usize, steps_in_round: usize) -> f32 {
        let lr = self.lr_at_round(round);
        if self.warmup_steps == 0 {
            return lr;
        }
        let per_step = self.local_steps as f64 / steps_in_round.max(1) as f64;
        let done = (round * self.local_steps) as f64 + (step + 1) as f64 * per_step;
        let ramp = done / self.warmup_steps as f64;
        if ramp < 1.0 {
            (lr as f64 * ramp) as f32
        } else {
            lr
        }
    }

    pub fn lora(&self) -> Result<LoraConfig> {
        let c = LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets: parse_targets(&self.lora_targets)?,
            rslora: self.rslora,
        };
        c.validate()?;
        Ok(c)
    }

    /// The same config with the defaults that depend on other keys written out (the keep
    /// ratio), so that two configs that run identically compare equal.
    pub fn resolved(mut self) -> RunConfig {
        let keep = self.effective_keep_ratio();
        self.keep_ratio = Some(keep);
        if keep >= 1.0 {
            // The mask is the identity: how it would rank or fill columns does not matter.
            let off = RunConfig::default();
            self.noise_scale = off.noise_scale;
            self.importance = off.importance;
            self.mask_axis = off.mask_axis;
        }
        self.resolve_dp_target();
        self
    }

    /// Replaces a target `dp_epsilon` by the noise multiplier that meets it (done at load, so
    /// that the saved config, a resumed run and every Flower process use the same σ).
    fn resolve_dp_target(&mut self) {
        if self.dp() && self.dp_epsilon > 0.0 && self.dp_epsilon.is_finite() {
            let q = self.sample_clients as f64 / self.num_clients.max(1) as f64;
            let sigma = noise_for_epsilon(q, self.rounds, self.dp_delta, self.dp_epsilon);
            // Rounded up, so that the f32 multiplier stays within the target.
            self.dp_noise_multiplier = (sigma * (1.0 + 1e-6)) as f32;
            self.dp_epsilon = 0.0;
        }
    }

    /// Whether client-level DP is on.
    pub fn dp(&self) -> bool {
        self.dp_clip > 0.0
    }

    /// The robustness and privacy keys, with messages that name them.
    fn validate_defenses(&self) -> Result<()> {
        let mean_family = matches!(self.algorithm, Algorithm::FedAvg | Algorithm::FedProx);
        if self.robust != RobustRule::None {
            if !mean_family {
                bail!(
                    "robust = {} replaces the mean of fedavg or fedprox; algorithm is {}",
                    self.robust,
                    self.algorithm.name()
                );
            }
            if let RobustRule::TrimmedMean(k) = self.robust
                && 2 * k >= self.sample_clients
            {
                bail!(
                    "robust = {}: trimming {k} from each side needs more than {} clients a \
                     round (sample_clients is {})",
                    self.robust,
                    2 * k,
                    self.sample_clients
                );
            }
        }
        if self.client_data.is_empty() && self.attack.count() > self.num_clients {
            bail!(
                "attack = {}: more attackers than the {} clients",
                self.attack,
                self.num_clients
            );
        }
        if !(self.dp_clip >= 0.0 && self.dp_clip.is_finite()) {
            bail!(
                "dp_clip must be a finite number >= 0 (0 = DP off), got {}",
                self.dp_clip
            );
        }
        if self.dp_epsilon != 0.0 && !self.dp() {
            bail!("dp_epsilon = {} needs dp_clip > 0 (DP on)", self.dp_epsilon);
        }
        if self.dp() {
            if !mean_family {
                bail!(
                    "dp_clip: client-level DP is offered for fedavg and fedprox; {} is not a sum \
                     of bounded per-client terms (see docs/privacy.md)",
                    self.algorithm.name()
                );
            }
            if self.robust != RobustRule::None || self.clip != Clip::None {
                bail!("dp_clip: DP does its own clipping; set robust and clip to none");
            }
            if !(self.dp_noise_multiplier >= 0.0 && self.dp_noise_multiplier.is_finite()) {
                bail!("dp_noise_multiplier must be a finite number >= 0");
            }
            if !(self.dp_epsilon >= 0.0 && self.dp_epsilon.is_finite()) {
                bail!("dp_epsilon must be a finite number >= 0 (0 = use dp_noise_multiplier)");
            }
            if !(self.dp_delta > 0.0 && self.dp_delta < 1.0) {
                bail!("dp_delta must be in (0, 1), got {}", self.dp_delta);
            }
        }
        Ok(())
    }

    /// A short stable name of this config: a hash of the keys whose value differs from the
    /// default (so a key added to the config later, at its default, keeps every name).
    pub fn id(&self) -> Result<String> {
        let mut table: toml::Table =
            toml::from_str(&self.to_toml()?).context("cannot read the config back as TOML")?;
        let defaults: toml::Table = toml::from_str(&RunConfig::default().to_toml()?)
            .context("cannot read the default config as TOML")?;
        table.retain(|k, v| defaults.get(k) != Some(v));
        let text = toml::to_string(&table).context("cannot write the config as TOML")?;
        Ok(format!("{:016x}", crate::rng::fnv1a(text.as_bytes())))
    }

    /// The keep ratio in force: `keep_ratio`, else 0.5 for FedCDD and 1 (dense) otherwise.
    pub fn effective_keep_ratio(&self) -> f32 {
        self.keep_ratio
            .unwrap_or(if self.algorithm == Algorithm::FedCdd {
                0.5
            } else {
                1.0
            })
    }

    pub fn mask(&self) -> Result<MaskConfig> {
        let m = MaskConfig {
            keep_ratio: self.effective_keep_ratio(),
            noise_scale: self.noise_scale,
            importance: self.importance,
            axis: self.mask_axis,
        };
        m.validate().map_err(|e| anyhow::anyhow!("mask: {e}"))?;
        Ok(m)
    }

    /// The server settings, with the runner's server-rate defaults where `server_lr` is unset
    /// (tuned on the built-in benchmark, 10 rounds, one seed: the spec's η = 1e-3 barely
    /// moves a LoRA adapter in 10 rounds, 0 % accuracy, and FedAvgM's λ = 1 with β = 0.9
    /// overshoots, 6.5 %).
    pub fn server_settings(&self) -> ServerSettings {
        let tuned = match self.algorithm.server_opt() {
            Some(ServerOpt::FedAvgM) => Some(0.3),
            Some(ServerOpt::FedAdagrad | ServerOpt::FedYogi | ServerOpt::FedAdam) => Some(0.01),
            _ => None,
        };
        ServerSettings {
            server_lr: self.server_lr.or(tuned),
            beta1: self.server_beta1,
            beta2: self.server_beta2,
            tau: self.server_tau,
            variant: self.fedopt_variant,
            norm_axis: self.norm_axis,
            target: self.target,
            weighting: self.weighting,
            renormalize: self.renormalize,
            components: self.components,
        }
    }

    /// The validated server options of this run's algorithm.
    pub fn server_options(&self) -> Result<ServerOptions> {
        self.server_settings().options(self.algorithm, false)
    }

    /// Checks every setting once, with messages that name the key.
    pub fn validate(&self) -> Result<()> {
        self.lora()?;
        self.mask()?;
        self.server_options()?;
        let positive = [
            ("num_clients", self.num_clients),
            ("sample_clients", self.sample_clients),
            ("rounds", self.rounds),
            ("local_steps", self.local_steps),
            ("batch", self.batch),
            ("micro_batch", self.micro_batch),
            ("seq", self.seq),
            ("eval_every", self.eval_every),
        ];
        for (k, v) in positive {
            if v == 0 {
                bail!("{k} must be at least 1");
            }
        }
        if self.client_data.is_empty() && self.sample_clients > self.num_clients {
            bail!(
                "sample_clients ({}) is more than num_clients ({})",
                self.sample_clients,
                self.num_clients
            );
        }
        if !self.batch.is_multiple_of(self.micro_batch) {
            bail!(
                "batch ({}) must be a multiple of micro_batch ({})",
                self.batch,
                self.micro_batch
            );
        }
        for (k, v) in [("lr", self.lr), ("lr_min", self.lr_min)] {
            if !(v > 0.0 && v.is_finite()) {
                bail!("{k} must be a positive number, got {v}");
            }
        }
        if !(self.fedprox_mu >= 0.0 && self.fedprox_mu.is_finite()) {
            bail!("fedprox_mu must be >= 0");
        }
        self.validate_defenses()?;
        if !self.builtin_data() && !self.builtin_model() && self.eval_data.is_empty() {
            bail!("with your own data, give eval_data (held-out records with a domain field)");
        }
        if self.builtin_data() != self.builtin_model() {
            bail!(
                "the built-in benchmark needs the built-in model and the other way round \
                 (model = {:?}, data = {:?})",
                self.model,
                self.data
            );
        }
        Ok(())
    }

    /// The model directory: the cached built-in base, or the given path.
    pub fn model_path(&self) -> Option<PathBuf> {
        (!self.builtin_model()).then(|| PathBuf::from(&self.model))
    }
}

/// How training data is split among clients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Partition {
    Domain,
    Iid,
    Dirichlet(f64),
}

impl FromStr for Partition {
    type Err = String;
    fn from_str(p: &str) -> Result<Self, String> {
        Ok(match p {
            "domain" => Partition::Domain,
            "iid" => Partition::Iid,
            _ => match p.strip_prefix("dirichlet:").map(str::parse::<f64>) {
                Some(Ok(a)) if a > 0.0 && a.is_finite() => Partition::Dirichlet(a),
                _ => {
                    return Err(format!(
                        "partition {p:?}: expected domain, iid or dirichlet:ALPHA (ALPHA > 0)"
                    ));
                }
            },
        })
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Partition::Domain => f.write_str("domain"),
            Partition::Iid => f.write_str("iid"),
            Partition::Dirichlet(a) => write!(f, "dirichlet:{a}"),
        }
    }
}

/// A reference point of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reference {
    /// Every client's data pooled, the federated run's token budget.
    Centralized,
    /// Each client alone; the mean over clients.
    LocalOnly,
}

impl Reference {
    pub fn name(self) -> &'static str {
        match self {
            Reference::Centralized => "centralized",
            Reference::LocalOnly => "local-only",
        }
    }
}

impl FromStr for Reference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "centralized" => Ok(Reference::Centralized),
            "local-only" => Ok(Reference::LocalOnly),
            o => Err(format!(
                "reference {o:?}: expected centralized or local-only"
            )),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The config's string-valued enums, read and written through `FromStr` / `Display`. (The
/// core's types carry `name`/`from_name`; these wrappers give them the trait form.)
pub trait ConfigValue: Sized {
    fn parse_value(s: &str) -> Result<Self, String>;
    fn value_text(&self) -> String;
}

macro_rules! config_value_by_trait {
    ($($t:ty),*) => {$(
        impl ConfigValue for $t {
            fn parse_value(s: &str) -> Result<Self, String> {
                s.parse()
            }
            fn value_text(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
config_value_by_trait!(
    Partition,
    Reference,
    Device,
    OptimizerKind,
    Clip,
    RobustRule,
    Attack,
    DpMode
);

macro_rules! config_value_by_name {
    ($($t:ty => $key:literal),*) => {$(
        impl ConfigValue for $t {
            fn parse_value(s: &str) -> Result<Self, String> {
                <$t>::from_name(s).ok_or_else(|| {
                    let all: Vec<&str> = <$t>::ALL.iter().map(|v| v.name()).collect();
                    format!("{} {s:?}: expected one of {}", $key, all.join(", "))
                })
            }
            fn value_text(&self) -> String {
                self.name().to_string()
            }
        }
    )*};
}
config_value_by_name!(
    Importance => "importance",
    Benchmark => "benchmark",
    MaskAxis => "mask_axis",
    Components => "components",
    FedOptVariant => "fedopt_variant",
    NormAxis => "norm_axis",
    Target => "target"
);

impl ConfigValue for Algorithm {
    fn parse_value(s: &str) -> Result<Self, String> {
        Algorithm::from_name(s).ok_or_else(|| {
            format!(
                "unknown algorithm {s:?}; expected one of {}",
                Algorithm::ALL.map(|a| a.name()).join(", ")
            )
        })
    }
    fn value_text(&self) -> String {
        self.name().to_string()
    }
}

impl ConfigValue for DType {
    fn parse_value(s: &str) -> Result<Self, String> {
        DType::from_name(s).ok_or_else(|| format!("upload_dtype {s:?}: expected f32, f16 or bf16"))
    }
    fn value_text(&self) -> String {
        self.short_name().to_string()
    }
}

impl ConfigValue for Weighting {
    fn parse_value(s: &str) -> Result<Self, String> {
        Weighting::parse(s).map_err(|e| format!("weighting {s:?}: {e}"))
    }
    fn value_text(&self) -> String {
        self.to_string()
    }
}

/// serde for one [`ConfigValue`] as a string.
mod named {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use super::ConfigValue;

    pub fn serialize<T: ConfigValue, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.value_text())
    }

    pub fn deserialize<'de, T: ConfigValue, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let s = String::deserialize(d)?;
        T::parse_value(&s).map_err(D::Error::custom)
    }
}

/// serde for a list of [`ConfigValue`]s as strings.
mod named_list {
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use super::ConfigValue;

    pub fn serialize<T: ConfigValue, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for x in v {
            seq.serialize_element(&x.value_text())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, T: ConfigValue, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<T>, D::Error> {
        let items = Vec::<String>::deserialize(d)?;
        items
            .iter()
            .map(|s| T::parse_value(s).map_err(D::Error::custom))
            .collect()
    }
}

/// A TOML error as one line that names the key: `key: message`.
fn with_key(e: &toml::de::Error) -> String {
    let text = e.to_string();
    let key = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("in `")?.strip_suffix('`'));
    match key {
        Some(k) if !e.message().contains(k) => format!("{k}: {}", e.message()),
        _ => e.message().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_ends_and_middle() {
        let c = RunConfig {
            rounds: 5,
            lr: 1e-3,
            lr_min: 1e-4,
            ..Default::default()
        };
        assert!((c.lr_at_round(0) - 1e-3).abs() < 1e-9);
        assert!((c.lr_at_round(4) - 1e-4).abs() < 1e-9);
        assert!((c.lr_at_round(2) - 5.5e-4).abs() < 1e-8);
    }

    /// A warm-up of 6 local steps over rounds of 4, at a constant rate of 1: the clients'
    /// steps climb 1/6, 2/6, … to 1 in round 1; a reference taking 8 steps per round climbs
    /// at the same pace (half a client step per step).
    #[test]
    fn warm_up_ramps_over_the_federations_first_local_steps() {
        let c = RunConfig {
            rounds: 3,
            local_steps: 4,
            lr: 1.0,
            lr_min: 1.0,
            warmup_steps: 6,
            ..Default::default()
        };
        let client: Vec<f32> = (0..3)
            .flat_map(|r| (0..4).map(move |s| (r, s)))
            .map(|(r, s)| c.lr_at(r, s, 4))
            .collect();
        let want = [1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6, 6].map(|n| n as f32 / 6.0);
        for (got, want) in client.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{client:?}");
        }
        assert!((c.lr_at(0, 0, 8) - 0.5 / 6.0).abs() < 1e-6);
        assert!((c.lr_at(0, 7, 8) - 4.0 / 6.0).abs() < 1e-6);
        assert_eq!(c.lr_at(1, 3, 8), 1.0);
        // no warm-up: the round's cosine rate, bit for bit
        let plain = RunConfig {
            rounds: 5,
            lr: 1e-3,
            lr_min: 1e-4,
            ..Default::default()
        };
        for r in 0..5 {
            assert_eq!(plain.lr_at(r, 0, 16), plain.lr_at_round(r));
        }
    }

    /// The built-in benchmark keeps its tuned rate; a model directory gets LoRA's usual rate
    /// with a first-round warm-up unless the config says otherwise, and the saved config
    /// reads back to the same values.
    #[test]
    fn a_users_model_gets_the_usual_lora_rate_with_warm_up() {
        let builtin = RunConfig::load(None, &[]).unwrap();
        assert_eq!(
            (builtin.lr, builtin.lr_min, builtin.warmup_steps),
            (3e-3, 3e-4, 0)
        );
        let small = RunConfig::load(None, &["model=\"builtin-small\"".into()]).unwrap();
        assert_eq!((small.lr, small.warmup_steps), (3e-3, 0));
        let own_model = |extra: &[&str]| {
            let sets: Vec<String> = [
                "model=\"models/smollm\"",
                "data=\"d.jsonl\"",
                "eval_data=\"e.jsonl\"",
            ]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
            RunConfig::load(None, &sets).unwrap()
        };
        let own = own_model(&[]);
        assert_eq!((own.lr, own.lr_min, own.warmup_steps), (2e-4, 2e-5, 16));
        let set = own_model(&["lr=1e-4", "local_steps=5"]);
        assert_eq!((set.lr, set.lr_min, set.warmup_steps), (1e-4, 2e-5, 5));
        let back = RunConfig::from_toml(&set.to_toml().unwrap(), "saved").unwrap();
        assert_eq!(back, set);
    }

    #[test]
    fn sets_override_and_unknown_keys_fail() {
        let c = RunConfig::load(None, &["rounds=3".into(), "algorithm=fedavg".into()]).unwrap();
        assert_eq!((c.rounds, c.algorithm), (3, Algorithm::FedAvg));
        let e = RunConfig::load(None, &["roundz=3".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("roundz"), "{e:#}");
        // The resolved TOML reads back to the same config.
        let text = c.to_toml().unwrap();
        let dir = std::env::temp_dir().join(format!("fedcdd-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(&p, text).unwrap();
        assert_eq!(RunConfig::load(Some(&p), &[]).unwrap(), c);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A target ε becomes the noise multiplier that meets it (the accountant's ε of the whole
    /// run is at most the target and within 1 % of it); without DP the key is refused.
    #[test]
    fn dp_epsilon_sets_the_noise_multiplier() {
        use crate::fl::privacy::epsilon;
        for (sample, target) in [(4usize, 4.0f64), (2, 1.0), (4, 100.0)] {
            let sets = [
                "algorithm=fedavg".to_string(),
                "rounds=7".into(),
                format!("sample_clients={sample}"),
                "dp_clip=1.0".into(),
                format!("dp_epsilon={target}"),
            ];
            let c = RunConfig::load(None, &sets).unwrap();
            assert_eq!(c.dp_epsilon, 0.0);
            let q = sample as f64 / c.num_clients as f64;
            let eps = epsilon(q, c.dp_noise_multiplier as f64, 7, c.dp_delta);
            assert!(eps <= target && eps > 0.99 * target, "{target}: ε {eps}");
        }
        let e = RunConfig::load(None, &["dp_epsilon=4".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("dp_clip"), "{e:#}");
    }
}
