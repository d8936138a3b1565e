//! DSA indexers attached to a pretrained dense model as an adapter (DeepSeek-V3.2's
//! recipe, `sparrow dsa attach`): the adapter holds the indexers only and loads over
//! its base (a quantized GGUF file here); within `index_topk` positions it computes
//! the base exactly; a wrong base is refused; training the indexers alone moves only
//! them, writes adapter checkpoints and resumes exactly.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use sparrow::config::{AttentionKind, ModelConfig};
use sparrow::model::params::ParamSet;
use sparrow::model_dir::{AdapterSpec, SaveOptions, ADAPTER_JSON, ADAPTER_WEIGHTS};
use sparrow::model_source::{self, ModelSource, WeightFormat};
use sparrow::train::metrics::read_metrics;
use sparrow::train::{resume, train, ResumeRequest, TrainOptions, TrainRequest};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn base_file() -> PathBuf {
    repo_root().join("fixtures/gguf/tiny-llama-gqa-untied.gguf")
}

/// The base's config with its second layer sparse (top-`topk`).
fn sparse_config(base: &ModelSource, topk: usize) -> ModelConfig {
    let mut c = model_source::read_config(base).unwrap();
    let mut types = vec![AttentionKind::Dense; c.num_hidden_layers];
    types[1] = AttentionKind::Dsa;
    c.layer_types = Some(types);
    c.index_topk = topk;
    c.index_n_heads = 4;
    c.index_head_dim = 8;
    c.index_rope_head_dim = 4;
    c.initializer_range = 0.2;
    c.validate().unwrap();
    c
}

/// Attach indexers to the fixture and write the adapter into `dir`.
fn write_adapter(dir: &Path, topk: usize) -> ModelConfig {
    let base = model_source::resolve(&base_file(), false).unwrap();
    let cfg = sparse_config(&base, topk);
    let model = model_source::attach(&base, &cfg, ParamSet::Indexer, 3, &Device::Cpu).unwrap();
    let tok = model_source::load_tokenizer(&base).unwrap();
    let spec = AdapterSpec {
        base: base_file().canonicalize().unwrap().to_string_lossy().into(),
        base_sha256: Some(sparrow::registry::sha256_file(&base_file()).unwrap()),
        params: ParamSet::Indexer,
    };
    let opts = SaveOptions {
        tokenizer: Some(&tok),
        ..Default::default()
    };
    sparrow::model_dir::save_adapter(&model, dir, &spec, &opts).unwrap();
    cfg
}

fn logits(spec: &Path, weights: WeightFormat, ids: &[u32]) -> Tensor {
    let source = model_source::resolve(spec, false).unwrap();
    let (model, _) =
        model_source::load_for_inference(&source, weights, DType::F32, &Device::Cpu, |_| {})
            .unwrap();
    let x = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    model.forward(&x).unwrap().logits
}

fn ids(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % 260 + 3).collect()
}

#[test]
fn an_adapter_holds_the_indexers_only_and_computes_its_base_within_k() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), 16);
    let (tensors, _) =
        sparrow::weights::load(&dir.path().join(ADAPTER_WEIGHTS), &Device::Cpu).unwrap();
    assert!(!tensors.is_empty());
    assert!(
        tensors
            .keys()
            .all(|n| n.contains(".layers.1.self_attn.indexer.")),
        "{:?}",
        tensors.keys().collect::<Vec<_>>()
    );
    assert!(!dir.path().join("model.safetensors").exists());
    assert!(matches!(
        model_source::resolve(dir.path(), false).unwrap(),
        ModelSource::Adapter { .. }
    ));
    // Within k positions the sparse layer attends to everything: the base's logits,
    // with f32 weights and with the base's own quantized blocks.
    let x = ids(16);
    for w in [WeightFormat::F32, WeightFormat::Native] {
        let a = logits(dir.path(), w, &x);
        let b = logits(&base_file(), w, &x);
        let err = rel_err(&a, &b);
        assert!(err < 1e-6, "{w:?}: {err:e}");
    }
    // Past k the selection is used.
    let small = tempfile::tempdir().unwrap();
    write_adapter(small.path(), 3);
    let err = rel_err(
        &logits(small.path(), WeightFormat::F32, &x),
        &logits(&base_file(), WeightFormat::F32, &x),
    );
    assert!(err > 1e-4, "top-3 of 16 equals dense: {err:e}");
}

