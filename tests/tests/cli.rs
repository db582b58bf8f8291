//! End-to-end tests of the `fedcdd` command-line tool: every test runs the real binary on
//! adapters written to a temp directory and checks its output against values computed here,
//! in plain f64 loops written from `fedcdd-spec.md` (never by calling the code under test;
//! `fedcdd_host::io::read_safetensors` is used only to read files back).

mod cli_util;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use cli_util::*;
use fedcdd_host::io::Tensor;

type Adapter = BTreeMap<String, Tensor>;

const EPS: f64 = 1e-8;

/// `p_i = n_i / Σ n`.
fn normalise(n: &[f64]) -> Vec<f64> {
    let total: f64 = n.iter().sum();
    n.iter().map(|v| v / total).collect()
}

/// `Σ p_i θ_i` of one tensor, in f64.
fn weighted_mean(clients: &[Adapter], p: &[f64], name: &str) -> Vec<f64> {
    let len = clients[0][name].data.len();
    let mut out = vec![0.0f64; len];
    for (c, &w) in clients.iter().zip(p) {
        for (o, &x) in out.iter_mut().zip(&c[name].data) {
            *o += w * x as f64;
        }
    }
    out
}

fn read_all(paths: &[PathBuf]) -> Vec<Adapter> {
    paths.iter().map(|p| read_adapter(p)).collect()
}

/// `θ − G` of one tensor, in f64.
fn delta(client: &Adapter, global: &Adapter, name: &str) -> Vec<f64> {
    client[name]
        .data
        .iter()
        .zip(&global[name].data)
        .map(|(&c, &g)| c as f64 - g as f64)
        .collect()
}

fn is_lora_a(name: &str) -> bool {
    name.contains(".lora_A.")
}

fn is_lora_b(name: &str) -> bool {
    name.contains(".lora_B.")
}

/// `[R, C]` of a 2-D tensor.
fn rows_cols(t: &Tensor) -> (usize, usize) {
    assert_eq!(t.dims.len(), 2, "{}: expected a 2-D tensor", t.name);
    (t.dims[0], t.dims[1])
}

fn column_norm(x: &[f64], rows: usize, cols: usize, j: usize) -> f64 {
    (0..rows)
        .map(|r| x[r * cols + j] * x[r * cols + j])
        .sum::<f64>()
        .sqrt()
}

/// FedCDD on one `[rows, cols]` tensor, written from the spec with its default switches
/// (column norms of the stored tensor, target = delta, weighting p_relu with the p_i
/// fallback, re-normalisation on, λ = 1, ε = 1e-8).
fn ref_fedcdd(rows: usize, cols: usize, g: &[f64], deltas: &[Vec<f64>], n: &[f64]) -> Vec<f64> {
    let p = normalise(n);
    let nc = deltas.len();
    // 1. decompose column-wise
    let mut mags = vec![vec![0.0f64; cols]; nc];
    let mut dirs = deltas.to_vec();
    for i in 0..nc {
        for j in 0..cols {
            let m = column_norm(&deltas[i], rows, cols, j);
            mags[i][j] = m;
            for r in 0..rows {
                dirs[i][r * cols + j] = deltas[i][r * cols + j] / m.max(EPS);
            }
        }
    }
    // 2. consensus magnitude
    let mbar: Vec<f64> = (0..cols)
        .map(|j| (0..nc).map(|i| p[i] * mags[i][j]).sum())
        .collect();
    // 3. agreement weights
    let units: Vec<Vec<f64>> = dirs
        .iter()
        .map(|d| {
            let norm = d.iter().map(|v| v * v).sum::<f64>().sqrt();
            d.iter()
                .map(|v| if norm > 0.0 { v / norm } else { 0.0 })
                .collect()
        })
        .collect();
    let w: Vec<f64> = if nc == 1 {
        vec![1.0]
    } else {
        let v: Vec<f64> = (0..nc)
            .map(|i| {
                (0..nc)
                    .filter(|&k| k != i)
                    .map(|k| {
                        units[i]
                            .iter()
                            .zip(&units[k])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                    })
                    .sum::<f64>()
                    / (nc - 1) as f64
            })
            .collect();
        let denom: f64 = (0..nc).map(|k| p[k] * v[k].max(0.0)).sum();
        if denom < EPS {
            p.clone()
        } else {
            (0..nc).map(|i| p[i] * v[i].max(0.0) / denom).collect()
        }
    };
    // 4. aggregate and re-normalise directions; 5. recombine
    let mut dbar = vec![0.0f64; rows * cols];
    for (d, wi) in dirs.iter().zip(&w) {
        for (o, x) in dbar.iter_mut().zip(d) {
            *o += wi * x;
        }
    }
    let mut out = g.to_vec();
    for j in 0..cols {
        let norm = column_norm(&dbar, rows, cols, j).max(EPS);
        for r in 0..rows {
            out[r * cols + j] += mbar[j] * dbar[r * cols + j] / norm;
        }
    }
    out
}

/// One FedAdam step (Reddi et al.; spec table) in f64 on one tensor; updates `m`, `v`.
#[allow(clippy::too_many_arguments)]
fn ref_fedadam_step(
    g: &[f64],
    mean_delta: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    lr: f64,
    b1: f64,
    b2: f64,
    tau: f64,
) -> Vec<f64> {
    let mut out = g.to_vec();
    for e in 0..g.len() {
        let d = mean_delta[e];
        m[e] = b1 * m[e] + (1.0 - b1) * d;
        v[e] = b2 * v[e] + (1.0 - b2) * d * d;
        out[e] += lr * m[e] / (v[e].sqrt() + tau);
    }
    out
}

/// Aggregates into a fresh `out` directory and returns it (panics on failure).
fn aggregate_ok(global: &Path, algorithm: &str, clients: &[String], out: &Path) -> RunOutput {
    let mut args = vec![
        "aggregate".to_string(),
        "--algorithm".into(),
        algorithm.into(),
        "--global".into(),
        s(global),
        "--out".into(),
        s(out),
    ];
    for c in clients {
        args.push("--client".into());
        args.push(c.clone());
    }
    fedcdd(&args).ok()
}

fn with_counts(paths: &[PathBuf], n: &[u64]) -> Vec<String> {
    paths
        .iter()
        .zip(n)
        .map(|(p, &k)| with_samples(p, k))
        .collect()
}

fn plain(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| s(p)).collect()
}

fn assert_same_names(out: &Adapter, global: &Adapter) {
    let a: Vec<&String> = out.keys().collect();
    let b: Vec<&String> = global.keys().collect();
    assert_eq!(a, b, "output tensors differ from the global's");
}

// ---------------------------------------------------------------------------------------------
// 1. FedAvg
// ---------------------------------------------------------------------------------------------

