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

/// Two-sided p-value of the Wilcoxon signed-rank test that `differences` (paired, NaN left
/// out) are centred on zero, as SciPy's `scipy.stats.wilcoxon(d)` computes it by default:
/// zero differences dropped, tied magnitudes given their average rank, and by sample size
/// (zeros included) an exact null distribution (n ≤ 50, no ties or zeros), every sign flip
/// (n ≤ 13 with ties or zeros) or the normal approximation with SciPy's tie correction and
/// no continuity correction. NaN when there is nothing to test.
pub fn wilcoxon_signed_rank(differences: &[f64]) -> f64 {
    let d: Vec<f64> = differences
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .collect();
    let zeros = d.iter().filter(|&&v| v == 0.0).count();
    let nonzero: Vec<f64> = d.iter().copied().filter(|&v| v != 0.0).collect();
    let count = nonzero.len();
    if d.is_empty() {
        return f64::NAN;
    }
    let (ranks, tie_sizes) = average_ranks(&nonzero.iter().map(|v| v.abs()).collect::<Vec<_>>());
    let ties = tie_sizes.iter().any(|&t| t > 1);
    let r_plus: f64 = nonzero
        .iter()
        .zip(&ranks)
        .filter(|(v, _)| **v > 0.0)
        .map(|(_, r)| r)
        .sum();
    if d.len() <= 50 && !ties && zeros == 0 {
        // Exact: W+ is the sum of a uniformly random subset of the ranks 1..=n.
        let most = count * (count + 1) / 2;
        let mut ways = vec![0f64; most + 1];
        ways[0] = 1.0;
        for rank in 1..=count {
            for w in (rank..=most).rev() {
                ways[w] += ways[w - rank];
            }
        }
        let total = 2f64.powi(count as i32);
        let at_most = |k: usize| ways[..=k.min(most)].iter().sum::<f64>() / total;
        let w = r_plus.round() as usize;
        let at_least = 1.0 - if w == 0 { 0.0 } else { at_most(w - 1) };
        return (2.0 * at_least.min(at_most(w))).min(1.0);
    }
    if d.len() <= 13 {
        // Every sign pattern of the nonzero differences (a zero's flip changes nothing).
        let observed = r_plus;
        let tolerance = 1e-9 * observed.abs().max(1.0);
        let (mut below, mut above) = (0u64, 0u64);
        for signs in 0u32..(1 << count) {
            let t: f64 = (0..count)
                .filter(|i| signs & (1 << i) != 0)
                .map(|i| ranks[i])
                .sum();
            below += u64::from(t <= observed + tolerance);
            above += u64::from(t >= observed - tolerance);
        }
        let total = f64::from(1u32 << count);
        return (2.0 * below.min(above) as f64 / total).min(1.0);
    }
    let n = count as f64;
    let tie_correction: f64 = tie_sizes
        .iter()
        .map(|&t| (t as f64).powi(3) - t as f64)
        .sum();
    let se = ((n * (n + 1.0) * (2.0 * n + 1.0) - tie_correction / 2.0) / 24.0).sqrt();
    let z = (r_plus - n * (n + 1.0) / 4.0) / se;
    libm::erfc(z.abs() / std::f64::consts::SQRT_2)
}

/// Ranks 1..=n of `values` (ties share their average rank) and the size of each tie group.
fn average_ranks(values: &[f64]) -> (Vec<f64>, Vec<usize>) {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut groups = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        // Positions start..end hold ranks start+1..=end; each gets their mean.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        groups.push(end - start);
        start = end;
    }
    (ranks, groups)
}

/// A paired comparison of two score lists (one pair per image): the mean difference
/// (`a − b`), its percentile bootstrap 95 % interval (images resampled) and the Wilcoxon
/// signed-rank p-value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Paired {
    pub n: usize,
    pub mean_difference: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub p_value: f64,
}

