//! `sparrow bench attention`: one attention layer, dense vs DSA, with identical inputs,
//! at each cached context length — what the sparse-attention claim is about.
//!
//! The layer core as DeepSeek lays it out: H query heads over one shared KV head (MQA),
//! a small lightning indexer (Hi heads x di dims, ReLU-weighted), top-k. Measured per
//! context N (random activations from a fixed seed; the cost does not depend on them):
//! - decode: one new query against N cached positions. Dense = our flash-decoding kernel
//!   (`kernels::decode_attention`), plus candle's matmul path as a second dense baseline;
//!   sparse = index scan + streaming top-k (`kernels::indexer::topk_decode`) + attention
//!   over the k gathered rows (`kernels::sparse_attention`).
//! - prefill: all N queries. Dense = our flash-style kernel (each query scans its prefix
//!   with the decode kernel, no score matrix), plus query-chunked candle GEMMs with the
//!   fused causal softmax as a second baseline; sparse = fused scoring + top-k over all
//!   queries, then sparse attention.
//! - bytes per token of KV cache (MQA, and MHA for comparison) and of the index cache;
//!   achieved GFLOP/s and GB/s next to this machine's read bandwidth, measured in the run.
//!
//! Decode calls start cold: a buffer larger than the last-level cache is read before
//! each timed call, as the rest of a model would between two steps of one layer.

use crate::error::Result;
use crate::kernels::indexer::{self, IndexShape, KeyPrecision, KeyStore, ScoreAct, TopkQueries};
use crate::kernels::kv_rows::KvRows;
use crate::kernels::softmax::CausalSoftmax;
use crate::kernels::sparse_attention::{self, SparseDims};
use crate::kernels::{decode_attention, topk::NONE};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::time::Instant;

/// The layer layout under test.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LayerShape {
    pub heads: usize,
    pub head_dim: usize,
    pub kv_heads: usize,
    pub index_heads: usize,
    pub index_dim: usize,
    pub topk: usize,
    pub index_precision: KeyPrecision,
}

impl Default for LayerShape {
    /// DeepSeek-like: 16 query heads x 64 over one KV head, indexer 4 x 32, k = 512.
    fn default() -> Self {
        Self {
            heads: 16,
            head_dim: 64,
            kv_heads: 1,
            index_heads: 4,
            index_dim: 32,
            topk: 512,
            index_precision: KeyPrecision::F32,
        }
    }
}

impl LayerShape {
    pub fn index_shape(&self) -> IndexShape {
        IndexShape {
            heads: self.index_heads,
            dim: self.index_dim,
            act: ScoreAct::Relu,
        }
    }
    /// KV cache bytes per token (f32).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.kv_heads * self.head_dim * 4
    }
    /// KV cache bytes per token with one KV head per query head (MHA).
    pub fn mha_kv_bytes_per_token(&self) -> usize {
        2 * self.heads * self.head_dim * 4
    }
    /// Index cache bytes per token.
    pub fn index_bytes_per_token(&self) -> usize {
        match self.index_precision {
            KeyPrecision::F32 => 4 * self.index_dim,
            KeyPrecision::Bf16 => 2 * self.index_dim,
            KeyPrecision::Int8 => self.index_dim + 4,
        }
    }
}

