//! The upload wire format: round trips, exact sizes, writer rejections, a byte-exact
//! independent encoder, targeted malformed uploads, and a bounded mutation fuzzer that checks
//! that no byte string makes the decoder (or reconstructing a decoded upload) panic.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};

use common::*;
use fedcdd_core::wire::{MAGIC, MAX_ELEMENTS, MAX_NAME_LEN, VERSION, crc32};
use fedcdd_core::{
    DType, Error, ErrorKind, Importance, Payload, TensorRole, Upload, UploadHeader, UploadWriter,
    bf16, f16,
};

// ---------------------------------------------------------------------------------------------
// An independent encoder (postcard's format as documented in core/src/wire.rs)
// ---------------------------------------------------------------------------------------------

fn varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// `magic version round client samples count`: the magic raw, the integers as varints.
fn enc_header(
    magic: [u8; 4],
    version: u16,
    round: u32,
    client: u32,
    samples: u64,
    n: u32,
) -> Vec<u8> {
    let mut out = magic.to_vec();
    for v in [
        version as u64,
        round as u64,
        client as u64,
        samples,
        n as u64,
    ] {
        varint(&mut out, v);
    }
    out
}

#[derive(Clone, Copy)]
enum Head {
    Dense,
    /// importance variant (0 ColumnL2, 1 ElementAbs, 2 RowL2), K, σ, seed
    Masked(u8, u32, f32, u64),
}

/// `name dims dtype payload`: name = varint length + UTF-8; dims = varint count + varints;
/// dtype and payload = varint variant indices; σ as 4 little-endian bytes.
fn enc_head(out: &mut Vec<u8>, name: &[u8], dims: &[u32], dtype: u8, head: Head) {
    varint(out, name.len() as u64);
    out.extend_from_slice(name);
    varint(out, dims.len() as u64);
    for &d in dims {
        varint(out, d as u64);
    }
    varint(out, dtype as u64);
    match head {
        Head::Dense => varint(out, 0),
        Head::Masked(imp, k, sigma, seed) => {
            varint(out, 1);
            varint(out, imp as u64);
            varint(out, k as u64);
            out.extend_from_slice(&sigma.to_le_bytes());
            varint(out, seed);
        }
    }
}

