//! Dense attention for one new query against a KV cache (the dense side of the decode
//! benchmark, and the yardstick the sparse path is measured against).
//!
//! q (H, D); k, v (KV, S, D); all S positions visible. Flash-decoding: the key range is
//! split over the threads, each part runs an online softmax per head over key blocks
//! (running max, running sum, running output), and the parts are merged with their
//! log-sum-exp. Under MQA each key and value row is read from memory once and used by
//! all G = H / KV heads of its group, so the scan streams the cache exactly once. For
//! G >= 8 the heads sit in the 16 lanes of a vector: each key element is broadcast
//! against the transposed queries of 16 heads (fused multiply-add in the AVX-512
//! build), with no horizontal reductions; smaller groups use per-head dot products.
//! [`reference`] is the composed candle version.

use super::simd::{fast_exp, has_avx512};
use super::{dot_tree, thread_parts};
use rayon::prelude::*;

const KEY_BLOCK: usize = 64;

/// Partial result of one key range: per head (max, sum, unnormalised output).
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    /// (G, D)
    out: Vec<f32>,
}

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
fn scan_generic(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: usize,
    scale: f32,
    range: std::ops::Range<usize>,
) -> Partial {
    let g = q.len() / d;
    let mut part = Partial {
        max: vec![f32::NEG_INFINITY; g],
        sum: vec![0.0; g],
        out: vec![0.0; g * d],
    };
    let mut logits = vec![0.0f32; g * KEY_BLOCK];
    let mut s0 = range.start;
    while s0 < range.end {
        let n = (range.end - s0).min(KEY_BLOCK);
        for j in 0..n {
            let krow = &k[(s0 + j) * d..(s0 + j + 1) * d];
            for h in 0..g {
                logits[h * KEY_BLOCK + j] = scale * dot_tree(&q[h * d..(h + 1) * d], krow);
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
                part.out[h * d..(h + 1) * d]
                    .iter_mut()
                    .for_each(|o| *o *= corr);
            }
        }
        for j in 0..n {
            let vrow = &v[(s0 + j) * d..(s0 + j + 1) * d];
            for h in 0..g {
                let p = logits[h * KEY_BLOCK + j];
                for (o, &x) in part.out[h * d..(h + 1) * d].iter_mut().zip(vrow) {
                    *o += p * x;
                }
            }
        }
        s0 += n;
    }
    part
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn scan_avx512(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: usize,
    scale: f32,
    range: std::ops::Range<usize>,
) -> Partial {
    scan_generic(q, k, v, d, scale, range)
}

fn scan(
    avx512: bool,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: usize,
    scale: f32,
    range: std::ops::Range<usize>,
) -> Partial {
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: AVX-512F support was checked at run time (`has_avx512`); the function
        // reads only the given slices.
        return unsafe { scan_avx512(q, k, v, d, scale, range) };
    }
    let _ = avx512;
    scan_generic(q, k, v, d, scale, range)
}

/// Heads per lane group of the MQA path (one AVX-512 register of f32).
const LANES: usize = 16;
/// Keys sharing each load of the transposed queries.
const KEYS_PER_STEP: usize = 4;

/// The four consecutive rows of width `d` starting at element `b0`.
#[inline(always)]
fn rows4(x: &[f32], b0: usize, d: usize) -> (&[f32], &[f32], &[f32], &[f32]) {
    let r = &x[b0..b0 + 4 * d];
    let (a, rest) = r.split_at(d);
    let (b, rest) = rest.split_at(d);
    let (c, e) = rest.split_at(d);
    (a, b, c, e)
}

/// Partial result over a key range for 16 heads at once: lanes are heads.
struct LanePartial {
    max: [f32; LANES],
    sum: [f32; LANES],
    /// (D) rows of 16 head lanes: the unnormalised output, transposed.
    out_t: Vec<[f32; LANES]>,
}

