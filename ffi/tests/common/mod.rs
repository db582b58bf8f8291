//! Helpers of the ffi tests: safe wrappers over the C entry points (called through the
//! crate's rlib, exactly as C calls them), test data, and reference results computed with
//! fedcdd-core directly.
#![allow(dead_code)]

use std::ffi::{CStr, CString, c_void};

use fedcdd::*;
use fedcdd_core::mask::{KeptSlices, MaskScratch};
use fedcdd_core::{
    ClientInput, DType, FedCddConfig, Layout, MaskConfig, MeanAccumulator, ServerOptConfig,
    ServerState, StreamingFedCdd, TensorRole, TensorView, apply_server_opt, bf16, f16,
    fedcdd_batch, init_server_state, mask_encode, mask_reconstruct,
};

/// A failed call: its status and `fedcdd_last_error()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub status: fedcdd_status,
    pub message: String,
}

pub type Res<T = ()> = Result<T, Failure>;

pub fn last_error() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next call.
    unsafe { CStr::from_ptr(fedcdd_last_error()) }
        .to_string_lossy()
        .into_owned()
}

pub fn check(status: fedcdd_status) -> Res {
    if status == FEDCDD_OK {
        assert_eq!(last_error(), "", "a successful call leaves no message");
        Ok(())
    } else {
        let message = last_error();
        assert!(!message.is_empty(), "status {status} without a message");
        Err(Failure { status, message })
    }
}

/// Asserts `r` failed with `status` and a message containing every `needle`.
#[track_caller]
pub fn expect_err<T: std::fmt::Debug>(r: Res<T>, status: fedcdd_status, needles: &[&str]) {
    match r {
        Ok(v) => panic!("expected status {status} ({needles:?}), got Ok({v:?})"),
        Err(f) => {
            assert_eq!(
                f.status, status,
                "wrong status for {:?} (message: {})",
                needles, f.message
            );
            for n in needles {
                assert!(
                    f.message.contains(n),
                    "message {:?} lacks {:?}",
                    f.message,
                    n
                );
            }
        }
    }
}

/// An f32 tensor owned by the test.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: CString,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(name: &str, shape: &[usize], data: Vec<f32>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor {
            name: CString::new(name).unwrap(),
            shape: shape.to_vec(),
            data,
        }
    }

    pub fn name(&self) -> &str {
        self.name.to_str().unwrap()
    }

    pub fn c(&self) -> fedcdd_tensor {
        fedcdd_tensor {
            name: self.name.as_ptr(),
            shape: self.shape.as_ptr(),
            ndim: self.shape.len(),
            dtype: FEDCDD_DTYPE_F32,
            data: self.data.as_ptr().cast(),
            len: self.data.len(),
        }
    }

    pub fn with_data(&self, data: Vec<f32>) -> Tensor {
        Tensor {
            data,
            ..self.clone()
        }
    }

    pub fn layout(&self) -> Layout {
        Layout::from_dims(&self.shape, TensorRole::from_name(self.name())).unwrap()
    }
}

pub fn c_tensors(ts: &[Tensor]) -> Vec<fedcdd_tensor> {
    ts.iter().map(Tensor::c).collect()
}

/// An aggregator handle, freed on drop.
pub struct Agg(pub *mut fedcdd_aggregator);

impl Drop for Agg {
    fn drop(&mut self) {
        // SAFETY: a live handle, freed once.
        unsafe { fedcdd_aggregator_free(self.0) };
    }
}

pub fn config(alg: fedcdd_algorithm) -> fedcdd_config {
    let mut c = std::mem::MaybeUninit::<fedcdd_config>::uninit();
    // SAFETY: a valid out pointer.
    check(unsafe { fedcdd_config_default(alg, c.as_mut_ptr()) }).unwrap();
    // SAFETY: initialised by the call.
    unsafe { c.assume_init() }
}

impl Agg {
    pub fn try_new(cfg: &fedcdd_config) -> Res<Agg> {
        let mut p = std::ptr::null_mut();
        // SAFETY: valid pointers.
        check(unsafe { fedcdd_aggregator_new(cfg, &mut p) })?;
        assert!(!p.is_null());
        Ok(Agg(p))
    }

