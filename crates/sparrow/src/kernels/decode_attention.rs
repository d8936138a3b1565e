//! Dense attention for one new query against a KV cache (the dense side of the decode
//! benchmark, and the yardstick the sparse path is measured against).
//!
//! q (H, dk); keys and values as [`KvRows`] (KV groups; per-head K/V, or the MLA latent
//! whose key row begins with its value); out (H, dv). Flash-decoding: the key range is
//! split over the threads, each part runs an online softmax per head over key blocks
//! (running max, running sum, running output), and the parts are merged with their
//! log-sum-exp. Under MQA each key and value row is read from memory once and used by
//! all G = H / KV heads of its group, so the scan streams the cache exactly once. For
//! G >= 8 the heads sit in the 16 lanes of a vector: each key element is broadcast
//! against the transposed queries of 16 heads (fused multiply-add in the AVX-512
//! build), with no horizontal reductions; smaller groups use per-head dot products
//! (the intrinsics of [`super::attention_avx512`] / [`super::attention_avx2`] where the
//! CPU has them).
//! [`reference`] is the composed candle version.

use super::kv_rows::{BlockScratch, CacheElem, KvRows, Values};
use super::pool;
use super::scan_parts::{LanePartial, Partial, KEY_BLOCK, LANES};
use super::simd::{fast_exp, has_avx2_fma, has_avx512};
use super::{dot_tree, thread_parts};

/// Max of `x` by 16 lane-wise maxima, then a tree over the lanes (no serial chain).
#[inline(always)]
fn lanes_max(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let mut c = x.chunks_exact(16);
    for ch in &mut c {
        for l in 0..16 {
            m[l] = m[l].max(ch[l]);
        }
    }
    let tail = c
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            m[l] = m[l].max(m[l + w]);
        }
    }
    m[0].max(tail)
}

/// Sum of `x` by 16 lane-wise sums, then a tree over the lanes (a fixed order).
#[inline(always)]
fn lanes_sum(x: &[f32]) -> f32 {
    let mut s = [0f32; 16];
    let mut c = x.chunks_exact(16);
    for ch in &mut c {
        for l in 0..16 {
            s[l] += ch[l];
        }
    }
    let tail: f32 = c.remainder().iter().sum();
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            s[l] += s[l + w];
        }
    }
    s[0] + tail
}

#[inline(always)]
fn scan_generic<E: CacheElem>(
    q: &[f32],
    rows: &KvRows<E>,
    scale: f32,
    range: std::ops::Range<usize>,
) -> Partial {
    let (dk, dv) = (rows.dk, rows.dv);
    let g = q.len() / dk;
    let mut part = Partial::empty(g, dv);
    let mut logits = vec![0.0f32; g * KEY_BLOCK];
    let mut scratch = BlockScratch::default();
    let mut s0 = range.start;
    while s0 < range.end {
        let n = (range.end - s0).min(KEY_BLOCK);
        let b = rows.block(s0, n, &mut scratch);
        for j in 0..n {
            let krow = &b.k[j * dk..(j + 1) * dk];
            for h in 0..g {
                logits[h * KEY_BLOCK + j] = scale * dot_tree(&q[h * dk..(h + 1) * dk], krow);
            }
        }
        for h in 0..g {
            let l = &mut logits[h * KEY_BLOCK..h * KEY_BLOCK + n];
            let bmax = lanes_max(l);
            let new_max = part.max[h].max(bmax);
            let corr = fast_exp(part.max[h] - new_max);
            part.max[h] = new_max;
            for x in l.iter_mut() {
                *x = fast_exp(*x - new_max);
            }
            let bsum = lanes_sum(l);
            part.sum[h] = part.sum[h] * corr + bsum;
            if corr != 1.0 {
                part.out[h * dv..(h + 1) * dv]
                    .iter_mut()
                    .for_each(|o| *o *= corr);
            }
        }
        for j in 0..n {
            let vrow = &b.v[j * b.vs..j * b.vs + dv];
            for h in 0..g {
                let p = logits[h * KEY_BLOCK + j];
                for (o, &x) in part.out[h * dv..(h + 1) * dv].iter_mut().zip(vrow) {
                    *o += p * x;
                }
            }
        }
        s0 += n;
    }
    part
}

