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

use super::attention::{
    attend_cached, dense_kl, full_recall, head_target, kl_loss, kl_on_rows, positions_index,
    sample_positions, SampledRecall,
};
use super::cache::{CacheRows, LayerCache};
use super::diagnostics::LayerDiagnostics;
use super::indexer::IndexerOut;
use super::linear::{host_f32, Linear};
use super::norm::RmsNorm;
use super::options::ForwardOptions;
use super::params::Vb;
use super::rope::Rope;
use super::selector::{select_in_step, TopkSelector};
use super::step::{per_segment, LayerTelemetry, Segment, StepOptions};
use crate::config::{AttentionKind, IndexerTrainMode, ModelConfig};
use crate::error::{Error, Result};
use crate::kernels::softmax::CausalSoftmax;
use crate::kernels::sparse_attention::{self, SparseDims};
use crate::kernels::topk::NONE;
use candle_core::{Tensor, D};
use std::sync::OnceLock;

/// A DSA layer's indexer signals from one forward: the KL loss (training), the recall
/// per query and the best recall any k positions could reach (`eval recall`).
type IndexerSignals = (Option<Tensor>, Option<Vec<f32>>, Option<Vec<f32>>);

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

/// MLA's per-head form.
struct Expanded {
    /// (B, H, T, dn + dr), RoPE applied
    q: Tensor,
    /// (B, H, S, dn + dr)
    k: Tensor,
    /// (B, H, S, dv)
    v: Tensor,
}

