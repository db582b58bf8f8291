use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ::safetensors::Dtype;
use fedcdd_core::{DType, TensorRole};

use super::peft::ADAPTER_BIN_FILE;
use super::*;

/// A fresh, empty directory under the system temp dir; removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "fedcdd-host-adapter-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn tensor(name: &str, dims: &[usize], dtype: DType, data: &[f32]) -> Tensor {
    Tensor {
        name: name.to_string(),
        dims: dims.to_vec(),
        dtype,
        data: data.to_vec(),
    }
}

fn sample_tensors() -> Vec<Tensor> {
    vec![
        tensor(
            "base_model.model.q_proj.lora_B.weight",
            &[3, 2],
            DType::F32,
            &[0.1, -0.2, 0.3, 1e-8, f32::MAX, -0.0],
        ),
        tensor(
            "base_model.model.q_proj.lora_A.weight",
            &[2, 3],
            DType::F16,
            &[1.0, -2.5, 0.375, 1024.0, -0.0009765625, 65504.0],
        ),
        tensor(
            "base_model.model.v_proj.lora_A.weight",
            &[2, 2],
            DType::BF16,
            &[1.0, -3.0, 0.15625, 2f32.powi(100)],
        ),
        tensor(
            "base_model.model.norm.bias",
            &[4],
            DType::F32,
            &[1.0, 2.0, 3.0, 4.0],
        ),
    ]
}

fn sorted(mut v: Vec<Tensor>) -> Vec<Tensor> {
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// The whole error chain, so assertions see every context.
fn msg(e: &anyhow::Error) -> String {
    format!("{e:#}")
}

fn leftover_temp_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

#[test]
fn round_trip_f32_f16_bf16() {
    let dir = TempDir::new("roundtrip");
    let path = dir.path().join("t.safetensors");
    let tensors = sample_tensors();
    let meta = HashMap::from([("k".to_string(), "v".to_string())]);
    write_safetensors(&path, &tensors, Some(meta.clone())).unwrap();
    let (back, back_meta) = read_safetensors(&path).unwrap();
    assert_eq!(back, sorted(tensors));
    assert_eq!(back_meta, meta);
    assert!(back.windows(2).all(|w| w[0].name < w[1].name));
    // -0.0 keeps its sign bit.
    let b = back
        .iter()
        .find(|t| t.dtype == DType::F32 && t.dims == [3, 2])
        .unwrap();
    assert!(b.data[5].is_sign_negative());
    assert!(leftover_temp_files(dir.path()).is_empty());
}

#[test]
fn write_rounds_to_nearest_even_and_keeps_nan() {
    let dir = TempDir::new("rne");
    let path = dir.path().join("t.safetensors");
    let tensors = vec![
        // bf16 has 7 mantissa bits: 1 + 2^-8 is a tie -> 1.0 (even); 1 + 3·2^-8 -> 1 + 2^-6.
        tensor(
            "b",
            &[3],
            DType::BF16,
            &[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), f32::NAN],
        ),
        // f16 has 10 mantissa bits: the same ties one level down.
        tensor(
            "h",
            &[3],
            DType::F16,
            &[
                1.0 + 2f32.powi(-11),
                1.0 + 3.0 * 2f32.powi(-11),
                f32::INFINITY,
            ],
        ),
    ];
    write_safetensors(&path, &tensors, None).unwrap();
    let (back, meta) = read_safetensors(&path).unwrap();
    assert!(meta.is_empty());
    assert_eq!(back[0].data[..2], [1.0, 1.0 + 2f32.powi(-6)]);
    assert!(back[0].data[2].is_nan());
    assert_eq!(back[1].data, [1.0, 1.0 + 2f32.powi(-9), f32::INFINITY]);
}

