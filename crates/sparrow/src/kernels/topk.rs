//! Streaming top-k selection with a deterministic tie-break.
//!
//! Order: higher score first; among equal scores the lower position wins. NaN counts as
//! -inf and -0.0 as 0.0, so the order is total and the selected set does not depend on
//! how the keys were split into chunks or threads: the full forward, the cached decode
//! and any parallel split of the scan select the same positions for the same scores.
//!
//! [`StreamTopK`] keeps at most `2k` candidates: a score enters only if it beats the
//! current k-th best (the threshold); when the buffer fills it is cut back to the best k
//! with `select_nth_unstable_by` (O(k)). A scan over n keys costs O(n) comparisons plus
//! O(k) per refill, and the memory is O(k) whatever n is.

use std::cmp::Ordering;

/// Marks an unused slot of a top-k row (fewer than k visible keys).
pub const NONE: u32 = u32::MAX;

/// The score as it is compared: NaN -> -inf, -0.0 -> 0.0.
#[inline(always)]
pub fn canonical(score: f32) -> f32 {
    if score.is_nan() {
        f32::NEG_INFINITY
    } else {
        score + 0.0
    }
}

/// `Less` when `a` ranks before `b` (higher score, then lower position).
#[inline(always)]
pub fn rank_order(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Top-k of a stream of (score, position) pairs fed in increasing position order.
#[derive(Debug, Clone)]
pub struct StreamTopK {
    k: usize,
    buf: Vec<(f32, u32)>,
    /// Score of the current k-th best once the buffer has been cut at least once.
    threshold: f32,
}

impl StreamTopK {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            buf: Vec::with_capacity(2 * k.max(1)),
            threshold: f32::NEG_INFINITY,
        }
    }

    /// Forget everything (keeps the allocation).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.threshold = f32::NEG_INFINITY;
    }

    /// The current threshold: a later position needs a strictly higher score to enter.
    #[inline(always)]
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Offer a score for `pos`; positions must arrive in increasing order, so an equal
    /// score never displaces an earlier position.
    #[inline(always)]
    pub fn push(&mut self, score: f32, pos: u32) {
        let score = canonical(score);
        if self.k == 0 || (self.buf.len() >= self.k && score <= self.threshold) {
            return;
        }
        self.buf.push((score, pos));
        if self.buf.len() == self.buf.capacity() {
            self.cut();
        }
    }

    /// Merge another selection (from a disjoint range of positions, in any order).
    pub fn merge(&mut self, other: &StreamTopK) {
        for &(s, p) in &other.buf {
            self.buf.push((s, p));
            if self.buf.len() >= 2 * self.k.max(1) {
                self.cut();
            }
        }
    }

    fn cut(&mut self) {
        if self.buf.len() > self.k {
            self.buf.select_nth_unstable_by(self.k - 1, rank_order);
            self.buf.truncate(self.k);
        }
        if self.buf.len() == self.k {
            self.threshold =
                self.buf
                    .iter()
                    .map(|e| e.0)
                    .fold(f32::INFINITY, |m, s| if s < m { s } else { m });
        }
    }

    /// The selected positions in increasing order, padded with [`NONE`] to length k.
    pub fn finish_into(&mut self, out: &mut [u32]) {
        if self.buf.len() > self.k {
            self.buf.select_nth_unstable_by(self.k - 1, rank_order);
            self.buf.truncate(self.k);
        }
        let n = self.buf.len();
        for (o, e) in out.iter_mut().zip(&self.buf) {
            *o = e.1;
        }
        out[..n].sort_unstable();
        for o in &mut out[n..] {
            *o = NONE;
        }
    }
}

/// Reference: sort every (score, position) pair and keep the first k positions, in
/// increasing order, padded with [`NONE`].
pub fn topk_by_sort(scores: &[f32], k: usize) -> Vec<u32> {
    let mut all: Vec<(f32, u32)> = scores
        .iter()
        .enumerate()
        .map(|(i, &s)| (canonical(s), i as u32))
        .collect();
    all.sort_by(rank_order);
    let mut sel: Vec<u32> = all.iter().take(k).map(|e| e.1).collect();
    sel.sort_unstable();
    sel.resize(k, NONE);
    sel
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_keep_the_lower_position() {
        let scores = [1.0, 3.0, 3.0, 0.0, 3.0, -0.0, 0.0, f32::NAN];
        for k in 0..=scores.len() + 2 {
            let mut t = StreamTopK::new(k);
            for (i, &s) in scores.iter().enumerate() {
                t.push(s, i as u32);
            }
            let mut out = vec![0; k];
            t.finish_into(&mut out);
            assert_eq!(out, topk_by_sort(&scores, k), "k = {k}");
        }
        assert_eq!(topk_by_sort(&scores, 3), vec![1, 2, 4]);
        assert_eq!(topk_by_sort(&scores, 5), vec![0, 1, 2, 3, 4]);
    }
}
