//! The CUDA backend: hand-written kernels (`kernels/cuda/*.cu`) compiled by NVRTC at first
//! use, launched through `cudarc`; cuBLAS for the large matmuls against frozen weights.
//!
//! Everything CUDA is loaded at run time (`cudarc`'s `dynamic-loading`): the crate builds on
//! a machine with no CUDA, and [`Cuda::new`] returns an error (never panics) when the
//! driver, a device or NVRTC is missing. The kernels follow the [`Backend`] conventions and
//! the CPU reference's formulas (same dropout hash, RoPE tables, optimizer rounding,
//! ignore_index and grad_scale semantics). Shape errors panic naming the op, as on the CPU;
//! a CUDA error inside an op (which the trait cannot return) panics naming the op too.
//!
//! Linear layers: with cuBLAS, f32 weights use SGEMM (f32 throughout); f16 / bf16 weights use
//! `cublasGemmEx` with the activations rounded to the weight's dtype and f32 accumulation
//! (tensor cores, the PyTorch autocast behaviour). Without cuBLAS (library missing, or
//! `FEDCDD_CUDA_NO_CUBLAS=1`) the hand-written tiled GEMM widens the weight on load and keeps
//! the activations in f32.

pub mod bench;
pub mod nvrtc;
mod ops;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};

pub use nvrtc::compile_all_ptx;

use crate::{KernelError, WeightDType};

/// A frozen weight in device memory, in its stored dtype.
pub struct CudaWeight {
    pub rows: usize,
    pub cols: usize,
    pub dtype: WeightDType,
    data: CudaSlice<u8>,
}

/// Token ids on the device, with the host copy the checks read (ids outside the table panic
/// before any kernel runs, as on the CPU).
pub struct CudaIds {
    dev: CudaSlice<i32>,
    host: Vec<i32>,
}

impl CudaIds {
    pub fn host(&self) -> &[i32] {
        &self.host
    }
}

/// What the device says about itself (for names and the benchmark's peaks).
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability `(major, minor)`.
    pub cc: (i32, i32),
    /// The NVRTC target, `compute_XY`.
    pub arch: String,
    pub sm_count: u32,
    /// Largest dynamic shared memory a block may opt in to, bytes.
    pub smem_optin: usize,
    /// Peak DRAM bandwidth from the memory clock and bus width, bytes/s (0 if unknown).
    pub peak_bandwidth: f64,
    pub total_mem: usize,
    pub nvrtc: (i32, i32),
    /// Whether cuBLAS serves the linear layers.
    pub cublas: bool,
}

/// The CUDA backend on one device.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    blas: Option<cudarc::cublas::CudaBlas>,
    info: DeviceInfo,
}

fn err(what: &str, e: impl std::fmt::Debug) -> KernelError {
    KernelError(format!("cuda: {what}: {e:?}"))
}

/// Runs `f`, turning a panic inside `cudarc` (a missing symbol, say) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, KernelError>) -> Result<T, KernelError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(KernelError(format!("cuda: {what}: {msg}")))
        }
    }
}

/// Whether the CUDA driver library (`libcuda.so`) can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of CUDA devices, or why there is none to use.
pub fn device_count() -> Result<usize, KernelError> {
    if !driver_available() {
        return Err(KernelError(
            "no CUDA driver: libcuda.so cannot be loaded (no NVIDIA driver on this machine, \
             or its folder is not on LD_LIBRARY_PATH)"
                .to_string(),
        ));
    }
    guarded("counting devices", || {
        let n = CudaContext::device_count().map_err(|e| err("cuDeviceGetCount", e))?;
        Ok(n.max(0) as usize)
    })
}

