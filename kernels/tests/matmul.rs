//! The fast matmul and LoRA ops against the plain reference (every op, instruction set the
//! CPU has, weight dtype, accumulate flag, transpose combination, alpha/beta, odd and
//! edge-tile sizes, 1/2/3 threads, misaligned weights), the reference against known answers,
//! and the LoRA gradients against central finite differences of a scalar loss in f64.
use std::sync::Arc;

use fedcdd_kernels::cpu::matmul::Simd;
use fedcdd_kernels::cpu::{matmul, ops, reference_matmul};
use fedcdd_kernels::{
    Backend, Cpu, CpuWeight, Gemm, LoraDims, LoraDropout, WeightDType, WeightSource,
};

/// xorshift64* : deterministic values without a dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
}

fn fast(threads: usize) -> Cpu {
    Cpu::new(threads).expect("thread pool")
}

/// Every fast configuration: each instruction set this CPU has, on 1 and on 2 threads.
fn engines() -> Vec<(Cpu, Simd)> {
    let mut out = Vec::new();
    for simd in [Simd::Avx512, Simd::Avx2, Simd::Portable] {
        if simd.available() {
            out.push((fast(1), simd));
            out.push((fast(2), simd));
        }
    }
    out
}

fn label(cpu: &Cpu, simd: Simd) -> String {
    format!("{} {}", simd.name(), cpu.name())
}

/// Little-endian bytes of `v` in `dtype`, placed `offset` bytes into the buffer.
fn weight_source(
    v: &[f32],
    rows: usize,
    cols: usize,
    dtype: WeightDType,
    offset: usize,
) -> WeightSource {
    let mut bytes = vec![0xAAu8; offset];
    for &x in v {
        match dtype {
            WeightDType::F32 => bytes.extend_from_slice(&x.to_le_bytes()),
            WeightDType::F16 => bytes.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
            WeightDType::Bf16 => bytes.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
        }
    }
    bytes.extend_from_slice(&[0x55; 3]);
    WeightSource {
        bytes: Arc::new(bytes),
        offset,
        dtype,
        rows,
        cols,
    }
}

/// The weight in `dtype`, read in place (offset 0 of a Vec is aligned for every dtype).
fn weight(rng: &mut Rng, rows: usize, cols: usize, dtype: WeightDType) -> CpuWeight {
    let v = rng.vec(rows * cols);
    CpuWeight::new(&weight_source(&v, rows, cols, dtype, 0)).expect("weight")
}

/// `|got − want| ≤ 1e-5 · (1 + |want|) · sqrt(k)` for every element.
#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], k: usize) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let tol = 1e-5 * (k.max(1) as f32).sqrt();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: element {i}: fast {g} vs reference {w} (tolerance {})",
            tol * (1.0 + w.abs())
        );
    }
}

const DTYPES: [WeightDType; 3] = [WeightDType::F32, WeightDType::F16, WeightDType::Bf16];

/// (m, n, k): ones, odd sizes, edge tiles of the 14×32 (and 6×16, 4×16) microkernels, more
/// than one k block (k > 384) and more than one column block of packed B (n·k > 256 Ki);
/// m ≤ 16 with a transposed B takes the unpacked path (rows widened piecewise, k > 512);
/// on two threads the last two take column chunks (one with a partial last panel).
const SHAPES: [(usize, usize, usize); 14] = [
    (1, 1, 1),
    (1, 3, 17),
    (3, 17, 33),
    (17, 33, 3),
    (14, 32, 8),
    (15, 33, 100),
    (29, 100, 17),
    (33, 1, 64),
    (100, 65, 31),
    (5, 513, 7),
    (2, 41, 1100),
    (31, 47, 777),
    (20, 800, 400),
    (45, 1000, 70),
];

