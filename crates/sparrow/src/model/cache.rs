//! Per-sequence decode state of the engine (DESIGN.md §5c): for every layer, the cached
//! entries that layer's attention reads, in host buffers the attention kernels scan
//! directly, written in place as tokens arrive.
//!
//! - [`RowBuffer`]: `heads` groups of `width`-wide rows, laid out (heads, capacity,
//!   width), in f32 or f16 (`kv_cache_dtype`); the kernels take the whole buffer plus
//!   the number of valid positions, so reading the cache never copies it. Capacity
//!   grows by doubling (or once, to a known total, through [`SeqCache::reserve`]).
//! - [`CacheRows`]: a layer's rows as the attention kernels read them, in either
//!   precision.
//! - [`LayerCache`]: a layer's entry store (keys after RoPE and values; for MLA layers
//!   the latent store, one `[c ; k_rope]` row per position whose first `r` values are
//!   the value) and its DSA index keys.
//! - [`SeqCache`]: one per sequence; its length is the position of the next token.

use crate::config::{KvCacheDtype, ModelConfig};
use crate::error::{Error, Result};
use crate::kernels::indexer::{KeyPrecision, KeyStore};
use crate::kernels::kv_rows::{CacheElem, KvRows};
use half::f16;

/// Smallest capacity allocated (positions).
const MIN_CAPACITY: usize = 64;

/// A buffer's elements in its storage precision.
#[derive(Debug, Clone)]
enum RowData {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

/// A buffer's elements, borrowed.
#[derive(Debug, Clone, Copy)]
pub enum RowSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// Rows of one cached quantity for `heads` heads: (heads, capacity, width).
#[derive(Debug, Clone)]
pub struct RowBuffer {
    heads: usize,
    width: usize,
    cap: usize,
    len: usize,
    data: RowData,
}

/// `data` (heads, cap, w) with `len` rows written per head, re-laid out for `need`
/// rows per head.
fn regrow<E: CacheElem>(
    data: &[E],
    heads: usize,
    w: usize,
    cap: usize,
    len: usize,
    need: usize,
) -> Vec<E> {
    let mut out = vec![E::zero(); heads * need * w];
    for head in 0..heads {
        let src = &data[head * cap * w..(head * cap + len) * w];
        out[head * need * w..head * need * w + src.len()].copy_from_slice(src);
    }
    out
}

/// Write `t` tokens of `rows` (t, heads, w) at positions `len..len + t` of `data`
/// (heads, cap, w), rounding to the storage type.
fn write_token_major<E: CacheElem>(
    data: &mut [E],
    rows: &[f32],
    heads: usize,
    w: usize,
    cap: usize,
    len: usize,
) {
    for (i, token) in rows.chunks_exact(heads * w).enumerate() {
        for head in 0..heads {
            let dst = (head * cap + len + i) * w;
            E::narrow(&token[head * w..(head + 1) * w], &mut data[dst..dst + w]);
        }
    }
}

impl RowBuffer {
    pub fn new(heads: usize, width: usize, dtype: KvCacheDtype) -> Self {
        let data = match dtype {
            KvCacheDtype::Float32 => RowData::F32(Vec::new()),
            KvCacheDtype::Float16 => RowData::F16(Vec::new()),
        };
        Self {
            heads,
            width,
            cap: 0,
            len: 0,
            data,
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
    pub fn data(&self) -> RowSlice<'_> {
        match &self.data {
            RowData::F32(d) => RowSlice::F32(d),
            RowData::F16(d) => RowSlice::F16(d),
        }
    }

    /// Bytes per stored value.
    pub fn elem_bytes(&self) -> usize {
        match self.data {
            RowData::F32(_) => f32::BYTES,
            RowData::F16(_) => f16::BYTES,
        }
    }

    /// Make room for `need` positions, keeping the rows written. Growing copies each
    /// head's rows once into the new layout.
    pub fn reserve_exact(&mut self, need: usize) {
        if need <= self.cap {
            return;
        }
        let (h, w, cap, len) = (self.heads, self.width, self.cap, self.len);
        self.data = match &self.data {
            RowData::F32(d) => RowData::F32(regrow(d, h, w, cap, len, need)),
            RowData::F16(d) => RowData::F16(regrow(d, h, w, cap, len, need)),
        };
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
        let (cap, len) = (self.cap, self.len);
        match &mut self.data {
            RowData::F32(d) => write_token_major(d, rows, h, w, cap, len),
            RowData::F16(d) => write_token_major(d, rows, h, w, cap, len),
        }
        self.len += t;
    }

    /// Keep the first `len` positions (no-op if there are fewer); the rows past them
    /// are no longer read and get overwritten by later appends.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        self.heads * self.cap * self.width * self.elem_bytes()
    }

