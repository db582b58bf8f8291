//! The random streams of a run: every one a pure function of `(seed, purpose, round,
//! client)`, so a run resumed from round `t`'s checkpoint computes what the uninterrupted run
//! computed, bit for bit.

use crate::rng::SplitMix64;

/// Client sampling.
pub const SEED_SAMPLE: u64 = 1;
/// Data order and dropout of local training.
pub const SEED_DATA: u64 = 2;
/// Noise of the upload masks.
pub const SEED_MASK: u64 = 3;
/// LoRA init.
pub const SEED_INIT: u64 = 4;
/// Partitioning data among clients.
pub const SEED_PARTITION: u64 = 7;
/// Which clients attack, and their attacks' randomness.
pub const SEED_ATTACK: u64 = 8;
/// Differential-privacy noise.
pub const SEED_DP: u64 = 9;

/// SplitMix64's step from `z` (the core's generator): its first output for seed `z`.
pub fn splitmix(z: u64) -> u64 {
    SplitMix64(z).next_u64()
}

/// The seed of one (purpose, round, client) stream.
pub fn stream_seed(seed: u64, purpose: u64, round: usize, client: usize) -> u64 {
    splitmix(
        splitmix(splitmix(seed ^ purpose.wrapping_mul(0xA24B_AED4_963E_E407)) ^ round as u64)
            ^ client as u64,
    )
}

/// The clients of round `round`: `sample` of `num_clients`, seeded by (seed, round), in
/// increasing id order.
pub fn sample_round(seed: u64, round: usize, num_clients: usize, sample: usize) -> Vec<usize> {
    let mut ids: Vec<usize> = (0..num_clients).collect();
    let mut s = stream_seed(seed, SEED_SAMPLE, round, 0);
    for i in 0..sample.min(num_clients) {
        s = splitmix(s);
        let j = i + (s % (num_clients - i) as u64) as usize;
        ids.swap(i, j);
    }
    let mut chosen = ids[..sample.min(num_clients)].to_vec();
    chosen.sort_unstable();
    chosen
}