fn random_vec(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// One layer's decode state: N cached positions and one new query.
pub struct DecodeState {
    pub shape: LayerShape,
    pub len: usize,
    /// (KV, N, D)
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub index: KeyStore,
    /// (H, D) the new query (RoPE applied)
    pub q: Vec<f32>,
    /// (Hi, di), (Hi)
    pub iq: Vec<f32>,
    pub iw: Vec<f32>,
}

impl DecodeState {
    pub fn random(shape: LayerShape, len: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (kv, d) = (shape.kv_heads, shape.head_dim);
        let k = random_vec(kv * len * d, &mut rng);
        let v = random_vec(kv * len * d, &mut rng);
        let mut index = KeyStore::new(shape.index_dim, shape.index_precision);
        index.reserve(len);
        // Fill in pieces so no second full-size buffer is needed.
        for _ in 0..len.div_ceil(4096) {
            let n = 4096.min(len - index.len());
            index.extend_rows(&random_vec(n * shape.index_dim, &mut rng));
        }
        Self {
            q: random_vec(shape.heads * d, &mut rng),
            iq: random_vec(shape.index_heads * shape.index_dim, &mut rng),
            iw: random_vec(shape.index_heads, &mut rng)
                .into_iter()
                .map(|w| w.abs())
                .collect(),
            shape,
            len,
            k,
            v,
            index,
        }
    }

    /// Bytes of KV + index cache held.
    pub fn cache_bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * 4 + self.index.bytes()
    }

    fn scale(&self) -> f32 {
        1.0 / (self.shape.head_dim as f32).sqrt()
    }

    /// Dense decode with our flash-decoding kernel: (H, D).
    pub fn dense(&self) -> Vec<f32> {
        let s = &self.shape;
        let rows = KvRows::separate(&self.k, &self.v, s.kv_heads, s.head_dim);
        decode_attention::decode(&self.q, rows, self.len, self.scale())
    }

    /// Dense decode through candle ops (matmul, softmax, matmul).
    pub fn dense_candle(&self) -> Result<Vec<f32>> {
        let s = &self.shape;
        let rows = KvRows::separate(&self.k, &self.v, s.kv_heads, s.head_dim);
        Ok(decode_attention::reference(
            &self.q,
            rows,
            self.len,
            self.scale(),
        )?)
    }

    /// The selection: scan the index cache once, top-k.
    pub fn select(&self) -> Vec<u32> {
        indexer::topk_decode(
            &self.iq,
            &self.iw,
            &self.index,
            self.shape.index_shape(),
            self.shape.topk,
        )
    }

    /// Attention over a selection: (H, D).
    pub fn attend(&self, idx: &[u32]) -> Result<Vec<f32>> {
        let s = &self.shape;
        let dims = SparseDims {
            b: 1,
            t: 1,
            h: s.heads,
            kv: s.kv_heads,
            s: self.len,
            d: s.head_dim,
            k: s.topk,
        };
        Ok(sparse_attention::forward_f32(
            dims,
            self.scale() as f64,
            &self.q,
            &self.k,
            &self.v,
            idx,
        )?)
    }

    /// Sparse decode: select, then attend.
    pub fn sparse(&self) -> Result<Vec<f32>> {
        let idx = self.select();
        self.attend(&idx)
    }
}

/// Bytes streamed between timed calls to push the caches under test out of the CPU's
/// last-level cache (32 MiB on the development machine): in a real model the other
/// layers' caches and weights do that between two decode steps of one layer.
const EVICT_BYTES: usize = 96 << 20;

/// Median seconds of `f` over `reps` calls after one warm-up call; before each call a
/// buffer larger than the last-level cache is read (untimed), so every call starts cold.
fn median_secs_cold(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    thread_local! {
        static EVICT: Vec<f32> = vec![1.0; EVICT_BYTES / 4];
    }
    // Read on the thread pool, so its workers are awake when the timed call starts (as
    // they are mid-model), not parked after an idle spell.
    let evict = || {
        use rayon::prelude::*;
        EVICT.with(|buf| {
            let s: f32 = buf.par_chunks(1 << 16).map(super::sum_fast).sum();
            std::hint::black_box(s)
        })
    };
    f()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        evict();
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// Decode measurements at one context length.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeRow {
    pub bench: &'static str,
    pub context: usize,
    pub dense_ms: f64,
    pub dense_candle_ms: f64,
    pub sparse_ms: f64,
    pub select_ms: f64,
    pub attend_ms: f64,
    /// dense_ms / sparse_ms
    pub speedup: f64,
    pub dense_gflops: f64,
    pub dense_gbps: f64,
    pub index_scan_gbps: f64,
    /// index_scan_gbps / machine read bandwidth
    pub index_scan_bw_share: f64,
    pub kv_bytes_per_token: usize,
    pub mha_kv_bytes_per_token: usize,
    pub index_bytes_per_token: usize,
    /// Max |sparse - dense| / max |dense| of the outputs (sanity, not a target).
    pub outputs_rel_diff: f64,
}

