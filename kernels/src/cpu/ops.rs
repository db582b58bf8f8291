//! Fast ops: the reference's arithmetic in vectorisable chunks, each kernel compiled for
//! every [`Isa`] tier (AVX-512, AVX2+FMA, baseline) and picked at run time, spread over the
//! caller's rayon pool (the backend runs them inside `Cpu::install`; no op starts threads).
//!
//! Elementwise ops, RoPE, embeddings and the optimizers give the reference's bits exactly;
//! reductions (RMSNorm, cross-entropy, attention) and the SwiGLU exponential differ from it
//! by rounding only. Every result is the same for any number of threads (partial sums are
//! combined in a fixed order). Attention is flash-style (see the `attention` module):
//! causal GQA on 64x64 tiles with an online softmax, a saved log-sum-exp per query, and a
//! backward that recomputes the probabilities tile by tile.
mod attention;
mod scratch;
mod simd;

pub use simd::{Isa, detected_isa, isa, isa_cap, set_max_isa};

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::reference_ops::{self as r, AdamScalars, SgdScalars};
use super::{CpuWeight, WeightSlice};
use crate::{AdamW, AttnShape, LossSum, RopeShape, Sgd, dropout_keep};
use simd::{LANES, Mode, multiversion};

/// Elements per parallel task of the elementwise ops (64 KiB of f32).
pub(crate) const CHUNK: usize = 1 << 14;

/// Rows per parallel task when each row holds `dim` floats (about one [`CHUNK`]).
fn rows_per_task(dim: usize) -> usize {
    (CHUNK / dim.max(1)).max(1)
}

// ---- elementwise -------------------------------------------------------------------------

multiversion! { fn axpy_chunk(y: &mut [f32], a: f32, x: &[f32]) = axpy_impl; }
#[inline(always)]
fn axpy_impl<M: Mode>(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    r::check_same_len("axpy", ("y", y.len()), ("x", x.len()));
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| axpy_chunk(y, a, x));
}

multiversion! { fn scale_chunk(x: &mut [f32], a: f32) = scale_impl; }
#[inline(always)]
fn scale_impl<M: Mode>(x: &mut [f32], a: f32) {
    for v in x.iter_mut() {
        *v *= a;
    }
}

pub fn scale(x: &mut [f32], a: f32) {
    x.par_chunks_mut(CHUNK).for_each(|x| scale_chunk(x, a));
}

multiversion! { fn sum_squares_chunk(x: &[f32]) -> f64 = sum_squares_impl; }
#[inline(always)]
fn sum_squares_impl<M: Mode>(x: &[f32]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let (chunks, tail) = x.as_chunks::<LANES>();
    for c in chunks {
        for l in 0..LANES {
            let v = c[l] as f64;
            acc[l] += v * v;
        }
    }
    let tail: f64 = tail.iter().map(|&v| v as f64 * v as f64).sum();
    acc.iter().sum::<f64>() + tail
}

/// `Σ x²` in f64: per-chunk partial sums added in chunk order (the same bits for any
/// number of threads).
pub fn sum_squares(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x.par_chunks(CHUNK).map(sum_squares_chunk).collect();
    parts.iter().sum()
}

multiversion! {
    fn dropout_forward_chunk(x: &[f32], out: &mut [f32], p: f32, seed: u64, first: u64, scale: f32)
        = dropout_forward_impl;
}
#[inline(always)]
fn dropout_forward_impl<M: Mode>(
    x: &[f32],
    out: &mut [f32],
    p: f32,
    seed: u64,
    first: u64,
    scale: f32,
) {
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        *o = if dropout_keep(seed, first + i as u64, p) {
            v * scale
        } else {
            0.0
        };
    }
}

/// Runs `f(src, dst, first)` on matching [`CHUNK`]s of `src` and `dst` in parallel, `first`
/// being the index of the chunk's first element (the dropout mask's counter).
fn for_chunks(src: &[f32], dst: &mut [f32], f: impl Fn(&[f32], &mut [f32], u64) + Sync + Send) {
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (d, s))| f(s, d, (c * CHUNK) as u64));
}

