//! Every op of the CUDA backend against the plain CPU reference (`Cpu::reference()`) on fresh
//! random inputs, several shapes including ragged ones (not multiples of any tile size).
//! Outputs are poisoned with NaN before each run; a NaN (or infinity) where the reference
//! has a finite value fails. Relative error `‖got − want‖ / ‖want‖` must stay below 1e-5 on
//! f32 paths and 1e-2 on paths that round activations to f16/bf16 (the cuBLAS linear layers
//! with 16-bit weights). Without a GPU each test prints "SKIPPED: no CUDA device (...)".
#![cfg(feature = "cuda")]

use fedcdd_kernels::cuda::Cuda;
use fedcdd_kernels::{
    AdamW, AttnShape, Backend, Copy2d, Cpu, Gemm, LoraDims, RopeScaling, RopeShape, RopeTable, Sgd,
    WeightDType, WeightSource,
};
use half::{bf16, f16};

const F32_TOL: f64 = 1e-5;
const HALF_TOL: f64 = 1e-2;

fn cuda() -> Option<Cuda> {
    match Cuda::new(0) {
        Ok(c) => {
            println!("running on {}", c.name());
            Some(c)
        }
        Err(e) => {
            println!("SKIPPED: no CUDA device ({e})");
            None
        }
    }
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.uniform() * scale) as f32).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A fresh seed per run (inputs differ run to run; the seed is printed on failure).
fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

fn nan(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

fn down(c: &Cuda, b: &<Cuda as Backend>::Buf) -> Vec<f32> {
    let mut out = vec![0.0f32; c.buf_len(b)];
    c.download(b, &mut out);
    out
}

/// `‖got − want‖ / ‖want‖ < tol`; equal infinities are skipped, a non-finite value where
/// the reference is finite fails.
fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !w.is_finite() {
            assert!(
                g == w || (g.is_nan() && w.is_nan()),
                "{what}: element {i}: got {g}, want {w}"
            );
            continue;
        }
        assert!(g.is_finite(), "{what}: element {i} is {g}, want {w}");
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    let rel = if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    };
    assert!(rel < tol, "{what}: relative error {rel:e} >= {tol:e}");
}

fn source(values: &[f32], rows: usize, cols: usize, dtype: WeightDType) -> WeightSource {
    let bytes: Vec<u8> = match dtype {
        WeightDType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        WeightDType::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        WeightDType::Bf16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
    };
    WeightSource {
        bytes: std::sync::Arc::new(bytes),
        offset: 0,
        dtype,
        rows,
        cols,
    }
}

const DTYPES: [WeightDType; 3] = [WeightDType::F32, WeightDType::F16, WeightDType::Bf16];

#[test]
fn cuda_new_never_panics() {
    // On a machine without CUDA both are errors with a message; with one, 0 opens.
    match Cuda::new(0) {
        Ok(c) => println!("device 0: {}", c.name()),
        Err(e) => {
            assert!(!e.0.is_empty());
            println!("no device 0: {e}");
        }
    }
    assert!(Cuda::new(1 << 20).is_err());
}

