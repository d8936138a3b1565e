//! Training end to end on a synthetic corpus: a run paused and resumed produces exactly
//! the losses (and final weights) of an uninterrupted run with the same seed; a
//! checkpoint whose files disagree is refused.

mod common;
use common::*;
use sparrow::train::metrics::read_metrics;
use sparrow::train::{resume, train, ResumeRequest, TrainOptions, TrainRequest};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn options() -> TrainOptions {
    TrainOptions {
        steps: 8,
        batch_size: 3,
        seq_len: 24,
        lr: 5e-3,
        warmup_steps: 2,
        val_every: 3,
        val_batches: 2,
        checkpoint_every: 0,
        val_fraction: 0.05,
        seed: 17,
        ..TrainOptions::default()
    }
}

fn request(
    corpus: &Path,
    out: &Path,
    tokenizer: Option<&Path>,
    pause_at: Option<u64>,
) -> TrainRequest {
    request_for(tiny_config(), corpus, out, tokenizer, pause_at)
}

fn request_for(
    config: sparrow::ModelConfig,
    corpus: &Path,
    out: &Path,
    tokenizer: Option<&Path>,
    pause_at: Option<u64>,
) -> TrainRequest {
    TrainRequest {
        config,
        corpus: corpus.to_path_buf(),
        out: out.to_path_buf(),
        tokenizer: tokenizer.map(Path::to_path_buf),
        options: options(),
        show_progress: false,
        stop: Arc::new(AtomicBool::new(false)),
        pause_at,
        init_from: None,
    }
}

fn resume_request(dir: &Path) -> ResumeRequest {
    ResumeRequest {
        dir: dir.to_path_buf(),
        steps: None,
        corpus: None,
        show_progress: false,
        stop: Arc::new(AtomicBool::new(false)),
        pause_at: None,
    }
}

/// DeepSeek-V4 layers resume exactly: the CSA indexer's KL across the switch from the
/// dense warm-up to its selection (at step 3, before the pause at 4), the noaux_bias
/// routers' biases, the hash_moe tables, the hyper-connections.
#[test]
fn resumed_v4_runs_are_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_synthetic_corpus(&corpus);
    let mut cfg = tiny_v4_config();
    cfg.indexer_dense_warmup_steps = 3;
    let straight = tmp.path().join("straight");
    train(request_for(cfg.clone(), &corpus, &straight, None, None)).unwrap();
    let tok = straight.join("tokenizer.json");
    let paused = tmp.path().join("paused");
    train(request_for(cfg, &corpus, &paused, Some(&tok), Some(4))).unwrap();
    resume(resume_request(&paused)).unwrap();
    let a = read_metrics(&straight.join("metrics.jsonl")).unwrap();
    let b = read_metrics(&paused.join("metrics.jsonl")).unwrap();
    assert_eq!(a.len(), b.len());
    let strip = |v: &serde_json::Value| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().remove("tokens_per_s");
        v
    };
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(strip(x), strip(y), "records differ");
        assert!(x["indexer_kl"].as_f64().unwrap() > 0.0);
    }
    let modes: Vec<&str> = a
        .iter()
        .filter_map(|r| r["indexer_mode"].as_str())
        .collect();
    assert_eq!(modes.first(), Some(&"dense_warmup"));
    assert_eq!(modes.last(), Some(&"sparse"));
    assert!(
        std::fs::read(straight.join("model.safetensors")).unwrap()
            == std::fs::read(paused.join("model.safetensors")).unwrap(),
        "weights differ"
    );
}

