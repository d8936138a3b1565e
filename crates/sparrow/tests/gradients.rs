//! Finite-difference gradient checks (f64) for every layer, and the check that every
//! trainable tensor of a model receives a non-zero gradient (candle's fused ops drop
//! gradients silently).

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::*;
use sparrow::model::attention::Attention;
use sparrow::model::block::Block;
use sparrow::model::mlp::Mlp;
use sparrow::model::moe::Moe;
use sparrow::model::norm::RmsNorm;
use sparrow::model::params::VarStore;
use sparrow::model::rope::Rope;
use sparrow::model::Model;
use sparrow::train::loss::cross_entropy;

const F64: DType = DType::F64;

/// Weighted sum of a layer's output: a scalar whose gradient reaches every element.
fn probe(y: &Tensor, seed: u64) -> Tensor {
    let r = randn(y.dims(), seed, F64);
    (y * r).unwrap().sum_all().unwrap()
}

fn input_var(shape: &[usize], seed: u64) -> Var {
    Var::from_tensor(&randn(shape, seed, F64)).unwrap()
}

fn with_input(store: &VarStore, x: &Var) -> Vec<(String, Var)> {
    let mut vars = store.vars();
    vars.push(("<input>".into(), x.clone()));
    vars
}

fn store() -> VarStore {
    VarStore::random(5, F64, &Device::Cpu)
}

fn wider_init(mut cfg: sparrow::ModelConfig) -> sparrow::ModelConfig {
    // Larger weights than training init so every path carries signal worth checking.
    cfg.initializer_range = 0.3;
    cfg
}

#[test]
fn rms_norm_gradients() {
    let s = store();
    let norm = RmsNorm::new(&s.root().pp("norm"), 7, 1e-6).unwrap();
    // Non-trivial weight so the weight gradient is not all-equal.
    s.vars()[0].1.set(&randn(&[7], 3, F64)).unwrap();
    let x = input_var(&[2, 3, 7], 1);
    check_gradients(
        &with_input(&s, &x),
        || probe(&norm.forward(x.as_tensor()).unwrap(), 2),
        7,
    );
}

#[test]
fn mlp_gradients() {
    let s = store();
    let mlp = Mlp::new(&s.root().pp("mlp"), 6, 10, 0.4, 0.4).unwrap();
    let x = input_var(&[2, 5, 6], 1);
    check_gradients(
        &with_input(&s, &x),
        || probe(&mlp.forward(x.as_tensor()).unwrap(), 2),
        8,
    );
}

fn check_attention(kv_heads: usize) {
    let mut cfg = wider_init(tiny_config());
    cfg.num_key_value_heads = Some(kv_heads);
    let s = store();
    let attn = Attention::new(&s.root().pp("self_attn"), &cfg, 0, 0.3).unwrap();
    let rope = Rope::new(cfg.head_dim(), 64, cfg.rope_theta, F64, &Device::Cpu).unwrap();
    let x = input_var(&[2, 7, cfg.hidden_size], 1);
    check_gradients(
        &with_input(&s, &x),
        || {
            probe(
                &attn
                    .forward(
                        x.as_tensor(),
                        &rope,
                        &Default::default(),
                        &mut Default::default(),
                    )
                    .unwrap(),
                2,
            )
        },
        6,
    );
}

#[test]
fn attention_gradients_mha_gqa_mqa() {
    for kv in [4, 2, 1] {
        check_attention(kv);
    }
}

#[test]
fn moe_gradients_through_routing_weights_and_aux_loss() {
    let cfg = wider_init(tiny_config());
    let s = store();
    let moe = Moe::new(&s.root().pp("mlp"), &cfg, 1, 0.3).unwrap();
    let x = input_var(&[2, 9, cfg.hidden_size], 1);
    let ids: Vec<u32> = (0..18).collect();
    let loss = || {
        let (y, stats) = moe.forward(x.as_tensor(), &ids, true).unwrap();
        (probe(&y, 2) + stats.aux_loss.unwrap()).unwrap()
    };
    check_gradients(&with_input(&s, &x), loss, 6);
}

#[test]
fn block_gradients_dense_and_moe() {
    let cfg = wider_init(tiny_config());
    let rope = Rope::new(cfg.head_dim(), 64, cfg.rope_theta, F64, &Device::Cpu).unwrap();
    for layer in [0, 1] {
        let s = store();
        let block = Block::new(&s.root().pp("layer"), &cfg, layer).unwrap();
        let x = input_var(&[2, 12, cfg.hidden_size], 1);
        let ids: Vec<u32> = (0..24).collect();
        check_gradients(
            &with_input(&s, &x),
            || {
                probe(
                    &block
                        .forward(
                            x.as_tensor(),
                            &ids,
                            &rope,
                            &Default::default(),
                            &mut Default::default(),
                        )
                        .unwrap(),
                    2,
                )
            },
            4,
        );
    }
}