pub fn dropout_forward(x: &[f32], out: &mut [f32], p: f32, seed: u64) {
    let scale = r::check_dropout("dropout_forward", ("x", x.len()), ("out", out.len()), p);
    if p == 0.0 {
        for_chunks(x, out, |x, o, _| o.copy_from_slice(x));
        return;
    }
    for_chunks(x, out, |x, o, first| {
        dropout_forward_chunk(x, o, p, seed, first, scale)
    });
}

multiversion! {
    fn dropout_backward_chunk(dy: &[f32], dx: &mut [f32], p: f32, seed: u64, first: u64, scale: f32)
        = dropout_backward_impl;
}
#[inline(always)]
fn dropout_backward_impl<M: Mode>(
    dy: &[f32],
    dx: &mut [f32],
    p: f32,
    seed: u64,
    first: u64,
    scale: f32,
) {
    if p == 0.0 {
        for (d, &g) in dx.iter_mut().zip(dy) {
            *d += g;
        }
        return;
    }
    for (i, (d, &g)) in dx.iter_mut().zip(dy).enumerate() {
        // Dropped elements keep dx as it is (not `+= 0`, which would turn -0 into +0).
        if dropout_keep(seed, first + i as u64, p) {
            *d += g * scale;
        }
    }
}

pub fn dropout_backward(dy: &[f32], dx: &mut [f32], p: f32, seed: u64) {
    let scale = r::check_dropout("dropout_backward", ("dy", dy.len()), ("dx", dx.len()), p);
    for_chunks(dy, dx, |dy, dx, first| {
        dropout_backward_chunk(dy, dx, p, seed, first, scale)
    });
}

// ---- RMSNorm -----------------------------------------------------------------------------

