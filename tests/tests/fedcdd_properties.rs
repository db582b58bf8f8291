//! The spec's "Properties every implementation must satisfy" for FedCDD, checked on the
//! streaming form (`StreamingFedCdd`), the batch form (`fedcdd_batch`) and against an
//! independent plain-f64 reference (`common::ref_fedcdd`), plus the error paths.

mod common;

use common::*;
use fedcdd_core::{
    BatchReport, ClientAgreement, ClientInput, Components, Error, ErrorKind, FedCddConfig,
    FedCddSummary, Layout, NormAxis, StreamingFedCdd, Target, TensorRole, TensorView, Weighting,
    bf16, f16, fedcdd_batch,
};

// ---------------------------------------------------------------------------------------------
// Drivers
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Client<'a> {
    id: u32,
    n: f32,
    x: TensorView<'a>,
}

type StreamResult = (Vec<f32>, FedCddSummary, Vec<(usize, ClientAgreement)>);

/// Streaming form: pass 1 over `clients` in order, pass 2 in `order2`, finish.
/// The workspace is NaN-filled so that a read of uninitialised state shows.
fn stream(
    cfg: FedCddConfig,
    layout: Layout,
    global: TensorView<'_>,
    clients: &[Client<'_>],
    order2: &[usize],
) -> Result<StreamResult, Error> {
    let mut ws = vec![f32::NAN; StreamingFedCdd::workspace_len(&cfg, &layout)];
    let mut agg = StreamingFedCdd::new(cfg, layout, global, &mut ws)?;
    for c in clients {
        agg.pass1(c.id, c.n, c.x)?;
    }
    let mut agreements = Vec::new();
    for &i in order2 {
        let c = &clients[i];
        agreements.push((i, agg.pass2(c.id, c.n, c.x)?));
    }
    let mut out = vec![f32::NAN; layout.len()];
    let summary = agg.finish(&mut out)?;
    Ok((out, summary, agreements))
}

fn stream_in_order(
    cfg: FedCddConfig,
    layout: Layout,
    global: TensorView<'_>,
    clients: &[Client<'_>],
) -> Result<StreamResult, Error> {
    let order: Vec<usize> = (0..clients.len()).collect();
    stream(cfg, layout, global, clients, &order)
}

fn batch(
    cfg: FedCddConfig,
    layout: Layout,
    global: TensorView<'_>,
    clients: &[Client<'_>],
) -> Result<(Vec<f32>, BatchReport), Error> {
    let inputs: Vec<ClientInput<'_>> = clients
        .iter()
        .map(|c| ClientInput {
            id: c.id,
            samples: c.n,
            update: c.x,
        })
        .collect();
    let mut out = vec![f32::NAN; layout.len()];
    let report = fedcdd_batch(&cfg, layout, global, &inputs, &mut out)?;
    Ok((out, report))
}

/// Shapes of the sweep: row vector, column vector, ragged, LoRA-like A and B, square.
const SHAPES: [(usize, usize, TensorRole); 7] = [
    (1, 24, TensorRole::Other),
    (24, 1, TensorRole::Other),
    (7, 13, TensorRole::Other),
    (8, 64, TensorRole::LoraA),
    (64, 8, TensorRole::LoraB),
    (5, 5, TensorRole::Other),
    (3, 17, TensorRole::LoraA),
];

const AXES: [NormAxis; 3] = [NormAxis::Column, NormAxis::Row, NormAxis::Rank];

const WEIGHTINGS: [Weighting; 6] = [
    Weighting::PRelu,
    Weighting::Relu,
    Weighting::Softmax { tau: 0.5 },
    Weighting::Softmax { tau: 0.1 },
    Weighting::Samples,
    Weighting::Uniform,
];

fn cfg(
    axis: NormAxis,
    target: Target,
    weighting: Weighting,
    renormalize: bool,
    lr: f32,
) -> FedCddConfig {
    FedCddConfig {
        norm_axis: axis,
        target,
        weighting,
        renormalize,
        server_lr: lr,
        components: Components::Both,
    }
}

/// Every configuration of the sweep.
fn all_configs() -> Vec<FedCddConfig> {
    let mut v = Vec::new();
    let mut k = 0;
    for axis in AXES {
        for target in [Target::Delta, Target::Weights] {
            for weighting in WEIGHTINGS {
                for renormalize in [true, false] {
                    // λ alternates between the default and a non-trivial value.
                    let lr = if k % 2 == 0 { 1.0 } else { 0.7 };
                    k += 1;
                    v.push(cfg(axis, target, weighting, renormalize, lr));
                }
            }
            // The one-part readings (ablations), with alignment on.
            for components in [Components::ConsensusOnly, Components::DivergenceOnly] {
                for renormalize in [true, false] {
                    v.push(FedCddConfig {
                        components,
                        ..cfg(axis, target, Weighting::PRelu, renormalize, 0.7)
                    });
                }
            }
        }
    }
    v
}

/// Random client updates `s_i·(c_i·base + noise_i)`: mostly agreeing clients of very different
/// scales, one of them anti-correlated (when there are more than two), random sample counts.
fn random_clients(rng: &mut Rng, len: usize, nc: usize) -> Vec<(f32, Vec<f32>)> {
    let base: Vec<f64> = (0..len).map(|_| rng.normal()).collect();
    (0..nc)
        .map(|i| {
            let c = if nc > 2 && i == nc - 1 {
                -0.8
            } else {
                rng.range(0.3, 1.5)
            };
            let s = 10f64.powf(rng.range(-1.0, 1.0));
            let x = base
                .iter()
                .map(|b| (s * (c * b + rng.normal())) as f32)
                .collect();
            let n = (1 + rng.below(1000)) as f32;
            (n, x)
        })
        .collect()
}

fn views(data: &[(f32, Vec<f32>)]) -> Vec<Client<'_>> {
    data.iter()
        .enumerate()
        .map(|(i, (n, x))| Client {
            id: 100 + i as u32,
            n: *n,
            x: TensorView::F32(x),
        })
        .collect()
}

fn ref_clients(data: &[(f32, Vec<f32>)]) -> Vec<(f64, Vec<f64>)> {
    data.iter().map(|(n, x)| (*n as f64, to_f64(x))).collect()
}

fn describe(c: &FedCddConfig, rows: usize, cols: usize, role: TensorRole) -> String {
    format!(
        "{rows}x{cols} {role:?} axis={:?} target={:?} weighting={:?} renorm={} lr={} {:?}",
        c.norm_axis, c.target, c.weighting, c.renormalize, c.server_lr, c.components
    )
}

fn finish_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures
            .iter()
            .take(25)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Whether this input is well conditioned for the rule, i.e. a few f32 roundings cannot change
/// the result by more than the tolerances of the sweeps:
/// - no group whose client directions (nearly) cancel: there `D̂_g = D̄_g / max(‖D̄_g‖, ε)`,
///   with ε = 1e-8 far below f32 resolution, blows rounding noise up to a unit vector;
/// - for `p_relu`/`relu`: the normaliser `Σ p_i max(v_i, 0)` (`Σ max(v_i, 0)`) well above the
///   rounding noise of the agreements (~1e-7), or every `v_i` clearly negative (a clean
///   fallback), so that neither the weights nor the fallback decision hinge on rounding.
///
/// Both arise with single-element groups (1×n by columns, n×1 by rows), whose directions are
/// ±1 and whose agreements take few distinct values (exact ties, exact zeros). Those cases have
/// their own tests (`opposing_single_element_groups_cancel`,
/// `orthogonal_updates_fall_back_to_sample_weights`); the sweeps skip them.
fn well_conditioned(
    c: &FedCddConfig,
    (rows, cols, role): (usize, usize, TensorRole),
    g: &[f64],
    data: &[(f64, Vec<f64>)],
) -> bool {
    let r = ref_fedcdd(c, rows, cols, role, g, data);
    if c.renormalize && r.cancellation <= 1e-2 {
        return false;
    }
    if c.components != Components::Both && r.mean_cancellation <= 1e-2 {
        return false;
    }
    if data.len() > 1 && matches!(c.weighting, Weighting::PRelu | Weighting::Relu) {
        let n_sum: f64 = data.iter().map(|d| d.0).sum();
        let s: f64 = r
            .agreement
            .iter()
            .zip(data)
            .map(|(v, d)| match c.weighting {
                Weighting::PRelu => d.0 / n_sum * v.max(0.0),
                _ => v.max(0.0),
            })
            .sum();
        let vmax = r
            .agreement
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max);
        if !(s >= 0.05 || vmax < -1e-5) {
            return false;
        }
    }
    true
}

/// Error of a result against `G + want_step`: on the step for the `delta` target, on the whole
/// tensor for `weights` (whose result is computed as θ and carries θ's rounding).
fn result_err(c: &FedCddConfig, out: &[f32], g: &[f64], want_step: &[f64]) -> f64 {
    match c.target {
        Target::Delta => rel_err(&step_of(out, g), want_step),
        Target::Weights => {
            let want: Vec<f64> = g.iter().zip(want_step).map(|(g, d)| g + d).collect();
            rel_err(&to_f64(out), &want)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A hand-checked example
// ---------------------------------------------------------------------------------------------

/// Two clients on a 2×2 tensor, G = 0, n = (1, 3) so p = (¼, ¾).
///
/// Δ₁ = [[3, 0], [4, 1]], Δ₂ = [[0, 2], [5, 0]].
/// Column axis: m₁ = (5, 1), D₁ = [[.6, 0], [.8, 1]]; m₂ = (5, 2), D₂ = [[0, 1], [1, 0]].
/// vec(D₁) = (.6, 0, .8, 1), vec(D₂) = (0, 1, 1, 0), both of norm √2: ⟨û₁, û₂⟩ = .8/2 = .4,
/// so v₁ = v₂ = .4 > 0 and w = p. m̄ = (5, 1.75).
/// D̄[:,0] = ¼(.6, .8) + ¾(0, 1) = (.15, .95), ‖·‖ = √.925;
/// D̄[:,1] = ¼(0, 1) + ¾(1, 0) = (.75, .25), ‖·‖ = √.625.
/// Result: col 0 = 5·(.15, .95)/√.925, col 1 = 1.75·(.75, .25)/√.625.
/// (FedAvg would give [[.75, 1.5], [4.75, .25]].)
///
/// Row axis: rows of Δ₁: (3,0) → m 3, D (1,0); (4,1) → m √17, D (4,1)/√17.
/// Rows of Δ₂: (0,2) → m 2, D (0,1); (5,0) → m 5, D (1,0).
/// ⟨û₁, û₂⟩ = (4/√17)/2 > 0, w = p. m̄ = (¼·3 + ¾·2, ¼√17 + ¾·5).
/// D̄ row 0 = (¼, ¾); row 1 = (¼·4/√17 + ¾, ¼/√17).
#[test]
fn hand_checked_two_clients() {
    let layout = Layout::new(2, 2, TensorRole::Other);
    let g = [0.0f32; 4];
    let d1 = [3.0f32, 0.0, 4.0, 1.0];
    let d2 = [0.0f32, 2.0, 5.0, 0.0];
    let clients = [
        Client {
            id: 1,
            n: 1.0,
            x: TensorView::F32(&d1),
        },
        Client {
            id: 2,
            n: 3.0,
            x: TensorView::F32(&d2),
        },
    ];

    // Column axis (the default configuration).
    let c = FedCddConfig::default();
    let (a, b) = (0.925f64.sqrt(), 0.625f64.sqrt());
    let want = [
        5.0 * 0.15 / a,
        1.75 * 0.75 / b,
        5.0 * 0.95 / a,
        1.75 * 0.25 / b,
    ];
    let (out, summary, agr) = stream_in_order(c, layout, TensorView::F32(&g), &clients).unwrap();
    assert_slice_close("streaming column", &out, &want, 1e-6);
    assert!(!summary.fell_back);
    assert_eq!(summary.clients, 2);
    for (_, a) in &agr {
        assert_close("v (streaming)", a.v as f64, 0.4, 1e-6);
    }
    let (out, report) = batch(c, layout, TensorView::F32(&g), &clients).unwrap();
    assert_slice_close("batch column", &out, &want, 1e-6);
    for v in &report.agreement {
        assert_close("v (batch)", *v as f64, 0.4, 1e-6);
    }
    assert_slice_close("batch weights", &report.weights, &[0.25, 0.75], 1e-6);
    assert!(!report.fell_back);

    // Row axis.
    let c = FedCddConfig {
        norm_axis: NormAxis::Row,
        ..FedCddConfig::default()
    };
    let s17 = 17f64.sqrt();
    let mbar = [0.25 * 3.0 + 0.75 * 2.0, 0.25 * s17 + 0.75 * 5.0];
    let r0 = [0.25f64, 0.75];
    let r1 = [0.25 * 4.0 / s17 + 0.75, 0.25 / s17];
    let n0 = (r0[0] * r0[0] + r0[1] * r0[1]).sqrt();
    let n1 = (r1[0] * r1[0] + r1[1] * r1[1]).sqrt();
    let want = [
        mbar[0] * r0[0] / n0,
        mbar[0] * r0[1] / n0,
        mbar[1] * r1[0] / n1,
        mbar[1] * r1[1] / n1,
    ];
    let v = 4.0 / s17 / 2.0;
    let (out, _, agr) = stream_in_order(c, layout, TensorView::F32(&g), &clients).unwrap();
    assert_slice_close("streaming row", &out, &want, 1e-6);
    for (_, a) in &agr {
        assert_close("v (streaming, row)", a.v as f64, v, 1e-6);
    }
    let (out, _) = batch(c, layout, TensorView::F32(&g), &clients).unwrap();
    assert_slice_close("batch row", &out, &want, 1e-6);
}

// ---------------------------------------------------------------------------------------------
// Property 1: identical clients, one client
// ---------------------------------------------------------------------------------------------

#[test]
fn identical_clients_give_global_plus_delta() {
    let mut rng = Rng::new(1);
    let mut failures = Vec::new();
    for (rows, cols, role) in SHAPES {
        let layout = Layout::new(rows, cols, role);
        let len = rows * cols;
        let g = rng.normal_vec(len, 1.0);
        let delta = rng.normal_vec(len, 0.5);
        for c in all_configs() {
            for nc in [1usize, 2, 4] {
                let data: Vec<(f32, Vec<f32>)> = (0..nc)
                    .map(|_| ((1 + rng.below(50)) as f32, delta.clone()))
                    .collect();
                let clients = views(&data);
                let want: Vec<f64> = delta
                    .iter()
                    .map(|d| c.server_lr as f64 * *d as f64)
                    .collect();
                let g64 = to_f64(&g);
                let what = format!("{} N={nc}", describe(&c, rows, cols, role));
                match stream_in_order(c, layout, TensorView::F32(&g), &clients) {
                    Ok((out, s, _)) => {
                        let e = result_err(&c, &out, &g64, &want);
                        if bad(e, 1e-5) {
                            failures.push(format!("{what}: streaming rel err {e:.3e}"));
                        }
                        if s.fell_back {
                            failures.push(format!("{what}: streaming fell back"));
                        }
                    }
                    Err(e) => failures.push(format!("{what}: streaming error {e}")),
                }
                match batch(c, layout, TensorView::F32(&g), &clients) {
                    Ok((out, _)) => {
                        let e = result_err(&c, &out, &g64, &want);
                        if bad(e, 1e-5) {
                            failures.push(format!("{what}: batch rel err {e:.3e}"));
                        }
                    }
                    Err(e) => failures.push(format!("{what}: batch error {e}")),
                }
            }
        }
    }
    finish_failures(&failures);
}

#[test]
fn single_client_gives_global_plus_its_update() {
    let mut rng = Rng::new(2);
    let mut failures = Vec::new();
    for (rows, cols, role) in SHAPES {
        let layout = Layout::new(rows, cols, role);
        let len = rows * cols;
        for c in all_configs() {
            let g = rng.normal_vec(len, 1.0);
            let scale = 10f64.powf(rng.range(-2.0, 1.0));
            let delta = rng.normal_vec(len, scale);
            let data = vec![(rng.range(0.5, 100.0) as f32, delta.clone())];
            let clients = views(&data);
            let g64 = to_f64(&g);
            let want: Vec<f64> = delta
                .iter()
                .map(|d| c.server_lr as f64 * *d as f64)
                .collect();
            let what = describe(&c, rows, cols, role);
            match stream_in_order(c, layout, TensorView::F32(&g), &clients) {
                Ok((out, s, agr)) => {
                    let e = result_err(&c, &out, &g64, &want);
                    if bad(e, 1e-5) {
                        failures.push(format!("{what}: streaming rel err {e:.3e}"));
                    }
                    if s.fell_back || s.clients != 1 {
                        failures.push(format!("{what}: summary {s:?}"));
                    }
                    if agr[0].1.raw_weight <= 0.0 {
                        failures.push(format!("{what}: N=1 weight {:?}", agr[0].1));
                    }
                }
                Err(e) => failures.push(format!("{what}: streaming error {e}")),
            }
            match batch(c, layout, TensorView::F32(&g), &clients) {
                Ok((out, r)) => {
                    let e = result_err(&c, &out, &g64, &want);
                    if bad(e, 1e-5) {
                        failures.push(format!("{what}: batch rel err {e:.3e}"));
                    }
                    if r.weights != [1.0] {
                        failures.push(format!("{what}: N=1 weights {:?}", r.weights));
                    }
                }
                Err(e) => failures.push(format!("{what}: batch error {e}")),
            }
        }
    }
    finish_failures(&failures);
}

// ---------------------------------------------------------------------------------------------
// Property 2: group-wise positive multiples of one matrix → FedAvg
// ---------------------------------------------------------------------------------------------

#[test]
fn groupwise_positive_multiples_equal_fedavg() {
    let mut rng = Rng::new(3);
    let mut failures = Vec::new();
    for (rows, cols, role) in SHAPES {
        let layout = Layout::new(rows, cols, role);
        let len = rows * cols;
        for c in all_configs() {
            if c.target != Target::Delta {
                continue; // θ_i = G + Δ_i are not multiples of one matrix.
            }
            let by_row = ref_groups_by_row(c.norm_axis, role);
            let y: Vec<f64> = (0..len).map(|_| rng.normal()).collect();
            let nc = 2 + rng.below(4);
            let data: Vec<(f32, Vec<f32>)> = (0..nc)
                .map(|_| {
                    let groups = if by_row { rows } else { cols };
                    // s_ig > 0, over two orders of magnitude.
                    let s: Vec<f64> = (0..groups)
                        .map(|_| 10f64.powf(rng.range(-1.0, 1.0)))
                        .collect();
                    let x = (0..len)
                        .map(|e| {
                            let gi = if by_row { e / cols } else { e % cols };
                            (s[gi] * y[e]) as f32
                        })
                        .collect();
                    ((1 + rng.below(200)) as f32, x)
                })
                .collect();
            let g = rng.normal_vec(len, 1.0);
            let g64 = to_f64(&g);
            let fedavg: Vec<f64> = ref_weighted_mean(&ref_clients(&data))
                .iter()
                .map(|d| c.server_lr as f64 * d)
                .collect();
            let clients = views(&data);
            let what = format!("{} N={nc}", describe(&c, rows, cols, role));
            match stream_in_order(c, layout, TensorView::F32(&g), &clients) {
                Ok((out, _, _)) => {
                    let e = rel_err(&step_of(&out, &g64), &fedavg);
                    if bad(e, 1e-5) {
                        failures.push(format!("{what}: streaming vs FedAvg rel err {e:.3e}"));
                    }
                }
                Err(e) => failures.push(format!("{what}: streaming error {e}")),
            }
            match batch(c, layout, TensorView::F32(&g), &clients) {
                Ok((out, _)) => {
                    let e = rel_err(&step_of(&out, &g64), &fedavg);
                    if bad(e, 1e-5) {
                        failures.push(format!("{what}: batch vs FedAvg rel err {e:.3e}"));
                    }
                }
                Err(e) => failures.push(format!("{what}: batch error {e}")),
            }
        }
    }
    finish_failures(&failures);
}

// ---------------------------------------------------------------------------------------------
// Property 3: permutation invariance, positive homogeneity
// ---------------------------------------------------------------------------------------------

#[test]
fn permutation_invariance() {
    let mut rng = Rng::new(4);
    let mut failures = Vec::new();
    let (mut total, mut skipped) = (0, 0);
    for (rows, cols, role) in SHAPES {
        let layout = Layout::new(rows, cols, role);
        let len = rows * cols;
        for c in all_configs() {
            let nc = 2 + rng.below(4);
            let data = random_clients(&mut rng, len, nc);
            let g = rng.normal_vec(len, 1.0);
            total += 1;
            if !well_conditioned(&c, (rows, cols, role), &to_f64(&g), &ref_clients(&data)) {
                skipped += 1;
                continue;
            }
            let perm = rng.permutation(nc);
            let permuted: Vec<(f32, Vec<f32>)> = perm.iter().map(|&i| data[i].clone()).collect();
            let (a, b) = (views(&data), views(&permuted));
            let what = describe(&c, rows, cols, role);
            let gv = TensorView::F32(&g);
            match (
                stream_in_order(c, layout, gv, &a),
                stream_in_order(c, layout, gv, &b),
            ) {
                (Ok(x), Ok(y)) => {
                    let e = rel_err_3232(&y.0, &x.0);
                    if bad(e, 1e-5) {
                        failures.push(format!("{what}: streaming permuted rel err {e:.3e}"));
                    }
                }
                (x, y) => failures.push(format!(
                    "{what}: streaming errors {:?} {:?}",
                    x.err(),
                    y.err()
                )),
            }
            match (batch(c, layout, gv, &a), batch(c, layout, gv, &b)) {
                (Ok(x), Ok(y)) => {
                    let e = rel_err_3232(&y.0, &x.0);
                    if bad(e, 1e-5) {
                        failures.push(format!("{what}: batch permuted rel err {e:.3e}"));
                    }
                }
                (x, y) => {
                    failures.push(format!("{what}: batch errors {:?} {:?}", x.err(), y.err()))
                }
            }
        }
    }
    eprintln!("{skipped} of {total} cases skipped as ill-conditioned");
    assert!(
        skipped * 5 < total,
        "{skipped} of {total} cases ill-conditioned"
    );
    finish_failures(&failures);
}

#[test]
fn positive_homogeneity() {
    let mut rng = Rng::new(5);
    let mut failures = Vec::new();
    let (mut total, mut skipped) = (0, 0);
    for (rows, cols, role) in SHAPES {
        let layout = Layout::new(rows, cols, role);
        let len = rows * cols;
        for c in all_configs() {
            if c.target != Target::Delta {
                continue; // homogeneity is a property of the update, not of θ.
            }
            let nc = 2 + rng.below(4);
            let data = random_clients(&mut rng, len, nc);
            let g = rng.normal_vec(len, 1.0);
            let g64 = to_f64(&g);
            total += 1;
            if !well_conditioned(&c, (rows, cols, role), &g64, &ref_clients(&data)) {
                skipped += 1;
                continue;
            }
            let gv = TensorView::F32(&g);
            let base_s = stream_in_order(c, layout, gv, &views(&data)).map(|r| r.0);
            let base_b = batch(c, layout, gv, &views(&data)).map(|r| r.0);
            for k in [0.5f32, 3.0] {
                let scaled: Vec<(f32, Vec<f32>)> = data
                    .iter()
                    .map(|(n, x)| (*n, x.iter().map(|v| k * v).collect()))
                    .collect();
                let what = format!("{} c={k}", describe(&c, rows, cols, role));
                let s = stream_in_order(c, layout, gv, &views(&scaled)).map(|r| r.0);
                let b = batch(c, layout, gv, &views(&scaled)).map(|r| r.0);
                for (form, base, got) in [("streaming", &base_s, &s), ("batch", &base_b, &b)] {
                    match (base, got) {
                        (Ok(base), Ok(got)) => {
                            let want: Vec<f64> =
                                step_of(base, &g64).iter().map(|d| k as f64 * d).collect();
                            let e = rel_err(&step_of(got, &g64), &want);
                            if bad(e, 1e-5) {
                                failures.push(format!("{what}: {form} rel err {e:.3e}"));
                            }
                        }
                        (x, y) => failures.push(format!(
                            "{what}: {form} errors {:?} {:?}",
                            x.as_ref().err(),
                            y.as_ref().err()
                        )),
                    }
                }
            }
        }
    }
    eprintln!("{skipped} of {total} cases skipped as ill-conditioned");
    assert!(
        skipped * 5 < total,
        "{skipped} of {total} cases ill-conditioned"
    );
    finish_failures(&failures);
}

// ---------------------------------------------------------------------------------------------
// Property 5: streaming == batch, both == reference
// ---------------------------------------------------------------------------------------------

#[test]
fn streaming_equals_batch_and_reference() {
    let mut rng = Rng::new(6);
    let mut failures = Vec::new();
    let (mut cases, mut skipped) = (0, 0);
    for (rows, cols, role) in SHAPES {
        let layout = Layout::new(rows, cols, role);
        let len = rows * cols;
        for c in all_configs() {
            cases += 1;
            let nc = 2 + rng.below(5);
            let data = random_clients(&mut rng, len, nc);
            let g = rng.normal_vec(len, 1.0);
            let g64 = to_f64(&g);
            if !well_conditioned(&c, (rows, cols, role), &g64, &ref_clients(&data)) {
                skipped += 1;
                continue;
            }
            let clients = views(&data);
            let what = describe(&c, rows, cols, role);
            let gv = TensorView::F32(&g);
            let reference = ref_fedcdd(&c, rows, cols, role, &g64, &ref_clients(&data));
            let ref_step = sub(&reference.out, &g64);

            let s1 = stream_in_order(c, layout, gv, &clients);
            let mut order2 = rng.permutation(nc);
            if order2.iter().enumerate().all(|(i, &j)| i == j) {
                order2.reverse();
            }
            let s2 = stream(c, layout, gv, &clients, &order2);
            let b = batch(c, layout, gv, &clients);
            let (s1, s2, b) = match (s1, s2, b) {
                (Ok(s1), Ok(s2), Ok(b)) => (s1, s2, b),
                (s1, s2, b) => {
                    failures.push(format!(
                        "{what}: errors {:?} {:?} {:?}",
                        s1.err(),
                        s2.err(),
                        b.err()
                    ));
                    continue;
                }
            };
            let e = rel_err_3232(&s1.0, &b.0);
            if bad(e, 1e-5) {
                failures.push(format!("{what}: streaming vs batch rel err {e:.3e}"));
            }
            let e = rel_err_3232(&s2.0, &b.0);
            if bad(e, 1e-5) {
                failures.push(format!(
                    "{what}: streaming (pass-2 order {order2:?}) vs batch rel err {e:.3e}"
                ));
            }
            for (form, out) in [("streaming", &s1.0), ("batch", &b.0)] {
                let e = rel_err(&step_of(out, &g64), &ref_step);
                if bad(e, 1e-4) {
                    failures.push(format!("{what}: {form} vs reference rel err {e:.3e}"));
                }
            }
            // Per-client quantities.
            for (i, a) in &s2.2 {
                let dv = (a.v as f64 - reference.agreement[*i]).abs();
                if bad(dv, 1e-5) {
                    failures.push(format!("{what}: streaming v[{i}] off by {dv:.3e}"));
                }
            }
            for (i, v) in b.1.agreement.iter().enumerate() {
                let dv = (*v as f64 - reference.agreement[i]).abs();
                if bad(dv, 1e-5) {
                    failures.push(format!("{what}: batch v[{i}] off by {dv:.3e}"));
                }
            }
            for (i, w) in b.1.weights.iter().enumerate() {
                let dw = (*w as f64 - reference.weights[i]).abs();
                if bad(dw, 1e-5) {
                    failures.push(format!("{what}: batch w[{i}] off by {dw:.3e}"));
                }
            }
            if s1.1.fell_back != reference.fell_back
                || s2.1.fell_back != reference.fell_back
                || b.1.fell_back != reference.fell_back
            {
                failures.push(format!(
                    "{what}: fell_back streaming {} / {} batch {} reference {}",
                    s1.1.fell_back, s2.1.fell_back, b.1.fell_back, reference.fell_back
                ));
            }
            if s1.1.clients != nc {
                failures.push(format!("{what}: summary.clients {}", s1.1.clients));
            }
            // The streaming weights, normalised, are the batch weights.
            if !s2.1.fell_back {
                for (i, a) in &s2.2 {
                    let w = s2.1.weight_of(a) as f64;
                    if bad((w - reference.weights[*i]).abs(), 1e-5) {
                        failures.push(format!(
                            "{what}: streaming w[{i}] = {w}, reference {}",
                            reference.weights[*i]
                        ));
                    }
                }
            }
        }
    }
    assert!(cases > 400);
    eprintln!("{skipped} of {cases} cases skipped as ill-conditioned");
    assert!(
        skipped * 5 < cases,
        "{skipped} of {cases} cases ill-conditioned"
    );
    finish_failures(&failures);
}

/// f16 and bf16 storage: the rule on the rounded values, arithmetic in f32.
#[test]
fn half_precision_inputs_match_reference() {
    let mut rng = Rng::new(7);
    let mut failures = Vec::new();
    let (mut total, mut skipped) = (0, 0);
    for (rows, cols, role) in SHAPES {
        let layout = Layout::new(rows, cols, role);
        let len = rows * cols;
        for c in all_configs() {
            let nc = 2 + rng.below(4);
            let data = random_clients(&mut rng, len, nc);
            let g = rng.normal_vec(len, 1.0);
            let what = describe(&c, rows, cols, role);

            let order2: Vec<usize> = (0..nc).rev().collect();
            let case = RoundedCase {
                c,
                layout,
                rows,
                cols,
                role,
                what: &what,
                order: &order2,
            };
            // Conditioning is judged on the f16 values only.
            total += 1;
            if !case.check(
                &g,
                &data,
                f16::from_f32,
                f16::to_f64,
                |x: &[f16]| TensorView::F16(x),
                "f16",
                &mut failures,
            ) {
                skipped += 1;
                continue;
            }
            case.check(
                &g,
                &data,
                bf16::from_f32,
                bf16::to_f64,
                |x: &[bf16]| TensorView::BF16(x),
                "bf16",
                &mut failures,
            );
        }
    }
    eprintln!("{skipped} of {total} cases skipped as ill-conditioned");
    assert!(
        skipped * 5 < total,
        "{skipped} of {total} cases ill-conditioned"
    );
    finish_failures(&failures);
}

/// One configuration and shape of `half_precision_inputs_match_reference`.
struct RoundedCase<'a> {
    c: FedCddConfig,
    layout: Layout,
    rows: usize,
    cols: usize,
    role: TensorRole,
    what: &'a str,
    order: &'a [usize],
}

impl RoundedCase<'_> {
    /// Rounds the global and the clients to `T`, then compares streaming and batch with the
    /// f64 reference computed on the rounded values. Returns false (checking nothing) when
    /// the case is too ill-conditioned to compare.
    #[allow(clippy::too_many_arguments)]
    fn check<T: Copy>(
        &self,
        g: &[f32],
        data: &[(f32, Vec<f32>)],
        round: fn(f32) -> T,
        widen: fn(T) -> f64,
        view: for<'v> fn(&'v [T]) -> TensorView<'v>,
        name: &str,
        failures: &mut Vec<String>,
    ) -> bool {
        let what = self.what;
        let gr: Vec<T> = g.iter().map(|&v| round(v)).collect();
        let dr: Vec<(f32, Vec<T>)> = data
            .iter()
            .map(|(n, x)| (*n, x.iter().map(|&v| round(v)).collect()))
            .collect();
        let g64: Vec<f64> = gr.iter().map(|&v| widen(v)).collect();
        let r64: Vec<(f64, Vec<f64>)> = dr
            .iter()
            .map(|(n, x)| (*n as f64, x.iter().map(|&v| widen(v)).collect()))
            .collect();
        let clients: Vec<Client<'_>> = dr
            .iter()
            .enumerate()
            .map(|(i, (n, x))| Client {
                id: i as u32,
                n: *n,
                x: view(x),
            })
            .collect();
        let reference = ref_fedcdd(&self.c, self.rows, self.cols, self.role, &g64, &r64);
        if self.c.renormalize && reference.cancellation <= 1e-2 {
            return false;
        }
        let ref_step = sub(&reference.out, &g64);
        match stream(self.c, self.layout, view(&gr), &clients, self.order) {
            Ok((out, _, _)) => {
                let e = rel_err(&step_of(&out, &g64), &ref_step);
                if bad(e, 1e-4) {
                    failures.push(format!("{what}: {name} streaming vs reference {e:.3e}"));
                }
            }
            Err(e) => failures.push(format!("{what}: {name} streaming error {e}")),
        }
        match batch(self.c, self.layout, view(&gr), &clients) {
            Ok((out, _)) => {
                let e = rel_err(&step_of(&out, &g64), &ref_step);
                if bad(e, 1e-4) {
                    failures.push(format!("{what}: {name} batch vs reference {e:.3e}"));
                }
            }
            Err(e) => failures.push(format!("{what}: {name} batch error {e}")),
        }
        true
    }
}

// ---------------------------------------------------------------------------------------------
// The p_i fallback
// ---------------------------------------------------------------------------------------------

/// Two opposite clients: Δ₂ = −2·Δ₁, n = (3, 1). Then D₂ = −D₁, v₁ = v₂ = −1, every
/// agreement is negative: p_relu and relu fall back to w = p = (¾, ¼).
/// D̄ = (¾ − ¼)·D₁ = ½·D₁ → D̂ = D₁ (renormalised); m̄ = ¾·m₁ + ¼·2m₁ = 1.25·m₁,
/// so the result is G + 1.25·Δ₁ (with renormalisation) or G + 0.625·Δ₁ (without).
#[test]
fn opposite_clients_fall_back_to_sample_weights() {
    let mut rng = Rng::new(8);
    for (rows, cols, role) in SHAPES {
        let layout = Layout::new(rows, cols, role);
        let len = rows * cols;
        let d1 = rng.normal_vec(len, 1.0);
        let d2: Vec<f32> = d1.iter().map(|v| -2.0 * v).collect();
        let g = rng.normal_vec(len, 1.0);
        let g64 = to_f64(&g);
        let data = vec![(3.0f32, d1.clone()), (1.0f32, d2)];
        let clients = views(&data);
        for axis in AXES {
            for weighting in [Weighting::PRelu, Weighting::Relu] {
                for renormalize in [true, false] {
                    let c = cfg(axis, Target::Delta, weighting, renormalize, 1.0);
                    let what = describe(&c, rows, cols, role);
                    let k = if renormalize { 1.25 } else { 0.625 };
                    let want: Vec<f64> = d1.iter().map(|v| k * *v as f64).collect();
                    let reference = ref_fedcdd(&c, rows, cols, role, &g64, &ref_clients(&data));
                    assert!(reference.fell_back, "{what}: reference must fall back");
                    assert!(rel_err(&sub(&reference.out, &g64), &want) < 1e-12);

                    let (out, s, agr) =
                        stream_in_order(c, layout, TensorView::F32(&g), &clients).unwrap();
                    assert!(s.fell_back, "{what}: streaming did not fall back: {s:?}");
                    for (_, a) in &agr {
                        assert_close(&format!("{what}: v"), a.v as f64, -1.0, 1e-5);
                    }
                    let e = rel_err(&step_of(&out, &g64), &want);
                    assert!(e < 1e-5, "{what}: streaming rel err {e:.3e}");

                    let (out, r) = batch(c, layout, TensorView::F32(&g), &clients).unwrap();
                    assert!(r.fell_back, "{what}: batch did not fall back");
                    assert_slice_close(
                        &format!("{what}: batch w"),
                        &r.weights,
                        &[0.75, 0.25],
                        1e-6,
                    );
                    let e = rel_err(&step_of(&out, &g64), &want);
                    assert!(e < 1e-5, "{what}: batch rel err {e:.3e}");
                }
            }
            // Samples / uniform never fall back; softmax with τ = 1 does not need to.
            for weighting in [
                Weighting::Samples,
                Weighting::Uniform,
                Weighting::Softmax { tau: 1.0 },
            ] {
                let c = cfg(axis, Target::Delta, weighting, true, 1.0);
                let (_, s, _) = stream_in_order(c, layout, TensorView::F32(&g), &clients).unwrap();
                assert!(
                    !s.fell_back,
                    "{}: fell back",
                    describe(&c, rows, cols, role)
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Property 6: rejected inputs (and the state they leave)
// ---------------------------------------------------------------------------------------------

/// A NaN / ±Inf client is rejected with its id, in either pass and either form, and the
/// streaming state is untouched: running on without it gives bit for bit the result of an
/// aggregator that never saw it.
#[test]
fn non_finite_client_is_rejected_and_leaves_state_untouched() {
    let mut rng = Rng::new(9);
    for (rows, cols, role) in SHAPES {
        let layout = Layout::new(rows, cols, role);
        let len = rows * cols;
        for c in all_configs() {
            let data = random_clients(&mut rng, len, 3);
            let g = rng.normal_vec(len, 1.0);
            let gv = TensorView::F32(&g);
            let good = views(&data);
            let what = describe(&c, rows, cols, role);
            for bad_value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut bad = rng.normal_vec(len, 1.0);
                bad[rng.below(len)] = bad_value;
                let bad_id = 77u32;
                let bad_view = TensorView::F32(&bad);

                // Clean run.
                let (want, _, _) = stream_in_order(c, layout, gv, &good).unwrap();

                // Bad client in pass 1, between good ones.
                let mut ws = vec![f32::NAN; StreamingFedCdd::workspace_len(&c, &layout)];
                let mut agg = StreamingFedCdd::new(c, layout, gv, &mut ws).unwrap();
                agg.pass1(good[0].id, good[0].n, good[0].x).unwrap();
                let e = agg.pass1(bad_id, 5.0, bad_view).unwrap_err();
                assert_eq!(e.kind, ErrorKind::NonFinite, "{what}: {e:?}");
                assert_eq!(e.client, Some(bad_id), "{what}: {e:?}");
                for cl in &good[1..] {
                    agg.pass1(cl.id, cl.n, cl.x).unwrap();
                }
                for cl in &good {
                    agg.pass2(cl.id, cl.n, cl.x).unwrap();
                }
                let mut out = vec![0.0f32; len];
                agg.finish(&mut out).unwrap();
                let same = out
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{what}: rejected client changed the result");

                // Bad data in pass 2 (same client id and weight as in pass 1).
                let mut ws = vec![f32::NAN; StreamingFedCdd::workspace_len(&c, &layout)];
                let mut agg = StreamingFedCdd::new(c, layout, gv, &mut ws).unwrap();
                for cl in &good {
                    agg.pass1(cl.id, cl.n, cl.x).unwrap();
                }
                let e = agg.pass2(good[1].id, good[1].n, bad_view).unwrap_err();
                assert_eq!(e.kind, ErrorKind::NonFinite, "{what}: {e:?}");
                assert_eq!(e.client, Some(good[1].id), "{what}: {e:?}");

                // Batch.
                let mut with_bad = good.clone();
                with_bad.insert(
                    1,
                    Client {
                        id: bad_id,
                        n: 5.0,
                        x: bad_view,
                    },
                );
                let e = batch(c, layout, gv, &with_bad).unwrap_err();
                assert_eq!(e.kind, ErrorKind::NonFinite, "{what}: {e:?}");
                assert_eq!(e.client, Some(bad_id), "{what}: {e:?}");
            }
        }
    }
}

#[test]
fn non_finite_half_precision_client_is_rejected() {
    let layout = Layout::new(4, 4, TensorRole::Other);
    let g = [0.5f32; 16];
    let mut x16 = vec![f16::from_f32(0.25); 16];
    x16[7] = f16::INFINITY;
    let mut xb = vec![bf16::from_f32(0.25); 16];
    xb[3] = bf16::NAN;
    for x in [TensorView::F16(&x16), TensorView::BF16(&xb)] {
        let c = FedCddConfig::default();
        let mut ws = vec![0.0f32; StreamingFedCdd::workspace_len(&c, &layout)];
        let mut agg = StreamingFedCdd::new(c, layout, TensorView::F32(&g), &mut ws).unwrap();
        let e = agg.pass1(4, 1.0, x).unwrap_err();
        assert_eq!((e.kind, e.client), (ErrorKind::NonFinite, Some(4)));
    }
}

/// Finite values whose squares overflow f32 are rejected as `Overflow`, naming the client.
#[test]
fn overflowing_client_is_rejected() {
    let layout = Layout::new(2, 3, TensorRole::Other);
    let g = [0.0f32; 6];
    let x = [1e20f32, 1.0, 2.0, 3e20, 1.0, 1.0];
    let c = FedCddConfig::default();
    let mut ws = vec![0.0f32; StreamingFedCdd::workspace_len(&c, &layout)];
    let mut agg = StreamingFedCdd::new(c, layout, TensorView::F32(&g), &mut ws).unwrap();
    let e = agg.pass1(9, 1.0, TensorView::F32(&x)).unwrap_err();
    assert_eq!((e.kind, e.client), (ErrorKind::Overflow, Some(9)));
    let e = batch(
        c,
        layout,
        TensorView::F32(&g),
        &[Client {
            id: 9,
            n: 1.0,
            x: TensorView::F32(&x),
        }],
    )
    .unwrap_err();
    assert_eq!((e.kind, e.client), (ErrorKind::Overflow, Some(9)));
}

#[test]
fn wrong_length_is_shape_mismatch() {
    let layout = Layout::new(3, 4, TensorRole::Other);
    let g = [0.0f32; 12];
    let short = [1.0f32; 11];
    let good = [1.0f32; 12];
    for c in all_configs() {
        let mut ws = vec![0.0f32; StreamingFedCdd::workspace_len(&c, &layout)];
        let mut agg = StreamingFedCdd::new(c, layout, TensorView::F32(&g), &mut ws).unwrap();
        let e = agg.pass1(3, 1.0, TensorView::F32(&short)).unwrap_err();
        assert_eq!(
            e.kind,
            ErrorKind::ShapeMismatch {
                expected: 12,
                found: 11
            }
        );
        assert_eq!(e.client, Some(3));
        agg.pass1(4, 1.0, TensorView::F32(&good)).unwrap();
        let e = agg.pass2(3, 1.0, TensorView::F32(&short)).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::ShapeMismatch { .. }) && e.client == Some(3));

        let e = batch(
            c,
            layout,
            TensorView::F32(&g),
            &[
                Client {
                    id: 1,
                    n: 1.0,
                    x: TensorView::F32(&good),
                },
                Client {
                    id: 2,
                    n: 1.0,
                    x: TensorView::F32(&short),
                },
            ],
        )
        .unwrap_err();
        assert!(matches!(e.kind, ErrorKind::ShapeMismatch { .. }) && e.client == Some(2));

        // A global of the wrong length, an output of the wrong length.
        let mut ws = vec![0.0f32; StreamingFedCdd::workspace_len(&c, &layout)];
        let e = StreamingFedCdd::new(c, layout, TensorView::F32(&short), &mut ws)
            .err()
            .unwrap();
        assert!(matches!(e.kind, ErrorKind::ShapeMismatch { .. }));
        let mut ws = vec![0.0f32; StreamingFedCdd::workspace_len(&c, &layout)];
        let mut agg = StreamingFedCdd::new(c, layout, TensorView::F32(&g), &mut ws).unwrap();
        agg.pass1(1, 1.0, TensorView::F32(&good)).unwrap();
        agg.pass2(1, 1.0, TensorView::F32(&good)).unwrap();
        let mut out = [0.0f32; 11];
        let e = agg.finish(&mut out).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::ShapeMismatch { .. }));
    }
}

#[test]
fn zero_clients_is_no_clients() {
    let layout = Layout::new(2, 2, TensorRole::Other);
    let g = [0.0f32; 4];
    let x = [1.0f32; 4];
    for c in all_configs() {
        let mut ws = vec![0.0f32; StreamingFedCdd::workspace_len(&c, &layout)];
        let agg = StreamingFedCdd::new(c, layout, TensorView::F32(&g), &mut ws).unwrap();
        let mut out = [0.0f32; 4];
        assert_eq!(agg.finish(&mut out).unwrap_err().kind, ErrorKind::NoClients);

        let mut ws = vec![0.0f32; StreamingFedCdd::workspace_len(&c, &layout)];
        let mut agg = StreamingFedCdd::new(c, layout, TensorView::F32(&g), &mut ws).unwrap();
        let e = agg.pass2(1, 1.0, TensorView::F32(&x)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NoClients);

        let e = batch(c, layout, TensorView::F32(&g), &[]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NoClients);
    }
}

#[test]
fn pass_mismatch_is_detected() {
    let mut rng = Rng::new(10);
    let layout = Layout::new(4, 6, TensorRole::Other);
    let data = random_clients(&mut rng, 24, 3);
    let g = rng.normal_vec(24, 1.0);
    let cl = views(&data);
    for c in all_configs() {
        let run = |pass2: &[(usize, f32)]| {
            let mut ws = vec![0.0f32; StreamingFedCdd::workspace_len(&c, &layout)];
            let mut agg = StreamingFedCdd::new(c, layout, TensorView::F32(&g), &mut ws).unwrap();
            for x in &cl {
                agg.pass1(x.id, x.n, x.x).unwrap();
            }
            for &(i, n) in pass2 {
                agg.pass2(cl[i].id, n, cl[i].x).unwrap();
            }
            let mut out = vec![0.0f32; 24];
            agg.finish(&mut out)
        };
        // The honest run works.
        run(&[(0, cl[0].n), (1, cl[1].n), (2, cl[2].n)]).unwrap();
        // A different weight in pass 2.
        let e = run(&[(0, cl[0].n), (1, cl[1].n * 2.0), (2, cl[2].n)]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PassMismatch, "{c:?}");
        // A client missing from pass 2.
        let e = run(&[(0, cl[0].n), (2, cl[2].n)]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PassMismatch, "{c:?}");
        // A client twice in pass 2.
        let e = run(&[(0, cl[0].n), (1, cl[1].n), (2, cl[2].n), (2, cl[2].n)]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PassMismatch, "{c:?}");
        // Pass 2 never ran.
        let e = run(&[]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PassMismatch, "{c:?}");
    }
}

#[test]
fn pass1_after_pass2_is_a_protocol_error() {
    let layout = Layout::new(2, 2, TensorRole::Other);
    let g = [0.0f32; 4];
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let c = FedCddConfig::default();
    let mut ws = vec![0.0f32; StreamingFedCdd::workspace_len(&c, &layout)];
    let mut agg = StreamingFedCdd::new(c, layout, TensorView::F32(&g), &mut ws).unwrap();
    agg.pass1(1, 1.0, TensorView::F32(&x)).unwrap();
    agg.pass2(1, 1.0, TensorView::F32(&x)).unwrap();
    let e = agg.pass1(2, 1.0, TensorView::F32(&x)).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Protocol(_)), "{e:?}");
    // The aggregation itself is still usable.
    let mut out = [0.0f32; 4];
    agg.finish(&mut out).unwrap();
    assert_slice_close("N = 1 result", &out, &to_f64(&x), 1e-6);
}