#[test]
fn elementwise_ops_match_the_reference() {
    let Some(c) = cuda() else { return };
    let r = Cpu::reference();
    let s = seed();
    let mut rng = Rng(s);
    for n in [1usize, 17, 1000, 100_003] {
        let what = |op: &str| format!("{op} n={n} seed={s}");
        let x = rng.vec(n, 3.0);
        let y = rng.vec(n, 3.0);
        // fill
        let mut g = c.upload(&nan(n));
        c.fill(&mut g, 0.25);
        check(&what("fill"), &down(&c, &g), &vec![0.25; n], F32_TOL);
        // axpy, scale
        let mut want = y.clone();
        r.axpy(&mut want, 0.37, &x);
        let mut g = c.upload(&y);
        c.axpy(&mut g, 0.37, &c.upload(&x));
        check(&what("axpy"), &down(&c, &g), &want, F32_TOL);
        let mut want = x.clone();
        r.scale(&mut want, -1.7);
        let mut g = c.upload(&x);
        c.scale(&mut g, -1.7);
        check(&what("scale"), &down(&c, &g), &want, F32_TOL);
        // sum of squares
        let want = r.sum_squares(&x);
        let got = c.sum_squares(&c.upload(&x));
        assert!(
            (got - want).abs() <= 1e-12 * want,
            "{}: {got} vs {want}",
            what("sum_squares")
        );
        // dropout
        for p in [0.0f32, 0.1, 0.5] {
            let seed_d = rng.next_u64();
            let mut want = nan(n);
            r.dropout_forward(&x, &mut want, p, seed_d);
            let mut g = c.upload(&nan(n));
            c.dropout_forward(&c.upload(&x), &mut g, p, seed_d);
            check(
                &what(&format!("dropout_forward p={p}")),
                &down(&c, &g),
                &want,
                F32_TOL,
            );
            let mut want = y.clone();
            r.dropout_backward(&x, &mut want, p, seed_d);
            let mut g = c.upload(&y);
            c.dropout_backward(&c.upload(&x), &mut g, p, seed_d);
            check(
                &what(&format!("dropout_backward p={p}")),
                &down(&c, &g),
                &want,
                F32_TOL,
            );
        }
        // SwiGLU
        let dout = rng.vec(n, 1.0);
        let mut want = nan(n);
        r.swiglu_forward(&x, &y, &mut want);
        let mut g = c.upload(&nan(n));
        c.swiglu_forward(&c.upload(&x), &c.upload(&y), &mut g);
        check(&what("swiglu_forward"), &down(&c, &g), &want, F32_TOL);
        let (mut wg, mut wu) = (nan(n), nan(n));
        r.swiglu_backward(&x, &y, &dout, &mut wg, &mut wu);
        let (mut gg, mut gu) = (c.upload(&nan(n)), c.upload(&nan(n)));
        let (xd, yd, dd) = (c.upload(&x), c.upload(&y), c.upload(&dout));
        c.swiglu_backward(&xd, &yd, &dd, &mut gg, &mut gu);
        check(&what("swiglu_backward dgate"), &down(&c, &gg), &wg, F32_TOL);
        check(&what("swiglu_backward dup"), &down(&c, &gu), &wu, F32_TOL);
    }
    // strided copy, ragged runs
    for spec in [
        Copy2d {
            count: 3,
            len: 5,
            src_offset: 1,
            src_stride: 7,
            dst_offset: 2,
            dst_stride: 6,
        },
        Copy2d {
            count: 33,
            len: 129,
            src_offset: 0,
            src_stride: 129,
            dst_offset: 5,
            dst_stride: 200,
        },
    ] {
        let src = rng.vec(
            spec.src_offset + spec.count * spec.src_stride + spec.len,
            1.0,
        );
        let dst0 = rng.vec(
            spec.dst_offset + spec.count * spec.dst_stride + spec.len,
            1.0,
        );
        let mut want = dst0.clone();
        r.copy_2d(&src, &mut want, spec);
        let mut g = c.upload(&dst0);
        c.copy_2d(&c.upload(&src), &mut g, spec);
        check(&format!("copy_2d {spec:?}"), &down(&c, &g), &want, F32_TOL);
    }
}