    pub fn new(cfg: &fedcdd_config) -> Agg {
        Agg::try_new(cfg).unwrap()
    }

    pub fn set_global(&self, ts: &[Tensor]) -> Res {
        let c = c_tensors(ts);
        // SAFETY: valid pointers for the call.
        check(unsafe { fedcdd_aggregator_set_global(self.0, c.as_ptr(), c.len()) })
    }

    pub fn add(&self, id: u32, samples: f64, ts: &[Tensor]) -> Res {
        let c = c_tensors(ts);
        self.add_raw(id, samples, &c)
    }

    pub fn add_raw(&self, id: u32, samples: f64, c: &[fedcdd_tensor]) -> Res {
        // SAFETY: valid pointers for the call.
        check(unsafe { fedcdd_aggregator_add_client(self.0, id, samples, c.as_ptr(), c.len()) })
    }

    pub fn add_upload(&self, bytes: &[u8], samples: f64) -> Res {
        // SAFETY: valid pointers.
        check(unsafe { fedcdd_aggregator_add_upload(self.0, bytes.as_ptr(), bytes.len(), samples) })
    }

    pub fn begin_pass2(&self) -> Res {
        // SAFETY: a live handle.
        check(unsafe { fedcdd_aggregator_begin_pass2(self.0) })
    }

    pub fn passes(&self) -> usize {
        let mut n = 0;
        // SAFETY: valid pointers.
        check(unsafe { fedcdd_aggregator_passes(self.0, &mut n) }).unwrap();
        n
    }

    pub fn num_clients(&self) -> usize {
        let mut n = 0;
        // SAFETY: valid pointers.
        check(unsafe { fedcdd_aggregator_num_clients(self.0, &mut n) }).unwrap();
        n
    }

    pub fn steps(&self) -> u64 {
        let mut n = 0;
        // SAFETY: valid pointers.
        check(unsafe { fedcdd_aggregator_steps(self.0, &mut n) }).unwrap();
        n
    }

    /// Finalises and returns the new global of every tensor of `like` (f32).
    pub fn finalize(&self, like: &[Tensor]) -> Res<Vec<Vec<f32>>> {
        let mut bufs: Vec<Vec<f32>> = like.iter().map(|t| vec![f32::NAN; t.data.len()]).collect();
        let outs: Vec<fedcdd_output> = like
            .iter()
            .zip(bufs.iter_mut())
            .map(|(t, b)| fedcdd_output {
                name: t.name.as_ptr(),
                dtype: FEDCDD_DTYPE_F32,
                data: b.as_mut_ptr().cast(),
                len: b.len(),
            })
            .collect();
        // SAFETY: valid pointers for the call.
        check(unsafe { fedcdd_aggregator_finalize(self.0, outs.as_ptr(), outs.len()) })?;
        Ok(bufs)
    }

    pub fn reset_round(&self) {
        // SAFETY: a live handle.
        check(unsafe { fedcdd_aggregator_reset_round(self.0) }).unwrap();
    }

    pub fn get(&self, t: &Tensor) -> Vec<f32> {
        let mut out = vec![f32::NAN; t.data.len()];
        // SAFETY: valid pointers.
        check(unsafe {
            fedcdd_aggregator_get_global(
                self.0,
                t.name.as_ptr(),
                FEDCDD_DTYPE_F32,
                out.as_mut_ptr().cast::<c_void>(),
                out.len(),
            )
        })
        .unwrap();
        out
    }

    pub fn save(&self) -> Vec<u8> {
        let mut size = 0;
        // SAFETY: valid pointers.
        check(unsafe { fedcdd_aggregator_state_size(self.0, &mut size) }).unwrap();
        let mut buf = vec![0u8; size];
        let mut written = 0;
        // SAFETY: valid pointers.
        check(unsafe {
            fedcdd_aggregator_save_state(self.0, buf.as_mut_ptr(), buf.len(), &mut written)
        })
        .unwrap();
        assert_eq!(written, size);
        buf
    }

    pub fn load(&self, bytes: &[u8]) -> Res {
        // SAFETY: valid pointers.
        check(unsafe { fedcdd_aggregator_load_state(self.0, bytes.as_ptr(), bytes.len()) })
    }

