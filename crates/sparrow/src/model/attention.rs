//! Causal self-attention with MHA / GQA / MQA key-value sharing
//! (`num_key_value_heads` = H, a divisor of H, or 1), dense or DSA.
//!
//! Dense: query heads are grouped by the KV head they share, so K and V are never
//! repeated: q (B, KV, G*T, D) @ k^T (B, KV, D, S). DSA (`layer_types` = `dsa`): the
//! selector's indexer (`self.selector`) scores every visible position, the fused top-k
//! kernel keeps `index_topk` per query, and attention runs over those rows only
//! (`kernels::sparse_attention`). With at most `index_topk` visible positions the DSA
//! layer computes dense attention, which is then exactly what the top-k would select.
//! `forward` runs whole windows as tensors (training, evaluation, parity); `step` runs
//! the engine's packed rows over per-sequence caches with the kernels.

use super::cache::{CacheRows, LayerCache};
use super::diagnostics::LayerDiagnostics;
use super::indexer::{Indexer, IndexerOut};
use super::linear::{host_f32, Linear};
use super::options::ForwardOptions;
use super::params::Vb;
use super::rope::Rope;
use super::selector::{select_in_step, TopkSelector};
use super::step::{per_segment, LayerTelemetry, Segment, StepOptions};
use crate::config::{AttentionKind, IndexerKlTarget, IndexerTrainMode, ModelConfig};
use crate::error::Result;
use crate::kernels::decode_attention;
use crate::kernels::kv_rows::{CacheElem, KvRows};
use crate::kernels::softmax::CausalSoftmax;
use crate::kernels::sparse_attention::{self, SparseAttention, SparseDims, SteGate};
use crate::kernels::topk::NONE;
use candle_core::{Tensor, D};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// DSA layers only: the indexer and its top-k.
    pub selector: Option<TopkSelector>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

/// Log-domain mask value for positions outside the visible / selected set (finite, so
/// no inf - inf appears in gradients).
const MASKED: f64 = -1e9;

/// Queries per block of the dense path when the probabilities are not needed: block j
/// attends to keys `..(j + 1) * DENSE_QUERY_BLOCK` only, so a long training
/// window keeps about half of the (T, S) score and probability matrices for the backward
/// pass instead of all of it, and the transients are one block's. Same result as one
/// block (each query row is the same computation).
pub const DENSE_QUERY_BLOCK: usize = 1024;

impl Attention {
    pub fn new(vb: &Vb, cfg: &ModelConfig, layer: usize, out_std: f64) -> Result<Self> {
        let c = cfg.hidden_size;
        let (h, kv, d) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let std = cfg.initializer_range;
        let selector = match cfg.attention_kind(layer) {
            AttentionKind::Dense => None,
            AttentionKind::Dsa => Some(TopkSelector::new(vb, cfg)?),
            other => {
                return Err(crate::error::Error::Invalid(format!(
                "layer {layer}: `{other:?}` layers are DeepSeek-V4 attention (model::v4_attention)"
            )))
            }
        };
        Ok(Self {
            q_proj: Linear::new(&vb.pp("q_proj"), c, h * d, std)?,
            k_proj: Linear::new(&vb.pp("k_proj"), c, kv * d, std)?,
            v_proj: Linear::new(&vb.pp("v_proj"), c, kv * d, std)?,
            o_proj: Linear::new(&vb.pp("o_proj"), h * d, c, out_std)?,
            selector,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: d,
        })
    }