#[test]
fn rmsnorm_matches_the_reference() {
    let Some(c) = cuda() else { return };
    let r = Cpu::reference();
    let s = seed();
    let mut rng = Rng(s);
    for (rows, dim) in [(1usize, 1usize), (3, 17), (33, 1000), (7, 4096), (2, 5120)] {
        for dtype in DTYPES {
            let what = format!("rmsnorm rows={rows} dim={dim} {dtype:?} seed={s}");
            let x = rng.vec(rows * dim, 2.0);
            let wv = rng.vec(dim, 1.0);
            let src = source(&wv, 1, dim, dtype);
            let (wc, wg) = (
                r.weight(&src).expect("cpu weight"),
                c.weight(&src).expect("weight"),
            );
            let (mut y, mut rs) = (nan(rows * dim), nan(rows));
            r.rmsnorm_forward(&x, &wc, &mut y, &mut rs, rows, dim, 1e-5);
            let xg = c.upload(&x);
            let (mut yg, mut rsg) = (c.upload(&nan(rows * dim)), c.upload(&nan(rows)));
            c.rmsnorm_forward(&xg, &wg, &mut yg, &mut rsg, rows, dim, 1e-5);
            check(&format!("{what} y"), &down(&c, &yg), &y, F32_TOL);
            check(&format!("{what} rstd"), &down(&c, &rsg), &rs, F32_TOL);
            let dy = rng.vec(rows * dim, 1.0);
            for acc in [false, true] {
                let dx0 = if acc {
                    rng.vec(rows * dim, 1.0)
                } else {
                    nan(rows * dim)
                };
                let mut want = dx0.clone();
                r.rmsnorm_backward(&dy, &x, &wc, &rs, &mut want, rows, dim, acc);
                let mut g = c.upload(&dx0);
                c.rmsnorm_backward(
                    &c.upload(&dy),
                    &xg,
                    &wg,
                    &c.upload(&rs),
                    &mut g,
                    rows,
                    dim,
                    acc,
                );
                check(
                    &format!("{what} dx acc={acc}"),
                    &down(&c, &g),
                    &want,
                    F32_TOL,
                );
            }
        }
    }
}

#[test]
fn rope_matches_the_reference() {
    let Some(c) = cuda() else { return };
    let r = Cpu::reference();
    let s = seed();
    let mut rng = Rng(s);
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    for (batch, seq, heads, head_dim, pos0, scaling) in [
        (1usize, 1usize, 1usize, 2usize, 0usize, RopeScaling::None),
        (2, 37, 3, 18, 5, RopeScaling::None),
        (1, 130, 8, 64, 0, llama3),
        (2, 65, 4, 128, 1000, llama3),
        (1, 9, 5, 34, 3, RopeScaling::Linear { factor: 2.0 }),
    ] {
        let table = RopeTable::new(head_dim, 500_000.0, scaling, pos0 + seq);
        let (cg, sg) = (c.upload(&table.cos), c.upload(&table.sin));
        let shape = RopeShape {
            batch,
            seq,
            heads,
            head_dim,
            pos0,
        };
        for inverse in [false, true] {
            let x = rng.vec(batch * seq * heads * head_dim, 2.0);
            let mut want = x.clone();
            r.rope(&mut want, &table.cos, &table.sin, shape, inverse);
            let mut g = c.upload(&x);
            c.rope(&mut g, &cg, &sg, shape, inverse);
            let what = format!("rope {shape:?} {scaling:?} inverse={inverse} seed={s}");
            check(&what, &down(&c, &g), &want, F32_TOL);
        }
    }
}

fn shape(
    batch: usize,
    q_len: usize,
    kv_len: usize,
    kv_stride: usize,
    heads: (usize, usize),
    head_dim: usize,
    q_pos0: usize,
) -> AttnShape {
    AttnShape {
        batch,
        q_len,
        kv_len,
        kv_stride,
        q_heads: heads.0,
        kv_heads: heads.1,
        head_dim,
        q_pos0,
        scale: 1.0 / (head_dim as f32).sqrt(),
    }
}

