//! The `Backend` implementation for [`Cuda`]: checks (the CPU's own, where they are shared),
//! then typed launches of the NVRTC-compiled kernels.

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::{Cuda, CudaIds, CudaWeight};
use crate::cpu::reference_ops::{self as checks, AdamScalars};
use crate::{
    AdamW, AttnShape, Backend, Copy2d, Gemm, KernelError, LoraDims, LossSum, RopeShape, Sgd,
    WeightDType, WeightSource,
};

/// Panics naming the op when a CUDA call failed (the trait's ops cannot return errors).
fn ok<T, E: std::fmt::Debug>(op: &str, r: Result<T, E>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("cuda {op}: {e:?}"),
    }
}

/// Panics naming `op` unless the buffer `name` (`len` values) holds `rows x cols` or more.
fn at_least(op: &str, name: &str, len: usize, rows: usize, cols: usize) {
    assert!(
        len >= rows * cols,
        "{op}: {name} has {len} < {rows}x{cols} values"
    );
}

fn int(op: &str, what: &str, v: usize) -> i32 {
    i32::try_from(v).unwrap_or_else(|_| panic!("{op}: {what} = {v} does not fit the kernels' i32"))
}

/// `(m, n, k)` threads of a block-of-256 elementwise launch over `n` elements.
const BLOCK: u32 = 256;

/// Which DJ instantiation of the attention kernels covers `head_dim` (columns per lane).
fn attn_dj(op: &str, d: usize) -> usize {
    match d {
        0..=32 => 1,
        33..=64 => 2,
        65..=128 => 4,
        129..=256 => 8,
        _ => panic!("{op}: head_dim {d} > 256 is not supported by the CUDA attention kernels"),
    }
}

const QT: usize = 16;
const KT: usize = 32;

/// The tiled GEMM's tile edge (kernels/cuda/gemm.cu).
const GEMM_TILE: usize = 64;

impl Cuda {
    fn func(&self, name: &str) -> &cudarc::driver::CudaFunction {
        self.funcs
            .get(name)
            .unwrap_or_else(|| panic!("cuda: kernel {name} was not loaded"))
    }

    /// A grid-stride launch over `n` elements.
    fn grid(&self, n: usize) -> LaunchConfig {
        let blocks = n
            .div_ceil(BLOCK as usize)
            .clamp(1, self.info.sm_count as usize * 16);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn bind(&self, op: &str) {
        ok(op, self.ctx.bind_to_thread());
    }

    fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        op: &str,
        len: usize,
    ) -> CudaSlice<T> {
        if len == 0 {
            ok(op, self.stream.null())
        } else {
            ok(op, self.stream.alloc_zeros(len))
        }
    }

