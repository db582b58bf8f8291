//! `fedcdd merge`: fold a PEFT LoRA adapter into its base model (`W + scale · B·A`) and write
//! an HF model directory, streaming tensor by tensor (the base stays memory-mapped).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fedcdd_kernels::WeightDType;

use crate::io::{Tensor, load_adapter};

use super::checkpoint::{
    Checkpoint, TensorData, TensorToWrite, WriteOptions, decode_into, write_checkpoint,
};
use super::config::LlamaConfig;
use super::lora::{LoraConfig, Proj, peft_names};

/// What `fedcdd merge` folds into what.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Base HF LLaMA model directory.
    pub model: PathBuf,
    /// PEFT LoRA adapter directory to fold in.
    pub adapter: PathBuf,
    /// Output HF model directory (config, merged weights, tokenizer files).
    pub out: PathBuf,
    /// Storage dtype of the merged weights (default: the base checkpoint's).
    pub dtype: Option<WeightDType>,
}

/// What a merge did.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    /// LoRA projections folded in.
    pub projections: usize,
    pub lora: LoraConfig,
}

/// Files copied unchanged from the base directory when present.
const COPIED: [&str; 5] = [
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// Whether `out` names the directory `model` (also through `./`, `..`, an absolute path or a
/// symlink).
fn same_dir(out: &Path, model: &Path) -> bool {
    if out == model {
        return true;
    }
    match (std::fs::canonicalize(out), std::fs::canonicalize(model)) {
        (Ok(o), Ok(m)) => o == m,
        _ => false,
    }
}

/// Runs `fedcdd merge`.
pub fn merge_adapter(a: &MergeOptions) -> Result<MergeSummary> {
    if same_dir(&a.out, &a.model) {
        bail!(
            "--out {} is the --model directory {}: the base is read while the merge is written; \
             choose another --out",
            a.out.display(),
            a.model.display()
        );
    }
    if a.out.exists() && !a.out.is_dir() {
        bail!("--out {} exists and is not a directory", a.out.display());
    }
    let config = LlamaConfig::load(&a.model)?;
    let ckpt = Checkpoint::open(&a.model)?;
    let adapter = load_adapter(&a.adapter)?;
    let origin = a.adapter.display().to_string();
    let lcfg = LoraConfig::from_peft_json(
        adapter
            .config
            .as_ref()
            .with_context(|| format!("{origin}: no adapter_config.json"))?,
        &origin,
    )?;
    let dtype = match a.dtype {
        Some(d) => d,
        None => checkpoint_dtype(&ckpt)?,
    };
    let merged = merge_lora_into(
        &a.model,
        &config,
        &ckpt,
        &lcfg,
        &adapter.tensors,
        &origin,
        &a.out,
        dtype,
    )?;
    Ok(MergeSummary {
        projections: merged,
        lora: lcfg,
    })
}

/// A `[r, in]`, B `[out, r]` and in_features of one targeted projection.
type LoraPair<'t> = (&'t [f32], &'t [f32], usize);

/// For a base tensor that the adapter targets: (A `[r, in]`, B `[out, r]`, in_features).
fn lora_pair<'t>(
    c: &LlamaConfig,
    lcfg: &LoraConfig,
    tensors: &'t [Tensor],
    name: &str,
    origin: &str,
) -> Result<Option<LoraPair<'t>>> {
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return Ok(None);
    };
    let Some((layer, path)) = rest.split_once('.') else {
        return Ok(None);
    };
    let Ok(layer) = layer.parse::<usize>() else {
        return Ok(None);
    };
    let Some(p) = Proj::ALL
        .into_iter()
        .find(|p| path == format!("{}.weight", p.layer_path()))
    else {
        return Ok(None);
    };
    if !lcfg.targets(p) || layer >= c.num_hidden_layers {
        return Ok(None);
    }
    let (fin, fout) = p.dims(c);
    let (na, nb) = peft_names(layer, p);
    let find = |n: &str, dims: [usize; 2]| -> Result<&'t [f32]> {
        let t = tensors
            .iter()
            .find(|t| t.name == n)
            .with_context(|| format!("{origin}: tensor {n} is missing"))?;
        if t.dims != dims {
            bail!(
                "{origin}: tensor {n} has shape {:?}, expected {dims:?}",
                t.dims
            );
        }
        if t.data.iter().any(|v| !v.is_finite()) {
            bail!("{origin}: tensor {n} holds a non-finite value");
        }
        Ok(&t.data)
    };
    Ok(Some((
        find(&na, [lcfg.r, fin])?,
        find(&nb, [fout, lcfg.r])?,
        fin,
    )))
}