/// A window's queries and latent entries, before the per-head expansion.
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
    /// DSA layers (DeepSeek-V3.2): the lightning indexer, reading the query latent,
    /// and its top-k.
    pub selector: Option<TopkSelector>,
    rope: Rope,
    interleave: bool,
    n_heads: usize,
    rank: usize,
    nope: usize,
    rot: usize,
    v_dim: usize,
    /// W_UK and W_UV^T of frozen weights (see `absorbed_weights`).
    absorbed: OnceLock<(Tensor, Tensor)>,
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
            selector: if cfg.attention_kind(layer) == AttentionKind::Dsa {
                Some(TopkSelector::new(vb, cfg)?)
            } else {
                None
            },
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
            absorbed: OnceLock::new(),
        })
    }

    /// RoPE of a whole window (positions from 0), in this layer's layout.
    fn rope(&self, x: &Tensor) -> Result<Tensor> {
        if self.interleave {
            self.rope.apply_interleaved(x, 0)
        } else {
            self.rope.apply(x, 0)
        }
    }

    /// x (B, T, C), a whole window from position 0 -> the attention output (B, T, C);
    /// DSA layers write the indexer's KL loss (training), recall and selection (when
    /// asked) into `diag`. Expanded per-head form;
    /// incremental decoding is [`Self::step`] (absorbed, over the latent store).
    ///
    /// Training a DSA layer (DeepSeek-V3.2's two stages, `opts.indexer_mode`): in the
    /// dense warm-up attention stays dense and the indexer learns KL(p || softmax(I))
    /// over every visible position, p the attention summed over heads and normalised;
    /// in the sparse stage each query attends to its top-k only (a -inf mask on the
    /// expanded scores, so the LM loss trains the attention through the selection) and
    /// the indexer learns the KL over its selection. The indexer reads detached inputs:
    /// its loss moves only itself.
    pub fn forward(
        &self,
        x: &Tensor,
        opts: &ForwardOptions,
        diag: &mut LayerDiagnostics,
    ) -> Result<Tensor> {
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
        let q_rot = self.rope(&q_rot)?;
        let k_rot = self.rope(&k_rot)?;
        let mode = opts.indexer_mode;
        let index = match (&self.selector, &q_latent) {
            (Some(sel), Some(lat)) => {
                let ix = &sel.indexer;
                if mode == Some(IndexerTrainMode::Ste) {
                    return Err(Error::config(
                        "indexer_kind",
                        "the straight-through mlp_gate is not trained over MLA; use lightning \
                         (dense warm-up, then sparse)",
                    ));
                }
                // The KL-trained indexer learns on detached input.
                let (x_in, lat_in) = match mode {
                    Some(_) => (x.detach(), lat.detach()),
                    None => (x.clone(), lat.clone()),
                };
                let io = ix.forward_with_query_input(&x_in, &lat_in, 0)?;
                let sparse =
                    t > sel.topk && !opts.dense && mode != Some(IndexerTrainMode::DenseWarmup);
                let selection = if sparse {
                    Some(sel.window(&io)?)
                } else {
                    None // every visible position fits in k (sparse == dense), or dense
                };
                Some((sel, io, selection))
            }
            (Some(_), None) => {
                return Err(Error::config(
                    "q_lora_rank",
                    "a DSA indexer on MLA reads the query latent",
                ))
            }
            (None, _) => None,
        };
        let latent = latent.contiguous()?; // (B, 1, S, r)
        let s = t;
        let scale = 1.0 / ((dn + dr) as f64).sqrt();
        let a = LatentAttention {
            q_nope: &q_nope,
            q_rot: &q_rot,
            latent: &latent,
            k_rot: &k_rot,
        };
        // Unselected positions get -inf before the softmax, (B, 1, T, S).
        let mask = match index.as_ref() {
            Some((sel, _, Some(idx))) => Some(selection_mask(idx, sel.topk, b, t, s, x)?),
            _ => None,
        };
        let ex = self.expand(&a)?;
        let (y, p) = self.expanded(&ex, mask.as_ref(), scale)?; // (B, T, H * dv)
        if let Some((sel, io, selection)) = index {
            (diag.indexer_kl, diag.recall, diag.best_recall) =
                self.indexer_signals(sel, &io, selection.as_deref(), &ex, &p, mode, opts)?;
            if opts.collect.selection {
                diag.selection = selection;
            }
        }
        self.o_proj.forward(&y)
    }

    /// The indexer's training loss and recall from one expanded forward: KL over every
    /// visible position from the dense probabilities `p` (no selection: the warm-up)
    /// or over the selection from the attention restricted to it (the sparse stage);
    /// recall = the share of dense attention mass on the selection (1 without one), and
    /// the best share any k positions could hold.
    #[allow(clippy::too_many_arguments)]
    fn indexer_signals(
        &self,
        sel: &TopkSelector,
        io: &IndexerOut,
        selection: Option<&[u32]>,
        ex: &Expanded,
        p: &Tensor,
        mode: Option<IndexerTrainMode>,
        opts: &ForwardOptions,
    ) -> Result<IndexerSignals> {
        let (b, h, t, dk) = ex.q.dims4()?;
        let s = ex.k.dim(2)?;
        let (ix, kk) = (&sel.indexer, sel.topk);
        let dims = SparseDims {
            b,
            t,
            h,
            kv: h,
            s,
            d: dk,
            k: kk,
        };
        let scale = 1.0 / (dk as f64).sqrt();
        let host_qk = || -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((
                host_f32(&ex.q.transpose(1, 2)?)?, // (B, T, H, dk)
                host_f32(&ex.k)?,                  // (B, H, S, dk)
            ))
        };
        let kl = match (mode, selection) {
            (None, _) => None,
            (Some(_), None) => match opts.kl_query_sample {
                // p (B, H, T, S) is the dense attention: the warm-up target, on a
                // sample of the queries or on all of them.
                Some((count, seed)) if count < t => {
                    let rows = sample_positions(t, count, seed);
                    let idx = positions_index(&rows, p.device())?;
                    let p = p.detach().contiguous()?.index_select(&idx, 2)?; // (B, H, N, S)
                    let target = head_target(&p, sel.kl_target)?;
                    Some(kl_on_rows(ix, io, &host_f32(&target)?, &rows)?)
                }
                _ => Some(dense_kl(ix, io, p, sel.kl_target)?),
            },
            (Some(_), Some(idx)) => {
                let (q, k) = host_qk()?;
                let combine = sel.kl_target.head_combine();
                let target = sparse_attention::selected_probs(dims, scale, &q, &k, idx, combine)?;
                let valid: Vec<bool> = idx.iter().map(|&i| i != NONE).collect();
                let scores = ix.score_selected(io, &io.k, idx, kk)?; // (B, T, K)
                Some(kl_loss(&scores, &target, &valid)?)
            }
        };
        let (recall, best) = match (opts.collect.recall_from, selection) {
            (None, _) => (None, None),
            (Some(from), None) => (Some(full_recall(b, t, from)), Some(full_recall(b, t, from))),
            (Some(from), Some(idx)) => {
                let (q, k) = host_qk()?;
                (
                    Some(sparse_attention::selected_mass(
                        dims, scale, &q, &k, idx, 0, from,
                    )?),
                    Some(sparse_attention::best_mass(dims, scale, &q, &k, 0, from)?),
                )
            }
        };
        Ok((kl, recall, best))
    }

    /// The engine's step over packed rows x (N, C), absorbed (MQA over the latent
    /// store): each row's query becomes `[W_UK_h^T q_nope_h ; RoPE(q_rot_h)]` per head
    /// (r + dr), each new position appends `[c ; RoPE(k_rot)]` to its sequence's latent
    /// store, and the attention kernels read that store with the latent as the value
    /// (`CacheRows::key_prefix`): flash-decoding or causal prefill over every visible
    /// position, or on DSA layers the indexer's top-k through the sparse kernel, so a
    /// V3.2 layer costs O(index_topk) per query in prefill and decode alike. The heads'
    /// latent outputs go through W_UV, then `o_proj`. -> (N, C).
    pub(crate) fn step(
        &self,
        x: &Tensor,
        segs: &[Segment],
        caches: &mut [&mut LayerCache],
        opts: &StepOptions,
        tel: &mut LayerTelemetry,
    ) -> Result<Tensor> {
        let (n, _c) = x.dims2()?;
        let (h, dn, dr, r, dv) = (self.n_heads, self.nope, self.rot, self.rank, self.v_dim);
        let (q, q_latent) = match &self.q {
            QueryProj::Full(p) => (p.infer(x)?, None),
            QueryProj::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => {
                let lat = q_a_layernorm.forward(&q_a_proj.infer(x)?)?; // (N, rq)
                (q_b_proj.infer(&lat)?, Some(lat))
            }
        }; // (N, H * (dn + dr))
        let ckv = self.kv_a_proj_with_mqa.infer(x)?; // (N, r + dr)
        let latent = host_f32(&self.kv_a_layernorm.forward(&ckv.narrow(1, 0, r)?)?)?; // (N, r)
        let k_rot = host_f32(&ckv.narrow(1, r, dr)?)?; // (N, dr)
        let q = q.reshape((n, h, dn + dr))?;
        let (w_uk, w_uv_t) = self.absorbed_weights()?;
        let q_lat = q
            .narrow(2, 0, dn)?
            .transpose(0, 1)?
            .contiguous()? // (H, N, dn)
            .matmul(&w_uk)? // (H, N, r)
            .transpose(0, 1)?; // (N, H, r)
        let q_lat = host_f32(&q_lat)?;
        let q_rot = host_f32(&q.narrow(2, dn, dr)?)?; // (N, H, dr)
        let w = r + dr;
        // Absorbed queries (N, H, r + dr) and new latent-store rows (N, r + dr).
        let mut qa = vec![0.0f32; n * h * w];
        let mut rows = vec![0.0f32; n * w];
        for (seg, cache) in segs.iter().zip(caches.iter()) {
            cache.check_position(seg.pos)?;
            for (i, row) in seg.rows().enumerate() {
                let pos = seg.pos + i;
                for head in 0..h {
                    let dst = &mut qa[(row * h + head) * w..(row * h + head + 1) * w];
                    dst[..r]
                        .copy_from_slice(&q_lat[(row * h + head) * r..(row * h + head + 1) * r]);
                    dst[r..]
                        .copy_from_slice(&q_rot[(row * h + head) * dr..(row * h + head + 1) * dr]);
                    self.rope_host(&mut dst[r..], pos)?;
                }
                let dst = &mut rows[row * w..(row + 1) * w];
                dst[..r].copy_from_slice(&latent[row * r..(row + 1) * r]);
                dst[r..].copy_from_slice(&k_rot[row * dr..(row + 1) * dr]);
                self.rope_host(&mut dst[r..], pos)?;
            }
        }
        let index = match (&self.selector, &q_latent) {
            (Some(sel), Some(lat)) => Some(sel.step_rows(x, lat, segs)?),
            (Some(_), None) => {
                return Err(Error::config(
                    "q_lora_rank",
                    "a DSA indexer on MLA reads the query latent",
                ))
            }
            (None, _) => None,
        };
        let scale = 1.0 / ((dn + dr) as f32).sqrt();
        // Each sequence's selection, latent-store write and attention; sequences in
        // parallel (each owns its cache).
        let sampled = SampledRecall::new(opts.telemetry);
        let outs = per_segment(segs, caches, |seg, cache| {
            let selection = select_in_step(
                self.selector.as_ref(),
                index.as_ref(),
                seg,
                cache,
                opts.dense,
            )?;
            let store = cache.latent_mut(w);
            store.append_token_major(&rows[seg.start * w..(seg.start + seg.len) * w]);
            let kv = CacheRows::key_prefix(store, r);
            let qs = &qa[seg.start * h * w..(seg.start + seg.len) * h * w];
            sampled.measure(seg, qs, &kv, h, selection.as_deref(), scale);
            Ok(attend_cached(qs, kv, seg, selection.as_deref(), scale)) // (T, H, r)
        })?;
        sampled.store(tel);
        let y_lat: Vec<f32> = outs.concat(); // (N, H, r): segments are consecutive rows
        let y = Tensor::from_vec(y_lat, (n, h, r), x.device())?
            .to_dtype(w_uv_t.dtype())?
            .transpose(0, 1)?
            .contiguous()? // (H, N, r)
            .matmul(&w_uv_t)? // (H, N, dv)
            .transpose(0, 1)?
            .reshape((n, h * dv))?
            .to_dtype(x.dtype())?;
        self.o_proj.infer(&y)
    }

    /// RoPE of one head's rotary slice on the host, in this layer's layout.
    fn rope_host(&self, x: &mut [f32], pos: usize) -> Result<()> {
        if self.interleave {
            self.rope.rotate_interleaved_host(x, pos)
        } else {
            self.rope.rotate_host(x, pos)
        }
    }

    /// `kv_b_proj` split per head for the absorbed path: W_UK (H, dn, r) and W_UV^T
    /// (H, r, dv). Computed once for frozen weights (inference loads), every call while
    /// the weight is a training variable.
    fn absorbed_weights(&self) -> Result<(Tensor, Tensor)> {
        let make = || -> Result<(Tensor, Tensor)> {
            let (h, dn, dv, r) = (self.n_heads, self.nope, self.v_dim, self.rank);
            let w = self.kv_b_proj.weight()?.reshape((h, dn + dv, r))?;
            Ok((
                w.narrow(1, 0, dn)?.contiguous()?,
                w.narrow(1, dn, dv)?.transpose(1, 2)?.contiguous()?,
            ))
        };
        if self.kv_b_proj.is_trainable() {
            return make();
        }
        if let Some(w) = self.absorbed.get() {
            return Ok(w.clone());
        }
        let w = make()?;
        Ok(self.absorbed.get_or_init(|| w).clone())
    }

    /// Per-head queries, keys and values from the latent (the training and prefill
    /// form of MLA).
    fn expand(&self, a: &LatentAttention) -> Result<Expanded> {
        let (b, h, _t, dn) = a.q_nope.dims4()?;
        let (dr, dv) = (self.rot, self.v_dim);
        let s = a.latent.dim(2)?;
        let kv = self
            .kv_b_proj
            .forward(&a.latent.squeeze(1)?)? // (B, S, H * (dn + dv))
            .reshape((b, s, h, dn + dv))?
            .transpose(1, 2)?; // (B, H, S, dn + dv)
        let k_nope = kv.narrow(D::Minus1, 0, dn)?.contiguous()?;
        let v = kv.narrow(D::Minus1, dn, dv)?.contiguous()?;
        let k_rot = a.k_rot.broadcast_as((b, h, s, dr))?.contiguous()?;
        Ok(Expanded {
            q: Tensor::cat(&[a.q_nope, a.q_rot], D::Minus1)?, // (B, H, T, dn + dr)
            k: Tensor::cat(&[&k_nope, &k_rot], D::Minus1)?,   // (B, H, S, dn + dr)
            v,                                                // (B, H, S, dv)
        })
    }

    /// Causal attention over the expanded heads, restricted to the selected positions
    /// by `mask` (B, 1, T, S): y (B, T, H * dv) and the probabilities (B, H, T, S).
    fn expanded(
        &self,
        ex: &Expanded,
        mask: Option<&Tensor>,
        scale: f64,
    ) -> Result<(Tensor, Tensor)> {
        let (b, h, t, _) = ex.q.dims4()?;
        let dv = self.v_dim;
        let mut scores = ex.q.matmul(&ex.k.t()?)?; // (B, H, T, S)
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let p = CausalSoftmax {
            scale,
            queries: t,
            offset: 0,
        }
        .apply(&scores)?;
        let y = p.matmul(&ex.v)?; // (B, H, T, dv)
        Ok((y.transpose(1, 2)?.reshape((b, t, h * dv))?, p))
    }
}

/// 0 at each query's selected positions, -inf elsewhere: (B, 1, T, S).
fn selection_mask(
    idx: &[u32],
    k: usize,
    b: usize,
    t: usize,
    s: usize,
    like: &Tensor,
) -> Result<Tensor> {
    let mut m = vec![f32::NEG_INFINITY; b * t * s];
    for (n, row) in idx.chunks_exact(k).enumerate() {
        for &i in row.iter().filter(|&&i| i != NONE) {
            m[n * s + i as usize] = 0.0;
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, t, s), like.device())?.to_dtype(like.dtype())?)
}
