//! A GGUF model as a `ModelConfig` plus tensors under Sparrow's (HF) names.
//!
//! Architecture `llama` (llama.cpp's `LLM_ARCH_LLAMA`): the `{arch}.*` metadata becomes
//! the config; every key that changes the computation and that Sparrow does not compute
//! (RoPE scaling, experts, sliding windows, partial RoPE, separate K/V head sizes) is
//! an error naming the key. Tensor names map as llama.cpp's converter wrote them:
//!
//! | GGUF | Sparrow / HF |
//! |---|---|
//! | `token_embd.weight` | `model.embed_tokens.weight` |
//! | `output_norm.weight` | `model.norm.weight` |
//! | `output.weight` (absent = tied) | `lm_head.weight` |
//! | `blk.{i}.attn_norm.weight` | `model.layers.{i}.input_layernorm.weight` |
//! | `blk.{i}.attn_{q,k,v,output}.weight` | `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight` |
//! | `blk.{i}.ffn_norm.weight` | `model.layers.{i}.post_attention_layernorm.weight` |
//! | `blk.{i}.ffn_{gate,up,down}.weight` | `model.layers.{i}.mlp.{gate,up,down}_proj.weight` |
//!
//! llama.cpp's converter permutes the rows of `attn_q` and `attn_k` within each head so
//! that its interleaved ("normal") RoPE computes HF's rotate-half RoPE; reading undoes
//! that permutation (matrices kept quantized read their rows through it in place,
//! [`RowOrder::GgufRope`]), so the tensors are exactly HF's and export back to HF is a
//! copy.

use super::ggml::GgmlType;
use super::gguf::GgufFile;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::qmatmul::{is_native, QMatrix, RowOrder};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// Architectures Sparrow reads from GGUF.
pub const ARCHITECTURES: &[&str] = &["llama"];

/// The model's architecture (`general.architecture`), checked to be one Sparrow reads.
pub fn architecture(f: &GgufFile) -> Result<&str> {
    let arch = f
        .get_str_opt("general.architecture")?
        .ok_or_else(|| Error::config("general.architecture", "missing from the GGUF file"))?;
    if !ARCHITECTURES.contains(&arch) {
        return Err(Error::config(
            "general.architecture",
            format!(
                "`{arch}` is not supported (Sparrow reads {} from GGUF)",
                ARCHITECTURES.join(", ")
            ),
        ));
    }
    Ok(arch)
}