fn with_crc(mut body: Vec<u8>) -> Vec<u8> {
    let c = Crc32::new().checksum(&body);
    body.extend_from_slice(&c.to_le_bytes());
    body
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

// ---------------------------------------------------------------------------------------------
// Writing with the core writer
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
enum Values {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

#[derive(Clone)]
struct Tensor {
    name: String,
    dims: Vec<usize>,
    values: Values,
    /// (importance, kept, σ, seed) for a masked record; `values` are then the kept columns.
    masked: Option<(Importance, Vec<u32>, f32, u64)>,
}

fn write_all(w: &mut UploadWriter<'_>, tensors: &[Tensor]) -> Result<(), Error> {
    for t in tensors {
        match (&t.masked, &t.values) {
            (None, Values::F32(v)) => w.dense(&t.name, &t.dims, v)?,
            (None, Values::F16(v)) => w.dense(&t.name, &t.dims, v)?,
            (None, Values::BF16(v)) => w.dense(&t.name, &t.dims, v)?,
            (Some((imp, kept, s, seed)), Values::F32(v)) => {
                w.masked(&t.name, &t.dims, *imp, kept, v, *s, *seed)?
            }
            (Some((imp, kept, s, seed)), Values::F16(v)) => {
                w.masked(&t.name, &t.dims, *imp, kept, v, *s, *seed)?
            }
            (Some((imp, kept, s, seed)), Values::BF16(v)) => {
                w.masked(&t.name, &t.dims, *imp, kept, v, *s, *seed)?
            }
        }
    }
    Ok(())
}

/// Measures, then writes into a buffer of exactly the measured size.
fn build(header: UploadHeader, tensors: &[Tensor]) -> Vec<u8> {
    let mut m = UploadWriter::measure(header).unwrap();
    write_all(&mut m, tensors).unwrap();
    let len = m.finish().unwrap();
    let mut buf = vec![0xAAu8; len];
    let mut w = UploadWriter::new(&mut buf, header).unwrap();
    write_all(&mut w, tensors).unwrap();
    assert_eq!(
        w.finish().unwrap(),
        len,
        "measure() and the real write disagree"
    );
    buf
}

fn dense(name: &str, dims: &[usize], values: Values) -> Tensor {
    Tensor {
        name: name.to_string(),
        dims: dims.to_vec(),
        values,
        masked: None,
    }
}

fn masked(
    name: &str,
    dims: &[usize],
    imp: Importance,
    kept: &[u32],
    values: Values,
    sigma: f32,
    seed: u64,
) -> Tensor {
    Tensor {
        name: name.to_string(),
        dims: dims.to_vec(),
        values,
        masked: Some((imp, kept.to_vec(), sigma, seed)),
    }
}

fn rand_f32(rng: &mut Rng, n: usize) -> Vec<f32> {
    rng.normal_vec(n, 1.0)
}

/// A varied set of tensors: dense f32/f16/bf16 of 1–4 dims, masked of both importances.
fn sample_tensors(rng: &mut Rng) -> Vec<Tensor> {
    let f16v = |rng: &mut Rng, n: usize| {
        Values::F16(rand_f32(rng, n).iter().map(|&v| f16::from_f32(v)).collect())
    };
    let bf16v = |rng: &mut Rng, n: usize| {
        Values::BF16(
            rand_f32(rng, n)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect(),
        )
    };
    vec![
        dense(
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            &[4, 16],
            Values::F32(rand_f32(rng, 64)),
        ),
        dense(
            "model.layers.0.self_attn.q_proj.lora_B.weight",
            &[16, 4],
            f16v(rng, 64),
        ),
        dense("model.norm.bias", &[7], bf16v(rng, 7)),
        dense(
            "conv.lora_A.weight",
            &[2, 3, 2, 2],
            Values::F32(rand_f32(rng, 24)),
        ),
        masked(
            "model.layers.1.mlp.up_proj.lora_A.weight",
            &[4, 16],
            Importance::ColumnL2,
            &[1, 5, 15],
            Values::F32(rand_f32(rng, 12)),
            0.25,
            42,
        ),
        masked(
            "model.layers.1.mlp.up_proj.lora_B.weight",
            &[16, 4],
            Importance::ElementAbs,
            &[0, 2, 63],
            f16v(rng, 3),
            0.0,
            u64::MAX,
        ),
        masked(
            "x",
            &[3, 3],
            Importance::ColumnL2,
            &[0, 1, 2],
            bf16v(rng, 9),
            1.5,
            7,
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Round trip
// ---------------------------------------------------------------------------------------------

#[test]
fn crc32_check_value() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32(b""), 0);
    let mine = Crc32::new();
    assert_eq!(mine.checksum(b"123456789"), 0xCBF4_3926);
    let mut rng = Rng::new(50);
    for n in [1usize, 3, 64, 1000] {
        let b = rng.bytes(n);
        assert_eq!(crc32(&b), mine.checksum(&b));
    }
}

#[test]
fn round_trip_preserves_header_names_dims_and_values() {
    let mut rng = Rng::new(51);
    let tensors = sample_tensors(&mut rng);
    let header = UploadHeader::new(123_456, 0xFFFF_FFFF, u64::MAX - 1, tensors.len() as u32);
    let bytes = build(header, &tensors);
    let up = Upload::parse(&bytes).unwrap();
    assert_eq!(up.header, header);
    assert_eq!(up.header.magic, MAGIC);
    assert_eq!(up.header.version, VERSION);
    assert_eq!(up.byte_len, bytes.len());
    let mut records_len = 0;
    let mut n = 0;
    for (i, rec) in up.records().enumerate() {
        let rec = rec.unwrap();
        let t = &tensors[i];
        n += 1;
        records_len += rec.encoded_len;
        assert_eq!(rec.index, i as u32);
        assert_eq!(rec.name, t.name);
        let dims: Vec<usize> = rec.dims.iter().map(|&d| d as usize).collect();
        assert_eq!(dims, t.dims);
        let p: usize = t.dims.iter().product();
        assert_eq!(rec.layout.len(), p);
        assert_eq!(
            rec.layout.rows,
            if t.dims.len() == 1 { 1 } else { t.dims[0] }
        );
        assert_eq!(rec.layout.role, TensorRole::from_name(&t.name));
        let dtype = match t.values {
            Values::F32(_) => DType::F32,
            Values::F16(_) => DType::F16,
            Values::BF16(_) => DType::BF16,
        };
        assert_eq!(rec.dtype, dtype);
        let stored: Vec<f32> = match &t.values {
            Values::F32(v) => v.clone(),
            Values::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Values::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        };
        let mut out = vec![f32::NAN; p];
        rec.reconstruct(&mut out).unwrap();
        match (&t.masked, rec.payload) {
            (None, Payload::Dense { values }) => {
                assert_eq!(values.len(), p * dtype.size());
                assert_eq!(rec.kept_count(), rec.layout.cols);
                assert_eq!(rec.kept_index(0), None);
                for (a, b) in out.iter().zip(&stored) {
                    assert_eq!(a.to_bits(), b.to_bits(), "{}", t.name);
                }
            }
            (
                Some((imp, kept, sigma, seed)),
                Payload::Masked {
                    importance,
                    kept: kept_bytes,
                    values,
                    sigma: s,
                    seed: sd,
                },
            ) => {
                assert_eq!(
                    (importance, s.to_bits(), sd),
                    (*imp, sigma.to_bits(), *seed)
                );
                assert_eq!(kept_bytes, u32_bytes(kept).as_slice());
                assert_eq!(values.len(), stored.len() * dtype.size());
                assert_eq!(rec.kept_count(), kept.len());
                for (k, &j) in kept.iter().enumerate() {
                    assert_eq!(rec.kept_index(k), Some(j));
                }
                assert_eq!(rec.kept_index(kept.len()), None);
                // Kept columns come back exact.
                let (rows, cols) = imp.units(&rec.layout);
                for (c, &j) in kept.iter().enumerate() {
                    for r in 0..rows {
                        assert_eq!(
                            out[r * cols + j as usize].to_bits(),
                            stored[c * rows + r].to_bits()
                        );
                    }
                }
                assert!(out.iter().all(|v| v.is_finite()));
            }
            _ => panic!("{}: wrong payload kind", t.name),
        }
        // Wrong output length: an error naming the tensor.
        let mut short = vec![0.0f32; p - 1];
        let e = rec.reconstruct(&mut short).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::ShapeMismatch { .. }));
        assert_eq!(e.tensor, Some(i as u32));
    }
    assert_eq!(n, tensors.len());
    // The records plus a header and the checksum make up the whole upload.
    let header_len = enc_header(MAGIC, VERSION, 123_456, 0xFFFF_FFFF, u64::MAX - 1, n as u32).len();
    assert_eq!(header_len + records_len + 4, bytes.len());
}

/// The writer's bytes are exactly what the documented layout says (an independent encoder
/// produces the same bytes).
#[test]
fn writer_bytes_match_documented_layout() {
    let a = [1.5f32, -2.0, 0.25, 8.0, 3.0, -1.0];
    let kept_vals = [9.0f32, 7.0];
    let tensors = vec![
        dense("a.lora_A.weight", &[2, 3], Values::F32(a.to_vec())),
        masked(
            "b",
            &[2, 1, 4],
            Importance::ColumnL2,
            &[3],
            Values::F32(kept_vals.to_vec()),
            0.5,
            300,
        ),
        masked(
            "c",
            &[5],
            Importance::ElementAbs,
            &[0, 4],
            Values::F32(vec![1.0, 2.0]),
            0.0,
            0,
        ),
    ];
    let header = UploadHeader::new(7, 300, 1_000_000, 3);
    let got = build(header, &tensors);
    let mut want = enc_header(MAGIC, 1, 7, 300, 1_000_000, 3);
    enc_head(&mut want, b"a.lora_A.weight", &[2, 3], 0, Head::Dense);
    want.extend(f32_bytes(&a));
    enc_head(&mut want, b"b", &[2, 1, 4], 0, Head::Masked(0, 1, 0.5, 300));
    want.extend(u32_bytes(&[3]));
    want.extend(f32_bytes(&kept_vals));
    enc_head(&mut want, b"c", &[5], 0, Head::Masked(1, 2, 0.0, 0));
    want.extend(u32_bytes(&[0, 4]));
    want.extend(f32_bytes(&[1.0, 2.0]));
    assert_eq!(got, with_crc(want));
    // f16 / bf16 dtype variants are 1 and 2, values 2 bytes each.
    let h = [f16::from_f32(1.0), f16::from_f32(-2.0)];
    let b = [bf16::from_f32(0.5)];
    let got = build(
        UploadHeader::new(0, 0, 0, 2),
        &[
            dense("h", &[2], Values::F16(h.to_vec())),
            dense("b", &[1, 1], Values::BF16(b.to_vec())),
        ],
    );
    let mut want = enc_header(MAGIC, 1, 0, 0, 0, 2);
    enc_head(&mut want, b"h", &[2], 1, Head::Dense);
    want.extend(h.iter().flat_map(|v| v.to_bits().to_le_bytes()));
    enc_head(&mut want, b"b", &[1, 1], 2, Head::Dense);
    want.extend(b.iter().flat_map(|v| v.to_bits().to_le_bytes()));
    assert_eq!(got, with_crc(want));
}

#[test]
fn measure_is_exact_and_empty_upload_works() {
    let mut rng = Rng::new(52);
    let all = sample_tensors(&mut rng);
    for k in 0..=all.len() {
        let h = UploadHeader::new(1, 2, 3, k as u32);
        let bytes = build(h, &all[..k]);
        let up = Upload::parse(&bytes).unwrap();
        assert_eq!(up.records().count(), k);
    }
}

#[test]
fn every_too_small_buffer_is_buffer_too_small() {
    let mut rng = Rng::new(53);
    let tensors = sample_tensors(&mut rng);
    let header = UploadHeader::new(1, 2, 3, tensors.len() as u32);
    let full = build(header, &tensors);
    for len in 0..full.len() {
        let mut buf = vec![0u8; len];
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut w = UploadWriter::new(&mut buf, header)?;
            write_all(&mut w, &tensors)?;
            w.finish()
        }));
        match result {
            Err(_) => panic!("writer panicked with a {len}-byte buffer"),
            Ok(Ok(n)) => panic!("a {len}-byte buffer took a {n}-byte upload"),
            Ok(Err(e)) => match e.kind {
                ErrorKind::BufferTooSmall { needed } => {
                    assert!(
                        needed > len && needed <= full.len(),
                        "len {len}: needed {needed}"
                    )
                }
                k => panic!("len {len}: {k:?}"),
            },
        }
    }
}

