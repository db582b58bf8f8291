//! The CPU backend's non-matmul ops: the fast path against the plain reference (through the
//! `Backend` trait, 1 and 2 threads), the reference's gradients against central finite
//! differences in f64, attention against a naive full-softmax implementation, and the
//! optimizers against PyTorch's formulas.

use fedcdd_kernels::cpu::reference_ops as reference;
use fedcdd_kernels::{
    AdamW, AttnShape, Backend, Cpu, CpuWeight, LoraDims, LoraDropout, Profiled, RopeScaling,
    RopeShape, RopeTable, Sgd, WeightDType, WeightSource, dropout_keep,
};
use half::{bf16, f16};

// ---- helpers -----------------------------------------------------------------------------

/// SplitMix64: a small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.uniform() * scale) as f32).collect()
    }
    fn vec64(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The fast backends (1 and 2 threads).
fn fast_backends() -> Vec<Cpu> {
    vec![
        Cpu::new(1).expect("1 thread"),
        Cpu::new(2).expect("2 threads"),
    ]
}

fn max_abs<T: Copy + Into<f64>>(x: &[T]) -> f64 {
    x.iter()
        .map(|&v| v.into().abs())
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
}

/// `|got − want| ≤ tol · max(|want|_∞, floor)` element by element (equal infinities pass;
/// the scale is over the finite values).
fn assert_close<A: Copy + Into<f64>, B: Copy + Into<f64>>(
    got: &[A],
    want: &[B],
    tol: f64,
    floor: f64,
    what: &str,
) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = max_abs(want).max(floor);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.into(), w.into());
        assert!(
            g == w || (g - w).abs() <= tol * scale,
            "{what}: element {i}: got {g}, want {w} (tolerance {tol} x {scale})"
        );
    }
}

fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

fn weight(values: &[f32], dtype: WeightDType) -> CpuWeight {
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
    let src = WeightSource {
        bytes: std::sync::Arc::new(bytes),
        offset: 0,
        dtype,
        rows: 1,
        cols: values.len(),
    };
    CpuWeight::new(&src).expect("weight")
}

fn matrix_weight(values: &[f32], rows: usize, cols: usize, dtype: WeightDType) -> CpuWeight {
    let mut w = weight(values, dtype);
    // Same bytes, viewed as [rows, cols].
    w.rows = rows;
    w.cols = cols;
    w
}

/// Central finite differences of `loss` at `x`, coordinate by coordinate.
fn finite_differences(x: &[f64], h: f64, mut loss: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let up = loss(&xp);
            xp[i] = orig - h;
            let down = loss(&xp);
            xp[i] = orig;
            (up - down) / (2.0 * h)
        })
        .collect()
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

// ---- elementwise -------------------------------------------------------------------------

const SIZES: [usize; 6] = [0, 1, 17, 1000, 16_385, 100_003];

#[test]
fn axpy_scale_sum_squares_match_the_reference() {
    let mut rng = Rng(1);
    let r = Cpu::reference();
    for &n in &SIZES {
        let x = rng.vec(n, 3.0);
        let y = rng.vec(n, 3.0);
        let mut want_y = y.clone();
        r.axpy(&mut want_y, 0.37, &x);
        let mut want_x = x.clone();
        r.scale(&mut want_x, -1.7);
        let want_ss = r.sum_squares(&x);
        let exact: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        assert!(
            (want_ss - exact).abs() <= 1e-12 * exact.max(1e-300),
            "reference sum_squares"
        );
        for b in fast_backends() {
            let mut got_y = y.clone();
            b.axpy(&mut got_y, 0.37, &x);
            assert_bits(&got_y, &want_y, &format!("axpy n={n} {}", b.name()));
            let mut got_x = x.clone();
            b.scale(&mut got_x, -1.7);
            assert_bits(&got_x, &want_x, &format!("scale n={n} {}", b.name()));
            let got_ss = b.sum_squares(&x);
            assert!(
                (got_ss - want_ss).abs() <= 1e-12 * want_ss,
                "sum_squares n={n} {}: {got_ss} vs {want_ss}",
                b.name()
            );
        }
    }
    // sum_squares gives the same bits for any thread count.
    let x = rng.vec(200_001, 1.0);
    let s1 = Cpu::new(1).unwrap().sum_squares(&x);
    let s2 = Cpu::new(2).unwrap().sum_squares(&x);
    assert_eq!(s1.to_bits(), s2.to_bits());
}

/// `Backend::run` puts the CPU backend's work on its own pool (so ops skip the hand-off from
/// an outside thread), and ops give the same bits there as when called from outside.
#[test]
fn cpu_run_executes_on_the_backends_pool() {
    let cpu = Cpu::new(2).expect("2 threads");
    assert_eq!(
        rayon::current_thread_index(),
        None,
        "the test thread is no worker"
    );
    assert!(cpu.run(rayon::current_thread_index).is_some());
    let mut rng = Rng(5);
    for n in [1000, 16_384, 16_385, 100_003] {
        let (x, y) = (rng.vec(n, 2.0), rng.vec(n, 2.0));
        let outside = {
            let mut y = y.clone();
            cpu.axpy(&mut y, 0.3, &x);
            (y, cpu.sum_squares(&x))
        };
        let inside = cpu.run(|| {
            let mut y = y.clone();
            cpu.axpy(&mut y, 0.3, &x);
            (y, cpu.sum_squares(&x))
        });
        assert_bits(&inside.0, &outside.0, &format!("axpy n={n}"));
        assert_eq!(inside.1.to_bits(), outside.1.to_bits(), "sum_squares n={n}");
    }
}