    /// Bytes of the rows written.
    pub fn used_bytes(&self) -> usize {
        self.heads * self.len * self.width * self.elem_bytes()
    }
}

/// A layer's cached rows as the attention kernels read them, in their stored
/// precision.
#[derive(Debug, Clone, Copy)]
pub enum CacheRows<'a> {
    F32(KvRows<'a, f32>),
    F16(KvRows<'a, f16>),
}

impl<'a> CacheRows<'a> {
    /// Per-head keys and values of the same precision: (heads, capacity, width) each.
    pub fn separate(k: &'a RowBuffer, v: &'a RowBuffer) -> Result<Self> {
        let (groups, d) = (k.heads, k.width);
        match (k.data(), v.data()) {
            (RowSlice::F32(k), RowSlice::F32(v)) => {
                Ok(Self::F32(KvRows::separate(k, v, groups, d)))
            }
            (RowSlice::F16(k), RowSlice::F16(v)) => {
                Ok(Self::F16(KvRows::separate(k, v, groups, d)))
            }
            _ => Err(Error::Invalid(
                "cache keys and values are stored in different precisions".into(),
            )),
        }
    }

    /// A latent store (one group of rows whose first `dv` values are the value).
    pub fn key_prefix(store: &'a RowBuffer, dv: usize) -> Self {
        match store.data() {
            RowSlice::F32(k) => Self::F32(KvRows::key_prefix(k, store.width, dv)),
            RowSlice::F16(k) => Self::F16(KvRows::key_prefix(k, store.width, dv)),
        }
    }

    /// The share of query q's (H, dk) dense attention mass, averaged over heads, that
    /// falls on `selection` among the first `visible` rows
    /// ([`crate::kernels::sparse_attention::selected_mass_cached`]).
    pub fn selected_mass(
        &self,
        q: &[f32],
        heads: usize,
        visible: usize,
        selection: &[u32],
        scale: f32,
    ) -> f32 {
        use crate::kernels::sparse_attention::selected_mass_cached as mass;
        match self {
            Self::F32(r) => mass(q, r, heads, visible, selection, scale),
            Self::F16(r) => mass(q, r, heads, visible, selection, scale),
        }
    }
}

/// One layer's cached entries.
#[derive(Debug, Clone)]
pub struct LayerCache {
    /// Keys after RoPE, (KV, capacity, D); for MLA layers the latent store
    /// (1, capacity, r + dr), rows `[c ; k_rope]`. None until the layer first runs.
    pub k: Option<RowBuffer>,
    /// Values, (KV, capacity, D); None for the latent store (its values are the first
    /// `r` of each key row).
    pub v: Option<RowBuffer>,
    /// `dsa` layers: the index keys, one `index_head_dim` row per position.
    pub index: Option<KeyStore>,
    /// DeepSeek-V4 layers: their window and compressors (`model::v4_cache`); the row
    /// buffers above stay empty.
    pub v4: Option<super::v4_cache::V4LayerCache>,
    /// Positions to allocate when the buffers are created (0 = grow by doubling).
    reserve: usize,
    /// Precision of the key / value (latent) rows.
    dtype: KvCacheDtype,
}

impl LayerCache {
    /// An empty cache whose key / value rows will be stored in `dtype`.
    pub fn new(dtype: KvCacheDtype) -> Self {
        Self {
            k: None,
            v: None,
            index: None,
            v4: None,
            reserve: 0,
            dtype,
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        match &self.v4 {
            Some(v4) => v4.len(),
            None => self.k.as_ref().map_or(0, RowBuffer::len),
        }
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
        let (reserve, dtype) = (self.reserve, self.dtype);
        let make = || {
            let mut b = RowBuffer::new(kv, d, dtype);
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
        let (reserve, dtype) = (self.reserve, self.dtype);
        self.k.get_or_insert_with(|| {
            let mut b = RowBuffer::new(1, width, dtype);
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

    /// Keep the first `len` positions of every buffer.
    pub fn truncate(&mut self, len: usize) {
        for b in [&mut self.k, &mut self.v].into_iter().flatten() {
            b.truncate(len);
        }
        if let Some(ix) = &mut self.index {
            ix.truncate(len);
        }
        if let Some(v4) = &mut self.v4 {
            v4.truncate(len);
        }
    }

    /// Bytes allocated by this layer (keys, values, index keys).
    pub fn bytes(&self) -> usize {
        self.k.as_ref().map_or(0, RowBuffer::bytes)
            + self.v.as_ref().map_or(0, RowBuffer::bytes)
            + self.index.as_ref().map_or(0, KeyStore::bytes)
            + self
                .v4
                .as_ref()
                .map_or(0, super::v4_cache::V4LayerCache::bytes)
    }

    /// Bytes of the positions written (index keys: as allocated).
    pub fn used_bytes(&self) -> usize {
        self.k.as_ref().map_or(0, RowBuffer::used_bytes)
            + self.v.as_ref().map_or(0, RowBuffer::used_bytes)
            + self.index.as_ref().map_or(0, KeyStore::bytes)
            + self
                .v4
                .as_ref()
                .map_or(0, super::v4_cache::V4LayerCache::bytes)
    }
}

/// The decode state of one sequence: a cache per layer.
#[derive(Debug, Clone)]
pub struct SeqCache {
    pub layers: Vec<LayerCache>,
}

impl SeqCache {
    /// An empty cache of `num_layers` layers storing key / value rows in `dtype`.
    pub fn new(num_layers: usize, dtype: KvCacheDtype) -> Self {
        Self {
            layers: vec![LayerCache::new(dtype); num_layers],
        }
    }

    /// An empty cache for one sequence of a model of `cfg`: its layers, its
    /// `kv_cache_dtype`.
    pub fn for_config(cfg: &ModelConfig) -> Self {
        Self::new(cfg.num_hidden_layers, cfg.kv_cache_dtype)
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

    /// Keep the first `len` positions of every layer (a shared prompt prefix reused by
    /// another sequence, or a rewind); allocations are kept.
    pub fn truncate(&mut self, len: usize) {
        self.layers.iter_mut().for_each(|l| l.truncate(len));
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