    /// x (B, T, C), a whole window from position 0 -> (B, T, C) (training,
    /// evaluation, parity; incremental decoding is [`Self::step`]). DSA layers write
    /// their indexer KL, recall and selection into `diag` when trained or asked for.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        opts: &ForwardOptions,
        diag: &mut LayerDiagnostics,
    ) -> Result<Tensor> {
        let (b, t, _c) = x.dims3()?;
        let (h, kv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
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
        let q = rope.apply(&q.contiguous()?, 0)?;
        let k = rope.apply(&k.contiguous()?, 0)?;
        let y = match &self.selector {
            None => self.dense_blocked(&q, &k, &v)?,
            Some(sel) => self.forward_dsa(sel, x, &q, &k, &v, opts, diag)?,
        }; // (B, T, H*D)
        self.o_proj.forward(&y)
    }

    /// Dense causal attention in query blocks of `DENSE_QUERY_BLOCK` (see there):
    /// q (B, H, T, D), k, v (B, KV, S, D) -> y (B, T, H*D).
    fn dense_blocked(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let t = q.dim(2)?;
        if t <= DENSE_QUERY_BLOCK {
            return Ok(self.dense(q, k, v, 0)?.0);
        }
        let mut ys = Vec::with_capacity(t.div_ceil(DENSE_QUERY_BLOCK));
        for t0 in (0..t).step_by(DENSE_QUERY_BLOCK) {
            let n = DENSE_QUERY_BLOCK.min(t - t0);
            let keys = t0 + n; // the block's last query sees these
            let qb = q.narrow(2, t0, n)?.contiguous()?; // (B, H, n, D)
            let kb = k.narrow(2, 0, keys)?.contiguous()?; // (B, KV, keys, D)
            let vb = v.narrow(2, 0, keys)?.contiguous()?;
            ys.push(self.dense(&qb, &kb, &vb, t0)?.0); // (B, n, H*D)
        }
        Ok(Tensor::cat(&ys, 1)?)
    }

    /// Dense causal attention: q (B, H, T, D), k, v (B, KV, S, D) -> y (B, T, H*D) and
    /// the attention probabilities (B, KV, G*T, S).
    fn dense(&self, q: &Tensor, k: &Tensor, v: &Tensor, offset: usize) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = q.dims4()?;
        let kv = self.n_kv_heads;
        let g = h / kv;
        let q = q.reshape((b, kv, g * t, d))?; // (B, KV, G*T, D): heads grouped by KV head
        let scores = q.matmul(&k.t()?)?; // (B, KV, G*T, S)
                                         // softmax(scores / sqrt(D)) with the causal mask, fused (kernels::softmax).
        let att = CausalSoftmax {
            scale: 1.0 / (d as f64).sqrt(),
            queries: t,
            offset,
        }
        .apply(&scores)?;
        let y = att.matmul(v)?; // (B, KV, G*T, D)
        let y = y
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))?;
        Ok((y, att))
    }

    /// The DSA layer over a whole window: q (B, H, T, D), k, v (B, KV, T, D) ->
    /// y (B, T, H*D), its signals written into `diag`.
    #[allow(clippy::too_many_arguments)]
    fn forward_dsa(
        &self,
        sel: &TopkSelector,
        x: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        opts: &ForwardOptions,
        diag: &mut LayerDiagnostics,
    ) -> Result<Tensor> {
        let (b, h, t, d) = q.dims4()?;
        let s = t; // a whole window: every query sees the positions up to its own
        let mode = opts.indexer_mode;
        // The KL-trained indexer learns on detached input: its loss moves only itself.
        let detach = matches!(
            mode,
            Some(IndexerTrainMode::DenseWarmup) | Some(IndexerTrainMode::Sparse)
        );
        let x_in = if detach { x.detach() } else { x.clone() };
        let ix = &sel.indexer;
        let io = ix.forward(&x_in, 0)?;
        let want_kl = match mode {
            Some(IndexerTrainMode::DenseWarmup) | Some(IndexerTrainMode::Sparse) => true,
            Some(IndexerTrainMode::Ste) => opts.collect.indexer_kl,
            None => false,
        };
        let kk = sel.topk;
        if s <= kk || mode == Some(IndexerTrainMode::DenseWarmup) || opts.dense {
            // Every visible position fits in k (sparse == dense), the dense warm-up, or
            // the dense selector asked for.
            let (y, indexer_kl) = if want_kl {
                match opts.kl_query_sample {
                    Some((count, seed)) if count < t => {
                        let rows = sample_positions(t, count, seed);
                        let kl =
                            sampled_dense_kl(ix, &io, q, k, &rows, self.n_kv_heads, sel.kl_target)?;
                        (self.dense_blocked(q, k, v)?, Some(kl))
                    }
                    _ => {
                        let (y, att) = self.dense(q, k, v, 0)?;
                        let att = att.reshape((b, h, t, s))?;
                        let kl = dense_kl(ix, &io, &att, sel.kl_target)?;
                        (y, Some(kl))
                    }
                }
            } else {
                (self.dense_blocked(q, k, v)?, None)
            };
            diag.indexer_kl = indexer_kl;
            diag.recall = opts.collect.recall_from.map(|from| full_recall(b, t, from));
            diag.best_recall = diag.recall.clone();
            return Ok(y);
        }

        let idx = sel.window(&io)?;
        let idx = Arc::new(idx);
        let dims = SparseDims {
            b,
            t,
            h,
            kv: self.n_kv_heads,
            s,
            d,
            k: kk,
        };
        let scale = 1.0 / (d as f64).sqrt();
        let qs = q.transpose(1, 2)?.contiguous()?; // (B, T, H, D)
        let k = k.contiguous()?;
        let v = v.contiguous()?;
        let attn = SparseAttention {
            dims,
            scale,
            idx: idx.clone(),
        };
        let mut y = attn.apply(&qs, &k, &v)?; // (B, T, H, D)
        let selected = if mode == Some(IndexerTrainMode::Ste) || want_kl {
            Some(ix.score_selected(&io, &io.k, &idx, kk)?) // (B, T, K)
        } else {
            None
        };
        if let (Some(IndexerTrainMode::Ste), Some(sel)) = (mode, &selected) {
            let sigma = candle_nn::ops::sigmoid(sel)?;
            let gate = SteGate {
                attn: attn.clone(),
                q: qs.detach(),
                k: k.detach(),
                v: v.detach(),
            };
            y = (y + gate.apply(&sigma)?)?;
        }
        diag.indexer_kl = match (&selected, want_kl) {
            (Some(scores), true) => {
                let target = sparse_attention::selected_probs(
                    dims,
                    scale,
                    &host_f32(&qs)?,
                    &host_f32(&k)?,
                    &idx,
                    sel.kl_target.head_combine(),
                )?;
                let valid: Vec<bool> = idx.iter().map(|&i| i != NONE).collect();
                Some(kl_loss(scores, &target, &valid)?)
            }
            _ => None,
        };
        if let Some(from) = opts.collect.recall_from {
            let (qh, kh) = (host_f32(&qs)?, host_f32(&k)?);
            diag.recall = Some(sparse_attention::selected_mass(
                dims, scale, &qh, &kh, &idx, 0, from,
            )?);
            diag.best_recall = Some(sparse_attention::best_mass(dims, scale, &qh, &kh, 0, from)?);
        }
        if opts.collect.selection {
            diag.selection = Some(idx.to_vec());
        }
        Ok(y.reshape((b, t, h * d))?)
    }
}

