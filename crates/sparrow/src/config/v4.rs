//! The DeepSeek-V4 part of the config (HF `deepseek_v4` field names): the compressed
//! attention layers' rates and RoPE, the sliding window, the grouped low-rank output,
//! the hyper-connections, the per-layer MLP kinds (hash or routed), the clamped SwiGLU
//! and the router's score function, with their checks (DESIGN.md §4).

use super::{AttentionKind, ModelConfig, RouterKind};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Source tokens pooled into one compressed entry, per compressed layer type (HF
/// `compress_rates`; V4: 4 for CSA, 128 for HCA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressRates {
    pub compressed_sparse_attention: usize,
    pub heavily_compressed_attention: usize,
}

/// YaRN scaling of the compressed layers' RoPE (HF `rope_parameters.compress` with
/// `rope_type: yarn`): the inverse frequencies blend interpolation (divided by `factor`)
/// and extrapolation across the dimensions between the `beta_fast` and `beta_slow`
/// rotation counts of `original_max_position_embeddings`; cos and sin are multiplied by
/// `attention_factor` (V4 ships 1.0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub attention_factor: f64,
    /// Round the correction range outward to whole dimensions (HF `truncate`, default
    /// true).
    #[serde(default = "super::default_true")]
    pub truncate: bool,
}

/// The feed-forward kind of one MoE layer (HF `mlp_layer_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// The layer's router (`router_kind`) picks the experts.
    Moe,
    /// The experts of token id `v` are row `v` of the fixed table `mlp.gate.tid2eid`
    /// (V x k); the gate's scores (`scoring_func`) only weigh them (DeepSeek-V4's first
    /// layers).
    HashMoe,
}

/// The router's score function (HF `scoring_func`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoringFunc {
    Softmax,
    Sigmoid,
    /// `sqrt(softplus(l))` (DeepSeek-V4).
    Sqrtsoftplus,
}

impl AttentionKind {
    /// Whether this is one of DeepSeek-V4's attention layer types (built as
    /// `model::v4_attention`).
    pub fn is_v4(self) -> bool {
        matches!(
            self,
            AttentionKind::SlidingAttention
                | AttentionKind::CompressedSparseAttention
                | AttentionKind::HeavilyCompressedAttention
        )
    }
}

impl ModelConfig {
    /// Whether the layers use DeepSeek-V4 attention (every layer then does).
    pub fn is_v4(&self) -> bool {
        (0..self.num_hidden_layers).any(|i| self.attention_kind(i).is_v4())
    }

    /// Whether any layer has an indexer that trains by KL (`dsa`, or V4's CSA).
    pub fn has_indexer(&self) -> bool {
        self.has_dsa()
            || (0..self.num_hidden_layers)
                .any(|i| self.attention_kind(i) == AttentionKind::CompressedSparseAttention)
    }

    /// The compress rate of layer `i` (0 for layers without a compressor).
    pub fn compress_rate(&self, i: usize) -> usize {
        let rates = self.compress_rates.unwrap_or(CompressRates {
            compressed_sparse_attention: 0,
            heavily_compressed_attention: 0,
        });
        match self.attention_kind(i) {
            AttentionKind::CompressedSparseAttention => rates.compressed_sparse_attention,
            AttentionKind::HeavilyCompressedAttention => rates.heavily_compressed_attention,
            _ => 0,
        }
    }

    /// The MLP kind of MoE layer `i` (`moe` when `mlp_layer_types` is absent).
    pub fn mlp_kind(&self, i: usize) -> MlpKind {
        self.mlp_layer_types
            .as_ref()
            .and_then(|t| t.get(i).copied())
            .unwrap_or(MlpKind::Moe)
    }

    /// The router's score function: `scoring_func`, else the kind's own (`noaux_bias`:
    /// sigmoid, the others softmax).
    pub fn router_scoring(&self) -> ScoringFunc {
        self.scoring_func.unwrap_or(match self.router_kind {
            RouterKind::NoauxBias => ScoringFunc::Sigmoid,
            _ => ScoringFunc::Softmax,
        })
    }

