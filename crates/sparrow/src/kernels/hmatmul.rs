//! Half-precision weights for inference: `y = x W^T` with W (out, in) kept as f16 or
//! bf16 (half the bytes of f32, so a memory-bound decode step reads half as much) and
//! x, y f32. The weights are widened to f32 in registers, never in memory: candle's CPU
//! matmul converts a whole bf16/f16 matrix to f32 on every call.
//!
//! Kernel: output rows in tiles of four, input rows in groups of four (two on AVX2);
//! each 16-wide chunk of a weight row is loaded and widened once and multiplied into
//! every input row of the group (AVX-512F: `vcvtph2ps` for f16, a 16-bit shift for
//! bf16; one fused multiply-add per lane; on AVX2 + F16C machines the same 16 lanes as
//! two 8-lane halves, [`super::lanes_avx2`]: the same sums bit for bit), so a decode
//! step streams each weight byte once and a prefill chunk reuses it from L1. Each
//! output is its own sum over 16 lanes in a fixed order, then a fixed tree over the
//! lanes, then the tail: a row's result does not depend on the other rows of the batch.
//! [`xwt_portable`] is the same order without intrinsics (separate multiply and add,
//! as a target without FMA has them); [`reference`] is f64.

use super::pool;
use super::simd::{has_avx2_fma, has_avx512};

/// Which 16-bit float a [`HalfMatrix`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfKind {
    /// IEEE 754 binary16.
    F16,
    /// bfloat16 (the top half of an f32).
    Bf16,
}

impl HalfKind {
    #[inline(always)]
    pub fn to_f32(self, bits: u16) -> f32 {
        match self {
            HalfKind::F16 => half::f16::from_bits(bits).to_f32(),
            HalfKind::Bf16 => f32::from_bits((bits as u32) << 16),
        }
    }

    /// Round to nearest even.
    #[inline(always)]
    pub fn from_f32(self, x: f32) -> u16 {
        match self {
            HalfKind::F16 => half::f16::from_f32(x).to_bits(),
            HalfKind::Bf16 => half::bf16::from_f32(x).to_bits(),
        }
    }
}

/// A weight matrix (rows = out, cols = in) of 16-bit floats, row-major.
#[derive(Debug, Clone)]
pub struct HalfMatrix {
    pub kind: HalfKind,
    pub rows: usize,
    pub cols: usize,
    data: Vec<u16>,
}

impl HalfMatrix {
    /// From raw 16-bit values, (rows, cols) row-major.
    pub fn new(kind: HalfKind, rows: usize, cols: usize, data: Vec<u16>) -> Result<Self, String> {
        if data.len() != rows * cols {
            return Err(format!(
                "{} half values for a {rows}x{cols} matrix",
                data.len()
            ));
        }
        Ok(Self {
            kind,
            rows,
            cols,
            data,
        })
    }

    /// f32 values rounded to `kind`.
    pub fn from_f32(kind: HalfKind, rows: usize, cols: usize, values: &[f32]) -> Self {
        assert_eq!(values.len(), rows * cols, "values are not rows x cols");
        Self {
            kind,
            rows,
            cols,
            data: values.iter().map(|&x| kind.from_f32(x)).collect(),
        }
    }

    /// Bytes of the weights.
    pub fn n_bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// The raw values of row `r`.
    pub fn row(&self, r: usize) -> &[u16] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Row `r` widened to f32 into `out` (an embedding lookup).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        for (o, &b) in out.iter_mut().zip(self.row(r)) {
            *o = self.kind.to_f32(b);
        }
    }

    /// Every value as f32, (rows, cols).
    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&b| self.kind.to_f32(b)).collect()
    }
}

/// Fewest weight rows per parallel task (a task should outlast its scheduling).
const MIN_ROWS_PER_TASK: usize = 64;

/// Sum of 16 lanes by a fixed tree (8 + 8, 4 + 4, 2 + 2, 1 + 1).
#[inline(always)]
fn tree16(mut l: [f32; 16]) -> f32 {
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            l[i] += l[i + w];
        }
    }
    l[0]
}

