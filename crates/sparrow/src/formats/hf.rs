//! Hugging Face model directories (DESIGN.md §5): reading `config.json` of another
//! `model_type` into a `ModelConfig`, mapping its tensor names onto Sparrow's module
//! paths, and reading single-file or sharded (`model.safetensors.index.json`) weights.
//!
//! Families read so far:
//! - `sparrow`: our own config, names unchanged.
//! - `llama` (`LlamaForCausalLM`): the same module names as ours; RoPE non-interleaved
//!   (`rotate_half`), SwiGLU, RMSNorm, MHA / GQA / MQA, tied or untied head.
//! - `mixtral` (`MixtralForCausalLM`): every layer MoE with softmax top-k renormalised
//!   (`topk_softmax`); `block_sparse_moe.gate` -> `mlp.gate`,
//!   `block_sparse_moe.experts.{e}.w1 / w3 / w2` -> `mlp.experts.{e}.gate_proj / up_proj /
//!   down_proj`.
//!
//! - `deepseek_v3` (`DeepseekV3ForCausalLM`): MLA attention (`model::mla`), the
//!   `noaux_tc` sigmoid router with `e_score_correction_bias` and groups (`noaux_bias`),
//!   shared experts, dense first layers; names identical to ours.
//! - `deepseek_v32`: V3 plus the lightning indexer in every layer.
//! - `deepseek_v4` (`DeepseekV4ForCausalLM`): `formats::hf_v4` (config, DeepSeek's
//!   tensor names).
//!
//! Anything these families allow that Sparrow does not compute (biases, RoPE scaling,
//! sliding windows, other activations) is a precise error naming the field, never a
//! silently different model.

use super::hf_fields::{parse_fields, token_id};
use crate::config::{ModelConfig, RouterKind};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Which checkpoint layout a model directory uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Sparrow,
    Llama,
    Mixtral,
    DeepseekV3,
    DeepseekV32,
    DeepseekV4,
}

impl Family {
    /// The HF `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Sparrow => "sparrow",
            Family::Llama => "llama",
            Family::Mixtral => "mixtral",
            Family::DeepseekV3 => "deepseek_v3",
            Family::DeepseekV32 => "deepseek_v32",
            Family::DeepseekV4 => "deepseek_v4",
        }
    }
}

/// The fields of a Llama / Mixtral `config.json` that Sparrow reads (others are ignored).
#[derive(Debug, Deserialize)]
struct LlamaLike {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    /// transformers < 5 spelling.
    #[serde(default)]
    rope_theta: Option<f64>,
    /// transformers >= 5 spelling: {"rope_theta": .., "rope_type": "default"}.
    #[serde(default)]
    rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    initializer_range: Option<f64>,
    #[serde(default)]
    bos_token_id: Option<Value>,
    #[serde(default)]
    eos_token_id: Option<Value>,
    // Mixtral
    #[serde(default)]
    num_local_experts: Option<usize>,
    #[serde(default)]
    num_experts_per_tok: Option<usize>,
    #[serde(default)]
    sliding_window: Option<Value>,
    #[serde(default)]
    router_aux_loss_coef: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct RopeParameters {
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_type: Option<String>,
}

/// A string field Sparrow computes for one value only: absent or `want`, else an error
/// naming the field and the value (`why` in parentheses).
fn only(field: &str, got: Option<&str>, want: &str, why: &str) -> Result<()> {
    match got {
        Some(v) if v != want => Err(Error::config(
            field,
            format!("`{v}` is not supported ({why})"),
        )),
        _ => Ok(()),
    }
}

/// Read `config.json` of any supported family into a validated `ModelConfig`.
pub fn read_config(path: &Path) -> Result<(ModelConfig, Family)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_config(&text, path)
}

/// [`read_config`] of a `config.json` text; `path` only names the source in errors
/// (every config error names it).
pub fn parse_config(text: &str, path: &Path) -> Result<(ModelConfig, Family)> {
    parse_config_of(text, path).map_err(|e| match e {
        Error::Config { field, message } if !message.contains(&*path.to_string_lossy()) => {
            Error::Config {
                field,
                message: format!("{message} (in {})", path.display()),
            }
        }
        other => other,
    })
}

