//! The baselines' server rules (FedAvg, FedAvgM, FedAdagrad, FedYogi, FedAdam, Reddi and
//! OpenFedLLM readings), `MeanAccumulator`, SCAFFOLD and FedProx helpers and the algorithm
//! table, on hand-checked numbers and against the f64 reference over several rounds.

mod common;

use common::*;
use fedcdd_core::{
    Algorithm, ClientView, ErrorKind, FedOptVariant, MeanAccumulator, ServerOpt, ServerOptConfig,
    ServerState, TensorRole, TensorView, apply_server_opt, bf16, f16, fedprox_gradient,
    init_server_state, scaffold_client_control, scaffold_correct_gradient, scaffold_server_update,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A server optimiser with its own state buffers.
struct Server {
    cfg: ServerOptConfig,
    m: Vec<f32>,
    v: Vec<f32>,
    steps: u64,
}

impl Server {
    fn new(cfg: ServerOptConfig, len: usize) -> Server {
        let mut m = vec![f32::NAN; len];
        let mut v = vec![f32::NAN; len];
        init_server_state(&cfg, &mut m, &mut v);
        Server {
            cfg,
            m,
            v,
            steps: 0,
        }
    }

    fn step(&mut self, global: &[f32], mean_delta: &[f32]) -> Vec<f32> {
        let mut out = vec![f32::NAN; global.len()];
        let mut st = ServerState {
            m: &mut self.m,
            v: &mut self.v,
            steps: self.steps,
        };
        apply_server_opt(
            &self.cfg,
            &mut st,
            TensorView::F32(global),
            mean_delta,
            &mut out,
        )
        .unwrap();
        self.steps = st.steps;
        out
    }
}

fn config(
    rule: ServerOpt,
    variant: FedOptVariant,
    lr: f32,
    b1: f32,
    b2: f32,
    tau: f32,
) -> ServerOptConfig {
    ServerOptConfig {
        rule,
        server_lr: lr,
        beta1: b1,
        beta2: b2,
        tau,
        variant,
    }
}

/// The weighted mean of client updates through `MeanAccumulator`, weights from the config.
fn mean_of(cfg: &ServerOptConfig, clients: &[(f32, &[f32])]) -> Vec<f32> {
    let len = clients[0].1.len();
    let mut acc_buf = vec![f32::NAN; MeanAccumulator::buffer_len(len)];
    let mut acc = MeanAccumulator::new(len, &mut acc_buf).unwrap();
    for (i, (n, x)) in clients.iter().enumerate() {
        acc.add(i as u32, cfg.client_weight(*n), TensorView::F32(x))
            .unwrap();
    }
    let mut out = vec![f32::NAN; len];
    acc.mean_into(&mut out).unwrap();
    out
}

const ALL_RULES: [ServerOpt; 5] = [
    ServerOpt::FedAvg,
    ServerOpt::FedAvgM,
    ServerOpt::FedAdagrad,
    ServerOpt::FedYogi,
    ServerOpt::FedAdam,
];

// Two clients with n = (1, 3) and 3 elements:
//   a = [4, 12, 8], b = [4, −4, −8]
//   sample-weighted mean  (1·a + 3·b)/4 = ([4,12,8] + [12,−12,−24])/4 = [4, 0, −4]
//   uniform mean          (a + b)/2     = [4, 4, 0]
const A: [f32; 3] = [4.0, 12.0, 8.0];
const B: [f32; 3] = [4.0, -4.0, -8.0];
const G0: [f32; 3] = [1.0, 2.0, 3.0];

// ---------------------------------------------------------------------------------------------
// MeanAccumulator
// ---------------------------------------------------------------------------------------------

#[test]
fn mean_accumulator_weights_and_rejections() {
    let mut buf = [f32::NAN; 6];
    let mut acc = MeanAccumulator::new(3, &mut buf).unwrap();
    acc.add(0, 1.0, TensorView::F32(&A)).unwrap();
    // Rejected clients leave the sum as it was, and name themselves.
    let e = acc
        .add(7, 1.0, TensorView::F32(&[1.0, f32::NAN, 0.0]))
        .unwrap_err();
    assert_eq!((e.kind, e.client), (ErrorKind::NonFinite, Some(7)));
    let e = acc
        .add(8, 1.0, TensorView::F32(&[1.0, f32::INFINITY, 0.0]))
        .unwrap_err();
    assert_eq!((e.kind, e.client), (ErrorKind::NonFinite, Some(8)));
    let e = acc.add(9, 1.0, TensorView::F32(&[1.0, 2.0])).unwrap_err();
    assert_eq!(
        (e.kind, e.client),
        (
            ErrorKind::ShapeMismatch {
                expected: 3,
                found: 2
            },
            Some(9)
        )
    );
    for w in [-1.0f32, f32::NAN, f32::INFINITY] {
        let e = acc.add(10, w, TensorView::F32(&B)).unwrap_err();
        assert_eq!((e.kind, e.client), (ErrorKind::BadWeight, Some(10)));
    }
    // f16 / bf16 inputs are widened exactly (these values are representable).
    let b16: Vec<f16> = B.iter().map(|&v| f16::from_f32(v)).collect();
    acc.add(1, 3.0, TensorView::F16(&b16)).unwrap();
    assert_eq!(acc.count(), 2);
    let mut out = [0.0f32; 3];
    acc.mean_into(&mut out).unwrap();
    assert_eq!(out, [4.0, 0.0, -4.0]);

    let mut buf = [f32::NAN; 6];
    let mut acc = MeanAccumulator::new(3, &mut buf).unwrap();
    let bb: Vec<bf16> = A.iter().map(|&v| bf16::from_f32(v)).collect();
    acc.add(0, 1.0, TensorView::BF16(&bb)).unwrap();
    acc.add(1, 1.0, TensorView::F32(&B)).unwrap();
    let mut out = [0.0f32; 3];
    acc.mean_into(&mut out).unwrap();
    assert_eq!(out, [4.0, 4.0, 0.0]);
    let mut short = [0.0f32; 2];
    assert!(matches!(
        acc.mean_into(&mut short).unwrap_err().kind,
        ErrorKind::ShapeMismatch { .. }
    ));

    // Empty and zero-weight accumulators.
    let mut buf = [f32::NAN; 6];
    let acc = MeanAccumulator::new(3, &mut buf).unwrap();
    assert_eq!(
        acc.mean_into(&mut out).unwrap_err().kind,
        ErrorKind::NoClients
    );
    let mut buf = [f32::NAN; 6];
    let mut acc = MeanAccumulator::new(3, &mut buf).unwrap();
    acc.add(0, 0.0, TensorView::F32(&A)).unwrap();
    assert_eq!(
        acc.mean_into(&mut out).unwrap_err().kind,
        ErrorKind::BadWeight
    );
}

/// `add_group` (fused, `GROUP` clients per sweep) gives bit-identical sums to `add` one by one,
/// for any group size and element type mix.
#[test]
fn mean_accumulator_groups_equal_one_by_one() {
    let mut rng = Rng::new(30);
    for trial in 0..40 {
        let len = 1 + rng.below(70);
        let nc = 1 + rng.below(11);
        let data: Vec<(f32, Vec<f32>)> = (0..nc)
            .map(|_| ((1 + rng.below(100)) as f32, rng.normal_vec(len, 1.0)))
            .collect();
        let h16: Vec<Vec<f16>> = data
            .iter()
            .map(|(_, x)| x.iter().map(|&v| f16::from_f32(v)).collect())
            .collect();
        let hb: Vec<Vec<bf16>> = data
            .iter()
            .map(|(_, x)| x.iter().map(|&v| bf16::from_f32(v)).collect())
            .collect();
        // Element type per client: all f32, or a random mix.
        let mixed = trial % 2 == 1;
        let kinds: Vec<usize> = (0..nc)
            .map(|_| if mixed { rng.below(3) } else { 0 })
            .collect();
        let view = |i: usize| match kinds[i] {
            0 => TensorView::F32(&data[i].1),
            1 => TensorView::F16(&h16[i]),
            _ => TensorView::BF16(&hb[i]),
        };
        let clients: Vec<ClientView<'_>> = (0..nc)
            .map(|i| ClientView {
                id: i as u32,
                weight: data[i].0,
                values: view(i),
            })
            .collect();
        let mut b1 = vec![f32::NAN; MeanAccumulator::buffer_len(len)];
        let mut one = MeanAccumulator::new(len, &mut b1).unwrap();
        for c in &clients {
            one.add(c.id, c.weight, c.values).unwrap();
        }
        let mut b2 = vec![f32::NAN; MeanAccumulator::buffer_len(len)];
        let mut grouped = MeanAccumulator::new(len, &mut b2).unwrap();
        grouped.add_group(&clients).unwrap();
        assert_eq!(one.count(), nc);
        assert_eq!(grouped.count(), nc);
        let same = one
            .sum()
            .iter()
            .zip(grouped.sum())
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "trial {trial}: grouped sum differs from one-by-one sum"
        );
        // And the mean is the weighted mean (f64 reference on the stored values).
        let reference: Vec<(f64, Vec<f64>)> = (0..nc)
            .map(|i| {
                let v = view(i);
                (
                    data[i].0 as f64,
                    (0..len).map(|e| v.get(e) as f64).collect(),
                )
            })
            .collect();
        let mut out = vec![0.0f32; len];
        grouped.mean_into(&mut out).unwrap();
        let e = rel_err_32(&out, &ref_weighted_mean(&reference));
        assert!(e < 1e-6, "trial {trial}: mean rel err {e:.3e}");
    }
}