    /// `C = alpha · op(A) · op(B) + beta · C` with the hand-written tiled kernel; B in any
    /// weight dtype (`gemm_f32`, `gemm_f16`, `gemm_bf16`). Split-K for accumulating products
    /// with few output tiles and a long reduction (LoRA's dA, dB).
    #[allow(clippy::too_many_arguments)]
    fn gemm_raw<B>(
        &self,
        kernel: &str,
        g: Gemm,
        a: &CudaSlice<f32>,
        b: &CudaSlice<B>,
        c: &mut CudaSlice<f32>,
    ) {
        let Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            alpha,
            beta,
        } = g;
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            // op(A)·op(B) is 0: C = beta · C.
            if beta == 0.0 {
                self.fill_range(c, m * n, 0.0);
            } else if beta != 1.0 {
                self.scale_range(c, m * n, beta);
            }
            return;
        }
        let tiles = m.div_ceil(GEMM_TILE) * n.div_ceil(GEMM_TILE);
        let target = 2 * self.info.sm_count as usize;
        let splits = if beta == 1.0 && tiles < target && k >= 512 {
            (target / tiles).min(k / 256).max(1)
        } else {
            1
        };
        let k_per_split = k.div_ceil(splits).div_ceil(16) * 16;
        let splits = k.div_ceil(k_per_split);
        let cfg = LaunchConfig {
            grid_dim: (
                n.div_ceil(GEMM_TILE) as u32,
                m.div_ceil(GEMM_TILE) as u32,
                splits as u32,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let op = "gemm";
        let (mi, ni, ki) = (int(op, "m", m), int(op, "n", n), int(op, "k", k));
        let (ta, tb) = (trans_a as i32, trans_b as i32);
        let kps = int(op, "k per split", k_per_split);
        let mut l = self.stream.launch_builder(self.func(kernel));
        l.arg(a)
            .arg(b)
            .arg(c)
            .arg(&mi)
            .arg(&ni)
            .arg(&ki)
            .arg(&ta)
            .arg(&tb)
            .arg(&alpha)
            .arg(&beta)
            .arg(&kps);
        // SAFETY: the argument list matches gemm.cu's signature; bounds were checked.
        ok(op, unsafe { l.launch(cfg) });
    }

    fn fill_range(&self, x: &mut CudaSlice<f32>, n: usize, value: f32) {
        if n == 0 {
            return;
        }
        let n64 = n as u64;
        let mut l = self.stream.launch_builder(self.func("fill_f32"));
        l.arg(x).arg(&value).arg(&n64);
        // SAFETY: matches fill_f32(float*, float, u64); n <= x.len().
        ok("fill", unsafe { l.launch(self.grid(n)) });
    }

    fn scale_range(&self, x: &mut CudaSlice<f32>, n: usize, a: f32) {
        if n == 0 {
            return;
        }
        let n64 = n as u64;
        let mut l = self.stream.launch_builder(self.func("scale_f32"));
        l.arg(x).arg(&a).arg(&n64);
        // SAFETY: matches scale_f32(float*, float, u64); n <= x.len().
        ok("scale", unsafe { l.launch(self.grid(n)) });
    }

    /// `y[m,n] (+)= x[m,k] · Wᵀ` (`backward = false`) or `dx[m,k] (+)= dy[m,n] · W`.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        op: &str,
        x: &CudaSlice<f32>,
        w: &CudaWeight,
        y: &mut CudaSlice<f32>,
        m: usize,
        accumulate: bool,
        backward: bool,
    ) {
        self.bind(op);
        let (n, k) = (w.rows, w.cols);
        // forward: x [m,k] -> y [m,n]; backward: dy [m,n] -> dx [m,k]
        let (kin, nout) = if backward { (n, k) } else { (k, n) };
        at_least(op, if backward { "dy" } else { "x" }, x.len(), m, kin);
        at_least(op, if backward { "dx" } else { "y" }, y.len(), m, nout);
        if m == 0 || nout == 0 {
            return;
        }
        let beta = if accumulate { 1.0f32 } else { 0.0 };
        let Some(blas) = &self.blas else {
            let g = Gemm {
                m,
                n: nout,
                k: kin,
                trans_a: false,
                trans_b: !backward,
                alpha: 1.0,
                beta,
            };
            let kernel = match w.dtype {
                WeightDType::F32 => "gemm_f32",
                WeightDType::F16 => "gemm_f16",
                WeightDType::Bf16 => "gemm_bf16",
            };
            return self.gemm_raw(kernel, g, x, &w.data, y);
        };
        if kin == 0 {
            if !accumulate {
                self.fill_range(y, m * nout, 0.0);
            }
            return;
        }
        // Column-major view: forward yᵀ[n,m] = op_T(W as [k,n]) · xᵀ[k,m];
        // backward dxᵀ[k,m] = (W as [k,n]) · dyᵀ[n,m].
        let (transa, mm, nn, kk, lda, ldb, ldc) = if backward {
            (blas_sys::cublasOperation_t::CUBLAS_OP_N, k, m, n, k, n, k)
        } else {
            (blas_sys::cublasOperation_t::CUBLAS_OP_T, n, m, k, k, k, n)
        };
        let transb = blas_sys::cublasOperation_t::CUBLAS_OP_N;
        let (mm, nn, kk) = (int(op, "m", mm), int(op, "n", nn), int(op, "k", kk));
        let (lda, ldb, ldc) = (int(op, "ld", lda), int(op, "ld", ldb), int(op, "ld", ldc));
        let alpha = 1.0f32;
        let handle = *blas.handle();
        let stream = self.stream.clone();
        match w.dtype {
            WeightDType::F32 => {
                let (wp, _r1) = w.data.device_ptr(&stream);
                let (xp, _r2) = x.device_ptr(&stream);
                let (yp, _r3) = y.device_ptr_mut(&stream);
                // SAFETY: pointers are live device buffers of the checked sizes.
                ok(op, unsafe {
                    cudarc::cublas::result::sgemm(
                        handle,
                        transa,
                        transb,
                        mm,
                        nn,
                        kk,
                        &alpha,
                        wp as *const f32,
                        lda,
                        xp as *const f32,
                        ldb,
                        &beta,
                        yp as *mut f32,
                        ldc,
                    )
                });
            }
            WeightDType::F16 | WeightDType::Bf16 => {
                let (conv, ty) = if w.dtype == WeightDType::Bf16 {
                    ("convert_f32_bf16", blas_sys::cudaDataType::CUDA_R_16BF)
                } else {
                    ("convert_f32_f16", blas_sys::cudaDataType::CUDA_R_16F)
                };
                let count = m * kin;
                let mut xh: CudaSlice<u16> = self.alloc(op, count);
                {
                    let n64 = count as u64;
                    let mut l = self.stream.launch_builder(self.func(conv));
                    l.arg(x).arg(&mut xh).arg(&n64);
                    // SAFETY: matches convert_f32_*(const float*, T*, u64).
                    ok(op, unsafe { l.launch(self.grid(count)) });
                }
                let (wp, _r1) = w.data.device_ptr(&stream);
                let (xp, _r2) = xh.device_ptr(&stream);
                let (yp, _r3) = y.device_ptr_mut(&stream);
                // SAFETY: as above; A and B in the weight's 16-bit type, C f32, f32 compute.
                ok(op, unsafe {
                    cudarc::cublas::result::gemm_ex(
                        handle,
                        transa,
                        transb,
                        mm,
                        nn,
                        kk,
                        (&alpha as *const f32).cast(),
                        wp as *const std::ffi::c_void,
                        ty,
                        lda,
                        xp as *const std::ffi::c_void,
                        ty,
                        ldb,
                        (&beta as *const f32).cast(),
                        yp as *mut std::ffi::c_void,
                        blas_sys::cudaDataType::CUDA_R_32F,
                        ldc,
                        blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                });
            }
        }
    }

    fn weight_kernel(base: &str, dtype: WeightDType) -> String {
        let suffix = match dtype {
            WeightDType::F32 => "f32",
            WeightDType::F16 => "f16",
            WeightDType::Bf16 => "bf16",
        };
        format!("{base}_{suffix}")
    }

    fn attn_smem(kind: &str, d: usize) -> usize {
        let floats = match kind {
            "forward" => QT * d + KT * (d + 1) + KT * d,
            "dq" => 2 * QT * d + 2 * KT * (d + 1),
            _ => 2 * KT * d + 2 * KT * (d + 1) + 2 * KT,
        };
        floats * 4
    }

    fn attn_cfg(&self, op: &str, grid: (usize, usize, usize), smem: usize) -> LaunchConfig {
        assert!(
            smem <= self.info.smem_optin,
            "{op}: needs {smem} bytes of shared memory, the device allows {}",
            self.info.smem_optin
        );
        LaunchConfig {
            grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        }
    }
}

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;
    type Ids = CudaIds;
    type Weight = CudaWeight;

    fn name(&self) -> String {
        format!(
            "cuda:{} {} ({}, {} SMs{})",
            self.info.ordinal,
            self.info.name,
            self.info.arch,
            self.info.sm_count,
            if self.info.cublas { ", cuBLAS" } else { "" }
        )
    }

    fn zeros(&self, len: usize) -> CudaSlice<f32> {
        self.bind("zeros");
        self.alloc("zeros", len)
    }
    fn upload(&self, values: &[f32]) -> CudaSlice<f32> {
        self.bind("upload");
        if values.is_empty() {
            return ok("upload", self.stream.null());
        }
        ok("upload", self.stream.clone_htod(values))
    }
    fn download(&self, buf: &CudaSlice<f32>, out: &mut [f32]) {
        self.bind("download");
        assert!(
            out.len() <= buf.len(),
            "download: {} values asked of a buffer of {}",
            out.len(),
            buf.len()
        );
        if out.is_empty() {
            return;
        }
        let view = buf.slice(0..out.len());
        ok("download", self.stream.memcpy_dtoh(&view, out));
        ok("download", self.stream.synchronize());
    }
    fn buf_len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }
    fn upload_ids(&self, ids: &[i32]) -> CudaIds {
        self.bind("upload_ids");
        let dev = if ids.is_empty() {
            ok("upload_ids", self.stream.null())
        } else {
            ok("upload_ids", self.stream.clone_htod(ids))
        };
        CudaIds {
            dev,
            host: ids.to_vec(),
        }
    }
    fn weight(&self, src: &WeightSource) -> Result<CudaWeight, KernelError> {
        let raw = src.raw_bytes()?;
        if cfg!(target_endian = "big") {
            return Err(KernelError(
                "cuda: weights are uploaded as little-endian bytes; this host is big-endian"
                    .to_string(),
            ));
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| KernelError(format!("cuda weight: {e:?}")))?;
        let data = if raw.is_empty() {
            self.stream.null()
        } else {
            self.stream.clone_htod(raw)
        }
        .map_err(|e| {
            KernelError(format!(
                "cuda: uploading a {}x{} {:?} weight ({} bytes): {e:?}",
                src.rows,
                src.cols,
                src.dtype,
                raw.len()
            ))
        })?;
        Ok(CudaWeight {
            rows: src.rows,
            cols: src.cols,
            dtype: src.dtype,
            data,
        })
    }
    fn weight_dims(&self, w: &CudaWeight) -> (usize, usize) {
        (w.rows, w.cols)
    }
    fn fill(&self, buf: &mut CudaSlice<f32>, value: f32) {
        self.bind("fill");
        let n = buf.len();
        self.fill_range(buf, n, value);
    }
    fn copy_2d(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>, s: Copy2d) {
        let op = "copy_2d";
        self.bind(op);
        if s.count == 0 || s.len == 0 {
            return;
        }
        let last = s.count - 1;
        assert!(
            s.src_offset + last * s.src_stride + s.len <= src.len(),
            "{op}: source of {} values is too short for {s:?}",
            src.len()
        );
        assert!(
            s.dst_offset + last * s.dst_stride + s.len <= dst.len(),
            "{op}: destination of {} values is too short for {s:?}",
            dst.len()
        );
        let a = [
            s.count as u64,
            s.len as u64,
            s.src_offset as u64,
            s.src_stride as u64,
            s.dst_offset as u64,
            s.dst_stride as u64,
        ];
        let mut l = self.stream.launch_builder(self.func("copy_2d_f32"));
        l.arg(src).arg(dst);
        for v in &a {
            l.arg(v);
        }
        // SAFETY: matches copy_2d_f32's (src, dst, 6 x u64); bounds checked above.
        ok(op, unsafe { l.launch(self.grid(s.count * s.len)) });
    }

    fn axpy(&self, y: &mut CudaSlice<f32>, a: f32, x: &CudaSlice<f32>) {
        self.bind("axpy");
        checks::check_same_len("axpy", ("y", y.len()), ("x", x.len()));
        let n = y.len();
        if n == 0 {
            return;
        }
        let n64 = n as u64;
        let mut l = self.stream.launch_builder(self.func("axpy_f32"));
        l.arg(y).arg(&a).arg(x).arg(&n64);
        // SAFETY: matches axpy_f32(float*, float, const float*, u64).
        ok("axpy", unsafe { l.launch(self.grid(n)) });
    }
    fn scale(&self, x: &mut CudaSlice<f32>, a: f32) {
        self.bind("scale");
        let n = x.len();
        self.scale_range(x, n, a);
    }
    fn sum_squares(&self, x: &CudaSlice<f32>) -> f64 {
        let op = "sum_squares";
        self.bind(op);
        let n = x.len();
        if n == 0 {
            return 0.0;
        }
        let cfg = self.grid(n);
        let blocks = cfg.grid_dim.0 as usize;
        let mut partial: CudaSlice<f64> = self.alloc(op, blocks);
        let n64 = n as u64;
        let mut l = self.stream.launch_builder(self.func("sum_squares_f32"));
        l.arg(x).arg(&n64).arg(&mut partial);
        // SAFETY: matches sum_squares_f32(const float*, u64, double*); one partial per block.
        ok(op, unsafe { l.launch(cfg) });
        let host = ok(op, self.stream.clone_dtoh(&partial));
        ok(op, self.stream.synchronize());
        host.iter().sum()
    }

    fn linear_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaWeight,
        y: &mut CudaSlice<f32>,
        m: usize,
        accumulate: bool,
    ) {
        self.linear("linear_forward", x, w, y, m, accumulate, false)
    }
    fn linear_backward_input(
        &self,
        dy: &CudaSlice<f32>,
        w: &CudaWeight,
        dx: &mut CudaSlice<f32>,
        m: usize,
        accumulate: bool,
    ) {
        self.linear("linear_backward_input", dy, w, dx, m, accumulate, true)
    }
    fn matmul(&self, g: Gemm, a: &CudaSlice<f32>, b: &CudaSlice<f32>, c: &mut CudaSlice<f32>) {
        let op = "matmul";
        self.bind(op);
        at_least(op, "A", a.len(), g.m, g.k);
        at_least(op, "B", b.len(), g.k, g.n);
        at_least(op, "C", c.len(), g.m, g.n);
        self.gemm_raw("gemm_f32", g, a, b, c);
    }

    fn lora_forward(
        &self,
        x: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        d: LoraDims,
        u: &mut CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) {
        let op = "lora_forward";
        self.bind(op);
        let LoraDims { m, k, n, r, scale } = d;
        at_least(op, "x", x.len(), m, k);
        at_least(op, "A", a.len(), r, k);
        at_least(op, "B", b.len(), n, r);
        at_least(op, "u", u.len(), m, r);
        at_least(op, "y", y.len(), m, n);
        let g = |m, n, k, trans_a, trans_b, alpha, beta| Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            alpha,
            beta,
        };
        // u[m,r] = x[m,k] · A[r,k]ᵀ
        self.gemm_raw("gemm_f32", g(m, r, k, false, true, 1.0, 0.0), x, a, u);
        // y[m,n] += scale · u[m,r] · B[n,r]ᵀ
        self.gemm_raw("gemm_f32", g(m, n, r, false, true, scale, 1.0), u, b, y);
    }
    fn lora_backward(
        &self,
        x: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        d: LoraDims,
        da: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
        du: &mut CudaSlice<f32>,
        dx: Option<&mut CudaSlice<f32>>,
    ) {
        let op = "lora_backward";
        self.bind(op);
        let LoraDims { m, k, n, r, scale } = d;
        at_least(op, "x", x.len(), m, k);
        at_least(op, "A", a.len(), r, k);
        at_least(op, "B", b.len(), n, r);
        at_least(op, "u", u.len(), m, r);
        at_least(op, "dy", dy.len(), m, n);
        at_least(op, "dA", da.len(), r, k);
        at_least(op, "dB", db.len(), n, r);
        at_least(op, "du", du.len(), m, r);
        if let Some(dx) = &dx {
            at_least(op, "dx", dx.len(), m, k);
        }
        let g = |m, n, k, trans_a, trans_b, alpha, beta| Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            alpha,
            beta,
        };
        // dB[n,r] += scale · dy[m,n]ᵀ · u[m,r]
        self.gemm_raw("gemm_f32", g(n, r, m, true, false, scale, 1.0), dy, u, db);
        // du[m,r] = scale · dy[m,n] · B[n,r]
        self.gemm_raw("gemm_f32", g(m, r, n, false, false, scale, 0.0), dy, b, du);
        // dA[r,k] += du[m,r]ᵀ · x[m,k]
        self.gemm_raw("gemm_f32", g(r, k, m, true, false, 1.0, 1.0), du, x, da);
        // dx[m,k] += du[m,r] · A[r,k]
        if let Some(dx) = dx {
            self.gemm_raw("gemm_f32", g(m, k, r, false, false, 1.0, 1.0), du, a, dx);
        }
    }
    fn dropout_forward(&self, x: &CudaSlice<f32>, out: &mut CudaSlice<f32>, p: f32, seed: u64) {
        let op = "dropout_forward";
        self.bind(op);
        let scale = checks::check_dropout(op, ("x", x.len()), ("out", out.len()), p);
        let n = x.len();
        if n == 0 {
            return;
        }
        let n64 = n as u64;
        let mut l = self.stream.launch_builder(self.func("dropout_forward_f32"));
        l.arg(x).arg(out).arg(&p).arg(&scale).arg(&seed).arg(&n64);
        // SAFETY: matches dropout_forward_f32's signature; lengths checked.
        ok(op, unsafe { l.launch(self.grid(n)) });
    }
    fn dropout_backward(&self, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>, p: f32, seed: u64) {
        let op = "dropout_backward";
        self.bind(op);
        let scale = checks::check_dropout(op, ("dy", dy.len()), ("dx", dx.len()), p);
        let n = dy.len();
        if n == 0 {
            return;
        }
        let n64 = n as u64;
        let mut l = self
            .stream
            .launch_builder(self.func("dropout_backward_f32"));
        l.arg(dy).arg(dx).arg(&p).arg(&scale).arg(&seed).arg(&n64);
        // SAFETY: matches dropout_backward_f32's signature; lengths checked.
        ok(op, unsafe { l.launch(self.grid(n)) });
    }

    fn rmsnorm_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaWeight,
        y: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) {
        let op = "rmsnorm_forward";
        self.bind(op);
        checks::check_norm(op, &[("x", x.len()), ("y", y.len())], rstd.len(), rows, dim);
        assert_eq!(
            w.rows * w.cols,
            dim,
            "{op}: weight is {}x{}, not {dim} values",
            w.rows,
            w.cols
        );
        if rows == 0 || dim == 0 {
            return;
        }
        let dim_i = int(op, "dim", dim);
        let name = Self::weight_kernel("rmsnorm_forward", w.dtype);
        let mut l = self.stream.launch_builder(self.func(&name));
        l.arg(x).arg(&w.data).arg(y).arg(rstd).arg(&dim_i).arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches rmsnorm_forward_*; one block per row.
        ok(op, unsafe { l.launch(cfg) });
    }
    fn rmsnorm_backward(
        &self,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaWeight,
        rstd: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        rows: usize,
        dim: usize,
        accumulate: bool,
    ) {
        let op = "rmsnorm_backward";
        self.bind(op);
        let bufs = [("dy", dy.len()), ("x", x.len()), ("dx", dx.len())];
        checks::check_norm(op, &bufs, rstd.len(), rows, dim);
        assert_eq!(
            w.rows * w.cols,
            dim,
            "{op}: weight is {}x{}, not {dim} values",
            w.rows,
            w.cols
        );
        if rows == 0 || dim == 0 {
            return;
        }
        let dim_i = int(op, "dim", dim);
        let acc = accumulate as i32;
        let name = Self::weight_kernel("rmsnorm_backward", w.dtype);
        let mut l = self.stream.launch_builder(self.func(&name));
        l.arg(dy)
            .arg(x)
            .arg(&w.data)
            .arg(rstd)
            .arg(dx)
            .arg(&dim_i)
            .arg(&acc);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches rmsnorm_backward_*; one block per row.
        ok(op, unsafe { l.launch(cfg) });
    }
    fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        s: RopeShape,
        inverse: bool,
    ) {
        let op = "rope";
        self.bind(op);
        let half = checks::check_rope(x.len(), cos.len(), sin.len(), s);
        let n = s.batch * s.seq * s.heads * half;
        if n == 0 {
            return;
        }
        let a = [
            int(op, "batch", s.batch),
            int(op, "seq", s.seq),
            int(op, "heads", s.heads),
            int(op, "head_dim", s.head_dim),
            int(op, "pos0", s.pos0),
            inverse as i32,
        ];
        let mut l = self.stream.launch_builder(self.func("rope_f32"));
        l.arg(x).arg(cos).arg(sin);
        for v in &a {
            l.arg(v);
        }
        // SAFETY: matches rope_f32(float*, const float*, const float*, 6 x int).
        ok(op, unsafe { l.launch(self.grid(n)) });
    }
    fn attention_forward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
        s: AttnShape,
    ) {
        let op = "attention_forward";
        self.bind(op);
        checks::check_attn_forward(s, q.len(), (k.len(), v.len()), out.len(), lse.len());
        if s.batch == 0 || s.q_len == 0 || s.q_heads == 0 {
            return;
        }
        let dj = attn_dj(op, s.head_dim);
        let cfg = self.attn_cfg(
            op,
            (s.q_len.div_ceil(QT), s.q_heads, s.batch),
            Self::attn_smem("forward", s.head_dim),
        );
        let a = attn_ints(op, s);
        let name = format!("attn_forward_d{dj}");
        let mut l = self.stream.launch_builder(self.func(&name));
        l.arg(q).arg(k).arg(v).arg(out).arg(lse);
        for x in &a {
            l.arg(x);
        }
        l.arg(&s.scale);
        // SAFETY: matches attn_forward_d*'s signature; shapes checked.
        ok(op, unsafe { l.launch(cfg) });
    }
    fn attention_backward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        dq: &mut CudaSlice<f32>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
        s: AttnShape,
    ) {
        let op = "attention_backward";
        self.bind(op);
        checks::check_attn_backward(
            s,
            q.len(),
            (k.len(), v.len()),
            out.len(),
            lse.len(),
            dout.len(),
            dq.len(),
            (dk.len(), dv.len()),
        );
        if s.batch == 0 || s.q_heads == 0 {
            return;
        }
        let dj = attn_dj(op, s.head_dim);
        let a = attn_ints(op, s);
        let rows = s.batch * s.q_heads * s.q_len;
        let mut delta: CudaSlice<f32> = self.alloc(op, rows);
        if rows > 0 {
            let (b, ql, qh, d) = (a[7], a[0], a[3], a[5]);
            let mut l = self.stream.launch_builder(self.func("attn_delta_f32"));
            l.arg(out)
                .arg(dout)
                .arg(&mut delta)
                .arg(&b)
                .arg(&ql)
                .arg(&qh)
                .arg(&d);
            let cfg = LaunchConfig {
                grid_dim: ((rows * 32).div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches attn_delta_f32; one warp per query row.
            ok(op, unsafe { l.launch(cfg) });

            let cfg = self.attn_cfg(
                op,
                (s.q_len.div_ceil(QT), s.q_heads, s.batch),
                Self::attn_smem("dq", s.head_dim),
            );
            let name = format!("attn_backward_dq_d{dj}");
            let mut l = self.stream.launch_builder(self.func(&name));
            l.arg(q)
                .arg(k)
                .arg(v)
                .arg(lse)
                .arg(&delta)
                .arg(dout)
                .arg(&mut *dq);
            for x in &a[..7] {
                l.arg(x);
            }
            l.arg(&s.scale);
            // SAFETY: matches attn_backward_dq_d*'s signature.
            ok(op, unsafe { l.launch(cfg) });
        }
        if s.kv_stride > 0 && s.kv_heads > 0 {
            let cfg = self.attn_cfg(
                op,
                (s.kv_stride.div_ceil(KT), s.kv_heads, s.batch),
                Self::attn_smem("dkdv", s.head_dim),
            );
            let name = format!("attn_backward_dkdv_d{dj}");
            let mut l = self.stream.launch_builder(self.func(&name));
            l.arg(q)
                .arg(k)
                .arg(v)
                .arg(lse)
                .arg(&delta)
                .arg(dout)
                .arg(&mut *dk)
                .arg(&mut *dv);
            for x in &a[..7] {
                l.arg(x);
            }
            l.arg(&s.scale);
            // SAFETY: matches attn_backward_dkdv_d*'s signature.
            ok(op, unsafe { l.launch(cfg) });
        }
    }
    fn swiglu_forward(&self, gate: &CudaSlice<f32>, up: &CudaSlice<f32>, out: &mut CudaSlice<f32>) {
        let op = "swiglu_forward";
        self.bind(op);
        checks::check_swiglu_forward(gate.len(), up.len(), out.len());
        let n = gate.len();
        if n == 0 {
            return;
        }
        let n64 = n as u64;
        let mut l = self.stream.launch_builder(self.func("swiglu_forward_f32"));
        l.arg(gate).arg(up).arg(out).arg(&n64);
        // SAFETY: matches swiglu_forward_f32; lengths checked.
        ok(op, unsafe { l.launch(self.grid(n)) });
    }
    fn swiglu_backward(
        &self,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        dgate: &mut CudaSlice<f32>,
        dup: &mut CudaSlice<f32>,
    ) {
        let op = "swiglu_backward";
        self.bind(op);
        let n = gate.len();
        checks::check_swiglu_backward(n, up.len(), dout.len(), dgate.len(), dup.len());
        if n == 0 {
            return;
        }
        let n64 = n as u64;
        let mut l = self.stream.launch_builder(self.func("swiglu_backward_f32"));
        l.arg(gate).arg(up).arg(dout).arg(dgate).arg(dup).arg(&n64);
        // SAFETY: matches swiglu_backward_f32; lengths checked.
        ok(op, unsafe { l.launch(self.grid(n)) });
    }

    fn embedding_forward(&self, table: &CudaWeight, ids: &CudaIds, out: &mut CudaSlice<f32>) {
        let op = "embedding_forward";
        self.bind(op);
        let dim = table.cols;
        assert_eq!(
            out.len(),
            ids.host.len() * dim,
            "{op}: out has {} elements, not {} x {dim}",
            out.len(),
            ids.host.len()
        );
        checks::check_ids(op, &ids.host, table.rows);
        let n = ids.host.len() * dim;
        if n == 0 {
            return;
        }
        let (t, d) = (int(op, "tokens", ids.host.len()), int(op, "dim", dim));
        let name = Self::weight_kernel("embedding_forward", table.dtype);
        let mut l = self.stream.launch_builder(self.func(&name));
        l.arg(&table.data).arg(&ids.dev).arg(out).arg(&t).arg(&d);
        // SAFETY: matches embedding_forward_*; ids checked against the table.
        ok(op, unsafe { l.launch(self.grid(n)) });
    }
    fn embedding_backward(
        &self,
        ids: &CudaIds,
        dout: &CudaSlice<f32>,
        dtable: &mut CudaSlice<f32>,
    ) {
        let op = "embedding_backward";
        self.bind(op);
        let (_, dim) = checks::check_embedding_backward(&ids.host, dout.len(), dtable.len());
        let n = ids.host.len() * dim;
        if n == 0 {
            return;
        }
        let (t, d) = (int(op, "tokens", ids.host.len()), int(op, "dim", dim));
        let mut l = self
            .stream
            .launch_builder(self.func("embedding_backward_f32"));
        l.arg(&ids.dev).arg(dout).arg(dtable).arg(&t).arg(&d);
        // SAFETY: matches embedding_backward_f32; ids checked against the table.
        ok(op, unsafe { l.launch(self.grid(n)) });
    }
    fn cross_entropy(
        &self,
        logits: &mut CudaSlice<f32>,
        targets: &CudaIds,
        row_loss: &mut CudaSlice<f32>,
        vocab: usize,
        ignore_index: i32,
        grad_scale: Option<f32>,
    ) -> LossSum {
        let op = "cross_entropy";
        self.bind(op);
        checks::check_cross_entropy(
            logits.len(),
            &targets.host,
            row_loss.len(),
            vocab,
            ignore_index,
        );
        let rows = targets.host.len();
        let count = targets.host.iter().filter(|&&t| t != ignore_index).count();
        if rows == 0 {
            return LossSum { sum: 0.0, count };
        }
        let mut loss64: CudaSlice<f64> = self.alloc(op, rows);
        let vocab_i = int(op, "vocab", vocab);
        let has_grad = grad_scale.is_some() as i32;
        let g = grad_scale.unwrap_or(0.0);
        let mut l = self.stream.launch_builder(self.func("cross_entropy_f32"));
        l.arg(logits)
            .arg(&targets.dev)
            .arg(row_loss)
            .arg(&mut loss64)
            .arg(&vocab_i)
            .arg(&ignore_index)
            .arg(&has_grad)
            .arg(&g);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (if vocab >= 8192 { 1024 } else { 256 }, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches cross_entropy_f32; one block per row, targets checked.
        ok(op, unsafe { l.launch(cfg) });
        let losses = ok(op, self.stream.clone_dtoh(&loss64));
        ok(op, self.stream.synchronize());
        let mut sum = 0.0f64;
        for (&t, &loss) in targets.host.iter().zip(&losses) {
            if t != ignore_index {
                sum += loss;
            }
        }
        LossSum { sum, count }
    }

    fn adamw_step(
        &self,
        param: &mut CudaSlice<f32>,
        grad: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        hp: AdamW,
        step: u64,
    ) {
        let op = "adamw_step";
        self.bind(op);
        checks::check_optimizer(op, param.len(), grad.len(), &[m.len(), v.len()]);
        let k = AdamScalars::new(hp, step);
        let n = param.len();
        if n == 0 {
            return;
        }
        let n64 = n as u64;
        let has_decay = k.decay.is_some() as i32;
        let decay = k.decay.unwrap_or(1.0);
        let mut l = self.stream.launch_builder(self.func("adamw_f32"));
        l.arg(param)
            .arg(grad)
            .arg(m)
            .arg(v)
            .arg(&has_decay)
            .arg(&decay)
            .arg(&k.lerp_w)
            .arg(&k.beta2)
            .arg(&k.one_minus_beta2)
            .arg(&k.neg_step_size)
            .arg(&k.bias_correction2_sqrt)
            .arg(&k.eps)
            .arg(&n64);
        // SAFETY: matches adamw_f32's signature; lengths checked.
        ok(op, unsafe { l.launch(self.grid(n)) });
    }
    fn sgd_step(
        &self,
        param: &mut CudaSlice<f32>,
        grad: &CudaSlice<f32>,
        momentum_buf: &mut CudaSlice<f32>,
        hp: Sgd,
        first: bool,
    ) {
        let op = "sgd_step";
        self.bind(op);
        let has_momentum = hp.momentum != 0.0;
        if has_momentum {
            checks::check_optimizer(op, param.len(), grad.len(), &[momentum_buf.len()]);
        } else {
            checks::check_optimizer(op, param.len(), grad.len(), &[]);
        }
        let n = param.len();
        if n == 0 {
            return;
        }
        let n64 = n as u64;
        let has_decay = (hp.weight_decay != 0.0) as i32;
        let has_mom = has_momentum as i32;
        let one_minus_dampening = (1.0 - hp.dampening as f64) as f32;
        let nesterov = hp.nesterov as i32;
        let neg_lr = -hp.lr;
        let first_i = first as i32;
        let mut l = self.stream.launch_builder(self.func("sgd_f32"));
        l.arg(param)
            .arg(grad)
            .arg(momentum_buf)
            .arg(&has_decay)
            .arg(&hp.weight_decay)
            .arg(&has_mom)
            .arg(&hp.momentum)
            .arg(&one_minus_dampening)
            .arg(&nesterov)
            .arg(&neg_lr)
            .arg(&first_i)
            .arg(&n64);
        // SAFETY: matches sgd_f32's signature; the buffer is only touched with momentum.
        ok(op, unsafe { l.launch(self.grid(n)) });
    }
}

/// The attention kernels' int arguments, in their order:
/// q_len, kv_len, kv_stride, q_heads, kv_heads, head_dim, q_pos0, then batch (for delta).
fn attn_ints(op: &str, s: AttnShape) -> [i32; 8] {
    [
        int(op, "q_len", s.q_len),
        int(op, "kv_len", s.kv_len),
        int(op, "kv_stride", s.kv_stride),
        int(op, "q_heads", s.q_heads),
        int(op, "kv_heads", s.kv_heads),
        int(op, "head_dim", s.head_dim),
        int(op, "q_pos0", s.q_pos0),
        int(op, "batch", s.batch),
    ]
}
