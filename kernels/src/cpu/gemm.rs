//! The f32 GEMM behind every dense matmul of the CPU backend:
//! `C[m,n] = alpha · op(A)[m,k] · op(B)[k,n] + beta · C`, C row-major.
//!
//! Design (measured with `cargo run --release -p fedcdd-kernels --example gemm_bench`):
//! - **B is packed, A is not.** B (a frozen weight, in f32/f16/bf16, or an f32 buffer) is
//!   packed block by block into `KC × NR` column panels, widened to f32 on the way (AVX-512:
//!   in registers, with 16 × 16 transposes for `nn.Linear`'s `[out, in]` layout), once per
//!   call and shared by all threads; a block holds at most `B_BLOCK` values (1 MiB), so a big
//!   weight is never copied whole. A (activations, always f32) is read in place by the
//!   microkernel: with the model's small `n` packing A would cost a sizeable part of the
//!   arithmetic (`2n` flops per packed element), and a packed A measured no faster in the
//!   kernel. Only the last, partial `MR`-row tile of A is copied (zero-padded).
//! - **Microkernel** `MR × NR` (AVX-512: 14 × 32, i.e. 28 zmm accumulators, 2 vector loads of
//!   B and 14 broadcasts of A per step of k, four steps per trip, the C tile prefetched for
//!   writing); it reads A either row-major (`a[i·lda + p]`) or transposed (`a[p·lda + i]`).
//!   Partial tiles in `n` use masked loads/stores; `alpha`/`beta` are applied once in the
//!   epilogue (`beta = 0` never reads C). In cache it runs at about 85% of the FMA peak, as
//!   fast as hand-written assembly of the same loop measured here.
//! - **Blocking**: `k` is cut into `⌈k / KC⌉` equal blocks of at most `KC`; `n` into blocks
//!   such that a packed block (`kc × nc` f32) stays within half of L2. Inside a block, a
//!   thread walks its rows `MR` at a time and, for each row tile (kept in L1), every `NR`
//!   panel of the packed block (streamed from L2).
//! - **Few rows** (`m ≤ 16`, B transposed: decoding): no packing at all, see
//!   `lora::skinny_trans_b`.
//! - **Threads**: the rayon pool the call runs in (`Cpu::install`), in one of two ways.
//!   *Row blocks*: B's block is packed once and shared; tasks are whole `MR` tiles (about
//!   `MC` rows, a multiple of the thread count), and groups of panels when rows are few.
//!   *Column chunks* (many packed blocks, or `m ≤ 1024`): each task packs its own panels block
//!   by block and computes all rows for them, with no synchronisation inside the call; while
//!   its row tiles compute one block it prefetches the storage of the block it packs next.
//!   Block sizes never depend on the thread count and every element is summed in the same
//!   order, so results are bitwise identical for any number of threads.
//! - **ISA** ([`Simd`]): chosen at run time: AVX-512F, else AVX2+FMA (x86-64), else a
//!   portable kernel (plain Rust the compiler vectorises for the target's baseline).
//! - **No bf16 arithmetic.** All math is f32. On the machine this was tuned on, AVX-512 BF16
//!   (`vdpbf16ps`) in this kernel's 14 × 32 register blocking does half the flops per second
//!   of f32 FMAs (`--example bf16_probe`: 89 vs 186 GFLOP/s on one core, 178 vs 347 on two),
//!   so a bf16 dot-product path would be slower and less exact. AMX-BF16 tiles (`tdpbf16ps`)
//!   would be the way to a faster, opt-in bf16 mode; that VM's CPU does not expose AMX (the
//!   probe reads CPUID), so such a path could not be built and checked there.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::ops::{Isa as Tier, isa_cap};
use super::sync_ptr::SyncPtr;

/// The elements of op(B)'s storage, in the stored type.
#[derive(Clone, Copy)]
pub(crate) enum BSrc<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl BSrc<'_> {
    fn len(&self) -> usize {
        match self {
            BSrc::F32(s) => s.len(),
            BSrc::F16(s) => s.len(),
            BSrc::Bf16(s) => s.len(),
        }
    }
}

/// One GEMM call. `op(A)` is `[m,k]`: element `(i,p)` at `a[i·lda + p]`, or at `a[p·lda + i]`
/// when `trans_a`. `op(B)` is `[k,n]`: element `(p,j)` at `b[p·ldb + j]`, or at `b[j·ldb + p]`
/// when `trans_b`. C is `[m,n]` with row stride `ldc`.
#[derive(Clone, Copy)]
pub(crate) struct GemmCall<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub beta: f32,
    pub a: &'a [f32],
    pub lda: usize,
    pub trans_a: bool,
    pub b: BSrc<'a>,
    pub ldb: usize,
    pub trans_b: bool,
    pub ldc: usize,
}

/// The largest block of k one packed panel holds.
const KC: usize = 384;
/// The most values (f32) a packed block of B holds: 1 MiB, half a core's L2 here.
const B_BLOCK: usize = 256 * 1024;
/// Up to this many rows, products with a transposed B skip packing (see
/// `lora::skinny_trans_b`).
const SKINNY_M: usize = 16;
/// About this many rows per parallel task.
const MC: usize = 112;

/// A microkernel: `C[mr,nr] = alpha · A·Bp + beta · C` over `kc` steps, A read in place
/// (`lda`, transposed or not), `Bp` a packed `kc × NR` panel; `mr ≤ MR`, `nr ≤ NR` say how
/// much of the tile is inside C. `beta == 0` overwrites C without reading it.
///
/// # Safety
/// `a` must be readable for a full `MR × kc` tile at `lda`, `b` for `kc · NR` values, `c` for
/// `mr` rows of `nr` values at stride `ldc`; the CPU must have the kernel's features.
type KernelFn = unsafe fn(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta: f32,
    mr: usize,
    nr: usize,
);