/// `add_group`'s error contract: on an error naming client k, the clients before k were
/// added and k and those after it were not, whatever makes k fail (NaN, bad weight, wrong
/// length) and whatever the element types of the group.
#[test]
fn mean_accumulator_group_error_contract() {
    let good: [[f32; 3]; 6] = [
        [1.0, 2.0, 3.0],
        [4.0, 5.0, 6.0],
        [7.0, 8.0, 9.0],
        [1.5, 2.5, 3.5],
        [0.5, 0.25, 0.125],
        [2.0, 4.0, 8.0],
    ];
    let nan = [1.0f32, f32::NAN, 0.0];
    let nan16 = [f16::from_f32(1.0), f16::NAN, f16::from_f32(0.0)];
    let inf_b = [bf16::from_f32(1.0), bf16::INFINITY, bf16::from_f32(0.0)];
    let short = [1.0f32, 2.0];
    let good16: Vec<Vec<f16>> = good
        .iter()
        .map(|x| x.iter().map(|&v| f16::from_f32(v)).collect())
        .collect();
    // (bad client's values, its weight, expected kind)
    let bad_cases: [(TensorView<'_>, f32, ErrorKind); 5] = [
        (TensorView::F32(&nan), 1.0, ErrorKind::NonFinite),
        (TensorView::F16(&nan16), 1.0, ErrorKind::NonFinite),
        (TensorView::BF16(&inf_b), 1.0, ErrorKind::NonFinite),
        (TensorView::F32(&good[0]), -1.0, ErrorKind::BadWeight),
        (
            TensorView::F32(&short),
            1.0,
            ErrorKind::ShapeMismatch {
                expected: 3,
                found: 2,
            },
        ),
    ];
    let mut failures = Vec::new();
    for (case, (bad_view, bad_w, kind)) in bad_cases.iter().enumerate() {
        for k in 0..6 {
            for mix in [false, true] {
                // Clients 0..6, client k replaced by the bad one; with `mix`, odd clients f16.
                let clients: Vec<ClientView<'_>> = (0..6)
                    .map(|i| {
                        if i == k {
                            ClientView {
                                id: 100 + i as u32,
                                weight: *bad_w,
                                values: *bad_view,
                            }
                        } else {
                            ClientView {
                                id: 100 + i as u32,
                                weight: (i + 1) as f32,
                                values: if mix && i % 2 == 1 {
                                    TensorView::F16(&good16[i])
                                } else {
                                    TensorView::F32(&good[i])
                                },
                            }
                        }
                    })
                    .collect();
                let mut buf = [f32::NAN; 6];
                let mut acc = MeanAccumulator::new(3, &mut buf).unwrap();
                let e = acc.add_group(&clients).unwrap_err();
                let what = format!("case {case}, bad client {k}, mixed types {mix}");
                if (e.kind, e.client) != (*kind, Some(100 + k as u32)) {
                    failures.push(format!("{what}: error {e:?}"));
                }
                // Expected: exactly clients 0..k, added one by one.
                let mut buf2 = [f32::NAN; 6];
                let mut want = MeanAccumulator::new(3, &mut buf2).unwrap();
                for c in &clients[..k] {
                    want.add(c.id, c.weight, c.values).unwrap();
                }
                if acc.count() != k || acc.sum() != want.sum() {
                    failures.push(format!(
                        "{what}: count {} (want {k}), sum {:?} (want {:?})",
                        acc.count(),
                        acc.sum(),
                        want.sum()
                    ));
                }
            }
        }
    }
    finish(&failures);
}

#[test]
fn mean_accumulator_buffer_too_small() {
    assert_eq!(MeanAccumulator::buffer_len(5), 10);
    let mut buf = [0.0f32; 9];
    let e = MeanAccumulator::new(5, &mut buf).err().unwrap();
    assert_eq!(e.kind, ErrorKind::BufferTooSmall { needed: 10 });
}

// ---------------------------------------------------------------------------------------------
// Hand-checked server rules, Reddi reading (two rounds each)
// ---------------------------------------------------------------------------------------------

/// FedAvg, λ = 1: G + Δ̄ = [1,2,3] + [4,0,−4] = [5, 2, −1].
/// Round 2 with λ = 0.5 and Δ̄ = [2, 2, 2]: [6, 3, 0].
#[test]
fn fedavg_hand_checked() {
    let cfg = ServerOptConfig::defaults(ServerOpt::FedAvg);
    assert_eq!(cfg.server_lr, 1.0);
    assert_eq!(cfg.state_slots(), (false, false));
    let mean = mean_of(&cfg, &[(1.0, &A), (3.0, &B)]);
    assert_eq!(mean, [4.0, 0.0, -4.0]);
    // FedAvg keeps no state: empty state slices are fine.
    let mut out = [0.0f32; 3];
    let mut st = ServerState {
        m: &mut [],
        v: &mut [],
        steps: 0,
    };
    apply_server_opt(&cfg, &mut st, TensorView::F32(&G0), &mean, &mut out).unwrap();
    assert_eq!(out, [5.0, 2.0, -1.0]);
    assert_eq!(st.steps, 1);
    let cfg = ServerOptConfig {
        server_lr: 0.5,
        ..cfg
    };
    let g1 = out;
    apply_server_opt(
        &cfg,
        &mut st,
        TensorView::F32(&g1),
        &[2.0, 2.0, 2.0],
        &mut out,
    )
    .unwrap();
    assert_eq!(out, [6.0, 3.0, 0.0]);
    assert_eq!(st.steps, 2);
}

/// FedAvgM, β = 0.5, λ = 2, m₀ = 0.
/// Round 1: Δ̄ = [4, 0, −4]: m = [4, 0, −4]; G = [1,2,3] + 2·m = [9, 2, −5].
/// Round 2: Δ̄ = [2, 2, 2]: m = 0.5·[4,0,−4] + [2,2,2] = [4, 2, 0]; G = [9,2,−5] + 2·m = [17, 6, −5].
#[test]
fn fedavgm_hand_checked() {
    let cfg = config(
        ServerOpt::FedAvgM,
        FedOptVariant::Reddi,
        2.0,
        0.5,
        0.99,
        1e-3,
    );
    assert_eq!(cfg.state_slots(), (true, false));
    let mut s = Server::new(cfg, 3);
    let g1 = s.step(&G0, &mean_of(&cfg, &[(1.0, &A), (3.0, &B)]));
    assert_eq!(g1, [9.0, 2.0, -5.0]);
    assert_eq!(s.m, [4.0, 0.0, -4.0]);
    let g2 = s.step(&g1, &[2.0, 2.0, 2.0]);
    assert_eq!(g2, [17.0, 6.0, -5.0]);
    assert_eq!(s.m, [4.0, 2.0, 0.0]);
    assert_eq!(s.steps, 2);
}

/// FedAdagrad, η = 1, τ = 3: v₀ = τ² = 9.
/// Round 1: Δ̄ = [4, 0, −4]: v = [25, 9, 25]; G += Δ̄/(√v + 3) = [4/8, 0, −4/8] → [1.5, 2, 2.5].
/// Round 2: Δ̄ = [12, 4, −12]: v = [169, 25, 169]; G += [12/16, 4/8, −12/16] → [2.25, 2.5, 1.75].
#[test]
fn fedadagrad_hand_checked() {
    let cfg = config(
        ServerOpt::FedAdagrad,
        FedOptVariant::Reddi,
        1.0,
        0.9,
        0.99,
        3.0,
    );
    assert_eq!(cfg.state_slots(), (false, true));
    let mut s = Server::new(cfg, 3);
    assert_eq!(s.v, [9.0, 9.0, 9.0]);
    let g1 = s.step(&G0, &mean_of(&cfg, &[(1.0, &A), (3.0, &B)]));
    assert_eq!(g1, [1.5, 2.0, 2.5]);
    assert_eq!(s.v, [25.0, 9.0, 25.0]);
    let g2 = s.step(&g1, &[12.0, 4.0, -12.0]);
    assert_eq!(g2, [2.25, 2.5, 1.75]);
    assert_eq!(s.v, [169.0, 25.0, 169.0]);
    assert_eq!(s.steps, 2);
}

/// FedAdam, η = 1, β1 = 0.5, β2 = 0.5, τ = 1: m₀ = 0, v₀ = 1.
/// Round 1: Δ̄ = [7, 1, −7]: m = ½Δ̄ = [3.5, 0.5, −3.5]; v = ½·1 + ½Δ̄² = [25, 1, 25];
///   G += m/(√v + 1) = [3.5/6, 0.5/2, −3.5/6].
/// Round 2: Δ̄ = [5, 7, −5]: m = ½m + ½Δ̄ = [4.25, 3.75, −4.25]; v = ½v + ½Δ̄² = [25, 25, 25];
///   G += m/6.
#[test]
fn fedadam_hand_checked() {
    let cfg = config(ServerOpt::FedAdam, FedOptVariant::Reddi, 1.0, 0.5, 0.5, 1.0);
    assert_eq!(cfg.state_slots(), (true, true));
    let mut s = Server::new(cfg, 3);
    let g = [0.0f32; 3];
    let g1 = s.step(&g, &[7.0, 1.0, -7.0]);
    let want1 = [3.5 / 6.0, 0.25, -3.5 / 6.0];
    assert_slice_close("round 1", &g1, &want1, 1e-6);
    assert_eq!(s.m, [3.5, 0.5, -3.5]);
    assert_eq!(s.v, [25.0, 1.0, 25.0]);
    let g2 = s.step(&g1, &[5.0, 7.0, -5.0]);
    let want2 = [
        want1[0] + 4.25 / 6.0,
        want1[1] + 3.75 / 6.0,
        want1[2] - 4.25 / 6.0,
    ];
    assert_slice_close("round 2", &g2, &want2, 1e-6);
    assert_eq!(s.m, [4.25, 3.75, -4.25]);
    assert_eq!(s.v, [25.0, 25.0, 25.0]);
    assert_eq!(s.steps, 2);
}

/// FedYogi, η = 1, β1 = 0.5, β2 = 0.5, τ = 1: m₀ = 0, v₀ = 1.
/// Round 1: Δ̄ = [4, 1, −4], Δ̄² = [16, 1, 16]:
///   v − Δ̄² = [−15, 0, −15] → sign [−1, 0, −1] → v = v + ½Δ̄²·[1, 0, 1] = [9, 1, 9]
///   (the middle element tests sign(0) = 0); m = ½Δ̄ = [2, 0.5, −2];
///   G += m/(√v + 1) = [2/4, 0.5/2, −2/4] = [0.5, 0.25, −0.5].
/// Round 2: Δ̄ = [2, 2, 0], Δ̄² = [4, 4, 0]:
///   v − Δ̄² = [5, −3, 9] → sign [1, −1, 1] → v = [9 − 2, 1 + 2, 9 − 0] = [7, 3, 9];
///   m = ½m + ½Δ̄ = [2, 1.25, −1]; G += [2/(√7+1), 1.25/(√3+1), −1/4].
#[test]
fn fedyogi_hand_checked() {
    let cfg = config(ServerOpt::FedYogi, FedOptVariant::Reddi, 1.0, 0.5, 0.5, 1.0);
    assert_eq!(cfg.state_slots(), (true, true));
    let mut s = Server::new(cfg, 3);
    let g = [0.0f32; 3];
    let g1 = s.step(&g, &[4.0, 1.0, -4.0]);
    assert_eq!(g1, [0.5, 0.25, -0.5]);
    assert_eq!(s.v, [9.0, 1.0, 9.0]);
    assert_eq!(s.m, [2.0, 0.5, -2.0]);
    let g2 = s.step(&g1, &[2.0, 2.0, 0.0]);
    assert_eq!(s.v, [7.0, 3.0, 9.0]);
    assert_eq!(s.m, [2.0, 1.25, -1.0]);
    let want2 = [
        0.5 + 2.0 / (7f64.sqrt() + 1.0),
        0.25 + 1.25 / (3f64.sqrt() + 1.0),
        -0.5 - 0.25,
    ];
    assert_slice_close("round 2", &g2, &want2, 1e-6);
    assert_eq!(s.steps, 2);
}

/// `ServerOptConfig::defaults`: the spec's numbers.
#[test]
fn server_opt_defaults() {
    for rule in ALL_RULES {
        let c = ServerOptConfig::defaults(rule);
        let lr = match rule {
            ServerOpt::FedAvg | ServerOpt::FedAvgM => 1.0,
            _ => 1e-3,
        };
        assert_eq!(
            (c.server_lr, c.beta1, c.beta2, c.tau, c.variant),
            (lr, 0.9, 0.99, 1e-3, FedOptVariant::Reddi),
            "{rule:?}"
        );
        assert!(c.validate().is_ok());
    }
}

// ---------------------------------------------------------------------------------------------
// OpenFedLLM variant
// ---------------------------------------------------------------------------------------------

/// Under OpenFedLLM the FedOpt rules average Δ uniformly (`client_weight` = 1), FedAvgM and
/// FedAvg keep sample weights.
#[test]
fn openfedllm_client_weights() {
    for rule in ALL_RULES {
        let reddi = config(rule, FedOptVariant::Reddi, 1.0, 0.9, 0.99, 1e-3);
        let ofl = config(rule, FedOptVariant::OpenFedLlm, 1.0, 0.9, 0.99, 1e-3);
        assert_eq!(reddi.client_weight(3.0), 3.0, "{rule:?}");
        let want = match rule {
            ServerOpt::FedAvg | ServerOpt::FedAvgM => 3.0,
            _ => 1.0,
        };
        assert_eq!(ofl.client_weight(3.0), want, "{rule:?}");
    }
}

/// FedAdam, OpenFedLLM, η = 1, β1 = 0.5, β2 = 0.5, τ = 1 (v₀ = 1), clients a, b (n = 1, 3):
/// Δ̄ is the uniform mean [4, 4, 0] (Reddi would use [4, 0, −4]).
/// Round 1: m = Δ̄ = [4, 4, 0] (not (1−β1)Δ̄); v = ½·1 + ½m² = [8.5, 8.5, 0.5];
///   G = [1,2,3] + m/(√v + 1).
/// Round 2: same clients, Δ̄ = [4, 4, 0]: m = ½m + ½Δ̄ = [4, 4, 0]; v = ½v + ½m² = [12.25, 12.25, 0.25];
///   G += m/(√v + 1) = [4/4.5, 4/4.5, 0].
#[test]
fn openfedllm_fedadam_hand_checked() {
    let cfg = config(
        ServerOpt::FedAdam,
        FedOptVariant::OpenFedLlm,
        1.0,
        0.5,
        0.5,
        1.0,
    );
    let reddi = ServerOptConfig {
        variant: FedOptVariant::Reddi,
        ..cfg
    };
    let mean = mean_of(&cfg, &[(1.0, &A), (3.0, &B)]);
    assert_eq!(mean, [4.0, 4.0, 0.0]);
    assert_eq!(mean_of(&reddi, &[(1.0, &A), (3.0, &B)]), [4.0, 0.0, -4.0]);
    let mut s = Server::new(cfg, 3);
    let g1 = s.step(&G0, &mean);
    assert_eq!(s.m, [4.0, 4.0, 0.0]);
    assert_eq!(s.v, [8.5, 8.5, 0.5]);
    let r = 8.5f64.sqrt() + 1.0;
    let want1 = [1.0 + 4.0 / r, 2.0 + 4.0 / r, 3.0];
    assert_slice_close("round 1", &g1, &want1, 1e-6);
    let g2 = s.step(&g1, &mean);
    assert_eq!(s.m, [4.0, 4.0, 0.0]);
    assert_eq!(s.v, [12.25, 12.25, 0.25]);
    let want2 = [want1[0] + 4.0 / 4.5, want1[1] + 4.0 / 4.5, 3.0];
    assert_slice_close("round 2", &g2, &want2, 1e-6);

    // The Reddi reading differs already in round 1: m = ½Δ̄, v fed Δ̄².
    let mut s = Server::new(reddi, 3);
    let g1r = s.step(&G0, &mean);
    assert_eq!(s.m, [2.0, 2.0, 0.0]);
    assert_ne!(g1r, g1);
}

/// FedYogi, OpenFedLLM, η = 1, β1 = 0.5, β2 = 0.5, τ = 1 (v₀ = 1):
/// Round 1: Δ̄ = [4, 1, −4]: m = Δ̄; m² = [16, 1, 16]; v − m² = [−15, 0, −15]
///   → v = [1 + 8, 1, 1 + 8] = [9, 1, 9]; G += m/(√v + 1) = [1, 0.5, −1].
/// Round 2: Δ̄ = [0, 1, 0]: m = ½m + ½Δ̄ = [2, 1, −2]; m² = [4, 1, 4]; v − m² = [5, 0, 5]
///   → v = [9 − 2, 1, 9 − 2] = [7, 1, 7]; G += [2/(√7+1), 0.5, −2/(√7+1)].
#[test]
fn openfedllm_fedyogi_hand_checked() {
    let cfg = config(
        ServerOpt::FedYogi,
        FedOptVariant::OpenFedLlm,
        1.0,
        0.5,
        0.5,
        1.0,
    );
    let mut s = Server::new(cfg, 3);
    let g1 = s.step(&[0.0; 3], &[4.0, 1.0, -4.0]);
    assert_eq!(s.m, [4.0, 1.0, -4.0]);
    assert_eq!(s.v, [9.0, 1.0, 9.0]);
    assert_eq!(g1, [1.0, 0.5, -1.0]);
    let g2 = s.step(&g1, &[0.0, 1.0, 0.0]);
    assert_eq!(s.m, [2.0, 1.0, -2.0]);
    assert_eq!(s.v, [7.0, 1.0, 7.0]);
    let r = 7f64.sqrt() + 1.0;
    assert_slice_close("round 2", &g2, &[1.0 + 2.0 / r, 1.0, -1.0 - 2.0 / r], 1e-6);
}

/// FedAvgM, OpenFedLLM, β = 0.5, server_lr ignored (set to 7): m is an average and G += m.
/// Round 1: m = Δ̄ = [4, 0, −4]; G = [1,2,3] + m = [5, 2, −1].
/// Round 2: Δ̄ = [2, 2, 2]: m = ½m + ½Δ̄ = [3, 1, −1]; G = [8, 3, −2].
#[test]
fn openfedllm_fedavgm_hand_checked() {
    let cfg = config(
        ServerOpt::FedAvgM,
        FedOptVariant::OpenFedLlm,
        7.0,
        0.5,
        0.99,
        1e-3,
    );
    let mut s = Server::new(cfg, 3);
    let g1 = s.step(&G0, &mean_of(&cfg, &[(1.0, &A), (3.0, &B)]));
    assert_eq!(g1, [5.0, 2.0, -1.0]);
    let g2 = s.step(&g1, &[2.0, 2.0, 2.0]);
    assert_eq!(s.m, [3.0, 1.0, -1.0]);
    assert_eq!(g2, [8.0, 3.0, -2.0]);
}

/// FedAdagrad under OpenFedLLM, compared with OpenFedLLM's own server code
/// (`federated_learning/fed_global.py`, `global_aggregate`, branch `fedadagrad`):
///
/// ```python
/// delta_w = sum([(local[c][key] - global[key]) for c in clients]) / len(clients)
/// # In paper 'adaptive federated optimization', momentum is not used
/// proxy_dict[key] = delta_w
/// opt_proxy_dict[key] = param + torch.square(proxy_dict[key])
/// global_dict[key] += eta * torch.div(proxy_dict[key], torch.sqrt(opt_proxy_dict[key]) + tau)
/// ```
///
/// i.e. no momentum in any round: `m = Δ̄`, `v ← v + Δ̄²`, `G ← G + η·Δ̄/(√v + τ)`.
/// η = 1, β1 = 0.5, τ = 3 (v₀ = 9):
/// Round 1: Δ̄ = [4, 0, −4]: v = [25, 9, 25]; G += [0.5, 0, −0.5].
/// Round 2: Δ̄ = [12, 4, −12]: v = [169, 25, 169]; G += [0.75, 0.5, −0.75].
/// (A momentum m = ½m + ½Δ̄ = [8, 2, −8] in round 2 would give v = [89, 13, 89] instead.)
#[test]
fn openfedllm_fedadagrad_matches_openfedllm_code() {
    let cfg = config(
        ServerOpt::FedAdagrad,
        FedOptVariant::OpenFedLlm,
        1.0,
        0.5,
        0.99,
        3.0,
    );
    let mut s = Server::new(cfg, 3);
    let g1 = s.step(&[0.0; 3], &[4.0, 0.0, -4.0]);
    assert_eq!(g1, [0.5, 0.0, -0.5]);
    assert_eq!(s.v, [25.0, 9.0, 25.0]);
    let g2 = s.step(&g1, &[12.0, 4.0, -12.0]);
    assert_eq!(
        s.v,
        [169.0, 25.0, 169.0],
        "second moment is not fed Δ̄² (momentum kept in Adagrad?)"
    );
    assert_eq!(g2, [1.25, 0.5, -1.25]);
}

// ---------------------------------------------------------------------------------------------
// Random cases vs the f64 reference, three rounds
// ---------------------------------------------------------------------------------------------

fn random_rounds(variant: FedOptVariant) {
    let mut rng = Rng::new(match variant {
        FedOptVariant::Reddi => 20,
        FedOptVariant::OpenFedLlm => 21,
    });
    let mut failures = Vec::new();
    for rule in ALL_RULES {
        for trial in 0..4 {
            let len = 1 + rng.below(40);
            let (lr, b1, b2, tau) = (
                rng.range(0.01, 0.5) as f32,
                rng.range(0.0, 0.95) as f32,
                rng.range(0.5, 0.999) as f32,
                10f64.powf(rng.range(-3.0, -0.5)) as f32,
            );
            let cfg = config(rule, variant, lr, b1, b2, tau);
            let ro = RefOpt {
                rule,
                variant,
                lr: lr as f64,
                beta1: b1 as f64,
                beta2: b2 as f64,
                tau: tau as f64,
            };
            let mut server = Server::new(cfg, len);
            let mut ref_state = RefOptState::new(len, tau as f64);
            let mut g = rng.normal_vec(len, 0.1);
            let mut g_ref = to_f64(&g);
            for round in 0..3 {
                let nc = 1 + rng.below(4);
                let clients: Vec<(f32, Vec<f32>)> = (0..nc)
                    .map(|_| ((1 + rng.below(100)) as f32, rng.normal_vec(len, 0.1)))
                    .collect();
                // Core: MeanAccumulator with the config's client weights, then the rule.
                let views: Vec<(f32, &[f32])> =
                    clients.iter().map(|(n, x)| (*n, x.as_slice())).collect();
                let mean = mean_of(&cfg, &views);
                // Reference: the mean of the *same* f32 updates, weighted as documented.
                let uniform = variant == FedOptVariant::OpenFedLlm
                    && matches!(
                        rule,
                        ServerOpt::FedAdagrad | ServerOpt::FedYogi | ServerOpt::FedAdam
                    );
                let ref_in: Vec<(f64, Vec<f64>)> = clients
                    .iter()
                    .map(|(n, x)| (if uniform { 1.0 } else { *n as f64 }, to_f64(x)))
                    .collect();
                let ref_mean = ref_weighted_mean(&ref_in);
                let e = rel_err_32(&mean, &ref_mean);
                if bad(e, 1e-6) {
                    failures.push(format!(
                        "{rule:?} trial {trial} round {round}: mean rel err {e:.3e}"
                    ));
                }
                let new_g = server.step(&g, &mean);
                let new_ref = ref_server_step(&ro, &mut ref_state, &g_ref, &ref_mean);
                let e = rel_err(&step_of(&new_g, &g_ref), &sub(&new_ref, &g_ref));
                if bad(e, 1e-4) {
                    failures.push(format!(
                        "{rule:?} {variant:?} trial {trial} round {round}: step rel err {e:.3e}"
                    ));
                }
                if server.steps != round + 1 || ref_state.steps != round + 1 {
                    failures.push(format!("{rule:?}: steps {}", server.steps));
                }
                g = new_g;
                g_ref = new_ref;
            }
        }
    }
    finish(&failures);
}

fn finish(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn random_three_rounds_reddi_vs_reference() {
    random_rounds(FedOptVariant::Reddi);
}

#[test]
fn random_three_rounds_openfedllm_vs_reference() {
    random_rounds(FedOptVariant::OpenFedLlm);
}

/// f16 / bf16 global tensors are widened exactly before the step.
#[test]
fn half_precision_global() {
    let cfg = ServerOptConfig::defaults(ServerOpt::FedAvg);
    let g16: Vec<f16> = G0.iter().map(|&v| f16::from_f32(v)).collect();
    let gb: Vec<bf16> = G0.iter().map(|&v| bf16::from_f32(v)).collect();
    for g in [TensorView::F16(&g16), TensorView::BF16(&gb)] {
        let mut out = [0.0f32; 3];
        let mut st = ServerState {
            m: &mut [],
            v: &mut [],
            steps: 0,
        };
        apply_server_opt(&cfg, &mut st, g, &[0.5, 0.25, -1.0], &mut out).unwrap();
        assert_eq!(out, [1.5, 2.25, 2.0]);
    }
}

// ---------------------------------------------------------------------------------------------
// Rejections
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_server_configs_and_inputs_are_rejected() {
    let base = ServerOptConfig::defaults(ServerOpt::FedAdam);
    let bad = [
        ServerOptConfig { tau: 0.0, ..base },
        ServerOptConfig { tau: -1e-3, ..base },
        ServerOptConfig {
            tau: f32::NAN,
            ..base
        },
        ServerOptConfig {
            tau: f32::INFINITY,
            ..base
        },
        ServerOptConfig { beta1: 1.5, ..base },
        ServerOptConfig {
            beta2: 1.0001,
            ..base
        },
        ServerOptConfig {
            beta1: -0.1,
            ..base
        },
        ServerOptConfig {
            beta2: f32::NAN,
            ..base
        },
        ServerOptConfig {
            server_lr: f32::NAN,
            ..base
        },
        ServerOptConfig {
            server_lr: f32::INFINITY,
            ..base
        },
    ];
    let g = [0.0f32; 3];
    for cfg in bad {
        assert!(
            matches!(cfg.validate().unwrap_err().kind, ErrorKind::BadConfig(_)),
            "{cfg:?}"
        );
        let mut s = Server::new(base, 3);
        let mut out = [0.0f32; 3];
        let mut st = ServerState {
            m: &mut s.m,
            v: &mut s.v,
            steps: 0,
        };
        let e =
            apply_server_opt(&cfg, &mut st, TensorView::F32(&g), &[1.0; 3], &mut out).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::BadConfig(_)), "{cfg:?}");
        assert_eq!(st.steps, 0);
    }
    // β = 0 and β = 1 are in range.
    assert!(
        ServerOptConfig {
            beta1: 0.0,
            beta2: 1.0,
            ..base
        }
        .validate()
        .is_ok()
    );

    // Wrong lengths, missing state, non-finite Δ̄.
    let mut m = [0.0f32; 3];
    let mut v = [0.0f32; 3];
    let mut out = [0.0f32; 3];
    let mut st = ServerState {
        m: &mut m,
        v: &mut v,
        steps: 0,
    };
    let e = apply_server_opt(&base, &mut st, TensorView::F32(&g), &[1.0; 2], &mut out).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::ShapeMismatch { .. }));
    let e = apply_server_opt(
        &base,
        &mut st,
        TensorView::F32(&g),
        &[1.0, f32::NAN, 0.0],
        &mut out,
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NonFinite);
    let mut out2 = [0.0f32; 2];
    let e =
        apply_server_opt(&base, &mut st, TensorView::F32(&g), &[1.0; 3], &mut out2).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::ShapeMismatch { .. }));
    assert_eq!(st.steps, 0);
    let mut st = ServerState {
        m: &mut [],
        v: &mut [],
        steps: 0,
    };
    let e = apply_server_opt(&base, &mut st, TensorView::F32(&g), &[1.0; 3], &mut out).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::ShapeMismatch { .. }));
}

