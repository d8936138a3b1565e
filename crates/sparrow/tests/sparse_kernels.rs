//! DSA kernels against their plain references on random inputs of awkward sizes (not
//! multiples of the key block, the query block or the SIMD width): indexer top-k vs a
//! sort of the full score matrix, causality, prefill vs decode agreement, sparse
//! attention forward and backward vs masked dense attention and finite differences,
//! the straight-through gate, and the dense decode kernel.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{check_gradients, randn, rel_err, rel_err_f64, to_f64_vec};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparrow::kernels::indexer::{self, IndexShape, KeyPrecision, KeyStore, ScoreAct, TopkQueries};
use sparrow::kernels::kv_rows::{KvRows, Values};
use sparrow::kernels::sparse_attention::{self, HeadCombine, SparseAttention, SparseDims, SteGate};
use sparrow::kernels::topk::{topk_by_sort, NONE};
use sparrow::kernels::{decode_attention, reference};
use std::sync::Arc;

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// Index keys + queries of one batch row.
struct IndexCase {
    q: Vec<f32>,
    w: Vec<f32>,
    keys: Vec<f32>,
}

fn index_case(t: usize, s: usize, shape: IndexShape, seed: u64) -> IndexCase {
    IndexCase {
        q: rand_vec(t * shape.heads * shape.dim, seed),
        w: rand_vec(t * shape.heads, seed + 1),
        keys: rand_vec(s * shape.dim, seed + 2),
    }
}

#[test]
fn indexer_topk_equals_sort_of_full_scores() {
    let shapes = [
        IndexShape {
            heads: 3,
            dim: 13,
            act: ScoreAct::Relu,
        },
        IndexShape {
            heads: 1,
            dim: 7,
            act: ScoreAct::Identity,
        },
        IndexShape {
            heads: 4,
            dim: 32,
            act: ScoreAct::Relu,
        },
        // The grouped loops: heads in groups of 16 (and of 8), keys in chunks.
        IndexShape {
            heads: 32,
            dim: 9,
            act: ScoreAct::Relu,
        },
        IndexShape {
            heads: 24,
            dim: 5,
            act: ScoreAct::Identity,
        },
    ];
    let mut case_seed = 10;
    for shape in shapes {
        for &(t, offset, k) in &[
            (37usize, 0usize, 17usize),
            (29, 150, 41),
            (5, 3, 200),
            (70, 61, 1),
        ] {
            for precision in [KeyPrecision::F32, KeyPrecision::Bf16, KeyPrecision::Int8] {
                case_seed += 10;
                let s = offset + t;
                let rows: Vec<IndexCase> = (0..2)
                    .map(|b| index_case(t, s, shape, case_seed + b))
                    .collect();
                let stores: Vec<KeyStore> = rows
                    .iter()
                    .map(|r| {
                        let mut ks = KeyStore::new(shape.dim, precision);
                        ks.extend_rows(&r.keys);
                        ks
                    })
                    .collect();
                let queries: Vec<TopkQueries> = rows
                    .iter()
                    .map(|r| TopkQueries {
                        q: &r.q,
                        w: &r.w,
                        offset,
                    })
                    .collect();
                let store_refs: Vec<&KeyStore> = stores.iter().collect();
                let got = indexer::topk_prefill(&queries, &store_refs, shape, t, k);
                assert_eq!(got.len(), 2 * t * k);
                for b in 0..2 {
                    let scores = indexer::scores_reference(&queries[b], &stores[b], shape, t);
                    for ti in 0..t {
                        let visible = offset + ti + 1;
                        let want = topk_by_sort(&scores[ti * s..ti * s + visible], k);
                        let row = &got[(b * t + ti) * k..(b * t + ti + 1) * k];
                        assert_eq!(
                            row,
                            &want[..],
                            "shape {shape:?} t {ti} offset {offset} k {k} {precision:?}"
                        );
                        // Causal: nothing beyond the query's own position.
                        assert!(row.iter().all(|&i| i == NONE || (i as usize) < visible));
                        // Fewer visible keys than k: every visible key is selected.
                        if visible <= k {
                            let all: Vec<u32> = (0..visible as u32).collect();
                            assert_eq!(&row[..visible], &all[..]);
                        }
                    }
                }
                // The decode path (one query, the whole cache) selects the same set as the
                // prefill row of the last query.
                let last = t - 1;
                let hd = shape.heads * shape.dim;
                let dec = indexer::topk_decode(
                    &rows[1].q[last * hd..(last + 1) * hd],
                    &rows[1].w[last * shape.heads..(last + 1) * shape.heads],
                    &stores[1],
                    shape,
                    k,
                );
                assert_eq!(dec, got[(t + last) * k..(t + last + 1) * k].to_vec());
            }
        }
    }
}