impl Attention {
    /// The engine's step: x (N, C) holds the new tokens of every segment; each
    /// segment's queries attend over its own cache (written in place here) with the
    /// fast kernels: flash-decoding for one dense query, blocked causal prefill for a
    /// chunk, and on DSA layers past `index_topk` visible positions the fused indexer
    /// top-k and sparse attention over the selection. -> (N, C).
    pub(crate) fn step(
        &self,
        x: &Tensor,
        segs: &[Segment],
        caches: &mut [&mut LayerCache],
        rope: &Rope,
        opts: &StepOptions,
        tel: &mut LayerTelemetry,
    ) -> Result<Tensor> {
        let (n, _c) = x.dims2()?;
        let (h, kv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let qkv = Linear::infer_many(&[&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        let mut q = host_f32(&qkv[0])?; // (N, H*D)
        let mut k = host_f32(&qkv[1])?; // (N, KV*D)
        let v = host_f32(&qkv[2])?; // (N, KV*D)
        let scale = 1.0 / (d as f32).sqrt();
        // Every row at its position: RoPE on queries and keys (and, on DSA layers, the
        // indexer's rows, projected once for the whole step).
        for seg in segs {
            for (i, r) in seg.rows().enumerate() {
                rope.rotate_host(&mut q[r * h * d..(r + 1) * h * d], seg.pos + i)?;
                rope.rotate_host(&mut k[r * kv * d..(r + 1) * kv * d], seg.pos + i)?;
            }
        }
        let index = match &self.selector {
            Some(sel) => Some(sel.step_rows(x, x, segs)?),
            None => None,
        };
        // Each sequence's selection, cache write and attention; sequences in parallel
        // (each owns its cache).
        let sampled = SampledRecall::new(opts.telemetry);
        let outs = per_segment(segs, caches, |seg, cache| {
            cache.check_position(seg.pos)?;
            let selection = select_in_step(
                self.selector.as_ref(),
                index.as_ref(),
                seg,
                cache,
                opts.dense,
            )?;
            let rows = seg.start * kv * d..(seg.start + seg.len) * kv * d;
            let (kc, vc) = cache.kv_mut(kv, d);
            kc.append_token_major(&k[rows.clone()]);
            vc.append_token_major(&v[rows]);
            let qs = &q[seg.start * h * d..(seg.start + seg.len) * h * d]; // (T, H, D)
            let kvr = CacheRows::separate(kc, vc)?;
            sampled.measure(seg, qs, &kvr, h, selection.as_deref(), scale);
            Ok(attend_cached(qs, kvr, seg, selection.as_deref(), scale))
        })?;
        sampled.store(tel);
        let y: Vec<f32> = outs.concat(); // (N, H*D): segments are consecutive rows
        let y = Tensor::from_vec(y, (n, h * d), x.device())?.to_dtype(x.dtype())?;
        self.o_proj.infer(&y)
    }
}

/// The recall a step samples on a DSA layer ([`StepOptions::telemetry`]): the step's
/// first sequence's last query, when it ran sparse, and that query's selection. Filled
/// from inside the per-segment closures (which may run in parallel), hence the lock.
pub(crate) struct SampledRecall {
    on: bool,
    value: std::sync::Mutex<Option<(f32, Vec<u32>)>>,
}

impl SampledRecall {
    pub(crate) fn new(on: bool) -> Self {
        Self {
            on,
            value: std::sync::Mutex::new(None),
        }
    }

    /// Measure segment `seg` (queries qs (T, H, dk) over `rows`, `selection` (T, K))
    /// if it is the step's first and ran sparse.
    pub(crate) fn measure(
        &self,
        seg: &Segment,
        qs: &[f32],
        rows: &CacheRows<'_>,
        heads: usize,
        selection: Option<&[u32]>,
        scale: f32,
    ) {
        let (Some(sel), true) = (selection, self.on && seg.start == 0) else {
            return;
        };
        let (t, width) = (seg.len, qs.len() / seg.len.max(1));
        let k = sel.len() / t.max(1);
        let last = t - 1;
        let chosen = &sel[last * k..(last + 1) * k];
        let r = rows.selected_mass(
            &qs[last * width..(last + 1) * width],
            heads,
            seg.visible(),
            chosen,
            scale,
        );
        let mut positions: Vec<u32> = chosen.iter().copied().filter(|&p| p != NONE).collect();
        positions.sort_unstable();
        if let Ok(mut v) = self.value.lock() {
            *v = Some((r, positions));
        }
    }

    /// The sample into the layer's telemetry (recall and selection; None when no query
    /// ran sparse).
    pub(crate) fn store(self, tel: &mut LayerTelemetry) {
        let sample = self.value.into_inner().ok().flatten();
        (tel.recall, tel.selected) = sample.map_or((None, None), |(r, s)| (Some(r), Some(s)));
    }
}

/// Attention of a segment's queries q (T, H, dk) over the cache `rows` holding its
/// context and itself: over each query's selection when there is one (sparse),
/// otherwise every causal position (flash-decoding for one query, causal prefill for a
/// chunk) -> (T, H, dv). The one kernel dispatch of every entry store, in either
/// storage precision.
pub(crate) fn attend_cached(
    q: &[f32],
    rows: CacheRows,
    seg: &Segment,
    selection: Option<&[u32]>,
    scale: f32,
) -> Vec<f32> {
    match rows {
        CacheRows::F32(r) => attend_rows(q, r, seg, selection, scale),
        CacheRows::F16(r) => attend_rows(q, r, seg, selection, scale),
    }
}

/// [`attend_cached`] for one storage type.
fn attend_rows<E: CacheElem>(
    q: &[f32],
    rows: KvRows<E>,
    seg: &Segment,
    selection: Option<&[u32]>,
    scale: f32,
) -> Vec<f32> {
    match selection {
        Some(idx) => sparse_attention::attend_selected(q, rows, seg.len, idx, scale),
        None if seg.len == 1 => decode_attention::decode(q, rows, seg.visible(), scale),
        None => decode_attention::prefill_at(q, rows, seg.len, seg.pos, scale),
    }
}

/// Recall of (B, T) queries that attend to every visible position: 1, and NaN for
/// the queries before `from` (not measured).
pub(crate) fn full_recall(b: usize, t: usize, from: usize) -> Vec<f32> {
    (0..b * t)
        .map(|n| if n % t < from { f32::NAN } else { 1.0 })
        .collect()
}

/// One target distribution per query from per-head attention probabilities `p`
/// (B, H, N, S), detached: the heads' mean, or each key's largest probability over the
/// heads renormalised. -> (B, N, S).
pub(crate) fn head_target(p: &Tensor, how: IndexerKlTarget) -> Result<Tensor> {
    let p = p.detach();
    Ok(match how {
        IndexerKlTarget::HeadMean => p.mean(1)?,
        IndexerKlTarget::HeadMax => {
            let m = p.max(1)?; // (B, N, S)
            let total = m.sum_keepdim(D::Minus1)?;
            m.broadcast_div(&total)?
        }
    })
}

/// The dense warm-up's indexer loss over a whole window: KL(p || softmax(I)) over all
/// visible keys, p the dense attention probabilities `att` (B, H, T, T) with the heads
/// combined by `how` (detached).
pub(crate) fn dense_kl(
    ix: &Indexer,
    io: &IndexerOut,
    att: &Tensor,
    how: IndexerKlTarget,
) -> Result<Tensor> {
    let (b, _h, t, s) = att.dims4()?;
    let target = host_f32(&head_target(att, how)?)?; // (B, T, S)
    let valid: Vec<bool> = (0..b * t * s).map(|n| n % s <= (n / s) % t).collect();
    let scores = ix.score_all(io, &io.k)?; // (B, T, S)
    kl_loss(&scores, &target, &valid)
}

/// `rows` as a u32 index tensor (for `index_select`).
pub(crate) fn positions_index(rows: &[usize], dev: &candle_core::Device) -> Result<Tensor> {
    let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    Ok(Tensor::from_vec(ids, rows.len(), dev)?)
}

/// `count` distinct positions of `0..t`, ascending, drawn from `seed`.
pub(crate) fn sample_positions(t: usize, count: usize, seed: u64) -> Vec<usize> {
    use rand::seq::index::sample;
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut rows = sample(&mut rng, t, count.min(t)).into_vec();
    rows.sort_unstable();
    rows
}

/// The dense warm-up's indexer loss on the queries at positions `rows` of a whole
/// window: KL(p || softmax(I)) over each one's visible keys, p its dense attention
/// probabilities with the heads combined by `how` (detached), computed here for those
/// rows only from q (B, H, T, D) and k (B, KV, T, D).
pub(crate) fn sampled_dense_kl(
    ix: &Indexer,
    io: &IndexerOut,
    q: &Tensor,
    k: &Tensor,
    rows: &[usize],
    kv: usize,
    how: IndexerKlTarget,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (g, n) = (h / kv, rows.len());
    let dev = q.device();
    let idx = positions_index(rows, dev)?;
    let qs = q
        .detach()
        .contiguous()?
        .index_select(&idx, 2)? // (B, H, N, D)
        .reshape((b, kv, g * n, d))?;
    let scores = (qs.matmul(&k.detach().t()?)? / (d as f64).sqrt())?; // (B, KV, G*N, T)
    let mask: Vec<f32> = (0..n * t)
        .map(|i| {
            if i % t <= rows[i / t] {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (n, t), dev)?.to_dtype(scores.dtype())?;
    let scores = scores.reshape((b, kv, g, n, t))?.broadcast_add(&mask)?;
    let p = candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?.reshape((b, h, n, t))?;
    let p = head_target(&p, how)?; // (B, N, T)
    kl_on_rows(ix, io, &host_f32(&p)?, rows)
}

/// KL(p || softmax(I)) of the queries at positions `rows` of a whole window, over each
/// one's visible keys, averaged over them: `target` (B, N, T) holds their p rows.
pub(crate) fn kl_on_rows(
    ix: &Indexer,
    io: &IndexerOut,
    target: &[f32],
    rows: &[usize],
) -> Result<Tensor> {
    let (b, t) = (io.k.dim(0)?, io.k.dim(1)?);
    let n = rows.len();
    let idx = positions_index(rows, io.k.device())?;
    let valid: Vec<bool> = (0..b * n * t).map(|i| i % t <= rows[(i / t) % n]).collect();
    let sub = IndexerOut {
        q: io.q.contiguous()?.index_select(&idx, 1)?, // (B, N, Hi, di)
        w: io.w.contiguous()?.index_select(&idx, 1)?, // (B, N, Hi)
        k: io.k.clone(),
    };
    let scores = ix.score_all(&sub, &io.k)?; // (B, N, T)
    kl_loss(&scores, target, &valid)
}

/// Mean over queries of KL(target || softmax(logits)) over the `valid` entries of each
/// row; logits (B, T, N), target and valid flattened (B*T*N), each valid row of target
/// summing to 1.
pub(crate) fn kl_loss(logits: &Tensor, target: &[f32], valid: &[bool]) -> Result<Tensor> {
    let dims = logits.dims().to_vec();
    let n = *dims.last().unwrap_or(&1);
    let rows = (target.len() / n.max(1)).max(1);
    let dev = logits.device();
    let dtype = logits.dtype();
    let mask: Vec<f32> = valid
        .iter()
        .map(|&ok| if ok { 0.0 } else { MASKED as f32 })
        .collect();
    let mask = Tensor::from_vec(mask, dims.as_slice(), dev)?.to_dtype(dtype)?;
    let logq = candle_nn::ops::log_softmax(&(logits + mask)?, D::Minus1)?;
    let p = Tensor::from_slice(target, dims.as_slice(), dev)?.to_dtype(dtype)?;
    let cross = (p * logq)?.sum_all()?.neg()?;
    let entropy: f64 = target
        .iter()
        .filter(|&&x| x > 0.0)
        .map(|&x| (x as f64) * (x as f64).ln())
        .sum();
    Ok(((cross + entropy)? / rows as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::VarStore;
    use candle_core::{DType, Device};
    use rand::{Rng, SeedableRng};

    fn randn(shape: &[usize], rng: &mut rand_chacha::ChaCha8Rng) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Plain loops (index loops on purpose: they read as the formula): the mean over
    /// `rows` (and batch rows) of KL(p || softmax(I)), p the causal attention of q
    /// (B, H, T, D) over k (B, KV, T, D) averaged over heads (or, `head_max`, each key's
    /// largest probability over them, renormalised), I the lightning scores of `io`.
    #[allow(clippy::needless_range_loop)]
    fn reference(
        io: &IndexerOut,
        q: &Tensor,
        k: &Tensor,
        rows: &[usize],
        how: IndexerKlTarget,
    ) -> f64 {
        let (b, h, _t, d) = q.dims4().unwrap();
        let kv = k.dim(1).unwrap();
        let q: Vec<Vec<Vec<Vec<f64>>>> = (0..b)
            .map(|bi| q.get(bi).unwrap().to_vec3::<f64>().unwrap())
            .collect();
        let k: Vec<Vec<Vec<Vec<f64>>>> = (0..b)
            .map(|bi| k.get(bi).unwrap().to_vec3::<f64>().unwrap())
            .collect();
        let iq: Vec<Vec<Vec<Vec<f64>>>> = (0..b)
            .map(|bi| io.q.get(bi).unwrap().to_vec3::<f64>().unwrap())
            .collect();
        let iw: Vec<Vec<Vec<f64>>> = (0..b)
            .map(|bi| io.w.get(bi).unwrap().to_vec2::<f64>().unwrap())
            .collect();
        let ik: Vec<Vec<Vec<f64>>> = (0..b)
            .map(|bi| io.k.get(bi).unwrap().to_vec2::<f64>().unwrap())
            .collect();
        let (hi, di) = (iq[0][0].len(), iq[0][0][0].len());
        let mut total = 0.0;
        for bi in 0..b {
            for &r in rows {
                let mut p = vec![0.0; r + 1];
                for head in 0..h {
                    let g = head / (h / kv);
                    let s: Vec<f64> = (0..=r)
                        .map(|j| {
                            (0..d)
                                .map(|x| q[bi][head][r][x] * k[bi][g][j][x])
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                    for j in 0..=r {
                        let pj = (s[j] - m).exp() / z;
                        p[j] = match how {
                            IndexerKlTarget::HeadMean => p[j] + pj / h as f64,
                            IndexerKlTarget::HeadMax => p[j].max(pj),
                        };
                    }
                }
                let norm: f64 = p.iter().sum();
                p.iter_mut().for_each(|x| *x /= norm);
                let score: Vec<f64> = (0..=r)
                    .map(|j| {
                        (0..hi)
                            .map(|x| {
                                let dot: f64 =
                                    (0..di).map(|y| iq[bi][r][x][y] * ik[bi][j][y]).sum();
                                iw[bi][r][x] * dot.max(0.0)
                            })
                            .sum()
                    })
                    .collect();
                let m = score.iter().cloned().fold(f64::MIN, f64::max);
                let lse = m + score.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                total += (0..=r)
                    .filter(|&j| p[j] > 0.0)
                    .map(|j| p[j] * (p[j].ln() - (score[j] - lse)))
                    .sum::<f64>();
            }
        }
        total / (b * rows.len()) as f64
    }

    #[test]
    fn sampled_dense_kl_matches_a_plain_reference() {
        let cfg = crate::config::ModelConfig::from_json(
            r#"{"vocab_size": 16, "hidden_size": 12, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 6, "num_key_value_heads": 2,
                "max_position_embeddings": 64, "layer_types": ["dsa"], "index_topk": 3,
                "index_n_heads": 3, "index_head_dim": 5, "index_rope_head_dim": 2,
                "initializer_range": 0.4}"#,
        )
        .unwrap();
        let store = VarStore::random(5, DType::F64, &Device::Cpu);
        let ix = Indexer::new(&store.root().pp("indexer"), &cfg).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (b, t, h, kv, d) = (2, 13, 6, 2, 4);
        let x = randn(&[b, t, 12], &mut rng);
        let io = ix.forward(&x, 0).unwrap();
        let q = randn(&[b, h, t, d], &mut rng);
        let k = randn(&[b, kv, t, d], &mut rng);
        let targets = [IndexerKlTarget::HeadMean, IndexerKlTarget::HeadMax];
        for how in targets {
            for rows in [sample_positions(t, 5, 9), (0..t).collect(), vec![0, 12]] {
                let got: f64 = sampled_dense_kl(&ix, &io, &q, &k, &rows, kv, how)
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                let want = reference(&io, &q, &k, &rows, how);
                // The target rows are held in f32 (as the training path holds them).
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                    "{how:?}, rows {rows:?}: {got} vs {want}"
                );
            }
        }
        // The two targets differ (the test could not pass with one ignored).
        let rows: Vec<usize> = (0..t).collect();
        let (mean, max) = (
            reference(&io, &q, &k, &rows, IndexerKlTarget::HeadMean),
            reference(&io, &q, &k, &rows, IndexerKlTarget::HeadMax),
        );
        assert!((mean - max).abs() > 1e-3 * mean.abs(), "{mean} vs {max}");
        // Every query: the same loss as the full dense KL.
        let all: Vec<usize> = (0..t).collect();
        let p_full = {
            let g = h / kv;
            let qg = q.reshape((b, kv, g * t, d)).unwrap();
            let s = (qg.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
            crate::kernels::softmax::CausalSoftmax {
                scale: 1.0,
                queries: t,
                offset: 0,
            }
            .apply(&s)
            .unwrap()
            .reshape((b, h, t, t))
            .unwrap()
        };
        for how in targets {
            let full: f64 = dense_kl(&ix, &io, &p_full, how)
                .unwrap()
                .to_scalar()
                .unwrap();
            let sampled: f64 = sampled_dense_kl(&ix, &io, &q, &k, &all, kv, how)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(
                (full - sampled).abs() < 1e-9 * full.abs(),
                "{how:?}: {full} vs {sampled}"
            );
        }
    }

    #[test]
    fn sampled_positions_are_distinct_sorted_and_seeded() {
        let a = sample_positions(100, 10, 1);
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a[9] < 100);
        assert_eq!(a, sample_positions(100, 10, 1));
        assert_ne!(a, sample_positions(100, 10, 2));
        assert_eq!(sample_positions(5, 9, 1), vec![0, 1, 2, 3, 4]);
    }
}
