//! `y = x W^T` with W kept in a ggml block type (`Q4_0`, `Q4_1`, `Q8_0`: what GGUF
//! files ship) and x quantized per 32-value block to int8 on the fly, as llama.cpp
//! computes it: each output is a sum over blocks of `d_w * d_x * sum_i(q_w q_x)` (plus
//! `m_w * s_x` for `Q4_1`, whose activations carry `s = d * sum(q_x)` as ggml's `Q8_1`
//! does). Weights stay in their own bytes (4.5-8.5 bits a value), so a decode step
//! streams a quarter to a half of what f32 weights would need.
//!
//! Activation blocks: `d = absmax / 127` (stored as f16, as ggml does), `q =
//! round_half_even(x * 127 / absmax)`.
//!
//! [`qxwt`] picks an AVX-512 VNNI kernel (`vpdpbusd`: unsigned nibbles times signed
//! activations, 8 x i32 lanes per block, scaled into f32 lanes without a horizontal sum
//! per block) when the CPU has it, else an AVX2 kernel (`vpmaddubsw` + `vpmaddwd`, with
//! `Q8_0` as |w| times sign(w) x so no 16-bit pair sum saturates), else the portable
//! loop. [`reference`] is the plain f64 loop the tests compare them with; every output element is summed in the same
//! order whatever the batch, so rows are bit-identical alone or batched.

use super::pool;
use crate::formats::ggml::{dequantize_block, half_at, GgmlType};
use crate::formats::gguf::SharedBytes;
use half::f16;

/// Values per block.
pub const QK: usize = 32;

/// A (rows, cols) weight matrix in a ggml block type, row-major (each row `cols / 32`
/// blocks).
#[derive(Clone)]
pub struct QMatrix {
    pub ty: GgmlType,
    /// Output features.
    pub rows: usize,
    /// Input features (a multiple of 32).
    pub cols: usize,
    data: QData,
    /// Where row `r` sits in `data`.
    order: RowOrder,
}

/// The order a matrix's rows are stored in; every reader of a row (the products,
/// dequantization) goes through it, so the matrix is the same whatever its storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOrder {
    /// Row `r` is stored `r`-th.
    Plain,
    /// llama.cpp's order of Q and K rows (for its interleaved RoPE): within each head
    /// of `head_dim` rows, row `j * head_dim / 2 + i` (HF's rotate-half layout) is
    /// stored at `2 i + j`. A GGUF file's Q and K are used in place in its map this
    /// way, instead of through a reordered copy.
    GgufRope { head_dim: usize },
}

impl RowOrder {
    /// The stored position of row `r`.
    #[inline(always)]
    fn stored(self, r: usize) -> usize {
        match self {
            RowOrder::Plain => r,
            RowOrder::GgufRope { head_dim } => {
                let (head, within) = (r / head_dim, r % head_dim);
                let half = head_dim / 2;
                head * head_dim + 2 * (within % half) + within / half
            }
        }
    }
}

/// A matrix's bytes: its own, or a range of a memory-mapped GGUF file.
#[derive(Clone)]
enum QData {
    Owned(Vec<u8>),
    Mapped(SharedBytes),
}

impl std::ops::Deref for QData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            QData::Owned(v) => v,
            QData::Mapped(m) => m,
        }
    }
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QMatrix({}, {}x{})",
            self.ty.name(),
            self.rows,
            self.cols
        )
    }
}

