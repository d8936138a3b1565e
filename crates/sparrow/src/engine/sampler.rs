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
    ///
    /// Candidates are ranked by logit (ties to the lower id); top-k keeps the k best,
    /// top-p the shortest prefix of them whose probability (over the top-k set) reaches
    /// `top_p`. Only the candidates that can matter are sorted: the k best when top-k is
    /// set, else a growing head of the ranking until it holds `top_p` of the mass; with
    /// neither set nothing is sorted and the draw walks the ids in order. A full sort of a
    /// 49152-token vocabulary cost ~7 ms per token, as much as SmolLM2's whole step.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature == 0.0 {
            return argmax(logits);
        }
        let n = logits.len();
        let t = self.cfg.temperature;
        let max = logits[argmax(logits) as usize] as f64;
        let k = if self.cfg.top_k > 0 {
            self.cfg.top_k.min(n)
        } else {
            n
        };
        // Without top-k every id's weight is needed (the draw walks them all, or top-p
        // measures against their sum): each is computed once. With top-k only the k
        // candidates' are.
        let all: Option<Vec<f64>> = (k == n).then(|| {
            logits
                .iter()
                .map(|&x| ((x as f64 - max) / t).exp())
                .collect()
        });
        let weight = |i: u32| match &all {
            Some(w) => w[i as usize],
            None => ((logits[i as usize] as f64 - max) / t).exp(),
        };
        let u: f64 = self.rng.random();
        if let (Some(w), true) = (&all, self.cfg.top_p >= 1.0) {
            let total: f64 = w.iter().sum();
            return draw(u * total, (0..n as u32).zip(w.iter().copied()));
        }
        let better = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        // The mass top-p is measured against: the top-k set's (the whole row's when
        // top-k is off).
        let mut head = if k < n { k } else { n.min(256) };
        let mut total = all.as_ref().map(|w| w.iter().sum::<f64>());
        loop {
            let mut idx: Vec<u32> = (0..n as u32).collect();
            if head < n {
                idx.select_nth_unstable_by(head - 1, better);
                idx.truncate(head);
            }
            idx.sort_unstable_by(better);
            let w: Vec<f64> = idx.iter().map(|&i| weight(i)).collect();
            let mass = *total.get_or_insert_with(|| w.iter().sum());
            let mut keep = None;
            if self.cfg.top_p < 1.0 {
                let mut acc = 0.0;
                for (j, x) in w.iter().enumerate() {
                    acc += x;
                    if acc / mass >= self.cfg.top_p {
                        keep = Some(j + 1);
                        break;
                    }
                }
            } else {
                keep = Some(idx.len());
            }
            // Not reached within the head (or rounding kept the sum just short): widen
            // it, or take every candidate once the head is the whole set.
            if keep.is_none() && head < n && k == n {
                head = (head * 4).min(n);
                continue;
            }
            let keep = keep.unwrap_or(idx.len());
            let kept: f64 = w[..keep].iter().sum();
            return draw(u * kept, idx[..keep].iter().copied().zip(w));
        }
    }
}

/// The candidate at which `u` (in [0, the candidates' total weight)) falls.
fn draw(mut u: f64, candidates: impl Iterator<Item = (u32, f64)>) -> u32 {
    let mut last = 0;
    for (i, w) in candidates {
        if u < w {
            return i;
        }
        if w > 0.0 {
            last = i;
        }
        u -= w;
    }
    last // rounding left u past the end: the last candidate with weight
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

    /// The top-p set the plain way: every id sorted, the prefix reaching `p` of the mass
    /// of the best `k` (all when k = 0).
    fn reference_set(logits: &[f32], t: f64, k: usize, p: f64) -> Vec<u32> {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if k > 0 {
            idx.truncate(k);
        }
        let w: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i as usize] as f64) / t).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let mut acc = 0.0;
        for (j, x) in w.iter().enumerate() {
            acc += x / total;
            if acc >= p {
                return idx[..=j].to_vec();
            }
        }
        idx
    }

    #[test]
    fn top_p_over_a_wide_vocabulary_keeps_the_reference_set() {
        // A flat row: the top-p set is far wider than the first sorted head (256).
        let logits: Vec<f32> = (0..3000u32)
            .map(|i| (i.wrapping_mul(2654435761) % 1000) as f32 / 400.0)
            .collect();
        for (k, p, t) in [
            (0, 0.9, 1.0),
            (0, 0.3, 0.7),
            (50, 0.5, 1.0),
            (700, 0.95, 1.5),
        ] {
            let set = reference_set(&logits, t, k, p);
            if k == 0 && p == 0.9 {
                assert!(
                    set.len() > 1024,
                    "the case must widen the head: {}",
                    set.len()
                );
            }
            let mut s = sampler(t, p, k);
            let mut seen = std::collections::HashSet::new();
            for _ in 0..4000 {
                let id = s.sample(&logits);
                assert!(set.contains(&id), "k {k} p {p}: {id} outside the top-p set");
                seen.insert(id);
            }
            // Most of the set is reached (it is nearly uniform here).
            assert!(
                seen.len() * 2 >= set.len().min(4000),
                "k {k} p {p}: {} of {}",
                seen.len(),
                set.len()
            );
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