#[test]
fn aggregate_fedavg_weighted_and_plain_mean() {
    let fx = Fixture::new("fedavg", 3, 1);
    let counts = [10u64, 25, 65];
    let n: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
    let p = normalise(&n);
    let global = read_adapter(&fx.global);
    let clients = read_all(&fx.clients);

    let out = fx.path("weighted");
    aggregate_ok(
        &fx.global,
        "fedavg",
        &with_counts(&fx.clients, &counts),
        &out,
    );
    let got = read_adapter(&out);
    assert_same_names(&got, &global);
    for name in global.keys() {
        let want = weighted_mean(&clients, &p, name);
        assert_allclose(&format!("fedavg {name}"), &got[name].data, &want, 1e-6);
        // The test can tell the weighted from the plain mean.
        let uniform = weighted_mean(&clients, &[1.0 / 3.0; 3], name);
        let gap = want
            .iter()
            .zip(&uniform)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(gap > 1e-4 * rms(&want), "{name}: weights do not matter");
    }

    let out = fx.path("plain");
    aggregate_ok(&fx.global, "fedavg", &plain(&fx.clients), &out);
    let got = read_adapter(&out);
    for name in global.keys() {
        let want = weighted_mean(&clients, &[1.0 / 3.0; 3], name);
        assert_allclose(&format!("plain mean {name}"), &got[name].data, &want, 1e-6);
    }
}

#[test]
fn aggregate_mixed_sample_counts_names_the_clients_without_counts() {
    let fx = Fixture::new("mixed-counts", 3, 2);
    let out = fx.path("out");
    let r = fedcdd([
        "aggregate",
        "--algorithm",
        "fedavg",
        "--global",
        &s(&fx.global),
        "--client",
        &s(&fx.clients[0]),
        "--client",
        &with_samples(&fx.clients[1], 40),
        "--client",
        &s(&fx.clients[2]),
        "--out",
        &s(&out),
    ]);
    assert!(!r.status.success(), "mixed counts accepted: {r}");
    assert!(!r.stderr.contains("panicked"), "{r}");
    let err = r.error_lines().join("\n");
    assert!(err.contains(&s(&fx.clients[0])), "client 0 not named: {r}");
    assert!(err.contains(&s(&fx.clients[2])), "client 2 not named: {r}");
    assert!(
        !err.contains(&s(&fx.clients[1])),
        "client 1 has a count but is named: {r}"
    );
    assert!(!out.exists(), "an output was written on error");
}

// ---------------------------------------------------------------------------------------------
// 2. FedCDD
// ---------------------------------------------------------------------------------------------