#[test]
fn dropout_matches_the_reference_and_the_shared_mask() {
    let mut rng = Rng(2);
    let r = Cpu::reference();
    for &n in &SIZES {
        for &p in &[0.0f32, 0.1, 0.5, 1.0] {
            let seed = rng.next_u64();
            let x = rng.vec(n, 2.0);
            let dy = rng.vec(n, 2.0);
            let dx0 = rng.vec(n, 1.0);
            let mut want = vec![f32::NAN; n];
            r.dropout_forward(&x, &mut want, p, seed);
            let mut want_dx = dx0.clone();
            r.dropout_backward(&dy, &mut want_dx, p, seed);
            // The reference against the contract.
            for i in 0..n {
                let keep = dropout_keep(seed, i as u64, p);
                let scale = 1.0 / (1.0 - p);
                let f = if keep { x[i] * scale } else { 0.0 };
                assert_eq!(
                    want[i].to_bits(),
                    f.to_bits(),
                    "dropout forward n={n} p={p} i={i}"
                );
                let b = if keep { dx0[i] + dy[i] * scale } else { dx0[i] };
                assert_eq!(
                    want_dx[i].to_bits(),
                    b.to_bits(),
                    "dropout backward n={n} p={p} i={i}"
                );
            }
            if p == 0.0 {
                assert_bits(&want, &x, "p = 0 copies");
            }
            for b in fast_backends() {
                let mut got = vec![f32::NAN; n];
                b.dropout_forward(&x, &mut got, p, seed);
                assert_bits(
                    &got,
                    &want,
                    &format!("dropout forward n={n} p={p} {}", b.name()),
                );
                let mut got_dx = dx0.clone();
                b.dropout_backward(&dy, &mut got_dx, p, seed);
                assert_bits(
                    &got_dx,
                    &want_dx,
                    &format!("dropout backward n={n} p={p} {}", b.name()),
                );
            }
        }
    }
    // The kept fraction is about 1 - p; other seeds give other masks.
    let n = 100_000;
    let x = vec![1.0f32; n];
    let mut out = vec![0.0; n];
    let b = Cpu::new(2).unwrap();
    b.dropout_forward(&x, &mut out, 0.25, 7);
    let kept = out.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
    assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
    let mut other = vec![0.0; n];
    b.dropout_forward(&x, &mut other, 0.25, 8);
    assert_ne!(out, other);
}

/// Outputs of `lora_forward_dropout` then `lora_backward_dropout` on one backend:
/// u, y, dA, dB, du, dx and the two scratch buffers afterwards.
fn lora_dropout_pass<B: Backend<Buf = Vec<f32>>>(
    b: &B,
    d: LoraDims,
    drop: LoraDropout,
    inputs: &[Vec<f32>; 8],
) -> [Vec<f32>; 8] {
    let [x, a, bm, dy, y0, da0, db0, dx0] = inputs;
    let (mut sx, mut sdx) = (vec![7.0f32; x.len()], vec![7.0f32; x.len()]);
    let (mut u, mut y) = (vec![f32::NAN; d.m * d.r], y0.clone());
    b.lora_forward_dropout(x, drop, &mut sx, a, bm, d, &mut u, &mut y);
    let (mut da, mut db, mut du, mut dx) =
        (da0.clone(), db0.clone(), vec![0.0; d.m * d.r], dx0.clone());
    b.lora_backward_dropout(
        x, drop, &mut sx, &mut sdx, a, bm, &u, dy, d, &mut da, &mut db, &mut du, &mut dx,
    );
    [u, y, da, db, du, dx, sx, sdx]
}

/// LoRA with dropout through the `Backend` trait: the fast CPU backend (which applies the
/// mask inside its LoRA kernels) and the profiling wrapper around it against the reference
/// backend (separate dropout, LoRA and dropout-gradient ops).
#[test]
fn lora_dropout_matches_the_reference_through_the_backend() {
    let mut rng = Rng(31);
    for (m, k, n, r) in [(200, 77, 131, 8), (65, 40, 23, 12), (7, 16, 32, 4)] {
        let d = LoraDims {
            m,
            k,
            n,
            r,
            scale: 0.7,
        };
        let drop = LoraDropout {
            p: 0.3,
            seed: rng.next_u64(),
        };
        let inputs = [
            rng.vec(m * k, 1.0),
            rng.vec(r * k, 1.0),
            rng.vec(n * r, 1.0),
            rng.vec(m * n, 1.0),
            rng.vec(m * n, 1.0),
            rng.vec(r * k, 1.0),
            rng.vec(n * r, 1.0),
            rng.vec(m * k, 1.0),
        ];
        let want = lora_dropout_pass(&Cpu::reference(), d, drop, &inputs);
        let names = ["u", "y", "dA", "dB", "du", "dx"];
        let check = |got: &[Vec<f32>; 8], who: &str| {
            for (i, name) in names.iter().enumerate() {
                let what = format!("{name} {d:?} {who}");
                assert_close(&got[i], &want[i], 1e-5, 1.0, &what);
            }
            // The fused kernels leave the scratch buffers alone.
            assert!(
                got[6].iter().chain(&got[7]).all(|&v| v == 7.0),
                "{who}: scratch written"
            );
        };
        // The mask changed the result: without dropout, y differs.
        let (mut u0, mut y_plain) = (vec![0.0; m * r], inputs[4].clone());
        Cpu::reference().lora_forward(&inputs[0], &inputs[1], &inputs[2], d, &mut u0, &mut y_plain);
        assert!(y_plain != want[1], "{d:?}: dropout did not change y");
        for b in fast_backends() {
            check(&lora_dropout_pass(&b, d, drop, &inputs), &b.name());
            let prof = Profiled::new(b);
            let got = lora_dropout_pass(&prof, d, drop, &inputs);
            check(&got, &format!("profiled {}", prof.inner().name()));
            let ops: Vec<&str> = prof.take().into_iter().map(|(key, _)| key.op).collect();
            assert_eq!(ops.len(), 2, "profiled ops: {ops:?}");
            assert!(
                ops.iter()
                    .all(|o| o.starts_with("lora_") && o.ends_with("_dropout")),
                "{ops:?}"
            );
        }
    }
}

#[test]
fn dropout_gradient_matches_finite_differences() {
    let mut rng = Rng(3);
    let (n, p, seed) = (300, 0.3f32, 99u64);
    let x = rng.vec(n, 1.0);
    let rw = rng.vec64(n, 1.0);
    let r = Cpu::reference();
    let loss = |x: &[f64]| {
        let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let mut out = vec![0.0; n];
        r.dropout_forward(&xf, &mut out, p, seed);
        out.iter()
            .zip(&rw)
            .map(|(&o, &w)| o as f64 * w)
            .sum::<f64>()
    };
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    // Dropout is linear: a step of 1/16 is exact enough in f32.
    let fd = finite_differences(&x64, 0.0625, loss);
    let dy: Vec<f32> = rw.iter().map(|&v| v as f32).collect();
    for b in [Cpu::reference(), Cpu::new(2).unwrap()] {
        let mut dx = vec![0.0; n];
        b.dropout_backward(&dy, &mut dx, p, seed);
        assert_close(&dx, &fd, 1e-5, 1.0, "dropout gradient");
    }
}

// ---- RMSNorm -----------------------------------------------------------------------------