impl Paired {
    /// Pairs with a NaN on either side are left out.
    pub fn of(a: &[f64], b: &[f64]) -> Self {
        let d: Vec<f64> = a
            .iter()
            .zip(b)
            .filter(|(x, y)| !x.is_nan() && !y.is_nan())
            .map(|(x, y)| x - y)
            .collect();
        let n = d.len();
        let mean_difference = if n == 0 {
            f64::NAN
        } else {
            d.iter().sum::<f64>() / n as f64
        };
        let (ci_low, ci_high) = bootstrap_interval(&d, BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED);
        Self {
            n,
            mean_difference,
            ci_low,
            ci_high,
            p_value: wilcoxon_signed_rank(&d),
        }
    }
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
    fn wilcoxon_matches_scipy() {
        // tools/wilcoxon_reference.py: scipy.stats.wilcoxon(d).pvalue (SciPy 1.17).
        let cases: [(&[f64], f64); 5] = [
            // exact, n = 8
            (
                &[0.301, 0.599, 0.026, -0.591, -0.155, -0.692, 0.36, 1.64],
                0.640625,
            ),
            // exact, n = 20
            (
                &[
                    -0.2922, -0.4205, 0.6898, 0.5569, 0.3054, -0.7305, 0.1707, 0.8953, -1.1442,
                    -0.2576, -1.7012, -1.0895, -1.6417, -0.0351, -1.0674, 0.4713, 0.3568, 0.0131,
                    -2.3168, -0.3387,
                ],
                0.14290618896484375,
            ),
            // every sign flip (ties and a zero), n = 10
            (
                &[0.5, -0.5, 0.25, 0.0, 1.0, 0.75, 0.25, -0.125, 0.5, 2.0],
                0.0546875,
            ),
            // normal approximation (ties), n = 30
            (
                &[
                    0.1, 0.2, -0.7, -0.1, -0.4, -0.3, 0.6, -0.3, 0.1, 0.5, -0.2, 0.0, 0.2, 0.1,
                    -0.5, 0.1, 0.8, -0.7, 0.5, 0.2, -0.2, 1.1, 0.5, -0.5, 0.1, 0.4, 0.0, 0.4, 0.1,
                    0.4,
                ],
                0.3314532953174325,
            ),
            // normal approximation, n = 60
            (
                &[
                    1.33852, -0.77566, 0.10314, -0.56331, 0.02727, -1.28719, -0.6793, -0.2962,
                    0.79876, 1.04522, -1.42353, -0.89464, 0.5469, -2.09242, -0.56317, -0.19729,
                    1.15701, 0.5894, -0.42721, -0.46858, -0.3502, 1.42353, -0.52802, -0.40368,
                    0.25259, -0.22077, -0.29728, -1.21407, -0.11152, -0.54358, 1.06613, 0.55309,
                    -0.12414, 0.56838, -0.43987, 0.95213, -0.1054, 0.48338, -1.39089, 0.24668,
                    -1.7882, -2.13533, -0.40448, -0.99993, 0.06405, 2.14476, -0.93172, -0.72394,
                    0.1054, 0.39301, -0.27641, -0.30593, 0.60246, 0.41991, -1.13368, -0.17918,
                    -0.06471, -1.15448, 0.15984, -0.95796,
                ],
                0.08232539735940667,
            ),
        ];
        for (d, p) in cases {
            let ours = wilcoxon_signed_rank(d);
            assert!(
                (ours - p).abs() < 1e-12 * p.max(1e-3),
                "{ours} vs SciPy's {p} for {d:?}"
            );
        }
        assert!(wilcoxon_signed_rank(&[]).is_nan());
        // The same differences with the opposite sign give the same two-sided p.
        let d = [0.3, -0.1, 0.5, 0.2, 0.4, -0.05, 0.6];
        let flipped: Vec<f64> = d.iter().map(|v| -v).collect();
        assert_eq!(wilcoxon_signed_rank(&d), wilcoxon_signed_rank(&flipped));
    }

    #[test]
    fn paired_comparison_of_a_clear_difference() {
        let b: Vec<f64> = (0..40).map(|i| 0.5 + f64::from(i % 7) / 20.0).collect();
        let a: Vec<f64> = b
            .iter()
            .enumerate()
            .map(|(i, v)| v + 0.05 + (i % 3) as f64 / 100.0)
            .collect();
        let p = Paired::of(&a, &b);
        assert_eq!(p.n, 40);
        assert!((p.mean_difference - 0.0598).abs() < 1e-3, "{p:?}");
        assert!(
            p.ci_low > 0.05 && p.ci_high < 0.07 && p.p_value < 1e-6,
            "{p:?}"
        );
        // NaN pairs are left out.
        assert_eq!(Paired::of(&[1.0, f64::NAN], &[0.5, 0.2]).n, 1);
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