/// The end of one SIMD tile output: the 16 lane sums by the fixed tree, then the tail
/// `full..k` with fused multiply-adds (the same for every vector width).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn finish_fused(
    lanes: [f32; 16],
    kind: HalfKind,
    w: &[u16],
    x: &[f32],
    full: usize,
    k: usize,
) -> f32 {
    let mut s = tree16(lanes);
    for i in full..k {
        s = kind.to_f32(w[i]).mul_add(x[i], s);
    }
    s
}

/// The portable tile: `out[c][r] = w_c . x_r` for C weight rows and R inputs.
#[inline(always)]
fn tile_portable<const C: usize, const R: usize>(
    kind: HalfKind,
    w: [&[u16]; C],
    x: [&[f32]; R],
    k: usize,
) -> [[f32; R]; C] {
    let mut acc = [[[0f32; 16]; R]; C];
    let full = k / 16 * 16;
    let mut wv = [0f32; 16];
    for i0 in (0..full).step_by(16) {
        for c in 0..C {
            for (l, v) in wv.iter_mut().enumerate() {
                *v = kind.to_f32(w[c][i0 + l]);
            }
            for r in 0..R {
                for l in 0..16 {
                    acc[c][r][l] += wv[l] * x[r][i0 + l];
                }
            }
        }
    }
    let mut out = [[0f32; R]; C];
    for c in 0..C {
        for r in 0..R {
            let mut s = tree16(acc[c][r]);
            for i in full..k {
                s += kind.to_f32(w[c][i]) * x[r][i];
            }
            out[c][r] = s;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::HalfKind;
    use std::arch::x86_64::*;

    /// Weights ahead of the loads that each pass prefetches (512 bytes per weight
    /// row). A widened f16 chunk costs a load, a conversion and the multiply-adds for
    /// 32 bytes, twice the instructions per byte of an f32 row, so the out-of-order
    /// window alone keeps half as many bytes in flight: one row's product 1536x576 ran
    /// at ~55% of the read bandwidth. Prefetching: ~145 -> ~118 us, median of five
    /// (`bench weights --formats f16 --batch 1`; 128 and 384 elements ahead no better,
    /// L2 hints and 1024 worse).
    const PREFETCH: usize = 256;

    /// [`super::tree16`] of a register's lanes with vector adds of the same pairs in
    /// the same order (8 + 8, 4 + 4, 2 + 2, 1 + 1): the same sum bit for bit.
    #[inline(always)]
    unsafe fn tree16(a: __m512) -> f32 {
        unsafe {
            let lo = _mm512_castps512_ps256(a);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
            let s8 = _mm256_add_ps(lo, hi); // l[i] + l[i + 8]
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4)); // [0] + [2], [1] + [3]
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2)); // [0] + [1]
            _mm_cvtss_f32(s1)
        }
    }

    /// 16 weights at `p` widened to f32.
    ///
    /// # Safety
    /// AVX-512F enabled; `p` points at 16 readable u16.
    #[inline(always)]
    unsafe fn widen(kind: HalfKind, p: *const u16) -> __m512 {
        unsafe {
            let raw = _mm256_loadu_si256(p as *const __m256i);
            match kind {
                HalfKind::F16 => _mm512_cvtph_ps(raw),
                HalfKind::Bf16 => {
                    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
                }
            }
        }
    }

    /// The AVX-512 tile: the sums of `tile_portable` in the same order (lane-wise in k
    /// order, the same lane tree, the same tail), with fused multiply-adds.
    ///
    /// # Safety
    /// AVX-512F must be available; every `w[c]` and `x[r]` holds at least `k` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile<const C: usize, const R: usize>(
        kind: HalfKind,
        w: [&[u16]; C],
        x: [&[f32]; R],
        k: usize,
    ) -> [[f32; R]; C] {
        let full = k / 16 * 16;
        // SAFETY: every load below reads 16 values at offset i0 < full <= k of a slice
        // holding at least k values (the caller's contract); AVX-512F is enabled.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); R]; C];
            let mut i0 = 0;
            while i0 < full {
                for row in w {
                    // A prefetch never faults; past the row it reaches the next row
                    // (or nothing useful), hence the wrapping address arithmetic.
                    let ahead = row.as_ptr().wrapping_add(i0 + PREFETCH);
                    _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                }
                let mut xv = [_mm512_setzero_ps(); R];
                for r in 0..R {
                    xv[r] = _mm512_loadu_ps(x[r].as_ptr().add(i0));
                }
                for c in 0..C {
                    let wv = widen(kind, w[c].as_ptr().add(i0));
                    for r in 0..R {
                        acc[c][r] = _mm512_fmadd_ps(wv, xv[r], acc[c][r]);
                    }
                }
                i0 += 16;
            }
            let mut out = [[0f32; R]; C];
            for c in 0..C {
                for r in 0..R {
                    let mut s = tree16(acc[c][r]);
                    for i in full..k {
                        s = kind.to_f32(w[c][i]).mul_add(x[r][i], s);
                    }
                    out[c][r] = s;
                }
            }
            out
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::lanes_avx2::{lanes, Bf16Row, F16Row};
    use super::{finish_fused, HalfKind};

    /// The AVX2 tile: the AVX-512 tile's 16 lanes as two 8-lane halves
    /// ([`lanes`]), so its sums are the same bit for bit (lane-wise fused
    /// multiply-adds in k order, the same lane tree, the same tail): results do not
    /// depend on the CPU's vector width.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; every `w[c]` and `x[r]` holds at least `k`
    /// values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile<const C: usize, const R: usize>(
        kind: HalfKind,
        w: [&[u16]; C],
        x: [&[f32]; R],
        k: usize,
    ) -> [[f32; R]; C] {
        let full = k / 16 * 16;
        let (wp, xp) = (w.map(<[u16]>::as_ptr), x.map(<[f32]>::as_ptr));
        // SAFETY: every row holds at least k >= full values (the caller's contract);
        // the features are enabled.
        let acc = unsafe {
            match kind {
                HalfKind::F16 => lanes::<F16Row, true, true, C, R>(wp, xp, full),
                HalfKind::Bf16 => lanes::<Bf16Row, true, true, C, R>(wp, xp, full),
            }
        };
        let mut out = [[0f32; R]; C];
        for c in 0..C {
            for r in 0..R {
                out[c][r] = finish_fused(acc[c][r], kind, w[c], x[r], full, k);
            }
        }
        out
    }
}