#[test]
fn reference_known_answers() {
    // W = [[1, 2, 3], [4, 5, 6]] (n = 2, k = 3), x = [[1, 0, -1], [2, 1, 0]] (m = 2).
    let w = CpuWeight::new(&WeightSource::from_f32(vec![1., 2., 3., 4., 5., 6.], 2, 3)).unwrap();
    let x = [1., 0., -1., 2., 1., 0.];
    let mut y = [10.0f32; 4];
    reference_matmul::linear_forward(&x, &w, &mut y, 2, false);
    assert_eq!(y, [-2., -2., 4., 13.]);
    reference_matmul::linear_forward(&x, &w, &mut y, 2, true);
    assert_eq!(y, [-4., -4., 8., 26.]);
    let dy = [1., -1., 0., 2.];
    let mut dx = [0.0f32; 6];
    reference_matmul::linear_backward_input(&dy, &w, &mut dx, 2, false);
    assert_eq!(dx, [-3., -3., -3., 8., 10., 12.]);
    // C = 2·Aᵀ·B − C with A [k=2, m=1] transposed, B [2, 2].
    let g = Gemm {
        m: 1,
        n: 2,
        k: 2,
        trans_a: true,
        trans_b: false,
        alpha: 2.0,
        beta: -1.0,
    };
    let mut c = [1.0f32, 1.0];
    reference_matmul::matmul(g, &[1., 2.], &[1., 2., 3., 4.], &mut c);
    assert_eq!(c, [13., 19.]);
    // LoRA with r = 1: A = [1, 1, 1], B = [[2], [3]], scale 0.5.
    let d = lora_dims(2, 3, 2, 1, 0.5);
    let (a, b) = ([1., 1., 1.], [2., 3.]);
    let (mut u, mut y) = ([0.0f32; 2], [1.0f32; 4]);
    reference_matmul::lora_forward(&x, &a, &b, d, &mut u, &mut y);
    assert_eq!(u, [0., 3.]);
    assert_eq!(y, [1., 1., 4., 5.5]);
    let (mut da, mut db, mut du, mut dx) = ([0.0f32; 3], [0.0f32; 2], [0.0f32; 2], [0.0f32; 6]);
    reference_matmul::lora_backward(
        &x,
        &a,
        &b,
        &u,
        &dy,
        d,
        &mut da,
        &mut db,
        &mut du,
        Some(&mut dx),
    );
    // dB = 0.5·dyᵀ·u = [0.5·(1·0 + 0·3), 0.5·(−1·0 + 2·3)]; du = 0.5·dy·B = [−0.5, 3].
    assert_eq!(db, [0., 3.]);
    assert_eq!(du, [-0.5, 3.]);
    assert_eq!(da, [5.5, 3., 0.5]);
    assert_eq!(dx, [-0.5, -0.5, -0.5, 3., 3., 3.]);
}

#[test]
fn linear_forward_matches_reference() {
    check_linear(1, false);
}

#[test]
fn linear_backward_input_matches_reference() {
    check_linear(2, true);
}

/// The fast `linear_forward` (`backward` false: x `[m,k]` in, y `[m,n]` out) or
/// `linear_backward_input` (true: dy `[m,n]` in, dx `[m,k]` out) against the reference on
/// every shape, dtype, engine and accumulate mode.
fn check_linear(seed: u64, backward: bool) {
    let reference = Cpu::reference();
    let engines = engines();
    let mut rng = Rng::new(seed);
    for (si, &(m, n, k)) in SHAPES.iter().enumerate() {
        // The length of the products' sums, and of an output row.
        let (inner, outer) = if backward { (n, k) } else { (k, n) };
        for dtype in DTYPES {
            let w = weight(&mut rng, n, k, dtype);
            let x = rng.vec(m * inner);
            let y0 = rng.vec(m * outer);
            for accumulate in [false, true] {
                let mut want = y0.clone();
                if backward {
                    reference.linear_backward_input(&x, &w, &mut want, m, accumulate);
                } else {
                    reference.linear_forward(&x, &w, &mut want, m, accumulate);
                }
                for (cpu, simd) in &engines {
                    let mut got = if accumulate {
                        y0.clone()
                    } else {
                        vec![f32::NAN; m * outer]
                    };
                    cpu.install(|| {
                        if backward {
                            matmul::linear_backward_input_with(
                                *simd, &x, &w, &mut got, m, accumulate,
                            )
                        } else {
                            matmul::linear_forward_with(*simd, &x, &w, &mut got, m, accumulate)
                        }
                    });
                    let what = format!(
                        "shape {si} {m}x{n}x{k} {dtype:?} acc={accumulate} {}",
                        label(cpu, *simd)
                    );
                    assert_close(&what, &got, &want, inner);
                }
            }
        }
    }
}

