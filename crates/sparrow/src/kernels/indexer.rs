//! Indexer scoring fused with a streaming per-query top-k (DESIGN.md §4, kernel rule):
//! the [queries x keys] score matrix is never materialised.
//!
//! Score of query t against key s, for `heads` index heads of `dim` dimensions:
//! `I(t, s) = sum_j w(t, j) * act(q(t, j) . k(s))`, with `act` = ReLU for the `lightning`
//! indexer (DeepSeek-V3.2) and the identity for the `mlp_gate` indexer (one head).
//! A query at position p sees keys 0..=p (causal).
//!
//! Keys live in [`BlockedKeys`]: blocks of [`BLOCK`] tokens stored dimension-major
//! (dim, BLOCK), so scoring one block is `heads * dim` broadcast-multiply-adds over
//! BLOCK lanes that stay in registers, with no transpose at scan time. The decode index
//! cache keeps this layout and appends in place. Keys may be stored in f32 or bf16 (the
//! scan widens them on the fly), or in int8 with one absmax scale per token, in which
//! case the queries are rounded to int8 too and scored by integer dot products
//! ([`super::index_int8`]); [`KeyStore`] holds any of them.
//!
//! [`topk_prefill`] parallelises over (batch, query block) and reuses each key block
//! across the queries of a block; [`topk_decode`] splits the key range of one query over
//! the threads and merges the per-thread selections (the tie-break makes that exact).
//! [`scores_reference`] + [`super::topk::topk_by_sort`] are the plain reference.

use super::index_int8::{Int8Keys, QuantQuery};
pub use super::index_shape::{IndexShape, ScoreAct, BLOCK};
use super::simd::{has_avx2_fma, has_avx512};
use super::topk::{StreamTopK, NONE};
use half::bf16;

/// Which build of the scoring loop this CPU runs (detected once per scan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Simd {
    Avx512,
    Avx2Fma,
    Portable,
}

impl Simd {
    fn detect() -> Self {
        if has_avx512() {
            Simd::Avx512
        } else if has_avx2_fma() {
            Simd::Avx2Fma
        } else {
            Simd::Portable
        }
    }
}

/// Queries scored together against each key block in prefill.
const QUERY_BLOCK: usize = 8;

/// Floating-point element types the blocked index keys may be stored in.
pub trait KeyElem: Copy + Send + Sync + Default + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}
impl KeyElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}
impl KeyElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Index keys of one sequence in the blocked, dimension-major layout.
#[derive(Debug, Clone)]
pub struct BlockedKeys<E: KeyElem> {
    dim: usize,
    len: usize,
    /// (n_blocks, dim, BLOCK); positions past `len` are zero.
    data: Vec<E>,
}

impl<E: KeyElem> BlockedKeys<E> {
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            len: 0,
            data: Vec::new(),
        }
    }

    /// From row-major keys (S, dim).
    pub fn from_rows(rows: &[f32], dim: usize) -> Self {
        let mut k = Self::new(dim);
        k.extend_rows(rows);
        k
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Bytes held (including the unused tail of the last block).
    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<E>()
    }

    /// Reserve room for `n` more tokens.
    pub fn reserve(&mut self, n: usize) {
        let blocks = (self.len + n).div_ceil(BLOCK);
        self.data
            .reserve((blocks * BLOCK * self.dim).saturating_sub(self.data.len()));
    }

    /// Keep the first `len` keys (no-op if there are fewer); the dropped positions of
    /// the last kept block are zeroed, as unwritten ones are.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let (d, blocks) = (self.dim, len.div_ceil(BLOCK));
        self.data.truncate(blocks * d * BLOCK);
        if blocks > 0 {
            let block = &mut self.data[(blocks - 1) * d * BLOCK..];
            for i in len - (blocks - 1) * BLOCK..BLOCK {
                for j in 0..d {
                    block[j * BLOCK + i] = E::default();
                }
            }
        }
        self.len = len;
    }

    /// Append row-major keys (n, dim).
    pub fn extend_rows(&mut self, rows: &[f32]) {
        let d = self.dim;
        for row in rows.chunks_exact(d) {
            if self.len.is_multiple_of(BLOCK) {
                self.data.resize(self.data.len() + d * BLOCK, E::default());
            }
            let (b, i) = (self.len / BLOCK, self.len % BLOCK);
            let block = &mut self.data[b * d * BLOCK..(b + 1) * d * BLOCK];
            for (j, &x) in row.iter().enumerate() {
                block[j * BLOCK + i] = E::from_f32(x);
            }
            self.len += 1;
        }
    }

    /// Key `s` as stored, converted to f32.
    pub fn row(&self, s: usize) -> Vec<f32> {
        let d = self.dim;
        let (b, i) = (s / BLOCK, s % BLOCK);
        (0..d)
            .map(|j| self.data[b * d * BLOCK + j * BLOCK + i].to_f32())
            .collect()
    }

    fn block(&self, b: usize) -> &[E] {
        &self.data[b * self.dim * BLOCK..(b + 1) * self.dim * BLOCK]
    }
}

