//! Per-sequence decode state of the engine (DESIGN.md §5c): for every layer, the cached
//! entries that layer's attention reads, in host buffers the attention kernels scan
//! directly, written in place as tokens arrive.
//!
//! - [`RowBuffer`]: `heads` groups of `width`-wide rows, laid out (heads, capacity,
//!   width); the kernels take the whole buffer plus the number of valid positions, so
//!   reading the cache never copies it. Capacity grows by doubling (or once, to a
//!   known total, through [`SeqCache::reserve`]).
//! - [`LayerCache`]: a layer's entry store (keys after RoPE and values; for MLA layers
//!   the latent store, one `[c ; k_rope]` row per position whose first `r` values are
//!   the value) and its DSA index keys.
//! - [`SeqCache`]: one per sequence; its length is the position of the next token.

use crate::error::{Error, Result};
use crate::kernels::indexer::{KeyPrecision, KeyStore};

/// Smallest capacity allocated (positions).
const MIN_CAPACITY: usize = 64;

/// Rows of one cached quantity for `heads` heads: (heads, capacity, width), f32.
#[derive(Debug, Clone)]
pub struct RowBuffer {
    heads: usize,
    width: usize,
    cap: usize,
    len: usize,
    data: Vec<f32>,
}

impl RowBuffer {
    pub fn new(heads: usize, width: usize) -> Self {
        Self {
            heads,
            width,
            cap: 0,
            len: 0,
            data: Vec::new(),
        }
    }

    /// Positions written.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffer holds before it must grow.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn heads(&self) -> usize {
        self.heads
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// The whole buffer, (heads, capacity, width); rows at positions >= `len` are zero.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// Make room for `need` positions, keeping the rows written. Growing copies each
    /// head's rows once into the new layout.
    pub fn reserve_exact(&mut self, need: usize) {
        if need <= self.cap {
            return;
        }
        let (h, w) = (self.heads, self.width);
        let mut data = vec![0.0f32; h * need * w];
        for head in 0..h {
            let src = &self.data[head * self.cap * w..(head * self.cap + self.len) * w];
            data[head * need * w..head * need * w + src.len()].copy_from_slice(src);
        }
        self.data = data;
        self.cap = need;
    }

    fn grow_for(&mut self, need: usize) {
        if need > self.cap {
            self.reserve_exact(need.max(2 * self.cap).max(MIN_CAPACITY));
        }
    }

    /// Append `t` positions from `rows` laid out (t, heads, width) (one token's heads
    /// side by side, as projections produce them).
    pub fn append_token_major(&mut self, rows: &[f32]) {
        let (h, w) = (self.heads, self.width);
        let t = rows.len() / (h * w).max(1);
        debug_assert_eq!(rows.len(), t * h * w);
        self.grow_for(self.len + t);
        for (i, token) in rows.chunks_exact(h * w).enumerate() {
            for head in 0..h {
                let dst = (head * self.cap + self.len + i) * w;
                self.data[dst..dst + w].copy_from_slice(&token[head * w..(head + 1) * w]);
            }
        }
        self.len += t;
    }

    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }

    /// Bytes of the rows written.
    pub fn used_bytes(&self) -> usize {
        self.heads * self.len * self.width * std::mem::size_of::<f32>()
    }
}

/// One layer's cached entries.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// Keys after RoPE, (KV, capacity, D); for MLA layers the latent store
    /// (1, capacity, r + dr), rows `[c ; k_rope]`. None until the layer first runs.
    pub k: Option<RowBuffer>,
    /// Values, (KV, capacity, D); None for the latent store (its values are the first
    /// `r` of each key row).
    pub v: Option<RowBuffer>,
    /// `dsa` layers: the index keys, one `index_head_dim` row per position.
    pub index: Option<KeyStore>,
    /// Positions to allocate when the buffers are created (0 = grow by doubling).
    reserve: usize,
}

impl LayerCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, RowBuffer::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Error unless the cache holds exactly `pos` positions (a step writes at `pos`).
    pub fn check_position(&self, pos: usize) -> Result<()> {
        if self.len() != pos {
            return Err(Error::Invalid(format!(
                "cache holds {} positions, the step writes at {pos}",
                self.len()
            )));
        }
        Ok(())
    }

    /// The key and value buffers, created for `kv` heads of `d` on first use.
    pub fn kv_mut(&mut self, kv: usize, d: usize) -> (&mut RowBuffer, &mut RowBuffer) {
        let reserve = self.reserve;
        let make = || {
            let mut b = RowBuffer::new(kv, d);
            b.reserve_exact(reserve);
            b
        };
        let k = self.k.get_or_insert_with(make);
        let v = self.v.get_or_insert_with(make);
        (k, v)
    }

    /// The latent store (one group of `width`-wide rows, no separate values), created
    /// on first use.
    pub fn latent_mut(&mut self, width: usize) -> &mut RowBuffer {
        let reserve = self.reserve;
        self.k.get_or_insert_with(|| {
            let mut b = RowBuffer::new(1, width);
            b.reserve_exact(reserve);
            b
        })
    }

    /// The index key store, created for `dim`-wide keys in `precision` on first use.
    pub fn index_mut(&mut self, dim: usize, precision: KeyPrecision) -> &mut KeyStore {
        let reserve = self.reserve;
        self.index.get_or_insert_with(|| {
            let mut ks = KeyStore::new(dim, precision);
            ks.reserve(reserve);
            ks
        })
    }

    /// Bytes allocated by this layer (keys, values, index keys).
    pub fn bytes(&self) -> usize {
        self.k.as_ref().map_or(0, RowBuffer::bytes)
            + self.v.as_ref().map_or(0, RowBuffer::bytes)
            + self.index.as_ref().map_or(0, KeyStore::bytes)
    }

    /// Bytes of the positions written (index keys: as allocated).
    pub fn used_bytes(&self) -> usize {
        self.k.as_ref().map_or(0, RowBuffer::used_bytes)
            + self.v.as_ref().map_or(0, RowBuffer::used_bytes)
            + self.index.as_ref().map_or(0, KeyStore::bytes)
    }
}

/// The decode state of one sequence: a cache per layer.
#[derive(Debug, Clone)]
pub struct SeqCache {
    pub layers: Vec<LayerCache>,
}

impl SeqCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); num_layers],
        }
    }

    /// Positions cached: the position of the next token.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Allocate room for `positions` in total when each layer's buffers are created or
    /// next grow, so a sequence of known length never copies its cache.
    pub fn reserve(&mut self, positions: usize) {
        for l in &mut self.layers {
            l.reserve = l.reserve.max(positions);
            if let Some(k) = &mut l.k {
                k.reserve_exact(positions);
            }
            if let Some(v) = &mut l.v {
                v.reserve_exact(positions);
            }
            if let Some(ix) = &mut l.index {
                ix.reserve(positions.saturating_sub(ix.len()));
            }
        }
    }

    /// Bytes allocated by every layer.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }

    /// Bytes of the positions written, over all layers.
    pub fn used_bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::used_bytes).sum()
    }
}
