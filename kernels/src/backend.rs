//! The [`Backend`] trait every compute path implements, and the plain types its ops take
//! (weight sources, shapes, optimizer hyper-parameters), with the two helpers built on it.

use std::sync::Arc;

/// Stored element type of a frozen weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDType {
    F32,
    F16,
    Bf16,
}

impl WeightDType {
    pub fn size(self) -> usize {
        match self {
            WeightDType::F32 => 4,
            WeightDType::F16 | WeightDType::Bf16 => 2,
        }
    }
}

/// Bytes that stay alive as long as a weight uses them (a memory-mapped checkpoint, a Vec).
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A frozen `[rows, cols]` matrix (a vector is `rows = 1`) inside shared little-endian bytes.
/// Backends may reference the bytes without copying (the CPU does when they are aligned).
#[derive(Clone)]
pub struct WeightSource {
    pub bytes: SharedBytes,
    /// Byte offset of element `[0, 0]` inside `bytes`.
    pub offset: usize,
    pub dtype: WeightDType,
    pub rows: usize,
    pub cols: usize,
}

impl WeightSource {
    /// A weight that owns its f32 values (tests, LoRA merges, synthetic models).
    pub fn from_f32(values: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert_eq!(
            values.len(),
            rows * cols,
            "WeightSource::from_f32: {rows}x{cols}"
        );
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        WeightSource {
            bytes: Arc::new(bytes),
            offset: 0,
            dtype: WeightDType::F32,
            rows,
            cols,
        }
    }

    /// The byte length the matrix occupies.
    pub fn byte_len(&self) -> usize {
        self.rows * self.cols * self.dtype.size()
    }

    /// The matrix's bytes, or an error when `rows · cols` overflows or the matrix runs past
    /// the bytes that hold it.
    pub fn raw_bytes(&self) -> Result<&[u8], KernelError> {
        let len = self
            .rows
            .checked_mul(self.cols)
            .ok_or_else(|| KernelError(format!("weight {}x{} overflows", self.rows, self.cols)))?;
        let bytes: &[u8] = (*self.bytes).as_ref();
        let end = len
            .checked_mul(self.dtype.size())
            .and_then(|n| self.offset.checked_add(n))
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| {
                KernelError(format!(
                    "weight {}x{} {:?} at byte {} runs past the {} bytes that hold it",
                    self.rows,
                    self.cols,
                    self.dtype,
                    self.offset,
                    bytes.len()
                ))
            })?;
        Ok(&bytes[self.offset..end])
    }
}

/// Errors a backend can report (everything else is a caller bug).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelError(pub String);

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KernelError {}

/// `C[m,n] = alpha · op(A)[m,k] · op(B)[k,n] + beta · C`, all row-major f32.
/// `op(A) = A` stored `[m,k]` when `!trans_a`, else `Aᵀ` with A stored `[k,m]`; same for B
/// (`[k,n]` or, transposed, `[n,k]`). `beta = 0` overwrites C (NaN in C does not survive).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
}

/// Dimensions of one LoRA-adapted projection: x `[m,k]`, A `[r,k]`, B `[n,r]`, y `[m,n]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraDims {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub r: usize,
    /// PEFT's scaling: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f32,
}

/// LoRA dropout on a projection's input: `drop(x)` keeps element `i` of `x` (scaled by
/// `1/(1-p)`) iff [`dropout_keep`]`(seed, i, p)`, the mask of [`Backend::dropout_forward`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraDropout {
    pub p: f32,
    pub seed: u64,
}

/// Rotary embedding over `x: [batch, seq, heads, head_dim]`; token `t` of every sequence sits
/// at absolute position `pos0 + t` (a row of the [`RopeTable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub pos0: usize,
}

/// Causal grouped-query attention.
/// - `q`, `out`: `[batch, q_len, q_heads, head_dim]`;
/// - `k`, `v`: `[batch, kv_stride, kv_heads, head_dim]` of which rows `0..kv_len` are valid
///   (`kv_stride ≥ kv_len` lets a KV cache with spare capacity be used in place);
/// - `lse`: `[batch, q_heads, q_len]`, the natural log of each query's softmax denominator
///   (scores scaled by `scale`), saved by forward for backward;
/// - query `i` sits at absolute position `q_pos0 + i` and sees keys `j ≤ q_pos0 + i`;
/// - query head `h` reads KV head `h / (q_heads / kv_heads)` (HF's `repeat_kv`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub kv_stride: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub q_pos0: usize,
    pub scale: f32,
}

/// PyTorch `torch.optim.AdamW` (decoupled weight decay, bias correction).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl AdamW {
    /// PyTorch's defaults (β = (0.9, 0.999), ε = 1e-8) at rate `lr` and decay `weight_decay`.
    pub fn torch(lr: f32, weight_decay: f32) -> Self {
        AdamW {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }
}

