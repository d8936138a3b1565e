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
//!
//! `forward` runs whole windows as tensors (the reference); `step` runs the engine's
//! packed rows row by row over each sequence's `model::v4_cache` state.

use super::attention::kl_loss;
use super::cache::LayerCache;
use super::compressor::{causal_entry_mask, Compressor, V4Indexer, MASKED};
use super::diagnostics::LayerDiagnostics;
use super::linear::{host_f32, Linear};
use super::norm::{unweighted_rms, RmsNorm};
use super::options::ForwardOptions;
use super::params::{Init, Vb};
use super::rope::TailRope;
use super::step::Segment;
use super::v4_cache::{PoolSpec, PoolState, V4LayerCache};
use crate::config::{AttentionKind, IndexerKlTarget, IndexerTrainMode, ModelConfig};
use crate::error::{Error, Result};
use crate::kernels::dot_tree;
use crate::kernels::indexer::{topk_decode, IndexShape, KeyPrecision, KeyStore, ScoreAct};
use crate::kernels::sink_softmax::SinkSoftmax;
use crate::kernels::topk::NONE;
use candle_core::Tensor;

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
    /// Storage of the CSA indexer's keys in the decode state (`index_cache_dtype`).
    index_precision: KeyPrecision,
    /// How the CSA indexer's KL target combines the heads (`indexer_kl_target`).
    kl_target: IndexerKlTarget,
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
            index_precision: cfg.index_cache_dtype.key_precision(),
            kl_target: cfg.indexer_kl_target,
        })
    }

    /// x (B, T, C), a whole window from position 0 -> (B, T, C). CSA layers attend to
    /// every complete entry instead of the indexer's top-k in the dense warm-up (or
    /// with `opts.dense`), and in training write their indexer's KL into `diag`: the
    /// main attention's mass on the entries (summed over heads, renormalised over the
    /// entries the query attended) against the softmax of the index scores, the
    /// indexer's input detached (DESIGN.md §4).
    pub fn forward(
        &self,
        x: &Tensor,
        opts: &ForwardOptions,
        diag: &mut LayerDiagnostics,
    ) -> Result<Tensor> {
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
        let mode = opts.indexer_mode;
        let dense = opts.dense || mode == Some(IndexerTrainMode::DenseWarmup);
        let want_kl = matches!(
            mode,
            Some(IndexerTrainMode::DenseWarmup) | Some(IndexerTrainMode::Sparse)
        );
        let mut index = None;
        let (keys, mask) = match self.compressed_entries(x, &q_res, dense, want_kl)? {
            Some(Entries {
                entries,
                mask: entry_mask,
                index_scores,
            }) => {
                index = index_scores.map(|s| (s, entry_mask.clone()));
                (
                    Tensor::cat(&[kv, entries], 1)?,
                    Tensor::cat(&[window, entry_mask], 2)?,
                )
            }
            None => (kv, window),
        }; // (B, S, D), (B, T, S)
        let s = keys.dim(1)?;
        // One K=V head: all query heads against it in one (H*T, D) x (D, S) product.
        let scores = q
            .reshape((b, h * t, d))?
            .matmul(&keys.transpose(1, 2)?)?
            .reshape((b, h, t, s))?; // (B, H, T, S)

        // softmax over [scores + mask, sink]: the sink takes its share of the normaliser
        // only (one fused pass; `kernels::sink_softmax`).
        let probs = SinkSoftmax {
            scale: 1.0 / (d as f64).sqrt(),
        }
        .apply(&scores, &mask, &self.sinks.to_dtype(scores.dtype())?)?; // (B, H, T, S)
        if let Some((scores, entry_mask)) = index {
            diag.indexer_kl = Some(entry_kl(&probs, &scores, &entry_mask, t, self.kl_target)?);
        }
        let y = probs
            .reshape((b, h * t, s))?
            .matmul(&keys)?
            .reshape((b, h, t, d))?; // (B, H, T, D)
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

    /// The compressed entries and their mask, if this layer has a compressor and the
    /// window holds a complete entry. CSA selects with its indexer unless `dense`; with
    /// `want_scores` it returns the index scores (differentiable in the indexer's
    /// parameters, its input detached).
    fn compressed_entries(
        &self,
        x: &Tensor,
        q_res: &Tensor,
        dense: bool,
        want_scores: bool,
    ) -> Result<Option<Entries>> {
        let (b, t, _c) = x.dims3()?;
        let (compressor, indexer) = match &self.compressed {
            None => return Ok(None),
            Some(Compressed::Heavy(c)) => (c, None),
            Some(Compressed::Sparse {
                compressor,
                indexer,
            }) => (compressor, Some(indexer)),
        };
        let Some(entries) = compressor.pool(x, &self.rope)? else {
            return Ok(None);
        };
        let n = entries.dim(1)?;
        let causal = || causal_entry_mask(b, t, n, compressor.rate(), x);
        let indexer = match indexer {
            Some(ix) if !dense || want_scores => ix,
            // HCA, or CSA attending every entry with no KL to compute.
            _ => {
                return Ok(Some(Entries {
                    entries,
                    mask: causal()?,
                    index_scores: None,
                }))
            }
        };
        let scores = indexer
            .scores(&x.detach(), &q_res.detach(), &self.rope)?
            .ok_or_else(|| Error::Invalid("the indexer made no entries".into()))?;
        let mask = if dense {
            causal()?
        } else {
            indexer.selection_mask(&scores, x)?
        };
        Ok(Some(Entries {
            entries,
            mask,
            index_scores: want_scores.then_some(scores),
        }))
    }
}

