//! The AVX-512 build of the dense decode scan for groups of fewer than 8 query heads
//! per KV head (decode under GQA, e.g. SmolLM2's 3; multi-head attention's 1): the
//! algorithm of [`super::attention_avx2::scan_groups`] with sixteen lanes. Scores of
//! four keys for up to three heads at a time (twelve accumulators, each key chunk
//! loaded and widened once for the three heads), each head's four sums folded to eight
//! lanes and finished by one horizontal-add tree; the exp sixteen logits at a time; the
//! value rows accumulated sixty-four columns of up to three heads at a time. The rows
//! are read where the cache stores them (f16 widened in registers).
//!
//! Same block size and merge as the other scans; the results agree with them to
//! rounding (tests compare every level with the composed reference by relative error).

use super::kv_rows::{CacheElem, KvRows};
use super::scan_parts::{Partial, KEY_BLOCK};
use super::simd::{exp512, fast_exp};
use std::arch::x86_64::*;

/// Heads whose scores share each load of a key chunk.
const HEADS_PER_PASS: usize = 3;
/// Value columns per pass, in registers of sixteen: 64 columns, a whole row of a
/// 64-wide head, so each value row is read once, front to back (3 heads x 4
/// accumulators + 4 value registers). Two passes of 32 ran the dense decode core
/// slower at 8192 positions (`bench attention --heads 9 --kv-heads 3 --kv-dtype f16`,
/// medians of three alternated runs: 0.47 against 0.40 ms on one thread, 0.50 against
/// 0.28 on two; BENCHMARKS.md).
const VALUE_REGS: usize = 4;

/// The sixteen lanes of `a` folded to eight (lane i + lane i + 8).
#[inline(always)]
unsafe fn fold(a: __m512) -> __m256 {
    // SAFETY: register-only AVX-512F / AVX arithmetic; the caller enabled both.
    unsafe {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
        _mm256_add_ps(_mm512_castps512_ps256(a), hi)
    }
}

/// Lane x of the result: the sum of the sixteen lanes of `a[x]`.
#[inline(always)]
unsafe fn hsum4(a: &[__m512; 4]) -> __m128 {
    // SAFETY: as [`fold`].
    unsafe {
        let s01 = _mm256_hadd_ps(fold(a[0]), fold(a[1]));
        let s23 = _mm256_hadd_ps(fold(a[2]), fold(a[3]));
        let s = _mm256_hadd_ps(s01, s23);
        _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s))
    }
}

/// Scores of the four key rows at `k` (`dk` apart) for the NH query rows at `q` (`dk`
/// apart): `out[h][x] = q_h . k_x`. The first `d16` (a multiple of 16) values by
/// vector, the rest one by one.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // the indices also pick load offsets
unsafe fn scores4<E: CacheElem, const NH: usize>(
    q: *const f32,
    k: *const E,
    dk: usize,
    d16: usize,
) -> [[f32; 4]; NH] {
    let mut out = [[0f32; 4]; NH];
    // SAFETY: reads q[h * dk + i] and k[x * dk + i] for i < dk, h < NH, x < 4: the
    // caller's rows.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 4]; NH];
        let mut c = 0;
        while c < d16 {
            let kv = [
                E::load16(k.add(c)),
                E::load16(k.add(dk + c)),
                E::load16(k.add(2 * dk + c)),
                E::load16(k.add(3 * dk + c)),
            ];
            for h in 0..NH {
                let qv = _mm512_loadu_ps(q.add(h * dk + c));
                for x in 0..4 {
                    acc[h][x] = _mm512_fmadd_ps(qv, kv[x], acc[h][x]);
                }
            }
            c += 16;
        }
        for h in 0..NH {
            _mm_storeu_ps(out[h].as_mut_ptr(), hsum4(&acc[h]));
            for i in d16..dk {
                for x in 0..4 {
                    out[h][x] += *q.add(h * dk + i) * (*k.add(x * dk + i)).to_f32();
                }
            }
        }
    }
    out
}