/// Online-softmax scan of one group's queries q (g, dk) over key `range` of `rows`
/// (one group), through the intrinsics scans of [`super::attention_avx512`] and
/// [`super::attention_avx2`] where the CPU has them (the auto-vectorised generic loop
/// ran the attention of a 16-sequence SmolLM2 step 1.6x slower than the AVX2 scan on
/// an AVX-512 machine).
fn scan<E: CacheElem>(
    q: &[f32],
    rows: &KvRows<E>,
    scale: f32,
    range: std::ops::Range<usize>,
) -> Partial {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F (with AVX2, FMA and F16C, which every AVX-512 CPU has) was
        // checked at run time; the function reads only the given slices.
        return unsafe { super::attention_avx512::scan_groups(q, rows, scale, range) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 and FMA support was checked at run time; the function reads only
        // the given slices.
        return unsafe { super::attention_avx2::scan_groups(q, rows, scale, range) };
    }
    scan_generic(q, rows, scale, range)
}

/// Keys sharing each load of the transposed queries.
const KEYS_PER_STEP: usize = 4;

/// Four consecutive rows of `width` values, `stride` apart, the first at element `b0`.
#[inline(always)]
fn rows4(x: &[f32], b0: usize, stride: usize, width: usize) -> [&[f32]; 4] {
    [0, 1, 2, 3].map(|i| &x[b0 + i * stride..b0 + i * stride + width])
}

/// Scan keys `range` for one group of up to 16 heads whose scaled queries are given
/// transposed, `q_t[i][h] = scale * q[h][i]`. Each key row is loaded once and
/// broadcast against the 16 head lanes; four keys share each load of `q_t`.
#[inline(always)]
fn scan_lanes_generic<E: CacheElem>(
    q_t: &[[f32; LANES]],
    rows: &KvRows<E>,
    range: std::ops::Range<usize>,
    limits: Option<&[u32; LANES]>,
) -> LanePartial {
    let min_limit = limits.map_or(usize::MAX, |l| *l.iter().min().unwrap_or(&0) as usize);
    let (dk, dv) = (rows.dk, rows.dv);
    let mut part = LanePartial {
        max: [f32::NEG_INFINITY; LANES],
        sum: [0.0; LANES],
        out_t: vec![[0.0; LANES]; dv],
    };
    let mut logits = [[0.0f32; LANES]; KEY_BLOCK];
    let mut scratch = BlockScratch::default();
    let mut s0 = range.start;
    while s0 < range.end {
        let n = (range.end - s0).min(KEY_BLOCK);
        let b = rows.block(s0, n, &mut scratch);
        let (k, v, vs) = (b.k, b.v, b.vs);
        // Scores of the block: logits[j][h]; four keys per pass over q_t.
        let mut j = 0;
        while j + KEYS_PER_STEP <= n {
            let [r0, r1, r2, r3] = rows4(k, j * dk, dk, dk);
            let mut a = [[0.0f32; LANES]; KEYS_PER_STEP];
            for ((((qr, &x0), &x1), &x2), &x3) in q_t.iter().zip(r0).zip(r1).zip(r2).zip(r3) {
                for l in 0..LANES {
                    a[0][l] += qr[l] * x0;
                    a[1][l] += qr[l] * x1;
                    a[2][l] += qr[l] * x2;
                    a[3][l] += qr[l] * x3;
                }
            }
            logits[j..j + KEYS_PER_STEP].copy_from_slice(&a);
            j += KEYS_PER_STEP;
        }
        while j < n {
            let r = &k[j * dk..(j + 1) * dk];
            let mut a = [0.0f32; LANES];
            for (qr, &x) in q_t.iter().zip(r) {
                for l in 0..LANES {
                    a[l] += qr[l] * x;
                }
            }
            logits[j] = a;
            j += 1;
        }
        // Causal limits: lane l sees keys < limits[l] (prefill lanes of several queries).
        if let Some(lim) = limits.filter(|_| s0 + n > min_limit) {
            for (j, row) in logits[..n].iter_mut().enumerate() {
                for l in 0..LANES {
                    if (s0 + j) as u32 >= lim[l] {
                        row[l] = f32::NEG_INFINITY; // fast_exp maps it to exactly 0
                    }
                }
            }
        }
        // Online softmax update, lane-wise over heads.
        let mut bmax = [f32::NEG_INFINITY; LANES];
        for row in &logits[..n] {
            for l in 0..LANES {
                bmax[l] = bmax[l].max(row[l]);
            }
        }
        let mut corr = [0.0f32; LANES];
        for l in 0..LANES {
            let new_max = part.max[l].max(bmax[l]);
            corr[l] = fast_exp(part.max[l] - new_max);
            part.max[l] = new_max;
        }
        let mut bsum = [0.0f32; LANES];
        for row in &mut logits[..n] {
            for l in 0..LANES {
                row[l] = fast_exp(row[l] - part.max[l]);
                bsum[l] += row[l];
            }
        }
        for l in 0..LANES {
            part.sum[l] = part.sum[l] * corr[l] + bsum[l];
        }
        for o in part.out_t.iter_mut() {
            for l in 0..LANES {
                o[l] *= corr[l];
            }
        }
        // out_t[i][h] += p[j][h] * v[j][i], four keys per pass over out_t.
        let mut j = 0;
        while j + KEYS_PER_STEP <= n {
            let [r0, r1, r2, r3] = rows4(v, j * vs, vs, dv);
            let (p0, p1, p2, p3) = (logits[j], logits[j + 1], logits[j + 2], logits[j + 3]);
            for ((((o, &y0), &y1), &y2), &y3) in
                part.out_t.iter_mut().zip(r0).zip(r1).zip(r2).zip(r3)
            {
                for l in 0..LANES {
                    let acc = o[l] + p0[l] * y0;
                    let acc = acc + p1[l] * y1;
                    let acc = acc + p2[l] * y2;
                    o[l] = acc + p3[l] * y3;
                }
            }
            j += KEYS_PER_STEP;
        }
        while j < n {
            let r = &v[j * vs..j * vs + dv];
            let p = logits[j];
            for (o, &y) in part.out_t.iter_mut().zip(r) {
                for l in 0..LANES {
                    o[l] += p[l] * y;
                }
            }
            j += 1;
        }
        s0 += n;
    }
    part
}