// ---------------------------------------------------------------------------------------------
// SCAFFOLD and FedProx
// ---------------------------------------------------------------------------------------------

/// Server: G = [1, 2], Δ̄ = [0.5, −1], λ = 2 → G = [2, 0];
/// c = [0.1, 0.2], mean(c_i⁺ − c_i) = [1, −2], |S| = 2 of N = 8 → c += ¼·[1, −2] → [0.35, −0.3].
#[test]
fn scaffold_server_hand_checked() {
    let mut control = [0.1f32, 0.2];
    let mut out = [0.0f32; 2];
    scaffold_server_update(
        TensorView::F32(&[1.0, 2.0]),
        &[0.5, -1.0],
        2.0,
        &mut control,
        &[1.0, -2.0],
        2,
        8,
        &mut out,
    )
    .unwrap();
    assert_eq!(out, [2.0, 0.0]);
    assert_slice_close("c", &control, &[0.35, -0.3], 1e-6);

    // Sampled clients must be in 1..=total; lengths must match; Δ̄ must be finite.
    for (s, t) in [(0usize, 8usize), (9, 8)] {
        let e = scaffold_server_update(
            TensorView::F32(&[1.0, 2.0]),
            &[0.5, -1.0],
            1.0,
            &mut control,
            &[1.0, -2.0],
            s,
            t,
            &mut out,
        )
        .unwrap_err();
        assert!(matches!(e.kind, ErrorKind::BadConfig(_)));
    }
    let e = scaffold_server_update(
        TensorView::F32(&[1.0, 2.0]),
        &[0.5],
        1.0,
        &mut control,
        &[1.0, -2.0],
        1,
        8,
        &mut out,
    )
    .unwrap_err();
    assert!(matches!(e.kind, ErrorKind::ShapeMismatch { .. }));
    let before = control;
    let e = scaffold_server_update(
        TensorView::F32(&[1.0, 2.0]),
        &[0.5, -1.0],
        1.0,
        &mut control,
        &[f32::NAN, -2.0],
        1,
        8,
        &mut out,
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NonFinite);
    assert_eq!(
        control, before,
        "a rejected update changed the control variate"
    );
}