/// Whether weights of type `t` can stay quantized (the types [`qxwt`] computes with).
pub fn is_native(t: GgmlType) -> bool {
    matches!(t, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
}

impl QMatrix {
    /// A matrix from its encoded bytes; checks the type and the byte count.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        Self::with_data(ty, rows, cols, QData::Owned(data))
    }

    /// A matrix over bytes of a mapped GGUF file (no copy).
    pub fn mapped(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: SharedBytes,
    ) -> Result<Self, String> {
        Self::with_data(ty, rows, cols, QData::Mapped(data))
    }

    fn with_data(ty: GgmlType, rows: usize, cols: usize, data: QData) -> Result<Self, String> {
        if !is_native(ty) {
            return Err(format!("{} weights are not computed quantized", ty.name()));
        }
        if !cols.is_multiple_of(QK) {
            return Err(format!("{cols} columns are not whole {QK}-value blocks"));
        }
        let want = rows * (cols / QK) * ty.block_bytes();
        if data.len() != want {
            return Err(format!(
                "a {rows}x{cols} {} matrix has {want} bytes, got {}",
                ty.name(),
                data.len()
            ));
        }
        Ok(Self {
            ty,
            rows,
            cols,
            data,
            order: RowOrder::Plain,
        })
    }

    /// The same bytes read as stored in `order`.
    pub fn with_row_order(mut self, order: RowOrder) -> Result<Self, String> {
        if let RowOrder::GgufRope { head_dim } = order {
            if head_dim == 0 || !head_dim.is_multiple_of(2) || !self.rows.is_multiple_of(head_dim) {
                return Err(format!(
                    "{} rows are not whole heads of an even size {head_dim}",
                    self.rows
                ));
            }
        }
        self.order = order;
        Ok(self)
    }

    fn row_bytes(&self) -> usize {
        self.cols / QK * self.ty.block_bytes()
    }

    /// The encoded blocks of row `r`.
    #[inline(always)]
    fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        let at = self.order.stored(r) * rb;
        &self.data[at..at + rb]
    }

    /// Bytes the weights occupy.
    pub fn n_bytes(&self) -> usize {
        self.data.len()
    }

    /// Row `r` dequantized into `out` (`cols` values): an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let bb = self.ty.block_bytes();
        for (b, y) in self.row(r).chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
            dequantize_block(self.ty, b, y);
        }
    }

    /// The whole matrix as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }
}

/// Activations quantized per block: values, scales, and per-block sums.
pub struct QActs {
    /// (M, K) int8.
    pub q: Vec<i8>,
    /// Per block: `d` (f16-rounded).
    pub d: Vec<f32>,
    /// Per block: `f16(d * sum(q))`, ggml's `Q8_1` `s`.
    pub s: Vec<f32>,
    /// Per block: `sum(q)`.
    pub sum: Vec<i32>,
}

/// Quantize x (a multiple of 32 values) per block.
pub fn quantize_acts(x: &[f32]) -> QActs {
    let nb = x.len() / QK;
    let mut a = QActs {
        q: vec![0; x.len()],
        d: Vec::with_capacity(nb),
        s: Vec::with_capacity(nb),
        sum: Vec::with_capacity(nb),
    };
    for (xb, qb) in x.chunks_exact(QK).zip(a.q.chunks_exact_mut(QK)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qb.iter_mut().zip(xb) {
            let r = round_half_even(v * id);
            *q = r as i8;
            sum += r;
        }
        a.d.push(f16::from_f32(d).to_f32());
        a.s.push(f16::from_f32(d * sum as f32).to_f32());
        a.sum.push(sum);
    }
    a
}

/// Round to the nearest integer, ties to even (|v| <= 127 here), without a libm call:
/// adding and subtracting 1.5 * 2^23 leaves the integer the FPU's default rounding
/// picks.
#[inline(always)]
fn round_half_even(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    ((v + MAGIC) - MAGIC) as i32
}

