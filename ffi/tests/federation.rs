//! The federated client and server API: a C program runs a whole SCAFFOLD federation through
//! it and ends with `fedcdd run`'s adapter, bit for bit; misuse (NULL, bad configs, calls out
//! of order, short buffers, wrong tensors, hostile uploads) gives a status and a message
//! naming what is wrong, never a crash.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr;
use std::sync::OnceLock;

use fedcdd::*;
use fedcdd_host::data::corpus::{GenCorpusOptions, gen_corpus};
use fedcdd_host::fl::{RunConfig, run_one};
use fedcdd_host::model::init::{InitModelOptions, Preset, build_model};
use fedcdd_host::progress::Reporter;

struct Fixture {
    root: PathBuf,
    model: PathBuf,
    train: PathBuf,
    eval: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("ffi-federation")
            .join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let model = root.join("tiny");
        build_model(&InitModelOptions::new(Preset::Tiny, &model)).unwrap();
        let corpus = |name: &str, n: usize, seed: u64| {
            let out = root.join(name);
            gen_corpus(&GenCorpusOptions {
                domains: Vec::new(),
                n,
                seed,
                out: out.clone(),
                split: false,
            })
            .unwrap();
            out
        };
        Fixture {
            train: corpus("train.jsonl", 12, 0),
            eval: corpus("eval.jsonl", 3, 9),
            model,
            root,
        }
    })
}

/// The config federate.c builds, as TOML text.
fn config(f: &Fixture) -> String {
    format!(
        "algorithm = \"scaffold\"\nmodel = \"{}\"\ndata = \"{}\"\neval_data = \"{}\"\n\
         threads = 1\nnum_clients = 3\nsample_clients = 2\nrounds = 2\nlocal_steps = 2\n\
         batch = 2\nmicro_batch = 1\nseq = 32\neval_questions = 2\nlr = 0.002\nreferences = []\n",
        f.model.display(),
        f.train.display(),
        f.eval.display()
    )
}

fn last_error() -> String {
    // SAFETY: the library returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(fedcdd_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// `target/<profile>`, where cargo put libfedcdd for this test run.
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    deps.parent().unwrap().to_path_buf()
}

#[test]
fn a_c_program_runs_a_federation_that_equals_fedcdd_run() {
    let f = fixture();
    let lib = library_dir();
    if !lib.join("libfedcdd.so").is_file() || cfg!(not(target_os = "linux")) {
        eprintln!("SKIPPED: no libfedcdd.so in {}", lib.display());
        return;
    }
    let exe = f.root.join("federate");
    let cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("include"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/federate.c"))
        .arg("-L")
        .arg(&lib)
        .arg("-lfedcdd")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("cannot run cc");
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let run_dir = f.root.join("c-run");
    let out = Command::new(&exe)
        .arg(&f.model)
        .arg(&f.train)
        .arg(&f.eval)
        .arg(&run_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.ends_with("OK\n"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("ROUND round").count(), 2, "{stdout}");
    // The same federation in one process.
    let cfg = RunConfig::from_toml(&config(f), "test").unwrap();
    let reference = f.root.join("rust-run");
    run_one(&cfg, &reference, false, &Reporter::new(true))
        .unwrap()
        .unwrap();
    let adapter = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&run_dir), adapter(&reference));
}