/// Packs `kc` rows × `w ≤ NR` columns of op(B) into a `kc × NR` panel (zero-padded).
type PackFn = fn(
    dst: &mut [f32],
    b: BSrc<'_>,
    ldb: usize,
    trans_b: bool,
    p0: usize,
    kc: usize,
    j0: usize,
    w: usize,
    nr: usize,
);

/// One instruction set's microkernels and tile shape.
pub(crate) struct Isa {
    pub mr: usize,
    pub nr: usize,
    /// `[row-major A, transposed A]`.
    kernels: [KernelFn; 2],
    pack: PackFn,
}

/// The instruction sets the fast CPU ops have kernels for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    /// x86-64 AVX-512F: 14 × 32 GEMM tiles in zmm registers.
    Avx512,
    /// x86-64 AVX2 + FMA: 6 × 16 tiles in ymm registers.
    Avx2,
    /// Plain Rust the compiler vectorises for the build target's baseline.
    Portable,
}

impl Simd {
    /// The best this CPU runs, within the cap every fast CPU op honours (the
    /// `FEDCDD_CPU_ISA` environment variable and `ops::set_max_isa`).
    pub fn detect() -> Simd {
        static AVAILABLE: std::sync::OnceLock<[bool; 2]> = std::sync::OnceLock::new();
        let available =
            AVAILABLE.get_or_init(|| [Simd::Avx512.available(), Simd::Avx2.available()]);
        let cap = isa_cap();
        [(Simd::Avx512, Tier::Avx512), (Simd::Avx2, Tier::Avx2)]
            .into_iter()
            .zip(available)
            .find(|((_, tier), ok)| **ok && *tier <= cap)
            .map_or(Simd::Portable, |((s, _), _)| s)
    }

    /// Whether this CPU has the instructions.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Simd::Avx512 | Simd::Avx2 => false,
            Simd::Portable => true,
        }
    }

    /// `"avx512f 14x32"`, `"avx2+fma 6x16"` or `"portable 4x16"`.
    pub fn name(self) -> &'static str {
        match self {
            Simd::Avx512 => "avx512f 14x32",
            Simd::Avx2 => "avx2+fma 6x16",
            Simd::Portable => "portable 4x16",
        }
    }

    /// Panics unless this CPU has the instructions: running them anyway would be undefined
    /// behaviour, so every entry point that takes a `Simd` checks.
    pub(crate) fn check(self) {
        assert!(
            self.available(),
            "{} kernels need instructions this CPU lacks",
            self.name()
        );
    }

    /// The GEMM kernels (after [`Simd::check`]).
    fn isa(self) -> &'static Isa {
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => &x86::AVX512,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => &x86::AVX2,
            _ => &PORTABLE,
        }
    }
}

static PORTABLE: Isa = Isa {
    mr: 4,
    nr: 16,
    kernels: [portable_kernel::<false>, portable_kernel::<true>],
    pack: pack_panel_scalar,
};

