//! `ModelConfig`: one typed description of a Sparrow model, deserialized straight from
//! a Hugging Face style `config.json` (HF field names wherever HF has one). Our own
//! switches are explicit fields with documented defaults; nothing is inferred from a
//! size. `ModelConfig::from_json` validates every field and names the offending one.
//!
//! The JSON is flat, as HF's is, so `ModelConfig` is one struct (a `serde(flatten)`
//! of sub-structs would lose the field path in deserialization errors); its enums,
//! checks and derived values live by concern in `attention`, `moe` and `objectives`.

mod attention;
mod moe;
mod objectives;
mod v4;

pub use attention::{AttentionKind, IndexCacheDtype, IndexerKind, KvCacheDtype};
pub use moe::{BiasUpdateRule, RouterKind};
pub use objectives::{IndexerKlTarget, IndexerTrainMode};
pub use v4::{CompressRates, MlpKind, ScoringFunc, Yarn};

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

fn default_indexer_kind() -> IndexerKind {
    IndexerKind::Lightning
}
fn default_indexer_mode() -> IndexerTrainMode {
    IndexerTrainMode::Sparse
}
fn default_kl_coef() -> f64 {
    1.0
}
fn default_index_cache_dtype() -> IndexCacheDtype {
    IndexCacheDtype::Float32
}
fn default_kv_cache_dtype() -> KvCacheDtype {
    KvCacheDtype::Float32
}