#[test]
fn tensor_count_must_match_the_header() {
    let t = dense("t", &[2], Values::F32(vec![1.0, 2.0]));
    // More than declared.
    let mut buf = vec![0u8; 256];
    let mut w = UploadWriter::new(&mut buf, UploadHeader::new(0, 0, 1, 2)).unwrap();
    write_all(&mut w, &[t.clone(), t.clone()]).unwrap();
    let e = write_all(&mut w, std::slice::from_ref(&t)).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::BadEncoding(_)), "{e:?}");
    assert_eq!(e.tensor, Some(2));
    // Fewer than declared.
    let mut w = UploadWriter::new(&mut buf, UploadHeader::new(0, 0, 1, 2)).unwrap();
    write_all(&mut w, std::slice::from_ref(&t)).unwrap();
    assert!(matches!(
        w.finish().unwrap_err().kind,
        ErrorKind::BadConfig(_)
    ));
    let m = UploadWriter::measure(UploadHeader::new(0, 0, 1, 1)).unwrap();
    assert!(m.finish().is_err());
    // A header without MAGIC/VERSION.
    let mut h = UploadHeader::new(0, 0, 1, 1);
    h.version = 2;
    assert!(matches!(
        UploadWriter::new(&mut buf, h).err().unwrap().kind,
        ErrorKind::BadConfig(_)
    ));
    let mut h = UploadHeader::new(0, 0, 1, 1);
    h.magic = *b"XXXX";
    assert!(matches!(
        UploadWriter::measure(h).err().unwrap().kind,
        ErrorKind::BadConfig(_)
    ));
}

