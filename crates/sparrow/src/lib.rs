//! Sparrow: a Rust engine for sparse-attention mixture-of-experts language models of the
//! DeepSeek V3.2 / V4 family. See `DESIGN.md` for the architecture.
//!
//! - [`config`]: `ModelConfig` from an HF-style `config.json`
//! - [`formats`]: other engines' files: Hugging Face directories (config and name maps per
//!   family, shards) and GGUF (container, ggml quantized types, llama models, tokenizers)
//! - [`model`]: the layers (attention, MoE, router, block, transformer) and their caches
//! - [`model_dir`]: reading and writing a model directory (the one place that does)
//! - [`chat`]: chat messages rendered with the model's Jinja template
//! - [`model_source`]: what `--model` names (directory, GGUF file, known name) and loading it
//! - [`registry`]: named models fetched through a package client into the model cache
//! - [`tokenizer`]: byte-level BPE via HF `tokenizers`
//! - [`data`]: corpus fetch and reading, token shards, batches
//! - [`train`]: AdamW, schedule, training loop, atomic checkpoints, metrics
//! - [`engine`]: per-sequence state, the batched step, sampling, streaming generation
//! - [`eval`]: indexer recall, expert routing (and, later, perplexity, long-context tasks)
//! - [`experiment`]: several trainings under one protocol, compared (routers)
//! - [`bench`]: machine baselines and kernel benchmarks (dense vs sparse attention)
//! - [`kernels`]: fused CPU kernels (custom ops with backward) and their references

pub mod bench;
pub mod chat;
pub mod config;
pub mod data;
pub mod engine;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod font;
pub mod formats;
pub mod fsio;
pub mod kernels;
pub mod model;
pub mod model_dir;
pub mod model_source;
pub mod progress;
pub mod registry;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use config::ModelConfig;
pub use error::{Error, Result};
