//! The inner loops every rule is built from: per-group sums of squares and dot products, and
//! group-scaled accumulation. A "group" is a column or a row of the row-major matrix.
//! Each function reads its input once, front to back, so a tensor streams through the cache.

use crate::error::{Error, ErrorKind};
use crate::tensor::{Element, Layout};

/// IEEE square root (correctly rounded, so both versions give the same bits). With the
/// `std` feature it is the standard library's, which the compiler can vectorise; without,
/// `libm`'s (one scalar instruction at a time).
#[inline(always)]
pub(crate) fn sqrt(x: f32) -> f32 {
    #[cfg(feature = "std")]
    {
        x.sqrt()
    }
    #[cfg(not(feature = "std"))]
    {
        libm::sqrtf(x)
    }
}

/// `Σ f(x_i)` with [`LANES`] independent partial sums (vectorisable).
pub(crate) fn sum_lanes(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += f(*v);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| f(*v)).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `Σ a_i·b_i` with [`LANES`] independent partial sums.
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut ac = a.chunks_exact(LANES);
    let mut bc = b.chunks_exact(LANES);
    for (x, y) in (&mut ac).zip(&mut bc) {
        for i in 0..LANES {
            lanes[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

/// Which way the norm groups run through a row-major `rows × cols` matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Groups {
    /// One group per column (`‖X[:, j]‖`): `cols` groups.
    Columns,
    /// One group per row (`‖X[i, :]‖`): `rows` groups.
    Rows,
}

impl Groups {
    /// Number of groups of this kind in `layout`.
    pub const fn count(self, layout: &Layout) -> usize {
        match self {
            Groups::Columns => layout.cols,
            Groups::Rows => layout.rows,
        }
    }
}

/// `sq[g] = Σ x²` over each group. `sq.len()` must be the group count.
pub(crate) fn group_sumsq<T: Element>(x: &[T], layout: &Layout, groups: Groups, sq: &mut [f32]) {
    sq.fill(0.0);
    match groups {
        Groups::Columns if narrow_cols(layout.cols) => match layout.cols {
            8 => col_sumsq_narrow::<8, T>(x, sq),
            16 => col_sumsq_narrow::<16, T>(x, sq),
            32 => col_sumsq_narrow::<32, T>(x, sq),
            _ => col_sumsq_narrow::<64, T>(x, sq),
        },
        Groups::Columns => {
            // Four rows per trip through `sq`: a quarter of the loads and stores of the sums.
            let cols = layout.cols;
            let mut quads = x.chunks_exact(4 * cols);
            for q in &mut quads {
                let (r0, rest) = q.split_at(cols);
                let (r1, rest) = rest.split_at(cols);
                let (r2, r3) = rest.split_at(cols);
                for ((((s, a), b), c), d) in sq.iter_mut().zip(r0).zip(r1).zip(r2).zip(r3) {
                    let (a, b, c, d) = (a.to_f32(), b.to_f32(), c.to_f32(), d.to_f32());
                    *s += (a * a + b * b) + (c * c + d * d);
                }
            }
            for row in quads.remainder().chunks_exact(cols) {
                for (s, v) in sq.iter_mut().zip(row) {
                    let v = v.to_f32();
                    *s += v * v;
                }
            }
        }
        Groups::Rows => {
            for (s, row) in sq.iter_mut().zip(x.chunks_exact(layout.cols)) {
                *s = sum_squares_row(row);
            }
        }
    }
}

/// `sq[g] = Σ x²` and `dot[g] = Σ x·u` over each group, in one read of `x`.
pub(crate) fn group_sumsq_dot<T: Element>(
    x: &[T],
    u: &[f32],
    layout: &Layout,
    groups: Groups,
    sq: &mut [f32],
    dot: &mut [f32],
) {
    sq.fill(0.0);
    dot.fill(0.0);
    let cols = layout.cols;
    match groups {
        Groups::Columns if narrow_cols(cols) => match cols {
            8 => col_sumsq_dot_narrow::<8, T>(x, u, sq, dot),
            16 => col_sumsq_dot_narrow::<16, T>(x, u, sq, dot),
            32 => col_sumsq_dot_narrow::<32, T>(x, u, sq, dot),
            _ => col_sumsq_dot_narrow::<64, T>(x, u, sq, dot),
        },
        Groups::Columns => {
            // Two rows per trip through `sq` and `dot`.
            let mut pairs = x.chunks_exact(2 * cols).zip(u.chunks_exact(2 * cols));
            for (xq, uq) in &mut pairs {
                let (x0, x1) = xq.split_at(cols);
                let (u0, u1) = uq.split_at(cols);
                for (((((s, d), a), b), p), q) in sq
                    .iter_mut()
                    .zip(dot.iter_mut())
                    .zip(x0)
                    .zip(x1)
                    .zip(u0)
                    .zip(u1)
                {
                    let (a, b) = (a.to_f32(), b.to_f32());
                    *s += a * a + b * b;
                    *d += a * p + b * q;
                }
            }
            let done = (x.len() / (2 * cols)) * 2 * cols;
            for (row, urow) in x[done..]
                .chunks_exact(cols)
                .zip(u[done..].chunks_exact(cols))
            {
                for (((s, d), v), w) in sq.iter_mut().zip(dot.iter_mut()).zip(row).zip(urow) {
                    let v = v.to_f32();
                    *s += v * v;
                    *d += v * w;
                }
            }
        }
        Groups::Rows => {
            for (((s, d), row), urow) in sq
                .iter_mut()
                .zip(dot.iter_mut())
                .zip(x.chunks_exact(cols))
                .zip(u.chunks_exact(cols))
            {
                let (a, b) = sum_squares_dot_row(row, urow);
                *s = a;
                *d = b;
            }
        }
    }
}

/// Widths with a register-resident specialisation: the ranks of LoRA B (`[d_out, r]`).
fn narrow_cols(cols: usize) -> bool {
    matches!(cols, 8 | 16 | 32 | 64)
}

/// Column sums of squares of a matrix only `C` wide (a LoRA B): the sums stay in registers
/// instead of being reloaded for every short row, with two row sets to hide add latency.
fn col_sumsq_narrow<const C: usize, T: Element>(x: &[T], sq: &mut [f32]) {
    let mut even = [0.0f32; C];
    let mut odd = [0.0f32; C];
    let mut pairs = x.chunks_exact(2 * C);
    for pair in &mut pairs {
        for j in 0..C {
            let a = pair[j].to_f32();
            let b = pair[C + j].to_f32();
            even[j] += a * a;
            odd[j] += b * b;
        }
    }
    for row in pairs.remainder().chunks_exact(C) {
        for j in 0..C {
            let a = row[j].to_f32();
            even[j] += a * a;
        }
    }
    for ((s, e), o) in sq.iter_mut().zip(&even).zip(&odd) {
        *s = e + o;
    }
}

/// [`col_sumsq_narrow`] plus the column dots with `u`.
fn col_sumsq_dot_narrow<const C: usize, T: Element>(
    x: &[T],
    u: &[f32],
    sq: &mut [f32],
    dot: &mut [f32],
) {
    let mut s = [0.0f32; C];
    let mut d = [0.0f32; C];
    for (row, urow) in x.chunks_exact(C).zip(u.chunks_exact(C)) {
        for j in 0..C {
            let a = row[j].to_f32();
            s[j] += a * a;
            d[j] += a * urow[j];
        }
    }
    sq[..C].copy_from_slice(&s);
    dot[..C].copy_from_slice(&d);
}

/// `acc[i] += coef[g(i)] · x[i]`, where `g(i)` is the group of element `i`.
pub(crate) fn group_axpy<T: Element>(
    x: &[T],
    coef: &[f32],
    layout: &Layout,
    groups: Groups,
    acc: &mut [f32],
) {
    let cols = layout.cols;
    match groups {
        Groups::Columns if narrow_cols(cols) => match cols {
            8 => axpy_narrow::<8, T>(x, coef, acc),
            16 => axpy_narrow::<16, T>(x, coef, acc),
            32 => axpy_narrow::<32, T>(x, coef, acc),
            _ => axpy_narrow::<64, T>(x, coef, acc),
        },
        Groups::Columns => {
            for (row, arow) in x.chunks_exact(cols).zip(acc.chunks_exact_mut(cols)) {
                for ((a, v), c) in arow.iter_mut().zip(row).zip(coef) {
                    *a += c * v.to_f32();
                }
            }
        }
        Groups::Rows => {
            for ((row, arow), &c) in x
                .chunks_exact(cols)
                .zip(acc.chunks_exact_mut(cols))
                .zip(coef)
            {
                for (a, v) in arow.iter_mut().zip(row) {
                    *a += c * v.to_f32();
                }
            }
        }
    }
}

/// [`group_axpy`] over columns of a matrix `C` wide: the coefficients live in registers.
fn axpy_narrow<const C: usize, T: Element>(x: &[T], coef: &[f32], acc: &mut [f32]) {
    let c: [f32; C] = core::array::from_fn(|j| coef[j]);
    for (row, arow) in x.chunks_exact(C).zip(acc.chunks_exact_mut(C)) {
        for j in 0..C {
            arow[j] += c[j] * row[j].to_f32();
        }
    }
}

/// `out[i] = coef[g(i)] · x[i]` for f32 `x` (used to finish a rule).
pub(crate) fn group_scale_into(
    x: &[f32],
    layout: &Layout,
    groups: Groups,
    coef: &[f32],
    out: &mut [f32],
) {
    let cols = layout.cols;
    match groups {
        Groups::Columns => {
            for (row, orow) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
                for ((o, v), c) in orow.iter_mut().zip(row).zip(coef) {
                    *o = c * v;
                }
            }
        }
        Groups::Rows => {
            for ((row, orow), &c) in x
                .chunks_exact(cols)
                .zip(out.chunks_exact_mut(cols))
                .zip(coef)
            {
                for (o, v) in orow.iter_mut().zip(row) {
                    *o = c * v;
                }
            }
        }
    }
}

/// Independent accumulators of a reduction: enough vector registers in flight that the
/// add latency never limits a loop to below memory speed (one running sum is a serial chain).
const LANES: usize = 32;

/// `out[i] = base[i] + coef[g(i)] · x[i]`: the last step of a rule, in one sweep.
pub(crate) fn group_scale_add_into<T: Element>(
    x: &[f32],
    coef: &[f32],
    layout: &Layout,
    groups: Groups,
    base: &[T],
    out: &mut [f32],
) {
    let cols = layout.cols;
    let rows = x
        .chunks_exact(cols)
        .zip(base.chunks_exact(cols))
        .zip(out.chunks_exact_mut(cols));
    match groups {
        Groups::Columns => {
            for ((row, brow), orow) in rows {
                for (((o, v), b), c) in orow.iter_mut().zip(row).zip(brow).zip(coef) {
                    *o = b.to_f32() + c * v;
                }
            }
        }
        Groups::Rows => {
            for (((row, brow), orow), &c) in rows.zip(coef) {
                for ((o, v), b) in orow.iter_mut().zip(row).zip(brow) {
                    *o = b.to_f32() + c * v;
                }
            }
        }
    }
}

/// Sum of squares of a row with [`LANES`] independent accumulators, so the loop vectorises.
#[inline]
fn sum_squares_row<T: Element>(row: &[T]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            let v = v.to_f32();
            *l += v * v;
        }
    }
    let mut tail = 0.0f32;
    for v in chunks.remainder() {
        let v = v.to_f32();
        tail += v * v;
    }
    lanes.iter().sum::<f32>() + tail
}

