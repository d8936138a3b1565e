//! `sparrow bench attention --v4 CONFIG`: DeepSeek-V4's attention layer types, one of
//! each that the config uses (sliding window, CSA, HCA), decoding one token against a
//! cache of N positions, next to a dense layer of the same heads (H query heads x D over
//! one K/V head: what every V3.2-layout layer reads without its indexer) at the same N.
//!
//! Each V4 layer is the config's own (`model::v4_attention::V4Attention`, random
//! weights, built from a one-layer copy of the config) run through its engine step, what
//! `generate` and the server run; its cache is synthesised (`V4Attention::
//! synthetic_cache`: window rows, compressed entries, index keys and partial windows of
//! random values, as a prefill of N tokens would leave them; the cost of a step does not
//! depend on the values). The dense layer is `bench::attention`'s, with its cache of N
//! random rows, stepping with the dense selector. Per row: median ms per step (cold:
//! the last-level cache flushed before each call), the bytes a step reads from the
//! cache and the rate achieved against the machine's read bandwidth, and the cache
//! bytes per token of each.

use super::attention::{median_secs_cold, DecodeState, LayerShape};
use crate::config::{AttentionKind, KvCacheDtype, ModelConfig};
use crate::error::{Error, Result};
use crate::kernels::indexer::KeyPrecision;
use crate::model::block::SelfAttn;
use crate::model::cache::LayerCache;
use crate::model::step::Segment;
use crate::model::v4_attention::V4Attention;
use crate::model::Model;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Short name of a V4 layer type.
pub fn kind_name(kind: AttentionKind) -> &'static str {
    match kind {
        AttentionKind::SlidingAttention => "sliding",
        AttentionKind::CompressedSparseAttention => "CSA",
        AttentionKind::HeavilyCompressedAttention => "HCA",
        AttentionKind::Dense => "dense",
        AttentionKind::Dsa => "dsa",
    }
}

/// The V4 layer types of `cfg`, each with the index of its first layer.
pub fn layer_kinds(cfg: &ModelConfig) -> Vec<(usize, AttentionKind)> {
    let mut seen = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        let kind = cfg.attention_kind(i);
        if kind.is_v4() && !seen.iter().any(|&(_, k)| k == kind) {
            seen.push((i, kind));
        }
    }
    seen
}

/// A one-layer copy of `cfg` whose only layer is layer `layer`'s type (and its MLP
/// type), positions up to `max_positions`.
fn one_layer_config(cfg: &ModelConfig, layer: usize, max_positions: usize) -> Result<ModelConfig> {
    let mut one = cfg.clone();
    one.num_hidden_layers = 1;
    one.layer_types = Some(vec![cfg.attention_kind(layer)]);
    one.mlp_layer_types = cfg
        .mlp_layer_types
        .as_ref()
        .and_then(|t| t.get(layer).map(|&k| vec![k]));
    one.first_k_dense_replace = 0;
    one.max_position_embeddings = one.max_position_embeddings.max(max_positions);
    one.validate()?;
    Ok(one)
}

/// One V4 layer with a synthesised decode state and one new token.
struct V4Decode {
    model: Model,
    cache: LayerCache,
    x: Tensor,
    positions: usize,
}

impl V4Decode {
    fn new(cfg: &ModelConfig, layer: usize, positions: usize, extra: usize) -> Result<Self> {
        let one = one_layer_config(cfg, layer, positions + extra + 1)?;
        let model = Model::new_random_for_inference(&one, 3, DType::F32, &Device::Cpu)?;
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let mut cache = LayerCache::new(one.kv_cache_dtype);
        cache.v4 = Some(Self::attention_of(&model)?.synthetic_cache(positions, &mut rng));
        let c = one.hidden_size;
        let x: Vec<f32> = (0..c).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Ok(Self {
            x: Tensor::from_vec(x, (1, c), &Device::Cpu)?,
            model,
            cache,
            positions,
        })
    }

    fn attention_of(model: &Model) -> Result<&V4Attention> {
        match &model.net.layers[0].self_attn {
            SelfAttn::V4(a) => Ok(a),
            _ => Err(Error::Invalid(
                "bench attention --v4: the config's layers are not DeepSeek-V4 layers".into(),
            )),
        }
    }

