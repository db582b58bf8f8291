//! [`Profiled`]: any backend with a wall-clock timer around every op, totalled by op and
//! shape, with the FLOPs each call performs. `fedcdd bench train --profile` uses it to say
//! where a training step's time goes.
//!
//! The timer reads the clock when an op returns, so it measures what the op costs on a
//! backend that finishes its work before returning (the CPU). An asynchronous backend (CUDA)
//! would show launch times only.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::backend::{
    AdamW, AttnShape, Backend, Copy2d, Gemm, KernelError, LoraDims, LoraDropout, LossSum,
    RopeShape, Sgd, WeightSource,
};

/// Which op, at which shape: the unit the profile totals over.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpKey {
    /// The [`Backend`] method's name.
    pub op: &'static str,
    /// The shape in words (`W [n x k], m 256`), empty for shape-free ops.
    pub shape: String,
    /// `(rows, cols)` of the frozen weight the op reads, if it reads one.
    pub weight: Option<(usize, usize)>,
}

/// What the calls of one [`OpKey`] added up to.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpTotals {
    pub calls: u64,
    pub seconds: f64,
    /// Floating-point operations (multiply and add counted apart), for the matmul-like ops;
    /// 0 for memory-bound ones.
    pub flops: f64,
}

/// `inner` with every op timed; buffers and weights are `inner`'s own types.
pub struct Profiled<B> {
    inner: B,
    totals: Mutex<BTreeMap<OpKey, OpTotals>>,
}

impl<B: Backend> Profiled<B> {
    pub fn new(inner: B) -> Self {
        Profiled {
            inner,
            totals: Mutex::new(BTreeMap::new()),
        }
    }

    /// The wrapped backend (for work that should not be counted).
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The totals so far, and a fresh start.
    pub fn take(&self) -> Vec<(OpKey, OpTotals)> {
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *totals).into_iter().collect()
    }

    fn timed<R>(&self, key: OpKey, flops: f64, op: impl FnOnce(&B) -> R) -> R {
        let start = Instant::now();
        let out = op(&self.inner);
        let seconds = start.elapsed().as_secs_f64();
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let t = totals.entry(key).or_default();
        t.calls += 1;
        t.seconds += seconds;
        t.flops += flops;
        out
    }
}

fn key(op: &'static str, shape: String) -> OpKey {
    OpKey {
        op,
        shape,
        weight: None,
    }
}

fn weight_key(op: &'static str, (n, k): (usize, usize), m: usize) -> OpKey {
    OpKey {
        op,
        shape: format!("W [{n} x {k}], m {m}"),
        weight: Some((n, k)),
    }
}

/// LoRA forward's flops: `u = x·Aᵀ` and `y += s·u·Bᵀ`.
fn lora_forward_flops(d: LoraDims) -> f64 {
    2.0 * (d.m * d.r * (d.k + d.n)) as f64
}

/// LoRA backward's flops: dB, du and dA are `2·m·r·(2n + k)`; dx adds `2·m·r·k`.
fn lora_backward_flops(d: LoraDims, with_dx: bool) -> f64 {
    let dx = if with_dx { d.k } else { 0 };
    2.0 * (d.m * d.r * (2 * d.n + d.k + dx)) as f64
}

fn lora_shape(d: LoraDims) -> String {
    format!("[{} x {}] r {}, m {}", d.n, d.k, d.r, d.m)
}

fn attn_shape(s: AttnShape) -> String {
    format!(
        "batch {}, q {} x kv {}, heads {} / {}, dim {}",
        s.batch, s.q_len, s.kv_len, s.q_heads, s.kv_heads, s.head_dim
    )
}

/// Scores and weighted values of causal attention: `2 · b · h · q · kv · d` per matmul, two
/// matmuls, the causal mask halving the square when every query sees the whole prefix.
fn attn_forward_flops(s: AttnShape) -> f64 {
    let pairs = if s.q_len == s.kv_len {
        (s.q_len * (s.q_len + 1) / 2) as f64
    } else {
        (s.q_len * s.kv_len) as f64
    };
    4.0 * (s.batch * s.q_heads * s.head_dim) as f64 * pairs
}

