//! End-to-end tests of `fedcdd run` and `fedcdd compare` on the tiny preset with generated
//! multi-domain data (small rounds so a debug build stays fast):
//! - a run killed (SIGKILL) after a complete round and resumed ends with the same adapter
//!   bytes and the same evaluations as an uninterrupted run (SCAFFOLD: control variates
//!   are part of the checkpoint);
//! - `compare` runs every algorithm and prints one table row per algorithm;
//! - bad configurations end with a clear `error:` and no panic.

mod cli_util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cli_util::*;
use serde_json::Value;

struct Fixture {
    model: PathBuf,
    train: PathBuf,
    eval: PathBuf,
    root: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("fl_run")
            .join(std::process::id().to_string());
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).expect("fixture dir");
        let model = root.join("tiny");
        fedcdd([
            "init-model",
            "--preset",
            "tiny",
            "--out",
            &s(&model),
            "--quiet",
        ])
        .ok();
        let train = root.join("train.jsonl");
        fedcdd([
            "gen-corpus",
            "--n",
            "12",
            "--seed",
            "0",
            "--out",
            &s(&train),
        ])
        .ok();
        let eval = root.join("eval.jsonl");
        fedcdd(["gen-corpus", "--n", "3", "--seed", "9", "--out", &s(&eval)]).ok();
        Fixture {
            model,
            train,
            eval,
            root,
        }
    })
}

/// A small config file for the tiny model and the generated data.
fn write_config(path: &Path, algorithm: &str, rounds: usize) {
    let f = fixture();
    let text = format!(
        "algorithm = \"{algorithm}\"\nmodel = \"{}\"\ndata = \"{}\"\neval_data = \"{}\"\n\
         threads = 1\nnum_clients = 3\nsample_clients = 2\nrounds = {rounds}\nlocal_steps = 2\n\
         batch = 2\nmicro_batch = 1\nseq = 32\neval_questions = 2\nkeep_ratio = 0.5\n\
         noise_scale = 0.2\nlr = 0.002\n",
        s(&f.model),
        s(&f.train),
        s(&f.eval)
    );
    fs::write(path, text).expect("write config");
}

