//! `ModelConfig`: one typed description of a Sparrow model, deserialized straight from
//! a Hugging Face style `config.json` (HF field names wherever HF has one). Our own
//! switches are explicit fields with documented defaults; nothing is inferred from a
//! size. `ModelConfig::from_json` validates every field and names the offending one.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How an MoE layer's router picks experts for each token. More kinds slot in here
/// (DESIGN.md §4: `switch_capacity`, `capacity_aware`, `noaux_bias`, `hash`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterKind {
    /// Mixtral: softmax over experts, top-k, optionally renormalised
    /// (`norm_topk_prob`); Switch load-balancing auxiliary loss.
    TopkSoftmax,
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
fn default_aux_coef() -> f64 {
    0.01
}
fn default_bos() -> u32 {
    crate::tokenizer::BOS_ID
}
fn default_eos() -> u32 {
    crate::tokenizer::EOS_ID
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
    /// Weight of the load-balancing auxiliary loss added to the LM loss in training.
    #[serde(default = "default_aux_coef")]
    pub router_aux_loss_coef: f64,

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
        Self::from_json(&text).map_err(|e| match e {
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

    /// Whether layer `i` has an MoE FFN (otherwise dense SwiGLU).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.n_routed_experts > 0 && i >= self.first_k_dense_replace
    }

    /// Parameter counts: (total, active per token). Active counts the k routed experts
    /// a token uses plus everything dense; embeddings count once when tied.
    pub fn parameter_counts(&self) -> (usize, usize) {
        let c = self.hidden_size;
        let d = self.head_dim();
        let attn = c * self.num_attention_heads * d * 2 + c * self.num_kv_heads() * d * 2;
        let norms = 2 * c;
        let swiglu = |width: usize| 3 * c * width;
        let mut total = 0;
        let mut active = 0;
        for i in 0..self.num_hidden_layers {
            total += attn + norms;
            active += attn + norms;
            if self.is_moe_layer(i) {
                let e = swiglu(self.moe_intermediate_size);
                let shared = swiglu(self.moe_intermediate_size * self.n_shared_experts);
                let router = c * self.n_routed_experts;
                total += e * self.n_routed_experts + shared + router;
                active += e * self.num_experts_per_tok + shared + router;
            } else {
                total += swiglu(self.intermediate_size);
                active += swiglu(self.intermediate_size);
            }
        }
        let embed = self.vocab_size * c;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        total += embed + head + c;
        active += embed + head + c;
        (total, active)
    }
}