#[test]
fn aggregate_fedcdd_identical_clients_gives_global_plus_delta() {
    // Every client equal to client 0's adapter.
    let mut first: Option<Vec<T>> = None;
    let fx = Fixture::with("fedcdd-same", 3, 3, Shape::default(), |i, t| {
        if i == 0 {
            first = Some(t.clone());
        } else {
            *t = first.clone().unwrap();
        }
    });
    // Make one global tensor f16, so "same dtypes as the global" can fail.
    let mut gt = fx.global_t.clone();
    let f16_name = gt[1].name.clone();
    gt[1].dt = Dt::F16;
    write_adapter(&fx.global, &gt, Some(&fx.config));

    let counts = [5u64, 50, 500];
    let out = fx.path("out");
    let report = fx.path("report.json");
    let mut args: Vec<String> = [
        "aggregate",
        "--algorithm",
        "fedcdd",
        "--global",
        &s(&fx.global),
        "--out",
        &s(&out),
        "--report",
        &s(&report),
    ]
    .map(String::from)
    .to_vec();
    for c in with_counts(&fx.clients, &counts) {
        args.extend(["--client".to_string(), c]);
    }
    fedcdd(&args).ok();

    let global = read_adapter(&fx.global);
    let client = read_adapter(&fx.clients[0]);
    let got = read_adapter(&out);
    assert_same_names(&got, &global);
    for (name, g) in &global {
        let o = &got[name];
        assert_eq!(o.dims, g.dims, "{name}: shape");
        assert_eq!(o.dtype, g.dtype, "{name}: dtype");
        // G + Δ = θ, stored in the global's dtype.
        let rtol = if *name == f16_name { 1e-3 } else { 1e-5 };
        let want = f64s(&client[name].data);
        assert_allclose(&format!("fedcdd(identical) {name}"), &o.data, &want, rtol);
    }
    assert_eq!(got[&f16_name].dtype, fedcdd_core::DType::F16);

    let cfg_out: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    let cfg_in: serde_json::Value =
        serde_json::from_slice(&fs::read(fx.global.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg_out, cfg_in, "adapter_config.json changed");

    let rep: serde_json::Value = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
    assert_eq!(rep["algorithm"], "fedcdd", "{rep}");
    let list = rep["clients"].as_array().expect("report.clients");
    assert_eq!(list.len(), 3, "{rep}");
    let total: f64 = list.iter().map(|c| c["weight"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-9, "weights sum to {total}: {rep}");
    let p = normalise(&counts.map(|c| c as f64));
    for (i, c) in list.iter().enumerate() {
        assert_eq!(
            c["source"].as_str(),
            Some(s(&fx.clients[i]).as_str()),
            "{rep}"
        );
        assert_eq!(c["samples"].as_u64(), Some(counts[i]), "{rep}");
        assert!((c["weight"].as_f64().unwrap() - p[i]).abs() < 1e-9, "{rep}");
        // Identical directions agree perfectly.
        let v = c["mean_agreement"].as_f64().expect("mean_agreement");
        assert!((v - 1.0).abs() < 1e-4, "client {i}: agreement {v}: {rep}");
    }

    // N = 1 → G + Δ_1.
    let out1 = fx.path("one");
    aggregate_ok(&fx.global, "fedcdd", &plain(&fx.clients[..1]), &out1);
    let got = read_adapter(&out1);
    for name in global.keys() {
        let rtol = if *name == f16_name { 1e-3 } else { 1e-5 };
        let want = f64s(&client[name].data);
        assert_allclose(&format!("fedcdd(N=1) {name}"), &got[name].data, &want, rtol);
    }
}

#[test]
fn aggregate_fedcdd_matches_f64_reference() {
    let fx = Fixture::new("fedcdd-ref", 3, 4);
    let counts = [30u64, 10, 60];
    let n: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
    let out = fx.path("out");
    aggregate_ok(
        &fx.global,
        "fedcdd",
        &with_counts(&fx.clients, &counts),
        &out,
    );
    let global = read_adapter(&fx.global);
    let clients = read_all(&fx.clients);
    let got = read_adapter(&out);
    for (name, g) in &global {
        let (rows, cols) = rows_cols(g);
        let deltas: Vec<Vec<f64>> = clients.iter().map(|c| delta(c, &global, name)).collect();
        let want = ref_fedcdd(rows, cols, &f64s(&g.data), &deltas, &n);
        assert_step_close(
            &format!("fedcdd {name}"),
            &got[name].data,
            &want,
            &g.data,
            1e-4,
        );
        // FedCDD differs from FedAvg here (the test would notice FedAvg).
        let avg = weighted_mean(&clients, &normalise(&n), name);
        let gap = want
            .iter()
            .zip(&avg)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            gap > 1e-3 * rms(&delta(&clients[0], &global, name)),
            "{name}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. FFA-LoRA and FedSA-LoRA
// ---------------------------------------------------------------------------------------------

fn check_partial(algorithm: &str, aggregated: fn(&str) -> bool) {
    let fx = Fixture::new(algorithm, 3, 5);
    let counts = [1u64, 2, 3];
    let out = fx.path("out");
    aggregate_ok(
        &fx.global,
        algorithm,
        &with_counts(&fx.clients, &counts),
        &out,
    );
    let global = read_adapter(&fx.global);
    let clients = read_all(&fx.clients);
    let got = read_adapter(&out);
    assert_same_names(&got, &global);
    let p = normalise(&counts.map(|c| c as f64));
    let (mut kept, mut changed) = (0, 0);
    for (name, g) in &global {
        if aggregated(name) {
            assert_ne!(got[name].data, g.data, "{algorithm}: {name} unchanged");
            let want = weighted_mean(&clients, &p, name);
            assert_allclose(&format!("{algorithm} {name}"), &got[name].data, &want, 1e-6);
            changed += 1;
        } else {
            assert_eq!(
                got[name].data, g.data,
                "{algorithm}: {name} must keep the global"
            );
            kept += 1;
        }
    }
    assert!(kept > 0 && changed > 0);
}

#[test]
fn ffa_lora_keeps_lora_a_and_averages_lora_b() {
    check_partial("ffa-lora", is_lora_b);
}

#[test]
fn fedsa_lora_keeps_lora_b_and_averages_lora_a() {
    check_partial("fedsa-lora", is_lora_a);
}

// ---------------------------------------------------------------------------------------------
// 4. Stateful rules
// ---------------------------------------------------------------------------------------------

#[test]
fn fedadam_state_carries_over_two_rounds() {
    let fx = Fixture::new("fedadam", 3, 6);
    let counts = [20u64, 30, 50];
    let p = normalise(&counts.map(|c| c as f64));
    let state = fx.path("server.state");
    let (r1, r2) = (fx.path("round1"), fx.path("round2"));
    let run = |global: &Path, out: &Path| {
        let mut args: Vec<String> = [
            "aggregate",
            "--algorithm",
            "fedadam",
            "--global",
            &s(global),
            "--out",
            &s(out),
            "--state",
            &s(&state),
        ]
        .map(String::from)
        .to_vec();
        for c in with_counts(&fx.clients, &counts) {
            args.extend(["--client".to_string(), c]);
        }
        fedcdd(&args).ok()
    };
    assert!(!state.exists());
    run(&fx.global, &r1);
    assert!(state.is_file(), "round 1 wrote no state file");
    let state1 = fs::read(&state).unwrap();
    run(&r1, &r2);
    assert_ne!(
        fs::read(&state).unwrap(),
        state1,
        "round 2 did not update the state"
    );

    let (lr, b1, b2, tau) = (1e-3, 0.9, 0.99, 1e-3);
    let g0 = read_adapter(&fx.global);
    let g1 = read_adapter(&r1);
    let g2 = read_adapter(&r2);
    let clients = read_all(&fx.clients);
    for (name, g) in &g0 {
        let len = g.data.len();
        let mut m = vec![0.0; len];
        let mut v = vec![tau * tau; len];
        let mean1 = sub(&weighted_mean(&clients, &p, name), &f64s(&g.data));
        let want1 = ref_fedadam_step(&f64s(&g.data), &mean1, &mut m, &mut v, lr, b1, b2, tau);
        assert_step_close(
            &format!("fedadam round 1 {name}"),
            &g1[name].data,
            &want1,
            &g.data,
            1e-4,
        );

        // Round 2 starts from the round-1 output as written.
        let g1t = &g1[name].data;
        let mean2 = sub(&weighted_mean(&clients, &p, name), &f64s(g1t));
        let want2 = ref_fedadam_step(&f64s(g1t), &mean2, &mut m, &mut v, lr, b1, b2, tau);
        assert_step_close(
            &format!("fedadam round 2 {name}"),
            &g2[name].data,
            &want2,
            g1t,
            1e-4,
        );

        // A round 2 from a fresh state would differ by far more than the tolerance.
        let (mut m0, mut v0) = (vec![0.0; len], vec![tau * tau; len]);
        let fresh = ref_fedadam_step(&f64s(g1t), &mean2, &mut m0, &mut v0, lr, b1, b2, tau);
        let gap = fresh
            .iter()
            .zip(&want2)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let step = rms(&sub(&want2, &f64s(g1t)));
        assert!(
            gap > 1e-2 * step,
            "{name}: state makes no difference ({gap} vs {step})"
        );
    }
}

fn sub(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

#[test]
fn state_file_of_another_rule_is_rejected() {
    let fx = Fixture::new("state-mismatch", 2, 7);
    let state = fx.path("adam.state");
    let out = fx.path("out");
    let mut args: Vec<String> = [
        "aggregate",
        "--algorithm",
        "fedadam",
        "--global",
        &s(&fx.global),
        "--out",
        &s(&out),
        "--state",
        &s(&state),
    ]
    .map(String::from)
    .to_vec();
    for c in plain(&fx.clients) {
        args.extend(["--client".to_string(), c]);
    }
    fedcdd(&args).ok();
    let before_out = snapshot_dir(&out);
    let before_state = fs::read(&state).unwrap();
    args[2] = "fedyogi".into();
    let r = fedcdd(&args);
    expect_rejected(&r, &[&s(&state)]);
    assert_eq!(snapshot_dir(&out), before_out, "output changed on error");
    assert_eq!(
        fs::read(&state).unwrap(),
        before_state,
        "state changed on error"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. encode / decode / inspect
// ---------------------------------------------------------------------------------------------

fn encode(fx: &Fixture, local: &Path, out: &Path, extra: &[&str]) -> RunOutput {
    let mut args = vec![
        "encode".to_string(),
        "--global".into(),
        s(&fx.global),
        "--local".into(),
        s(local),
        "--out".into(),
        s(out),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    fedcdd(&args)
}

fn decode(fx: &Fixture, upload: &Path, out: &Path) -> RunOutput {
    fedcdd([
        "decode",
        &s(upload),
        "--global",
        &s(&fx.global),
        "--out",
        &s(out),
    ])
}

#[test]
fn encode_decode_keep_all_is_the_identity() {
    let fx = Fixture::new("roundtrip", 1, 8);
    let up = fx.path("c0.fcdu");
    encode(
        &fx,
        &fx.clients[0],
        &up,
        &["--keep-ratio", "1", "--samples", "12"],
    )
    .ok();
    let dec = fx.path("decoded");
    decode(&fx, &up, &dec).ok();
    let local = read_adapter(&fx.clients[0]);
    let global = read_adapter(&fx.global);
    let got = read_adapter(&dec);
    assert_same_names(&got, &global);
    for (name, l) in &local {
        let g = &global[name];
        assert_eq!(got[name].dims, l.dims);
        assert_eq!(got[name].dtype, l.dtype);
        for (i, ((&a, &want), &gv)) in got[name].data.iter().zip(&l.data).zip(&g.data).enumerate() {
            // (l − g) + g in f32: within an ulp or two of the larger operand.
            let tol = 2.0 * f32::EPSILON as f64 * (want.abs().max(gv.abs()) as f64);
            assert!(
                (a as f64 - want as f64).abs() <= tol,
                "{name}[{i}]: decoded {a}, local {want}"
            );
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&fs::read(dec.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg, fx.config);
}

/// Per tensor: indices of the columns where `a` and `b` differ at all.
fn changed_columns(a: &Tensor, b: &Tensor) -> Vec<usize> {
    let (rows, cols) = rows_cols(a);
    (0..cols)
        .filter(|&j| (0..rows).any(|r| a.data[r * cols + j] != b.data[r * cols + j]))
        .collect()
}

#[test]
fn encode_top_k_keeps_the_largest_columns_exactly() {
    let fx = Fixture::new("topk", 1, 9);
    let up = fx.path("c0.fcdu");
    encode(
        &fx,
        &fx.clients[0],
        &up,
        &["--keep-ratio", "0.25", "--noise-scale", "0"],
    )
    .ok();
    let dec = fx.path("decoded");
    decode(&fx, &up, &dec).ok();
    let local = read_adapter(&fx.clients[0]);
    let global = read_adapter(&fx.global);
    let got = read_adapter(&dec);
    let info = inspect_json(&up, true);
    for (name, g) in &global {
        let (rows, cols) = rows_cols(g);
        let k = (0.25 * cols as f64).ceil() as usize;
        let kept = changed_columns(&got[name], g);
        assert_eq!(kept.len(), k, "{name}: {kept:?} kept of {cols}, want {k}");
        let d = delta(&local, &global, name);
        let norms: Vec<f64> = (0..cols).map(|j| column_norm(&d, rows, cols, j)).collect();
        let min_kept = kept.iter().map(|&j| norms[j]).fold(f64::INFINITY, f64::min);
        let max_dropped = (0..cols)
            .filter(|j| !kept.contains(j))
            .map(|j| norms[j])
            .fold(0.0, f64::max);
        assert!(
            min_kept >= max_dropped * (1.0 - 1e-6),
            "{name}: kept {kept:?} are not the largest columns (norms {norms:?})"
        );
        // Kept columns are exact (up to (l − g) + g), the others are exactly the global's.
        for j in 0..cols {
            for r in 0..rows {
                let e = r * cols + j;
                let (a, gv, lv) = (got[name].data[e], g.data[e], local[name].data[e]);
                if kept.contains(&j) {
                    let tol = 2.0 * f32::EPSILON * lv.abs().max(gv.abs());
                    assert!((a - lv).abs() <= tol, "{name}[{r},{j}]: {a} vs local {lv}");
                } else {
                    assert_eq!(a, gv, "{name}[{r},{j}]: masked column changed");
                }
            }
        }
        // inspect agrees.
        let rec = info["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name.as_str())
            .unwrap_or_else(|| panic!("inspect lacks {name}: {info}"));
        assert_eq!(rec["kept"].as_u64(), Some(k as u64), "{rec}");
        assert_eq!(rec["columns"].as_u64(), Some(cols as u64), "{rec}");
        let idx: Vec<usize> = rec["kept_indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(idx, kept, "{name}: inspect --full kept indices");
    }
}

fn inspect_json(up: &Path, full: bool) -> serde_json::Value {
    let mut args = vec!["inspect".to_string(), s(up), "--json".into()];
    if full {
        args.push("--full".into());
    }
    let r = fedcdd(&args).ok();
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("inspect --json: {e}: {r}"))
}

#[test]
fn encode_noise_is_seeded_and_scaled() {
    let fx = Fixture::new("noise", 1, 10);
    let enc = |name: &str, extra: &[&str]| {
        let out = fx.path(name);
        let mut args = vec!["--keep-ratio", "0.25", "--noise-scale", "0.5"];
        args.extend_from_slice(extra);
        encode(&fx, &fx.clients[0], &out, &args).ok();
        fs::read(&out).unwrap()
    };
    let a = enc("a.fcdu", &["--seed", "42"]);
    let b = enc("b.fcdu", &["--seed", "42"]);
    let c = enc("c.fcdu", &["--seed", "43"]);
    assert_eq!(a, b, "same seed, different uploads");
    assert_ne!(a, c, "different seeds, same upload");
    assert_eq!(a.len(), c.len(), "the seed should not change the size");
    // Default seed: from (round, client id), reproducible.
    let d1 = enc("d1.fcdu", &["--round", "2", "--client-id", "5"]);
    let d2 = enc("d2.fcdu", &["--round", "2", "--client-id", "5"]);
    let d3 = enc("d3.fcdu", &["--round", "2", "--client-id", "6"]);
    assert_eq!(d1, d2, "default seed not reproducible");
    assert_ne!(d1, d3, "default seed ignores the client id");

    // The regenerated noise: N(0, σ²) with σ = 0.5·rms(Δ over the masked columns).
    let dec = fx.path("decoded");
    decode(&fx, &fx.path("a.fcdu"), &dec).ok();
    let local = read_adapter(&fx.clients[0]);
    let global = read_adapter(&fx.global);
    let got = read_adapter(&dec);
    let (mut z2, mut count) = (0.0f64, 0usize);
    for (name, g) in &global {
        let (rows, cols) = rows_cols(g);
        let k = (0.25 * cols as f64).ceil() as usize;
        let d = delta(&local, &global, name);
        let mut order: Vec<usize> = (0..cols).collect();
        let norms: Vec<f64> = (0..cols).map(|j| column_norm(&d, rows, cols, j)).collect();
        order.sort_by(|&x, &y| norms[y].total_cmp(&norms[x]).then(x.cmp(&y)));
        let kept = &order[..k];
        let masked: Vec<usize> = order[k..].to_vec();
        let sigma = 0.5
            * (masked.iter().map(|&j| norms[j] * norms[j]).sum::<f64>()
                / (rows * masked.len()) as f64)
                .sqrt();
        for j in 0..cols {
            for r in 0..rows {
                let e = r * cols + j;
                let got_d = got[name].data[e] as f64 - g.data[e] as f64;
                if kept.contains(&j) {
                    assert!(
                        (got_d - d[e]).abs() <= 1e-6 * d[e].abs().max(1e-3),
                        "{name}[{r},{j}]"
                    );
                } else {
                    z2 += (got_d / sigma).powi(2);
                    count += 1;
                }
            }
        }
    }
    let mean_z2 = z2 / count as f64;
    assert!(
        (0.75..1.25).contains(&mean_z2),
        "noise variance {mean_z2}·σ² over {count} values, want about σ²"
    );
}

#[test]
fn inspect_prints_header_and_kept_counts() {
    let fx = Fixture::new("inspect", 1, 11);
    let up = fx.path("c0.fcdu");
    encode(
        &fx,
        &fx.clients[0],
        &up,
        &[
            "--keep-ratio",
            "0.25",
            "--noise-scale",
            "0.5",
            "--round",
            "3",
            "--client-id",
            "2",
            "--samples",
            "77",
        ],
    )
    .ok();
    let size = fs::metadata(&up).unwrap().len();
    let r = fedcdd(["inspect", &s(&up)]).ok();
    let text = &r.stdout;
    let header = text
        .lines()
        .find(|l| l.contains("round"))
        .unwrap_or_else(|| panic!("no header line: {r}"));
    for want in ["round 3", "client 2", "samples 77"] {
        assert!(
            header.contains(want),
            "header {header:?} lacks {want:?}: {r}"
        );
    }
    assert!(
        text.contains(&size.to_string()),
        "byte size {size} not printed: {r}"
    );
    let global = read_adapter(&fx.global);
    for (name, g) in &global {
        let cols = g.dims[1];
        let k = (0.25 * cols as f64).ceil() as usize;
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("no line for {name}: {r}"));
        assert!(
            line.split_whitespace().any(|w| w == format!("{k}/{cols}")),
            "{name}: kept count {k}/{cols} missing in {line:?}"
        );
    }

    let j = inspect_json(&up, false);
    assert_eq!(j["bytes"].as_u64(), Some(size), "{j}");
    assert_eq!(j["round"].as_u64(), Some(3), "{j}");
    assert_eq!(j["client_id"].as_u64(), Some(2), "{j}");
    assert_eq!(j["num_samples"].as_u64(), Some(77), "{j}");
    let tensors = j["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), global.len(), "{j}");
    let sum: u64 = tensors.iter().map(|t| t["bytes"].as_u64().unwrap()).sum();
    assert!(sum < size, "record bytes {sum} exceed the file size {size}");
}

#[test]
fn aggregating_uploads_equals_aggregating_decoded_adapters() {
    let fx = Fixture::new("uploads", 3, 12);
    let counts = [15u64, 35, 50];
    let mut uploads = Vec::new();
    let mut decoded = Vec::new();
    for (i, c) in fx.clients.iter().enumerate() {
        let up = fx.path(&format!("c{i}.fcdu"));
        let (n, id) = (counts[i].to_string(), i.to_string());
        encode(
            &fx,
            c,
            &up,
            &[
                "--keep-ratio",
                "0.5",
                "--noise-scale",
                "0.5",
                "--samples",
                &n,
                "--client-id",
                &id,
                "--round",
                "1",
            ],
        )
        .ok();
        let dec = fx.path(&format!("d{i}"));
        decode(&fx, &up, &dec).ok();
        uploads.push(s(&up));
        decoded.push(dec);
    }
    let global = read_adapter(&fx.global);
    for algorithm in ["fedavg", "fedcdd"] {
        let a = fx.path(&format!("{algorithm}-uploads"));
        let report = fx.path(&format!("{algorithm}-report.json"));
        let mut args = vec![
            "aggregate".to_string(),
            "--algorithm".into(),
            algorithm.into(),
            "--global".into(),
            s(&fx.global),
            "--out".into(),
            s(&a),
            "--report".into(),
            s(&report),
        ];
        for u in &uploads {
            args.extend(["--client".to_string(), u.clone()]);
        }
        fedcdd(&args).ok();
        let b = fx.path(&format!("{algorithm}-decoded"));
        aggregate_ok(&fx.global, algorithm, &with_counts(&decoded, &counts), &b);
        let (ga, gb) = (read_adapter(&a), read_adapter(&b));
        assert_same_names(&ga, &global);
        for (name, g) in &global {
            assert_step_close(
                &format!("{algorithm} uploads vs decoded {name}"),
                &ga[name].data,
                &f64s(&gb[name].data),
                &g.data,
                1e-5,
            );
        }
        // The sample counts came from the upload headers.
        let rep: serde_json::Value = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
        let samples: Vec<u64> = rep["clients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["samples"].as_u64().unwrap_or(0))
            .collect();
        assert_eq!(samples, counts, "{rep}");
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Bad inputs
// ---------------------------------------------------------------------------------------------

/// Asserts a clean rejection: non-zero exit (not a panic, not a signal), an `error:` line
/// mentioning every string of `mentions`, and no "panicked" anywhere.
fn expect_rejected(r: &RunOutput, mentions: &[&str]) {
    let code = r.status.code();
    assert!(
        code.is_some() && code != Some(0) && code != Some(101),
        "expected a clean error exit: {r}"
    );
    assert!(
        !r.stderr.contains("panicked") && !r.stdout.contains("panicked"),
        "it panicked: {r}"
    );
    let errors = r.error_lines().join("\n");
    assert!(!errors.is_empty(), "no `error:` line: {r}");
    for m in mentions {
        assert!(errors.contains(m), "the error does not mention {m:?}: {r}");
    }
}

/// A fixture with a valid aggregate already in `out`, for the failure tests.
struct Prepared {
    fx: Fixture,
    out: PathBuf,
    before: BTreeMap<PathBuf, Vec<u8>>,
}

impl Prepared {
    fn new(tag: &str) -> Prepared {
        Prepared::with(tag, |_, _| {})
    }

    fn with(tag: &str, edit: impl FnMut(usize, &mut Vec<T>)) -> Prepared {
        let fx = Fixture::with(tag, 3, 13, Shape::default(), edit);
        // The previous output, from good clients (a separate good round).
        let good = Fixture::new(&format!("{tag}-good"), 2, 14);
        let out = fx.path("out");
        aggregate_ok(&good.global, "fedcdd", &plain(&good.clients), &out);
        let before = snapshot_dir(&out);
        assert!(before.len() == 2, "{before:?}");
        Prepared { fx, out, before }
    }

    /// `aggregate --algorithm ALG --global G --client C... --out out`.
    fn aggregate(&self, algorithm: &str, clients: &[String]) -> RunOutput {
        let mut args = vec![
            "aggregate".to_string(),
            "--algorithm".into(),
            algorithm.into(),
            "--global".into(),
            s(&self.fx.global),
            "--out".into(),
            s(&self.out),
        ];
        for c in clients {
            args.extend(["--client".to_string(), c.clone()]);
        }
        fedcdd(&args)
    }

    /// The three clients with client 1 replaced by `bad`.
    fn clients_with(&self, bad: &Path) -> Vec<String> {
        vec![s(&self.fx.clients[0]), s(bad), s(&self.fx.clients[2])]
    }

    fn assert_out_untouched(&self) {
        assert_eq!(
            snapshot_dir(&self.out),
            self.before,
            "the existing --out directory changed on error"
        );
    }

    /// Runs `algorithm` with client 1 replaced by `bad` and checks a clean rejection that
    /// names `mentions`, with the output untouched.
    fn reject(&self, algorithm: &str, bad: &Path, mentions: &[&str]) {
        let r = self.aggregate(algorithm, &self.clients_with(bad));
        expect_rejected(&r, mentions);
        self.assert_out_untouched();
    }
}

const Q0_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
const V1_A: &str = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight";

#[test]
fn bad_input_wrong_shape() {
    let pr = Prepared::with("bad-shape", |i, t| {
        if i == 1 {
            let b = t.iter_mut().find(|x| x.name == Q0_B).unwrap();
            b.dims = vec![b.dims[0], b.dims[1] + 1];
            b.data = vec![0.01; b.dims[0] * b.dims[1]];
        }
    });
    let bad = pr.fx.clients[1].clone();
    for alg in ["fedcdd", "fedavg"] {
        pr.reject(alg, &bad, &[&s(&bad), Q0_B]);
    }
}

#[test]
fn bad_input_transposed_tensor() {
    // Same element count, transposed shape: must still be caught.
    let pr = Prepared::with("bad-transposed", |i, t| {
        if i == 1 {
            let b = t.iter_mut().find(|x| x.name == Q0_B).unwrap();
            b.dims.reverse();
        }
    });
    let bad = pr.fx.clients[1].clone();
    pr.reject("fedcdd", &bad, &[&s(&bad), Q0_B]);
}

#[test]
fn bad_input_non_finite_global_is_blamed_on_the_global() {
    // A NaN in the global adapter: the error must name the global (not an innocent client),
    // and no command may write an adapter holding it.
    let pr = Prepared::new("bad-global-nan");
    let mut gt = pr.fx.global_t.clone();
    for t in &mut gt {
        if t.name == V1_A {
            t.data[3] = f32::NAN;
        }
    }
    write_adapter(&pr.fx.global, &gt, Some(&pr.fx.config));
    let g = s(&pr.fx.global);
    let mut failures = Vec::new();
    for alg in ["fedcdd", "fedavg", "ffa-lora"] {
        let r = pr.aggregate(alg, &plain(&pr.fx.clients));
        let errors = r.error_lines().join("\n");
        if r.status.success() || !errors.contains(&g) || r.stderr.contains("panicked") {
            failures.push(format!("aggregate --algorithm {alg}: {r}"));
        }
        if snapshot_dir(&pr.out) != pr.before {
            failures.push(format!("aggregate --algorithm {alg} overwrote --out"));
        }
    }
    let up = pr.fx.path("c0.fcdu");
    let r = encode(&pr.fx, &pr.fx.clients[0], &up, &["--keep-ratio", "1"]);
    if r.status.success() || !r.error_lines().join("\n").contains(&g) {
        failures.push(format!("encode: {r}"));
    }
    // decode against the NaN global: a good upload made against a good global.
    let good = Fixture::new("bad-global-nan-good", 1, 13);
    let up = good.path("c0.fcdu");
    encode(&good, &good.clients[0], &up, &["--keep-ratio", "1"]).ok();
    let dec = pr.fx.path("decoded");
    let r = decode(&pr.fx, &up, &dec);
    if r.status.success() || !r.error_lines().join("\n").contains(&g) {
        failures.push(format!("decode: {r}"));
    }
    assert!(
        failures.is_empty(),
        "a NaN in the global adapter is not reported as the global's:\n{}",
        failures.join("\n---\n")
    );
}

#[test]
fn bad_input_nan_and_inf() {
    for (tag, value) in [("nan", f32::NAN), ("inf", f32::INFINITY)] {
        let pr = Prepared::with(&format!("bad-{tag}"), |i, t| {
            if i == 1 {
                t.iter_mut().find(|x| x.name == V1_A).unwrap().data[5] = value;
            }
        });
        let bad = pr.fx.clients[1].clone();
        for alg in ["fedcdd", "fedavg", "fedavgm"] {
            pr.reject(alg, &bad, &[&s(&bad), V1_A]);
        }
        // A stateful rule leaves its state file alone too.
        let state = pr.fx.path("adam.state");
        let good: Vec<String> = vec![s(&pr.fx.clients[0]), s(&pr.fx.clients[2])];
        let out2 = pr.fx.path("adam-out");
        let mut args = vec![
            "aggregate".to_string(),
            "--algorithm".into(),
            "fedadam".into(),
            "--global".into(),
            s(&pr.fx.global),
            "--out".into(),
            s(&out2),
            "--state".into(),
            s(&state),
        ];
        let base = args.clone();
        for c in &good {
            args.extend(["--client".to_string(), c.clone()]);
        }
        fedcdd(&args).ok();
        let (state_before, out_before) = (fs::read(&state).unwrap(), snapshot_dir(&out2));
        let mut args = base;
        for c in pr.clients_with(&bad) {
            args.extend(["--client".to_string(), c]);
        }
        let r = fedcdd(&args);
        expect_rejected(&r, &[&s(&bad), V1_A]);
        assert_eq!(
            fs::read(&state).unwrap(),
            state_before,
            "{tag}: state changed"
        );
        assert_eq!(snapshot_dir(&out2), out_before, "{tag}: output changed");
    }
}

#[test]
fn bad_input_truncated_safetensors() {
    let pr = Prepared::new("bad-trunc-st");
    let file = pr.fx.clients[1].join("adapter_model.safetensors");
    let bytes = fs::read(&file).unwrap();
    fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    pr.reject("fedcdd", &pr.fx.clients[1], &[&s(&file)]);
    // As a bare .safetensors file, too.
    let bare = pr.fx.path("bare.safetensors");
    fs::write(&bare, &bytes[..bytes.len() - 3]).unwrap();
    pr.reject("fedcdd", &bare, &[&s(&bare)]);
}

/// Writes a valid upload of client 1 and returns its path and bytes.
fn upload_of_client1(pr: &Prepared) -> (PathBuf, Vec<u8>) {
    let up = pr.fx.path("c1.fcdu");
    encode(
        &pr.fx,
        &pr.fx.clients[1],
        &up,
        &["--keep-ratio", "0.5", "--noise-scale", "0.5"],
    )
    .ok();
    let bytes = fs::read(&up).unwrap();
    (up, bytes)
}

#[test]
fn bad_input_truncated_upload() {
    let pr = Prepared::new("bad-trunc-up");
    let (_, bytes) = upload_of_client1(&pr);
    let bad = pr.fx.path("half.fcdu");
    fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    pr.reject("fedcdd", &bad, &[&s(&bad)]);
    let r = fedcdd(["inspect", &s(&bad)]);
    expect_rejected(&r, &[&s(&bad)]);
    let dec = pr.fx.path("decoded");
    let r = decode(&pr.fx, &bad, &dec);
    expect_rejected(&r, &[&s(&bad)]);
    assert!(!dec.exists(), "decode wrote an output on error");
}

#[test]
fn bad_input_flipped_byte_fails_the_checksum() {
    let pr = Prepared::new("bad-flip");
    let (_, bytes) = upload_of_client1(&pr);
    for (k, at) in [bytes.len() / 2, bytes.len() - 1, 12]
        .into_iter()
        .enumerate()
    {
        let mut b = bytes.clone();
        b[at] ^= 0x10;
        let bad = pr.fx.path(&format!("flip{k}.fcdu"));
        fs::write(&bad, &b).unwrap();
        pr.reject("fedcdd", &bad, &[&s(&bad), "checksum"]);
        expect_rejected(&fedcdd(["inspect", &s(&bad)]), &[&s(&bad), "checksum"]);
    }
}

#[test]
fn bad_input_garbage_empty_and_missing_files() {
    let pr = Prepared::new("bad-garbage");
    let mut rng = Rng::new(99);
    let garbage = pr.fx.path("garbage.bin");
    let mut bytes = rng.bytes(4096);
    bytes[0] = 0x7f; // not "FCDU"
    fs::write(&garbage, &bytes).unwrap();
    pr.reject("fedcdd", &garbage, &[&s(&garbage)]);
    // Garbage that starts like an upload.
    let fake = pr.fx.path("fake.fcdu");
    let mut b = b"FCDU".to_vec();
    b.extend_from_slice(&bytes[..100]);
    fs::write(&fake, &b).unwrap();
    pr.reject("fedcdd", &fake, &[&s(&fake)]);
    let empty = pr.fx.path("empty.safetensors");
    fs::write(&empty, b"").unwrap();
    pr.reject("fedcdd", &empty, &[&s(&empty)]);
    let missing = pr.fx.path("does-not-exist");
    pr.reject("fedcdd", &missing, &[&s(&missing)]);
    // A missing global, too.
    let r = fedcdd([
        "aggregate",
        "--algorithm",
        "fedavg",
        "--global",
        &s(&missing),
        "--client",
        &s(&pr.fx.clients[0]),
        "--out",
        &s(&pr.out),
    ]);
    expect_rejected(&r, &[&s(&missing)]);
    pr.assert_out_untouched();
}

#[test]
fn bad_input_bin_only_adapter_dir() {
    let pr = Prepared::new("bad-bin");
    let dir = pr.fx.path("bin-only");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec(&pr.fx.config).unwrap(),
    )
    .unwrap();
    fs::write(
        dir.join("adapter_model.bin"),
        b"PK\x03\x04 pickled torch data",
    )
    .unwrap();
    pr.reject("fedcdd", &dir, &[&s(&dir), "adapter_model.bin"]);
}

#[test]
fn bad_input_missing_and_extra_tensors() {
    let pr = Prepared::with("bad-names", |i, t| {
        if i == 1 {
            t.retain(|x| x.name != V1_A);
        }
    });
    pr.reject("fedcdd", &pr.fx.clients[1], &[&s(&pr.fx.clients[1]), V1_A]);
    let extra_name = "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight";
    let pr = Prepared::with("bad-extra", |i, t| {
        if i == 1 {
            t.push(T {
                name: extra_name.into(),
                dims: vec![4, 8],
                dt: Dt::F32,
                data: vec![0.5; 32],
            });
        }
    });
    pr.reject(
        "fedcdd",
        &pr.fx.clients[1],
        &[&s(&pr.fx.clients[1]), extra_name],
    );
}

#[test]
fn bad_input_encode_keep_ratio_out_of_range() {
    let fx = Fixture::new("bad-keep", 1, 15);
    let up = fx.path("c0.fcdu");
    encode(&fx, &fx.clients[0], &up, &["--keep-ratio", "0.5"]).ok();
    let before = fs::read(&up).unwrap();
    for rho in ["0", "1.5", "-0.25", "NaN"] {
        let arg = format!("--keep-ratio={rho}");
        let r = encode(&fx, &fx.clients[0], &up, &[&arg]);
        expect_rejected(&r, &["keep"]);
        assert_eq!(fs::read(&up).unwrap(), before, "ρ = {rho}: upload changed");
        let fresh = fx.path("fresh.fcdu");
        let r = encode(&fx, &fx.clients[0], &fresh, &[&arg]);
        expect_rejected(&r, &["keep"]);
        assert!(!fresh.exists(), "ρ = {rho}: an upload was written");
    }
    // Other files in the directory: no temp files left behind.
    let names: Vec<_> = fs::read_dir(fx.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 3, "unexpected files: {names:?}");
}

#[test]
fn bad_input_upload_for_another_global() {
    let pr = Prepared::new("bad-other-global");
    let other = Fixture::with(
        "other-global",
        1,
        16,
        Shape {
            d_in: 20,
            ..Shape::default()
        },
        |_, _| {},
    );
    let up = pr.fx.path("other.fcdu");
    encode(&other, &other.clients[0], &up, &["--keep-ratio", "0.5"]).ok();
    pr.reject("fedcdd", &up, &[&s(&up), ".lora_A.weight"]);
    let dec = pr.fx.path("decoded");
    let r = decode(&pr.fx, &up, &dec);
    expect_rejected(&r, &[&s(&up), ".lora_A.weight"]);
    assert!(!dec.exists());
}

#[test]
fn bad_input_rules_that_need_the_training_loop() {
    let pr = Prepared::new("bad-scaffold");
    for (alg, word) in [("scaffold", "scaffold"), ("flora", "flora")] {
        let r = pr.aggregate(alg, &plain(&pr.fx.clients));
        expect_rejected(&r, &[]);
        let err = r.error_lines().join("\n").to_lowercase();
        assert!(
            err.contains(word),
            "{alg}: the error does not name the rule: {r}"
        );
        pr.assert_out_untouched();
    }
}

#[test]
fn bad_input_zero_sample_counts() {
    let pr = Prepared::new("bad-zero");
    let clients = with_counts(&pr.fx.clients, &[0, 0, 0]);
    for alg in ["fedavg", "fedcdd"] {
        expect_rejected(&pr.aggregate(alg, &clients), &[]);
        pr.assert_out_untouched();
    }
}

#[test]
fn huge_finite_values_never_panic_or_leak_inf() {
    let pr = Prepared::with("huge", |i, t| {
        if i == 1 {
            for v in &mut t.iter_mut().find(|x| x.name == V1_A).unwrap().data {
                *v = 3.0e38;
            }
        }
    });
    for alg in ["fedcdd", "fedavg", "fedadam"] {
        let r = pr.aggregate(alg, &plain(&pr.fx.clients));
        assert!(!r.stderr.contains("panicked"), "{alg}: {r}");
        if r.status.success() {
            for (name, t) in read_adapter(&pr.out) {
                assert!(
                    t.data.iter().all(|v| v.is_finite()),
                    "{alg}: {name} holds a non-finite value: {r}"
                );
            }
        } else {
            expect_rejected(&r, &[&s(&pr.fx.clients[1])]);
            pr.assert_out_untouched();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 7. make-example and bench
// ---------------------------------------------------------------------------------------------

#[test]
fn make_example_then_aggregate() {
    let dir = TempDir::new("example");
    let ex = dir.join("ex");
    fedcdd([
        "make-example",
        "--out",
        &s(&ex),
        "--clients",
        "3",
        "--layers",
        "2",
        "--hidden",
        "32",
        "--rank",
        "4",
    ])
    .ok();
    let global_dir = ex.join("global");
    let clients: Vec<PathBuf> = (0..3).map(|i| ex.join(format!("client-{i}"))).collect();
    for c in &clients {
        assert!(
            c.join("adapter_model.safetensors").is_file(),
            "{}",
            c.display()
        );
    }
    let global = read_adapter(&global_dir);
    assert_eq!(global.len(), 2 * 2 * 2, "tensors of 2 layers × q,v × A,B");
    for alg in ["fedcdd", "fedavg"] {
        let out = dir.join(alg);
        aggregate_ok(&global_dir, alg, &plain(&clients), &out);
        let got = read_adapter(&out);
        assert_same_names(&got, &global);
        for (name, t) in &got {
            assert!(t.data.iter().all(|v| v.is_finite()), "{alg}: {name}");
            assert_ne!(t.data, global[name].data, "{alg}: {name} unchanged");
        }
        assert_eq!(
            fs::read(out.join("adapter_config.json"))
                .ok()
                .map(|b| { serde_json::from_slice::<serde_json::Value>(&b).unwrap() }),
            Some(
                serde_json::from_slice::<serde_json::Value>(
                    &fs::read(global_dir.join("adapter_config.json")).unwrap()
                )
                .unwrap()
            )
        );
    }
}

/// `bench train --profile`: the FLOPs counted call by call add up to the step's analytic
/// count (they differ only by the diagonal of the causal mask), and the head is its own part.
#[test]
fn bench_train_profile_counts_every_op() {
    let r = fedcdd([
        "bench",
        "train",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--batch",
        "1",
        "--seq",
        "16",
        "--peak-seconds",
        "0.05",
        "--profile",
        "--json",
    ])
    .ok();
    let j: serde_json::Value =
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("bench JSON: {e}: {r}"));
    // the tiny preset's f32 checkpoint: 2·2048·256 embedding + head, 4 layers, norms
    let layer = 256 * 256 + 2 * 128 * 256 + 256 * 256 + 3 * 256 * 688 + 2 * 256;
    let params = 2 * 2048 * 256 + 4 * layer + 256;
    let weights = j["weight_bytes"].as_u64().expect("weight_bytes");
    assert!(
        weights > 4 * params as u64 && weights < 4 * params as u64 + 65536,
        "{weights}"
    );
    let p = &j["profile"];
    let ops = p["ops"].as_array().expect("profile ops");
    let counted: f64 = ops
        .iter()
        .map(|o| o["gflop_per_step"].as_f64().unwrap())
        .sum();
    let analytic = j["gflop_per_step"].as_f64().expect("gflop_per_step");
    assert!(
        (counted - analytic).abs() < 0.01 * analytic,
        "{counted} vs {analytic}"
    );
    let head: Vec<(&str, u64)> = ops
        .iter()
        .filter(|o| o["category"] == "LM head (vocab matmul)")
        .map(|o| {
            (
                o["op"].as_str().unwrap(),
                o["calls_per_step"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(head.len(), 2, "{head:?}");
    assert!(head.contains(&("linear_forward", 1)), "{head:?}");
    assert!(head.contains(&("linear_backward_input", 1)), "{head:?}");
    let cats = p["categories"].as_array().expect("categories");
    assert_eq!(
        cats.last().unwrap()["category"],
        "outside the ops (host code)"
    );
    for c in cats {
        let s = c["seconds_per_step"].as_f64().unwrap();
        assert!(s >= 0.0 && s.is_finite(), "{c}");
    }
}

#[test]
fn bench_aggregate_json() {
    let r = fedcdd([
        "bench",
        "aggregate",
        "--clients",
        "2",
        "--params",
        "200000",
        "--repeats",
        "1",
        "--json",
    ])
    .ok();
    let j: serde_json::Value =
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("bench JSON: {e}: {r}"));
    let bw = j["read_bandwidth_gbs"]
        .as_f64()
        .expect("read_bandwidth_gbs");
    assert!(bw > 0.0 && bw.is_finite(), "{j}");
    assert_eq!(j["clients"].as_u64(), Some(2), "{j}");
    assert!(j["params"].as_u64().unwrap_or(0) >= 200_000, "{j}");
    let results = j["results"].as_array().expect("results");
    let mut rules: Vec<&str> = results
        .iter()
        .map(|x| x["rule"].as_str().unwrap())
        .collect();
    for x in results {
        let t = x["seconds"].as_f64().unwrap();
        assert!(t > 0.0 && t.is_finite(), "{x}");
    }
    rules.sort();
    let n = rules.len();
    rules.dedup();
    assert_eq!(rules.len(), n, "a rule appears twice: {j}");
    assert_eq!(rules, ["fedavg", "fedcdd batch", "fedcdd streaming"], "{j}");
}