#[test]
fn rmsnorm_matches_the_reference() {
    let mut rng = Rng(4);
    let r = Cpu::reference();
    for &(rows, dim) in &[(1, 1), (3, 7), (5, 256), (17, 33), (40, 1000), (2, 4096)] {
        for dtype in [WeightDType::F32, WeightDType::F16, WeightDType::Bf16] {
            let x = rng.vec(rows * dim, 2.0);
            let wv: Vec<f32> = rng.vec(dim, 1.0).iter().map(|v| v + 1.0).collect();
            let w = weight(&wv, dtype);
            let dy = rng.vec(rows * dim, 1.0);
            let dx0 = rng.vec(rows * dim, 1.0);
            let mut y = vec![0.0; rows * dim];
            let mut rstd = vec![0.0; rows];
            r.rmsnorm_forward(&x, &w, &mut y, &mut rstd, rows, dim, 1e-6);
            let mut dx = dx0.clone();
            r.rmsnorm_backward(&dy, &x, &w, &rstd, &mut dx, rows, dim, true);
            let mut dx_over = vec![f32::NAN; rows * dim];
            r.rmsnorm_backward(&dy, &x, &w, &rstd, &mut dx_over, rows, dim, false);
            for b in fast_backends() {
                let what = format!("rmsnorm {rows}x{dim} {dtype:?} {}", b.name());
                let mut gy = vec![0.0; rows * dim];
                let mut grstd = vec![0.0; rows];
                b.rmsnorm_forward(&x, &w, &mut gy, &mut grstd, rows, dim, 1e-6);
                assert_close(&gy, &y, 2e-6, 0.0, &format!("{what} y"));
                assert_close(&grstd, &rstd, 2e-6, 0.0, &format!("{what} rstd"));
                let mut gdx = dx0.clone();
                b.rmsnorm_backward(&dy, &x, &w, &rstd, &mut gdx, rows, dim, true);
                assert_close(&gdx, &dx, 2e-6, 0.0, &format!("{what} dx accumulate"));
                let mut gdx = vec![f32::NAN; rows * dim];
                b.rmsnorm_backward(&dy, &x, &w, &rstd, &mut gdx, rows, dim, false);
                assert_close(&gdx, &dx_over, 2e-6, 0.0, &format!("{what} dx"));
            }
        }
    }
}

#[test]
fn rmsnorm_is_hf_llama_rmsnorm() {
    // HF: x * rsqrt(mean(x^2) + eps) in f32, then weight * that.
    let x = [1.0f32, -2.0, 3.0, 0.5];
    let wv = [0.5f32, 1.0, 2.0, -1.0];
    let mean = x.iter().map(|v| v * v).sum::<f32>() / 4.0;
    let rs = 1.0 / (mean + 1e-5f32).sqrt();
    let want: Vec<f32> = x.iter().zip(&wv).map(|(x, w)| w * (x * rs)).collect();
    for b in [Cpu::reference(), Cpu::new(2).unwrap()] {
        let mut y = vec![0.0; 4];
        let mut rstd = vec![0.0; 1];
        b.rmsnorm_forward(
            &x.to_vec(),
            &weight(&wv, WeightDType::F32),
            &mut y,
            &mut rstd,
            1,
            4,
            1e-5,
        );
        assert_bits(&y, &want, "rmsnorm by hand");
        assert_eq!(rstd[0], rs);
    }
}

#[test]
fn rmsnorm_gradient_matches_finite_differences() {
    let mut rng = Rng(5);
    let (rows, dim, eps) = (3, 11, 1e-3);
    let x = rng.vec64(rows * dim, 1.5);
    let w = rng.vec64(dim, 1.0);
    let rw = rng.vec64(rows * dim, 1.0);
    let forward = |x: &[f64]| {
        let mut y = vec![0.0; rows * dim];
        let mut rstd = vec![0.0; rows];
        reference::rmsnorm_forward_generic(x, &w, &mut y, &mut rstd, rows, dim, eps);
        (y, rstd)
    };
    let fd = finite_differences(&x, 1e-6, |x| dot64(&forward(x).0, &rw));
    let (_, rstd) = forward(&x);
    let mut dx = vec![0.0; rows * dim];
    reference::rmsnorm_backward_generic(&rw, &x, &w, &rstd, &mut dx, rows, dim, false);
    assert_close(&dx, &fd, 1e-7, 0.0, "rmsnorm gradient");
}

// ---- RoPE --------------------------------------------------------------------------------

fn rope_case(rng: &mut Rng, s: RopeShape, inverse: bool) {
    let table = RopeTable::new(s.head_dim, 10_000.0, RopeScaling::None, s.pos0 + s.seq + 3);
    let x = rng.vec(s.batch * s.seq * s.heads * s.head_dim, 2.0);
    let mut want = x.clone();
    Cpu::reference().rope(&mut want, &table.cos, &table.sin, s, inverse);
    for b in fast_backends() {
        let mut got = x.clone();
        b.rope(&mut got, &table.cos, &table.sin, s, inverse);
        assert_bits(
            &got,
            &want,
            &format!("rope {s:?} inverse={inverse} {}", b.name()),
        );
    }
    // forward then inverse (and inverse then forward) is the identity
    let mut round = want.clone();
    Cpu::new(2)
        .unwrap()
        .rope(&mut round, &table.cos, &table.sin, s, !inverse);
    assert_close(&round, &x, 1e-6, 1.0, "rope round trip");
}

#[test]
fn rope_matches_the_reference_and_inverts() {
    let mut rng = Rng(6);
    for &(batch, seq, heads, head_dim, pos0) in &[
        (1, 1, 1, 2, 0),
        (2, 7, 3, 8, 0),
        (2, 5, 4, 32, 17),
        (1, 33, 8, 64, 100),
        (3, 4, 2, 6, 1),
    ] {
        let s = RopeShape {
            batch,
            seq,
            heads,
            head_dim,
            pos0,
        };
        rope_case(&mut rng, s, false);
        rope_case(&mut rng, s, true);
    }
}

#[test]
fn rope_is_hf_rotate_half() {
    // HF: q * cos + rotate_half(q) * sin with cos/sin = cat(freqs, freqs) of emb, in f64.
    let mut rng = Rng(7);
    let s = RopeShape {
        batch: 2,
        seq: 6,
        heads: 3,
        head_dim: 16,
        pos0: 5,
    };
    let table = RopeTable::new(16, 500_000.0, RopeScaling::None, 20);
    let x = rng.vec(2 * 6 * 3 * 16, 1.0);
    let mut got = x.clone();
    Cpu::new(2)
        .unwrap()
        .rope(&mut got, &table.cos, &table.sin, s, false);
    let half = 8;
    let mut want = vec![0.0f64; x.len()];
    for (n, head) in x.chunks(16).enumerate() {
        let t = (n / 3) % 6;
        let pos = s.pos0 + t;
        let cos: Vec<f64> = (0..16)
            .map(|i| table.cos[pos * half + i % half] as f64)
            .collect();
        let sin: Vec<f64> = (0..16)
            .map(|i| table.sin[pos * half + i % half] as f64)
            .collect();
        let rot: Vec<f64> = (0..16)
            .map(|i| {
                if i < half {
                    -head[i + half] as f64
                } else {
                    head[i - half] as f64
                }
            })
            .collect();
        for i in 0..16 {
            want[n * 16 + i] = head[i] as f64 * cos[i] + rot[i] * sin[i];
        }
    }
    assert_close(&got, &want, 1e-6, 1.0, "rope vs rotate_half");
}

