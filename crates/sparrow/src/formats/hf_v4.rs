//! Hugging Face `deepseek_v4` (`DeepseekV4ForCausalLM`): its `config.json` read into a
//! `ModelConfig` and written back, and its tensor names.
//!
//! Checkpoints use DeepSeek's own names (what `save_pretrained` writes and the hub
//! ships: `layers.{i}.attn.wq_a`, `ffn.experts.{e}.w1`, `hc_attn_fn`, `head.weight`, with
//! or without a `model.` prefix); Sparrow's module paths are transformers' module names
//! (`self_attn.q_a_proj`, `mlp.experts.{e}.gate_proj`, `attn_hc.fn`, `lm_head.weight`).
//! The multi-token-prediction layers (`mtp.*`) are not part of the model and are
//! skipped, as transformers does. `ffn.gate.tid2eid` (int64 in files) is held as floats
//! (exact for any expert id below 2^24) and written back as int64.

use crate::config::{
    AttentionKind, CompressRates, MlpKind, ModelConfig, RouterKind, ScoringFunc, Yarn,
};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use serde::Deserialize;
use serde_json::Value;

fn one() -> usize {
    1
}
fn default_hc_mult() -> usize {
    4
}
fn default_sinkhorn() -> usize {
    20
}
fn default_hc_eps() -> f64 {
    1e-6
}
fn default_eps() -> f64 {
    1e-6
}
fn default_scaling() -> f64 {
    1.5
}
fn default_compress_theta() -> f64 {
    160_000.0
}
fn default_swiglu_limit() -> f64 {
    10.0
}

/// The fields of a `deepseek_v4` `config.json` that Sparrow reads (defaults as
/// transformers' `DeepseekV4Config`; others are ignored).
#[derive(Debug, Deserialize)]
struct V4Like {
    vocab_size: usize,
    hidden_size: usize,
    moe_intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    head_dim: usize,
    q_lora_rank: usize,
    num_experts_per_tok: usize,
    n_routed_experts: usize,
    #[serde(default = "one")]
    n_shared_experts: usize,
    #[serde(default)]
    scoring_func: Option<String>,
    #[serde(default = "default_scaling")]
    routed_scaling_factor: f64,
    max_position_embeddings: usize,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    #[serde(default)]
    qk_rope_head_dim: Option<usize>,
    #[serde(default)]
    layer_types: Option<Vec<AttentionKind>>,
    #[serde(default)]
    compress_ratios: Option<Vec<usize>>,
    #[serde(default)]
    compress_rates: Option<CompressRates>,
    #[serde(default)]
    compress_rate_csa: Option<usize>,
    #[serde(default)]
    compress_rate_hca: Option<usize>,
    #[serde(default = "default_compress_theta")]
    compress_rope_theta: f64,
    #[serde(default = "default_hc_mult")]
    hc_mult: usize,
    #[serde(default = "default_sinkhorn")]
    hc_sinkhorn_iters: usize,
    #[serde(default = "default_hc_eps")]
    hc_eps: f64,
    #[serde(default)]
    mlp_layer_types: Option<Vec<MlpKind>>,
    #[serde(default)]
    num_hash_layers: Option<usize>,
    #[serde(default = "default_swiglu_limit")]
    swiglu_limit: f64,
    sliding_window: usize,
    o_groups: usize,
    o_lora_rank: usize,
    index_n_heads: usize,
    index_head_dim: usize,
    index_topk: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    initializer_range: Option<f64>,
    #[serde(default)]
    bos_token_id: Option<Value>,
    #[serde(default)]
    eos_token_id: Option<Value>,
}

/// The layer type of a legacy `compress_ratios` entry (transformers' fixed map).
fn legacy_layer_type(ratio: usize) -> Result<AttentionKind> {
    Ok(match ratio {
        0 => AttentionKind::SlidingAttention,
        4 => AttentionKind::CompressedSparseAttention,
        128 => AttentionKind::HeavilyCompressedAttention,
        other => {
            return Err(Error::config(
                "compress_ratios",
                format!("{other} is not one of 0, 4, 128"),
            ))
        }
    })
}

