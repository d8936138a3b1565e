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
use rayon::prelude::*;

const KEY_BLOCK: usize = 64;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0.0f32; L];
    let mut ca = a.chunks_exact(L);
    let mut cb = b.chunks_exact(L);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0;
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// Partial result of one key range: per head (max, sum, unnormalised output).
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    /// (G, D)
    out: Vec<f32>,
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
                logits[h * KEY_BLOCK + j] = scale * dot(&q[h * d..(h + 1) * d], krow);
            }
        }
        for h in 0..g {
            let l = &mut logits[h * KEY_BLOCK..h * KEY_BLOCK + n];
            let bmax = l.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let new_max = part.max[h].max(bmax);
            let corr = fast_exp(part.max[h] - new_max);
            part.max[h] = new_max;
            let mut bsum = 0.0;
            for x in l.iter_mut() {
                *x = fast_exp(*x - new_max);
                bsum += *x;
            }
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

/// `a * b + c`, fused when the caller is compiled with FMA (the AVX-512 build), plain
/// otherwise (an unfused fallback keeps the portable build free of libm `fmaf` calls).
trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}
struct Fused;
struct Unfused;
impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}
impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
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
fn scan_lanes_generic<M: MulAdd>(q_t: &[[f32; LANES]], k: &[f32], v: &[f32], range: std::ops::Range<usize>) -> LanePartial {
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
        // Scores of the block: logits[j][h].
        let mut j = 0;
        while j < n {
            let m = (n - j).min(KEYS_PER_STEP);
            let mut acc = [[0.0f32; LANES]; KEYS_PER_STEP];
            for (i, qr) in q_t.iter().enumerate() {
                for (jj, a) in acc.iter_mut().enumerate().take(m) {
                    let kv = k[(s0 + j + jj) * d + i];
                    for l in 0..LANES {
                        a[l] = M::mul_add(qr[l], kv, a[l]);
                    }
                }
            }
            logits[j..j + m].copy_from_slice(&acc[..m]);
            j += m;
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
        while j < n {
            let m = (n - j).min(KEYS_PER_STEP);
            for (i, o) in part.out_t.iter_mut().enumerate() {
                let mut acc = *o;
                for jj in 0..m {
                    let vv = v[(s0 + j + jj) * d + i];
                    let p = &logits[j + jj];
                    for l in 0..LANES {
                        acc[l] = M::mul_add(p[l], vv, acc[l]);
                    }
                }
                *o = acc;
            }
            j += m;
        }
        s0 += n;
    }
    part
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn scan_lanes_avx512(q_t: &[[f32; LANES]], k: &[f32], v: &[f32], range: std::ops::Range<usize>) -> LanePartial {
    scan_lanes_generic::<Fused>(q_t, k, v, range)
}

fn scan_lanes(avx512: bool, q_t: &[[f32; LANES]], k: &[f32], v: &[f32], range: std::ops::Range<usize>) -> LanePartial {
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: AVX-512F (and with it FMA) support was checked at run time
        // (`has_avx512`); the function reads only the given slices.
        return unsafe { scan_lanes_avx512(q_t, k, v, range) };
    }
    let _ = avx512;
    scan_lanes_generic::<Unfused>(q_t, k, v, range)
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
        let mut q_t = vec![[0.0f32; LANES]; d];
        for hh in 0..nh {
            for (i, row) in q_t.iter_mut().enumerate() {
                row[hh] = scale * q[(h0 + hh) * d + i];
            }
        }
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
fn decode_lanes(q: &[f32], k: &[f32], v: &[f32], kv: usize, s: usize, d: usize, scale: f32, out: &mut [f32]) {
    let h = q.len() / d;
    let g = h / kv;
    let cap = k.len() / (kv * d);
    let threads = rayon::current_num_threads().max(1);
    let per = s.div_ceil(threads).max(1024);
    let avx512 = has_avx512();
    for grp in 0..kv {
        let kg = &k[grp * cap * d..(grp + 1) * cap * d];
        let vg = &v[grp * cap * d..(grp + 1) * cap * d];
        for h0 in (0..g).step_by(LANES) {
            let nh = (g - h0).min(LANES);
            let mut q_t = vec![[0.0f32; LANES]; d];
            for hh in 0..nh {
                let head = grp * g + h0 + hh;
                for (i, row) in q_t.iter_mut().enumerate() {
                    row[hh] = scale * q[head * d + i];
                }
            }
            let parts: Vec<LanePartial> = (0..s)
                .step_by(per)
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(|s0| scan_lanes(avx512, &q_t, kg, vg, s0..(s0 + per).min(s)))
                .collect();
            for hh in 0..nh {
                let m = parts.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.max[hh]));
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
    let threads = rayon::current_num_threads().max(1);
    let per = s.div_ceil(threads).max(1024);
    let avx512 = has_avx512();
    for grp in 0..kv {
        let qg = &q[grp * g * d..(grp + 1) * g * d];
        let kg = &k[grp * cap * d..(grp + 1) * cap * d];
        let vg = &v[grp * cap * d..(grp + 1) * cap * d];
        let parts: Vec<Partial> = (0..s)
            .step_by(per)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|s0| scan(avx512, qg, kg, vg, d, scale, s0..(s0 + per).min(s)))
            .collect();
        for hh in 0..g {
            let m = parts
                .iter()
                .fold(f32::NEG_INFINITY, |m, p| m.max(p.max[hh]));
            let mut sum = 0.0;
            let o = &mut out[(grp * g + hh) * d..(grp * g + hh + 1) * d];
            for p in &parts {
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
