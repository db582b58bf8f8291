//! Per-client clipping and the coordinate-wise robust rules of `fedcdd_core::robust` against
//! plain f64 references written here: clipping never increases a norm and is the identity
//! under the bound; median and trimmed mean equal a sort-and-pick reference; bad inputs are
//! errors naming the client; and what FedCDD does with a sign-flipped client.

mod common;

use common::*;
use fedcdd_core::{
    ErrorKind, FedCddConfig, Layout, StreamingFedCdd, TensorRole, TensorView, clip_scale,
    coordinate_median, median_in_place, trimmed_mean,
};

fn norm32(x: &[f32]) -> f64 {
    x.iter()
        .map(|v| (*v as f64) * (*v as f64))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn clipping_never_increases_a_norm_and_is_the_identity_under_the_bound() {
    let mut rng = Rng::new(3);
    for _ in 0..500 {
        let (len, scale) = (1 + rng.below(40), 10f64.powf(rng.range(-3.0, 3.0)));
        let x = rng.normal_vec(len, scale);
        let bound = 10f64.powf(rng.range(-2.0, 2.0)) as f32;
        let n = norm32(&x);
        let s = clip_scale(n as f32, bound).unwrap();
        assert!(s > 0.0 && s <= 1.0);
        let clipped: Vec<f32> = x.iter().map(|v| v * s).collect();
        let after = norm32(&clipped);
        assert!(after <= n * (1.0 + 1e-6), "norm grew: {n} -> {after}");
        assert!(
            after <= bound as f64 * (1.0 + 1e-5),
            "{after} over the bound {bound}"
        );
        if n <= bound as f64 * (1.0 - 1e-6) {
            assert_eq!(s, 1.0, "an update under the bound must pass unchanged");
        }
    }
    assert_eq!(clip_scale(0.0, 1.0).unwrap(), 1.0);
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            clip_scale(1.0, bad).unwrap_err().kind,
            ErrorKind::BadConfig(_)
        ));
    }
    assert_eq!(
        clip_scale(f32::NAN, 1.0).unwrap_err().kind,
        ErrorKind::NonFinite
    );
}

fn ref_median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ref_trimmed(mut v: Vec<f64>, trim: usize) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let kept = &v[trim..v.len() - trim];
    kept.iter().sum::<f64>() / kept.len() as f64
}

