//! The KV cache for incremental decoding: per layer, the rotated keys and the values
//! of every position seen so far, (B, KV, S, D) each. With MQA (KV = 1) it is
//! `num_attention_heads` times smaller than MHA's. A `dsa` layer also keeps its index
//! keys, one `di`-vector per position, in the blocked layout the top-k scan reads.

use crate::error::Result;
use crate::kernels::indexer::KeyStore;
use candle_core::Tensor;

/// Keys and values of one attention layer.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    /// (B, KV, S, D) keys after RoPE, or None before the first token.
    pub k: Option<Tensor>,
    /// (B, KV, S, D)
    pub v: Option<Tensor>,
    /// `dsa` layers: index keys per batch row (empty otherwise).
    pub index: Vec<KeyStore>,
}

impl LayerKv {
    /// Cached positions S.
    pub fn len(&self) -> usize {
        self.k.as_ref().map(|k| k.dims()[2]).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append new (B, KV, T, D) keys/values; returns the full (B, KV, S+T, D) pair.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match (&self.k, &self.v) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
            _ => (k.clone(), v.clone()),
        };
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        Ok((k, v))
    }

    /// Bytes held by this layer's cache.
    pub fn bytes(&self) -> usize {
        let b = |t: &Option<Tensor>| {
            t.as_ref()
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .unwrap_or(0)
        };
        b(&self.k) + b(&self.v) + self.index_bytes()
    }

    /// Bytes of the index key cache.
    pub fn index_bytes(&self) -> usize {
        self.index.iter().map(|k| k.bytes()).sum()
    }
}

/// The whole model's cache: one `LayerKv` per layer plus the number of positions seen.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); num_layers],
        }
    }

    /// Positions already cached (the offset of the next token).
    pub fn len(&self) -> usize {
        self.layers.first().map(|l| l.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bytes()).sum()
    }
}