#[inline]
fn sum_squares_dot_row<T: Element>(row: &[T], u: &[f32]) -> (f32, f32) {
    let mut sq = [0.0f32; LANES];
    let mut dt = [0.0f32; LANES];
    let mut xc = row.chunks_exact(LANES);
    let mut uc = u.chunks_exact(LANES);
    for (c, w) in (&mut xc).zip(&mut uc) {
        for i in 0..LANES {
            let v = c[i].to_f32();
            sq[i] += v * v;
            dt[i] += v * w[i];
        }
    }
    let (mut s, mut d) = (0.0f32, 0.0f32);
    for (v, w) in xc.remainder().iter().zip(uc.remainder()) {
        let v = v.to_f32();
        s += v * v;
        d += v * w;
    }
    (sq.iter().sum::<f32>() + s, dt.iter().sum::<f32>() + d)
}

/// Checks that squared group norms are finite; when one is not, finds out why: a NaN/Inf
/// element ([`ErrorKind::NonFinite`]) or finite values whose squares overflow.
pub(crate) fn check_finite_sumsq<T: Element>(x: &[T], sq: &[f32]) -> Result<(), Error> {
    if sq.iter().all(|s| s.is_finite()) {
        return Ok(());
    }
    Err(Error::new(
        first_non_finite(x).map_or(ErrorKind::Overflow, |_| ErrorKind::NonFinite),
    ))
}