#[test]
fn an_adapter_refuses_what_is_not_its_base() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), 8);
    let json = dir.path().join(ADAPTER_JSON);
    let spec: AdapterSpec = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let err_with = |edit: &dyn Fn(&mut AdapterSpec)| {
        let mut s = spec.clone();
        edit(&mut s);
        std::fs::write(&json, serde_json::to_string(&s).unwrap()).unwrap();
        model_source::resolve(dir.path(), false)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let e = err_with(&|s| s.base_sha256 = Some("00".repeat(32)));
    assert!(e.contains("SHA-256") && e.contains("made for"), "{e}");
    let e = err_with(&|s| s.base = "/nonexistent/base.gguf".into());
    assert!(e.contains("does not exist"), "{e}");
    let e = err_with(&|s| s.base = "no-such-known-model".into());
    assert!(e.contains("no-such-known-model"), "{e}");
    // A base that is itself an adapter.
    let other = tempfile::tempdir().unwrap();
    write_adapter(other.path(), 8);
    let e = err_with(&|s| s.base = other.path().to_string_lossy().into());
    assert!(e.contains("itself an adapter"), "{e}");
    // Unknown fields are refused, not ignored.
    std::fs::write(&json, r#"{"base": "x", "params": "indexer", "rank": 4}"#).unwrap();
    let e = model_source::resolve(dir.path(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank"), "{e}");
    // A config that does not match the base's tensors names the field.
    std::fs::write(&json, serde_json::to_string(&spec).unwrap()).unwrap();
    let cfg_path = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    v["intermediate_size"] = serde_json::json!(v["intermediate_size"].as_u64().unwrap() * 2);
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let source = model_source::resolve(dir.path(), false).unwrap();
    let e = model_source::load_for_inference(
        &source,
        WeightFormat::F32,
        DType::F32,
        &Device::Cpu,
        |_| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("intermediate_size"), "{e}");
    // Attaching to an adapter is refused.
    let cfg = sparse_config(&model_source::resolve(&base_file(), false).unwrap(), 8);
    let adapter = model_source::resolve(other.path(), false).unwrap();
    assert!(model_source::attach(&adapter, &cfg, ParamSet::Indexer, 1, &Device::Cpu).is_err());
}

fn options() -> TrainOptions {
    TrainOptions {
        steps: 6,
        batch_size: 2,
        seq_len: 20,
        lr: 1e-2,
        warmup_steps: 1,
        val_every: 3,
        val_batches: 1,
        checkpoint_every: 0,
        val_fraction: 0.05,
        seed: 5,
        trainable: ParamSet::Indexer,
        indexer_kl_queries: 6,
        ..TrainOptions::default()
    }
}

fn request(adapter: &Path, corpus: &Path, out: &Path, pause_at: Option<u64>) -> TrainRequest {
    let mut cfg =
        model_source::read_config(&model_source::resolve(adapter, false).unwrap()).unwrap();
    cfg.indexer_dense_warmup_steps = 3; // then sparse (top-4 of 20)
    TrainRequest {
        config: cfg,
        corpus: corpus.to_path_buf(),
        out: out.to_path_buf(),
        tokenizer: None,
        options: options(),
        show_progress: false,
        stop: Arc::new(AtomicBool::new(false)),
        pause_at,
        init_from: Some(adapter.to_path_buf()),
    }
}

fn tensor_map(path: &Path) -> std::collections::HashMap<String, Tensor> {
    sparrow::weights::load(path, &Device::Cpu).unwrap().0
}

fn all_tensors(m: &sparrow::model::Model) -> std::collections::HashMap<String, Tensor> {
    m.store.all_tensors().into_iter().collect()
}

/// Every tensor of the base model, f32.
fn base_tensors() -> std::collections::HashMap<String, Tensor> {
    let base = model_source::load_model_for_inference(
        &model_source::resolve(&base_file(), false).unwrap(),
        WeightFormat::F32,
        DType::F32,
        &Device::Cpu,
        |_| {},
    )
    .unwrap();
    all_tensors(&base)
}

#[test]
fn training_the_indexers_moves_only_them_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    write_adapter(&adapter, 4);
    let corpus = tmp.path().join("corpus");
    write_synthetic_corpus(&corpus);

    let whole = tmp.path().join("whole");
    let summary = train(request(&adapter, &corpus, &whole, None)).unwrap();
    assert_eq!(summary.step, 6);
    // The run is an adapter of the same base: indexers only, no base weights.
    assert!(!whole.join("model.safetensors").exists());
    let trained = tensor_map(&whole.join(ADAPTER_WEIGHTS));
    let attached = tensor_map(&adapter.join(ADAPTER_WEIGHTS));
    assert_eq!(
        trained.keys().collect::<std::collections::BTreeSet<_>>(),
        attached.keys().collect()
    );
    let moved = trained
        .iter()
        .filter(|(n, t)| rel_err(t, &attached[*n]) > 1e-6)
        .count();
    assert!(
        moved > trained.len() / 2,
        "{moved} of {} moved",
        trained.len()
    );
    // The base is untouched: the trained model's dense layer equals the base's.
    let source = model_source::resolve(&whole, false).unwrap();
    let (model, step) =
        model_source::load_model_with_step(&source, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(step, Some(6));
    let (a, b) = (all_tensors(&model), base_tensors());
    for (name, t) in &b {
        assert_eq!(rel_err(&a[name], t), 0.0, "{name} moved");
    }
    // Only the KL trains: the logged loss is the indexer KL, in both modes.
    let recs = read_metrics(&whole.join("metrics.jsonl")).unwrap();
    assert_eq!(recs.len(), 6);
    for r in &recs {
        assert_eq!(r["loss"], r["indexer_kl"], "{r}");
    }
    assert_eq!(recs[0]["indexer_mode"], "dense_warmup");
    assert_eq!(recs[5]["indexer_mode"], "sparse");
    assert!(recs[5]["val_loss"].as_f64().unwrap().is_finite());

    // Paused at step 2 and resumed: the same records and the same weights.
    let split = tmp.path().join("split");
    train(request(&adapter, &corpus, &split, Some(2))).unwrap();
    resume(ResumeRequest {
        dir: split.clone(),
        steps: None,
        corpus: None,
        show_progress: false,
        stop: Arc::new(AtomicBool::new(false)),
        pause_at: None,
    })
    .unwrap();
    let strip = |v: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        v.into_iter()
            .map(|mut r| {
                r.as_object_mut().unwrap().remove("tokens_per_s");
                r
            })
            .collect()
    };
    assert_eq!(
        strip(read_metrics(&split.join("metrics.jsonl")).unwrap()),
        strip(recs)
    );
    assert_eq!(
        std::fs::read(split.join(ADAPTER_WEIGHTS)).unwrap(),
        std::fs::read(whole.join(ADAPTER_WEIGHTS)).unwrap()
    );

    // An adapter's run trains what the adapter holds.
    let mut bad = request(&adapter, &corpus, &tmp.path().join("bad"), None);
    bad.options.trainable = ParamSet::All;
    let e = train(bad).unwrap_err().to_string();
    assert!(e.contains("trainable"), "{e}");
}

/// The sparse stage with the base adapting (`trainable: indexer_norms`): the LM loss
/// trains the norms (the indexers still learn by their KL), the run's checkpoints are
/// adapters holding both, every other base weight stays as loaded, and an adapter
/// holding more than a run trains is refused.
#[test]
fn adapting_the_norms_trains_them_by_the_lm_loss_into_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    write_adapter(&adapter, 4);
    let corpus = tmp.path().join("corpus");
    write_synthetic_corpus(&corpus);
    let out = tmp.path().join("norms");
    let mut req = request(&adapter, &corpus, &out, None);
    req.config.indexer_dense_warmup_steps = 1;
    req.options.steps = 3;
    req.options.trainable = ParamSet::IndexerNorms;
    train(req).unwrap();

    let spec = AdapterSpec::read(&out).unwrap().unwrap();
    assert_eq!(spec.params, ParamSet::IndexerNorms);
    let trained = tensor_map(&out.join(ADAPTER_WEIGHTS));
    let attached = tensor_map(&adapter.join(ADAPTER_WEIGHTS));
    let base = base_tensors();
    let norms: Vec<&String> = trained.keys().filter(|n| n.contains("norm.")).collect();
    // Every layer's two norms and the final one (the indexers' own norms aside).
    let base_norms = base.keys().filter(|n| n.contains("norm.")).count();
    assert_eq!(
        norms.iter().filter(|n| !n.contains(".indexer.")).count(),
        base_norms
    );
    for n in &norms {
        let before = attached.get(*n).or(base.get(*n)).unwrap();
        assert!(rel_err(&trained[*n], before) > 1e-7, "{n} did not move");
    }
    assert!(trained
        .keys()
        .all(|n| n.contains(".indexer.") || n.contains("norm.")));
    // The logged loss is the LM loss (the KL beside it), and it is sparse from step 2.
    let recs = read_metrics(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(recs[2]["indexer_mode"], "sparse");
    for r in &recs {
        let (loss, kl) = (
            r["loss"].as_f64().unwrap(),
            r["indexer_kl"].as_f64().unwrap(),
        );
        assert!(loss.is_finite() && (loss - kl).abs() > 1e-6, "{r}");
    }
    // The adapter loads over its base with the trained norms in place.
    let source = model_source::resolve(&out, false).unwrap();
    let (model, _) = model_source::load_model_with_step(&source, DType::F32, &Device::Cpu).unwrap();
    let loaded = all_tensors(&model);
    for (n, t) in &trained {
        assert!(
            rel_err(&loaded[n], &t.to_dtype(DType::F32).unwrap()) < 1e-6,
            "{n}"
        );
    }
    for (n, t) in &base {
        if !n.contains("norm.") {
            assert_eq!(rel_err(&loaded[n], t), 0.0, "{n} moved");
        }
    }
    // A run from this adapter must train at least what it holds.
    let mut narrower = request(&out, &corpus, &tmp.path().join("narrower"), None);
    narrower.options.trainable = ParamSet::Indexer;
    let e = train(narrower).unwrap_err().to_string();
    assert!(e.contains("must include them"), "{e}");
}

#[test]
fn parameter_sets_name_their_parameters() {
    let names = [
        (
            "model.layers.3.self_attn.indexer.wq_b.weight",
            [true, true, true],
        ),
        (
            "model.layers.3.self_attn.indexer.k_norm.weight",
            [true, true, true],
        ),
        ("model.layers.3.input_layernorm.weight", [false, true, true]),
        ("model.norm.weight", [false, true, true]),
        (
            "model.layers.3.self_attn.q_proj.weight",
            [false, false, true],
        ),
        ("model.layers.3.mlp.down_proj.weight", [false, false, false]),
        ("model.embed_tokens.weight", [false, false, false]),
    ];
    let sets = [
        ParamSet::Indexer,
        ParamSet::IndexerNorms,
        ParamSet::IndexerAttention,
    ];
    for (name, want) in names {
        for (set, w) in sets.iter().zip(want) {
            assert_eq!(set.contains(name), w, "{set:?} {name}");
        }
        assert!(ParamSet::All.contains(name));
    }
    assert!(ParamSet::IndexerNorms.covers(ParamSet::Indexer));
    assert!(!ParamSet::Indexer.covers(ParamSet::IndexerNorms));
    assert!(ParamSet::IndexerAttention.covers(ParamSet::IndexerNorms));
    assert!(!ParamSet::IndexerAttention.covers(ParamSet::All));
    assert!(!ParamSet::Indexer.trains_base() && ParamSet::IndexerNorms.trains_base());
}

/// The shipped adapter (`--model smollm2-135m-instruct-dsa`): indexers only, f16, within
/// the 15 MB budget, for the pinned base; over the real base (when it is in the model
/// cache, or fetched when `SPARROW_REQUIRE_REAL_MODEL` is set) a prompt within top-k
/// gives the base's own logits, and a longer one does not.
#[test]
fn the_shipped_adapter_is_small_and_applies_to_its_base() {
    let (known, dir) = sparrow::registry::find_adapter("smollm2-135m-instruct-dsa")
        .expect("models/smollm2-135m-instruct-dsa is shipped");
    assert_eq!(dir.join("adapter.json"), dir.join(ADAPTER_JSON));
    let spec = AdapterSpec::read(&dir).unwrap().unwrap();
    let base = sparrow::registry::find(&spec.base).expect("the base is a known model");
    assert_eq!(spec.base_sha256.as_deref(), Some(base.file_sha256));
    assert_eq!(spec.params, ParamSet::Indexer);
    let weights = dir.join(ADAPTER_WEIGHTS);
    let size = std::fs::metadata(&weights).unwrap().len();
    assert!(size <= 15 * 1024 * 1024, "{}: {size} bytes", known.name);
    let (tensors, _) = sparrow::weights::load(&weights, &Device::Cpu).unwrap();
    assert!(tensors
        .iter()
        .all(|(n, t)| n.contains(".self_attn.indexer.") && t.dtype() == DType::F16));
    let (cfg, _) = sparrow::formats::hf::read_config(&dir.join("config.json")).unwrap();
    assert_eq!(
        cfg.layer_types
            .as_ref()
            .map(|t| t.iter().filter(|&&k| k == AttentionKind::Dsa).count()),
        Some(cfg.num_hidden_layers)
    );
    let Ok(home) = sparrow::registry::home() else {
        return;
    };
    if sparrow::registry::present(&home, base).is_none() {
        if std::env::var_os("SPARROW_REQUIRE_REAL_MODEL").is_none() {
            eprintln!(
                "{} is not in the model cache: the base half skipped",
                base.name
            );
            return;
        }
        sparrow::registry::fetch(&home, base, false).unwrap();
    }
    let by_name = Path::new(known.name);
    let x = ids(cfg.index_topk);
    let err = rel_err(
        &logits(by_name, WeightFormat::Native, &x),
        &logits(Path::new(base.name), WeightFormat::Native, &x),
    );
    assert!(err < 1e-5, "within top-k: {err:e}");
    let x = ids(cfg.index_topk + 64);
    let err = rel_err(
        &logits(by_name, WeightFormat::Native, &x),
        &logits(Path::new(base.name), WeightFormat::Native, &x),
    );
    assert!(err > 1e-4, "past top-k the selection is used: {err:e}");
}
