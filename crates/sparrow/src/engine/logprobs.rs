//! Log-probabilities of a sampled token and of the most likely alternatives, from one
//! row of logits (the model's own distribution: before temperature, top-k, top-p and
//! penalties, as vLLM reports them by default), for the APIs' `logprobs`.

/// One generated token's log-probability and the `k` most likely tokens' at its
/// position (highest first, ties to the lower id).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Most alternatives one position may ask for (OpenAI allows 20).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// log-sum-exp of `row`, in f64.
fn log_sum_exp(row: &[f32]) -> f64 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if !m.is_finite() {
        return m;
    }
    m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

/// `token`'s log-probability under softmax(`row`) and the `k` best alternatives.
pub fn token_logprobs(row: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let lse = log_sum_exp(row);
    let lp = |i: usize| (row[i] as f64 - lse) as f32;
    let k = k.min(MAX_TOP_LOGPROBS).min(row.len());
    let mut top: Vec<u32> = Vec::new();
    if k > 0 {
        let better =
            |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        idx.select_nth_unstable_by(k - 1, better);
        idx.truncate(k);
        idx.sort_unstable_by(better);
        top = idx;
    }
    TokenLogprobs {
        token,
        logprob: lp(token as usize),
        top: top.into_iter().map(|i| (i, lp(i as usize))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain way: softmax in f64, every id sorted.
    fn reference(row: &[f32], token: u32, k: usize) -> (f64, Vec<u32>) {
        let p: Vec<f64> = row.iter().map(|&x| (x as f64).exp()).collect();
        let z: f64 = p.iter().sum();
        let mut ids: Vec<u32> = (0..row.len() as u32).collect();
        ids.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
        ((p[token as usize] / z).ln(), ids[..k].to_vec())
    }

    #[test]
    fn logprobs_match_the_plain_softmax() {
        for (n, k, seed) in [
            (1usize, 1usize, 1u32),
            (7, 3, 2),
            (333, 20, 3),
            (1000, 5, 4),
        ] {
            let row: Vec<f32> = (0..n as u32)
                .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 97.0 - 4.0)
                .collect();
            let token = (seed as usize * 31 % n) as u32;
            let got = token_logprobs(&row, token, k);
            let (want, ids) = reference(&row, token, k);
            assert!((got.logprob as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
            assert_eq!(got.top.iter().map(|t| t.0).collect::<Vec<_>>(), ids);
            for (i, lp) in &got.top {
                assert!(
                    (*lp as f64 - reference(&row, *i, 1).0).abs()
                        < 1e-5 * (*lp as f64).abs().max(1.0)
                );
            }
            let total: f64 = (0..n)
                .map(|i| (token_logprobs(&row, i as u32, 0).logprob as f64).exp())
                .sum();
            assert!((total - 1.0).abs() < 1e-4, "{total}");
        }
        // Ties go to the lower id; k beyond the vocabulary is clamped.
        let t = token_logprobs(&[1.0, 2.0, 2.0, 0.0], 3, 9);
        assert_eq!(
            t.top.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![1, 2, 0, 3]
        );
    }
}