/// (alpha, beta) pairs: plain, scaled with a C term, accumulate, and beta = 0 with NaN in C.
const ALPHA_BETA: [(f32, f32); 4] = [(1.0, 0.0), (-0.5, 0.25), (2.0, 1.0), (0.75, 0.0)];

/// A matmul under test: `(g, a, b, c)`.
type MatmulFn<'a> = &'a dyn Fn(Gemm, &[f32], &[f32], &mut [f32]);

fn check_matmul(name: &str, run: MatmulFn<'_>) {
    let mut rng = Rng::new(3);
    for (si, &(m, n, k)) in SHAPES.iter().enumerate() {
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                let a = rng.vec(m * k);
                let b = rng.vec(k * n);
                for (alpha, beta) in ALPHA_BETA {
                    let g = Gemm {
                        m,
                        n,
                        k,
                        trans_a,
                        trans_b,
                        alpha,
                        beta,
                    };
                    let c0: Vec<f32> = if beta == 0.0 {
                        vec![f32::NAN; m * n]
                    } else {
                        rng.vec(m * n)
                    };
                    let mut want = c0.clone();
                    reference_matmul::matmul(g, &a, &b, &mut want);
                    assert!(
                        want.iter().all(|v| v.is_finite()),
                        "reference left NaN in C"
                    );
                    let mut got = c0.clone();
                    run(g, &a, &b, &mut got);
                    let what = format!("{name}: shape {si} {g:?}");
                    assert_close(&what, &got, &want, k);
                }
            }
        }
    }
}

#[test]
fn matmul_matches_reference() {
    // Through the Backend trait (the best kernels) ...
    for threads in [1, 2] {
        let cpu = fast(threads);
        check_matmul(&cpu.name(), &|g, a, b, c| {
            let (a, b, mut cv) = (a.to_vec(), b.to_vec(), c.to_vec());
            cpu.matmul(g, &a, &b, &mut cv);
            c.copy_from_slice(&cv);
        });
    }
    // ... and every instruction set this CPU has.
    for (cpu, simd) in engines() {
        check_matmul(&label(&cpu, simd), &|g, a, b, c| {
            cpu.install(|| matmul::matmul_with(simd, g, a, b, c))
        });
    }
}

#[test]
fn matmul_with_empty_k_scales_c() {
    let cpu = fast(2);
    let g = Gemm {
        m: 3,
        n: 2,
        k: 0,
        trans_a: false,
        trans_b: true,
        alpha: 1.0,
        beta: 0.5,
    };
    let mut c = vec![2.0f32; 6];
    cpu.matmul(g, &vec![], &vec![], &mut c);
    assert_eq!(c, [1.0; 6]);
    let mut c = vec![f32::NAN; 6];
    cpu.matmul(Gemm { beta: 0.0, ..g }, &vec![], &vec![], &mut c);
    assert_eq!(c, [0.0; 6]);
    // m = 0 touches nothing.
    let mut c = vec![7.0f32; 2];
    cpu.matmul(Gemm { m: 0, k: 4, ..g }, &vec![], &vec![1.0; 8], &mut c);
    assert_eq!(c, [7.0; 2]);
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut rng = Rng::new(4);
    let cpus = [fast(1), fast(2), fast(3), fast(8)];
    // Shapes whose row blocks and panel groups split differently for 1, 2, 3 and 8 threads
    // (8 on this 2-core machine: more threads than row tiles, panels split into groups).
    for &(m, n, k) in &[
        (300, 200, 500),
        (40, 900, 64),
        (2048, 96, 40),
        (3, 700, 300),
        // the 135M k/v projection at batch 2 x seq 128: six panels, one column chunk per
        // thread on 2 and 3 threads, row blocks on 1 and 8
        (256, 192, 576),
    ] {
        let w = weight(&mut rng, n, k, WeightDType::Bf16);
        let x = rng.vec(m * k);
        let outs: Vec<Vec<f32>> = cpus
            .iter()
            .map(|cpu| {
                let mut y = vec![0.0; m * n];
                cpu.linear_forward(&x, &w, &mut y, m, false);
                y
            })
            .collect();
        assert!(
            outs.iter().all(|o| *o == outs[0]),
            "{m}x{n}x{k}: bits differ"
        );
        let d = lora_dims(m, k, n, 8, 2.0);
        let (a, b, dy) = (rng.vec(8 * k), rng.vec(n * 8), rng.vec(m * n));
        let grads: Vec<Vec<f32>> = cpus
            .iter()
            .map(|cpu| {
                let (mut u, mut y) = (vec![0.0; m * 8], vec![0.0; m * n]);
                cpu.lora_forward(&x, &a, &b, d, &mut u, &mut y);
                let (mut da, mut db, mut du, mut dx) = (
                    vec![0.0; 8 * k],
                    vec![0.0; n * 8],
                    vec![0.0; m * 8],
                    vec![0.0; m * k],
                );
                cpu.lora_backward(
                    &x,
                    &a,
                    &b,
                    &u,
                    &dy,
                    d,
                    &mut da,
                    &mut db,
                    &mut du,
                    Some(&mut dx),
                );
                [u, y, da, db, du, dx].concat()
            })
            .collect();
        assert!(
            grads.iter().all(|g| *g == grads[0]),
            "LoRA {m}x{n}x{k}: bits differ"
        );
    }
}

