//! The engine's per-sequence cache: incremental decoding through the step equals the
//! full forward for MHA, GQA and MQA; an MQA cache is H times smaller than MHA's; the
//! buffers grow by doubling and keep their rows; the full forward's blocked dense
//! attention (windows longer than `DENSE_QUERY_BLOCK`) equals token-by-token decoding.

mod common;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use sparrow::model::Model;

fn ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 97 + 13) % vocab as u32)
        .collect()
}

fn full_logits(model: &Model, toks: &[u32]) -> Tensor {
    let x = Tensor::from_slice(toks, (1, toks.len()), &Device::Cpu).unwrap();
    model.forward(&x).unwrap().logits // (1, n, V)
}

#[test]
fn stepped_decode_matches_full_forward_mha_gqa_mqa() {
    for kv_heads in [4, 2, 1] {
        for prefill in [1, 16] {
            let mut cfg = tiny_config();
            cfg.num_key_value_heads = Some(kv_heads);
            cfg.initializer_range = 0.1;
            let model = Model::new_random(&cfg, 21, DType::F32, &Device::Cpu).unwrap();
            let n = 37;
            let toks = ids(n, cfg.vocab_size);
            let full = full_logits(&model, &toks);
            let (inc, cache) = stepped(&model, &toks, &prefill_then_decode(prefill, n));
            assert_eq!(cache.len(), n);
            let err = rel_err(&inc, &full);
            assert!(
                err <= 1e-5,
                "kv_heads={kv_heads} prefill={prefill}: relative error {err:e}"
            );
            // And the logits are not trivially equal (e.g. all zero).
            assert!(to_f64_vec(&full.i((0, n - 1)).unwrap())
                .iter()
                .any(|v| v.abs() > 1e-3));
        }
    }
}

#[test]
fn mqa_cache_is_h_times_smaller_than_mha() {
    let bytes = |kv: usize| {
        let mut cfg = tiny_config();
        cfg.num_key_value_heads = Some(kv);
        let model = Model::new_random(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
        let (_, cache) = stepped(&model, &ids(10, cfg.vocab_size), &[10]);
        let cap = cache.layers[0].k.as_ref().unwrap().capacity();
        (cache.bytes(), cap)
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
    let full = full_logits(&model, &toks);
    let mut caps = Vec::new();
    let mut pieces = Vec::new();
    let mut cache = sparrow::model::cache::SeqCache::new(cfg.num_hidden_layers, cfg.kv_cache_dtype);
    let opts = sparrow::model::step::StepOptions {
        all_logits: true,
        ..Default::default()
    };
    for chunk in toks.chunks(7) {
        let mut input = [sparrow::model::StepInput {
            tokens: chunk,
            cache: &mut cache,
        }];
        pieces.push(model.step(&mut input, &opts).unwrap().logits);
        caps.push(cache.layers[0].k.as_ref().unwrap().capacity());
    }
    assert_eq!(cache.len(), 150);
    caps.dedup();
    assert_eq!(caps, vec![64, 128, 256]);
    let inc = Tensor::cat(&pieces, 0).unwrap().unsqueeze(0).unwrap();
    assert!(rel_err(&inc, &full) < 1e-5);
}

/// Windows longer than `DENSE_QUERY_BLOCK` run dense attention in query blocks; the
/// blocked full forward equals one-token-at-a-time decoding through the step.
#[test]
fn blocked_dense_attention_equals_token_by_token() {
    use sparrow::model::attention::DENSE_QUERY_BLOCK;
    let mut cfg = tiny_config();
    cfg.max_position_embeddings = 4096;
    cfg.initializer_range = 0.1;
    let model = Model::new_random(&cfg, 5, DType::F32, &Device::Cpu).unwrap();
    let n = 2 * DENSE_QUERY_BLOCK + 37;
    let toks = ids(n, cfg.vocab_size);
    let (stepwise, _) = stepped(&model, &toks, &vec![1; n]);
    let full = full_logits(&model, &toks);
    let err = rel_err(&full, &stepwise);
    assert!(err < 1e-4, "blocked full forward vs stepwise: {err}");
}
