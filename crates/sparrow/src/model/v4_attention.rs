//! DeepSeek-V4 attention (`sliding_attention`, `compressed_sparse_attention`,
//! `heavily_compressed_attention`; DESIGN.md §4), whole windows (training, evaluation,
//! parity).
//!
//! Queries from a latent: `q_res = RMSNorm(q_a_proj x)`, `q = q_b_proj q_res` per head,
//! RMS-normalised without weight. One K=V head: `kv = RMSNorm(kv_proj x)`. RoPE on the
//! trailing `qk_rope_head_dim` dims in interleaved pairs, with `rope_theta` on sliding
//! layers and `compress_rope_theta` (+ YaRN) for everything in a compressed layer. The
//! entries a query attends: the window (its own position and the `sliding_window - 1`
//! before it) plus, on compressed layers, the compressor's entries (HCA: every complete
//! one; CSA: the indexer's top `index_topk` of them). One softmax over those and a
//! learned per-head sink logit (`sinks`, which takes mass but adds no value); the output
//! is the weighted K=V rows, de-rotated at the query's position, then the grouped
//! low-rank projection: `o_a_proj` maps each of `o_groups` head groups to
//! `o_lora_rank`, `o_b_proj` mixes them to C.

use super::compressor::{causal_entry_mask, Compressor, V4Indexer, MASKED};
use super::linear::Linear;
use super::norm::{unweighted_rms, RmsNorm};
use super::params::{Init, Vb};
use super::rope::TailRope;
use crate::config::{AttentionKind, ModelConfig};
use crate::error::Result;
use candle_core::{Tensor, D};

/// What a compressed layer adds to the window.
#[derive(Debug, Clone)]
pub enum Compressed {
    /// HCA: every complete entry.
    Heavy(Compressor),
    /// CSA: the indexer's top-k of the entries.
    Sparse {
        compressor: Compressor,
        indexer: V4Indexer,
    },
}

#[derive(Debug, Clone)]
pub struct V4Attention {
    pub q_a_proj: Linear,
    pub q_a_norm: RmsNorm,
    pub q_b_proj: Linear,
    pub kv_proj: Linear,
    pub kv_norm: RmsNorm,
    /// (o_groups * o_lora_rank, H * D / o_groups): one block per head group.
    pub o_a_proj: Linear,
    pub o_b_proj: Linear,
    /// (H) attention sink logits.
    pub sinks: Tensor,
    pub compressed: Option<Compressed>,
    rope: TailRope,
    n_heads: usize,
    head_dim: usize,
    window: usize,
    o_groups: usize,
    o_rank: usize,
    eps: f64,
}