/// Storage precision of index keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyPrecision {
    F32,
    Bf16,
    /// Symmetric int8 with one f32 absmax scale per token; queries rounded to int8
    /// per head, integer dot products ([`super::index_int8`]).
    Int8,
}

/// Index keys in the precision the index cache keeps.
#[derive(Debug, Clone)]
pub enum KeyStore {
    F32(BlockedKeys<f32>),
    Bf16(BlockedKeys<bf16>),
    Int8(Int8Keys),
}

macro_rules! each_store {
    ($self:expr, $k:ident => $e:expr) => {
        match $self {
            KeyStore::F32($k) => $e,
            KeyStore::Bf16($k) => $e,
            KeyStore::Int8($k) => $e,
        }
    };
}

impl KeyStore {
    pub fn new(dim: usize, precision: KeyPrecision) -> Self {
        match precision {
            KeyPrecision::F32 => KeyStore::F32(BlockedKeys::new(dim)),
            KeyPrecision::Bf16 => KeyStore::Bf16(BlockedKeys::new(dim)),
            KeyPrecision::Int8 => KeyStore::Int8(Int8Keys::new(dim)),
        }
    }
    pub fn len(&self) -> usize {
        each_store!(self, k => k.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Keep the first `len` keys.
    pub fn truncate(&mut self, len: usize) {
        each_store!(self, k => k.truncate(len))
    }
    /// Bytes held (keys and, for int8, scales).
    pub fn bytes(&self) -> usize {
        each_store!(self, k => k.bytes())
    }
    /// Bytes per token of a store of `precision` with `dim`-wide keys.
    pub fn bytes_per_token(dim: usize, precision: KeyPrecision) -> usize {
        match precision {
            KeyPrecision::F32 => dim * 4,
            KeyPrecision::Bf16 => dim * 2,
            KeyPrecision::Int8 => Int8Keys::bytes_per_token(dim),
        }
    }
    pub fn reserve(&mut self, n: usize) {
        each_store!(self, k => k.reserve(n))
    }
    pub fn extend_rows(&mut self, rows: &[f32]) {
        each_store!(self, k => k.extend_rows(rows))
    }
}

/// A key store the scans read: a query is prepared once (borrowed as it is for float
/// keys, rounded to int8 for int8 keys), then scored block by block.
trait ScanKeys: Sync {
    type Query<'q>;
    fn prepare<'q>(&self, q: &'q [f32], w: &'q [f32], shape: IndexShape) -> Self::Query<'q>;
    fn score(
        &self,
        simd: Simd,
        b: usize,
        query: &Self::Query<'_>,
        shape: IndexShape,
        out: &mut [f32; BLOCK],
    );
    fn len(&self) -> usize;
    /// Blocks allocated (prefetches stay below).
    fn n_blocks(&self) -> usize;
    /// Hint the CPU to start loading block `b`.
    fn prefetch(&self, b: usize);
}

impl<E: KeyElem> ScanKeys for BlockedKeys<E> {
    type Query<'q> = (&'q [f32], &'q [f32]);
    fn prepare<'q>(&self, q: &'q [f32], w: &'q [f32], _: IndexShape) -> Self::Query<'q> {
        (q, w)
    }
    #[inline(always)]
    fn score(
        &self,
        simd: Simd,
        b: usize,
        &(q, w): &Self::Query<'_>,
        shape: IndexShape,
        out: &mut [f32; BLOCK],
    ) {
        score_block(simd, q, w, self.block(b), shape, out);
    }
    fn len(&self) -> usize {
        self.len
    }
    fn n_blocks(&self) -> usize {
        self.data.len() / (self.dim * BLOCK).max(1)
    }
    fn prefetch(&self, b: usize) {
        prefetch(self.block(b));
    }
}

impl ScanKeys for Int8Keys {
    type Query<'q> = QuantQuery;
    fn prepare<'q>(&self, q: &'q [f32], w: &'q [f32], shape: IndexShape) -> QuantQuery {
        Int8Keys::prepare(self, q, w, shape)
    }
    #[inline(always)]
    fn score(
        &self,
        _: Simd,
        b: usize,
        query: &QuantQuery,
        shape: IndexShape,
        out: &mut [f32; BLOCK],
    ) {
        Int8Keys::score(self, b, query, shape.act, out);
    }
    fn len(&self) -> usize {
        self.len()
    }
    fn n_blocks(&self) -> usize {
        Int8Keys::n_blocks(self)
    }
    fn prefetch(&self, b: usize) {
        prefetch(self.block(b));
    }
}

/// Scores of one query (heads x dim values in `q`, head weights `w`) against one key
/// block: `out[i] = sum_j w[j] * act(q_j . k_i)` for the BLOCK keys of the block.
#[inline(always)]
fn score_block_generic<E: KeyElem>(
    q: &[f32],
    w: &[f32],
    block: &[E],
    shape: IndexShape,
    out: &mut [f32; BLOCK],
) {
    let d = shape.dim;
    *out = [0.0; BLOCK];
    for (j, &wj) in w.iter().enumerate().take(shape.heads) {
        let qj = &q[j * d..(j + 1) * d];
        let mut acc = [0.0f32; BLOCK];
        for (i, &qv) in qj.iter().enumerate() {
            let kr = &block[i * BLOCK..(i + 1) * BLOCK];
            for (a, &kv) in acc.iter_mut().zip(kr) {
                *a = qv.mul_add(kv.to_f32(), *a);
            }
        }
        add_head(out, &acc, wj, shape.act);
    }
}

/// `out += wj * act(acc)`, one head's share of the block's (or a chunk's) scores.
#[inline(always)]
fn add_head(out: &mut [f32], acc: &[f32], wj: f32, act: ScoreAct) {
    match act {
        ScoreAct::Relu => {
            for (o, &a) in out.iter_mut().zip(acc) {
                *o += wj * a.max(0.0);
            }
        }
        ScoreAct::Identity => {
            for (o, &a) in out.iter_mut().zip(acc) {
                *o += wj * a;
            }
        }
    }
}

/// [`score_block_generic`] with the loops swapped and the head count fixed at compile
/// time: heads in groups of G and keys in chunks of W, G x W = 256 accumulators (16
/// AVX-512 registers) (one group of up to 4 heads over the whole block; DeepSeek-V3.2
/// scores with 64 heads: groups of 16 over 16-key chunks), so each key chunk is loaded
/// and converted once per group instead of once per head (the generic loop converted a
/// block 16 times for 16 heads and ran a 65536-key scan at ~23 GMAC/s).
/// Per (head, key) the sum runs over dimensions in the same order, and each key's score
/// takes the heads in order (groups in order, heads in order within one): the scores
/// are bit-identical to the generic loop.
#[inline(always)]
fn score_block_grouped<const G: usize, const W: usize, E: KeyElem>(
    q: &[f32],
    w: &[f32],
    block: &[E],
    shape: IndexShape,
    out: &mut [f32; BLOCK],
) {
    let (d, h) = (shape.dim, shape.heads);
    debug_assert!(h.is_multiple_of(G) && BLOCK.is_multiple_of(W));
    *out = [0.0; BLOCK];
    for g0 in (0..h).step_by(G) {
        for c in (0..BLOCK).step_by(W) {
            let mut acc = [[0.0f32; W]; G];
            for i in 0..d {
                let kr = &block[i * BLOCK + c..i * BLOCK + c + W];
                let mut row = [0.0f32; W];
                for (r, &x) in row.iter_mut().zip(kr) {
                    *r = x.to_f32();
                }
                for (j, a) in acc.iter_mut().enumerate() {
                    let qv = q[(g0 + j) * d + i];
                    for (x, &r) in a.iter_mut().zip(&row) {
                        *x = qv.mul_add(r, *x);
                    }
                }
            }
            for (a, &wj) in acc.iter().zip(&w[g0..g0 + G]) {
                add_head(&mut out[c..c + W], a, wj, shape.act);
            }
        }
    }
}

/// Heads fixed at compile time where the count is common, the generic loop otherwise.
#[inline(always)]
fn score_block_dispatch<E: KeyElem>(
    q: &[f32],
    w: &[f32],
    block: &[E],
    shape: IndexShape,
    out: &mut [f32; BLOCK],
) {
    match shape.heads {
        1 => score_block_grouped::<1, BLOCK, E>(q, w, block, shape, out),
        2 => score_block_grouped::<2, BLOCK, E>(q, w, block, shape, out),
        4 => score_block_grouped::<4, BLOCK, E>(q, w, block, shape, out),
        h if h % 16 == 0 => score_block_grouped::<16, 16, E>(q, w, block, shape, out),
        h if h % 8 == 0 => score_block_grouped::<8, 32, E>(q, w, block, shape, out),
        _ => score_block_generic(q, w, block, shape, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn score_block_avx512<E: KeyElem>(
    q: &[f32],
    w: &[f32],
    block: &[E],
    shape: IndexShape,
    out: &mut [f32; BLOCK],
) {
    score_block_dispatch(q, w, block, shape, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn score_block_avx2<E: KeyElem>(
    q: &[f32],
    w: &[f32],
    block: &[E],
    shape: IndexShape,
    out: &mut [f32; BLOCK],
) {
    score_block_dispatch(q, w, block, shape, out)
}

/// One query against one key block. The dot products use fused multiply-add in every
/// build (AVX-512, AVX2+FMA, or the portable one, where `mul_add` is exact in
/// software), so scores, and with them the selection, are bit-identical across builds
/// and equal to [`scores_reference`].
#[inline]
fn score_block<E: KeyElem>(
    simd: Simd,
    q: &[f32],
    w: &[f32],
    block: &[E],
    shape: IndexShape,
    out: &mut [f32; BLOCK],
) {
    #[cfg(target_arch = "x86_64")]
    match simd {
        Simd::Avx512 => {
            // SAFETY: `Simd::Avx512` comes from `has_avx512()`, the run-time check that
            // this CPU executes AVX-512F (every AVX-512 CPU has FMA); the function only
            // reads and writes the given slices.
            unsafe { score_block_avx512(q, w, block, shape, out) };
            return;
        }
        Simd::Avx2Fma => {
            // SAFETY: `Simd::Avx2Fma` comes from the run-time AVX2 + FMA check.
            unsafe { score_block_avx2(q, w, block, shape, out) };
            return;
        }
        Simd::Portable => {}
    }
    let _ = simd;
    score_block_dispatch(q, w, block, shape, out)
}

/// Offer the scores of block `b` (positions `b*BLOCK..`) to `top`, for a query that
/// sees positions `< visible`.
#[inline(always)]
fn push_block(top: &mut StreamTopK, scores: &[f32; BLOCK], b: usize, visible: usize) {
    let start = b * BLOCK;
    let n = visible.saturating_sub(start).min(BLOCK);
    let thr = top.threshold();
    for (i, &s) in scores[..n].iter().enumerate() {
        // Cheap pre-filter (NaN passes, as -inf); `push` applies the exact rule.
        if s >= thr || s.is_nan() {
            top.push(s, (start + i) as u32);
        }
    }
}

/// Arguments of one batch row of a top-k selection.
pub struct TopkQueries<'a> {
    /// (T, heads, dim) index queries.
    pub q: &'a [f32],
    /// (T, heads) head weights.
    pub w: &'a [f32],
    /// Position of query 0 (keys before it are cached context).
    pub offset: usize,
}

fn topk_rows<K: ScanKeys>(
    queries: &TopkQueries,
    keys: &K,
    shape: IndexShape,
    k: usize,
    t0: usize,
    out: &mut [u32],
) {
    let (h, d) = (shape.heads, shape.dim);
    let tq = out.len() / k.max(1);
    let simd = Simd::detect();
    let mut tops: Vec<StreamTopK> = (0..tq).map(|_| StreamTopK::new(k)).collect();
    let prepared: Vec<K::Query<'_>> = (t0..t0 + tq)
        .map(|t| {
            let q = &queries.q[t * h * d..(t + 1) * h * d];
            keys.prepare(q, &queries.w[t * h..(t + 1) * h], shape)
        })
        .collect();
    let last_visible = (queries.offset + t0 + tq).min(keys.len());
    let n_blocks = last_visible.div_ceil(BLOCK);
    let mut scores = [0.0f32; BLOCK];
    for b in 0..n_blocks {
        for (i, top) in tops.iter_mut().enumerate() {
            let t = t0 + i;
            let visible = (queries.offset + t + 1).min(keys.len());
            if b * BLOCK >= visible {
                continue;
            }
            keys.score(simd, b, &prepared[i], shape, &mut scores);
            push_block(top, &scores, b, visible);
        }
    }
    for (top, row) in tops.iter_mut().zip(out.chunks_mut(k.max(1))) {
        top.finish_into(row);
    }
}

fn check_sizes(q: &TopkQueries, keys_len: usize, shape: IndexShape, t: usize) {
    assert_eq!(q.q.len(), t * shape.heads * shape.dim, "index queries");
    assert_eq!(q.w.len(), t * shape.heads, "index weights");
    assert!(q.offset + t <= keys_len, "queries beyond the keys");
}

/// Top-k positions for every query of every batch row: (B, T, k) with [`NONE`] padding,
/// each row in increasing position order. `rows[b]` holds row b's T queries; `keys[b]`
/// its keys (at least offset + T of them).
pub fn topk_prefill(
    rows: &[TopkQueries],
    keys: &[&KeyStore],
    shape: IndexShape,
    t: usize,
    k: usize,
) -> Vec<u32> {
    assert_eq!(rows.len(), keys.len());
    for (q, ks) in rows.iter().zip(keys) {
        check_sizes(q, ks.len(), shape, t);
    }
    let mut out = vec![NONE; rows.len() * t * k];
    if k == 0 || t == 0 {
        return out;
    }
    // Later query blocks see more keys; hand them out first for balance.
    let mut tasks: Vec<(usize, usize, &mut [u32])> = Vec::new();
    for (b, row_out) in out.chunks_mut(t * k).enumerate() {
        for (qb, chunk) in row_out.chunks_mut(QUERY_BLOCK * k).enumerate() {
            tasks.push((b, qb, chunk));
        }
    }
    tasks.reverse();
    super::pool::for_each_mut(&mut tasks, |_, (b, qb, chunk)| {
        let (b, t0) = (*b, *qb * QUERY_BLOCK);
        match keys[b] {
            KeyStore::F32(ks) => topk_rows(&rows[b], ks, shape, k, t0, chunk),
            KeyStore::Bf16(ks) => topk_rows(&rows[b], ks, shape, k, t0, chunk),
            KeyStore::Int8(ks) => topk_rows(&rows[b], ks, shape, k, t0, chunk),
        }
    });
    out
}

fn decode_range<K: ScanKeys>(
    q: &[f32],
    w: &[f32],
    keys: &K,
    shape: IndexShape,
    blocks: std::ops::Range<usize>,
    visible: usize,
    k: usize,
) -> StreamTopK {
    let simd = Simd::detect();
    let mut top = StreamTopK::new(k);
    let mut scores = [0.0f32; BLOCK];
    let n_blocks = keys.n_blocks();
    let query = keys.prepare(q, w, shape);
    for b in blocks {
        if b + PREFETCH_BLOCKS < n_blocks {
            keys.prefetch(b + PREFETCH_BLOCKS);
        }
        keys.score(simd, b, &query, shape, &mut scores);
        push_block(&mut top, &scores, b, visible);
    }
    top
}

/// How far ahead of the decode scan key blocks are prefetched.
const PREFETCH_BLOCKS: usize = 8;

/// Hint the CPU to start loading a key block (ahead of the scan), so the
/// decode scan streams at memory bandwidth instead of waiting on each block.
#[inline(always)]
fn prefetch<E>(block: &[E]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(block);
        let base = block.as_ptr() as *const i8;
        for off in (0..bytes).step_by(64) {
            // SAFETY: `off < bytes`, so the address lies inside `block`; a prefetch only
            // hints the cache and has no architectural effect.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(base.add(off))
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = block;
}

/// Top-k for one decode query (the last cached position, `keys.len() - 1`, included),
/// scanning the index cache once, split over the available threads: (k) positions in
/// increasing order with [`NONE`] padding.
pub fn topk_decode(q: &[f32], w: &[f32], keys: &KeyStore, shape: IndexShape, k: usize) -> Vec<u32> {
    assert_eq!(q.len(), shape.heads * shape.dim, "index query");
    assert_eq!(w.len(), shape.heads, "index weights");
    let visible = keys.len();
    let n_blocks = visible.div_ceil(BLOCK);
    // One part per thread: each part's top-k costs O(k log(n/k)) pushes and a few
    // O(k) cuts, so fewer, longer parts amortise it best.
    let parts = super::thread_parts(n_blocks, 16);
    let tops: Vec<StreamTopK> = super::pool::map(parts.len(), |i| {
        let r = parts[i].clone();
        match keys {
            KeyStore::F32(ks) => decode_range(q, w, ks, shape, r, visible, k),
            KeyStore::Bf16(ks) => decode_range(q, w, ks, shape, r, visible, k),
            KeyStore::Int8(ks) => decode_range(q, w, ks, shape, r, visible, k),
        }
    });
    let mut all = StreamTopK::new(k);
    for t in &tops {
        all.merge(t);
    }
    let mut out = vec![NONE; k];
    all.finish_into(&mut out);
    out
}

/// Reference: the full (T, S) score matrix of one batch row with plain loops over
/// row-major keys, -inf where a key is not visible.
pub fn scores_reference(q: &TopkQueries, keys: &KeyStore, shape: IndexShape, t: usize) -> Vec<f32> {
    match keys {
        KeyStore::F32(k) => float_scores_reference(q, k, shape, t),
        KeyStore::Bf16(k) => float_scores_reference(q, k, shape, t),
        KeyStore::Int8(k) => super::index_int8::scores_reference(q.q, q.w, q.offset, k, shape, t),
    }
}

/// [`scores_reference`] for float keys.
fn float_scores_reference<E: KeyElem>(
    q: &TopkQueries,
    keys: &BlockedKeys<E>,
    shape: IndexShape,
    t: usize,
) -> Vec<f32> {
    let (h, d) = (shape.heads, shape.dim);
    let s = keys.len();
    let rows: Vec<Vec<f32>> = (0..s).map(|i| keys.row(i)).collect();
    let mut out = vec![f32::NEG_INFINITY; t * s];
    for ti in 0..t {
        for (si, key) in rows.iter().enumerate().take(q.offset + ti + 1) {
            let mut total = 0.0f32;
            for j in 0..h {
                let qj = &q.q[(ti * h + j) * d..(ti * h + j + 1) * d];
                let dot: f32 = qj.iter().zip(key).fold(0.0, |a, (x, y)| x.mul_add(*y, a));
                let a = match shape.act {
                    ScoreAct::Relu => dot.max(0.0),
                    ScoreAct::Identity => dot,
                };
                total += q.w[ti * h + j] * a;
            }
            out[ti * s + si] = total;
        }
    }
    out
}
