//! `fedcdd bench aggregate`: aggregation throughput against this machine's own memory-read
//! bandwidth, both measured in the same run on the same buffers.
//!
//! Aggregation is memory-bound: FedAvg must read every client once, streaming FedCDD twice
//! (pass 1 and pass 2), and each reads the global tensor and writes the result once. The
//! reference is a plain vectorised read of the same client buffers, single-threaded like
//! the aggregators. Tensors are processed tensor by tensor
//! (all clients of one tensor, then the next), so accumulators stay in cache and only the
//! client data streams from memory.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Instant;

use anyhow::{Result, bail};
use fedcdd_core::mask::Xoshiro256PlusPlus;
use fedcdd_core::{
    ClientInput, ClientView, FedCddConfig, Layout, MeanAccumulator, StreamingFedCdd, TensorRole,
    TensorView, fedcdd_batch,
};

/// What `fedcdd bench aggregate` measures.
#[derive(Debug, Clone)]
pub struct AggregateBenchOptions {
    pub clients: usize,
    /// Parameters per client (rounded up to whole 16×4096 / 4096×16 LoRA tensor pairs).
    pub params: usize,
    /// Timed repetitions of each measurement; the best is reported.
    pub repeats: usize,
    /// Skip the batch form (it needs memory for every client's decomposition).
    pub no_batch: bool,
    /// JSON instead of a table.
    pub json: bool,
}

/// Uniform in [-1, 1): fast enough to fill a GiB of test data.
fn next_f32(rng: &mut Xoshiro256PlusPlus) -> f32 {
    ((rng.next_u64() >> 40) as f32) * (2.0 / (1u64 << 24) as f32) - 1.0
}

const RANK: usize = 16;
const WIDTH: usize = 4096;

/// One timed measurement: a closure that runs the whole thing once.
type Job<'a> = dyn FnMut() -> Result<()> + 'a;

struct Row<'n> {
    name: &'n str,
    reads: usize,
    seconds: f64,
}