/// One output: row `w` (its blocks) against quantized activation row `(q, d, s, sum)`.
#[inline(always)]
fn dot_row_portable(ty: GgmlType, w: &[u8], q: &[i8], d: &[f32], s: &[f32], sum: &[i32]) -> f32 {
    let bb = ty.block_bytes();
    let mut acc = 0f32;
    let mut extra = 0f32;
    for (ib, b) in w.chunks_exact(bb).enumerate() {
        let x = &q[ib * QK..(ib + 1) * QK];
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let off = if ty == GgmlType::Q4_0 { 2 } else { 4 };
                let qs = &b[off..off + 16];
                let mut sumi = 0i32;
                for j in 0..16 {
                    sumi += (qs[j] & 0x0F) as i32 * x[j] as i32;
                    sumi += (qs[j] >> 4) as i32 * x[j + 16] as i32;
                }
                if ty == GgmlType::Q4_0 {
                    sumi -= 8 * sum[ib];
                    acc += half_at(b, 0) * d[ib] * sumi as f32;
                } else {
                    acc += half_at(b, 0) * d[ib] * sumi as f32;
                    extra += half_at(b, 2) * s[ib];
                }
            }
            GgmlType::Q8_0 => {
                let mut sumi = 0i32;
                for j in 0..QK {
                    sumi += (b[2 + j] as i8) as i32 * x[j] as i32;
                }
                acc += half_at(b, 0) * d[ib] * sumi as f32;
            }
            _ => unreachable!("QMatrix holds native types only"),
        }
    }
    acc + extra
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::*;
    use std::arch::x86_64::*;

    /// An f16 (its bits) as f32, by F16C.
    #[inline]
    #[target_feature(enable = "f16c")]
    pub(super) unsafe fn half_to_f32(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// Horizontal sum of 8 f32 lanes.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// The 32 weight bytes of one block as unsigned values (nibbles low then high, or
    /// `Q8_0`'s int8 shifted by 128) and its integer correction against activation
    /// block `ib` (`-8 * sum(x)` for `Q4_0`, `-128 * sum(x)` for `Q8_0`).
    #[inline(always)]
    pub(super) unsafe fn block_u8<const T: u32>(b: *const u8) -> __m256i {
        if T == 8 {
            let wv = _mm256_loadu_si256(b.add(2) as *const __m256i);
            _mm256_xor_si256(wv, _mm256_set1_epi8(-128))
        } else {
            let off = if T == 2 { 2 } else { 4 };
            let mask = _mm_set1_epi8(0x0F);
            let qs = _mm_loadu_si128(b.add(off) as *const __m128i);
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
            _mm256_set_m128i(hi, lo)
        }
    }

    /// The weights' f16 values at byte 0 (`d`) and byte 2 (`Q4_1`'s `m`) of eight
    /// consecutive blocks starting at `base`, as f32: one gather of the eight 32-bit
    /// words, their low (`HIGH = false`) or high halves packed and widened.
    #[inline(always)]
    pub(super) unsafe fn block_halves<const HIGH: bool>(dm: __m256i) -> __m256 {
        unsafe {
            let pick = if HIGH {
                _mm256_setr_epi8(
                    2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, 2, 3, 6, 7, 10, 11,
                    14, 15, -1, -1, -1, -1, -1, -1, -1, -1,
                )
            } else {
                _mm256_setr_epi8(
                    0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9, 12,
                    13, -1, -1, -1, -1, -1, -1, -1, -1,
                )
            };
            let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_shuffle_epi8(dm, pick));
            _mm256_cvtph_ps(_mm256_castsi256_si128(packed))
        }
    }

    /// Activation blocks `ib` and `ib + 1` of every row as one 512-bit register each,
    /// with the type's integer correction (`corr_scale * sum(x)`, 0 for `Q4_1`) in
    /// each block's first lane.
    ///
    /// # Safety
    /// AVX-512F enabled; blocks ib and ib + 1 inside every row of `x`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // r picks a row of x and its registers
    unsafe fn pair_acts<const R: usize>(
        x: &Rows<'_, R>,
        ib: usize,
        corr_scale: i32,
    ) -> ([__m512i; R], [__m512i; R]) {
        let mut xv = [_mm512_setzero_si512(); R];
        let mut corr = [_mm512_setzero_si512(); R];
        for r in 0..R {
            xv[r] = _mm512_loadu_si512(x.q[r].as_ptr().add(ib * QK) as *const _);
            if corr_scale != 0 {
                let c0 = corr_scale * *x.sum[r].get_unchecked(ib);
                let c1 = corr_scale * *x.sum[r].get_unchecked(ib + 1);
                corr[r] = _mm512_setr_epi32(c0, 0, 0, 0, 0, 0, 0, 0, c1, 0, 0, 0, 0, 0, 0, 0);
            }
        }
        (xv, corr)
    }

    /// Weight blocks `ib` and `ib + 1` of the row at `wp` (blocks of `bb` bytes) as
    /// unsigned bytes, one block per 256-bit half.
    ///
    /// # Safety
    /// AVX-512F enabled; both blocks inside the row.
    #[inline(always)]
    unsafe fn pair_weights<const T: u32>(wp: *const u8, ib: usize, bb: usize) -> __m512i {
        _mm512_inserti64x4(
            _mm512_castsi256_si512(block_u8::<T>(wp.add(ib * bb))),
            block_u8::<T>(wp.add((ib + 1) * bb)),
            1,
        )
    }

    /// Activation rows for [`dot_tile`]: per row its int8 values, block scales `d`,
    /// `Q8_1` sums `s` and integer sums.
    pub struct Rows<'a, const R: usize> {
        pub q: [&'a [i8]; R],
        pub d: [&'a [f32]; R],
        pub s: [&'a [f32]; R],
        pub sum: [&'a [i32]; R],
    }

    /// Bytes per block of ggml type id `T` (2 = `Q4_0`, 3 = `Q4_1`, 8 = `Q8_0`) and
    /// blocks per row of a tile, with the tile's shapes checked in debug builds.
    #[inline(always)]
    pub(super) fn tile_blocks<const T: u32, const C: usize, const R: usize>(
        w: [&[u8]; C],
        x: &Rows<'_, R>,
    ) -> (usize, usize) {
        let bb = match T {
            2 => 18,
            3 => 20,
            _ => 34,
        };
        let nb = w[0].len() / bb;
        for wc in w.iter() {
            debug_assert_eq!(wc.len(), nb * bb);
        }
        for r in 0..R {
            debug_assert!(x.q[r].len() >= nb * QK && x.d[r].len() >= nb && x.sum[r].len() >= nb);
        }
        (bb, nb)
    }

    /// [`dot_row_portable`] with `vpdpbusd` for a tile of C weight rows x R activation
    /// rows, two blocks per 512-bit step: each weight block is unpacked once for the R
    /// rows, and the C x R independent sums keep the core busy (decode runs 2 x 1,
    /// prefill chunks 2 x 4). The blocks' scales are taken eight blocks at a time: one
    /// gather of the weights' `d` (and `m`) per row, one product with the activations'
    /// eight `d`, a permute per pair of blocks (scalar conversions and products per
    /// block held `Q8_0` at batch 1 to ~2.7x the time, `Q4_1` to ~1.5x; the same
    /// products either way, so the same bits). `T` is the ggml type id (2 = `Q4_0`, 3 = `Q4_1`, 8 =
    /// `Q8_0`). Same per-block integer sums as the portable loop (the type's correction
    /// enters each block's first lane, so they stay exact); the f32 sum runs in 16
    /// lanes, so results differ from it by rounding only. Every output goes through
    /// the same operations in the same order whatever the tile, so a row's result
    /// does not depend on the batch.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA, F16C, AVX-512 F/BW/DQ/VL and VNNI (checked by the
    /// caller); every `w[c]` holds the same whole number of blocks of type `T`, and
    /// every row of `x` at least as many activation blocks.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni,avx512bw,avx512dq")]
    #[allow(clippy::needless_range_loop)] // indices also pick blocks and activation rows
    pub unsafe fn dot_tile<const T: u32, const C: usize, const R: usize>(
        w: [&[u8]; C],
        x: &Rows<'_, R>,
    ) -> [[f32; R]; C] {
        let (bb, nb) = tile_blocks::<T, C, R>(w, x);
        let corr_scale = match T {
            2 => -8,
            8 => -128,
            _ => 0,
        };
        let mut acc = [[_mm512_setzero_ps(); R]; C];
        let mut extra = [[0f32; R]; C];
        let mut ib = 0;
        // Eight blocks at a time: their scales come from one gather per weight row (`d`,
        // and `Q4_1`'s `m`, widened together) and one product per activation row, and
        // each pair of blocks takes its two scales by a permute: the same products as
        // the pair loop below computes one by one, so the same bits.
        // SAFETY (reads): blocks ib..ib + 8 lie inside every `w[c]` (each gather reads
        // 4 bytes at the start of one of its blocks, >= 18 bytes long), and activation
        // blocks ib..ib + 8 inside every row's q, d, s, sum (nb blocks each).
        let bbi = bb as i32;
        let offsets =
            _mm256_setr_epi32(0, bbi, 2 * bbi, 3 * bbi, 4 * bbi, 5 * bbi, 6 * bbi, 7 * bbi);
        while ib + 8 <= nb {
            let mut scale8 = [[_mm256_setzero_ps(); R]; C];
            for c in 0..C {
                let base = w[c].as_ptr().add(ib * bb);
                let dm = _mm256_i32gather_epi32::<1>(base as *const i32, offsets);
                let dw = block_halves::<false>(dm);
                for r in 0..R {
                    scale8[c][r] = _mm256_mul_ps(dw, _mm256_loadu_ps(x.d[r].as_ptr().add(ib)));
                }
                if T == 3 {
                    // m * s per block, added in block order as the pair loop does.
                    let mw = block_halves::<true>(dm);
                    for r in 0..R {
                        let sx = _mm256_loadu_ps(x.s[r].as_ptr().add(ib));
                        let mut ms = [0f32; 8];
                        _mm256_storeu_ps(ms.as_mut_ptr(), _mm256_mul_ps(mw, sx));
                        for v in ms {
                            extra[c][r] += v;
                        }
                    }
                }
            }
            for pair in 0..4 {
                let j = ib + 2 * pair;
                // Lanes 0-7 take block j's scale (lane 2 * pair), 8-15 block j + 1's.
                let pick = _mm512_mask_blend_epi32(
                    0xff00,
                    _mm512_set1_epi32(2 * pair as i32),
                    _mm512_set1_epi32(2 * pair as i32 + 1),
                );
                let (xv, corr) = pair_acts(x, j, corr_scale);
                for c in 0..C {
                    let wv = pair_weights::<T>(w[c].as_ptr(), j, bb);
                    for r in 0..R {
                        let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv[r]);
                        let dot = _mm512_add_epi32(dot, corr[r]);
                        let scale =
                            _mm512_permutexvar_ps(pick, _mm512_castps256_ps512(scale8[c][r]));
                        acc[c][r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[c][r]);
                    }
                }
            }
            ib += 8;
        }
        // SAFETY (reads): blocks ib and ib + 1 lie inside every `w[c]`, and activation
        // blocks ib and ib + 1 inside every row's q, d, s, sum (nb blocks each).
        while ib + 2 <= nb {
            let (xv, corr) = pair_acts(x, ib, corr_scale);
            for c in 0..C {
                let wp = w[c].as_ptr();
                let (b0, b1) = (wp.add(ib * bb), wp.add((ib + 1) * bb));
                let wv = pair_weights::<T>(wp, ib, bb);
                let dw0 = half_to_f32(std::ptr::read_unaligned(b0 as *const u16));
                let dw1 = half_to_f32(std::ptr::read_unaligned(b1 as *const u16));
                let (m0, m1) = if T == 3 {
                    (
                        half_to_f32(std::ptr::read_unaligned(b0.add(2) as *const u16)),
                        half_to_f32(std::ptr::read_unaligned(b1.add(2) as *const u16)),
                    )
                } else {
                    (0.0, 0.0)
                };
                for r in 0..R {
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv[r]);
                    let dot = _mm512_add_epi32(dot, corr[r]);
                    let s0 = dw0 * *x.d[r].get_unchecked(ib);
                    let s1 = dw1 * *x.d[r].get_unchecked(ib + 1);
                    let scale = _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(s1), 1);
                    acc[c][r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[c][r]);
                    if T == 3 {
                        extra[c][r] += m0 * *x.s[r].get_unchecked(ib);
                        extra[c][r] += m1 * *x.s[r].get_unchecked(ib + 1);
                    }
                }
            }
            ib += 2;
        }
        let mut out = [[0f32; R]; C];
        for c in 0..C {
            for r in 0..R {
                let a = acc[c][r];
                let mut acc8 =
                    _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
                if ib < nb {
                    let b0 = w[c].as_ptr().add(ib * bb);
                    let xv = _mm256_loadu_si256(x.q[r].as_ptr().add(ib * QK) as *const __m256i);
                    let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), block_u8::<T>(b0), xv);
                    let c0 = corr_scale * *x.sum[r].get_unchecked(ib);
                    let dot = _mm256_add_epi32(dot, _mm256_setr_epi32(c0, 0, 0, 0, 0, 0, 0, 0));
                    let s0 = half_to_f32(std::ptr::read_unaligned(b0 as *const u16))
                        * *x.d[r].get_unchecked(ib);
                    acc8 = _mm256_fmadd_ps(_mm256_set1_ps(s0), _mm256_cvtepi32_ps(dot), acc8);
                    if T == 3 {
                        extra[c][r] +=
                            half_to_f32(std::ptr::read_unaligned(b0.add(2) as *const u16))
                                * *x.s[r].get_unchecked(ib);
                    }
                }
                out[c][r] = hsum(acc8) + extra[c][r];
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::vnni::{block_halves, block_u8, half_to_f32, hsum, tile_blocks, Rows};
    use super::QK;
    use std::arch::x86_64::*;

    /// Bytes ahead of the block group being read that the AVX2 kernel prefetches.
    const PREFETCH_AHEAD: usize = 4096;

    /// The 32 weight bytes of the block at `b` as [`block_dot`] takes them: `Q8_0`'s
    /// signed bytes as stored, `Q4_0` / `Q4_1` nibbles unpacked (low then high).
    #[inline(always)]
    unsafe fn block_weights<const T: u32>(b: *const u8) -> __m256i {
        // SAFETY: the caller's contract (a whole block at `b`, AVX2 enabled).
        unsafe {
            if T == 8 {
                _mm256_loadu_si256(b.add(2) as *const __m256i)
            } else {
                block_u8::<T>(b)
            }
        }
    }

    /// One block's integer dot product with activation row `r` as 8 int32 lanes:
    /// `vpmaddubsw` of the unsigned weight bytes (`Q4_0` / `Q4_1` nibbles, `Q8_0` as
    /// |w| against sign(w) x) and the int8 activations, widened by `vpmaddwd`; `Q4_0`'s
    /// `-8 sum(x)` added to lane 0. Exact.
    #[inline(always)]
    unsafe fn block_dot<const T: u32, const R: usize>(
        wv: __m256i,
        x: &Rows<'_, R>,
        r: usize,
        ib: usize,
    ) -> __m256i {
        unsafe {
            let xv = _mm256_loadu_si256(x.q[r].as_ptr().add(ib * QK) as *const __m256i);
            let (wabs, xs) = if T == 8 {
                (_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv))
            } else {
                (wv, xv)
            };
            let pairs = _mm256_maddubs_epi16(wabs, xs);
            let dot = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
            if T == 2 {
                let c0 = -8 * *x.sum[r].get_unchecked(ib);
                _mm256_add_epi32(dot, _mm256_setr_epi32(c0, 0, 0, 0, 0, 0, 0, 0))
            } else {
                dot
            }
        }
    }

    /// [`super::dot_row_portable`] for a tile of C weight rows x R activation rows on
    /// AVX2 machines without VNNI. Each block's integer dot product is exact
    /// ([`block_dot`]: `vpmaddubsw` + `vpmaddwd`; `Q8_0`'s signed weights go in as |w|
    /// against sign(w) * x, so no 16-bit pair sum saturates: |w x| <= 128 * 127, two
    /// per lane, 32512 < 32767) and is scaled into 8 f32 lanes. The scales of eight
    /// blocks at a time come from one gather (`d`, and `Q4_1`'s `m`, widened together)
    /// and one product with the activations' scales; each block then takes its lane
    /// by a permute, so no scalar work sits on the loop's path (a scalar f16
    /// conversion, product and broadcast per block held the kernel at about 9 cycles
    /// per block). The blocks past the last group of eight take the scalar scale.
    /// Results differ from the portable loop by rounding only, and every output goes
    /// through the same operations whatever the tile (batch-invariant).
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C (checked by the caller); every `w[c]` holds
    /// the same whole number of blocks of type `T`, and every row of `x` at least as
    /// many activation blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // indices also pick blocks and lanes
    pub unsafe fn dot_tile<const T: u32, const C: usize, const R: usize>(
        w: [&[u8]; C],
        x: &Rows<'_, R>,
    ) -> [[f32; R]; C] {
        let (bb, nb) = tile_blocks::<T, C, R>(w, x);
        let groups = nb / 8;
        // SAFETY (reads): block ib < nb lies inside every `w[c]` (each gather reads 4
        // bytes at the start of one of its blocks, >= 18 bytes long), and activation
        // block ib inside every row's q, d, s, sum (nb blocks each); the features are
        // enabled.
        unsafe {
            let bbi = bb as i32;
            let offsets =
                _mm256_setr_epi32(0, bbi, 2 * bbi, 3 * bbi, 4 * bbi, 5 * bbi, 6 * bbi, 7 * bbi);
            let mut acc = [[_mm256_setzero_ps(); R]; C];
            let mut extra = [[0f32; R]; C];
            for g in 0..groups {
                let ib0 = g * 8;
                let mut dx = [_mm256_setzero_ps(); R];
                let mut sx = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    dx[r] = _mm256_loadu_ps(x.d[r].as_ptr().add(ib0));
                    if T == 3 {
                        sx[r] = _mm256_loadu_ps(x.s[r].as_ptr().add(ib0));
                    }
                }
                for c in 0..C {
                    let base = w[c].as_ptr().add(ib0 * bb);
                    // A prefetch never faults: the address may pass the row's end.
                    let mut ahead = PREFETCH_AHEAD;
                    while ahead < PREFETCH_AHEAD + 8 * bb {
                        _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(ahead) as *const i8);
                        ahead += 64;
                    }
                    let dm = _mm256_i32gather_epi32::<1>(base as *const i32, offsets);
                    let dw = block_halves::<false>(dm);
                    let mut scale = [_mm256_setzero_ps(); R];
                    for r in 0..R {
                        scale[r] = _mm256_mul_ps(dw, dx[r]);
                    }
                    if T == 3 {
                        // m * s per block, added in block order (the portable loop's
                        // and llama.cpp's order: near-tied greedy choices of a Q4_1
                        // model follow it).
                        let mw = block_halves::<true>(dm);
                        for r in 0..R {
                            let mut ms = [0f32; 8];
                            _mm256_storeu_ps(ms.as_mut_ptr(), _mm256_mul_ps(mw, sx[r]));
                            for v in ms {
                                extra[c][r] += v;
                            }
                        }
                    }
                    for j in 0..8 {
                        let b = base.add(j * bb);
                        let wv = block_weights::<T>(b);
                        let lane = _mm256_set1_epi32(j as i32);
                        for r in 0..R {
                            let dot = block_dot::<T, R>(wv, x, r, ib0 + j);
                            let sj = _mm256_permutevar8x32_ps(scale[r], lane);
                            acc[c][r] = _mm256_fmadd_ps(sj, _mm256_cvtepi32_ps(dot), acc[c][r]);
                        }
                    }
                }
            }
            for ib in groups * 8..nb {
                for c in 0..C {
                    let b = w[c].as_ptr().add(ib * bb);
                    let dw = half_to_f32(std::ptr::read_unaligned(b as *const u16));
                    let wv = block_weights::<T>(b);
                    for r in 0..R {
                        let dot = block_dot::<T, R>(wv, x, r, ib);
                        let scale = _mm256_set1_ps(dw * *x.d[r].get_unchecked(ib));
                        acc[c][r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), acc[c][r]);
                        if T == 3 {
                            let mw = half_to_f32(std::ptr::read_unaligned(b.add(2) as *const u16));
                            extra[c][r] += mw * *x.s[r].get_unchecked(ib);
                        }
                    }
                }
            }
            let mut out = [[0f32; R]; C];
            for c in 0..C {
                for r in 0..R {
                    out[c][r] = hsum(acc[c][r]) + extra[c][r];
                }
            }
            out
        }
    }
}