/// [`scores4`] for one key row.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn scores1<E: CacheElem, const NH: usize>(
    q: *const f32,
    k: *const E,
    dk: usize,
    d16: usize,
) -> [f32; NH] {
    let mut out = [0f32; NH];
    // SAFETY: as [`scores4`], one key row.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); NH];
        let mut c = 0;
        while c < d16 {
            let kv = E::load16(k.add(c));
            for h in 0..NH {
                acc[h] = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(h * dk + c)), kv, acc[h]);
            }
            c += 16;
        }
        for h in 0..NH {
            out[h] = _mm512_reduce_add_ps(acc[h]);
            for i in d16..dk {
                out[h] += *q.add(h * dk + i) * (*k.add(i)).to_f32();
            }
        }
    }
    out
}

/// `logits[(h0 + h) * KEY_BLOCK + j]` = score of the block's key j (j < n, rows `dk`
/// apart from `kp`) for head h0 + h.
#[inline(always)]
unsafe fn block_scores<E: CacheElem, const NH: usize>(
    qs: &[f32],
    h0: usize,
    kp: *const E,
    dk: usize,
    n: usize,
    logits: &mut [f32],
) {
    let d16 = dk / 16 * 16;
    let q = qs[h0 * dk..(h0 + NH) * dk].as_ptr();
    // SAFETY: the block holds n key rows (the caller's block).
    unsafe {
        let mut j = 0;
        while j + 4 <= n {
            let s = scores4::<E, NH>(q, kp.add(j * dk), dk, d16);
            for (h, row) in s.iter().enumerate() {
                logits[(h0 + h) * KEY_BLOCK + j..][..4].copy_from_slice(row);
            }
            j += 4;
        }
        while j < n {
            let s = scores1::<E, NH>(q, kp.add(j * dk), dk, d16);
            for (h, &x) in s.iter().enumerate() {
                logits[(h0 + h) * KEY_BLOCK + j] = x;
            }
            j += 1;
        }
    }
}

/// `out[h0 + h] += sum_j p[h0 + h][j] v_j` for NH heads over the block's n value rows
/// (`vs` apart from `vp`), sixty-four (then sixteen, then single) columns at a time.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn block_values<E: CacheElem, const NH: usize>(
    logits: &[f32],
    h0: usize,
    vp: *const E,
    vs: usize,
    dv: usize,
    n: usize,
    out: &mut [f32],
) {
    // SAFETY: the block's n value rows hold dv values at stride vs; `out` holds (g, dv)
    // and `logits` (g, KEY_BLOCK) with h0 + NH <= g.
    unsafe {
        let o = out.as_mut_ptr().add(h0 * dv);
        let p = logits.as_ptr().add(h0 * KEY_BLOCK);
        let mut c = 0;
        while c + 16 * VALUE_REGS <= dv {
            let mut acc = [[_mm512_setzero_ps(); VALUE_REGS]; NH];
            for h in 0..NH {
                for r in 0..VALUE_REGS {
                    acc[h][r] = _mm512_loadu_ps(o.add(h * dv + c + 16 * r));
                }
            }
            for j in 0..n {
                let row = vp.add(j * vs + c);
                let mut vr = [_mm512_setzero_ps(); VALUE_REGS];
                for r in 0..VALUE_REGS {
                    vr[r] = E::load16(row.add(16 * r));
                }
                for h in 0..NH {
                    let pj = _mm512_set1_ps(*p.add(h * KEY_BLOCK + j));
                    for r in 0..VALUE_REGS {
                        acc[h][r] = _mm512_fmadd_ps(pj, vr[r], acc[h][r]);
                    }
                }
            }
            for h in 0..NH {
                for r in 0..VALUE_REGS {
                    _mm512_storeu_ps(o.add(h * dv + c + 16 * r), acc[h][r]);
                }
            }
            c += 16 * VALUE_REGS;
        }
        while c + 16 <= dv {
            let mut acc = [_mm512_setzero_ps(); NH];
            for h in 0..NH {
                acc[h] = _mm512_loadu_ps(o.add(h * dv + c));
            }
            for j in 0..n {
                let v0 = E::load16(vp.add(j * vs + c));
                for h in 0..NH {
                    let pj = _mm512_set1_ps(*p.add(h * KEY_BLOCK + j));
                    acc[h] = _mm512_fmadd_ps(pj, v0, acc[h]);
                }
            }
            for h in 0..NH {
                _mm512_storeu_ps(o.add(h * dv + c), acc[h]);
            }
            c += 16;
        }
        for i in c..dv {
            for h in 0..NH {
                let mut a = *o.add(h * dv + i);
                for j in 0..n {
                    a += *p.add(h * KEY_BLOCK + j) * (*vp.add(j * vs + i)).to_f32();
                }
                *o.add(h * dv + i) = a;
            }
        }
    }
}