/// The evaluation lines of metrics.jsonl (round lines carry wall-clock seconds).
fn eval_lines(run: &Path) -> Vec<String> {
    let text = fs::read_to_string(run.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .filter(|l| {
            let v: Value = serde_json::from_str(l).expect("JSON line");
            v["kind"] == "eval" || v["kind"] == "eval_mean"
        })
        .map(str::to_string)
        .collect()
}

fn rounds_done(run: &Path) -> usize {
    fs::read(run.join("checkpoint").join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["rounds_done"].as_u64())
        .unwrap_or(0) as usize
}

#[test]
fn killed_and_resumed_run_equals_uninterrupted_run() {
    let f = fixture();
    let dir = f.root.join("resume");
    fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("run.toml");
    write_config(&cfg, "scaffold", 4);

    let full = dir.join("full");
    let out = fedcdd(["run", &s(&cfg), "--out", &s(&full), "--quiet"]).ok();
    assert!(out.stdout.contains("global (round 4)"), "{out}");

    // Same run, killed once its first round is checkpointed (mid-way through round 2).
    let cut = dir.join("cut");
    let mut child = Command::new(fedcdd_bin())
        .args(["run", &s(&cfg), "--out", &s(&cut), "--quiet"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start fedcdd");
    let t0 = Instant::now();
    while rounds_done(&cut) < 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint after 300 s"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before it could be killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done = rounds_done(&cut);
    assert!(
        done < 4,
        "the run finished before the kill; nothing was tested"
    );
    assert!(!cut.join("summary.md").exists());

    // Resuming refuses other settings, then continues with the run's own config.
    let err = fedcdd(["run", "--resume", &s(&cut), "--set", "rounds=9"]);
    assert!(!err.status.success());
    let out = fedcdd(["run", "--resume", &s(&cut), "--quiet"]).ok();
    assert!(out.stdout.contains("global (round 4)"), "{out}");

    // Ctrl-C (SIGINT): stops after the current client with status 130, then resumes.
    let int = dir.join("int");
    let child = Command::new(fedcdd_bin())
        .args(["run", &s(&cfg), "--out", &s(&int), "--quiet"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start fedcdd");
    let t0 = Instant::now();
    while rounds_done(&int) < 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint after 300 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let signalled = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .is_ok_and(|st| st.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if signalled && rounds_done(&int) < 4 {
        assert_eq!(out.status.code(), Some(130), "{stderr}");
        assert!(stderr.contains("--resume"), "{stderr}");
    }
    fedcdd(["run", "--resume", &s(&int), "--quiet"]).ok();

    let a = fs::read(full.join("adapter/adapter_model.safetensors")).unwrap();
    for other in [&cut, &int] {
        let b = fs::read(other.join("adapter/adapter_model.safetensors")).unwrap();
        assert!(
            a == b,
            "{}: the resumed run's final adapter differs from the uninterrupted run's",
            other.display()
        );
        assert_eq!(eval_lines(&full), eval_lines(other));
    }
    // And training really changed the adapter (B starts at zero).
    let (tensors, _) =
        fedcdd_host::io::read_safetensors(&full.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        tensors
            .iter()
            .filter(|t| t.name.contains("lora_B"))
            .any(|t| t.data.iter().any(|&v| v != 0.0))
    );
    for file in [
        "metrics.csv",
        "rounds.csv",
        "loss.svg",
        "bytes.svg",
        "summary.md",
        "config.toml",
    ] {
        assert!(full.join(file).is_file(), "{file} missing");
    }
    // Uploads are masked (keep 0.5): fewer bytes than dense f32, per round.
    let rounds = fs::read_to_string(full.join("rounds.csv")).unwrap();
    for line in rounds.lines().skip(1) {
        let cols: Vec<&str> = line.split(',').collect();
        let (up, dense): (u64, u64) = (cols[3].parse().unwrap(), cols[5].parse().unwrap());
        assert!(up > 0 && up < dense, "{line}");
    }
}

#[test]
fn compare_runs_every_algorithm() {
    let f = fixture();
    let dir = f.root.join("compare");
    fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("run.toml");
    write_config(&cfg, "fedavg", 1);
    let algs = [
        "fedavg",
        "fedprox",
        "scaffold",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "ffa-lora",
        "fedsa-lora",
        "flora",
        "fedcdd",
    ];
    let out = fedcdd([
        "compare",
        &s(&cfg),
        "--algorithms",
        &algs.join(","),
        "--out",
        &s(&dir.join("out")),
        "--quiet",
        "--set",
        "references=[\"centralized\", \"local-only\"]",
    ])
    .ok();
    for a in algs {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with(&format!("| {a} "))),
            "no row for {a}:\n{}",
            out.stdout
        );
        assert!(
            dir.join("out")
                .join(format!("{a}-s0"))
                .join("adapter")
                .is_dir()
        );
    }
    for r in ["centralized", "local-only"] {
        assert!(out.stdout.contains(r), "no {r} row:\n{}", out.stdout);
    }
    for file in ["compare.md", "compare.csv", "compare.svg", "compare.jsonl"] {
        assert!(dir.join("out").join(file).is_file(), "{file} missing");
    }
    // Both start from the same seeded init; FedAvg trains A, FFA-LoRA keeps it and trains B.
    let read = |alg: &str| {
        fedcdd_host::io::read_safetensors(
            &dir.join("out")
                .join(format!("{alg}-s0/adapter/adapter_model.safetensors")),
        )
        .unwrap()
        .0
    };
    let ffa = read("ffa-lora");
    let avg = read("fedavg");
    let a_of = |ts: &[fedcdd_host::io::Tensor]| -> Vec<Vec<f32>> {
        ts.iter()
            .filter(|t| t.name.contains("lora_A"))
            .map(|t| t.data.clone())
            .collect()
    };
    assert_ne!(a_of(&ffa), a_of(&avg), "fedavg should have trained A");
    assert!(
        ffa.iter()
            .filter(|t| t.name.contains("lora_B"))
            .any(|t| t.data.iter().any(|&v| v != 0.0)),
        "ffa-lora should have trained B"
    );
    // A compare re-run reuses finished runs instead of training again.
    let again = fedcdd([
        "compare",
        &s(&cfg),
        "--algorithms",
        "fedavg",
        "--out",
        &s(&dir.join("out")),
        "--set",
        "references=[\"centralized\", \"local-only\"]",
    ])
    .ok();
    assert!(again.stderr.contains("reusing the finished run"), "{again}");
}

#[test]
fn bad_configs_are_clear_errors() {
    let f = fixture();
    let dir = f.root.join("bad");
    fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("run.toml");
    write_config(&cfg, "fedcdd", 1);
    let cases: [(&[&str], &str); 6] = [
        (&["--set", "rounds_typo=3"], "rounds_typo"),
        (&["--set", "partition=dirichlet:0"], "partition"),
        (&["--set", "sample_clients=5"], "sample_clients"),
        (&["--set", "algorithm=fedfoo"], "fedfoo"),
        (&["--set", "keep_ratio=1.5"], "mask"),
        (&["--set", "micro_batch=3"], "micro_batch"),
    ];
    for (extra, needle) in cases {
        let mut args = vec![
            "run".to_string(),
            s(&cfg),
            "--out".into(),
            s(&dir.join("x")),
        ];
        args.extend(extra.iter().map(|x| x.to_string()));
        let out = fedcdd(&args);
        assert_eq!(out.status.code(), Some(1), "{out}");
        let errs = out.error_lines();
        assert!(errs.iter().any(|l| l.contains(needle)), "{needle}: {out}");
        assert!(!out.stderr.contains("panicked"), "{out}");
    }
    // A data file without domains cannot be partitioned per domain.
    let nodomain = dir.join("nodomain.jsonl");
    fs::write(&nodomain, "{\"text\": \"hello\"}\n").unwrap();
    let out = fedcdd([
        "run",
        &s(&cfg),
        "--out",
        &s(&dir.join("y")),
        "--set",
        &format!("data=\"{}\"", s(&nodomain)),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(
        out.error_lines().iter().any(|l| l.contains("domain")),
        "{out}"
    );
    // Resuming a directory that holds no run.
    let out = fedcdd(["run", "--resume", &s(&dir)]);
    assert_eq!(out.status.code(), Some(1), "{out}");
}

#[test]
fn cuda_device_is_a_clear_error_without_a_gpu() {
    let f = fixture();
    let dir = f.root.join("cuda");
    fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("run.toml");
    write_config(&cfg, "fedavg", 1);
    // The federated runner has no CUDA path yet: an error with or without a GPU.
    let out = fedcdd([
        "run",
        &s(&cfg),
        "--out",
        &s(&dir.join("x")),
        "--set",
        "device=\"cuda\"",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(
        out.error_lines()
            .iter()
            .any(|l| l.contains("--device cuda")),
        "{out}"
    );
    assert!(
        !dir.join("x").exists(),
        "nothing is written when the device is refused"
    );
    // train / eval / generate / bench kernels: without a GPU, an error naming the reason.
    let cases: Vec<Vec<String>> = vec![
        vec![
            "generate".into(),
            "--model".into(),
            s(&f.model),
            "--prompt".into(),
            "hi".into(),
            "--device".into(),
            "cuda".into(),
        ],
        vec![
            "eval".into(),
            "--model".into(),
            s(&f.model),
            "--data".into(),
            s(&f.eval),
            "--device".into(),
            "cuda".into(),
        ],
        vec![
            "bench".into(),
            "kernels".into(),
            "--device".into(),
            "cuda".into(),
            "--iters".into(),
            "1".into(),
        ],
    ];
    for args in cases {
        let out = fedcdd(&args);
        if out.status.success() {
            eprintln!("SKIPPED: {} ran on a GPU", args.join(" "));
            continue;
        }
        assert_eq!(out.status.code(), Some(1), "{out}");
        assert!(!out.stderr.contains("panicked"), "{out}");
        assert!(
            out.error_lines()
                .iter()
                .any(|l| l.contains("CUDA") || l.contains("cuda")),
            "{out}"
        );
    }
}

#[test]
fn scaffold_with_sgd_clients_uses_the_spec_control_update() {
    let f = fixture();
    let dir = f.root.join("scaffold_sgd");
    fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("run.toml");
    write_config(&cfg, "scaffold", 2);
    let run = dir.join("run");
    fedcdd([
        "run",
        &s(&cfg),
        "--out",
        &s(&run),
        "--quiet",
        "--set",
        "optimizer=\"sgd\"",
        "--set",
        "lr=0.05",
    ])
    .ok();
    // The checkpoint carries the server control (in the server state) and the sampled
    // clients' controls, finite and not all zero after two rounds.
    let ckpt = run.join("checkpoint");
    let (server, _) =
        fedcdd_host::io::read_safetensors(&ckpt.join("server_state.safetensors")).unwrap();
    let (clients, _) =
        fedcdd_host::io::read_safetensors(&ckpt.join("clients.safetensors")).unwrap();
    assert!(server.iter().any(|t| t.name.starts_with("c/")));
    assert!(clients.iter().any(|t| t.name.starts_with("client")));
    for tensors in [&server, &clients] {
        assert!(tensors.iter().all(|t| t.data.iter().all(|v| v.is_finite())));
        assert!(tensors.iter().any(|t| t.data.iter().any(|&v| v != 0.0)));
    }
}

fn run_dirs(sweep: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(sweep.join("runs"))
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// `fedcdd sweep`: the grid's cross product runs once per distinct resolved config (grid
/// values that resolve alike share one run; the verdict table compares the algorithms); a second call reuses every run and prints the
/// same table; a sweep killed mid-run resumes and ends with the same adapters.
#[test]
fn sweep_shares_reuses_and_resumes_runs() {
    let f = fixture();
    let dir = f.root.join("sweep");
    fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("base.toml");
    write_config(&cfg, "fedavg", 3);
    let sweep = |out: &Path| -> Vec<String> {
        [
            "sweep",
            &s(&cfg),
            "--grid",
            "algorithm=fedavg,fedcdd",
            // Uploads are dense: the noise scale does not matter, so both are one run.
            "--set",
            "keep_ratio=1.0",
            "--grid",
            "noise_scale=0.1,0.2",
            "--out",
            &s(out),
        ]
        .map(str::to_string)
        .to_vec()
    };
    let a = dir.join("a");
    let first = fedcdd(sweep(&a)).ok();
    assert!(first.stderr.contains("(2 distinct configs)"), "{first}");
    assert_eq!(run_dirs(&a).len(), 2);
    for row in [
        "| fedavg | 0.1 | 1 |",
        "| fedavg | 0.2 | 1 |",
        "| fedcdd | 0.1 | 1 |",
    ] {
        assert!(first.stdout.contains(row), "no row {row}: {first}");
    }
    assert!(
        first.stdout.contains("| fedcdd | noise_scale=0.2 |"),
        "{first}"
    );
    for file in ["sweep.md", "sweep.csv", "sweep_points.csv", "sweep.svg"] {
        assert!(a.join(file).is_file(), "{file} missing");
    }
    let again = fedcdd(sweep(&a)).ok();
    assert_eq!(again.stderr.matches("(reused)").count(), 4, "{again}");
    assert_eq!(first.stdout, again.stdout);

    // Killed once a run has checkpointed a round, then resumed.
    let b = dir.join("b");
    let mut child = Command::new(fedcdd_bin())
        .args(sweep(&b))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start fedcdd");
    let t0 = Instant::now();
    let cut = loop {
        if let Some(d) = run_dirs(&b).into_iter().find(|d| rounds_done(d) >= 1) {
            break d;
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the sweep ended ({status}) before it could be killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(rounds_done(&cut) < 3, "the run finished before the kill");
    fedcdd(sweep(&b)).ok();
    // The same scores and bytes (the per-run seconds differ, so not the printed table).
    let points = |d: &Path| fs::read_to_string(d.join("sweep_points.csv")).unwrap();
    assert_eq!(points(&a), points(&b));
    for run in run_dirs(&a) {
        let name = run.file_name().unwrap();
        let adapter = |root: &Path| {
            fs::read(
                root.join("runs")
                    .join(name)
                    .join("adapter/adapter_model.safetensors"),
            )
            .unwrap()
        };
        assert!(
            adapter(&a) == adapter(&b),
            "{name:?}: resumed adapter differs"
        );
    }
}

fn adapter_values(run: &Path) -> Vec<f64> {
    let (tensors, _) =
        fedcdd_host::io::read_safetensors(&run.join("adapter/adapter_model.safetensors")).unwrap();
    let mut tensors = tensors;
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    tensors
        .iter()
        .flat_map(|t| t.data.iter().map(|&v| v as f64))
        .collect()
}

fn distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt()
}

/// An attacker that sends −100·Δ drags FedAvg's mean far away; the coordinate-wise median of
/// the three clients stays near the clean run; clipping to the median norm bounds it too. The
/// rounds log who was clipped.
#[test]
fn robust_rules_and_clipping_hold_off_a_scaled_sign_flip() {
    let f = fixture();
    let dir = f.root.join("attack");
    fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("run.toml");
    write_config(&cfg, "fedavg", 2);
    let run = |name: &str, sets: &[&str]| -> PathBuf {
        let out = dir.join(name);
        let mut args = vec![
            "run".to_string(),
            s(&cfg),
            "--out".into(),
            s(&out),
            "--quiet".into(),
            "--set".into(),
            "sample_clients=3".into(),
            "--set".into(),
            "keep_ratio=1.0".into(),
        ];
        for x in sets {
            args.push("--set".into());
            args.push(x.to_string());
        }
        fedcdd(args).ok();
        out
    };
    let clean = adapter_values(&run("clean", &[]));
    let attacked = adapter_values(&run("attacked", &["attack=\"scale:1:-100\""]));
    let median = adapter_values(&run(
        "median",
        &["attack=\"scale:1:-100\"", "robust=\"median\""],
    ));
    let clipped_dir = run("clipped", &["attack=\"scale:1:-100\"", "clip=\"median:1\""]);
    let clipped = adapter_values(&clipped_dir);
    let (d_mean, d_median, d_clip) = (
        distance(&attacked, &clean),
        distance(&median, &clean),
        distance(&clipped, &clean),
    );
    assert!(
        d_median * 5.0 < d_mean,
        "median {d_median} vs mean {d_mean}"
    );
    assert!(d_clip * 5.0 < d_mean, "clipped {d_clip} vs mean {d_mean}");
    let rounds = fs::read_to_string(clipped_dir.join("rounds.csv")).unwrap();
    assert!(rounds.starts_with(
        "round,clients,train_loss,upload_bytes,cumulative_upload_bytes,dense_bytes,seconds,\
         clipped,clip_bound,epsilon\n"
    ));
    for line in rounds.lines().skip(1) {
        let cols: Vec<&str> = line.split(',').collect();
        let clipped: usize = cols[7].parse().unwrap();
        assert!(clipped >= 1, "the attacker is clipped every round: {line}");
        assert!(cols[8].parse::<f64>().unwrap() > 0.0);
    }
    // Robust rules and DP are refused where they do not apply, naming the key.
    for (sets, key) in [
        (vec!["algorithm=\"fedcdd\"", "robust=\"median\""], "robust"),
        (vec!["robust=\"trimmed_mean:1\""], "trimmed_mean"),
        (vec!["algorithm=\"fedcdd\"", "dp_clip=1.0"], "dp_clip"),
        (vec!["attack=\"signflip:9\""], "attack"),
        (vec!["dp_clip=1.0", "dp_delta=2.0"], "dp_delta"),
    ] {
        let mut args = vec![
            "run".to_string(),
            s(&cfg),
            "--out".into(),
            s(&dir.join("bad")),
        ];
        for x in sets {
            args.push("--set".into());
            args.push(x.to_string());
        }
        let out = fedcdd(args);
        assert!(!out.status.success());
        assert!(out.stderr.contains(key), "{out}");
    }
}

/// Client-level DP: every update is clipped to `dp_clip` (the rounds say all were), ε grows
/// round by round and is in the summary, and the noise changes the result (σ = 0 vs 1).
#[test]
fn dp_clips_every_client_and_accounts_epsilon() {
    let f = fixture();
    let dir = f.root.join("dp");
    fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("run.toml");
    write_config(&cfg, "fedavg", 3);
    let run = |name: &str, sigma: &str| -> PathBuf {
        let out = dir.join(name);
        fedcdd([
            "run",
            &s(&cfg),
            "--out",
            &s(&out),
            "--quiet",
            "--set",
            "dp_clip=0.000001",
            "--set",
            &format!("dp_noise_multiplier={sigma}"),
        ])
        .ok();
        out
    };
    let noisy = run("noisy", "1.0");
    let quiet = run("quiet", "0.0");
    let rounds = fs::read_to_string(noisy.join("rounds.csv")).unwrap();
    let mut last = 0.0;
    for line in rounds.lines().skip(1) {
        let cols: Vec<&str> = line.split(',').collect();
        let sampled = cols[1].split(';').count();
        assert_eq!(
            cols[7].parse::<usize>().unwrap(),
            sampled,
            "all clipped: {line}"
        );
        let eps: f64 = cols[9].parse().unwrap();
        assert!(eps > last, "ε grows: {rounds}");
        last = eps;
    }
    let summary = fs::read_to_string(noisy.join("summary.md")).unwrap();
    assert!(summary.contains("## Differential privacy"), "{summary}");
    assert_ne!(adapter_values(&noisy), adapter_values(&quiet));
    let quiet_rounds = fs::read_to_string(quiet.join("rounds.csv")).unwrap();
    assert!(
        quiet_rounds
            .lines()
            .skip(1)
            .all(|l| l.ends_with(",inf") || l.ends_with(",")),
        "{quiet_rounds}"
    );
}
