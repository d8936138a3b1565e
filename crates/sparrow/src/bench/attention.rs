//! `sparrow bench attention`: one attention layer, dense vs DSA, with identical inputs,
//! at each cached context length — what the sparse-attention claim is about.
//!
//! The layer is the model's own (`model::attention::Attention`, built from a one-layer
//! config: H query heads over KV shared heads, a lightning indexer of Hi heads x di
//! dims, top-k), run through its engine step (`Attention::step`, what `generate` and
//! the server run) with the dense selector (every position) and the indexer's. Per
//! context N (random weights and cache rows from a fixed seed; the cost does not
//! depend on them):
//! - decode: one new token against N cached positions, the whole layer (projections,
//!   indexer, cache write, attention), dense vs sparse; and its attention core alone,
//!   through the same kernels the step calls on the same cache: flash-decoding
//!   (`kernels::decode_attention`), candle's matmul path as a second dense baseline,
//!   and the sparse side split into index scan + streaming top-k
//!   (`kernels::indexer::topk_decode`) and attention over the k gathered rows
//!   (`kernels::sparse_attention`).
//! - prefill: N tokens through the layer's step in chunks of `PREFILL_CHUNK` (as the
//!   engine prefills), dense vs sparse selector, plus query-chunked candle GEMMs with
//!   the fused causal softmax as an outside baseline of the dense attention.
//! - bytes per token of KV cache (MQA, and MHA for comparison) and of the index cache;
//!   achieved GFLOP/s and GB/s next to this machine's read bandwidth, measured in the run.
//!
//! Decode calls start cold: a buffer larger than the last-level cache is read before
//! each timed call, as the rest of a model would between two steps of one layer.

use crate::config::{KvCacheDtype, ModelConfig};
use crate::error::{Error, Result};
use crate::kernels::decode_attention;
use crate::kernels::indexer::{self, IndexShape, KeyPrecision, KeyStore, ScoreAct};
use crate::kernels::kv_rows::KvRows;
use crate::kernels::softmax::CausalSoftmax;
use crate::kernels::sparse_attention;
use crate::model::attention::Attention;
use crate::model::block::SelfAttn;
use crate::model::cache::{CacheRows, SeqCache};
use crate::model::step::{Segment, StepOptions};
use crate::model::Model;
use candle_core::{DType, Device, Tensor};
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
    /// Precision of the key / value cache.
    pub kv_dtype: KvCacheDtype,
    /// Whether the layer has the indexer (a `dsa` layer, stepped with the dense or the
    /// sparse selector) or is a plain `dense` layer (no index keys written or held).
    pub indexed: bool,
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
            kv_dtype: KvCacheDtype::Float32,
            indexed: true,
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
    /// Bytes per cached key or value element.
    fn kv_elem_bytes(&self) -> usize {
        match self.kv_dtype {
            KvCacheDtype::Float32 => 4,
            KvCacheDtype::Float16 => 2,
        }
    }
    /// KV cache bytes per token.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.kv_heads * self.head_dim * self.kv_elem_bytes()
    }
    /// KV cache bytes per token with one KV head per query head (MHA).
    pub fn mha_kv_bytes_per_token(&self) -> usize {
        2 * self.heads * self.head_dim * self.kv_elem_bytes()
    }
    /// Index cache bytes per token.
    pub fn index_bytes_per_token(&self) -> usize {
        KeyStore::bytes_per_token(self.index_dim, self.index_precision)
    }

    /// A one-layer model config whose only layer is this shape's DSA attention
    /// (hidden = H x D; a small FFN and vocabulary that the bench never runs).
    pub fn config(&self, max_positions: usize) -> Result<ModelConfig> {
        let dtype = match self.index_precision {
            KeyPrecision::F32 => "float32",
            KeyPrecision::Bf16 => "bfloat16",
            KeyPrecision::Int8 => "int8",
        };
        let mut json = serde_json::json!({
            "vocab_size": 16,
            "hidden_size": self.heads * self.head_dim,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": max_positions,
            "layer_types": ["dsa"],
            "index_topk": self.topk,
            "indexer_kind": "lightning",
            "index_n_heads": self.index_heads,
            "index_head_dim": self.index_dim,
            "index_cache_dtype": dtype,
            "kv_cache_dtype": self.kv_dtype,
        });
        if !self.indexed {
            json["layer_types"] = serde_json::json!(["dense"]);
        }
        ModelConfig::from_json(&json.to_string())
    }
}