/// Decode benchmark at `context` cached positions.
pub fn decode_row(shape: LayerShape, context: usize, machine_gbps: f64) -> Result<DecodeRow> {
    let st = DecodeState::random(shape, context, 7);
    let reps = (200_000 / context.max(1)).clamp(9, 201);
    let dense_s = median_secs_cold(reps, || {
        std::hint::black_box(st.dense());
        Ok(())
    })?;
    let candle_s = median_secs_cold(reps.min(31), || {
        std::hint::black_box(st.dense_candle()?);
        Ok(())
    })?;
    // The sparse path is cheap: more repetitions for a stable median.
    let sparse_reps = reps.max(101);
    let sparse_s = median_secs_cold(sparse_reps, || {
        std::hint::black_box(st.sparse()?);
        Ok(())
    })?;
    let select_s = median_secs_cold(sparse_reps, || {
        std::hint::black_box(st.select());
        Ok(())
    })?;
    let idx = st.select();
    let attend_s = median_secs_cold(sparse_reps, || {
        std::hint::black_box(st.attend(&idx)?);
        Ok(())
    })?;
    let dense = st.dense();
    let sparse = st.attend(&idx)?;
    let norm = dense.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
    let diff = dense
        .iter()
        .zip(&sparse)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    let (h, d) = (shape.heads, shape.head_dim);
    let flops = 4.0 * (context * h * d) as f64;
    let kv_bytes = (context * shape.kv_bytes_per_token()) as f64;
    let index_bytes = (context * shape.index_bytes_per_token()) as f64;
    let index_gbps = index_bytes / select_s / 1e9;
    Ok(DecodeRow {
        bench: "attention_decode",
        context,
        dense_ms: dense_s * 1e3,
        dense_candle_ms: candle_s * 1e3,
        sparse_ms: sparse_s * 1e3,
        select_ms: select_s * 1e3,
        attend_ms: attend_s * 1e3,
        speedup: dense_s / sparse_s,
        dense_gflops: flops / dense_s / 1e9,
        dense_gbps: kv_bytes / dense_s / 1e9,
        index_scan_gbps: index_gbps,
        index_scan_bw_share: index_gbps / machine_gbps,
        kv_bytes_per_token: shape.kv_bytes_per_token(),
        mha_kv_bytes_per_token: shape.mha_kv_bytes_per_token(),
        index_bytes_per_token: shape.index_bytes_per_token(),
        outputs_rel_diff: (diff / norm) as f64,
    })
}

/// Prefill inputs of one layer: N tokens.
struct PrefillState {
    shape: LayerShape,
    n: usize,
    /// (N, H, D)
    q: Vec<f32>,
    /// (KV, N, D)
    k: Vec<f32>,
    v: Vec<f32>,
    iq: Vec<f32>,
    iw: Vec<f32>,
    index: KeyStore,
}

impl PrefillState {
    fn random(shape: LayerShape, n: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (h, kv, d) = (shape.heads, shape.kv_heads, shape.head_dim);
        let mut index = KeyStore::new(shape.index_dim, shape.index_precision);
        index.extend_rows(&random_vec(n * shape.index_dim, &mut rng));
        Self {
            shape,
            n,
            q: random_vec(n * h * d, &mut rng),
            k: random_vec(kv * n * d, &mut rng),
            v: random_vec(kv * n * d, &mut rng),
            iq: random_vec(n * shape.index_heads * shape.index_dim, &mut rng),
            iw: random_vec(n * shape.index_heads, &mut rng)
                .into_iter()
                .map(|w| w.abs())
                .collect(),
            index,
        }
    }

    /// Sparse prefill: (selection seconds, attention seconds).
    fn sparse(&self) -> Result<(f64, f64)> {
        let s = &self.shape;
        let t0 = Instant::now();
        let rows = [TopkQueries {
            q: &self.iq,
            w: &self.iw,
            offset: 0,
        }];
        let idx = indexer::topk_prefill(&rows, &[&self.index], s.index_shape(), self.n, s.topk);
        let sel = t0.elapsed().as_secs_f64();
        debug_assert!(idx.iter().all(|&i| i == NONE || (i as usize) < self.n));
        let t1 = Instant::now();
        let dims = SparseDims {
            b: 1,
            t: self.n,
            h: s.heads,
            kv: s.kv_heads,
            s: self.n,
            d: s.head_dim,
            k: s.topk,
        };
        let out = sparse_attention::forward_f32(
            dims,
            1.0 / (s.head_dim as f64).sqrt(),
            &self.q,
            &self.k,
            &self.v,
            &idx,
        )?;
        std::hint::black_box(out);
        Ok((sel, t1.elapsed().as_secs_f64()))
    }