multiversion! {
    fn rmsnorm_forward_rows(x: &[f32], w: &[f32], y: &mut [f32], rstd: &mut [f32], eps: f32)
        = rmsnorm_forward_impl;
}
#[inline(always)]
fn rmsnorm_forward_impl<M: Mode>(x: &[f32], w: &[f32], y: &mut [f32], rstd: &mut [f32], eps: f32) {
    let dim = w.len();
    for ((x, y), rs) in x
        .chunks_exact(dim)
        .zip(y.chunks_exact_mut(dim))
        .zip(rstd.iter_mut())
    {
        let ss = simd::dot::<M>(x, x);
        let s = 1.0 / (ss / dim as f32 + eps).sqrt();
        *rs = s;
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = w * (x * s);
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward(
    x: &[f32],
    w: &CpuWeight,
    y: &mut [f32],
    rstd: &mut [f32],
    rows: usize,
    dim: usize,
    eps: f32,
) {
    let op = "rmsnorm_forward";
    r::check_norm(op, &[("x", x.len()), ("y", y.len())], rstd.len(), rows, dim);
    let w = r::norm_weight(op, w, dim);
    if rows == 0 || dim == 0 {
        // Nothing to split (and dim = 0 gives the reference's 0/0).
        return r::rmsnorm_forward_generic(x, &w, y, rstd, rows, dim, eps);
    }
    let rb = rows_per_task(dim);
    y.par_chunks_mut(rb * dim)
        .zip(x.par_chunks(rb * dim))
        .zip(rstd.par_chunks_mut(rb))
        .for_each(|((y, x), rs)| rmsnorm_forward_rows(x, &w, y, rs, eps));
}

multiversion! {
    fn rmsnorm_backward_rows(
        dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32], dx: &mut [f32], accumulate: bool,
    ) = rmsnorm_backward_impl;
}
#[inline(always)]
fn rmsnorm_backward_impl<M: Mode>(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    accumulate: bool,
) {
    let dim = w.len();
    let rows = dx
        .chunks_exact_mut(dim)
        .zip(dy.chunks_exact(dim))
        .zip(x.chunks_exact(dim));
    for (((dx, dy), x), &rs) in rows.zip(rstd) {
        let mut acc = [0.0f32; LANES];
        let ((cd, td), (cx, tx), (cw, tw)) = (
            dy.as_chunks::<LANES>(),
            x.as_chunks::<LANES>(),
            w.as_chunks::<LANES>(),
        );
        for ((d, x), w) in cd.iter().zip(cx).zip(cw) {
            for l in 0..LANES {
                acc[l] = M::fma(d[l] * w[l], x[l], acc[l]);
            }
        }
        let mut tail = 0.0f32;
        for ((d, x), w) in td.iter().zip(tx).zip(tw) {
            tail = M::fma(d * w, *x, tail);
        }
        let coef = (simd::hsum(&acc) + tail) * rs * rs / dim as f32;
        if accumulate {
            for (((o, &d), &x), &w) in dx.iter_mut().zip(dy).zip(x).zip(w) {
                *o += rs * (w * d - x * coef);
            }
        } else {
            for (((o, &d), &x), &w) in dx.iter_mut().zip(dy).zip(x).zip(w) {
                *o = rs * (w * d - x * coef);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dy: &[f32],
    x: &[f32],
    w: &CpuWeight,
    rstd: &[f32],
    dx: &mut [f32],
    rows: usize,
    dim: usize,
    accumulate: bool,
) {
    let op = "rmsnorm_backward";
    let bufs = [("dy", dy.len()), ("x", x.len()), ("dx", dx.len())];
    r::check_norm(op, &bufs, rstd.len(), rows, dim);
    let w = r::norm_weight(op, w, dim);
    if rows == 0 || dim == 0 {
        return;
    }
    let rb = rows_per_task(dim);
    dx.par_chunks_mut(rb * dim)
        .zip(dy.par_chunks(rb * dim))
        .zip(x.par_chunks(rb * dim))
        .zip(rstd.par_chunks(rb))
        .for_each(|(((dx, dy), x), rs)| rmsnorm_backward_rows(dy, x, &w, rs, dx, accumulate));
}

// ---- RoPE --------------------------------------------------------------------------------

multiversion! {
    fn rope_rows(x: &mut [f32], cos: &[f32], sin: &[f32], heads: usize, inverse: bool)
        = rope_impl;
}
/// Rotates the heads of one token row (`x`: `[heads, d]`) by the angles of one position.
#[inline(always)]
fn rope_impl<M: Mode>(x: &mut [f32], cos: &[f32], sin: &[f32], heads: usize, inverse: bool) {
    let half = cos.len();
    let sin = &sin[..half];
    for head in x.chunks_exact_mut(2 * half).take(heads) {
        let (a, b) = head.split_at_mut(half);
        // Indexing with one bound for all four slices lets LLVM drop the checks and
        // vectorise (a four-way zip stayed scalar).
        if inverse {
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] + x2 * sin[i];
                b[i] = x2 * cos[i] - x1 * sin[i];
            }
        } else {
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], s: RopeShape, inverse: bool) {
    let half = r::check_rope(x.len(), cos.len(), sin.len(), s);
    let row = s.heads * s.head_dim;
    if x.is_empty() {
        return;
    }
    x.par_chunks_mut(row)
        .enumerate()
        .with_min_len(8)
        .for_each(|(bt, x)| {
            let pos = s.pos0 + bt % s.seq;
            let (c, sn) = (
                &cos[pos * half..(pos + 1) * half],
                &sin[pos * half..(pos + 1) * half],
            );
            rope_rows(x, c, sn, s.heads, inverse)
        });
}

// ---- attention ---------------------------------------------------------------------------

pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
    s: AttnShape,
) {
    attention::forward(q, k, v, out, lse, s)
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    s: AttnShape,
) {
    attention::backward(q, k, v, out, lse, dout, dq, dk, dv, s)
}

// ---- SwiGLU ------------------------------------------------------------------------------

multiversion! { fn swiglu_forward_chunk(gate: &[f32], up: &[f32], out: &mut [f32]) = swiglu_forward_impl; }
#[inline(always)]
fn swiglu_forward_impl<M: Mode>(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + simd::exp::<M>(-g)) * u;
    }
}

pub fn swiglu_forward(gate: &[f32], up: &[f32], out: &mut [f32]) {
    r::check_swiglu_forward(gate.len(), up.len(), out.len());
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((o, g), u)| swiglu_forward_chunk(g, u, o));
}