/// Client: c_i = [1, 1], c = [0.5, −0.5], G = [1, 2], θ_i = [0.8, 2.4], K = 4, η = 0.1:
/// (G − θ)/(Kη) = [0.2, −0.4]/0.4 = [0.5, −1]; c_i⁺ = c_i − c + that = [1, 0.5].
/// Gradient correction: g = [1, 2] + c − c_i = [1, 2] + [−0.5, −1.5] = [0.5, 0.5].
#[test]
fn scaffold_client_hand_checked() {
    let mut ci = [1.0f32, 1.0];
    scaffold_client_control(&mut ci, &[0.5, -0.5], &[1.0, 2.0], &[0.8, 2.4], 4, 0.1).unwrap();
    assert_slice_close("c_i+", &ci, &[1.0, 0.5], 1e-6);

    let mut grad = [1.0f32, 2.0];
    scaffold_correct_gradient(&mut grad, &[0.5, -0.5], &[1.0, 1.0]).unwrap();
    assert_eq!(grad, [0.5, 0.5]);

    let mut ci = [1.0f32, 1.0];
    for (k, lr) in [(0usize, 0.1f32), (4, 0.0), (4, -0.1), (4, f32::NAN)] {
        let e = scaffold_client_control(&mut ci, &[0.5, -0.5], &[1.0, 2.0], &[0.8, 2.4], k, lr)
            .unwrap_err();
        assert!(matches!(e.kind, ErrorKind::BadConfig(_)), "K={k} lr={lr}");
    }
    let e = scaffold_client_control(&mut ci, &[0.5], &[1.0, 2.0], &[0.8, 2.4], 4, 0.1).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::ShapeMismatch { .. }));
    let e = scaffold_correct_gradient(&mut grad, &[0.5], &[1.0, 1.0]).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::ShapeMismatch { .. }));
}

