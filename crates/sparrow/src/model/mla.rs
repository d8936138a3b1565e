//! Multi-head latent attention (DeepSeek V2/V3; checkpoint keys as in HF
//! `DeepseekV3Attention`). Per token:
//!
//! ```text
//! q      = q_b_proj(RMSNorm(q_a_proj(x)))  (or q_proj(x))     (H, dn + dr)
//! c, kr  = split(kv_a_proj_with_mqa(x), [r, dr]); c = RMSNorm(c)
//! q_rot, kr = RoPE (interleaved pairs when `rope_interleave`)
//! k_h    = [W_UK_h c ; kr]   v_h = W_UV_h c    (kv_b_proj = [W_UK; W_UV] per head)
//! y      = o_proj(softmax(q_h . k_h / sqrt(dn + dr)) v_h)
//! ```
//!
//! The KV cache holds only `c` (r values) and the shared RoPE key `kr` (dr values) per
//! token. Prefill and training expand the latent into per-head keys and values; a
//! one-token decode step takes the absorbed path instead: `q_lat_h = W_UK_h^T q_nope_h`,
//! scores `q_lat_h . c + q_rot_h . kr` (MQA over the cached latent), then
//! `y_h = W_UV_h (sum_s p_s c_s)`, so nothing per head is ever built for the cache.

use super::attention::{append_index_keys, select_topk};
use super::cache::{LayerCache, LayerKv};
use super::indexer::Indexer;
use super::linear::Linear;
use super::norm::RmsNorm;
use super::params::Vb;
use super::rope::Rope;
use super::step::{Segment, StepOptions};
use super::transformer::ForwardOptions;
use crate::config::{AttentionKind, ModelConfig};
use crate::error::{Error, Result};
use crate::kernels::indexer::KeyPrecision;
use crate::kernels::softmax::CausalSoftmax;
use crate::kernels::topk::NONE;
use candle_core::{Tensor, D};

/// How the query is projected.
#[derive(Debug, Clone)]
pub enum QueryProj {
    /// `q_proj` (C -> H * (dn + dr)).
    Full(Linear),
    /// `q_a_proj` (C -> rq), `q_a_layernorm`, `q_b_proj` (rq -> H * (dn + dr)).
    LowRank {
        q_a_proj: Linear,
        q_a_layernorm: RmsNorm,
        q_b_proj: Linear,
    },
}

/// The inputs of one attention computation over the latent cache.
#[derive(Clone, Copy)]
struct LatentAttention<'a> {
    /// (B, H, T, dn)
    q_nope: &'a Tensor,
    /// (B, H, T, dr), RoPE applied
    q_rot: &'a Tensor,
    /// (B, 1, S, r)
    latent: &'a Tensor,
    /// (B, 1, S, dr), RoPE applied
    k_rot: &'a Tensor,
    /// (B, 1, T, S): 0 at selected positions, -inf elsewhere (DSA layers).
    mask: Option<&'a Tensor>,
    scale: f64,
    offset: usize,
}

#[derive(Debug, Clone)]
pub struct Mla {
    pub q: QueryProj,
    /// (r + dr, C)
    pub kv_a_proj_with_mqa: Linear,
    pub kv_a_layernorm: RmsNorm,
    /// (H * (dn + dv), r)
    pub kv_b_proj: Linear,
    /// (C, H * dv)
    pub o_proj: Linear,
    /// DSA layers (DeepSeek-V3.2): the lightning indexer, reading the query latent.
    pub indexer: Option<Indexer>,
    index_topk: usize,
    index_precision: KeyPrecision,
    rope: Rope,
    interleave: bool,
    n_heads: usize,
    rank: usize,
    nope: usize,
    rot: usize,
    v_dim: usize,
}

