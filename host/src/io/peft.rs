//! PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`) and bare
//! `.safetensors` adapters.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::atomic::write_atomic;
use super::safetensors::{Tensor, read_safetensors, write_safetensors};

/// File name of the weights inside a PEFT adapter directory.
pub const ADAPTER_MODEL_FILE: &str = "adapter_model.safetensors";
/// File name of the configuration inside a PEFT adapter directory.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// The pickled weights file older PEFT versions write; not supported.
pub(super) const ADAPTER_BIN_FILE: &str = "adapter_model.bin";

/// A loaded adapter: its tensors sorted by name, and its PEFT config when there is one.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// Sorted by name.
    pub tensors: Vec<Tensor>,
    /// `adapter_config.json` if present.
    pub config: Option<serde_json::Value>,
    /// The path the user gave (directory or file).
    pub path: PathBuf,
}

impl Adapter {
    /// The tensor called `name` (binary search over the sorted tensors).
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .and_then(|i| self.tensors.get(i))
    }
}

/// `path` is a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) or a
/// bare .safetensors file.
pub fn load_adapter(path: &Path) -> Result<Adapter> {
    let meta =
        fs::metadata(path).with_context(|| format!("cannot access adapter {}", path.display()))?;
    if !meta.is_dir() {
        let (tensors, _) = read_safetensors(path)?;
        return Ok(Adapter {
            tensors,
            config: None,
            path: path.to_path_buf(),
        });
    }

    let model = path.join(ADAPTER_MODEL_FILE);
    if !model.is_file() {
        if path.join(ADAPTER_BIN_FILE).exists() {
            bail!(
                "{}: only a pickled {ADAPTER_BIN_FILE} was found; pickled .bin adapters are not \
                 supported, re-save the adapter with `save_pretrained(..., \
                 safe_serialization=True)` to get {ADAPTER_MODEL_FILE}",
                path.display()
            );
        }
        bail!(
            "{}: no {ADAPTER_MODEL_FILE} in this directory (expected a PEFT adapter directory \
             or a .safetensors file)",
            path.display()
        );
    }
    let (tensors, _) = read_safetensors(&model)?;

    let config_path = path.join(ADAPTER_CONFIG_FILE);
    let config = if config_path.exists() {
        let text = fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
        Some(value)
    } else {
        None
    };

    Ok(Adapter {
        tensors,
        config,
        path: path.to_path_buf(),
    })
}

/// Writes `dir/adapter_model.safetensors` (metadata {"format": "pt"} as PEFT does) and, when
/// `config` is Some, `dir/adapter_config.json` (pretty JSON); creates `dir` if missing; each
/// file atomically.
pub fn save_adapter(
    dir: &Path,
    tensors: &[Tensor],
    config: Option<&serde_json::Value>,
) -> Result<()> {
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create adapter directory {}", dir.display()))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join(ADAPTER_MODEL_FILE), tensors, Some(metadata))?;
    if let Some(config) = config {
        let path = dir.join(ADAPTER_CONFIG_FILE);
        let mut text = serde_json::to_vec_pretty(config)
            .with_context(|| format!("cannot serialize JSON for {}", path.display()))?;
        text.push(b'\n');
        write_atomic(&path, &text)?;
    }
    Ok(())
}