/// FedProx, μ = 0.5, θ = [1, 2, 3], G = [0, 0, 1]: θ − G = [1, 2, 2];
/// grad += μ(θ − G) = [0.5, 1, 1] (on top of [1, 1, 1] → [1.5, 2, 2]);
/// term = μ/2·‖θ − G‖² = 0.25·9 = 2.25.
#[test]
fn fedprox_hand_checked() {
    let mut grad = [1.0f32, 1.0, 1.0];
    let term = fedprox_gradient(&mut grad, &[1.0, 2.0, 3.0], &[0.0, 0.0, 1.0], 0.5).unwrap();
    assert_eq!(grad, [1.5, 2.0, 2.0]);
    assert_eq!(term, 2.25);
    // μ = 0: nothing changes.
    let term = fedprox_gradient(&mut grad, &[1.0, 2.0, 3.0], &[0.0, 0.0, 1.0], 0.0).unwrap();
    assert_eq!((grad, term), ([1.5, 2.0, 2.0], 0.0));
    for mu in [-0.01f32, f32::NAN, f32::INFINITY] {
        let e = fedprox_gradient(&mut grad, &[1.0, 2.0, 3.0], &[0.0, 0.0, 1.0], mu).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::BadConfig(_)), "mu = {mu}");
    }
    let e = fedprox_gradient(&mut grad, &[1.0, 2.0], &[0.0, 0.0, 1.0], 0.5).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::ShapeMismatch { .. }));
}

