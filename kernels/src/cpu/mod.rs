//! The CPU backend. One struct, two paths with the same function signatures:
//! - `reference_*`: plain loops written to be obviously right (the yardstick in tests);
//! - `matmul`, `ops`: the fast path (SIMD, cache blocking, threads on the backend's pool).

mod checks;
mod gemm;
mod lora;
pub mod matmul;
pub mod ops;
pub mod reference_matmul;
pub mod reference_ops;
mod sync_ptr;
mod weight;

pub use weight::{CpuWeight, WeightSlice};

use crate::{
    AdamW, AttnShape, Backend, Copy2d, Gemm, KernelError, LoraDims, LoraDropout, LossSum,
    RopeShape, Sgd, WeightSource, lora_backward_dropout_unfused, lora_forward_dropout_unfused,
};
use matmul::Simd;

/// The CPU backend: the fast path on a private thread pool, or the plain reference.
pub struct Cpu {
    pool: rayon::ThreadPool,
    threads: usize,
    reference: bool,
}

impl Cpu {
    /// The fast path on `threads` worker threads (0 = one per available core).
    pub fn new(threads: usize) -> Result<Self, KernelError> {
        let threads = if threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("fedcdd-cpu-{i}"))
            .build()
            .map_err(|e| KernelError(format!("cannot start {threads} CPU threads: {e}")))?;
        Ok(Cpu {
            pool,
            threads,
            reference: false,
        })
    }

    /// The plain single-threaded reference implementation of every op.
    pub fn reference() -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a one-thread pool always starts");
        Cpu {
            pool,
            threads: 1,
            reference: true,
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn is_reference(&self) -> bool {
        self.reference
    }

    /// Runs `f` on this backend's pool, so `rayon` calls inside use its threads.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// Runs an elementwise op over `len` values: on the calling thread when they fit in one
    /// chunk (its parallel iterator has one item and never splits, so nothing would run in
    /// parallel anyway), else on the pool. A round trip into the pool costs more than such an
    /// op: the 135M model's 420 LoRA tensors (≤ 12 288 values each at r = 8) take an AdamW
    /// step and a Σx² each per optimizer step. Same chunk code either way: the same bits.
    fn install_elementwise<R: Send>(&self, len: usize, f: impl FnOnce() -> R + Send) -> R {
        if len <= ops::CHUNK {
            f()
        } else {
            self.install(f)
        }
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Ids = Vec<i32>;
    type Weight = CpuWeight;

    fn name(&self) -> String {
        if self.reference {
            "cpu reference (1 thread)".to_string()
        } else {
            format!("cpu ({} threads)", self.threads)
        }
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.install(f)
    }

    fn zeros(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }
    fn upload(&self, values: &[f32]) -> Vec<f32> {
        values.to_vec()
    }
    fn download(&self, buf: &Vec<f32>, out: &mut [f32]) {
        out.copy_from_slice(&buf[..out.len()]);
    }
    fn buf_len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn upload_ids(&self, ids: &[i32]) -> Vec<i32> {
        ids.to_vec()
    }
    fn weight(&self, src: &WeightSource) -> Result<CpuWeight, KernelError> {
        CpuWeight::new(src)
    }
    fn weight_dims(&self, w: &CpuWeight) -> (usize, usize) {
        (w.rows, w.cols)
    }
    fn fill(&self, buf: &mut Vec<f32>, value: f32) {
        buf.fill(value);
    }
    fn copy_2d(&self, src: &Vec<f32>, dst: &mut Vec<f32>, s: Copy2d) {
        for i in 0..s.count {
            let from = s.src_offset + i * s.src_stride;
            let to = s.dst_offset + i * s.dst_stride;
            dst[to..to + s.len].copy_from_slice(&src[from..from + s.len]);
        }
    }

    fn axpy(&self, y: &mut Vec<f32>, a: f32, x: &Vec<f32>) {
        if self.reference {
            reference_ops::axpy(y, a, x)
        } else {
            self.install_elementwise(y.len(), || ops::axpy(y, a, x))
        }
    }
    fn scale(&self, x: &mut Vec<f32>, a: f32) {
        if self.reference {
            reference_ops::scale(x, a)
        } else {
            self.install_elementwise(x.len(), || ops::scale(x, a))
        }
    }
    fn sum_squares(&self, x: &Vec<f32>) -> f64 {
        if self.reference {
            reference_ops::sum_squares(x)
        } else {
            self.install_elementwise(x.len(), || ops::sum_squares(x))
        }
    }

    fn linear_forward(&self, x: &Vec<f32>, w: &CpuWeight, y: &mut Vec<f32>, m: usize, acc: bool) {
        if self.reference {
            reference_matmul::linear_forward(x, w, y, m, acc)
        } else {
            self.install(|| matmul::linear_forward(x, w, y, m, acc))
        }
    }
    fn linear_backward_input(
        &self,
        dy: &Vec<f32>,
        w: &CpuWeight,
        dx: &mut Vec<f32>,
        m: usize,
        acc: bool,
    ) {
        if self.reference {
            reference_matmul::linear_backward_input(dy, w, dx, m, acc)
        } else {
            self.install(|| matmul::linear_backward_input(dy, w, dx, m, acc))
        }
    }
    fn matmul(&self, g: Gemm, a: &Vec<f32>, b: &Vec<f32>, c: &mut Vec<f32>) {
        if self.reference {
            reference_matmul::matmul(g, a, b, c)
        } else {
            self.install(|| matmul::matmul(g, a, b, c))
        }
    }

    fn lora_forward(
        &self,
        x: &Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        d: LoraDims,
        u: &mut Vec<f32>,
        y: &mut Vec<f32>,
    ) {
        if self.reference {
            reference_matmul::lora_forward(x, a, b, d, u, y)
        } else {
            self.install(|| matmul::lora_forward(x, a, b, d, u, y))
        }
    }
    fn lora_backward(
        &self,
        x: &Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        u: &Vec<f32>,
        dy: &Vec<f32>,
        d: LoraDims,
        da: &mut Vec<f32>,
        db: &mut Vec<f32>,
        du: &mut Vec<f32>,
        dx: Option<&mut Vec<f32>>,
    ) {
        let dx = dx.map(|v| v.as_mut_slice());
        if self.reference {
            reference_matmul::lora_backward(x, a, b, u, dy, d, da, db, du, dx)
        } else {
            self.install(|| matmul::lora_backward(x, a, b, u, dy, d, da, db, du, dx))
        }
    }
    fn lora_forward_dropout(
        &self,
        x: &Vec<f32>,
        drop: LoraDropout,
        scratch: &mut Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        d: LoraDims,
        u: &mut Vec<f32>,
        y: &mut Vec<f32>,
    ) {
        if self.reference {
            lora_forward_dropout_unfused(self, x, drop, scratch, a, b, d, u, y)
        } else {
            let simd = Simd::detect();
            self.install(|| matmul::lora_forward_dropout_with(simd, x, drop, a, b, d, u, y))
        }
    }
    fn lora_backward_dropout(
        &self,
        x: &Vec<f32>,
        drop: LoraDropout,
        scratch_x: &mut Vec<f32>,
        scratch_dx: &mut Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        u: &Vec<f32>,
        dy: &Vec<f32>,
        d: LoraDims,
        da: &mut Vec<f32>,
        db: &mut Vec<f32>,
        du: &mut Vec<f32>,
        dx: &mut Vec<f32>,
    ) {
        if self.reference {
            lora_backward_dropout_unfused(
                self, x, drop, scratch_x, scratch_dx, a, b, u, dy, d, da, db, du, dx,
            )
        } else {
            let simd = Simd::detect();
            self.install(|| {
                matmul::lora_backward_dropout_with(simd, x, drop, a, b, u, dy, d, da, db, du, dx)
            })
        }
    }
    fn dropout_forward(&self, x: &Vec<f32>, out: &mut Vec<f32>, p: f32, seed: u64) {
        if self.reference {
            reference_ops::dropout_forward(x, out, p, seed)
        } else {
            self.install(|| ops::dropout_forward(x, out, p, seed))
        }
    }
    fn dropout_backward(&self, dy: &Vec<f32>, dx: &mut Vec<f32>, p: f32, seed: u64) {
        if self.reference {
            reference_ops::dropout_backward(dy, dx, p, seed)
        } else {
            self.install(|| ops::dropout_backward(dy, dx, p, seed))
        }
    }

    fn rmsnorm_forward(
        &self,
        x: &Vec<f32>,
        w: &CpuWeight,
        y: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) {
        if self.reference {
            reference_ops::rmsnorm_forward(x, w, y, rstd, rows, dim, eps)
        } else {
            self.install(|| ops::rmsnorm_forward(x, w, y, rstd, rows, dim, eps))
        }
    }
    fn rmsnorm_backward(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &CpuWeight,
        rstd: &Vec<f32>,
        dx: &mut Vec<f32>,
        rows: usize,
        dim: usize,
        acc: bool,
    ) {
        if self.reference {
            reference_ops::rmsnorm_backward(dy, x, w, rstd, dx, rows, dim, acc)
        } else {
            self.install(|| ops::rmsnorm_backward(dy, x, w, rstd, dx, rows, dim, acc))
        }
    }
    fn rope(&self, x: &mut Vec<f32>, cos: &Vec<f32>, sin: &Vec<f32>, s: RopeShape, inv: bool) {
        if self.reference {
            reference_ops::rope(x, cos, sin, s, inv)
        } else {
            self.install(|| ops::rope(x, cos, sin, s, inv))
        }
    }
    fn attention_forward(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        s: AttnShape,
    ) {
        if self.reference {
            reference_ops::attention_forward(q, k, v, out, lse, s)
        } else {
            self.install(|| ops::attention_forward(q, k, v, out, lse, s))
        }
    }
    fn attention_backward(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        dout: &Vec<f32>,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        s: AttnShape,
    ) {
        if self.reference {
            reference_ops::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, s)
        } else {
            self.install(|| ops::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, s))
        }
    }
    fn swiglu_forward(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>) {
        if self.reference {
            reference_ops::swiglu_forward(gate, up, out)
        } else {
            self.install(|| ops::swiglu_forward(gate, up, out))
        }
    }
    fn swiglu_backward(
        &self,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        dout: &Vec<f32>,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
    ) {
        if self.reference {
            reference_ops::swiglu_backward(gate, up, dout, dgate, dup)
        } else {
            self.install(|| ops::swiglu_backward(gate, up, dout, dgate, dup))
        }
    }

    fn embedding_forward(&self, table: &CpuWeight, ids: &Vec<i32>, out: &mut Vec<f32>) {
        if self.reference {
            reference_ops::embedding_forward(table, ids, out)
        } else {
            self.install(|| ops::embedding_forward(table, ids, out))
        }
    }
    fn embedding_backward(&self, ids: &Vec<i32>, dout: &Vec<f32>, dtable: &mut Vec<f32>) {
        if self.reference {
            reference_ops::embedding_backward(ids, dout, dtable)
        } else {
            self.install(|| ops::embedding_backward(ids, dout, dtable))
        }
    }
    fn cross_entropy(
        &self,
        logits: &mut Vec<f32>,
        targets: &Vec<i32>,
        row_loss: &mut Vec<f32>,
        vocab: usize,
        ignore_index: i32,
        grad_scale: Option<f32>,
    ) -> LossSum {
        if self.reference {
            reference_ops::cross_entropy(logits, targets, row_loss, vocab, ignore_index, grad_scale)
        } else {
            self.install(|| {
                ops::cross_entropy(logits, targets, row_loss, vocab, ignore_index, grad_scale)
            })
        }
    }

    fn adamw_step(
        &self,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        hp: AdamW,
        step: u64,
    ) {
        if self.reference {
            reference_ops::adamw_step(param, grad, m, v, hp, step)
        } else {
            self.install_elementwise(param.len(), || ops::adamw_step(param, grad, m, v, hp, step))
        }
    }
    fn sgd_step(
        &self,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        momentum_buf: &mut Vec<f32>,
        hp: Sgd,
        first: bool,
    ) {
        if self.reference {
            reference_ops::sgd_step(param, grad, momentum_buf, hp, first)
        } else {
            self.install_elementwise(param.len(), || {
                ops::sgd_step(param, grad, momentum_buf, hp, first)
            })
        }
    }
}
