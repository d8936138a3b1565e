//! DeepSeek-V4 layers beyond the transformers fixtures (`hf_parity.rs`): the engine's
//! step against the whole-window forward on our own random models at awkward sizes,
//! finite-difference gradients (f64) of each V4 part (the three attention layer types
//! with their compressors, sinks and grouped output; the hyper-connections and their
//! head; the clamped SwiGLU) and a gradient reaching every parameter of a whole model,
//! the config checks, and the decode state's refusal to rewind.

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::*;
use sparrow::config::{AttentionKind, IndexerTrainMode, MlpKind, ModelConfig, RouterKind};
use sparrow::model::diagnostics::LayerDiagnostics;
use sparrow::model::hyper_connection::{HyperConnection, HyperHead};
use sparrow::model::mlp::Mlp;
use sparrow::model::options::ForwardOptions;
use sparrow::model::params::VarStore;
use sparrow::model::v4_attention::V4Attention;
use sparrow::model::Model;

fn tiny_v4() -> ModelConfig {
    tiny_v4_config()
}

fn tokens(n: usize, v: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % v as u32).collect()
}

#[test]
fn step_equals_the_whole_window_forward() {
    for (seed, yarn) in [(3u64, false), (4, true)] {
        let mut cfg = tiny_v4();
        cfg.initializer_range = 0.2;
        if yarn {
            cfg.compress_rope_yarn = Some(sparrow::config::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 16,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: 1.0,
                truncate: true,
            });
            cfg.layer_types = Some(vec![
                AttentionKind::HeavilyCompressedAttention,
                AttentionKind::CompressedSparseAttention,
                AttentionKind::SlidingAttention,
                AttentionKind::CompressedSparseAttention,
            ]);
        }
        let model = Model::new_random(&cfg, seed, DType::F32, &Device::Cpu).unwrap();
        let t = 29;
        let ids = tokens(t, cfg.vocab_size);
        let full = model
            .forward(&Tensor::from_vec(ids.clone(), (1, t), &Device::Cpu).unwrap())
            .unwrap()
            .logits;
        for chunks in [
            vec![1; t],
            vec![3, 1, 4, 1, 5, 9, 2, 4],
            prefill_then_decode(17, t),
        ] {
            let (stepped, cache) = stepped(&model, &ids, &chunks);
            let err = rel_err(&stepped, &full);
            assert!(err < 1e-4, "seed {seed}, chunks {chunks:?}: {err:e}");
            assert_eq!(cache.len(), t);
        }
    }
}

/// Weighted sum of an output: a scalar whose gradient reaches every element.
fn probe(y: &Tensor, seed: u64) -> Tensor {
    (y * randn(y.dims(), seed, DType::F64))
        .unwrap()
        .sum_all()
        .unwrap()
}

/// Move the parameters that start at zeros / ones (sinks, position biases, the
/// hyper-connections' biases and scales) off them, so every path carries signal.
fn perturb_flat_inits(store: &VarStore) {
    for (name, var) in store.vars() {
        let flat = [
            "sinks",
            "position_bias",
            ".base",
            "hc_base",
            ".scale",
            "hc_scale",
        ];
        if flat.iter().any(|f| name.ends_with(f)) {
            let shifted = (randn(var.dims(), name.len() as u64, DType::F64) * 0.5).unwrap();
            var.set(&(var.as_tensor() + shifted).unwrap()).unwrap();
        }
    }
}

