//! The LLaMA decoder with LoRA, llm.c style: flat buffers, an explicit forward that saves what
//! backward needs, and an explicit backward over the LoRA parameters only (the base weights
//! are frozen, so no base-weight gradient is ever formed).

use anyhow::{Context, Result, bail};
use fedcdd_kernels::{
    AttnShape, Backend, Copy2d, LoraDims, LoraDropout, LossSum, RopeScaling, RopeShape, RopeTable,
    WeightDType, WeightSource,
};

use super::checkpoint::Checkpoint;
use super::config::LlamaConfig;
use super::lora::{LoraConfig, Proj, init_lora_a, peft_names};
use crate::io::Tensor;

/// Targets equal to this are ignored by the loss (PyTorch's convention).
pub const IGNORE_INDEX: i32 = -100;

/// Frozen weights of one decoder layer.
pub struct LayerWeights<B: Backend> {
    pub attn_norm: B::Weight,
    pub mlp_norm: B::Weight,
    /// Indexed by [`Proj::index`].
    pub proj: [B::Weight; 7],
}

/// The frozen base model on a backend.
pub struct Model<B: Backend> {
    pub config: LlamaConfig,
    pub embed: B::Weight,
    pub layers: Vec<LayerWeights<B>>,
    pub norm: B::Weight,
    /// `None` when the embeddings are tied (`lm_head` = `embed_tokens`).
    pub lm_head: Option<B::Weight>,
    /// RoPE cos/sin tables `[positions, head_dim/2]`.
    pub rope_cos: B::Buf,
    pub rope_sin: B::Buf,
    pub rope_positions: usize,
}