#[test]
fn workspace_too_small_and_bound() {
    for (rows, cols, role) in SHAPES {
        let layout = Layout::new(rows, cols, role);
        let g = vec![0.0f32; rows * cols];
        for c in all_configs() {
            let need = StreamingFedCdd::workspace_len(&c, &layout);
            let groups = if ref_groups_by_row(c.norm_axis, role) {
                rows
            } else {
                cols
            };
            // One-part ablations keep FedAvg's mean too: P more.
            let extra = usize::from(c.components != Components::Both) * rows * cols;
            assert!(
                need <= 5 * rows * cols + 3 * groups + extra,
                "{}: workspace {need} over the documented 5P + 3G",
                describe(&c, rows, cols, role)
            );
            let mut ws = vec![0.0f32; need - 1];
            let e = StreamingFedCdd::new(c, layout, TensorView::F32(&g), &mut ws)
                .err()
                .unwrap();
            assert_eq!(e.kind, ErrorKind::BufferTooSmall { needed: need });
            let mut ws = vec![0.0f32; need];
            assert!(StreamingFedCdd::new(c, layout, TensorView::F32(&g), &mut ws).is_ok());
        }
    }
}

#[test]
fn bad_weights_and_configs_are_rejected() {
    let layout = Layout::new(2, 2, TensorRole::Other);
    let g = [0.0f32; 4];
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let c = FedCddConfig::default();
    for n in [-1.0f32, f32::NAN, f32::INFINITY] {
        let mut ws = vec![0.0f32; StreamingFedCdd::workspace_len(&c, &layout)];
        let mut agg = StreamingFedCdd::new(c, layout, TensorView::F32(&g), &mut ws).unwrap();
        let e = agg.pass1(6, n, TensorView::F32(&x)).unwrap_err();
        assert_eq!(
            (e.kind, e.client),
            (ErrorKind::BadWeight, Some(6)),
            "n = {n}"
        );
        let e = batch(
            c,
            layout,
            TensorView::F32(&g),
            &[Client {
                id: 6,
                n,
                x: TensorView::F32(&x),
            }],
        )
        .unwrap_err();
        assert_eq!(
            (e.kind, e.client),
            (ErrorKind::BadWeight, Some(6)),
            "n = {n}"
        );
    }
    // All weights zero.
    let mut ws = vec![0.0f32; StreamingFedCdd::workspace_len(&c, &layout)];
    let mut agg = StreamingFedCdd::new(c, layout, TensorView::F32(&g), &mut ws).unwrap();
    agg.pass1(1, 0.0, TensorView::F32(&x)).unwrap();
    agg.pass2(1, 0.0, TensorView::F32(&x)).unwrap();
    let mut out = [0.0f32; 4];
    assert_eq!(agg.finish(&mut out).unwrap_err().kind, ErrorKind::BadWeight);

    // Configurations.
    let bad = [
        FedCddConfig {
            weighting: Weighting::Softmax { tau: 0.0 },
            ..c
        },
        FedCddConfig {
            weighting: Weighting::Softmax { tau: -1.0 },
            ..c
        },
        FedCddConfig {
            weighting: Weighting::Softmax { tau: f32::NAN },
            ..c
        },
        FedCddConfig {
            server_lr: f32::NAN,
            ..c
        },
        FedCddConfig {
            server_lr: f32::INFINITY,
            ..c
        },
    ];
    for b in bad {
        let mut ws = vec![0.0f32; StreamingFedCdd::workspace_len(&b, &layout)];
        let e = StreamingFedCdd::new(b, layout, TensorView::F32(&g), &mut ws)
            .err()
            .unwrap();
        assert!(matches!(e.kind, ErrorKind::BadConfig(_)), "{b:?}: {e:?}");
        let e = batch(
            b,
            layout,
            TensorView::F32(&g),
            &[Client {
                id: 1,
                n: 1.0,
                x: TensorView::F32(&x),
            }],
        )
        .unwrap_err();
        assert!(matches!(e.kind, ErrorKind::BadConfig(_)), "{b:?}: {e:?}");
    }
    // A non-finite global with the `weights` target.
    let gbad = [0.0f32, f32::NAN, 0.0, 0.0];
    let w = FedCddConfig {
        target: Target::Weights,
        ..c
    };
    let mut ws = vec![0.0f32; StreamingFedCdd::workspace_len(&w, &layout)];
    let e = StreamingFedCdd::new(w, layout, TensorView::F32(&gbad), &mut ws)
        .err()
        .unwrap();
    assert_eq!(e.kind, ErrorKind::NonFinite);
}

