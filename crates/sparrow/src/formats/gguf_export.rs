//! Writing a llama-shaped model as a GGUF file llama.cpp loads: the config as `llama.*`
//! metadata, the tokenizer as `tokenizer.ggml.*` (byte-level BPE), and the tensors under
//! llama.cpp's names with Q and K rows permuted for its interleaved RoPE (the inverse
//! of what `gguf_model` undoes when reading). Matrices are stored as `dtype` says;
//! norms stay F32, and a `Q4_1` file keeps its embedding in `Q8_0`.

use super::ggml::{quantize_q4_1, quantize_q8_0, GgmlType};
use super::gguf::Value;
use super::gguf_model::{gguf_name, reorder_qk_rows};
use super::gguf_write::GgufWriter;
use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// The element type of a GGUF export's matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDtype {
    F32,
    F16,
    Q8_0,
    Q4_1,
}

impl GgufDtype {
    /// llama.cpp's `general.file_type` (`llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            GgufDtype::F32 => 0,
            GgufDtype::F16 => 1,
            GgufDtype::Q4_1 => 3,
            GgufDtype::Q8_0 => 7,
        }
    }
}

/// A byte-level BPE tokenizer as GGUF stores it.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// Tokens in id order.
    pub tokens: Vec<String>,
    /// ggml token types (1 normal, 3 control, 4 user-defined).
    pub token_types: Vec<i32>,
    /// Merges by rank, "a b".
    pub merges: Vec<String>,
    /// llama.cpp's pre-tokenizer name (`gpt2`, `smollm`, ...).
    pub pre: String,
    pub bos_id: u32,
    pub eos_id: u32,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

/// The GGUF bytes of a llama-shaped model: `tensors` are (Sparrow name, shape, f32
/// values) as a checkpoint holds them; `name` goes into `general.name`.
pub fn llama_to_gguf(
    cfg: &ModelConfig,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    vocab: &GgufVocab,
    dtype: GgufDtype,
    name: &str,
) -> Result<Vec<u8>> {
    if cfg.has_dsa() || cfg.kv_lora_rank.is_some() || cfg.n_routed_experts > 0 {
        return Err(Error::Invalid(
            "only llama-shaped models (dense attention, dense SwiGLU FFN) export to GGUF".into(),
        ));
    }
    if vocab.tokens.len() != cfg.vocab_size {
        return Err(Error::Invalid(format!(
            "the tokenizer has {} tokens and the model's vocab_size is {}",
            vocab.tokens.len(),
            cfg.vocab_size
        )));
    }
    let hd = cfg.head_dim();
    if hd * cfg.num_attention_heads != cfg.hidden_size {
        return Err(Error::config(
            "head_dim",
            format!("{hd} x {} heads differs from hidden_size {}: llama.cpp's llama architecture derives the head size", cfg.num_attention_heads, cfg.hidden_size),
        ));
    }
    let mut w = GgufWriter::new();
    let u32v = |v: usize| Value::U32(v as u32);
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("general.name", Value::String(name.into()))
        .meta("general.file_type", Value::U32(dtype.file_type()))
        .meta("general.quantization_version", Value::U32(2))
        .meta("llama.block_count", u32v(cfg.num_hidden_layers))
        .meta("llama.context_length", u32v(cfg.max_position_embeddings))
        .meta("llama.embedding_length", u32v(cfg.hidden_size))
        .meta("llama.feed_forward_length", u32v(cfg.intermediate_size))
        .meta("llama.attention.head_count", u32v(cfg.num_attention_heads))
        .meta("llama.attention.head_count_kv", u32v(cfg.num_kv_heads()))
        .meta("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_norm_eps as f32),
        )
        .meta("llama.rope.dimension_count", u32v(hd))
        .meta("llama.vocab_size", u32v(cfg.vocab_size))
        .meta("tokenizer.ggml.model", Value::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", Value::String(vocab.pre.clone()))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(
                vocab
                    .tokens
                    .iter()
                    .map(|t| Value::String(t.clone()))
                    .collect(),
            ),
        )
        .meta(
            "tokenizer.ggml.token_type",
            Value::Array(vocab.token_types.iter().map(|&t| Value::I32(t)).collect()),
        )
        .meta(
            "tokenizer.ggml.merges",
            Value::Array(
                vocab
                    .merges
                    .iter()
                    .map(|m| Value::String(m.clone()))
                    .collect(),
            ),
        )
        .meta("tokenizer.ggml.bos_token_id", Value::U32(vocab.bos_id))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(vocab.eos_id))
        .meta("tokenizer.ggml.add_bos_token", Value::Bool(vocab.add_bos));
    if let Some(t) = &vocab.chat_template {
        w.meta("tokenizer.chat_template", Value::String(t.clone()));
    }
    let mut sorted: Vec<&(String, Vec<usize>, Vec<f32>)> = tensors.iter().collect();
    sorted.sort_by_key(|(n, _, _)| n.clone());
    for (sname, shape, values) in sorted {
        let gname = gguf_name(sname)
            .ok_or_else(|| Error::Invalid(format!("tensor `{sname}` has no GGUF llama name")))?;
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let mut values = std::borrow::Cow::Borrowed(values.as_slice());
        if shape.len() == 2 {
            let heads = if gname.ends_with("attn_q.weight") {
                Some(cfg.num_attention_heads)
            } else if gname.ends_with("attn_k.weight") {
                Some(cfg.num_kv_heads())
            } else {
                None
            };
            if let Some(h) = heads {
                values = reorder_qk_rows(&values, shape[0], shape[1], h, true).into();
            }
        }
        let matrix = shape.len() == 2;
        let ty = match (matrix, dtype) {
            (false, _) | (true, GgufDtype::F32) => GgmlType::F32,
            (true, GgufDtype::F16) => GgmlType::F16,
            (true, GgufDtype::Q8_0) => GgmlType::Q8_0,
            (true, GgufDtype::Q4_1) if gname == "token_embd.weight" => GgmlType::Q8_0,
            (true, GgufDtype::Q4_1) => GgmlType::Q4_1,
        };
        if ty.block_size() > 1 && shape[1] % ty.block_size() != 0 {
            return Err(Error::Invalid(format!(
                "tensor `{sname}` rows of {} values are not whole {}-value blocks of {}",
                shape[1],
                ty.block_size(),
                ty.name()
            )));
        }
        let data = match ty {
            GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            GgmlType::F16 => values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            GgmlType::Q8_0 => quantize_q8_0(&values),
            _ => quantize_q4_1(&values),
        };
        w.tensor(&gname, &dims, ty, data);
    }
    Ok(w.to_bytes())
}