/// Scan keys `range` for one group of up to 16 heads whose scaled queries are given
/// transposed, `q_t[i][h] = scale * q[h][i]`. Each key row is loaded once and
/// broadcast against the 16 head lanes; four keys share each load of `q_t`.
#[inline(always)]
fn scan_lanes_generic(
    q_t: &[[f32; LANES]],
    k: &[f32],
    v: &[f32],
    range: std::ops::Range<usize>,
) -> LanePartial {
    let d = q_t.len();
    let mut part = LanePartial {
        max: [f32::NEG_INFINITY; LANES],
        sum: [0.0; LANES],
        out_t: vec![[0.0; LANES]; d],
    };
    let mut logits = [[0.0f32; LANES]; KEY_BLOCK];
    let mut s0 = range.start;
    while s0 < range.end {
        let n = (range.end - s0).min(KEY_BLOCK);
        // Scores of the block: logits[j][h]; four keys per pass over q_t.
        let mut j = 0;
        while j + KEYS_PER_STEP <= n {
            let b0 = (s0 + j) * d;
            let (r0, r1, r2, r3) = rows4(k, b0, d);
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
            let r = &k[(s0 + j) * d..(s0 + j + 1) * d];
            let mut a = [0.0f32; LANES];
            for (qr, &x) in q_t.iter().zip(r) {
                for l in 0..LANES {
                    a[l] += qr[l] * x;
                }
            }
            logits[j] = a;
            j += 1;
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
            let b0 = (s0 + j) * d;
            let (r0, r1, r2, r3) = rows4(v, b0, d);
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
            let r = &v[(s0 + j) * d..(s0 + j + 1) * d];
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
fn scan_lanes_avx512(
    q_t: &[[f32; LANES]],
    k: &[f32],
    v: &[f32],
    range: std::ops::Range<usize>,
) -> LanePartial {
    use std::arch::x86_64::*;
    let d = q_t.len();
    assert!(
        range.end * d <= k.len() && range.end * d <= v.len(),
        "scan range beyond the cache"
    );

    #[inline(always)]
    fn exp512(x: __m512) -> __m512 {
        // SAFETY (all intrinsics below): register-only AVX-512F arithmetic; the caller
        // runs with AVX-512F enabled.
        unsafe {
            let x = _mm512_max_ps(
                _mm512_min_ps(x, _mm512_set1_ps(88.0)),
                _mm512_set1_ps(-87.0),
            );
            let n = _mm512_roundscale_ps(
                _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
            let mut p = _mm512_set1_ps(1.0 / 720.0);
            for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            _mm512_scalef_ps(p, n)
        }
    }

    // SAFETY: every pointer read below is k/v[(s0 + j) * d + i] with s0 + j < range.end
    // and i < d, in bounds by the assert above; `q_t` and `out_t` rows are 16 f32
    // (one unaligned 512-bit load / store each). AVX-512F and FMA are enabled on this
    // function and were detected at run time by the caller.
    unsafe {
        let kp = k.as_ptr();
        let vp = v.as_ptr();
        let qrows: Vec<__m512> = q_t.iter().map(|r| _mm512_loadu_ps(r.as_ptr())).collect();
        let mut out_t: Vec<__m512> = vec![_mm512_setzero_ps(); d];
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut sum = _mm512_setzero_ps();
        let mut logits = [_mm512_setzero_ps(); KEY_BLOCK];
        let mut s0 = range.start;
        while s0 < range.end {
            let n = (range.end - s0).min(KEY_BLOCK);
            let mut j = 0;
            while j + 4 <= n {
                let b0 = (s0 + j) * d;
                // Prefetch the rows one block ahead (a no-op past the end: prefetches
                // never fault, and the address is formed without `add`'s bounds rule).
                for line in (0..4 * d).step_by(16) {
                    let ahead = kp.wrapping_add(b0 + KEY_BLOCK * d + line);
                    _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                    let ahead = vp.wrapping_add(b0 + KEY_BLOCK * d + line);
                    _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                }
                let (mut a0, mut a1, mut a2, mut a3) = (
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                );
                for (i, &qr) in qrows.iter().enumerate() {
                    a0 = _mm512_fmadd_ps(qr, _mm512_set1_ps(*kp.add(b0 + i)), a0);
                    a1 = _mm512_fmadd_ps(qr, _mm512_set1_ps(*kp.add(b0 + d + i)), a1);
                    a2 = _mm512_fmadd_ps(qr, _mm512_set1_ps(*kp.add(b0 + 2 * d + i)), a2);
                    a3 = _mm512_fmadd_ps(qr, _mm512_set1_ps(*kp.add(b0 + 3 * d + i)), a3);
                }
                logits[j] = a0;
                logits[j + 1] = a1;
                logits[j + 2] = a2;
                logits[j + 3] = a3;
                j += 4;
            }
            while j < n {
                let b0 = (s0 + j) * d;
                let mut a = _mm512_setzero_ps();
                for (i, &qr) in qrows.iter().enumerate() {
                    a = _mm512_fmadd_ps(qr, _mm512_set1_ps(*kp.add(b0 + i)), a);
                }
                logits[j] = a;
                j += 1;
            }
            let mut bmax = _mm512_set1_ps(f32::NEG_INFINITY);
            for l in &logits[..n] {
                bmax = _mm512_max_ps(bmax, *l);
            }
            let new_m = _mm512_max_ps(m, bmax);
            let corr = exp512(_mm512_sub_ps(m, new_m));
            m = new_m;
            let mut bsum = _mm512_setzero_ps();
            for l in &mut logits[..n] {
                *l = exp512(_mm512_sub_ps(*l, m));
                bsum = _mm512_add_ps(bsum, *l);
            }
            sum = _mm512_fmadd_ps(sum, corr, bsum);
            for o in out_t.iter_mut() {
                *o = _mm512_mul_ps(*o, corr);
            }
            let mut j = 0;
            while j + 4 <= n {
                let b0 = (s0 + j) * d;
                let (p0, p1, p2, p3) = (logits[j], logits[j + 1], logits[j + 2], logits[j + 3]);
                for (i, o) in out_t.iter_mut().enumerate() {
                    let mut acc = _mm512_fmadd_ps(p0, _mm512_set1_ps(*vp.add(b0 + i)), *o);
                    acc = _mm512_fmadd_ps(p1, _mm512_set1_ps(*vp.add(b0 + d + i)), acc);
                    acc = _mm512_fmadd_ps(p2, _mm512_set1_ps(*vp.add(b0 + 2 * d + i)), acc);
                    *o = _mm512_fmadd_ps(p3, _mm512_set1_ps(*vp.add(b0 + 3 * d + i)), acc);
                }
                j += 4;
            }
            while j < n {
                let b0 = (s0 + j) * d;
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
            out_t: vec![[0.0; LANES]; d],
        };
        _mm512_storeu_ps(part.max.as_mut_ptr(), m);
        _mm512_storeu_ps(part.sum.as_mut_ptr(), sum);
        for (dst, src) in part.out_t.iter_mut().zip(&out_t) {
            _mm512_storeu_ps(dst.as_mut_ptr(), *src);
        }
        part
    }
}

fn scan_lanes(
    avx512: bool,
    q_t: &[[f32; LANES]],
    k: &[f32],
    v: &[f32],
    range: std::ops::Range<usize>,
) -> LanePartial {
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: AVX-512F (and with it FMA) support was checked at run time
        // (`has_avx512`); the function reads only the given slices.
        return unsafe { scan_lanes_avx512(q_t, k, v, range) };
    }
    let _ = avx512;
    scan_lanes_generic(q_t, k, v, range)
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

/// Attention of one group's `g` heads (queries (g, D), unscaled) over `n` key and value
/// rows (n, D), all visible, on the calling thread: out (g, D). The sparse kernel's
/// fast path, after gathering the selected rows.
pub(crate) fn attend_rows(q: &[f32], k: &[f32], v: &[f32], d: usize, scale: f32, out: &mut [f32]) {
    let g = q.len() / d;
    let n = k.len() / d;
    let avx512 = has_avx512();
    for h0 in (0..g).step_by(LANES) {
        let nh = (g - h0).min(LANES);
        let q_t = transpose_heads(q, h0, nh, d, scale);
        let p = scan_lanes(avx512, &q_t, k, v, 0..n);
        for hh in 0..nh {
            let inv = 1.0 / p.sum[hh];
            let o = &mut out[(h0 + hh) * d..(h0 + hh + 1) * d];
            for (a, row) in o.iter_mut().zip(&p.out_t) {
                *a = row[hh] * inv;
            }
        }
    }
}

/// The MQA/GQA path for groups of >= 8 heads: heads in lanes of 16.
#[allow(clippy::too_many_arguments)]
fn decode_lanes(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv: usize,
    s: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    let h = q.len() / d;
    let g = h / kv;
    let cap = k.len() / (kv * d);
    let avx512 = has_avx512();
    for grp in 0..kv {
        let kg = &k[grp * cap * d..(grp + 1) * cap * d];
        let vg = &v[grp * cap * d..(grp + 1) * cap * d];
        for h0 in (0..g).step_by(LANES) {
            let nh = (g - h0).min(LANES);
            let q_t = transpose_heads(q, grp * g + h0, nh, d, scale);
            let parts: Vec<LanePartial> = thread_parts(s, 1024)
                .into_par_iter()
                .map(|r| scan_lanes(avx512, &q_t, kg, vg, r))
                .collect();
            for hh in 0..nh {
                let m = parts
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, p| m.max(p.max[hh]));
                let head = grp * g + h0 + hh;
                let o = &mut out[head * d..(head + 1) * d];
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

/// Attention of one query q (H, D) over `s` cached positions of k, v (KV, cap, D)
/// (rows past `s` are ignored): out (H, D).
pub fn decode(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv: usize,
    s: usize,
    d: usize,
    scale: f32,
) -> Vec<f32> {
    let h = q.len() / d;
    let g = h / kv;
    let cap = k.len() / (kv * d);
    assert!(
        s <= cap && s > 0,
        "decode: {s} positions, cache holds {cap}"
    );
    let mut out = vec![0.0f32; h * d];
    if g >= 8 {
        decode_lanes(q, k, v, kv, s, d, scale, &mut out);
        return out;
    }
    let avx512 = has_avx512();
    // Every (group, key range) pair is one task of a single parallel loop, so the
    // groups of a GQA layer share the threads instead of taking turns.
    let ranges = thread_parts(s, 1024);
    let tasks: Vec<(usize, std::ops::Range<usize>)> = (0..kv)
        .flat_map(|grp| ranges.iter().map(move |r| (grp, r.clone())))
        .collect();
    // Tasks run group-major, so each group's partials are one consecutive chunk.
    let all: Vec<Partial> = tasks
        .into_par_iter()
        .map(|(grp, r)| {
            let qg = &q[grp * g * d..(grp + 1) * g * d];
            let kg = &k[grp * cap * d..(grp + 1) * cap * d];
            let vg = &v[grp * cap * d..(grp + 1) * cap * d];
            scan(avx512, qg, kg, vg, d, scale, r)
        })
        .collect();
    for (grp, parts) in all.chunks(ranges.len()).enumerate() {
        for hh in 0..g {
            let m = parts
                .iter()
                .fold(f32::NEG_INFINITY, |m, p| m.max(p.max[hh]));
            let mut sum = 0.0;
            let o = &mut out[(grp * g + hh) * d..(grp * g + hh + 1) * d];
            for p in parts {
                let c = fast_exp(p.max[hh] - m);
                sum += p.sum[hh] * c;
                for (a, &x) in o.iter_mut().zip(&p.out[hh * d..(hh + 1) * d]) {
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
    let t = k.len() / (kv * d).max(1);
    prefill_at(q, k, v, kv, t, t, 0, d, scale)
}

/// Dense causal attention of `t` new queries at positions `offset..offset + t` over a
/// cache holding them and their context: q (t, H, D); k, v (KV, cap, D) with at least
/// `offset + t` rows written per head (rows past that are ignored) -> out (t, H, D);
/// query i sees positions 0..=offset + i. Queries run in parallel, each scanning its
/// visible rows with the same kernels as [`decode`] (16 heads per vector lane group
/// when G >= 8, per-head dots otherwise); nothing of size (t, S) is built.
#[allow(clippy::too_many_arguments)]
pub fn prefill_at(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv: usize,
    cap: usize,
    t: usize,
    offset: usize,
    d: usize,
    scale: f32,
) -> Vec<f32> {
    let mut out = vec![0.0f32; q.len()];
    if t == 0 {
        return out;
    }
    let h = q.len() / (t * d);
    let g = h / kv;
    assert_eq!(q.len(), t * h * d, "prefill: queries are not (t, H, D)");
    assert_eq!(k.len(), kv * cap * d, "prefill: keys are not (KV, cap, D)");
    assert_eq!(
        v.len(),
        k.len(),
        "prefill: values differ from the keys in size"
    );
    assert!(offset + t <= cap, "prefill: queries beyond the cache");
    let avx512 = has_avx512();
    out.par_chunks_mut(h * d)
        .with_min_len(4)
        .enumerate()
        .for_each(|(ti, o)| {
            let visible = offset + ti + 1;
            for grp in 0..kv {
                let kg = &k[grp * cap * d..(grp * cap + visible) * d];
                let vg = &v[grp * cap * d..(grp * cap + visible) * d];
                let qg = &q[(ti * h + grp * g) * d..(ti * h + (grp + 1) * g) * d];
                let og = &mut o[grp * g * d..(grp + 1) * g * d];
                if g >= 8 {
                    attend_rows(qg, kg, vg, d, scale, og);
                } else {
                    let p = scan(avx512, qg, kg, vg, d, scale, 0..visible);
                    for hh in 0..g {
                        let inv = 1.0 / p.sum[hh];
                        for (a, &x) in og[hh * d..(hh + 1) * d]
                            .iter_mut()
                            .zip(&p.out[hh * d..(hh + 1) * d])
                        {
                            *a = x * inv;
                        }
                    }
                }
            }
        });
    out
}

/// Reference with candle ops: softmax(scale * q k^T) v per head, (H, D).
pub fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv: usize,
    s: usize,
    d: usize,
    scale: f32,
) -> candle_core::Result<Vec<f32>> {
    use candle_core::{Device, Tensor, D};
    let h = q.len() / d;
    let g = h / kv;
    let cap = k.len() / (kv * d);
    let dev = Device::Cpu;
    let q = Tensor::from_slice(q, (kv, g, d), &dev)?;
    let k = Tensor::from_slice(k, (kv, cap, d), &dev)?.narrow(1, 0, s)?;
    let v = Tensor::from_slice(v, (kv, cap, d), &dev)?.narrow(1, 0, s)?;
    let att = (q.matmul(&k.t()?)? * scale as f64)?;
    let att = candle_nn::ops::softmax(&att, D::Minus1)?;
    att.matmul(&v.contiguous()?)?.flatten_all()?.to_vec1()
}
