//! The int8 index cache: index keys *and* queries quantized to int8, scored by integer
//! dot products (DeepSeek-V3.2's indexer quantizes both sides too, to FP8, and scales
//! the products after).
//!
//! Each key (one per token) and each query head is rounded to int8 with one symmetric
//! absmax scale. The score of query t against key s is
//! `I(t, s) = k_scale(s) * sum_j (w(t, j) * q_scale(t, j)) * act(q8(t, j) . k8(s))`,
//! the heads taken in order, each dot product an exact integer: every build (portable,
//! AVX2, AVX-512, VNNI) gives the same bits, equal to [`scores_reference`].
//!
//! Layout: blocks of [`BLOCK`] tokens holding (dim4 / 4, BLOCK, 4) bytes (dimensions
//! padded with zeros to a multiple of four): each token's four consecutive dimensions
//! are adjacent, so one 64-byte load holds 16 tokens x 4 dimensions, one operand of
//! VNNI's `vpdpbusd` (unsigned x signed bytes summed in fours into 32-bit lanes; the
//! keys are made unsigned by adding 128, which adds `128 * sum(q8)` to each dot
//! product, taken back exactly). Against the f32-query scan over widened int8 keys this
//! does 64 multiply-adds per instruction instead of 16, with no conversions.

use super::index_shape::{IndexShape, ScoreAct, BLOCK};

/// Round `x` to int8 with one symmetric absmax scale (`x ~ q * scale`), written into
/// `out` (as long as `x`; the caller zeroes any padding). A zero or non-finite absmax
/// gives scale 1.
pub(crate) fn quantize(x: &[f32], out: &mut [i8]) -> f32 {
    let m = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = if m > 0.0 && m.is_finite() {
        m / 127.0
    } else {
        1.0
    };
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v / scale).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

/// Index keys of one sequence, int8, in the blocked four-dimension layout.
#[derive(Debug, Clone)]
pub struct Int8Keys {
    dim: usize,
    /// `dim` rounded up to a multiple of four.
    dim4: usize,
    len: usize,
    /// (n_blocks, dim4 / 4, BLOCK, 4); positions past `len` and padded dimensions are 0.
    data: Vec<i8>,
    /// (n_blocks, BLOCK) per-token scales (key = stored * scale); 0 past `len`.
    scales: Vec<f32>,
}

impl Int8Keys {
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            dim4: dim.div_ceil(4) * 4,
            len: 0,
            data: Vec::new(),
            scales: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of one block of keys.
    fn block_len(&self) -> usize {
        self.dim4 * BLOCK
    }

    /// Blocks allocated.
    pub(crate) fn n_blocks(&self) -> usize {
        self.scales.len() / BLOCK
    }

    /// Bytes held (keys and scales, including the unused tail of the last block).
    pub fn bytes(&self) -> usize {
        self.data.len() + self.scales.len() * 4
    }

    /// Bytes per token: the padded key and its scale.
    pub fn bytes_per_token(dim: usize) -> usize {
        dim.div_ceil(4) * 4 + 4
    }

    /// Reserve room for `n` more tokens.
    pub fn reserve(&mut self, n: usize) {
        let blocks = (self.len + n).div_ceil(BLOCK);
        self.data
            .reserve((blocks * self.block_len()).saturating_sub(self.data.len()));
        self.scales
            .reserve((blocks * BLOCK).saturating_sub(self.scales.len()));
    }

