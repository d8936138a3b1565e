//! Half-precision weights for inference: `y = x W^T` with W (out, in) kept as f16 or
//! bf16 (half the bytes of f32, so a memory-bound decode step reads half as much) and
//! x, y f32. The weights are widened to f32 in registers, never in memory: candle's CPU
//! matmul converts a whole bf16/f16 matrix to f32 on every call.
//!
//! Layout and kernel: W is packed k-major in panels of 16 output rows ([`HalfMatrix`]),
//! so sixteen outputs sit in the lanes of one AVX-512 register. A tile walks V panels
//! (3 on AVX-512) front to back against R input rows (up to 8): per column k it widens
//! V x 16 weights once (`vcvtph2ps` for f16, a 16-bit shift for bf16) and multiplies
//! them into the R x V accumulators with x's value broadcast; no sums across lanes. A
//! decode step streams each weight byte once; a batch of 16 reuses each widened vector
//! 8 times and each panel from L1 / L2 for its second eight rows. Every output is one
//! chain of fused multiply-adds over k in order, whatever the tile, the batch or the
//! vector width (AVX2 + F16C: each panel as two 8-lane halves): a row's result does not
//! depend on the other rows of the batch, and [`xwt_portable`] (`f32::mul_add`) gives
//! the same bits. [`reference`] is f64.

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

/// Output features per panel: one AVX-512 register of f32 (two AVX2 ones).
pub const PANEL: usize = 16;

/// A weight matrix (rows = out, cols = in) of 16-bit floats, packed k-major in panels
/// of [`PANEL`] output rows: panel p holds rows 16p..16p + 16, column by column
/// (`data[(p * cols + k) * 16 + j] = W[16p + j][k]`), the last panel padded with zero
/// rows. A product walks each panel once, front to back, with the panel's sixteen
/// outputs in the lanes of one register.
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
        if Some(data.len()) != rows.checked_mul(cols) {
            return Err(format!(
                "{} half values for a {rows}x{cols} matrix",
                data.len()
            ));
        }
        Ok(Self::pack(kind, rows, cols, |r, c| data[r * cols + c]))
    }

    /// f32 values (rows, cols) row-major, rounded to `kind`.
    pub fn from_f32(kind: HalfKind, rows: usize, cols: usize, values: &[f32]) -> Self {
        assert_eq!(values.len(), rows * cols, "values are not rows x cols");
        Self::pack(kind, rows, cols, |r, c| kind.from_f32(values[r * cols + c]))
    }

    /// The panel layout of the matrix whose (r, c) value is `at(r, c)`.
    fn pack(kind: HalfKind, rows: usize, cols: usize, at: impl Fn(usize, usize) -> u16) -> Self {
        let panels = rows.div_ceil(PANEL);
        let mut data = vec![0u16; panels * cols * PANEL];
        for r in 0..rows {
            let (p, j) = (r / PANEL, r % PANEL);
            for c in 0..cols {
                data[(p * cols + c) * PANEL + j] = at(r, c);
            }
        }
        Self {
            kind,
            rows,
            cols,
            data,
        }
    }

    /// Number of panels (row count rounded up to [`PANEL`]).
    pub fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }

    /// Bytes the packed weights occupy (the last panel's padding included).
    pub fn n_bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// The raw value of (r, c).
    pub fn get(&self, r: usize, c: usize) -> u16 {
        self.data[((r / PANEL) * self.cols + c) * PANEL + r % PANEL]
    }

    /// Row `r` widened to f32 into `out` (an embedding lookup).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        for (c, o) in out.iter_mut().enumerate().take(self.cols) {
            *o = self.kind.to_f32(self.get(r, c));
        }
    }

    /// Every value as f32, (rows, cols) row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.row_f32(r, row);
        }
        out
    }

    /// The values of panels `p0..p0 + count`.
    fn panel_slice(&self, p0: usize, count: usize) -> &[u16] {
        &self.data[p0 * self.cols * PANEL..(p0 + count) * self.cols * PANEL]
    }
}

/// Fewest panels per parallel task (a task should outlast its scheduling).
const MIN_PANELS_PER_TASK: usize = 4;

