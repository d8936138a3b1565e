//! `y = x W^T` for inference, W (N, K) row-major as checkpoints store it: the
//! projections, experts and LM head of the engine's step, where x holds a handful of
//! decode rows (candle's GEMM packs the whole weight matrix on every call, which made
//! 4 rows cost 7x one row on the LM head) or a prefill chunk.
//!
//! Output columns are split into blocks that stay cache-resident (parallel over
//! blocks); within a block, rows go four at a time against four weight rows at a time
//! (16 dot products per pass over the chunk), each weight row loaded once for the four
//! (the portable [`block`], the AVX-512 tile of the `simd` module; AVX2 runs 4 x 2).
//! Every output element is one [`dot`]-ordered sum of its row and column (16 lane-wise
//! partial sums, then the lanes in order, then the tail), whatever M is, however rows
//! are grouped and whichever build runs: a sequence's logits are bit-identical alone or
//! in any batch, so its sampled text does not depend on what else runs.
//! [`reference`] is the plain f64 loop the tests compare with.

use super::dot;
use super::pool;
use super::simd::{has_avx2_fma, has_avx512};

const L: usize = 16;

/// Weight bytes per column block (kept in L2 while every row block passes over it).
const BLOCK_BYTES: usize = 96 * 1024;

/// Four dot products of `w` with `x0..x3`, each summed exactly as [`dot`] sums (the
/// fixed-width chunks let the compiler drop bounds checks and keep 4 x 16 lanes in
/// registers).
#[inline(always)]
fn dot4(x: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    let (mut a0, mut a1, mut a2, mut a3) = ([0.0f32; L], [0.0f32; L], [0.0f32; L], [0.0f32; L]);
    let wc = w.chunks_exact(L);
    let tail_start = w.len() - wc.remainder().len();
    let chunks = wc
        .zip(x[0].chunks_exact(L))
        .zip(x[1].chunks_exact(L))
        .zip(x[2].chunks_exact(L))
        .zip(x[3].chunks_exact(L));
    for ((((wv, x0), x1), x2), x3) in chunks {
        for l in 0..L {
            a0[l] += x0[l] * wv[l];
            a1[l] += x1[l] * wv[l];
            a2[l] += x2[l] * wv[l];
            a3[l] += x3[l] * wv[l];
        }
    }
    let mut out = [0.0f32; 4];
    for (r, acc) in [a0, a1, a2, a3].iter().enumerate() {
        let mut tail = 0.0f32;
        for (&xv, &wv) in x[r][tail_start..].iter().zip(&w[tail_start..]) {
            tail += xv * wv;
        }
        out[r] = acc.iter().fold(0.0f32, |s, &v| s + v) + tail;
    }
    out
}

/// Sixteen dot products: `x0..x3` with `w0..w3`, each summed exactly as [`dot`] sums.
/// Per 16-wide chunk the four x and four w loads feed 16 multiply-adds (against 4 in
/// [`dot4`]), which is what lets a batch of decode rows run at compute speed.
#[inline(always)]
fn dot4x4(x: [&[f32]; 4], w: [&[f32]; 4]) -> [[f32; 4]; 4] {
    let k = w[0].len();
    let full = k / L * L;
    let mut acc = [[[0.0f32; L]; 4]; 4]; // [col][row][lane]
    for i0 in (0..full).step_by(L) {
        let xs: [&[f32; L]; 4] =
            std::array::from_fn(|r| x[r][i0..i0 + L].try_into().expect("16 values"));
        for c in 0..4 {
            let wv: &[f32; L] = w[c][i0..i0 + L].try_into().expect("16 values");
            for r in 0..4 {
                for l in 0..L {
                    acc[c][r][l] += xs[r][l] * wv[l];
                }
            }
        }
    }
    let mut out = [[0.0f32; 4]; 4];
    for c in 0..4 {
        for r in 0..4 {
            let mut tail = 0.0f32;
            for i in full..k {
                tail += x[r][i] * w[c][i];
            }
            out[c][r] = acc[c][r].iter().fold(0.0f32, |s, &v| s + v) + tail;
        }
    }
    out
}

/// Columns `cols` of y for all rows: `out` is (M, cols.len()) row-major.
#[inline(always)]
fn block(x: &[f32], w: &[f32], m: usize, k: usize, cols: std::ops::Range<usize>, out: &mut [f32]) {
    let nb = cols.len();
    let mut r = 0;
    while r + 4 <= m {
        let xs = [
            &x[r * k..(r + 1) * k],
            &x[(r + 1) * k..(r + 2) * k],
            &x[(r + 2) * k..(r + 3) * k],
            &x[(r + 3) * k..(r + 4) * k],
        ];
        let mut j = 0;
        while j + 4 <= nb {
            let c0 = cols.start + j;
            let ws: [&[f32]; 4] = std::array::from_fn(|c| &w[(c0 + c) * k..(c0 + c + 1) * k]);
            let y = dot4x4(xs, ws);
            for (c, col) in y.iter().enumerate() {
                for (q, &v) in col.iter().enumerate() {
                    out[(r + q) * nb + j + c] = v;
                }
            }
            j += 4;
        }
        while j < nb {
            let c = cols.start + j;
            let y = dot4(xs, &w[c * k..(c + 1) * k]);
            for (q, v) in y.into_iter().enumerate() {
                out[(r + q) * nb + j] = v;
            }
            j += 1;
        }
        r += 4;
    }
    while r < m {
        let xr = &x[r * k..(r + 1) * k];
        for (j, c) in cols.clone().enumerate() {
            out[r * nb + j] = dot(xr, &w[c * k..(c + 1) * k]);
        }
        r += 1;
    }
}

