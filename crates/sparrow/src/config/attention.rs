//! The attention part of the config: layer kinds (dense, DSA), the indexer and its
//! key cache, MLA's latent ranks, and the checks of those fields.

use super::ModelConfig;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Attention of one layer (`layer_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKind {
    /// Causal attention over every cached position (MHA / GQA / MQA).
    #[serde(alias = "full_attention")]
    Dense,
    /// DeepSeek sparse attention: an indexer scores every cached position, each query
    /// attends to its `index_topk` best (DESIGN.md §4).
    Dsa,
    /// DeepSeek-V4: the last `sliding_window` positions only.
    SlidingAttention,
    /// DeepSeek-V4 CSA: the window plus the indexer's `index_topk` of the entries a
    /// compressor pools from overlapping windows of 2 x `compress_rates.
    /// compressed_sparse_attention` tokens.
    CompressedSparseAttention,
    /// DeepSeek-V4 HCA: the window plus every entry pooled from non-overlapping windows
    /// of `compress_rates.heavily_compressed_attention` tokens.
    HeavilyCompressedAttention,
}

/// The indexer of `dsa` layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IndexerKind {
    /// DeepSeek-V3.2: `I(t,s) = sum_j w(t,j) ReLU(q(t,j) . k(s))` with `index_n_heads`
    /// query heads of `index_head_dim`, one shared LayerNorm'd key per token,
    /// `w = weights_proj(x) * index_n_heads^-0.5 * index_head_dim^-0.5`, and
    /// non-interleaved RoPE on the first `index_rope_head_dim` dimensions of q and k.
    Lightning,
    /// A two-layer MLP (`fc1` to `index_gate_intermediate_size`, SiLU, then `wq` / `wk`
    /// to `index_head_dim`) maps each token to a gate query and a gate key; score =
    /// their dot product / sqrt(index_head_dim). Trained end-to-end through the
    /// straight-through gate (`indexer_train_mode` = `ste`).
    MlpGate,
}

/// Storage precision of the decode-time key / value cache (per-head rows, or the MLA
/// latent store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheDtype {
    Float32,
    /// IEEE half: half the bytes per token, and half the memory each decode step
    /// streams (llama.cpp's default cache type); rows are rounded once when written.
    Float16,
}

/// Storage precision of the decode-time index key cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IndexCacheDtype {
    Float32,
    Bfloat16,
    /// Symmetric int8 with one f32 absmax scale per token (36 B per token at 32 dims);
    /// the index queries are rounded to int8 too (one scale per head) and the scores
    /// are integer dot products, as DeepSeek-V3.2's FP8 indexer does.
    Int8,
}

impl IndexCacheDtype {
    /// The kernel's storage precision.
    pub fn key_precision(self) -> crate::kernels::indexer::KeyPrecision {
        use crate::kernels::indexer::KeyPrecision;
        match self {
            IndexCacheDtype::Float32 => KeyPrecision::F32,
            IndexCacheDtype::Bfloat16 => KeyPrecision::Bf16,
            IndexCacheDtype::Int8 => KeyPrecision::Int8,
        }
    }
}

impl ModelConfig {
    pub(super) fn validate_mla(&self) -> Result<()> {
        let Some(r) = self.kv_lora_rank else {
            return Ok(());
        };
        if r == 0 {
            return Err(Error::config("kv_lora_rank", "must be > 0"));
        }
        if self.q_lora_rank == Some(0) {
            return Err(Error::config("q_lora_rank", "must be > 0 when set"));
        }
        if self.qk_nope_head_dim == 0 {
            return Err(Error::config("qk_nope_head_dim", "must be > 0 with MLA"));
        }
        if self.qk_rope_head_dim == 0 || !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(Error::config(
                "qk_rope_head_dim",
                "must be even and > 0 with MLA",
            ));
        }
        if self.v_head_dim == 0 {
            return Err(Error::config("v_head_dim", "must be > 0 with MLA"));
        }
        if self.has_dsa() {
            // DeepSeek-V3.2: the lightning indexer reads the query latent.
            if self.q_lora_rank.is_none() {
                return Err(Error::config(
                    "q_lora_rank",
                    "DSA layers over MLA need it (the indexer reads the query latent)",
                ));
            }
            if self.indexer_kind != IndexerKind::Lightning {
                return Err(Error::config(
                    "indexer_kind",
                    "DSA layers over MLA use the `lightning` indexer",
                ));
            }
        }
        Ok(())
    }

    pub(super) fn validate_attention(&self) -> Result<()> {
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(Error::config(
                    "layer_types",
                    format!(
                        "has {} entries, num_hidden_layers is {}",
                        types.len(),
                        self.num_hidden_layers
                    ),
                ));
            }
        }
        if !(self.indexer_kl_coef.is_finite() && self.indexer_kl_coef >= 0.0) {
            return Err(Error::config("indexer_kl_coef", "must be >= 0"));
        }
        if !self.has_dsa() {
            return Ok(());
        }
        if self.index_topk == 0 {
            return Err(Error::config(
                "index_topk",
                "must be >= 1 when a layer is `dsa`",
            ));
        }
        if self.index_head_dim == 0 {
            return Err(Error::config(
                "index_head_dim",
                "must be >= 1 when a layer is `dsa`",
            ));
        }
        match self.indexer_kind {
            IndexerKind::Lightning => {
                if self.index_n_heads == 0 {
                    return Err(Error::config(
                        "index_n_heads",
                        "must be >= 1 for the lightning indexer",
                    ));
                }
                if self.index_rope_head_dim > self.index_head_dim
                    || !self.index_rope_head_dim.is_multiple_of(2)
                {
                    return Err(Error::config(
                        "index_rope_head_dim",
                        format!(
                            "{} must be even and at most index_head_dim {}",
                            self.index_rope_head_dim, self.index_head_dim
                        ),
                    ));
                }
            }
            IndexerKind::MlpGate => {
                if self.index_gate_intermediate_size == 0 {
                    return Err(Error::config(
                        "index_gate_intermediate_size",
                        "must be >= 1 for the mlp_gate indexer",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Attention kind of layer `i`.
    pub fn attention_kind(&self, i: usize) -> AttentionKind {
        self.layer_types
            .as_ref()
            .and_then(|t| t.get(i).copied())
            .unwrap_or(AttentionKind::Dense)
    }

    /// Whether any layer is `dsa`.
    pub fn has_dsa(&self) -> bool {
        (0..self.num_hidden_layers).any(|i| self.attention_kind(i) == AttentionKind::Dsa)
    }
}
