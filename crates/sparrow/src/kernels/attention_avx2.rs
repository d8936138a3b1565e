//! The AVX2 + FMA builds of the dense attention scans of [`super::decode_attention`],
//! written with intrinsics (the auto-vectorised generic code reached ~20 GB/s on a cache
//! the machine streams at 35, and the lane scan's transposed layout became gathers):
//!
//! - [`scan_groups`]: the online-softmax scan for groups of fewer than 8 query heads per
//!   KV head (decode under GQA, e.g. SmolLM2's 3; multi-head attention's 1). Scores of
//!   four keys for up to three heads at a time (twelve accumulators, each key chunk
//!   loaded once for the three heads, each query chunk once for the four keys), four
//!   sums finished by one horizontal-add tree; the exp eight logits at a time; the value
//!   rows accumulated sixteen columns of up to three heads at a time.
//! - [`scan_lanes`]: the 16-lane scan (lanes are heads, or (query, head) pairs in
//!   prefill) of the AVX-512 build, in two 8-lane halves.
//!
//! Same algorithm, block size and merge as the generic scans (the results agree to
//! rounding: tests compare both with the composed reference by relative error).

use super::kv_rows::{BlockScratch, CacheElem, KvRows, Values};
use super::scan_parts::{LanePartial, Partial, KEY_BLOCK, LANES};
use super::simd::fast_exp;
use std::arch::x86_64::*;

/// Heads whose scores share each load of a key chunk in [`scan_groups`].
const HEADS_PER_PASS: usize = 3;
/// Value columns per pass in [`scan_groups`], in registers of eight.
const VALUE_REGS: usize = 2;

/// `e^x` of eight lanes, as [`fast_exp`]: range reduction by ln 2, a degree-6
/// polynomial, 2^n built in the exponent bits; lanes at or below -87 give exactly 0.
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    // SAFETY: register-only AVX2 / FMA arithmetic; the caller enabled both.
    unsafe {
        let x = _mm256_max_ps(
            _mm256_min_ps(x, _mm256_set1_ps(88.0)),
            _mm256_set1_ps(-87.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
        let floor = _mm256_cmp_ps::<_CMP_LE_OQ>(x, _mm256_set1_ps(-87.0));
        _mm256_andnot_ps(floor, y)
    }
}

/// Lane x of the result: the sum of the eight lanes of `a[x]`.
#[inline(always)]
unsafe fn hsum4(a: &[__m256; 4]) -> __m128 {
    // SAFETY: register-only AVX arithmetic; the caller enabled AVX2.
    unsafe {
        let s01 = _mm256_hadd_ps(a[0], a[1]);
        let s23 = _mm256_hadd_ps(a[2], a[3]);
        let s = _mm256_hadd_ps(s01, s23);
        _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s))
    }
}

/// The sum of the eight lanes of `a`.
#[inline(always)]
unsafe fn hsum(a: __m256) -> f32 {
    // SAFETY: as [`hsum4`].
    unsafe {
        let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_movehdup_ps(h));
        _mm_cvtss_f32(h)
    }
}

