//! Decode state of a DeepSeek-V4 layer (DESIGN.md §4, §5c): what the engine's step keeps
//! per sequence so a prefill plus token-by-token decode equals the whole-window forward.
//!
//! - the window: the K=V rows (after RoPE) of the last `sliding_window` positions, a
//!   ring that never grows past the window;
//! - per compressor (the layer's, and on CSA layers the indexer's own): the projected
//!   (kv, gate + position bias) rows of the window not yet complete, for CSA the Ca half
//!   of the last complete window (the next entry pools it), and the entries so far
//!   (normed, RoPE'd at their windows' first positions).
//!
//! The bytes per sequence are the window plus one entry per `compress_rate` tokens: at
//! 1M tokens with rate 4 / 128 the compressed entries are what grows.

use crate::error::{Error, Result};
use std::collections::VecDeque;

/// One compressor's state.
#[derive(Debug, Clone, Default)]
pub struct PoolState {
    /// Rows of the incomplete window: (kv, gate + position bias), each `width` wide.
    pending: Vec<(Vec<f32>, Vec<f32>)>,
    /// CSA: the last complete window's Ca rows (kv, gate), `dim` wide.
    previous: Option<Vec<(Vec<f32>, Vec<f32>)>>,
    /// Entries so far, `dim` values each.
    entries: Vec<f32>,
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
    /// Entries made so far.
    pub fn count(&self, dim: usize) -> usize {
        self.entries.len() / dim.max(1)
    }

    /// Entry `w` (dim values).
    pub fn entry(&self, w: usize, dim: usize) -> &[f32] {
        &self.entries[w * dim..(w + 1) * dim]
    }

    /// Add the projected row (kv, gate) of the token at `pos`; when it completes a
    /// window, pool it into a new entry, handed to `finish` (RoPE at the window's first
    /// position) before it is stored.
    pub fn push(
        &mut self,
        spec: &PoolSpec,
        pos: usize,
        kv: &[f32],
        gate: &[f32],
        finish: impl FnOnce(&mut [f32], usize) -> Result<()>,
    ) -> Result<()> {
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
            return Ok(());
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
        self.entries.extend_from_slice(&entry);
        if spec.overlap {
            self.previous = Some(
                rows.into_iter()
                    .map(|(k, g)| (k[..d].to_vec(), g[..d].to_vec()))
                    .collect(),
            );
        }
        Ok(())
    }

    fn bytes(&self) -> usize {
        let rows = |v: &[(Vec<f32>, Vec<f32>)]| -> usize {
            v.iter().map(|(k, g)| (k.len() + g.len()) * 4).sum()
        };
        self.entries.len() * 4 + rows(&self.pending) + self.previous.as_deref().map_or(0, rows)
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
    /// The CSA indexer's compressor.
    pub indexer: PoolState,
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
            + self.indexer.bytes()
    }
}