fn parse_config_of(text: &str, path: &Path) -> Result<(ModelConfig, Family)> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| Error::config("config.json", format!("{}: {e}", path.display())))?;
    let model_type = v
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("sparrow");
    let family = match model_type {
        "sparrow" => return Ok((ModelConfig::from_json_at(text, path)?, Family::Sparrow)),
        "llama" => Family::Llama,
        "mixtral" => Family::Mixtral,
        "deepseek_v4" => {
            return Ok((super::hf_v4::parse_config(text, path)?, Family::DeepseekV4));
        }
        "deepseek_v3" | "deepseek_v32" => {
            let hf: DeepseekV3Like = parse_fields(text, path)?;
            return if model_type == "deepseek_v32" {
                Ok((from_deepseek_v32(&hf)?, Family::DeepseekV32))
            } else {
                Ok((from_deepseek_v3(&hf)?, Family::DeepseekV3))
            };
        }
        other => {
            return Err(Error::config(
                "model_type",
                format!(
                    "`{other}` is not supported (sparrow, llama, mixtral, deepseek_v3, deepseek_v32, deepseek_v4) in {}",
                    path.display()
                ),
            ))
        }
    };
    let hf: LlamaLike = parse_fields(text, path)?;
    let cfg = from_llama_like(&hf, family)?;
    Ok((cfg, family))
}

fn from_llama_like(hf: &LlamaLike, family: Family) -> Result<ModelConfig> {
    if hf.attention_bias {
        return Err(Error::config(
            "attention_bias",
            "attention projections with biases are not supported",
        ));
    }
    if hf.mlp_bias {
        return Err(Error::config(
            "mlp_bias",
            "MLP projections with biases are not supported",
        ));
    }
    only(
        "hidden_act",
        hf.hidden_act.as_deref(),
        "silu",
        "SwiGLU needs silu",
    )?;
    if hf.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(Error::config(
            "rope_scaling",
            "RoPE scaling is not supported",
        ));
    }
    only(
        "rope_parameters.rope_type",
        hf.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_type.as_deref()),
        "default",
        "only `default`",
    )?;
    if hf.sliding_window.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(Error::config(
            "sliding_window",
            "sliding-window attention is not supported yet",
        ));
    }
    let rope_theta = hf
        .rope_parameters
        .as_ref()
        .and_then(|p| p.rope_theta)
        .or(hf.rope_theta)
        .unwrap_or(10_000.0);
    let mut json = serde_json::json!({
        "model_type": "sparrow",
        "vocab_size": hf.vocab_size,
        "hidden_size": hf.hidden_size,
        "intermediate_size": hf.intermediate_size,
        "num_hidden_layers": hf.num_hidden_layers,
        "num_attention_heads": hf.num_attention_heads,
        "num_key_value_heads": hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        "head_dim": hf.head_dim,
        "max_position_embeddings": hf.max_position_embeddings,
        "rope_theta": rope_theta,
        "rms_norm_eps": hf.rms_norm_eps,
        "tie_word_embeddings": hf.tie_word_embeddings,
        "initializer_range": hf.initializer_range.unwrap_or(0.02),
        "bos_token_id": token_id(&hf.bos_token_id, "bos_token_id", crate::tokenizer::BOS_ID)?,
        "eos_token_id": token_id(&hf.eos_token_id, "eos_token_id", crate::tokenizer::EOS_ID)?,
    });
    if family == Family::Mixtral {
        let e = hf
            .num_local_experts
            .ok_or_else(|| Error::config("num_local_experts", "required for mixtral"))?;
        let k = hf
            .num_experts_per_tok
            .ok_or_else(|| Error::config("num_experts_per_tok", "required for mixtral"))?;
        json["n_routed_experts"] = e.into();
        json["num_experts_per_tok"] = k.into();
        json["moe_intermediate_size"] = hf.intermediate_size.into();
        json["first_k_dense_replace"] = 0.into();
        json["norm_topk_prob"] = true.into();
        json["router_kind"] = RouterKind::TopkSoftmax.name().into();
        if let Some(c) = hf.router_aux_loss_coef {
            json["router_aux_loss_coef"] = c.into();
        }
    }
    ModelConfig::from_json(&json.to_string())
}

/// The fields of a DeepSeek-V3 `config.json` that Sparrow reads (others are ignored).
#[derive(Debug, Deserialize)]
struct DeepseekV3Like {
    #[serde(flatten)]
    base: LlamaLike,
    moe_intermediate_size: usize,
    n_routed_experts: usize,
    #[serde(default)]
    n_shared_experts: usize,
    #[serde(default)]
    first_k_dense_replace: usize,
    #[serde(default = "one")]
    n_group: usize,
    #[serde(default = "one")]
    topk_group: usize,
    #[serde(default = "yes")]
    norm_topk_prob: bool,
    #[serde(default = "one_f64")]
    routed_scaling_factor: f64,
    kv_lora_rank: usize,
    #[serde(default)]
    q_lora_rank: Option<usize>,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    #[serde(default = "yes")]
    rope_interleave: bool,
    #[serde(default)]
    scoring_func: Option<String>,
    #[serde(default)]
    topk_method: Option<String>,
    // DeepSeek-V3.2
    #[serde(default)]
    index_topk: Option<usize>,
    #[serde(default)]
    index_n_heads: Option<usize>,
    #[serde(default)]
    index_head_dim: Option<usize>,
}