/// The int8 index cache rounds keys and queries (one absmax scale per key and per
/// query head) and scores in integers: its scores stay within the rounding of the
/// float scores, for head counts taking every group width of the VNNI kernel and
/// widths that are not multiples of four.
#[test]
fn int8_index_scores_follow_the_float_scores() {
    for (heads, dim, act) in [
        (16, 64, ScoreAct::Relu),
        (6, 13, ScoreAct::Relu),
        (5, 7, ScoreAct::Identity),
        (8, 30, ScoreAct::Identity),
    ] {
        let shape = IndexShape { heads, dim, act };
        let (t, s) = (4usize, 150usize);
        let case = index_case(t, s, shape, 900 + dim as u64);
        let rows = TopkQueries {
            q: &case.q,
            w: &case.w,
            offset: s - t,
        };
        let scores = |precision| {
            let mut store = KeyStore::new(dim, precision);
            store.extend_rows(&case.keys);
            indexer::scores_reference(&rows, &store, shape, t)
        };
        let (exact, int8) = (scores(KeyPrecision::F32), scores(KeyPrecision::Int8));
        for ti in 0..t {
            let visible = s - t + ti + 1;
            let e = &exact[ti * s..ti * s + visible];
            let q = &int8[ti * s..ti * s + visible];
            let top = e.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let worst = e
                .iter()
                .zip(q)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= 0.03 * top,
                "{shape:?} query {ti}: int8 scores off by {worst} (largest score {top})"
            );
            if visible < s {
                assert_eq!(int8[ti * s + visible], f32::NEG_INFINITY, "causal");
            }
        }
    }
}

#[test]
fn indexer_ties_break_to_the_lower_position_in_every_path() {
    // Two ReLU heads with negative weights on half the keys: many scores are exactly 0.
    let shape = IndexShape {
        heads: 2,
        dim: 4,
        act: ScoreAct::Relu,
    };
    let (t, s, k) = (3usize, 700usize, 100usize);
    let mut keys = rand_vec(s * shape.dim, 5);
    for (i, x) in keys.iter_mut().enumerate() {
        if !(i / shape.dim).is_multiple_of(3) {
            *x = -x.abs(); // most keys score 0 against a positive query
        }
    }
    let q: Vec<f32> = rand_vec(t * 8, 6).iter().map(|x| x.abs()).collect();
    let w = vec![1.0f32; t * 2];
    let mut store = KeyStore::new(shape.dim, KeyPrecision::F32);
    store.extend_rows(&keys);
    let rows = [TopkQueries {
        q: &q,
        w: &w,
        offset: s - t,
    }];
    let got = indexer::topk_prefill(&rows, &[&store], shape, t, k);
    let scores = indexer::scores_reference(&rows[0], &store, shape, t);
    let last = &got[(t - 1) * k..];
    assert_eq!(last, &topk_by_sort(&scores[(t - 1) * s..], k)[..]);
    let zeros = scores[(t - 1) * s..].iter().filter(|&&x| x == 0.0).count();
    assert!(
        zeros > k,
        "the case must tie at the k-th score ({zeros} zeros)"
    );
    let dec = indexer::topk_decode(&q[(t - 1) * 8..], &w[(t - 1) * 2..], &store, shape, k);
    assert_eq!(dec, last.to_vec());
}

/// Random selection rows (sorted, distinct, causal, NONE-padded) like the indexer's.
fn random_selection(b: usize, t: usize, s: usize, k: usize, offset: usize, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(b * t * k);
    for _ in 0..b {
        for ti in 0..t {
            let visible = (offset + ti + 1).min(s);
            let mut pos: Vec<u32> = (0..visible as u32).collect();
            // Partial shuffle: keep a random subset of size <= k, always the query itself.
            for i in 0..pos.len() {
                let j = rng.random_range(i..pos.len());
                pos.swap(i, j);
            }
            let mut sel: Vec<u32> = pos.into_iter().take(k).collect();
            if !sel.contains(&((visible - 1) as u32)) {
                sel[0] = (visible - 1) as u32;
            }
            sel.sort_unstable();
            sel.resize(k, NONE);
            out.extend(sel);
        }
    }
    out
}