#[test]
fn median_and_trimmed_mean_match_a_sorting_reference() {
    let mut rng = Rng::new(9);
    for case in 0..200 {
        let n = 1 + rng.below(9);
        let len = 1 + rng.below(30);
        let clients: Vec<Vec<f32>> = (0..n).map(|_| rng.normal_vec(len, 2.0)).collect();
        let views: Vec<TensorView<'_>> = clients.iter().map(|c| TensorView::F32(c)).collect();
        let column = |j: usize| clients.iter().map(|c| c[j] as f64).collect::<Vec<f64>>();
        let mut out = vec![f32::NAN; len];
        let mut scratch = vec![f32::NAN; n];
        coordinate_median(&views, &mut out, &mut scratch).unwrap();
        for (j, o) in out.iter().enumerate() {
            let want = ref_median(column(j));
            assert!(
                (*o as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "case {case}"
            );
        }
        for trim in 0..n.div_ceil(2) {
            if 2 * trim >= n {
                assert!(trimmed_mean(&views, trim, &mut out, &mut scratch).is_err());
                continue;
            }
            trimmed_mean(&views, trim, &mut out, &mut scratch).unwrap();
            for (j, o) in out.iter().enumerate() {
                let want = ref_trimmed(column(j), trim);
                assert!(
                    (*o as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "case {case}"
                );
            }
        }
        let mut v: Vec<f32> = column(0).iter().map(|x| *x as f32).collect();
        let m = median_in_place(&mut v).unwrap() as f64;
        assert!((m - ref_median(column(0))).abs() <= 1e-6 * (1.0 + m.abs()));
    }
}

/// One client far out: the median and a trimmed mean stay with the others, the mean does not.
#[test]
fn an_outlier_moves_the_mean_but_not_the_robust_rules() {
    let honest = [1.0f32, 1.1, 0.9, 1.05];
    let clients: Vec<Vec<f32>> = honest
        .iter()
        .map(|&v| vec![v; 3])
        .chain([vec![1000.0; 3]])
        .collect();
    let views: Vec<TensorView<'_>> = clients.iter().map(|c| TensorView::F32(c)).collect();
    let (mut out, mut scratch) = (vec![0.0; 3], vec![0.0; 5]);
    coordinate_median(&views, &mut out, &mut scratch).unwrap();
    assert_eq!(out, vec![1.05; 3]);
    trimmed_mean(&views, 1, &mut out, &mut scratch).unwrap();
    assert!(
        out.iter()
            .all(|v| (v - (1.0 + 1.1 + 1.05) / 3.0).abs() < 1e-6)
    );
}

#[test]
fn bad_inputs_are_errors_naming_the_client() {
    let a = vec![1.0f32, 2.0];
    let b = vec![1.0f32, f32::NAN];
    let c = vec![1.0f32];
    let mut out = vec![0.0; 2];
    let mut scratch = vec![0.0; 3];
    let e = coordinate_median(
        &[TensorView::F32(&a), TensorView::F32(&b)],
        &mut out,
        &mut scratch,
    )
    .unwrap_err();
    assert_eq!((e.kind, e.client), (ErrorKind::NonFinite, Some(1)));
    let e = trimmed_mean(
        &[TensorView::F32(&a), TensorView::F32(&c)],
        0,
        &mut out,
        &mut scratch,
    )
    .unwrap_err();
    assert_eq!(e.client, Some(1));
    assert!(matches!(e.kind, ErrorKind::ShapeMismatch { .. }));
    let e = coordinate_median(&[], &mut out, &mut scratch).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoClients);
    let e = coordinate_median(&[TensorView::F32(&a); 4], &mut out, &mut scratch).unwrap_err();
    assert_eq!(e.kind, ErrorKind::BufferTooSmall { needed: 4 });
    assert!(median_in_place(&mut []).is_err());
}

/// A sign-flipped client under FedCDD: its direction disagrees with every honest client, so
/// its agreement `v_i` is negative and its direction weight is 0 (p_relu) — but its
/// magnitudes still enter the consensus `m̄` in full, scaled up ×10 here: the step grows
/// ×(1 + 9·p) along the honest direction. Clipping the attacker to the honest norm removes
/// that.
#[test]
fn a_sign_flipped_client_under_fedcdd() {
    let mut rng = Rng::new(21);
    let (rows, cols) = (6, 4);
    let base = rng.normal_vec(rows * cols, 1.0);
    let honest: Vec<Vec<f32>> = (0..3)
        .map(|_| {
            let noise = rng.normal_vec(rows * cols, 0.1);
            base.iter().zip(noise).map(|(b, e)| b + e).collect()
        })
        .collect();
    let attacker: Vec<f32> = honest[0].iter().map(|v| -10.0 * v).collect();
    let layout = Layout::new(rows, cols, TensorRole::LoraA);
    let g = vec![0.0f32; rows * cols];
    let run = |clients: &[&[f32]]| {
        let cfg = FedCddConfig::default();
        let mut ws = vec![0.0; StreamingFedCdd::workspace_len(&cfg, &layout)];
        let mut agg = StreamingFedCdd::new(cfg, layout, TensorView::F32(&g), &mut ws).unwrap();
        for (i, c) in clients.iter().enumerate() {
            agg.pass1(i as u32, 1.0, TensorView::F32(c)).unwrap();
        }
        let mut v = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            v.push(agg.pass2(i as u32, 1.0, TensorView::F32(c)).unwrap());
        }
        let mut out = vec![0.0; rows * cols];
        let summary = agg.finish(&mut out).unwrap();
        let weights: Vec<f32> = v.iter().map(|a| summary.weight_of(a)).collect();
        (out, v, weights)
    };
    let honest_refs: Vec<&[f32]> = honest.iter().map(|h| h.as_slice()).collect();
    let (clean, _, _) = run(&honest_refs);
    let mut with = honest_refs.clone();
    with.push(&attacker);
    let (attacked, agreement, weights) = run(&with);
    assert!(
        agreement[3].v < 0.0,
        "the flipped client disagrees: {agreement:?}"
    );
    assert_eq!(weights[3], 0.0, "its direction weight is 0");
    // Same direction as without it, larger magnitude: each column's consensus grew.
    let cos = {
        let dot: f64 = clean
            .iter()
            .zip(&attacked)
            .map(|(a, b)| (a * b) as f64)
            .sum();
        dot / (norm32(&clean) * norm32(&attacked))
    };
    assert!(cos > 0.999, "direction kept: cos {cos}");
    let grow = norm32(&attacked) / norm32(&clean);
    assert!(grow > 2.5, "the magnitude goes in unbounded: ×{grow}");
    // Clipped to the largest honest norm, the attacker's magnitudes are bounded like theirs.
    let bound = honest.iter().map(|h| norm32(h)).fold(0.0, f64::max) as f32;
    let s = clip_scale(norm32(&attacker) as f32, bound).unwrap();
    let clipped: Vec<f32> = attacker.iter().map(|v| v * s).collect();
    with[3] = &clipped;
    let (bounded, _, _) = run(&with);
    let grow = norm32(&bounded) / norm32(&clean);
    assert!(grow < 1.2, "clipped: ×{grow}");
}