/// A compressed layer's entries for a whole window.
struct Entries {
    /// (B, n, D)
    entries: Tensor,
    /// (B, T, n) additive: 0 where the query attends the entry.
    mask: Tensor,
    /// CSA in training: the index scores (B, T, n).
    index_scores: Option<Tensor>,
}

/// The CSA indexer's KL: probs (B, H, T, T + n) of the main attention (window keys
/// first), index scores (B, T, n), the entries' additive mask (B, T, n). The target of
/// each query is its attention mass on the entries it attended, summed (or, with
/// `head_max`, maximised) over heads and renormalised; queries with no such mass count
/// with zero loss.
fn entry_kl(
    probs: &Tensor,
    scores: &Tensor,
    mask: &Tensor,
    t: usize,
    how: IndexerKlTarget,
) -> Result<Tensor> {
    let n = scores.dim(2)?;
    let mass = probs.detach().narrow(3, t, n)?; // (B, H, T, n)
    let mass = match how {
        IndexerKlTarget::HeadMean => mass.sum(1)?,
        IndexerKlTarget::HeadMax => mass.max(1)?,
    }; // (B, T, n)
    let mass = host_f32(&mass)?;
    let valid: Vec<bool> = host_f32(mask)?.iter().map(|&m| m == 0.0).collect();
    let mut target = vec![0f32; mass.len()];
    let mut ok = vec![false; mass.len()];
    for ((row, ok_row), (m, v)) in target
        .chunks_exact_mut(n)
        .zip(ok.chunks_exact_mut(n))
        .zip(mass.chunks_exact(n).zip(valid.chunks_exact(n)))
    {
        let total: f64 = m
            .iter()
            .zip(v)
            .filter(|(_, &v)| v)
            .map(|(&x, _)| x as f64)
            .sum();
        if total > 0.0 {
            for (j, (&x, &vj)) in m.iter().zip(v).enumerate() {
                if vj {
                    row[j] = (x as f64 / total) as f32;
                    ok_row[j] = true;
                }
            }
        }
    }
    kl_loss(scores, &target, &ok)
}

/// Host copies of what a step's per-row loop reads from one compressor.
struct PoolHost {
    kv: Vec<f32>,
    gate: Vec<f32>,
    width: usize,
    position_bias: Vec<f32>,
    norm: Vec<f32>,
}

impl PoolHost {
    fn new(c: &Compressor, x: &Tensor) -> Result<Self> {
        let kv = c.kv_proj.forward(x)?;
        let width = kv.dim(1)?;
        Ok(Self {
            kv: host_f32(&kv)?,
            gate: host_f32(&c.gate_proj.forward(x)?)?,
            width,
            position_bias: host_f32(&c.position_bias)?,
            norm: host_f32(&c.kv_norm.weight)?,
        })
    }

    fn spec(&self, c: &Compressor, eps: f64) -> PoolSpec<'_> {
        PoolSpec {
            rate: c.rate(),
            dim: c.dim(),
            overlap: c.overlaps(),
            position_bias: &self.position_bias,
            norm: (&self.norm, eps),
        }
    }

    fn row(&self, r: usize) -> (&[f32], &[f32]) {
        let w = self.width;
        (&self.kv[r * w..(r + 1) * w], &self.gate[r * w..(r + 1) * w])
    }
}