/// Index of the first NaN or ±Inf element.
pub fn first_non_finite<T: Element>(x: &[T]) -> Option<usize> {
    x.iter().position(|v| !v.to_f32().is_finite())
}

/// Fails unless every element is finite. Reads `x` once; vectorises (no early exit per element).
pub(crate) fn check_all_finite<T: Element>(x: &[T]) -> Result<(), Error> {
    // x·0 is 0 for finite x and NaN otherwise: one multiply-add per element, no branch.
    let mut lanes = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v.to_f32() * 0.0;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v.to_f32() * 0.0).sum();
    if (lanes.iter().sum::<f32>() + tail).is_nan() {
        Err(Error::new(ErrorKind::NonFinite))
    } else {
        Ok(())
    }
}

/// Fails unless `len` is exactly `expected`.
pub(crate) fn check_len(expected: usize, found: usize) -> Result<(), Error> {
    if expected == found {
        Ok(())
    } else {
        Err(Error::new(ErrorKind::ShapeMismatch { expected, found }))
    }
}

#[cfg(test)]
mod tests {
    use super::sqrt;

    /// With `std`, `sqrt` is the standard library's; it must give libm's bits exactly, or
    /// host and edge builds would disagree.
    #[test]
    fn sqrt_matches_libm_bit_for_bit() {
        let mut bits = 0x0000_0001u32;
        let mut checked = 0;
        while bits < 0x7f80_0000 {
            let x = f32::from_bits(bits);
            assert_eq!(sqrt(x).to_bits(), libm::sqrtf(x).to_bits(), "sqrt({x:e})");
            bits = bits.wrapping_add(0x0000_1f3d);
            checked += 1;
        }
        assert!(checked > 60_000);
        assert_eq!(sqrt(0.0).to_bits(), 0);
    }
}
