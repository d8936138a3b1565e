//! Next-token sampling: greedy (temperature 0), temperature, top-k and nucleus (top-p),
//! from a seeded RNG so a generation is reproducible.

use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy)]
pub struct SamplerConfig {
    /// 0 = greedy argmax.
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches top_p (1.0 = off).
    pub top_p: f64,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
}

impl SamplerConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Invalid(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// Pick a token from one row of logits (V).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature == 0.0 {
            return argmax(logits);
        }
        // Candidates sorted by logit, descending; ties to the lower id.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        // Unstable sort is deterministic here: the comparator breaks every tie by id.
        idx.sort_unstable_by(|&a, &b| {
            logits[b as usize]
                .partial_cmp(&logits[a as usize])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        });
        if self.cfg.top_k > 0 {
            idx.truncate(self.cfg.top_k.min(idx.len()));
        }
        let max = logits[idx[0] as usize] as f64;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i as usize] as f64 - max) / self.cfg.temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.cfg.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (p, &i) in probs.iter().zip(&idx) {
            if u < *p {
                return i;
            }
            u -= p;
        }
        *idx.last().expect("at least one candidate")
    }
}

/// Index of the largest value (lowest index on ties).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f64, top_p: f64, top_k: usize) -> Sampler {
        Sampler::new(
            SamplerConfig {
                temperature,
                top_p,
                top_k,
            },
            7,
        )
        .unwrap()
    }

    const LOGITS: [f32; 6] = [1.0, 3.0, 0.5, 2.9, -1.0, 3.0];

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        assert_eq!(argmax(&LOGITS), 1);
        assert_eq!(sampler(0.0, 1.0, 0).sample(&LOGITS), 1);
        // top-k 1 keeps only the best candidate (ties to the lower id) at any temperature.
        let mut s = sampler(5.0, 1.0, 1);
        assert!((0..100).all(|_| s.sample(&LOGITS) == 1));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let mut s = sampler(1.0, 1.0, 3);
        for _ in 0..500 {
            assert!([1, 3, 5].contains(&s.sample(&LOGITS)));
        }
        // Probabilities at T=1: ids 1 and 5 hold 0.32 each, id 3 0.29: top-p 0.5 keeps {1, 5}.
        let mut s = sampler(1.0, 0.5, 0);
        for _ in 0..500 {
            assert!([1, 5].contains(&s.sample(&LOGITS)));
        }
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let logits = [0.0f32, (2.0f32).ln(), (4.0f32).ln()]; // p = 1/7, 2/7, 4/7
        let mut s = sampler(1.0, 1.0, 0);
        let mut counts = [0usize; 3];
        let n = 20_000;
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        for (c, p) in counts.iter().zip([1.0 / 7.0, 2.0 / 7.0, 4.0 / 7.0]) {
            let f = *c as f64 / n as f64;
            assert!((f - p).abs() < 0.02, "frequency {f} vs probability {p}");
        }
    }

    #[test]
    fn same_seed_same_draws_and_bad_options_rejected() {
        let draws = |seed| {
            let mut s = Sampler::new(
                SamplerConfig {
                    temperature: 1.3,
                    top_p: 0.9,
                    top_k: 0,
                },
                seed,
            )
            .unwrap();
            (0..50).map(|_| s.sample(&LOGITS)).collect::<Vec<_>>()
        };
        assert_eq!(draws(3), draws(3));
        assert_ne!(draws(3), draws(4));
        for (t, p) in [(-1.0, 1.0), (f64::NAN, 1.0), (1.0, 0.0), (1.0, 1.5)] {
            assert!(Sampler::new(
                SamplerConfig {
                    temperature: t,
                    top_p: p,
                    top_k: 0
                },
                0
            )
            .is_err());
        }
    }
}
