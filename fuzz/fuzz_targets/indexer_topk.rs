//! Differential: the indexer's fused scoring + streaming top-k (prefill over several
//! queries, and decode) against the plain scores (`scores_reference`), for any head
//! count, head size, query count, context, k, key precision and score activation. The
//! kernel sums in its own order, so the check allows rounding: every position it keeps
//! scores at least as high as every position it drops, up to a relative 1e-4 of the
//! scores' scale; each row is its visible positions (or fewer), distinct and sorted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sparrow::kernels::indexer::{self, IndexShape, KeyPrecision, KeyStore, ScoreAct, TopkQueries};
use sparrow::kernels::topk::NONE;

fuzz_target!(|data: &[u8]| {
    let Some((&[h, d, t, s, k, mode], rest)) = data.split_first_chunk::<6>() else {
        return;
    };
    let (h, d, t) = (1 + h as usize % 4, 1 + d as usize % 40, 1 + t as usize % 6);
    let s = t + s as usize % 300;
    let k = k as usize % 70;
    let precision = [KeyPrecision::F32, KeyPrecision::Bf16, KeyPrecision::Int8][mode as usize % 3];
    let act = if mode & 4 == 0 {
        ScoreAct::Relu
    } else {
        ScoreAct::Identity
    };
    let shape = IndexShape {
        heads: h,
        dim: d,
        act,
    };
    let mut bytes = rest.iter().copied().cycle();
    let mut value = || (bytes.next().unwrap_or(3) as f32 - 127.5) / 40.0;
    let q: Vec<f32> = (0..t * h * d).map(|_| value()).collect();
    let w: Vec<f32> = (0..t * h).map(|_| value()).collect();
    let keys: Vec<f32> = (0..s * d).map(|_| value()).collect();
    let mut store = KeyStore::new(d, precision);
    store.extend_rows(&keys);
    let rows = [TopkQueries {
        q: &q,
        w: &w,
        offset: s - t,
    }];
    let got = indexer::topk_prefill(&rows, &[&store], shape, t, k);
    assert_eq!(got.len(), t * k);
    let scores = indexer::scores_reference(&rows[0], &store, shape, t);
    let scale = scores.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    for ti in 0..t {
        let visible = s - t + ti + 1;
        let row = &got[ti * k..(ti + 1) * k];
        let kept: Vec<usize> = row
            .iter()
            .filter(|&&p| p != NONE)
            .map(|&p| p as usize)
            .collect();
        assert_eq!(kept.len(), k.min(visible), "query {ti}: {row:?}");
        assert!(kept.windows(2).all(|p| p[0] < p[1]), "query {ti}: {row:?}");
        assert!(
            kept.iter().all(|&p| p < visible),
            "query {ti} sees the future: {row:?}"
        );
        let sc = &scores[ti * s..ti * s + visible];
        let worst_kept = kept.iter().map(|&p| sc[p]).fold(f32::INFINITY, f32::min);
        let best_dropped = (0..visible)
            .filter(|p| !kept.contains(p))
            .map(|p| sc[p])
            .fold(f32::NEG_INFINITY, f32::max);
        assert!(
            worst_kept >= best_dropped - 1e-4 * scale,
            "query {ti}: kept {worst_kept} < dropped {best_dropped}"
        );
    }
    // Decode of the last query selects as the prefill's last row.
    let last = t - 1;
    let dec = indexer::topk_decode(&q[last * h * d..], &w[last * h..], &store, shape, k);
    assert_eq!(dec, got[last * k..].to_vec(), "decode vs prefill");
});
