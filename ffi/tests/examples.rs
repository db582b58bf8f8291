//! The examples built and run against the real library, their printed results checked
//! against fedcdd-core called directly (to 1e-6):
//! - `examples/aggregate.c` with the system `cc -std=c11 -Wall -Wextra -Werror`, linked to
//!   the shared library;
//! - `examples/aggregate.cpp` with `c++ -std=c++17 -Wall -Wextra -Werror`, linked to the
//!   static library;
//! - `examples/aggregate.py` through ctypes (skipped with a message without python3 + numpy);
//! - the installed package (`install.sh`): `pkg-config` and CMake's `find_package(fedcdd)`
//!   (each skipped with a message when the tool is absent).
//!
//! The library comes from `cargo build -p fedcdd-ffi` run by the test itself for the same
//! profile and target directory (a no-op when it is fresh; `cargo test` does not build the
//! cdylib/staticlib files). `FEDCDD_TEST_NO_BUILD=1` skips that step; `CC` / `CXX` choose
//! other compilers.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use fedcdd_core::mask::SplitMix64;
use fedcdd_core::{DType, FedCddConfig, Importance, MaskConfig, ServerOpt, ServerOptConfig};

fn ffi_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn workspace_root() -> PathBuf {
    ffi_dir().parent().expect("ffi/ has a parent").to_path_buf()
}

/// `target/<profile>`, holding libfedcdd.so / libfedcdd.a, built first when run by cargo.
fn library_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test executable's path");
        let deps = exe.parent().expect("the test executable has a directory");
        let profile_dir = if deps.file_name() == Some(OsStr::new("deps")) {
            deps.parent().expect("deps/ has a parent")
        } else {
            deps
        };
        if let (Some(cargo), None) = (
            std::env::var_os("CARGO"),
            std::env::var_os("FEDCDD_TEST_NO_BUILD"),
        ) {
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "--manifest-path"])
                .arg(workspace_root().join("Cargo.toml"))
                .args(["-p", "fedcdd-ffi"]);
            match profile_dir.file_name().and_then(OsStr::to_str) {
                Some("debug") | None => {}
                Some("release") => {
                    cmd.arg("--release");
                }
                Some(other) => {
                    cmd.args(["--profile", other]);
                }
            }
            if let Some(target_dir) = profile_dir.parent() {
                cmd.arg("--target-dir").arg(target_dir);
            }
            let out = cmd
                .output()
                .expect("cannot run `cargo build -p fedcdd-ffi`");
            assert!(
                out.status.success(),
                "`cargo build -p fedcdd-ffi` failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for lib in [shared_lib_name(), "libfedcdd.a"] {
            assert!(
                profile_dir.join(lib).is_file(),
                "{lib} is missing in {}: run `cargo build -p fedcdd-ffi` first",
                profile_dir.display()
            );
        }
        profile_dir.to_path_buf()
    })
}

fn shared_lib_name() -> &'static str {
    if cfg!(target_os = "macos") {
        "libfedcdd.dylib"
    } else {
        "libfedcdd.so"
    }
}

/// What a static link of libfedcdd.a needs besides (as `fedcdd.pc` says).
fn static_system_libs() -> &'static [&'static str] {
    if cfg!(target_os = "macos") {
        &["-framework", "CoreFoundation", "-liconv", "-lm"]
    } else {
        &["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl"]
    }
}

