//! Inference: the KV cache, sampling, and streaming generation.

pub mod cache;
pub mod generate;
pub mod sampler;