impl V4Attention {
    /// The engine's step: x (N, C) holds the new tokens of every segment (normed); each
    /// row, in order, writes its K=V row to its sequence's window and its projections to
    /// the compressors (an entry when a window completes), then attends over the window
    /// and the entries its layer type selects. Equal to [`Self::forward`] row for row.
    /// -> (N, C).
    pub(crate) fn step(
        &self,
        x: &Tensor,
        segs: &[Segment],
        caches: &mut [&mut LayerCache],
    ) -> Result<Tensor> {
        let (n, c) = x.dims2()?;
        let (h, d) = (self.n_heads, self.head_dim);
        let q_res = self.q_a_norm.forward(&self.q_a_proj.forward(x)?)?; // (N, R)
        let q = host_f32(&self.q_b_proj.forward(&q_res)?)?; // (N, H*D)
        let kv = host_f32(&self.kv_norm.forward(&self.kv_proj.forward(x)?)?)?; // (N, D)
        let sinks = host_f32(&self.sinks)?;
        let (compressor, indexer) = match &self.compressed {
            None => (None, None),
            Some(Compressed::Heavy(c)) => (Some(c), None),
            Some(Compressed::Sparse {
                compressor,
                indexer,
            }) => (Some(compressor), Some(indexer)),
        };
        let comp = compressor.map(|c| PoolHost::new(c, x)).transpose()?;
        let index = match indexer {
            Some(ix) => Some((
                PoolHost::new(&ix.compressor, x)?,
                host_f32(&ix.q_b_proj.forward(&q_res)?)?, // (N, HI*dI)
                host_f32(&ix.weights_proj.forward(x)?)?,  // (N, HI)
            )),
            None => None,
        };
        if segs.len() != caches.len() {
            return Err(Error::Invalid(format!(
                "{} segments for {} caches",
                segs.len(),
                caches.len()
            )));
        }
        let mut out = vec![0f32; n * h * d];
        for (seg, cache) in segs.iter().zip(caches.iter_mut()) {
            let state = cache.v4.get_or_insert_with(V4LayerCache::default);
            state.check(seg.pos)?;
            for (i, r) in seg.rows().enumerate() {
                let p = seg.pos + i;
                let mut qr = q[r * h * d..(r + 1) * h * d].to_vec();
                for head in qr.chunks_exact_mut(d) {
                    let ms = head.iter().map(|v| (v * v) as f64).sum::<f64>() / d as f64;
                    let inv = (1.0 / (ms + self.eps).sqrt()) as f32;
                    head.iter_mut().for_each(|v| *v *= inv);
                }
                self.rope.rotate_host(&mut qr, d, p, false)?;
                let mut kr = kv[r * d..(r + 1) * d].to_vec();
                self.rope.rotate_host(&mut kr, d, p, false)?;
                state.push_row(&kr, self.window);
                if let (Some(cm), Some(host)) = (compressor, &comp) {
                    let (k, g) = host.row(r);
                    let spec = host.spec(cm, self.eps);
                    let entry = state.compressor.push(&spec, p, k, g, |e, first| {
                        self.rope.rotate_host(e, cm.dim(), first, false)
                    })?;
                    if let Some(e) = entry {
                        state.entries.extend_from_slice(&e);
                    }
                }
                let selected: Vec<usize> = match (indexer, &index) {
                    (Some(ix), Some((host, iq, iw))) => {
                        let (k, g) = host.row(r);
                        let spec = host.spec(&ix.compressor, self.eps);
                        let di = ix.compressor.dim();
                        let entry = state.indexer.push(&spec, p, k, g, |e, first| {
                            self.rope.rotate_host(e, di, first, false)
                        })?;
                        let keys = state.index_keys_mut(di, self.index_precision);
                        if let Some(e) = entry {
                            keys.extend_rows(&e);
                        }
                        let hi = iw.len() / n;
                        let mut qi = iq[r * hi * di..(r + 1) * hi * di].to_vec();
                        self.rope.rotate_host(&mut qi, di, p, false)?;
                        // sum_h w_h ReLU(q_h . k) / sqrt(dI): the scale folded into w.
                        let scale = 1.0 / ((hi as f32).sqrt() * (di as f32).sqrt());
                        let w: Vec<f32> =
                            iw[r * hi..(r + 1) * hi].iter().map(|x| x * scale).collect();
                        let shape = IndexShape {
                            heads: hi,
                            dim: di,
                            act: ScoreAct::Relu,
                        };
                        topk_decode(&qi, &w, keys, shape, ix.topk())
                            .into_iter()
                            .filter(|&i| i != NONE)
                            .map(|i| i as usize)
                            .collect()
                    }
                    _ => (0..state.entries.len() / d).collect(),
                };
                let keys: Vec<&[f32]> = state
                    .window()
                    .chain(selected.iter().map(|&w| &state.entries[w * d..(w + 1) * d]))
                    .collect();
                let mut o = attend_with_sinks(&qr, &keys, &sinks, d);
                self.rope.rotate_host(&mut o, d, p, true)?;
                out[r * h * d..(r + 1) * h * d].copy_from_slice(&o);
            }
        }
        let y = Tensor::from_vec(out, (1, n, h, d), x.device())?.to_dtype(x.dtype())?;
        Ok(self.output(&y)?.reshape((n, c))?)
    }
}

