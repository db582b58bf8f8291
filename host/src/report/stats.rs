//! Statistics for comparisons: Student's t distribution (CDF and quantile, through the
//! regularized incomplete beta function), t-intervals of a mean, the paired t-test, and a
//! percentile bootstrap interval of an accuracy over its questions.

use crate::rng::Rng;

/// `ln Γ(x)` for x > 0 (Lanczos, g = 7, n = 9; about 15 digits).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The continued fraction of the incomplete beta function (modified Lentz).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    // One half-step of the recurrence: d ← 1/(1 + aa·d), c ← 1 + aa/c, both kept off zero.
    let step = |aa: f64, c: &mut f64, d: &mut f64| {
        *d = 1.0 + aa * *d;
        if d.abs() < TINY {
            *d = TINY;
        }
        *c = 1.0 + aa / *c;
        if c.abs() < TINY {
            *c = TINY;
        }
        *d = 1.0 / *d;
        *d * *c
    };
    for m in 1..=300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        h *= step(m * (b - m) * x / ((qam + m2) * (a + m2)), &mut c, &mut d);
        let del = step(
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
            &mut c,
            &mut d,
        );
        h *= del;
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// The regularized incomplete beta function `I_x(a, b)`.
pub fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_cf(a, b, x) / a
    } else {
        1.0 - front * beta_cf(b, a, 1.0 - x) / b
    }
}

/// Student's t CDF with `df` degrees of freedom.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let x = df / (df + t * t);
    let tail = 0.5 * incomplete_beta(df / 2.0, 0.5, x);
    if t >= 0.0 { 1.0 - tail } else { tail }
}