    /// Keep the first `len` keys (no-op if there are fewer); the dropped positions of
    /// the last kept block are zeroed, as unwritten ones are.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let blocks = len.div_ceil(BLOCK);
        self.data.truncate(blocks * self.block_len());
        self.scales.truncate(blocks * BLOCK);
        for s in len..blocks * BLOCK {
            self.write(s, &vec![0; self.dim4], 0.0);
        }
        self.len = len;
    }

    /// Byte offset of dimensions 4p..4p + 4 of token `s`.
    #[inline(always)]
    fn at(&self, s: usize, p: usize) -> usize {
        let (b, i) = (s / BLOCK, s % BLOCK);
        b * self.block_len() + (p * BLOCK + i) * 4
    }

    fn write(&mut self, s: usize, key: &[i8], scale: f32) {
        for p in 0..self.dim4 / 4 {
            let o = self.at(s, p);
            self.data[o..o + 4].copy_from_slice(&key[4 * p..4 * p + 4]);
        }
        self.scales[s] = scale;
    }

    /// Append row-major keys (n, dim), each rounded with its own absmax scale.
    pub fn extend_rows(&mut self, rows: &[f32]) {
        let mut key = vec![0i8; self.dim4];
        for row in rows.chunks_exact(self.dim) {
            if self.len.is_multiple_of(BLOCK) {
                self.data.resize(self.data.len() + self.block_len(), 0);
                self.scales.resize(self.scales.len() + BLOCK, 0.0);
            }
            let scale = quantize(row, &mut key[..self.dim]);
            self.write(self.len, &key, scale);
            self.len += 1;
        }
    }

    /// Key `s` as stored (dim4 values, the padding 0) and its scale.
    pub fn row(&self, s: usize) -> (Vec<i8>, f32) {
        let mut key = Vec::with_capacity(self.dim4);
        for p in 0..self.dim4 / 4 {
            let o = self.at(s, p);
            key.extend_from_slice(&self.data[o..o + 4]);
        }
        (key, self.scales[s])
    }

    /// Block `b`'s bytes.
    pub(crate) fn block(&self, b: usize) -> &[i8] {
        &self.data[b * self.block_len()..(b + 1) * self.block_len()]
    }

    /// One query's index heads, quantized for this store's layout.
    pub(crate) fn prepare(&self, q: &[f32], w: &[f32], shape: IndexShape) -> QuantQuery {
        QuantQuery::new(q, w, shape, self.dim4)
    }

    /// Scores of block `b` for one prepared query: `out[i]` for its BLOCK tokens.
    pub(crate) fn score(
        &self,
        b: usize,
        query: &QuantQuery,
        act: ScoreAct,
        out: &mut [f32; BLOCK],
    ) {
        let block = self.block(b);
        let scales: &[f32; BLOCK] = self.scales[b * BLOCK..(b + 1) * BLOCK]
            .try_into()
            .expect("a block holds BLOCK scales");
        #[cfg(target_arch = "x86_64")]
        if super::qmatmul::has_vnni() {
            // SAFETY: `has_vnni` checked AVX-512F/BW/VNNI at run time; the block holds
            // dim4 * BLOCK bytes and the query dim4 bytes per head (both checked below
            // by construction: `prepare` used this store's dim4).
            unsafe { score_vnni(block, scales, query, act, out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if super::simd::has_avx2_fma() {
            // SAFETY: AVX2 was checked at run time; the function reads only the slices.
            unsafe { score_avx2(block, scales, query, act, out) };
            return;
        }
        score_portable(block, scales, query, act, out);
    }
}

/// One query's index heads in int8, ready for the integer scan.
#[derive(Debug, Clone)]
pub struct QuantQuery {
    heads: usize,
    /// (heads, dim4 / 4) four int8 values per i32, little-endian (zero padding).
    quads: Vec<i32>,
    /// (heads, dim4) the same values, one per byte.
    q: Vec<i8>,
    /// Per head: the sum of its int8 values (the unsigned keys' offset, taken back).
    sums: Vec<i32>,
    /// Per head: its weight times its scale.
    wq: Vec<f32>,
}

impl QuantQuery {
    fn new(q: &[f32], w: &[f32], shape: IndexShape, dim4: usize) -> Self {
        let (h, d) = (shape.heads, shape.dim);
        let mut q8 = vec![0i8; h * dim4];
        let mut wq = Vec::with_capacity(h);
        for j in 0..h {
            let scale = quantize(&q[j * d..(j + 1) * d], &mut q8[j * dim4..j * dim4 + d]);
            wq.push(w[j] * scale);
        }
        let quads = q8
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8]))
            .collect();
        let sums = q8
            .chunks_exact(dim4)
            .map(|r| r.iter().map(|&v| v as i32).sum())
            .collect();
        Self {
            heads: h,
            quads,
            q: q8,
            sums,
            wq,
        }
    }
}

/// `out += wj * act(dot)` for one head's integer dot products (as the f32 scan's
/// `add_head`: a multiply then an add, never fused, in every build).
#[inline(always)]
fn add_head(out: &mut [f32], dots: &[i32], wj: f32, act: ScoreAct) {
    match act {
        ScoreAct::Relu => {
            for (o, &a) in out.iter_mut().zip(dots) {
                *o += wj * (a as f32).max(0.0);
            }
        }
        ScoreAct::Identity => {
            for (o, &a) in out.iter_mut().zip(dots) {
                *o += wj * a as f32;
            }
        }
    }
}

/// [`score_portable`] compiled for AVX2 (the integer loops vectorise to `vpmaddwd`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn score_avx2(
    block: &[i8],
    scales: &[f32; BLOCK],
    query: &QuantQuery,
    act: ScoreAct,
    out: &mut [f32; BLOCK],
) {
    score_portable(block, scales, query, act, out)
}

/// The scores of one block with plain loops (integer dot products, exact).
#[inline(always)]
fn score_portable(
    block: &[i8],
    scales: &[f32; BLOCK],
    query: &QuantQuery,
    act: ScoreAct,
    out: &mut [f32; BLOCK],
) {
    let dim4 = query.q.len() / query.heads.max(1);
    *out = [0.0; BLOCK];
    for j in 0..query.heads {
        let qj = &query.q[j * dim4..(j + 1) * dim4];
        let mut dots = [0i32; BLOCK];
        for (p, kp) in block.chunks_exact(BLOCK * 4).enumerate() {
            let qp = &qj[4 * p..4 * p + 4];
            for (d, k) in dots.iter_mut().zip(kp.chunks_exact(4)) {
                *d += qp[0] as i32 * k[0] as i32
                    + qp[1] as i32 * k[1] as i32
                    + qp[2] as i32 * k[2] as i32
                    + qp[3] as i32 * k[3] as i32;
            }
        }
        add_head(out, &dots, query.wq[j], act);
    }
    for (o, &s) in out.iter_mut().zip(scales) {
        *o *= s;
    }
}