    /// One whole round: every client once (batch) or twice (streaming FedCDD).
    pub fn round(
        &self,
        clients: &[(u32, f64, Vec<Tensor>)],
        like: &[Tensor],
    ) -> Res<Vec<Vec<f32>>> {
        for pass in 0..self.passes() {
            if pass == 1 {
                self.begin_pass2()?;
            }
            for (id, n, ts) in clients {
                self.add(*id, *n, ts)?;
            }
        }
        self.finalize(like)
    }
}

/// Encode options with a mask.
pub fn encode_options(keep: f32, noise: f32, seed: u64) -> fedcdd_encode_options {
    let mut o = std::mem::MaybeUninit::<fedcdd_encode_options>::uninit();
    // SAFETY: a valid out pointer.
    check(unsafe { fedcdd_encode_options_default(o.as_mut_ptr()) }).unwrap();
    // SAFETY: initialised by the call.
    let mut o = unsafe { o.assume_init() };
    o.keep_ratio = keep;
    o.noise_scale = noise;
    o.seed = seed;
    o
}

/// Encodes `local` against `global` into upload bytes (size query, then write).
pub fn encode(opts: &fedcdd_encode_options, global: &[Tensor], local: &[Tensor]) -> Res<Vec<u8>> {
    let (g, l) = (c_tensors(global), c_tensors(local));
    let mut size = 0;
    // SAFETY: valid pointers.
    check(unsafe {
        fedcdd_encode_upload_size(opts, g.as_ptr(), g.len(), l.as_ptr(), l.len(), &mut size)
    })?;
    let mut buf = vec![0u8; size];
    let mut written = 0;
    // SAFETY: valid pointers.
    check(unsafe {
        fedcdd_encode_upload(
            opts,
            g.as_ptr(),
            g.len(),
            l.as_ptr(),
            l.len(),
            buf.as_mut_ptr(),
            buf.len(),
            &mut written,
        )
    })?;
    assert_eq!(written, size, "the size query matches the bytes written");
    Ok(buf)
}

/// A parsed upload handle, freed on drop.
pub struct ParsedUpload(pub *mut fedcdd_upload);

impl Drop for ParsedUpload {
    fn drop(&mut self) {
        // SAFETY: a live handle, freed once.
        unsafe { fedcdd_upload_free(self.0) };
    }
}

impl ParsedUpload {
    pub fn parse(bytes: &[u8]) -> Res<ParsedUpload> {
        let mut p = std::ptr::null_mut();
        // SAFETY: valid pointers.
        let r = check(unsafe { fedcdd_upload_parse(bytes.as_ptr(), bytes.len(), &mut p) });
        if r.is_err() {
            assert!(p.is_null(), "a failed parse leaves *out NULL");
        }
        r.map(|_| ParsedUpload(p))
    }

    pub fn header(&self) -> fedcdd_upload_header {
        let mut h = fedcdd_upload_header::default();
        // SAFETY: valid pointers.
        check(unsafe { fedcdd_upload_get_header(self.0, &mut h) }).unwrap();
        h
    }

    pub fn info(&self, index: usize) -> Res<fedcdd_record_info> {
        let mut i = std::mem::MaybeUninit::<fedcdd_record_info>::uninit();
        // SAFETY: valid pointers.
        check(unsafe { fedcdd_upload_tensor_info(self.0, index, i.as_mut_ptr()) })?;
        // SAFETY: initialised by the successful call.
        Ok(unsafe { i.assume_init() })
    }

