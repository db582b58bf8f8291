//! Where compute runs: the one place a backend is constructed (CPU, or CUDA on GPU 0), and
//! where `--threads` caps every parallel region of the process.

use anyhow::{Result, bail};
use fedcdd_kernels::Cpu;
use fedcdd_kernels::cuda::Cuda;

/// A compute device (config `device = "cpu" | "cuda"`, flag `--device`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            o => Err(format!("{o:?}: expected cpu or cuda")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The CPU backend on `threads` workers (0 = one per core). Also caps rayon's global pool at
/// that many threads, so work outside the backend's own pool (tokenization, weight checks,
/// random init) honours `--threads` too; the global pool is built once per process, so the
/// first backend's count holds.
pub fn cpu(threads: usize) -> Result<Cpu> {
    let be = Cpu::new(threads).map_err(|e| anyhow::anyhow!("cannot start the CPU backend: {e}"))?;
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(be.threads())
        .build_global();
    Ok(be)
}

/// The CUDA backend on GPU 0, or why there is none (no driver, no device).
pub fn cuda() -> Result<Cuda> {
    Cuda::new(0).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))
}

/// The error of `--device cuda` where a path has no CUDA support yet; without a GPU it names
/// the missing driver or device instead.
pub fn cuda_unsupported(what: &str) -> Result<()> {
    let dev = cuda()?;
    bail!(
        "--device cuda: found {}, but {what} runs on the CPU only so far (train, eval and \
         generate take --device cuda); use --device cpu",
        dev.info().name
    )
}