/// Routers with state beyond the parameters (the `noaux_bias` selection bias) or with
/// capacity limits resume exactly too: every logged number, routing telemetry included,
/// and the final weights and buffers.
#[test]
fn resumed_runs_are_exact_for_stateful_and_capacity_routers() {
    use sparrow::config::RouterKind;
    for kind in [RouterKind::NoauxBias, RouterKind::CapacityAware] {
        let tmp = tempfile::tempdir().unwrap();
        let corpus = tmp.path().join("corpus");
        write_synthetic_corpus(&corpus);
        let mut cfg = tiny_config();
        cfg.router_kind = kind;
        cfg.router_bias_update_speed = 0.05;
        cfg.router_bias_update_every = 5; // one update (step 5), its window open across the pause at 4
        cfg.router_z_loss_coef = 1e-3;
        if kind == RouterKind::NoauxBias {
            // The remedies of the router experiment: a bias-only warm-up across the
            // pause, DeepSeek-V3's sequence-wise loss, the proportional bias step.
            cfg.router_gate_frozen_steps = 6;
            cfg.router_seq_aux_loss_coef = 1e-2;
            cfg.router_bias_update_rule = sparrow::config::BiasUpdateRule::Proportional;
        } else {
            // The CV^2 weight ramps up over 6 steps, across the pause.
            cfg.router_balance_loss_warmup_steps = 6;
        }
        let straight = tmp.path().join("straight");
        train(request_for(cfg.clone(), &corpus, &straight, None, None)).unwrap();
        let tok = straight.join("tokenizer.json");
        if kind == RouterKind::CapacityAware {
            // Without the ramp: the same first step (its CV^2 weight is 0 with the ramp,
            // but the update comes after the loss), a different second one.
            let mut full = cfg.clone();
            full.router_balance_loss_warmup_steps = 0;
            let dir = tmp.path().join("no-ramp");
            train(request_for(full, &corpus, &dir, Some(&tok), None)).unwrap();
            let a = read_metrics(&straight.join("metrics.jsonl")).unwrap();
            let b = read_metrics(&dir.join("metrics.jsonl")).unwrap();
            assert_eq!(a[0]["loss"], b[0]["loss"]);
            assert_ne!(a[1]["loss"], b[1]["loss"]);
        }
        let paused = tmp.path().join("paused");
        train(request_for(
            cfg.clone(),
            &corpus,
            &paused,
            Some(&tok),
            Some(4),
        ))
        .unwrap();
        if kind == RouterKind::NoauxBias {
            // At step 4 of 6 frozen ones the gates hold their initial weights, the rest
            // has trained; after step 8 the gates have trained too.
            let weights = |dir: &Path| {
                let (m, _) = sparrow::model_dir::load(
                    dir,
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )
                .unwrap();
                m.store.all_tensors()
            };
            let init = sparrow::model::Model::new_random(
                &cfg,
                17,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap()
            .store
            .all_tensors();
            let at4 = weights(&paused);
            let at8 = weights(&straight);
            let get = |all: &[(String, candle_core::Tensor)], name: &str| -> Vec<f32> {
                let (_, t) = all.iter().find(|(n, _)| n == name).unwrap();
                t.flatten_all().unwrap().to_vec1().unwrap()
            };
            let gate = "model.layers.1.mlp.gate.weight";
            let other = "model.layers.1.mlp.experts.0.up_proj.weight";
            assert_eq!(get(&at4, gate), get(&init, gate), "frozen gate moved");
            assert_ne!(get(&at4, other), get(&init, other), "experts trained");
            assert_ne!(
                get(&at8, gate),
                get(&init, gate),
                "gate trained after the warm-up"
            );
        }
        resume(resume_request(&paused)).unwrap();
        let a = read_metrics(&straight.join("metrics.jsonl")).unwrap();
        let b = read_metrics(&paused.join("metrics.jsonl")).unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            let strip = |v: &serde_json::Value| {
                let mut v = v.clone();
                v.as_object_mut().unwrap().remove("tokens_per_s");
                v
            };
            assert_eq!(strip(x), strip(y), "{kind:?}: records differ");
            assert!(x.get("max_vio").is_some() && x.get("z_loss").is_some());
            if kind == RouterKind::NoauxBias {
                assert!(x["seq_aux_loss"].as_f64().unwrap() > 0.0);
            }
        }
        let with_routing = a.iter().filter(|r| r.get("routing").is_some()).count();
        assert!(
            with_routing >= 2,
            "{kind:?}: validation logs routing per layer"
        );
        assert!(
            std::fs::read(straight.join("model.safetensors")).unwrap()
                == std::fs::read(paused.join("model.safetensors")).unwrap(),
            "{kind:?}: weights differ"
        );
        if kind == RouterKind::NoauxBias {
            let (m, _) = sparrow::model_dir::load(
                &straight,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let bias: Vec<f32> = m
                .store
                .all_tensors()
                .into_iter()
                .find(|(n, _)| n.ends_with("e_score_correction_bias"))
                .unwrap()
                .1
                .to_vec1()
                .unwrap();
            assert!(bias.iter().any(|&b| b != 0.0), "training moved the bias");
        }
    }
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_synthetic_corpus(&corpus);

    let straight = tmp.path().join("straight");
    let s = train(request(&corpus, &straight, None, None)).unwrap();
    assert_eq!(s.step, 8);
    assert!(!s.interrupted);
    let tok = straight.join("tokenizer.json");

    let paused = tmp.path().join("paused");
    let p = train(request(&corpus, &paused, Some(&tok), Some(5))).unwrap();
    assert_eq!(p.step, 5);
    assert!(p.interrupted);
    // Simulate a crash after the checkpoint: stray metrics lines past step 5 are dropped.
    let metrics_path = paused.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&metrics_path).unwrap();
    text.push_str("{\"step\": 6, \"loss\": 123.0}\n");
    std::fs::write(&metrics_path, text).unwrap();
    let r = resume(resume_request(&paused)).unwrap();
    assert_eq!(r.step, 8);

    let a = read_metrics(&straight.join("metrics.jsonl")).unwrap();
    let b = read_metrics(&metrics_path).unwrap();
    assert_eq!(a.len(), 8);
    assert_eq!(b.len(), 8);
    for (x, y) in a.iter().zip(&b) {
        for key in ["step", "loss", "lr", "grad_norm", "aux_loss", "val_loss"] {
            assert_eq!(
                x.get(key),
                y.get(key),
                "{key} differs at step {}",
                x["step"]
            );
        }
    }
    assert!(a.iter().filter(|m| m.get("val_loss").is_some()).count() >= 2);
    // Identical final weights, byte for byte.
    assert!(
        std::fs::read(straight.join("model.safetensors")).unwrap()
            == std::fs::read(paused.join("model.safetensors")).unwrap(),
        "files differ byte for byte"
    );
    // The model directory is complete and loadable for generation.
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "train_state.json",
        "train_state.safetensors",
    ] {
        assert!(straight.join(f).exists(), "missing {f}");
    }
    // Loss went down on this easy text.
    let first = a[0]["loss"].as_f64().unwrap();
    let last = a[7]["loss"].as_f64().unwrap();
    assert!(last < first, "loss {first} -> {last}");

    // Resuming a finished run with a larger total continues it.
    let mut more = resume_request(&straight);
    more.steps = Some(9);
    assert_eq!(resume(more).unwrap().step, 9);
}

