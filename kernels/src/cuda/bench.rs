//! Kernel micro-benchmark: each op of the CUDA backend at LLaMA-like sizes, timed with CUDA
//! events (median of `iters` runs after warm-up), reported as achieved GB/s against the
//! device's DRAM peak (memory clock × bus width) for memory-bound ops, and TFLOP/s against
//! the rate of a bf16 cuBLAS GEMM measured in the same run (f32 tiled GEMM without cuBLAS)
//! for compute-bound ones.

use super::Cuda;
use crate::{
    AdamW, AttnShape, Backend, Gemm, LoraDims, RopeScaling, RopeShape, RopeTable, Sgd, WeightDType,
    WeightSource,
};

/// Sizes of the benchmark (defaults: a Llama-3-8B layer at 4096 tokens).
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub ordinal: usize,
    /// Timed runs per kernel (the median is reported).
    pub iters: usize,
    pub tokens: usize,
    pub dim: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub seq: usize,
    pub rank: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            ordinal: 0,
            iters: 20,
            tokens: 4096,
            dim: 4096,
            hidden: 14336,
            vocab: 128_256,
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            seq: 2048,
            rank: 16,
        }
    }
}

struct Row {
    kernel: String,
    shape: String,
    ms: f64,
    bytes: f64,
    flops: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bf16_source(rng: &mut u64, rows: usize, cols: usize) -> WeightSource {
    let mut bytes = Vec::with_capacity(rows * cols * 2);
    for _ in 0..rows * cols {
        *rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v = ((*rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05;
        bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
    }
    WeightSource {
        bytes: std::sync::Arc::new(bytes),
        offset: 0,
        dtype: WeightDType::Bf16,
        rows,
        cols,
    }
}

/// Runs the benchmark on device `opts.ordinal`; returns the printable table.
pub fn run(opts: &BenchOptions) -> Result<String, String> {
    let c = Cuda::new(opts.ordinal).map_err(|e| e.0)?;
    let iters = opts.iters.max(1);
    let time = |f: &mut dyn FnMut()| -> Result<f64, String> {
        for _ in 0..2 {
            f();
        }
        let mut v = Vec::with_capacity(iters);
        for _ in 0..iters {
            v.push(c.time_ms(&mut *f).map_err(|e| e.0)? as f64);
        }
        Ok(median(v))
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut push = |kernel: &str, shape: String, ms: f64, bytes: f64, flops: f64| {
        rows.push(Row {
            kernel: kernel.to_string(),
            shape,
            ms,
            bytes,
            flops,
        })
    };
    let (t, d, h, v) = (opts.tokens, opts.dim, opts.hidden, opts.vocab);
    let mut seed = 1u64;
    let f4 = 4.0f64;

    // The peak GEMM rate, measured: bf16 weights through cuBLAS (or the f32 tiled GEMM).
    let w_sq = c.weight(&bf16_source(&mut seed, d, d)).map_err(|e| e.0)?;
    let x = c.zeros(t * d);
    let mut y = c.zeros(t * d);
    let ms = time(&mut || c.linear_forward(&x, &w_sq, &mut y, t, false))?;
    let gemm_flops = 2.0 * (t * d * d) as f64;
    let peak_flops = gemm_flops / (ms * 1e-3);
    push(
        "linear_forward (bf16 W)",
        format!("{t}x{d} . {d}x{d}"),
        ms,
        (t * d * 4 * 2 + d * d * 2) as f64,
        gemm_flops,
    );
    let ms = time(&mut || c.linear_backward_input(&x, &w_sq, &mut y, t, false))?;
    push(
        "linear_backward_input (bf16 W)",
        format!("{t}x{d} . {d}x{d}"),
        ms,
        (t * d * 8 + d * d * 2) as f64,
        gemm_flops,
    );

    let a = c.zeros(t * d);
    let g = Gemm {
        m: t.min(2048),
        n: d,
        k: d,
        trans_a: false,
        trans_b: true,
        alpha: 1.0,
        beta: 0.0,
    };
    let mut cm = c.zeros(g.m * g.n);
    let bmat = c.zeros(d * d);
    let ms = time(&mut || c.matmul(g, &a, &bmat, &mut cm))?;
    push(
        "matmul (f32 tiled)",
        format!("{}x{}x{}", g.m, g.n, g.k),
        ms,
        ((g.m * g.k + g.k * g.n + g.m * g.n) * 4) as f64,
        2.0 * (g.m * g.n * g.k) as f64,
    );

    // elementwise
    let n = t * h;
    let mut big = c.zeros(n);
    let big2 = c.zeros(n);
    let mut big3 = c.zeros(n);
    let nb = n as f64 * f4;
    let ms = time(&mut || c.fill(&mut big, 1.0))?;
    push("fill", format!("{n}"), ms, nb, 0.0);
    let ms = time(&mut || c.axpy(&mut big, 0.5, &big2))?;
    push("axpy", format!("{n}"), ms, 3.0 * nb, 2.0 * n as f64);
    let ms = time(&mut || c.scale(&mut big, 0.999))?;
    push("scale", format!("{n}"), ms, 2.0 * nb, n as f64);
    let ms = time(&mut || {
        let _ = c.sum_squares(&big2);
    })?;
    push(
        "sum_squares (grad norm)",
        format!("{n}"),
        ms,
        nb,
        2.0 * n as f64,
    );
    let ms = time(&mut || c.dropout_forward(&big2, &mut big, 0.1, 7))?;
    push("dropout_forward", format!("{n}"), ms, 2.0 * nb, 0.0);
    let ms = time(&mut || c.dropout_backward(&big2, &mut big, 0.1, 7))?;
    push("dropout_backward", format!("{n}"), ms, 3.0 * nb, 0.0);
    let ms = time(&mut || c.swiglu_forward(&big2, &big3, &mut big))?;
    push("swiglu_forward", format!("{n}"), ms, 3.0 * nb, 0.0);
    {
        let mut dg = c.zeros(n);
        let dout = c.zeros(n);
        let ms = time(&mut || c.swiglu_backward(&big2, &dout, &big, &mut dg, &mut big3))?;
        push("swiglu_backward", format!("{n}"), ms, 5.0 * nb, 0.0);
    }
    drop((big, big2, big3));

    // RMSNorm (bf16 weight)
    let wn = c.weight(&bf16_source(&mut seed, 1, d)).map_err(|e| e.0)?;
    let mut rstd = c.zeros(t);
    let td = (t * d) as f64 * f4;
    let ms = time(&mut || c.rmsnorm_forward(&x, &wn, &mut y, &mut rstd, t, d, 1e-5))?;
    push("rmsnorm_forward", format!("{t}x{d}"), ms, 2.0 * td, 0.0);
    let dy = c.zeros(t * d);
    let mut dx = c.zeros(t * d);
    let ms = time(&mut || c.rmsnorm_backward(&dy, &x, &wn, &rstd, &mut dx, t, d, false))?;
    push("rmsnorm_backward", format!("{t}x{d}"), ms, 3.0 * td, 0.0);

    // RoPE (llama3 scaling table)
    let (qh, kvh, hd, seq) = (opts.q_heads, opts.kv_heads, opts.head_dim, opts.seq);
    let batch = (t / seq).max(1);
    let table = RopeTable::new(
        hd,
        500_000.0,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        },
        seq,
    );
    let (cosb, sinb) = (c.upload(&table.cos), c.upload(&table.sin));
    let mut qb = c.zeros(batch * seq * qh * hd);
    let rs = RopeShape {
        batch,
        seq,
        heads: qh,
        head_dim: hd,
        pos0: 0,
    };
    let ms = time(&mut || c.rope(&mut qb, &cosb, &sinb, rs, false))?;
    push(
        "rope",
        format!("{batch}x{seq}x{qh}x{hd}"),
        ms,
        2.0 * (batch * seq * qh * hd) as f64 * f4,
        0.0,
    );

    // attention (causal: half the score matrix)
    let s = AttnShape {
        batch,
        q_len: seq,
        kv_len: seq,
        kv_stride: seq,
        q_heads: qh,
        kv_heads: kvh,
        head_dim: hd,
        q_pos0: 0,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let nq = batch * seq * qh * hd;
    let nk = batch * seq * kvh * hd;
    let (kb, vb) = (c.zeros(nk), c.zeros(nk));
    let (mut ob, mut lb) = (c.zeros(nq), c.zeros(batch * qh * seq));
    let attn_flops = 4.0 * (batch * qh * hd) as f64 * (seq * seq) as f64 / 2.0;
    let ms = time(&mut || c.attention_forward(&qb, &kb, &vb, &mut ob, &mut lb, s))?;
    let shape = format!("b{batch} T{seq} h{qh}/{kvh} d{hd}");
    push(
        "attention_forward",
        shape.clone(),
        ms,
        ((2 * nq + 2 * nk) * 4) as f64,
        attn_flops,
    );
    {
        let dout = c.zeros(nq);
        let (mut dq, mut dk, mut dv) = (c.zeros(nq), c.zeros(nk), c.zeros(nk));
        let ms = time(&mut || {
            c.attention_backward(&qb, &kb, &vb, &ob, &lb, &dout, &mut dq, &mut dk, &mut dv, s)
        })?;
        push(
            "attention_backward",
            shape,
            ms,
            ((4 * nq + 4 * nk) * 4) as f64,
            2.5 * attn_flops,
        );
    }

    // LoRA on a d x d projection
    let r = opts.rank;
    let ld = LoraDims {
        m: t,
        k: d,
        n: d,
        r,
        scale: 2.0,
    };
    let (la, lbm) = (c.zeros(r * d), c.zeros(d * r));
    let mut u = c.zeros(t * r);
    let ms = time(&mut || c.lora_forward(&x, &la, &lbm, ld, &mut u, &mut y))?;
    let lf = 2.0 * 2.0 * (t * d * r) as f64;
    push(
        "lora_forward",
        format!("m{t} k{d} n{d} r{r}"),
        ms,
        (3 * t * d * 4) as f64,
        lf,
    );
    {
        let (mut da, mut db, mut du) = (c.zeros(r * d), c.zeros(d * r), c.zeros(t * r));
        let ms = time(&mut || {
            c.lora_backward(
                &x,
                &la,
                &lbm,
                &u,
                &dy,
                ld,
                &mut da,
                &mut db,
                &mut du,
                Some(&mut dx),
            )
        })?;
        push(
            "lora_backward",
            format!("m{t} k{d} n{d} r{r}"),
            ms,
            (5 * t * d * 4) as f64,
            2.0 * lf,
        );
    }

    // embedding, cross-entropy
    let ids: Vec<i32> = (0..t).map(|i| ((i * 7919) % v) as i32).collect();
    let idb = c.upload_ids(&ids);
    let emb = c
        .weight(&bf16_source(&mut seed, v.min(32_000), d))
        .map_err(|e| e.0)?;
    let ids_small: Vec<i32> = ids.iter().map(|&i| i % v.min(32_000) as i32).collect();
    let ids_small = c.upload_ids(&ids_small);
    let ms = time(&mut || c.embedding_forward(&emb, &ids_small, &mut y))?;
    push(
        "embedding_forward",
        format!("{t} ids, dim {d}"),
        ms,
        (t * d * 6) as f64,
        0.0,
    );
    {
        let mut dt = c.zeros(v.min(32_000) * d);
        let ms = time(&mut || c.embedding_backward(&ids_small, &dy, &mut dt))?;
        push(
            "embedding_backward",
            format!("{t} ids, dim {d}"),
            ms,
            (t * d * 12) as f64,
            0.0,
        );
    }
    {
        let rows = (t / 4).max(1);
        let mut logits = c.zeros(rows * v);
        let mut rl = c.zeros(rows);
        let tg = c.upload_ids(&ids[..rows]);
        let ms = time(&mut || {
            let _ = c.cross_entropy(&mut logits, &tg, &mut rl, v, -100, Some(1.0));
        })?;
        push(
            "cross_entropy (+grad)",
            format!("{rows}x{v}"),
            ms,
            3.0 * (rows * v) as f64 * f4,
            0.0,
        );
    }
    drop(idb);

    // optimizers on LoRA-sized parameter sets
    let np = 32 * 7 * 2 * r * d;
    let (mut p, gr, mut m1, mut m2) = (c.zeros(np), c.zeros(np), c.zeros(np), c.zeros(np));
    let hp = AdamW {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let ms = time(&mut || c.adamw_step(&mut p, &gr, &mut m1, &mut m2, hp, 3))?;
    push("adamw_step", format!("{np}"), ms, 7.0 * np as f64 * f4, 0.0);
    let sg = Sgd {
        lr: 0.01,
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 0.0,
        nesterov: false,
    };
    let ms = time(&mut || c.sgd_step(&mut p, &gr, &mut m1, sg, false))?;
    push("sgd_step", format!("{np}"), ms, 5.0 * np as f64 * f4, 0.0);

    let info = c.info();
    let peak_bw = info.peak_bandwidth;
    let mut out = format!(
        "{} ({}, {} SMs, {:.1} GiB; NVRTC {}.{}; linear via {})\n\
         peak DRAM bandwidth (memory clock x bus width): {:.0} GB/s; \
         peak GEMM rate (measured, bf16 linear_forward {t}x{d}x{d}): {:.1} TFLOP/s\n\
         median of {iters} runs\n\n",
        info.name,
        info.arch,
        info.sm_count,
        info.total_mem as f64 / (1u64 << 30) as f64,
        info.nvrtc.0,
        info.nvrtc.1,
        if info.cublas {
            "cuBLAS"
        } else {
            "the tiled GEMM kernel"
        },
        peak_bw / 1e9,
        peak_flops / 1e12,
    );
    out.push_str(&format!(
        "{:<32} {:<26} {:>10} {:>9} {:>7} {:>9} {:>7}\n",
        "kernel", "shape", "time ms", "GB/s", "%BW", "TFLOP/s", "%GEMM"
    ));
    for r in &rows {
        let s = r.ms * 1e-3;
        let gbs = r.bytes / s / 1e9;
        let tf = r.flops / s / 1e12;
        let pct_bw = if peak_bw > 0.0 {
            format!("{:.0}%", 100.0 * r.bytes / s / peak_bw)
        } else {
            "-".to_string()
        };
        let (tf_s, pct_tf) = if r.flops > 0.0 {
            (
                format!("{tf:.2}"),
                format!("{:.0}%", 100.0 * r.flops / s / peak_flops),
            )
        } else {
            ("-".to_string(), "-".to_string())
        };
        out.push_str(&format!(
            "{:<32} {:<26} {:>10.4} {:>9.0} {:>7} {:>9} {:>7}\n",
            r.kernel, r.shape, r.ms, gbs, pct_bw, tf_s, pct_tf
        ));
    }
    Ok(out)
}