/// A fresh directory under cargo's temporary directory for tests.
fn temp_dir(label: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "ffi-{label}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("can create a temporary directory");
    dir
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd`, panicking with its output unless it succeeds.
fn run(mut cmd: Command) -> String {
    let text = describe(&cmd);
    let out: Output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{text}`: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{text}` failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Whether `program args` can be run and exits 0.
fn tool_works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn compiler(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

/// The `RESULT [rule] name values...` lines of an example's output, keyed by
/// `"rule name"` (or `"name"`).
fn results(stdout: &str) -> Vec<(String, Vec<f32>)> {
    assert_eq!(
        stdout.lines().last(),
        Some("OK"),
        "the example did not finish with OK:\n{stdout}"
    );
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            let first_number = parts
                .iter()
                .position(|p| p.parse::<f32>().is_ok())
                .expect("a RESULT line holds values");
            let key = parts[..first_number].join(" ");
            let values = parts[first_number..]
                .iter()
                .map(|p| p.parse::<f32>().expect("a value"))
                .collect();
            (key, values)
        })
        .collect()
}

/// Asserts the example printed `want` for tensor `key` to 1e-6.
#[track_caller]
fn assert_result(got: &[(String, Vec<f32>)], key: &str, want: &[f32]) {
    let values = &got
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no RESULT line for {key:?} in {got:?}"))
        .1;
    assert_eq!(values.len(), want.len(), "{key}");
    for (i, (g, w)) in values.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
            "{key}[{i}]: the example printed {g}, fedcdd-core gives {w}"
        );
    }
}

/// The examples' three clients as `(id, samples, Δ)`.
fn example_clients() -> Vec<(u32, f64, Vec<Tensor>)> {
    (0..3)
        .map(|c| {
            let (n, ts) = example_client(c);
            (c as u32, n, ts)
        })
        .collect()
}

/// The batch FedCDD result of the C and Python examples, from fedcdd-core.
fn expected_fedcdd() -> Vec<Vec<f32>> {
    core_fedcdd_batch(
        &FedCddConfig::default(),
        &example_global(),
        &example_clients(),
    )
}

fn check_c_output(stdout: &str) {
    let got = results(stdout);
    for (k, want) in expected_fedcdd().iter().enumerate() {
        assert_result(&got, EXAMPLE_NAMES[k], want);
    }
    assert!(
        stdout.contains("rejected: client 9: tensor \"layers.0.q_proj.lora_B.weight\""),
        "{stdout}"
    );
}

/// The C++ example's results from fedcdd-core: the clients' masked updates rebuilt with
/// core's mask (ρ = 0.5, η = 0.5, seed of the CLI's default for round 1), aggregated by
/// core's streaming FedCDD; and two FedAdam rounds with core's accumulator and server step.
fn check_cpp_output(stdout: &str) {
    let got = results(stdout);
    let global = example_global();
    let mask = MaskConfig {
        keep_ratio: 0.5,
        noise_scale: 0.5,
        importance: Importance::ColumnL2,
        axis: fedcdd_core::MaskAxis::Column,
    };
    let masked: Vec<(u32, f64, Vec<Tensor>)> = example_clients()
        .into_iter()
        .map(|(id, n, ts)| {
            let seed = SplitMix64((1u64 << 32) | id as u64).next_u64();
            let ts = ts
                .iter()
                .zip(&global)
                .enumerate()
                .map(|(k, (d, g))| {
                    // Δ as the client computes it: (G + Δ) − G in f32.
                    let delta: Vec<f32> = d
                        .data
                        .iter()
                        .zip(&g.data)
                        .map(|(dv, gv)| (gv + dv) - gv)
                        .collect();
                    let out = core_masked(&delta, &g.layout(), &mask, DType::F32, seed, k as u32);
                    g.with_data(out)
                })
                .collect();
            (id, n, ts)
        })
        .collect();
    let want = core_fedcdd_streaming(&FedCddConfig::default(), &global, &masked);
    for (k, w) in want.iter().enumerate() {
        assert_result(&got, &format!("fedcdd-upload {}", EXAMPLE_NAMES[k]), w);
    }

    let mut server = CoreServer::new(ServerOptConfig::defaults(ServerOpt::FedAdam), &global);
    let clients = example_clients();
    server.round(&clients, &[0, 1]);
    server.round(&clients, &[0, 1]);
    for (k, w) in server.global.iter().enumerate() {
        assert_result(&got, &format!("fedadam {}", EXAMPLE_NAMES[k]), w);
    }
    assert!(stdout.contains("round 2 identical"), "{stdout}");
}

fn include_dir() -> PathBuf {
    ffi_dir().join("include")
}

fn example(name: &str) -> PathBuf {
    ffi_dir().join("examples").join(name)
}

#[test]
fn c_example_compiles_with_warnings_as_errors_and_matches_core() {
    let lib = library_dir();
    let dir = temp_dir("c");
    let exe = dir.join("aggregate_c");
    let mut cc = Command::new(compiler("CC", "cc"));
    cc.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(include_dir())
        .arg(example("aggregate.c"))
        .arg("-L")
        .arg(lib)
        .arg("-lfedcdd")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lm")
        .arg("-o")
        .arg(&exe);
    run(cc);
    check_c_output(&run(Command::new(&exe)));
}

#[test]
fn cpp_example_compiles_with_warnings_as_errors_links_statically_and_matches_core() {
    let lib = library_dir();
    let dir = temp_dir("cpp");
    let exe = dir.join("aggregate_cpp");
    let mut cxx = Command::new(compiler("CXX", "c++"));
    cxx.args(["-std=c++17", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(include_dir())
        .arg(example("aggregate.cpp"))
        .arg(lib.join("libfedcdd.a"))
        .args(static_system_libs())
        .arg("-o")
        .arg(&exe);
    run(cxx);
    check_cpp_output(&run(Command::new(&exe)));
}

#[test]
fn the_header_compiles_as_c_and_cpp_on_its_own() {
    let dir = temp_dir("header");
    let c = dir.join("only_header.c");
    std::fs::write(
        &c,
        "#include \"fedcdd.h\"\n#include \"fedcdd.h\"\nint main(void) { return FEDCDD_OK; }\n",
    )
    .unwrap();
    for (compiler_cmd, std, lang) in [
        (compiler("CC", "cc"), "-std=c99", "c"),
        (compiler("CXX", "c++"), "-std=c++11", "c++"),
    ] {
        let mut cmd = Command::new(compiler_cmd);
        cmd.args([
            std,
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-fsyntax-only",
            "-x",
            lang,
            "-I",
        ])
        .arg(include_dir())
        .arg(&c);
        run(cmd);
    }
}

#[test]
fn python_ctypes_example_matches_core() {
    if !tool_works("python3", &["-c", "import ctypes, numpy"]) {
        println!("SKIPPED: python3 with numpy is not available; aggregate.py was not run");
        return;
    }
    let lib = library_dir().join(shared_lib_name());
    let mut py = Command::new("python3");
    py.arg(example("aggregate.py")).arg(&lib);
    let stdout = run(py);
    let got = results(&stdout);
    for (k, want) in expected_fedcdd().iter().enumerate() {
        assert_result(&got, EXAMPLE_NAMES[k], want);
    }
    assert!(stdout.contains("rejected: client 1: tensor"), "{stdout}");
}

/// `install.sh` into a temporary prefix, then the C example built with pkg-config and both
/// examples built by CMake through `find_package(fedcdd)`.
#[test]
fn installed_package_works_with_pkg_config_and_cmake() {
    let lib = library_dir();
    let prefix = temp_dir("prefix");
    let mut install = Command::new("bash");
    install
        .arg(ffi_dir().join("install.sh"))
        .arg(&prefix)
        .arg("--lib-dir")
        .arg(lib);
    let said = run(install);
    assert!(said.contains("installed libfedcdd"), "{said}");
    for f in [
        "include/fedcdd.h",
        "lib/libfedcdd.a",
        "lib/pkgconfig/fedcdd.pc",
        "lib/cmake/fedcdd/fedcdd-config.cmake",
        "lib/cmake/fedcdd/fedcdd-config-version.cmake",
    ] {
        assert!(prefix.join(f).is_file(), "install.sh did not install {f}");
    }
    assert!(prefix.join("lib").join(shared_lib_name()).is_file());
    let pc = std::fs::read_to_string(prefix.join("lib/pkgconfig/fedcdd.pc")).unwrap();
    assert!(
        pc.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))),
        "{pc}"
    );

    let pkg_path = prefix.join("lib/pkgconfig");
    if tool_works("pkg-config", &["--version"]) {
        let mut q = Command::new("pkg-config");
        q.args(["--cflags", "--libs", "fedcdd"])
            .env("PKG_CONFIG_PATH", &pkg_path);
        let flags = run(q);
        let dir = temp_dir("pkgconfig");
        let exe = dir.join("aggregate_c");
        let mut cc = Command::new(compiler("CC", "cc"));
        cc.args(["-std=c11", "-Wall", "-Wextra", "-Werror"])
            .arg(example("aggregate.c"))
            .args(flags.split_whitespace())
            .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()))
            .arg("-lm")
            .arg("-o")
            .arg(&exe);
        run(cc);
        check_c_output(&run(Command::new(&exe)));
    } else {
        println!("SKIPPED: pkg-config is not available; fedcdd.pc was not tried");
    }

    if !tool_works("cmake", &["--version"]) {
        println!(
            "SKIPPED: cmake is not available; find_package(fedcdd) was not tried \
             (`pip install cmake` provides it)"
        );
        return;
    }
    let build = temp_dir("cmake");
    let mut configure = Command::new("cmake");
    configure
        .arg("-S")
        .arg(ffi_dir().join("examples"))
        .arg("-B")
        .arg(&build)
        .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display()))
        .arg(format!("-DCMAKE_C_COMPILER={}", compiler("CC", "cc")))
        .arg(format!("-DCMAKE_CXX_COMPILER={}", compiler("CXX", "c++")));
    run(configure);
    let mut make = Command::new("cmake");
    make.arg("--build").arg(&build);
    run(make);
    check_c_output(&run(Command::new(build.join("aggregate_c"))));
    check_cpp_output(&run(Command::new(build.join("aggregate_cpp"))));

    // The version file: this version is found, an incompatible one is not.
    let v = env!("CARGO_PKG_VERSION");
    let (major, minor) = {
        let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    };
    for (wanted, ok) in [
        (format!("{major}.{minor}"), true),
        (format!("{}.0", major + 1), false),
        (format!("{major}.{}", minor + 1), false),
    ] {
        let project = temp_dir("cmake-version");
        std::fs::write(
            project.join("CMakeLists.txt"),
            format!(
                "cmake_minimum_required(VERSION 3.14)\nproject(v NONE)\n\
                 find_package(fedcdd {wanted} REQUIRED)\n"
            ),
        )
        .unwrap();
        let out = Command::new("cmake")
            .arg("-S")
            .arg(&project)
            .arg("-B")
            .arg(project.join("build"))
            .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display()))
            .output()
            .expect("cmake runs");
        assert_eq!(
            out.status.success(),
            ok,
            "find_package(fedcdd {wanted}) against {v}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