#[test]
fn misaligned_weights_are_copied_and_give_the_same_result() {
    let mut rng = Rng::new(5);
    let cpu = fast(2);
    let (m, n, k) = (37, 45, 70);
    for dtype in DTYPES {
        let v = rng.vec(n * k);
        let aligned = CpuWeight::new(&weight_source(&v, n, k, dtype, 0)).unwrap();
        // One byte in: misaligned for u16 and f32 alike.
        let odd = CpuWeight::new(&weight_source(&v, n, k, dtype, 1)).unwrap();
        // Two bytes in: aligned for f16/bf16 (read in place), not for f32 (copied).
        let two = CpuWeight::new(&weight_source(&v, n, k, dtype, 2)).unwrap();
        assert!(aligned.is_zero_copy() && !odd.is_zero_copy());
        assert_eq!(two.is_zero_copy(), dtype != WeightDType::F32);
        let x = rng.vec(m * k);
        let dy = rng.vec(m * n);
        let run = |w: &CpuWeight| {
            let mut y = vec![0.0; m * n];
            cpu.linear_forward(&x, w, &mut y, m, false);
            let mut dx = vec![0.0; m * k];
            cpu.linear_backward_input(&dy, w, &mut dx, m, false);
            (y, dx)
        };
        let want = run(&aligned);
        assert!(run(&odd) == want, "{dtype:?}: odd offset differs");
        assert!(run(&two) == want, "{dtype:?}: offset 2 differs");
        let mut y = vec![0.0; m * n];
        Cpu::reference().linear_forward(&x, &odd, &mut y, m, false);
        assert_close(
            &format!("{dtype:?} misaligned vs reference"),
            &want.0,
            &y,
            k,
        );
    }
}

/// (m, k, n, r): single rows, ranks below, at and above the rank group of 8, several row
/// blocks (m > 64), lengths that are not multiples of the vector width.
const LORA_SHAPES: [(usize, usize, usize, usize); 8] = [
    (1, 1, 1, 1),
    (1, 17, 5, 8),
    (3, 33, 17, 3),
    (7, 16, 32, 8),
    (65, 40, 23, 11),
    (150, 64, 48, 16),
    (200, 77, 131, 8),
    (33, 256, 100, 20),
];

/// `LoraDims` in the order the shapes list them.
fn lora_dims(m: usize, k: usize, n: usize, r: usize, scale: f32) -> LoraDims {
    LoraDims { m, k, n, r, scale }
}