#[test]
fn rope_inverse_is_the_gradient() {
    let mut rng = Rng(8);
    let s = RopeShape {
        batch: 2,
        seq: 3,
        heads: 2,
        head_dim: 6,
        pos0: 4,
    };
    let table = RopeTable::new(6, 10_000.0, RopeScaling::None, 10);
    let cos: Vec<f64> = table.cos.iter().map(|&v| v as f64).collect();
    let sin: Vec<f64> = table.sin.iter().map(|&v| v as f64).collect();
    let n = 2 * 3 * 2 * 6;
    let x = rng.vec64(n, 1.0);
    let rw = rng.vec64(n, 1.0);
    let fd = finite_differences(&x, 1e-6, |x| {
        let mut y = x.to_vec();
        reference::rope_generic(&mut y, &cos, &sin, s, false);
        dot64(&y, &rw)
    });
    let mut grad = rw.clone();
    reference::rope_generic(&mut grad, &cos, &sin, s, true);
    assert_close(&grad, &fd, 1e-8, 0.0, "rope gradient");
}

#[test]
#[should_panic(expected = "rope")]
fn rope_rejects_positions_past_the_table() {
    let s = RopeShape {
        batch: 1,
        seq: 4,
        heads: 1,
        head_dim: 4,
        pos0: 7,
    };
    let table = RopeTable::new(4, 10_000.0, RopeScaling::None, 10);
    let mut x = vec![0.0; 16];
    Cpu::new(1)
        .unwrap()
        .rope(&mut x, &table.cos, &table.sin, s, false);
}

// ---- attention ---------------------------------------------------------------------------

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

/// Shapes for the fast-vs-reference comparison: GQA groups 1/2/4, odd and padded head dims,
/// KV caches with spare rows, generation offsets, tiles that do not divide the sequence.
fn attention_shapes() -> Vec<AttnShape> {
    vec![
        shape(2, 37, 37, 37, (4, 4), 32, 0),
        shape(1, 130, 130, 130, (8, 4), 64, 0),
        shape(2, 65, 65, 65, (8, 2), 32, 0),
        shape(1, 200, 200, 200, (2, 1), 33, 0),
        shape(2, 19, 19, 24, (3, 3), 17, 0),
        shape(1, 70, 70, 70, (4, 2), 48, 0),
        shape(1, 9, 9, 9, (2, 2), 80, 0),
        shape(1, 1, 1, 1, (1, 1), 1, 0),
        // generation with a KV cache: one or a few new queries at the end
        shape(2, 1, 100, 128, (8, 4), 32, 99),
        shape(1, 3, 53, 60, (4, 1), 64, 50),
        shape(1, 64, 192, 256, (4, 2), 32, 128),
        // queries that stop before the last keys, and ones past the valid keys
        shape(1, 20, 100, 100, (2, 1), 16, 10),
        shape(1, 5, 30, 40, (2, 2), 16, 40),
        // group sizes 3, 5, 8: tiles of 64 stacked columns split a position's heads
        shape(2, 40, 47, 50, (6, 2), 24, 7),
        shape(1, 30, 30, 30, (10, 2), 16, 0),
        shape(1, 1, 300, 320, (16, 2), 64, 299),
        shape(1, 20, 20, 20, (8, 1), 32, 0),
        // training shape
        shape(2, 256, 256, 256, (8, 4), 32, 0),
    ]
}