/// [`score_portable`] with VNNI: for each 16-token chunk of the block, heads in groups
/// of G with G accumulators, one `vpdpbusd` per head and four dimensions; then each
/// head's dot products, offset taken back, converted and added in head order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn score_vnni(
    block: &[i8],
    scales: &[f32; BLOCK],
    query: &QuantQuery,
    act: ScoreAct,
    out: &mut [f32; BLOCK],
) {
    match query.heads {
        h if h % 16 == 0 => unsafe { score_vnni_groups::<16>(block, scales, query, act, out) },
        h if h % 8 == 0 => unsafe { score_vnni_groups::<8>(block, scales, query, act, out) },
        h if h % 4 == 0 => unsafe { score_vnni_groups::<4>(block, scales, query, act, out) },
        h if h % 2 == 0 => unsafe { score_vnni_groups::<2>(block, scales, query, act, out) },
        _ => unsafe { score_vnni_groups::<1>(block, scales, query, act, out) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn score_vnni_groups<const G: usize>(
    block: &[i8],
    scales: &[f32; BLOCK],
    query: &QuantQuery,
    act: ScoreAct,
    out: &mut [f32; BLOCK],
) {
    use std::arch::x86_64::*;
    let h = query.heads;
    let quads = query.quads.len() / h.max(1);
    assert_eq!(
        block.len(),
        quads * BLOCK * 4,
        "block and query differ in width"
    );
    // SAFETY: each key load reads 64 bytes at (p * BLOCK + c) * 4 with p < quads and
    // c + 16 <= BLOCK, inside the block (asserted above); query reads index quads / sums
    // / wq below h; the out and scales accesses are 16 floats at c + 16 <= BLOCK.
    unsafe {
        let flip = _mm512_set1_epi8(-128);
        let zero = _mm512_setzero_ps();
        for c in (0..BLOCK).step_by(16) {
            let mut total = _mm512_setzero_ps();
            for g0 in (0..h).step_by(G) {
                let mut acc = [_mm512_setzero_si512(); G];
                for p in 0..quads {
                    let k = _mm512_loadu_si512(block.as_ptr().add((p * BLOCK + c) * 4) as *const _);
                    let ku = _mm512_xor_si512(k, flip); // k + 128 as unsigned bytes
                    for (j, a) in acc.iter_mut().enumerate() {
                        let qv =
                            _mm512_set1_epi32(*query.quads.get_unchecked((g0 + j) * quads + p));
                        *a = _mm512_dpbusd_epi32(*a, ku, qv);
                    }
                }
                for (j, a) in acc.iter().enumerate() {
                    let head = g0 + j;
                    let dots = _mm512_sub_epi32(*a, _mm512_set1_epi32(128 * query.sums[head]));
                    let mut f = _mm512_cvtepi32_ps(dots);
                    if act == ScoreAct::Relu {
                        f = _mm512_max_ps(f, zero);
                    }
                    total = _mm512_add_ps(total, _mm512_mul_ps(_mm512_set1_ps(query.wq[head]), f));
                }
            }
            let s = _mm512_loadu_ps(scales.as_ptr().add(c));
            _mm512_storeu_ps(out.as_mut_ptr().add(c), _mm512_mul_ps(total, s));
        }
    }
}

/// Reference: the full (T, S) score matrix of one batch row with plain loops over
/// row-major keys, -inf where a key is not visible (`t` queries at `offset..`).
pub(crate) fn scores_reference(
    q: &[f32],
    w: &[f32],
    offset: usize,
    keys: &Int8Keys,
    shape: IndexShape,
    t: usize,
) -> Vec<f32> {
    let (h, d) = (shape.heads, shape.dim);
    let s = keys.len();
    let rows: Vec<(Vec<i8>, f32)> = (0..s).map(|i| keys.row(i)).collect();
    let mut out = vec![f32::NEG_INFINITY; t * s];
    for ti in 0..t {
        let query = QuantQuery::new(
            &q[ti * h * d..(ti + 1) * h * d],
            &w[ti * h..(ti + 1) * h],
            shape,
            keys.dim4,
        );
        for (si, (key, scale)) in rows.iter().enumerate().take(offset + ti + 1) {
            let mut total = 0.0f32;
            for j in 0..h {
                let qj = &query.q[j * keys.dim4..(j + 1) * keys.dim4];
                let dot: i32 = qj.iter().zip(key).map(|(&a, &b)| a as i32 * b as i32).sum();
                let a = match shape.act {
                    ScoreAct::Relu => (dot as f32).max(0.0),
                    ScoreAct::Identity => dot as f32,
                };
                total += query.wq[j] * a;
            }
            out[ti * s + si] = total * scale;
        }
    }
    out
}