/// [`dot`]'s end: the 16 lane sums in order, plus the tail `full..k`.
#[inline(always)]
fn finish(lanes: &[f32; 16], x: &[f32], w: &[f32], full: usize, k: usize) -> f32 {
    let mut tail = 0.0f32;
    for i in full..k {
        tail += x[i] * w[i];
    }
    lanes.iter().fold(0.0f32, |s, &v| s + v) + tail
}

/// [`block`]'s sums with SIMD tiles on x86-64: C weight rows x R inputs summed into the
/// 16 lane-wise partial sums of [`dot`] (products then sums, in k order), then
/// [`dot`]'s finish: the same bits as the portable build on every machine. One walk
/// over the block serves both instruction sets; only the tile's lane sums differ.
/// (Left to the compiler, [`dot4x4`]'s 4 x 4 tile kept its accumulators in memory on
/// AVX-512 and spilled on AVX2: a batch of four rows cost seven times one.)
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::super::lanes_avx2::{self, F32Row};
    use super::finish;
    use std::arch::x86_64::*;

    /// One instruction set's tile: the 16 lane sums of each (weight row, input) pair.
    pub trait Lanes {
        /// Whether tiles take four inputs at a time (AVX-512's 32 registers hold the 16
        /// accumulators of a 4 x 4 tile; AVX2's 16 hold 4 x 2 with both halves).
        const FOUR_INPUTS: bool;

        /// `out[c][q][l]` = sum over i < `full`, i = l mod 16, of w_c[i] x_q[i].
        ///
        /// # Safety
        /// The instruction set is available; `full` is a multiple of 16 and every
        /// pointer starts `full` readable values.
        unsafe fn lanes<const C: usize, const R: usize>(
            w: [*const f32; C],
            x: [*const f32; R],
            full: usize,
        ) -> [[[f32; 16]; R]; C];
    }

    /// AVX2 + FMA + F16C: [`lanes_avx2::lanes`] (the 16 lanes as two 8-lane halves).
    pub struct Avx2;
    /// AVX-512F: one register per (weight row, input) pair.
    pub struct Avx512;

    impl Lanes for Avx2 {
        const FOUR_INPUTS: bool = false;
        #[inline(always)]
        unsafe fn lanes<const C: usize, const R: usize>(
            w: [*const f32; C],
            x: [*const f32; R],
            full: usize,
        ) -> [[[f32; 16]; R]; C] {
            // SAFETY: this function's contract.
            unsafe { lanes_avx2::lanes::<F32Row, C, R>(w, x, full) }
        }
    }

    impl Lanes for Avx512 {
        const FOUR_INPUTS: bool = true;
        #[inline(always)]
        unsafe fn lanes<const C: usize, const R: usize>(
            w: [*const f32; C],
            x: [*const f32; R],
            full: usize,
        ) -> [[[f32; 16]; R]; C] {
            // SAFETY: this function's contract.
            unsafe { lanes_avx512::<C, R>(w, x, full) }
        }
    }

    /// [`Lanes::lanes`] with AVX-512 intrinsics.
    ///
    /// # Safety
    /// As [`Lanes::lanes`], with AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // the indices also pick load offsets
    unsafe fn lanes_avx512<const C: usize, const R: usize>(
        w: [*const f32; C],
        x: [*const f32; R],
        full: usize,
    ) -> [[[f32; 16]; R]; C] {
        let mut out = [[[0f32; 16]; R]; C];
        // SAFETY: every load reads 16 values at an offset i0 + 16 <= full of a row
        // holding `full` values (the caller's contract); the stores write `out`.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); R]; C];
            let mut i0 = 0;
            while i0 < full {
                let mut xv = [_mm512_setzero_ps(); R];
                for q in 0..R {
                    xv[q] = _mm512_loadu_ps(x[q].add(i0));
                }
                for c in 0..C {
                    let wv = _mm512_loadu_ps(w[c].add(i0));
                    for q in 0..R {
                        acc[c][q] = _mm512_add_ps(acc[c][q], _mm512_mul_ps(xv[q], wv));
                    }
                }
                i0 += 16;
            }
            for c in 0..C {
                for q in 0..R {
                    _mm512_storeu_ps(out[c][q].as_mut_ptr(), acc[c][q]);
                }
            }
        }
        out
    }

    /// Output columns `j..j + C` of the block for input rows `r..r + R`.
    ///
    /// # Safety
    /// `L`'s instruction set is available.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<L: Lanes, const C: usize, const R: usize>(
        x: &[f32],
        w: &[f32],
        k: usize,
        r: usize,
        c0: usize,
        j: usize,
        nb: usize,
        out: &mut [f32],
    ) {
        let full = k / 16 * 16;
        let wr: [&[f32]; C] = std::array::from_fn(|c| &w[(c0 + j + c) * k..(c0 + j + c + 1) * k]);
        let xr: [&[f32]; R] = std::array::from_fn(|q| &x[(r + q) * k..(r + q + 1) * k]);
        // SAFETY: each pointer starts a slice of k >= full values; the caller has the
        // instruction set.
        let acc =
            unsafe { L::lanes::<C, R>(wr.map(<[f32]>::as_ptr), xr.map(<[f32]>::as_ptr), full) };
        for c in 0..C {
            for q in 0..R {
                out[(r + q) * nb + j + c] = finish(&acc[c][q], xr[q], wr[c], full, k);
            }
        }
    }

    /// Columns `j..j + C` of the block for every input row (the C weight rows stay in
    /// L1 while the inputs pass): four at a time where `L` takes four, then two, then
    /// one.
    ///
    /// # Safety
    /// As [`tile`].
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn columns<L: Lanes, const C: usize>(
        x: &[f32],
        w: &[f32],
        m: usize,
        k: usize,
        c0: usize,
        j: usize,
        nb: usize,
        out: &mut [f32],
    ) {
        let mut r = 0;
        // SAFETY (every loop): the caller has the instruction set; indices are in range.
        while L::FOUR_INPUTS && r + 4 <= m {
            unsafe { tile::<L, C, 4>(x, w, k, r, c0, j, nb, out) };
            r += 4;
        }
        while r + 2 <= m {
            unsafe { tile::<L, C, 2>(x, w, k, r, c0, j, nb, out) };
            r += 2;
        }
        while r < m {
            unsafe { tile::<L, C, 1>(x, w, k, r, c0, j, nb, out) };
            r += 1;
        }
    }

    /// [`super::block`] with `L`'s tiles.
    ///
    /// # Safety
    /// `L`'s instruction set must be available.
    pub unsafe fn block<L: Lanes>(
        x: &[f32],
        w: &[f32],
        m: usize,
        k: usize,
        cols: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let nb = cols.len();
        let mut j = 0;
        // SAFETY (both loops): this function's contract.
        while j + 4 <= nb {
            unsafe { columns::<L, 4>(x, w, m, k, cols.start, j, nb, out) };
            j += 4;
        }
        while j < nb {
            unsafe { columns::<L, 1>(x, w, m, k, cols.start, j, nb, out) };
            j += 1;
        }
    }
}

