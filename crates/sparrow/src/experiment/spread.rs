//! Statistics over repeated runs (one per seed): the mean and spread of a metric, and
//! the paired comparison of two arms that ran on the same seeds.
//!
//! Within a seed every arm starts from the same shared parameters and reads the same
//! batches, so the per-seed difference `arm - baseline` removes the seed's own effect;
//! it is reported next to both arms' spreads. A difference is marked as *beyond the
//! seed spread* when the two arms' per-seed ranges do not overlap: every seed of one
//! arm is better than every seed of the other. With three seeds this is a strict test
//! (by chance alone two arms with equal means separate this way 10% of the time: 2 of
//! the 20 ways to split six values into two sets of three).

use serde::Serialize;

/// Mean, sample standard deviation and range of one metric over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (n - 1 in the denominator); 0 for one value.
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` when there are none or one is not finite.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = if n > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Self {
            n,
            mean,
            std,
            min,
            max,
        })
    }

    /// Whether the ranges of two spreads (each over at least two seeds) do not overlap.
    pub fn separated_from(&self, other: &Spread) -> bool {
        self.n >= 2 && other.n >= 2 && (self.min > other.max || self.max < other.min)
    }
}

/// One metric of one arm over seeds, compared with the baseline arm when there is one.
#[derive(Debug, Clone, Serialize)]
pub struct Compared {
    /// The values, one per seed, in the experiment's seed order.
    pub values: Vec<f64>,
    pub spread: Spread,
    /// Per-seed differences `arm - baseline` over the seeds both ran.
    pub delta: Option<Spread>,
    /// Mean difference relative to the baseline's mean, when that is not 0.
    pub relative: Option<f64>,
    /// The two arms' per-seed ranges do not overlap (see the module docs).
    pub beyond_spread: bool,
}

impl Compared {
    /// `values[i]` and `baseline[i]` belong to the same seed.
    pub fn new(values: &[f64], baseline: Option<&[f64]>) -> Option<Self> {
        let spread = Spread::of(values)?;
        let base = baseline.and_then(Spread::of);
        let delta = baseline.and_then(|b| {
            let d: Vec<f64> = values.iter().zip(b).map(|(v, b)| v - b).collect();
            Spread::of(&d)
        });
        let relative = base
            .filter(|b| b.mean != 0.0)
            .map(|b| spread.mean / b.mean - 1.0);
        let beyond_spread = base.is_some_and(|b| spread.separated_from(&b));
        Some(Self {
            values: values.to_vec(),
            spread,
            delta,
            relative,
            beyond_spread,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_values() {
        let s = Spread::of(&[1.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.n, s.min, s.max), (3, 1.0, 4.0));
        assert!((s.mean - 7.0 / 3.0).abs() < 1e-12);
        // sample variance: ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 42/18
        assert!((s.std - (42.0f64 / 18.0).sqrt()).abs() < 1e-12);
        assert_eq!(Spread::of(&[3.0]).unwrap().std, 0.0);
        assert!(Spread::of(&[]).is_none());
        assert!(Spread::of(&[1.0, f64::NAN]).is_none());
    }

    #[test]
    fn paired_comparison_and_separation() {
        // Overlapping ranges, but every seed lower by about 0.1: not beyond the spread.
        let base = [5.0, 5.3, 5.6];
        let arm = [4.9, 5.2, 5.5];
        let c = Compared::new(&arm, Some(&base)).unwrap();
        let d = c.delta.unwrap();
        assert!((d.mean + 0.1).abs() < 1e-9 && d.std < 1e-9);
        assert!(!c.beyond_spread);
        assert!((c.relative.unwrap() - (5.2 / 5.3 - 1.0)).abs() < 1e-12);
        // Disjoint ranges: beyond.
        let c = Compared::new(&[6.0, 6.1, 6.2], Some(&base)).unwrap();
        assert!(c.beyond_spread);
        // One seed cannot tell.
        let c = Compared::new(&[9.0], Some(&[1.0])).unwrap();
        assert!(!c.beyond_spread);
        // No baseline: no comparison.
        let c = Compared::new(&arm, None).unwrap();
        assert!(c.delta.is_none() && c.relative.is_none() && !c.beyond_spread);
    }
}
