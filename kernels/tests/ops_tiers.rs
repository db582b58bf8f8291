//! Every instruction-set tier of the fast CPU ops (baseline, AVX2+FMA, AVX-512 — those this
//! CPU has) against the plain reference. One test, since the tier cap is process-wide.

use fedcdd_kernels::cpu::ops::{Isa, detected_isa, isa, set_max_isa};
use fedcdd_kernels::{AdamW, AttnShape, Backend, Cpu, RopeScaling, RopeShape, RopeTable, Sgd};
use fedcdd_kernels::{WeightDType, WeightSource};

struct Rng(u64);

impl Rng {
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }
}

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * scale, "{what}[{i}]: {g} vs {w}");
    }
}

fn bits(got: &[f32], want: &[f32], what: &str) {
    let same = got
        .iter()
        .zip(want)
        .all(|(g, w)| g.to_bits() == w.to_bits());
    assert!(same && got.len() == want.len(), "{what}: not bit for bit");
}

fn attention(
    b: &Cpu,
    s: AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
) -> Vec<Vec<f32>> {
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; s.batch * s.q_heads * s.q_len];
    b.attention_forward(&q.to_vec(), &k.to_vec(), &v.to_vec(), &mut out, &mut lse, s);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    let (q, k, v, dout) = (q.to_vec(), k.to_vec(), v.to_vec(), dout.to_vec());
    b.attention_backward(&q, &k, &v, &out, &lse, &dout, &mut dq, &mut dk, &mut dv, s);
    vec![out, lse, dq, dk, dv]
}