#[test]
fn lora_forward_matches_reference() {
    let mut rng = Rng::new(6);
    let engines = engines();
    for &(m, k, n, r) in &LORA_SHAPES {
        let d = lora_dims(m, k, n, r, 1.7);
        let (x, a, b, y0) = (
            rng.vec(m * k),
            rng.vec(r * k),
            rng.vec(n * r),
            rng.vec(m * n),
        );
        let (mut wu, mut wy) = (vec![0.0; m * r], y0.clone());
        reference_matmul::lora_forward(&x, &a, &b, d, &mut wu, &mut wy);
        for (cpu, simd) in &engines {
            let (mut u, mut y) = (vec![f32::NAN; m * r], y0.clone());
            cpu.install(|| matmul::lora_forward_with(*simd, &x, &a, &b, d, &mut u, &mut y));
            assert_close(&format!("u {d:?} {}", label(cpu, *simd)), &u, &wu, k);
            assert_close(&format!("y {d:?} {}", label(cpu, *simd)), &y, &wy, k * r);
        }
    }
}

#[test]
fn lora_backward_matches_reference() {
    let mut rng = Rng::new(7);
    let engines = engines();
    for &(m, k, n, r) in &LORA_SHAPES {
        let d = lora_dims(m, k, n, r, 0.6);
        let (x, a, b, u, dy) = (
            rng.vec(m * k),
            rng.vec(r * k),
            rng.vec(n * r),
            rng.vec(m * r),
            rng.vec(m * n),
        );
        let (da0, db0, dx0) = (rng.vec(r * k), rng.vec(n * r), rng.vec(m * k));
        let (mut wda, mut wdb, mut wdu, mut wdx) =
            (da0.clone(), db0.clone(), vec![0.0; m * r], dx0.clone());
        reference_matmul::lora_backward(
            &x,
            &a,
            &b,
            &u,
            &dy,
            d,
            &mut wda,
            &mut wdb,
            &mut wdu,
            Some(&mut wdx),
        );
        for (cpu, simd) in &engines {
            for with_dx in [true, false] {
                let (mut da, mut db, mut du, mut dx) =
                    (da0.clone(), db0.clone(), vec![f32::NAN; m * r], dx0.clone());
                let dxo = if with_dx {
                    Some(dx.as_mut_slice())
                } else {
                    None
                };
                cpu.install(|| {
                    matmul::lora_backward_with(
                        *simd, &x, &a, &b, &u, &dy, d, &mut da, &mut db, &mut du, dxo,
                    )
                });
                let what = |t: &str| format!("{t} {d:?} dx={with_dx} {}", label(cpu, *simd));
                assert_close(&what("dB"), &db, &wdb, m);
                assert_close(&what("du"), &du, &wdu, n);
                assert_close(&what("dA"), &da, &wda, m * n);
                if with_dx {
                    assert_close(&what("dx"), &dx, &wdx, n * r);
                } else {
                    assert!(dx == dx0, "{}: dx changed although not given", what(""));
                }
            }
        }
    }
}

fn assert_same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{what}: element {i}: {g} in the kernels vs {w} separately"
        );
    }
}