multiversion! {
    fn swiglu_backward_chunk(gate: &[f32], up: &[f32], dout: &[f32], dgate: &mut [f32], dup: &mut [f32])
        = swiglu_backward_impl;
}
#[inline(always)]
fn swiglu_backward_impl<M: Mode>(
    gate: &[f32],
    up: &[f32],
    dout: &[f32],
    dgate: &mut [f32],
    dup: &mut [f32],
) {
    let it = dgate
        .iter_mut()
        .zip(dup.iter_mut())
        .zip(gate)
        .zip(up)
        .zip(dout);
    for ((((dg, du), &g), &u), &d) in it {
        let sig = 1.0 / (1.0 + simd::exp::<M>(-g));
        *dg = d * u * sig * (1.0 + g * (1.0 - sig));
        *du = d * (g * sig);
    }
}

pub fn swiglu_backward(gate: &[f32], up: &[f32], dout: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    r::check_swiglu_backward(gate.len(), up.len(), dout.len(), dgate.len(), dup.len());
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .zip(dout.par_chunks(CHUNK))
        .for_each(|((((dg, du), g), u), d)| swiglu_backward_chunk(g, u, d, dg, du));
}

// ---- embedding and loss ------------------------------------------------------------------

pub fn embedding_forward(table: &CpuWeight, ids: &[i32], out: &mut [f32]) {
    let dim = r::check_embedding_forward(table, ids, out.len());
    if out.is_empty() {
        return;
    }
    let slice = table.slice();
    out.par_chunks_mut(dim)
        .zip(ids.par_iter())
        .with_min_len(8)
        .for_each(|(o, &id)| {
            let row = id as usize * dim..(id as usize + 1) * dim;
            match slice {
                WeightSlice::F32(s) => o.copy_from_slice(&s[row]),
                WeightSlice::F16(s) => s[row].convert_to_f32_slice(o),
                WeightSlice::Bf16(s) => s[row].convert_to_f32_slice(o),
            }
        });
}

multiversion! {
    fn scatter_add_rows(block: &mut [f32], first: usize, ids: &[i32], dout: &[f32], dim: usize)
        = scatter_add_rows_impl;
}
/// `block` holds table rows `first..`; adds `dout[t]` to the row of every `ids[t]` in it.
#[inline(always)]
fn scatter_add_rows_impl<M: Mode>(
    block: &mut [f32],
    first: usize,
    ids: &[i32],
    dout: &[f32],
    dim: usize,
) {
    let rows = first..first + block.len() / dim;
    for (t, &id) in ids.iter().enumerate() {
        let id = id as usize;
        if rows.contains(&id) {
            let o = (id - first) * dim;
            let (y, x) = (&mut block[o..o + dim], &dout[t * dim..(t + 1) * dim]);
            for (y, &x) in y.iter_mut().zip(x) {
                *y += x;
            }
        }
    }
}

/// Scatter-add without write conflicts: each task owns a range of table rows and adds, in
/// token order, the tokens whose id falls in it (the reference's order, so the same bits).
pub fn embedding_backward(ids: &[i32], dout: &[f32], dtable: &mut [f32]) {
    let (vocab, dim) = r::check_embedding_backward(ids, dout.len(), dtable.len());
    if vocab == 0 || dim == 0 {
        return;
    }
    let tasks = 4 * rayon::current_num_threads();
    let rows = vocab.div_ceil(tasks).max(1);
    dtable
        .par_chunks_mut(rows * dim)
        .enumerate()
        .for_each(|(c, block)| scatter_add_rows(block, c * rows, ids, dout, dim));
}