/// `C = alpha · op(A) · op(B) + beta · C` on the current rayon pool with `simd`'s kernels
/// (panics when this CPU lacks them).
/// The GEMM's path for a few rows against a transposed B (see `lora::skinny_trans_b`), passed
/// in by the caller so this module does not depend on the LoRA kernels.
pub(crate) type SkinnyFn = fn(Simd, &GemmCall<'_>, &mut [f32]);

/// Whether `g` takes the few-rows path: B transposed, A row-major, at most `SKINNY_M` rows.
fn is_skinny(g: &GemmCall<'_>) -> bool {
    g.trans_b && !g.trans_a && g.m <= SKINNY_M
}

pub(crate) fn gemm(simd: Simd, g: &GemmCall<'_>, c: &mut [f32], skinny: SkinnyFn) {
    simd.check();
    let isa = simd.isa();
    let GemmCall {
        m,
        n,
        k,
        alpha,
        beta,
        lda,
        ldb,
        ldc,
        ..
    } = *g;
    if m == 0 || n == 0 {
        return;
    }
    // Every pointer the kernels form stays inside these slices (checked here, once).
    assert!(
        ldc >= n && c.len() >= (m - 1) * ldc + n,
        "gemm: C is too short"
    );
    if k == 0 || alpha == 0.0 {
        scale_c(c, m, n, ldc, beta);
        return;
    }
    let a_need = if g.trans_a {
        (k - 1) * lda + m
    } else {
        (m - 1) * lda + k
    };
    assert!(
        lda >= if g.trans_a { m } else { k } && g.a.len() >= a_need,
        "gemm: A is too short"
    );
    let b_need = if g.trans_b {
        (n - 1) * ldb + k
    } else {
        (k - 1) * ldb + n
    };
    assert!(
        ldb >= if g.trans_b { k } else { n } && g.b.len() >= b_need,
        "gemm: B is too short"
    );
    if is_skinny(g) {
        skinny(simd, g, c);
        return;
    }

    let (mr, nr) = (isa.mr, isa.nr);
    let kblocks = k.div_ceil(KC);
    let kc_max = k.div_ceil(kblocks);
    let nc_max = ((B_BLOCK / kc_max / nr).max(1) * nr).min(n.div_ceil(nr) * nr);
    let threads = rayon::current_num_threads().max(1);
    let cptr = SyncPtr(c.as_mut_ptr());

    // Column chunks: each task packs its own part of B, block by block, and computes every
    // row for it; no synchronisation inside the call, and each core reads only panels it
    // packed itself. Chunks are whole panels: about four per thread, at least four panels
    // each (every A tile loaded then serves that many kernel calls), at most a packed block
    // wide, a multiple of the thread count; panels spread evenly (within one) over them.
    // A narrow B (k/v projections, n = 192: six panels) still gets one chunk per thread when
    // each can have two panels: with one shared block, its packing would run on one thread
    // while the others wait (the 135M k/v forward ran at 57% of the FMA peak that way).
    let all_panels = n.div_ceil(nr);
    let chunks = {
        let c = (4 * threads).min(all_panels / 4) / threads * threads;
        let c = if c == 0 && all_panels >= 2 * threads {
            threads
        } else {
            c
        };
        c.max(all_panels.div_ceil(nc_max / nr))
    };
    // Column chunks when there are many packed blocks (each would cost two fork-joins) or
    // few rows per thread (each core would stream its partner's half of a shared packed block
    // into its L2 for only a few row tiles). Measured on 2 threads: TinyLlama's m=512 shapes
    // gain 15-25%; the tiny preset's m=2048, one- or two-block shapes do better with row
    // blocks (more, smaller tasks balance better when another process takes a core).
    let blocks = kblocks * n.div_ceil(nc_max);
    if threads > 1 && chunks >= threads && (blocks > 2 || m <= 1024) {
        // Chunk t's panels.
        let chunk_panels = |t: usize| (t * all_panels / chunks, (t + 1) * all_panels / chunks);
        (0..chunks).into_par_iter().for_each(|t| {
            let (p0, p1) = chunk_panels(t);
            let (j0, panels) = (p0 * nr, p1 - p0);
            let mut buf = AlignedBuf::new(kc_max * panels * nr);
            let mut pc = 0;
            while pc < k {
                let kc = kc_max.min(k - pc);
                // Next: this chunk's following block of k, or the next chunk's first (the
                // task that takes it is most often this thread's next).
                let next = if pc + kc < k {
                    Some(NextPiece {
                        p0: pc + kc,
                        kc: kc_max.min(k - pc - kc),
                        j0,
                        w: (panels * nr).min(n - j0),
                    })
                } else if t + 1 < chunks {
                    let (q0, q1) = chunk_panels(t + 1);
                    Some(NextPiece {
                        p0: 0,
                        kc: kc_max.min(k),
                        j0: q0 * nr,
                        w: ((q1 - q0) * nr).min(n - q0 * nr),
                    })
                } else {
                    None
                };
                let bpack = &mut buf.as_mut_slice()[..panels * kc * nr];
                for (p, panel) in bpack.chunks_mut(kc * nr).enumerate() {
                    let jj = j0 + p * nr;
                    (isa.pack)(panel, g.b, ldb, g.trans_b, pc, kc, jj, nr.min(n - jj), nr);
                }
                let tile = Tile {
                    isa,
                    g,
                    kc,
                    pc,
                    jc: j0,
                    n,
                    beta: if pc == 0 { beta } else { 1.0 },
                    bpack,
                    c: cptr,
                    next,
                };
                // SAFETY: chunks own disjoint columns of C; the bounds were checked above.
                unsafe { tile.run(0..m, 0..panels) };
                pc += kc;
            }
        });
        return;
    }

    let mut bbuf = AlignedBuf::new(kc_max * nc_max);
    let mut jc = 0;
    while jc < n {
        let nc = nc_max.min(n - jc);
        let panels = nc.div_ceil(nr);
        let mut pc = 0;
        while pc < k {
            let kc = kc_max.min(k - pc);
            let bpack = &mut bbuf.as_mut_slice()[..panels * kc * nr];
            let pack_one = |(t, panel): (usize, &mut [f32])| {
                let j0 = jc + t * nr;
                (isa.pack)(panel, g.b, ldb, g.trans_b, pc, kc, j0, nr.min(n - j0), nr);
            };
            // On one thread: split over the pool, the packing measured slower (the wake-up
            // and the cross-core traffic cost more than the copy).
            bpack.chunks_mut(kc * nr).enumerate().for_each(pack_one);
            let bpack: &[f32] = bpack;
            let beta_k = if pc == 0 { beta } else { 1.0 };

            // Tasks: row blocks × panel groups. Row blocks hold whole MR tiles, about MC rows,
            // and come in a multiple of the thread count so the threads finish together;
            // when there are too few of them, the panels are split into groups too.
            let tiles = m.div_ceil(mr);
            let row_blocks = if threads == 1 {
                1
            } else {
                tiles.div_ceil(MC / mr).div_ceil(threads) * threads
            }
            .min(tiles);
            let groups = if threads == 1 || row_blocks >= 2 * threads {
                1
            } else {
                (2 * threads).div_ceil(row_blocks).min(panels)
            };
            let per_group = panels.div_ceil(groups);
            let groups = panels.div_ceil(per_group);
            let task = |t: usize| {
                let (rb, gr) = (t / groups, t % groups);
                let tile_range = rb * tiles / row_blocks..(rb + 1) * tiles / row_blocks;
                let rows = tile_range.start * mr..m.min(tile_range.end * mr);
                let pans = gr * per_group..panels.min((gr + 1) * per_group);
                let tile = Tile {
                    isa,
                    g,
                    kc,
                    pc,
                    jc,
                    n,
                    beta: beta_k,
                    bpack,
                    c: cptr,
                    next: None,
                };
                // SAFETY: tasks cover disjoint rows × panel columns of C, so no two write
                // the same element; the bounds were checked above.
                unsafe { tile.run(rows, pans) };
            };
            let tasks = row_blocks * groups;
            if threads > 1 && tasks > 1 {
                (0..tasks).into_par_iter().for_each(task);
            } else {
                (0..tasks).for_each(task);
            }
            pc += kc;
        }
        jc += nc;
    }
}

/// `dst = b[at .. at + dst.len()]` widened to f32 (vector conversions where `simd` has them).
pub(crate) fn widen(simd: Simd, b: BSrc<'_>, at: usize, dst: &mut [f32]) {
    let len = dst.len();
    match b {
        BSrc::F32(s) => dst.copy_from_slice(&s[at..at + len]),
        BSrc::F16(s) => {
            #[cfg(target_arch = "x86_64")]
            if simd == Simd::Avx512 {
                simd.check();
                // SAFETY: AVX-512F checked; `s[at..at + len]` exists (sliced).
                unsafe { x86::widen_avx512::<1>(s[at..at + len].as_ptr().cast(), dst) };
                return;
            }
            s[at..at + len].convert_to_f32_slice(dst)
        }
        BSrc::Bf16(s) => {
            #[cfg(target_arch = "x86_64")]
            if simd == Simd::Avx512 {
                simd.check();
                // SAFETY: as above.
                unsafe { x86::widen_avx512::<2>(s[at..at + len].as_ptr().cast(), dst) };
                return;
            }
            // A shift, which the compiler vectorises for any target.
            for (d, v) in dst.iter_mut().zip(&s[at..at + len]) {
                *d = f32::from_bits((v.to_bits() as u32) << 16);
            }
        }
    }
}

/// Runs `iters` rounds of independent f32 FMAs in registers (the widest vectors this CPU
/// has) and returns the number of flops done.
pub(crate) fn fma_loop(iters: u64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was just detected.
        let s = unsafe { x86::fma_loop_avx512(iters) };
        std::hint::black_box(s);
        return iters as f64 * (24 * 16 * 2) as f64;
    }
    let mut acc = [[0.0f32; 8]; 12];
    let x = std::hint::black_box([1.000_000_1f32; 8]);
    let y = std::hint::black_box([0.999_999_9f32; 8]);
    const FMA: bool = cfg!(any(target_feature = "fma", target_arch = "aarch64"));
    for _ in 0..iters {
        for a in acc.iter_mut() {
            for ((a, &x), &y) in a.iter_mut().zip(&x).zip(&y) {
                *a = if FMA { x.mul_add(*a, y) } else { x * *a + y };
            }
        }
    }
    std::hint::black_box(acc);
    iters as f64 * (12 * 8 * 2) as f64
}