    /// Dense prefill with our flash-style kernel (`decode_attention::prefill`): seconds.
    fn dense(&self) -> f64 {
        let s = &self.shape;
        let t0 = Instant::now();
        let out = decode_attention::prefill(
            &self.q,
            &self.k,
            &self.v,
            s.kv_heads,
            s.head_dim,
            1.0 / (s.head_dim as f32).sqrt(),
        );
        std::hint::black_box(out);
        t0.elapsed().as_secs_f64()
    }

    /// Dense prefill with candle GEMMs over query chunks: seconds.
    fn dense_gemm(&self) -> Result<f64> {
        let s = &self.shape;
        let (h, kv, d, n) = (s.heads, s.kv_heads, s.head_dim, self.n);
        let g = h / kv;
        let dev = Device::Cpu;
        let q = Tensor::from_slice(&self.q, (n, kv, g, d), &dev)?
            .permute((1, 2, 0, 3))?
            .contiguous()?; // (KV, G, N, D)
        let k = Tensor::from_slice(&self.k, (kv, n, d), &dev)?;
        let v = Tensor::from_slice(&self.v, (kv, n, d), &dev)?;
        // Query chunk: keep the (KV, G*chunk, S) score block near 256 MiB.
        let chunk = ((64usize << 20) / (h * n).max(1)).clamp(16, 1024);
        let t0 = Instant::now();
        let mut start = 0;
        while start < n {
            let tq = chunk.min(n - start);
            let visible = start + tq;
            let qc = q.narrow(2, start, tq)?.reshape((kv, g * tq, d))?; // rows (g, t)
            let kc = k.narrow(1, 0, visible)?;
            let vc = v.narrow(1, 0, visible)?;
            let scores = qc.matmul(&kc.t()?)?; // (KV, G*tq, visible)
            let p = CausalSoftmax {
                scale: 1.0 / (d as f64).sqrt(),
                queries: tq,
                offset: start,
            }
            .apply(&scores)?;
            std::hint::black_box(p.matmul(&vc)?);
            start += tq;
        }
        Ok(t0.elapsed().as_secs_f64())
    }
}

/// Prefill measurements at one context length.
#[derive(Debug, Clone, Serialize)]
pub struct PrefillRow {
    pub bench: &'static str,
    pub context: usize,
    /// Our flash-style dense kernel; None when above the dense limit.
    pub dense_s: Option<f64>,
    /// Query-chunked candle GEMM + fused causal softmax; None above its limit.
    pub dense_gemm_s: Option<f64>,
    pub sparse_s: f64,
    pub sparse_select_s: f64,
    pub sparse_attend_s: f64,
    pub speedup: Option<f64>,
    /// Useful (causal) attention FLOP/s of the dense prefill, 4 H D N(N+1)/2 / time.
    pub dense_gflops: Option<f64>,
}

pub fn prefill_row(
    shape: LayerShape,
    context: usize,
    run_dense: bool,
    run_gemm: bool,
) -> Result<PrefillRow> {
    let st = PrefillState::random(shape, context, 11);
    let dense_s = run_dense.then(|| st.dense());
    let dense_gemm_s = if run_gemm {
        Some(st.dense_gemm()?)
    } else {
        None
    };
    let (sel, att) = st.sparse()?;
    let sparse_s = sel + att;
    Ok(PrefillRow {
        bench: "attention_prefill",
        context,
        dense_s,
        dense_gemm_s,
        sparse_s,
        sparse_select_s: sel,
        sparse_attend_s: att,
        speedup: dense_s.map(|d| d / sparse_s),
        dense_gflops: dense_s.map(|d| {
            let n = context as f64;
            4.0 * (shape.heads * shape.head_dim) as f64 * n * (n + 1.0) / 2.0 / d / 1e9
        }),
    })
}

/// Least-squares slope of log(time) over log(context): the growth exponent.
pub fn growth_exponent(points: &[(usize, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let xs: Vec<f64> = points.iter().map(|p| (p.0 as f64).ln()).collect();
    let ys: Vec<f64> = points.iter().map(|p| p.1.ln()).collect();
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    Some(sxy / sxx)
}