impl V4Attention {
    pub fn new(vb: &Vb, cfg: &ModelConfig, layer: usize, out_std: f64) -> Result<Self> {
        let (c, h, d) = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim());
        let std = cfg.initializer_range;
        let rank = cfg.q_lora_rank.unwrap_or(0);
        let groups = cfg.o_groups.unwrap_or(1);
        let kind = cfg.attention_kind(layer);
        let rope = if kind == AttentionKind::SlidingAttention {
            TailRope::new(
                cfg.qk_rope_head_dim,
                cfg.rope_theta,
                None,
                cfg.max_position_embeddings,
            )
        } else {
            TailRope::new(
                cfg.qk_rope_head_dim,
                cfg.compress_rope_theta,
                cfg.compress_rope_yarn.as_ref(),
                cfg.max_position_embeddings,
            )
        };
        let rate = cfg.compress_rate(layer);
        let cv = vb.pp("compressor");
        let compressed = match kind {
            AttentionKind::HeavilyCompressedAttention => Some(Compressed::Heavy(Compressor::new(
                &cv, cfg, rate, d, false,
            )?)),
            AttentionKind::CompressedSparseAttention => Some(Compressed::Sparse {
                compressor: Compressor::new(&cv, cfg, rate, d, true)?,
                indexer: V4Indexer::new(&cv.pp("indexer"), cfg, rate)?,
            }),
            _ => None,
        };
        Ok(Self {
            q_a_proj: Linear::new(&vb.pp("q_a_proj"), c, rank, std)?,
            q_a_norm: RmsNorm::new(&vb.pp("q_a_norm"), rank, cfg.rms_norm_eps)?,
            q_b_proj: Linear::new(&vb.pp("q_b_proj"), rank, h * d, std)?,
            kv_proj: Linear::new(&vb.pp("kv_proj"), c, d, std)?,
            kv_norm: RmsNorm::new(&vb.pp("kv_norm"), d, cfg.rms_norm_eps)?,
            o_a_proj: Linear::new(
                &vb.pp("o_a_proj"),
                h * d / groups,
                groups * cfg.o_lora_rank,
                std,
            )?,
            o_b_proj: Linear::new(&vb.pp("o_b_proj"), groups * cfg.o_lora_rank, c, out_std)?,
            sinks: vb.get(&[h], "sinks", Init::Zeros)?,
            compressed,
            rope,
            n_heads: h,
            head_dim: d,
            window: cfg.sliding_window.unwrap_or(1),
            o_groups: groups,
            o_rank: cfg.o_lora_rank,
            eps: cfg.rms_norm_eps,
        })
    }

    /// x (B, T, C), a whole window from position 0 -> (B, T, C).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _c) = x.dims3()?;
        let (h, d) = (self.n_heads, self.head_dim);
        let positions: Vec<usize> = (0..t).collect();
        let q_res = self.q_a_norm.forward(&self.q_a_proj.forward(x)?)?; // (B, T, R)
        let q = self
            .q_b_proj
            .forward(&q_res)?
            .reshape((b, t, h, d))?
            .transpose(1, 2)?
            .contiguous()?; // (B, H, T, D)
        let q = self
            .rope
            .apply(&unweighted_rms(&q, self.eps)?, &positions, false)?;
        let kv = self.kv_norm.forward(&self.kv_proj.forward(x)?)?; // (B, T, D)
        let kv = self.rope.apply(&kv, &positions, false)?;
        let window = self.window_mask(b, t, x)?; // (B, T, T)
        let (keys, mask) = match self.compressed_entries(x, &q_res)? {
            Some((entries, entry_mask)) => (
                Tensor::cat(&[kv, entries], 1)?,
                Tensor::cat(&[window, entry_mask], 2)?,
            ),
            None => (kv, window),
        }; // (B, S, D), (B, T, S)
        let s = keys.dim(1)?;
        let keys = keys.unsqueeze(1)?; // (B, 1, S, D)
        let scores = (q.broadcast_matmul(&keys.transpose(2, 3)?)? / (d as f64).sqrt())?
            .broadcast_add(&mask.unsqueeze(1)?)?; // (B, H, T, S)
        let sinks = self
            .sinks
            .reshape((1, h, 1, 1))?
            .broadcast_as((b, h, t, 1))?
            .to_dtype(scores.dtype())?;
        let probs = candle_nn::ops::softmax(&Tensor::cat(&[scores, sinks], 3)?, D::Minus1)?
            .narrow(3, 0, s)?; // (B, H, T, S): the sink's share dropped
        let y = probs.broadcast_matmul(&keys)?; // (B, H, T, D)
        let y = self.rope.apply(&y, &positions, true)?; // de-rotated at the query
        let y = y.transpose(1, 2)?.contiguous()?; // (B, T, H, D)
        self.output(&y)
    }

    /// The grouped low-rank output: y (B, T, H, D) -> (B, T, C).
    fn output(&self, y: &Tensor) -> Result<Tensor> {
        let (b, t, h, d) = y.dims4()?;
        let (g, r) = (self.o_groups, self.o_rank);
        let width = h * d / g;
        let yg = y
            .reshape((b * t, g, width))?
            .transpose(0, 1)?
            .contiguous()?; // (G, B*T, width)
        let w = self.o_a_proj.weight()?.reshape((g, r, width))?; // (G, r, width)
        let z = yg.matmul(&w.transpose(1, 2)?)?; // (G, B*T, r)
        let z = z.transpose(0, 1)?.contiguous()?.reshape((b, t, g * r))?;
        self.o_b_proj.forward(&z)
    }

    /// The window's additive mask (B, T, T): key j visible to query i when
    /// `i - window < j <= i`.
    fn window_mask(&self, b: usize, t: usize, x: &Tensor) -> Result<Tensor> {
        let mut m = vec![MASKED as f32; t * t];
        for i in 0..t {
            for j in (i + 1).saturating_sub(self.window)..=i {
                m[i * t + j] = 0.0;
            }
        }
        let m = Tensor::from_vec(m, (1, t, t), x.device())?.to_dtype(x.dtype())?;
        Ok(m.broadcast_as((b, t, t))?.contiguous()?)
    }

    /// The compressed entries (B, n, D) and their additive mask (B, T, n), if this layer
    /// has a compressor and the window holds a complete entry.
    fn compressed_entries(&self, x: &Tensor, q_res: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        let (b, t, _c) = x.dims3()?;
        match &self.compressed {
            None => Ok(None),
            Some(Compressed::Heavy(c)) => {
                let Some(entries) = c.pool(x, &self.rope)? else {
                    return Ok(None);
                };
                let n = entries.dim(1)?;
                Ok(Some((entries, causal_entry_mask(b, t, n, c.rate(), x)?)))
            }
            Some(Compressed::Sparse {
                compressor,
                indexer,
            }) => {
                let Some(entries) = compressor.pool(x, &self.rope)? else {
                    return Ok(None);
                };
                let scores = indexer
                    .scores(&x.detach(), &q_res.detach(), &self.rope)?
                    .ok_or_else(|| {
                        crate::error::Error::Invalid("the indexer made no entries".into())
                    })?;
                let mask = indexer.selection_mask(&scores, x)?;
                Ok(Some((entries, mask)))
            }
        }
    }
}
