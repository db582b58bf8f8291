//! The explicit LoRA backward of the LLaMA graph against finite differences of its own
//! forward, on small random models (GQA, tied/untied, LoRA dropout on and off), on the plain
//! reference backend and the fast CPU path; and fast vs reference on the whole graph.

use fedcdd_host::model::config::LlamaConfig;
use fedcdd_host::model::llama::{self, LayerWeights, Lora, Mode, Model, Workspace};
use fedcdd_host::model::lora::{LoraConfig, Proj};
use fedcdd_kernels::{Backend, Cpu, RopeScaling, RopeTable, WeightSource};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.next().max(1e-12), self.next());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
    fn below(&mut self, n: usize) -> i32 {
        (self.next() * n as f64) as i32
    }
}

fn config(tied: bool, kv_heads: usize) -> LlamaConfig {
    let text = format!(
        r#"{{"model_type":"llama","vocab_size":37,"hidden_size":24,"intermediate_size":40,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":{kv_heads},
            "rms_norm_eps":1e-5,"rope_theta":10000.0,"max_position_embeddings":64,
            "tie_word_embeddings":{tied},"bos_token_id":1,"eos_token_id":2}}"#
    );
    LlamaConfig::from_json(&text, std::path::Path::new("test-config.json")).expect("config parses")
}

fn random_model<B: Backend>(be: &B, c: &LlamaConfig, rng: &mut Rng) -> Model<B> {
    let mut w = |rows: usize, cols: usize, scale: f32, offset: f32| {
        let v: Vec<f32> = rng
            .vec(rows * cols, scale)
            .into_iter()
            .map(|x| x + offset)
            .collect();
        be.weight(&WeightSource::from_f32(v, rows, cols))
            .expect("weight")
    };
    let h = c.hidden_size;
    let layers = (0..c.num_hidden_layers)
        .map(|_| LayerWeights {
            attn_norm: w(1, h, 0.1, 1.0),
            mlp_norm: w(1, h, 0.1, 1.0),
            proj: Proj::ALL.map(|p| {
                let (fin, fout) = p.dims(c);
                w(fout, fin, 0.3, 0.0)
            }),
        })
        .collect();
    let table = RopeTable::new(
        c.head_dim,
        c.rope_theta,
        RopeScaling::None,
        c.max_position_embeddings,
    );
    Model {
        embed: w(c.vocab_size, h, 0.5, 0.0),
        layers,
        norm: w(1, h, 0.1, 1.0),
        lm_head: (!c.tie_word_embeddings).then(|| w(c.vocab_size, h, 0.3, 0.0)),
        rope_cos: be.upload(&table.cos),
        rope_sin: be.upload(&table.sin),
        rope_positions: c.max_position_embeddings,
        config: c.clone(),
    }
}

fn lora_config(dropout: f32) -> LoraConfig {
    LoraConfig {
        r: 3,
        alpha: 6.0,
        dropout,
        targets: Proj::ALL.to_vec(),
        rslora: false,
    }
}

/// Random B too (PEFT's B = 0 would hide A's gradient).
fn random_lora<B: Backend>(be: &B, c: &LlamaConfig, cfg: LoraConfig, rng: &mut Rng) -> Lora<B> {
    let mut lora = Lora::init(be, c, cfg, 5).expect("lora");
    for (p, _) in lora.params_mut() {
        let n = be.buf_len(p);
        *p = be.upload(&rng.vec(n, 0.2));
    }
    lora
}

fn batch(c: &LlamaConfig, b: usize, t: usize, rng: &mut Rng) -> (Vec<i32>, Vec<i32>) {
    let ids: Vec<i32> = (0..b * t).map(|_| rng.below(c.vocab_size)).collect();
    let mut targets: Vec<i32> = (0..b * t).map(|_| rng.below(c.vocab_size)).collect();
    targets[0] = llama::IGNORE_INDEX;
    if b > 1 {
        targets[t + 2] = llama::IGNORE_INDEX;
    }
    (ids, targets)
}

fn params<B: Backend>(be: &B, lora: &mut Lora<B>) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut ps = Vec::new();
    let mut gs = Vec::new();
    for (p, g) in lora.params_mut() {
        let mut pv = vec![0.0; be.buf_len(p)];
        be.download(p, &mut pv);
        let mut gv = vec![0.0; be.buf_len(g)];
        be.download(g, &mut gv);
        ps.push(pv);
        gs.push(gv);
    }
    (ps, gs)
}

fn set_params<B: Backend>(be: &B, lora: &mut Lora<B>, values: &[Vec<f32>]) {
    for ((p, _), v) in lora.params_mut().into_iter().zip(values) {
        *p = be.upload(v);
    }
}

