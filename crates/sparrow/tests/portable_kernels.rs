//! The portable (non-AVX-512) builds of the hand-written kernels, forced on in this test
//! binary (its own process), against the same references as the fast paths.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparrow::kernels::indexer::{self, IndexShape, KeyPrecision, KeyStore, ScoreAct, TopkQueries};
use sparrow::kernels::kv_rows::KvRows;
use sparrow::kernels::sparse_attention::{self, SparseDims};
use sparrow::kernels::topk::{topk_by_sort, NONE};
use sparrow::kernels::{decode_attention, simd};

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / b.iter().fold(0.0f32, |m, y| m.max(y.abs())).max(1e-30)
}

#[test]
fn portable_paths_match_the_references() {
    simd::force_portable(true);
    assert!(!simd::has_avx512());
    // Dense decode, lane path (16 heads over one KV head) and per-head path.
    for &(h, kv, s, d) in &[
        (16usize, 1usize, 2999usize, 64usize),
        (12, 1, 130, 20),
        (4, 2, 77, 24),
    ] {
        let (q, k, v) = (
            rand_vec(h * d, 1),
            rand_vec(kv * s * d, 2),
            rand_vec(kv * s * d, 3),
        );
        let scale = 1.0 / (d as f32).sqrt();
        let rows = KvRows::separate(&k, &v, kv, d);
        let got = decode_attention::decode(&q, rows, s, scale);
        let want = decode_attention::reference(&q, rows, s, scale).unwrap();
        assert!(max_rel(&got, &want) < 1e-5, "decode ({h},{kv},{s},{d})");
    }
    // Causal prefill (lanes of several queries with per-lane limits) against decoding
    // each query over its own prefix.
    for &(h, kv, t, d) in &[(9usize, 3usize, 21usize, 16usize), (16, 1, 7, 24)] {
        let (q, k, v) = (
            rand_vec(t * h * d, 21),
            rand_vec(kv * t * d, 22),
            rand_vec(kv * t * d, 23),
        );
        let rows = KvRows::separate(&k, &v, kv, d);
        let got = decode_attention::prefill_at(&q, rows, t, 0, 0.25);
        for ti in 0..t {
            let want =
                decode_attention::reference(&q[ti * h * d..(ti + 1) * h * d], rows, ti + 1, 0.25)
                    .unwrap();
            let row = &got[ti * h * d..(ti + 1) * h * d];
            assert!(
                max_rel(row, &want) < 1e-5,
                "prefill ({h},{kv},{t},{d}) query {ti}"
            );
        }
    }
    // The MLA latent store (values = the first dv of each key row), lanes and per-head.
    for &(h, s, dk, dv) in &[(16usize, 301usize, 45usize, 37usize), (5, 90, 20, 12)] {
        let (q, k) = (rand_vec(h * dk, 11), rand_vec(s * dk, 12));
        let rows = KvRows::key_prefix(&k, dk, dv);
        let got = decode_attention::decode(&q, rows, s, 0.2);
        let want = decode_attention::reference(&q, rows, s, 0.2).unwrap();
        assert!(
            max_rel(&got, &want) < 1e-5,
            "latent decode ({h},{s},{dk},{dv})"
        );
    }
    // Sparse attention, f32 fast path vs the generic kernel.
    let dims = SparseDims {
        b: 2,
        t: 5,
        h: 16,
        kv: 1,
        s: 37,
        d: 24,
        k: 9,
    };
    let q = rand_vec(2 * 5 * 16 * 24, 4);
    let k = rand_vec(2 * 37 * 24, 5);
    let v = rand_vec(2 * 37 * 24, 6);
    let idx: Vec<u32> = (0..2 * 5 * 9)
        .map(|i| {
            if i % 9 == 8 {
                NONE
            } else {
                ((i * 7) % 37) as u32
            }
        })
        .collect();
    let fast = sparse_attention::forward_f32(dims, 0.3, &q, &k, &v, &idx).unwrap();
    let generic = sparse_attention::forward(dims, 0.3, &q, &k, &v, &idx).unwrap();
    assert!(max_rel(&fast, &generic) < 1e-5);
    // Indexer top-k: prefill and decode equal the sort of the full scores.
    let shape = IndexShape {
        heads: 3,
        dim: 13,
        act: ScoreAct::Relu,
    };
    let (t, s, kk) = (9usize, 200usize, 31usize);
    let (iq, iw) = (rand_vec(t * 3 * 13, 7), rand_vec(t * 3, 8));
    let mut store = KeyStore::new(13, KeyPrecision::Int8);
    store.extend_rows(&rand_vec(s * 13, 9));
    let rows = [TopkQueries {
        q: &iq,
        w: &iw,
        offset: s - t,
    }];
    let got = indexer::topk_prefill(&rows, &[&store], shape, t, kk);
    let scores = indexer::scores_reference(&rows[0], &store, shape, t);
    for ti in 0..t {
        let visible = s - t + ti + 1;
        assert_eq!(
            &got[ti * kk..(ti + 1) * kk],
            &topk_by_sort(&scores[ti * s..ti * s + visible], kk)[..]
        );
    }
    let dec = indexer::topk_decode(&iq[(t - 1) * 39..], &iw[(t - 1) * 3..], &store, shape, kk);
    assert_eq!(dec, got[(t - 1) * kk..].to_vec());
    simd::force_portable(false);
}