/// LoRA dropout applied inside the kernels gives the same bits as `dropout_forward` into a
/// buffer, the plain LoRA ops on it and `dropout_backward` of their input gradient: every
/// instruction set, 1 and 2 threads, ranks of one and of several groups of 8, odd sizes,
/// three rates.
#[test]
fn lora_dropout_in_the_kernels_matches_separate_dropout_bit_for_bit() {
    let mut rng = Rng::new(9);
    let engines = engines();
    for &(m, k, n, r) in &LORA_SHAPES {
        for (p, seed) in [(0.05f32, 11u64), (0.5, 0xDEAD_BEEF_0123_4567), (0.0, 5)] {
            let drop = LoraDropout { p, seed };
            let d = lora_dims(m, k, n, r, 1.3);
            let (x, a, b, dy, y0) = (
                rng.vec(m * k),
                rng.vec(r * k),
                rng.vec(n * r),
                rng.vec(m * n),
                rng.vec(m * n),
            );
            let (da0, db0, dx0) = (rng.vec(r * k), rng.vec(n * r), rng.vec(m * k));
            let mut xd = vec![0.0; m * k];
            ops::dropout_forward(&x, &mut xd, p, seed);
            for (cpu, simd) in &engines {
                let what = |t: &str| format!("{t} {d:?} p={p} {}", label(cpu, *simd));
                let simd = *simd;
                let (mut u1, mut y1) = (vec![f32::NAN; m * r], y0.clone());
                cpu.install(|| matmul::lora_forward_with(simd, &xd, &a, &b, d, &mut u1, &mut y1));
                let (mut u2, mut y2) = (vec![f32::NAN; m * r], y0.clone());
                cpu.install(|| {
                    matmul::lora_forward_dropout_with(simd, &x, drop, &a, &b, d, &mut u2, &mut y2)
                });
                assert_same_bits(&what("u"), &u2, &u1);
                assert_same_bits(&what("y"), &y2, &y1);

                let (mut da1, mut db1, mut du1) = (da0.clone(), db0.clone(), vec![0.0; m * r]);
                let (mut ddx, mut dx1) = (vec![0.0; m * k], dx0.clone());
                cpu.install(|| {
                    matmul::lora_backward_with(
                        simd,
                        &xd,
                        &a,
                        &b,
                        &u1,
                        &dy,
                        d,
                        &mut da1,
                        &mut db1,
                        &mut du1,
                        Some(&mut ddx),
                    )
                });
                ops::dropout_backward(&ddx, &mut dx1, p, seed);
                let (mut da2, mut db2, mut du2) = (da0.clone(), db0.clone(), vec![0.0; m * r]);
                let mut dx2 = dx0.clone();
                cpu.install(|| {
                    matmul::lora_backward_dropout_with(
                        simd, &x, drop, &a, &b, &u1, &dy, d, &mut da2, &mut db2, &mut du2, &mut dx2,
                    )
                });
                assert_same_bits(&what("dA"), &da2, &da1);
                assert_same_bits(&what("dB"), &db2, &db1);
                assert_same_bits(&what("du"), &du2, &du1);
                assert_same_bits(&what("dx"), &dx2, &dx1);
            }
        }
    }
}

/// `L = Σ_ij R_ij · y_ij` with `y = x·W0ᵀ + s·(x·Aᵀ)·Bᵀ`, all in f64.
#[allow(clippy::too_many_arguments)]
fn loss_f64(x: &[f64], w0: &[f64], a: &[f64], b: &[f64], r_mat: &[f64], d: LoraDims) -> f64 {
    let LoraDims { m, k, n, r, scale } = d;
    let mut total = 0.0;
    for i in 0..m {
        let u: Vec<f64> = (0..r)
            .map(|q| (0..k).map(|p| x[i * k + p] * a[q * k + p]).sum())
            .collect();
        for j in 0..n {
            let base: f64 = (0..k).map(|p| x[i * k + p] * w0[j * k + p]).sum();
            let lora: f64 = (0..r).map(|q| u[q] * b[j * r + q]).sum();
            total += r_mat[i * n + j] * (base + scale as f64 * lora);
        }
    }
    total
}