#[test]
fn writer_rejects_bad_tensors() {
    let long_name = "n".repeat(MAX_NAME_LEN + 1);
    let ok_name = "n".repeat(MAX_NAME_LEN);
    let mut buf = vec![0u8; 1 << 16];
    let mut try_one = |t: Tensor| -> Result<(), Error> {
        let mut w = UploadWriter::new(&mut buf, UploadHeader::new(0, 0, 1, 1))?;
        write_all(&mut w, &[t])?;
        w.finish().map(|_| ())
    };
    let v4 = Values::F32(vec![1.0; 4]);
    assert!(try_one(dense(&ok_name, &[4], v4.clone())).is_ok());
    let bad: Vec<(&str, Tensor)> = vec![
        ("empty name", dense("", &[4], v4.clone())),
        ("long name", dense(&long_name, &[4], v4.clone())),
        ("no dims", dense("t", &[], v4.clone())),
        ("zero dim", dense("t", &[4, 0], v4.clone())),
        ("five dims", dense("t", &[1, 1, 1, 1, 4], v4.clone())),
        ("too large", dense("t", &[1 << 16, 1 << 16], v4.clone())),
        ("dim over u32", dense("t", &[1, 1 << 33], v4.clone())),
        ("values too short", dense("t", &[5], v4.clone())),
        ("values too long", dense("t", &[3], v4.clone())),
        (
            "kept empty",
            masked(
                "t",
                &[2, 2],
                Importance::ColumnL2,
                &[],
                Values::F32(vec![]),
                0.1,
                0,
            ),
        ),
        (
            "kept descending",
            masked(
                "t",
                &[2, 2],
                Importance::ColumnL2,
                &[1, 0],
                v4.clone(),
                0.1,
                0,
            ),
        ),
        (
            "kept repeated",
            masked(
                "t",
                &[2, 2],
                Importance::ColumnL2,
                &[1, 1],
                v4.clone(),
                0.1,
                0,
            ),
        ),
        (
            "kept out of range",
            masked(
                "t",
                &[2, 2],
                Importance::ColumnL2,
                &[2],
                Values::F32(vec![1.0; 2]),
                0.1,
                0,
            ),
        ),
        (
            "kept values short",
            masked(
                "t",
                &[2, 2],
                Importance::ColumnL2,
                &[0, 1],
                Values::F32(vec![1.0; 3]),
                0.1,
                0,
            ),
        ),
        (
            "sigma NaN",
            masked(
                "t",
                &[2, 2],
                Importance::ColumnL2,
                &[0],
                Values::F32(vec![1.0; 2]),
                f32::NAN,
                0,
            ),
        ),
        (
            "sigma negative",
            masked(
                "t",
                &[2, 2],
                Importance::ColumnL2,
                &[0],
                Values::F32(vec![1.0; 2]),
                -1.0,
                0,
            ),
        ),
        (
            "sigma infinite",
            masked(
                "t",
                &[2, 2],
                Importance::ColumnL2,
                &[0],
                Values::F32(vec![1.0; 2]),
                f32::INFINITY,
                0,
            ),
        ),
        (
            "element kept out of range",
            masked(
                "t",
                &[2, 2],
                Importance::ElementAbs,
                &[4],
                Values::F32(vec![1.0]),
                0.1,
                0,
            ),
        ),
    ];
    for (why, t) in bad {
        let e = try_one(t).unwrap_err();
        assert!(
            !matches!(e.kind, ErrorKind::BufferTooSmall { .. }),
            "{why}: {e:?}"
        );
        assert!(
            e.tensor == Some(0) || matches!(e.kind, ErrorKind::BadConfig(_)),
            "{why}: {e:?}"
        );
    }
}