/// The AVX-512 build of [`scan_lanes_generic`], written with intrinsics so the 16 head
/// lanes map onto one register and nothing is left to the auto-vectoriser (which
/// turned the transposed layout into gathers). Same algorithm, same block sizes; exp via
/// the same range reduction with `vscalefps` for the 2^n.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn scan_lanes_avx512<E: CacheElem>(
    q_t: &[[f32; LANES]],
    rows: &KvRows<E>,
    range: std::ops::Range<usize>,
    limits: Option<&[u32; LANES]>,
) -> LanePartial {
    use std::arch::x86_64::*;
    let (dk, dv) = (rows.dk, rows.dv);
    let separate = matches!(rows.values, Values::Separate(_));
    assert_eq!(q_t.len(), dk, "queries and keys differ in width");

    use super::simd::exp512;

    // SAFETY: every pointer read below is k[j * dk + i] with i < dk or v[j * vs + i]
    // with i < dv, j < n, of the block's rows (n rows of dk keys; values n - 1 strides
    // plus dv long); prefetches never fault; `q_t` and `out_t` rows are 16 f32 (one
    // unaligned 512-bit load / store each). AVX-512F and FMA are enabled on this
    // function and were detected at run time by the caller.
    unsafe {
        let mut scratch = BlockScratch::default();
        let min_limit = limits.map_or(usize::MAX, |l| *l.iter().min().unwrap_or(&0) as usize);
        let lim = _mm512_loadu_si512(limits.unwrap_or(&[u32::MAX; LANES]).as_ptr() as *const _);
        let mut visible = [0xffffu16; KEY_BLOCK];
        let qrows: Vec<__m512> = q_t.iter().map(|r| _mm512_loadu_ps(r.as_ptr())).collect();
        let mut out_t: Vec<__m512> = vec![_mm512_setzero_ps(); dv];
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut sum = _mm512_setzero_ps();
        let mut logits = [_mm512_setzero_ps(); KEY_BLOCK];
        let mut s0 = range.start;
        while s0 < range.end {
            let n = (range.end - s0).min(KEY_BLOCK);
            let b = rows.block(s0, n, &mut scratch);
            let (kp, vp, vs) = (b.k.as_ptr(), b.v.as_ptr(), b.vs);
            let mut j = 0;
            while j + 4 <= n {
                let b0 = j * dk;
                // Prefetch the cache's rows one block ahead (a no-op past the end:
                // prefetches never fault, and the address is formed without `add`'s
                // bounds rule).
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
                let (mut a0, mut a1, mut a2, mut a3) = (
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                );
                for (i, &qr) in qrows.iter().enumerate() {
                    a0 = _mm512_fmadd_ps(qr, _mm512_set1_ps(*kp.add(b0 + i)), a0);
                    a1 = _mm512_fmadd_ps(qr, _mm512_set1_ps(*kp.add(b0 + dk + i)), a1);
                    a2 = _mm512_fmadd_ps(qr, _mm512_set1_ps(*kp.add(b0 + 2 * dk + i)), a2);
                    a3 = _mm512_fmadd_ps(qr, _mm512_set1_ps(*kp.add(b0 + 3 * dk + i)), a3);
                }
                logits[j] = a0;
                logits[j + 1] = a1;
                logits[j + 2] = a2;
                logits[j + 3] = a3;
                j += 4;
            }
            while j < n {
                let b0 = j * dk;
                let mut a = _mm512_setzero_ps();
                for (i, &qr) in qrows.iter().enumerate() {
                    a = _mm512_fmadd_ps(qr, _mm512_set1_ps(*kp.add(b0 + i)), a);
                }
                logits[j] = a;
                j += 1;
            }
            // Causal limits: lane l sees keys < limits[l]; the others get -inf before
            // the max and exactly 0 after the exp.
            let masked = s0 + n > min_limit;
            if masked {
                for (j, l) in logits[..n].iter_mut().enumerate() {
                    let key = _mm512_set1_epi32((s0 + j) as i32);
                    visible[j] = _mm512_cmplt_epu32_mask(key, lim);
                    *l = _mm512_mask_blend_ps(visible[j], _mm512_set1_ps(f32::NEG_INFINITY), *l);
                }
            }
            let mut bmax = _mm512_set1_ps(f32::NEG_INFINITY);
            for l in &logits[..n] {
                bmax = _mm512_max_ps(bmax, *l);
            }
            let new_m = _mm512_max_ps(m, bmax);
            let corr = exp512(_mm512_sub_ps(m, new_m));
            m = new_m;
            let mut bsum = _mm512_setzero_ps();
            for (j, l) in logits[..n].iter_mut().enumerate() {
                *l = exp512(_mm512_sub_ps(*l, m));
                if masked {
                    *l = _mm512_maskz_mov_ps(visible[j], *l);
                }
                bsum = _mm512_add_ps(bsum, *l);
            }
            sum = _mm512_fmadd_ps(sum, corr, bsum);
            for o in out_t.iter_mut() {
                *o = _mm512_mul_ps(*o, corr);
            }
            let mut j = 0;
            while j + 4 <= n {
                let b0 = j * vs;
                let (p0, p1, p2, p3) = (logits[j], logits[j + 1], logits[j + 2], logits[j + 3]);
                for (i, o) in out_t.iter_mut().enumerate() {
                    let mut acc = _mm512_fmadd_ps(p0, _mm512_set1_ps(*vp.add(b0 + i)), *o);
                    acc = _mm512_fmadd_ps(p1, _mm512_set1_ps(*vp.add(b0 + vs + i)), acc);
                    acc = _mm512_fmadd_ps(p2, _mm512_set1_ps(*vp.add(b0 + 2 * vs + i)), acc);
                    *o = _mm512_fmadd_ps(p3, _mm512_set1_ps(*vp.add(b0 + 3 * vs + i)), acc);
                }
                j += 4;
            }
            while j < n {
                let b0 = j * vs;
                let p = logits[j];
                for (i, o) in out_t.iter_mut().enumerate() {
                    *o = _mm512_fmadd_ps(p, _mm512_set1_ps(*vp.add(b0 + i)), *o);
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
        _mm512_storeu_ps(part.max.as_mut_ptr(), m);
        _mm512_storeu_ps(part.sum.as_mut_ptr(), sum);
        for (dst, src) in part.out_t.iter_mut().zip(&out_t) {
            _mm512_storeu_ps(dst.as_mut_ptr(), *src);
        }
        part
    }
}

/// Scan keys `range` of `rows` for 16 lanes of transposed, scaled queries; with
/// `limits`, lane l only sees keys below `limits[l]` (each lane must see the range's
/// first key).
fn scan_lanes<E: CacheElem>(
    avx512: bool,
    q_t: &[[f32; LANES]],
    rows: &KvRows<E>,
    range: std::ops::Range<usize>,
    limits: Option<&[u32; LANES]>,
) -> LanePartial {
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: AVX-512F (and with it FMA) support was checked at run time
        // (`has_avx512`); the function reads only the given slices.
        return unsafe { scan_lanes_avx512(q_t, rows, range, limits) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 and FMA support was checked at run time; the function reads only
        // the given slices.
        return unsafe { super::attention_avx2::scan_lanes(q_t, rows, range, limits) };
    }
    let _ = avx512;
    scan_lanes_generic(q_t, rows, range, limits)
}

/// Queries of heads `h0..h0 + nh` of `q` (heads x d), scaled and transposed into 16-lane
/// rows: `q_t[i][hh] = scale * q[h0 + hh][i]` (unused lanes 0).
fn transpose_heads(q: &[f32], h0: usize, nh: usize, d: usize, scale: f32) -> Vec<[f32; LANES]> {
    let mut q_t = vec![[0.0f32; LANES]; d];
    for hh in 0..nh {
        for (i, row) in q_t.iter_mut().enumerate() {
            row[hh] = scale * q[(h0 + hh) * d + i];
        }
    }
    q_t
}

/// Attention of one group's `g` heads (queries (g, dk), unscaled) over the first `n`
/// rows of `rows` (one group), all visible, on the calling thread: out (g, dv). The
/// sparse kernel's path after gathering the selected rows, and each query's scan in
/// [`prefill_at`].
pub(crate) fn attend_rows(q: &[f32], rows: &KvRows, n: usize, scale: f32, out: &mut [f32]) {
    let (dk, dv) = (rows.dk, rows.dv);
    let g = q.len() / dk;
    if g < 8 {
        let p = scan(q, rows, scale, 0..n);
        for hh in 0..g {
            let inv = 1.0 / p.sum[hh];
            for (a, &x) in out[hh * dv..(hh + 1) * dv]
                .iter_mut()
                .zip(&p.out[hh * dv..(hh + 1) * dv])
            {
                *a = x * inv;
            }
        }
        return;
    }
    let avx512 = has_avx512();
    for h0 in (0..g).step_by(LANES) {
        let nh = (g - h0).min(LANES);
        let q_t = transpose_heads(q, h0, nh, dk, scale);
        let p = scan_lanes(avx512, &q_t, rows, 0..n, None);
        for hh in 0..nh {
            let inv = 1.0 / p.sum[hh];
            let o = &mut out[(h0 + hh) * dv..(h0 + hh + 1) * dv];
            for (a, row) in o.iter_mut().zip(&p.out_t) {
                *a = row[hh] * inv;
            }
        }
    }
}

/// The MQA/GQA path for groups of >= 8 heads: heads in lanes of 16.
fn decode_lanes<E: CacheElem>(q: &[f32], rows: &KvRows<E>, s: usize, scale: f32, out: &mut [f32]) {
    let (dk, dv) = (rows.dk, rows.dv);
    let h = q.len() / dk;
    let g = h / rows.groups;
    let avx512 = has_avx512();
    for grp in 0..rows.groups {
        let rg = rows.group(grp);
        for h0 in (0..g).step_by(LANES) {
            let nh = (g - h0).min(LANES);
            let q_t = transpose_heads(q, grp * g + h0, nh, dk, scale);
            let ranges = thread_parts(s, 1024);
            let parts: Vec<LanePartial> = pool::map(ranges.len(), |i| {
                scan_lanes(avx512, &q_t, &rg, ranges[i].clone(), None)
            });
            for hh in 0..nh {
                let m = parts
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, p| m.max(p.max[hh]));
                let head = grp * g + h0 + hh;
                let o = &mut out[head * dv..(head + 1) * dv];
                let mut sum = 0.0;
                for p in &parts {
                    let c = fast_exp(p.max[hh] - m);
                    sum += p.sum[hh] * c;
                    for (a, row) in o.iter_mut().zip(&p.out_t) {
                        *a += c * row[hh];
                    }
                }
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|a| *a *= inv);
            }
        }
    }
}

/// Attention of one query q (H, dk) over the first `s` positions of `rows` (rows past
/// `s` are ignored): out (H, dv).
pub fn decode<E: CacheElem>(q: &[f32], rows: KvRows<E>, s: usize, scale: f32) -> Vec<f32> {
    rows.check();
    let (dk, dv) = (rows.dk, rows.dv);
    let h = q.len() / dk;
    let g = h / rows.groups;
    assert_eq!(
        q.len(),
        rows.groups * g * dk,
        "decode: queries are not (H, dk)"
    );
    assert!(
        s <= rows.cap && s > 0,
        "decode: {s} positions, cache holds {}",
        rows.cap
    );
    let mut out = vec![0.0f32; h * dv];
    if g >= 8 {
        decode_lanes(q, &rows, s, scale, &mut out);
        return out;
    }
    // Every (group, key range) pair is one task of a single parallel loop, so the
    // groups of a GQA layer share the threads instead of taking turns.
    let ranges = thread_parts(s, 1024);
    let tasks: Vec<(usize, std::ops::Range<usize>)> = (0..rows.groups)
        .flat_map(|grp| ranges.iter().map(move |r| (grp, r.clone())))
        .collect();
    // Tasks run group-major, so each group's partials are one consecutive chunk.
    let all: Vec<Partial> = pool::map(tasks.len(), |i| {
        let (grp, r) = tasks[i].clone();
        let qg = &q[grp * g * dk..(grp + 1) * g * dk];
        scan(qg, &rows.group(grp), scale, r)
    });
    for (grp, parts) in all.chunks(ranges.len()).enumerate() {
        for hh in 0..g {
            let m = parts
                .iter()
                .fold(f32::NEG_INFINITY, |m, p| m.max(p.max[hh]));
            let mut sum = 0.0;
            let o = &mut out[(grp * g + hh) * dv..(grp * g + hh + 1) * dv];
            for p in parts {
                let c = fast_exp(p.max[hh] - m);
                sum += p.sum[hh] * c;
                for (a, &x) in o.iter_mut().zip(&p.out[hh * dv..(hh + 1) * dv]) {
                    *a += c * x;
                }
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|a| *a *= inv);
        }
    }
    out
}

/// Dense causal attention of T queries over their own prefix (flash-style: no score
/// matrix): q (T, H, D), k, v (KV, T, D) -> out (T, H, D); query t sees positions
/// 0..=t. [`prefill_at`] with no cached context.
pub fn prefill(q: &[f32], k: &[f32], v: &[f32], kv: usize, d: usize, scale: f32) -> Vec<f32> {
    let rows = KvRows::separate(k, v, kv, d);
    prefill_at(q, rows, rows.cap, 0, scale)
}

/// Dense causal attention of `t` new queries at positions `offset..offset + t` over a
/// cache holding them and their context: q (t, H, dk); `rows` with at least
/// `offset + t` positions written (rows past that are ignored) -> out (t, H, dv); query
/// i sees positions 0..=offset + i. Blocked: each KV group's (query, head) pairs are
/// taken 16 at a time into the lanes of the decode kernel's vector scan, query-major,
/// so each key and value row is read once per 16 pairs whatever the group size (one
/// query's 16 heads under MQA, five queries' three heads under SmolLM2's GQA), and the
/// causal limit is a per-lane mask on the last key blocks. Key blocks start at
/// multiples of the block size from position 0 and a masked key adds exactly nothing,
/// so a query's result does not depend on which queries share its chunk or lanes.
/// Nothing of size (t, S) is built.
pub fn prefill_at<E: CacheElem>(
    q: &[f32],
    rows: KvRows<E>,
    t: usize,
    offset: usize,
    scale: f32,
) -> Vec<f32> {
    rows.check();
    let (dk, dv) = (rows.dk, rows.dv);
    if t == 0 {
        return Vec::new();
    }
    let h = q.len() / (t * dk);
    let g = h / rows.groups;
    assert_eq!(q.len(), t * h * dk, "prefill: queries are not (t, H, dk)");
    assert_eq!(
        h,
        rows.groups * g,
        "prefill: groups do not divide the heads"
    );
    assert!(offset + t <= rows.cap, "prefill: queries beyond the cache");
    // Queries per task: the fewest whose (query, head) pairs fill whole lane groups.
    let block = LANES / gcd(LANES, g);
    let avx512 = has_avx512();
    let mut out = vec![0.0f32; t * h * dv];
    pool::for_each_chunk_mut(&mut out, block * h * dv, |bi, o| {
        let t0 = bi * block;
        let nq = o.len() / (h * dv);
        for grp in 0..rows.groups {
            let rg = rows.group(grp);
            for r0 in (0..nq * g).step_by(LANES) {
                let nr = (nq * g - r0).min(LANES);
                let mut q_t = vec![[0.0f32; LANES]; dk];
                let mut limits = [u32::MAX; LANES]; // unused lanes: zero queries
                for l in 0..nr {
                    let (ti, hh) = ((r0 + l) / g, (r0 + l) % g);
                    let qrow = &q[((t0 + ti) * h + grp * g + hh) * dk..][..dk];
                    for (row, &x) in q_t.iter_mut().zip(qrow) {
                        row[l] = scale * x;
                    }
                    limits[l] = (offset + t0 + ti + 1) as u32;
                }
                let visible = offset + t0 + (r0 + nr - 1) / g + 1;
                let p = scan_lanes(avx512, &q_t, &rg, 0..visible, Some(&limits));
                for l in 0..nr {
                    let (ti, hh) = ((r0 + l) / g, (r0 + l) % g);
                    let inv = 1.0 / p.sum[l];
                    let dst = &mut o[(ti * h + grp * g + hh) * dv..][..dv];
                    for (a, row) in dst.iter_mut().zip(&p.out_t) {
                        *a = row[l] * inv;
                    }
                }
            }
        }
    });
    out
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Reference with candle ops: softmax(scale * q k^T) v per head over the first `s`
/// positions of `rows`, (H, dv).
pub fn reference<E: CacheElem>(
    q: &[f32],
    rows: KvRows<E>,
    s: usize,
    scale: f32,
) -> candle_core::Result<Vec<f32>> {
    use candle_core::{Device, Tensor, D};
    rows.check();
    let (kv, dk, dv) = (rows.groups, rows.dk, rows.dv);
    let g = q.len() / dk / kv;
    let mut keys = Vec::with_capacity(kv * s * dk);
    let mut values = Vec::with_capacity(kv * s * dv);
    for grp in 0..kv {
        let r = rows.group(grp);
        for pos in 0..s {
            E::extend_f32(r.key(pos), &mut keys);
            E::extend_f32(r.value(pos), &mut values);
        }
    }
    let dev = Device::Cpu;
    let q = Tensor::from_slice(q, (kv, g, dk), &dev)?;
    let k = Tensor::from_vec(keys, (kv, s, dk), &dev)?;
    let v = Tensor::from_vec(values, (kv, s, dv), &dev)?;
    let att = (q.matmul(&k.t()?)? * scale as f64)?;
    let att = candle_nn::ops::softmax(&att, D::Minus1)?;
    att.matmul(&v)?.flatten_all()?.to_vec1()
}