struct AttnCase {
    s: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

fn attn_case(rng: &mut Rng, s: AttnShape) -> AttnCase {
    let nq = s.batch * s.q_len * s.q_heads * s.head_dim;
    let nk = s.batch * s.kv_stride * s.kv_heads * s.head_dim;
    let mut k = rng.vec(nk, 1.0);
    let mut v = rng.vec(nk, 1.0);
    // Spare cache rows hold garbage the op must not read.
    for b in 0..s.batch {
        for j in s.kv_len..s.kv_stride {
            let o = (b * s.kv_stride + j) * s.kv_heads * s.head_dim;
            for x in &mut k[o..o + s.kv_heads * s.head_dim] {
                *x = f32::NAN;
            }
            for x in &mut v[o..o + s.kv_heads * s.head_dim] {
                *x = f32::NAN;
            }
        }
    }
    // Large enough that softmax rows are far from uniform.
    AttnCase {
        s,
        q: rng.vec(nq, 3.0),
        k,
        v,
        dout: rng.vec(nq, 1.0),
    }
}

struct AttnResult {
    out: Vec<f32>,
    lse: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

fn run_attention(b: &Cpu, c: &AttnCase) -> AttnResult {
    let s = c.s;
    let mut out = vec![f32::NAN; c.q.len()];
    let mut lse = vec![f32::NAN; s.batch * s.q_heads * s.q_len];
    b.attention_forward(&c.q, &c.k, &c.v, &mut out, &mut lse, s);
    let mut dq = vec![f32::NAN; c.q.len()];
    let mut dk = vec![f32::NAN; c.k.len()];
    let mut dv = vec![f32::NAN; c.v.len()];
    b.attention_backward(
        &c.q, &c.k, &c.v, &out, &lse, &c.dout, &mut dq, &mut dk, &mut dv, s,
    );
    AttnResult {
        out,
        lse,
        dq,
        dk,
        dv,
    }
}

#[test]
fn attention_matches_the_reference() {
    let mut rng = Rng(9);
    let r = Cpu::reference();
    for s in attention_shapes() {
        let c = attn_case(&mut rng, s);
        let want = run_attention(&r, &c);
        let mut first: Option<AttnResult> = None;
        for b in fast_backends() {
            let got = run_attention(&b, &c);
            let what = format!("{s:?} {}", b.name());
            assert_close(&got.out, &want.out, 2e-5, 0.0, &format!("out {what}"));
            assert_close(&got.lse, &want.lse, 2e-6, 1.0, &format!("lse {what}"));
            assert_close(&got.dq, &want.dq, 1e-4, 0.0, &format!("dq {what}"));
            assert_close(&got.dk, &want.dk, 1e-4, 0.0, &format!("dk {what}"));
            assert_close(&got.dv, &want.dv, 1e-4, 0.0, &format!("dv {what}"));
            // The thread count does not change a bit.
            if let Some(f) = &first {
                assert_bits(&got.out, &f.out, "out 1 vs 2 threads");
                assert_bits(&got.lse, &f.lse, "lse 1 vs 2 threads");
                assert_bits(&got.dq, &f.dq, "dq 1 vs 2 threads");
                assert_bits(&got.dk, &f.dk, "dk 1 vs 2 threads");
                assert_bits(&got.dv, &f.dv, "dv 1 vs 2 threads");
            }
            first = Some(got);
        }
    }
}

#[test]
fn attention_random_shapes_match_the_reference() {
    let mut rng = Rng(20);
    let r = Cpu::reference();
    let fast = Cpu::new(2).unwrap();
    for _ in 0..40 {
        let kv_heads = 1 + rng.below(3);
        let q_heads = kv_heads * (1 + rng.below(5));
        // one in ten without any key
        let kv_len = if rng.below(10) == 0 {
            0
        } else {
            rng.below(150)
        };
        let s = shape(
            1 + rng.below(2),
            1 + rng.below(80),
            kv_len,
            kv_len + rng.below(10),
            (q_heads, kv_heads),
            1 + rng.below(70),
            rng.below(160),
        );
        let c = attn_case(&mut rng, s);
        let want = run_attention(&r, &c);
        let got = run_attention(&fast, &c);
        let what = format!("{s:?}");
        assert_close(&got.out, &want.out, 2e-5, 0.0, &format!("out {what}"));
        assert_close(&got.lse, &want.lse, 2e-6, 1.0, &format!("lse {what}"));
        assert_close(&got.dq, &want.dq, 1e-4, 0.0, &format!("dq {what}"));
        assert_close(&got.dk, &want.dk, 1e-4, 0.0, &format!("dk {what}"));
        assert_close(&got.dv, &want.dv, 1e-4, 0.0, &format!("dv {what}"));
    }
}

#[test]
fn attention_without_keys_is_zero() {
    let s = shape(1, 2, 0, 4, (2, 1), 8, 0);
    let c = attn_case(&mut Rng(10), s);
    for b in [Cpu::reference(), Cpu::new(2).unwrap()] {
        let got = run_attention(&b, &c);
        assert!(got.out.iter().all(|&x| x == 0.0), "{}", b.name());
        assert!(
            got.lse.iter().all(|&x| x == f32::NEG_INFINITY),
            "{}",
            b.name()
        );
        assert!(
            got.dq
                .iter()
                .chain(&got.dk)
                .chain(&got.dv)
                .all(|&x| x == 0.0),
            "{}",
            b.name()
        );
    }
}

/// Attention with the full score matrix per head in f64, HF style: repeat_kv, scores,
/// causal mask, softmax, weighted sum.
fn naive_attention(q: &[f64], k: &[f64], v: &[f64], s: AttnShape) -> (Vec<f64>, Vec<f64>) {
    let d = s.head_dim;
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; s.batch * s.q_heads * s.q_len];
    let group = s.q_heads / s.kv_heads;
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            let kvh = h / group;
            let mut scores = vec![vec![f64::NEG_INFINITY; s.kv_len]; s.q_len];
            for (i, row) in scores.iter_mut().enumerate() {
                for (j, x) in row.iter_mut().enumerate() {
                    if j <= s.q_pos0 + i {
                        let qo = ((b * s.q_len + i) * s.q_heads + h) * d;
                        let ko = ((b * s.kv_stride + j) * s.kv_heads + kvh) * d;
                        *x = (0..d).map(|c| q[qo + c] * k[ko + c]).sum::<f64>() * s.scale as f64;
                    }
                }
            }
            for (i, row) in scores.iter().enumerate() {
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
                lse[(b * s.q_heads + h) * s.q_len + i] = m + z.ln();
                let qo = ((b * s.q_len + i) * s.q_heads + h) * d;
                for (j, x) in row.iter().enumerate() {
                    let p = (x - m).exp() / z;
                    let vo = ((b * s.kv_stride + j) * s.kv_heads + kvh) * d;
                    for c in 0..d {
                        out[qo + c] += p * v[vo + c];
                    }
                }
            }
        }
    }
    (out, lse)
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter()
        .map(|&v| if v.is_nan() { 0.0 } else { v as f64 })
        .collect()
}

#[test]
fn attention_reference_matches_naive_softmax() {
    let mut rng = Rng(11);
    for s in [
        shape(2, 9, 9, 9, (4, 2), 8, 0),
        shape(1, 3, 12, 16, (4, 1), 5, 9),
        shape(1, 6, 20, 20, (2, 2), 4, 3),
    ] {
        let c = attn_case(&mut rng, s);
        let (q, k, v) = (widen(&c.q), widen(&c.k), widen(&c.v));
        let (want_out, want_lse) = naive_attention(&q, &k, &v, s);
        let mut out = vec![0.0f64; q.len()];
        let mut lse = vec![0.0f64; want_lse.len()];
        reference::attention_forward_generic(&q, &k, &v, &mut out, &mut lse, s);
        assert_close(&out, &want_out, 1e-12, 0.0, &format!("reference out {s:?}"));
        assert_close(&lse, &want_lse, 1e-12, 1.0, &format!("reference lse {s:?}"));
        // and the fast path in f32
        let got = run_attention(&Cpu::new(2).unwrap(), &c);
        assert_close(&got.out, &want_out, 2e-5, 0.0, &format!("fast out {s:?}"));
        assert_close(&got.lse, &want_lse, 2e-6, 1.0, &format!("fast lse {s:?}"));
    }
}