// ---------------------------------------------------------------------------------------------
// Numerical corner cases of the spec's rule
// ---------------------------------------------------------------------------------------------

/// A 1-D tensor (`[8]`, one element per column group under the default column axis), two
/// clients with equal sample counts. Where their signs differ, the exact rule gives
/// D̄_j = ½(+1) + ½(−1) = 0, so D̂_j = 0 and the element must stay at G (no update); where
/// they agree, D̂_j = ±1 and the step is m̄_j·sign = ½(|a_j| + |b_j|)·sign.
/// v₁ = v₂ = (5 − 3)/8 = ¼ > 0, so w = p = (½, ½).
#[test]
fn opposing_single_element_groups_cancel() {
    let layout = Layout::from_dims(&[8], TensorRole::Other).unwrap();
    let g = [0.25f32, -1.0, 2.0, 0.0, 1.5, -0.5, 3.0, 1.0];
    let a = [1.3f32, -0.7, 2.9, 0.41, -3.3, 1.1, 0.37, 5.0];
    let b = [0.9f32, 0.45, 1.7, -2.2, -1.9, 0.8, -0.59, 3.1];
    let want: Vec<f64> = (0..8)
        .map(|j| {
            let (x, y) = (a[j] as f64, b[j] as f64);
            if x.signum() != y.signum() {
                g[j] as f64
            } else {
                g[j] as f64 + 0.5 * (x.abs() + y.abs()) * x.signum()
            }
        })
        .collect();
    let data = vec![(100.0f32, a.to_vec()), (100.0f32, b.to_vec())];
    let reference = ref_fedcdd(
        &FedCddConfig::default(),
        1,
        8,
        TensorRole::Other,
        &to_f64(&g),
        &ref_clients(&data),
    );
    assert_slice_close_abs("reference", &reference.out, &want, 1e-6);
    let clients = views(&data);
    let c = FedCddConfig::default();
    let (out_s, _, _) = stream_in_order(c, layout, TensorView::F32(&g), &clients).unwrap();
    let (out_b, _) = batch(c, layout, TensorView::F32(&g), &clients).unwrap();
    assert_slice_close_abs("batch", &to_f64(&out_b), &want, 1e-5);
    assert_slice_close_abs("streaming", &to_f64(&out_s), &want, 1e-5);
}