/// The compressed layers' YaRN from `rope_parameters` (nested `compress`, or flat) or
/// legacy `rope_scaling`; (main theta, compress theta, YaRN).
fn rope_of(hf: &V4Like) -> Result<(f64, f64, Option<Yarn>)> {
    let rp = hf.rope_parameters.as_ref().filter(|v| !v.is_null());
    let nested = rp.and_then(|v| Some((v.get("main")?, v.get("compress")?)));
    let (main_theta, compress) = match nested {
        Some((main, compress)) => {
            let kind = main
                .get("rope_type")
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                return Err(Error::config(
                    "rope_parameters.main.rope_type",
                    format!("`{kind}` is not supported (only `default`)"),
                ));
            }
            let theta = main.get("rope_theta").and_then(Value::as_f64);
            (theta, Some(compress.clone()))
        }
        None => {
            let flat = rp.or(hf.rope_scaling.as_ref().filter(|v| !v.is_null()));
            (None, flat.cloned())
        }
    };
    let main_theta = main_theta.or(hf.rope_theta).unwrap_or(10_000.0);
    let Some(c) = compress else {
        return Ok((main_theta, hf.compress_rope_theta, None));
    };
    let theta = if nested.is_some() {
        c.get("rope_theta")
            .and_then(Value::as_f64)
            .unwrap_or(hf.compress_rope_theta)
    } else {
        hf.compress_rope_theta
    };
    let kind = c
        .get("rope_type")
        .or_else(|| c.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok((main_theta, theta, None)),
        "yarn" => {
            if c.get("mscale").is_some_and(|v| !v.is_null())
                || c.get("mscale_all_dim").is_some_and(|v| !v.is_null())
            {
                return Err(Error::config(
                    "rope_parameters.compress",
                    "YaRN with mscale / mscale_all_dim is not supported",
                ));
            }
            let num = |k: &str| c.get(k).and_then(Value::as_f64);
            let factor = num("factor").ok_or_else(|| {
                Error::config("rope_parameters.compress.factor", "YaRN needs its factor")
            })?;
            let original = num("original_max_position_embeddings").ok_or_else(|| {
                Error::config(
                    "rope_parameters.compress.original_max_position_embeddings",
                    "YaRN needs it",
                )
            })?;
            // transformers' V4 config forces 1.0 unless given (the reference does not
            // scale cos / sin).
            Ok((
                main_theta,
                theta,
                Some(Yarn {
                    factor,
                    original_max_position_embeddings: original as usize,
                    beta_fast: num("beta_fast").filter(|&b| b != 0.0).unwrap_or(32.0),
                    beta_slow: num("beta_slow").filter(|&b| b != 0.0).unwrap_or(1.0),
                    attention_factor: num("attention_factor").unwrap_or(1.0),
                    truncate: c.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                }),
            ))
        }
        other => Err(Error::config(
            "rope_parameters.compress.rope_type",
            format!("`{other}` is not supported (default, yarn)"),
        )),
    }
}

