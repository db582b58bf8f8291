//! A Rényi-DP accountant for the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019):
//! `rounds` rounds, each sampling clients with probability `q` and adding Gaussian noise of
//! `σ` times the clip bound to the sum of clipped client updates (DP-FedAvg, McMahan et al.
//! 2018). The RDP of one round at integer order α is
//! `log A_α / (α − 1)`, `A_α = Σ_k C(α, k) q^k (1 − q)^(α−k) exp((k² − k) / (2σ²))`
//! (`α / (2σ²)` for q = 1); rounds add up; ε at δ uses the conversion of Canonne, Kamath and
//! Steinke 2020 (Prop. 12), minimised over the orders 2..=256 — the same formulas as Google's
//! `dp-accounting` (its test values are pinned below).
//!
//! Client sampling here draws a fixed number of clients per round; the accountant treats it
//! as Poisson sampling with `q = sample_clients / num_clients`, as DP-FedAvg papers do (with
//! every client sampled, q = 1, the bound is exact).

/// The integer Rényi orders the bound is minimised over.
const ORDERS: std::ops::RangeInclusive<u32> = 2..=256;

/// `log(exp(a) + exp(b))` without overflow.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `log C(n, k)`.
fn log_comb(n: u32, k: u32) -> f64 {
    let lg = |x: u32| -> f64 { (1..=x).map(|i| (i as f64).ln()).sum() };
    lg(n) - lg(k) - lg(n - k)
}

/// RDP of one sampled Gaussian round at integer order `alpha`.
fn rdp_one_round(q: f64, sigma: f64, alpha: u32) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return alpha as f64 / (2.0 * sigma * sigma);
    }
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    let mut log_a = f64::NEG_INFINITY;
    for k in 0..=alpha {
        let kf = k as f64;
        let term = log_comb(alpha, k)
            + kf * log_q
            + (alpha - k) as f64 * log_1mq
            + (kf * kf - kf) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, term);
    }
    log_a / (alpha as f64 - 1.0)
}

/// ε of `(ε, δ)`-DP after `rounds` rounds of the sampled Gaussian mechanism with sampling
/// probability `q` and noise multiplier `sigma`; infinity without noise.
pub fn epsilon(q: f64, sigma: f64, rounds: usize, delta: f64) -> f64 {
    // NaN σ or δ counts as "no guarantee".
    let valid = sigma > 0.0 && delta > 0.0 && delta < 1.0;
    if !valid {
        return f64::INFINITY;
    }
    if rounds == 0 || q <= 0.0 {
        return 0.0;
    }
    let mut best = f64::INFINITY;
    for alpha in ORDERS {
        let a = alpha as f64;
        let rdp = rounds as f64 * rdp_one_round(q.min(1.0), sigma, alpha);
        let eps = if delta * delta + (-rdp).exp_m1() > 0.0 {
            0.0
        } else {
            rdp + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        };
        best = best.min(eps);
    }
    best.max(0.0)
}

/// The smallest noise multiplier (to 3 significant digits) that keeps `rounds` rounds within
/// `target` ε at `delta` (bisection; for planning experiments).
pub fn noise_for_epsilon(q: f64, rounds: usize, delta: f64, target: f64) -> f64 {
    let (mut lo, mut hi) = (1e-3f64, 1e3f64);
    for _ in 0..100 {
        let mid = (lo * hi).sqrt();
        if epsilon(q, mid, rounds, delta) > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Google `dp-accounting` 0.6.0, computed once and pinned: `RdpAccountant(orders=
    /// range(2, 257))`, `compose(SelfComposedDpEvent(PoissonSampledDpEvent(q,
    /// GaussianDpEvent(σ)), steps))`, `get_epsilon(δ)`.
    const DP_ACCOUNTING: [(f64, f64, usize, f64, f64); 7] = [
        (1.0, 1.0, 10, 1e-5, 19.801691480042894),
        (0.5, 1.0, 10, 1e-5, 11.770582666023335),
        (0.25, 2.0, 50, 1e-5, 4.890964173954066),
        (0.1, 0.8, 100, 1e-6, 15.458837934155206),
        (1.0, 5.0, 10, 1e-5, 2.814109167845533),
        (0.5, 1.1, 10, 1e-5, 10.035856509706031),
        (1.0, 0.7, 10, 1e-5, 30.53479436915647),
    ];

    #[test]
    fn epsilon_matches_dp_accounting() {
        for (q, sigma, steps, delta, want) in DP_ACCOUNTING {
            let got = epsilon(q, sigma, steps, delta);
            assert!(
                (got - want).abs() <= 1e-9 * want,
                "q {q} σ {sigma} steps {steps}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn more_noise_fewer_rounds_less_sampling_give_smaller_epsilon() {
        let e = epsilon(0.5, 1.0, 10, 1e-5);
        assert!(epsilon(0.5, 2.0, 10, 1e-5) < e);
        assert!(epsilon(0.5, 1.0, 5, 1e-5) < e);
        assert!(epsilon(0.25, 1.0, 10, 1e-5) < e);
        assert_eq!(epsilon(0.5, 0.0, 10, 1e-5), f64::INFINITY);
        assert_eq!(epsilon(0.5, 1.0, 0, 1e-5), 0.0);
        let sigma = noise_for_epsilon(1.0, 10, 1e-5, 4.0);
        assert!(
            (epsilon(1.0, sigma, 10, 1e-5) - 4.0).abs() < 1e-3,
            "{sigma}"
        );
    }
}