/// `C = beta · C` (`beta = 0` writes zeros, whatever C held).
fn scale_c(c: &mut [f32], m: usize, n: usize, ldc: usize, beta: f32) {
    for i in 0..m {
        let row = &mut c[i * ldc..i * ldc + n];
        if beta == 0.0 {
            row.fill(0.0);
        } else if beta != 1.0 {
            row.iter_mut().for_each(|v| *v *= beta);
        }
    }
}

/// A piece of op(B)'s storage (`kc` rows of k from `p0`, columns `j0..j0 + w`) that a task
/// packs next: the row tiles of the current block pull it towards L2 a slice at a time, so
/// the packing that follows finds it there instead of waiting on memory.
#[derive(Clone, Copy)]
struct NextPiece {
    p0: usize,
    kc: usize,
    j0: usize,
    w: usize,
}

impl NextPiece {
    /// Touches (prefetches into L2) the storage lines of segments `part · S / parts ..
    /// (part + 1) · S / parts` of the piece, a segment being one stored row of it.
    fn prefetch(&self, g: &GemmCall<'_>, part: usize, parts: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
            let (base, esize): (*const u8, usize) = match g.b {
                BSrc::F32(s) => (s.as_ptr().cast(), 4),
                BSrc::F16(s) => (s.as_ptr().cast(), 2),
                BSrc::Bf16(s) => (s.as_ptr().cast(), 2),
            };
            let len = g.b.len();
            // One segment per stored row: a row of W (`[n, k]`, trans_b) or of B (`[k, n]`).
            let (segs, seg_len) = if g.trans_b {
                (self.w, self.kc)
            } else {
                (self.kc, self.w)
            };
            let parts = parts.max(1);
            for s in part * segs / parts..(part + 1) * segs / parts {
                let first = if g.trans_b {
                    (self.j0 + s) * g.ldb + self.p0
                } else {
                    (self.p0 + s) * g.ldb + self.j0
                };
                let end = (first + seg_len).min(len);
                let mut at = first * esize;
                while at < end * esize {
                    // SAFETY: `at` lies inside B's storage (below `len` elements); a
                    // prefetch reads nothing architecturally.
                    unsafe { _mm_prefetch::<_MM_HINT_T1>(base.add(at).cast()) };
                    at += 64;
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (g, part, parts);
    }
}

/// The work of one task inside one packed block.
struct Tile<'a, 'g> {
    isa: &'a Isa,
    g: &'a GemmCall<'g>,
    kc: usize,
    pc: usize,
    jc: usize,
    n: usize,
    beta: f32,
    bpack: &'a [f32],
    c: SyncPtr,
    /// What this task packs after this block, prefetched while it computes.
    next: Option<NextPiece>,
}

impl Tile<'_, '_> {
    /// # Safety
    /// `rows` and the columns of `panels` must lie inside C and belong to this task alone.
    unsafe fn run(&self, rows: std::ops::Range<usize>, panels: std::ops::Range<usize>) {
        let Tile {
            isa,
            g,
            kc,
            pc,
            jc,
            n,
            beta,
            bpack,
            c,
            next,
        } = *self;
        let (mr, nr) = (isa.mr, isa.nr);
        let kern = isa.kernels[g.trans_a as usize];
        let mut edge: Vec<f32> = Vec::new();
        let row_tiles = (rows.end - rows.start).div_ceil(mr);
        let mut i = rows.start;
        while i < rows.end {
            let h = mr.min(rows.end - i);
            if let Some(piece) = next {
                piece.prefetch(g, (i - rows.start) / mr, row_tiles);
            }
            // The tile of A: in place when MR rows exist, else a zero-padded copy.
            let (aptr, lda) = if h == mr {
                let off = if g.trans_a {
                    pc * g.lda + i
                } else {
                    i * g.lda + pc
                };
                (g.a[off..].as_ptr(), g.lda)
            } else {
                edge.clear();
                edge.resize(mr * kc, 0.0);
                if g.trans_a {
                    for p in 0..kc {
                        let src = &g.a[(pc + p) * g.lda + i..][..h];
                        edge[p * mr..p * mr + h].copy_from_slice(src);
                    }
                    (edge.as_ptr(), mr)
                } else {
                    for r in 0..h {
                        let src = &g.a[(i + r) * g.lda + pc..][..kc];
                        edge[r * kc..(r + 1) * kc].copy_from_slice(src);
                    }
                    (edge.as_ptr(), kc)
                }
            };
            for t in panels.clone() {
                let j = jc + t * nr;
                let w = nr.min(n - j);
                let bp = bpack[t * kc * nr..(t + 1) * kc * nr].as_ptr();
                // SAFETY: the A tile holds MR × kc values at `lda` (checked in `gemm_with`, or
                // the padded copy), the panel kc · NR, and C rows i..i+h, columns j..j+w are
                // inside C and this task's own; `gemm` checked this CPU runs `isa`.
                unsafe {
                    kern(
                        kc,
                        aptr,
                        lda,
                        bp,
                        c.0.add(i * g.ldc + j),
                        g.ldc,
                        g.alpha,
                        beta,
                        h,
                        w,
                    )
                };
            }
            i += h;
        }
    }
}

/// f32 storage aligned to 64 bytes (a cache line, one zmm), kept per thread between calls:
/// a fresh megabyte per call would cost page faults or a memset on every product.
struct AlignedBuf {
    raw: Vec<f32>,
    start: usize,
    len: usize,
}

thread_local! {
    static PACK_BUF: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        // Taken, not borrowed: a nested call on this thread simply allocates its own.
        let mut raw = PACK_BUF.take();
        if raw.len() < len + 16 {
            raw = vec![0.0f32; len + 16];
        }
        let start = raw.as_ptr().align_offset(64).min(16);
        AlignedBuf { raw, start, len }
    }
    fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let raw = std::mem::take(&mut self.raw);
        // Keep the larger of the two (a nested call may have left one).
        let _ = PACK_BUF.try_with(|b| {
            let old = b.take();
            b.set(if old.len() > raw.len() { old } else { raw });
        });
    }
}

