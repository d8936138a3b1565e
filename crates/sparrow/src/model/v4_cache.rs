//! Decode state of a DeepSeek-V4 layer (DESIGN.md §4, §5c): what the engine's step keeps
//! per sequence so a prefill plus token-by-token decode equals the whole-window forward.
//!
//! - the window: the K=V rows (after RoPE) of the last `sliding_window` positions, a
//!   ring that never grows past the window;
//! - per compressor (the layer's, and on CSA layers the indexer's own): the projected
//!   (kv, gate + position bias) rows of the window not yet complete, and for CSA the Ca
//!   half of the last complete window (the next entry pools it);
//! - the entries so far (normed, RoPE'd at their windows' first positions): the layer's
//!   as f32 rows, the indexer's in the index-key layout the fused scan + top-k kernel
//!   reads (`kernels::indexer::KeyStore`, in `index_cache_dtype`).
//!
//! The bytes per sequence are the window plus one entry per `compress_rate` tokens: at
//! 1M tokens with rate 4 / 128 the compressed entries are what grows.

use crate::error::{Error, Result};
use crate::kernels::indexer::{KeyPrecision, KeyStore};
use std::collections::VecDeque;

/// One compressor's state.
#[derive(Debug, Clone, Default)]
pub struct PoolState {
    /// Rows of the incomplete window: (kv, gate + position bias), each `width` wide.
    pending: Vec<(Vec<f32>, Vec<f32>)>,
    /// CSA: the last complete window's Ca rows (kv, gate), `dim` wide.
    previous: Option<Vec<(Vec<f32>, Vec<f32>)>>,
}

/// What pooling needs besides the rows.
pub struct PoolSpec<'a> {
    pub rate: usize,
    pub dim: usize,
    /// Two series per token (CSA) instead of one (HCA).
    pub overlap: bool,
    /// (rate, width) position bias, row-major.
    pub position_bias: &'a [f32],
    /// The entry norm's weight (dim) and epsilon.
    pub norm: (&'a [f32], f64),
}

impl PoolState {
    /// Add the projected row (kv, gate) of the token at `pos`; when it completes a
    /// window, pool it into a new entry, hand it to `finish` (RoPE at the window's first
    /// position) and return it.
    pub fn push(
        &mut self,
        spec: &PoolSpec,
        pos: usize,
        kv: &[f32],
        gate: &[f32],
        finish: impl FnOnce(&mut [f32], usize) -> Result<()>,
    ) -> Result<Option<Vec<f32>>> {
        let width = if spec.overlap { 2 * spec.dim } else { spec.dim };
        let slot = pos % spec.rate;
        if slot != self.pending.len() || kv.len() != width || gate.len() != width {
            return Err(Error::Invalid(format!(
                "compressor state out of step at position {pos} ({} pending rows)",
                self.pending.len()
            )));
        }
        let bias = &spec.position_bias[slot * width..(slot + 1) * width];
        let biased: Vec<f32> = gate.iter().zip(bias).map(|(g, b)| g + b).collect();
        self.pending.push((kv.to_vec(), biased));
        if self.pending.len() < spec.rate {
            return Ok(None);
        }
        let rows = std::mem::take(&mut self.pending);
        let d = spec.dim;
        // Slots of this entry: (kv, gate) pairs `d` wide.
        let mut slots: Vec<(&[f32], &[f32])> = Vec::with_capacity(2 * spec.rate);
        if spec.overlap {
            if let Some(prev) = &self.previous {
                slots.extend(prev.iter().map(|(k, g)| (&k[..], &g[..])));
            }
            slots.extend(rows.iter().map(|(k, g)| (&k[d..], &g[d..])));
        } else {
            slots.extend(rows.iter().map(|(k, g)| (&k[..], &g[..])));
        }
        let mut entry = vec![0f32; d];
        for (c, out) in entry.iter_mut().enumerate() {
            let max = slots
                .iter()
                .map(|s| s.1[c])
                .fold(f32::NEG_INFINITY, f32::max);
            let (mut num, mut den) = (0f64, 0f64);
            for (k, g) in &slots {
                let e = ((g[c] - max) as f64).exp();
                num += e * k[c] as f64;
                den += e;
            }
            *out = (num / den) as f32;
        }
        let (w, eps) = spec.norm;
        let ms = entry.iter().map(|v| (v * v) as f64).sum::<f64>() / d as f64;
        let inv = (1.0 / (ms + eps).sqrt()) as f32;
        for (v, wi) in entry.iter_mut().zip(w) {
            *v = *v * inv * wi;
        }
        let first = pos + 1 - spec.rate;
        finish(&mut entry, first)?;
        if spec.overlap {
            self.previous = Some(
                rows.into_iter()
                    .map(|(k, g)| (k[..d].to_vec(), g[..d].to_vec()))
                    .collect(),
            );
        }
        Ok(Some(entry))
    }