#[test]
fn lora_gradients_match_finite_differences() {
    let mut rng = Rng::new(8);
    let (m, k, n, r) = (9, 13, 11, 3);
    let d = lora_dims(m, k, n, r, 1.25);
    let (x, w0, a, b, rm) = (
        rng.vec(m * k),
        rng.vec(n * k),
        rng.vec(r * k),
        rng.vec(n * r),
        rng.vec(m * n),
    );
    let f64s = |v: &[f32]| v.iter().map(|&t| t as f64).collect::<Vec<f64>>();
    let (xd, w0d, ad, bd, rd) = (f64s(&x), f64s(&w0), f64s(&a), f64s(&b), f64s(&rm));
    // Central differences in f64 (L is bilinear, so they are exact up to rounding).
    let h = 1e-3;
    let fd = |which: usize, idx: usize| {
        let mut p = [xd.clone(), ad.clone(), bd.clone()];
        p[which][idx] += h;
        let up = loss_f64(&p[0], &w0d, &p[1], &p[2], &rd, d);
        p[which][idx] -= 2.0 * h;
        let down = loss_f64(&p[0], &w0d, &p[1], &p[2], &rd, d);
        (up - down) / (2.0 * h)
    };
    let w = CpuWeight::new(&WeightSource::from_f32(w0.clone(), n, k)).unwrap();
    for cpu in [Cpu::reference(), fast(1), fast(2)] {
        // dy = ∂L/∂y = R; the base layer adds its input gradient dy·W0 to dx.
        let (mut u, mut y) = (vec![0.0; m * r], vec![0.0; m * n]);
        cpu.linear_forward(&x, &w, &mut y, m, false);
        cpu.lora_forward(&x, &a, &b, d, &mut u, &mut y);
        let (mut da, mut db, mut du, mut dx) = (
            vec![0.0; r * k],
            vec![0.0; n * r],
            vec![0.0; m * r],
            vec![0.0; m * k],
        );
        cpu.linear_backward_input(&rm, &w, &mut dx, m, false);
        cpu.lora_backward(
            &x,
            &a,
            &b,
            &u,
            &rm,
            d,
            &mut da,
            &mut db,
            &mut du,
            Some(&mut dx),
        );
        for (which, name, grad) in [(0, "dx", &dx), (1, "dA", &da), (2, "dB", &db)] {
            for (idx, &g) in grad.iter().enumerate() {
                let want = fd(which, idx);
                assert!(
                    (g as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{} {name}[{idx}]: {g} vs finite difference {want}",
                    cpu.name()
                );
            }
        }
        // The loss itself: Σ R ⊙ y.
        let l: f64 = y.iter().zip(&rm).map(|(&a, &b)| a as f64 * b as f64).sum();
        let want = loss_f64(&xd, &w0d, &ad, &bd, &rd, d);
        assert!(
            (l - want).abs() <= 1e-4 * (1.0 + want.abs()),
            "{}: loss {l} vs {want}",
            cpu.name()
        );
    }
}

#[test]
#[should_panic(expected = "linear_forward")]
fn fast_linear_forward_rejects_short_output() {
    let w = CpuWeight::new(&WeightSource::from_f32(vec![0.0; 6], 2, 3)).unwrap();
    fast(2).linear_forward(&vec![0.0; 6], &w, &mut vec![0.0; 3], 2, false);
}

#[test]
#[should_panic(expected = "linear_backward_input")]
fn reference_linear_backward_input_rejects_short_input() {
    let w = CpuWeight::new(&WeightSource::from_f32(vec![0.0; 6], 2, 3)).unwrap();
    Cpu::reference().linear_backward_input(&vec![0.0; 3], &w, &mut vec![0.0; 6], 2, false);
}

#[test]
#[should_panic(expected = "matmul")]
fn fast_matmul_rejects_short_b() {
    let g = Gemm {
        m: 2,
        n: 2,
        k: 2,
        trans_a: false,
        trans_b: false,
        alpha: 1.0,
        beta: 0.0,
    };
    matmul::matmul(g, &[0.0; 4], &[0.0; 3], &mut [0.0; 4]);
}

#[test]
#[should_panic(expected = "lora_backward")]
fn fast_lora_backward_rejects_short_gradient() {
    let d = lora_dims(2, 3, 2, 2, 1.0);
    let cpu = fast(2);
    let (x, a, b, u, dy) = (
        vec![0.0; 6],
        vec![0.0; 6],
        vec![0.0; 4],
        vec![0.0; 4],
        vec![0.0; 4],
    );
    let (mut da, mut db, mut du) = (vec![0.0; 5], vec![0.0; 4], vec![0.0; 4]);
    cpu.lora_backward(&x, &a, &b, &u, &dy, d, &mut da, &mut db, &mut du, None);
}

#[test]
#[should_panic(expected = "lora_forward")]
fn reference_lora_forward_rejects_short_a() {
    let d = lora_dims(2, 3, 2, 2, 1.0);
    let (mut u, mut y) = (vec![0.0; 4], vec![0.0; 4]);
    reference_matmul::lora_forward(&[0.0; 6], &[0.0; 5], &[0.0; 4], d, &mut u, &mut y);
}

#[test]
fn peak_measures_are_positive() {
    let cpu = fast(1);
    let peak = matmul::measure_matmul_peak(&cpu, 0.05);
    let fma = matmul::measure_fma_peak(&cpu, 0.05);
    assert!(peak.is_finite() && peak > 0.1, "matmul peak {peak}");
    assert!(fma.is_finite() && fma > 0.1, "fma peak {fma}");
}