/// Which kernel the products run (detected once per call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if has_vnni() {
                return Kernel::Vnni;
            }
            if super::simd::has_avx2_fma() {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }
}

/// Whether the VNNI kernel runs here (unless the portable path is forced).
pub fn has_vnni() -> bool {
    if !super::simd::has_avx512() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("f16c")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Output columns per parallel task.
const COLS_PER_TASK: usize = 128;

/// Outputs of weight rows `c0..c0 + C` against activation rows `r0..r0 + R`:
/// `out[c][r]`.
#[inline(always)]
fn dot_tile<const C: usize, const R: usize>(
    w: &QMatrix,
    c0: usize,
    a: &QActs,
    r0: usize,
    kernel: Kernel,
) -> [[f32; R]; C] {
    let k = w.cols;
    let nbk = k / QK;
    let wr: [&[u8]; C] = std::array::from_fn(|c| w.row(c0 + c));
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable {
        let rows = vnni::Rows::<R> {
            q: std::array::from_fn(|i| &a.q[(r0 + i) * k..(r0 + i + 1) * k]),
            d: std::array::from_fn(|i| &a.d[(r0 + i) * nbk..(r0 + i + 1) * nbk]),
            s: std::array::from_fn(|i| &a.s[(r0 + i) * nbk..(r0 + i + 1) * nbk]),
            sum: std::array::from_fn(|i| &a.sum[(r0 + i) * nbk..(r0 + i + 1) * nbk]),
        };
        // SAFETY: `Kernel::detect` checked every feature the chosen kernel enables;
        // every wr[c] is one whole row of blocks and every activation row holds as
        // many blocks.
        return unsafe {
            match (kernel, w.ty) {
                (Kernel::Vnni, GgmlType::Q4_0) => vnni::dot_tile::<2, C, R>(wr, &rows),
                (Kernel::Vnni, GgmlType::Q4_1) => vnni::dot_tile::<3, C, R>(wr, &rows),
                (Kernel::Vnni, _) => vnni::dot_tile::<8, C, R>(wr, &rows),
                (_, GgmlType::Q4_0) => avx2::dot_tile::<2, C, R>(wr, &rows),
                (_, GgmlType::Q4_1) => avx2::dot_tile::<3, C, R>(wr, &rows),
                (_, _) => avx2::dot_tile::<8, C, R>(wr, &rows),
            }
        };
    }
    let _ = kernel;
    std::array::from_fn(|c| {
        std::array::from_fn(|i| {
            let r = r0 + i;
            dot_row_portable(
                w.ty,
                wr[c],
                &a.q[r * k..(r + 1) * k],
                &a.d[r * nbk..(r + 1) * nbk],
                &a.s[r * nbk..(r + 1) * nbk],
                &a.sum[r * nbk..(r + 1) * nbk],
            )
        })
    })
}

/// Columns `c0..c0 + C` of every row into `out` ((M, nc) row-major, column `c - base`):
/// rows four at a time, the rest one at a time.
#[inline(always)]
fn columns<const C: usize>(
    w: &QMatrix,
    c0: usize,
    base: usize,
    a: &QActs,
    m: usize,
    kernel: Kernel,
    out: &mut [f32],
) {
    let nc = out.len() / m;
    let mut r = 0;
    while r + 4 <= m {
        let y = dot_tile::<C, 4>(w, c0, a, r, kernel);
        for (c, col) in y.iter().enumerate() {
            for (i, &v) in col.iter().enumerate() {
                out[(r + i) * nc + (c0 + c - base)] = v;
            }
        }
        r += 4;
    }
    while r < m {
        let y = dot_tile::<C, 1>(w, c0, a, r, kernel);
        for (c, col) in y.iter().enumerate() {
            out[r * nc + (c0 + c - base)] = col[0];
        }
        r += 1;
    }
}

/// y (M, rows) = x (M, cols) W^T.
pub fn qxwt(x: &[f32], m: usize, w: &QMatrix) -> Vec<f32> {
    qxwt_many(x, m, &[w]).pop().unwrap_or_default()
}

/// `x W_i^T` for several matrices of the same input width (e.g. Q, K and V, or gate
/// and up), with x quantized once and one parallel pass over all their columns: a
/// decode step's small products cost one thread hand-off instead of one each.
pub fn qxwt_many(x: &[f32], m: usize, ws: &[&QMatrix]) -> Vec<Vec<f32>> {
    let Some(first) = ws.first() else {
        return Vec::new();
    };
    let k = first.cols;
    assert!(
        ws.iter().all(|w| w.cols == k),
        "qxwt_many: input widths differ"
    );
    assert_eq!(x.len(), m * k, "qxwt: x is not (M, K)");
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.rows]).collect();
    if m == 0 {
        return ys;
    }
    let a = quantize_acts(x);
    let kernel = Kernel::detect();
    let tasks: Vec<(usize, usize)> = ws
        .iter()
        .enumerate()
        .flat_map(|(i, w)| (0..w.rows).step_by(COLS_PER_TASK).map(move |c0| (i, c0)))
        .collect();
    let parts: Vec<(usize, usize, Vec<f32>)> = pool::map(tasks.len(), |t| {
        let (i, c0) = tasks[t];
        let w = ws[i];
        let c1 = (c0 + COLS_PER_TASK).min(w.rows);
        let nc = c1 - c0;
        let mut out = vec![0f32; m * nc];
        let mut c = c0;
        while c + 2 <= c1 {
            columns::<2>(w, c, c0, &a, m, kernel, &mut out);
            c += 2;
        }
        while c < c1 {
            columns::<1>(w, c, c0, &a, m, kernel, &mut out);
            c += 1;
        }
        (i, c0, out)
    });
    for (i, c0, out) in parts {
        let n = ws[i].rows;
        let nc = out.len() / m;
        for r in 0..m {
            ys[i][r * n + c0..r * n + c0 + nc].copy_from_slice(&out[r * nc..(r + 1) * nc]);
        }
    }
    ys
}

