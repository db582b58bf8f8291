//! GFLOP/s of the CPU backend's matmul and LoRA ops at the model's shapes, next to this
//! machine's peak, for 1 and 2 threads (or `--threads 1,4,...`).
//!
//! ```text
//! cargo run --release -p fedcdd-kernels --example gemm_bench [-- --small] [--large] [--dtype bf16]
//!     [--threads 1,2] [--seconds 0.3] [--filter lm_head] [--simd avx2] [--cpu-time]
//! ```
//! `--simd avx2|portable` runs another instruction set's kernels than this CPU's best.
//! `--small` adds SmolLM2-135M shapes (hidden 576, intermediate 1536, vocab 49152, m = 256).
//! `--large` adds TinyLlama-1.1B shapes (hidden 2048, intermediate 5632, vocab 32000, m=512)
//! and decoding (m = 1 and 8). Each row runs the op repeatedly for about `--seconds` and
//! prints the best and the median rate of those runs. `--cpu-time` times one-thread runs by
//! the worker thread's CPU time instead of wall time (for a machine others use too; runs
//! with more threads stay on wall time).
mod common;

use std::sync::Arc;
use std::time::Instant;

use common::fill;
use fedcdd_kernels::cpu::matmul::{self as mm, Simd, measure_fma_peak, measure_matmul_peak};
use fedcdd_kernels::{Backend, Cpu, LoraDims, WeightDType, WeightSource};