/// A writer call that is rejected leaves no partial record behind: after a rejected call, the
/// writer still produces a valid upload from the calls that succeeded.
#[test]
fn rejected_writer_call_leaves_no_partial_record() {
    let good = dense("t", &[3], Values::F32(vec![1.0, 2.0, 3.0]));
    let cases = [
        (
            "dense with wrong value count",
            dense("t", &[3], Values::F32(vec![1.0, 2.0])),
        ),
        (
            "masked with wrong value count",
            masked(
                "t",
                &[2, 2],
                Importance::ColumnL2,
                &[0],
                Values::F32(vec![1.0]),
                0.1,
                0,
            ),
        ),
        ("bad dims", dense("t", &[0], Values::F32(vec![]))),
    ];
    for (why, bad) in cases {
        let mut buf = vec![0u8; 1024];
        let mut w = UploadWriter::new(&mut buf, UploadHeader::new(0, 0, 1, 1)).unwrap();
        assert!(
            write_all(&mut w, std::slice::from_ref(&bad)).is_err(),
            "{why}"
        );
        write_all(&mut w, std::slice::from_ref(&good)).unwrap();
        let n = w.finish().unwrap();
        let parsed = Upload::parse(&buf[..n]);
        assert!(
            parsed.is_ok(),
            "{why}: the upload written afterwards is invalid: {parsed:?}"
        );
        let rec = parsed.unwrap().records().next().unwrap().unwrap();
        let mut out = [0.0f32; 3];
        rec.reconstruct(&mut out).unwrap();
        assert_eq!(out, [1.0, 2.0, 3.0], "{why}");
    }
}

// ---------------------------------------------------------------------------------------------
// Targeted malformed uploads
// ---------------------------------------------------------------------------------------------

fn expect_bad(bytes: &[u8], keyword: &str, tensor: Option<u32>) {
    let e = Upload::parse(bytes).unwrap_err();
    match e.kind {
        ErrorKind::BadEncoding(msg) => {
            assert!(msg.contains(keyword), "expected '{keyword}', got '{msg}'");
        }
        k => panic!("expected BadEncoding('{keyword}'), got {k:?}"),
    }
    assert_eq!(e.tensor, tensor, "tensor index for '{keyword}'");
}

/// One valid dense f32 record `t` = [1, 2] after a header declaring `n` tensors.
fn one_record(n: u32) -> Vec<u8> {
    let mut b = enc_header(MAGIC, 1, 0, 0, 1, n);
    enc_head(&mut b, b"t", &[2], 0, Head::Dense);
    b.extend(f32_bytes(&[1.0, 2.0]));
    b
}

#[test]
fn hand_encoded_upload_parses() {
    let bytes = with_crc(one_record(1));
    let up = Upload::parse(&bytes).unwrap();
    assert_eq!(up.header.num_tensors, 1);
    let rec = up.records().next().unwrap().unwrap();
    assert_eq!(rec.name, "t");
    // Zero tensors.
    assert!(Upload::parse(&with_crc(enc_header(MAGIC, 1, 0, 0, 1, 0))).is_ok());
}