#[test]
fn peft_dir_round_trip_with_config() {
    let dir = TempDir::new("peft");
    let adapter_dir = dir.path().join("nested").join("adapter");
    let config = serde_json::json!({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"]
    });
    let tensors = sample_tensors();
    save_adapter(&adapter_dir, &tensors, Some(&config)).unwrap();
    assert!(adapter_dir.join(ADAPTER_CONFIG_FILE).is_file());

    let a = load_adapter(&adapter_dir).unwrap();
    assert_eq!(a.path, adapter_dir);
    assert_eq!(a.config.as_ref(), Some(&config));
    assert_eq!(a.tensors, sorted(tensors.clone()));
    let (_, meta) = read_safetensors(&adapter_dir.join(ADAPTER_MODEL_FILE)).unwrap();
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));

    let q_a = a.get("base_model.model.q_proj.lora_A.weight").unwrap();
    assert_eq!(q_a.role(), TensorRole::LoraA);
    assert_eq!(q_a.dtype, DType::F16);
    assert_eq!(
        a.get("base_model.model.q_proj.lora_B.weight")
            .unwrap()
            .role(),
        TensorRole::LoraB
    );
    assert_eq!(
        a.get("base_model.model.norm.bias").unwrap().role(),
        TensorRole::Other
    );
    assert!(a.get("missing").is_none());

    // Without a config; a bare file loads too.
    let plain = dir.path().join("plain");
    save_adapter(&plain, &tensors, None).unwrap();
    assert!(!plain.join(ADAPTER_CONFIG_FILE).exists());
    assert!(load_adapter(&plain).unwrap().config.is_none());
    let bare = load_adapter(&plain.join(ADAPTER_MODEL_FILE)).unwrap();
    assert!(bare.config.is_none());
    assert_eq!(bare.tensors, a.tensors);

    // Saving again over an existing adapter replaces it.
    let one = vec![tensor("x.lora_A.weight", &[1, 1], DType::F32, &[5.0])];
    save_adapter(&adapter_dir, &one, Some(&config)).unwrap();
    assert_eq!(load_adapter(&adapter_dir).unwrap().tensors, one);
    assert!(leftover_temp_files(&adapter_dir).is_empty());
}

#[test]
fn truncated_file_is_an_error_naming_the_path() {
    let dir = TempDir::new("trunc");
    let good = dir.path().join("good.safetensors");
    write_safetensors(&good, &sample_tensors(), None).unwrap();
    let bytes = fs::read(&good).unwrap();
    let path = dir.path().join("cut.safetensors");
    for cut in [
        0,
        1,
        7,
        8,
        9,
        20,
        bytes.len() / 2,
        bytes.len() - 4,
        bytes.len() - 1,
    ] {
        fs::write(&path, &bytes[..cut]).unwrap();
        let e = read_safetensors(&path).unwrap_err();
        assert!(
            e.to_string().contains(&path.display().to_string()),
            "cut {cut}: {e:#}"
        );
    }
    // One byte too many is just as wrong.
    let mut long = bytes.clone();
    long.push(0);
    fs::write(&path, &long).unwrap();
    assert!(read_safetensors(&path).is_err());
}