#[test]
fn v4_attention_gradients_match_finite_differences() {
    let mut cfg = tiny_v4();
    cfg.initializer_range = 0.3;
    for layer in [0usize, 1, 2] {
        let store = VarStore::random(5 + layer as u64, DType::F64, &Device::Cpu);
        let attn = V4Attention::new(&store.root().pp("self_attn"), &cfg, layer, 0.3).unwrap();
        perturb_flat_inits(&store);
        let x = Var::from_tensor(&randn(&[2, 13, cfg.hidden_size], 1, DType::F64)).unwrap();
        // The CSA indexer's parameters choose entries (a discrete top-k): no gradient
        // reaches them through the attention output.
        let mut vars: Vec<(String, Var)> = store
            .vars()
            .into_iter()
            .filter(|(n, _)| !n.contains(".compressor.indexer."))
            .collect();
        vars.push(("<input>".into(), x.clone()));
        let kind = cfg.attention_kind(layer);
        let opts = ForwardOptions::default();
        let forward = || {
            let mut diag = LayerDiagnostics::default();
            attn.forward(x.as_tensor(), &opts, &mut diag).unwrap()
        };
        check_gradients(&vars, || probe(&forward(), 2), 4);
        let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        let compressed = names.iter().any(|n| n.contains("compressor.position_bias"));
        assert_eq!(
            compressed,
            kind != AttentionKind::SlidingAttention,
            "{kind:?}"
        );
    }
}

#[test]
fn csa_indexer_kl_trains_the_indexer_only() {
    let mut cfg = tiny_v4();
    cfg.initializer_range = 0.3;
    let store = VarStore::random(21, DType::F64, &Device::Cpu);
    let attn = V4Attention::new(&store.root().pp("self_attn"), &cfg, 0, 0.3).unwrap();
    perturb_flat_inits(&store);
    let x = Var::from_tensor(&randn(&[2, 16, cfg.hidden_size], 1, DType::F64)).unwrap();
    let kl = |mode| {
        let opts = ForwardOptions {
            indexer_mode: Some(mode),
            ..Default::default()
        };
        let mut diag = LayerDiagnostics::default();
        attn.forward(x.as_tensor(), &opts, &mut diag).unwrap();
        diag.indexer_kl
            .expect("a CSA layer in training reports its indexer KL")
    };
    let (indexer, rest): (Vec<_>, Vec<_>) = store
        .vars()
        .into_iter()
        .partition(|(n, _)| n.contains(".compressor.indexer."));
    assert!(!indexer.is_empty());
    for mode in [IndexerTrainMode::DenseWarmup, IndexerTrainMode::Sparse] {
        let loss = kl(mode);
        let value: f64 = loss.to_scalar().unwrap();
        assert!(value.is_finite() && value > 0.0, "{mode:?}: KL {value}");
        let grads = loss.backward().unwrap();
        for (name, var) in &indexer {
            assert!(
                grads.get(var.as_tensor()).is_some(),
                "{mode:?}: `{name}` untrained"
            );
        }
        // The indexer's input is detached: its loss moves nothing else.
        for (name, var) in &rest {
            assert!(
                grads.get(var.as_tensor()).is_none(),
                "{mode:?}: KL reached `{name}`"
            );
        }
        assert!(
            grads.get(x.as_tensor()).is_none(),
            "{mode:?}: KL reached the input"
        );
    }
    // In the dense warm-up the target does not depend on a selection: the KL is smooth
    // in the indexer's parameters.
    check_gradients(&indexer, || kl(IndexerTrainMode::DenseWarmup), 4);
}

#[test]
fn hyper_connection_gradients_match_finite_differences() {
    let mut cfg = tiny_v4();
    cfg.initializer_range = 0.3;
    let store = VarStore::random(7, DType::F64, &Device::Cpu);
    let n = cfg.hc_mult.unwrap();
    let hc = HyperConnection::new(&store.root().pp("attn_hc"), &cfg, n).unwrap();
    let head = HyperHead::new(&store.root().pp("hc_head"), &cfg, n).unwrap();
    perturb_flat_inits(&store);
    let streams = Var::from_tensor(&randn(&[2, 5, n, cfg.hidden_size], 1, DType::F64)).unwrap();
    let w = randn(&[cfg.hidden_size, cfg.hidden_size], 3, DType::F64);
    let mut vars = store.vars();
    vars.push(("<streams>".into(), streams.clone()));
    let loss = || {
        let x = streams.as_tensor();
        let mix = hc.mix(x).unwrap();
        // A stand-in for the block's half: a smooth map of the collapsed input.
        let f = mix.collapsed.broadcast_matmul(&w).unwrap().tanh().unwrap();
        probe(&head.forward(&hc.merge(x, &mix, &f).unwrap()).unwrap(), 2)
    };
    check_gradients(&vars, loss, 6);
}