    pub fn decode(&self, index: usize, len: usize) -> Res<Vec<f32>> {
        let mut out = vec![f32::NAN; len];
        // SAFETY: valid pointers.
        check(unsafe {
            fedcdd_upload_decode(
                self.0,
                index,
                FEDCDD_DTYPE_F32,
                out.as_mut_ptr().cast(),
                out.len(),
            )
        })?;
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

/// A small deterministic generator (xorshift), values in [-1, 1).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// A LoRA-shaped global adapter: A `[r, d_in]` and B `[d_out, r]` of two layers plus a bias.
pub fn lora_global(seed: u64) -> Vec<Tensor> {
    let mut g = Lcg(seed);
    vec![
        Tensor::new("layers.0.q_proj.lora_A.weight", &[4, 10], g.vec(40)),
        Tensor::new("layers.0.q_proj.lora_B.weight", &[12, 4], g.vec(48)),
        Tensor::new("layers.1.v_proj.lora_A.weight", &[4, 10], g.vec(40)),
        Tensor::new("layers.1.v_proj.lora_B.weight", &[12, 4], g.vec(48)),
        Tensor::new("layers.1.v_proj.bias", &[12], g.vec(12)),
    ]
}

/// Client updates Δ_i: a shared direction plus per-client noise, so agreements differ.
pub fn lora_clients(global: &[Tensor], n: usize, seed: u64) -> Vec<(u32, f64, Vec<Tensor>)> {
    let mut g = Lcg(seed);
    let shared: Vec<Vec<f32>> = global.iter().map(|t| g.vec(t.data.len())).collect();
    (0..n)
        .map(|c| {
            let ts = global
                .iter()
                .zip(&shared)
                .map(|(t, s)| {
                    let scale = 0.1 * (c as f32 + 1.0);
                    let data = s.iter().map(|v| scale * (v + 0.8 * g.next())).collect();
                    t.with_data(data)
                })
                .collect();
            (c as u32 + 7, 10.0 * (c as f64 + 1.0), ts)
        })
        .collect()
}

/// The examples' data (aggregate.c, aggregate.cpp, aggregate.py compute the same): two tensors,
/// three clients; small dyadic rationals, exact in f32 in every language.
pub const EXAMPLE_NAMES: [&str; 2] = [
    "layers.0.q_proj.lora_A.weight",
    "layers.0.q_proj.lora_B.weight",
];
pub const EXAMPLE_SHAPES: [[usize; 2]; 2] = [[2, 6], [4, 2]];

pub fn example_global() -> Vec<Tensor> {
    (0..2)
        .map(|t| {
            let n = EXAMPLE_SHAPES[t][0] * EXAMPLE_SHAPES[t][1];
            let data = (0..n)
                .map(|i| (((i * 5 + t * 3) % 11) as f32 - 5.0) / 16.0)
                .collect();
            Tensor::new(EXAMPLE_NAMES[t], &EXAMPLE_SHAPES[t], data)
        })
        .collect()
}

/// Client `c`'s update of the examples and its sample count.
pub fn example_client(c: usize) -> (f64, Vec<Tensor>) {
    let ts = (0..2)
        .map(|t| {
            let n = EXAMPLE_SHAPES[t][0] * EXAMPLE_SHAPES[t][1];
            let data = (0..n)
                .map(|i| {
                    (((i * (c + 2) + t * 7 + c * 3) % 13) as f32 - 6.0) / 32.0 * (c as f32 + 1.0)
                })
                .collect();
            Tensor::new(EXAMPLE_NAMES[t], &EXAMPLE_SHAPES[t], data)
        })
        .collect();
    (10.0 * (c as f64 + 1.0), ts)
}

// ---------------------------------------------------------------------------------------------
// References computed with fedcdd-core directly
// ---------------------------------------------------------------------------------------------

/// Batch FedCDD of every tensor (core's `fedcdd_batch`).
pub fn core_fedcdd_batch(
    cfg: &FedCddConfig,
    global: &[Tensor],
    clients: &[(u32, f64, Vec<Tensor>)],
) -> Vec<Vec<f32>> {
    global
        .iter()
        .enumerate()
        .map(|(k, g)| {
            let inputs: Vec<ClientInput<'_>> = clients
                .iter()
                .map(|(id, n, ts)| ClientInput {
                    id: *id,
                    samples: *n as f32,
                    update: TensorView::F32(&ts[k].data),
                })
                .collect();
            let mut out = vec![0.0; g.data.len()];
            fedcdd_batch(cfg, g.layout(), TensorView::F32(&g.data), &inputs, &mut out).unwrap();
            out
        })
        .collect()
}

/// Streaming FedCDD of every tensor (core's `StreamingFedCdd`, clients in order twice).
pub fn core_fedcdd_streaming(
    cfg: &FedCddConfig,
    global: &[Tensor],
    clients: &[(u32, f64, Vec<Tensor>)],
) -> Vec<Vec<f32>> {
    global
        .iter()
        .enumerate()
        .map(|(k, g)| {
            let layout = g.layout();
            let mut ws = vec![0.0; StreamingFedCdd::workspace_len(cfg, &layout)];
            let mut agg =
                StreamingFedCdd::new(*cfg, layout, TensorView::F32(&g.data), &mut ws).unwrap();
            for (id, n, ts) in clients {
                agg.pass1(*id, *n as f32, TensorView::F32(&ts[k].data))
                    .unwrap();
            }
            for (id, n, ts) in clients {
                agg.pass2(*id, *n as f32, TensorView::F32(&ts[k].data))
                    .unwrap();
            }
            let mut out = vec![0.0; g.data.len()];
            agg.finish(&mut out).unwrap();
            out
        })
        .collect()
}

/// A FedAvg-family server over rounds, with core's accumulator and server step.
pub struct CoreServer {
    pub cfg: ServerOptConfig,
    pub global: Vec<Vec<f32>>,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    pub steps: u64,
}

impl CoreServer {
    pub fn new(cfg: ServerOptConfig, global: &[Tensor]) -> CoreServer {
        let mut m: Vec<Vec<f32>> = global.iter().map(|t| vec![0.0; t.data.len()]).collect();
        let mut v = m.clone();
        for (m, v) in m.iter_mut().zip(v.iter_mut()) {
            init_server_state(&cfg, m, v);
        }
        CoreServer {
            cfg,
            global: global.iter().map(|t| t.data.clone()).collect(),
            m,
            v,
            steps: 0,
        }
    }

    /// One round over the tensors `which` (the others keep their value).
    pub fn round(&mut self, clients: &[(u32, f64, Vec<Tensor>)], which: &[usize]) {
        for &k in which {
            let p = self.global[k].len();
            let mut buf = vec![0.0; 2 * p];
            let mut acc = MeanAccumulator::new(p, &mut buf).unwrap();
            for (id, n, ts) in clients {
                acc.add(
                    *id,
                    self.cfg.client_weight(*n as f32),
                    TensorView::F32(&ts[k].data),
                )
                .unwrap();
            }
            let mut mean = vec![0.0; p];
            acc.mean_into(&mut mean).unwrap();
            let mut out = vec![0.0; p];
            let mut st = ServerState {
                m: &mut self.m[k],
                v: &mut self.v[k],
                steps: self.steps,
            };
            apply_server_opt(
                &self.cfg,
                &mut st,
                TensorView::F32(&self.global[k]),
                &mean,
                &mut out,
            )
            .unwrap();
            self.global[k] = out;
        }
        self.steps += 1;
    }
}

/// Largest `|a − b| / (1 + |b|)` over two sets of tensors.
pub fn max_rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs() / (1.0 + q.abs()));
        }
    }
    worst
}