    /// A state as if `pending` rows of an incomplete window (and, for CSA, a previous
    /// window's Ca rows) had been seen: the benchmarks' synthesised long contexts.
    pub fn synthetic(
        pending: Vec<(Vec<f32>, Vec<f32>)>,
        previous: Option<Vec<(Vec<f32>, Vec<f32>)>>,
    ) -> Self {
        Self { pending, previous }
    }

    fn bytes(&self) -> usize {
        let rows = |v: &[(Vec<f32>, Vec<f32>)]| -> usize {
            v.iter().map(|(k, g)| (k.len() + g.len()) * 4).sum()
        };
        rows(&self.pending) + self.previous.as_deref().map_or(0, rows)
    }
}

/// A V4 layer's decode state.
#[derive(Debug, Clone, Default)]
pub struct V4LayerCache {
    /// Positions seen.
    positions: usize,
    /// The K=V rows of the last `sliding_window` positions, oldest first.
    window: VecDeque<Vec<f32>>,
    /// The layer's compressor (CSA, HCA).
    pub compressor: PoolState,
    /// Its entries, `head_dim` values each.
    pub entries: Vec<f32>,
    /// The CSA indexer's compressor.
    pub indexer: PoolState,
    /// Its entries (the index keys).
    pub index_keys: Option<KeyStore>,
    /// Set by a truncation to an earlier length, which this state cannot undo.
    broken: bool,
}

impl V4LayerCache {
    pub fn len(&self) -> usize {
        self.positions
    }

    pub fn is_empty(&self) -> bool {
        self.positions == 0
    }

    /// Error unless the state is usable at position `pos`.
    pub fn check(&self, pos: usize) -> Result<()> {
        if self.broken {
            return Err(Error::Invalid(
                "a DeepSeek-V4 cache was truncated to an earlier position: its window and compressors keep no older state (start the sequence again)".into(),
            ));
        }
        if self.positions != pos {
            return Err(Error::Invalid(format!(
                "cache holds {} positions, the step writes at {pos}",
                self.positions
            )));
        }
        Ok(())
    }

    /// Add the K=V row of the next position, keeping the last `window` rows.
    pub fn push_row(&mut self, row: &[f32], window: usize) {
        self.window.push_back(row.to_vec());
        while self.window.len() > window {
            self.window.pop_front();
        }
        self.positions += 1;
    }

    /// The window's rows, oldest first (the newest is the current query's own).
    pub fn window(&self) -> impl Iterator<Item = &[f32]> {
        self.window.iter().map(|r| &r[..])
    }

    /// The index key store, created for `dim`-wide keys in `precision` on first use.
    pub fn index_keys_mut(&mut self, dim: usize, precision: KeyPrecision) -> &mut KeyStore {
        self.index_keys
            .get_or_insert_with(|| KeyStore::new(dim, precision))
    }

    /// A state at `positions` holding `window` (its last rows, oldest first), the
    /// layer's `entries`, the indexer's keys and both compressors' partial windows: the
    /// benchmarks' synthesised long contexts (a prefill of a million tokens would take
    /// hours here).
    pub fn synthetic(
        positions: usize,
        window: Vec<Vec<f32>>,
        compressor: PoolState,
        entries: Vec<f32>,
        indexer: PoolState,
        index_keys: Option<KeyStore>,
    ) -> Self {
        Self {
            positions,
            window: window.into(),
            compressor,
            entries,
            indexer,
            index_keys,
            broken: false,
        }
    }

    /// Keep the first `len` positions: only 0 (forget all) or the current length can be
    /// honoured; anything else leaves the state unusable (reported at the next step).
    pub fn truncate(&mut self, len: usize) {
        if len == 0 {
            *self = Self::default();
        } else if len < self.positions {
            self.broken = true;
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.window.iter().map(|r| r.len() * 4).sum::<usize>()
            + self.compressor.bytes()
            + self.entries.len() * 4
            + self.indexer.bytes()
            + self.index_keys.as_ref().map_or(0, KeyStore::bytes)
    }
}