fn assert_slice_close_abs(what: &str, got: &[f64], want: &[f64], tol: f64) {
    for (j, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "{what}[{j}]: got {g}, want {w}\n  got  {got:?}\n  want {want:?}"
        );
    }
}

/// `softmax:τ` is `w_i ∝ p_i·exp(v_i/τ)`. Independent high-dimensional updates have
/// agreements near 0 (here |v| ≲ 0.1), where a small temperature still gives a
/// well-defined, sharp weighting.
#[test]
fn softmax_small_temperature_matches_exact_softmax() {
    let mut rng = Rng::new(11);
    let (rows, cols) = (8, 64);
    let layout = Layout::new(rows, cols, TensorRole::LoraA);
    let mut failures = Vec::new();
    for tau in [0.02f32, 0.01, 0.005] {
        let data: Vec<(f32, Vec<f32>)> = (0..4)
            .map(|_| {
                (
                    (1 + rng.below(100)) as f32,
                    rng.normal_vec(rows * cols, 1.0),
                )
            })
            .collect();
        let g = rng.normal_vec(rows * cols, 1.0);
        let g64 = to_f64(&g);
        let c = FedCddConfig {
            weighting: Weighting::Softmax { tau },
            ..FedCddConfig::default()
        };
        let reference = ref_fedcdd(&c, rows, cols, TensorRole::LoraA, &g64, &ref_clients(&data));
        let ref_step = sub(&reference.out, &g64);
        let clients = views(&data);
        let what = format!(
            "tau {tau}: v = {:?}, exact weights {:?}",
            reference.agreement, reference.weights
        );
        match stream_in_order(c, layout, TensorView::F32(&g), &clients) {
            Ok((out, s, _)) => {
                let e = rel_err(&step_of(&out, &g64), &ref_step);
                if bad(e, 1e-4) || s.fell_back {
                    failures.push(format!(
                        "{what}: streaming rel err {e:.3e}, fell back {}",
                        s.fell_back
                    ));
                }
            }
            Err(e) => failures.push(format!("{what}: streaming failed: {e:?}")),
        }
        match batch(c, layout, TensorView::F32(&g), &clients) {
            Ok((out, r)) => {
                let e = rel_err(&step_of(&out, &g64), &ref_step);
                let dw: f64 = r
                    .weights
                    .iter()
                    .zip(&reference.weights)
                    .map(|(a, b)| (*a as f64 - b).abs())
                    .fold(0.0, f64::max);
                if bad(e, 1e-4) || bad(dw, 1e-4) || r.fell_back {
                    failures.push(format!(
                        "{what}: batch weights {:?}, fell back {}, rel err {e:.3e}",
                        r.weights, r.fell_back
                    ));
                }
            }
            Err(e) => failures.push(format!("{what}: batch failed: {e:?}")),
        }
    }
    finish_failures(&failures);
}

