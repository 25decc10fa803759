//! Summaries of per-image scores: mean, sample standard deviation and a percentile
//! bootstrap 95 % interval of the mean, with a fixed seed so reports are reproducible.

use serde::Serialize;

use crate::metrics::percentile;

/// Bootstrap resamples used for the 95 % interval.
pub const BOOTSTRAP_SAMPLES: usize = 2000;
/// Seed of the bootstrap, fixed so the same scores always give the same interval.
pub const BOOTSTRAP_SEED: u64 = 42;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Scores that are numbers (NaN scores — HD95 or NSD of empty masks — are left out).
    pub n: usize,
    /// Scores that were NaN.
    pub missing: usize,
    pub mean: f64,
    /// Sample standard deviation (n − 1), as pandas' `std` in medvlsm's `eval_metrics.py`.
    pub std: f64,
    /// Percentile bootstrap 95 % interval of the mean.
    pub ci_low: f64,
    pub ci_high: f64,
}

impl Summary {
    pub fn of(scores: &[f64]) -> Self {
        let values: Vec<f64> = scores.iter().copied().filter(|v| !v.is_nan()).collect();
        let n = values.len();
        let missing = scores.len() - n;
        if n == 0 {
            let nan = f64::NAN;
            return Self {
                n,
                missing,
                mean: nan,
                std: nan,
                ci_low: nan,
                ci_high: nan,
            };
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = if n > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            f64::NAN
        };
        let (ci_low, ci_high) = bootstrap_interval(&values, BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED);
        Self {
            n,
            missing,
            mean,
            std,
            ci_low,
            ci_high,
        }
    }
}

/// The 2.5th and 97.5th percentiles of the means of `samples` resamples (with replacement).
pub fn bootstrap_interval(values: &[f64], samples: usize, seed: u64) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = SplitMix64(seed);
    let n = values.len();
    let means: Vec<f64> = (0..samples)
        .map(|_| (0..n).map(|_| values[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    (percentile(means.clone(), 2.5), percentile(means, 97.5))
}

/// A small, fast, well-mixed generator (Steele, Lea & Flood's SplitMix64): enough for
/// resampling and seeded choices, and the same on every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), without modulo bias.
    pub fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return (v % n) as usize;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_std_and_missing() {
        let s = Summary::of(&[1.0, 2.0, 3.0, f64::NAN]);
        assert_eq!((s.n, s.missing, s.mean, s.std), (3, 1, 2.0, 1.0));
        assert!(s.ci_low >= 1.0 && s.ci_low < 2.0 && s.ci_high > 2.0 && s.ci_high <= 3.0);
        let one = Summary::of(&[0.5]);
        assert_eq!((one.mean, one.ci_low, one.ci_high), (0.5, 0.5, 0.5));
        assert!(one.std.is_nan());
        assert!(Summary::of(&[f64::NAN]).mean.is_nan());
    }

    #[test]
    fn bootstrap_is_reproducible_and_covers_the_mean() {
        let values: Vec<f64> = (0..200).map(|i| f64::from(i % 17) / 16.0).collect();
        let mean = values.iter().sum::<f64>() / 200.0;
        let a = bootstrap_interval(&values, 2000, 7);
        assert_eq!(a, bootstrap_interval(&values, 2000, 7));
        assert!(a.0 < mean && mean < a.1);
        // The interval of a mean of 200 values with sd ≈ 0.31 is about ±1.96·0.022.
        let width = a.1 - a.0;
        assert!((0.06..0.11).contains(&width), "{width}");
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut rng = SplitMix64(1);
        let mut counts = [0usize; 5];
        for _ in 0..50_000 {
            counts[rng.below(5)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{counts:?}"
        );
    }
}