/// A `deepseek_v4` config text as a validated `ModelConfig`.
pub fn parse_config(text: &str, path: &std::path::Path) -> Result<ModelConfig> {
    let hf: V4Like = super::hf_fields::parse_fields(text, path)?;
    if hf.attention_bias || hf.mlp_bias {
        return Err(Error::config(
            "attention_bias",
            "projections with biases are not supported",
        ));
    }
    if let Some(act) = hf.hidden_act.as_deref().filter(|a| *a != "silu") {
        return Err(Error::config(
            "hidden_act",
            format!("`{act}` is not supported (SwiGLU needs silu)"),
        ));
    }
    let n = hf.num_hidden_layers;
    let mut rates = hf.compress_rates.unwrap_or(CompressRates {
        compressed_sparse_attention: 4,
        heavily_compressed_attention: 128,
    });
    if let Some(r) = hf.compress_rate_csa {
        rates.compressed_sparse_attention = r;
    }
    if let Some(r) = hf.compress_rate_hca {
        rates.heavily_compressed_attention = r;
    }
    let layer_types = match (&hf.layer_types, &hf.compress_ratios) {
        (Some(t), _) => t.clone(),
        (None, Some(r)) => r
            .iter()
            .map(|&x| legacy_layer_type(x))
            .collect::<Result<_>>()?,
        // transformers' V4-Pro default: 2 HCA, then CSA / HCA alternating.
        (None, None) => (0..n)
            .map(|i| match i {
                0 | 1 => AttentionKind::HeavilyCompressedAttention,
                i if (i - 2) % 2 == 1 => AttentionKind::CompressedSparseAttention,
                _ => AttentionKind::HeavilyCompressedAttention,
            })
            .collect(),
    };
    let mlp_layer_types = match &hf.mlp_layer_types {
        Some(t) => t.clone(),
        None => {
            let hashed = hf.num_hash_layers.unwrap_or(3).min(n);
            (0..n)
                .map(|i| {
                    if i < hashed {
                        MlpKind::HashMoe
                    } else {
                        MlpKind::Moe
                    }
                })
                .collect()
        }
    };
    let rope_dims = match (hf.partial_rotary_factor, hf.qk_rope_head_dim) {
        (Some(f), _) => (hf.head_dim as f64 * f) as usize,
        (None, Some(r)) => r,
        (None, None) => hf.head_dim / 8,
    };
    let scoring = match hf.scoring_func.as_deref().unwrap_or("sqrtsoftplus") {
        "sqrtsoftplus" => ScoringFunc::Sqrtsoftplus,
        "sigmoid" => ScoringFunc::Sigmoid,
        "softmax" => ScoringFunc::Softmax,
        other => {
            return Err(Error::config(
                "scoring_func",
                format!("`{other}` is not supported (sqrtsoftplus, sigmoid, softmax)"),
            ))
        }
    };
    let (rope_theta, compress_rope_theta, yarn) = rope_of(&hf)?;
    let json = serde_json::json!({
        "model_type": "sparrow",
        "vocab_size": hf.vocab_size,
        "hidden_size": hf.hidden_size,
        "intermediate_size": hf.moe_intermediate_size,
        "num_hidden_layers": n,
        "num_attention_heads": hf.num_attention_heads,
        "num_key_value_heads": hf.num_key_value_heads.unwrap_or(1),
        "head_dim": hf.head_dim,
        "max_position_embeddings": hf.max_position_embeddings,
        "rope_theta": rope_theta,
        "rms_norm_eps": hf.rms_norm_eps,
        "tie_word_embeddings": hf.tie_word_embeddings,
        "initializer_range": hf.initializer_range.unwrap_or(0.02),
        "n_routed_experts": hf.n_routed_experts,
        "num_experts_per_tok": hf.num_experts_per_tok,
        "n_shared_experts": hf.n_shared_experts,
        "moe_intermediate_size": hf.moe_intermediate_size,
        "first_k_dense_replace": 0,
        // V4's routers always renormalise the chosen experts' scores.
        "norm_topk_prob": true,
        "router_kind": RouterKind::NoauxBias.name(),
        "routed_scaling_factor": hf.routed_scaling_factor,
        "scoring_func": scoring,
        "q_lora_rank": hf.q_lora_rank,
        "qk_rope_head_dim": rope_dims,
        "layer_types": layer_types,
        "compress_rates": rates,
        "compress_rope_theta": compress_rope_theta,
        "compress_rope_yarn": yarn,
        "sliding_window": hf.sliding_window,
        "o_groups": hf.o_groups,
        "o_lora_rank": hf.o_lora_rank,
        "hc_mult": hf.hc_mult,
        "hc_sinkhorn_iters": hf.hc_sinkhorn_iters,
        "hc_eps": hf.hc_eps,
        "mlp_layer_types": mlp_layer_types,
        "swiglu_limit": hf.swiglu_limit,
        "index_n_heads": hf.index_n_heads,
        "index_head_dim": hf.index_head_dim,
        "index_topk": hf.index_topk,
        "bos_token_id": super::hf_fields::token_id(&hf.bos_token_id, "bos_token_id", 0)?,
        "eos_token_id": super::hf_fields::token_id(&hf.eos_token_id, "eos_token_id", 1)?,
    });
    ModelConfig::from_json(&json.to_string())
}

/// Why `cfg` has no exact `deepseek_v4` form, if it has none.
pub fn check_exportable(cfg: &ModelConfig) -> Result<()> {
    let why = if cfg.hc_mult.is_none() {
        Some(("hc_mult", "deepseek_v4 always has hyper-connections"))
    } else if cfg.n_routed_experts == 0 || cfg.first_k_dense_replace > 0 {
        Some(("n_routed_experts", "deepseek_v4 has MoE in every layer"))
    } else if cfg.router_kind != RouterKind::NoauxBias || cfg.n_group != 1 {
        Some((
            "router_kind",
            "deepseek_v4 routes with noaux_bias, one group",
        ))
    } else if cfg.router_scoring() == ScoringFunc::Softmax {
        Some((
            "scoring_func",
            "deepseek_v4 scores with sqrtsoftplus or sigmoid",
        ))
    } else if !cfg.norm_topk_prob {
        Some(("norm_topk_prob", "deepseek_v4 always renormalises"))
    } else if cfg.n_shared_experts != 1 {
        Some(("n_shared_experts", "deepseek_v4 has one shared expert"))
    } else if cfg.swiglu_limit.is_none() {
        Some(("swiglu_limit", "deepseek_v4 always clamps the SwiGLU"))
    } else {
        None
    };
    match why {
        Some((field, msg)) => Err(Error::config(field, msg)),
        None => Ok(()),
    }
}