/// One query's attention: q (H*D) over `keys` (each D, keys = values) with one sink
/// logit per head in the softmax -> (H*D).
fn attend_with_sinks(q: &[f32], keys: &[&[f32]], sinks: &[f32], d: usize) -> Vec<f32> {
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    let mut weights = vec![0f32; keys.len()];
    for ((qh, oh), &sink) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)).zip(sinks) {
        for (l, k) in weights.iter_mut().zip(keys) {
            *l = dot_tree(qh, k) * scale;
        }
        let max = weights.iter().copied().fold(sink, f32::max);
        let mut z = (sink - max).exp();
        for l in weights.iter_mut() {
            *l = (*l - max).exp();
            z += *l;
        }
        for (p, k) in weights.iter().zip(keys) {
            for (o, v) in oh.iter_mut().zip(k.iter()) {
                *o += p * v;
            }
        }
        oh.iter_mut().for_each(|o| *o /= z);
    }
    out
}

impl V4Attention {
    /// A decode state as if `positions` tokens had been prefilled, filled with random
    /// values of the right shapes (window rows, entries, index keys, partial windows):
    /// what `bench generate --synthetic-cache` decodes from at a million tokens, where
    /// a prefill would take hours. Its outputs mean nothing; its cost per step is the
    /// real one.
    pub fn synthetic_cache(&self, positions: usize, rng: &mut impl rand::Rng) -> V4LayerCache {
        let d = self.head_dim;
        let mut rows = |n: usize, w: usize| -> Vec<Vec<f32>> {
            (0..n)
                .map(|_| (0..w).map(|_| rng.random_range(-1.0f32..1.0)).collect())
                .collect()
        };
        let window = rows(self.window.min(positions), d);
        let pool = |c: &Compressor, rows: &mut dyn FnMut(usize, usize) -> Vec<Vec<f32>>| {
            let width = if c.overlaps() { 2 * c.dim() } else { c.dim() };
            let pending = positions % c.rate();
            let pair = |rows: &mut dyn FnMut(usize, usize) -> Vec<Vec<f32>>, n: usize, w: usize| {
                rows(n, w).into_iter().zip(rows(n, w)).collect::<Vec<_>>()
            };
            let done = positions / c.rate();
            let previous = (c.overlaps() && done > 0).then(|| pair(rows, c.rate(), c.dim()));
            (
                PoolState::synthetic(pair(rows, pending, width), previous),
                rows(done, c.dim()).concat(),
            )
        };
        match &self.compressed {
            None => V4LayerCache::synthetic(
                positions,
                window,
                PoolState::default(),
                Vec::new(),
                PoolState::default(),
                None,
            ),
            Some(Compressed::Heavy(c)) => {
                let (state, entries) = pool(c, &mut rows);
                V4LayerCache::synthetic(
                    positions,
                    window,
                    state,
                    entries,
                    PoolState::default(),
                    None,
                )
            }
            Some(Compressed::Sparse {
                compressor,
                indexer,
            }) => {
                let (state, entries) = pool(compressor, &mut rows);
                let (istate, keys) = pool(&indexer.compressor, &mut rows);
                let mut store = KeyStore::new(indexer.compressor.dim(), self.index_precision);
                store.extend_rows(&keys);
                V4LayerCache::synthetic(positions, window, state, entries, istate, Some(store))
            }
        }
    }

