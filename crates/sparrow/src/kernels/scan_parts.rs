//! What the online-softmax attention scans of every instruction-set build share
//! ([`super::decode_attention`]'s portable and AVX-512 scans, `attention_avx2`'s): the
//! key block size and the partial results of one key range, merged by log-sum-exp.

/// Keys scored, exponentiated and accumulated together.
pub(super) const KEY_BLOCK: usize = 64;

/// Heads (or query-head pairs) per lane group of the lane scan (one AVX-512 register of
/// f32).
pub(super) const LANES: usize = 16;

/// Partial result of one key range: per head (max, sum, unnormalised output).
pub(super) struct Partial {
    pub(super) max: Vec<f32>,
    pub(super) sum: Vec<f32>,
    /// (G, D)
    pub(super) out: Vec<f32>,
}

impl Partial {
    /// The partial of no keys yet for `g` heads of `dv` values: max -inf, sum 0, out 0.
    pub(super) fn empty(g: usize, dv: usize) -> Self {
        Self {
            max: vec![f32::NEG_INFINITY; g],
            sum: vec![0.0; g],
            out: vec![0.0; g * dv],
        }
    }
}

/// Partial result over a key range for 16 lanes at once (heads, or query-head pairs).
pub(super) struct LanePartial {
    pub(super) max: [f32; LANES],
    pub(super) sum: [f32; LANES],
    /// (D) rows of 16 lanes: the unnormalised output, transposed.
    pub(super) out_t: Vec<[f32; LANES]>,
}
