//! The client-side Gaussian-noise mask: keep the most important columns of an update
//! exactly, replace the rest with seeded Gaussian noise that the server regenerates.
//!
//! The noise generator is part of the wire contract, so it is spelled out here and uses no
//! platform math: SplitMix64 expands `(seed, tensor index)` into a xoshiro256++ state, and
//! Box–Muller (with the pure-Rust `libm`) turns pairs of 53-bit uniforms into normals.
//! (`rand_distr`'s ziggurat would call `f64::exp` from std or libm depending on crate features
//! that any other crate in a build can switch on, so its output is not a stable contract.)

use core::convert::Infallible;

use half::{bf16, f16};
use rand_core::{SeedableRng, TryRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind};
use crate::sweep::{check_finite_sumsq, check_len};
use crate::tensor::{DType, Element, Layout, TensorRole};

/// How column importance is measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Importance {
    /// `c_j = ‖X[:, j]‖₂` — ImportantSort over columns (the spec's default).
    #[default]
    ColumnL2,
    /// `|x|` per element: the tensor is treated as `1 × P`, each element a "column".
    ElementAbs,
    /// `r_i = ‖X[i, :]‖₂`: the rows are the units (the spec's `mask_axis = feature` for
    /// `lora_B` `[d_out, r]`: its d_out output features).
    RowL2,
}

impl Importance {
    /// Every value, in documentation order.
    pub const ALL: [Importance; 3] = [
        Importance::ColumnL2,
        Importance::ElementAbs,
        Importance::RowL2,
    ];

    /// The config/CLI name (`column_l2`, `element_abs`).
    pub const fn name(self) -> &'static str {
        match self {
            Importance::ColumnL2 => "column_l2",
            Importance::ElementAbs => "element_abs",
            Importance::RowL2 => "row_l2",
        }
    }

    /// The value [`name`](Self::name) calls `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }
}

impl Importance {
    /// The `rows × cols` unit grid the mask works on (`cols` units of `rows` values each):
    /// the tensor itself, `1 × P`, or the transposed tensor.
    pub const fn units(self, layout: &Layout) -> (usize, usize) {
        match self {
            Importance::ColumnL2 => (layout.rows, layout.cols),
            Importance::ElementAbs => (1, layout.rows * layout.cols),
            Importance::RowL2 => (layout.cols, layout.rows),
        }
    }

    /// Row-major index in the tensor of value `r` of unit `j`.
    const fn element(self, layout: &Layout, j: usize, r: usize) -> usize {
        match self {
            Importance::ColumnL2 => r * layout.cols + j,
            Importance::ElementAbs => j,
            Importance::RowL2 => j * layout.cols + r,
        }
    }
}

/// Which axis of a LoRA factor the mask ranks (the spec's `mask_axis`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MaskAxis {
    /// Columns of the stored tensor: A `[r, d_in]` by its d_in input features, B `[d_out, r]`
    /// by its r rank components.
    #[default]
    Column,
    /// The non-rank axis of each factor: A by its d_in columns, B by its d_out rows.
    Feature,
}

impl MaskAxis {
    /// Every value, in documentation order.
    pub const ALL: [MaskAxis; 2] = [MaskAxis::Column, MaskAxis::Feature];

    /// The config/CLI name (`column`, `feature`).
    pub const fn name(self) -> &'static str {
        match self {
            MaskAxis::Column => "column",
            MaskAxis::Feature => "feature",
        }
    }

    /// The value [`name`](Self::name) calls `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }

    /// The importance a tensor of `role` is masked by: `feature` ranks the rows of
    /// `lora_B` where `column_l2` would rank its columns; everything else is unchanged.
    pub const fn importance_for(self, importance: Importance, role: TensorRole) -> Importance {
        match (self, importance, role) {
            (MaskAxis::Feature, Importance::ColumnL2, TensorRole::LoraB) => Importance::RowL2,
            _ => importance,
        }
    }
}

/// Mask settings (`ρ`, `η`, importance).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskConfig {
    /// ρ ∈ (0, 1]: share of columns kept exactly. 1 = mask off.
    pub keep_ratio: f32,
    /// η ≥ 0: noise standard deviation relative to the rms of the masked columns.
    pub noise_scale: f32,
    pub importance: Importance,
    /// Which axis of `lora_B` is ranked (see [`MaskAxis::importance_for`]).
    pub axis: MaskAxis,
}