#[test]
fn attention_gradient_matches_finite_differences() {
    let mut rng = Rng(12);
    for s in [
        shape(2, 5, 5, 5, (4, 2), 6, 0),
        shape(1, 4, 9, 11, (2, 1), 5, 5),
        shape(1, 3, 12, 12, (3, 3), 4, 2),
    ] {
        let c = attn_case(&mut rng, s);
        let (q, k, v) = (widen(&c.q), widen(&c.k), widen(&c.v));
        let rw = widen(&c.dout);
        let nl = s.batch * s.q_heads * s.q_len;
        let forward = |q: &[f64], k: &[f64], v: &[f64]| {
            let mut out = vec![0.0; q.len()];
            let mut lse = vec![0.0; nl];
            reference::attention_forward_generic(q, k, v, &mut out, &mut lse, s);
            (out, lse)
        };
        let (out, lse) = forward(&q, &k, &v);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        reference::attention_backward_generic(
            &q, &k, &v, &out, &lse, &rw, &mut dq, &mut dk, &mut dv, s,
        );
        let h = 1e-6;
        let fd_q = finite_differences(&q, h, |x| dot64(&forward(x, &k, &v).0, &rw));
        let fd_k = finite_differences(&k, h, |x| dot64(&forward(&q, x, &v).0, &rw));
        let fd_v = finite_differences(&v, h, |x| dot64(&forward(&q, &k, x).0, &rw));
        assert_close(&dq, &fd_q, 1e-7, 0.0, &format!("dq {s:?}"));
        assert_close(&dk, &fd_k, 1e-7, 0.0, &format!("dk {s:?}"));
        assert_close(&dv, &fd_v, 1e-7, 0.0, &format!("dv {s:?}"));
        // Cache rows past kv_len get zero gradient (the forward does not read them).
        for b in 0..s.batch {
            for j in s.kv_len..s.kv_stride {
                let o = (b * s.kv_stride + j) * s.kv_heads * s.head_dim;
                assert!(dk[o..o + s.kv_heads * s.head_dim].iter().all(|&x| x == 0.0));
            }
        }
    }
}

// ---- SwiGLU ------------------------------------------------------------------------------

#[test]
fn swiglu_matches_the_reference() {
    let mut rng = Rng(13);
    let r = Cpu::reference();
    for &n in &SIZES {
        let mut gate = rng.vec(n, 8.0);
        if n > 3 {
            gate[0] = -100.0;
            gate[1] = 100.0;
            gate[2] = 0.0;
        }
        let up = rng.vec(n, 2.0);
        let dout = rng.vec(n, 1.0);
        let mut out = vec![0.0; n];
        r.swiglu_forward(&gate, &up, &mut out);
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        r.swiglu_backward(&gate, &up, &dout, &mut dg, &mut du);
        for b in fast_backends() {
            let what = format!("swiglu n={n} {}", b.name());
            let mut got = vec![f32::NAN; n];
            b.swiglu_forward(&gate, &up, &mut got);
            // element-wise relative: each element is its own computation
            for i in 0..n {
                let tol = 4e-7 * out[i].abs() + 1e-30;
                assert!(
                    (got[i] - out[i]).abs() <= tol,
                    "{what} out[{i}]: {} vs {}",
                    got[i],
                    out[i]
                );
            }
            let (mut gdg, mut gdu) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            b.swiglu_backward(&gate, &up, &dout, &mut gdg, &mut gdu);
            assert_close(&gdg, &dg, 1e-6, 0.0, &format!("{what} dgate"));
            assert_close(&gdu, &du, 1e-6, 0.0, &format!("{what} dup"));
        }
    }
}

#[test]
fn swiglu_gradient_matches_finite_differences() {
    let mut rng = Rng(14);
    let n = 64;
    let gate = rng.vec64(n, 6.0);
    let up = rng.vec64(n, 2.0);
    let rw = rng.vec64(n, 1.0);
    let fwd = |g: &[f64], u: &[f64]| {
        let mut out = vec![0.0; n];
        reference::swiglu_forward_generic(g, u, &mut out);
        dot64(&out, &rw)
    };
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    reference::swiglu_backward_generic(&gate, &up, &rw, &mut dg, &mut du);
    assert_close(
        &dg,
        &finite_differences(&gate, 1e-6, |g| fwd(g, &up)),
        1e-8,
        0.0,
        "dgate",
    );
    assert_close(
        &du,
        &finite_differences(&up, 1e-6, |u| fwd(&gate, u)),
        1e-8,
        0.0,
        "dup",
    );
}

// ---- embedding ---------------------------------------------------------------------------

#[test]
fn embedding_matches_the_reference() {
    let mut rng = Rng(15);
    let r = Cpu::reference();
    for &(vocab, dim, tokens) in &[(1, 1, 3), (50, 17, 40), (1000, 64, 300), (7, 256, 2048)] {
        for dtype in [WeightDType::F32, WeightDType::F16, WeightDType::Bf16] {
            let table_v = rng.vec(vocab * dim, 1.0);
            let table = matrix_weight(&table_v, vocab, dim, dtype);
            // repeated ids on purpose
            let ids: Vec<i32> = (0..tokens).map(|_| rng.below(vocab) as i32).collect();
            let mut want = vec![0.0; tokens * dim];
            r.embedding_forward(&table, &ids, &mut want);
            let widened = table.to_f32_vec();
            for (t, &id) in ids.iter().enumerate() {
                let row = &widened[id as usize * dim..(id as usize + 1) * dim];
                assert_bits(&want[t * dim..(t + 1) * dim], row, "reference gather");
            }
            let dout = rng.vec(tokens * dim, 1.0);
            let dtable0 = rng.vec(vocab * dim, 1.0);
            let mut want_dt = dtable0.clone();
            r.embedding_backward(&ids, &dout, &mut want_dt);
            for b in fast_backends() {
                let mut got = vec![f32::NAN; tokens * dim];
                b.embedding_forward(&table, &ids, &mut got);
                assert_bits(
                    &got,
                    &want,
                    &format!("embedding forward {dtype:?} {}", b.name()),
                );
                let mut got_dt = dtable0.clone();
                b.embedding_backward(&ids, &dout, &mut got_dt);
                assert_bits(
                    &got_dt,
                    &want_dt,
                    &format!("embedding backward {}", b.name()),
                );
            }
            // the scatter-add by hand, in f64
            let mut by_hand: Vec<f64> = dtable0.iter().map(|&v| v as f64).collect();
            for (t, &id) in ids.iter().enumerate() {
                for c in 0..dim {
                    by_hand[id as usize * dim + c] += dout[t * dim + c] as f64;
                }
            }
            assert_close(&want_dt, &by_hand, 1e-5, 1.0, "embedding backward by hand");
        }
    }
}

#[test]
#[should_panic(expected = "embedding_forward")]
fn embedding_rejects_ids_outside_the_table() {
    let table = matrix_weight(&[0.0; 8], 4, 2, WeightDType::F32);
    let mut out = vec![0.0; 4];
    Cpu::new(1)
        .unwrap()
        .embedding_forward(&table, &vec![1, 4], &mut out);
}

#[test]
#[should_panic(expected = "embedding_backward")]
fn embedding_backward_rejects_negative_ids() {
    let mut dtable = vec![0.0; 8];
    Cpu::new(1)
        .unwrap()
        .embedding_backward(&vec![-1], &vec![0.0; 2], &mut dtable);
}

// ---- cross-entropy -----------------------------------------------------------------------

const IGNORE: i32 = -100;

