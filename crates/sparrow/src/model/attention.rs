//! Causal self-attention with MHA / GQA / MQA key-value sharing
//! (`num_key_value_heads` = H, a divisor of H, or 1).
//!
//! Query heads are grouped by the KV head they share, so K and V are never repeated:
//! q (B, KV, G*T, D) @ k^T (B, KV, D, S). One code path serves training over (B, T)
//! and incremental decoding with a `LayerKv` cache.

use super::linear::Linear;
use super::params::Vb;
use super::rope::Rope;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::infer::cache::LayerKv;
use crate::kernels::softmax::CausalSoftmax;
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn new(vb: &Vb, cfg: &ModelConfig, out_std: f64) -> Result<Self> {
        let c = cfg.hidden_size;
        let (h, kv, d) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let std = cfg.initializer_range;
        Ok(Self {
            q_proj: Linear::new(&vb.pp("q_proj"), c, h * d, std)?,
            k_proj: Linear::new(&vb.pp("k_proj"), c, kv * d, std)?,
            v_proj: Linear::new(&vb.pp("v_proj"), c, kv * d, std)?,
            o_proj: Linear::new(&vb.pp("o_proj"), h * d, c, out_std)?,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: d,
        })
    }

    /// x (B, T, C) at positions cache.len().. -> (B, T, C). Appends to `cache` if given.
    pub fn forward(&self, x: &Tensor, rope: &Rope, cache: Option<&mut LayerKv>) -> Result<Tensor> {
        let (b, t, _c) = x.dims3()?;
        let (h, kv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let g = h / kv;
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, t, h, d))?
            .transpose(1, 2)?; // (B, H, T, D)
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, t, kv, d))?
            .transpose(1, 2)?; // (B, KV, T, D)
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, t, kv, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let offset = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let q = rope.apply(&q.contiguous()?, offset)?;
        let k = rope.apply(&k.contiguous()?, offset)?;
        let (k, v) = match cache {
            Some(c) => c.append(&k, &v)?,
            None => (k, v),
        };
        let q = q.reshape((b, kv, g * t, d))?; // (B, KV, G*T, D): heads grouped by KV head
        let scores = q.matmul(&k.t()?)?; // (B, KV, G*T, S)
                                         // softmax(scores / sqrt(D)) with the causal mask, fused (kernels::softmax).
        let att = CausalSoftmax {
            scale: 1.0 / (d as f64).sqrt(),
            queries: t,
            offset,
        }
        .apply(&scores)?;
        let y = att.matmul(&v)?; // (B, KV, G*T, D)
        let y = y
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))?;
        self.o_proj.forward(&y)
    }
}