    /// One decode step (appends the token).
    fn step(&mut self) -> Result<Tensor> {
        let seg = Segment {
            start: 0,
            len: 1,
            pos: self.positions,
        };
        let attn = Self::attention_of(&self.model)?;
        let y = attn.step(&self.x, &[seg], &mut [&mut self.cache])?;
        self.positions += 1;
        Ok(y)
    }

    fn read_bytes(&self) -> Result<usize> {
        let attn = Self::attention_of(&self.model)?;
        let v4 = self
            .cache
            .v4
            .as_ref()
            .ok_or_else(|| Error::Invalid("no V4 cache".into()))?;
        Ok(attn.decode_read_bytes(v4))
    }

    fn cache_bytes(&self) -> usize {
        self.cache.v4.as_ref().map_or(0, |c| c.bytes())
    }
}

/// One layer type at one context length.
#[derive(Debug, Clone, Serialize)]
pub struct V4DecodeRow {
    pub bench: &'static str,
    pub context: usize,
    /// `sliding`, `CSA` or `HCA`.
    pub layer: &'static str,
    /// The V4 layer's step (projections, compressors, indexer, cache write, attention).
    pub v4_ms: f64,
    /// The dense MQA layer of the same heads, the same context.
    pub dense_ms: f64,
    /// dense_ms / v4_ms
    pub speedup: f64,
    /// Cache bytes one V4 step reads (window, entries or index keys + selected entries).
    pub v4_read_bytes: usize,
    /// ... per second, and as a share of the machine's read bandwidth.
    pub v4_gbps: f64,
    pub v4_bw_share: f64,
    /// Cache bytes per cached token of the V4 layer (its whole state / N) and of the
    /// dense layer (K and V).
    pub v4_cache_bytes_per_token: f64,
    pub dense_cache_bytes_per_token: usize,
}

/// The dense MQA layer (no indexer) matching `cfg`'s attention heads.
pub fn dense_shape(cfg: &ModelConfig) -> LayerShape {
    LayerShape {
        heads: cfg.num_attention_heads,
        head_dim: cfg.head_dim(),
        kv_heads: 1,
        index_heads: cfg.index_n_heads.max(1),
        index_dim: cfg.index_head_dim.max(1),
        topk: cfg.index_topk.max(1),
        index_precision: KeyPrecision::F32,
        kv_dtype: KvCacheDtype::Float32,
        indexed: false,
    }
}

/// Every V4 layer type of `cfg` at `context` cached tokens, and the dense layer there.
pub fn decode_rows(
    cfg: &ModelConfig,
    context: usize,
    machine_gbps: f64,
) -> Result<Vec<V4DecodeRow>> {
    let kinds = layer_kinds(cfg);
    if kinds.is_empty() {
        return Err(Error::Invalid(
            "bench attention --v4: the config has no DeepSeek-V4 layer (layer_types)".into(),
        ));
    }
    let reps = (2_000_000 / context.max(1)).clamp(9, 101);
    let shape = dense_shape(cfg);
    let dense_ms = {
        let mut st = DecodeState::random(shape, context, reps + 2, 7)?;
        median_secs_cold(reps, || {
            std::hint::black_box(st.layer_step(true)?);
            Ok(())
        })? * 1e3
    };
    let mut rows = Vec::with_capacity(kinds.len());
    for (layer, kind) in kinds {
        let mut st = V4Decode::new(cfg, layer, context, reps + 2)?;
        let cache_bytes = st.cache_bytes();
        let read = st.read_bytes()?;
        let secs = median_secs_cold(reps, || {
            std::hint::black_box(st.step()?);
            Ok(())
        })?;
        let gbps = read as f64 / secs / 1e9;
        rows.push(V4DecodeRow {
            bench: "v4_attention_decode",
            context,
            layer: kind_name(kind),
            v4_ms: secs * 1e3,
            dense_ms,
            speedup: dense_ms / (secs * 1e3),
            v4_read_bytes: read,
            v4_gbps: gbps,
            v4_bw_share: gbps / machine_gbps,
            v4_cache_bytes_per_token: cache_bytes as f64 / context.max(1) as f64,
            dense_cache_bytes_per_token: shape.kv_bytes_per_token(),
        });
    }
    Ok(rows)
}
