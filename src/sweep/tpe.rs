//! The Tree-structured Parzen Estimator (Bergstra et al. 2011), univariate, as Optuna's default
//! `TPESampler` builds it.
//!
//! The finished trials are split at the gamma quantile of their values into a good group and a
//! bad one. For each parameter, a Parzen estimator (a mixture of truncated normals, one per
//! observation plus a broad prior over the whole range) is fitted to each group: l(x) to the good
//! values, g(x) to the bad. Candidates are drawn from l and the one with the largest
//! l(x)/g(x), the expected-improvement ratio, is proposed. Choices use smoothed frequencies.
//!
//! Why not the `optimizer` crate's TPE, measured on the synthetic objective of
//! tests/sweep_search.rs (mean best of 20 trials over 10 seeds, lower is better): with its
//! defaults it scored 0.392 against 0.377 for random search, and 0.405 against 0.312 with a
//! bandwidth of 0.15 of each range; TPE was better on only 5 of 10 seeds either way. Its
//! estimator has no prior component, takes a bandwidth of 1.0 in the parameter's own units when
//! the good values coincide (a point mass for a warm-up of 0..200, a flat line for a dropout of
//! 0..0.5), and it matches a parameter's past values by distribution rather than by name.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Candidates drawn from l(x) per proposal (Optuna's `n_ei_candidates`).
pub const N_CANDIDATES: usize = 24;

/// The fraction of finished trials counted as good, at least one: 0.25, rounded up. (Optuna uses
/// 0.1 for long studies; a dozen trials would leave a single good one.)
pub fn n_good(n: usize) -> usize {
    n.div_ceil(4).clamp(1, n.saturating_sub(1).max(1))
}

/// A seeded generator for one draw: the sweep seed, the trial number and the parameter index,
/// so a trial's parameters do not depend on how many draws came before it (a resumed sweep
/// proposes what an uninterrupted one would).
pub fn rng(seed: u64, trial: usize, param: usize) -> StdRng {
    // Each input goes through a full SplitMix64 round before the next is added: XOR-ing them in
    // directly would make (seed 0, trial 1) and (seed 1, trial 0) the same stream.
    let h =
        splitmix(splitmix(splitmix(seed).wrapping_add(trial as u64)).wrapping_add(param as u64));
    StdRng::seed_from_u64(h)
}

/// SplitMix64's finaliser: a bijection on u64 that mixes every input bit into every output bit.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One truncated-normal component.
#[derive(Clone, Copy, Debug)]
struct Kernel {
    mu: f64,
    sigma: f64,
}

/// A mixture of equally weighted truncated normals on `[a, b]`.
#[derive(Clone, Debug)]
struct Parzen {
    kernels: Vec<Kernel>,
    a: f64,
    b: f64,
}

impl Parzen {
    /// One kernel per observation, with a width of the larger gap to its neighbours (clipped to
    /// between range / min(100, n + 1) and the range), plus the prior: centred, as wide as the
    /// range. The prior keeps l and g positive everywhere, so a few points cannot shut out the
    /// rest of the range.
    fn fit(obs: &[f64], a: f64, b: f64) -> Parzen {
        let range = (b - a).max(f64::MIN_POSITIVE);
        let prior = Kernel {
            mu: 0.5 * (a + b),
            sigma: range,
        };
        let mut sorted: Vec<f64> = obs.iter().map(|x| x.clamp(a, b)).collect();
        sorted.push(prior.mu);
        sorted.sort_by(f64::total_cmp);
        let min_sigma = range / (sorted.len() as f64).min(100.0);
        let mut kernels: Vec<Kernel> = obs
            .iter()
            .map(|&x| {
                let x = x.clamp(a, b);
                let i = sorted.partition_point(|&s| s < x);
                let left = if i > 0 { x - sorted[i - 1] } else { x - a };
                let right = sorted.get(i + 1).map_or(b - x, |&s| s - x);
                Kernel {
                    mu: x,
                    sigma: left.max(right).clamp(min_sigma, range),
                }
            })
            .collect();
        kernels.push(prior);
        Parzen { kernels, a, b }
    }

