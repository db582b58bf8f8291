//! Bounds on what one client can do to the aggregate: per-client L2 clipping (a fixed bound, or
//! a multiple of the round's median client norm) and the coordinate-wise robust rules, median
//! and trimmed mean.
//!
//! Clipping scales a client's whole update `Δ_i` (every tensor together) by
//! `min(1, C / ‖Δ_i‖)`: it never increases a norm and is the identity under the bound. FedCDD's
//! directions are unchanged by a positive scale, so on FedCDD clipping bounds exactly the
//! consensus magnitudes `m_ij` a client contributes. The streaming rules take the scale as the
//! caller applies it while loading a client; the norms come from a first pass that holds one
//! number per client.
//!
//! Memory: [`clip_scale`] and [`median_in_place`] none; [`coordinate_median`] and
//! [`trimmed_mean`] need every client's tensor at once (the caller holds the N views) and N
//! floats of scratch.

use crate::error::{Error, ErrorKind};
use crate::sweep::check_len;
use crate::tensor::TensorView;

/// The factor that clips an update of L2 norm `norm` to `bound`: `min(1, bound / norm)`;
/// 1 for a zero update. Errors on a non-finite norm or a bound that is not positive.
pub fn clip_scale(norm: f32, bound: f32) -> Result<f32, Error> {
    if !(bound > 0.0 && bound.is_finite()) {
        return Err(ErrorKind::BadConfig("clip bound must be positive and finite").into());
    }
    if !(norm >= 0.0 && norm.is_finite()) {
        return Err(ErrorKind::NonFinite.into());
    }
    Ok(if norm > bound { bound / norm } else { 1.0 })
}

/// The median of `values` (the mean of the two middle values for an even count), reordering
/// them. Errors on an empty slice or a NaN.
pub fn median_in_place(values: &mut [f32]) -> Result<f32, Error> {
    let n = values.len();
    if n == 0 {
        return Err(ErrorKind::NoClients.into());
    }
    if values.iter().any(|v| v.is_nan()) {
        return Err(ErrorKind::NonFinite.into());
    }
    let (_, upper, _) = values.select_nth_unstable_by(n / 2, f32::total_cmp);
    let upper = *upper;
    if n % 2 == 1 {
        return Ok(upper);
    }
    // The largest of the lower half.
    let lower = values[..n / 2]
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    Ok(lower + (upper - lower) / 2.0)
}

/// Checks the clients' lengths against `out` and that there is one; errors name the client.
fn check_clients(clients: &[TensorView<'_>], out: &[f32], scratch: &[f32]) -> Result<(), Error> {
    if clients.is_empty() {
        return Err(ErrorKind::NoClients.into());
    }
    for (i, c) in clients.iter().enumerate() {
        check_len(out.len(), c.len()).map_err(|e| e.with_client(i as u32))?;
    }
    if scratch.len() < clients.len() {
        return Err(ErrorKind::BufferTooSmall {
            needed: clients.len(),
        }
        .into());
    }
    Ok(())
}

/// Gathers coordinate `j` of every client into `scratch`; errors on a non-finite value,
/// naming the client.
fn gather(clients: &[TensorView<'_>], j: usize, scratch: &mut [f32]) -> Result<(), Error> {
    for (i, (c, s)) in clients.iter().zip(scratch.iter_mut()).enumerate() {
        let v = c.get(j);
        if !v.is_finite() {
            return Err(Error::from(ErrorKind::NonFinite).with_client(i as u32));
        }
        *s = v;
    }
    Ok(())
}

/// Coordinate-wise median of the clients' tensors (their updates) into `out`. Unweighted: a
/// robust rule gives every client one vote. `scratch` needs N floats.
pub fn coordinate_median(
    clients: &[TensorView<'_>],
    out: &mut [f32],
    scratch: &mut [f32],
) -> Result<(), Error> {
    check_clients(clients, out, scratch)?;
    let n = clients.len();
    for (j, o) in out.iter_mut().enumerate() {
        gather(clients, j, &mut scratch[..n])?;
        *o = median_in_place(&mut scratch[..n])?;
    }
    Ok(())
}

/// Coordinate-wise trimmed mean into `out`: at each coordinate the `trim` largest and `trim`
/// smallest client values are dropped and the rest averaged (unweighted). Needs
/// `2·trim < N`; `scratch` needs N floats.
pub fn trimmed_mean(
    clients: &[TensorView<'_>],
    trim: usize,
    out: &mut [f32],
    scratch: &mut [f32],
) -> Result<(), Error> {
    check_clients(clients, out, scratch)?;
    let n = clients.len();
    if 2 * trim >= n {
        return Err(ErrorKind::BadConfig("trimmed mean needs more than 2·trim clients").into());
    }
    let kept = (n - 2 * trim) as f32;
    for (j, o) in out.iter_mut().enumerate() {
        let s = &mut scratch[..n];
        gather(clients, j, s)?;
        s.sort_unstable_by(f32::total_cmp);
        *o = s[trim..n - trim].iter().sum::<f32>() / kept;
    }
    Ok(())
}
