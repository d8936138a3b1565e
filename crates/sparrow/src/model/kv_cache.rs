//! The tensor KV cache of the training-style forward (`Transformer::forward` with a
//! cache; the engine uses `model::cache::SeqCache`): per layer, the rotated keys and the values
//! of every position seen so far, (B, KV, S, D) each. With MQA (KV = 1) it is
//! `num_attention_heads` times smaller than MHA's. A `dsa` layer also keeps its index
//! keys, one `di`-vector per position, in the blocked layout the top-k scan reads.

use crate::error::Result;
use crate::kernels::indexer::KeyStore;
use candle_core::Tensor;

/// Keys and values of one attention layer, in buffers that grow by doubling: appending
/// a token writes it in place (amortised O(1) copies per token instead of re-copying
/// the whole cache), and readers get the first `len` positions.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    /// (B, KV, capacity, D) keys after RoPE, or None before the first token.
    pub k: Option<Tensor>,
    /// (B, KV, capacity, D)
    pub v: Option<Tensor>,
    /// Positions written.
    len: usize,
    /// `dsa` layers: index keys per batch row (empty otherwise).
    pub index: Vec<KeyStore>,
}

/// Smallest capacity allocated (positions).
const MIN_CAPACITY: usize = 64;

impl LayerKv {
    /// Cached positions S.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold before they must grow.
    pub fn capacity(&self) -> usize {
        self.k.as_ref().map(|k| k.dims()[2]).unwrap_or(0)
    }

    /// Grow both buffers to hold at least `need` positions, keeping the first `len`.
    /// Keys and values may differ in width (MLA keeps its latent and RoPE key here).
    fn reserve(&mut self, k_like: &Tensor, v_like: &Tensor, need: usize) -> Result<()> {
        if need <= self.capacity() {
            return Ok(());
        }
        let cap = need.max(2 * self.capacity()).max(MIN_CAPACITY);
        let grow = |old: &Option<Tensor>, like: &Tensor| -> Result<Tensor> {
            let (b, kv, _t, d) = like.dims4()?;
            let buf = Tensor::zeros((b, kv, cap, d), like.dtype(), like.device())?;
            if let Some(old) = old {
                buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            Ok(buf)
        };
        let (k, v) = (grow(&self.k, k_like)?, grow(&self.v, v_like)?);
        self.k = Some(k);
        self.v = Some(v);
        Ok(())
    }

    /// Append new (B, KV, T, D) keys/values; returns the full (B, KV, S+T, D) pair
    /// (contiguous; a view without a copy when B * KV = 1).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        self.reserve(k, v, self.len + t)?;
        let (kb, vb) = match (&self.k, &self.v) {
            (Some(kb), Some(vb)) => (kb, vb),
            _ => unreachable!("reserve allocates both buffers"),
        };
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += t;
        Ok((
            kb.narrow(2, 0, self.len)?.contiguous()?,
            vb.narrow(2, 0, self.len)?.contiguous()?,
        ))
    }

    /// Bytes held by this layer's cache (allocated capacity, index keys included).
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
