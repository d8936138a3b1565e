//! Multi-head latent attention on random weights (its parity with transformers is in
//! `hf_parity.rs`): the absorbed one-token decode equals the expanded full forward, the
//! cache holds `kv_lora_rank + qk_rope_head_dim` values per token, gradients match finite
//! differences, and bad MLA fields are named.

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::*;
use sparrow::model::mla::Mla;
use sparrow::model::params::VarStore;
use sparrow::model::Model;
use sparrow::ModelConfig;

/// `tiny_mla_config` (3 heads, latent rank 7, nope 5, rope 4, value 3) with the given
/// query latent and RoPE layout.
fn mla_config(q_lora: Option<usize>, interleave: bool) -> ModelConfig {
    let mut cfg = tiny_mla_config(q_lora, None);
    cfg.rope_interleave = interleave;
    cfg.initializer_range = 0.3;
    cfg.validate().unwrap();
    cfg
}

#[test]
fn absorbed_decode_equals_the_expanded_forward() {
    for (q_lora, interleave) in [(Some(9), true), (None, false)] {
        let cfg = mla_config(q_lora, interleave);
        let model = Model::new_random(&cfg, 4, DType::F32, &Device::Cpu).unwrap();
        let t = 13;
        let ids: Vec<u32> = (0..t as u32).map(|i| (i * 31 + 7) % 500).collect();
        let all = Tensor::from_vec(ids.clone(), (1, t), &Device::Cpu).unwrap();
        let full = model.forward(&all).unwrap().logits;
        // A 5-token prefill, then one token at a time, absorbed over the latent store.
        let (stepped, cache) = stepped(&model, &ids, &prefill_then_decode(5, t));
        let err = rel_err(&stepped, &full);
        assert!(
            err < 1e-5,
            "q_lora {q_lora:?}: absorbed decode differs by {err:e}"
        );
        // The cache holds the latent and the RoPE key only (f32 host rows).
        let per_token: usize = (7 + 4) * 4;
        let layer = &cache.layers[0];
        assert_eq!(layer.len(), t);
        assert!(layer.v.is_none());
        assert_eq!(
            layer.bytes(),
            layer.k.as_ref().unwrap().capacity() * per_token
        );
    }
}

#[test]
fn mla_gradients_match_finite_differences() {
    for (q_lora, interleave) in [(Some(6), true), (None, false)] {
        let cfg = mla_config(q_lora, interleave);
        let s = VarStore::random(3, DType::F64, &Device::Cpu);
        let mla = Mla::new(&s.root().pp("self_attn"), &cfg, 0, 0.3).unwrap();
        let x = Var::from_tensor(&randn(&[2, 6, 24], 1, DType::F64)).unwrap();
        let probe = randn(&[2, 6, 24], 2, DType::F64);
        let loss = || {
            let out = mla
                .forward(x.as_tensor(), &Default::default(), &mut Default::default())
                .unwrap();
            (out * &probe).unwrap().sum_all().unwrap()
        };
        let mut vars = s.vars();
        vars.push(("<input>".into(), x.clone()));
        check_gradients(&vars, loss, 4);
    }
}

#[test]
fn bad_mla_fields_are_named() {
    type Edit = fn(&mut ModelConfig);
    let cases: [(&str, Edit); 4] = [
        ("kv_lora_rank", |c| c.kv_lora_rank = Some(0)),
        ("qk_rope_head_dim", |c| c.qk_rope_head_dim = 3),
        ("v_head_dim", |c| c.v_head_dim = 0),
        ("q_lora_rank", |c| c.q_lora_rank = Some(0)),
    ];
    for (field, edit) in cases {
        let mut cfg = mla_config(None, true);
        edit(&mut cfg);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
    // Parameter counts match the built model.
    for q in [None, Some(9)] {
        let cfg = mla_config(q, true);
        let m = Model::new_random(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
        let (total, active) = m.parameter_counts();
        assert_eq!(total, m.store.num_parameters());
        assert!(active < total, "MoE: some experts idle per token");
    }
}