#[test]
fn cross_entropy_matches_the_reference() {
    let mut rng = Rng(16);
    let r = Cpu::reference();
    for &(rows, vocab) in &[
        (1, 1),
        (3, 5),
        (17, 100),
        (64, 2048),
        (4, 5000),
        (2, 32_003),
    ] {
        for &offset in &[0.0f32, 1e4] {
            let logits: Vec<f32> = rng
                .vec(rows * vocab, 8.0)
                .iter()
                .map(|v| v + offset)
                .collect();
            let targets: Vec<i32> = (0..rows)
                .map(|i| {
                    if i % 5 == 3 {
                        IGNORE
                    } else {
                        rng.below(vocab) as i32
                    }
                })
                .collect();
            let n = targets.iter().filter(|&&t| t != IGNORE).count();
            let g = 1.0 / n.max(1) as f32;
            let mut want_loss = vec![f32::NAN; rows];
            let mut want_grad = logits.clone();
            let want = r.cross_entropy(
                &mut want_grad,
                &targets,
                &mut want_loss,
                vocab,
                IGNORE,
                Some(g),
            );
            assert_eq!(want.count, n);
            for b in fast_backends() {
                let what = format!("cross_entropy {rows}x{vocab}+{offset} {}", b.name());
                let mut loss = vec![f32::NAN; rows];
                let mut grad = logits.clone();
                let got = b.cross_entropy(&mut grad, &targets, &mut loss, vocab, IGNORE, Some(g));
                assert_eq!(got.count, want.count, "{what}");
                assert!(
                    (got.sum - want.sum).abs() <= 1e-5 * want.sum.abs().max(1.0),
                    "{what}: {} vs {}",
                    got.sum,
                    want.sum
                );
                assert_close(&loss, &want_loss, 1e-5, 1.0, &format!("{what} row loss"));
                assert_close(&grad, &want_grad, 1e-5, g as f64, &format!("{what} grad"));
                // without a gradient the logits stay as they are
                let mut keep = logits.clone();
                let mut loss2 = vec![f32::NAN; rows];
                let got2 = b.cross_entropy(&mut keep, &targets, &mut loss2, vocab, IGNORE, None);
                assert_bits(&keep, &logits, &format!("{what} logits untouched"));
                assert_bits(&loss2, &loss, &format!("{what} same loss without grad"));
                assert_eq!(got2.sum.to_bits(), got.sum.to_bits());
            }
            // ignored rows: zero loss, zero gradient
            for (i, &t) in targets.iter().enumerate() {
                if t == IGNORE {
                    assert_eq!(want_loss[i], 0.0);
                    assert!(
                        want_grad[i * vocab..(i + 1) * vocab]
                            .iter()
                            .all(|&x| x == 0.0)
                    );
                }
            }
        }
    }
}

#[test]
fn cross_entropy_known_values() {
    for b in [Cpu::reference(), Cpu::new(2).unwrap()] {
        // uniform logits: ln(vocab); huge logits stay finite
        let vocab = 1000;
        let mut logits = vec![3.0f32; 2 * vocab];
        logits[vocab..].fill(-5e4);
        let mut loss = vec![0.0; 2];
        let s = b.cross_entropy(
            &mut logits,
            &vec![7, 999],
            &mut loss,
            vocab,
            IGNORE,
            Some(0.5),
        );
        let ln = (vocab as f64).ln();
        assert!((loss[0] as f64 - ln).abs() < 1e-5 && (loss[1] as f64 - ln).abs() < 1e-5);
        assert!((s.sum - 2.0 * ln).abs() < 1e-5 && s.count == 2);
        let p = 0.5 / vocab as f64;
        assert!((logits[0] as f64 - p).abs() < 1e-9);
        assert!((logits[7] as f64 - (p - 0.5)).abs() < 1e-7);
        // one dominant logit: loss ≈ 0 for it, ≈ 1e4 for another target
        let mut logits = vec![0.0f32; 2 * 4];
        logits[2] = 1e4;
        logits[4 + 2] = 1e4;
        let mut loss = vec![0.0; 2];
        b.cross_entropy(&mut logits, &vec![2, 0], &mut loss, 4, IGNORE, None);
        assert!(
            loss[0].abs() < 1e-6 && (loss[1] - 1e4).abs() < 1e-2,
            "{loss:?}"
        );
        // all rows ignored
        let mut logits = vec![1.0f32; 6];
        let mut loss = vec![5.0; 2];
        let s = b.cross_entropy(
            &mut logits,
            &vec![IGNORE, IGNORE],
            &mut loss,
            3,
            IGNORE,
            Some(1.0),
        );
        assert_eq!((s.sum, s.count), (0.0, 0));
        assert_eq!(loss, vec![0.0, 0.0]);
        assert!(logits.iter().all(|&x| x == 0.0));
    }
}

#[test]
fn cross_entropy_gradient_matches_finite_differences() {
    let mut rng = Rng(17);
    let (rows, vocab) = (4, 9);
    let logits = rng.vec64(rows * vocab, 3.0);
    let targets = vec![3, IGNORE, 0, 8];
    let g = 1.0 / 3.0;
    let mean_loss = |x: &[f64]| {
        let mut x = x.to_vec();
        let mut loss = vec![0.0f64; rows];
        let s = reference::cross_entropy_generic(&mut x, &targets, &mut loss, vocab, IGNORE, None);
        s.sum / s.count as f64
    };
    let fd = finite_differences(&logits, 1e-6, mean_loss);
    let mut grad = logits.clone();
    let mut loss = vec![0.0f64; rows];
    reference::cross_entropy_generic(&mut grad, &targets, &mut loss, vocab, IGNORE, Some(g));
    assert_close(&grad, &fd, 1e-8, 0.0, "cross-entropy gradient");
}

#[test]
#[should_panic(expected = "cross_entropy")]
fn cross_entropy_rejects_targets_outside_the_vocabulary() {
    let mut logits = vec![0.0; 6];
    let mut loss = vec![0.0; 2];
    Cpu::new(1)
        .unwrap()
        .cross_entropy(&mut logits, &vec![1, 3], &mut loss, 3, IGNORE, None);
}

// ---- optimizers --------------------------------------------------------------------------