/// `config.json` of `cfg` as transformers' `DeepseekV4Config` writes it.
pub fn hf_config(cfg: &ModelConfig, v: &mut Value) -> Result<()> {
    check_exportable(cfg)?;
    let d = cfg.head_dim();
    let factor = cfg.qk_rope_head_dim as f64 / d as f64;
    let mut compress = serde_json::json!({
        "rope_type": "default",
        "rope_theta": cfg.compress_rope_theta,
        "partial_rotary_factor": factor,
    });
    if let Some(y) = &cfg.compress_rope_yarn {
        compress = serde_json::json!({
            "rope_type": "yarn",
            "rope_theta": cfg.compress_rope_theta,
            "partial_rotary_factor": factor,
            "factor": y.factor,
            "original_max_position_embeddings": y.original_max_position_embeddings,
            "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow,
            "attention_factor": y.attention_factor,
            "truncate": y.truncate,
        });
    }
    let layer_types: Vec<AttentionKind> = (0..cfg.num_hidden_layers)
        .map(|i| cfg.attention_kind(i))
        .collect();
    let mlp_types: Vec<MlpKind> = (0..cfg.num_hidden_layers)
        .map(|i| cfg.mlp_kind(i))
        .collect();
    let fields = serde_json::json!({
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "head_dim": d,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "n_routed_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_shared_experts": cfg.n_shared_experts,
        "scoring_func": cfg.router_scoring(),
        "norm_topk_prob": true,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "q_lora_rank": cfg.q_lora_rank,
        "partial_rotary_factor": factor,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "rope_parameters": {
            "main": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor},
            "compress": compress,
        },
        "layer_types": layer_types,
        "compress_rates": cfg.compress_rates,
        "compress_rope_theta": cfg.compress_rope_theta,
        "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "hc_eps": cfg.hc_eps,
        "mlp_layer_types": mlp_types,
        "swiglu_limit": cfg.swiglu_limit,
        "sliding_window": cfg.sliding_window,
        "o_groups": cfg.o_groups,
        "o_lora_rank": cfg.o_lora_rank,
        "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim,
        "index_topk": cfg.index_topk,
        "num_nextn_predict_layers": 0,
        "attention_bias": false,
        "mlp_bias": false,
    });
    if let (Some(obj), Value::Object(add)) = (v.as_object_mut(), fields) {
        obj.remove("intermediate_size");
        obj.remove("rope_theta");
        obj.extend(add);
        obj.insert("rope_theta".into(), cfg.rope_theta.into());
    }
    Ok(())
}

/// DeepSeek's name of each layer-level tensor, and Sparrow's: (file suffix, ours).
const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("hc_attn_fn", "attn_hc.fn"),
    ("hc_attn_base", "attn_hc.base"),
    ("hc_attn_scale", "attn_hc.scale"),
    ("hc_ffn_fn", "ffn_hc.fn"),
    ("hc_ffn_base", "ffn_hc.base"),
    ("hc_ffn_scale", "ffn_hc.scale"),
    ("attn.attn_sink", "self_attn.sinks"),
    ("attn.wq_a.weight", "self_attn.q_a_proj.weight"),
    ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    ("attn.wq_b.weight", "self_attn.q_b_proj.weight"),
    ("attn.wkv.weight", "self_attn.kv_proj.weight"),
    ("attn.norm.weight", "self_attn.kv_norm.weight"),
    ("attn.wo_a.weight", "self_attn.o_a_proj.weight"),
    ("attn.wo_b.weight", "self_attn.o_b_proj.weight"),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    (
        "attn.compressor.wkv.weight",
        "self_attn.compressor.kv_proj.weight",
    ),
    (
        "attn.compressor.wgate.weight",
        "self_attn.compressor.gate_proj.weight",
    ),
    (
        "attn.compressor.norm.weight",
        "self_attn.compressor.kv_norm.weight",
    ),
    (
        "attn.indexer.compressor.ape",
        "self_attn.compressor.indexer.position_bias",
    ),
    (
        "attn.indexer.compressor.wkv.weight",
        "self_attn.compressor.indexer.kv_proj.weight",
    ),
    (
        "attn.indexer.compressor.wgate.weight",
        "self_attn.compressor.indexer.gate_proj.weight",
    ),
    (
        "attn.indexer.compressor.norm.weight",
        "self_attn.compressor.indexer.kv_norm.weight",
    ),
    (
        "attn.indexer.wq_b.weight",
        "self_attn.compressor.indexer.q_b_proj.weight",
    ),
    (
        "attn.indexer.weights_proj.weight",
        "self_attn.compressor.indexer.scorer.weights_proj.weight",
    ),
    ("ffn.gate.weight", "mlp.gate.weight"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    (
        "ffn.shared_experts.w1.weight",
        "mlp.shared_experts.gate_proj.weight",
    ),
    (
        "ffn.shared_experts.w3.weight",
        "mlp.shared_experts.up_proj.weight",
    ),
    (
        "ffn.shared_experts.w2.weight",
        "mlp.shared_experts.down_proj.weight",
    ),
];