// ---------------------------------------------------------------------------------------------
// The algorithm table
// ---------------------------------------------------------------------------------------------

#[test]
fn algorithm_names_round_trip() {
    let names = [
        "fedavg",
        "fedprox",
        "scaffold",
        "fedavgm",
        "fedadagrad",
        "fedyogi",
        "fedadam",
        "ffa-lora",
        "fedsa-lora",
        "flora",
        "fedcdd",
    ];
    assert_eq!(Algorithm::ALL.len(), names.len());
    for (a, n) in Algorithm::ALL.iter().zip(names) {
        assert_eq!(a.name(), n);
        assert_eq!(Algorithm::from_name(n), Some(*a));
    }
    // Names are unique.
    for (i, a) in Algorithm::ALL.iter().enumerate() {
        for b in &Algorithm::ALL[i + 1..] {
            assert_ne!(a.name(), b.name());
        }
    }
    for bad in ["", "FedAvg", "fed-avg", "fedcdd ", "lora"] {
        assert_eq!(Algorithm::from_name(bad), None, "{bad:?}");
    }
}

#[test]
fn algorithm_tensor_selection_and_server_rule() {
    use Algorithm::*;
    // FFA-LoRA: A frozen at its shared init, only B aggregated.
    assert!(!FfaLora.aggregates(TensorRole::LoraA));
    assert!(FfaLora.aggregates(TensorRole::LoraB));
    // FedSA-LoRA: A shared, B stays on the client.
    assert!(FedSaLora.aggregates(TensorRole::LoraA));
    assert!(!FedSaLora.aggregates(TensorRole::LoraB));
    for a in Algorithm::ALL {
        if !matches!(a, FfaLora | FedSaLora) {
            for role in [TensorRole::LoraA, TensorRole::LoraB, TensorRole::Other] {
                assert!(a.aggregates(role), "{a:?} {role:?}");
            }
        }
    }
    let want = [
        (FedAvg, Some(ServerOpt::FedAvg)),
        (FedProx, Some(ServerOpt::FedAvg)),
        (Scaffold, Some(ServerOpt::FedAvg)),
        (FedAvgM, Some(ServerOpt::FedAvgM)),
        (FedAdagrad, Some(ServerOpt::FedAdagrad)),
        (FedYogi, Some(ServerOpt::FedYogi)),
        (FedAdam, Some(ServerOpt::FedAdam)),
        (FfaLora, Some(ServerOpt::FedAvg)),
        (FedSaLora, Some(ServerOpt::FedAvg)),
        (FLora, None),
        (FedCdd, None),
    ];
    for (a, r) in want {
        assert_eq!(a.server_opt(), r, "{a:?}");
    }
    // PEFT names → roles.
    let roles = [
        (
            "base_model.model.layers.0.self_attn.q_proj.lora_A.weight",
            TensorRole::LoraA,
        ),
        (
            "base_model.model.layers.0.self_attn.q_proj.lora_B.weight",
            TensorRole::LoraB,
        ),
        (
            "base_model.model.embed_tokens.lora_embedding_A",
            TensorRole::LoraA,
        ),
        (
            "base_model.model.embed_tokens.lora_embedding_B",
            TensorRole::LoraB,
        ),
        ("base_model.model.lora_A_proj.bias", TensorRole::Other),
        (
            "base_model.model.layers.0.mlp.up_proj.lora_magnitude_vector",
            TensorRole::Other,
        ),
    ];
    for (name, role) in roles {
        assert_eq!(TensorRole::from_name(name), role, "{name}");
    }
}