impl<B: Backend> Backend for Profiled<B> {
    type Buf = B::Buf;
    type Ids = B::Ids;
    type Weight = B::Weight;

    fn name(&self) -> String {
        format!("{} (profiled)", self.inner.name())
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.inner.run(f)
    }

    fn zeros(&self, len: usize) -> Self::Buf {
        self.timed(key("zeros", String::new()), 0.0, |b| b.zeros(len))
    }
    fn upload(&self, values: &[f32]) -> Self::Buf {
        self.timed(key("upload", String::new()), 0.0, |b| b.upload(values))
    }
    fn download(&self, buf: &Self::Buf, out: &mut [f32]) {
        self.timed(key("download", String::new()), 0.0, |b| {
            b.download(buf, out)
        })
    }
    fn buf_len(&self, buf: &Self::Buf) -> usize {
        self.inner.buf_len(buf)
    }
    fn upload_ids(&self, ids: &[i32]) -> Self::Ids {
        self.timed(key("upload_ids", String::new()), 0.0, |b| b.upload_ids(ids))
    }
    fn weight(&self, src: &WeightSource) -> Result<Self::Weight, KernelError> {
        self.timed(key("weight", String::new()), 0.0, |b| b.weight(src))
    }
    fn weight_dims(&self, w: &Self::Weight) -> (usize, usize) {
        self.inner.weight_dims(w)
    }
    fn fill(&self, buf: &mut Self::Buf, value: f32) {
        self.timed(key("fill", String::new()), 0.0, |b| b.fill(buf, value))
    }
    fn copy_2d(&self, src: &Self::Buf, dst: &mut Self::Buf, spec: Copy2d) {
        self.timed(key("copy_2d", String::new()), 0.0, |b| {
            b.copy_2d(src, dst, spec)
        })
    }

    fn axpy(&self, y: &mut Self::Buf, a: f32, x: &Self::Buf) {
        self.timed(key("axpy", String::new()), 0.0, |b| b.axpy(y, a, x))
    }
    fn scale(&self, x: &mut Self::Buf, a: f32) {
        self.timed(key("scale", String::new()), 0.0, |b| b.scale(x, a))
    }
    fn sum_squares(&self, x: &Self::Buf) -> f64 {
        self.timed(key("sum_squares", String::new()), 0.0, |b| b.sum_squares(x))
    }

    fn linear_forward(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        y: &mut Self::Buf,
        m: usize,
        accumulate: bool,
    ) {
        let (n, k) = self.inner.weight_dims(w);
        let flops = 2.0 * (m * n * k) as f64;
        self.timed(weight_key("linear_forward", (n, k), m), flops, |b| {
            b.linear_forward(x, w, y, m, accumulate)
        })
    }
    fn linear_backward_input(
        &self,
        dy: &Self::Buf,
        w: &Self::Weight,
        dx: &mut Self::Buf,
        m: usize,
        accumulate: bool,
    ) {
        let (n, k) = self.inner.weight_dims(w);
        let flops = 2.0 * (m * n * k) as f64;
        self.timed(weight_key("linear_backward_input", (n, k), m), flops, |b| {
            b.linear_backward_input(dy, w, dx, m, accumulate)
        })
    }
    fn matmul(&self, g: Gemm, a: &Self::Buf, bm: &Self::Buf, c: &mut Self::Buf) {
        let shape = format!(
            "m {} n {} k {}{}{}",
            g.m,
            g.n,
            g.k,
            if g.trans_a { " Aᵀ" } else { "" },
            if g.trans_b { " Bᵀ" } else { "" }
        );
        let flops = 2.0 * (g.m * g.n * g.k) as f64;
        self.timed(key("matmul", shape), flops, |b| b.matmul(g, a, bm, c))
    }