/// Packs a `kc × w` piece of op(B) into a `kc × nr` panel, widening to f32, zero-padding
/// columns `w..nr`.
#[allow(clippy::too_many_arguments)]
fn pack_panel_scalar(
    dst: &mut [f32],
    b: BSrc<'_>,
    ldb: usize,
    trans_b: bool,
    p0: usize,
    kc: usize,
    j0: usize,
    w: usize,
    nr: usize,
) {
    fn go<T: Copy>(
        dst: &mut [f32],
        s: &[T],
        cvt: impl Fn(T) -> f32,
        ldb: usize,
        trans_b: bool,
        p0: usize,
        kc: usize,
        j0: usize,
        w: usize,
        nr: usize,
    ) {
        if w < nr {
            dst.fill(0.0);
        }
        if trans_b {
            // B stored [n,k]: column j of op(B) is a contiguous row of the storage.
            for jj in 0..w {
                let col = &s[(j0 + jj) * ldb + p0..][..kc];
                for (p, &v) in col.iter().enumerate() {
                    dst[p * nr + jj] = cvt(v);
                }
            }
        } else {
            for p in 0..kc {
                let row = &s[(p0 + p) * ldb + j0..][..w];
                for (d, &v) in dst[p * nr..p * nr + w].iter_mut().zip(row) {
                    *d = cvt(v);
                }
            }
        }
    }
    match b {
        BSrc::F32(s) => go(dst, s, |v| v, ldb, trans_b, p0, kc, j0, w, nr),
        BSrc::F16(s) => go(dst, s, |v| v.to_f32(), ldb, trans_b, p0, kc, j0, w, nr),
        BSrc::Bf16(s) => go(dst, s, |v| v.to_f32(), ldb, trans_b, p0, kc, j0, w, nr),
    }
}