/// Directional derivative along a random direction: analytic vs central differences.
fn check_gradient<B: Backend>(be: &B, tied: bool, kv_heads: usize, dropout: f32) {
    let mut rng = Rng(7 + kv_heads as u64 + tied as u64 * 100);
    let c = config(tied, kv_heads);
    let model = random_model(be, &c, &mut rng);
    let mut lora = random_lora(be, &c, lora_config(dropout), &mut rng);
    let (b, t) = (2, 9);
    let (ids, targets) = batch(&c, b, t, &mut rng);
    let mut ws = Workspace::new(be, &c, &lora.config, b, t);
    let mode = Mode {
        dropout_seed: Some(99),
    };
    lora.zero_grads(be);
    let l = llama::forward(be, &model, &lora, &mut ws, &ids, &targets, mode, Some(1.0))
        .expect("forward");
    llama::backward(be, &model, &mut lora, &mut ws, mode);
    let (p0, grads) = params(be, &mut lora);
    let dir: Vec<Vec<f32>> = p0.iter().map(|p| rng.vec(p.len(), 1.0)).collect();
    let analytic: f64 = grads
        .iter()
        .zip(&dir)
        .flat_map(|(g, d)| g.iter().zip(d))
        .map(|(&g, &d)| g as f64 * d as f64)
        .sum();
    let h: f32 = std::env::var("FD_H")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5e-4);
    let mut loss_at = |sign: f32| {
        let shifted: Vec<Vec<f32>> = p0
            .iter()
            .zip(&dir)
            .map(|(p, d)| p.iter().zip(d).map(|(&x, &y)| x + sign * h * y).collect())
            .collect();
        set_params(be, &mut lora, &shifted);
        llama::forward(be, &model, &lora, &mut ws, &ids, &targets, mode, None)
            .expect("forward")
            .sum
    };
    let numeric = (loss_at(1.0) - loss_at(-1.0)) / (2.0 * h as f64);
    let err = (analytic - numeric).abs() / analytic.abs().max(1e-6);
    assert!(l.sum.is_finite());
    assert!(
        err < 2e-2,
        "{}: tied={tied} kv_heads={kv_heads} dropout={dropout}: analytic {analytic} vs finite differences {numeric} (rel {err:.2e})",
        be.name()
    );
}

#[test]
fn lora_gradients_match_finite_differences_reference_backend() {
    let be = Cpu::reference();
    check_gradient(&be, false, 2, 0.0);
    check_gradient(&be, true, 4, 0.0);
    check_gradient(&be, false, 1, 0.3);
}

#[test]
fn lora_gradients_match_finite_differences_fast_backend() {
    let be = Cpu::new(2).expect("cpu");
    check_gradient(&be, false, 2, 0.0);
    check_gradient(&be, true, 1, 0.25);
}

/// The whole graph on the fast path agrees with the reference backend (loss and every grad).
#[test]
fn fast_backend_matches_reference_on_the_whole_graph() {
    let reference = Cpu::reference();
    let fast = Cpu::new(2).expect("cpu");
    let c = config(false, 2);
    let run = |be: &Cpu| {
        let mut rng = Rng(42);
        let model = random_model(be, &c, &mut rng);
        let mut lora = random_lora(be, &c, lora_config(0.1), &mut rng);
        let (b, t) = (3, 17);
        let (ids, targets) = batch(&c, b, t, &mut rng);
        let mut ws = Workspace::new(be, &c, &lora.config, b, t);
        let mode = Mode {
            dropout_seed: Some(3),
        };
        lora.zero_grads(be);
        let l = llama::forward(be, &model, &lora, &mut ws, &ids, &targets, mode, Some(0.01))
            .expect("forward");
        llama::backward(be, &model, &mut lora, &mut ws, mode);
        (l.sum, params(be, &mut lora).1)
    };
    let (l_ref, g_ref) = run(&reference);
    let (l_fast, g_fast) = run(&fast);
    assert!(
        (l_ref - l_fast).abs() <= 1e-5 * l_ref.abs(),
        "loss {l_fast} vs reference {l_ref}"
    );
    for (i, (a, b)) in g_fast.iter().zip(&g_ref).enumerate() {
        let norm: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let diff: f64 = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            diff <= 1e-4 * norm + 1e-9,
            "gradient {i}: |fast - reference| = {diff:e}, |reference| = {norm:e}"
        );
    }
}