#[test]
fn attention_matches_the_reference() {
    let Some(c) = cuda() else { return };
    let r = Cpu::reference();
    let s = seed();
    let mut rng = Rng(s);
    let shapes = [
        shape(2, 37, 37, 37, (4, 4), 32, 0),
        shape(1, 130, 130, 130, (8, 4), 64, 0),
        shape(2, 65, 65, 65, (8, 2), 32, 0),
        shape(1, 200, 200, 200, (2, 1), 33, 0),
        shape(2, 19, 19, 24, (3, 3), 17, 0),
        shape(1, 70, 70, 70, (4, 2), 48, 0),
        shape(1, 9, 9, 9, (2, 2), 80, 0),
        shape(1, 1, 1, 1, (1, 1), 1, 0),
        shape(2, 1, 100, 128, (8, 4), 32, 99),
        shape(1, 3, 53, 60, (4, 1), 64, 50),
        shape(1, 64, 192, 256, (4, 2), 32, 128),
        shape(1, 20, 100, 100, (2, 1), 16, 10),
        shape(1, 5, 30, 40, (2, 2), 16, 40),
        shape(2, 40, 47, 50, (6, 2), 24, 7),
        shape(1, 30, 30, 30, (10, 2), 16, 0),
        shape(1, 1, 300, 320, (16, 2), 64, 299),
        shape(1, 20, 20, 20, (8, 1), 32, 0),
        shape(2, 256, 256, 256, (8, 4), 32, 0),
        shape(1, 100, 100, 100, (4, 2), 128, 0),
        shape(1, 45, 45, 50, (2, 1), 256, 0),
        shape(1, 8, 0, 4, (2, 1), 16, 0),
    ];
    for sh in shapes {
        let what = format!("attention {sh:?} seed={s}");
        let nq = sh.batch * sh.q_len * sh.q_heads * sh.head_dim;
        let nk = sh.batch * sh.kv_stride * sh.kv_heads * sh.head_dim;
        let nl = sh.batch * sh.q_heads * sh.q_len;
        let q = rng.vec(nq, 1.0);
        let mut k = rng.vec(nk, 1.0);
        let mut v = rng.vec(nk, 1.0);
        // Spare cache rows hold NaN the kernels must not read.
        for b in 0..sh.batch {
            for j in sh.kv_len..sh.kv_stride {
                let o = (b * sh.kv_stride + j) * sh.kv_heads * sh.head_dim;
                k[o..o + sh.kv_heads * sh.head_dim].fill(f32::NAN);
                v[o..o + sh.kv_heads * sh.head_dim].fill(f32::NAN);
            }
        }
        let dout = rng.vec(nq, 1.0);
        let (mut out, mut lse) = (nan(nq), nan(nl));
        r.attention_forward(&q, &k, &v, &mut out, &mut lse, sh);
        let (qg, kg, vg) = (c.upload(&q), c.upload(&k), c.upload(&v));
        let (mut og, mut lg) = (c.upload(&nan(nq)), c.upload(&nan(nl)));
        c.attention_forward(&qg, &kg, &vg, &mut og, &mut lg, sh);
        check(&format!("{what} out"), &down(&c, &og), &out, F32_TOL);
        check(&format!("{what} lse"), &down(&c, &lg), &lse, F32_TOL);

        let (mut dq, mut dk, mut dv) = (nan(nq), nan(nk), nan(nk));
        r.attention_backward(&q, &k, &v, &out, &lse, &dout, &mut dq, &mut dk, &mut dv, sh);
        let (mut dqg, mut dkg, mut dvg) =
            (c.upload(&nan(nq)), c.upload(&nan(nk)), c.upload(&nan(nk)));
        let (outg, lseg, doutg) = (c.upload(&out), c.upload(&lse), c.upload(&dout));
        c.attention_backward(
            &qg, &kg, &vg, &outg, &lseg, &doutg, &mut dqg, &mut dkg, &mut dvg, sh,
        );
        check(&format!("{what} dq"), &down(&c, &dqg), &dq, F32_TOL);
        check(&format!("{what} dk"), &down(&c, &dkg), &dk, F32_TOL);
        check(&format!("{what} dv"), &down(&c, &dvg), &dv, F32_TOL);
    }
}