/// PyTorch `torch.optim.SGD` (L2 weight decay added to the gradient, optional momentum).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    pub lr: f32,
    pub momentum: f32,
    pub dampening: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
}

impl Sgd {
    /// Plain SGD (no dampening, no Nesterov) at rate `lr` with `momentum` and L2 decay.
    pub fn torch(lr: f32, momentum: f32, weight_decay: f32) -> Self {
        Sgd {
            lr,
            momentum,
            dampening: 0.0,
            weight_decay,
            nesterov: false,
        }
    }
}

/// A strided block copy: `count` runs of `len` floats, run `i` read from
/// `src[src_offset + i·src_stride ..]` and written to `dst[dst_offset + i·dst_stride ..]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copy2d {
    pub count: usize,
    pub len: usize,
    pub src_offset: usize,
    pub src_stride: usize,
    pub dst_offset: usize,
    pub dst_stride: usize,
}

/// Sum of the per-token losses and the number of tokens that counted (not `ignore_index`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossSum {
    pub sum: f64,
    pub count: usize,
}

/// Every op the LLaMA + LoRA model needs, forward and backward.
pub trait Backend: Send + Sync {
    /// An f32 buffer in the backend's memory.
    type Buf: Send + Sync;
    /// An i32 buffer (token ids, targets).
    type Ids: Send + Sync;
    /// A frozen matrix in its stored dtype.
    type Weight: Send + Sync;

    /// Human-readable description ("cpu (2 threads)", "cuda:0 H200").
    fn name(&self) -> String;

    /// Runs `f`, a run of this backend's ops (a training step's forward and backward), where
    /// calling them costs least. The CPU backend runs it on one of its own worker threads, so
    /// each op starts its parallel work from inside the pool instead of handing it over from
    /// an outside thread and sleeping until it is done (≈ 4 % of a 135M training step). The
    /// results are the same bits either way. Default: runs `f` on the calling thread.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    // ---- memory ----------------------------------------------------------------------
    fn zeros(&self, len: usize) -> Self::Buf;
    fn upload(&self, values: &[f32]) -> Self::Buf;
    fn download(&self, buf: &Self::Buf, out: &mut [f32]);
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    fn upload_ids(&self, ids: &[i32]) -> Self::Ids;
    fn weight(&self, src: &WeightSource) -> Result<Self::Weight, KernelError>;
    /// `(rows, cols)` of a weight.
    fn weight_dims(&self, w: &Self::Weight) -> (usize, usize);
    fn fill(&self, buf: &mut Self::Buf, value: f32);
    fn copy_2d(&self, src: &Self::Buf, dst: &mut Self::Buf, spec: Copy2d);

    // ---- elementwise -----------------------------------------------------------------
    /// `y += a · x`.
    fn axpy(&self, y: &mut Self::Buf, a: f32, x: &Self::Buf);
    /// `x *= a`.
    fn scale(&self, x: &mut Self::Buf, a: f32);
    /// `Σ x²` in f64 (for global grad-norm clipping).
    fn sum_squares(&self, x: &Self::Buf) -> f64;

    // ---- matmul ----------------------------------------------------------------------
    /// `y[m,n] (+)= x[m,k] · Wᵀ` with W `[n,k]` frozen (`nn.Linear`).
    fn linear_forward(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        y: &mut Self::Buf,
        m: usize,
        accumulate: bool,
    );
    /// `dx[m,k] (+)= dy[m,n] · W` with W `[n,k]` frozen.
    fn linear_backward_input(
        &self,
        dy: &Self::Buf,
        w: &Self::Weight,
        dx: &mut Self::Buf,
        m: usize,
        accumulate: bool,
    );
    /// General f32 matmul, see [`Gemm`].
    fn matmul(&self, g: Gemm, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf);