/// Which tile kernel a product runs (detected once per call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Path {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx512() {
                return Path::Avx512;
            }
            if has_avx2_fma() {
                return Path::Avx2;
            }
        }
        Path::Portable
    }
}

/// One tile through the widest kernel `path` allows.
#[inline(always)]
fn tile<const C: usize, const R: usize>(
    path: Path,
    kind: HalfKind,
    w: [&[u16]; C],
    x: [&[f32]; R],
    k: usize,
) -> [[f32; R]; C] {
    match path {
        // SAFETY: `Path::Avx512` / `Path::Avx2` come from `Path::detect`, the run-time
        // checks of their features; every row slice holds k values (checked by the
        // callers' shape asserts).
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => unsafe { avx512::tile::<C, R>(kind, w, x, k) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { avx2::tile::<C, R>(kind, w, x, k) },
        Path::Portable => tile_portable::<C, R>(kind, w, x, k),
    }
}

/// Weight rows `r0..r0 + C` against every input row (R at a time), into out (m, C).
fn rows_tile<const C: usize, const R: usize>(
    path: Path,
    w: &HalfMatrix,
    r0: usize,
    x: &[f32],
    m: usize,
    out: &mut [[f32; C]],
) {
    let k = w.cols;
    let wr: [&[u16]; C] = std::array::from_fn(|c| w.row(r0 + c));
    let xr = |i: usize| &x[i * k..(i + 1) * k];
    let mut i = 0;
    while i + R <= m {
        let t = tile::<C, R>(path, w.kind, wr, std::array::from_fn(|j| xr(i + j)), k);
        for j in 0..R {
            out[i + j] = std::array::from_fn(|c| t[c][j]);
        }
        i += R;
    }
    while i < m {
        let t = tile::<C, 1>(path, w.kind, wr, [xr(i)], k);
        out[i] = std::array::from_fn(|c| t[c][0]);
        i += 1;
    }
}

/// [`xwt_many`] through `path`'s tiles: 4 weight rows x 4 inputs with AVX-512 (16
/// accumulators of its 32 registers) and portably, 4 x 2 with AVX2 (8 of its 16, one
/// half of the lanes at a time; 4 x 4 spilled and ran a batch of 16 at 37 GFLOP/s).
fn xwt_with(path: Path, x: &[f32], m: usize, ws: &[&HalfMatrix]) -> Vec<Vec<f32>> {
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => xwt_tiled::<4, 2>(path, x, m, ws),
        _ => xwt_tiled::<4, 4>(path, x, m, ws),
    }
}

