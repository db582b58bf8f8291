//! LoRA layout: which projections carry adapters, PEFT's names, shapes, scaling and init.

use anyhow::{Result, bail};

use crate::rng::Rng;

use super::config::LlamaConfig;

/// The seven projections of a LLaMA decoder layer, in PEFT's target-module names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// PEFT's `target_modules` entry.
    pub fn module_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// Path inside a decoder layer (`self_attn.q_proj`, `mlp.down_proj`).
    pub fn layer_path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// Accepts `q`, `q_proj`, `gate`, `gate_proj`, ...
    pub fn parse(name: &str) -> Option<Proj> {
        let short = name.trim().strip_suffix("_proj").unwrap_or(name.trim());
        Some(match short {
            "q" => Proj::Q,
            "k" => Proj::K,
            "v" => Proj::V,
            "o" => Proj::O,
            "gate" => Proj::Gate,
            "up" => Proj::Up,
            "down" => Proj::Down,
            _ => return None,
        })
    }

    /// `(in_features, out_features)` of this projection.
    pub fn dims(self, c: &LlamaConfig) -> (usize, usize) {
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        match self {
            Proj::Q => (c.hidden_size, q),
            Proj::K | Proj::V => (c.hidden_size, kv),
            Proj::O => (q, c.hidden_size),
            Proj::Gate | Proj::Up => (c.hidden_size, c.intermediate_size),
            Proj::Down => (c.intermediate_size, c.hidden_size),
        }
    }
}

/// Parses a comma-separated target list (`q,k,v,o,gate,up,down`, `all`, PEFT names).
pub fn parse_targets(list: &str) -> Result<Vec<Proj>> {
    let mut out = Vec::new();
    if list.trim().is_empty() {
        bail!("the LoRA target list is empty; give some of q,k,v,o,gate,up,down");
    }
    for item in list.split(',').map(str::trim) {
        if item.is_empty() {
            bail!("the LoRA target list {list:?} has an empty item (a doubled or trailing comma?)");
        }
        if item == "all" || item == "all-linear" {
            return Ok(Proj::ALL.to_vec());
        }
        match Proj::parse(item) {
            Some(p) if !out.contains(&p) => out.push(p),
            Some(_) => {}
            None => bail!(
                "unknown LoRA target module {item:?}; expected some of q,k,v,o,gate,up,down (or all)"
            ),
        }
    }
    out.sort();
    Ok(out)
}

