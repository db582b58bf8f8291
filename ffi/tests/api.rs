//! The C API called from Rust through the crate's entry points (exactly what C calls), checked
//! against fedcdd-core called directly and against plain-f64 arithmetic: FedCDD batch and
//! streaming, the FedOpt rules over rounds with saved/loaded state, the encode → decode round
//! trip against core's mask, and every kind of bad input (NULL pointers, wrong lengths, NaN,
//! hostile bytes, calls out of order) giving an error that names the client and the tensor.

mod common;

use std::ffi::{CStr, CString, c_char, c_void};

use common::*;
use fedcdd::*;
use fedcdd_core::{
    DType, FedCddConfig, FedOptVariant, Importance, MaskConfig, NormAxis, ServerOpt,
    ServerOptConfig, Target, TensorRole, Weighting, bf16, f16,
};

// ---------------------------------------------------------------------------------------------
// Version, names, errors
// ---------------------------------------------------------------------------------------------

#[test]
fn version_is_the_crate_version() {
    // SAFETY: static NUL-terminated strings.
    let v = unsafe { CStr::from_ptr(fedcdd_version()) }
        .to_str()
        .unwrap();
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
    let parts: Vec<u32> = v.split('.').map(|p| p.parse().unwrap()).collect();
    assert_eq!(
        fedcdd_version_number(),
        parts[0] * 1_000_000 + parts[1] * 1_000 + parts[2]
    );
}

#[test]
fn algorithm_names_round_trip() {
    for code in 0..=10u32 {
        let name = fedcdd_algorithm_name(code);
        assert!(!name.is_null());
        let mut back = 99;
        // SAFETY: valid pointers.
        check(unsafe { fedcdd_algorithm_from_name(name, &mut back) }).unwrap();
        assert_eq!(back, code);
    }
    assert!(fedcdd_algorithm_name(11).is_null());
    let bogus = CString::new("fedmagic").unwrap();
    let mut out = 0;
    // SAFETY: valid pointers.
    expect_err(
        check(unsafe { fedcdd_algorithm_from_name(bogus.as_ptr(), &mut out) }),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["fedmagic"],
    );
    // SAFETY: static strings.
    let s = unsafe { CStr::from_ptr(fedcdd_status_name(FEDCDD_ERR_SHAPE)) };
    assert_eq!(s.to_str().unwrap(), "FEDCDD_ERR_SHAPE");
}

#[test]
fn last_error_copy_cuts_and_reports_length() {
    let agg = Agg::new(&config(FEDCDD_ALG_FEDCDD));
    let err = agg.finalize(&[]).unwrap_err();
    let full = err.message.len();
    let mut buf = [0x55 as c_char; 8];
    // SAFETY: valid buffer.
    let n = unsafe { fedcdd_last_error_copy(buf.as_mut_ptr(), buf.len()) };
    assert_eq!(n, full);
    // SAFETY: NUL-terminated by the call.
    let cut = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
    assert_eq!(cut, &err.message[..7]);
    // Freeing a handle leaves the message for the caller to report.
    drop(Agg::new(&config(FEDCDD_ALG_FEDAVG)));
    let scratch = Agg::new(&config(FEDCDD_ALG_FEDAVG));
    let err = scratch.finalize(&[]).unwrap_err();
    drop(scratch);
    // SAFETY: a NUL-terminated string.
    let still = unsafe { CStr::from_ptr(fedcdd_last_error()) };
    assert_eq!(still.to_str().unwrap(), err.message);
    // SAFETY: NULL is allowed.
    unsafe { fedcdd_upload_free(std::ptr::null_mut()) };
    assert_eq!(last_error(), err.message);
    let full = err.message.len();
    // NULL with capacity 0 only measures.
    // SAFETY: NULL with capacity 0 is allowed.
    assert_eq!(
        unsafe { fedcdd_last_error_copy(std::ptr::null_mut(), 0) },
        full
    );
}

// ---------------------------------------------------------------------------------------------
// FedCDD
// ---------------------------------------------------------------------------------------------