#[test]
fn sparse_attention_forward_matches_masked_dense() {
    for &(b, t, h, kv, s, d, k, offset) in &[
        (
            2usize, 7usize, 6usize, 1usize, 19usize, 13usize, 5usize, 12usize,
        ),
        (1, 11, 4, 2, 11, 24, 11, 0),
        (3, 5, 16, 1, 40, 64, 9, 35),
        (2, 9, 24, 2, 30, 20, 7, 21), // 12 heads per KV head: a partly filled lane group
        (1, 3, 40, 1, 50, 8, 45, 47), // 40 heads: two full lane groups and a partial one
    ] {
        for dtype in [DType::F32, DType::F64] {
            let q = randn(&[b, t, h, d], 1, dtype);
            let kt = randn(&[b, kv, s, d], 2, dtype);
            let vt = randn(&[b, kv, s, d], 3, dtype);
            let idx = random_selection(b, t, s, k, offset, 4);
            let scale = 1.0 / (d as f64).sqrt();
            let op = SparseAttention {
                dims: SparseDims {
                    b,
                    t,
                    h,
                    kv,
                    s,
                    d,
                    k,
                },
                scale,
                idx: Arc::new(idx.clone()),
            };
            let got = op.apply(&q, &kt, &vt).unwrap();
            let want = reference::sparse_attention(&q, &kt, &vt, &idx, None, scale).unwrap();
            let tol = if dtype == DType::F32 { 2e-6 } else { 1e-12 };
            let err = rel_err(&got, &want);
            assert!(
                err < tol,
                "{dtype:?} ({b},{t},{h},{kv},{s},{d},{k}): rel err {err:e}"
            );
        }
    }
}

#[test]
fn sparse_equals_dense_when_the_context_fits_in_k() {
    let (b, t, h, kv, d) = (2usize, 9usize, 4usize, 1usize, 16usize);
    for offset in [0usize, 6] {
        let s = offset + t;
        let k = s + 3; // more slots than visible keys
        let q = randn(&[b, t, h, d], 11, DType::F32);
        let kt = randn(&[b, kv, s, d], 12, DType::F32);
        let vt = randn(&[b, kv, s, d], 13, DType::F32);
        // What the indexer returns when at most k keys are visible: all of them.
        let idx: Vec<u32> = (0..b * t)
            .flat_map(|r| {
                let visible = offset + r % t + 1;
                (0..k as u32).map(move |i| if (i as usize) < visible { i } else { NONE })
            })
            .collect();
        let scale = 0.25;
        let sparse = SparseAttention {
            dims: SparseDims {
                b,
                t,
                h,
                kv,
                s,
                d,
                k,
            },
            scale,
            idx: Arc::new(idx),
        }
        .apply(&q, &kt, &vt)
        .unwrap();
        // Dense causal attention, composed from candle ops.
        let qh = q.transpose(1, 2).unwrap().contiguous().unwrap(); // (B, H, T, D)
        let kh = kt.repeat((1, h, 1, 1)).unwrap();
        let vh = vt.repeat((1, h, 1, 1)).unwrap();
        let scores = qh.matmul(&kh.t().unwrap()).unwrap();
        let p = reference::causal_softmax(&scores, scale, t, offset).unwrap();
        let dense = p.matmul(&vh).unwrap().transpose(1, 2).unwrap();
        let err = rel_err(&sparse, &dense);
        assert!(err < 2e-6, "offset {offset}: rel err {err:e}");
    }
}