/// [`xwt_with`] with tiles of C weight rows x R inputs.
fn xwt_tiled<const C: usize, const R: usize>(
    path: Path,
    x: &[f32],
    m: usize,
    ws: &[&HalfMatrix],
) -> Vec<Vec<f32>> {
    let Some(k) = ws.first().map(|w| w.cols) else {
        return Vec::new();
    };
    assert!(
        ws.iter().all(|w| w.cols == k),
        "half xwt: input widths differ"
    );
    assert_eq!(x.len(), m * k, "x is not (m, {k})");
    // Tasks own blocks of weight rows of one matrix (about four per thread over all
    // the matrices: one parallel call for Q, K and V); each writes its columns of its
    // y afterwards.
    let total: usize = ws.iter().map(|w| w.rows).sum();
    let per_task = (total / (4 * pool::threads()).max(1))
        .max(MIN_ROWS_PER_TASK)
        .div_ceil(C)
        * C;
    let tasks: Vec<(usize, usize)> = ws
        .iter()
        .enumerate()
        .flat_map(|(i, w)| (0..w.rows).step_by(per_task).map(move |b0| (i, b0)))
        .collect();
    let blocks: Vec<Vec<f32>> = pool::map(tasks.len(), |t| {
        let (wi, b0) = tasks[t];
        let w = ws[wi];
        let nb = per_task.min(w.rows - b0);
        let mut part = vec![0f32; m * nb]; // (m, nb)
        let mut t = vec![[0f32; C]; m];
        let mut r = 0;
        while r + C <= nb {
            rows_tile::<C, R>(path, w, b0 + r, x, m, &mut t);
            for (i, row) in t.iter().enumerate() {
                part[i * nb + r..i * nb + r + C].copy_from_slice(row);
            }
            r += C;
        }
        while r < nb {
            let mut t = vec![[0f32; 1]; m];
            rows_tile::<1, R>(path, w, b0 + r, x, m, &mut t);
            for (i, row) in t.iter().enumerate() {
                part[i * nb + r] = row[0];
            }
            r += 1;
        }
        part
    });
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.rows]).collect();
    for (&(wi, b0), part) in tasks.iter().zip(blocks) {
        let n = ws[wi].rows;
        let nb = part.len() / m.max(1);
        for i in 0..m {
            ys[wi][i * n + b0..i * n + b0 + nb].copy_from_slice(&part[i * nb..(i + 1) * nb]);
        }
    }
    ys
}

/// y (m, rows) = x (m, cols) W^T, widening W in registers (AVX-512, else AVX2 with
/// FMA and F16C, when present: the same sums either way).
pub fn xwt(x: &[f32], m: usize, w: &HalfMatrix) -> Vec<f32> {
    xwt_many(x, m, &[w]).pop().unwrap_or_default()
}

/// [`xwt`] of several matrices of the same input width on the same x, in one parallel
/// call (Q, K and V; gate and up): one y per matrix, each the same bits as alone.
pub fn xwt_many(x: &[f32], m: usize, ws: &[&HalfMatrix]) -> Vec<Vec<f32>> {
    xwt_with(Path::detect(), x, m, ws)
}

/// [`xwt`] without intrinsics (the same sums).
pub fn xwt_portable(x: &[f32], m: usize, w: &HalfMatrix) -> Vec<f32> {
    xwt_with(Path::Portable, x, m, &[w])
        .pop()
        .unwrap_or_default()
}

/// Plain f64 reference: y = x W^T with W widened exactly.
pub fn reference(x: &[f32], m: usize, w: &HalfMatrix) -> Vec<f64> {
    let (n, k) = (w.rows, w.cols);
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        for r in 0..n {
            y[i * n + r] = w
                .row(r)
                .iter()
                .zip(&x[i * k..(i + 1) * k])
                .map(|(&b, &v)| w.kind.to_f32(b) as f64 * v as f64)
                .sum();
        }
    }
    y
}