/// torch.optim.AdamW written out in f64.
fn adamw_f64(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], hp: AdamW, t: u64) {
    let (lr, b1, b2, eps, wd) = (
        hp.lr as f64,
        hp.beta1 as f64,
        hp.beta2 as f64,
        hp.eps as f64,
        hp.weight_decay as f64,
    );
    let bc1 = 1.0 - b1.powi(t as i32);
    let bc2 = 1.0 - b2.powi(t as i32);
    for i in 0..p.len() {
        p[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        let denom = v[i].sqrt() / bc2.sqrt() + eps;
        p[i] -= lr / bc1 * m[i] / denom;
    }
}

#[test]
fn adamw_matches_the_torch_formula() {
    let mut rng = Rng(18);
    let n = 40_000;
    let hp = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let p0 = rng.vec(n, 1.0);
    let (mut p64, mut m64, mut v64) = (widen(&p0), vec![0.0; n], vec![0.0; n]);
    let r = Cpu::reference();
    let (mut p, mut m, mut v) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
    let fast = fast_backends();
    let mut fp: Vec<_> = fast
        .iter()
        .map(|_| (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]))
        .collect();
    for t in 1..=5u64 {
        let g = rng.vec(n, 0.1 * t as f64);
        r.adamw_step(&mut p, &g, &mut m, &mut v, hp, t);
        adamw_f64(&mut p64, &widen(&g), &mut m64, &mut v64, hp, t);
        assert_close(&p, &p64, 1e-6, 0.0, &format!("adamw param step {t}"));
        assert_close(&m, &m64, 1e-6, 0.0, &format!("adamw m step {t}"));
        assert_close(&v, &v64, 1e-6, 0.0, &format!("adamw v step {t}"));
        // Each step moves a parameter by about lr (Adam's normalised step).
        for (b, (fp, fm, fv)) in fast.iter().zip(fp.iter_mut()) {
            b.adamw_step(fp, &g, fm, fv, hp, t);
            assert_bits(fp, &p, &format!("adamw fast param {}", b.name()));
            assert_bits(fm, &m, &format!("adamw fast m {}", b.name()));
            assert_bits(fv, &v, &format!("adamw fast v {}", b.name()));
        }
    }
}

/// Bits printed by torch 2.15 on the CPU (`torch.optim.AdamW` / `SGD`, default single-tensor
/// path, float32 parameters) for these inputs; the hyper-parameters are exact in f32, so
/// PyTorch's f64 Python scalars and ours round to the same f32 values.
#[test]
fn optimizers_match_torch_bit_for_bit() {
    let p0 = [0.5f32, -1.25, 3.0, 0.0078125, -0.3, 2.5e-3, 7.0, -4.5];
    let grads = [
        [0.1f32, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8],
        [-0.05, 0.15, 0.0, 1.5, -2.5, 0.001, 0.25, 0.125],
        [0.3, 0.3, -0.3, -0.3, 0.01, -0.01, 4.0, -4.0],
    ];
    for b in [Cpu::reference(), Cpu::new(2).unwrap()] {
        let hp = AdamW {
            lr: 0.001953125,
            beta1: 0.875,
            beta2: 1.0 - 1.0 / 1024.0,
            eps: 1.0 / 1_048_576.0,
            weight_decay: 0.0625,
        };
        let (mut p, mut m, mut v) = (p0.to_vec(), vec![0.0; 8], vec![0.0; 8]);
        for (t, g) in grads.iter().enumerate() {
            b.adamw_step(&mut p, &g.to_vec(), &mut m, &mut v, hp, t as u64 + 1);
        }
        assert_eq!(bits(&p), ADAMW_TORCH, "adamw {}", b.name());
        for (nesterov, dampening, golden) in
            [(false, 0.25, SGD_TORCH), (true, 0.0, SGD_NESTEROV_TORCH)]
        {
            let hp = Sgd {
                lr: 0.0078125,
                momentum: 0.875,
                dampening,
                weight_decay: 0.03125,
                nesterov,
            };
            let (mut p, mut buf) = (p0.to_vec(), vec![f32::NAN; 8]);
            for (t, g) in grads.iter().enumerate() {
                b.sgd_step(&mut p, &g.to_vec(), &mut buf, hp, t == 0);
            }
            assert_eq!(bits(&p), golden, "sgd nesterov={nesterov} {}", b.name());
        }
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

const ADAMW_TORCH: [u32; 8] = [
    1056831697, 3214920213, 1077918814, 1006940733, 3197728969, 1004327846, 1088405695, 3230649949,
];
const SGD_TORCH: [u32; 8] = [
    1056835207, 3214915704, 1077902816, 984529672, 3197152061, 1014263928, 1088319511, 3230570732,
];
const SGD_NESTEROV_TORCH: [u32; 8] = [
    1056732989, 3214933443, 1077898008, 3154752531, 3196426665, 1016365326, 1088222218, 3230483798,
];

/// torch.optim.SGD written out in f64.
fn sgd_f64(p: &mut [f64], g: &[f64], buf: &mut [f64], hp: Sgd, first: bool) {
    let (lr, mu, damp, wd) = (
        hp.lr as f64,
        hp.momentum as f64,
        hp.dampening as f64,
        hp.weight_decay as f64,
    );
    for i in 0..p.len() {
        let mut d = g[i] + wd * p[i];
        if mu != 0.0 {
            buf[i] = if first {
                d
            } else {
                mu * buf[i] + (1.0 - damp) * d
            };
            d = if hp.nesterov { d + mu * buf[i] } else { buf[i] };
        }
        p[i] -= lr * d;
    }
}

#[test]
fn sgd_matches_the_torch_formula() {
    let mut rng = Rng(19);
    let n = 30_001;
    for &(momentum, dampening, weight_decay, nesterov) in &[
        (0.0f32, 0.0f32, 0.0f32, false),
        (0.9, 0.0, 1e-4, false),
        (0.9, 0.1, 0.01, false),
        (0.8, 0.0, 0.0, true),
    ] {
        let hp = Sgd {
            lr: 0.05,
            momentum,
            dampening,
            weight_decay,
            nesterov,
        };
        let p0 = rng.vec(n, 1.0);
        let (mut p, mut buf) = (p0.clone(), vec![0.0f32; n]);
        let (mut p64, mut buf64) = (widen(&p0), vec![0.0; n]);
        let fast = fast_backends();
        let mut fp: Vec<_> = fast.iter().map(|_| (p0.clone(), vec![0.0f32; n])).collect();
        let r = Cpu::reference();
        for t in 0..4 {
            let g = rng.vec(n, 1.0);
            r.sgd_step(&mut p, &g, &mut buf, hp, t == 0);
            sgd_f64(&mut p64, &widen(&g), &mut buf64, hp, t == 0);
            assert_close(&p, &p64, 1e-6, 0.0, &format!("sgd {hp:?} step {t}"));
            for (b, (fp, fb)) in fast.iter().zip(fp.iter_mut()) {
                b.sgd_step(fp, &g, fb, hp, t == 0);
                assert_bits(fp, &p, &format!("sgd fast {}", b.name()));
            }
        }
    }
}