/// The `p` quantile of Student's t with `df` degrees of freedom (bisection on the CDF, then
/// Newton; accurate to about 1e-12).
pub fn t_quantile(p: f64, df: f64) -> f64 {
    if !(0.0..=1.0).contains(&p) || df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if p == 0.5 {
        return 0.0;
    }
    let (mut lo, mut hi) = (-1e3, 1e3);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-13 * (1.0 + mid.abs()) {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// A mean with its sample standard deviation and a two-sided t-interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MeanInterval {
    pub mean: f64,
    /// Sample standard deviation (n − 1); 0 for one value.
    pub std: f64,
    pub n: usize,
    /// Half-width of the `level` interval: `t_{(1+level)/2, n−1} · std / √n`; NaN for n < 2.
    pub half_width: f64,
}

/// Mean, std and the two-sided `level` t-interval of the finite `values`; None when none is.
pub fn mean_interval(values: &[f64], level: f64) -> Option<MeanInterval> {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n as f64;
    let std = if n > 1 {
        (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    let half_width = if n > 1 {
        t_quantile(0.5 + level / 2.0, (n - 1) as f64) * std / (n as f64).sqrt()
    } else {
        f64::NAN
    };
    Some(MeanInterval {
        mean,
        std,
        n,
        half_width,
    })
}

/// The paired t-test of `a − b` over the same seeds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairedTest {
    /// Mean difference `a − b`, its std and interval.
    pub diff: MeanInterval,
    /// The t statistic and the two-sided p-value (NaN when n < 2 or every difference equal).
    pub t: f64,
    pub p_value: f64,
}

/// Paired t-test (as scipy's `ttest_rel`): pairs where either side is not finite are left out.
pub fn paired_t_test(a: &[f64], b: &[f64], level: f64) -> Option<PairedTest> {
    let diffs: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .map(|(x, y)| x - y)
        .collect();
    let diff = mean_interval(&diffs, level)?;
    let (t, p_value) = if diff.n < 2 {
        (f64::NAN, f64::NAN)
    } else if diff.std == 0.0 {
        // Every pair differs by the same amount: no variance to test against.
        (f64::NAN, if diff.mean == 0.0 { 1.0 } else { f64::NAN })
    } else {
        let t = diff.mean / (diff.std / (diff.n as f64).sqrt());
        let df = (diff.n - 1) as f64;
        (t, 2.0 * (1.0 - t_cdf(t.abs(), df)))
    };
    Some(PairedTest { diff, t, p_value })
}

/// Percentile bootstrap interval (`level`, `reps` resamples, seeded) of the fraction of
/// `correct` answers: the uncertainty from the finite question set of one run.
pub fn bootstrap_accuracy(
    correct: &[bool],
    level: f64,
    reps: usize,
    seed: u64,
) -> Option<(f64, f64)> {
    let n = correct.len();
    if n == 0 || reps == 0 {
        return None;
    }
    let mut rng = Rng::new(seed);
    let mut stats: Vec<f64> = (0..reps)
        .map(|_| (0..n).filter(|_| correct[rng.below(n)]).count() as f64 / n as f64)
        .collect();
    stats.sort_by(f64::total_cmp);
    let at = |q: f64| stats[((q * reps as f64) as usize).min(reps - 1)];
    Some((at((1.0 - level) / 2.0), at((1.0 + level) / 2.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// scipy 1.x values, computed once: `stats.t.ppf(0.975, df)`, `stats.t.cdf(1.5, df)`,
    /// `2 * stats.t.sf(2.2, df)`.
    const SCIPY: [(f64, f64, f64, f64); 5] = [
        (
            1.0,
            12.706204736174694,
            0.8128329581890011,
            0.27159949756018376,
        ),
        (
            2.0,
            4.302652729749462,
            0.8638034375544994,
            0.15880897580794018,
        ),
        (4.0, 2.7764451051977934, 0.896, 0.09265267017963459),
        (
            9.0,
            2.262157162798205,
            0.9160746719714625,
            0.05534057279861165,
        ),
        (
            29.0,
            2.045229642132703,
            0.9277881519798071,
            0.03592675915068257,
        ),
    ];

    #[test]
    fn student_t_matches_scipy() {
        for (df, q975, cdf15, p22) in SCIPY {
            assert!(
                (t_quantile(0.975, df) - q975).abs() < 1e-9 * q975,
                "df {df}"
            );
            assert!((t_cdf(1.5, df) - cdf15).abs() < 1e-12, "df {df}");
            assert!(
                (2.0 * (1.0 - t_cdf(2.2, df)) - p22).abs() < 1e-12,
                "df {df}"
            );
            assert!((t_cdf(-1.5, df) - (1.0 - cdf15)).abs() < 1e-12);
        }
        // stats.t.ppf(0.995, 4), stats.t.ppf(0.6, 3)
        assert!((t_quantile(0.995, 4.0) - 4.604094871349992).abs() < 1e-9);
        assert!((t_quantile(0.6, 3.0) - 0.2766706623326898).abs() < 1e-9);
    }

    #[test]
    fn paired_test_matches_scipy_ttest_rel() {
        // scipy.stats.ttest_rel(a, b): statistic 2.3276727005034226, p 0.08045698801289167.
        let a = [47.1, 52.3, 44.0, 49.5, 50.2];
        let b = [43.3, 48.0, 45.1, 41.0, 47.7];
        let r = paired_t_test(&a, &b, 0.95).unwrap();
        assert!((r.t - 2.3276727005034226).abs() < 1e-12);
        assert!((r.p_value - 0.08045698801289167).abs() < 1e-12);
        assert!((r.diff.mean - 3.6).abs() < 1e-12);
        // The interval: mean ± t_{0.975,4}·s/√5 (s of the differences, computed by hand).
        let d = [3.8, 4.3, -1.1, 8.5, 2.5];
        let s = (d.iter().map(|x: &f64| (x - 3.6) * (x - 3.6)).sum::<f64>() / 4.0).sqrt();
        assert!((r.diff.half_width - 2.7764451051977934 * s / 5f64.sqrt()).abs() < 1e-9);
    }

    #[test]
    fn intervals_of_one_value_and_constant_differences() {
        let one = mean_interval(&[7.0], 0.95).unwrap();
        assert_eq!((one.mean, one.std, one.n), (7.0, 0.0, 1));
        assert!(one.half_width.is_nan());
        assert!(mean_interval(&[f64::NAN], 0.95).is_none());
        let same = paired_t_test(&[1.0, 2.0], &[1.0, 2.0], 0.95).unwrap();
        assert_eq!(same.p_value, 1.0);
    }

    #[test]
    fn bootstrap_covers_the_accuracy_and_narrows_with_more_questions() {
        let few: Vec<bool> = (0..20).map(|i| i % 2 == 0).collect();
        let many: Vec<bool> = (0..2000).map(|i| i % 2 == 0).collect();
        let (a, b) = bootstrap_accuracy(&few, 0.95, 2000, 1).unwrap();
        let (c, d) = bootstrap_accuracy(&many, 0.95, 2000, 1).unwrap();
        assert!(a < 0.5 && 0.5 < b && c < 0.5 && 0.5 < d);
        assert!(d - c < (b - a) / 5.0);
        // The normal approximation for n = 2000, p = 0.5: half-width 1.96·√(p(1−p)/n) ≈ 0.0219.
        assert!(((d - c) / 2.0 - 0.0219).abs() < 0.004, "{c} {d}");
        assert_eq!(bootstrap_accuracy(&[], 0.95, 10, 1), None);
    }
}
