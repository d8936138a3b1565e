//! File formats of other engines, read without the model: Hugging Face model
//! directories (`hf`: config and tensor-name maps per family, shards) and GGUF
//! (llama.cpp's format: the container, ggml's quantized types, a llama model's config
//! and tensors, its tokenizer). This floor imports the config and the error type,
//! never the model.

pub mod ggml;
pub mod gguf;
pub mod gguf_export;
pub mod gguf_model;
pub mod gguf_tokenizer;
pub mod gguf_write;
pub mod hf;
pub mod hf_fields;
pub mod hf_v4;