    fn lora_forward(
        &self,
        x: &Self::Buf,
        a: &Self::Buf,
        bm: &Self::Buf,
        d: LoraDims,
        u: &mut Self::Buf,
        y: &mut Self::Buf,
    ) {
        let flops = lora_forward_flops(d);
        self.timed(key("lora_forward", lora_shape(d)), flops, |b| {
            b.lora_forward(x, a, bm, d, u, y)
        })
    }
    fn lora_backward(
        &self,
        x: &Self::Buf,
        a: &Self::Buf,
        bm: &Self::Buf,
        u: &Self::Buf,
        dy: &Self::Buf,
        d: LoraDims,
        da: &mut Self::Buf,
        db: &mut Self::Buf,
        du: &mut Self::Buf,
        dx: Option<&mut Self::Buf>,
    ) {
        let flops = lora_backward_flops(d, dx.is_some());
        self.timed(key("lora_backward", lora_shape(d)), flops, |b| {
            b.lora_backward(x, a, bm, u, dy, d, da, db, du, dx)
        })
    }
    fn lora_forward_dropout(
        &self,
        x: &Self::Buf,
        drop: LoraDropout,
        scratch: &mut Self::Buf,
        a: &Self::Buf,
        bm: &Self::Buf,
        d: LoraDims,
        u: &mut Self::Buf,
        y: &mut Self::Buf,
    ) {
        let flops = lora_forward_flops(d);
        self.timed(key("lora_forward_dropout", lora_shape(d)), flops, |b| {
            b.lora_forward_dropout(x, drop, scratch, a, bm, d, u, y)
        })
    }
    fn lora_backward_dropout(
        &self,
        x: &Self::Buf,
        drop: LoraDropout,
        scratch_x: &mut Self::Buf,
        scratch_dx: &mut Self::Buf,
        a: &Self::Buf,
        bm: &Self::Buf,
        u: &Self::Buf,
        dy: &Self::Buf,
        d: LoraDims,
        da: &mut Self::Buf,
        db: &mut Self::Buf,
        du: &mut Self::Buf,
        dx: &mut Self::Buf,
    ) {
        let flops = lora_backward_flops(d, true);
        self.timed(key("lora_backward_dropout", lora_shape(d)), flops, |b| {
            b.lora_backward_dropout(
                x, drop, scratch_x, scratch_dx, a, bm, u, dy, d, da, db, du, dx,
            )
        })
    }
    fn dropout_forward(&self, x: &Self::Buf, out: &mut Self::Buf, p: f32, seed: u64) {
        self.timed(key("dropout_forward", String::new()), 0.0, |b| {
            b.dropout_forward(x, out, p, seed)
        })
    }
    fn dropout_backward(&self, dy: &Self::Buf, dx: &mut Self::Buf, p: f32, seed: u64) {
        self.timed(key("dropout_backward", String::new()), 0.0, |b| {
            b.dropout_backward(dy, dx, p, seed)
        })
    }

