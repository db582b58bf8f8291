//! Would a bf16 GEMM be faster than the f32 one on this CPU? Times two in-cache microkernels
//! of the same register blocking as the f32 GEMM (14 rows × 32 columns, 28 zmm accumulators,
//! A broadcast from memory, B from a packed panel):
//! - **f32**: `vfmadd231ps`, one step of k per pair of B loads;
//! - **bf16**: `vdpbf16ps` (AVX-512 BF16), two steps of k per pair of B loads, B packed as
//!   k-pairs, A as bf16 — the instruction a `--dtype bf16` path would be built on;
//!
//! on every thread at once, and prints the GFLOP/s of each and their ratio. It also says
//! whether the CPU exposes AMX (`tdpbf16ps` tiles), the other way to bf16 speed. Before timing,
//! both kernels' results are checked against an f64 sum of the same (bf16-rounded) inputs.
//!
//! ```text
//! cargo run --release -p fedcdd-kernels --example bf16_probe [-- --threads 1,2] [--seconds 1]
//! ```

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod common;

fn main() {
    let mut threads = vec![1usize, 2];
    let mut seconds = 1.0f64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let val = args.next();
        let parsed = match (a.as_str(), val) {
            ("--threads", Some(v)) => v
                .split(',')
                .map(|t| t.parse::<usize>().map_err(|e| format!("--threads: {e}")))
                .collect::<Result<Vec<_>, _>>()
                .map(|t| threads = t),
            ("--seconds", Some(v)) => v
                .parse()
                .map(|s| seconds = s)
                .map_err(|e| format!("--seconds: {e}")),
            _ => Err(format!("unknown argument or missing value: {a}")),
        };
        if let Err(e) = parsed {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
    if let Err(e) = probe::run(&threads, seconds) {
        eprintln!("{e}");
        std::process::exit(1);
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod probe {
    pub fn run(_: &[usize], _: f64) -> Result<(), String> {
        Err("this probe times x86-64 AVX-512 instructions; this is not an x86-64 CPU".into())
    }
}

#[cfg(target_arch = "x86_64")]
mod probe {
    use std::arch::x86_64::*;
    use std::time::Instant;

    use half::bf16;

    const MR: usize = 14;
    const NR: usize = 32;
    /// Steps of k per call: A's tile (14 × 256 f32 = 14 KiB) stays in L1, B's panels in L2,
    /// as in the GEMM's blocking.
    const KC: usize = 256;
    /// Rows and columns swept per pass: the 135M model's `m = batch·seq = 256` and q/o `n`.
    const M: usize = 18 * MR;
    const N: usize = 18 * NR;

    /// The inputs of one thread, in both layouts.
    struct Data {
        a32: Vec<f32>,  // [M][KC]
        b32: Vec<f32>,  // N/NR panels of [KC][NR]
        a16: Vec<bf16>, // [M][KC]
        b16: Vec<bf16>, // N/NR panels of [KC/2][NR][2]
        c: Vec<f32>,    // [M][N]
        bmat: Vec<f32>, // [KC][N], the bf16-rounded B as plain f32 (for the check)
    }

    /// bf16-exact values, so both kernels multiply the same numbers.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut v = crate::common::fill(n, seed);
        v.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32());
        v
    }

    fn data(seed: u64) -> Data {
        let a32 = values(M * KC, seed);
        let bmat = values(KC * N, seed + 1);
        let mut b32 = Vec::with_capacity(KC * N);
        let mut b16 = Vec::with_capacity(KC * N);
        for j0 in (0..N).step_by(NR) {
            for p in 0..KC {
                b32.extend((0..NR).map(|j| bmat[p * N + j0 + j]));
            }
            for p in (0..KC).step_by(2) {
                for j in 0..NR {
                    b16.push(bf16::from_f32(bmat[p * N + j0 + j]));
                    b16.push(bf16::from_f32(bmat[(p + 1) * N + j0 + j]));
                }
            }
        }
        let a16 = a32.iter().map(|&v| bf16::from_f32(v)).collect();
        Data {
            a32,
            b32,
            a16,
            b16,
            c: vec![0.0; M * N],
            bmat,
        }
    }

    /// `C[14×32] = A[14×KC] · B_panel[KC×32]` in f32 FMAs.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_f32(a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..KC {
            // SAFETY (all pointer reads here): the caller passes a tile inside `Data`.
            let b0 = unsafe { _mm512_loadu_ps(b.add(p * NR)) };
            let b1 = unsafe { _mm512_loadu_ps(b.add(p * NR + 16)) };
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(unsafe { *a.add(i * KC + p) });
                row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                row[1] = _mm512_fmadd_ps(av, b1, row[1]);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            unsafe {
                _mm512_storeu_ps(c.add(i * ldc), row[0]);
                _mm512_storeu_ps(c.add(i * ldc + 16), row[1]);
            }
        }
    }

    /// The same tile with `vdpbf16ps`: each instruction adds two products (k and k+1) per lane.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile_bf16(a: *const bf16, b: *const bf16, c: *mut f32, ldc: usize) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in (0..KC).step_by(2) {
            // SAFETY (all pointer reads here): the caller passes a tile inside `Data`.
            let b0: __m512bh = unsafe { _mm512_loadu_si512(b.add(p * NR).cast()) }.into_bh();
            let b1: __m512bh = unsafe { _mm512_loadu_si512(b.add(p * NR + NR).cast()) }.into_bh();
            for (i, row) in acc.iter_mut().enumerate() {
                let pair = unsafe { a.add(i * KC + p).cast::<i32>().read_unaligned() };
                let av = _mm512_set1_epi32(pair).into_bh();
                row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            unsafe {
                _mm512_storeu_ps(c.add(i * ldc), row[0]);
                _mm512_storeu_ps(c.add(i * ldc + 16), row[1]);
            }
        }
    }

    trait IntoBh {
        fn into_bh(self) -> __m512bh;
    }
    impl IntoBh for __m512i {
        fn into_bh(self) -> __m512bh {
            // SAFETY: both are 512 bits of plain data.
            unsafe { std::mem::transmute::<__m512i, __m512bh>(self) }
        }
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Kernel {
        F32,
        Bf16,
    }

    /// One sweep over all `M/MR × N/NR` tiles.
    fn sweep(d: &mut Data, k: Kernel) {
        for (jp, j0) in (0..N).step_by(NR).enumerate() {
            for i0 in (0..M).step_by(MR) {
                let c = d.c[i0 * N + j0..].as_mut_ptr();
                // SAFETY: AVX-512F/BF16 were checked in `run`; every tile lies inside `d`.
                unsafe {
                    match k {
                        Kernel::F32 => tile_f32(
                            d.a32.as_ptr().add(i0 * KC),
                            d.b32.as_ptr().add(jp * KC * NR),
                            c,
                            N,
                        ),
                        Kernel::Bf16 => tile_bf16(
                            d.a16.as_ptr().add(i0 * KC),
                            d.b16.as_ptr().add(jp * KC * NR),
                            c,
                            N,
                        ),
                    }
                }
            }
        }
    }

    /// Largest |C − A·B| over C, against an f64 sum, relative to the largest |A|·|B| row sum.
    fn check(d: &mut Data, k: Kernel) -> f64 {
        sweep(d, k);
        let mut worst = 0.0f64;
        for i in 0..M {
            for j in 0..N {
                let (mut s, mut mag) = (0.0f64, 0.0f64);
                for p in 0..KC {
                    let t = d.a32[i * KC + p] as f64 * d.bmat[p * N + j] as f64;
                    s += t;
                    mag += t.abs();
                }
                worst = worst.max((d.c[i * N + j] as f64 - s).abs() / mag.max(1e-30));
            }
        }
        worst
    }

    /// GFLOP/s of `k` with `threads` threads sweeping their own data at once (best sweep
    /// rate of each thread over about `seconds`, summed).
    fn rate(k: Kernel, threads: usize, seconds: f64) -> f64 {
        let flops = 2.0 * (M * N * KC) as f64;
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        let mut d = data(100 + t as u64);
                        let start = Instant::now();
                        let mut best = f64::INFINITY;
                        while start.elapsed().as_secs_f64() < seconds {
                            let t0 = Instant::now();
                            sweep(&mut d, k);
                            best = best.min(t0.elapsed().as_secs_f64());
                        }
                        std::hint::black_box(&d.c);
                        flops / best / 1e9
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        })
    }

    fn amx_exposed() -> (bool, bool) {
        // CPUID leaf 7: EDX bit 24 AMX-TILE, bit 22 AMX-BF16.
        let r = __cpuid_count(7, 0);
        ((r.edx >> 24) & 1 == 1, (r.edx >> 22) & 1 == 1)
    }

    pub fn run(threads: &[usize], seconds: f64) -> Result<(), String> {
        let (tile, amx_bf16) = amx_exposed();
        println!(
            "AMX: tiles {}, AMX-BF16 {} (CPUID leaf 7)",
            if tile { "exposed" } else { "not exposed" },
            if amx_bf16 { "exposed" } else { "not exposed" }
        );
        if !is_x86_feature_detected!("avx512f") || !is_x86_feature_detected!("avx512bf16") {
            return Err("this CPU has no AVX-512 BF16 (vdpbf16ps): nothing to compare".into());
        }
        let mut d = data(7);
        let (e32, e16) = (check(&mut d, Kernel::F32), check(&mut d, Kernel::Bf16));
        println!(
            "check against an f64 sum (relative to Σ|a·b|): f32 kernel {e32:.1e}, bf16 kernel {e16:.1e}"
        );
        // f32 sums of 256 products: well under 1e-5 of Σ|a·b|; anything larger is a wrong kernel.
        if e32 > 1e-5 || e16 > 1e-5 {
            return Err(
                "a kernel computes the wrong product; its timing would mean nothing".into(),
            );
        }
        println!(
            "{M} x {N} x {KC} per sweep, tile {MR} x {NR}, in cache, best sweep of ~{seconds} s per thread"
        );
        println!("threads   f32 FMA GFLOP/s   bf16 vdpbf16ps GFLOP/s   bf16 / f32");
        for &t in threads {
            let t = t.max(1);
            let f = rate(Kernel::F32, t, seconds);
            let b = rate(Kernel::Bf16, t, seconds);
            println!("{t:>7}   {f:>15.1}   {b:>22.1}   {:>10.2}", b / f);
        }
        Ok(())
    }
}