#[test]
fn misuse_is_a_status_and_a_message() {
    let f = fixture();
    let cfg = CString::new(config(f)).unwrap();
    let dir = CString::new(f.root.join("misuse").display().to_string()).unwrap();
    unsafe {
        // NULL handles and outputs.
        assert_eq!(
            fedcdd_server_new(ptr::null(), dir.as_ptr(), 0, ptr::null_mut()),
            FEDCDD_ERR_NULL_POINTER
        );
        let mut server: *mut fedcdd_server = ptr::null_mut();
        assert_eq!(
            fedcdd_server_new(ptr::null(), dir.as_ptr(), 0, &mut server),
            FEDCDD_ERR_NULL_POINTER
        );
        assert!(server.is_null());
        assert_eq!(
            fedcdd_server_finish_round(ptr::null_mut(), ptr::null_mut()),
            FEDCDD_ERR_NULL_POINTER
        );
        // A bad config names the key.
        let bad = CString::new("roundz = 3\n").unwrap();
        assert_eq!(
            fedcdd_server_new(bad.as_ptr(), dir.as_ptr(), 0, &mut server),
            FEDCDD_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("roundz"), "{}", last_error());
        let flora = CString::new("algorithm = \"flora\"\n").unwrap();
        let mut client: *mut fedcdd_client = ptr::null_mut();
        assert_eq!(
            fedcdd_client_new(flora.as_ptr(), 0, ptr::null(), &mut client),
            FEDCDD_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("one process"), "{}", last_error());
        // A client id outside the federation.
        assert_ne!(
            fedcdd_client_new(cfg.as_ptr(), 7, ptr::null(), &mut client),
            FEDCDD_OK
        );
        assert!(last_error().contains("client 7"), "{}", last_error());

        assert_eq!(
            fedcdd_server_new(cfg.as_ptr(), dir.as_ptr(), 0, &mut server),
            FEDCDD_OK,
            "{}",
            last_error()
        );
        // Out of order: finishing or replying before a round starts; skipping a round.
        assert_ne!(
            fedcdd_server_finish_round(server, ptr::null_mut()),
            FEDCDD_OK
        );
        assert!(last_error().contains("no round"), "{}", last_error());
        let mut count = 0usize;
        let mut ids = [0usize; 1];
        assert_eq!(
            fedcdd_server_begin_round(server, 1, ids.as_mut_ptr(), 1, &mut count),
            FEDCDD_ERR_CALL_ORDER
        );
        // Too small a buffer: the count says how many.
        assert_eq!(
            fedcdd_server_begin_round(server, 0, ids.as_mut_ptr(), 1, &mut count),
            FEDCDD_ERR_BUFFER_TOO_SMALL
        );
        assert_eq!(count, 2);
        let mut ids = [0usize; 3];
        assert_eq!(
            fedcdd_server_begin_round(server, 0, ids.as_mut_ptr(), 3, &mut count),
            FEDCDD_OK
        );
        // Hostile upload bytes are rejected naming the client; the round goes on.
        let junk = b"FCDU\x01\x00garbage-garbage-garbage";
        assert_eq!(
            fedcdd_server_add_reply(server, ids[0], junk.as_ptr(), junk.len(), ptr::null(), 1.0),
            FEDCDD_ERR_BAD_ENCODING
        );
        assert!(
            last_error().contains(&format!("client {}", ids[0])),
            "{}",
            last_error()
        );
        assert_eq!(
            fedcdd_server_add_reply(server, ids[0], ptr::null(), 10, ptr::null(), 1.0),
            FEDCDD_ERR_NULL_POINTER
        );
        // A client's round with a global adapter of the wrong shape names the tensor.
        assert_eq!(
            fedcdd_client_new(cfg.as_ptr(), ids[0], ptr::null(), &mut client),
            FEDCDD_OK,
            "{}",
            last_error()
        );
        let mut global: *mut fedcdd_tensors = ptr::null_mut();
        assert_eq!(fedcdd_tensors_new(&mut global), FEDCDD_OK);
        let name =
            CString::new("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").unwrap();
        let shape = [3usize, 5];
        let data = [0.5f32; 15];
        let t = fedcdd_tensor {
            name: name.as_ptr(),
            shape: shape.as_ptr(),
            ndim: 2,
            dtype: FEDCDD_DTYPE_F32,
            data: data.as_ptr().cast(),
            len: 15,
        };
        assert_eq!(fedcdd_tensors_add(global, &t), FEDCDD_OK);
        assert_eq!(fedcdd_tensors_add(global, &t), FEDCDD_ERR_TENSOR_NAME);
        let mut view = std::mem::zeroed::<fedcdd_tensor_view>();
        assert_ne!(fedcdd_tensors_get(global, 1, &mut view), FEDCDD_OK);
        assert_eq!(fedcdd_tensors_get(global, 0, &mut view), FEDCDD_OK);
        assert_eq!((view.ndim, view.len, *view.data), (2, 15, 0.5));
        let mut res: *mut fedcdd_client_result = ptr::null_mut();
        assert_eq!(
            fedcdd_client_train_round(client, 0, global, ptr::null(), ptr::null_mut(), &mut res),
            FEDCDD_ERR_SHAPE
        );
        assert!(last_error().contains("q_proj.lora_A"), "{}", last_error());
        assert!(res.is_null());
        // A NaN in a tensor list is refused.
        let nan = [f32::NAN; 15];
        let other = CString::new("x.lora_B.weight").unwrap();
        let t2 = fedcdd_tensor {
            name: other.as_ptr(),
            data: nan.as_ptr().cast(),
            ..t
        };
        assert_eq!(fedcdd_tensors_add(global, &t2), FEDCDD_ERR_NON_FINITE);
        fedcdd_tensors_free(global);
        fedcdd_client_free(client);
        fedcdd_server_free(server);
        // Freeing NULL is allowed.
        fedcdd_server_free(ptr::null_mut());
        fedcdd_client_result_free(ptr::null_mut());
        fedcdd_bytes_free(ptr::null_mut());
    }
}