/// The `ModelConfig` of a GGUF file's model (its key / value cache in f16, as llama.cpp
/// keeps it by default).
pub fn read_config(f: &GgufFile) -> Result<ModelConfig> {
    let arch = architecture(f)?;
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = f.get_usize(&key("embedding_length"))?;
    let n_layers = f.get_usize(&key("block_count"))?;
    let n_heads = f.get_usize(&key("attention.head_count"))?;
    let n_kv = f
        .get_usize_opt(&key("attention.head_count_kv"))?
        .unwrap_or(n_heads);
    if n_heads == 0 || hidden % n_heads != 0 {
        return Err(Error::config(
            key("attention.head_count"),
            format!("{n_heads} heads do not divide the embedding length {hidden}"),
        ));
    }
    let head_dim = hidden / n_heads;
    for k in ["attention.key_length", "attention.value_length"] {
        if let Some(d) = f.get_usize_opt(&key(k))? {
            if d != head_dim {
                return Err(Error::config(
                    key(k),
                    format!("{d} differs from embedding_length / head_count = {head_dim}, which Sparrow does not compute"),
                ));
            }
        }
    }
    if let Some(d) = f.get_usize_opt(&key("rope.dimension_count"))? {
        if d != head_dim {
            return Err(Error::config(
                key("rope.dimension_count"),
                format!(
                    "RoPE over {d} of {head_dim} head dimensions (partial RoPE) is not supported"
                ),
            ));
        }
    }
    if let Some(t) = f.get_str_opt(&key("rope.scaling.type"))? {
        if t != "none" {
            return Err(Error::config(
                key("rope.scaling.type"),
                format!("RoPE scaling `{t}` is not supported"),
            ));
        }
    }
    for k in [
        "expert_count",
        "attention.sliding_window",
        "attention.clamp_kqv",
        "logit_scale",
    ] {
        let present = match f.metadata.get(&key(k)) {
            None => false,
            Some(v) => v.as_u64() != Some(0),
        };
        if present {
            return Err(Error::config(
                key(k),
                "is set, and Sparrow does not compute it for this architecture",
            ));
        }
    }
    let vocab = match f.get_usize_opt(&key("vocab_size"))? {
        Some(v) => v,
        None => f
            .get_array_opt("tokenizer.ggml.tokens")?
            .map(|t| t.len())
            .ok_or_else(|| {
                Error::config(
                    key("vocab_size"),
                    "missing, and there is no tokenizer.ggml.tokens to count",
                )
            })?,
    };
    let tied = f.tensor("output.weight").is_none();
    let token = |k: &str, default: u32| -> Result<u32> {
        Ok(f.get_usize_opt(k)?.map_or(default, |v| v as u32))
    };
    let json = serde_json::json!({
        "model_type": "sparrow",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": f.get_usize(&key("feed_forward_length"))?,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "max_position_embeddings": f.get_usize(&key("context_length"))?,
        "rope_theta": f.get_f64_opt(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        "rms_norm_eps": f
            .get_f64_opt(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| Error::config(key("attention.layer_norm_rms_epsilon"), "missing from the GGUF file"))?,
        "tie_word_embeddings": tied,
        "bos_token_id": token("tokenizer.ggml.bos_token_id", 1)?,
        "eos_token_id": token("tokenizer.ggml.eos_token_id", 2)?,
        // GGUF models run as llama.cpp runs them by default: an f16 key / value cache
        // (half the memory and half the bytes per decode step; `--kv-dtype f32` or an
        // `edit` of the config restores f32).
        "kv_cache_dtype": "float16",
    });
    ModelConfig::from_json(&json.to_string())
}

/// Whole-model tensors: (GGUF name, Sparrow / HF name).
const MODEL_NAMES: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Per-layer tensors: (GGUF name after `blk.{i}.`, Sparrow name after
/// `model.layers.{i}.`).
const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// `name` through the name tables: GGUF -> Sparrow when `to_sparrow`, else back.
fn map_name(name: &str, to_sparrow: bool) -> Option<String> {
    let pick = |&(g, s): &(&'static str, &'static str)| if to_sparrow { (g, s) } else { (s, g) };
    if let Some((_, t)) = MODEL_NAMES.iter().map(pick).find(|(f, _)| *f == name) {
        return Some(t.to_string());
    }
    let (prefix, out_prefix) = if to_sparrow {
        ("blk.", "model.layers.")
    } else {
        ("model.layers.", "blk.")
    };
    let (layer, part) = name.strip_prefix(prefix)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, t) = LAYER_NAMES.iter().map(pick).find(|(f, _)| *f == part)?;
    Some(format!("{out_prefix}{layer}.{t}"))
}

/// The Sparrow (HF) name of a GGUF tensor, or None for one Sparrow does not use.
pub fn sparrow_name(gguf: &str) -> Option<String> {
    map_name(gguf, true)
}

/// The llama.cpp name of a Sparrow (HF) tensor of a llama-shaped model.
pub fn gguf_name(sparrow: &str) -> Option<String> {
    map_name(sparrow, false)
}

/// llama.cpp's converter reorders the rows of a (rows, cols) Q or K weight within each
/// head so that its interleaved RoPE computes HF's rotate-half RoPE: HF row
/// `h*d + j*(d/2) + i` is GGUF row `h*d + 2i + j` (d = head size). `to_gguf` applies
/// that order (export), else undoes it (reading). `values` may be numbers or the
/// encoded bytes of whole rows.
pub fn reorder_qk_rows<T: Copy + Default>(
    values: &[T],
    rows: usize,
    cols: usize,
    n_heads: usize,
    to_gguf: bool,
) -> Vec<T> {
    let d = rows / n_heads;
    let mut out = vec![T::default(); values.len()];
    for h in 0..n_heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let hf = h * d + j * (d / 2) + i;
                let gguf = h * d + 2 * i + j;
                let (src, dst) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

pub use crate::weights::WeightFormat;

/// The model's tensors under Sparrow's names: (tensors, matrices kept quantized).
pub type GgufTensors = (HashMap<String, Tensor>, HashMap<String, Arc<QMatrix>>);

/// Every tensor of the model under Sparrow's names, held as `format` says: `Native`
/// keeps Q4_0 / Q4_1 / Q8_0 matrices in their blocks and gives other matrices as f16
/// tensors (bf16 ones as bf16); every other format gets f32 tensors (the store then
/// converts the linear weights, `model::params`). Tensors that Sparrow does not use (e.g. `rope_freqs.weight` for unscaled RoPE) are errors,
/// so a model is never silently computed without part of its weights.
pub fn read_tensors(
    f: &GgufFile,
    cfg: &ModelConfig,
    format: WeightFormat,
    device: &Device,
) -> Result<GgufTensors> {
    let n_heads = cfg.num_attention_heads;
    let n_kv = cfg.num_key_value_heads.unwrap_or(n_heads);
    let mut dense = HashMap::with_capacity(f.tensors.len());
    let mut quantized = HashMap::new();
    for t in &f.tensors {
        let name = sparrow_name(&t.name).ok_or_else(|| {
            f.error(format!(
                "tensor `{}` is not part of a {} model Sparrow computes",
                t.name,
                f.get_str_opt("general.architecture")
                    .ok()
                    .flatten()
                    .unwrap_or("?")
            ))
        })?;
        let heads = if t.name.ends_with(".attn_q.weight") {
            Some(n_heads)
        } else if t.name.ends_with(".attn_k.weight") {
            Some(n_kv)
        } else {
            None
        };
        let shape = t.torch_shape();
        let (rows, cols) = match shape[..] {
            [r, c] => (r, c),
            [n] => (1, n),
            _ => return Err(f.error(format!("tensor `{}` has shape {shape:?}", t.name))),
        };
        if let Some(h) = heads {
            if shape.len() != 2 || h == 0 || rows % h != 0 || (rows / h) % 2 != 0 {
                return Err(f.error(format!(
                    "tensor `{}` ({shape:?}) is not {h} heads of an even size",
                    t.name
                )));
            }
        }
        if format == WeightFormat::Native && shape.len() == 2 && is_native(t.ggml_type) {
            // Used in place in the map, Q and K rows read in llama.cpp's order.
            let order = match heads {
                Some(h) => RowOrder::GgufRope { head_dim: rows / h },
                None => RowOrder::Plain,
            };
            let q = QMatrix::mapped(t.ggml_type, rows, cols, f.tensor_data_shared(t))
                .and_then(|q| q.with_row_order(order))
                .map_err(|m| f.error(format!("tensor `{}`: {m}", t.name)))?;
            quantized.insert(name, Arc::new(q));
        } else {
            let mut values = f.dequantize(t)?;
            if let Some(h) = heads {
                values = reorder_qk_rows(&values, rows, cols, h, false);
            }
            let tensor = Tensor::from_vec(values, shape.clone(), device)?;
            // Matrices held in half precision are rounded here, one at a time, so the
            // f32 values of the whole model never sit in memory at once (the packing
            // of the weights reads these bits as they are: the same rounding).
            let tensor = match (format, shape.len(), t.ggml_type) {
                (WeightFormat::Native, 2, GgmlType::BF16) | (WeightFormat::Bf16, 2, _) => {
                    tensor.to_dtype(DType::BF16)?
                }
                (WeightFormat::Native, 2, GgmlType::F32) => tensor,
                (WeightFormat::Native | WeightFormat::F16, 2, _) => tensor.to_dtype(DType::F16)?,
                _ => tensor,
            };
            dense.insert(name, tensor);
        }
    }
    Ok((dense, quantized))
}