impl Mla {
    pub fn new(vb: &Vb, cfg: &ModelConfig, layer: usize, out_std: f64) -> Result<Self> {
        let rank = cfg
            .kv_lora_rank
            .ok_or_else(|| Error::config("kv_lora_rank", "MLA needs it"))?;
        let (c, h, std) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.initializer_range,
        );
        let (nope, rot, v_dim) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim);
        let eps = cfg.rms_norm_eps;
        let q = match cfg.q_lora_rank {
            None => QueryProj::Full(Linear::new(&vb.pp("q_proj"), c, h * (nope + rot), std)?),
            Some(rq) => QueryProj::LowRank {
                q_a_proj: Linear::new(&vb.pp("q_a_proj"), c, rq, std)?,
                q_a_layernorm: RmsNorm::new(&vb.pp("q_a_layernorm"), rq, eps)?,
                q_b_proj: Linear::new(&vb.pp("q_b_proj"), rq, h * (nope + rot), std)?,
            },
        };
        Ok(Self {
            q,
            kv_a_proj_with_mqa: Linear::new(&vb.pp("kv_a_proj_with_mqa"), c, rank + rot, std)?,
            kv_a_layernorm: RmsNorm::new(&vb.pp("kv_a_layernorm"), rank, eps)?,
            kv_b_proj: Linear::new(&vb.pp("kv_b_proj"), rank, h * (nope + v_dim), std)?,
            o_proj: Linear::new(&vb.pp("o_proj"), h * v_dim, c, out_std)?,
            indexer: if cfg.attention_kind(layer) == AttentionKind::Dsa {
                Some(Indexer::new(&vb.pp("indexer"), cfg)?)
            } else {
                None
            },
            index_topk: cfg.index_topk,
            index_precision: cfg.index_cache_dtype.key_precision(),
            rope: Rope::new(
                rot,
                cfg.max_position_embeddings,
                cfg.rope_theta,
                vb.dtype(),
                vb.device(),
            )?,
            interleave: cfg.rope_interleave,
            n_heads: h,
            rank,
            nope,
            rot,
            v_dim,
        })
    }

    fn rope(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        if self.interleave {
            self.rope.apply_interleaved(x, offset)
        } else {
            self.rope.apply(x, offset)
        }
    }

    /// x (B, T, C) at positions cache.len().. -> (B, T, C) and, on DSA layers asked for
    /// it, the selection (B, T, index_topk). Appends the latent and the RoPE key to
    /// `cache` if given (its `k` holds c (B, 1, S, r), its `v` kr (B, 1, S, dr); its index
    /// stores the indexer keys).
    pub fn forward(
        &self,
        x: &Tensor,
        mut cache: Option<&mut LayerKv>,
        opts: &ForwardOptions,
    ) -> Result<(Tensor, Option<Vec<u32>>)> {
        let (b, t, _c) = x.dims3()?;
        let (h, dn, dr) = (self.n_heads, self.nope, self.rot);
        let (q, q_latent) = match &self.q {
            QueryProj::Full(p) => (p.forward(x)?, None),
            QueryProj::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => {
                let lat = q_a_layernorm.forward(&q_a_proj.forward(x)?)?; // (B, T, rq)
                (q_b_proj.forward(&lat)?, Some(lat))
            }
        };
        let q = q.reshape((b, t, h, dn + dr))?.transpose(1, 2)?; // (B, H, T, dn + dr)
        let q_nope = q.narrow(D::Minus1, 0, dn)?.contiguous()?; // (B, H, T, dn)
        let q_rot = q.narrow(D::Minus1, dn, dr)?.contiguous()?; // (B, H, T, dr)
        let ckv = self.kv_a_proj_with_mqa.forward(x)?; // (B, T, r + dr)
        let latent = self
            .kv_a_layernorm
            .forward(&ckv.narrow(D::Minus1, 0, self.rank)?)?
            .unsqueeze(1)?; // (B, 1, T, r)
        let k_rot = ckv
            .narrow(D::Minus1, self.rank, dr)?
            .unsqueeze(1)?
            .contiguous()?; // (B, 1, T, dr)
        let offset = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let q_rot = self.rope(&q_rot, offset)?;
        let k_rot = self.rope(&k_rot, offset)?;
        let selection = match (&self.indexer, &q_latent) {
            (Some(_), _) if opts.indexer_mode.is_some() => {
                return Err(Error::Invalid(
                    "training DSA layers over MLA is not supported yet".into(),
                ))
            }
            (Some(ix), Some(lat)) => {
                let io = ix.forward_with_query_input(x, lat, offset)?;
                let keys = append_index_keys(&io, cache.as_deref_mut(), self.index_precision)?;
                if offset + t > self.index_topk && !opts.dense {
                    Some(select_topk(
                        ix,
                        &io,
                        &keys,
                        cache.as_deref().map(|c| &c.index[..]),
                        offset,
                        self.index_topk,
                        self.index_precision,
                    )?)
                } else {
                    None // every visible position fits in k: sparse == dense
                }
            }
            (Some(_), None) => {
                return Err(Error::config(
                    "q_lora_rank",
                    "a DSA indexer on MLA reads the query latent",
                ))
            }
            (None, _) => None,
        };
        let (latent, k_rot) = match cache {
            Some(c) => c.append(&latent, &k_rot)?,
            None => (latent.contiguous()?, k_rot),
        }; // (B, 1, S, r), (B, 1, S, dr)
        let s = latent.dim(2)?;
        let scale = 1.0 / ((dn + dr) as f64).sqrt();
        let y = match &selection {
            // One decode query with a selection: gather its selected latent rows and
            // attend over those alone (absorbed), so the step costs O(index_topk), not
            // O(S).
            Some(idx) if t == 1 && b == 1 && offset > 0 => {
                let keep: Vec<u32> = idx.iter().copied().filter(|&i| i != NONE).collect();
                let n = keep.len();
                let rows = Tensor::from_vec(keep, n, x.device())?;
                let lat = latent.index_select(&rows, 2)?; // (1, 1, K, r)
                let kr = k_rot.index_select(&rows, 2)?; // (1, 1, K, dr)
                self.absorbed(&LatentAttention {
                    q_nope: &q_nope,
                    q_rot: &q_rot,
                    latent: &lat,
                    k_rot: &kr,
                    mask: None,
                    scale,
                    offset: n - 1, // the query sees all K gathered rows
                })?
            }
            _ => {
                // Unselected positions get -inf before the softmax, (B, 1, T, S).
                let mask = match &selection {
                    Some(idx) => Some(self.selection_mask(idx, b, t, s, x)?),
                    None => None,
                };
                let a = LatentAttention {
                    q_nope: &q_nope,
                    q_rot: &q_rot,
                    latent: &latent,
                    k_rot: &k_rot,
                    mask: mask.as_ref(),
                    scale,
                    offset,
                };
                if t == 1 && offset > 0 {
                    self.absorbed(&a)?
                } else {
                    self.expanded(&a)?
                }
            }
        }; // (B, T, H * dv)
        let selection = if opts.collect_selection {
            selection
        } else {
            None
        };
        Ok((self.o_proj.forward(&y)?, selection))
    }

    /// The engine's step over packed rows x (N, C): each segment runs this layer's
    /// tensor forward over its own latent cache (cache.latent): a decode token of a DSA
    /// layer attends over its gathered top-k latent rows, a prefill chunk applies its
    /// selection as a mask (the latent store does not go through the sparse kernel
    /// yet). -> (N, C).
    pub(crate) fn step(
        &self,
        x: &Tensor,
        segs: &[Segment],
        caches: &mut [&mut LayerCache],
        opts: &StepOptions,
    ) -> Result<Tensor> {
        let fwd = ForwardOptions {
            dense: opts.dense,
            ..Default::default()
        };
        let mut ys = Vec::with_capacity(segs.len());
        for (seg, cache) in segs.iter().zip(caches.iter_mut()) {
            cache.check_position(seg.pos)?;
            let xs = x.narrow(0, seg.start, seg.len)?.unsqueeze(0)?; // (1, T, C)
            let latent = cache.latent.get_or_insert_with(LayerKv::default);
            let (y, _) = self.forward(&xs, Some(latent), &fwd)?;
            ys.push(y.squeeze(0)?); // (T, C)
        }
        Ok(Tensor::cat(&ys, 0)?)
    }

    /// 0 at each query's selected positions, -inf elsewhere: (B, 1, T, S).
    fn selection_mask(
        &self,
        idx: &[u32],
        b: usize,
        t: usize,
        s: usize,
        like: &Tensor,
    ) -> Result<Tensor> {
        let k = self.index_topk;
        let mut m = vec![f32::NEG_INFINITY; b * t * s];
        for (n, row) in idx.chunks_exact(k).enumerate() {
            for &i in row.iter().filter(|&&i| i != NONE) {
                m[n * s + i as usize] = 0.0;
            }
        }
        Ok(Tensor::from_vec(m, (b, 1, t, s), like.device())?.to_dtype(like.dtype())?)
    }

    /// Per-head keys and values from the latent, then causal attention (restricted to the
    /// selected positions by `mask`).
    fn expanded(&self, a: &LatentAttention) -> Result<Tensor> {
        let LatentAttention {
            q_nope,
            q_rot,
            latent,
            k_rot,
            mask,
            scale,
            offset,
        } = *a;
        let (b, h, t, dn) = q_nope.dims4()?;
        let (dr, dv) = (self.rot, self.v_dim);
        let s = latent.dim(2)?;
        let kv = self
            .kv_b_proj
            .forward(&latent.squeeze(1)?)? // (B, S, H * (dn + dv))
            .reshape((b, s, h, dn + dv))?
            .transpose(1, 2)?; // (B, H, S, dn + dv)
        let k_nope = kv.narrow(D::Minus1, 0, dn)?.contiguous()?;
        let v = kv.narrow(D::Minus1, dn, dv)?.contiguous()?;
        let k_rot = k_rot.broadcast_as((b, h, s, dr))?.contiguous()?;
        let k = Tensor::cat(&[&k_nope, &k_rot], D::Minus1)?; // (B, H, S, dn + dr)
        let q = Tensor::cat(&[q_nope, q_rot], D::Minus1)?; // (B, H, T, dn + dr)
        let mut scores = q.matmul(&k.t()?)?; // (B, H, T, S)
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let p = CausalSoftmax {
            scale,
            queries: t,
            offset,
        }
        .apply(&scores)?;
        let y = p.matmul(&v)?; // (B, H, T, dv)
        Ok(y.transpose(1, 2)?.reshape((b, t, h * dv))?)
    }

    /// The absorbed path (MQA over the cached latent), for one query token per row.
    fn absorbed(&self, a: &LatentAttention) -> Result<Tensor> {
        let LatentAttention {
            q_nope,
            q_rot,
            latent,
            k_rot,
            mask,
            scale,
            offset,
        } = *a;
        let (b, h, t, dn) = q_nope.dims4()?;
        let (r, dv) = (self.rank, self.v_dim);
        // kv_b_proj weight (H * (dn + dv), r) -> per head W_UK (dn, r), W_UV (dv, r).
        let w = self.kv_b_proj.weight()?.reshape((h, dn + dv, r))?;
        let w_uk = w.narrow(1, 0, dn)?; // (H, dn, r)
        let w_uv = w.narrow(1, dn, dv)?; // (H, dv, r)

        // q_lat (B, H, T, r) = q_nope (B, H, T, dn) @ W_UK (H, dn, r)
        let q_lat = q_nope
            .transpose(0, 1)? // (H, B, T, dn)
            .reshape((h, b * t, dn))?
            .matmul(&w_uk.contiguous()?)? // (H, B*T, r)
            .reshape((h, b, t, r))?
            .transpose(0, 1)?; // (B, H, T, r)
        let q_cat = Tensor::cat(&[&q_lat.contiguous()?, q_rot], D::Minus1)?; // (B, H, T, r + dr)
        let k_cat = Tensor::cat(&[latent, k_rot], D::Minus1)?; // (B, 1, S, r + dr)
        let q_cat = q_cat.reshape((b, 1, h * t, r + self.rot))?; // heads share the one key
        let mut scores = q_cat.matmul(&k_cat.t()?)?; // (B, 1, H*T, S)
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?; // T = 1: one mask row for all heads
        }
        let p = CausalSoftmax {
            scale,
            queries: t,
            offset,
        }
        .apply(&scores)?;
        let o_lat = p.matmul(latent)?.reshape((b, h, t, r))?; // (B, H, T, r)
                                                              // y (B, H, T, dv) = o_lat @ W_UV^T per head
        let y = o_lat
            .transpose(0, 1)?
            .reshape((h, b * t, r))?
            .matmul(&w_uv.transpose(1, 2)?.contiguous()?)? // (H, B*T, dv)
            .reshape((h, b, t, dv))?
            .transpose(0, 1)?; // (B, H, T, dv)
        Ok(y.transpose(1, 2)?.reshape((b, t, h * dv))?)
    }
}