/// Reference: the same quantized arithmetic in plain f64 loops over dequantized
/// integers (what [`qxwt`] must equal up to f32 rounding).
pub fn reference(x: &[f32], m: usize, w: &QMatrix) -> Vec<f32> {
    let k = w.cols;
    let a = quantize_acts(x);
    let nbk = k / QK;
    let bb = w.ty.block_bytes();
    let mut y = vec![0f32; m * w.rows];
    for r in 0..m {
        for c in 0..w.rows {
            let row = w.row(c);
            let mut total = 0f64;
            for ib in 0..nbk {
                let b = &row[ib * bb..(ib + 1) * bb];
                let xq = &a.q[r * k + ib * QK..r * k + (ib + 1) * QK];
                let dw = half_at(b, 0) as f64;
                let dx = a.d[r * nbk + ib] as f64;
                let wq: Vec<i32> = match w.ty {
                    GgmlType::Q4_0 => (0..QK)
                        .map(|j| {
                            let byte = b[2 + j % 16];
                            (if j < 16 { byte & 15 } else { byte >> 4 }) as i32 - 8
                        })
                        .collect(),
                    GgmlType::Q4_1 => (0..QK)
                        .map(|j| {
                            let byte = b[4 + j % 16];
                            (if j < 16 { byte & 15 } else { byte >> 4 }) as i32
                        })
                        .collect(),
                    _ => (0..QK).map(|j| (b[2 + j] as i8) as i32).collect(),
                };
                let sumi: i64 = wq.iter().zip(xq).map(|(&a, &b)| a as i64 * b as i64).sum();
                total += dw * dx * sumi as f64;
                if w.ty == GgmlType::Q4_1 {
                    total += half_at(b, 2) as f64 * a.s[r * nbk + ib] as f64;
                }
            }
            y[r * w.rows + c] = total as f32;
        }
    }
    y
}