struct Opts {
    threads: Vec<usize>,
    large: bool,
    small: bool,
    dtype: WeightDType,
    seconds: f64,
    filter: Option<String>,
    cpu_time: bool,
    simd: Simd,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        threads: vec![1, 2],
        large: false,
        small: false,
        dtype: WeightDType::F32,
        seconds: 0.3,
        filter: None,
        cpu_time: false,
        simd: Simd::detect(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--large" => o.large = true,
            "--small" => o.small = true,
            "--threads" => {
                o.threads = val()?
                    .split(',')
                    .map(|t| t.parse().map_err(|e| format!("--threads: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--dtype" => {
                o.dtype = match val()?.as_str() {
                    "f32" => WeightDType::F32,
                    "f16" => WeightDType::F16,
                    "bf16" => WeightDType::Bf16,
                    d => return Err(format!("--dtype: f32, f16 or bf16, not {d}")),
                }
            }
            "--seconds" => o.seconds = val()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--filter" => o.filter = Some(val()?),
            "--cpu-time" => o.cpu_time = true,
            "--simd" => {
                o.simd = match val()?.as_str() {
                    "avx512" => Simd::Avx512,
                    "avx2" => Simd::Avx2,
                    "portable" => Simd::Portable,
                    s => return Err(format!("--simd: avx512, avx2 or portable, not {s}")),
                };
                if !o.simd.available() {
                    return Err(format!("--simd: this CPU cannot run {}", o.simd.name()));
                }
            }
            "--bench" => {} // passed by `cargo bench`
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(o)
}

fn weight(n: usize, k: usize, dtype: WeightDType) -> WeightSource {
    let v = fill(n * k, (n * 31 + k) as u64);
    let bytes: Vec<u8> = match dtype {
        WeightDType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        WeightDType::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        WeightDType::Bf16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
    };
    WeightSource {
        bytes: Arc::new(bytes),
        offset: 0,
        dtype,
        rows: n,
        cols: k,
    }
}

/// Seconds of CPU time the calling thread has used, where the OS says.
#[cfg(target_os = "linux")]
fn thread_cpu_seconds() -> f64 {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    unsafe extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a valid timespec (two 64-bit fields on 64-bit Linux).
    if unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return f64::NAN;
    }
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}
#[cfg(not(target_os = "linux"))]
fn thread_cpu_seconds() -> f64 {
    f64::NAN
}

/// Runs `f` for about `seconds` (at least 3 times after a warm-up); (best, median) seconds
/// of wall time or, with `cpu_of: Some(cpu)` (a one-thread backend), of CPU time of the
/// backend's worker thread, which other processes on a busy machine disturb less.
fn time(seconds: f64, cpu_of: Option<&Cpu>, mut f: impl FnMut() + Send) -> (f64, f64) {
    f();
    let start = Instant::now();
    let mut t = Vec::new();
    while t.len() < 3 || (start.elapsed().as_secs_f64() < seconds && t.len() < 1000) {
        let s = Instant::now();
        match cpu_of {
            Some(cpu) => t.push(cpu.install(|| {
                let c = thread_cpu_seconds();
                f();
                thread_cpu_seconds() - c
            })),
            None => {
                f();
                t.push(s.elapsed().as_secs_f64());
            }
        }
    }
    t.sort_by(f64::total_cmp);
    (t[0], t[t.len() / 2])
}

fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("gemm_bench: {e}");
            std::process::exit(2);
        }
    };
    println!("GEMM kernel: {}; weights {:?}", o.simd.name(), o.dtype);
    // (name, m, n, k) of `nn.Linear` weights [n, k].
    let mut shapes: Vec<(&str, usize, usize, usize)> = vec![
        ("tiny q/o", 2048, 256, 256),
        ("tiny k/v", 2048, 128, 256),
        ("tiny gate/up", 2048, 688, 256),
        ("tiny down", 2048, 256, 688),
        ("tiny lm_head", 2048, 2048, 256),
    ];
    if o.small {
        // SmolLM2-135M (`smollm2-135m` preset) at batch 2 × seq 128.
        shapes.extend([
            ("135M q/o", 256, 576, 576),
            ("135M k/v", 256, 192, 576),
            ("135M gate/up", 256, 1536, 576),
            ("135M down", 256, 576, 1536),
            ("135M lm_head", 256, 49152, 576),
        ]);
    }
    if o.large {
        shapes.extend([
            ("1.1B q/o", 512, 2048, 2048),
            ("1.1B k/v", 512, 256, 2048),
            ("1.1B gate/up", 512, 5632, 2048),
            ("1.1B down", 512, 2048, 5632),
            ("1.1B lm_head", 512, 32000, 2048),
            ("1.1B decode gate/up", 1, 5632, 2048),
            ("1.1B decode lm_head", 1, 32000, 2048),
            ("1.1B decode-8 lm_head", 8, 32000, 2048),
        ]);
    }
    let keep = |name: &str| o.filter.as_deref().is_none_or(|f| name.contains(f));
    for &threads in &o.threads {
        let cpu = match Cpu::new(threads) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("gemm_bench: {e}");
                std::process::exit(1);
            }
        };
        let simd = o.simd;
        let cpu_of = (o.cpu_time && threads == 1).then_some(&cpu);
        let fma = measure_fma_peak(&cpu, 0.5);
        let peak = measure_matmul_peak(&cpu, 1.0);
        println!(
            "\n== {threads} thread(s): FMA peak {fma:.0} GFLOP/s, GEMM 1024³ {peak:.0} GFLOP/s ({:.0}% of FMA)",
            100.0 * peak / fma
        );
        println!(
            "{:<34} {:>5} {:>6} {:>6} {:>9} {:>9} {:>6}",
            "op", "m", "n", "k", "best GF/s", "med GF/s", "%FMA"
        );
        let row = |op: &str, m: usize, n: usize, k: usize, flops: f64, (best, med): (f64, f64)| {
            println!(
                "{op:<34} {m:>5} {n:>6} {k:>6} {:>9.1} {:>9.1} {:>5.0}%",
                flops / best / 1e9,
                flops / med / 1e9,
                100.0 * flops / best / 1e9 / fma
            );
        };
        for &(name, m, n, k) in &shapes {
            if !keep(name) {
                continue;
            }
            let w = match cpu.weight(&weight(n, k, o.dtype)) {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("gemm_bench: {e}");
                    std::process::exit(1);
                }
            };
            let flops = 2.0 * (m * n * k) as f64;
            let x = fill(m * k, 1);
            let dy = fill(m * n, 2);
            let mut y = vec![0.0; m * n];
            let mut dx = vec![0.0; m * k];
            let t = time(o.seconds, cpu_of, || {
                cpu.install(|| mm::linear_forward_with(simd, &x, &w, &mut y, m, false))
            });
            row(&format!("{name} linear_forward"), m, n, k, flops, t);
            let t = time(o.seconds, cpu_of, || {
                cpu.install(|| mm::linear_backward_input_with(simd, &dy, &w, &mut dx, m, true))
            });
            row(&format!("{name} linear_backward_input"), m, k, n, flops, t);
        }
        // LoRA r = 8 on the tiny preset's projections.
        for &(name, m, n, k) in &shapes {
            if !keep(name) || name.contains("lm_head") || name.contains("decode") {
                continue;
            }
            let r = 8;
            let d = LoraDims {
                m,
                k,
                n,
                r,
                scale: 2.0,
            };
            let x = fill(m * k, 3);
            let a = fill(r * k, 4);
            let b = fill(n * r, 5);
            let dy = fill(m * n, 6);
            let mut u = vec![0.0; m * r];
            let mut y = vec![0.0; m * n];
            let (mut da, mut db, mut du, mut dx) = (
                vec![0.0; r * k],
                vec![0.0; n * r],
                vec![0.0; m * r],
                vec![0.0; m * k],
            );
            let fwd = 2.0 * (m * r * (k + n)) as f64;
            let t = time(o.seconds, cpu_of, || {
                cpu.install(|| mm::lora_forward_with(simd, &x, &a, &b, d, &mut u, &mut y))
            });
            row(&format!("{name} lora_forward r8"), m, n, k, fwd, t);
            let t = time(o.seconds, cpu_of, || {
                cpu.install(|| {
                    mm::lora_backward_with(
                        simd,
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
                    )
                })
            });
            row(&format!("{name} lora_backward r8"), m, n, k, 2.0 * fwd, t);
        }
    }
}