fn one() -> usize {
    1
}
fn one_f64() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

fn from_deepseek_v3(hf: &DeepseekV3Like) -> Result<ModelConfig> {
    only(
        "scoring_func",
        hf.scoring_func.as_deref(),
        "sigmoid",
        "DeepSeek-V3 routes with sigmoid",
    )?;
    only(
        "topk_method",
        hf.topk_method.as_deref(),
        "noaux_tc",
        "only noaux_tc",
    )?;
    let mut cfg = from_llama_like(&hf.base, Family::Llama)?;
    cfg.head_dim = None; // HF writes the RoPE width here; MLA has its own dims
    cfg.n_routed_experts = hf.n_routed_experts;
    cfg.num_experts_per_tok = hf
        .base
        .num_experts_per_tok
        .ok_or_else(|| Error::config("num_experts_per_tok", "required for deepseek_v3"))?;
    cfg.n_shared_experts = hf.n_shared_experts;
    cfg.moe_intermediate_size = hf.moe_intermediate_size;
    cfg.first_k_dense_replace = hf.first_k_dense_replace;
    cfg.norm_topk_prob = hf.norm_topk_prob;
    cfg.router_kind = RouterKind::NoauxBias;
    cfg.n_group = hf.n_group;
    cfg.topk_group = hf.topk_group;
    cfg.routed_scaling_factor = hf.routed_scaling_factor;
    cfg.kv_lora_rank = Some(hf.kv_lora_rank);
    cfg.q_lora_rank = hf.q_lora_rank;
    cfg.qk_nope_head_dim = hf.qk_nope_head_dim;
    cfg.qk_rope_head_dim = hf.qk_rope_head_dim;
    cfg.v_head_dim = hf.v_head_dim;
    cfg.rope_interleave = hf.rope_interleave;
    cfg.validate()?;
    Ok(cfg)
}

/// DeepSeek-V3.2 = V3 with a lightning indexer (queries from the query latent, RoPE on
/// the first `qk_rope_head_dim` dims, non-interleaved) in every layer.
fn from_deepseek_v32(hf: &DeepseekV3Like) -> Result<ModelConfig> {
    let mut cfg = from_deepseek_v3(hf)?;
    let need =
        |v: Option<usize>, f: &str| v.ok_or_else(|| Error::config(f, "required for deepseek_v32"));
    cfg.index_topk = need(hf.index_topk, "index_topk")?;
    cfg.index_n_heads = need(hf.index_n_heads, "index_n_heads")?;
    cfg.index_head_dim = need(hf.index_head_dim, "index_head_dim")?;
    cfg.index_rope_head_dim = cfg.qk_rope_head_dim;
    cfg.indexer_kind = crate::config::IndexerKind::Lightning;
    cfg.layer_types = Some(vec![
        crate::config::AttentionKind::Dsa;
        cfg.num_hidden_layers
    ]);
    cfg.validate()?;
    Ok(cfg)
}

/// The Sparrow name of a tensor saved by `family`; None for a tensor that is not part
/// of the model (`deepseek_v4`'s multi-token-prediction layers).
pub fn sparrow_name(family: Family, name: &str) -> Option<String> {
    Some(match family {
        Family::DeepseekV4 => return super::hf_v4::sparrow_name(name),
        Family::Sparrow | Family::Llama | Family::DeepseekV3 | Family::DeepseekV32 => {
            name.to_string()
        }
        Family::Mixtral => {
            let n = name.replace(".block_sparse_moe.", ".mlp.");
            if !n.contains(".mlp.experts.") {
                return Some(n);
            }
            n.replace(".w1.weight", ".gate_proj.weight")
                .replace(".w3.weight", ".up_proj.weight")
                .replace(".w2.weight", ".down_proj.weight")
        }
    })
}

