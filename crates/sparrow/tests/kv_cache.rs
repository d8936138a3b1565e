//! Incremental decoding with the KV cache equals the full forward on the same tokens.

mod common;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use sparrow::model::cache::KvCache;
use sparrow::model::Model;

fn ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 97 + 13) % vocab as u32)
        .collect()
}

fn check(kv_heads: usize, prefill: usize) {
    let mut cfg = tiny_config();
    cfg.num_key_value_heads = Some(kv_heads);
    cfg.initializer_range = 0.1;
    let model = Model::new_random(&cfg, 21, DType::F32, &Device::Cpu).unwrap();
    let n = 37;
    let toks = ids(n, cfg.vocab_size);
    let full = model
        .forward(
            &Tensor::from_slice(&toks, (1, n), &Device::Cpu).unwrap(),
            None,
        )
        .unwrap()
        .logits; // (1, n, V)

    let mut cache = KvCache::new(cfg.num_hidden_layers);
    let mut pieces = Vec::new();
    let first = Tensor::from_slice(&toks[..prefill], (1, prefill), &Device::Cpu).unwrap();
    pieces.push(model.forward(&first, Some(&mut cache)).unwrap().logits);
    for &t in &toks[prefill..] {
        let x = Tensor::from_slice(&[t], (1, 1), &Device::Cpu).unwrap();
        pieces.push(model.forward(&x, Some(&mut cache)).unwrap().logits);
    }
    assert_eq!(cache.len(), n);
    let incremental = Tensor::cat(&pieces, 1).unwrap();
    let err = rel_err(&incremental, &full);
    assert!(
        err <= 1e-5,
        "kv_heads={kv_heads} prefill={prefill}: relative error {err:e}"
    );
    // And the logits are not trivially equal (e.g. all zero).
    assert!(to_f64_vec(&full.i((0, n - 1)).unwrap())
        .iter()
        .any(|v| v.abs() > 1e-3));
}

#[test]
fn cached_decode_matches_full_forward_mha_gqa_mqa() {
    for kv in [4, 2, 1] {
        for prefill in [1, 16] {
            check(kv, prefill);
        }
    }
}

#[test]
fn mqa_cache_is_h_times_smaller_than_mha() {
    let bytes = |kv: usize| {
        let mut cfg = tiny_config();
        cfg.num_key_value_heads = Some(kv);
        let model = Model::new_random(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
        let mut cache = KvCache::new(cfg.num_hidden_layers);
        let x = Tensor::from_vec(ids(10, cfg.vocab_size), (1, 10), &Device::Cpu).unwrap();
        model.forward(&x, Some(&mut cache)).unwrap();
        (cache.bytes(), cache.layers[0].capacity())
    };
    let cfg = tiny_config();
    let (mqa, cap) = bytes(1);
    assert_eq!(bytes(4).0, cfg.num_attention_heads * mqa);
    // The buffers start at 64 positions and double when full.
    assert_eq!(cap, 64);
    // 2 layers x (K + V) x capacity x 1 head x head_dim x 4 bytes
    assert_eq!(mqa, cfg.num_hidden_layers * 2 * cap * cfg.head_dim() * 4);
}

#[test]
fn cache_buffers_grow_by_doubling_and_keep_their_contents() {
    let cfg = tiny_config();
    let model = Model::new_random(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
    let toks = ids(150, cfg.vocab_size);
    let full = model
        .forward(
            &Tensor::from_slice(&toks, (1, 150), &Device::Cpu).unwrap(),
            None,
        )
        .unwrap()
        .logits;
    let mut cache = KvCache::new(cfg.num_hidden_layers);
    let mut caps = Vec::new();
    let mut pieces = Vec::new();
    for chunk in toks.chunks(7) {
        let x = Tensor::from_slice(chunk, (1, chunk.len()), &Device::Cpu).unwrap();
        pieces.push(model.forward(&x, Some(&mut cache)).unwrap().logits);
        caps.push(cache.layers[0].capacity());
    }
    assert_eq!(cache.len(), 150);
    caps.dedup();
    assert_eq!(caps, vec![64, 128, 256]);
    let inc = Tensor::cat(&pieces, 1).unwrap();
    assert!(rel_err(&inc, &full) < 1e-5);
}

/// Windows longer than `DENSE_QUERY_BLOCK` run dense attention in query blocks; the
/// blocked forward (from position 0, and after a cached prefix) equals one-token-at-a-time
/// decoding, which never blocks.
#[test]
fn blocked_dense_attention_equals_token_by_token() {
    use sparrow::model::attention::DENSE_QUERY_BLOCK;
    let mut cfg = tiny_config();
    cfg.max_position_embeddings = 4096;
    cfg.initializer_range = 0.1;
    let model = Model::new_random(&cfg, 5, DType::F32, &Device::Cpu).unwrap();
    let n = 2 * DENSE_QUERY_BLOCK + 37;
    let toks = ids(n, cfg.vocab_size);
    let dev = Device::Cpu;
    let mut cache = KvCache::new(cfg.num_hidden_layers);
    let stepwise: Vec<Tensor> = toks
        .iter()
        .map(|&t| {
            let x = Tensor::from_slice(&[t], (1, 1), &dev).unwrap();
            model.forward(&x, Some(&mut cache)).unwrap().logits
        })
        .collect();
    let stepwise = Tensor::cat(&stepwise, 1).unwrap();
    let full = model
        .forward(&Tensor::from_slice(&toks, (1, n), &dev).unwrap(), None)
        .unwrap()
        .logits;
    let err = rel_err(&full, &stepwise);
    assert!(err < 1e-4, "blocked full forward vs stepwise: {err}");
    let prefix = 100;
    let mut cache = KvCache::new(cfg.num_hidden_layers);
    let a = Tensor::from_slice(&toks[..prefix], (1, prefix), &dev).unwrap();
    let b = Tensor::from_slice(&toks[prefix..], (1, n - prefix), &dev).unwrap();
    let pieces = [
        model.forward(&a, Some(&mut cache)).unwrap().logits,
        model.forward(&b, Some(&mut cache)).unwrap().logits,
    ];
    let err = rel_err(&Tensor::cat(&pieces, 1).unwrap(), &stepwise);
    assert!(
        err < 1e-4,
        "blocked forward after a cached prefix vs stepwise: {err}"
    );
}