#[test]
fn linear_and_matmul_match_the_reference() {
    let Some(c) = cuda() else { return };
    let r = Cpu::reference();
    let s = seed();
    let mut rng = Rng(s);
    let half_tol = if c.info().cublas { HALF_TOL } else { F32_TOL };
    for (m, n, k) in [
        (1usize, 1usize, 1usize),
        (37, 65, 129),
        (128, 256, 512),
        (5, 1000, 77),
    ] {
        for dtype in DTYPES {
            let tol = if dtype == WeightDType::F32 {
                F32_TOL
            } else {
                half_tol
            };
            let what = format!("linear m={m} n={n} k={k} {dtype:?} seed={s}");
            let x = rng.vec(m * k, 1.0);
            let wv = rng.vec(n * k, 1.0);
            let src = source(&wv, n, k, dtype);
            let (wc, wg) = (
                r.weight(&src).expect("cpu weight"),
                c.weight(&src).expect("weight"),
            );
            let dy = rng.vec(m * n, 1.0);
            for acc in [false, true] {
                let y0 = if acc { rng.vec(m * n, 1.0) } else { nan(m * n) };
                let mut want = y0.clone();
                r.linear_forward(&x, &wc, &mut want, m, acc);
                let mut g = c.upload(&y0);
                c.linear_forward(&c.upload(&x), &wg, &mut g, m, acc);
                check(
                    &format!("{what} forward acc={acc}"),
                    &down(&c, &g),
                    &want,
                    tol,
                );
                let dx0 = if acc { rng.vec(m * k, 1.0) } else { nan(m * k) };
                let mut want = dx0.clone();
                r.linear_backward_input(&dy, &wc, &mut want, m, acc);
                let mut g = c.upload(&dx0);
                c.linear_backward_input(&c.upload(&dy), &wg, &mut g, m, acc);
                check(
                    &format!("{what} backward acc={acc}"),
                    &down(&c, &g),
                    &want,
                    tol,
                );
            }
        }
    }
    for (m, n, k) in [
        (1usize, 1usize, 1usize),
        (17, 33, 65),
        (64, 64, 64),
        (130, 70, 300),
        (8, 4096, 2000),
    ] {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            for (alpha, beta) in [(1.0f32, 0.0f32), (0.5, 1.0), (-2.0, 0.25)] {
                let g = Gemm {
                    m,
                    n,
                    k,
                    trans_a,
                    trans_b,
                    alpha,
                    beta,
                };
                let a = rng.vec(m * k, 1.0);
                let b = rng.vec(k * n, 1.0);
                let c0 = if beta == 0.0 {
                    nan(m * n)
                } else {
                    rng.vec(m * n, 1.0)
                };
                let mut want = c0.clone();
                r.matmul(g, &a, &b, &mut want);
                let mut cg = c.upload(&c0);
                c.matmul(g, &c.upload(&a), &c.upload(&b), &mut cg);
                check(
                    &format!("matmul {g:?} seed={s}"),
                    &down(&c, &cg),
                    &want,
                    F32_TOL,
                );
            }
        }
    }
}