/// The weight files of a model directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(Error::checkpoint(
            dir,
            "neither model.safetensors nor model.safetensors.index.json",
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(&index, format!("not JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::checkpoint(&index, "no `weight_map` object"))?;
    let mut files = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| Error::checkpoint(&index, format!("`{tensor}` maps to a non-string")))?;
        if file.contains('/') || file.contains("..") {
            return Err(Error::checkpoint(
                &index,
                format!("shard `{file}` is not a file name in the model directory"),
            ));
        }
        files.insert(file.to_string());
    }
    if files.is_empty() {
        return Err(Error::checkpoint(&index, "`weight_map` is empty"));
    }
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// A Sparrow tensor as `family`'s files hold it (`deepseek_v4`'s expert tables as
/// int64; everything else unchanged).
pub fn export_tensor(family: Family, name: &str, t: Tensor) -> Result<Tensor> {
    match family {
        Family::DeepseekV4 => super::hf_v4::export_tensor(name, t),
        _ => Ok(t),
    }
}

/// The weights of a model directory.
pub struct Weights {
    /// Every tensor, under its Sparrow name.
    pub tensors: HashMap<String, Tensor>,
    /// The first (or only) file's metadata.
    pub metadata: HashMap<String, String>,
    /// The file (or index) errors should name.
    pub source: PathBuf,
}

/// Every tensor of a model directory under Sparrow names. A name present in two shards
/// is an error.
pub fn read_weights(dir: &Path, family: Family, device: &Device) -> Result<Weights> {
    let files = weight_files(dir)?;
    let mut all = HashMap::new();
    let mut meta = HashMap::new();
    for (i, f) in files.iter().enumerate() {
        if !f.exists() {
            return Err(Error::checkpoint(f, "shard listed in the index is missing"));
        }
        let (tensors, m) = crate::weights::load(f, device)?;
        if i == 0 {
            meta = m;
        }
        for (name, t) in tensors {
            // transformers saves a 0-wide shared MLP when `n_shared_experts` is 0: empty
            // tensors carry nothing and are not part of any Sparrow module.
            if family != Family::Sparrow && t.elem_count() == 0 {
                continue;
            }
            let Some(mapped) = sparrow_name(family, &name) else {
                continue;
            };
            let t = if family == Family::DeepseekV4 {
                super::hf_v4::import_tensor(&mapped, t)?
            } else {
                t
            };
            if all.insert(mapped, t).is_some() {
                return Err(Error::checkpoint(
                    f,
                    format!("tensor `{name}` appears in more than one shard"),
                ));
            }
        }
    }
    let source = if files.len() == 1 {
        files[0].clone()
    } else {
        dir.join("model.safetensors.index.json")
    };
    Ok(Weights {
        tensors: all,
        metadata: meta,
        source,
    })
}

/// The HF family that represents `cfg` exactly, or an error saying why none does (yet).
pub fn export_family(cfg: &ModelConfig) -> Result<Family> {
    if cfg.is_v4() {
        super::hf_v4::check_exportable(cfg)?;
        return Ok(Family::DeepseekV4);
    }
    if cfg.hc_mult.is_some() {
        return Err(Error::config(
            "hc_mult",
            "hyper-connections map to deepseek_v4 only, with its attention layers",
        ));
    }
    if cfg.has_dsa() {
        let all_dsa = (0..cfg.num_hidden_layers)
            .all(|i| cfg.attention_kind(i) == crate::config::AttentionKind::Dsa);
        let v32 = cfg.kv_lora_rank.is_some()
            && cfg.router_kind == RouterKind::NoauxBias
            && cfg.n_routed_experts > 0
            && all_dsa
            && cfg.index_rope_head_dim == cfg.qk_rope_head_dim;
        return if v32 {
            Ok(Family::DeepseekV32)
        } else {
            Err(Error::config(
                "layer_types",
                "DSA models map to deepseek_v32 only with MLA, noaux_bias MoE, DSA in every layer and index_rope_head_dim = qk_rope_head_dim",
            ))
        };
    }
    if cfg.kv_lora_rank.is_some() {
        if cfg.n_routed_experts > 0 && cfg.router_kind == RouterKind::NoauxBias {
            return Ok(Family::DeepseekV3);
        }
        return Err(Error::config(
            "kv_lora_rank",
            "MLA models map to deepseek_v3, which needs MoE layers with router_kind noaux_bias",
        ));
    }
    if cfg.n_routed_experts == 0 {
        return Ok(Family::Llama);
    }
    let mixtral_like = cfg.first_k_dense_replace == 0
        && cfg.n_shared_experts == 0
        && cfg.router_kind == RouterKind::TopkSoftmax
        && cfg.norm_topk_prob;
    if mixtral_like {
        Ok(Family::Mixtral)
    } else {
        Err(Error::config(
            "router_kind",
            "only MoE models with topk_softmax, renormalised weights, no shared experts and no dense first layers map to mixtral (deepseek_v3 export is not there yet)",
        ))
    }
}

