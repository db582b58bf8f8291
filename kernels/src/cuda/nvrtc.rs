//! The kernel sources, how NVRTC finds the CUDA headers, and the on-disk PTX cache.
//!
//! Every `kernels/cuda/*.cu` file is one NVRTC program: the shared prelude
//! (`common.cuh`) is prepended as text, so the only headers NVRTC must find are
//! `cuda_fp16.h` and `cuda_bf16.h` (see [`include_dirs`]).

use std::path::{Path, PathBuf};

use cudarc::nvrtc;

/// The shared prelude every source starts with.
pub const PRELUDE: &str = include_str!("../../cuda/common.cuh");

/// One kernel source file and the kernels (entry points) it defines.
pub struct Source {
    /// File name under `kernels/cuda/`, without `.cu`.
    pub name: &'static str,
    pub code: &'static str,
    pub kernels: &'static [&'static str],
}

/// Every kernel source, grouped by op family.
pub const SOURCES: &[Source] = &[
    Source {
        name: "elementwise",
        code: include_str!("../../cuda/elementwise.cu"),
        kernels: &[
            "fill_f32",
            "copy_2d_f32",
            "axpy_f32",
            "scale_f32",
            "sum_squares_f32",
            "dropout_forward_f32",
            "dropout_backward_f32",
            "swiglu_forward_f32",
            "swiglu_backward_f32",
            "convert_f32_bf16",
            "convert_f32_f16",
        ],
    },
    Source {
        name: "norm",
        code: include_str!("../../cuda/norm.cu"),
        kernels: &[
            "rmsnorm_forward_f32",
            "rmsnorm_forward_f16",
            "rmsnorm_forward_bf16",
            "rmsnorm_backward_f32",
            "rmsnorm_backward_f16",
            "rmsnorm_backward_bf16",
        ],
    },
    Source {
        name: "rope",
        code: include_str!("../../cuda/rope.cu"),
        kernels: &["rope_f32"],
    },
    Source {
        name: "attention",
        code: include_str!("../../cuda/attention.cu"),
        kernels: &[
            "attn_forward_d1",
            "attn_forward_d2",
            "attn_forward_d4",
            "attn_forward_d8",
            "attn_delta_f32",
            "attn_backward_dq_d1",
            "attn_backward_dq_d2",
            "attn_backward_dq_d4",
            "attn_backward_dq_d8",
            "attn_backward_dkdv_d1",
            "attn_backward_dkdv_d2",
            "attn_backward_dkdv_d4",
            "attn_backward_dkdv_d8",
        ],
    },
    Source {
        name: "embedding",
        code: include_str!("../../cuda/embedding.cu"),
        kernels: &[
            "embedding_forward_f32",
            "embedding_forward_f16",
            "embedding_forward_bf16",
            "embedding_backward_f32",
        ],
    },
    Source {
        name: "cross_entropy",
        code: include_str!("../../cuda/cross_entropy.cu"),
        kernels: &["cross_entropy_f32"],
    },
    Source {
        name: "optim",
        code: include_str!("../../cuda/optim.cu"),
        kernels: &["adamw_f32", "sgd_f32"],
    },
    Source {
        name: "gemm",
        code: include_str!("../../cuda/gemm.cu"),
        kernels: &["gemm_f32", "gemm_f16", "gemm_bf16"],
    },
];

/// Every kernel name, source by source (for reports and the docs' table).
pub fn all_kernels() -> Vec<(&'static str, &'static str)> {
    SOURCES
        .iter()
        .flat_map(|s| s.kernels.iter().map(move |k| (s.name, *k)))
        .collect()
}

/// The full text NVRTC compiles for `src`: the prelude, then the file (with `#line` so
/// compiler messages name the file and line).
pub fn full_source(src: &Source) -> String {
    format!(
        "#line 1 \"common.cuh\"\n{PRELUDE}\n#line 1 \"{}.cu\"\n{}",
        src.name, src.code
    )
}

/// Whether `libnvrtc` can be loaded (cudarc would panic on first use otherwise).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { nvrtc::sys::is_culib_present() }
}

/// NVRTC's `(major, minor)` version.
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    if !nvrtc_available() {
        return Err(no_nvrtc_message());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; both pointers are valid for one write.
    let r = unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {r:?}"));
    }
    Ok((major, minor))
}

pub(crate) fn no_nvrtc_message() -> String {
    "libnvrtc (CUDA 13's libnvrtc.so.13) cannot be loaded: install the CUDA toolkit or \
     `pip install nvidia-cuda-nvrtc==13.0.*` and add its lib folder (site-packages/nvidia/cu13/lib) \
     to LD_LIBRARY_PATH"
        .to_string()
}