    // ---- LoRA ------------------------------------------------------------------------
    /// `u[m,r] = x·Aᵀ`; `y[m,n] += scale · u·Bᵀ`. `u` is kept for backward.
    fn lora_forward(
        &self,
        x: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        d: LoraDims,
        u: &mut Self::Buf,
        y: &mut Self::Buf,
    );
    /// Given `dy[m,n]`: `dB[n,r] += scale · dyᵀ·u`; `du[m,r] = scale · dy·B` (scratch);
    /// `dA[r,k] += duᵀ·x`; and, when `dx` is given, `dx[m,k] += du·A`.
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &self,
        x: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        u: &Self::Buf,
        dy: &Self::Buf,
        d: LoraDims,
        da: &mut Self::Buf,
        db: &mut Self::Buf,
        du: &mut Self::Buf,
        dx: Option<&mut Self::Buf>,
    );
    /// [`lora_forward`](Self::lora_forward) on `drop(x)`. `scratch` (as long as `x`) is the
    /// backend's to hold `drop(x)`; backends that apply the mask inside their LoRA kernels
    /// leave it alone.
    #[allow(clippy::too_many_arguments)]
    fn lora_forward_dropout(
        &self,
        x: &Self::Buf,
        drop: LoraDropout,
        scratch: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        d: LoraDims,
        u: &mut Self::Buf,
        y: &mut Self::Buf,
    ) {
        lora_forward_dropout_unfused(self, x, drop, scratch, a, b, d, u, y)
    }
    /// [`lora_backward`](Self::lora_backward) on `drop(x)`, the gradient reaching `dx`
    /// through the same mask: `dx += mask ⊙ (du·A) / (1-p)`. `scratch_x`, `scratch_dx` (as
    /// long as `x`): as in [`lora_forward_dropout`](Self::lora_forward_dropout).
    #[allow(clippy::too_many_arguments)]
    fn lora_backward_dropout(
        &self,
        x: &Self::Buf,
        drop: LoraDropout,
        scratch_x: &mut Self::Buf,
        scratch_dx: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        u: &Self::Buf,
        dy: &Self::Buf,
        d: LoraDims,
        da: &mut Self::Buf,
        db: &mut Self::Buf,
        du: &mut Self::Buf,
        dx: &mut Self::Buf,
    ) {
        lora_backward_dropout_unfused(
            self, x, drop, scratch_x, scratch_dx, a, b, u, dy, d, da, db, du, dx,
        )
    }
    /// Inverted dropout with a counter-based mask (see [`dropout_keep`]): element `i` is
    /// kept (and scaled by `1/(1-p)`) iff `dropout_keep(seed, i, p)`.
    fn dropout_forward(&self, x: &Self::Buf, out: &mut Self::Buf, p: f32, seed: u64);
    /// `dx += mask ⊙ dy / (1-p)` with the same mask as forward.
    fn dropout_backward(&self, dy: &Self::Buf, dx: &mut Self::Buf, p: f32, seed: u64);

    // ---- normalisation, positions, attention, MLP ----------------------------------------
    /// HF `LlamaRMSNorm`: `y = w ⊙ x / sqrt(mean(x²) + eps)` per row of `[rows, dim]`;
    /// `rstd[rows]` keeps `1/sqrt(mean(x²)+eps)` for backward. `w` is a `[1, dim]` weight.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_forward(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        y: &mut Self::Buf,
        rstd: &mut Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    );
    /// `dx (+)= ∂y/∂x · dy` (the weight is frozen: no weight gradient).
    #[allow(clippy::too_many_arguments)]
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
    );
    /// In-place rotary embedding in HF's `rotate_half` convention: for `i < d/2`,
    /// `(x_i, x_{i+d/2}) ← (x_i·cos − x_{i+d/2}·sin, x_{i+d/2}·cos + x_i·sin)` with the
    /// angle of (position p, i) read from `cos[p·d/2 + i]`, `sin[p·d/2 + i]` (the uploaded
    /// [`RopeTable`]). `inverse` rotates by the negative angle, which is the backward of the
    /// forward rotation.
    fn rope(
        &self,
        x: &mut Self::Buf,
        cos: &Self::Buf,
        sin: &Self::Buf,
        s: RopeShape,
        inverse: bool,
    );
    /// Causal GQA attention forward, see [`AttnShape`]; writes `out` and `lse`.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        s: AttnShape,
    );
    /// Backward of [`Backend::attention_forward`]; overwrites `dq`, `dk`, `dv` (shaped like
    /// `q`, `k`, `v`). Recomputes scores from `lse`; never stores a full score matrix.
    #[allow(clippy::too_many_arguments)]
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
    );
    /// `out = silu(gate) ⊙ up` over `n` elements.
    fn swiglu_forward(&self, gate: &Self::Buf, up: &Self::Buf, out: &mut Self::Buf);
    /// Overwrites `dgate`, `dup` from `dout`.
    fn swiglu_backward(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        dout: &Self::Buf,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
    );

    // ---- embedding and loss --------------------------------------------------------------
    /// `out[t,:] = table[ids[t], :]` (table `[vocab, dim]`). Ids outside the table panic.
    fn embedding_forward(&self, table: &Self::Weight, ids: &Self::Ids, out: &mut Self::Buf);
    /// `dtable[ids[t], :] += dout[t, :]` (`dtable` is `[vocab, dim]`).
    fn embedding_backward(&self, ids: &Self::Ids, dout: &Self::Buf, dtable: &mut Self::Buf);
    /// Fused softmax cross-entropy over `logits: [rows, vocab]` against `targets[rows]`;
    /// rows whose target is `ignore_index` count for nothing. Writes each row's loss to
    /// `row_loss[rows]` (0 for ignored rows) and returns the sum and count. When `grad_scale`
    /// is `Some(g)`, `logits` is replaced by `g · (softmax − onehot)` (zero rows for ignored
    /// targets): with `g = 1/N` that is the gradient of the mean loss over N target tokens.
    fn cross_entropy(
        &self,
        logits: &mut Self::Buf,
        targets: &Self::Ids,
        row_loss: &mut Self::Buf,
        vocab: usize,
        ignore_index: i32,
        grad_scale: Option<f32>,
    ) -> LossSum;

    // ---- optimizers ----------------------------------------------------------------------
    /// One AdamW step; `step` counts from 1 (for bias correction).
    fn adamw_step(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        hp: AdamW,
        step: u64,
    );
    /// One SGD step; `momentum_buf` is used when `hp.momentum != 0` (`first` = its first use,
    /// which PyTorch initialises to the gradient).
    fn sgd_step(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        momentum_buf: &mut Self::Buf,
        hp: Sgd,
        first: bool,
    );
}