#[test]
fn malformed_uploads_give_specific_errors() {
    // Too short, bad magic, bad checksum.
    expect_bad(&[], "short", None);
    expect_bad(b"FCDU\x01\x00\x00", "short", None);
    let mut b = with_crc(one_record(1));
    b[0] = b'X';
    expect_bad(&b, "magic", None);
    let mut b = with_crc(one_record(1));
    let last = b.len() - 1;
    b[last] ^= 1;
    assert_eq!(Upload::parse(&b).unwrap_err().kind, ErrorKind::Checksum);
    let mut b = with_crc(one_record(1));
    b[8] ^= 0x10;
    assert_eq!(Upload::parse(&b).unwrap_err().kind, ErrorKind::Checksum);

    // Unknown versions.
    for v in [0u16, 2, 300, u16::MAX] {
        let mut b = enc_header(MAGIC, v, 0, 0, 1, 1);
        enc_head(&mut b, b"t", &[2], 0, Head::Dense);
        b.extend(f32_bytes(&[1.0, 2.0]));
        assert_eq!(
            Upload::parse(&with_crc(b)).unwrap_err().kind,
            ErrorKind::UnsupportedVersion(v)
        );
    }
    // A truncated header.
    expect_bad(&with_crc(MAGIC.to_vec()), "header", None);
    expect_bad(&with_crc(b"FCDU\x01\xff\xff".to_vec()), "header", None);

    // Declared tensor count far beyond the bytes.
    expect_bad(&with_crc(one_record(u32::MAX)), "count", None);
    expect_bad(&with_crc(one_record(1 << 20)), "count", None);
    // One more tensor declared than present (count check passes, the record is missing).
    let mut b = one_record(2);
    b.extend_from_slice(&[0xFFu8; 8]);
    expect_bad(&with_crc(b), "record", Some(1));

    // Trailing bytes after the last record.
    let mut b = one_record(1);
    b.push(0);
    expect_bad(&with_crc(b), "trailing", None);
    let mut b = one_record(1);
    b.extend(one_record(1)[4..].iter());
    expect_bad(&with_crc(b), "trailing", None);

    // Dense values claimed far beyond the bytes.
    let mut b = enc_header(MAGIC, 1, 0, 0, 1, 1);
    enc_head(&mut b, b"t", &[1000, 1000], 0, Head::Dense);
    b.extend(f32_bytes(&[1.0, 2.0]));
    expect_bad(&with_crc(b), "dense", Some(0));
    // ...in the second record.
    let mut b = one_record(2);
    enc_head(&mut b, b"u", &[3, 3], 1, Head::Dense);
    b.extend([0u8; 17]);
    expect_bad(&with_crc(b), "dense", Some(1));

    // Shapes: empty, zero, five dims, over MAX_ELEMENTS.
    for (dims, kw) in [
        (&[][..], "shape"),
        (&[2, 0][..], "shape"),
        (&[65536, 65536][..], "large"),
        (&[1, 1, 1, 1, 2][..], "malformed"),
    ] {
        let mut b = enc_header(MAGIC, 1, 0, 0, 1, 1);
        enc_head(&mut b, b"t", dims, 0, Head::Dense);
        b.extend([0u8; 16]);
        expect_bad(&with_crc(b), kw, Some(0));
    }
    assert_eq!(65536usize * 65536 / 2, MAX_ELEMENTS);

    // Names: empty, too long, not UTF-8.
    for (name, kw) in [
        (&b""[..], "name"),
        (&[b'n'; MAX_NAME_LEN + 1][..], "name"),
        (&[0xFF, 0xFE][..], "malformed"),
    ] {
        let mut b = enc_header(MAGIC, 1, 0, 0, 1, 1);
        enc_head(&mut b, name, &[2], 0, Head::Dense);
        b.extend(f32_bytes(&[1.0, 2.0]));
        expect_bad(&with_crc(b), kw, Some(0));
    }

    // Unknown dtype / payload / importance variants.
    let mut b = enc_header(MAGIC, 1, 0, 0, 1, 1);
    enc_head(&mut b, b"t", &[2], 3, Head::Dense);
    b.extend(f32_bytes(&[1.0, 2.0]));
    expect_bad(&with_crc(b), "malformed", Some(0));
    let mut b = enc_header(MAGIC, 1, 0, 0, 1, 1);
    enc_head(&mut b, b"t", &[2], 0, Head::Dense);
    let at = b.len() - 1;
    b[at] = 2; // payload variant 2
    b.extend(f32_bytes(&[1.0, 2.0]));
    expect_bad(&with_crc(b), "malformed", Some(0));
    let mut b = enc_header(MAGIC, 1, 0, 0, 1, 1);
    enc_head(&mut b, b"t", &[2, 2], 0, Head::Masked(3, 1, 0.5, 1));
    b.extend(u32_bytes(&[0]));
    b.extend(f32_bytes(&[1.0, 2.0]));
    expect_bad(&with_crc(b), "malformed", Some(0));
    // Importance 2 (row L2) is known: the same record parses, its unit a row.
    let mut b = enc_header(MAGIC, 1, 0, 0, 1, 1);
    enc_head(&mut b, b"t", &[2, 2], 0, Head::Masked(2, 1, 0.5, 1));
    b.extend(u32_bytes(&[1]));
    b.extend(f32_bytes(&[1.0, 2.0]));
    let b = with_crc(b);
    let up = Upload::parse(&b).unwrap();
    let mut out = [0.0f32; 4];
    up.records()
        .next()
        .unwrap()
        .unwrap()
        .reconstruct(&mut out)
        .unwrap();
    assert_eq!(&out[2..], &[1.0, 2.0], "row 1 kept");

    // Masked records: a valid one, then broken variants of it. [2, 4] tensor, column units.
    let masked_record = |k: u32, sigma: f32, kept: &[u32], values: usize| {
        let mut b = enc_header(MAGIC, 1, 0, 0, 1, 1);
        enc_head(&mut b, b"m", &[2, 4], 0, Head::Masked(0, k, sigma, 9));
        b.extend(u32_bytes(kept));
        b.extend(f32_bytes(&vec![0.5; values]));
        with_crc(b)
    };
    assert!(Upload::parse(&masked_record(2, 0.1, &[1, 3], 4)).is_ok());
    expect_bad(&masked_record(2, 0.1, &[3, 1], 4), "ascending", Some(0));
    expect_bad(&masked_record(2, 0.1, &[1, 1], 4), "ascending", Some(0));
    expect_bad(&masked_record(2, 0.1, &[1, 4], 4), "range", Some(0));
    expect_bad(&masked_record(1, 0.1, &[u32::MAX], 2), "range", Some(0));
    expect_bad(&masked_record(0, 0.1, &[], 0), "count", Some(0));
    expect_bad(
        &masked_record(5, 0.1, &[0, 1, 2, 3, 4], 10),
        "count",
        Some(0),
    );
    expect_bad(&masked_record(u32::MAX, 0.1, &[], 0), "count", Some(0));
    expect_bad(&masked_record(2, f32::NAN, &[1, 3], 4), "sigma", Some(0));
    expect_bad(&masked_record(2, -0.5, &[1, 3], 4), "sigma", Some(0));
    expect_bad(
        &masked_record(2, f32::INFINITY, &[1, 3], 4),
        "sigma",
        Some(0),
    );
    expect_bad(&masked_record(2, 0.1, &[1], 0), "truncated", Some(0));
    expect_bad(&masked_record(2, 0.1, &[1, 3], 3), "truncated", Some(0));
    // A huge declared tensor with a tiny masked payload is structurally valid (the server
    // must compare dims with its own model before reconstructing it).
    let mut b = enc_header(MAGIC, 1, 0, 0, 1, 1);
    enc_head(&mut b, b"m", &[1 << 31], 0, Head::Masked(1, 1, 0.0, 0));
    b.extend(u32_bytes(&[5]));
    b.extend(f32_bytes(&[1.0]));
    let huge = with_crc(b);
    let up = Upload::parse(&huge).unwrap();
    let rec = up.records().next().unwrap().unwrap();
    assert_eq!(rec.layout.len(), MAX_ELEMENTS);
}