#[test]
fn mismatched_checkpoint_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_synthetic_corpus(&corpus);
    let run = tmp.path().join("run");
    train(request(&corpus, &run, None, Some(2))).unwrap();

    // Optimizer state from another step.
    let state_path = run.join("train_state.json");
    let original = std::fs::read_to_string(&state_path).unwrap();
    std::fs::write(
        &state_path,
        original.replace("\"step\": 2,", "\"step\": 3,"),
    )
    .unwrap();
    let e = resume(resume_request(&run)).unwrap_err().to_string();
    assert!(e.contains("step"), "{e}");
    std::fs::write(&state_path, &original).unwrap();

    // Truncated optimizer moments.
    let opt_path = run.join("train_state.safetensors");
    let bytes = std::fs::read(&opt_path).unwrap();
    std::fs::write(&opt_path, &bytes[..bytes.len() / 3]).unwrap();
    let e = resume(resume_request(&run)).unwrap_err().to_string();
    assert!(e.contains("train_state.safetensors"), "{e}");
    std::fs::write(&opt_path, &bytes).unwrap();

    // Corrupt train_state.json.
    std::fs::write(&state_path, "{ \"step\": ").unwrap();
    let e = resume(resume_request(&run)).unwrap_err().to_string();
    assert!(e.contains("train_state.json"), "{e}");
    std::fs::write(&state_path, &original).unwrap();

    // Intact again: resumes.
    assert_eq!(resume(resume_request(&run)).unwrap().step, 8);

    // A second `train` into the same directory is refused rather than overwriting it.
    let e = train(request(&corpus, &run, None, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("resume it"), "{e}");
}

#[test]
fn bad_corpora_are_precise_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = train(request(&empty, &tmp.path().join("r1"), None, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no .txt files"), "{e}");
    let e = train(request(
        &tmp.path().join("absent"),
        &tmp.path().join("r2"),
        None,
        None,
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a directory"), "{e}");
    let mut none = request(&empty, &tmp.path().join("r5"), None, None);
    none.options.steps = 0;
    let e = train(none).unwrap_err().to_string();
    assert!(e.contains("`steps`"), "{e}");
    let mut long = request(&empty, &tmp.path().join("r4"), None, None);
    long.options.seq_len = 100_000;
    let e = train(long).unwrap_err().to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("a.txt"), b"fine text \xff\xfe broken").unwrap();
    let tok_dir = tmp.path().join("c");
    write_synthetic_corpus(&tok_dir);
    let straight = tmp.path().join("tokrun");
    train(request(&tok_dir, &straight, None, Some(1))).unwrap();
    let e = train(request(
        &bad,
        &tmp.path().join("r3"),
        Some(&straight.join("tokenizer.json")),
        None,
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("a.txt") && e.contains("UTF-8") && e.contains("offset 10"),
        "{e}"
    );
}