fn copy_if_present(from: &Path, to: &Path) -> Result<()> {
    match std::fs::read(from) {
        Ok(bytes) => crate::io::write_atomic(to, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", from.display())),
    }
}

/// The storage dtype of a checkpoint (its first tensor's).
pub fn checkpoint_dtype(ckpt: &Checkpoint) -> Result<WeightDType> {
    let names = ckpt.names();
    names
        .first()
        .and_then(|n| ckpt.meta(n))
        .and_then(|m| m.dtype)
        .context("the base checkpoint's first tensor has no float dtype")
}

/// Writes `W + scale·B·A` for every projection the LoRA `tensors` (PEFT names, layout
/// `lcfg`) target, the other tensors unchanged, as an HF model directory `out` (config and
/// tokenizer files copied from `model_dir`). Returns the number of merged projections.
#[allow(clippy::too_many_arguments)]
pub fn merge_lora_into(
    model_dir: &Path,
    config: &LlamaConfig,
    ckpt: &Checkpoint,
    lcfg: &LoraConfig,
    tensors: &[Tensor],
    origin: &str,
    out: &Path,
    dtype: WeightDType,
) -> Result<usize> {
    let names = ckpt.names();
    let scale = lcfg.scale();
    let mut to_write = Vec::with_capacity(names.len());
    let mut merged = 0;
    for name in &names {
        let meta = ckpt
            .meta(name)
            .with_context(|| format!("tensor {name} vanished"))?;
        let lora = lora_pair(config, lcfg, tensors, name, origin)?;
        let data = match lora {
            None => {
                let (dt, _, bytes) = ckpt.raw(name)?;
                TensorData::Raw { dtype: dt, bytes }
            }
            Some((a_mat, b_mat, fin)) => {
                merged += 1;
                let (dt, _, bytes) = ckpt.raw(name)?;
                let esize = dt.size();
                let r = lcfg.r;
                TensorData::generate(move |start, out| {
                    // chunks hold whole rows: out = rows start/fin .. of W + scale·B·A
                    decode_into(dt, &bytes[start * esize..(start + out.len()) * esize], out);
                    for (i, row) in out.chunks_mut(fin).enumerate() {
                        let o = start / fin + i;
                        for k in 0..r {
                            let b = scale * b_mat[o * r + k];
                            let a_row = &a_mat[k * fin..(k + 1) * fin];
                            for (w, &av) in row.iter_mut().zip(a_row) {
                                *w += b * av;
                            }
                        }
                    }
                })
            }
        };
        to_write.push(TensorToWrite::new(name.clone(), meta.shape.clone(), data));
    }
    let expected = config.num_hidden_layers * lcfg.targets.len();
    if merged != expected {
        bail!("merged {merged} projections, expected {expected}: the base checkpoint lacks some");
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_checkpoint(out, to_write, WriteOptions::new(dtype))?;
    // to_json writes both "dtype" (transformers 5) and "torch_dtype" from this field.
    let mut out_config = config.clone();
    out_config.torch_dtype = Some(crate::model::checkpoint::torch_dtype_name(dtype).into());
    let mut text = serde_json::to_vec_pretty(&out_config.to_json())?;
    text.push(b'\n');
    crate::io::write_atomic(&out.join("config.json"), &text)?;
    for f in COPIED {
        copy_if_present(&model_dir.join(f), &out.join(f))?;
    }
    Ok(merged)
}