// ---------------------------------------------------------------------------------------------
// Mutation fuzzing
// ---------------------------------------------------------------------------------------------

/// Outcome of feeding one byte string to the decoder.
enum Outcome {
    Rejected(ErrorKind),
    Accepted,
}

/// Parses `bytes`; when accepted, walks every record and reconstructs it (into f32 and f16,
/// when small enough to allocate) — all of which must succeed for a validated upload.
fn exercise(bytes: &[u8]) -> Result<Outcome, String> {
    let up = match Upload::parse(bytes) {
        Ok(up) => up,
        Err(e) => return Ok(Outcome::Rejected(e.kind)),
    };
    if up.byte_len != bytes.len() {
        return Err(format!(
            "byte_len {} for {} bytes",
            up.byte_len,
            bytes.len()
        ));
    }
    let mut count = 0u32;
    for rec in up.records() {
        let rec = rec.map_err(|e| format!("validated upload, record failed: {e:?}"))?;
        count += 1;
        let _ = rec.kept_count();
        let _ = rec.kept_index(0);
        let _ = rec.kept_index(usize::MAX / 8);
        let p = rec.layout.len();
        if p <= 1 << 16 {
            let mut out = vec![0.0f32; p];
            rec.reconstruct(&mut out)
                .map_err(|e| format!("validated record failed to reconstruct: {e:?}"))?;
            let mut out16 = vec![f16::ZERO; p];
            rec.reconstruct(&mut out16)
                .map_err(|e| format!("validated record failed to reconstruct (f16): {e:?}"))?;
            let mut short = vec![0.0f32; p - 1];
            if rec.reconstruct(&mut short).is_ok() {
                return Err("reconstruct into a short buffer succeeded".into());
            }
        }
    }
    if count != up.header.num_tensors {
        return Err(format!("{count} records of {}", up.header.num_tensors));
    }
    Ok(Outcome::Accepted)
}

fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut b = base.to_vec();
    match rng.below(8) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                if !b.is_empty() {
                    let i = rng.below(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
            }
        }
        1 => {
            for _ in 0..1 + rng.below(4) {
                if !b.is_empty() {
                    let i = rng.below(b.len());
                    b[i] = rng.next_u64() as u8;
                }
            }
        }
        2 => b.truncate(rng.below(b.len() + 1)),
        3 => {
            let at = rng.below(b.len() + 1);
            let n = 1 + rng.below(8);
            let extra = rng.bytes(n);
            b.splice(at..at, extra);
        }
        4 => {
            if !b.is_empty() {
                let at = rng.below(b.len());
                let n = 1 + rng.below((b.len() - at).min(16));
                b.drain(at..at + n);
            }
        }
        5 => {
            // Garbage, half of it behind a valid magic.
            let n = rng.below(300);
            b = rng.bytes(n);
            if rng.below(2) == 0 && b.len() >= 4 {
                b[..4].copy_from_slice(&MAGIC);
            }
        }
        6 => {
            // Boundary values in a varint-heavy place.
            const SPECIAL: [u8; 6] = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE];
            for _ in 0..1 + rng.below(3) {
                if !b.is_empty() {
                    let i = rng.below(b.len().min(64));
                    b[i] = SPECIAL[rng.below(SPECIAL.len())];
                }
            }
        }
        _ => {
            // Duplicate a slice somewhere else.
            if b.len() > 2 {
                let from = rng.below(b.len() - 1);
                let n = 1 + rng.below((b.len() - from).min(32));
                let piece = b[from..from + n].to_vec();
                let at = rng.below(b.len() + 1);
                b.splice(at..at, piece);
            }
        }
    }
    b
}

#[test]
fn hostile_bytes_never_panic() {
    let mut rng = Rng::new(54);
    let crc = Crc32::new();
    let tensors = sample_tensors(&mut rng);
    let mut bases: Vec<Vec<u8>> = vec![
        build(UploadHeader::new(1, 2, 3, tensors.len() as u32), &tensors),
        build(UploadHeader::new(0, 0, 0, 0), &[]),
    ];
    for t in &tensors {
        bases.push(build(
            UploadHeader::new(9, 1, 5, 1),
            std::slice::from_ref(t),
        ));
    }
    for b in &bases {
        assert!(
            matches!(exercise(b), Ok(Outcome::Accepted)),
            "a base upload is invalid"
        );
    }
    let (mut accepted, mut structural, mut checksum, mut other) = (0usize, 0usize, 0usize, 0usize);
    let mut failures: Vec<String> = Vec::new();
    const ITERATIONS: usize = 20_000;
    for it in 0..ITERATIONS {
        let base = &bases[rng.below(bases.len())];
        let mut bytes = mutate(&mut rng, base);
        if it % 2 == 0 {
            crc.patch(&mut bytes);
        }
        match catch_unwind(AssertUnwindSafe(|| exercise(&bytes))) {
            Err(_) => failures.push(format!("iteration {it}: PANIC on {bytes:02x?}")),
            Ok(Err(msg)) => failures.push(format!("iteration {it}: {msg} on {bytes:02x?}")),
            Ok(Ok(Outcome::Accepted)) => accepted += 1,
            Ok(Ok(Outcome::Rejected(ErrorKind::Checksum))) => checksum += 1,
            Ok(Ok(Outcome::Rejected(
                ErrorKind::BadEncoding(_) | ErrorKind::UnsupportedVersion(_),
            ))) => structural += 1,
            Ok(Ok(Outcome::Rejected(k))) => {
                other += 1;
                failures.push(format!("iteration {it}: unexpected error kind {k:?}"));
            }
        }
        if failures.len() >= 10 {
            break;
        }
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!(
        "fuzz: {accepted} accepted, {structural} structural rejections, {checksum} checksum \
         rejections"
    );
    // The patched half must have reached the structural checks, and some mutations (values,
    // σ, seeds) must have produced valid uploads.
    assert!(
        structural > ITERATIONS / 4,
        "structural rejections {structural}"
    );
    assert!(checksum > ITERATIONS / 4, "checksum rejections {checksum}");
    assert!(accepted > 100, "accepted {accepted}");
    assert_eq!(other, 0);
}