#[test]
fn garbage_is_an_error() {
    let dir = TempDir::new("garbage");
    let path = dir.path().join("junk.safetensors");
    let mut huge_header = u64::MAX.to_le_bytes().to_vec();
    huge_header.extend_from_slice(b"{}");
    let bad_offsets = {
        let h = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
        let mut v = (h.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(h);
        v.extend_from_slice(&[0u8; 8]);
        v
    };
    let not_json = {
        let h = b"this is not json";
        let mut v = (h.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(h);
        v
    };
    for junk in [
        b"hello, this is certainly not a safetensors file".to_vec(),
        huge_header,
        bad_offsets,
        not_json,
        vec![0xff; 64],
    ] {
        fs::write(&path, &junk).unwrap();
        let e = read_safetensors(&path).unwrap_err();
        assert!(e.to_string().contains(&path.display().to_string()), "{e:#}");
        assert!(load_adapter(&path).is_err());
    }
    // Missing file and a directory given to read_safetensors.
    let missing = dir.path().join("nope.safetensors");
    assert!(msg(&read_safetensors(&missing).unwrap_err()).contains("nope.safetensors"));
    assert!(msg(&load_adapter(&missing).unwrap_err()).contains("nope.safetensors"));
    let e = read_safetensors(dir.path()).unwrap_err();
    assert!(msg(&e).contains(&dir.path().display().to_string()), "{e:#}");
}

fn write_raw(path: &Path, name: &str, dtype: Dtype, shape: Vec<usize>, bytes: &[u8]) {
    let view = ::safetensors::tensor::TensorView::new(dtype, shape, bytes).unwrap();
    let ok = ::safetensors::tensor::TensorView::new(Dtype::F32, vec![1], &[0, 0, 128, 63]).unwrap();
    let buf = ::safetensors::serialize([(name, view), ("fine.weight", ok)], None).unwrap();
    fs::write(path, buf).unwrap();
}

#[test]
fn unsupported_dtype_names_tensor() {
    let dir = TempDir::new("dtype");
    let path = dir.path().join("i64.safetensors");
    let bytes: Vec<u8> = [1i64, 2].iter().flat_map(|x| x.to_le_bytes()).collect();
    write_raw(&path, "layer.lora_A.weight", Dtype::I64, vec![2], &bytes);
    let e = msg(&read_safetensors(&path).unwrap_err());
    assert!(e.contains("layer.lora_A.weight"), "{e}");
    assert!(e.contains("I64"), "{e}");
    assert!(e.contains(&path.display().to_string()), "{e}");
}

#[test]
fn empty_scalar_and_too_many_dims_are_rejected() {
    let dir = TempDir::new("shapes");
    let path = dir.path().join("s.safetensors");
    let cases: [(Vec<usize>, Vec<u8>); 3] = [
        (vec![], 1f32.to_le_bytes().to_vec()),
        (vec![0, 4], vec![]),
        (vec![1, 1, 1, 1, 1], 1f32.to_le_bytes().to_vec()),
    ];
    for (shape, bytes) in cases {
        write_raw(&path, "odd.weight", Dtype::F32, shape.clone(), &bytes);
        let e = msg(&read_safetensors(&path).unwrap_err());
        assert!(e.contains("odd.weight"), "{shape:?}: {e}");
        assert!(e.contains(&path.display().to_string()), "{e}");
    }
    // The writer refuses what the reader would refuse, and mismatched lengths.
    let out = dir.path().join("out.safetensors");
    for t in [
        tensor("a", &[], DType::F32, &[1.0]),
        tensor("a", &[0], DType::F32, &[]),
        tensor("a", &[2, 2], DType::F32, &[1.0, 2.0, 3.0]),
    ] {
        let e = msg(&write_safetensors(&out, &[t], None).unwrap_err());
        assert!(e.contains("\"a\"") && e.contains("out.safetensors"), "{e}");
    }
    let dup = [
        tensor("a", &[1], DType::F32, &[1.0]),
        tensor("a", &[1], DType::F16, &[2.0]),
    ];
    assert!(write_safetensors(&out, &dup, None).is_err());
    assert!(!out.exists());
    assert!(leftover_temp_files(dir.path()).is_empty());
}

#[test]
fn bin_only_dir_gives_helpful_error() {
    let dir = TempDir::new("bin");
    fs::write(dir.path().join(ADAPTER_BIN_FILE), b"pickle").unwrap();
    let e = msg(&load_adapter(dir.path()).unwrap_err());
    assert!(e.contains("safe_serialization=True"), "{e}");
    assert!(e.contains(&dir.path().display().to_string()), "{e}");

    let empty = TempDir::new("emptydir");
    let e = msg(&load_adapter(empty.path()).unwrap_err());
    assert!(e.contains(ADAPTER_MODEL_FILE), "{e}");
    assert!(e.contains(&empty.path().display().to_string()), "{e}");
}

#[test]
fn invalid_config_json_is_an_error() {
    let dir = TempDir::new("badcfg");
    save_adapter(dir.path(), &sample_tensors(), None).unwrap();
    let cfg = dir.path().join(ADAPTER_CONFIG_FILE);
    fs::write(&cfg, b"{ not json").unwrap();
    let e = load_adapter(dir.path()).unwrap_err();
    assert!(e.to_string().contains(&cfg.display().to_string()), "{e:#}");
}

#[test]
fn write_atomic_replaces_and_cleans_up() {
    let dir = TempDir::new("atomic");
    let path = dir.path().join("state.bin");
    write_atomic(&path, b"old").unwrap();
    write_atomic(&path, b"new contents").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"new contents");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn write_atomic_missing_directory_fails_cleanly() {
    let dir = TempDir::new("atomic-missing");
    let old = dir.path().join("keep.bin");
    write_atomic(&old, b"old").unwrap();
    let target = dir.path().join("no-such-dir").join("keep.bin");
    let e = msg(&write_atomic(&target, b"new").unwrap_err());
    assert!(e.contains(&target.display().to_string()), "{e}");
    assert_eq!(fs::read(&old).unwrap(), b"old");
    assert!(!dir.path().join("no-such-dir").exists());
    assert!(leftover_temp_files(dir.path()).is_empty());
}

#[test]
fn write_atomic_failed_rename_keeps_old_and_removes_temp() {
    let dir = TempDir::new("atomic-rename");
    // The target is an existing, non-empty directory: the rename must fail.
    let target = dir.path().join("target");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("inner"), b"old").unwrap();
    let e = msg(&write_atomic(&target, b"new").unwrap_err());
    assert!(e.contains(&target.display().to_string()), "{e}");
    assert_eq!(fs::read(target.join("inner")).unwrap(), b"old");
    assert!(leftover_temp_files(dir.path()).is_empty());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

    // A failed write_safetensors leaves an existing file alone too.
    let st = dir.path().join("a.safetensors");
    write_safetensors(&st, &sample_tensors(), None).unwrap();
    let before = fs::read(&st).unwrap();
    let bad = [tensor("a", &[2], DType::F32, &[1.0])];
    assert!(write_safetensors(&st, &bad, None).is_err());
    assert_eq!(fs::read(&st).unwrap(), before);
    assert!(leftover_temp_files(dir.path()).is_empty());
}