/// Clients whose updates touch disjoint column sets (what top-K column sparsification, i.e.
/// the mask with η = 0, produces when clients keep different columns) are exactly orthogonal:
/// every `v_i = 0`, so `Σ p_i max(v_i, 0) = 0 < ε` and the weights fall back to `p_i`. Each
/// column then holds one client's direction, D̂_g = D_i,g and m̄_g = p_i m_i,g: the result is
/// exactly FedAvg, `G + Σ p_i Δ_i`.
#[test]
fn orthogonal_updates_fall_back_to_sample_weights() {
    let mut rng = Rng::new(12);
    let mut failures = Vec::new();
    for trial in 0..20 {
        let (rows, cols) = (8, 12);
        let layout = Layout::new(rows, cols, TensorRole::Other);
        let nc = 3;
        let data: Vec<(f32, Vec<f32>)> = (0..nc)
            .map(|i| {
                let x = (0..rows * cols)
                    .map(|e| {
                        let col = e % cols;
                        if col / 4 == i {
                            rng.normal() as f32
                        } else {
                            0.0
                        }
                    })
                    .collect();
                ((1 + rng.below(100)) as f32, x)
            })
            .collect();
        let g = rng.normal_vec(rows * cols, 1.0);
        let g64 = to_f64(&g);
        let fedavg = ref_weighted_mean(&ref_clients(&data));
        for weighting in [Weighting::PRelu, Weighting::Relu] {
            let c = FedCddConfig {
                weighting,
                ..FedCddConfig::default()
            };
            let reference =
                ref_fedcdd(&c, rows, cols, TensorRole::Other, &g64, &ref_clients(&data));
            assert!(reference.fell_back);
            assert!(rel_err(&sub(&reference.out, &g64), &fedavg) < 1e-12);
            let clients = views(&data);
            let (out_s, s, agr) =
                stream_in_order(c, layout, TensorView::F32(&g), &clients).unwrap();
            let (out_b, r) = batch(c, layout, TensorView::F32(&g), &clients).unwrap();
            let es = rel_err(&step_of(&out_s, &g64), &fedavg);
            let eb = rel_err(&step_of(&out_b, &g64), &fedavg);
            if bad(es, 1e-5) || bad(eb, 1e-5) || !s.fell_back || !r.fell_back {
                let v: Vec<f32> = agr.iter().map(|a| a.1.v).collect();
                failures.push(format!(
                    "trial {trial} {weighting:?}: streaming v = {v:?}, fell back {}, rel err \
                     {es:.3e}; batch v = {:?}, fell back {}, rel err {eb:.3e}",
                    s.fell_back, r.agreement, r.fell_back
                ));
            }
        }
    }
    finish_failures(&failures);
}