impl<B: Backend> Model<B> {
    /// Loads every base weight from a checkpoint (memory-mapped: CPU weights read the
    /// mapping in place) and checks each shape against the config.
    pub fn load(backend: &B, config: LlamaConfig, ckpt: &Checkpoint) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let w = |name: &str, shape: &[usize]| -> Result<B::Weight> {
            let src = ckpt.weight(name, shape)?;
            check_finite(&src)
                .with_context(|| format!("{}: tensor {name}", ckpt.origin().display()))?;
            backend
                .weight(&src)
                .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))
        };
        let embed = w("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let prefix = format!("model.layers.{l}");
            let proj = Proj::ALL.map(|p| {
                let (fin, fout) = p.dims(c);
                w(&format!("{prefix}.{}.weight", p.layer_path()), &[fout, fin])
            });
            let [q, k, v, o, gate, up, down] = proj;
            layers.push(LayerWeights {
                attn_norm: w(&format!("{prefix}.input_layernorm.weight"), &[h])?,
                mlp_norm: w(&format!("{prefix}.post_attention_layernorm.weight"), &[h])?,
                proj: [q?, k?, v?, o?, gate?, up?, down?],
            });
        }
        let norm = w("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(w("lm_head.weight", &[c.vocab_size, h])?)
        };
        let positions = c.max_position_embeddings.max(1);
        let table = RopeTable::new(c.head_dim, c.rope_theta, c.rope_scaling, positions);
        Ok(Model {
            rope_cos: backend.upload(&table.cos),
            rope_sin: backend.upload(&table.sin),
            rope_positions: positions,
            config,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    fn lm_head(&self) -> &B::Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

/// Rejects a weight holding NaN or ±inf (one bad value would silently poison every loss).
/// Integer tests on the exponent bits, in parallel: a pass over the mapping at load time.
fn check_finite(src: &WeightSource) -> Result<()> {
    use rayon::prelude::*;
    let bytes = &(*src.bytes).as_ref()[src.offset..src.offset + src.byte_len()];
    let bad = match src.dtype {
        WeightDType::F32 => bytes.par_chunks(1 << 16).position_first(|c| {
            c.chunks_exact(4)
                .any(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7F80_0000 == 0x7F80_0000)
        }),
        WeightDType::F16 | WeightDType::Bf16 => {
            let mask = if src.dtype == WeightDType::F16 {
                0x7C00
            } else {
                0x7F80
            };
            bytes.par_chunks(1 << 16).position_first(|c| {
                c.chunks_exact(2)
                    .any(|b| u16::from_le_bytes([b[0], b[1]]) & mask == mask)
            })
        }
    };
    match bad {
        Some(chunk) => bail!(
            "holds a NaN or infinite value (in bytes {}..{} of the tensor)",
            chunk << 16,
            ((chunk + 1) << 16).min(bytes.len())
        ),
        None => Ok(()),
    }
}

/// RoPE over `heads` heads of `c` for `seq` positions from `pos0`.
fn rope_shape(c: &LlamaConfig, batch: usize, seq: usize, heads: usize, pos0: usize) -> RopeShape {
    RopeShape {
        batch,
        seq,
        heads,
        head_dim: c.head_dim,
        pos0,
    }
}

/// The causal GQA attention of `c` over `q_len` queries starting at position `q_pos0`
/// against `kv_len` keys (rows `kv_stride` apart: the KV cache's capacity, or the sequence).
fn attention_shape(
    c: &LlamaConfig,
    batch: usize,
    q_len: usize,
    kv_len: usize,
    kv_stride: usize,
    q_pos0: usize,
) -> AttnShape {
    AttnShape {
        batch,
        q_len,
        kv_len,
        kv_stride,
        q_heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        q_pos0,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
    }
}

/// One LoRA module's parameters and gradients.
pub struct LoraModule<B: Backend> {
    pub a: B::Buf,
    pub b: B::Buf,
    pub da: B::Buf,
    pub db: B::Buf,
    pub in_features: usize,
    pub out_features: usize,
}

/// Every LoRA module of the model: `modules[layer][proj]`.
pub struct Lora<B: Backend> {
    pub config: LoraConfig,
    pub modules: Vec<[Option<LoraModule<B>>; 7]>,
}

impl<B: Backend> Lora<B> {
    /// No adapter at all: an empty target list (a zero-B LoRA would still cost compute).
    pub fn none(model: &LlamaConfig) -> Self {
        Lora {
            config: LoraConfig {
                r: 1,
                alpha: 1.0,
                dropout: 0.0,
                targets: vec![],
                rslora: false,
            },
            modules: (0..model.num_hidden_layers)
                .map(|_| std::array::from_fn(|_| None))
                .collect(),
        }
    }

    /// PEFT's init (A kaiming-uniform, B zero), deterministic from `seed`.
    pub fn init(backend: &B, model: &LlamaConfig, config: LoraConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let r = config.r;
        let mut modules = Vec::with_capacity(model.num_hidden_layers);
        for l in 0..model.num_hidden_layers {
            let layer = Proj::ALL.map(|p| {
                if !config.targets(p) {
                    return None;
                }
                let (fin, fout) = p.dims(model);
                let module_seed = seed
                    .wrapping_mul(0x100_0000_01B3)
                    .wrapping_add((l * 7 + p.index()) as u64);
                Some(LoraModule {
                    a: backend.upload(&init_lora_a(r, fin, module_seed)),
                    b: backend.zeros(fout * r),
                    da: backend.zeros(r * fin),
                    db: backend.zeros(fout * r),
                    in_features: fin,
                    out_features: fout,
                })
            });
            modules.push(layer);
        }
        Ok(Lora { config, modules })
    }

    /// Replaces the parameters with PEFT-named tensors (an adapter's); every module of this
    /// LoRA layout must be present with its exact shape, and nothing else.
    pub fn load_tensors(&mut self, backend: &B, tensors: &[Tensor], origin: &str) -> Result<()> {
        let r = self.config.r;
        let mut used = 0usize;
        for (l, layer) in self.modules.iter_mut().enumerate() {
            for p in Proj::ALL {
                let Some(m) = layer[p.index()].as_mut() else {
                    continue;
                };
                let (na, nb) = peft_names(l, p);
                for (name, dims, dst) in [
                    (&na, [r, m.in_features], &mut m.a),
                    (&nb, [m.out_features, r], &mut m.b),
                ] {
                    let t = tensors.iter().find(|t| &t.name == name).with_context(|| {
                        format!(
                            "{origin}: tensor {name} is missing (the adapter config targets it)"
                        )
                    })?;
                    if t.dims != dims {
                        bail!(
                            "{origin}: tensor {name} has shape {:?}, expected {:?}",
                            t.dims,
                            dims
                        );
                    }
                    if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
                        bail!("{origin}: tensor {name} holds a non-finite value at element {i}");
                    }
                    *dst = backend.upload(&t.data);
                    used += 1;
                }
            }
        }
        if used != tensors.len() {
            let extra: Vec<&str> = tensors
                .iter()
                .map(|t| t.name.as_str())
                .filter(|n| {
                    !(0..self.modules.len()).any(|l| {
                        Proj::ALL.iter().any(|&p| {
                            let (a, b) = peft_names(l, p);
                            self.config.targets(p) && (a == *n || b == *n)
                        })
                    })
                })
                .take(3)
                .collect();
            bail!("{origin}: tensors not in this LoRA layout: {extra:?}");
        }
        Ok(())
    }

    /// The parameters as PEFT-named f32 tensors (A `[r, in]`, B `[out, r]`).
    pub fn to_tensors(&self, backend: &B) -> Vec<Tensor> {
        let r = self.config.r;
        let mut out = Vec::new();
        for (l, layer) in self.modules.iter().enumerate() {
            for p in Proj::ALL {
                let Some(m) = layer[p.index()].as_ref() else {
                    continue;
                };
                let (na, nb) = peft_names(l, p);
                for (name, dims, buf) in [
                    (na, vec![r, m.in_features], &m.a),
                    (nb, vec![m.out_features, r], &m.b),
                ] {
                    let mut data = vec![0.0; dims[0] * dims[1]];
                    backend.download(buf, &mut data);
                    out.push(Tensor {
                        name,
                        dims,
                        dtype: fedcdd_core::DType::F32,
                        data,
                    });
                }
            }
        }
        out
    }

    /// Every (parameter, gradient) pair, in a fixed order.
    pub fn params_mut(&mut self) -> Vec<(&mut B::Buf, &mut B::Buf)> {
        let mut out = Vec::new();
        for layer in self.modules.iter_mut() {
            for m in layer.iter_mut().flatten() {
                out.push((&mut m.a, &mut m.da));
                out.push((&mut m.b, &mut m.db));
            }
        }
        out
    }

    pub fn zero_grads(&mut self, backend: &B) {
        for (_, g) in self.params_mut() {
            backend.fill(g, 0.0);
        }
    }

    pub fn num_parameters(&self) -> usize {
        let r = self.config.r;
        self.modules
            .iter()
            .flat_map(|l| l.iter().flatten())
            .map(|m| r * (m.in_features + m.out_features))
            .sum()
    }
}

/// What forward saves for backward, per layer.
struct LayerActs<B: Backend> {
    x_in: B::Buf,
    n1: B::Buf,
    rstd1: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    lse: B::Buf,
    x_mid: B::Buf,
    n2: B::Buf,
    rstd2: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    h: B::Buf,
    /// LoRA `u = x·Aᵀ` per projection.
    lora_u: [Option<B::Buf>; 7],
}

/// Activation and scratch buffers for one (batch, seq) shape; reused across steps.
pub struct Workspace<B: Backend> {
    pub batch: usize,
    pub seq: usize,
    layers: Vec<LayerActs<B>>,
    x_final: B::Buf,
    n_final: B::Buf,
    rstd_final: B::Buf,
    logits: B::Buf,
    row_loss: B::Buf,
    // backward scratch
    dx: B::Buf,
    dn: B::Buf,
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
    dattn: B::Buf,
    dh: B::Buf,
    dgate: B::Buf,
    dup: B::Buf,
    du_lora: B::Buf,
    /// Dropped-out LoRA inputs (forward recompute) and their gradients, one per input width.
    drops: DropBufs<B>,
}

/// Scratch for LoRA dropout: a (dropped x, its gradient) pair for each distinct input length.
pub struct DropBufs<B: Backend> {
    pairs: Vec<(B::Buf, B::Buf)>,
}

impl<B: Backend> DropBufs<B> {
    fn new(be: &B, lens: &[usize]) -> Self {
        let mut pairs: Vec<(B::Buf, B::Buf)> = Vec::new();
        for &n in lens {
            if !pairs.iter().any(|(x, _)| be.buf_len(x) == n) {
                pairs.push((be.zeros(n), be.zeros(n)));
            }
        }
        DropBufs { pairs }
    }

    fn get(&mut self, be: &B, len: usize) -> (&mut B::Buf, &mut B::Buf) {
        let i = self
            .pairs
            .iter()
            .position(|(x, _)| be.buf_len(x) == len)
            .unwrap_or_else(|| panic!("no dropout scratch of {len} floats"));
        let (x, dx) = &mut self.pairs[i];
        (x, dx)
    }
}

impl<B: Backend> Workspace<B> {
    pub fn new(backend: &B, c: &LlamaConfig, lora: &LoraConfig, batch: usize, seq: usize) -> Self {
        let m = batch * seq;
        let h = c.hidden_size;
        let qd = c.num_attention_heads * c.head_dim;
        let kvd = c.num_key_value_heads * c.head_dim;
        let i = c.intermediate_size;
        let z = |n: usize| backend.zeros(n);
        let layers = (0..c.num_hidden_layers)
            .map(|_| LayerActs {
                x_in: z(m * h),
                n1: z(m * h),
                rstd1: z(m),
                q: z(m * qd),
                k: z(m * kvd),
                v: z(m * kvd),
                attn: z(m * qd),
                lse: z(batch * c.num_attention_heads * seq),
                x_mid: z(m * h),
                n2: z(m * h),
                rstd2: z(m),
                gate: z(m * i),
                up: z(m * i),
                h: z(m * i),
                lora_u: Proj::ALL.map(|p| lora.targets(p).then(|| z(m * lora.r))),
            })
            .collect();
        Workspace {
            batch,
            seq,
            layers,
            x_final: z(m * h),
            n_final: z(m * h),
            rstd_final: z(m),
            logits: z(m * c.vocab_size),
            row_loss: z(m),
            dx: z(m * h),
            dn: z(m * h),
            dq: z(m * qd),
            dk: z(m * kvd),
            dv: z(m * kvd),
            dattn: z(m * qd),
            dh: z(m * i),
            dgate: z(m * i),
            dup: z(m * i),
            du_lora: z(m * lora.r),
            drops: if lora.dropout > 0.0 {
                DropBufs::new(backend, &[m * h, m * qd, m * i])
            } else {
                DropBufs { pairs: Vec::new() }
            },
        }
    }

    /// Per-row losses of the last forward (0 for ignored rows), `[batch·seq]`.
    pub fn row_loss(&self) -> &B::Buf {
        &self.row_loss
    }
}

/// Dropout seed of one LoRA module in one micro-step.
fn dropout_seed(step_seed: u64, layer: usize, p: Proj) -> u64 {
    step_seed
        ^ ((layer as u64) << 40 | (p.index() as u64) << 32).wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// What a forward does with LoRA dropout: `Some(seed)` in training, `None` in evaluation.
#[derive(Clone, Copy, Debug)]
pub struct Mode {
    pub dropout_seed: Option<u64>,
}

impl<B: Backend> LoraModule<B> {
    fn dims(&self, lcfg: &LoraConfig, m: usize) -> LoraDims {
        LoraDims {
            m,
            k: self.in_features,
            n: self.out_features,
            r: lcfg.r,
            scale: lcfg.scale(),
        }
    }
}

/// LoRA dropout of one module in this pass: `None` in evaluation or when p = 0.
fn lora_dropout(lcfg: &LoraConfig, dropout: Option<u64>) -> Option<LoraDropout> {
    dropout
        .filter(|_| lcfg.dropout > 0.0)
        .map(|seed| LoraDropout {
            p: lcfg.dropout,
            seed,
        })
}

/// `y = x·Wᵀ (+ scale·(drop(x)·Aᵀ)·Bᵀ)`, saving LoRA's `u`.
#[allow(clippy::too_many_arguments)]
fn project<B: Backend>(
    be: &B,
    w: &B::Weight,
    lora: Option<&LoraModule<B>>,
    lcfg: &LoraConfig,
    x: &B::Buf,
    y: &mut B::Buf,
    u: Option<&mut B::Buf>,
    drops: &mut DropBufs<B>,
    m: usize,
    dropout: Option<u64>,
) {
    be.linear_forward(x, w, y, m, false);
    if let (Some(lm), Some(u)) = (lora, u) {
        let d = lm.dims(lcfg, m);
        match lora_dropout(lcfg, dropout) {
            Some(drop) => {
                let (scratch, _) = drops.get(be, be.buf_len(x));
                be.lora_forward_dropout(x, drop, scratch, &lm.a, &lm.b, d, u, y)
            }
            None => be.lora_forward(x, &lm.a, &lm.b, d, u, y),
        }
    }
}

/// Backward of [`project`]: `dx (+)= dy·W + LoRA's path`, LoRA grads accumulated.
#[allow(clippy::too_many_arguments)]
fn project_backward<B: Backend>(
    be: &B,
    w: &B::Weight,
    lora: Option<&mut LoraModule<B>>,
    lcfg: &LoraConfig,
    x: &B::Buf,
    u: Option<&B::Buf>,
    dy: &B::Buf,
    dx: &mut B::Buf,
    accumulate: bool,
    ws_du: &mut B::Buf,
    drops: &mut DropBufs<B>,
    m: usize,
    dropout: Option<u64>,
) {
    be.linear_backward_input(dy, w, dx, m, accumulate);
    if let (Some(lm), Some(u)) = (lora, u) {
        let d = lm.dims(lcfg, m);
        let LoraModule { a, b, da, db, .. } = lm;
        match lora_dropout(lcfg, dropout) {
            Some(drop) => {
                // the gradient reaches x through the same mask
                let (sx, sdx) = drops.get(be, be.buf_len(x));
                be.lora_backward_dropout(x, drop, sx, sdx, a, b, u, dy, d, da, db, ws_du, dx);
            }
            None => be.lora_backward(x, a, b, u, dy, d, da, db, ws_du, Some(dx)),
        }
    }
}

fn check_ids(ids: &[i32], vocab: usize, what: &str) -> Result<()> {
    if let Some((i, &t)) = ids
        .iter()
        .enumerate()
        .find(|&(_, &t)| t < 0 || t as usize >= vocab)
    {
        bail!("{what}: token {t} at position {i} is outside the vocabulary (size {vocab})");
    }
    Ok(())
}

/// Forward over a `[batch, seq]` batch: fills `ws` (saved activations, logits, per-row
/// losses) and returns the loss sum and target count. With `grad_scale`, the logits buffer
/// is left holding `grad_scale · ∂loss_sum/∂logits` for [`backward`].
#[allow(clippy::too_many_arguments)]
pub fn forward<B: Backend>(
    be: &B,
    model: &Model<B>,
    lora: &Lora<B>,
    ws: &mut Workspace<B>,
    ids: &[i32],
    targets: &[i32],
    mode: Mode,
    grad_scale: Option<f32>,
) -> Result<LossSum> {
    let c = &model.config;
    let (batch, seq) = (ws.batch, ws.seq);
    let m = batch * seq;
    if ids.len() != m || targets.len() != m {
        bail!(
            "batch holds {} ids and {} targets, the workspace is {batch}x{seq}",
            ids.len(),
            targets.len()
        );
    }
    if seq > model.rope_positions {
        bail!(
            "sequence length {seq} exceeds max_position_embeddings {}",
            model.rope_positions
        );
    }
    check_ids(ids, c.vocab_size, "input ids")?;
    if let Some((i, &t)) = targets
        .iter()
        .enumerate()
        .find(|&(_, &t)| t != IGNORE_INDEX && (t < 0 || t as usize >= c.vocab_size))
    {
        bail!(
            "target {t} at position {i} is outside the vocabulary (size {})",
            c.vocab_size
        );
    }
    let h = c.hidden_size;
    let ids_buf = be.upload_ids(ids);
    let lcfg = &lora.config;
    let mut x = be.zeros(0);
    std::mem::swap(&mut x, &mut ws.dx); // reuse dx as the running residual during forward
    be.embedding_forward(&model.embed, &ids_buf, &mut x);
    let attn_shape = attention_shape(c, batch, seq, seq, seq, 0);
    for (l, (lw, la)) in model.layers.iter().zip(ws.layers.iter_mut()).enumerate() {
        let lm = &lora.modules[l];
        let seed = |p: Proj| mode.dropout_seed.map(|s| dropout_seed(s, l, p));
        // y = x·Wᵀ (+ LoRA) for projection p, saving LoRA's u
        let mut run = |p: Proj, x: &B::Buf, y: &mut B::Buf| {
            let i = p.index();
            let u = la.lora_u[i].as_mut();
            project(
                be,
                &lw.proj[i],
                lm[i].as_ref(),
                lcfg,
                x,
                y,
                u,
                &mut ws.drops,
                m,
                seed(p),
            )
        };
        be.copy_2d(&x, &mut la.x_in, flat(m * h));
        be.rmsnorm_forward(
            &x,
            &lw.attn_norm,
            &mut la.n1,
            &mut la.rstd1,
            m,
            h,
            c.rms_norm_eps as f32,
        );
        for (p, out) in [
            (Proj::Q, &mut la.q),
            (Proj::K, &mut la.k),
            (Proj::V, &mut la.v),
        ] {
            run(p, &la.n1, out);
        }
        let rope = |heads| rope_shape(c, batch, seq, heads, 0);
        be.rope(
            &mut la.q,
            &model.rope_cos,
            &model.rope_sin,
            rope(c.num_attention_heads),
            false,
        );
        be.rope(
            &mut la.k,
            &model.rope_cos,
            &model.rope_sin,
            rope(c.num_key_value_heads),
            false,
        );
        be.attention_forward(&la.q, &la.k, &la.v, &mut la.attn, &mut la.lse, attn_shape);
        run(Proj::O, &la.attn, &mut ws.dn);
        be.axpy(&mut x, 1.0, &ws.dn);
        be.copy_2d(&x, &mut la.x_mid, flat(m * h));
        be.rmsnorm_forward(
            &x,
            &lw.mlp_norm,
            &mut la.n2,
            &mut la.rstd2,
            m,
            h,
            c.rms_norm_eps as f32,
        );
        for (p, out) in [(Proj::Gate, &mut la.gate), (Proj::Up, &mut la.up)] {
            run(p, &la.n2, out);
        }
        be.swiglu_forward(&la.gate, &la.up, &mut la.h);
        run(Proj::Down, &la.h, &mut ws.dn);
        be.axpy(&mut x, 1.0, &ws.dn);
    }
    be.copy_2d(&x, &mut ws.x_final, flat(m * h));
    std::mem::swap(&mut x, &mut ws.dx);
    be.rmsnorm_forward(
        &ws.x_final,
        &model.norm,
        &mut ws.n_final,
        &mut ws.rstd_final,
        m,
        h,
        c.rms_norm_eps as f32,
    );
    be.linear_forward(&ws.n_final, model.lm_head(), &mut ws.logits, m, false);
    let targets_buf = be.upload_ids(targets);
    Ok(be.cross_entropy(
        &mut ws.logits,
        &targets_buf,
        &mut ws.row_loss,
        c.vocab_size,
        IGNORE_INDEX,
        grad_scale,
    ))
}

fn flat(len: usize) -> Copy2d {
    Copy2d {
        count: 1,
        len,
        src_offset: 0,
        src_stride: 0,
        dst_offset: 0,
        dst_stride: 0,
    }
}

/// Backward of the last [`forward`] (which must have been called with `grad_scale`):
/// accumulates every LoRA gradient into `lora`.
pub fn backward<B: Backend>(
    be: &B,
    model: &Model<B>,
    lora: &mut Lora<B>,
    ws: &mut Workspace<B>,
    mode: Mode,
) {
    let c = &model.config;
    let (batch, seq) = (ws.batch, ws.seq);
    let m = batch * seq;
    let h = c.hidden_size;
    let lcfg = lora.config.clone();
    // d(final norm output) = dlogits · W_lm
    be.linear_backward_input(&ws.logits, model.lm_head(), &mut ws.dn, m, false);
    be.rmsnorm_backward(
        &ws.dn,
        &ws.x_final,
        &model.norm,
        &ws.rstd_final,
        &mut ws.dx,
        m,
        h,
        false,
    );
    let attn_shape = attention_shape(c, batch, seq, seq, seq, 0);
    for l in (0..model.layers.len()).rev() {
        let lw = &model.layers[l];
        let la = &ws.layers[l];
        let lm = &mut lora.modules[l];
        let seed = |p: Proj| mode.dropout_seed.map(|s| dropout_seed(s, l, p));
        // dx (+)= dy·W (+ LoRA) for projection p whose input was x; LoRA grads accumulate
        let mut back = |p: Proj, x: &B::Buf, dy: &B::Buf, dx: &mut B::Buf, acc: bool| {
            let i = p.index();
            let (w, u) = (&lw.proj[i], la.lora_u[i].as_ref());
            let (du, drops) = (&mut ws.du_lora, &mut ws.drops);
            project_backward(
                be,
                w,
                lm[i].as_mut(),
                &lcfg,
                x,
                u,
                dy,
                dx,
                acc,
                du,
                drops,
                m,
                seed(p),
            )
        };
        // MLP: x_out = x_mid + down(swiglu(gate(n2), up(n2)))
        back(Proj::Down, &la.h, &ws.dx, &mut ws.dh, false);
        be.swiglu_backward(&la.gate, &la.up, &ws.dh, &mut ws.dgate, &mut ws.dup);
        back(Proj::Gate, &la.n2, &ws.dgate, &mut ws.dn, false);
        back(Proj::Up, &la.n2, &ws.dup, &mut ws.dn, true);
        be.rmsnorm_backward(
            &ws.dn,
            &la.x_mid,
            &lw.mlp_norm,
            &la.rstd2,
            &mut ws.dx,
            m,
            h,
            true,
        );
        // Attention: x_mid = x_in + o(attn(rope(q(n1)), rope(k(n1)), v(n1)))
        back(Proj::O, &la.attn, &ws.dx, &mut ws.dattn, false);
        be.attention_backward(
            &la.q, &la.k, &la.v, &la.attn, &la.lse, &ws.dattn, &mut ws.dq, &mut ws.dk, &mut ws.dv,
            attn_shape,
        );
        let rope = |heads| rope_shape(c, batch, seq, heads, 0);
        be.rope(
            &mut ws.dq,
            &model.rope_cos,
            &model.rope_sin,
            rope(c.num_attention_heads),
            true,
        );
        be.rope(
            &mut ws.dk,
            &model.rope_cos,
            &model.rope_sin,
            rope(c.num_key_value_heads),
            true,
        );
        let mut first = true;
        for (p, dy) in [(Proj::Q, &ws.dq), (Proj::K, &ws.dk), (Proj::V, &ws.dv)] {
            back(p, &la.n1, dy, &mut ws.dn, !first);
            first = false;
        }
        // The embedding is frozen: layer 0's input gradient is never used.
        if l > 0 {
            be.rmsnorm_backward(
                &ws.dn,
                &la.x_in,
                &lw.attn_norm,
                &la.rstd1,
                &mut ws.dx,
                m,
                h,
                true,
            );
        }
    }
}

/// Key/value cache for generation: `[1, capacity, kv_heads, head_dim]` per layer.
/// The keys and values of `batch` sequences that advance in step (all at position `len`):
/// per layer `[batch, capacity, kv_heads · head_dim]`.
pub struct KvCache<B: Backend> {
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
    pub batch: usize,
    pub capacity: usize,
    pub len: usize,
}

impl<B: Backend> KvCache<B> {
    /// A cache of one sequence.
    pub fn new(be: &B, c: &LlamaConfig, capacity: usize) -> Self {
        Self::batched(be, c, 1, capacity)
    }

    /// A cache of `batch` sequences of up to `capacity` tokens each.
    pub fn batched(be: &B, c: &LlamaConfig, batch: usize, capacity: usize) -> Self {
        let n = batch * capacity * c.num_key_value_heads * c.head_dim;
        KvCache {
            k: (0..c.num_hidden_layers).map(|_| be.zeros(n)).collect(),
            v: (0..c.num_hidden_layers).map(|_| be.zeros(n)).collect(),
            batch,
            capacity,
            len: 0,
        }
    }
}

/// Runs `ids` (one sequence) through the model on top of the cache and returns the logits
/// of the last position (`[vocab]`). LoRA is applied unmerged, without dropout.
pub fn forward_cached<B: Backend>(
    be: &B,
    model: &Model<B>,
    lora: Option<&Lora<B>>,
    cache: &mut KvCache<B>,
    ids: &[i32],
) -> Result<Vec<f32>> {
    forward_cached_batch(be, model, lora, cache, ids)
}

/// Runs `ids` (`cache.batch` sequences of the same length, row after row) through the model
/// on top of the cache and returns the logits of each row's last position
/// (`[batch, vocab]`). LoRA is applied unmerged, without dropout.
pub fn forward_cached_batch<B: Backend>(
    be: &B,
    model: &Model<B>,
    lora: Option<&Lora<B>>,
    cache: &mut KvCache<B>,
    ids: &[i32],
) -> Result<Vec<f32>> {
    let c = &model.config;
    let b = cache.batch;
    if ids.is_empty() || b == 0 || !ids.len().is_multiple_of(b) {
        bail!(
            "{} tokens do not split into {b} sequences of one length",
            ids.len()
        );
    }
    let t = ids.len() / b;
    let pos0 = cache.len;
    if pos0 + t > cache.capacity || pos0 + t > model.rope_positions {
        bail!(
            "the sequence would reach {} tokens, beyond the cache ({}) or max_position_embeddings ({})",
            pos0 + t,
            cache.capacity,
            model.rope_positions
        );
    }
    check_ids(ids, c.vocab_size, "prompt")?;
    let h = c.hidden_size;
    let qd = c.num_attention_heads * c.head_dim;
    let kvd = c.num_key_value_heads * c.head_dim;
    let i_dim = c.intermediate_size;
    let default_cfg;
    let lcfg = match lora {
        Some(l) => &l.config,
        None => {
            default_cfg = LoraConfig {
                r: 1,
                alpha: 1.0,
                dropout: 0.0,
                targets: vec![],
                rslora: false,
            };
            &default_cfg
        }
    };
    let z = |n: usize| be.zeros(n);
    let m = b * t;
    let (mut x, mut n1, mut rstd, mut q, mut k, mut v) =
        (z(m * h), z(m * h), z(m), z(m * qd), z(m * kvd), z(m * kvd));
    let (mut attn, mut lse, mut tmp) = (z(m * qd), z(c.num_attention_heads * m), z(m * h));
    let (mut gate, mut up, mut hbuf) = (z(m * i_dim), z(m * i_dim), z(m * i_dim));
    let mut u = z(m * lcfg.r);
    let mut unused = DropBufs { pairs: Vec::new() };
    be.embedding_forward(&model.embed, &be.upload_ids(ids), &mut x);
    let shape = attention_shape(c, b, t, pos0 + t, cache.capacity, pos0);
    let eps = c.rms_norm_eps as f32;
    for (l, lw) in model.layers.iter().enumerate() {
        let lm = lora.map(|lr| &lr.modules[l]);
        let module = |p: Proj| lm.and_then(|m| m[p.index()].as_ref());
        let mut run = |p: Proj, x: &B::Buf, y: &mut B::Buf, u: &mut B::Buf| {
            let module = module(p);
            project(
                be,
                &lw.proj[p.index()],
                module,
                lcfg,
                x,
                y,
                module.map(|_| u),
                &mut unused,
                m,
                None,
            )
        };
        be.rmsnorm_forward(&x, &lw.attn_norm, &mut n1, &mut rstd, m, h, eps);
        run(Proj::Q, &n1, &mut q, &mut u);
        run(Proj::K, &n1, &mut k, &mut u);
        run(Proj::V, &n1, &mut v, &mut u);
        let rope = |heads| rope_shape(c, b, t, heads, pos0);
        be.rope(
            &mut q,
            &model.rope_cos,
            &model.rope_sin,
            rope(c.num_attention_heads),
            false,
        );
        be.rope(
            &mut k,
            &model.rope_cos,
            &model.rope_sin,
            rope(c.num_key_value_heads),
            false,
        );
        let into_cache = Copy2d {
            count: b,
            len: t * kvd,
            src_offset: 0,
            src_stride: t * kvd,
            dst_offset: pos0 * kvd,
            dst_stride: cache.capacity * kvd,
        };
        be.copy_2d(&k, &mut cache.k[l], into_cache);
        be.copy_2d(&v, &mut cache.v[l], into_cache);
        be.attention_forward(&q, &cache.k[l], &cache.v[l], &mut attn, &mut lse, shape);
        run(Proj::O, &attn, &mut tmp, &mut u);
        be.axpy(&mut x, 1.0, &tmp);
        be.rmsnorm_forward(&x, &lw.mlp_norm, &mut n1, &mut rstd, m, h, eps);
        run(Proj::Gate, &n1, &mut gate, &mut u);
        run(Proj::Up, &n1, &mut up, &mut u);
        be.swiglu_forward(&gate, &up, &mut hbuf);
        run(Proj::Down, &hbuf, &mut tmp, &mut u);
        be.axpy(&mut x, 1.0, &tmp);
    }
    cache.len = pos0 + t;
    // Each row's last position.
    let mut last = z(b * h);
    be.copy_2d(
        &x,
        &mut last,
        Copy2d {
            count: b,
            len: h,
            src_offset: (t - 1) * h,
            src_stride: t * h,
            dst_offset: 0,
            dst_stride: h,
        },
    );
    let mut normed = z(b * h);
    let mut r1 = z(b);
    be.rmsnorm_forward(&last, &model.norm, &mut normed, &mut r1, b, h, eps);
    let mut logits = z(b * c.vocab_size);
    be.linear_forward(&normed, model.lm_head(), &mut logits, b, false);
    let mut out = vec![0.0; b * c.vocab_size];
    be.download(&logits, &mut out);
    Ok(out)
}

/// The RoPE scaling in words, for reports.
pub fn describe_rope(s: RopeScaling) -> String {
    match s {
        RopeScaling::None => "default".into(),
        RopeScaling::Linear { factor } => format!("linear x{factor}"),
        RopeScaling::Llama3 { factor, .. } => format!("llama3 x{factor}"),
    }
}