/// Model-level tensors: (file names accepted, ours). The first file name is written.
const TOP_NAMES: &[(&[&str], &str)] = &[
    (
        &["model.embed_tokens.weight", "embed.weight"],
        "model.embed_tokens.weight",
    ),
    (&["head.weight", "lm_head.weight"], "lm_head.weight"),
    (&["model.norm.weight", "norm.weight"], "model.norm.weight"),
    (
        &["model.hc_head.hc_fn", "hc_head_fn"],
        "model.hc_head.hc_fn",
    ),
    (
        &["model.hc_head.hc_base", "hc_head_base"],
        "model.hc_head.hc_base",
    ),
    (
        &["model.hc_head.hc_scale", "hc_head_scale"],
        "model.hc_head.hc_scale",
    ),
];

/// Expert tensors: (file suffix after `experts.{e}.`, ours).
const EXPERT_NAMES: &[(&str, &str)] = &[
    ("w1.weight", "gate_proj.weight"),
    ("w3.weight", "up_proj.weight"),
    ("w2.weight", "down_proj.weight"),
];

/// (layer index, the rest) of `layers.{i}.rest`.
fn split_layer(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix("layers.")?;
    let dot = rest.find('.')?;
    Some((&rest[..dot], &rest[dot + 1..]))
}

/// Sparrow's name of a tensor in a `deepseek_v4` file; None for tensors that are not
/// part of the model (`mtp.*`). Unknown names pass through unchanged (the loader then
/// reports them as unexpected).
pub fn sparrow_name(name: &str) -> Option<String> {
    if let Some((_, ours)) = TOP_NAMES.iter().find(|(files, _)| files.contains(&name)) {
        return Some(ours.to_string());
    }
    let bare = name.strip_prefix("model.").unwrap_or(name);
    if bare.starts_with("mtp.") {
        return None;
    }
    let Some((layer, rest)) = split_layer(bare) else {
        return Some(name.to_string());
    };
    let ours = if let Some((_, o)) = LAYER_NAMES.iter().find(|(f, _)| *f == rest) {
        o.to_string()
    } else if let Some(expert) = rest.strip_prefix("ffn.experts.") {
        let Some((e, tail)) = expert.split_once('.') else {
            return Some(name.to_string());
        };
        match EXPERT_NAMES.iter().find(|(f, _)| *f == tail) {
            Some((_, o)) => format!("mlp.experts.{e}.{o}"),
            None => return Some(name.to_string()),
        }
    } else {
        return Some(name.to_string());
    };
    Some(format!("model.layers.{layer}.{ours}"))
}

/// The `deepseek_v4` file name of a Sparrow tensor (inverse of [`sparrow_name`]), as
/// transformers' `save_pretrained` writes it.
pub fn hf_name(name: &str) -> String {
    if let Some((files, _)) = TOP_NAMES.iter().find(|(_, o)| *o == name) {
        return files[0].to_string();
    }
    let Some((layer, rest)) = name.strip_prefix("model.").and_then(split_layer) else {
        return name.to_string();
    };
    if let Some((f, _)) = LAYER_NAMES.iter().find(|(_, o)| *o == rest) {
        return format!("model.layers.{layer}.{f}");
    }
    if let Some(expert) = rest.strip_prefix("mlp.experts.") {
        if let Some((e, tail)) = expert.split_once('.') {
            if let Some((f, _)) = EXPERT_NAMES.iter().find(|(_, o)| *o == tail) {
                return format!("model.layers.{layer}.ffn.experts.{e}.{f}");
            }
        }
    }
    name.to_string()
}

/// Whether a Sparrow tensor is an expert table.
fn is_table(name: &str) -> bool {
    name.ends_with(".mlp.gate.tid2eid")
}

/// A tensor read from a file as Sparrow holds it: expert tables (int64) as f32.
pub fn import_tensor(name: &str, t: Tensor) -> Result<Tensor> {
    if is_table(name) && !t.dtype().is_float() {
        return Ok(t.to_dtype(DType::F32)?);
    }
    Ok(t)
}

/// A tensor as the file holds it: expert tables as int64.
pub fn export_tensor(name: &str, t: Tensor) -> Result<Tensor> {
    if is_table(name) {
        return Ok(t.to_dtype(DType::I64)?);
    }
    Ok(t)
}