/// Generation's KV-cache path: feeding a sequence token by token gives the same next-token
/// distribution at every position as the batched training forward (compared through the
/// per-position cross-entropy), with and without a LoRA.
#[test]
fn kv_cache_decoding_matches_the_full_forward() {
    let be = Cpu::new(2).expect("cpu");
    let c = config(false, 2);
    let mut rng = Rng(11);
    let model = random_model(&be, &c, &mut rng);
    let lora = random_lora(&be, &c, lora_config(0.0), &mut rng);
    let t = 13;
    let (ids, _) = batch(&c, 1, t + 1, &mut rng);
    let (inputs, next) = (&ids[..t], &ids[1..=t]);
    let mut ws = Workspace::new(&be, &c, &lora.config, 1, t);
    let mode = Mode { dropout_seed: None };
    llama::forward(&be, &model, &lora, &mut ws, inputs, next, mode, None).expect("forward");
    let mut full = vec![0.0; t];
    be.download(ws.row_loss(), &mut full);
    for prefill in [1, 5] {
        let mut cache = llama::KvCache::new(&be, &c, t);
        let mut logits =
            llama::forward_cached(&be, &model, Some(&lora), &mut cache, &inputs[..prefill])
                .expect("prefill");
        for pos in prefill - 1..t {
            let max = logits
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = max
                + logits
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            let ce = lse - logits[next[pos] as usize] as f64;
            assert!(
                (ce - full[pos] as f64).abs() < 1e-4 * (1.0 + ce.abs()),
                "position {pos} (prefill {prefill}): cached {ce} vs full {}",
                full[pos]
            );
            if pos + 1 < t {
                logits = llama::forward_cached(
                    &be,
                    &model,
                    Some(&lora),
                    &mut cache,
                    &inputs[pos + 1..pos + 2],
                )
                .expect("decode");
            }
        }
        assert_eq!(cache.len, t);
    }
}

/// Batched decoding (several prompts of one length through one KV cache): each row's logits
/// equal the single-sequence path's, and batched greedy generation gives each prompt the
/// tokens `generate` gives it alone, budgets and stop tokens included.
#[test]
fn batched_decoding_matches_one_sequence_at_a_time() {
    use fedcdd_host::train::{Sampling, generate, generate_greedy_batch};
    let be = Cpu::new(2).expect("cpu");
    let c = config(false, 2);
    let mut rng = Rng(23);
    let model = random_model(&be, &c, &mut rng);
    let lora = random_lora(&be, &c, lora_config(0.0), &mut rng);
    let (b, t) = (3, 6);
    let prompts: Vec<Vec<u32>> = (0..b)
        .map(|_| (0..t).map(|_| rng.below(c.vocab_size) as u32).collect())
        .collect();
    let flat: Vec<i32> = prompts.iter().flatten().map(|&x| x as i32).collect();
    let mut cache = llama::KvCache::batched(&be, &c, b, t + 2);
    let batched =
        llama::forward_cached_batch(&be, &model, Some(&lora), &mut cache, &flat).expect("batch");
    let step: Vec<i32> = (0..b as i32).map(|i| i + 3).collect();
    let batched_next =
        llama::forward_cached_batch(&be, &model, Some(&lora), &mut cache, &step).expect("step");
    let v = c.vocab_size;
    for (i, p) in prompts.iter().enumerate() {
        let mut one = llama::KvCache::new(&be, &c, t + 2);
        let ids: Vec<i32> = p.iter().map(|&x| x as i32).collect();
        let first = llama::forward_cached(&be, &model, Some(&lora), &mut one, &ids).expect("one");
        let next =
            llama::forward_cached(&be, &model, Some(&lora), &mut one, &[step[i]]).expect("next");
        for (a, e) in [
            (&batched[i * v..(i + 1) * v], &first),
            (&batched_next[i * v..(i + 1) * v], &next),
        ] {
            for (x, y) in a.iter().zip(e.iter()) {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "row {i}: {x} vs {y}"
                );
            }
        }
    }
    // Greedy generation: different budgets per row, and a stop token that some rows hit.
    let budgets = [1usize, 5, 9];
    let stop = [5u32, 11];
    let rows = generate_greedy_batch(&be, &model, Some(&lora), &prompts, &budgets, &stop)
        .expect("batched generation");
    let greedy = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate(
            &be,
            &model,
            Some(&lora),
            p,
            budgets[i],
            greedy,
            &stop,
            |_| {},
        )
        .expect("generation");
        assert_eq!(rows[i], alone, "prompt {i}");
    }
    let uneven = [prompts[0].clone(), prompts[1][..t - 1].to_vec()];
    assert!(generate_greedy_batch(&be, &model, Some(&lora), &uneven, &[2, 2], &stop).is_err());
}