/// Scores of the four key rows at `k` (`dk` apart) for the NH query rows at `q` (`dk`
/// apart): `out[h][x] = q_h . k_x`. The first `d8` (a multiple of 8) values by vector,
/// the rest one by one.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // the indices also pick load offsets
unsafe fn scores4<E: CacheElem, const NH: usize>(
    q: *const f32,
    k: *const E,
    dk: usize,
    d8: usize,
) -> [[f32; 4]; NH] {
    let mut out = [[0f32; 4]; NH];
    // SAFETY: reads q[h * dk + i] and k[x * dk + i] for i < dk, h < NH, x < 4: the
    // caller's rows.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 4]; NH];
        let mut c = 0;
        while c < d8 {
            let kv = [
                E::load8(k.add(c)),
                E::load8(k.add(dk + c)),
                E::load8(k.add(2 * dk + c)),
                E::load8(k.add(3 * dk + c)),
            ];
            for h in 0..NH {
                let qv = _mm256_loadu_ps(q.add(h * dk + c));
                for x in 0..4 {
                    acc[h][x] = _mm256_fmadd_ps(qv, kv[x], acc[h][x]);
                }
            }
            c += 8;
        }
        for h in 0..NH {
            _mm_storeu_ps(out[h].as_mut_ptr(), hsum4(&acc[h]));
            for i in d8..dk {
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
    d8: usize,
) -> [f32; NH] {
    let mut out = [0f32; NH];
    // SAFETY: as [`scores4`], one key row.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); NH];
        let mut c = 0;
        while c < d8 {
            let kv = E::load8(k.add(c));
            for h in 0..NH {
                acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(h * dk + c)), kv, acc[h]);
            }
            c += 8;
        }
        for h in 0..NH {
            out[h] = hsum(acc[h]);
            for i in d8..dk {
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
    let d8 = dk / 8 * 8;
    let q = qs[h0 * dk..(h0 + NH) * dk].as_ptr();
    // SAFETY: the block holds n key rows (the caller's block).
    unsafe {
        let mut j = 0;
        while j + 4 <= n {
            let s = scores4::<E, NH>(q, kp.add(j * dk), dk, d8);
            for (h, row) in s.iter().enumerate() {
                logits[(h0 + h) * KEY_BLOCK + j..][..4].copy_from_slice(row);
            }
            j += 4;
        }
        while j < n {
            let s = scores1::<E, NH>(q, kp.add(j * dk), dk, d8);
            for (h, &x) in s.iter().enumerate() {
                logits[(h0 + h) * KEY_BLOCK + j] = x;
            }
            j += 1;
        }
    }
}

/// `out[h0 + h] += sum_j p[h0 + h][j] v_j` for NH heads over the block's n value rows
/// (`vs` apart from `vp`), sixteen (then eight, then single) columns at a time.
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
    // SAFETY: the block's n value rows hold dv values at stride vs; `out` holds (g, dv) and `logits` (g, KEY_BLOCK) with h0 + NH <= g.
    unsafe {
        let o = out.as_mut_ptr().add(h0 * dv);
        let p = logits.as_ptr().add(h0 * KEY_BLOCK);
        let mut c = 0;
        while c + 8 * VALUE_REGS <= dv {
            let mut acc = [[_mm256_setzero_ps(); VALUE_REGS]; NH];
            for h in 0..NH {
                for r in 0..VALUE_REGS {
                    acc[h][r] = _mm256_loadu_ps(o.add(h * dv + c + 8 * r));
                }
            }
            for j in 0..n {
                let row = vp.add(j * vs + c);
                let mut vr = [_mm256_setzero_ps(); VALUE_REGS];
                for r in 0..VALUE_REGS {
                    vr[r] = E::load8(row.add(8 * r));
                }
                for h in 0..NH {
                    let pj = _mm256_broadcast_ss(&*p.add(h * KEY_BLOCK + j));
                    for r in 0..VALUE_REGS {
                        acc[h][r] = _mm256_fmadd_ps(pj, vr[r], acc[h][r]);
                    }
                }
            }
            for h in 0..NH {
                for r in 0..VALUE_REGS {
                    _mm256_storeu_ps(o.add(h * dv + c + 8 * r), acc[h][r]);
                }
            }
            c += 8 * VALUE_REGS;
        }
        while c + 8 <= dv {
            let mut acc = [_mm256_setzero_ps(); NH];
            for h in 0..NH {
                acc[h] = _mm256_loadu_ps(o.add(h * dv + c));
            }
            for j in 0..n {
                let v0 = E::load8(vp.add(j * vs + c));
                for h in 0..NH {
                    let pj = _mm256_broadcast_ss(&*p.add(h * KEY_BLOCK + j));
                    acc[h] = _mm256_fmadd_ps(pj, v0, acc[h]);
                }
            }
            for h in 0..NH {
                _mm256_storeu_ps(o.add(h * dv + c), acc[h]);
            }
            c += 8;
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
#[target_feature(enable = "avx2,fma,f16c")]
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
    // (g, KEY_BLOCK); slots past a short block's n stay -inf (exp 0).
    let mut logits = vec![f32::NEG_INFINITY; g * KEY_BLOCK];
    let (v, vs) = rows.value_buffer();
    assert!(
        range.end * dk <= rows.k.len() && range.end.saturating_sub(1) * vs + dv <= v.len(),
        "scan range beyond the cache"
    );
    let mut s0 = range.start;
    // SAFETY: AVX2, FMA and F16C are enabled on this function (checked at run time by
    // the caller); every row read lies below `range.end`, inside the buffers by the
    // assert above (keys dk apart, values vs apart, dv read of each); `logits` and
    // `part.out` are sized (g, KEY_BLOCK) and (g, dv).
    unsafe {
        while s0 < range.end {
            let n = (range.end - s0).min(KEY_BLOCK);
            // The block's rows are read where they are stored, widened in registers.
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
                let mut bmax = _mm256_set1_ps(f32::NEG_INFINITY);
                for c in (0..KEY_BLOCK).step_by(8) {
                    bmax = _mm256_max_ps(bmax, _mm256_loadu_ps(l.add(c)));
                }
                let h2 = _mm_max_ps(
                    _mm256_castps256_ps128(bmax),
                    _mm256_extractf128_ps::<1>(bmax),
                );
                let h2 = _mm_max_ps(h2, _mm_movehl_ps(h2, h2));
                let bmax = _mm_cvtss_f32(_mm_max_ss(h2, _mm_movehdup_ps(h2)));
                let new_max = part.max[h].max(bmax);
                let corr = fast_exp(part.max[h] - new_max);
                part.max[h] = new_max;
                let m = _mm256_set1_ps(new_max);
                let mut bsum = _mm256_setzero_ps();
                for c in (0..KEY_BLOCK).step_by(8) {
                    let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(l.add(c)), m));
                    _mm256_storeu_ps(l.add(c), e);
                    bsum = _mm256_add_ps(bsum, e);
                }
                part.sum[h] = part.sum[h] * corr + hsum(bsum);
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

/// The 16-lane scan of [`super::decode_attention`] (`scan_lanes_avx512`'s algorithm in
/// two 8-lane halves): keys `range` of `rows` against the transposed, scaled queries
/// `q_t` (dk rows of 16 lanes); with `limits`, lane l sees only keys below `limits[l]`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // the indices also pick load offsets
pub(super) fn scan_lanes<E: CacheElem>(
    q_t: &[[f32; LANES]],
    rows: &KvRows<E>,
    range: std::ops::Range<usize>,
    limits: Option<&[u32; LANES]>,
) -> LanePartial {
    let (dk, dv) = (rows.dk, rows.dv);
    let separate = matches!(rows.values, Values::Separate(_));
    assert_eq!(q_t.len(), dk, "queries and keys differ in width");
    let min_limit = limits.map_or(usize::MAX, |l| *l.iter().min().unwrap_or(&0) as usize);
    // Limits as signed lanes for the compare (a limit past i32::MAX is no limit).
    let mut lim32 = [i32::MAX; LANES];
    if let Some(l) = limits {
        for (a, &b) in lim32.iter_mut().zip(l) {
            *a = b.min(i32::MAX as u32) as i32;
        }
    }
    // SAFETY: AVX2 and FMA are enabled on this function (checked at run time by the
    // caller). Every pointer read is k[j * dk + i], i < dk, or v[j * vs + i], i < dv,
    // j < n, of the block's rows (n x dk keys; values n - 1 strides plus dv long);
    // prefetches never fault. `q_t`, `out_t` and the partial's rows are 16 f32 (two
    // unaligned 256-bit loads / stores each).
    unsafe {
        let mut scratch = BlockScratch::default();
        let lim = [
            _mm256_loadu_si256(lim32.as_ptr() as *const __m256i),
            _mm256_loadu_si256(lim32.as_ptr().add(8) as *const __m256i),
        ];
        let mut visible = [[_mm256_setzero_ps(); 2]; KEY_BLOCK];
        let qrows: Vec<[__m256; 2]> = q_t
            .iter()
            .map(|r| {
                [
                    _mm256_loadu_ps(r.as_ptr()),
                    _mm256_loadu_ps(r.as_ptr().add(8)),
                ]
            })
            .collect();
        let mut out_t: Vec<[__m256; 2]> = vec![[_mm256_setzero_ps(); 2]; dv];
        let mut m = [_mm256_set1_ps(f32::NEG_INFINITY); 2];
        let mut sum = [_mm256_setzero_ps(); 2];
        let mut logits = [[_mm256_setzero_ps(); 2]; KEY_BLOCK];
        let mut s0 = range.start;
        while s0 < range.end {
            let n = (range.end - s0).min(KEY_BLOCK);
            let b = rows.block(s0, n, &mut scratch);
            let (kp, vp, vs) = (b.k.as_ptr(), b.v.as_ptr(), b.vs);
            let mut j = 0;
            while j + 4 <= n {
                let b0 = j * dk;
                // The cache's rows one block ahead.
                let ahead = s0 + j + KEY_BLOCK;
                for line in (0..4 * dk * E::BYTES).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(rows.key_bytes_at(ahead * dk).wrapping_add(line));
                }
                if separate {
                    for line in (0..4 * dv * E::BYTES).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(
                            rows.value_bytes_at(ahead * dv).wrapping_add(line),
                        );
                    }
                }
                let mut a = [[_mm256_setzero_ps(); 2]; 4];
                for (i, qr) in qrows.iter().enumerate() {
                    for x in 0..4 {
                        let kx = _mm256_broadcast_ss(&*kp.add(b0 + x * dk + i));
                        a[x][0] = _mm256_fmadd_ps(qr[0], kx, a[x][0]);
                        a[x][1] = _mm256_fmadd_ps(qr[1], kx, a[x][1]);
                    }
                }
                logits[j..j + 4].copy_from_slice(&a);
                j += 4;
            }
            while j < n {
                let b0 = j * dk;
                let mut a = [_mm256_setzero_ps(); 2];
                for (i, qr) in qrows.iter().enumerate() {
                    let kx = _mm256_broadcast_ss(&*kp.add(b0 + i));
                    a[0] = _mm256_fmadd_ps(qr[0], kx, a[0]);
                    a[1] = _mm256_fmadd_ps(qr[1], kx, a[1]);
                }
                logits[j] = a;
                j += 1;
            }
            // Causal limits: lane l sees keys < limits[l]; the others get -inf before
            // the max and exactly 0 after the exp.
            let masked = s0 + n > min_limit;
            if masked {
                for (j, l) in logits[..n].iter_mut().enumerate() {
                    let key = _mm256_set1_epi32((s0 + j) as i32);
                    for half in 0..2 {
                        let vis = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lim[half], key));
                        visible[j][half] = vis;
                        l[half] = _mm256_blendv_ps(_mm256_set1_ps(f32::NEG_INFINITY), l[half], vis);
                    }
                }
            }
            for half in 0..2 {
                let mut bmax = _mm256_set1_ps(f32::NEG_INFINITY);
                for l in &logits[..n] {
                    bmax = _mm256_max_ps(bmax, l[half]);
                }
                let new_m = _mm256_max_ps(m[half], bmax);
                let corr = exp8(_mm256_sub_ps(m[half], new_m));
                m[half] = new_m;
                let mut bsum = _mm256_setzero_ps();
                for (j, l) in logits[..n].iter_mut().enumerate() {
                    let mut e = exp8(_mm256_sub_ps(l[half], new_m));
                    if masked {
                        e = _mm256_and_ps(e, visible[j][half]);
                    }
                    l[half] = e;
                    bsum = _mm256_add_ps(bsum, e);
                }
                sum[half] = _mm256_fmadd_ps(sum[half], corr, bsum);
                for o in out_t.iter_mut() {
                    o[half] = _mm256_mul_ps(o[half], corr);
                }
            }
            let mut j = 0;
            while j + 4 <= n {
                let b0 = j * vs;
                let p = [logits[j], logits[j + 1], logits[j + 2], logits[j + 3]];
                for (i, o) in out_t.iter_mut().enumerate() {
                    let mut acc = *o;
                    for x in 0..4 {
                        let vx = _mm256_broadcast_ss(&*vp.add(b0 + x * vs + i));
                        acc[0] = _mm256_fmadd_ps(p[x][0], vx, acc[0]);
                        acc[1] = _mm256_fmadd_ps(p[x][1], vx, acc[1]);
                    }
                    *o = acc;
                }
                j += 4;
            }
            while j < n {
                let b0 = j * vs;
                let p = logits[j];
                for (i, o) in out_t.iter_mut().enumerate() {
                    let vx = _mm256_broadcast_ss(&*vp.add(b0 + i));
                    o[0] = _mm256_fmadd_ps(p[0], vx, o[0]);
                    o[1] = _mm256_fmadd_ps(p[1], vx, o[1]);
                }
                j += 1;
            }
            s0 += n;
        }
        let mut part = LanePartial {
            max: [0.0; LANES],
            sum: [0.0; LANES],
            out_t: vec![[0.0; LANES]; dv],
        };
        for half in 0..2 {
            _mm256_storeu_ps(part.max.as_mut_ptr().add(8 * half), m[half]);
            _mm256_storeu_ps(part.sum.as_mut_ptr().add(8 * half), sum[half]);
            for (dst, src) in part.out_t.iter_mut().zip(&out_t) {
                _mm256_storeu_ps(dst.as_mut_ptr().add(8 * half), src[half]);
            }
        }
        part
    }
}