impl Default for MaskConfig {
    fn default() -> Self {
        MaskConfig {
            keep_ratio: 1.0,
            noise_scale: 0.0,
            importance: Importance::ColumnL2,
            axis: MaskAxis::Column,
        }
    }
}

impl MaskConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.keep_ratio > 0.0 && self.keep_ratio <= 1.0) {
            return Err(ErrorKind::BadConfig("keep ratio must be in (0, 1]").into());
        }
        if !(self.noise_scale >= 0.0 && self.noise_scale.is_finite()) {
            return Err(ErrorKind::BadConfig("noise scale must be finite and >= 0").into());
        }
        Ok(())
    }

    /// `K = max(1, ceil(ρ·C))` columns kept out of `cols`. ρ·C is rounded up after
    /// discounting f32's representation error of ρ (relative 2⁻²⁴, at most half a column),
    /// so ρ = 0.1 of 10 is 1 and ρ = 1 is every column.
    pub fn kept_count(&self, cols: usize) -> usize {
        let x = self.keep_ratio as f64 * cols as f64;
        let slack = (x * 6e-8).min(0.5);
        let k = libm::ceil(x - slack) as usize;
        k.clamp(1, cols)
    }
}

/// Scratch for [`mask_encode`]: `cols` f32 norms and `cols` u32 indices of the unit grid.
pub struct MaskScratch<'s> {
    pub norms: &'s mut [f32],
    pub order: &'s mut [u32],
}

/// Result of [`mask_encode`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskedSummary {
    /// K, the number of kept columns (the first K of `kept_out`).
    pub kept: usize,
    /// σ of the noise that replaces the other columns.
    pub sigma: f32,
}

/// Client side of the mask: selects the kept columns of update `x` (row-major, `layout`).
///
/// Writes the K kept column indices, ascending, into `kept_out[..K]` and their values,
/// column by column (`values_out[k·R + r] = x[r, kept[k]]`), into `values_out[..K·R]`, where
/// `R × C` is the unit grid of the importance `cfg.axis` picks for this tensor's role. Returns K and σ. `kept_out` needs
/// [`MaskConfig::kept_count`] entries, `values_out` `K·R`. Memory: the scratch (`2·C` words).
/// Columns rank by importance, descending; ties go to the lower index. Rejects NaN/Inf.
pub fn mask_encode<T: Element>(
    x: &[T],
    layout: &Layout,
    cfg: &MaskConfig,
    scratch: MaskScratch<'_>,
    kept_out: &mut [u32],
    values_out: &mut [T],
) -> Result<MaskedSummary, Error> {
    cfg.validate()?;
    check_len(layout.len(), x.len())?;
    let importance = cfg.axis.importance_for(cfg.importance, layout.role);
    let (rows, cols) = importance.units(layout);
    if cols > u32::MAX as usize {
        return Err(ErrorKind::BadShape.into());
    }
    let k = cfg.kept_count(cols);
    if scratch.norms.len() < cols || scratch.order.len() < cols {
        return Err(ErrorKind::BufferTooSmall { needed: cols }.into());
    }
    if kept_out.len() < k {
        return Err(ErrorKind::BufferTooSmall { needed: k }.into());
    }
    if values_out.len() < k * rows {
        return Err(ErrorKind::BufferTooSmall { needed: k * rows }.into());
    }
    let norms = &mut scratch.norms[..cols];
    let order = &mut scratch.order[..cols];
    norms.fill(0.0);
    if importance == Importance::RowL2 {
        for (s, row) in norms.iter_mut().zip(x.chunks_exact(rows)) {
            *s = row.iter().map(|v| v.to_f32() * v.to_f32()).sum();
        }
    } else {
        for row in x.chunks_exact(cols) {
            for (s, v) in norms.iter_mut().zip(row) {
                let v = v.to_f32();
                *s += v * v;
            }
        }
    }
    check_finite_sumsq(x, norms)?;

    for (i, o) in order.iter_mut().enumerate() {
        *o = i as u32;
    }
    // Descending importance, ties to the lower index: a total order, so the kept set is
    // unique and every platform selects the same columns.
    let by_importance = |a: &u32, b: &u32| {
        norms[*b as usize]
            .total_cmp(&norms[*a as usize])
            .then(a.cmp(b))
    };
    if k < cols {
        order.select_nth_unstable_by(k - 1, by_importance);
    }
    let kept = &mut kept_out[..k];
    kept.copy_from_slice(&order[..k]);
    kept.sort_unstable();

    for (c, &j) in kept.iter().enumerate() {
        for r in 0..rows {
            values_out[c * rows + r] = x[importance.element(layout, j as usize, r)];
        }
    }
    // Sum the masked columns directly (not total − kept, which cancels badly when the kept
    // columns hold most of the energy).
    let mut masked_sq = 0.0f32;
    let mut next_kept = kept.iter().peekable();
    for (j, s) in norms.iter().enumerate() {
        if next_kept.peek().is_some_and(|&&kj| kj as usize == j) {
            next_kept.next();
        } else {
            masked_sq += s;
        }
    }
    let masked_count = rows * (cols - k);
    let sigma = if masked_count == 0 || cfg.noise_scale == 0.0 {
        0.0
    } else {
        cfg.noise_scale * libm::sqrtf(masked_sq / masked_count as f32)
    };
    Ok(MaskedSummary { kept: k, sigma })
}