/// The layer under test: the model's own attention layer, random weights.
struct Layer {
    model: Model,
    hidden: usize,
}

impl Layer {
    fn new(shape: LayerShape, max_positions: usize) -> Result<Self> {
        let cfg = shape.config(max_positions)?;
        let model = Model::new_random_for_inference(&cfg, 3, DType::F32, &Device::Cpu)?;
        Ok(Self {
            hidden: cfg.hidden_size,
            model,
        })
    }

    fn attention(&self) -> Result<&Attention> {
        match &self.model.net.layers[0].self_attn {
            SelfAttn::Standard(a) => Ok(a),
            SelfAttn::Mla(_) | SelfAttn::V4(_) => Err(Error::Invalid(
                "bench attention: a standard (q/k/v) layer expected".into(),
            )),
        }
    }

    /// The layer's step over the rows x (T, C), appended to `cache` at its end.
    fn step(&self, x: &Tensor, cache: &mut SeqCache, dense: bool) -> Result<Tensor> {
        let (t, _) = x.dims2()?;
        let seg = Segment {
            start: 0,
            len: t,
            pos: cache.len(),
        };
        let opts = StepOptions {
            dense,
            ..Default::default()
        };
        let layer = &mut cache.layers[0];
        self.attention()?.step(
            x,
            &[seg],
            &mut [layer],
            self.model.net.rope(),
            &opts,
            &mut Default::default(),
        )
    }
}