multiversion! {
    fn cross_entropy_row(row: &mut [f32], target: usize, grad_scale: Option<f32>) -> f64
        = cross_entropy_row_impl;
}
/// One row's loss (f64); with `grad_scale = g` the row becomes `g · (softmax − onehot)`.
#[inline(always)]
fn cross_entropy_row_impl<M: Mode>(row: &mut [f32], target: usize, grad_scale: Option<f32>) -> f64 {
    let m = simd::max::<M>(row);
    let x_t = row[target];
    // Exponentials summed in f32 lanes within blocks, blocks summed in f64.
    let mut sum = 0.0f64;
    for block in row.chunks_mut(1024) {
        let mut acc = [0.0f32; LANES];
        let (chunks, tail_x) = block.as_chunks_mut::<LANES>();
        if grad_scale.is_some() {
            for c in chunks {
                for l in 0..LANES {
                    let e = simd::exp::<M>(c[l] - m);
                    c[l] = e;
                    acc[l] += e;
                }
            }
        } else {
            for c in chunks.iter() {
                for l in 0..LANES {
                    acc[l] += simd::exp::<M>(c[l] - m);
                }
            }
        }
        let mut tail = 0.0f32;
        for x in tail_x {
            let e = simd::exp::<M>(*x - m);
            if grad_scale.is_some() {
                *x = e;
            }
            tail += e;
        }
        sum += (simd::hsum(&acc) + tail) as f64;
    }
    let lse = m as f64 + sum.ln();
    if let Some(g) = grad_scale {
        let k = (g as f64 / sum) as f32;
        for x in row.iter_mut() {
            *x *= k;
        }
        row[target] = (g as f64 * ((x_t as f64 - lse).exp() - 1.0)) as f32;
    }
    lse - x_t as f64
}

pub fn cross_entropy(
    logits: &mut [f32],
    targets: &[i32],
    row_loss: &mut [f32],
    vocab: usize,
    ignore_index: i32,
    grad_scale: Option<f32>,
) -> LossSum {
    r::check_cross_entropy(logits.len(), targets, row_loss.len(), vocab, ignore_index);
    let count = targets.iter().filter(|&&t| t != ignore_index).count();
    if vocab == 0 {
        // Every target is ignore_index (check_cross_entropy): nothing counts.
        row_loss.fill(0.0);
        return LossSum { sum: 0.0, count };
    }
    let losses: Vec<f64> = logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .zip(row_loss.par_iter_mut())
        .map(|((row, &t), rl)| {
            if t == ignore_index {
                *rl = 0.0;
                if grad_scale.is_some() {
                    row.fill(0.0);
                }
                0.0
            } else {
                let loss = cross_entropy_row(row, t as usize, grad_scale);
                *rl = loss as f32;
                loss
            }
        })
        .collect();
    let mut sum = 0.0f64;
    for (&l, &t) in losses.iter().zip(targets) {
        if t != ignore_index {
            sum += l;
        }
    }
    LossSum { sum, count }
}

// ---- optimizers --------------------------------------------------------------------------

multiversion! {
    fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamScalars)
        = adamw_impl;
}
#[inline(always)]
fn adamw_impl<M: Mode>(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamScalars) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        k.update(p, g, m, v);
    }
}

pub fn adamw_step(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    hp: AdamW,
    step: u64,
) {
    r::check_optimizer("adamw_step", param.len(), grad.len(), &[m.len(), v.len()]);
    let k = AdamScalars::new(hp, step);
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| adamw_chunk(p, g, m, v, &k));
}

multiversion! {
    fn sgd_chunk(p: &mut [f32], g: &[f32], buf: &mut [f32], k: &SgdScalars) = sgd_impl;
}
#[inline(always)]
fn sgd_impl<M: Mode>(p: &mut [f32], g: &[f32], buf: &mut [f32], k: &SgdScalars) {
    if k.uses_buffer() {
        for ((p, &g), b) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
            k.update(p, g, b);
        }
    } else {
        let mut unused = 0.0;
        for (p, &g) in p.iter_mut().zip(g) {
            k.update(p, g, &mut unused);
        }
    }
}

pub fn sgd_step(param: &mut [f32], grad: &[f32], momentum_buf: &mut [f32], hp: Sgd, first: bool) {
    let k = SgdScalars::new(hp, first);
    if k.uses_buffer() {
        r::check_optimizer("sgd_step", param.len(), grad.len(), &[momentum_buf.len()]);
        param
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(momentum_buf.par_chunks_mut(CHUNK))
            .for_each(|((p, g), b)| sgd_chunk(p, g, b, &k));
    } else {
        r::check_optimizer("sgd_step", param.len(), grad.len(), &[]);
        param
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .for_each(|(p, g)| sgd_chunk(p, g, &mut [], &k));
    }
}