/// Folders that hold `cuda_bf16.h` (with its neighbour `cuda_fp16.h`), first found first:
/// 1. every folder in `FEDCDD_CUDA_INCLUDE` (':'-separated);
/// 2. `$CUDA_HOME/include`, `$CUDA_PATH/include`;
/// 3. for each folder of `LD_LIBRARY_PATH`, its sibling `../include` (the pip wheels put
///    `libnvrtc.so.13` in `site-packages/nvidia/cu13/lib` and the headers in `.../include`);
/// 4. `/usr/local/cuda/include`, `/usr/local/cuda-13.0/include`, `/usr/include`;
/// 5. the pip wheels' folders (`nvidia/cu13/include`, `nvidia/cuda_runtime/include`) under
///    every `sys.path` entry of `python3`, asked only when nothing above was found.
pub fn include_dirs() -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    let env_list = |name: &str| -> Vec<PathBuf> {
        std::env::var_os(name)
            .map(|v| std::env::split_paths(&v).collect())
            .unwrap_or_default()
    };
    candidates.extend(env_list("FEDCDD_CUDA_INCLUDE"));
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            candidates.push(PathBuf::from(root).join("include"));
        }
    }
    for lib in env_list("LD_LIBRARY_PATH") {
        if let Some(parent) = lib.parent() {
            candidates.push(parent.join("include"));
        }
    }
    for dir in [
        "/usr/local/cuda/include",
        "/usr/local/cuda-13.0/include",
        "/usr/include",
    ] {
        candidates.push(PathBuf::from(dir));
    }
    let mut found: Vec<PathBuf> = Vec::new();
    for c in candidates {
        if has_headers(&c) && !found.contains(&c) {
            found.push(c);
        }
    }
    if found.is_empty() {
        for entry in python_sys_path() {
            for sub in ["nvidia/cu13/include", "nvidia/cuda_runtime/include"] {
                let c = entry.join(sub);
                if has_headers(&c) && !found.contains(&c) {
                    found.push(c);
                }
            }
        }
    }
    found
}

fn has_headers(dir: &Path) -> bool {
    dir.join("cuda_bf16.h").is_file() && dir.join("cuda_fp16.h").is_file()
}

/// `python3`'s `sys.path` (empty when there is no python3).
fn python_sys_path() -> Vec<PathBuf> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys; print('\\n'.join(p for p in sys.path if p))",
        ])
        .stderr(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(PathBuf::from)
            .collect(),
        _ => Vec::new(),
    }
}

/// The NVRTC options every source is compiled with (besides the include folders).
fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        // `a * b + c` rounds twice, as on the CPU; kernels call fmaf where they want a fused op.
        "--fmad=false".to_string(),
        "-default-device".to_string(),
    ]
}

/// Compiles one source to PTX for `arch` (`compute_90`, ...). `Err` carries the compiler log.
pub fn compile_source(src: &Source, arch: &str, includes: &[PathBuf]) -> Result<String, String> {
    if !nvrtc_available() {
        return Err(no_nvrtc_message());
    }
    if includes.is_empty() {
        return Err(
            "cuda_bf16.h / cuda_fp16.h not found: set FEDCDD_CUDA_INCLUDE to the CUDA include \
             folder (pip: site-packages/nvidia/cu13/include from nvidia-cuda-runtime==13.0.*)"
                .to_string(),
        );
    }
    let opts = nvrtc::CompileOptions {
        options: options(arch),
        include_paths: includes
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
        name: Some(format!("{}.cu", src.name)),
        ..Default::default()
    };
    let ptx = nvrtc::compile_ptx_with_opts(full_source(src), opts).map_err(|e| match e {
        nvrtc::CompileError::CompileError { nvrtc, log, .. } => format!(
            "NVRTC could not compile {}.cu for {arch} ({nvrtc:?}):\n{}",
            src.name,
            log.to_string_lossy()
        ),
        other => format!("NVRTC failed on {}.cu: {other:?}", src.name),
    })?;
    Ok(ptx.to_src())
}

/// Compiles every kernel source to PTX for `arch` (e.g. `compute_90`); needs libnvrtc and
/// the headers, no GPU. Returns each source's name and its PTX size in bytes.
pub fn compile_all_ptx(arch: &str) -> Result<Vec<(String, usize)>, String> {
    let includes = include_dirs();
    let mut out = Vec::new();
    for src in SOURCES {
        let ptx = compile_source(src, arch, &includes)?;
        for k in src.kernels {
            if !ptx.contains(&format!(".entry {k}(")) {
                return Err(format!(
                    "{}.cu: kernel {k} is missing from the PTX",
                    src.name
                ));
            }
        }
        out.push((src.name.to_string(), ptx.len()));
    }
    Ok(out)
}

/// FNV-1a, 64 bits: a hash that stays the same across Rust versions (a cache key).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The PTX cache folder: `$FEDCDD_CUDA_CACHE`, else `$XDG_CACHE_HOME/fedcdd/ptx`, else
/// `$HOME/.cache/fedcdd/ptx`; `None` when none of these is set.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FEDCDD_CUDA_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("fedcdd").join("ptx"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("fedcdd").join("ptx"))
}

/// The PTX of `src` for `arch`: from the cache when present (key: hash of the full source,
/// the options, the arch and the NVRTC version), else compiled and written to the cache
/// (a cache that cannot be written is skipped silently).
pub fn cached_ptx(src: &Source, arch: &str, includes: &[PathBuf]) -> Result<String, String> {
    let (major, minor) = nvrtc_version()?;
    let text = full_source(src);
    let opts = options(arch).join(" ");
    let version = format!("nvrtc {major}.{minor}");
    let key = fnv1a(&[text.as_bytes(), opts.as_bytes(), version.as_bytes()]);
    let file = cache_dir().map(|d| d.join(format!("{}-{key:016x}-{arch}.ptx", src.name)));
    if let Some(f) = &file
        && let Ok(ptx) = std::fs::read_to_string(f)
        && ptx.contains(".entry")
    {
        return Ok(ptx);
    }
    let ptx = compile_source(src, arch, includes)?;
    if let Some(f) = &file
        && let Some(dir) = f.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        let tmp = f.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, f);
        }
    }
    Ok(ptx)
}