/// Online-softmax scan of one group's queries q (g, dk), g < 8 heads, over key `range`
/// of `rows` (one group): per head the running max, sum and unnormalised output.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) fn scan_groups<E: CacheElem>(
    q: &[f32],
    rows: &KvRows<E>,
    scale: f32,
    range: std::ops::Range<usize>,
) -> Partial {
    let (dk, dv) = (rows.dk, rows.dv);
    let g = q.len() / dk;
    let qs: Vec<f32> = q.iter().map(|&x| x * scale).collect();
    let mut part = Partial::empty(g, dv);
    // (g, KEY_BLOCK); slots past a short block's n are zeroed after the exp.
    let mut logits = vec![f32::NEG_INFINITY; g * KEY_BLOCK];
    let (v, vs) = rows.value_buffer();
    assert!(
        range.end * dk <= rows.k.len() && range.end.saturating_sub(1) * vs + dv <= v.len(),
        "scan range beyond the cache"
    );
    let mut s0 = range.start;
    // SAFETY: AVX-512F, AVX2, FMA and F16C are enabled on this function (checked at run
    // time by the caller); every row read lies below `range.end`, inside the buffers by
    // the assert above (keys dk apart, values vs apart, dv read of each); `logits` and
    // `part.out` are sized (g, KEY_BLOCK) and (g, dv).
    unsafe {
        while s0 < range.end {
            let n = (range.end - s0).min(KEY_BLOCK);
            let (kp, vp) = (rows.k.as_ptr().add(s0 * dk), v.as_ptr().add(s0 * vs));
            if n < KEY_BLOCK {
                logits.fill(f32::NEG_INFINITY);
            }
            let mut h0 = 0;
            while h0 < g {
                match (g - h0).min(HEADS_PER_PASS) {
                    3 => block_scores::<E, 3>(&qs, h0, kp, dk, n, &mut logits),
                    2 => block_scores::<E, 2>(&qs, h0, kp, dk, n, &mut logits),
                    _ => block_scores::<E, 1>(&qs, h0, kp, dk, n, &mut logits),
                }
                h0 += HEADS_PER_PASS;
            }
            for h in 0..g {
                let l = logits[h * KEY_BLOCK..(h + 1) * KEY_BLOCK].as_mut_ptr();
                let mut bmax = _mm512_set1_ps(f32::NEG_INFINITY);
                for c in (0..KEY_BLOCK).step_by(16) {
                    bmax = _mm512_max_ps(bmax, _mm512_loadu_ps(l.add(c)));
                }
                let new_max = part.max[h].max(_mm512_reduce_max_ps(bmax));
                let corr = fast_exp(part.max[h] - new_max);
                part.max[h] = new_max;
                let m = _mm512_set1_ps(new_max);
                let mut bsum = _mm512_setzero_ps();
                for c in (0..KEY_BLOCK).step_by(16) {
                    // Slots at or past n hold no key: exactly 0 (exp512 does not map
                    // -inf to 0 by itself).
                    let live: __mmask16 = if c + 16 <= n {
                        0xffff
                    } else if c >= n {
                        0
                    } else {
                        (1u16 << (n - c)) - 1
                    };
                    let e = _mm512_maskz_mov_ps(
                        live,
                        exp512(_mm512_sub_ps(_mm512_loadu_ps(l.add(c)), m)),
                    );
                    _mm512_storeu_ps(l.add(c), e);
                    bsum = _mm512_add_ps(bsum, e);
                }
                part.sum[h] = part.sum[h] * corr + _mm512_reduce_add_ps(bsum);
                if corr != 1.0 {
                    part.out[h * dv..(h + 1) * dv]
                        .iter_mut()
                        .for_each(|o| *o *= corr);
                }
            }
            let mut h0 = 0;
            while h0 < g {
                match (g - h0).min(HEADS_PER_PASS) {
                    3 => block_values::<E, 3>(&logits, h0, vp, vs, dv, n, &mut part.out),
                    2 => block_values::<E, 2>(&logits, h0, vp, vs, dv, n, &mut part.out),
                    _ => block_values::<E, 1>(&logits, h0, vp, vs, dv, n, &mut part.out),
                }
                h0 += HEADS_PER_PASS;
            }
            s0 += n;
        }
    }
    part
}