/// `MeanAccumulator::apply_fedavg` is `mean_into` + FedAvg's `apply_server_opt` in one sweep:
/// same result up to rounding, for every global dtype, and the same rejections.
#[test]
fn apply_fedavg_matches_mean_then_server_step() {
    use fedcdd_core::{
        ErrorKind, MeanAccumulator, ServerOpt, ServerOptConfig, ServerState, TensorView,
        apply_server_opt,
    };
    let mut rng = Rng::new(77);
    let p = 301;
    let xs: Vec<Vec<f32>> = (0..5).map(|_| rng.normal_vec(p, 1e-2)).collect();
    let g32 = rng.normal_vec(p, 1.0);
    let g16: Vec<half::f16> = g32.iter().map(|v| half::f16::from_f32(*v)).collect();
    let gb16: Vec<half::bf16> = g32.iter().map(|v| half::bf16::from_f32(*v)).collect();
    for global in [
        TensorView::F32(&g32),
        TensorView::F16(&g16),
        TensorView::BF16(&gb16),
    ] {
        for lr in [1.0f32, 0.3] {
            let mut buf = vec![0.0; MeanAccumulator::buffer_len(p)];
            let mut acc = MeanAccumulator::new(p, &mut buf).unwrap();
            for (i, x) in xs.iter().enumerate() {
                acc.add(i as u32, 10.0 + i as f32, TensorView::F32(x))
                    .unwrap();
            }
            let mut fused = vec![0.0; p];
            acc.apply_fedavg(global, lr, &mut fused).unwrap();
            let mut mean = vec![0.0; p];
            acc.mean_into(&mut mean).unwrap();
            let mut cfg = ServerOptConfig::defaults(ServerOpt::FedAvg);
            cfg.server_lr = lr;
            let mut st = ServerState {
                m: &mut [],
                v: &mut [],
                steps: 0,
            };
            let mut two_step = vec![0.0; p];
            apply_server_opt(&cfg, &mut st, global, &mean, &mut two_step).unwrap();
            for (a, b) in fused.iter().zip(&two_step) {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{a} vs {b}");
            }
            // And both are G + λ·Σ w x / Σ w computed here in f64.
            let wsum: f64 = (0..5).map(|i| 10.0 + i as f64).sum();
            for j in 0..p {
                let m: f64 = (0..5)
                    .map(|i| (10.0 + i as f64) * xs[i][j] as f64)
                    .sum::<f64>()
                    / wsum;
                let want = global.get(j) as f64 + lr as f64 * m;
                assert!((fused[j] as f64 - want).abs() <= 1e-5 * want.abs().max(1e-3));
            }
        }
    }
    let mut buf = vec![0.0; MeanAccumulator::buffer_len(p)];
    let acc = MeanAccumulator::new(p, &mut buf).unwrap();
    let mut out = vec![0.0; p];
    let e = acc
        .apply_fedavg(TensorView::F32(&g32), 1.0, &mut out)
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoClients);
}