#[test]
fn full_model_loss_gradients() {
    let mut cfg = wider_init(tiny_config());
    cfg.vocab_size = 40;
    let model = Model::new_random(&cfg, 11, F64, &Device::Cpu).unwrap();
    let ids = Tensor::from_vec(
        (0..16u32).map(|i| (i * 7) % 40).collect::<Vec<_>>(),
        (2, 8),
        &Device::Cpu,
    )
    .unwrap();
    let targets = Tensor::from_vec(
        (0..16u32).map(|i| (i * 5 + 3) % 40).collect::<Vec<_>>(),
        16,
        &Device::Cpu,
    )
    .unwrap();
    let loss = || {
        let out = model.forward(&ids).unwrap();
        let ce = cross_entropy(&out.logits.reshape((16, 40)).unwrap(), &targets).unwrap();
        (ce + (out.diagnostics.aux_loss().unwrap().unwrap() * 0.01).unwrap()).unwrap()
    };
    check_gradients(&model.store.vars(), loss, 3);
}

#[test]
fn every_trainable_tensor_gets_a_nonzero_gradient() {
    for tie in [false, true] {
        let mut cfg = tiny_config();
        cfg.tie_word_embeddings = tie;
        let model = Model::new_random(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
        let (b, t) = (4, 24);
        let ids: Vec<u32> = (0..(b * t) as u32)
            .map(|i| (i * 37 + 11) % cfg.vocab_size as u32)
            .collect();
        let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
        let targets: Vec<u32> = (0..(b * t) as u32)
            .map(|i| (i * 13 + 5) % cfg.vocab_size as u32)
            .collect();
        let targets = Tensor::from_vec(targets, b * t, &Device::Cpu).unwrap();
        let out = model.forward(&ids).unwrap();
        assert!(
            out.diagnostics
                .routing()
                .iter()
                .flatten()
                .all(|r| r.load.iter().all(|&l| l > 0)),
            "every expert should be routed to in this batch"
        );
        let ce = cross_entropy(
            &out.logits.reshape((b * t, cfg.vocab_size)).unwrap(),
            &targets,
        )
        .unwrap();
        let loss = (ce + out.diagnostics.aux_loss().unwrap().unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        let vars = model.store.vars();
        assert_eq!(vars.len(), model.store.vars().len());
        for (name, var) in vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("`{name}` received no gradient"));
            let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(norm > 0.0, "`{name}` received an all-zero gradient");
        }
    }
}

/// The trainer's loss (`forward_hidden_with` + `lm_loss`, the head fused with the
/// cross-entropy) against logits + cross-entropy: the same loss and the same gradient
/// for every parameter, with the head untied and tied to the embedding (whose gradient
/// then sums the lookup's and the head's).
#[test]
fn fused_head_loss_equals_the_logits_loss_for_every_parameter() {
    for tie in [false, true] {
        let mut cfg = wider_init(tiny_config());
        cfg.tie_word_embeddings = tie;
        let model = Model::new_random(&cfg, 17, F64, &Device::Cpu).unwrap();
        let (b, t, v) = (3, 11, cfg.vocab_size);
        let ids: Vec<u32> = (0..(b * t) as u32)
            .map(|i| (i * 29 + 7) % v as u32)
            .collect();
        let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
        let targets: Vec<u32> = (0..(b * t) as u32)
            .map(|i| (i * 11 + 2) % v as u32)
            .collect();
        let targets = Tensor::from_vec(targets, b * t, &Device::Cpu).unwrap();
        let opts = sparrow::model::options::ForwardOptions::default();

        let out = model.net.forward_with(&ids, &opts).unwrap();
        let plain = cross_entropy(&out.logits.reshape((b * t, v)).unwrap(), &targets).unwrap();
        let hidden = model.net.forward_hidden_with(&ids, &opts).unwrap().hidden;
        let fused = model.net.lm_loss(&hidden, &targets).unwrap();
        let nll = model.net.lm_nll(&hidden, &targets).unwrap();
        let want: f64 = plain.to_scalar().unwrap();
        assert!(
            (fused.to_scalar::<f64>().unwrap() - want).abs() < 1e-12 * want,
            "tie {tie}"
        );
        assert!(
            (nll - want).abs() < 1e-12 * want,
            "tie {tie}: lm_nll {nll} vs {want}"
        );
        // Per row, against the plain f64 NLL of the logits.
        let want_rows = nll_reference(&out.logits.reshape((b * t, v)).unwrap(), &targets);
        let rows = model.net.nll_rows(&hidden, &targets).unwrap();
        assert_eq!(rows.len(), b * t);
        for (i, (got, w)) in rows.iter().zip(&want_rows).enumerate() {
            let err = (got - w).abs() / w.abs().max(1.0);
            assert!(err < 1e-12, "tie {tie} row {i}: {got} vs {w}");
        }

        let (gp, gf) = (plain.backward().unwrap(), fused.backward().unwrap());
        for (name, var) in model.store.vars() {
            let (a, e) = (gf.get(var.as_tensor()), gp.get(var.as_tensor()));
            let (a, e) = (a.expect("fused gradient"), e.expect("plain gradient"));
            let err = rel_err(a, e);
            assert!(err < 1e-10, "tie {tie}: `{name}` gradient differs by {err}");
        }
    }
}