fn default_model_type() -> String {
    "sparrow".into()
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_true() -> bool {
    true
}
fn default_router_kind() -> RouterKind {
    RouterKind::TopkSoftmax
}
fn default_bias_update_rule() -> BiasUpdateRule {
    BiasUpdateRule::Sign
}
fn default_aux_coef() -> f64 {
    0.01
}
fn default_cv2_coef() -> f64 {
    0.1
}
fn default_capacity_factor() -> f64 {
    1.25
}
fn default_capacity_floor() -> f64 {
    0.25
}
fn default_one_usize() -> usize {
    1
}
fn default_one_f64() -> f64 {
    1.0
}
fn default_bias_update_speed() -> f64 {
    1e-3
}
fn default_compress_rope_theta() -> f64 {
    160_000.0
}
fn default_hc_sinkhorn_iters() -> usize {
    20
}
fn default_hc_eps() -> f64 {
    1e-6
}
/// Id of the beginning-of-sequence token in tokenizers Sparrow trains (`<|bos|>`).
pub const BOS_ID: u32 = 0;
/// Id of the end-of-sequence / document-separator token (`<|eos|>`).
pub const EOS_ID: u32 = 1;

fn default_bos() -> u32 {
    BOS_ID
}
fn default_eos() -> u32 {
    EOS_ID
}

/// A model's architecture. Field names follow HF `config.json` (Llama / Mixtral /
/// DeepSeek-V3) so a config file moves between Sparrow and transformers unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// HF `model_type`; `"sparrow"` for models defined here.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Rows of the embedding and LM head; must be >= the tokenizer's vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream (C).
    pub hidden_size: usize,
    /// Hidden width of the dense SwiGLU FFN (used by the first `first_k_dense_replace`
    /// layers, or by every layer when `n_routed_experts` is 0).
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads per attention layer (H).
    pub num_attention_heads: usize,
    /// Key/value heads (KV). `H` = MHA, `1` = MQA, anything dividing `H` = GQA.
    /// Defaults to `num_attention_heads` (MHA) when absent, as in HF.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head dimension (D). When absent it is `hidden_size / num_attention_heads`,
    /// which must then divide exactly.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Longest position the RoPE tables cover (prefill + generation).
    pub max_position_embeddings: usize,
    /// RoPE base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Epsilon inside every RMSNorm.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Share the embedding matrix with the LM head (no `lm_head.weight` tensor).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Standard deviation of the normal initialisation of weight matrices.
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,

    /// Routed experts per MoE layer (E). 0 = no MoE: every layer has a dense FFN.
    #[serde(default)]
    pub n_routed_experts: usize,
    /// Experts each token is routed to (k); 1 <= k <= E when MoE is on.
    #[serde(default)]
    pub num_experts_per_tok: usize,
    /// Shared experts that every token runs through (DeepSeek); realised as one SwiGLU
    /// of width `n_shared_experts * moe_intermediate_size`. 0 = none.
    #[serde(default)]
    pub n_shared_experts: usize,
    /// Hidden width of each routed (and shared) expert.
    #[serde(default)]
    pub moe_intermediate_size: usize,
    /// The first this-many layers keep a dense FFN; the rest are MoE (DeepSeek-V3).
    #[serde(default)]
    pub first_k_dense_replace: usize,
    /// Renormalise the selected top-k router probabilities to sum to 1 (Mixtral: true).
    #[serde(default = "default_true")]
    pub norm_topk_prob: bool,
    /// Which router the MoE layers use.
    #[serde(default = "default_router_kind")]
    pub router_kind: RouterKind,
    /// Weight of the Switch load-balancing loss (`topk_softmax`, `switch_capacity`) added
    /// to the LM loss in training.
    #[serde(default = "default_aux_coef")]
    pub router_aux_loss_coef: f64,
    /// Weight of `capacity_aware`'s CV^2 utilization loss (Shazeer et al. 2017 weigh
    /// their CV^2 balance losses 0.1).
    #[serde(default = "default_cv2_coef")]
    pub router_cv2_loss_coef: f64,
    /// Training: the balance loss's weight (`router_aux_loss_coef` or
    /// `router_cv2_loss_coef`) ramps linearly from 0 at step 0 to its value at this step
    /// (the router learns its first choices before it is pushed to spread them).
    /// 0 = the full weight from the first step.
    #[serde(default)]
    pub router_balance_loss_warmup_steps: u64,
    /// Weight of the router z-loss `mean_t logsumexp(logits_t)^2` (ST-MoE); 0 = off.
    #[serde(default)]
    pub router_z_loss_coef: f64,
    /// `switch_capacity` / `capacity_aware`: slot budget per batch of T tokens is
    /// `capacity_factor * T * k` (per expert `/ E` for `switch_capacity`). Capacity
    /// applies in training and validation forwards, never in inference.
    #[serde(default = "default_capacity_factor")]
    pub capacity_factor: f64,
    /// `capacity_aware`: no expert's capacity falls below this share of the uniform
    /// capacity `capacity_factor * T * k / E`.
    #[serde(default = "default_capacity_floor")]
    pub capacity_floor: f64,
    /// `noaux_bias`: experts form `n_group` equal groups (HF DeepSeek-V3 name); other
    /// routers ignore it.
    #[serde(default = "default_one_usize")]
    pub n_group: usize,
    /// `noaux_bias`: tokens choose their experts within the best `topk_group` groups.
    #[serde(default = "default_one_usize")]
    pub topk_group: usize,
    /// `noaux_bias`: routed outputs are scaled by this (HF DeepSeek-V3 name).
    #[serde(default = "default_one_f64")]
    pub routed_scaling_factor: f64,
    /// `noaux_bias`: gamma of the bias update `b_i += gamma * sign(mean_load - load_i)`
    /// after each training step.
    #[serde(default = "default_bias_update_speed")]
    pub router_bias_update_speed: f64,
    /// `noaux_bias`: update the biases every this many steps, from the routed slots
    /// summed over them (1 = every step, DeepSeek-V3, whose batches hold millions of
    /// tokens; small batches give noisy per-step loads).
    #[serde(default = "default_one_usize")]
    pub router_bias_update_every: usize,
    /// `noaux_bias`: scale the bias speed by the step's learning rate over the peak (the
    /// router logits move with the learning rate; DeepSeek-V3 drops gamma to 0 for its
    /// last tokens).
    #[serde(default)]
    pub router_bias_update_follows_lr: bool,
    /// `noaux_bias`: how far each bias moves per update: `sign` (DeepSeek-V3:
    /// `gamma * sign(mean_load - load_i)`) or `proportional` (`gamma * (mean_load -
    /// load_i) / mean_load`: a step that shrinks as the expert nears its share).
    #[serde(default = "default_bias_update_rule")]
    pub router_bias_update_rule: BiasUpdateRule,
    /// Training: the routers' gate weights (`mlp.gate.weight`) stay at their initial
    /// values for the first this-many steps while everything else trains; for
    /// `noaux_bias` a bias-only warm-up (the biases settle the load before the gate
    /// learns). 0 = off.
    #[serde(default)]
    pub router_gate_frozen_steps: u64,
    /// Weight of DeepSeek-V3's complementary sequence-wise balance loss `sum_e f_e P_e`
    /// (per sequence: `f_e = E / (k T) * slots chosen for e`, `P_e` = mean over the
    /// sequence's tokens of the scores normalised to sum 1; averaged over sequences),
    /// for any router; DeepSeek-V3 uses 1e-4 beside `noaux_bias`. 0 = off.
    #[serde(default)]
    pub router_seq_aux_loss_coef: f64,

    /// MLA (DeepSeek V2/V3 multi-head latent attention) when set: keys and values come
    /// from a per-token latent of this rank (`kv_a_proj_with_mqa` -> RMSNorm ->
    /// `kv_b_proj`), and the KV cache holds only the latent plus one shared RoPE key
    /// (`kv_lora_rank + qk_rope_head_dim` values per token). Absent = q/k/v projections.
    #[serde(default)]
    pub kv_lora_rank: Option<usize>,
    /// MLA: rank of the query latent (`q_a_proj` -> RMSNorm -> `q_b_proj`); absent = one
    /// `q_proj`.
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    /// MLA: per-head query/key dimensions without position (from the latent).
    #[serde(default)]
    pub qk_nope_head_dim: usize,
    /// MLA: per-head query dimensions with RoPE, and the width of the shared RoPE key.
    #[serde(default)]
    pub qk_rope_head_dim: usize,
    /// MLA: per-head value dimension.
    #[serde(default)]
    pub v_head_dim: usize,
    /// MLA: RoPE on interleaved pairs (DeepSeek's layout, HF `rope_interleave`, default
    /// true) instead of first-half / second-half.
    #[serde(default = "default_true")]
    pub rope_interleave: bool,

    /// Attention kind per layer (length `num_hidden_layers`); absent = all `dense`.
    /// Kinds may be mixed, e.g. a dense first layer under DSA layers.
    #[serde(default)]
    pub layer_types: Option<Vec<AttentionKind>>,
    /// `dsa`: positions each query attends to (k). With at most k cached positions the
    /// layer computes exactly dense attention.
    #[serde(default)]
    pub index_topk: usize,
    /// `dsa`: which indexer scores the cache.
    #[serde(default = "default_indexer_kind")]
    pub indexer_kind: IndexerKind,
    /// `lightning`: index query heads per token.
    #[serde(default)]
    pub index_n_heads: usize,
    /// Dimension of the index query / key (the gate query / key of `mlp_gate`).
    #[serde(default)]
    pub index_head_dim: usize,
    /// `lightning`: leading dimensions of the index q and k that get (non-interleaved)
    /// RoPE; even, at most `index_head_dim`. DeepSeek-V3.2 uses 64 of 128.
    #[serde(default)]
    pub index_rope_head_dim: usize,
    /// `mlp_gate`: hidden width of the gate MLP.
    #[serde(default)]
    pub index_gate_intermediate_size: usize,
    /// How the indexer trains after the warm-up (see `IndexerTrainMode`).
    #[serde(default = "default_indexer_mode")]
    pub indexer_train_mode: IndexerTrainMode,
    /// Optimizer steps of `dense_warmup` before `indexer_train_mode` takes over.
    #[serde(default)]
    pub indexer_dense_warmup_steps: u64,
    /// Weight of the indexer KL loss (mean over DSA layers) added to the LM loss.
    #[serde(default = "default_kl_coef")]
    pub indexer_kl_coef: f64,
    /// How the KL target combines the main attention's heads (see `IndexerKlTarget`).
    #[serde(default)]
    pub indexer_kl_target: IndexerKlTarget,
    /// Precision of the index key cache (and of the keys the selection scans in every
    /// path, so training, prefill and decode select alike; `int8` rounds the index
    /// queries too and scores in integers).
    #[serde(default = "default_index_cache_dtype")]
    pub index_cache_dtype: IndexCacheDtype,
    /// Precision of the key / value cache the engine decodes from (`float16`: half the
    /// bytes per token and per decode step, rows rounded once when written; training and
    /// whole-window forwards do not use the cache).
    #[serde(default = "default_kv_cache_dtype")]
    pub kv_cache_dtype: KvCacheDtype,

    /// DeepSeek-V4 (`compressed_sparse_attention` / `heavily_compressed_attention`
    /// layers): source tokens per compressed entry of each compressed layer type.
    #[serde(default)]
    pub compress_rates: Option<CompressRates>,
    /// DeepSeek-V4: RoPE base of the compressed layers, for the whole layer (its
    /// queries, window keys, compressed entries and indexer); sliding layers use
    /// `rope_theta`.
    #[serde(default = "default_compress_rope_theta")]
    pub compress_rope_theta: f64,
    /// DeepSeek-V4: YaRN scaling of the compressed layers' RoPE; absent = plain RoPE.
    #[serde(default)]
    pub compress_rope_yarn: Option<Yarn>,
    /// DeepSeek-V4: positions of the window every V4 layer attends to (the query's own
    /// and the `sliding_window - 1` before it).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// DeepSeek-V4: head groups of the grouped low-rank output projection (`o_a_proj`
    /// maps each group's heads to `o_lora_rank`, `o_b_proj` mixes the groups).
    #[serde(default)]
    pub o_groups: Option<usize>,
    /// DeepSeek-V4: per-group rank of the grouped output projection.
    #[serde(default)]
    pub o_lora_rank: usize,
    /// Manifold-constrained hyper-connections (DeepSeek-V4) when set: the residual is
    /// this many streams, mixed into and out of every attention and FFN half by learned
    /// pre / post / combination weights (`attn_hc`, `ffn_hc`, `model.hc_head`);
    /// absent = one plain residual stream.
    #[serde(default)]
    pub hc_mult: Option<usize>,
    /// Hyper-connections: Sinkhorn-Knopp iterations making the combination matrix
    /// doubly stochastic.
    #[serde(default = "default_hc_sinkhorn_iters")]
    pub hc_sinkhorn_iters: usize,
    /// Hyper-connections: epsilon added to the pre and combination weights and to the
    /// Sinkhorn normalisers.
    #[serde(default = "default_hc_eps")]
    pub hc_eps: f64,
    /// Per layer: `moe` (the router picks) or `hash_moe` (the `tid2eid` table picks);
    /// absent = all `moe`.
    #[serde(default)]
    pub mlp_layer_types: Option<Vec<MlpKind>>,
    /// Clamp of the SwiGLU in routed and shared experts (DeepSeek-V4): the gate's
    /// pre-activation at most this, the up projection within +-this; absent = none.
    #[serde(default)]
    pub swiglu_limit: Option<f64>,
    /// The router's score function (HF `scoring_func`); absent = the router kind's own
    /// (`noaux_bias`: sigmoid, others softmax). `sqrtsoftplus` is DeepSeek-V4's.
    #[serde(default)]
    pub scoring_func: Option<ScoringFunc>,

    /// Token id of the beginning-of-sequence special token.
    #[serde(default = "default_bos")]
    pub bos_token_id: u32,
    /// Token id of the end-of-sequence special token (also the document separator).
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn positive_finite(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

impl ModelConfig {
    /// Parse and validate a config from JSON text; `source` names it in errors.
    pub fn from_json(text: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg: ModelConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "<root>".to_string()
            } else {
                path
            };
            Error::config(field, e.into_inner().to_string())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Load and validate `config.json` (or any config file).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_at(&text, path)
    }

    /// `from_json` of text read from `path`; config errors name the file.
    pub fn from_json_at(text: &str, path: &Path) -> Result<Self> {
        Self::from_json(text).map_err(|e| match e {
            Error::Config { field, message } => Error::Config {
                field,
                message: format!("{message} (in {})", path.display()),
            },
            other => other,
        })
    }

    /// Serialize as pretty JSON (the `config.json` of a model directory).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("ModelConfig serializes")
    }

    /// Check every cross-field constraint; the error names the field to fix.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::config(field, "must be > 0"));
            }
        }
        let h = self.num_attention_heads;
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(h) {
            return Err(Error::config(
                "num_attention_heads",
                format!(
                    "{h} heads do not divide hidden_size {} (set head_dim explicitly or pick a divisor)",
                    self.hidden_size
                ),
            ));
        }
        if self.head_dim == Some(0) {
            return Err(Error::config("head_dim", "must be > 0"));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::config(
                "head_dim",
                format!("RoPE needs an even head dimension, got {}", self.head_dim()),
            ));
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !h.is_multiple_of(kv) {
            return Err(Error::config(
                "num_key_value_heads",
                format!("{kv} must be > 0 and divide num_attention_heads {h}"),
            ));
        }
        if !positive_finite(self.rope_theta) {
            return Err(Error::config("rope_theta", "must be > 0"));
        }
        if !positive_finite(self.rms_norm_eps) {
            return Err(Error::config("rms_norm_eps", "must be > 0"));
        }
        if !positive_finite(self.initializer_range) {
            return Err(Error::config("initializer_range", "must be > 0"));
        }
        if !(self.router_aux_loss_coef.is_finite() && self.router_aux_loss_coef >= 0.0) {
            return Err(Error::config("router_aux_loss_coef", "must be >= 0"));
        }
        self.validate_router()?;
        self.validate_mla()?;
        let has_dense_layer = self.n_routed_experts == 0 || self.first_k_dense_replace > 0;
        if has_dense_layer && self.intermediate_size == 0 {
            return Err(Error::config(
                "intermediate_size",
                "must be > 0 (some layers use the dense FFN)",
            ));
        }
        if self.n_routed_experts > 0 {
            if self.num_experts_per_tok == 0 {
                return Err(Error::config(
                    "num_experts_per_tok",
                    "must be >= 1 when n_routed_experts > 0",
                ));
            }
            if self.num_experts_per_tok > self.n_routed_experts {
                return Err(Error::config(
                    "num_experts_per_tok",
                    format!(
                        "{} exceeds n_routed_experts {}",
                        self.num_experts_per_tok, self.n_routed_experts
                    ),
                ));
            }
            if self.moe_intermediate_size == 0 {
                return Err(Error::config(
                    "moe_intermediate_size",
                    "must be > 0 when n_routed_experts > 0",
                ));
            }
        }
        self.validate_attention()?;
        self.validate_v4()?;
        for (field, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if id as usize >= self.vocab_size {
                return Err(Error::config(
                    field,
                    format!("{id} is outside vocab_size {}", self.vocab_size),
                ));
            }
        }
        Ok(())
    }

    /// Per-head dimension D.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Key/value heads KV (defaults to H).
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
}