/// PyTorch `clip_grad_norm_`: returns the global L2 norm of all `grads` and scales them by
/// `max_norm / (norm + 1e-6)` when that is below 1.
pub fn clip_grad_norm<B: Backend>(backend: &B, grads: &mut [&mut B::Buf], max_norm: f32) -> f32 {
    let total: f64 = grads.iter().map(|g| backend.sum_squares(g)).sum();
    let norm = total.sqrt() as f32;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            backend.scale(g, coef);
        }
    }
    norm
}

/// [`Backend::lora_forward_dropout`] as separate ops: `drop(x)` into `scratch`, then LoRA.
#[allow(clippy::too_many_arguments)]
pub fn lora_forward_dropout_unfused<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    drop: LoraDropout,
    scratch: &mut B::Buf,
    a: &B::Buf,
    b: &B::Buf,
    d: LoraDims,
    u: &mut B::Buf,
    y: &mut B::Buf,
) {
    be.dropout_forward(x, scratch, drop.p, drop.seed);
    be.lora_forward(scratch, a, b, d, u, y);
}

/// [`Backend::lora_backward_dropout`] as separate ops: `drop(x)` recomputed into
/// `scratch_x`, LoRA's input gradient into the zeroed `scratch_dx`, then through the mask.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_dropout_unfused<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    drop: LoraDropout,
    scratch_x: &mut B::Buf,
    scratch_dx: &mut B::Buf,
    a: &B::Buf,
    b: &B::Buf,
    u: &B::Buf,
    dy: &B::Buf,
    d: LoraDims,
    da: &mut B::Buf,
    db: &mut B::Buf,
    du: &mut B::Buf,
    dx: &mut B::Buf,
) {
    be.dropout_forward(x, scratch_x, drop.p, drop.seed);
    be.fill(scratch_dx, 0.0);
    be.lora_backward(scratch_x, a, b, u, dy, d, da, db, du, Some(scratch_dx));
    be.dropout_backward(scratch_dx, dx, drop.p, drop.seed);
}

/// The dropout mask shared by every backend: a 32-bit counter hash of `(seed, i)` (the
/// murmur3 finaliser of `i·φ ⊕ seed`) whose top 24 bits, read as a fraction in `[0, 1)`,
/// decide: the element is kept iff that value is `≥ p`. 32-bit lanes keep it cheap in SIMD
/// (16 lanes, no 64-bit multiplies); `i` wraps at 2³², far beyond any one buffer.
#[inline(always)]
pub fn dropout_keep(seed: u64, i: u64, p: f32) -> bool {
    dropout_keep32(dropout_seed32(seed), i as u32, p)
}

/// The 32 bits of a dropout seed the mask uses.
#[inline(always)]
pub(crate) fn dropout_seed32(seed: u64) -> u32 {
    (seed ^ (seed >> 32)) as u32
}

/// The multipliers of [`dropout_keep`]'s hash (SIMD versions of it use them too).
pub(crate) const DROPOUT_MUL: [u32; 3] = [0x9E37_79B9, 0x85EB_CA6B, 0xC2B2_AE35];

/// [`dropout_keep`] on the folded seed and the counter's low 32 bits.
#[inline(always)]
pub(crate) fn dropout_keep32(s: u32, i: u32, p: f32) -> bool {
    let mut z = i.wrapping_mul(DROPOUT_MUL[0]) ^ s;
    z ^= z >> 16;
    z = z.wrapping_mul(DROPOUT_MUL[1]);
    z ^= z >> 13;
    z = z.wrapping_mul(DROPOUT_MUL[2]);
    z ^= z >> 16;
    (z >> 8) as f32 * (1.0 / 16_777_216.0) >= p
}