    fn ln_pdf(&self, x: f64) -> f64 {
        let terms: Vec<f64> = self
            .kernels
            .iter()
            .map(|k| {
                let mass =
                    (phi((self.b - k.mu) / k.sigma) - phi((self.a - k.mu) / k.sigma)).max(1e-300);
                let z = (x - k.mu) / k.sigma;
                -0.5 * z * z - (k.sigma * (2.0 * std::f64::consts::PI).sqrt() * mass).ln()
            })
            .collect();
        let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln()
            - (self.kernels.len() as f64).ln()
    }

    fn sample(&self, rng: &mut StdRng) -> f64 {
        let k = self.kernels[rng.random_range(0..self.kernels.len())];
        // Rejection keeps the draw inside [a, b]; every kernel has most of its mass there (its
        // centre is inside), so this ends quickly.
        for _ in 0..64 {
            let x = k.mu + k.sigma * normal(rng);
            if (self.a..=self.b).contains(&x) {
                return x;
            }
        }
        k.mu
    }
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The standard normal CDF, through erf (Abramowitz & Stegun 7.1.26, error below 1.5e-7: far
/// finer than a choice between candidates needs).
fn phi(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    0.5 * (1.0 + if x >= 0.0 { erf } else { -erf })
}

/// Proposes a value in `[a, b]` from the good and bad values of a continuous parameter (in the
/// space it is modelled in: the logarithm for a log range).
pub fn propose_continuous(rng: &mut StdRng, a: f64, b: f64, good: &[f64], bad: &[f64]) -> f64 {
    let l = Parzen::fit(good, a, b);
    let g = Parzen::fit(bad, a, b);
    let mut best = (f64::NEG_INFINITY, 0.5 * (a + b));
    for _ in 0..N_CANDIDATES {
        let x = l.sample(rng);
        let score = l.ln_pdf(x) - g.ln_pdf(x);
        if score > best.0 {
            best = (score, x);
        }
    }
    best.1
}

/// Proposes one of `k` choices from the good and bad choices made (indices): frequencies with one
/// pseudo-count per choice (the prior), candidates drawn from the good ones, the best ratio kept.
pub fn propose_choice(rng: &mut StdRng, k: usize, good: &[usize], bad: &[usize]) -> usize {
    let freq = |obs: &[usize]| -> Vec<f64> {
        let mut w = vec![1.0; k];
        for &i in obs.iter().filter(|&&i| i < k) {
            w[i] += 1.0;
        }
        let total: f64 = w.iter().sum();
        w.iter().map(|x| x / total).collect()
    };
    let (l, g) = (freq(good), freq(bad));
    let mut best = (f64::NEG_INFINITY, 0);
    for _ in 0..N_CANDIDATES {
        let mut u = rng.random::<f64>();
        let mut c = k - 1;
        for (i, p) in l.iter().enumerate() {
            if u < *p {
                c = i;
                break;
            }
            u -= p;
        }
        let score = l[c].ln() - g[c].ln();
        if score > best.0 {
            best = (score, c);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phi_matches_known_values() {
        for (z, p) in [
            (0.0, 0.5),
            (1.0, 0.841_344_75),
            (-1.96, 0.024_997_9),
            (3.0, 0.998_650_1),
        ] {
            assert!((phi(z) - p).abs() < 1e-6, "phi({z}) = {} vs {p}", phi(z));
        }
    }

    #[test]
    fn the_mixture_is_a_density_on_its_range() {
        let p = Parzen::fit(&[0.2, 0.25, 0.9], 0.0, 1.0);
        // Midpoint rule over [0, 1]: the truncated mixture integrates to 1.
        let n = 2000;
        let total: f64 = (0..n)
            .map(|i| p.ln_pdf((i as f64 + 0.5) / n as f64).exp() / n as f64)
            .sum();
        assert!((total - 1.0).abs() < 1e-3, "integral {total}");
    }

    #[test]
    fn proposals_move_towards_the_good_values() {
        let mut rng = rng(1, 2, 3);
        let good = [0.1, 0.12, 0.15];
        let bad = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95];
        let xs: Vec<f64> = (0..50)
            .map(|_| propose_continuous(&mut rng, 0.0, 1.0, &good, &bad))
            .collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!(mean < 0.3, "mean proposal {mean}");
        let picks: Vec<usize> = (0..50)
            .map(|_| propose_choice(&mut rng, 3, &[2, 2, 1], &[0, 0, 0, 1]))
            .collect();
        assert!(picks.iter().filter(|&&c| c == 2).count() > 40, "{picks:?}");
    }
}