fn random_vec(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// One layer's decode state: the layer, a cache of N random positions (keys, values,
/// index keys, written where the layer writes them) and one new token.
pub struct DecodeState {
    pub shape: LayerShape,
    layer: Layer,
    cache: SeqCache,
    /// (1, C) the new token's input to the layer
    x: Tensor,
    /// (H, D) a query for the core kernels (RoPE applied)
    q: Vec<f32>,
    /// (Hi, di), (Hi): an index query and its head weights
    iq: Vec<f32>,
    iw: Vec<f32>,
}

impl DecodeState {
    /// `len` cached positions, with room for `extra` more (each layer call appends one).
    pub fn random(shape: LayerShape, len: usize, extra: usize, seed: u64) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (kv, d) = (shape.kv_heads, shape.head_dim);
        let layer = Layer::new(shape, len + extra + 1)?;
        let mut cache = SeqCache::new(1, shape.kv_dtype);
        cache.reserve(len + extra);
        let lc = &mut cache.layers[0];
        // Fill in pieces so no second full-size buffer is needed.
        let mut done = 0;
        while done < len {
            let n = 4096.min(len - done);
            let (k, v) = lc.kv_mut(kv, d);
            k.append_token_major(&random_vec(n * kv * d, &mut rng));
            v.append_token_major(&random_vec(n * kv * d, &mut rng));
            if shape.indexed {
                lc.index_mut(shape.index_dim, shape.index_precision)
                    .extend_rows(&random_vec(n * shape.index_dim, &mut rng));
            }
            done += n;
        }
        let x = Tensor::from_vec(
            random_vec(layer.hidden, &mut rng),
            (1, layer.hidden),
            &Device::Cpu,
        )?;
        Ok(Self {
            q: random_vec(shape.heads * d, &mut rng),
            iq: random_vec(shape.index_heads * shape.index_dim, &mut rng),
            iw: random_vec(shape.index_heads, &mut rng)
                .into_iter()
                .map(|w| w.abs())
                .collect(),
            shape,
            layer,
            cache,
            x,
        })
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Bytes of KV + index cache held.
    pub fn cache_bytes(&self) -> usize {
        self.cache.used_bytes()
    }

    fn scale(&self) -> f32 {
        1.0 / (self.shape.head_dim as f32).sqrt()
    }

    fn rows(&self) -> CacheRows<'_> {
        let lc = &self.cache.layers[0];
        match (lc.k.as_ref(), lc.v.as_ref()) {
            (Some(k), Some(v)) => CacheRows::separate(k, v).expect("one precision"),
            _ => CacheRows::F32(KvRows::separate(
                &[],
                &[],
                self.shape.kv_heads,
                self.shape.head_dim,
            )),
        }
    }

    /// The whole layer, one decode step (appends the token): dense or sparse selector.
    pub fn layer_step(&mut self, dense: bool) -> Result<Tensor> {
        let x = self.x.clone();
        self.layer.step(&x, &mut self.cache, dense)
    }

    /// Dense attention core with the flash-decoding kernel the step calls: (H, D).
    pub fn dense(&self) -> Vec<f32> {
        let (q, s, scale) = (&self.q, self.len(), self.scale());
        match self.rows() {
            CacheRows::F32(r) => decode_attention::decode(q, r, s, scale),
            CacheRows::F16(r) => decode_attention::decode(q, r, s, scale),
        }
    }

    /// Dense attention core through candle ops (matmul, softmax, matmul).
    pub fn dense_candle(&self) -> Result<Vec<f32>> {
        let (q, s, scale) = (&self.q, self.len(), self.scale());
        Ok(match self.rows() {
            CacheRows::F32(r) => decode_attention::reference(q, r, s, scale),
            CacheRows::F16(r) => decode_attention::reference(q, r, s, scale),
        }?)
    }

    /// The selection: scan the index cache once, top-k.
    pub fn select(&self) -> Vec<u32> {
        let index = self.cache.layers[0]
            .index
            .as_ref()
            .expect("index keys filled");
        indexer::topk_decode(
            &self.iq,
            &self.iw,
            index,
            self.shape.index_shape(),
            self.shape.topk,
        )
    }

    /// Attention core over a selection: (H, D).
    pub fn attend(&self, idx: &[u32]) -> Vec<f32> {
        let (q, scale) = (&self.q, self.scale());
        match self.rows() {
            CacheRows::F32(r) => sparse_attention::attend_selected(q, r, 1, idx, scale),
            CacheRows::F16(r) => sparse_attention::attend_selected(q, r, 1, idx, scale),
        }
    }

    /// Sparse attention core: select, then attend.
    pub fn sparse(&self) -> Vec<f32> {
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
pub(crate) fn median_secs_cold(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
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
    /// The whole layer's step (projections, indexer, cache write, attention), dense
    /// selector.
    pub layer_dense_ms: f64,
    /// The same step with the indexer's top-k.
    pub layer_sparse_ms: f64,
    /// layer_dense_ms / layer_sparse_ms
    pub layer_speedup: f64,
    /// The attention core alone, dense: the flash-decoding kernel.
    pub dense_ms: f64,
    pub dense_candle_ms: f64,
    /// The attention core alone, sparse: scan + top-k + attention over the selection.
    pub sparse_ms: f64,
    pub select_ms: f64,
    pub attend_ms: f64,
    /// dense_ms / sparse_ms (the core)
    pub speedup: f64,
    pub dense_gflops: f64,
    pub dense_gbps: f64,
    pub index_scan_gbps: f64,
    /// index_scan_gbps / machine read bandwidth
    pub index_scan_bw_share: f64,
    pub kv_bytes_per_token: usize,
    pub mha_kv_bytes_per_token: usize,
    pub index_bytes_per_token: usize,
    /// Max |sparse - dense| / max |dense| of the core outputs (sanity, not a target).
    pub outputs_rel_diff: f64,
}

/// Decode benchmark at `context` cached positions.
pub fn decode_row(shape: LayerShape, context: usize, machine_gbps: f64) -> Result<DecodeRow> {
    let reps = (200_000 / context.max(1)).clamp(9, 201);
    // The sparse path is cheap: more repetitions for a stable median.
    let sparse_reps = reps.max(101);
    // Each layer step appends its token: room for all of them.
    let mut st = DecodeState::random(shape, context, 2 * (reps + sparse_reps) + 4, 7)?;
    let layer_dense_s = median_secs_cold(reps, || {
        std::hint::black_box(st.layer_step(true)?);
        Ok(())
    })?;
    let layer_sparse_s = median_secs_cold(sparse_reps, || {
        std::hint::black_box(st.layer_step(false)?);
        Ok(())
    })?;
    let dense_s = median_secs_cold(reps, || {
        std::hint::black_box(st.dense());
        Ok(())
    })?;
    let candle_s = median_secs_cold(reps.min(31), || {
        std::hint::black_box(st.dense_candle()?);
        Ok(())
    })?;
    let sparse_s = median_secs_cold(sparse_reps, || {
        std::hint::black_box(st.sparse());
        Ok(())
    })?;
    let select_s = median_secs_cold(sparse_reps, || {
        std::hint::black_box(st.select());
        Ok(())
    })?;
    let idx = st.select();
    let attend_s = median_secs_cold(sparse_reps, || {
        std::hint::black_box(st.attend(&idx));
        Ok(())
    })?;
    let dense = st.dense();
    let sparse = st.attend(&idx);
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
        layer_dense_ms: layer_dense_s * 1e3,
        layer_sparse_ms: layer_sparse_s * 1e3,
        layer_speedup: layer_dense_s / layer_sparse_s,
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

/// Prompt tokens per step of the layer prefill (the engine's default chunk).
pub const PREFILL_CHUNK: usize = 512;

/// Seconds to prefill `n` random tokens through the layer's step, `PREFILL_CHUNK` at a
/// time, with the dense or the sparse selector.
fn layer_prefill(layer: &Layer, n: usize, dense: bool) -> Result<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut cache = SeqCache::new(1, layer.model.cfg.kv_cache_dtype);
    cache.reserve(n);
    let mut took = 0.0;
    let mut done = 0;
    while done < n {
        let t = PREFILL_CHUNK.min(n - done);
        let x = Tensor::from_vec(
            random_vec(t * layer.hidden, &mut rng),
            (t, layer.hidden),
            &Device::Cpu,
        )?;
        let t0 = Instant::now();
        std::hint::black_box(layer.step(&x, &mut cache, dense)?);
        took += t0.elapsed().as_secs_f64();
        done += t;
    }
    Ok(took)
}

/// Dense prefill attention with candle GEMMs over query chunks (random q, k, v of the
/// layer's shape): seconds. An outside baseline for the layer's dense prefill.
fn dense_gemm_prefill(shape: LayerShape, n: usize) -> Result<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let (h, kv, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let g = h / kv;
    let dev = Device::Cpu;
    let q = Tensor::from_vec(random_vec(n * h * d, &mut rng), (n, kv, g, d), &dev)?
        .permute((1, 2, 0, 3))?
        .contiguous()?; // (KV, G, N, D)
    let k = Tensor::from_vec(random_vec(kv * n * d, &mut rng), (kv, n, d), &dev)?;
    let v = Tensor::from_vec(random_vec(kv * n * d, &mut rng), (kv, n, d), &dev)?;
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

/// Prefill measurements at one context length.
#[derive(Debug, Clone, Serialize)]
pub struct PrefillRow {
    pub bench: &'static str,
    pub context: usize,
    /// The layer's step with the dense selector; None when above the dense limit.
    pub dense_s: Option<f64>,
    /// Query-chunked candle GEMM + fused causal softmax (attention alone); None above
    /// its limit.
    pub dense_gemm_s: Option<f64>,
    /// The layer's step with the indexer's top-k.
    pub sparse_s: f64,
    pub speedup: Option<f64>,
    /// Useful (causal) attention FLOP/s of the layer's dense prefill,
    /// 4 H D N(N+1)/2 / time (projections not counted).
    pub dense_gflops: Option<f64>,
}

pub fn prefill_row(
    shape: LayerShape,
    context: usize,
    run_dense: bool,
    run_gemm: bool,
) -> Result<PrefillRow> {
    let layer = Layer::new(shape, context + 1)?;
    let dense_s = if run_dense {
        Some(layer_prefill(&layer, context, true)?)
    } else {
        None
    };
    let dense_gemm_s = if run_gemm {
        Some(dense_gemm_prefill(shape, context)?)
    } else {
        None
    };
    let sparse_s = layer_prefill(&layer, context, false)?;
    Ok(PrefillRow {
        bench: "attention_prefill",
        context,
        dense_s,
        dense_gemm_s,
        sparse_s,
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