/// The HF name of a Sparrow tensor in `family`'s layout (inverse of `sparrow_name`).
pub fn hf_name(family: Family, name: &str) -> String {
    match family {
        Family::DeepseekV4 => super::hf_v4::hf_name(name),
        Family::Sparrow | Family::Llama | Family::DeepseekV3 | Family::DeepseekV32 => {
            name.to_string()
        }
        Family::Mixtral => {
            if !name.contains(".mlp.") {
                return name.to_string();
            }
            let n = name.replace(".mlp.", ".block_sparse_moe.");
            if !n.contains(".block_sparse_moe.experts.") {
                return n;
            }
            n.replace(".gate_proj.weight", ".w1.weight")
                .replace(".up_proj.weight", ".w3.weight")
                .replace(".down_proj.weight", ".w2.weight")
        }
    }
}

/// `config.json` of `cfg` in `family`'s HF layout (with `architectures`).
pub fn hf_config(cfg: &ModelConfig, family: Family) -> Result<Value> {
    let mut v = serde_json::json!({
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads(),
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": "float32",
        "use_cache": true,
    });
    match family {
        Family::Llama => {
            v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
            v["model_type"] = "llama".into();
            v["attention_bias"] = false.into();
            v["mlp_bias"] = false.into();
        }
        Family::Mixtral => {
            v["architectures"] = serde_json::json!(["MixtralForCausalLM"]);
            v["model_type"] = "mixtral".into();
            v["intermediate_size"] = cfg.moe_intermediate_size.into();
            v["num_local_experts"] = cfg.n_routed_experts.into();
            v["num_experts_per_tok"] = cfg.num_experts_per_tok.into();
            v["router_aux_loss_coef"] = cfg.router_aux_loss_coef.into();
            v["sliding_window"] = Value::Null;
        }
        Family::DeepseekV3 | Family::DeepseekV32 => {
            if family == Family::DeepseekV32 {
                v["architectures"] = serde_json::json!(["DeepseekV32ForCausalLM"]);
                v["model_type"] = "deepseek_v32".into();
                v["index_topk"] = cfg.index_topk.into();
                v["index_n_heads"] = cfg.index_n_heads.into();
                v["index_head_dim"] = cfg.index_head_dim.into();
            } else {
                v["architectures"] = serde_json::json!(["DeepseekV3ForCausalLM"]);
                v["model_type"] = "deepseek_v3".into();
            }
            v["attention_bias"] = false.into();
            v["head_dim"] = cfg.qk_rope_head_dim.into();
            v["kv_lora_rank"] = cfg.kv_lora_rank.into();
            v["q_lora_rank"] = cfg.q_lora_rank.into();
            v["qk_nope_head_dim"] = cfg.qk_nope_head_dim.into();
            v["qk_rope_head_dim"] = cfg.qk_rope_head_dim.into();
            v["qk_head_dim"] = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim).into();
            v["v_head_dim"] = cfg.v_head_dim.into();
            v["rope_interleave"] = cfg.rope_interleave.into();
            v["moe_intermediate_size"] = cfg.moe_intermediate_size.into();
            v["n_routed_experts"] = cfg.n_routed_experts.into();
            v["num_experts_per_tok"] = cfg.num_experts_per_tok.into();
            v["n_shared_experts"] = cfg.n_shared_experts.into();
            v["first_k_dense_replace"] = cfg.first_k_dense_replace.into();
            v["n_group"] = cfg.n_group.into();
            v["topk_group"] = cfg.topk_group.into();
            v["norm_topk_prob"] = cfg.norm_topk_prob.into();
            v["routed_scaling_factor"] = cfg.routed_scaling_factor.into();
            // Read by vLLM / SGLang, which assume other defaults when absent.
            v["scoring_func"] = "sigmoid".into();
            v["topk_method"] = "noaux_tc".into();
            v["num_nextn_predict_layers"] = 0.into();
        }
        Family::DeepseekV4 => super::hf_v4::hf_config(cfg, &mut v)?,
        Family::Sparrow => {
            return Err(Error::Invalid(
                "hf_config: `sparrow` is not an HF family".into(),
            ))
        }
    }
    Ok(v)
}