#[test]
fn lora_matches_the_reference() {
    let Some(c) = cuda() else { return };
    let r = Cpu::reference();
    let s = seed();
    let mut rng = Rng(s);
    for (m, k, n, rank) in [
        (1usize, 1usize, 1usize, 1usize),
        (37, 65, 129, 8),
        (300, 256, 512, 16),
        (2048, 512, 384, 64),
        (4096, 128, 96, 4),
    ] {
        let d = LoraDims {
            m,
            k,
            n,
            r: rank,
            scale: 2.0,
        };
        let what = format!("lora {d:?} seed={s}");
        let x = rng.vec(m * k, 1.0);
        let a = rng.vec(rank * k, 0.5);
        let b = rng.vec(n * rank, 0.5);
        let y0 = rng.vec(m * n, 1.0);
        let (mut u, mut y) = (nan(m * rank), y0.clone());
        r.lora_forward(&x, &a, &b, d, &mut u, &mut y);
        let (xg, ag, bg) = (c.upload(&x), c.upload(&a), c.upload(&b));
        let (mut ug, mut yg) = (c.upload(&nan(m * rank)), c.upload(&y0));
        c.lora_forward(&xg, &ag, &bg, d, &mut ug, &mut yg);
        check(&format!("{what} u"), &down(&c, &ug), &u, F32_TOL);
        check(&format!("{what} y"), &down(&c, &yg), &y, F32_TOL);
        let dy = rng.vec(m * n, 1.0);
        for with_dx in [false, true] {
            let (da0, db0, dx0) = (
                rng.vec(rank * k, 1.0),
                rng.vec(n * rank, 1.0),
                rng.vec(m * k, 1.0),
            );
            let (mut da, mut db, mut du, mut dx) =
                (da0.clone(), db0.clone(), nan(m * rank), dx0.clone());
            r.lora_backward(
                &x,
                &a,
                &b,
                &u,
                &dy,
                d,
                &mut da,
                &mut db,
                &mut du,
                with_dx.then_some(&mut dx),
            );
            let (mut dag, mut dbg, mut dug, mut dxg) = (
                c.upload(&da0),
                c.upload(&db0),
                c.upload(&nan(m * rank)),
                c.upload(&dx0),
            );
            let ugu = c.upload(&u);
            c.lora_backward(
                &xg,
                &ag,
                &bg,
                &ugu,
                &c.upload(&dy),
                d,
                &mut dag,
                &mut dbg,
                &mut dug,
                with_dx.then_some(&mut dxg),
            );
            check(
                &format!("{what} dA dx={with_dx}"),
                &down(&c, &dag),
                &da,
                F32_TOL,
            );
            check(
                &format!("{what} dB dx={with_dx}"),
                &down(&c, &dbg),
                &db,
                F32_TOL,
            );
            check(
                &format!("{what} du dx={with_dx}"),
                &down(&c, &dug),
                &du,
                F32_TOL,
            );
            check(
                &format!("{what} dx dx={with_dx}"),
                &down(&c, &dxg),
                &dx,
                F32_TOL,
            );
        }
    }
}

#[test]
fn embedding_and_cross_entropy_match_the_reference() {
    let Some(c) = cuda() else { return };
    let r = Cpu::reference();
    let s = seed();
    let mut rng = Rng(s);
    for (vocab, dim, tokens) in [(1usize, 1usize, 1usize), (17, 33, 50), (1000, 4096, 37)] {
        for dtype in DTYPES {
            let what =
                format!("embedding vocab={vocab} dim={dim} tokens={tokens} {dtype:?} seed={s}");
            let table = rng.vec(vocab * dim, 1.0);
            let src = source(&table, vocab, dim, dtype);
            let (tc, tg) = (
                r.weight(&src).expect("cpu weight"),
                c.weight(&src).expect("weight"),
            );
            // repeated ids on purpose (the backward adds them up)
            let ids: Vec<i32> = (0..tokens)
                .map(|_| rng.below(vocab.min(7)) as i32)
                .collect();
            let idg = c.upload_ids(&ids);
            let mut want = nan(tokens * dim);
            r.embedding_forward(&tc, &ids, &mut want);
            let mut g = c.upload(&nan(tokens * dim));
            c.embedding_forward(&tg, &idg, &mut g);
            check(&format!("{what} forward"), &down(&c, &g), &want, F32_TOL);
            let dout = rng.vec(tokens * dim, 1.0);
            let dt0 = rng.vec(vocab * dim, 1.0);
            let mut want = dt0.clone();
            r.embedding_backward(&ids, &dout, &mut want);
            let mut g = c.upload(&dt0);
            c.embedding_backward(&idg, &c.upload(&dout), &mut g);
            check(&format!("{what} backward"), &down(&c, &g), &want, F32_TOL);
        }
    }
    for (rows, vocab) in [(1usize, 5usize), (7, 1000), (33, 32_003), (4, 128_256)] {
        for grad in [None, Some(1.0 / rows as f32)] {
            let what = format!("cross_entropy rows={rows} vocab={vocab} grad={grad:?} seed={s}");
            let logits = rng.vec(rows * vocab, 8.0);
            let targets: Vec<i32> = (0..rows)
                .map(|i| {
                    if i % 3 == 2 {
                        -100
                    } else {
                        rng.below(vocab) as i32
                    }
                })
                .collect();
            let tg = c.upload_ids(&targets);
            let (mut wl, mut wr) = (logits.clone(), nan(rows));
            let want = r.cross_entropy(&mut wl, &targets, &mut wr, vocab, -100, grad);
            let (mut gl, mut gr) = (c.upload(&logits), c.upload(&nan(rows)));
            let got = c.cross_entropy(&mut gl, &tg, &mut gr, vocab, -100, grad);
            assert_eq!(got.count, want.count, "{what}: count");
            assert!(
                (got.sum - want.sum).abs() <= 1e-9 * want.sum.abs().max(1.0),
                "{what}: sum {} vs {}",
                got.sum,
                want.sum
            );
            check(&format!("{what} row_loss"), &down(&c, &gr), &wr, F32_TOL);
            check(&format!("{what} logits"), &down(&c, &gl), &wl, F32_TOL);
        }
    }
}