/// y (M, N) = x (M, K) W^T, W (N, K).
pub fn xwt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "xwt: x is not (M, K)");
    assert_eq!(w.len(), n * k, "xwt: W is not (N, K)");
    let mut y = vec![0.0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    let cols_per = (BLOCK_BYTES / (4 * k.max(1))).clamp(8, 1024).min(n);
    let avx512 = has_avx512();
    let avx2 = has_avx2_fma();
    let starts: Vec<usize> = (0..n).step_by(cols_per).collect();
    let parts: Vec<(usize, Vec<f32>)> = pool::map(starts.len(), |b| {
        let c0 = starts[b];
        let cols = c0..(c0 + cols_per).min(n);
        let mut out = vec![0.0f32; m * cols.len()];
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            // SAFETY: AVX-512F presence was checked at run time (`has_avx512`); the
            // call reads only `x` and `w` and writes only `out`.
            unsafe { simd::block::<simd::Avx512>(x, w, m, k, cols, &mut out) };
            return (c0, out);
        }
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: AVX2, FMA and F16C presence was checked at run time; the call
            // reads only `x` and `w` and writes only `out`.
            unsafe { simd::block::<simd::Avx2>(x, w, m, k, cols, &mut out) };
            return (c0, out);
        }
        let _ = (avx512, avx2);
        block(x, w, m, k, cols, &mut out);
        (c0, out)
    });
    for (c0, out) in parts {
        let nb = out.len() / m;
        for r in 0..m {
            y[r * n + c0..r * n + c0 + nb].copy_from_slice(&out[r * nb..(r + 1) * nb]);
        }
    }
    y
}

/// Reference: plain loops with f64 accumulation.
pub fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; m * n];
    for r in 0..m {
        for c in 0..n {
            let s: f64 = (0..k)
                .map(|i| x[r * k + i] as f64 * w[c * k + i] as f64)
                .sum();
            y[r * n + c] = s as f32;
        }
    }
    y
}