/// Portable microkernel body: an `MR × NR` tile of f32 accumulators the compiler keeps in
/// vector registers of whatever width the target has. `FMA` uses fused multiply-adds (only
/// where they are hardware instructions: `mul_add` is a slow library call otherwise).
///
/// # Safety
/// As [`KernelFn`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn generic_kernel<const MR: usize, const NR: usize, const TA: bool, const FMA: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta: f32,
    mr: usize,
    nr: usize,
) {
    let mut acc = [[0.0f32; NR]; MR];
    for p in 0..kc {
        // SAFETY: the caller guarantees kc · NR packed values and an MR × kc tile of A.
        let bp: &[f32; NR] = unsafe { &*b.add(p * NR).cast::<[f32; NR]>() };
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let av = unsafe { *a.add(if TA { p * lda + i } else { i * lda + p }) };
            for (acc, &bv) in row.iter_mut().zip(bp) {
                *acc = if FMA {
                    av.mul_add(bv, *acc)
                } else {
                    *acc + av * bv
                };
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(mr) {
        // SAFETY: rows < mr and columns < nr of C are the caller's to write.
        let crow = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), nr) };
        for (cv, &v) in crow.iter_mut().zip(row) {
            *cv = if beta == 0.0 {
                alpha * v
            } else {
                alpha * v + beta * *cv
            };
        }
    }
}