/// Where the kept column indices and values of a masked tensor come from: typed slices on
/// the client, little-endian bytes of an upload on the server.
pub trait KeptColumns {
    /// Number of kept columns K.
    fn count(&self) -> usize;
    /// Index of the k-th kept column (ascending in k).
    fn index(&self, k: usize) -> usize;
    /// Value of row `r` of the k-th kept column, as f32.
    fn value(&self, k: usize, r: usize, rows: usize) -> f32;
}

/// Kept columns as typed slices (the client's own view).
pub struct KeptSlices<'a, T> {
    pub kept: &'a [u32],
    pub values: &'a [T],
}

impl<T: Element> KeptColumns for KeptSlices<'_, T> {
    fn count(&self) -> usize {
        self.kept.len()
    }
    fn index(&self, k: usize) -> usize {
        self.kept[k] as usize
    }
    fn value(&self, k: usize, r: usize, rows: usize) -> f32 {
        self.values[k * rows + r].to_f32()
    }
}

/// Kept columns as the little-endian bytes of an upload (the server's view). Lengths are
/// validated by the wire decoder before one of these is built.
pub struct KeptBytes<'a> {
    pub kept: &'a [u8],
    pub values: &'a [u8],
    pub dtype: DType,
}

impl KeptColumns for KeptBytes<'_> {
    fn count(&self) -> usize {
        self.kept.len() / 4
    }
    fn index(&self, k: usize) -> usize {
        let o = 4 * k;
        u32::from_le_bytes([
            self.kept[o],
            self.kept[o + 1],
            self.kept[o + 2],
            self.kept[o + 3],
        ]) as usize
    }
    fn value(&self, k: usize, r: usize, rows: usize) -> f32 {
        self.dtype.read_le(self.values, k * rows + r)
    }
}

/// Builds the masked tensor: kept columns exact, every other entry `σ·z` from the portable
/// generator keyed by `(seed, tensor_index)`, rounded to `dtype` (the upload's storage type)
/// and then stored as `T`. The noise fills the masked entries in row-major order.
///
/// Client and server both call this, from [`KeptSlices`] and [`KeptBytes`] respectively, so
/// the server's reconstruction is bit-identical to the client's own masked tensor.
/// Kept indices must be strictly ascending and `< cols`, else `BadEncoding`. Memory: O(1).
#[allow(clippy::too_many_arguments)]
pub fn mask_reconstruct<T: Element, K: KeptColumns>(
    layout: &Layout,
    importance: Importance,
    kept: &K,
    sigma: f32,
    seed: u64,
    tensor_index: u32,
    dtype: DType,
    out: &mut [T],
) -> Result<(), Error> {
    check_len(layout.len(), out.len())?;
    let (rows, cols) = importance.units(layout);
    let k = kept.count();
    if k == 0 || k > cols {
        return Err(ErrorKind::BadEncoding("kept column count out of range").into());
    }
    let mut prev: Option<usize> = None;
    for i in 0..k {
        let j = kept.index(i);
        if j >= cols || prev.is_some_and(|p| j <= p) {
            return Err(
                ErrorKind::BadEncoding("kept column indices not ascending and in range").into(),
            );
        }
        prev = Some(j);
    }
    if !(sigma >= 0.0 && sigma.is_finite()) {
        return Err(ErrorKind::BadEncoding("noise sigma must be finite and >= 0").into());
    }
    let round = rounding_of(dtype);
    let mut noise = GaussianStream::new(noise_rng(seed, tensor_index));
    if importance == Importance::RowL2 {
        // Whole rows kept or masked; the noise still fills masked entries in row-major order.
        let mut next_kept = 0usize;
        for (i, row) in out.chunks_exact_mut(rows).enumerate() {
            let is_kept = next_kept < k && kept.index(next_kept) == i;
            for (r, o) in row.iter_mut().enumerate() {
                *o = if is_kept {
                    T::from_f32(round(kept.value(next_kept, r, rows)))
                } else if sigma == 0.0 {
                    T::from_f32(0.0)
                } else {
                    T::from_f32(round(sigma * noise.next_normal() as f32))
                };
            }
            next_kept += usize::from(is_kept);
        }
        return Ok(());
    }
    for (r, row) in out.chunks_exact_mut(cols).enumerate() {
        let mut next_kept = 0usize;
        for (j, o) in row.iter_mut().enumerate() {
            if next_kept < k && kept.index(next_kept) == j {
                *o = T::from_f32(round(kept.value(next_kept, r, rows)));
                next_kept += 1;
            } else if sigma == 0.0 {
                *o = T::from_f32(0.0);
            } else {
                *o = T::from_f32(round(sigma * noise.next_normal() as f32));
            }
        }
    }
    Ok(())
}