/// Runs the benchmark; returns the table (or JSON) to print.
pub fn run_aggregate_bench(a: &AggregateBenchOptions) -> Result<String> {
    if a.clients == 0 || a.params == 0 || a.repeats == 0 {
        bail!("--clients, --params and --repeats must be positive");
    }
    let tensor_len = RANK * WIDTH;
    let tensors = a.params.div_ceil(tensor_len).max(2).next_multiple_of(2);
    let p = tensors * tensor_len;
    let layouts: Vec<Layout> = (0..tensors)
        .map(|t| {
            if t % 2 == 0 {
                Layout::new(RANK, WIDTH, TensorRole::LoraA)
            } else {
                Layout::new(WIDTH, RANK, TensorRole::LoraB)
            }
        })
        .collect();
    let bytes_per_read = (a.clients * p * 4) as f64;
    crate::progress::line(&format!(
        "generating {} clients × {} params ({:.2} GiB) ...",
        a.clients,
        p,
        bytes_per_read / (1u64 << 30) as f64
    ));
    let mut rng = Xoshiro256PlusPlus::from_state([1, 2, 3, 4]);
    // Updates that partly agree, as trained clients' do: a shared component plus a
    // client-specific one of the same size.
    let shared: Vec<f32> = (0..p).map(|_| next_f32(&mut rng) * 1e-3).collect();
    let clients: Vec<Vec<f32>> = (0..a.clients)
        .map(|_| {
            shared
                .iter()
                .map(|s| s + next_f32(&mut rng) * 1e-3)
                .collect()
        })
        .collect();
    drop(shared);
    let global: Vec<f32> = (0..p).map(|_| next_f32(&mut rng) * 1e-2).collect();
    let samples: Vec<f32> = (0..a.clients).map(|i| 100.0 + i as f32).collect();
    let views = |r: std::ops::Range<usize>| -> Vec<ClientView<'_>> {
        clients
            .iter()
            .enumerate()
            .map(|(i, c)| ClientView {
                id: i as u32,
                weight: samples[i],
                values: TensorView::F32(&c[r.clone()]),
            })
            .collect()
    };

    // Reference: one plain read of every client buffer.
    let mut reference = || -> Result<()> {
        let mut total = 0.0f32;
        for c in &clients {
            total += plain_sum(c);
        }
        black_box(total);
        Ok(())
    };

    // FedAvg: the mean accumulator, then the server step straight from its sum.
    let mut acc_buf = vec![0.0f32; MeanAccumulator::buffer_len(tensor_len)];
    let mut avg_out = vec![0.0f32; p];
    let mut fedavg = || -> Result<()> {
        for t in 0..tensors {
            let r = t * tensor_len..(t + 1) * tensor_len;
            let mut acc = MeanAccumulator::new(tensor_len, &mut acc_buf)?;
            acc.add_group(&views(r.clone()))?;
            acc.apply_fedavg(TensorView::F32(&global[r.clone()]), 1.0, &mut avg_out[r])?;
        }
        black_box(&avg_out);
        Ok(())
    };

    // Streaming FedCDD, two passes per tensor, one client at a time.
    let cfg = FedCddConfig::default();
    let ws_len = layouts
        .iter()
        .map(|l| StreamingFedCdd::workspace_len(&cfg, l))
        .max()
        .unwrap_or(0);
    let mut ws = vec![0.0f32; ws_len];
    let mut cdd_out = vec![0.0f32; p];
    let mut streaming = || -> Result<()> {
        for (t, layout) in layouts.iter().enumerate() {
            let r = t * tensor_len..(t + 1) * tensor_len;
            let mut agg =
                StreamingFedCdd::new(cfg, *layout, TensorView::F32(&global[r.clone()]), &mut ws)?;
            for v in &views(r.clone()) {
                agg.pass1(v.id, v.weight, v.values)?;
            }
            for v in &views(r.clone()) {
                agg.pass2(v.id, v.weight, v.values)?;
            }
            agg.finish(&mut cdd_out[r])?;
        }
        black_box(&cdd_out);
        Ok(())
    };

    // Batch FedCDD (allocates every client's decomposition).
    let mut batch_out = vec![0.0f32; tensor_len];
    let mut batch = || -> Result<()> {
        for (t, layout) in layouts.iter().enumerate() {
            let r = t * tensor_len..(t + 1) * tensor_len;
            let inputs: Vec<ClientInput<'_>> = views(r.clone())
                .iter()
                .map(|v| ClientInput {
                    id: v.id,
                    samples: v.weight,
                    update: v.values,
                })
                .collect();
            fedcdd_batch(
                &cfg,
                *layout,
                TensorView::F32(&global[r]),
                &inputs,
                &mut batch_out,
            )?;
        }
        black_box(&batch_out);
        Ok(())
    };

    // Round-robin repetitions, so that a drift of the machine's bandwidth hits the reference
    // and the rules alike; each figure is the best of its runs.
    let mut jobs: Vec<(&str, usize, &mut Job<'_>)> = vec![
        ("reference", 1, &mut reference),
        ("fedavg", 1, &mut fedavg),
        ("fedcdd streaming", 2, &mut streaming),
    ];
    if !a.no_batch {
        jobs.push(("fedcdd batch", 2, &mut batch));
    }
    let mut best = vec![f64::INFINITY; jobs.len()];
    for _ in 0..a.repeats {
        for (b, (_, _, job)) in best.iter_mut().zip(jobs.iter_mut()) {
            let t = Instant::now();
            job()?;
            *b = b.min(t.elapsed().as_secs_f64());
        }
    }
    let read_s = best[0];
    let bandwidth = bytes_per_read / read_s;
    let rows: Vec<Row> = jobs
        .iter()
        .zip(&best)
        .skip(1)
        .map(|((name, reads, _), s)| Row {
            name,
            reads: *reads,
            seconds: *s,
        })
        .collect();

    // Bytes a rule must move: its reads of the client data, plus one read of the global
    // tensor and one write of the output (the bound counts them at the read bandwidth).
    let tensor_bytes = (p * 4) as f64;
    let figures = |r: &Row| {
        let client = r.reads as f64 * bytes_per_read;
        let all = client + 2.0 * tensor_bytes;
        (
            client / bandwidth / r.seconds,
            all / bandwidth / r.seconds,
            all / r.seconds / 1e9,
        )
    };
    if a.json {
        let json = serde_json::json!({
            "clients": a.clients,
            "params": p,
            "tensors": tensors,
            "client_bytes": bytes_per_read,
            "read_bandwidth_gbs": bandwidth / 1e9,
            "results": rows.iter().map(|r| {
                let (vs_clients, vs_all, gbs) = figures(r);
                serde_json::json!({
                    "rule": r.name,
                    "client_reads": r.reads,
                    "seconds": r.seconds,
                    "effective_gbs": gbs,
                    "ratio_client_reads_bound": vs_clients,
                    "ratio_all_traffic_bound": vs_all,
                })
            }).collect::<Vec<_>>(),
        });
        return Ok(format!("{}\n", serde_json::to_string_pretty(&json)?));
    }
    let mut text = String::new();
    writeln!(
        text,
        "{} clients × {} params ({} tensors of {}×{} / {}×{}), f32, best of {}",
        a.clients, p, tensors, RANK, WIDTH, WIDTH, RANK, a.repeats
    )?;
    writeln!(
        text,
        "reference: plain read of the client data, 1 thread: {:.2} GB/s ({:.3} s)",
        bandwidth / 1e9,
        read_s
    )?;
    writeln!(
        text,
        "{:<18} {:>6} {:>10} {:>10} {:>14} {:>14}",
        "rule", "reads", "seconds", "GB/s", "vs reads bound", "vs all traffic"
    )?;
    for r in &rows {
        let (vs_clients, vs_all, gbs) = figures(r);
        writeln!(
            text,
            "{:<18} {:>6} {:>10.4} {:>10.2} {:>13.0}% {:>13.0}%",
            r.name,
            r.reads,
            r.seconds,
            gbs,
            100.0 * vs_clients,
            100.0 * vs_all
        )?;
    }
    writeln!(
        text,
        "ratio = bandwidth-bound time / measured time, the bound counting the client reads only\n\
         (reads bound) or also the global read and the output write (all traffic);\n\
         targets: fedavg >= 70%, fedcdd streaming >= 50%"
    )?;
    Ok(text)
}

/// Sum with eight independent lanes so the loop vectorises and is limited by memory only.
fn plain_sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}