/// The portable kernel: FMA only where the target always has it.
///
/// # Safety
/// As [`KernelFn`].
#[allow(clippy::too_many_arguments)]
unsafe fn portable_kernel<const TA: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta: f32,
    mr: usize,
    nr: usize,
) {
    const FMA: bool = cfg!(any(target_feature = "fma", target_arch = "aarch64"));
    // SAFETY: forwarded contract.
    unsafe { generic_kernel::<4, 16, TA, FMA>(kc, a, lda, b, c, ldc, alpha, beta, mr, nr) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BSrc, Isa, generic_kernel, pack_panel_scalar};

    pub(super) static AVX512: Isa = Isa {
        mr: 14,
        nr: 32,
        kernels: [avx512_14x32::<false>, avx512_14x32::<true>],
        pack: pack_panel_avx512,
    };

    pub(super) static AVX2: Isa = Isa {
        mr: 6,
        nr: 16,
        kernels: [avx2_kernel::<false>, avx2_kernel::<true>],
        pack: pack_panel_scalar,
    };

    /// # Safety
    /// As `KernelFn`; the CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx2_kernel<const TA: bool>(
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        beta: f32,
        mr: usize,
        nr: usize,
    ) {
        // SAFETY: forwarded contract; compiled with AVX2+FMA, which the caller checked.
        unsafe { generic_kernel::<6, 16, TA, true>(kc, a, lda, b, c, ldc, alpha, beta, mr, nr) }
    }

    /// One step of k for the 2-vector kernels: two vectors of the panel row at `sb` times
    /// the broadcast A value of each row (at `sa + i·lda`, or `sa + i` when transposed).
    /// Expands inside an `unsafe` block of an AVX-512F function.
    macro_rules! fma_rows {
        ($sa:expr, $sb:expr, $lda:expr, $ta:expr, [$($i:literal: $c0:ident $c1:ident),*]) => {{
            let sa: *const f32 = $sa;
            let sb: *const f32 = $sb;
            let b0 = _mm512_loadu_ps(sb);
            let b1 = _mm512_loadu_ps(sb.add(16));
            $(
                let x = _mm512_set1_ps(*sa.add(if $ta { $i } else { $i * $lda }));
                $c0 = _mm512_fmadd_ps(x, b0, $c0);
                $c1 = _mm512_fmadd_ps(x, b1, $c1);
            )*
        }};
    }

    /// Defines an AVX-512 microkernel of `MR` rows × 2 zmm vectors (NR = 32). The
    /// accumulators are named variables, not an array: arrays of vectors end up in memory
    /// once the loop is unrolled, named values stay in registers.
    macro_rules! avx512_kernel_x2 {
        ($name:ident, [$($i:literal: $c0:ident $c1:ident),*]) => {
            /// # Safety
            /// As `KernelFn`; the CPU must have AVX-512F.
            #[target_feature(enable = "avx512f")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn $name<const TA: bool>(
                kc: usize,
                a: *const f32,
                lda: usize,
                b: *const f32,
                c: *mut f32,
                ldc: usize,
                alpha: f32,
                beta: f32,
                mr: usize,
                nr: usize,
            ) {
                $(
                    let mut $c0 = _mm512_setzero_ps();
                    let mut $c1 = _mm512_setzero_ps();
                )*
                // Fetch the C tile (for writing) while the products run.
                $(
                    if $i < mr {
                        // SAFETY: a prefetch never faults; row $i < mr is inside C.
                        unsafe {
                            let row = c.add($i * ldc).cast::<i8>();
                            _mm_prefetch::<_MM_HINT_ET0>(row);
                            _mm_prefetch::<_MM_HINT_ET0>(row.add(64));
                        }
                    }
                )*
                // Row-major A: row i at a + i·lda, one further per step; transposed A: the
                // MR values of a step are contiguous, the next step lda further.
                let a_step = if TA { lda } else { 1 };
                let mut ap = a;
                let mut bp = b;
                // Four steps per trip (the address arithmetic is shared), then the rest.
                // (Eight make the compiler spill an accumulator.)
                for _ in 0..kc / 4 {
                    // SAFETY: steps p..p+4 lie inside the A tile (MR × kc at lda) and the
                    // panel (kc × 32); the pointers end at most one step past them.
                    unsafe {
                        fma_rows!(ap, bp, lda, TA, [$($i: $c0 $c1),*]);
                        fma_rows!(ap.add(a_step), bp.add(32), lda, TA, [$($i: $c0 $c1),*]);
                        fma_rows!(ap.add(2 * a_step), bp.add(64), lda, TA, [$($i: $c0 $c1),*]);
                        fma_rows!(ap.add(3 * a_step), bp.add(96), lda, TA, [$($i: $c0 $c1),*]);
                        ap = ap.add(4 * a_step);
                        bp = bp.add(128);
                    }
                }
                for _ in 0..kc % 4 {
                    // SAFETY: as above, one step.
                    unsafe {
                        fma_rows!(ap, bp, lda, TA, [$($i: $c0 $c1),*]);
                        ap = ap.add(a_step);
                        bp = bp.add(32);
                    }
                }
                let va = _mm512_set1_ps(alpha);
                let vb = _mm512_set1_ps(beta);
                let m0: __mmask16 = if nr >= 16 { 0xffff } else { ((1u32 << nr) - 1) as u16 };
                let m1: __mmask16 = if nr >= 32 { 0xffff } else { ((1u32 << nr.saturating_sub(16)) - 1) as u16 };
                let store = |dst: *mut f32, x: __m512, mask: __mmask16| {
                    if mask == 0 {
                        return;
                    }
                    // SAFETY: the mask limits the access to columns < nr of a row < mr,
                    // which are inside C.
                    unsafe {
                        let mut r = _mm512_mul_ps(va, x);
                        if beta != 0.0 {
                            r = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mask, dst), r);
                        }
                        _mm512_mask_storeu_ps(dst, mask, r);
                    }
                };
                $(
                    if $i < mr {
                        // SAFETY: row $i < mr is inside C.
                        let row = unsafe { c.add($i * ldc) };
                        store(row, $c0, m0);
                        // SAFETY: as above (masked to columns < nr).
                        store(unsafe { row.add(16) }, $c1, m1);
                    }
                )*
            }
        };
    }

    avx512_kernel_x2!(avx512_14x32, [
        0: c0a c0b, 1: c1a c1b, 2: c2a c2b, 3: c3a c3b, 4: c4a c4b, 5: c5a c5b, 6: c6a c6b,
        7: c7a c7b, 8: c8a c8b, 9: c9a c9b, 10: c10a c10b, 11: c11a c11b, 12: c12a c12b,
        13: c13a c13b
    ]);

    /// 24 independent chains of zmm FMAs, `iters` rounds.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma_loop_avx512(iters: u64) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 24];
        let x = _mm512_set1_ps(std::hint::black_box(1.000_000_1));
        let y = _mm512_set1_ps(std::hint::black_box(0.999_999_9));
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(x, *a, y);
            }
        }
        let mut s = _mm512_setzero_ps();
        for a in acc {
            s = _mm512_add_ps(s, a);
        }
        _mm512_reduce_add_ps(s)
    }

    /// Packing for the AVX-512 kernels (panels of 32 columns): vector loads with the dtype
    /// widened in registers (bf16: a shift; f16: `vcvtph2ps`), and for transposed B (the
    /// `nn.Linear` weight in `linear_forward`) 16 × 16 transposes in registers.
    #[allow(clippy::too_many_arguments)]
    fn pack_panel_avx512(
        dst: &mut [f32],
        b: BSrc<'_>,
        ldb: usize,
        trans_b: bool,
        p0: usize,
        kc: usize,
        j0: usize,
        w: usize,
        nr: usize,
    ) {
        debug_assert_eq!(nr, 32);
        assert!(dst.len() >= kc * 32 && w <= 32, "pack: panel too small");
        assert!(w > 0 && kc > 0, "pack: empty panel");
        // The last element read: (p0 + kc − 1, j0 + w − 1) of op(B).
        let last = if trans_b {
            (j0 + w - 1) * ldb + p0 + kc - 1
        } else {
            (p0 + kc - 1) * ldb + j0 + w - 1
        };
        assert!(last < b.len(), "pack: B is too short");
        let (base, dt) = match b {
            BSrc::F32(s) => (s.as_ptr().cast::<u8>(), 0u8),
            BSrc::F16(s) => (s.as_ptr().cast::<u8>(), 1),
            BSrc::Bf16(s) => (s.as_ptr().cast::<u8>(), 2),
        };
        let d = dst.as_mut_ptr();
        // SAFETY: `Simd::check` lets this function run only with AVX-512F; every element read lies at
        // or before `last` (checked above) and every write inside the kc × 32 panel.
        unsafe {
            match (trans_b, dt) {
                (true, 0) => pack_t::<0>(d, base, ldb, p0, kc, j0, w),
                (true, 1) => pack_t::<1>(d, base, ldb, p0, kc, j0, w),
                (true, _) => pack_t::<2>(d, base, ldb, p0, kc, j0, w),
                (false, 0) => pack_n::<0>(d, base, ldb, p0, kc, j0, w),
                (false, 1) => pack_n::<1>(d, base, ldb, p0, kc, j0, w),
                (false, _) => pack_n::<2>(d, base, ldb, p0, kc, j0, w),
            }
        }
    }

    /// `dst[i] = src[i]` widened from dtype `DT` (1 f16, 2 bf16).
    ///
    /// # Safety
    /// AVX-512F; `src` holds `dst.len()` elements.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen_avx512<const DT: u8>(src: *const u8, dst: &mut [f32]) {
        let len = dst.len();
        let mut i = 0;
        while i < len {
            let n = (len - i).min(16);
            // SAFETY: elements i..i+n exist in src and dst.
            unsafe {
                let v = load16::<DT>(src, i, n);
                if n == 16 {
                    _mm512_storeu_ps(dst.as_mut_ptr().add(i), v);
                } else {
                    _mm512_mask_storeu_ps(dst.as_mut_ptr().add(i), ((1u32 << n) - 1) as u16, v);
                }
            }
            i += 16;
        }
    }

    /// 16 elements of dtype `DT` (0 f32, 1 f16, 2 bf16) from element `idx` of `base`,
    /// widened to f32; only the first `len` are read, the rest are zero.
    ///
    /// # Safety
    /// AVX-512F; elements `idx..idx + len` are readable.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16<const DT: u8>(base: *const u8, idx: usize, len: usize) -> __m512 {
        if len < 16 {
            let mut t = [0.0f32; 16];
            for (q, v) in t.iter_mut().enumerate().take(len) {
                // SAFETY: element idx + q < idx + len is readable.
                *v = unsafe {
                    match DT {
                        0 => *base.cast::<f32>().add(idx + q),
                        1 => half::f16::from_bits(*base.cast::<u16>().add(idx + q)).to_f32(),
                        _ => f32::from_bits((*base.cast::<u16>().add(idx + q) as u32) << 16),
                    }
                };
            }
            // SAFETY: `t` holds 16 values.
            return unsafe { _mm512_loadu_ps(t.as_ptr()) };
        }
        // SAFETY: 16 elements from idx are readable.
        unsafe {
            match DT {
                0 => _mm512_loadu_ps(base.cast::<f32>().add(idx)),
                1 => _mm512_cvtph_ps(_mm256_loadu_si256(base.cast::<u16>().add(idx).cast())),
                _ => _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256(base.cast::<u16>().add(idx).cast())),
                    16,
                )),
            }
        }
    }

    /// Row-major op(B) (`linear_backward_input`, plain matmul): row p of the panel is
    /// `w` contiguous values of B's row `p0 + p` from column `j0`.
    ///
    /// # Safety
    /// As `pack_panel_avx512` after its checks.
    #[target_feature(enable = "avx512f")]
    unsafe fn pack_n<const DT: u8>(
        d: *mut f32,
        base: *const u8,
        ldb: usize,
        p0: usize,
        kc: usize,
        j0: usize,
        w: usize,
    ) {
        let (w0, w1) = (w.min(16), w.saturating_sub(16));
        for p in 0..kc {
            let row = (p0 + p) * ldb + j0;
            // SAFETY: columns < w of this row are readable; the panel row holds 32 values.
            unsafe {
                _mm512_storeu_ps(d.add(p * 32), load16::<DT>(base, row, w0));
                let hi = if w1 > 0 {
                    load16::<DT>(base, row + 16, w1)
                } else {
                    _mm512_setzero_ps()
                };
                _mm512_storeu_ps(d.add(p * 32 + 16), hi);
            }
        }
    }

    /// Transposed op(B) (`linear_forward`: W stored `[n,k]`): column j of the panel is W's
    /// row `j0 + j`; 16 rows × 16 values at a time are transposed in registers.
    ///
    /// # Safety
    /// As `pack_panel_avx512` after its checks.
    #[target_feature(enable = "avx512f")]
    unsafe fn pack_t<const DT: u8>(
        d: *mut f32,
        base: *const u8,
        ldb: usize,
        p0: usize,
        kc: usize,
        j0: usize,
        w: usize,
    ) {
        for half in 0..2 {
            let rows = w.saturating_sub(16 * half).min(16);
            let mut pb = 0;
            while pb < kc {
                let len = (kc - pb).min(16);
                let mut r = [_mm512_setzero_ps(); 16];
                for (t, v) in r.iter_mut().enumerate().take(rows) {
                    // SAFETY: row j0 + 16·half + t < j0 + w, values p0 + pb .. + len.
                    *v = unsafe { load16::<DT>(base, (j0 + 16 * half + t) * ldb + p0 + pb, len) };
                }
                let c = transpose16(r);
                for (q, v) in c.iter().enumerate().take(len) {
                    // SAFETY: panel row pb + q < kc, columns 16·half .. + 16 < 32.
                    unsafe { _mm512_storeu_ps(d.add((pb + q) * 32 + 16 * half), *v) };
                }
                pb += 16;
            }
        }
    }

    /// Transposes 16 rows of 16 floats: output q holds element q of every input row.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        let lo = |a: __m512, b: __m512| _mm512_unpacklo_ps(a, b);
        let hi = |a: __m512, b: __m512| _mm512_unpackhi_ps(a, b);
        let lo2 = |a: __m512, b: __m512| {
            _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)))
        };
        let hi2 = |a: __m512, b: __m512| {
            _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)))
        };
        // Pairs of rows interleaved, then pairs of pairs: u[4g + c] holds column c (mod 4)
        // of rows 4g..4g+4 in each 128-bit lane (lane L: column 4L + c).
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let (a, b, c, e) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
            let (t0, t1, t2, t3) = (lo(a, b), hi(a, b), lo(c, e), hi(c, e));
            u[4 * g] = lo2(t0, t2);
            u[4 * g + 1] = hi2(t0, t2);
            u[4 * g + 2] = lo2(t1, t3);
            u[4 * g + 3] = hi2(t1, t3);
        }
        // 128-bit lanes: gather lane L of the four row groups into output 4L + c.
        let mut t = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            t[c] = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            t[4 + c] = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
            t[8 + c] = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            t[12 + c] = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
        }
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            out[c] = _mm512_shuffle_f32x4::<0x88>(t[c], t[8 + c]);
            out[4 + c] = _mm512_shuffle_f32x4::<0x88>(t[4 + c], t[12 + c]);
            out[8 + c] = _mm512_shuffle_f32x4::<0xdd>(t[c], t[8 + c]);
            out[12 + c] = _mm512_shuffle_f32x4::<0xdd>(t[4 + c], t[12 + c]);
        }
        out
    }
}