    pub(super) fn validate_v4(&self) -> Result<()> {
        if let Some(types) = &self.mlp_layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(Error::config(
                    "mlp_layer_types",
                    format!(
                        "has {} entries, num_hidden_layers is {}",
                        types.len(),
                        self.num_hidden_layers
                    ),
                ));
            }
            let hashed = (0..self.num_hidden_layers).any(|i| self.mlp_kind(i) == MlpKind::HashMoe);
            if hashed && self.n_routed_experts == 0 {
                return Err(Error::config(
                    "mlp_layer_types",
                    "`hash_moe` layers need n_routed_experts > 0",
                ));
            }
            if let Some(i) = (0..self.num_hidden_layers)
                .find(|&i| self.mlp_kind(i) == MlpKind::HashMoe && !self.is_moe_layer(i))
            {
                return Err(Error::config(
                    "mlp_layer_types",
                    format!("layer {i} is `hash_moe` but has a dense FFN (first_k_dense_replace)"),
                ));
            }
        }
        if let Some(limit) = self.swiglu_limit {
            if !(limit.is_finite() && limit > 0.0) {
                return Err(Error::config("swiglu_limit", "must be > 0 when set"));
            }
        }
        match (self.scoring_func, self.router_kind) {
            (None, _) | (Some(ScoringFunc::Softmax), _) => {}
            (Some(_), RouterKind::NoauxBias) => {}
            (Some(f), kind) => {
                return Err(Error::config(
                    "scoring_func",
                    format!(
                        "`{f:?}` applies to noaux_bias routers only, router_kind is `{}`",
                        kind.name()
                    ),
                ))
            }
        }
        if let Some(n) = self.hc_mult {
            if n == 0 {
                return Err(Error::config("hc_mult", "must be >= 1 when set"));
            }
            if self.hc_sinkhorn_iters == 0 {
                return Err(Error::config("hc_sinkhorn_iters", "must be >= 1"));
            }
            if !(self.hc_eps.is_finite() && self.hc_eps >= 0.0) {
                return Err(Error::config("hc_eps", "must be >= 0"));
            }
        }
        if !self.is_v4() {
            return Ok(());
        }
        self.validate_v4_attention()
    }

    fn validate_v4_attention(&self) -> Result<()> {
        if let Some(i) = (0..self.num_hidden_layers).find(|&i| !self.attention_kind(i).is_v4()) {
            return Err(Error::config(
                "layer_types",
                format!(
                    "layer {i} is `{:?}`: DeepSeek-V4 layer types (sliding_attention, compressed_sparse_attention, heavily_compressed_attention) cannot be mixed with others",
                    self.attention_kind(i)
                ),
            ));
        }
        if self.num_kv_heads() != 1 {
            return Err(Error::config(
                "num_key_value_heads",
                "DeepSeek-V4 attention has one shared K=V head: must be 1",
            ));
        }
        if self.kv_lora_rank.is_some() {
            return Err(Error::config(
                "kv_lora_rank",
                "DeepSeek-V4 attention has no KV latent: leave it unset",
            ));
        }
        if !matches!(self.q_lora_rank, Some(r) if r > 0) {
            return Err(Error::config(
                "q_lora_rank",
                "DeepSeek-V4 attention needs the query latent rank",
            ));
        }
        let d = self.head_dim();
        let r = self.qk_rope_head_dim;
        if r == 0 || !r.is_multiple_of(2) || r > d {
            return Err(Error::config(
                "qk_rope_head_dim",
                format!("must be even, > 0 and at most head_dim {d} (the RoPE'd trailing dims)"),
            ));
        }
        let h = self.num_attention_heads;
        match self.o_groups {
            Some(g) if g > 0 && h.is_multiple_of(g) => {}
            _ => {
                return Err(Error::config(
                    "o_groups",
                    format!("must be set, > 0 and divide num_attention_heads {h}"),
                ))
            }
        }
        if self.o_lora_rank == 0 {
            return Err(Error::config("o_lora_rank", "must be > 0"));
        }
        if self.sliding_window.unwrap_or(0) == 0 {
            return Err(Error::config(
                "sliding_window",
                "DeepSeek-V4 attention needs a window of >= 1 positions",
            ));
        }
        if !(self.compress_rope_theta.is_finite() && self.compress_rope_theta > 0.0) {
            return Err(Error::config("compress_rope_theta", "must be > 0"));
        }
        if let Some(y) = &self.compress_rope_yarn {
            let ok = y.factor.is_finite()
                && y.factor > 0.0
                && y.original_max_position_embeddings > 0
                && y.beta_fast.is_finite()
                && y.beta_slow.is_finite()
                && y.attention_factor.is_finite()
                && y.attention_factor > 0.0;
            if !ok {
                return Err(Error::config(
                    "compress_rope_yarn",
                    "factor, original_max_position_embeddings and attention_factor must be > 0, the betas finite",
                ));
            }
        }
        let compressed = (0..self.num_hidden_layers)
            .any(|i| self.attention_kind(i) != AttentionKind::SlidingAttention);
        if compressed {
            let ok = self.compress_rates.is_some_and(|c| {
                c.compressed_sparse_attention > 0 && c.heavily_compressed_attention > 0
            });
            if !ok {
                return Err(Error::config(
                    "compress_rates",
                    "compressed layers need both rates, each >= 1",
                ));
            }
        }
        let csa = (0..self.num_hidden_layers)
            .any(|i| self.attention_kind(i) == AttentionKind::CompressedSparseAttention);
        if csa {
            if self.index_topk == 0 || self.index_n_heads == 0 {
                return Err(Error::config(
                    "index_topk",
                    "compressed_sparse_attention layers need index_topk and index_n_heads >= 1",
                ));
            }
            if self.indexer_train_mode == super::IndexerTrainMode::Ste {
                return Err(Error::config(
                    "indexer_train_mode",
                    "the CSA indexer trains by KL (dense_warmup, then sparse), not `ste`",
                ));
            }
            if self.index_head_dim < r {
                return Err(Error::config(
                    "index_head_dim",
                    format!(
                        "must be >= qk_rope_head_dim {r} (the indexer rotates its trailing dims)"
                    ),
                ));
            }
        }
        Ok(())
    }
}
