//! Time per call of the CPU backend's non-matmul ops at the training shape (2048 token rows x
//! 256 hidden, attention batch 8 x seq 256 with 8 query / 4 KV heads of 32, cross-entropy over
//! a 2048 vocabulary), for 1 and 2 threads (or `--threads 1,4,...`).
//!
//! ```text
//! cargo run --release -p fedcdd-kernels --example ops_bench [-- --large] [--threads 1,2]
//!     [--seconds 0.3 | --runs N] [--filter attention] [--isa generic|avx2|avx512] [--reference]
//! ```
//! `--large` adds attention at seq 512 and 2048 with head_dim 64 (32 query / 4 KV heads).
//! Each row runs the op repeatedly for about `--seconds` and prints the best and the median
//! time; attention rows add the rate of the causal part's useful flops (4·d per visible
//! (query, key) pair forward, 10·d backward incl. the recomputed scores).
use std::time::Instant;

use fedcdd_kernels::cpu::ops::{Isa, isa, set_max_isa};
use fedcdd_kernels::{AdamW, AttnShape, Backend, Cpu, RopeScaling, RopeShape, RopeTable, Sgd};
use fedcdd_kernels::{WeightDType, WeightSource};

struct Opts {
    threads: Vec<usize>,
    large: bool,
    seconds: f64,
    filter: Option<String>,
    reference: bool,
    /// Exactly this many timed calls per row (instead of `seconds`' worth).
    runs: Option<usize>,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        threads: vec![1, 2],
        large: false,
        seconds: 0.3,
        filter: None,
        reference: false,
        runs: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--large" => o.large = true,
            "--reference" => o.reference = true,
            "--threads" => {
                o.threads = val()?
                    .split(',')
                    .map(|t| t.parse().map_err(|e| format!("--threads: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--seconds" => o.seconds = val()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--filter" => o.filter = Some(val()?),
            "--runs" => o.runs = Some(val()?.parse().map_err(|e| format!("--runs: {e}"))?),
            "--isa" => {
                let v = val()?;
                set_max_isa(
                    Isa::parse(&v).ok_or(format!("--isa: generic, avx2 or avx512, not {v}"))?,
                )
            }
            "--bench" => {} // passed by `cargo bench`
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(o)
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Runs `f` for about `seconds` (at least 3 times), or exactly `count` times; returns (best,
/// median) seconds per call.
fn time(seconds: f64, count: Option<usize>, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let start = Instant::now();
    let mut runs = Vec::new();
    let more = |n: usize, t: f64| match count {
        Some(c) => n < c.max(1),
        None => n < 3 || (t < seconds && n < 10_000),
    };
    while more(runs.len(), start.elapsed().as_secs_f64()) {
        let t = Instant::now();
        f();
        runs.push(t.elapsed().as_secs_f64());
    }
    runs.sort_by(f64::total_cmp);
    (runs[0], runs[runs.len() / 2])
}

struct Bench<'a> {
    b: &'a Cpu,
    o: &'a Opts,
}

impl Bench<'_> {
    fn row(&self, name: &str, flops: Option<f64>, f: impl FnMut()) {
        if let Some(filter) = &self.o.filter
            && !name.contains(filter.as_str())
        {
            return;
        }
        let (best, median) = time(self.o.seconds, self.o.runs, f);
        let rate = flops
            .map(|fl| format!("  {:7.1} GFLOP/s", fl / best / 1e9))
            .unwrap_or_default();
        println!(
            "  {name:<44} {:9.3} ms  (median {:9.3} ms){rate}",
            best * 1e3,
            median * 1e3
        );
    }
}

fn attention_rows(bench: &Bench, name: &str, s: AttnShape) {
    let b = bench.b;
    let nq = s.batch * s.q_len * s.q_heads * s.head_dim;
    let nk = s.batch * s.kv_stride * s.kv_heads * s.head_dim;
    let (q, k, v, dout) = (values(nq, 1), values(nk, 2), values(nk, 3), values(nq, 4));
    let mut out = vec![0.0; nq];
    let mut lse = vec![0.0; s.batch * s.q_heads * s.q_len];
    let pairs: f64 = (0..s.q_len)
        .map(|i| (s.q_pos0 + i + 1).min(s.kv_len) as f64)
        .sum::<f64>()
        * (s.batch * s.q_heads) as f64;
    let d = s.head_dim as f64;
    bench.row(
        &format!("attention_forward {name}"),
        Some(4.0 * d * pairs),
        || b.attention_forward(&q, &k, &v, &mut out, &mut lse, s),
    );
    b.attention_forward(&q, &k, &v, &mut out, &mut lse, s);
    let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
    bench.row(
        &format!("attention_backward {name}"),
        Some(10.0 * d * pairs),
        || b.attention_backward(&q, &k, &v, &out, &lse, &dout, &mut dq, &mut dk, &mut dv, s),
    );
}

fn run(b: &Cpu, o: &Opts) {
    let bench = Bench { b, o };
    let (rows, hidden, vocab) = (2048usize, 256usize, 2048usize);
    let n = rows * hidden;
    let x = values(n, 5);
    let mut y = values(n, 6);
    bench.row("axpy 2048x256", None, || b.axpy(&mut y, 0.5, &x));
    bench.row("scale 2048x256", None, || b.scale(&mut y, 0.999));
    bench.row("sum_squares 2048x256", None, || {
        std::hint::black_box(b.sum_squares(&x));
    });
    let mut out = vec![0.0; n];
    bench.row("dropout_forward 2048x256 p=0.1", None, || {
        b.dropout_forward(&x, &mut out, 0.1, 7)
    });
    bench.row("dropout_backward 2048x256 p=0.1", None, || {
        b.dropout_backward(&x, &mut y, 0.1, 7)
    });

    let w = b
        .weight(&WeightSource::from_f32(values(hidden, 8), 1, hidden))
        .expect("weight");
    let mut rstd = vec![0.0; rows];
    bench.row("rmsnorm_forward 2048x256", None, || {
        b.rmsnorm_forward(&x, &w, &mut out, &mut rstd, rows, hidden, 1e-5)
    });
    bench.row("rmsnorm_backward 2048x256", None, || {
        b.rmsnorm_backward(&x, &x, &w, &rstd, &mut y, rows, hidden, true)
    });

    let (batch, seq, heads, kv_heads, head_dim) = (8, 256, 8, 4, 32);
    let table = RopeTable::new(head_dim, 10_000.0, RopeScaling::None, seq);
    let rs = RopeShape {
        batch,
        seq,
        heads,
        head_dim,
        pos0: 0,
    };
    let mut qx = values(batch * seq * heads * head_dim, 9);
    bench.row("rope 8x256x8x32", None, || {
        b.rope(&mut qx, &table.cos, &table.sin, rs, false)
    });

    let train = AttnShape {
        batch,
        q_len: seq,
        kv_len: seq,
        kv_stride: seq,
        q_heads: heads,
        kv_heads,
        head_dim,
        q_pos0: 0,
        scale: 1.0 / (head_dim as f32).sqrt(),
    };
    attention_rows(&bench, "8x256 h8/4 d32", train);
    if o.large {
        for (batch, seq) in [(2, 512), (1, 2048)] {
            let s = AttnShape {
                batch,
                q_len: seq,
                kv_len: seq,
                kv_stride: seq,
                q_heads: 32,
                kv_heads: 4,
                head_dim: 64,
                q_pos0: 0,
                scale: 0.125,
            };
            attention_rows(&bench, &format!("{batch}x{seq} h32/4 d64"), s);
        }
        let generate = AttnShape {
            batch: 1,
            q_len: 1,
            kv_len: 2048,
            kv_stride: 2048,
            q_heads: 32,
            kv_heads: 4,
            head_dim: 64,
            q_pos0: 2047,
            scale: 0.125,
        };
        attention_rows(&bench, "generate 1 query, 2048 keys h32/4 d64", generate);
    }

    let (g, u) = (values(n, 10), values(n, 11));
    bench.row("swiglu_forward 2048x256", None, || {
        b.swiglu_forward(&g, &u, &mut out)
    });
    let mut dg = vec![0.0; n];
    bench.row("swiglu_backward 2048x256", None, || {
        b.swiglu_backward(&g, &u, &x, &mut dg, &mut y)
    });

    let ids: Vec<i32> = (0..rows).map(|i| ((i * 7919) % vocab) as i32).collect();
    for dtype in [WeightDType::F32, WeightDType::Bf16] {
        let f32_table = WeightSource::from_f32(values(vocab * hidden, 12), vocab, hidden);
        let src = match dtype {
            WeightDType::F32 => f32_table,
            _ => {
                let bytes: Vec<u8> = values(vocab * hidden, 12)
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect();
                WeightSource {
                    bytes: std::sync::Arc::new(bytes),
                    offset: 0,
                    dtype,
                    rows: vocab,
                    cols: hidden,
                }
            }
        };
        let table = b.weight(&src).expect("table");
        bench.row(
            &format!("embedding_forward 2048 of 2048x256 {dtype:?}"),
            None,
            || b.embedding_forward(&table, &ids, &mut out),
        );
    }
    let mut dtable = vec![0.0; vocab * hidden];
    bench.row("embedding_backward 2048 into 2048x256", None, || {
        b.embedding_backward(&ids, &x, &mut dtable)
    });

    let logits0: Vec<f32> = values(rows * vocab, 13).iter().map(|v| v * 8.0).collect();
    let targets: Vec<i32> = (0..rows)
        .map(|i| {
            if i % 10 == 0 {
                -100
            } else {
                ((i * 31) % vocab) as i32
            }
        })
        .collect();
    let mut row_loss = vec![0.0; rows];
    let mut logits = logits0.clone();
    bench.row("cross_entropy 2048x2048 loss only", None, || {
        std::hint::black_box(b.cross_entropy(
            &mut logits,
            &targets,
            &mut row_loss,
            vocab,
            -100,
            None,
        ));
    });
    bench.row("cross_entropy 2048x2048 with grad", None, || {
        logits.copy_from_slice(&logits0);
        std::hint::black_box(b.cross_entropy(
            &mut logits,
            &targets,
            &mut row_loss,
            vocab,
            -100,
            Some(1e-3),
        ));
    });
    bench.row("  (copy of the logits alone)", None, || {
        logits.copy_from_slice(&logits0)
    });

    let (mut p, mut m, mut v) = (values(n, 14), vec![0.0; n], vec![0.0; n]);
    let hp = AdamW {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut step = 0;
    bench.row("adamw_step 524288 params", None, || {
        step += 1;
        b.adamw_step(&mut p, &x, &mut m, &mut v, hp, step)
    });
    let sgd = Sgd {
        lr: 1e-2,
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 1e-4,
        nesterov: true,
    };
    bench.row("sgd_step 524288 params (nesterov)", None, || {
        b.sgd_step(&mut p, &x, &mut m, sgd, false)
    });
}

fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ops_bench: {e}");
            std::process::exit(2);
        }
    };
    println!("fast-path tier: {:?}", isa());
    if o.reference {
        let b = Cpu::reference();
        println!("{}", b.name());
        run(&b, &o);
    }
    for &t in &o.threads {
        let b = match Cpu::new(t) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("ops_bench: {e}");
                std::process::exit(1);
            }
        };
        println!("{}", b.name());
        run(&b, &o);
    }
}