fn check_tier(tier: Isa) {
    let r = Cpu::reference();
    let f = Cpu::new(2).expect("2 threads");
    let mut rng = Rng(tier as u64 + 1);
    let t = format!("{tier:?}");

    // attention: group sizes 1/2/4, odd head_dim, a KV cache with spare rows and an offset
    for s in [
        AttnShape {
            batch: 2,
            q_len: 70,
            kv_len: 70,
            kv_stride: 70,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 32,
            q_pos0: 0,
            scale: 0.17,
        },
        AttnShape {
            batch: 1,
            q_len: 33,
            kv_len: 33,
            kv_stride: 33,
            q_heads: 4,
            kv_heads: 1,
            head_dim: 19,
            q_pos0: 0,
            scale: 0.3,
        },
        AttnShape {
            batch: 1,
            q_len: 5,
            kv_len: 90,
            kv_stride: 100,
            q_heads: 2,
            kv_heads: 2,
            head_dim: 64,
            q_pos0: 85,
            scale: 0.125,
        },
    ] {
        let nq = s.batch * s.q_len * s.q_heads * s.head_dim;
        let nk = s.batch * s.kv_stride * s.kv_heads * s.head_dim;
        let (q, k, v, dout) = (
            rng.vec(nq, 3.0),
            rng.vec(nk, 1.0),
            rng.vec(nk, 1.0),
            rng.vec(nq, 1.0),
        );
        let want = attention(&r, s, &q, &k, &v, &dout);
        let got = attention(&f, s, &q, &k, &v, &dout);
        for (i, name) in ["out", "lse", "dq", "dk", "dv"].iter().enumerate() {
            close(
                &got[i],
                &want[i],
                1e-4,
                &format!("{t} attention {name} {s:?}"),
            );
        }
    }

    // cross-entropy with an ignored row, with and without gradient
    let (rows, vocab) = (6, 1003);
    let logits = rng.vec(rows * vocab, 10.0);
    let targets = vec![5, -100, 1002, 0, 77, 500];
    for grad in [None, Some(0.2f32)] {
        let (mut wl, mut gl) = (logits.clone(), logits.clone());
        let (mut wr, mut gr) = (vec![0.0; rows], vec![0.0; rows]);
        let ws = r.cross_entropy(&mut wl, &targets, &mut wr, vocab, -100, grad);
        let gs = f.cross_entropy(&mut gl, &targets, &mut gr, vocab, -100, grad);
        assert_eq!(ws.count, gs.count);
        assert!(
            (ws.sum - gs.sum).abs() < 1e-5 * ws.sum.abs(),
            "{t} cross-entropy sum"
        );
        close(&gr, &wr, 1e-5, &format!("{t} cross-entropy rows"));
        close(&gl, &wl, 1e-5, &format!("{t} cross-entropy grad"));
    }

    // RMSNorm, SwiGLU, RoPE
    let (rows, dim) = (9, 200);
    let x = rng.vec(rows * dim, 2.0);
    let w = f
        .weight(&WeightSource::from_f32(rng.vec(dim, 1.0), 1, dim))
        .expect("weight");
    assert_eq!(f.weight_dims(&w), (1, dim));
    let (mut wy, mut gy, mut wrs, mut grs) = (
        vec![0.0; rows * dim],
        vec![0.0; rows * dim],
        vec![0.0; rows],
        vec![0.0; rows],
    );
    r.rmsnorm_forward(&x, &w, &mut wy, &mut wrs, rows, dim, 1e-5);
    f.rmsnorm_forward(&x, &w, &mut gy, &mut grs, rows, dim, 1e-5);
    close(&gy, &wy, 2e-6, &format!("{t} rmsnorm y"));
    let dy = rng.vec(rows * dim, 1.0);
    let (mut wdx, mut gdx) = (vec![0.0; rows * dim], vec![0.0; rows * dim]);
    r.rmsnorm_backward(&dy, &x, &w, &wrs, &mut wdx, rows, dim, false);
    f.rmsnorm_backward(&dy, &x, &w, &wrs, &mut gdx, rows, dim, false);
    close(&gdx, &wdx, 2e-6, &format!("{t} rmsnorm dx"));
    let up = rng.vec(rows * dim, 1.0);
    let gate: Vec<f32> = rng.vec(rows * dim, 20.0);
    let (mut wo, mut go) = (vec![0.0; rows * dim], vec![0.0; rows * dim]);
    r.swiglu_forward(&gate, &up, &mut wo);
    f.swiglu_forward(&gate, &up, &mut go);
    close(&go, &wo, 1e-6, &format!("{t} swiglu"));
    let (mut a, mut b, mut c, mut d) = (
        vec![0.0; rows * dim],
        vec![0.0; rows * dim],
        vec![0.0; rows * dim],
        vec![0.0; rows * dim],
    );
    r.swiglu_backward(&gate, &up, &dy, &mut a, &mut b);
    f.swiglu_backward(&gate, &up, &dy, &mut c, &mut d);
    close(&c, &a, 1e-6, &format!("{t} swiglu dgate"));
    close(&d, &b, 1e-6, &format!("{t} swiglu dup"));
    let table = RopeTable::new(20, 10_000.0, RopeScaling::None, 16);
    let s = RopeShape {
        batch: 2,
        seq: 5,
        heads: 3,
        head_dim: 20,
        pos0: 9,
    };
    let x = rng.vec(2 * 5 * 3 * 20, 1.0);
    let (mut wx, mut gx) = (x.clone(), x.clone());
    r.rope(&mut wx, &table.cos, &table.sin, s, false);
    f.rope(&mut gx, &table.cos, &table.sin, s, false);
    bits(&gx, &wx, &format!("{t} rope"));

    // elementwise ops and optimizers: the same bits
    let n = 40_003;
    let (x, g) = (rng.vec(n, 1.0), rng.vec(n, 0.1));
    let (mut wy, mut gy) = (rng.vec(n, 1.0), vec![0.0; n]);
    gy.copy_from_slice(&wy);
    r.axpy(&mut wy, 0.3, &x);
    f.axpy(&mut gy, 0.3, &x);
    bits(&gy, &wy, &format!("{t} axpy"));
    let (mut wo, mut go) = (vec![0.0; n], vec![0.0; n]);
    r.dropout_forward(&x, &mut wo, 0.2, 11);
    f.dropout_forward(&x, &mut go, 0.2, 11);
    bits(&go, &wo, &format!("{t} dropout"));
    let ss = (r.sum_squares(&x), f.sum_squares(&x));
    assert!((ss.0 - ss.1).abs() <= 1e-12 * ss.0, "{t} sum_squares");
    let hp = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let (mut wp, mut wm, mut wv) = (x.clone(), vec![0.0; n], vec![0.0; n]);
    let (mut gp, mut gm, mut gv) = (x.clone(), vec![0.0; n], vec![0.0; n]);
    for step in 1..=3 {
        r.adamw_step(&mut wp, &g, &mut wm, &mut wv, hp, step);
        f.adamw_step(&mut gp, &g, &mut gm, &mut gv, hp, step);
    }
    bits(&gp, &wp, &format!("{t} adamw"));
    let hp = Sgd {
        lr: 0.1,
        momentum: 0.9,
        dampening: 0.1,
        weight_decay: 0.01,
        nesterov: true,
    };
    let (mut wp, mut wb, mut gp, mut gb) = (x.clone(), vec![0.0; n], x.clone(), vec![0.0; n]);
    for first in [true, false] {
        r.sgd_step(&mut wp, &g, &mut wb, hp, first);
        f.sgd_step(&mut gp, &g, &mut gb, hp, first);
    }
    bits(&gp, &wp, &format!("{t} sgd"));

    // embedding from a bf16 table
    let table: Vec<u8> = rng
        .vec(50 * 8, 1.0)
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let src = WeightSource {
        bytes: std::sync::Arc::new(table),
        offset: 0,
        dtype: WeightDType::Bf16,
        rows: 50,
        cols: 8,
    };
    let (rt, ft) = (
        r.weight(&src).expect("table"),
        f.weight(&src).expect("table"),
    );
    let ids = vec![3, 49, 0, 3];
    let (mut wo, mut go) = (vec![0.0; 32], vec![0.0; 32]);
    r.embedding_forward(&rt, &ids, &mut wo);
    f.embedding_forward(&ft, &ids, &mut go);
    bits(&go, &wo, &format!("{t} embedding"));
}

#[test]
fn every_tier_matches_the_reference() {
    let best = detected_isa();
    for tier in [Isa::Generic, Isa::Avx2, Isa::Avx512] {
        if tier > best {
            eprintln!("skipping {tier:?}: this CPU tops out at {best:?}");
            continue;
        }
        set_max_isa(tier);
        assert_eq!(isa(), tier);
        check_tier(tier);
    }
    set_max_isa(Isa::Avx512);
    assert_eq!(isa(), best);
}