#[test]
fn clamped_swiglu_gradients_match_finite_differences() {
    let store = VarStore::random(11, DType::F64, &Device::Cpu);
    let mlp = Mlp::new(&store.root().pp("mlp"), 6, 9, 0.6, 0.6)
        .unwrap()
        .clamped(Some(0.5));
    let x = Var::from_tensor(&randn(&[2, 5, 6], 1, DType::F64)).unwrap();
    let mut vars = store.vars();
    vars.push(("<input>".into(), x.clone()));
    // The clamp bites on a good share of this input: some gradients are cut to zero.
    check_gradients(&vars, || probe(&mlp.forward(x.as_tensor()).unwrap(), 2), 8);
}

#[test]
fn every_v4_parameter_but_the_indexer_gets_a_gradient() {
    let cfg = tiny_v4();
    let model = Model::new_random(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let (b, t) = (2, 17);
    let ids = Tensor::from_vec(tokens(b * t, cfg.vocab_size), (b, t), &Device::Cpu).unwrap();
    let loss = probe(
        &model
            .forward(&ids)
            .unwrap()
            .logits
            .to_dtype(DType::F64)
            .unwrap(),
        4,
    );
    let grads = loss.backward().unwrap();
    for (name, var) in model.store.vars() {
        let got = grads.get(var.as_tensor());
        if name.contains(".compressor.indexer.") {
            // Trained by its own KL (not yet): the top-k passes no gradient.
            assert!(got.is_none(), "`{name}` got a gradient through the top-k");
            continue;
        }
        let g = got.unwrap_or_else(|| panic!("`{name}` received no gradient"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0, "`{name}` received an all-zero gradient");
    }
}

#[test]
fn bad_v4_configs_name_the_field() {
    type Edit = Box<dyn Fn(&mut ModelConfig)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|c| c.num_key_value_heads = Some(3)),
            "num_key_value_heads",
        ),
        (Box::new(|c| c.q_lora_rank = None), "q_lora_rank"),
        (Box::new(|c| c.o_groups = Some(2)), "o_groups"),
        (Box::new(|c| c.o_lora_rank = 0), "o_lora_rank"),
        (Box::new(|c| c.sliding_window = None), "sliding_window"),
        (Box::new(|c| c.compress_rates = None), "compress_rates"),
        (Box::new(|c| c.qk_rope_head_dim = 12), "qk_rope_head_dim"),
        (Box::new(|c| c.index_head_dim = 2), "index_head_dim"),
        (
            Box::new(|c| {
                if let Some(t) = &mut c.layer_types {
                    t[1] = AttentionKind::Dense;
                }
            }),
            "layer_types",
        ),
        (
            Box::new(|c| c.mlp_layer_types = Some(vec![MlpKind::Moe])),
            "mlp_layer_types",
        ),
        (Box::new(|c| c.hc_mult = Some(0)), "hc_mult"),
        (Box::new(|c| c.swiglu_limit = Some(-1.0)), "swiglu_limit"),
        (
            Box::new(|c| c.router_kind = RouterKind::TopkSoftmax),
            "scoring_func",
        ),
    ];
    for (edit, field) in cases {
        let mut cfg = tiny_v4();
        edit(&mut cfg);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{field}: {err}");
        // The same through config.json.
        let err = ModelConfig::from_json(&cfg.to_json())
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{field} (json): {err}");
    }
}

