//! Differential: the streaming top-k ([`StreamTopK`]), fed scores in chunks that are
//! selected apart and merged in an arbitrary order (as threads split a scan), selects
//! exactly the positions of the plain sort ([`topk_by_sort`]) for any scores (NaN,
//! infinities, -0.0 and ties included) and any k.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sparrow::kernels::topk::{topk_by_sort, StreamTopK};

fuzz_target!(|data: &[u8]| {
    let Some((&[k_byte, cuts_byte], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    // Scores: raw f32 bits, or (every other byte pattern) small integers for many ties.
    let ties = cuts_byte & 1 == 1;
    let scores: Vec<f32> = if ties {
        rest.iter().map(|&b| (b % 7) as f32 - 3.0).collect()
    } else {
        rest.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let n = scores.len();
    let k = k_byte as usize % (n + 3);
    // Chunk boundaries from the bytes themselves.
    let chunks = 1 + (cuts_byte as usize >> 1) % 5;
    let mut bounds: Vec<usize> = (1..chunks)
        .map(|i| (i * 37 + k_byte as usize * i) % (n + 1))
        .collect();
    bounds.push(0);
    bounds.push(n);
    bounds.sort_unstable();
    let mut parts: Vec<StreamTopK> = bounds
        .windows(2)
        .map(|w| {
            let mut top = StreamTopK::new(k);
            for p in w[0]..w[1] {
                top.push(scores[p], p as u32);
            }
            top
        })
        .collect();
    // Merge in a data-dependent order.
    if cuts_byte & 2 == 2 {
        parts.reverse();
    }
    let mut all = parts.remove(0);
    for p in &parts {
        all.merge(p);
    }
    let mut got = vec![0u32; k];
    all.finish_into(&mut got);
    assert_eq!(
        got,
        topk_by_sort(&scores, k),
        "k {k}, {n} scores, cuts {bounds:?}"
    );
});
