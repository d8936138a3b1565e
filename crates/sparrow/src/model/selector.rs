//! A DSA layer's selector, the same for every entry store (per-head or shared K/V, the
//! MLA latent): the layer's indexer (`self_attn.indexer.*`), how many positions each
//! query keeps (`index_topk`) and the precision of its cached index keys
//! (`index_cache_dtype`). Whole windows (training, evaluation) select with
//! [`TopkSelector::window`]; the engine's step computes its index rows once
//! ([`TopkSelector::step_rows`]) and selects per sequence over that sequence's cached
//! keys ([`TopkSelector::select`]). Both use the fused top-k kernels, never a
//! (T, S) score matrix.

use super::cache::LayerCache;
use super::indexer::{HostIndex, Indexer, IndexerOut};
use super::linear::host_f32;
use super::params::Vb;
use super::step::Segment;
use crate::config::{IndexerKlTarget, ModelConfig};
use crate::error::Result;
use crate::kernels::indexer::{self as ix_kernel, KeyPrecision, KeyStore, TopkQueries};
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct TopkSelector {
    pub indexer: Indexer,
    /// Positions each query keeps (`index_topk`).
    pub topk: usize,
    /// Precision of the cached index keys (`index_cache_dtype`).
    pub precision: KeyPrecision,
    /// How the indexer's training target combines the main attention's heads
    /// (`indexer_kl_target`).
    pub kl_target: IndexerKlTarget,
}

impl TopkSelector {
    /// `vb` is the attention module's path (`model.layers.L.self_attn`).
    pub fn new(vb: &Vb, cfg: &ModelConfig) -> Result<Self> {
        Ok(Self {
            indexer: Indexer::new(&vb.pp("indexer"), cfg)?,
            topk: cfg.index_topk,
            precision: cfg.index_cache_dtype.key_precision(),
            kl_target: cfg.indexer_kl_target,
        })
    }

    /// Top-k selection (B, T, K) of a whole window's queries (positions 0..T) over the
    /// window's own index keys, each row's keys in a key store of the cache's precision.
    pub(crate) fn window(&self, io: &IndexerOut) -> Result<Vec<u32>> {
        let (b, t, _, _) = io.q.dims4()?;
        let shape = self.indexer.shape();
        let (hi, di) = (shape.heads, shape.dim);
        let keys = host_f32(&io.k)?; // (B, T, di)
        let stores: Vec<KeyStore> = (0..b)
            .map(|row| {
                let mut ks = KeyStore::new(di, self.precision);
                ks.extend_rows(&keys[row * t * di..(row + 1) * t * di]);
                ks
            })
            .collect();
        let iq = host_f32(&io.q)?;
        let iw = host_f32(&io.w)?;
        let rows: Vec<TopkQueries> = (0..b)
            .map(|row| TopkQueries {
                q: &iq[row * t * hi * di..(row + 1) * t * hi * di],
                w: &iw[row * t * hi..(row + 1) * t * hi],
                offset: 0,
            })
            .collect();
        let refs: Vec<&KeyStore> = stores.iter().collect();
        Ok(ix_kernel::topk_prefill(&rows, &refs, shape, t, self.topk))
    }

    /// One step's index rows for packed rows x (N, C): the lightning queries projected
    /// from `q_in` (x itself, or the query latent on MLA layers), and every segment's
    /// queries and keys rotated to its positions.
    pub(crate) fn step_rows(
        &self,
        x: &Tensor,
        q_in: &Tensor,
        segs: &[Segment],
    ) -> Result<HostIndex> {
        let mut rows = self.indexer.infer_packed_with_query_input(x, q_in)?;
        let shape = self.indexer.shape();
        let (heads, di) = (shape.heads, shape.dim);
        for seg in segs {
            for i in 0..seg.len {
                let r = seg.start + i;
                self.indexer.rope_token_host(
                    &mut rows.q[r * heads * di..(r + 1) * heads * di],
                    &mut rows.k[r * di..(r + 1) * di],
                    seg.pos + i,
                )?;
            }
        }
        Ok(rows)
    }

    /// One segment's selection from the step's rows: cache its index keys, then (past
    /// `topk` visible positions, unless `dense`) each query's top-k over the cached
    /// keys, (T, K) with `kernels::topk::NONE` padding. None = attend to every visible
    /// position (sparse == dense while everything fits in k).
    pub(crate) fn select(
        &self,
        rows: &HostIndex,
        seg: &Segment,
        cache: &mut LayerCache,
        dense: bool,
    ) -> Result<Option<Vec<u32>>> {
        let shape = self.indexer.shape();
        let (heads, di) = (shape.heads, shape.dim);
        let qs = &rows.q[seg.start * heads * di..(seg.start + seg.len) * heads * di];
        let ks = &rows.k[seg.start * di..(seg.start + seg.len) * di];
        let store = cache.index_mut(di, self.precision);
        store.extend_rows(ks);
        if dense || seg.visible() <= self.topk {
            return Ok(None);
        }
        let ws = &rows.w[seg.start * heads..(seg.start + seg.len) * heads];
        Ok(Some(if seg.len == 1 {
            ix_kernel::topk_decode(qs, ws, store, shape, self.topk)
        } else {
            let queries = [TopkQueries {
                q: qs,
                w: ws,
                offset: seg.pos,
            }];
            ix_kernel::topk_prefill(&queries, &[store], shape, seg.len, self.topk)
        }))
    }
}

/// [`TopkSelector::select`] for a layer that may have no selector (dense: None).
pub(crate) fn select_in_step(
    selector: Option<&TopkSelector>,
    rows: Option<&HostIndex>,
    seg: &Segment,
    cache: &mut LayerCache,
    dense: bool,
) -> Result<Option<Vec<u32>>> {
    match (selector, rows) {
        (Some(s), Some(r)) => s.select(r, seg, cache, dense),
        _ => Ok(None),
    }
}