/// PEFT `LoraConfig` fields that change the math.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub targets: Vec<Proj>,
    pub rslora: bool,
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("LoRA rank r must be at least 1");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!("lora_alpha must be a positive number, got {}", self.alpha);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("lora_dropout must be in [0, 1), got {}", self.dropout);
        }
        if self.targets.is_empty() {
            bail!("no LoRA target modules");
        }
        Ok(())
    }

    /// PEFT's scaling: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }

    pub fn targets(&self, p: Proj) -> bool {
        self.targets.contains(&p)
    }

    /// `adapter_config.json` as PEFT writes it.
    pub fn to_peft_json(&self, base_model: &str) -> serde_json::Value {
        let modules: Vec<&str> = self.targets.iter().map(|p| p.module_name()).collect();
        serde_json::json!({
            "base_model_name_or_path": base_model,
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": json_f32(self.alpha),
            "lora_dropout": json_f32(self.dropout),
            "target_modules": modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "use_rslora": self.rslora,
            "use_dora": false,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null
        })
    }

    /// Reads the fields that matter from a PEFT `adapter_config.json`; rejects what this
    /// engine does not implement (DoRA, bias, per-module ranks, fan_in_fan_out).
    pub fn from_peft_json(v: &serde_json::Value, origin: &str) -> Result<Self> {
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        if let Some(t) = get("peft_type").and_then(|t| t.as_str())
            && t != "LORA"
        {
            bail!("{origin}: peft_type is {t:?}; only LORA adapters are supported");
        }
        let r = get("r")
            .and_then(|x| x.as_u64())
            .ok_or_else(|| anyhow::anyhow!("{origin}: missing or non-integer \"r\""))?
            as usize;
        let alpha = get("lora_alpha")
            .and_then(|x| x.as_f64())
            .ok_or_else(|| anyhow::anyhow!("{origin}: missing or non-numeric \"lora_alpha\""))?
            as f32;
        let dropout = get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32;
        let rslora = get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false);
        for (key, bad) in [("use_dora", true), ("fan_in_fan_out", true)] {
            if get(key).and_then(|x| x.as_bool()) == Some(bad) {
                bail!("{origin}: {key} = true is not supported");
            }
        }
        if let Some(b) = get("bias").and_then(|x| x.as_str())
            && b != "none"
        {
            bail!("{origin}: bias = {b:?} is not supported (only \"none\")");
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if let Some(m) = get(key).and_then(|x| x.as_object())
                && !m.is_empty()
            {
                bail!("{origin}: a non-empty {key} is not supported");
            }
        }
        let targets = match get("target_modules") {
            Some(serde_json::Value::Array(items)) => {
                let names: Vec<&str> = items.iter().filter_map(|x| x.as_str()).collect();
                parse_targets(&names.join(","))
                    .map_err(|e| anyhow::anyhow!("{origin}: target_modules: {e}"))?
            }
            Some(serde_json::Value::String(s)) if s == "all-linear" => Proj::ALL.to_vec(),
            _ => bail!("{origin}: target_modules must be a list of module names"),
        };
        let cfg = LoraConfig {
            r,
            alpha,
            dropout,
            targets,
            rslora,
        };
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        Ok(cfg)
    }
}

/// An f32 as the decimal it was written as (0.05, not 0.05000000074505806).
fn json_f32(v: f32) -> serde_json::Value {
    match v.to_string().parse::<f64>() {
        Ok(d) => serde_json::json!(d),
        Err(_) => serde_json::json!(v),
    }
}

/// PEFT's tensor names for layer `layer`, projection `p`: (lora_A, lora_B).
pub fn peft_names(layer: usize, p: Proj) -> (String, String) {
    let base = format!("base_model.model.model.layers.{layer}.{}", p.layer_path());
    (
        format!("{base}.lora_A.weight"),
        format!("{base}.lora_B.weight"),
    )
}

/// PEFT's default init for one module: A ~ kaiming_uniform(a = √5) over fan_in = in_features
/// (i.e. U(−1/√in, 1/√in)), B = 0. Deterministic from `seed`.
pub fn init_lora_a(r: usize, in_features: usize, seed: u64) -> Vec<f32> {
    let bound = 1.0 / (in_features as f64).sqrt();
    // A SplitMix64 stream → uniform in [−bound, bound).
    let mut rng = Rng::new(seed ^ 0x6A09_E667_F3BC_C909);
    (0..r * in_features)
        .map(|_| ((2.0 * rng.unit() - 1.0) * bound) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_lists_parse_and_typos_are_errors() {
        let p = parse_targets("v, q_proj,q").expect("valid list");
        assert_eq!(p, vec![Proj::Q, Proj::V]);
        assert_eq!(parse_targets("all").expect("all"), Proj::ALL.to_vec());
        for bad in ["", " ", "q,,v", "q,", "qq", "lm_head"] {
            assert!(parse_targets(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn adapter_config_keeps_the_decimals_given() {
        let cfg = LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: vec![Proj::Q],
            rslora: false,
        };
        let v = cfg.to_peft_json("m");
        assert_eq!(v["lora_dropout"].as_f64(), Some(0.05));
        assert_eq!(v["lora_alpha"].as_f64(), Some(16.0));
        let back = LoraConfig::from_peft_json(&v, "test").expect("round trip");
        assert_eq!(back, cfg);
    }
}