#[test]
fn optimizers_match_the_reference() {
    let Some(c) = cuda() else { return };
    let r = Cpu::reference();
    let s = seed();
    let mut rng = Rng(s);
    for n in [1usize, 1000, 100_003] {
        for hp in [
            AdamW {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
            },
            AdamW {
                lr: 2e-4,
                beta1: 0.3,
                beta2: 0.95,
                eps: 1e-6,
                weight_decay: 0.0,
            },
        ] {
            let what = format!("adamw n={n} {hp:?} seed={s}");
            let (mut p, mut m, mut v) = (rng.vec(n, 1.0), vec![0.0; n], vec![0.0; n]);
            let (mut pg, mut mg, mut vg) = (c.upload(&p), c.upload(&m), c.upload(&v));
            for step in 1..=5u64 {
                let g = rng.vec(n, 1.0);
                r.adamw_step(&mut p, &g, &mut m, &mut v, hp, step);
                c.adamw_step(&mut pg, &c.upload(&g), &mut mg, &mut vg, hp, step);
            }
            check(&format!("{what} param"), &down(&c, &pg), &p, F32_TOL);
            check(&format!("{what} m"), &down(&c, &mg), &m, F32_TOL);
            check(&format!("{what} v"), &down(&c, &vg), &v, F32_TOL);
        }
        for hp in [
            Sgd {
                lr: 0.1,
                momentum: 0.0,
                dampening: 0.0,
                weight_decay: 0.0,
                nesterov: false,
            },
            Sgd {
                lr: 0.05,
                momentum: 0.9,
                dampening: 0.1,
                weight_decay: 1e-3,
                nesterov: false,
            },
            Sgd {
                lr: 0.05,
                momentum: 0.9,
                dampening: 0.0,
                weight_decay: 0.0,
                nesterov: true,
            },
        ] {
            let what = format!("sgd n={n} {hp:?} seed={s}");
            let (mut p, mut buf) = (rng.vec(n, 1.0), nan(n));
            let (mut pg, mut bg) = (c.upload(&p), c.upload(&nan(n)));
            for step in 0..4 {
                let g = rng.vec(n, 1.0);
                r.sgd_step(&mut p, &g, &mut buf, hp, step == 0);
                c.sgd_step(&mut pg, &c.upload(&g), &mut bg, hp, step == 0);
            }
            check(&format!("{what} param"), &down(&c, &pg), &p, F32_TOL);
        }
    }
}

#[test]
fn kernel_benchmark_runs_on_small_sizes() {
    let opts = fedcdd_kernels::cuda::bench::BenchOptions {
        iters: 2,
        tokens: 256,
        dim: 256,
        hidden: 512,
        vocab: 1000,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 64,
        seq: 128,
        rank: 8,
        ..Default::default()
    };
    match fedcdd_kernels::cuda::bench::run(&opts) {
        Ok(table) => {
            println!("{table}");
            assert!(table.contains("attention_backward"));
        }
        Err(e) => println!("SKIPPED: no CUDA device ({e})"),
    }
}