    /// Bytes one decode step reads from `cache` (window rows, HCA's entries, CSA's index
    /// keys and its `index_topk` selected entries).
    pub fn decode_read_bytes(&self, cache: &V4LayerCache) -> usize {
        let d = self.head_dim;
        let window = self.window.min(cache.len()) * d * 4;
        window
            + match &self.compressed {
                None => 0,
                Some(Compressed::Heavy(_)) => cache.entries.len() * 4,
                Some(Compressed::Sparse { indexer, .. }) => {
                    let n = cache.entries.len() / d;
                    cache.index_keys.as_ref().map_or(0, KeyStore::bytes)
                        + indexer.topk().min(n) * d * 4
                }
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    /// Plain loops: the mean over (B, T) rows of KL(target || softmax(scores over the
    /// attended entries)), the target each entry's probability summed (or maximised)
    /// over heads and renormalised over the attended entries; rows attending none count 0.
    #[allow(clippy::needless_range_loop)]
    fn reference(
        probs: &[f64],
        scores: &[f64],
        valid: &[bool],
        (b, h, t, n): (usize, usize, usize, usize),
        how: IndexerKlTarget,
    ) -> f64 {
        let s = t + n;
        let mut total = 0.0;
        for bi in 0..b {
            for ti in 0..t {
                let row = (bi * t + ti) * n;
                let live: Vec<usize> = (0..n).filter(|&j| valid[row + j]).collect();
                let mass: Vec<f64> = (0..n)
                    .map(|j| {
                        let per_head = (0..h).map(|hh| probs[((bi * h + hh) * t + ti) * s + t + j]);
                        match how {
                            IndexerKlTarget::HeadMean => per_head.sum(),
                            IndexerKlTarget::HeadMax => per_head.fold(0.0, f64::max),
                        }
                    })
                    .collect();
                let z: f64 = live.iter().map(|&j| mass[j]).sum();
                if z <= 0.0 {
                    continue;
                }
                let m = live
                    .iter()
                    .map(|&j| scores[row + j])
                    .fold(f64::MIN, f64::max);
                let lse = m + live
                    .iter()
                    .map(|&j| (scores[row + j] - m).exp())
                    .sum::<f64>()
                    .ln();
                for &j in &live {
                    let p = mass[j] / z;
                    if p > 0.0 {
                        total += p * (p.ln() - (scores[row + j] - lse));
                    }
                }
            }
        }
        total / (b * t) as f64
    }

    #[test]
    fn entry_kl_matches_a_plain_reference_for_both_targets() {
        let (b, h, t, n) = (2usize, 3usize, 5usize, 4usize);
        let s = t + n;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let probs: Vec<f64> = (0..b * h * t * s)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        let scores: Vec<f64> = (0..b * t * n)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        // Entry j visible to query i when j < i / 2 (row 0 and 1 attend none).
        let valid: Vec<bool> = (0..b * t * n).map(|x| (x % n) < (x / n % t) / 2).collect();
        let mask: Vec<f64> = valid
            .iter()
            .map(|&v| if v { 0.0 } else { MASKED })
            .collect();
        let dev = Device::Cpu;
        let p = Tensor::from_vec(probs.clone(), (b, h, t, s), &dev).unwrap();
        let sc = Tensor::from_vec(scores.clone(), (b, t, n), &dev).unwrap();
        let m = Tensor::from_vec(mask, (b, t, n), &dev).unwrap();
        let mut got = vec![];
        for how in [IndexerKlTarget::HeadMean, IndexerKlTarget::HeadMax] {
            let kl: f64 = entry_kl(&p, &sc, &m, t, how).unwrap().to_scalar().unwrap();
            let want = reference(&probs, &scores, &valid, (b, h, t, n), how);
            // The target is held in f32 (as the training path holds it).
            assert!(
                (kl - want).abs() <= 1e-6 * want.abs(),
                "{how:?}: {kl} vs {want}"
            );
            got.push(kl);
        }
        assert!(
            (got[0] - got[1]).abs() > 1e-3 * got[0],
            "the targets agree: {got:?}"
        );
    }
}