/// Rounds an f32 to the values representable in `dtype` (identity for f32).
fn rounding_of(dtype: DType) -> fn(f32) -> f32 {
    match dtype {
        DType::F32 => |x| x,
        DType::F16 => |x| f16::from_f32(x).to_f32(),
        DType::BF16 => |x| bf16::from_f32(x).to_f32(),
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): expands one u64 into well-mixed seed words.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// xoshiro256++ (Blackman, Vigna 2019): the noise generator. Implements `rand_core`'s traits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Xoshiro256PlusPlus {
    s: [u64; 4],
}

impl Xoshiro256PlusPlus {
    /// From four state words; an all-zero state (a fixed point) is replaced by SplitMix64(0).
    pub fn from_state(s: [u64; 4]) -> Self {
        if s == [0; 4] {
            return Self::seed_from_u64(0);
        }
        Xoshiro256PlusPlus { s }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }
}

impl TryRng for Xoshiro256PlusPlus {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok((self.next_u64() >> 32) as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.next_u64())
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dst.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        Ok(())
    }
}

impl SeedableRng for Xoshiro256PlusPlus {
    type Seed = [u8; 32];
    fn from_seed(seed: [u8; 32]) -> Self {
        let mut s = [0u64; 4];
        for (w, c) in s.iter_mut().zip(seed.chunks_exact(8)) {
            *w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        }
        Self::from_state(s)
    }
    fn seed_from_u64(state: u64) -> Self {
        let mut sm = SplitMix64(state);
        Xoshiro256PlusPlus {
            s: [sm.next_u64(), sm.next_u64(), sm.next_u64(), sm.next_u64()],
        }
    }
}

/// The generator for one tensor's noise: keyed by the upload's seed and the tensor's index.
pub fn noise_rng(seed: u64, tensor_index: u32) -> Xoshiro256PlusPlus {
    // Mix the index through SplitMix64 first so neighbouring (seed, index) pairs do not
    // give overlapping SplitMix64 sequences.
    let key = SplitMix64(tensor_index as u64 ^ 0x6A09_E667_F3BC_C909).next_u64();
    Xoshiro256PlusPlus::seed_from_u64(seed ^ key)
}

/// Standard normal samples by Box–Muller, both outputs used; f64 math through `libm`.
pub struct GaussianStream<R> {
    rng: R,
    spare: Option<f64>,
}

impl<R: TryRng<Error = Infallible>> GaussianStream<R> {
    pub fn new(rng: R) -> Self {
        GaussianStream { rng, spare: None }
    }

    /// The next N(0, 1) sample.
    pub fn next_normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let a = match self.rng.try_next_u64() {
            Ok(v) => v,
            Err(never) => match never {},
        };
        let b = match self.rng.try_next_u64() {
            Ok(v) => v,
            Err(never) => match never {},
        };
        const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
        // u1 in (0, 1] so ln(u1) is finite; u2 in [0, 1).
        let u1 = ((a >> 11) + 1) as f64 * SCALE;
        let u2 = (b >> 11) as f64 * SCALE;
        let r = libm::sqrt(-2.0 * libm::log(u1));
        let (s, c) = libm::sincos(core::f64::consts::TAU * u2);
        self.spare = Some(r * s);
        r * c
    }
}