/// Every FedCDD switch, through the C config, against core's batch and streaming forms.
#[test]
fn fedcdd_batch_and_streaming_equal_core_for_every_switch() {
    let global = lora_global(1);
    let clients = lora_clients(&global, 4, 2);
    let axes = [
        (FEDCDD_NORM_COLUMN, NormAxis::Column),
        (FEDCDD_NORM_ROW, NormAxis::Row),
        (FEDCDD_NORM_RANK, NormAxis::Rank),
    ];
    let targets = [
        (FEDCDD_TARGET_DELTA, Target::Delta),
        (FEDCDD_TARGET_WEIGHTS, Target::Weights),
    ];
    let weightings = [
        (FEDCDD_WEIGHTING_P_RELU, Weighting::PRelu),
        (FEDCDD_WEIGHTING_RELU, Weighting::Relu),
        (FEDCDD_WEIGHTING_SOFTMAX, Weighting::Softmax { tau: 0.25 }),
        (FEDCDD_WEIGHTING_SAMPLES, Weighting::Samples),
        (FEDCDD_WEIGHTING_UNIFORM, Weighting::Uniform),
    ];
    let mut cases = 0;
    for &(axis_c, axis) in &axes {
        for &(target_c, target) in &targets {
            for &(w_c, weighting) in &weightings {
                for (renorm, lr) in [(1, 1.0f32), (0, 0.5)] {
                    let mut c = config(FEDCDD_ALG_FEDCDD);
                    c.norm_axis = axis_c;
                    c.target = target_c;
                    c.weighting = w_c;
                    c.softmax_temperature = 0.25;
                    c.renormalize = renorm;
                    c.server_lr = lr;
                    let core_cfg = FedCddConfig {
                        norm_axis: axis,
                        target,
                        weighting,
                        renormalize: renorm != 0,
                        server_lr: lr,
                        components: fedcdd_core::Components::Both,
                    };
                    let want_batch = core_fedcdd_batch(&core_cfg, &global, &clients);
                    let want_stream = core_fedcdd_streaming(&core_cfg, &global, &clients);

                    let batch = Agg::new(&c);
                    batch.set_global(&global).unwrap();
                    assert_eq!(batch.passes(), 1);
                    let got_batch = batch.round(&clients, &global).unwrap();
                    assert_eq!(got_batch, want_batch, "batch {core_cfg:?}");

                    c.mode = FEDCDD_MODE_STREAMING;
                    let stream = Agg::new(&c);
                    stream.set_global(&global).unwrap();
                    assert_eq!(stream.passes(), 2);
                    let got_stream = stream.round(&clients, &global).unwrap();
                    assert_eq!(got_stream, want_stream, "streaming {core_cfg:?}");

                    // The spec's property 5: streaming = batch to f32 rounding.
                    let d = max_rel_diff(&got_stream, &got_batch);
                    assert!(d < 1e-5, "streaming vs batch {d} for {core_cfg:?}");
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 60);
}

/// Spec property 1, checked without the core: identical clients give `G + Δ`.
#[test]
fn identical_clients_give_global_plus_update() {
    let global = lora_global(3);
    let (_, update) = (0, lora_clients(&global, 1, 4).remove(0).2);
    let clients: Vec<_> = (0..3)
        .map(|i| (i as u32, 5.0 * (i as f64 + 1.0), update.clone()))
        .collect();
    for mode in [FEDCDD_MODE_BATCH, FEDCDD_MODE_STREAMING] {
        let mut c = config(FEDCDD_ALG_FEDCDD);
        c.mode = mode;
        let agg = Agg::new(&c);
        agg.set_global(&global).unwrap();
        let got = agg.round(&clients, &global).unwrap();
        for ((g, u), r) in global.iter().zip(&update).zip(&got) {
            for ((gv, uv), rv) in g.data.iter().zip(&u.data).zip(r) {
                assert!((gv + uv - rv).abs() < 1e-5, "{} mode {mode}", g.name());
            }
        }
        // The new global is kept: get_global returns it and the steps count.
        for (g, r) in global.iter().zip(&got) {
            assert_eq!(&agg.get(g), r);
        }
        assert_eq!(agg.steps(), 1);
        assert_eq!(agg.num_clients(), 0, "finalize closes the round");
    }
}

/// Inputs in f16/bf16 equal their f32 values; outputs in f16 are the f32 result rounded; an
/// f16 global keeps its new values rounded to f16.
#[test]
fn half_precision_inputs_and_outputs() {
    let global = lora_global(5);
    let clients = lora_clients(&global, 3, 6);
    // Round everything to f16 first so the f32 run sees the same values.
    let round16 = |ts: &[Tensor]| -> Vec<Tensor> {
        ts.iter()
            .map(|t| t.with_data(t.data.iter().map(|v| f16::from_f32(*v).to_f32()).collect()))
            .collect()
    };
    let global = round16(&global);
    let clients: Vec<_> = clients
        .into_iter()
        .map(|(id, n, ts)| (id, n, round16(&ts)))
        .collect();
    let reference = Agg::new(&config(FEDCDD_ALG_FEDCDD));
    reference.set_global(&global).unwrap();
    let want = reference.round(&clients, &global).unwrap();

    let agg = Agg::new(&config(FEDCDD_ALG_FEDCDD));
    let bits = |ts: &[Tensor], bf: bool| -> Vec<Vec<u16>> {
        ts.iter()
            .map(|t| {
                t.data
                    .iter()
                    .map(|v| {
                        if bf {
                            bf16::from_f32(*v).to_bits()
                        } else {
                            f16::from_f32(*v).to_bits()
                        }
                    })
                    .collect()
            })
            .collect()
    };
    let as_c = |ts: &[Tensor], data: &[Vec<u16>], dtype| -> Vec<fedcdd_tensor> {
        ts.iter()
            .zip(data)
            .map(|(t, d)| fedcdd_tensor {
                dtype,
                data: d.as_ptr().cast(),
                ..t.c()
            })
            .collect()
    };
    let g16 = bits(&global, false);
    let gc = as_c(&global, &g16, FEDCDD_DTYPE_F16);
    // SAFETY: valid pointers for the call.
    check(unsafe { fedcdd_aggregator_set_global(agg.0, gc.as_ptr(), gc.len()) }).unwrap();
    for (id, n, ts) in &clients {
        let d16 = bits(ts, false);
        agg.add_raw(*id, *n, &as_c(ts, &d16, FEDCDD_DTYPE_F16))
            .unwrap();
    }
    let mut out16: Vec<Vec<u16>> = global.iter().map(|t| vec![0; t.data.len()]).collect();
    let outs: Vec<fedcdd_output> = global
        .iter()
        .zip(out16.iter_mut())
        .map(|(t, b)| fedcdd_output {
            name: t.name.as_ptr(),
            dtype: FEDCDD_DTYPE_F16,
            data: b.as_mut_ptr().cast(),
            len: b.len(),
        })
        .collect();
    // SAFETY: valid pointers for the call.
    check(unsafe { fedcdd_aggregator_finalize(agg.0, outs.as_ptr(), outs.len()) }).unwrap();
    for ((w, got), t) in want.iter().zip(&out16).zip(&global) {
        let w16: Vec<u16> = w.iter().map(|v| f16::from_f32(*v).to_bits()).collect();
        assert_eq!(&w16, got, "{}", t.name());
        // The kept global is the f16-rounded result.
        let kept = agg.get(t);
        let rounded: Vec<f32> = w.iter().map(|v| f16::from_f32(*v).to_f32()).collect();
        assert_eq!(kept, rounded);
    }

    // bf16 client inputs are read as their f32 values too.
    let agg = Agg::new(&config(FEDCDD_ALG_FEDAVG));
    agg.set_global(&global).unwrap();
    let roundb = |ts: &[Tensor]| -> Vec<Tensor> {
        ts.iter()
            .map(|t| t.with_data(t.data.iter().map(|v| bf16::from_f32(*v).to_f32()).collect()))
            .collect()
    };
    let mut server = CoreServer::new(ServerOptConfig::defaults(ServerOpt::FedAvg), &global);
    let bclients: Vec<_> = clients
        .iter()
        .map(|(id, n, ts)| (*id, *n, roundb(ts)))
        .collect();
    for (id, n, ts) in &bclients {
        let db = bits(ts, true);
        agg.add_raw(*id, *n, &as_c(ts, &db, FEDCDD_DTYPE_BF16))
            .unwrap();
    }
    let got = agg.finalize(&global).unwrap();
    server.round(&bclients, &(0..global.len()).collect::<Vec<_>>());
    assert!(max_rel_diff(&got, &server.global) < 1e-6);
}

// ---------------------------------------------------------------------------------------------
// FedAvg family and server state
// ---------------------------------------------------------------------------------------------

fn opt_rule(alg: fedcdd_algorithm) -> ServerOpt {
    match alg {
        FEDCDD_ALG_FEDAVGM => ServerOpt::FedAvgM,
        FEDCDD_ALG_FEDADAGRAD => ServerOpt::FedAdagrad,
        FEDCDD_ALG_FEDYOGI => ServerOpt::FedYogi,
        FEDCDD_ALG_FEDADAM => ServerOpt::FedAdam,
        _ => ServerOpt::FedAvg,
    }
}

/// Three rounds of every FedOpt rule, both variants, batch and streaming, against core.
#[test]
fn fedopt_rules_over_rounds_equal_core() {
    let global = lora_global(7);
    let all: Vec<usize> = (0..global.len()).collect();
    for alg in [
        FEDCDD_ALG_FEDAVG,
        FEDCDD_ALG_FEDPROX,
        FEDCDD_ALG_FEDAVGM,
        FEDCDD_ALG_FEDADAGRAD,
        FEDCDD_ALG_FEDYOGI,
        FEDCDD_ALG_FEDADAM,
    ] {
        for (variant_c, variant) in [
            (FEDCDD_FEDOPT_REDDI, FedOptVariant::Reddi),
            (FEDCDD_FEDOPT_OPENFEDLLM, FedOptVariant::OpenFedLlm),
        ] {
            for mode in [FEDCDD_MODE_BATCH, FEDCDD_MODE_STREAMING] {
                let mut c = config(alg);
                c.mode = mode;
                c.fedopt_variant = variant_c;
                c.beta1 = 0.8;
                c.tau = 1e-2;
                let mut want_cfg = ServerOptConfig::defaults(opt_rule(alg));
                want_cfg.variant = variant;
                want_cfg.beta1 = 0.8;
                want_cfg.tau = 1e-2;
                assert_eq!(c.server_lr, want_cfg.server_lr, "default server rate");
                let mut server = CoreServer::new(want_cfg, &global);
                let agg = Agg::new(&c);
                agg.set_global(&global).unwrap();
                for round in 0..3u64 {
                    let clients = lora_clients(&global, 3, 100 + round);
                    let got = agg.round(&clients, &global).unwrap();
                    server.round(&clients, &all);
                    let d = max_rel_diff(&got, &server.global);
                    assert!(
                        d < 1e-6,
                        "alg {alg} {variant:?} mode {mode} round {round}: diff {d}"
                    );
                }
                assert_eq!(agg.steps(), 3);
            }
        }
    }
}

/// FedAvg against plain f64 arithmetic: `G + Σ p_i Δ_i`.
#[test]
fn fedavg_is_the_weighted_mean() {
    let global = lora_global(9);
    let clients = lora_clients(&global, 3, 10);
    let agg = Agg::new(&config(FEDCDD_ALG_FEDAVG));
    agg.set_global(&global).unwrap();
    let got = agg.round(&clients, &global).unwrap();
    let total: f64 = clients.iter().map(|c| c.1).sum();
    for (k, g) in global.iter().enumerate() {
        for (i, (gv, rv)) in g.data.iter().zip(&got[k]).enumerate() {
            let mean: f64 = clients
                .iter()
                .map(|(_, n, ts)| n / total * ts[k].data[i] as f64)
                .sum();
            let want = *gv as f64 + mean;
            assert!((*rv as f64 - want).abs() < 1e-6);
        }
    }
}

#[test]
fn ffa_lora_and_fedsa_lora_leave_the_other_factor_alone() {
    let global = lora_global(11);
    let clients = lora_clients(&global, 3, 12);
    for (alg, kept_role) in [
        (FEDCDD_ALG_FFA_LORA, TensorRole::LoraA),
        (FEDCDD_ALG_FEDSA_LORA, TensorRole::LoraB),
    ] {
        let agg = Agg::new(&config(alg));
        agg.set_global(&global).unwrap();
        // The untouched factor may be left out of the clients' tensors.
        let slim: Vec<_> = clients
            .iter()
            .map(|(id, n, ts)| {
                let ts = ts
                    .iter()
                    .filter(|t| TensorRole::from_name(t.name()) != kept_role)
                    .cloned()
                    .collect::<Vec<_>>();
                (*id, *n, ts)
            })
            .collect();
        for (id, n, ts) in &slim {
            agg.add(*id, *n, ts).unwrap();
        }
        let got = agg.finalize(&global).unwrap();
        let aggregated: Vec<usize> = (0..global.len())
            .filter(|&k| TensorRole::from_name(global[k].name()) != kept_role)
            .collect();
        let mut server = CoreServer::new(ServerOptConfig::defaults(ServerOpt::FedAvg), &global);
        server.round(&clients, &aggregated);
        for (k, g) in global.iter().enumerate() {
            if aggregated.contains(&k) {
                assert!(max_rel_diff(&got[k..k + 1], &server.global[k..k + 1]) < 1e-6);
            } else {
                assert_eq!(got[k], g.data, "{} must keep its value", g.name());
            }
        }
    }
    // An adapter with nothing to aggregate is refused up front.
    let only_a = vec![lora_global(1).remove(0)];
    let agg = Agg::new(&config(FEDCDD_ALG_FFA_LORA));
    expect_err(
        agg.set_global(&only_a),
        FEDCDD_ERR_TENSOR_NAME,
        &["ffa-lora"],
    );
}

/// Save after round 1, load into a fresh aggregator, run round 2 in both: same result, same
/// state bytes; every truncation and corruption of the bytes is rejected without a change.
#[test]
fn server_state_round_trip_and_hostile_state_bytes() {
    let global = lora_global(13);
    for alg in [FEDCDD_ALG_FEDADAM, FEDCDD_ALG_FEDYOGI, FEDCDD_ALG_FEDAVGM] {
        for mode in [FEDCDD_MODE_BATCH, FEDCDD_MODE_STREAMING] {
            let mut c = config(alg);
            c.mode = mode;
            let a = Agg::new(&c);
            a.set_global(&global).unwrap();
            let r1 = a.round(&lora_clients(&global, 3, 20), &global).unwrap();
            let saved = a.save();

            let b = Agg::new(&c);
            let g1: Vec<Tensor> = global
                .iter()
                .zip(&r1)
                .map(|(t, d)| t.with_data(d.clone()))
                .collect();
            b.set_global(&g1).unwrap();
            b.load(&saved).unwrap();
            assert_eq!(b.steps(), 1);
            assert_eq!(b.save(), saved, "load then save gives the same bytes");

            let round2 = lora_clients(&global, 3, 21);
            let ra = a.round(&round2, &global).unwrap();
            let rb = b.round(&round2, &global).unwrap();
            assert_eq!(ra, rb, "alg {alg} mode {mode}: state round trip");
            assert_eq!(a.save(), b.save());

            // A fresh state (no load) gives a different round 2: the state matters.
            let fresh = Agg::new(&c);
            fresh.set_global(&g1).unwrap();
            let rf = fresh.round(&round2, &global).unwrap();
            assert_ne!(rf, ra, "alg {alg}: the loaded state must change round 2");

            // Hostile bytes: every truncation, every single-byte corruption.
            let before = b.save();
            for len in 0..saved.len() {
                let r = b.load(&saved[..len]);
                assert_eq!(
                    r.as_ref().map_err(|f| f.status),
                    Err(FEDCDD_ERR_BAD_ENCODING),
                    "truncated to {len}: {r:?}"
                );
            }
            for i in 0..saved.len() {
                let mut bad = saved.clone();
                bad[i] ^= 0x5A;
                assert!(b.load(&bad).is_err(), "byte {i} corrupted");
            }
            assert_eq!(b.save(), before, "rejected loads change nothing");
        }
    }
    // Corruptions behind a valid checksum: each is reported, none crashes.
    let c = config(FEDCDD_ALG_FEDADAM);
    let a = Agg::new(&c);
    a.set_global(&global).unwrap();
    a.round(&lora_clients(&global, 2, 30), &global).unwrap();
    let saved = a.save();
    let mut rng = Lcg(77);
    for _ in 0..2000 {
        let mut bad = saved[..saved.len() - 4].to_vec();
        let i = (rng.next().abs() * bad.len() as f32) as usize % bad.len();
        bad[i] = (rng.next() * 255.0) as i32 as u8;
        let crc = fedcdd_core::wire::crc32(&bad);
        bad.extend_from_slice(&crc.to_le_bytes());
        let _ = a.load(&bad); // Ok for harmless changes, an error otherwise.
    }
    // A state of another rule, or of other tensors, is refused by name.
    let yogi = Agg::new(&config(FEDCDD_ALG_FEDYOGI));
    yogi.set_global(&global).unwrap();
    expect_err(
        yogi.load(&saved),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["fedadam", "fedyogi"],
    );
    let other = Agg::new(&c);
    other.set_global(&lora_global(1)[..2]).unwrap();
    expect_err(
        other.load(&saved),
        FEDCDD_ERR_TENSOR_NAME,
        &["layers.1.v_proj.lora_A.weight"],
    );
    let reshaped = Agg::new(&c);
    let mut g2 = global.clone();
    g2[0] = Tensor::new(global[0].name(), &[5, 10], vec![0.0; 50]);
    reshaped.set_global(&g2).unwrap();
    expect_err(
        reshaped.load(&saved),
        FEDCDD_ERR_SHAPE,
        &["layers.0.q_proj.lora_A.weight", "40"],
    );
}

// ---------------------------------------------------------------------------------------------
// Client side: encode → decode equals core's mask
// ---------------------------------------------------------------------------------------------

#[test]
fn encode_decode_round_trip_equals_core_mask() {
    let global = lora_global(15);
    let (_, _, deltas) = lora_clients(&global, 1, 16).remove(0);
    let local: Vec<Tensor> = global
        .iter()
        .zip(&deltas)
        .map(|(g, d)| g.with_data(g.data.iter().zip(&d.data).map(|(a, b)| a + b).collect()))
        .collect();
    // Δ as the library computes it: local − global in f32.
    let delta: Vec<Vec<f32>> = local
        .iter()
        .zip(&global)
        .map(|(l, g)| l.data.iter().zip(&g.data).map(|(a, b)| a - b).collect())
        .collect();
    let mut cases = 0;
    for (dtype_c, dtype) in [
        (FEDCDD_DTYPE_F32, DType::F32),
        (FEDCDD_DTYPE_F16, DType::F16),
        (FEDCDD_DTYPE_BF16, DType::BF16),
    ] {
        for (imp_c, importance) in [
            (FEDCDD_IMPORTANCE_COLUMN_L2, Importance::ColumnL2),
            (FEDCDD_IMPORTANCE_ELEMENT_ABS, Importance::ElementAbs),
        ] {
            for (keep, noise) in [(1.0f32, 0.0f32), (0.3, 0.0), (0.3, 0.7), (0.6, 1.5)] {
                let seed = fedcdd_default_seed(3, 9) ^ cases;
                let mut o = encode_options(keep, noise, seed);
                o.upload_dtype = dtype_c;
                o.importance = imp_c;
                o.round = 3;
                o.client_id = 9;
                o.num_samples = 1234;
                let bytes = encode(&o, &global, &local).unwrap();
                let up = ParsedUpload::parse(&bytes).unwrap();
                let h = up.header();
                assert_eq!(
                    (
                        h.round,
                        h.client_id,
                        h.num_samples,
                        h.num_tensors,
                        h.byte_len
                    ),
                    (3, 9, 1234, global.len(), bytes.len())
                );
                let mask = MaskConfig {
                    keep_ratio: keep,
                    noise_scale: noise,
                    importance,
                    axis: fedcdd_core::MaskAxis::Column,
                };
                for (k, g) in global.iter().enumerate() {
                    let info = up.info(k).unwrap();
                    // SAFETY: a NUL-terminated name owned by the handle.
                    let name = unsafe { CStr::from_ptr(info.name) }.to_str().unwrap();
                    assert_eq!(name, g.name());
                    assert_eq!(&info.shape[..info.ndim], g.shape.as_slice());
                    assert_eq!(info.numel, g.data.len());
                    assert_eq!(info.dtype, dtype_c);
                    let layout = g.layout();
                    let cols = importance.units(&layout).1;
                    if mask.kept_count(cols) == cols {
                        // Nothing masked: a dense record, counted in the tensor's columns.
                        assert_eq!(info.masked, 0);
                        assert_eq!(info.columns, layout.cols);
                        assert_eq!(info.kept_columns, layout.cols);
                    } else {
                        assert_eq!(info.masked, 1);
                        assert_eq!(info.columns, cols);
                        assert_eq!(info.kept_columns, mask.kept_count(cols));
                        assert_eq!(info.seed, seed);
                        assert_eq!(info.sigma == 0.0, noise == 0.0);
                    }
                    let want = core_masked(&delta[k], &layout, &mask, dtype, seed, k as u32);
                    let got = up.decode(k, g.data.len()).unwrap();
                    let (wb, gb): (Vec<u32>, Vec<u32>) = (
                        want.iter().map(|v| v.to_bits()).collect(),
                        got.iter().map(|v| v.to_bits()).collect(),
                    );
                    assert_eq!(
                        gb,
                        wb,
                        "{} {dtype:?} {importance:?} ρ={keep} η={noise}",
                        g.name()
                    );
                    let mut idx = 99;
                    // SAFETY: valid pointers.
                    check(unsafe { fedcdd_upload_find(up.0, g.name.as_ptr(), &mut idx) }).unwrap();
                    assert_eq!(idx, k);
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 24);
}

#[test]
fn encode_size_query_and_small_buffers() {
    let global = lora_global(17);
    let local: Vec<Tensor> = lora_clients(&global, 1, 18).remove(0).2;
    let o = encode_options(0.5, 1.0, 42);
    let bytes = encode(&o, &global, &local).unwrap();
    let (g, l) = (c_tensors(&global), c_tensors(&local));
    let mut small = vec![0u8; bytes.len() - 1];
    let mut written = 0;
    // SAFETY: valid pointers.
    let r = check(unsafe {
        fedcdd_encode_upload(
            &o,
            g.as_ptr(),
            g.len(),
            l.as_ptr(),
            l.len(),
            small.as_mut_ptr(),
            small.len(),
            &mut written,
        )
    });
    expect_err(r, FEDCDD_ERR_BUFFER_TOO_SMALL, &[&bytes.len().to_string()]);
    assert_eq!(written, bytes.len(), "the size needed is reported");
    // Deterministic: the same arguments give the same bytes.
    assert_eq!(encode(&o, &global, &local).unwrap(), bytes);
    // FFA-LoRA sends only lora_B (and the bias).
    let mut ffa = o;
    ffa.algorithm = FEDCDD_ALG_FFA_LORA;
    let up = ParsedUpload::parse(&encode(&ffa, &global, &local).unwrap()).unwrap();
    assert_eq!(up.header().num_tensors, 3);
    for k in 0..3 {
        // SAFETY: a NUL-terminated name owned by the handle.
        let name = unsafe { CStr::from_ptr(up.info(k).unwrap().name) };
        assert!(!name.to_str().unwrap().contains("lora_A"));
    }
    expect_err(up.info(3), FEDCDD_ERR_INVALID_ARGUMENT, &["index 3"]);
}

/// An upload added to the aggregator equals its decoded update added as tensors.
#[test]
fn add_upload_equals_add_client_of_the_decoded_update() {
    let global = lora_global(19);
    let clients = lora_clients(&global, 3, 20);
    let mut c = config(FEDCDD_ALG_FEDCDD);
    c.mode = FEDCDD_MODE_STREAMING;
    let via_uploads = Agg::new(&c);
    via_uploads.set_global(&global).unwrap();
    let mut uploads = Vec::new();
    let mut decoded = Vec::new();
    for (id, n, ts) in &clients {
        let local: Vec<Tensor> = global
            .iter()
            .zip(ts)
            .map(|(g, d)| g.with_data(g.data.iter().zip(&d.data).map(|(a, b)| a + b).collect()))
            .collect();
        let mut o = encode_options(0.5, 0.5, fedcdd_default_seed(1, *id));
        o.client_id = *id;
        o.num_samples = *n as u64;
        let bytes = encode(&o, &global, &local).unwrap();
        let up = ParsedUpload::parse(&bytes).unwrap();
        let ts: Vec<Tensor> = global
            .iter()
            .enumerate()
            .map(|(k, g)| g.with_data(up.decode(k, g.data.len()).unwrap()))
            .collect();
        decoded.push((*id, *n, ts));
        uploads.push(bytes);
    }
    for _pass in 0..2 {
        for u in &uploads {
            via_uploads
                .add_upload(u, FEDCDD_SAMPLES_FROM_UPLOAD)
                .unwrap();
        }
        if via_uploads.num_clients() == 3 && _pass == 0 {
            via_uploads.begin_pass2().unwrap();
        }
    }
    let got = via_uploads.finalize(&global).unwrap();
    let via_tensors = Agg::new(&c);
    via_tensors.set_global(&global).unwrap();
    assert_eq!(got, via_tensors.round(&decoded, &global).unwrap());

    // A sample count given in the call overrides the header's; 0 in the header needs one.
    let cfg = config(FEDCDD_ALG_FEDAVG);
    let a = Agg::new(&cfg);
    a.set_global(&global).unwrap();
    let local: Vec<Tensor> = global.clone();
    let mut o = encode_options(1.0, 0.0, 1);
    o.client_id = 5;
    o.num_samples = 0;
    let bytes = encode(&o, &global, &local).unwrap();
    expect_err(
        a.add_upload(&bytes, FEDCDD_SAMPLES_FROM_UPLOAD),
        FEDCDD_ERR_BAD_WEIGHT,
        &["client 5", "sample count"],
    );
    a.add_upload(&bytes, 3.0).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn null_pointers_are_errors_naming_the_argument() {
    let global = lora_global(21);
    let gc = c_tensors(&global);
    let cfg = config(FEDCDD_ALG_FEDCDD);
    let null_t: *const fedcdd_tensor = std::ptr::null();
    let mut size = 0usize;
    let mut agg_out: *mut fedcdd_aggregator = std::ptr::null_mut();
    // SAFETY (every call below): NULL is what is tested; the other pointers are valid.
    unsafe {
        expect_err(
            check(fedcdd_aggregator_new(std::ptr::null(), &mut agg_out)),
            FEDCDD_ERR_NULL_POINTER,
            &["config"],
        );
        assert!(agg_out.is_null());
        expect_err(
            check(fedcdd_aggregator_new(&cfg, std::ptr::null_mut())),
            FEDCDD_ERR_NULL_POINTER,
            &["out"],
        );
        expect_err(
            check(fedcdd_config_default(0, std::ptr::null_mut())),
            FEDCDD_ERR_NULL_POINTER,
            &["out"],
        );
        expect_err(
            check(fedcdd_aggregator_set_global(
                std::ptr::null_mut(),
                gc.as_ptr(),
                1,
            )),
            FEDCDD_ERR_NULL_POINTER,
            &["aggregator"],
        );
        expect_err(
            check(fedcdd_aggregator_passes(std::ptr::null(), &mut size)),
            FEDCDD_ERR_NULL_POINTER,
            &["aggregator"],
        );
        expect_err(
            check(fedcdd_aggregator_finalize(
                std::ptr::null_mut(),
                std::ptr::null(),
                0,
            )),
            FEDCDD_ERR_NULL_POINTER,
            &["aggregator"],
        );
        expect_err(
            check(fedcdd_aggregator_begin_pass2(std::ptr::null_mut())),
            FEDCDD_ERR_NULL_POINTER,
            &["aggregator"],
        );
        expect_err(
            check(fedcdd_aggregator_load_state(
                std::ptr::null_mut(),
                [0u8].as_ptr(),
                1,
            )),
            FEDCDD_ERR_NULL_POINTER,
            &["aggregator"],
        );
        expect_err(
            check(fedcdd_upload_parse(
                std::ptr::null(),
                10,
                &mut std::ptr::null_mut(),
            )),
            FEDCDD_ERR_NULL_POINTER,
            &["bytes"],
        );
        expect_err(
            check(fedcdd_upload_get_header(
                std::ptr::null(),
                &mut fedcdd_upload_header::default(),
            )),
            FEDCDD_ERR_NULL_POINTER,
            &["upload"],
        );
        // Freeing NULL is fine.
        fedcdd_aggregator_free(std::ptr::null_mut());
        fedcdd_upload_free(std::ptr::null_mut());
    }
    let agg = Agg::new(&cfg);
    // SAFETY (every call below): as above.
    unsafe {
        expect_err(
            check(fedcdd_aggregator_set_global(agg.0, null_t, 2)),
            FEDCDD_ERR_NULL_POINTER,
            &["tensors"],
        );
        agg.set_global(&global).unwrap();
        expect_err(
            check(fedcdd_aggregator_add_client(agg.0, 4, 1.0, null_t, 1)),
            FEDCDD_ERR_NULL_POINTER,
            &["client 4", "tensors"],
        );
        let mut t = global[1].c();
        t.name = std::ptr::null();
        expect_err(
            agg.add_raw(4, 1.0, &[gc[0], t]),
            FEDCDD_ERR_NULL_POINTER,
            &["client 4", "tensors[1].name"],
        );
        let mut t = global[1].c();
        t.data = std::ptr::null();
        expect_err(
            agg.add_raw(4, 1.0, &[gc[0], t]),
            FEDCDD_ERR_NULL_POINTER,
            &["client 4", global[1].name(), "data"],
        );
        let mut t = global[1].c();
        t.shape = std::ptr::null();
        expect_err(
            agg.add_raw(4, 1.0, &[gc[0], t]),
            FEDCDD_ERR_NULL_POINTER,
            &["client 4", global[1].name(), "shape"],
        );
        expect_err(
            check(fedcdd_aggregator_add_upload(
                agg.0,
                std::ptr::null(),
                5,
                1.0,
            )),
            FEDCDD_ERR_NULL_POINTER,
            &["bytes"],
        );
        // An output without a buffer is caught before the round is aggregated.
        agg.add(1, 1.0, &global).unwrap();
        let outs = [fedcdd_output {
            name: global[0].name.as_ptr(),
            dtype: FEDCDD_DTYPE_F32,
            data: std::ptr::null_mut(),
            len: global[0].data.len(),
        }];
        expect_err(
            check(fedcdd_aggregator_finalize(agg.0, outs.as_ptr(), 1)),
            FEDCDD_ERR_NULL_POINTER,
            &["outputs[0]", global[0].name(), "data"],
        );
        expect_err(
            check(fedcdd_aggregator_finalize(agg.0, std::ptr::null(), 1)),
            FEDCDD_ERR_NULL_POINTER,
            &["outputs"],
        );
        // So is a misaligned one.
        let mut floats = vec![0.0f32; global[0].data.len() + 1];
        let outs = [fedcdd_output {
            data: floats.as_mut_ptr().cast::<u8>().add(2).cast(),
            ..outs[0]
        }];
        expect_err(
            check(fedcdd_aggregator_finalize(agg.0, outs.as_ptr(), 1)),
            FEDCDD_ERR_INVALID_ARGUMENT,
            &["outputs[0]", global[0].name(), "aligned"],
        );
        assert_eq!(
            agg.num_clients(),
            1,
            "the round survives a rejected finalize"
        );
        assert_eq!(agg.steps(), 0);
        let mut written = 0;
        expect_err(
            check(fedcdd_aggregator_save_state(
                agg.0,
                std::ptr::null_mut(),
                0,
                &mut written,
            )),
            FEDCDD_ERR_NULL_POINTER,
            &["out"],
        );
        assert!(written > 0, "the size is reported even without a buffer");
        let o = encode_options(1.0, 0.0, 0);
        expect_err(
            check(fedcdd_encode_upload_size(
                std::ptr::null(),
                gc.as_ptr(),
                gc.len(),
                gc.as_ptr(),
                gc.len(),
                &mut size,
            )),
            FEDCDD_ERR_NULL_POINTER,
            &["options"],
        );
        expect_err(
            check(fedcdd_encode_upload_size(
                &o,
                gc.as_ptr(),
                gc.len(),
                null_t,
                gc.len(),
                &mut size,
            )),
            FEDCDD_ERR_NULL_POINTER,
            &["local"],
        );
        expect_err(
            check(fedcdd_encode_upload(
                &o,
                gc.as_ptr(),
                gc.len(),
                gc.as_ptr(),
                gc.len(),
                std::ptr::null_mut(),
                100,
                &mut size,
            )),
            FEDCDD_ERR_NULL_POINTER,
            &["out"],
        );
    }
}

#[test]
fn wrong_lengths_and_shapes_name_the_client_and_tensor() {
    let global = lora_global(23);
    let agg = Agg::new(&config(FEDCDD_ALG_FEDCDD));
    agg.set_global(&global).unwrap();
    let ok = lora_clients(&global, 1, 24).remove(0).2;
    let name1 = global[1].name();

    // len ≠ product of the shape.
    let mut c = c_tensors(&ok);
    c[1].len -= 1;
    expect_err(
        agg.add_raw(3, 1.0, &c),
        FEDCDD_ERR_SHAPE,
        &["client 3", name1, "len is 47"],
    );
    // A shape other than the global's (same element count).
    let mut bad = ok.clone();
    bad[1] = Tensor::new(name1, &[4, 12], ok[1].data.clone());
    expect_err(
        agg.add(3, 1.0, &bad),
        FEDCDD_ERR_SHAPE,
        &["client 3", name1, "[4, 12]", "[12, 4]"],
    );
    // ndim 0 and 5.
    for ndim in [0, 5] {
        let mut c = c_tensors(&ok);
        let dims = [1usize; 5];
        c[1].shape = dims.as_ptr();
        c[1].ndim = ndim;
        expect_err(
            agg.add_raw(3, 1.0, &c),
            FEDCDD_ERR_SHAPE,
            &["client 3", name1, "ndim"],
        );
    }
    // Unknown, missing, repeated tensors; an unknown dtype; a misaligned pointer.
    let mut extra = ok.clone();
    extra.push(Tensor::new("nope.weight", &[2], vec![0.0, 0.0]));
    expect_err(
        agg.add(3, 1.0, &extra),
        FEDCDD_ERR_TENSOR_NAME,
        &["client 3", "nope.weight", "not a global tensor"],
    );
    expect_err(
        agg.add(3, 1.0, &ok[1..]),
        FEDCDD_ERR_TENSOR_NAME,
        &["client 3", global[0].name(), "missing"],
    );
    let mut twice = ok.clone();
    twice.push(ok[2].clone());
    expect_err(
        agg.add(3, 1.0, &twice),
        FEDCDD_ERR_TENSOR_NAME,
        &["client 3", global[2].name(), "twice"],
    );
    let mut c = c_tensors(&ok);
    c[0].dtype = 7;
    expect_err(
        agg.add_raw(3, 1.0, &c),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["client 3", global[0].name(), "dtype 7"],
    );
    // An f32 buffer is 4-byte aligned, so one byte in is not.
    let floats = [0.0f32; 41];
    let mut c = c_tensors(&ok);
    // SAFETY: pointer arithmetic inside `floats`; the library refuses it before reading.
    c[0].data = unsafe { floats.as_ptr().cast::<u8>().add(1) }.cast::<c_void>();
    expect_err(
        agg.add_raw(3, 1.0, &c),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["client 3", global[0].name(), "aligned"],
    );
    // Bad sample counts.
    for n in [-1.0, f64::NAN, f64::INFINITY, 1e300] {
        expect_err(agg.add(3, n, &ok), FEDCDD_ERR_BAD_WEIGHT, &["client 3"]);
    }
    assert_eq!(agg.num_clients(), 0, "no rejected client was added");

    // Output lengths, names and dtypes are checked before the round is aggregated.
    agg.add(3, 1.0, &ok).unwrap();
    let mut buf = vec![0.0f32; 39];
    let outs = [fedcdd_output {
        name: global[0].name.as_ptr(),
        dtype: FEDCDD_DTYPE_F32,
        data: buf.as_mut_ptr().cast(),
        len: buf.len(),
    }];
    // SAFETY: valid pointers.
    expect_err(
        check(unsafe { fedcdd_aggregator_finalize(agg.0, outs.as_ptr(), 1) }),
        FEDCDD_ERR_SHAPE,
        &[global[0].name(), "len is 39", "40"],
    );
    let unknown = CString::new("ghost").unwrap();
    let outs = [fedcdd_output {
        name: unknown.as_ptr(),
        ..outs[0]
    }];
    // SAFETY: valid pointers.
    expect_err(
        check(unsafe { fedcdd_aggregator_finalize(agg.0, outs.as_ptr(), 1) }),
        FEDCDD_ERR_TENSOR_NAME,
        &["ghost"],
    );
    assert_eq!(agg.num_clients(), 1);
    agg.finalize(&global).unwrap();

    // Global tensors: zero dimensions, repeated names.
    let z = Tensor {
        shape: vec![0, 4],
        ..Tensor::new("z", &[1], vec![0.0])
    };
    let mut zc = z.c();
    zc.len = 0;
    // SAFETY: valid pointers.
    expect_err(
        check(unsafe { fedcdd_aggregator_set_global(agg.0, &zc, 1) }),
        FEDCDD_ERR_SHAPE,
        &["\"z\"", "bad shape"],
    );
    expect_err(
        agg.set_global(&[global[0].clone(), global[0].clone()]),
        FEDCDD_ERR_TENSOR_NAME,
        &[global[0].name(), "twice"],
    );

    // Decoding into a buffer of the wrong length.
    let bytes = encode(&encode_options(0.5, 0.0, 1), &global, &ok).unwrap();
    let up = ParsedUpload::parse(&bytes).unwrap();
    expect_err(
        up.decode(1, 47),
        FEDCDD_ERR_SHAPE,
        &["record #1", name1, "47", "48"],
    );
    // Encoding with a local tensor of another shape.
    let mut local = ok.clone();
    local[1] = Tensor::new(name1, &[6, 8], ok[1].data.clone());
    expect_err(
        encode(&encode_options(1.0, 0.0, 1), &global, &local),
        FEDCDD_ERR_SHAPE,
        &[name1, "[6, 8]"],
    );
}

#[test]
fn nan_is_rejected_naming_client_and_tensor_and_never_reaches_the_global() {
    let global = lora_global(25);
    let clients = lora_clients(&global, 3, 26);
    for mode in [FEDCDD_MODE_BATCH, FEDCDD_MODE_STREAMING] {
        let mut c = config(FEDCDD_ALG_FEDCDD);
        c.mode = mode;
        let agg = Agg::new(&c);
        agg.set_global(&global).unwrap();
        let mut poisoned = clients[1].2.clone();
        poisoned[3].data[5] = f32::NAN;
        let mut inf = clients[1].2.clone();
        inf[0].data[0] = f32::INFINITY;
        for pass in 0..agg.passes() {
            if pass == 1 {
                agg.begin_pass2().unwrap();
            }
            for (id, n, ts) in &clients {
                if *id == clients[1].0 {
                    // The bad client is left out (of both passes).
                    expect_err(
                        agg.add(99, *n, &poisoned),
                        FEDCDD_ERR_NON_FINITE,
                        &["client 99", global[3].name(), "element 5"],
                    );
                    expect_err(
                        agg.add(98, *n, &inf),
                        FEDCDD_ERR_NON_FINITE,
                        &["client 98", global[0].name(), "element 0"],
                    );
                    continue;
                }
                agg.add(*id, *n, ts).unwrap();
            }
        }
        let got = agg.finalize(&global).unwrap();
        let without: Vec<_> = clients
            .iter()
            .filter(|c| c.0 != clients[1].0)
            .cloned()
            .collect();
        let reference = Agg::new(&c);
        reference.set_global(&global).unwrap();
        assert_eq!(got, reference.round(&without, &global).unwrap());
        assert!(got.iter().flatten().all(|v| v.is_finite()));
    }
    // NaN in a global, and in a local adapter to encode (f16 infinity too).
    let agg = Agg::new(&config(FEDCDD_ALG_FEDAVG));
    let mut g = global.clone();
    g[2].data[7] = f32::NAN;
    expect_err(
        agg.set_global(&g),
        FEDCDD_ERR_NON_FINITE,
        &["global tensor", global[2].name(), "element 7"],
    );
    let mut local = global.clone();
    local[4].data[1] = f32::NEG_INFINITY;
    expect_err(
        encode(&encode_options(0.5, 0.0, 1), &global, &local),
        FEDCDD_ERR_NON_FINITE,
        &["local", global[4].name(), "element 1"],
    );
    let agg = Agg::new(&config(FEDCDD_ALG_FEDCDD));
    agg.set_global(&global).unwrap();
    let inf16 = vec![f16::INFINITY.to_bits(); global[4].data.len()];
    let mut c = c_tensors(&clients[0].2);
    c[4].dtype = FEDCDD_DTYPE_F16;
    c[4].data = inf16.as_ptr().cast();
    expect_err(
        agg.add_raw(2, 1.0, &c),
        FEDCDD_ERR_NON_FINITE,
        &["client 2", global[4].name()],
    );
}

#[test]
fn hostile_upload_bytes_are_errors_not_crashes() {
    let global = lora_global(27);
    let local = lora_clients(&global, 1, 28).remove(0).2;
    let bytes = encode(&encode_options(0.4, 0.8, 5), &global, &local).unwrap();
    let agg = Agg::new(&config(FEDCDD_ALG_FEDCDD));
    agg.set_global(&global).unwrap();

    // Every truncation.
    for len in 0..bytes.len() {
        expect_err(
            ParsedUpload::parse(&bytes[..len]).map(|_| ()),
            FEDCDD_ERR_BAD_ENCODING,
            &["upload"],
        );
        expect_err(
            agg.add_upload(&bytes[..len], 1.0),
            FEDCDD_ERR_BAD_ENCODING,
            &["upload"],
        );
    }
    // Every single-byte change: the checksum catches it.
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x01;
        assert!(ParsedUpload::parse(&bad).is_err(), "byte {i}");
    }
    // Changes behind a valid checksum: parse or reject, and whatever parses decodes or
    // reports an error, into buffers of the declared size.
    let mut rng = Lcg(99);
    let mut parsed = 0;
    for _ in 0..3000 {
        let mut bad = bytes[..bytes.len() - 4].to_vec();
        for _ in 0..1 + (rng.next().abs() * 3.0) as usize {
            let i = (rng.next().abs() * bad.len() as f32) as usize % bad.len();
            bad[i] = (rng.next() * 127.0 + 128.0) as u8;
        }
        let crc = fedcdd_core::wire::crc32(&bad);
        bad.extend_from_slice(&crc.to_le_bytes());
        match ParsedUpload::parse(&bad) {
            Ok(up) => {
                parsed += 1;
                for k in 0..up.header().num_tensors {
                    let info = up.info(k).unwrap();
                    if info.numel <= 1 << 20 {
                        let _ = up.decode(k, info.numel);
                    }
                }
            }
            Err(f) => assert_eq!(f.status, FEDCDD_ERR_BAD_ENCODING, "{}", f.message),
        }
        let _ = agg.add_upload(&bad, 1.0);
        agg.reset_round();
    }
    assert!(parsed > 0, "some mutations keep a valid upload");
    // Random bytes, with and without the magic.
    for n in [0usize, 3, 8, 64, 1000] {
        let mut junk: Vec<u8> = (0..n).map(|_| (rng.next() * 127.0 + 128.0) as u8).collect();
        if n >= 4 {
            junk[..4].copy_from_slice(b"FCDU");
        }
        expect_err(
            agg.add_upload(&junk, 1.0),
            FEDCDD_ERR_BAD_ENCODING,
            &["upload"],
        );
    }
    // A valid upload whose tensor is not in the global is rejected by name.
    let other = vec![Tensor::new("other.weight", &[3], vec![1.0, 2.0, 3.0])];
    let foreign = encode(&encode_options(1.0, 0.0, 1), &other, &other).unwrap();
    expect_err(
        agg.add_upload(&foreign, 1.0),
        FEDCDD_ERR_TENSOR_NAME,
        &["client 0", "other.weight"],
    );
    assert_eq!(agg.num_clients(), 0);
    agg.add_upload(&bytes, 1.0).unwrap();
    assert_eq!(agg.num_clients(), 1);
}

#[test]
fn calls_out_of_order_are_errors() {
    let global = lora_global(29);
    let clients = lora_clients(&global, 3, 30);
    let mut c = config(FEDCDD_ALG_FEDCDD);
    c.mode = FEDCDD_MODE_STREAMING;
    let agg = Agg::new(&c);
    expect_err(
        agg.add(1, 1.0, &clients[0].2),
        FEDCDD_ERR_CALL_ORDER,
        &["set_global"],
    );
    agg.set_global(&global).unwrap();
    expect_err(agg.finalize(&global), FEDCDD_ERR_NO_CLIENTS, &["no client"]);
    expect_err(agg.begin_pass2(), FEDCDD_ERR_NO_CLIENTS, &["pass 1"]);
    for (id, n, ts) in &clients {
        agg.add(*id, *n, ts).unwrap();
    }
    expect_err(
        agg.add(clients[0].0, 1.0, &clients[0].2),
        FEDCDD_ERR_CALL_ORDER,
        &["already added"],
    );
    expect_err(agg.set_global(&global), FEDCDD_ERR_CALL_ORDER, &["round"]);
    // Finalising without pass 2 is refused, and the round stays open.
    expect_err(
        agg.finalize(&global),
        FEDCDD_ERR_CALL_ORDER,
        &["begin_pass2"],
    );
    agg.begin_pass2().unwrap();
    expect_err(agg.begin_pass2(), FEDCDD_ERR_CALL_ORDER, &["already"]);
    expect_err(
        agg.add(555, 1.0, &clients[0].2),
        FEDCDD_ERR_CALL_ORDER,
        &["client 555", "not added in pass 1"],
    );
    let (id0, n0, ts0) = &clients[0];
    expect_err(
        agg.add(*id0, n0 + 1.0, ts0),
        FEDCDD_ERR_CALL_ORDER,
        &[&format!("client {id0}"), "num_samples"],
    );
    let mut changed = ts0.clone();
    changed[2].data[0] += 1.0;
    expect_err(
        agg.add(*id0, *n0, &changed),
        FEDCDD_ERR_CALL_ORDER,
        &[&format!("client {id0}"), "changed"],
    );
    agg.add(*id0, *n0, ts0).unwrap();
    expect_err(
        agg.add(*id0, *n0, ts0),
        FEDCDD_ERR_CALL_ORDER,
        &["already added in pass 2"],
    );
    let missing = format!("{}, {}", clients[1].0, clients[2].0);
    expect_err(
        agg.finalize(&global),
        FEDCDD_ERR_CALL_ORDER,
        &[&missing, "not in pass 2"],
    );
    for (id, n, ts) in &clients[1..] {
        agg.add(*id, *n, ts).unwrap();
    }
    let got = agg.finalize(&global).unwrap();
    let want = core_fedcdd_streaming(&FedCddConfig::default(), &global, &clients);
    assert_eq!(got, want);

    // A one-pass streaming rule accepts a pass 2, which only checks the clients come again.
    let mut fc = config(FEDCDD_ALG_FEDAVG);
    fc.mode = FEDCDD_MODE_STREAMING;
    let once = Agg::new(&fc);
    once.set_global(&global).unwrap();
    assert_eq!(once.passes(), 1);
    let want = once.round(&clients, &global).unwrap();
    let twice = Agg::new(&fc);
    twice.set_global(&global).unwrap();
    for (id, n, ts) in &clients {
        twice.add(*id, *n, ts).unwrap();
    }
    twice.begin_pass2().unwrap();
    for (id, n, ts) in &clients[..2] {
        twice.add(*id, *n, ts).unwrap();
    }
    expect_err(
        twice.finalize(&global),
        FEDCDD_ERR_CALL_ORDER,
        &[&clients[2].0.to_string(), "not in pass 2"],
    );
    let (id2, n2, ts2) = &clients[2];
    twice.add(*id2, *n2, ts2).unwrap();
    assert_eq!(twice.finalize(&global).unwrap(), want);

    // Batch mode has no pass 2; reset_round drops a round.
    let batch = Agg::new(&config(FEDCDD_ALG_FEDCDD));
    batch.set_global(&global).unwrap();
    batch.add(1, 1.0, &clients[0].2).unwrap();
    expect_err(batch.begin_pass2(), FEDCDD_ERR_CALL_ORDER, &["batch"]);
    batch.reset_round();
    assert_eq!(batch.num_clients(), 0);
    expect_err(batch.finalize(&global), FEDCDD_ERR_NO_CLIENTS, &[]);

    // A failed aggregation (all sample counts 0) discards the round, keeps the global.
    batch.add(1, 0.0, &clients[0].2).unwrap();
    batch.add(2, 0.0, &clients[1].2).unwrap();
    expect_err(
        batch.finalize(&global),
        FEDCDD_ERR_BAD_WEIGHT,
        &["round discarded"],
    );
    assert_eq!(batch.num_clients(), 0);
    assert_eq!(batch.steps(), 0);
    assert_eq!(batch.get(&global[0]), global[0].data);
}

#[test]
fn bad_configs_are_refused() {
    let try_cfg = |f: &dyn Fn(&mut fedcdd_config)| {
        let mut c = config(FEDCDD_ALG_FEDCDD);
        f(&mut c);
        Agg::try_new(&c).map(|_| ())
    };
    expect_err(
        try_cfg(&|c| c.algorithm = 42),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["algorithm 42"],
    );
    expect_err(
        try_cfg(&|c| c.algorithm = FEDCDD_ALG_SCAFFOLD),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["SCAFFOLD"],
    );
    expect_err(
        try_cfg(&|c| c.algorithm = FEDCDD_ALG_FLORA),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["FLoRA"],
    );
    expect_err(
        try_cfg(&|c| c.mode = 3),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["mode 3"],
    );
    expect_err(
        try_cfg(&|c| c.norm_axis = 9),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["norm_axis"],
    );
    expect_err(
        try_cfg(&|c| c.target = 9),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["target"],
    );
    expect_err(
        try_cfg(&|c| c.weighting = 9),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["weighting"],
    );
    expect_err(
        try_cfg(&|c| {
            c.weighting = FEDCDD_WEIGHTING_SOFTMAX;
            c.softmax_temperature = 0.0;
        }),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["temperature"],
    );
    expect_err(
        try_cfg(&|c| c.server_lr = f32::NAN),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["server_lr"],
    );
    expect_err(
        try_cfg(&|c| {
            c.algorithm = FEDCDD_ALG_FEDADAM;
            c.tau = -1.0;
        }),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["tau"],
    );
    expect_err(
        try_cfg(&|c| {
            c.algorithm = FEDCDD_ALG_FEDYOGI;
            c.beta2 = 1.5;
        }),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["beta"],
    );
    expect_err(
        try_cfg(&|c| c.fedopt_variant = 2),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["fedopt_variant"],
    );
    // SAFETY: valid pointers.
    expect_err(
        check(unsafe { fedcdd_config_default(11, &mut config(0)) }),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["algorithm 11"],
    );
    // Encode options are checked too.
    let global = lora_global(31);
    for (keep, noise, needle) in [
        (0.0, 0.0, "keep ratio"),
        (1.5, 0.0, "keep ratio"),
        (0.5, -1.0, "noise"),
    ] {
        expect_err(
            encode(&encode_options(keep, noise, 0), &global, &global),
            FEDCDD_ERR_INVALID_ARGUMENT,
            &[needle],
        );
    }
    let mut o = encode_options(1.0, 0.0, 0);
    o.upload_dtype = 3;
    expect_err(
        encode(&o, &global, &global),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["dtype 3"],
    );
    let mut o = encode_options(1.0, 0.0, 0);
    o.importance = 3;
    expect_err(
        encode(&o, &global, &global),
        FEDCDD_ERR_INVALID_ARGUMENT,
        &["importance"],
    );
}