#[test]
fn sparse_attention_backward_matches_autograd_and_finite_differences() {
    let (b, t, h, kv, s, d, k, offset) = (
        2usize, 5usize, 4usize, 2usize, 13usize, 6usize, 4usize, 8usize,
    );
    let idx = random_selection(b, t, s, k, offset, 21);
    let scale = 0.4;
    let dims = SparseDims {
        b,
        t,
        h,
        kv,
        s,
        d,
        k,
    };
    let q = Var::from_tensor(&randn(&[b, t, h, d], 22, DType::F64)).unwrap();
    let kt = Var::from_tensor(&randn(&[b, kv, s, d], 23, DType::F64)).unwrap();
    let vt = Var::from_tensor(&randn(&[b, kv, s, d], 24, DType::F64)).unwrap();
    let w = randn(&[b, t, h, d], 25, DType::F64);
    let op = SparseAttention {
        dims,
        scale,
        idx: Arc::new(idx.clone()),
    };
    let loss = || {
        (op.apply(q.as_tensor(), kt.as_tensor(), vt.as_tensor())
            .unwrap()
            * &w)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    check_gradients(
        &[
            ("q".into(), q.clone()),
            ("k".into(), kt.clone()),
            ("v".into(), vt.clone()),
        ],
        loss,
        12,
    );
    // And against autograd through the reference, on every element (f32).
    let (q32, k32, v32) = (
        Var::from_tensor(&q.to_dtype(DType::F32).unwrap()).unwrap(),
        Var::from_tensor(&kt.to_dtype(DType::F32).unwrap()).unwrap(),
        Var::from_tensor(&vt.to_dtype(DType::F32).unwrap()).unwrap(),
    );
    let w32 = w.to_dtype(DType::F32).unwrap();
    let g_fast = (op
        .apply(q32.as_tensor(), k32.as_tensor(), v32.as_tensor())
        .unwrap()
        * &w32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g_ref = (reference::sparse_attention(
        q32.as_tensor(),
        k32.as_tensor(),
        v32.as_tensor(),
        &idx,
        None,
        scale,
    )
    .unwrap()
        * &w32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in [("q", &q32), ("k", &k32), ("v", &v32)] {
        let err = rel_err(g_fast.get(var).unwrap(), g_ref.get(var).unwrap());
        assert!(err < 1e-5, "d{name}: rel err {err:e}");
    }
}

#[test]
fn straight_through_gate_gradient_matches_finite_differences() {
    // The gated attention weights are p_i * m_i with m = 1 + sigma - stopgrad(sigma):
    // its forward equals plain sparse attention, and its gradient in sigma equals the
    // derivative of the surrogate L(m) at m = 1, which the reference computes by
    // finite differences with explicit multipliers.
    let (b, t, h, kv, s, d, k, offset) = (
        1usize, 4usize, 3usize, 1usize, 10usize, 5usize, 3usize, 6usize,
    );
    let idx = random_selection(b, t, s, k, offset, 31);
    let scale = 0.5;
    let dims = SparseDims {
        b,
        t,
        h,
        kv,
        s,
        d,
        k,
    };
    let q = randn(&[b, t, h, d], 32, DType::F64);
    let kt = randn(&[b, kv, s, d], 33, DType::F64);
    let vt = randn(&[b, kv, s, d], 34, DType::F64);
    let w = randn(&[b, t, h, d], 35, DType::F64);
    let sigma =
        Var::from_tensor(&randn(&[b, t, k], 36, DType::F64).affine(0.3, 0.5).unwrap()).unwrap();
    let attn = SparseAttention {
        dims,
        scale,
        idx: Arc::new(idx.clone()),
    };
    let gate = SteGate {
        attn: attn.clone(),
        q: q.clone(),
        k: kt.clone(),
        v: vt.clone(),
    };
    let out = (attn.apply(&q, &kt, &vt).unwrap() + gate.apply(sigma.as_tensor()).unwrap()).unwrap();
    // Forward: exactly the ungated attention.
    assert_eq!(
        to_f64_vec(&out),
        to_f64_vec(&attn.apply(&q, &kt, &vt).unwrap())
    );
    let grads = (out * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let analytic = to_f64_vec(grads.get(&sigma).unwrap());
    let surrogate = |m: &Tensor| -> f64 {
        (reference::sparse_attention(&q, &kt, &vt, &idx, Some(m), scale).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let eps = 1e-6;
    for i in 0..b * t * k {
        let mut plus = vec![1.0f64; b * t * k];
        let mut minus = plus.clone();
        plus[i] += eps;
        minus[i] -= eps;
        let mk = |v: Vec<f64>| Tensor::from_vec(v, (b, t, k), &Device::Cpu).unwrap();
        let numeric = (surrogate(&mk(plus)) - surrogate(&mk(minus))) / (2.0 * eps);
        let a = analytic[i];
        let valid = idx[i] != NONE;
        if !valid {
            assert_eq!(a, 0.0);
        }
        assert!(
            (a - numeric).abs() <= 1e-6 * a.abs().max(numeric.abs()) + 1e-9,
            "slot {i}: {a} vs {numeric}"
        );
    }
}

#[test]
fn selected_probs_sum_to_one_and_match_the_reference() {
    let (b, t, h, kv, s, d, k) = (2usize, 6usize, 4usize, 1usize, 15usize, 8usize, 5usize);
    let idx = random_selection(b, t, s, k, 9, 41);
    let q = rand_vec(b * t * h * d, 42);
    let kt = rand_vec(b * kv * s * d, 43);
    let dims = SparseDims {
        b,
        t,
        h,
        kv,
        s,
        d,
        k,
    };
    let mean = sparse_attention::selected_probs(dims, 0.3, &q, &kt, &idx, HeadCombine::Mean);
    let max = sparse_attention::selected_probs(dims, 0.3, &q, &kt, &idx, HeadCombine::Max);
    let (mean, max) = (mean.unwrap(), max.unwrap());
    for p in [&mean, &max] {
        for (r, row) in p.chunks(k).enumerate() {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "row {r} sums to {sum}");
        }
    }
    // The reference: the masked dense version's attention probabilities per head, read
    // at the selected positions, averaged over the heads or their largest renormalised.
    let qt = Tensor::from_vec(q, (b, t, h, d), &Device::Cpu).unwrap();
    let kt = Tensor::from_vec(kt, (b, kv, s, d), &Device::Cpu).unwrap();
    // Probabilities = attention of one-hot values: v = identity rows over positions.
    let eye = Tensor::eye(s, DType::F32, &Device::Cpu)
        .unwrap()
        .reshape((1, 1, s, s))
        .unwrap();
    let eye = eye.repeat((b, kv, 1, 1)).unwrap();
    // Padding queries and keys with zeros to width S leaves the dot products unchanged.
    let pad = |x: &Tensor| x.pad_with_zeros(3, 0, s - d).unwrap();
    let full = reference::sparse_attention(&pad(&qt), &pad(&kt), &eye, &idx, None, 0.3);
    let full = full.unwrap(); // (B, T, H, S)
    let full_mean = to_f64_vec(&full.mean(2).unwrap()); // (B, T, S)
    let full_max = to_f64_vec(&full.max(2).unwrap());
    let mut differ = false;
    for (r, row) in idx.chunks(k).enumerate() {
        let selected = || row.iter().filter(|&&i| i != NONE).map(|&i| i as usize);
        let max_total: f64 = selected().map(|i| full_max[r * s + i]).sum();
        for (slot, &i) in row.iter().enumerate() {
            if i != NONE {
                let want = full_mean[r * s + i as usize];
                assert!((mean[r * k + slot] as f64 - want).abs() < 1e-5);
                let want = full_max[r * s + i as usize] / max_total;
                assert!((max[r * k + slot] as f64 - want).abs() < 1e-5);
                differ |= (mean[r * k + slot] - max[r * k + slot]).abs() > 1e-3;
            }
        }
    }
    assert!(
        differ,
        "the mean and max targets agree everywhere: one input is unused"
    );
}

#[test]
fn dense_decode_kernel_matches_reference() {
    for &(h, kv, s, cap, d) in &[
        (16usize, 1usize, 3001usize, 3100usize, 64usize),
        (6, 2, 77, 77, 24),
        (3, 3, 1, 5, 7),
        // GQA 3 heads per KV head over several key ranges per group (SmolLM2's shape).
        (9, 3, 2500, 2600, 64),
    ] {
        let q = rand_vec(h * d, 51);
        let k = rand_vec(kv * cap * d, 52);
        let v = rand_vec(kv * cap * d, 53);
        let scale = 1.0 / (d as f32).sqrt();
        let rows = KvRows::separate(&k, &v, kv, d);
        let got = decode_attention::decode(&q, rows, s, scale);
        let want = decode_attention::reference(&q, rows, s, scale).unwrap();
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let norm = want.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
        assert!(
            diff / norm < 1e-5,
            "({h},{kv},{s},{d}): rel err {}",
            diff / norm
        );
    }
}

#[test]
fn dense_prefill_kernel_matches_reference() {
    for &(t, h, kv, d) in &[
        (70usize, 16usize, 1usize, 64usize),
        (33, 6, 2, 24),
        (9, 24, 2, 8),
    ] {
        let q = rand_vec(t * h * d, 61);
        let k = rand_vec(kv * t * d, 62);
        let v = rand_vec(kv * t * d, 63);
        let scale = 1.0 / (d as f32).sqrt();
        let got = decode_attention::prefill(&q, &k, &v, kv, d, scale);
        for ti in 0..t {
            let want = decode_attention::reference(
                &q[ti * h * d..(ti + 1) * h * d],
                KvRows::separate(&k, &v, kv, d),
                ti + 1,
                scale,
            )
            .unwrap();
            let row = &got[ti * h * d..(ti + 1) * h * d];
            let diff = row
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let norm = want.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
            assert!(
                diff / norm < 1e-5,
                "({t},{h},{kv},{d}) query {ti}: rel err {}",
                diff / norm
            );
        }
    }
}

/// Plain f64 attention of one head over the listed rows: softmax(scale q . k_i) v_i.
fn naive_head(q: &[f32], keys: &[&[f32]], values: &[&[f32]], scale: f64) -> Vec<f64> {
    let logits: Vec<f64> = keys
        .iter()
        .map(|k| {
            scale
                * q.iter()
                    .zip(*k)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
        })
        .collect();
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
    let z: f64 = w.iter().sum();
    let mut out = vec![0.0f64; values[0].len()];
    for (wi, v) in w.iter().zip(values) {
        for (o, &x) in out.iter_mut().zip(*v) {
            *o += wi / z * x as f64;
        }
    }
    out
}

/// Every entry store through every dense and sparse kernel, against plain f64
/// attention: per-head K/V with keys wider than values (MLA's expanded shape) and the
/// MLA latent store (each key row begins with its value), in the 16-lane and the
/// per-head paths, decoding, prefilling at an offset into a cache with spare capacity,
/// and attending over selections with padding.
#[test]
fn every_entry_store_matches_plain_attention() {
    // (heads, KV groups, cap, dk, dv, latent)
    for &(h, kv, cap, dk, dv, latent) in &[
        (16usize, 1usize, 230usize, 45usize, 37usize, true),
        (5, 1, 130, 20, 12, true),
        (24, 2, 150, 28, 16, false),
        (6, 3, 99, 13, 9, false),
    ] {
        let k = rand_vec(kv * cap * dk, 71);
        let v = rand_vec(kv * cap * dv, 72);
        let rows = KvRows {
            k: &k,
            values: if latent {
                Values::KeyPrefix
            } else {
                Values::Separate(&v)
            },
            groups: kv,
            cap,
            dk,
            dv,
        };
        let g = h / kv;
        let scale = 0.17f32;
        // What each head must see over positions `pos`.
        let want = |q: &[f32], pos: &[usize]| -> Vec<f64> {
            let mut out = Vec::new();
            for head in 0..h {
                let r = rows.group(head / g);
                let keys: Vec<&[f32]> = pos.iter().map(|&p| r.key(p)).collect();
                let vals: Vec<&[f32]> = pos.iter().map(|&p| r.value(p)).collect();
                out.extend(naive_head(
                    &q[head * dk..(head + 1) * dk],
                    &keys,
                    &vals,
                    scale as f64,
                ));
            }
            out
        };
        let tag = format!("({h},{kv},{cap},{dk},{dv},{latent})");
        // Decode over the first s positions.
        let s = cap - 17;
        let q = rand_vec(h * dk, 73);
        let got = decode_attention::decode(&q, rows, s, scale);
        let all: Vec<usize> = (0..s).collect();
        assert!(rel_err_f64(&got, &want(&q, &all)) < 1e-5, "decode {tag}");
        // Prefill of t queries at offset.
        let (t, offset) = (11usize, 60usize);
        let qs = rand_vec(t * h * dk, 74);
        let got = decode_attention::prefill_at(&qs, rows, t, offset, scale);
        for ti in 0..t {
            let vis: Vec<usize> = (0..=offset + ti).collect();
            let w = want(&qs[ti * h * dk..(ti + 1) * h * dk], &vis);
            let e = rel_err_f64(&got[ti * h * dv..(ti + 1) * h * dv], &w);
            assert!(e < 1e-5, "prefill {tag} query {ti}: {e}");
        }
        // Sparse attention over selections (duplicates never occur; NONE pads).
        let kk = 19usize;
        let mut rng = ChaCha8Rng::seed_from_u64(75);
        let mut idx = Vec::new();
        for ti in 0..t {
            let mut pos: Vec<u32> = (0..=(offset + ti) as u32).collect();
            pos.shuffle(&mut rng);
            pos.truncate(kk - 1 - ti % 3);
            pos.resize(kk, NONE);
            idx.extend(pos);
        }
        let got = sparse_attention::attend_selected(&qs, rows, t, &idx, scale);
        for ti in 0..t {
            let sel: Vec<usize> = idx[ti * kk..(ti + 1) * kk]
                .iter()
                .filter(|&&i| i != NONE)
                .map(|&i| i as usize)
                .collect();
            let w = want(&qs[ti * h * dk..(ti + 1) * h * dk], &sel);
            let e = rel_err_f64(&got[ti * h * dv..(ti + 1) * h * dv], &w);
            assert!(e < 1e-5, "sparse {tag} query {ti}: {e}");
        }
    }
}

/// A query's prefill result does not depend on the chunk it arrives in nor on which
/// queries share its vector lanes: one chunk of 37 queries equals, bit for bit, the same
/// queries in chunks of 5, 13 and 19 at their offsets (the engine's chunked prefill),
/// for group sizes that fill the lanes with 1, 3, 5 and 16 queries.
#[test]
fn prefill_is_the_same_in_any_chunking() {
    for &(h, kv, d) in &[
        (16usize, 1usize, 24usize),
        (9, 3, 16),
        (3, 1, 20),
        (6, 3, 8),
    ] {
        let (t, offset, cap) = (37usize, 20usize, 64usize);
        let k = rand_vec(kv * cap * d, 81);
        let v = rand_vec(kv * cap * d, 82);
        let q = rand_vec(t * h * d, 83);
        let rows = KvRows::separate(&k, &v, kv, d);
        let whole = decode_attention::prefill_at(&q, rows, t, offset, 0.3);
        let mut pieces = Vec::new();
        let mut at = 0;
        for n in [5usize, 13, 19] {
            let qs = &q[at * h * d..(at + n) * h * d];
            pieces.extend(decode_attention::prefill_at(qs, rows, n, offset + at, 0.3));
            at += n;
        }
        assert_eq!(whole, pieces, "({h},{kv},{d})");
    }
}

/// The engine's sampled recall over a cache (f32 and f16 rows, GQA groups, a cache with
/// spare capacity, padded and out-of-range slots) against `selected_mass`, the recall
/// of the training forward, on the same query.
#[test]
fn cached_recall_matches_the_forward_recall() {
    for (h, groups, d, visible, cap, k, seed) in [
        (4, 2, 13, 37, 40, 9, 1u64),
        (8, 1, 24, 65, 65, 17, 2),
        (3, 3, 7, 5, 9, 8, 3),
    ] {
        let q = rand_vec(h * d, seed);
        let keys = rand_vec(groups * cap * d, seed + 10);
        let values = rand_vec(groups * cap * d, seed + 20);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut idx: Vec<u32> = (0..visible as u32).collect();
        idx.shuffle(&mut rng);
        idx.truncate(k);
        idx.resize(k, NONE);
        if k > 2 {
            idx[k - 1] = (visible + 3) as u32; // past the visible rows: skipped
        }
        let scale = 1.0 / (d as f32).sqrt();
        // The forward's layout: k (B, KV, S, D) with S = visible rows only.
        let mut k_fwd = Vec::with_capacity(groups * visible * d);
        for g in 0..groups {
            k_fwd.extend_from_slice(&keys[g * cap * d..(g * cap + visible) * d]);
        }
        let dims = SparseDims {
            b: 1,
            t: 1,
            h,
            kv: groups,
            s: visible,
            d,
            k,
        };
        let want =
            sparse_attention::selected_mass(dims, scale as f64, &q, &k_fwd, &idx, visible - 1, 0)
                .unwrap()[0];
        let rows = KvRows::separate(&keys, &values, groups, d);
        let got = sparse_attention::selected_mass_cached(&q, &rows, h, visible, &idx, scale);
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "h {h} groups {groups}: {got} vs {want}"
        );
        // f16 rows: the same recall over the keys rounded to f16.
        let k16: Vec<half::f16> = keys.iter().map(|&x| half::f16::from_f32(x)).collect();
        let v16: Vec<half::f16> = values.iter().map(|&x| half::f16::from_f32(x)).collect();
        let k_fwd16: Vec<f32> = k_fwd
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect();
        let want16 =
            sparse_attention::selected_mass(dims, scale as f64, &q, &k_fwd16, &idx, visible - 1, 0)
                .unwrap()[0];
        let rows16 = KvRows::separate(&k16, &v16, groups, d);
        let got16 = sparse_attention::selected_mass_cached(&q, &rows16, h, visible, &idx, scale);
        assert!(
            (got16 - want16).abs() <= 1e-5 * want16.abs().max(1.0),
            "f16: {got16} vs {want16}"
        );
        // Fewer slots than rows miss some mass; with every row selected none is missed.
        if k < visible {
            assert!(got > 0.0 && got < 1.0, "{got}");
        } else {
            assert!((got - 1.0).abs() < 1e-5, "{got}");
        }
    }
}

/// The oracle recall (`best_mass`: the k largest head-averaged probabilities) against
/// plain f64 loops, at awkward sizes; it bounds every selection's `selected_mass`.
#[test]
fn best_mass_matches_a_plain_reference_and_bounds_any_selection() {
    for (b, t, h, kv, s, d, k, offset, seed) in [
        (
            2usize, 5usize, 6usize, 2usize, 11usize, 7usize, 3usize, 6usize, 1u64,
        ),
        (1, 9, 4, 4, 9, 5, 4, 0, 2),
        (1, 3, 3, 1, 20, 13, 17, 17, 3),
    ] {
        let q = rand_vec(b * t * h * d, seed);
        let keys = rand_vec(b * kv * s * d, seed + 1);
        let scale = 1.0 / (d as f64).sqrt();
        let dims = SparseDims {
            b,
            t,
            h,
            kv,
            s,
            d,
            k,
        };
        let got = sparse_attention::best_mass(dims, scale, &q, &keys, offset, 1).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for bt in 0..b * t {
            let (bi, ti) = (bt / t, bt % t);
            if ti < 1 {
                assert!(got[bt].is_nan());
                continue;
            }
            let visible = (offset + ti + 1).min(s);
            let mut p = vec![0.0f64; visible];
            for hh in 0..h {
                let g = hh / (h / kv);
                let logits: Vec<f64> = (0..visible)
                    .map(|j| {
                        (0..d)
                            .map(|x| {
                                q[(bt * h + hh) * d + x] as f64
                                    * keys[((bi * kv + g) * s + j) * d + x] as f64
                            })
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
                for (pj, l) in p.iter_mut().zip(&logits) {
                    *pj += (l - m).exp() / z / h as f64;
                }
            }
            let mut sorted = p.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let want: f64 = sorted.iter().take(k).sum();
            assert!(
                (got[bt] as f64 - want).abs() < 1e-5,
                "({b},{t},{h},{kv},{s},{d},{k}) query {bt}: {} vs {want}",
                got[bt]
            );
            // Any k visible positions hold at most that much.
            let mut idx: Vec<u32> = (0..visible as u32).collect();
            idx.shuffle(&mut rng);
            idx.truncate(k);
            idx.resize(k, NONE);
            let one = SparseDims { b: 1, t: 1, ..dims };
            let qo = &q[bt * h * d..(bt + 1) * h * d];
            let ko = &keys[bi * kv * s * d..(bi + 1) * kv * s * d];
            let sel = sparse_attention::selected_mass(one, scale, qo, ko, &idx, visible - 1, 0)
                .unwrap()[0];
            assert!(sel <= got[bt] + 1e-5, "{sel} > {}", got[bt]);
        }
    }
}
