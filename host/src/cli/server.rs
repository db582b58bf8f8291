//! The server-side commands: `aggregate` (one server step through an algorithm's
//! strategy), `encode` / `decode` / `inspect` of uploads, `make-example`.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use fedcdd_core::{
    Algorithm, Components, DType, FedOptVariant, Importance, MaskAxis, MaskConfig, NormAxis,
    Payload, Target, Weighting,
};

use crate::fl::strategy::{NextGlobal, ServerRound, StrategyOptions, for_algorithm};
use crate::io::{load_adapter, save_adapter, write_atomic};
use crate::server::example::{ExampleOptions, make_example};
use crate::server::{FileClients, ServerSettings, ServerStateStore};
use crate::upload::{EncodeOptions, apply_update, decode_update, encode_update, parse_upload};

use super::output::print_stdout;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AlgorithmArg {
    Fedavg,
    Fedprox,
    Fedavgm,
    Fedadagrad,
    Fedyogi,
    Fedadam,
    Fedcdd,
    #[value(name = "ffa-lora")]
    FfaLora,
    #[value(name = "fedsa-lora")]
    FedsaLora,
    Scaffold,
    Flora,
}

impl AlgorithmArg {
    fn algorithm(self) -> Algorithm {
        match self {
            AlgorithmArg::Fedavg => Algorithm::FedAvg,
            AlgorithmArg::Fedprox => Algorithm::FedProx,
            AlgorithmArg::Fedavgm => Algorithm::FedAvgM,
            AlgorithmArg::Fedadagrad => Algorithm::FedAdagrad,
            AlgorithmArg::Fedyogi => Algorithm::FedYogi,
            AlgorithmArg::Fedadam => Algorithm::FedAdam,
            AlgorithmArg::Fedcdd => Algorithm::FedCdd,
            AlgorithmArg::FfaLora => Algorithm::FfaLora,
            AlgorithmArg::FedsaLora => Algorithm::FedSaLora,
            AlgorithmArg::Scaffold => Algorithm::Scaffold,
            AlgorithmArg::Flora => Algorithm::FLora,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum NormAxisArg {
    Column,
    Row,
    Rank,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TargetArg {
    Delta,
    Weights,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum VariantArg {
    Reddi,
    Openfedllm,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ImportanceArg {
    #[value(name = "column_l2")]
    ColumnL2,
    #[value(name = "element_abs")]
    ElementAbs,
    #[value(name = "row_l2")]
    RowL2,
}

fn parse_components(s: &str) -> Result<Components, String> {
    Components::from_name(s).ok_or_else(|| {
        format!(
            "expected one of {}",
            Components::ALL.map(|c| c.name()).join(", ")
        )
    })
}

fn parse_mask_axis(s: &str) -> Result<MaskAxis, String> {
    MaskAxis::from_name(s).ok_or_else(|| {
        format!(
            "expected one of {}",
            MaskAxis::ALL.map(|c| c.name()).join(", ")
        )
    })
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

/// A client given as `PATH` or `PATH:SAMPLES`.
#[derive(Clone, Debug)]
pub struct ClientArg {
    pub path: PathBuf,
    pub samples: Option<u64>,
}

fn parse_client(s: &str) -> Result<ClientArg, String> {
    // A trailing `:digits` is a sample count; any other colon belongs to the path.
    if let Some((path, n)) = s.rsplit_once(':')
        && !path.is_empty()
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit())
    {
        let samples = n
            .parse::<u64>()
            .map_err(|e| format!("sample count {n:?}: {e}"))?;
        return Ok(ClientArg {
            path: PathBuf::from(path),
            samples: Some(samples),
        });
    }
    Ok(ClientArg {
        path: PathBuf::from(s),
        samples: None,
    })
}

#[derive(Args, Debug)]
pub struct AggregateArgs {
    /// Aggregation rule. scaffold and flora are accepted only to explain that they need the
    /// federated training loop (control variates; merging into the base model).
    #[arg(long, value_enum)]
    pub algorithm: AlgorithmArg,
    /// Current global adapter (PEFT directory or .safetensors).
    #[arg(long)]
    pub global: PathBuf,
    /// A client: adapter (dir or .safetensors) or upload, optionally `:NUM_SAMPLES`.
    /// Repeat for each client. Without sample counts all clients weigh the same.
    #[arg(long = "client", required = true, value_parser = parse_client)]
    pub clients: Vec<ClientArg>,
    /// Output PEFT adapter directory (config copied from the global).
    #[arg(long)]
    pub out: PathBuf,
    /// Server state file (momentum etc., safetensors): read if present, written after.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Server rate λ/η [default: 1 for fedavg, fedavgm, fedcdd; 1e-3 for fedadagrad, fedyogi, fedadam].
    #[arg(long)]
    pub server_lr: Option<f32>,
    /// β1 of FedYogi/FedAdam, and FedAvgM's momentum β.
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f32,
    /// β2 of FedYogi/FedAdam.
    #[arg(long, default_value_t = 0.99)]
    pub beta2: f32,
    /// τ of the FedOpt rules (adaptivity; v starts at τ²).
    #[arg(long, default_value_t = 1e-3)]
    pub tau: f32,
    /// FedOpt reading: Reddi et al. (spec) or OpenFedLLM's code.
    #[arg(long, value_enum, default_value = "reddi")]
    pub fedopt_variant: VariantArg,
    /// FedCDD: which norms form the consensus magnitude.
    #[arg(long, value_enum, default_value = "column")]
    pub norm_axis: NormAxisArg,
    /// FedCDD: decompose the updates (delta) or the client weights.
    #[arg(long, value_enum, default_value = "delta")]
    pub target: TargetArg,
    /// FedCDD: direction weights: p_relu, relu, softmax:T, samples (alignment off), uniform.
    #[arg(long, default_value = "p_relu", value_parser = |s: &str| Weighting::parse(s).map_err(str::to_string))]
    pub weighting: Weighting,
    /// FedCDD: re-normalise the aggregated directions per group.
    #[arg(long, value_enum, default_value = "on")]
    pub renormalize: OnOff,
    /// FedCDD ablation: both parts, consensus_only (consensus magnitude, FedAvg's direction)
    /// or divergence_only (FedAvg's magnitude, the aligned direction).
    #[arg(long, default_value = "both", value_parser = parse_components)]
    pub components: Components,
    /// Also write a JSON report of the step here.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct EncodeArgs {
    /// Global adapter the client started from.
    #[arg(long)]
    pub global: PathBuf,
    /// The client's trained adapter.
    #[arg(long)]
    pub local: PathBuf,
    /// Upload file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// ρ: share of columns (by L2 norm) sent exactly; 1 sends everything.
    #[arg(long, default_value_t = 1.0)]
    pub keep_ratio: f32,
    /// η: noise std of the other columns, relative to their rms; 0 = plain top-K.
    #[arg(long, default_value_t = 0.0)]
    pub noise_scale: f32,
    /// How importance is measured.
    #[arg(long, value_enum, default_value = "column_l2")]
    pub importance: ImportanceArg,
    /// Which axis of lora_B is ranked: column (its r rank components) or feature (its d_out
    /// rows).
    #[arg(long, default_value = "column", value_parser = parse_mask_axis)]
    pub mask_axis: MaskAxis,
    /// Noise seed [default: derived from --round and --client-id].
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = 0)]
    pub round: u32,
    #[arg(long, default_value_t = 0)]
    pub client_id: u32,
    /// The client's sample count (its aggregation weight); 0 = unknown.
    #[arg(long, default_value_t = 0)]
    pub samples: u64,
    /// Storage type of the uploaded values [default: each local tensor's own].
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Send only the tensors this algorithm aggregates (ffa-lora: lora_B; fedsa-lora: lora_A).
    #[arg(long, value_enum, default_value = "fedcdd")]
    pub algorithm: AlgorithmArg,
}

#[derive(Args, Debug)]
pub struct DecodeArgs {
    /// Upload written by `fedcdd encode`.
    pub update: PathBuf,
    /// Global adapter the update applies to.
    #[arg(long)]
    pub global: PathBuf,
    /// Output PEFT adapter directory: global + reconstructed update.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    pub update: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// List every kept column index (default: the first 8).
    #[arg(long)]
    pub full: bool,
}

impl AggregateArgs {
    /// The server settings these flags give (the rule's spec default where --server-lr is
    /// absent).
    fn settings(&self) -> ServerSettings {
        ServerSettings {
            server_lr: self.server_lr,
            beta1: self.beta1,
            beta2: self.beta2,
            tau: self.tau,
            variant: match self.fedopt_variant {
                VariantArg::Reddi => FedOptVariant::Reddi,
                VariantArg::Openfedllm => FedOptVariant::OpenFedLlm,
            },
            norm_axis: match self.norm_axis {
                NormAxisArg::Column => NormAxis::Column,
                NormAxisArg::Row => NormAxis::Row,
                NormAxisArg::Rank => NormAxis::Rank,
            },
            target: match self.target {
                TargetArg::Delta => Target::Delta,
                TargetArg::Weights => Target::Weights,
            },
            weighting: self.weighting,
            renormalize: matches!(self.renormalize, OnOff::On),
            components: self.components,
        }
    }
}

#[derive(Args, Debug)]
pub struct MakeExampleArgs {
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

pub fn cmd_make_example(a: &MakeExampleArgs) -> Result<()> {
    let tensors = make_example(&ExampleOptions {
        out: a.out.clone(),
        clients: a.clients,
        layers: a.layers,
        hidden: a.hidden,
        rank: a.rank,
        seed: a.seed,
    })?;
    eprintln!(
        "wrote {}/global and {} client adapters ({tensors} tensors each)",
        a.out.display(),
        a.clients
    );
    Ok(())
}

/// Loads the global adapter and rejects NaN/Inf in it, so that no client is blamed for it
/// and no rule copies it into an output.
fn load_global(path: &Path) -> Result<crate::io::Adapter> {
    let global = load_adapter(path)?;
    for t in &global.tensors {
        if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
            anyhow::bail!(
                "global adapter {}: tensor {:?} holds a non-finite value at index {i}",
                path.display(),
                t.name
            );
        }
    }
    Ok(global)
}

pub fn cmd_aggregate(a: AggregateArgs) -> Result<()> {
    let algorithm = a.algorithm.algorithm();
    let opts = StrategyOptions {
        server: a
            .settings()
            .options(algorithm, std::io::stderr().is_terminal())?,
        fedprox_mu: 0.0,
    };
    let mut strategy = for_algorithm(algorithm, &opts);
    let global = load_global(&a.global)?;
    let mut clients = FileClients {
        global: &global,
        specs: a
            .clients
            .iter()
            .map(|c| (c.path.clone(), c.samples))
            .collect(),
    };
    if let Some(p) = a.state.as_ref().filter(|p| p.exists()) {
        *strategy.state_mut() = ServerStateStore::load(p, strategy.state())?;
    }
    let round = ServerRound {
        round: 0,
        total_clients: clients.specs.len(),
        model: None,
    };
    let step = strategy.aggregate_train(&global, &mut clients, &round)?;
    let report = step.report;
    let NextGlobal::Adapter(tensors) = step.next else {
        bail!("internal: {} replaced the base model", algorithm.name());
    };
    let state = strategy.state();
    let rounds: std::collections::BTreeSet<u32> =
        report.clients.iter().filter_map(|c| c.round).collect();
    if rounds.len() > 1 {
        eprintln!("warning: the uploads come from different rounds: {rounds:?}");
    }
    save_adapter(&a.out, &tensors, global.config.as_ref())?;
    if let Some(p) = &a.state {
        state.save(p)?;
    }
    eprintln!(
        "{}: {} clients, {} tensors aggregated, {} kept from the global -> {}",
        algorithm.name(),
        report.clients.len(),
        report.tensors_aggregated,
        report.tensors_kept,
        a.out.display()
    );
    if global.config.is_none() {
        eprintln!(
            "note: {} has no adapter_config.json; the output holds only the weights",
            a.global.display()
        );
    }
    for (i, c) in report.clients.iter().enumerate() {
        let agree = report.mean_agreement[i]
            .map(|v| format!("  mean agreement v={v:+.4}"))
            .unwrap_or_default();
        eprintln!(
            "  {}  p={:.4}  {} bytes{agree}",
            c.label, report.sample_weights[i], c.bytes
        );
    }
    if report.fallbacks > 0 {
        eprintln!(
            "  {} tensors had no positive agreement and used p_i weights",
            report.fallbacks
        );
    }
    if let Some(path) = &a.report {
        let json = serde_json::json!({
            "algorithm": algorithm.name(),
            "server_steps": state.steps,
            "tensors_aggregated": report.tensors_aggregated,
            "tensors_kept": report.tensors_kept,
            "fedcdd_fallbacks": report.fallbacks,
            "clients": report.clients.iter().enumerate().map(|(i, c)| serde_json::json!({
                "source": c.source.display().to_string(),
                "client_id": c.client_id,
                "samples": c.samples,
                "weight": report.sample_weights[i],
                "mean_agreement": report.mean_agreement[i],
                "bytes": c.bytes,
            })).collect::<Vec<_>>(),
        });
        write_json(path, &json)?;
    }
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(value).context("cannot serialize JSON")?;
    text.push(b'\n');
    write_atomic(path, &text)
}

pub fn cmd_encode(a: EncodeArgs) -> Result<()> {
    let global = load_global(&a.global)?;
    let local = load_adapter(&a.local)?;
    let opts = EncodeOptions {
        mask: MaskConfig {
            keep_ratio: a.keep_ratio,
            noise_scale: a.noise_scale,
            importance: match a.importance {
                ImportanceArg::ColumnL2 => Importance::ColumnL2,
                ImportanceArg::ElementAbs => Importance::ElementAbs,
                ImportanceArg::RowL2 => Importance::RowL2,
            },
            axis: a.mask_axis,
        },
        seed: a.seed,
        round: a.round,
        client_id: a.client_id,
        samples: a.samples,
        dtype: a.dtype.map(|d| match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }),
        algorithm: a.algorithm.algorithm(),
    };
    let (bytes, summary) = encode_update(&global, &local, &opts)?;
    write_atomic(&a.out, &bytes)?;
    let kept: usize = summary.iter().map(|t| t.kept.len()).sum();
    let cols: usize = summary.iter().map(|t| t.columns).sum();
    eprintln!(
        "wrote {} ({} bytes): {} tensors, {kept} of {cols} columns kept",
        a.out.display(),
        bytes.len(),
        summary.len()
    );
    Ok(())
}

fn read_upload_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read upload {}", path.display()))
}

pub fn cmd_decode(a: DecodeArgs) -> Result<()> {
    let global = load_global(&a.global)?;
    let bytes = read_upload_file(&a.update)?;
    let update = decode_update(&bytes, &a.update, &global)?;
    let tensors = apply_update(&global, &update);
    save_adapter(&a.out, &tensors, global.config.as_ref())?;
    eprintln!(
        "wrote {} ({} tensors updated)",
        a.out.display(),
        update.deltas.len()
    );
    Ok(())
}

pub fn cmd_inspect(a: InspectArgs) -> Result<()> {
    let bytes = read_upload_file(&a.update)?;
    let src = a.update.display();
    let upload = parse_upload(&bytes, &a.update)?;
    let h = upload.header;
    let mut rows = Vec::new();
    let mut dense_equivalent = 0usize;
    for rec in upload.records() {
        let rec = rec.map_err(|e| anyhow::anyhow!("upload {src}: {e}"))?;
        dense_equivalent += rec.layout.len() * rec.dtype.size();
        let (kind, sigma, seed) = match rec.payload {
            Payload::Dense { .. } => ("dense", None, None),
            Payload::Masked { sigma, seed, .. } => ("masked", Some(sigma), Some(seed)),
        };
        let units = match rec.payload {
            Payload::Masked { importance, .. } => importance.units(&rec.layout).1,
            Payload::Dense { .. } => rec.layout.cols,
        };
        let shown = if a.full {
            rec.kept_count()
        } else {
            rec.kept_count().min(8)
        };
        let kept_idx: Vec<u32> = (0..shown).filter_map(|k| rec.kept_index(k)).collect();
        rows.push(serde_json::json!({
            "name": rec.name,
            "shape": rec.dims.iter().collect::<Vec<_>>(),
            "dtype": rec.dtype.name(),
            "kind": kind,
            "kept": rec.kept_count(),
            "columns": units,
            "kept_indices": kept_idx,
            "sigma": sigma,
            "seed": seed,
            "bytes": rec.encoded_len,
        }));
    }
    let mut text = String::new();
    if a.json {
        let json = serde_json::json!({
            "path": src.to_string(),
            "bytes": upload.byte_len,
            "dense_equivalent_bytes": dense_equivalent,
            "version": h.version,
            "round": h.round,
            "client_id": h.client_id,
            "num_samples": h.num_samples,
            "tensors": rows,
        });
        return print_stdout(&format!("{}\n", serde_json::to_string_pretty(&json)?));
    }
    writeln!(
        text,
        "{src}: fedcdd upload v{} ({} bytes, checksum ok)",
        h.version, upload.byte_len
    )?;
    writeln!(
        text,
        "round {}  client {}  samples {}  tensors {}",
        h.round, h.client_id, h.num_samples, h.num_tensors
    )?;
    writeln!(
        text,
        "size {} bytes vs {} bytes dense ({:.1}%)",
        upload.byte_len,
        dense_equivalent,
        100.0 * upload.byte_len as f64 / dense_equivalent.max(1) as f64
    )?;
    writeln!(
        text,
        "{:<64} {:>12} {:>5} {:>6} {:>11} {:>10} {:>9}  kept columns",
        "tensor", "shape", "dtype", "kind", "kept", "sigma", "bytes"
    )?;
    for r in &rows {
        let shape: Vec<String> = r["shape"]
            .as_array()
            .map(|a| a.iter().map(|d| d.to_string()).collect())
            .unwrap_or_default();
        let sigma = r["sigma"]
            .as_f64()
            .map(|s| format!("{s:.3e}"))
            .unwrap_or_else(|| "-".into());
        let idx: Vec<String> = r["kept_indices"]
            .as_array()
            .map(|a| a.iter().map(|d| d.to_string()).collect())
            .unwrap_or_default();
        let more = if r["kind"] == "masked" && idx.len() < r["kept"].as_u64().unwrap_or(0) as usize
        {
            ",…"
        } else {
            ""
        };
        let kept_list = if r["kind"] == "dense" {
            "all".to_string()
        } else {
            format!("{}{more}", idx.join(","))
        };
        writeln!(
            text,
            "{:<64} {:>12} {:>5} {:>6} {:>11} {:>10} {:>9}  {}",
            r["name"].as_str().unwrap_or(""),
            shape.join("x"),
            r["dtype"].as_str().unwrap_or(""),
            r["kind"].as_str().unwrap_or(""),
            format!("{}/{}", r["kept"], r["columns"]),
            sigma,
            r["bytes"],
            kept_list
        )?;
    }
    print_stdout(&text)
}