#[test]
fn a_rewound_v4_cache_is_refused_by_the_next_step() {
    let cfg = tiny_v4();
    let model = Model::new_random(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let ids = tokens(9, cfg.vocab_size);
    let (_, mut cache) = stepped(&model, &ids, &[9]);
    cache.truncate(4);
    let opts = sparrow::model::step::StepOptions::default();
    let mut input = [sparrow::model::StepInput {
        tokens: &ids[4..5],
        cache: &mut cache,
    }];
    let err = model.step(&mut input, &opts).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
    // Forgetting everything starts over.
    cache.truncate(0);
    let mut input = [sparrow::model::StepInput {
        tokens: &ids[..3],
        cache: &mut cache,
    }];
    model.step(&mut input, &opts).unwrap();
    assert_eq!(cache.len(), 3);
}

#[test]
fn bench_generate_decodes_from_a_synthesised_v4_cache() {
    use sparrow::bench::generate::{run, GenerateBench};
    let cfg = tiny_v4();
    let model = Model::new_random_for_inference(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
    let context = 200;
    let bench = GenerateBench {
        contexts: vec![context],
        batches: vec![2],
        decode_tokens: 3,
        prefill_chunk: 64,
        dense_baseline: false,
        dense_prefill_max: 0,
        synthetic_cache: true,
        seed: 1,
    };
    let rows = run(&model, &bench, |_| {}).unwrap();
    let row = &rows[0];
    assert!(row.prefill_tokens_per_s.is_nan(), "no prefill was timed");
    assert!(row.decode_tokens_per_s > 0.0);
    // Per layer and sequence a step reads: the window (5 rows of 10 f32), HCA's 40
    // entries, or CSA's index keys (67 of 6 f32, scanned in whole blocks of 64) and its
    // top-2 entries; 202 positions cached when the last step is counted.
    let (d, w) = (10.0, 5.0 * 10.0 * 4.0);
    let csa = |pos: f64| w + ((pos / 3.0).floor() / 64.0).ceil() * 64.0 * 6.0 * 4.0 + 2.0 * d * 4.0;
    let hca = |pos: f64| w + (pos / 5.0).floor() * d * 4.0;
    let pos = (context + bench.decode_tokens - 1) as f64;
    let per_seq = 2.0 * csa(pos) + w + hca(pos);
    assert!(
        (row.decode_cache_bytes - 2.0 * per_seq).abs() < 1e-6,
        "{} vs {}",
        row.decode_cache_bytes,
        2.0 * per_seq
    );
    // Synthesised caches are for V4 layers: a standard model is refused by name.
    let dense =
        Model::new_random_for_inference(&tiny_config(), 2, DType::F32, &Device::Cpu).unwrap();
    let err = run(&dense, &bench, |_| {}).unwrap_err().to_string();
    assert!(err.contains("DeepSeek-V4"), "{err}");
}

#[test]
fn sink_softmax_matches_its_reference_and_finite_differences() {
    use sparrow::kernels::sink_softmax::{reference, SinkSoftmax};
    let dims = [2usize, 3, 7, 11];
    let [b, h, t, s] = dims;
    let x = randn(&dims, 1, DType::F64);
    // A causal-and-window style mask with one fully masked key per row group.
    let mask: Vec<f64> = (0..b * t * s)
        .map(|i| {
            let (q, k) = ((i / s) % t, i % s);
            if k > q + 3 || k == 2 {
                -1e9
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (b, t, s), &Device::Cpu).unwrap();
    let sinks = randn(&[h], 2, DType::F64);
    let op = SinkSoftmax { scale: 0.37 };
    let got = op.apply(&x, &mask, &sinks).unwrap();
    let want = reference(
        &to_f64_vec(&x),
        &to_f64_vec(&mask),
        &to_f64_vec(&sinks),
        dims,
        0.37,
    );
    let want = Tensor::from_vec(want, dims.as_slice(), &Device::Cpu).unwrap();
    assert!(rel_err(&got, &want) < 1e-12, "{:e}", rel_err(&got, &want));
    // f32 against the f64 reference.
    let got32 = op
        .apply(
            &x.to_dtype(DType::F32).unwrap(),
            &mask.to_dtype(DType::F32).unwrap(),
            &sinks.to_dtype(DType::F32).unwrap(),
        )
        .unwrap();
    assert!(rel_err(&got32, &want) < 1e-5);
    // The rows do not sum to 1: the sinks keep the rest.
    let row: f64 = to_f64_vec(&got)[..s].iter().sum();
    assert!(row < 1.0 && row > 0.0);
    let xv = Var::from_tensor(&x).unwrap();
    let sv = Var::from_tensor(&sinks).unwrap();
    let vars = vec![
        ("scores".to_string(), xv.clone()),
        ("sinks".to_string(), sv.clone()),
    ];
    check_gradients(
        &vars,
        || probe(&op.apply(xv.as_tensor(), &mask, sv.as_tensor()).unwrap(), 3),
        12,
    );
}

#[test]
fn attention_bench_times_each_v4_layer_type_against_a_dense_layer() {
    use sparrow::bench::v4_layers::decode_rows;
    let cfg = tiny_v4();
    let context = 200;
    let rows = decode_rows(&cfg, context, 10.0).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.layer).collect();
    assert_eq!(
        names,
        ["CSA", "sliding", "HCA"],
        "one row per layer type, in order"
    );
    let (d, w) = (10.0, 5.0 * 10.0 * 4.0);
    for r in &rows {
        assert_eq!(r.context, context);
        assert!(r.v4_ms > 0.0 && r.dense_ms > 0.0 && r.v4_gbps > 0.0);
        assert!((r.speedup - r.dense_ms / r.v4_ms).abs() < 1e-9);
        // The dense layer: K and V of one 10-dim head in f32, nothing else.
        assert_eq!(r.dense_cache_bytes_per_token, 2 * 10 * 4);
        // What a step reads before it runs (200 cached): the window, plus HCA's 40
        // entries or CSA's 66 index keys (whole blocks of 64) and its top-2 entries.
        let want = match r.layer {
            "sliding" => w,
            "HCA" => w + 40.0 * d * 4.0,
            _ => w + 128.0 * 6.0 * 4.0 + 2.0 * d * 4.0,
        };
        assert!(
            (r.v4_read_bytes as f64 - want).abs() < 1e-9,
            "{}: {}",
            r.layer,
            r.v4_read_bytes
        );
    }
    // A config without V4 layers is refused by name.
    let err = decode_rows(&tiny_config(), context, 10.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("DeepSeek-V4"), "{err}");
}

#[test]
fn deepseek_v4_config_errors_name_the_field() {
    use sparrow::formats::hf::parse_config;
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/hf/deepseek-v4");
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let good: serde_json::Value = serde_json::from_str(&text).unwrap();
    parse_config(&text, &path).expect("the fixture's config parses");
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        edit(&mut v);
        parse_config(&v.to_string(), &path)
            .expect_err("a bad config is an error")
            .to_string()
    };
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "attention_bias",
            Box::new(|v| v["attention_bias"] = true.into()),
        ),
        ("hidden_act", Box::new(|v| v["hidden_act"] = "gelu".into())),
        (
            "sliding_window",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("sliding_window");
            }),
        ),
        (
            "scoring_func",
            Box::new(|v| v["scoring_func"] = "tanh".into()),
        ),
        (
            "rope_parameters.compress.factor",
            Box::new(|v| {
                v["rope_parameters"]["compress"]
                    .as_object_mut()
                    .unwrap()
                    .remove("factor");
            }),
        ),
        (
            "rope_parameters.compress.rope_type",
            Box::new(|v| v["rope_parameters"]["compress"]["rope_type"] = "linear".into()),
        ),
        (
            "rope_parameters.main.rope_type",
            Box::new(|v| v["rope_parameters"]["main"]["rope_type"] = "dynamic".into()),
        ),
        (
            "compress_ratios",
            Box::new(|v| {
                let o = v.as_object_mut().unwrap();
                o.remove("layer_types");
                o.remove("compress_rates");
                o.insert("compress_ratios".into(), serde_json::json!([0, 4, 5, 4]));
            }),
        ),
        (
            "hidden_size",
            Box::new(|v| v["hidden_size"] = "wide".into()),
        ),
    ];
    for (field, edit) in cases {
        let err = with(&*edit);
        assert!(err.contains(field), "{field}: {err}");
        assert!(err.contains("config.json"), "the file is named: {err}");
    }
    // Not JSON at all: an error, not a panic.
    assert!(parse_config("{\"model_type\": \"deepseek_v4\",", &path).is_err());
}
