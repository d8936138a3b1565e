//! DSA layers inside the model: sparse == dense when the context fits in k, cached
//! decode == full forward past k, gradients of each indexer training mode (finite
//! differences where the loss is smooth, presence elsewhere), and config validation.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use sparrow::config::{AttentionKind, IndexerKind, IndexerTrainMode};
use sparrow::kernels::topk::NONE;
use sparrow::model::options::{Collect, ForwardOptions};
use sparrow::model::Model;
use sparrow::train::loss::cross_entropy;
use std::collections::HashMap;

const KINDS: [IndexerKind; 2] = [IndexerKind::Lightning, IndexerKind::MlpGate];

fn ids(n: usize, vocab: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 97 + 13 + seed * 31) % vocab as u32)
        .collect()
}

fn batch(b: usize, t: usize, vocab: usize) -> Tensor {
    let v: Vec<u32> = (0..b).flat_map(|r| ids(t, vocab, r as u32)).collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

/// The same weights without the indexer, as a dense model.
fn dense_twin(model: &Model) -> Model {
    let mut cfg = model.cfg.clone();
    cfg.layer_types = None;
    let tensors: HashMap<String, Tensor> = model
        .store
        .vars()
        .into_iter()
        .filter(|(n, _)| !n.contains(".indexer."))
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    Model::from_tensors(&cfg, tensors, "twin".as_ref(), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn dsa_equals_dense_when_the_context_fits_in_k() {
    for kind in KINDS {
        let mut cfg = tiny_dsa_config(kind, 16);
        cfg.initializer_range = 0.1;
        let model = Model::new_random(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
        let dense = dense_twin(&model);
        let x = batch(2, 16, cfg.vocab_size);
        let a = model.forward(&x).unwrap().logits;
        let b = dense.forward(&x).unwrap().logits;
        assert_eq!(to_f64_vec(&a), to_f64_vec(&b), "{kind:?}");
        // Past k the layers differ: the selection is really used.
        let x = batch(1, 40, cfg.vocab_size);
        let a = model.forward(&x).unwrap().logits;
        let b = dense.forward(&x).unwrap().logits;
        assert!(
            rel_err(&a, &b) > 1e-4,
            "{kind:?}: sparse equals dense past k"
        );
    }
}

#[test]
fn dsa_stepped_decode_equals_full_forward() {
    for kind in KINDS {
        use sparrow::config::IndexCacheDtype;
        for dtype in [
            IndexCacheDtype::Float32,
            IndexCacheDtype::Bfloat16,
            IndexCacheDtype::Int8,
        ] {
            let mut cfg = tiny_dsa_config(kind, 6);
            cfg.initializer_range = 0.1;
            cfg.index_cache_dtype = dtype;
            let model = Model::new_random(&cfg, 9, DType::F32, &Device::Cpu).unwrap();
            let n = 41;
            let toks = ids(n, cfg.vocab_size, 0);
            let full = model
                .forward(&Tensor::from_slice(&toks, (1, n), &Device::Cpu).unwrap())
                .unwrap()
                .logits;
            let (inc, cache) = stepped(&model, &toks, &prefill_then_decode(9, n));
            let err = rel_err(&inc, &full);
            assert!(err < 1e-5, "{kind:?} {dtype:?}: rel err {err:e}");
            // The index cache holds one key per position, in the chosen precision.
            let index_bytes = cache.layers[1].index.as_ref().unwrap().bytes();
            let per_token = match dtype {
                IndexCacheDtype::Float32 => 4 * cfg.index_head_dim,
                IndexCacheDtype::Bfloat16 => 2 * cfg.index_head_dim,
                IndexCacheDtype::Int8 => cfg.index_head_dim + 4,
            };
            assert_eq!(index_bytes, n.div_ceil(64) * 64 * per_token);
            assert!(cache.layers[0].index.is_none());
        }
    }
}

fn opts(mode: IndexerTrainMode, kl: bool) -> ForwardOptions {
    ForwardOptions {
        indexer_mode: Some(mode),
        moe_capacity: true,
        dense: false,
        collect: Collect {
            indexer_kl: kl,
            ..Collect::default()
        },
        kl_query_sample: None,
    }
}

/// The DSA layouts that train: each indexer kind over per-head K/V, and the lightning
/// indexer over MLA (DeepSeek-V3.2).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    Kv(IndexerKind),
    Mla,
}

const LAYOUTS: [Layout; 3] = [
    Layout::Kv(IndexerKind::Lightning),
    Layout::Kv(IndexerKind::MlpGate),
    Layout::Mla,
];

fn f64_model_of(layout: Layout, topk: usize) -> Model {
    let mut cfg = match layout {
        Layout::Kv(kind) => tiny_dsa_config(kind, topk),
        Layout::Mla => tiny_mla_config(Some(6), Some(topk)),
    };
    cfg.initializer_range = 0.3;
    cfg.n_routed_experts = 0; // dense FFNs: the routing choice is not under test here
    cfg.first_k_dense_replace = 0;
    Model::new_random(&cfg, 17, DType::F64, &Device::Cpu).unwrap()
}

/// The forward's indexer KL (mean over DSA layers); the mode must compute one.
fn indexer_kl(model: &Model, x: &Tensor, o: &ForwardOptions) -> Tensor {
    let out = model.net.forward_with(x, o).unwrap();
    out.diagnostics
        .indexer_kl()
        .unwrap()
        .expect("an indexer KL")
}

fn lm_loss(model: &Model, x: &Tensor, o: &ForwardOptions) -> Tensor {
    let (b, t) = x.dims2().unwrap();
    let out = model.net.forward_with(x, o).unwrap();
    let tgt = Tensor::from_vec(ids(b * t, model.cfg.vocab_size, 5), b * t, &Device::Cpu).unwrap();
    cross_entropy(
        &out.logits.reshape((b * t, model.cfg.vocab_size)).unwrap(),
        &tgt,
    )
    .unwrap()
}

#[test]
fn sparse_mode_gradients_match_finite_differences() {
    // Sparse mode: the LM loss is smooth in the main weights for a fixed selection, and
    // the KL is smooth in the indexer weights. (The selection itself does not move under
    // a 1e-6 perturbation.)
    for layout in LAYOUTS {
        let model = f64_model_of(layout, 5);
        let x = batch(2, 12, model.cfg.vocab_size);
        let o = opts(IndexerTrainMode::Sparse, true);
        let (indexer, main): (Vec<_>, Vec<_>) = model
            .store
            .vars()
            .into_iter()
            .partition(|(n, _)| n.contains(".indexer."));
        let main: Vec<_> = main
            .into_iter()
            .filter(|(n, _)| n.contains("layers.1.self_attn"))
            .collect();
        check_gradients(&main, || lm_loss(&model, &x, &o), 6);
        check_gradients(&indexer, || indexer_kl(&model, &x, &o), 6);
    }
}

#[test]
fn dense_warmup_kl_gradients_match_finite_differences() {
    for layout in [Layout::Kv(IndexerKind::Lightning), Layout::Mla] {
        let model = f64_model_of(layout, 5);
        let x = batch(2, 10, model.cfg.vocab_size);
        let o = opts(IndexerTrainMode::DenseWarmup, true);
        let indexer: Vec<_> = model
            .store
            .vars()
            .into_iter()
            .filter(|(n, _)| n.contains(".indexer."))
            .collect();
        assert!(!indexer.is_empty());
        check_gradients(&indexer, || indexer_kl(&model, &x, &o), 8);
        // The warm-up's attention is dense: the LM loss equals the dense twin's.
        let lm = lm_loss(&model, &x, &o);
        let plain = lm_loss(&model, &x, &ForwardOptions::default());
        let dense = lm_loss(
            &model,
            &x,
            &ForwardOptions {
                dense: true,
                ..Default::default()
            },
        );
        assert!(
            rel_err(&lm, &dense) < 1e-12,
            "{layout:?}: warm-up is not dense"
        );
        assert!(
            rel_err(&lm, &plain) > 1e-9,
            "{layout:?}: selection unused past k"
        );
    }
}

#[test]
fn sampled_warmup_kl_gradients_match_finite_differences() {
    // The warm-up's KL on a sample of the queries (`kl_query_sample`): smooth in the
    // indexer weights; a different draw is a different loss; drawing every query is the
    // full KL.
    for layout in [Layout::Kv(IndexerKind::Lightning), Layout::Mla] {
        let model = f64_model_of(layout, 5);
        let x = batch(2, 11, model.cfg.vocab_size);
        let sampled = |count: usize, seed: u64| ForwardOptions {
            kl_query_sample: Some((count, seed)),
            ..opts(IndexerTrainMode::DenseWarmup, true)
        };
        let indexer: Vec<_> = model
            .store
            .vars()
            .into_iter()
            .filter(|(n, _)| n.contains(".indexer."))
            .collect();
        check_gradients(&indexer, || indexer_kl(&model, &x, &sampled(4, 7)), 8);
        let kl = |o: &ForwardOptions| -> f64 { indexer_kl(&model, &x, o).to_scalar().unwrap() };
        let full = kl(&opts(IndexerTrainMode::DenseWarmup, true));
        assert_ne!(kl(&sampled(4, 7)), kl(&sampled(4, 8)), "{layout:?}");
        assert_eq!(kl(&sampled(11, 7)), full, "{layout:?}");
        let ten = kl(&sampled(10, 7));
        assert!(
            (ten - full).abs() < 0.5 * full,
            "{layout:?}: {ten} vs {full}"
        );
    }
}

#[test]
fn every_parameter_learns_in_every_mode() {
    for layout in LAYOUTS {
        let kind = layout;
        for (mode, kl) in [
            (IndexerTrainMode::DenseWarmup, true),
            (IndexerTrainMode::Sparse, true),
            (IndexerTrainMode::Ste, false),
            (IndexerTrainMode::Ste, true),
        ] {
            if layout == Layout::Mla && mode == IndexerTrainMode::Ste {
                continue; // the straight-through gate is the mlp_gate's (not on MLA)
            }
            let model = f64_model_of(layout, 5);
            let x = batch(2, 14, model.cfg.vocab_size);
            let o = opts(mode, kl);
            let out = model.net.forward_with(&x, &o).unwrap();
            let b_t = 2 * 14;
            let tgt =
                Tensor::from_vec(ids(b_t, model.cfg.vocab_size, 5), b_t, &Device::Cpu).unwrap();
            let mut loss = cross_entropy(
                &out.logits.reshape((b_t, model.cfg.vocab_size)).unwrap(),
                &tgt,
            )
            .unwrap();
            assert_eq!(
                out.diagnostics.indexer_kl().unwrap().is_some(),
                kl,
                "{kind:?} {mode:?}"
            );
            if let Some(k) = &out.diagnostics.indexer_kl().unwrap() {
                let v: f64 = k.to_scalar().unwrap();
                assert!(v.is_finite() && v >= -1e-9, "KL {v}");
                loss = (loss + k).unwrap();
            }
            let grads = loss.backward().unwrap();
            for (name, var) in model.store.vars() {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{kind:?} {mode:?}: no gradient for {name}"));
                let norm: f64 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
                assert!(norm > 0.0, "{kind:?} {mode:?}: zero gradient for {name}");
            }
            // In STE mode without KL the indexer learns from the LM loss alone.
            if mode == IndexerTrainMode::Ste && !kl {
                let lm = lm_loss(&model, &x, &o);
                let g = lm.backward().unwrap();
                for (name, var) in model
                    .store
                    .vars()
                    .iter()
                    .filter(|(n, _)| n.contains(".indexer."))
                {
                    assert!(
                        g.get(var.as_tensor()).is_some(),
                        "{kind:?}: STE gives {name} no LM gradient"
                    );
                }
            }
        }
    }
}

#[test]
fn recall_is_one_within_k_and_a_share_past_it() {
    for mut cfg in [
        tiny_dsa_config(IndexerKind::Lightning, 7),
        tiny_mla_config(Some(6), Some(7)),
    ] {
        cfg.initializer_range = 0.2;
        let model = Model::new_random(&cfg, 4, DType::F32, &Device::Cpu).unwrap();
        let o = ForwardOptions {
            collect: Collect {
                recall_from: Some(0),
                ..Collect::default()
            },
            ..Default::default()
        };
        let out = model
            .net
            .forward_with(&batch(1, 30, cfg.vocab_size), &o)
            .unwrap();
        let layers = &out.diagnostics.layers;
        assert!(layers[0].recall.is_none(), "dense layer has no recall");
        let r = layers[1].recall.as_ref().unwrap();
        assert_eq!(r.len(), 30);
        for (t, &x) in r.iter().enumerate() {
            assert!((0.0..=1.0 + 1e-5).contains(&x), "recall {x}");
            if t < 7 {
                assert!(
                    (x - 1.0).abs() < 1e-5,
                    "query {t} sees <= k keys: recall {x}"
                );
            }
        }
        assert!(
            r[29] < 1.0,
            "past k some mass must be missed by an untrained indexer"
        );
    }
}

#[test]
fn dsa_config_errors_name_the_field() {
    let base = tiny_dsa_config(IndexerKind::Lightning, 4);
    type Edit = Box<dyn Fn(&mut sparrow::ModelConfig)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("index_topk", Box::new(|c| c.index_topk = 0)),
        ("index_n_heads", Box::new(|c| c.index_n_heads = 0)),
        (
            "index_rope_head_dim",
            Box::new(|c| c.index_rope_head_dim = 9),
        ),
        ("index_head_dim", Box::new(|c| c.index_head_dim = 0)),
        (
            "layer_types",
            Box::new(|c| c.layer_types = Some(vec![AttentionKind::Dsa])),
        ),
        (
            "index_gate_intermediate_size",
            Box::new(|c| {
                c.indexer_kind = IndexerKind::MlpGate;
                c.index_gate_intermediate_size = 0;
            }),
        ),
    ];
    for (field, edit) in cases {
        let mut c = base.clone();
        edit(&mut c);
        let err = sparrow::ModelConfig::from_json(&c.to_json())
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
    let bad = base.to_json().replace("\"lightning\"", "\"lightening\"");
    let err = sparrow::ModelConfig::from_json(&bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("indexer_kind"), "{err}");
}

#[test]
fn the_collector_keeps_each_sparse_layers_causal_selection_only_when_asked() {
    let (k, t) = (7, 30);
    for cfg in [
        tiny_dsa_config(IndexerKind::Lightning, k),
        tiny_mla_config(Some(6), Some(k)),
    ] {
        let model = Model::new_random(&cfg, 5, DType::F32, &Device::Cpu).unwrap();
        let x = batch(2, t, cfg.vocab_size);
        let plain = model.net.forward(&x).unwrap();
        assert!(plain
            .diagnostics
            .layers
            .iter()
            .all(|l| l.selection.is_none() && l.recall.is_none() && l.indexer_kl.is_none()));
        let o = ForwardOptions {
            collect: Collect {
                selection: true,
                ..Collect::default()
            },
            ..Default::default()
        };
        let out = model.net.forward_with(&x, &o).unwrap();
        assert_eq!(
            rel_err(&out.logits, &plain.logits),
            0.0,
            "collecting changes nothing"
        );
        let layers = &out.diagnostics.layers;
        assert!(layers[0].selection.is_none(), "dense layer selects nothing");
        let sel = layers[1]
            .selection
            .as_ref()
            .expect("the DSA layer's selection");
        assert_eq!(sel.len(), 2 * t * k);
        for (row, slots) in sel.chunks_exact(k).enumerate() {
            let q = row % t;
            let mut kept: Vec<u32> = slots.iter().copied().filter(|&i| i != NONE).collect();
            kept.sort_unstable();
            kept.dedup();
            assert_eq!(kept.len(), k.min(q + 1), "query {q}: {slots:?}");
            assert!(
                kept.iter().all(|&i| i as usize <= q),
                "query {q}: {slots:?}"
            );
        }
    }
}