/// The portable tile: V panels (`w`, V x k x 16 values) against R inputs; `out[r][v]`
/// holds the sixteen outputs of panel v for input r, each `fma(w_k, x_k, s)` over k in
/// order from 0, the order every build keeps.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // r and v also pick x's row and the weight offset
fn tile_portable<const R: usize, const V: usize>(
    kind: HalfKind,
    w: &[u16],
    x: [&[f32]; R],
    k: usize,
) -> [[[f32; PANEL]; V]; R] {
    let mut acc = [[[0f32; PANEL]; V]; R];
    let mut wv = [[0f32; PANEL]; V];
    for kk in 0..k {
        for (v, lanes) in wv.iter_mut().enumerate() {
            let at = (v * k + kk) * PANEL;
            for (l, o) in lanes.iter_mut().enumerate() {
                *o = kind.to_f32(w[at + l]);
            }
        }
        for r in 0..R {
            let xb = x[r][kk];
            for v in 0..V {
                for l in 0..PANEL {
                    acc[r][v][l] = wv[v][l].mul_add(xb, acc[r][v][l]);
                }
            }
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{HalfKind, PANEL};
    use std::arch::x86_64::*;

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

    /// The AVX-512 tile: `tile_portable`'s sums (one fused multiply-add per output
    /// and k, in k order) with each panel's sixteen outputs in one register.
    ///
    /// # Safety
    /// AVX-512F must be available; `w` holds V x k x 16 values, every `x[r]` k.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile<const R: usize, const V: usize>(
        kind: HalfKind,
        w: &[u16],
        x: [&[f32]; R],
        k: usize,
    ) -> [[[f32; PANEL]; V]; R] {
        debug_assert!(w.len() >= V * k * PANEL && x.iter().all(|r| r.len() >= k));
        // SAFETY: the loads read 16 values at (v * k + kk) * 16 < V * k * 16 <= w.len()
        // and x[r][kk] with kk < k (the caller's contract); AVX-512F is enabled.
        unsafe {
            let wp = w.as_ptr();
            let xp = x.map(<[f32]>::as_ptr);
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            for kk in 0..k {
                let mut wv = [_mm512_setzero_ps(); V];
                for (v, lanes) in wv.iter_mut().enumerate() {
                    *lanes = widen(kind, wp.add((v * k + kk) * PANEL));
                }
                for r in 0..R {
                    let xb = _mm512_set1_ps(*xp[r].add(kk));
                    for v in 0..V {
                        acc[r][v] = _mm512_fmadd_ps(wv[v], xb, acc[r][v]);
                    }
                }
            }
            let mut out = [[[0f32; PANEL]; V]; R];
            for r in 0..R {
                for v in 0..V {
                    _mm512_storeu_ps(out[r][v].as_mut_ptr(), acc[r][v]);
                }
            }
            out
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::lanes_avx2::{Bf16Row, F16Row, Widen8};
    use super::{HalfKind, PANEL};
    use std::arch::x86_64::*;

    /// The AVX2 tile: the AVX-512 tile with each panel's sixteen outputs in two
    /// 8-lane registers (each output's sum is its own chain of fused multiply-adds,
    /// so the bits do not depend on the vector width).
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `w` holds V x k x 16 values, every `x[r]`
    /// k.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // the indices also pick x's row and the halves
    pub unsafe fn tile<const R: usize, const V: usize>(
        kind: HalfKind,
        w: &[u16],
        x: [&[f32]; R],
        k: usize,
    ) -> [[[f32; PANEL]; V]; R] {
        debug_assert!(w.len() >= V * k * PANEL && x.iter().all(|r| r.len() >= k));
        // SAFETY: as the AVX-512 tile's (each panel row is two loads of eight).
        unsafe {
            let wp = w.as_ptr();
            let xp = x.map(<[f32]>::as_ptr);
            let mut acc = [[[_mm256_setzero_ps(); 2]; V]; R];
            for kk in 0..k {
                let mut wv = [[_mm256_setzero_ps(); 2]; V];
                for (v, halves) in wv.iter_mut().enumerate() {
                    let p = wp.add((v * k + kk) * PANEL);
                    *halves = match kind {
                        HalfKind::F16 => [F16Row::widen8(p), F16Row::widen8(p.add(8))],
                        HalfKind::Bf16 => [Bf16Row::widen8(p), Bf16Row::widen8(p.add(8))],
                    };
                }
                for r in 0..R {
                    let xb = _mm256_set1_ps(*xp[r].add(kk));
                    for v in 0..V {
                        for h in 0..2 {
                            acc[r][v][h] = _mm256_fmadd_ps(wv[v][h], xb, acc[r][v][h]);
                        }
                    }
                }
            }
            let mut out = [[[0f32; PANEL]; V]; R];
            for r in 0..R {
                for v in 0..V {
                    for h in 0..2 {
                        _mm256_storeu_ps(out[r][v].as_mut_ptr().add(8 * h), acc[r][v][h]);
                    }
                }
            }
            out
        }
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

    /// Input rows and panels per tile: the accumulators R x V x (16 / lanes) fill most
    /// of the registers (AVX-512: 24 of 32; AVX2: 8 of 16) so each widened weight
    /// vector serves R multiply-adds.
    fn tile_shape(self) -> (usize, usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => (4, 1),
            _ => (8, 3),
        }
    }
}

/// One tile through the widest kernel `path` allows, written into `out` (rows of
/// `stride` outputs, starting at column `col`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_into<const R: usize, const V: usize>(
    path: Path,
    kind: HalfKind,
    w: &[u16],
    x: [&[f32]; R],
    k: usize,
    out: &mut [f32],
    stride: usize,
    col: usize,
) {
    let t = match path {
        // SAFETY: `Path::Avx512` / `Path::Avx2` come from `Path::detect`, the run-time
        // checks of their features; `w` holds V panels of k columns and every x row k
        // values (the callers' shape asserts).
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => unsafe { avx512::tile::<R, V>(kind, w, x, k) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { avx2::tile::<R, V>(kind, w, x, k) },
        Path::Portable => tile_portable::<R, V>(kind, w, x, k),
    };
    for (r, panels) in t.iter().enumerate() {
        for (v, lanes) in panels.iter().enumerate() {
            let at = r * stride + col + v * PANEL;
            out[at..at + PANEL].copy_from_slice(lanes);
        }
    }
}

/// Input rows `i0..i0 + rows` (rows <= 8) against V panels.
#[allow(clippy::too_many_arguments)]
fn rows_of<const V: usize>(
    path: Path,
    kind: HalfKind,
    w: &[u16],
    x: &[f32],
    k: usize,
    i0: usize,
    rows: usize,
    out: &mut [f32],
    stride: usize,
    col: usize,
) {
    let xr = |j: usize| &x[(i0 + j) * k..(i0 + j + 1) * k];
    let out = &mut out[i0 * stride..];
    macro_rules! go {
        ($r:literal) => {
            tile_into::<$r, V>(path, kind, w, std::array::from_fn(xr), k, out, stride, col)
        };
    }
    match rows {
        1 => go!(1),
        2 => go!(2),
        3 => go!(3),
        4 => go!(4),
        5 => go!(5),
        6 => go!(6),
        7 => go!(7),
        _ => go!(8),
    }
}

/// Panels `p0..p0 + count` of `w` against every input row, into `out` (m, count x 16).
fn panels_block(
    path: Path,
    w: &HalfMatrix,
    p0: usize,
    count: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    let k = w.cols;
    let (rows_per_tile, v_max) = path.tile_shape();
    let stride = count * PANEL;
    let mut p = 0;
    while p < count {
        let v = v_max.min(count - p);
        let wp = w.panel_slice(p0 + p, v);
        let mut i = 0;
        while i < m {
            let rows = rows_per_tile.min(m - i);
            match v {
                1 => rows_of::<1>(path, w.kind, wp, x, k, i, rows, out, stride, p * PANEL),
                2 => rows_of::<2>(path, w.kind, wp, x, k, i, rows, out, stride, p * PANEL),
                _ => rows_of::<3>(path, w.kind, wp, x, k, i, rows, out, stride, p * PANEL),
            }
            i += rows;
        }
        p += v;
    }
}

/// [`xwt_many`] through `path`'s tiles.
fn xwt_with(path: Path, x: &[f32], m: usize, ws: &[&HalfMatrix]) -> Vec<Vec<f32>> {
    let Some(k) = ws.first().map(|w| w.cols) else {
        return Vec::new();
    };
    assert!(
        ws.iter().all(|w| w.cols == k),
        "half xwt: input widths differ"
    );
    assert_eq!(x.len(), m * k, "x is not (m, {k})");
    // Tasks own runs of panels of one matrix (about four per thread over all the
    // matrices: one parallel call for Q, K and V); each writes its columns of its y
    // afterwards.
    let total: usize = ws.iter().map(|w| w.panels()).sum();
    let per_task = (total / (4 * pool::threads()).max(1)).max(MIN_PANELS_PER_TASK);
    let tasks: Vec<(usize, usize)> = ws
        .iter()
        .enumerate()
        .flat_map(|(i, w)| (0..w.panels()).step_by(per_task).map(move |p0| (i, p0)))
        .collect();
    let blocks: Vec<Vec<f32>> = pool::map(tasks.len(), |t| {
        let (wi, p0) = tasks[t];
        let w = ws[wi];
        let count = per_task.min(w.panels() - p0);
        let mut part = vec![0f32; m * count * PANEL]; // (m, count x 16)
        panels_block(path, w, p0, count, x, m, &mut part);
        part
    });
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.rows]).collect();
    for (&(wi, p0), part) in tasks.iter().zip(blocks) {
        let n = ws[wi].rows;
        let width = part.len() / m.max(1);
        let (c0, valid) = (p0 * PANEL, width.min(n - p0 * PANEL));
        for i in 0..m {
            ys[wi][i * n + c0..i * n + c0 + valid]
                .copy_from_slice(&part[i * width..i * width + valid]);
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
            y[i * n + r] = (0..k)
                .map(|c| w.kind.to_f32(w.get(r, c)) as f64 * x[i * k + c] as f64)
                .sum();
        }
    }
    y
}