    fn rmsnorm_forward(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        y: &mut Self::Buf,
        rstd: &mut Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) {
        self.timed(key("rmsnorm_forward", String::new()), 0.0, |b| {
            b.rmsnorm_forward(x, w, y, rstd, rows, dim, eps)
        })
    }
    fn rmsnorm_backward(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Weight,
        rstd: &Self::Buf,
        dx: &mut Self::Buf,
        rows: usize,
        dim: usize,
        accumulate: bool,
    ) {
        self.timed(key("rmsnorm_backward", String::new()), 0.0, |b| {
            b.rmsnorm_backward(dy, x, w, rstd, dx, rows, dim, accumulate)
        })
    }
    fn rope(
        &self,
        x: &mut Self::Buf,
        cos: &Self::Buf,
        sin: &Self::Buf,
        s: RopeShape,
        inverse: bool,
    ) {
        self.timed(key("rope", String::new()), 0.0, |b| {
            b.rope(x, cos, sin, s, inverse)
        })
    }
    fn attention_forward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        s: AttnShape,
    ) {
        self.timed(
            key("attention_forward", attn_shape(s)),
            attn_forward_flops(s),
            |b| b.attention_forward(q, k, v, out, lse, s),
        )
    }
    fn attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        dout: &Self::Buf,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        s: AttnShape,
    ) {
        // Recomputed scores, then dV, dP, dQ and dK: five matmuls against forward's two.
        self.timed(
            key("attention_backward", attn_shape(s)),
            2.5 * attn_forward_flops(s),
            |b| b.attention_backward(q, k, v, out, lse, dout, dq, dk, dv, s),
        )
    }
    fn swiglu_forward(&self, gate: &Self::Buf, up: &Self::Buf, out: &mut Self::Buf) {
        self.timed(key("swiglu_forward", String::new()), 0.0, |b| {
            b.swiglu_forward(gate, up, out)
        })
    }
    fn swiglu_backward(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        dout: &Self::Buf,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
    ) {
        self.timed(key("swiglu_backward", String::new()), 0.0, |b| {
            b.swiglu_backward(gate, up, dout, dgate, dup)
        })
    }

    fn embedding_forward(&self, table: &Self::Weight, ids: &Self::Ids, out: &mut Self::Buf) {
        self.timed(key("embedding_forward", String::new()), 0.0, |b| {
            b.embedding_forward(table, ids, out)
        })
    }
    fn embedding_backward(&self, ids: &Self::Ids, dout: &Self::Buf, dtable: &mut Self::Buf) {
        self.timed(key("embedding_backward", String::new()), 0.0, |b| {
            b.embedding_backward(ids, dout, dtable)
        })
    }
    fn cross_entropy(
        &self,
        logits: &mut Self::Buf,
        targets: &Self::Ids,
        row_loss: &mut Self::Buf,
        vocab: usize,
        ignore_index: i32,
        grad_scale: Option<f32>,
    ) -> LossSum {
        let rows = self.inner.buf_len(logits) / vocab.max(1);
        self.timed(
            key("cross_entropy", format!("{rows} x vocab {vocab}")),
            0.0,
            |b| b.cross_entropy(logits, targets, row_loss, vocab, ignore_index, grad_scale),
        )
    }

    fn adamw_step(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        hp: AdamW,
        step: u64,
    ) {
        self.timed(key("adamw_step", String::new()), 0.0, |b| {
            b.adamw_step(param, grad, m, v, hp, step)
        })
    }
    fn sgd_step(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        momentum_buf: &mut Self::Buf,
        hp: Sgd,
        first: bool,
    ) {
        self.timed(key("sgd_step", String::new()), 0.0, |b| {
            b.sgd_step(param, grad, momentum_buf, hp, first)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;

    /// The wrapper passes values through unchanged and counts every call with its FLOPs.
    #[test]
    fn profiled_ops_match_the_inner_backend_and_count_flops() {
        let p = Profiled::new(Cpu::reference());
        let (m, n, k) = (3, 5, 4);
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let src = WeightSource::from_f32(w.clone(), n, k);
        let wp = p.weight(&src).unwrap();
        let xp = p.upload(&x);
        let mut y = p.zeros(m * n);
        p.linear_forward(&xp, &wp, &mut y, m, false);
        p.linear_forward(&xp, &wp, &mut y, m, true);
        // y = 2 · x·Wᵀ, written out here in f64
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
                assert!((y[i * n + j] as f64 - 2.0 * dot).abs() < 1e-5, "{i},{j}");
            }
        }
        let totals = p.take();
        let lin = totals
            .iter()
            .find(|(key, _)| key.op == "linear_forward")
            .unwrap();
        assert_eq!(lin.0.weight, Some((n, k)));
        assert_eq!(lin.1.calls, 2);
        assert_eq!(lin.1.flops, 2.0 * 2.0 * (m * n * k) as f64);
        assert!(
            totals
                .iter()
                .any(|(key, t)| key.op == "zeros" && t.calls == 1)
        );
        assert!(p.take().is_empty(), "take starts afresh");
    }

    #[test]
    fn causal_attention_counts_the_lower_triangle() {
        let s = AttnShape {
            batch: 2,
            q_len: 4,
            kv_len: 4,
            kv_stride: 4,
            q_heads: 3,
            kv_heads: 1,
            head_dim: 8,
            q_pos0: 0,
            scale: 1.0,
        };
        // 10 (query, key) pairs of 4 tokens; two matmuls of 2·d FLOPs each per pair and head.
        assert_eq!(attn_forward_flops(s), (2 * 3 * 10 * 2 * 2 * 8) as f64);
    }
}