/// The client's own masked tensor, computed with core directly: the update rounded to the
/// upload dtype, `mask_encode`, then `mask_reconstruct` from the kept columns.
pub fn core_masked(
    delta: &[f32],
    layout: &Layout,
    mask: &MaskConfig,
    dtype: DType,
    seed: u64,
    index: u32,
) -> Vec<f32> {
    let rounded: Vec<f32> = match dtype {
        DType::F32 => delta.to_vec(),
        DType::F16 => delta.iter().map(|v| f16::from_f32(*v).to_f32()).collect(),
        DType::BF16 => delta.iter().map(|v| bf16::from_f32(*v).to_f32()).collect(),
    };
    let (rows, cols) = mask.importance.units(layout);
    let k = mask.kept_count(cols);
    let (mut norms, mut order) = (vec![0.0; cols], vec![0u32; cols]);
    let (mut kept, mut values) = (vec![0u32; k], vec![0.0f32; k * rows]);
    let summary = mask_encode(
        &rounded,
        layout,
        mask,
        MaskScratch {
            norms: &mut norms,
            order: &mut order,
        },
        &mut kept,
        &mut values,
    )
    .unwrap();
    let mut out = vec![0.0f32; layout.len()];
    mask_reconstruct(
        layout,
        mask.importance,
        &KeptSlices {
            kept: &kept,
            values: &values,
        },
        summary.sigma,
        seed,
        index,
        dtype,
        &mut out,
    )
    .unwrap();
    out
}