impl Cuda {
    /// Opens device `ordinal`: checks that the driver and a device are there, compiles every
    /// kernel with NVRTC for the device's architecture (or reads the PTX cache), loads cuBLAS
    /// when present. Every missing piece is an `Err` with a readable message, never a panic.
    pub fn new(ordinal: usize) -> Result<Cuda, KernelError> {
        let count = device_count()?;
        if count == 0 {
            return Err(KernelError(
                "no CUDA device: the driver is loaded but reports 0 devices".to_string(),
            ));
        }
        if ordinal >= count {
            return Err(KernelError(format!(
                "no CUDA device {ordinal}: the driver reports {count} device(s)"
            )));
        }
        if !nvrtc::nvrtc_available() {
            return Err(KernelError(nvrtc::no_nvrtc_message()));
        }
        guarded("opening the device", || Self::open(ordinal))
    }

    fn open(ordinal: usize) -> Result<Cuda, KernelError> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let ctx = CudaContext::new(ordinal).map_err(|e| err("creating a context", e))?;
        // One stream: the event tracking cudarc does for several streams is not needed.
        // SAFETY: every buffer of this backend is used on this one stream only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let cc = ctx
            .compute_capability()
            .map_err(|e| err("compute capability", e))?;
        let attr = |a: A| ctx.attribute(a).map_err(|e| err("device attribute", e));
        let sm_count = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let smem_optin = attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
        // kHz and bits; DDR: two transfers per clock.
        let mem_khz = attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE).unwrap_or(0) as f64;
        let bus_bits = attr(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH).unwrap_or(0) as f64;
        let peak_bandwidth = 2.0 * mem_khz * 1e3 * bus_bits / 8.0;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".to_string());
        let total_mem = ctx.total_mem().unwrap_or(0);
        let arch = format!("compute_{}{}", cc.0, cc.1);
        let nvrtc_version = nvrtc::nvrtc_version().map_err(KernelError)?;

        let includes = nvrtc::include_dirs();
        let mut funcs = HashMap::new();
        for src in nvrtc::SOURCES {
            let ptx = nvrtc::cached_ptx(src, &arch, &includes).map_err(KernelError)?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(|e| {
                    err(
                        &format!(
                            "loading {}.cu's PTX (NVRTC {}.{} may be newer than the driver)",
                            src.name, nvrtc_version.0, nvrtc_version.1
                        ),
                        e,
                    )
                })?;
            for &k in src.kernels {
                let f = module
                    .load_function(k)
                    .map_err(|e| err(&format!("kernel {k}"), e))?;
                if k.starts_with("attn_") {
                    use cudarc::driver::sys::CUfunction_attribute as F;
                    f.set_attribute(
                        F::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem_optin as i32,
                    )
                    .map_err(|e| err(&format!("shared memory limit of {k}"), e))?;
                }
                funcs.insert(k, f);
            }
        }

        let want_blas = std::env::var("FEDCDD_CUDA_NO_CUBLAS").map_or(true, |v| v != "1");
        // SAFETY: only tries to dlopen the library by its candidate names.
        let blas = if want_blas && unsafe { cudarc::cublas::sys::is_culib_present() } {
            cudarc::cublas::CudaBlas::new(stream.clone()).ok()
        } else {
            None
        };
        let info = DeviceInfo {
            ordinal,
            name,
            cc,
            arch,
            sm_count,
            smem_optin,
            peak_bandwidth,
            total_mem,
            nvrtc: nvrtc_version,
            cublas: blas.is_some(),
        };
        Ok(Cuda {
            ctx,
            stream,
            funcs,
            blas,
            info,
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Waits for every queued kernel (timing, tests).
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.stream.synchronize().map_err(|e| err("synchronize", e))
    }

    /// Milliseconds `f` takes on the device's stream, measured with CUDA events around it.
    pub fn time_ms(&self, f: impl FnOnce()) -> Result<f32, KernelError> {
        let start = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| err("event", e))?;
        let end = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| err("event", e))?;
        start.record(&self.stream).map_err(|e| err("event", e))?;
        f();
        end.record(&self.stream).map_err(|e| err("event", e))?;
        end.synchronize().map_err(|e| err("event", e))?;
        start.elapsed_ms(&end).map_err(|e| err("event", e))
    }
}
