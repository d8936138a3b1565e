//! Model files: safetensors round trips are bit-exact; corrupt, truncated or mismatched
//! files give precise errors, never a panic.

mod common;
use candle_core::{DType, Device};
use common::*;
use sparrow::model::Model;
use sparrow::Error;
use std::path::Path;

fn saved_tiny(dir: &Path) -> Model {
    let model = Model::new_random(&tiny_config(), 8, DType::F32, &Device::Cpu).unwrap();
    sparrow::model_dir::save_at(&model, dir, Some(42)).unwrap();
    model
}

fn load_err(dir: &Path) -> String {
    match sparrow::model_dir::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("load should fail"),
        Err(e) => {
            assert!(
                matches!(
                    e,
                    Error::Checkpoint { .. } | Error::Config { .. } | Error::Io { .. }
                ),
                "{e:?}"
            );
            e.to_string()
        }
    }
}

#[test]
fn save_load_round_trip_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let model = saved_tiny(dir.path());
    let (loaded, step) = sparrow::model_dir::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(step, Some(42));
    assert_eq!(loaded.cfg, model.cfg);
    let a = model.store.vars();
    let b = loaded.store.vars();
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let x: Vec<u32> = va
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let y: Vec<u32> = vb
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(x, y, "tensor `{na}` changed in the round trip");
    }
    // Saving the loaded model again produces the identical file.
    let again = tempfile::tempdir().unwrap();
    sparrow::model_dir::save_at(&loaded, again.path(), Some(42)).unwrap();
    assert!(
        std::fs::read(dir.path().join("model.safetensors")).unwrap()
            == std::fs::read(again.path().join("model.safetensors")).unwrap(),
        "files differ byte for byte"
    );
    // HF names.
    let names: Vec<String> = a.into_iter().map(|(n, _)| n).collect();
    for expected in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.experts.3.down_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        assert!(names.iter().any(|n| n == expected), "missing {expected}");
    }
}

#[test]
fn truncated_weights_are_a_precise_error() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for keep in [0, 5, 8, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let e = load_err(dir.path());
        assert!(
            e.contains("model.safetensors") && e.contains("not a valid safetensors"),
            "{keep}: {e}"
        );
    }
}

#[test]
fn corrupt_header_is_a_precise_error() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    // Header length claims far more than the file holds.
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert!(load_err(dir.path()).contains("not a valid safetensors"));
    // Garbage inside the JSON header.
    let mut bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    bytes[9] = b'#';
    bytes[10] = b'!';
    std::fs::write(&path, &bytes).unwrap();
    assert!(load_err(dir.path()).contains("not a valid safetensors"));
}

#[test]
fn shape_mismatch_names_tensor_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    let mut cfg = tiny_config();
    cfg.intermediate_size = 48;
    std::fs::write(dir.path().join("config.json"), cfg.to_json()).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("[64, 32]")
            && e.contains("[48, 32]"),
        "{e}"
    );
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    let mut more = tiny_config();
    more.num_hidden_layers = 3;
    std::fs::write(dir.path().join("config.json"), more.to_json()).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("missing tensor") && e.contains("model.layers.2."),
        "{e}"
    );

    let mut fewer = tiny_config();
    fewer.tie_word_embeddings = true;
    std::fs::write(dir.path().join("config.json"), fewer.to_json()).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("unexpected tensor") && e.contains("lm_head.weight"),
        "{e}"
    );
}

#[test]
fn integer_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = saved_tiny(dir.path());
    let mut tensors: Vec<(String, candle_core::Tensor)> = model
        .store
        .vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let norm = tensors
        .iter_mut()
        .find(|(n, _)| n == "model.norm.weight")
        .unwrap();
    norm.1 = norm.1.to_dtype(DType::U32).unwrap();
    sparrow::weights::save(
        &dir.path().join("model.safetensors"),
        &tensors,
        Default::default(),
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.norm.weight") && e.contains("U32"), "{e}");
}

#[test]
fn missing_files_and_bad_config_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(&dir.path().join("absent"));
    assert!(e.contains("does not exist"), "{e}");
    saved_tiny(dir.path());
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": -1}").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("hidden_size"), "{e}");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn atomic_write_leaves_no_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    saved_tiny(dir.path());
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
}

/// Half-precision storage (the shipped model): f16 / bf16 files are about half the size,
/// load back into f32 with logits close to the f32 model's, and buffers (the
/// `noaux_bias` selection bias) stay f32.
#[test]
fn half_precision_storage_round_trips() {
    use candle_core::{DType, Device, Tensor};
    let mut cfg = common::tiny_config();
    cfg.router_kind = sparrow::config::RouterKind::NoauxBias;
    cfg.initializer_range = 0.1;
    let model = sparrow::model::Model::new_random(&cfg, 4, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[3u32, 17, 99, 5, 250, 8], (1, 6), &Device::Cpu).unwrap();
    let want = model.forward(&ids).unwrap().logits;
    let dir = tempfile::tempdir().unwrap();
    let size = |d: &std::path::Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .unwrap()
            .len()
    };
    let full = dir.path().join("f32");
    sparrow::model_dir::save_at(&model, &full, Some(3)).unwrap();
    for (dtype, tol) in [(DType::F16, 2e-3), (DType::BF16, 2e-2)] {
        let out = dir.path().join(format!("{dtype:?}"));
        let opts = sparrow::model_dir::SaveOptions {
            dtype,
            step: Some(3),
            ..Default::default()
        };
        sparrow::model_dir::save(&model, &out, &opts).unwrap();
        let ratio = size(&out) as f64 / size(&full) as f64;
        assert!((0.45..0.56).contains(&ratio), "{dtype:?}: {ratio}");
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let want_dtype = if name.ends_with("e_score_correction_bias") {
                safetensors::Dtype::F32
            } else if dtype == DType::F16 {
                safetensors::Dtype::F16
            } else {
                safetensors::Dtype::BF16
            };
            assert_eq!(view.dtype(), want_dtype, "{name}");
        }
        let (loaded, step) = sparrow::model_dir::load(&out, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(step, Some(3));
        let got = loaded.forward(&ids).unwrap().logits;
        let err = common::rel_err(&got, &want);
        assert!(err < tol, "{dtype:?}: {err}");
    }
    let u8_opts = sparrow::model_dir::SaveOptions {
        dtype: DType::U8,
        ..Default::default()
    };
    assert!(sparrow::model_dir::save(&model, &dir.path().join("u8"), &u8_opts).is_err());
}

/// A model loaded for inference computes the same logits as the trainable load and
/// records no autograd graph (so long prompts keep only live activations).
#[test]
fn inference_load_keeps_no_graph_and_matches() {
    use candle_core::{DType, Device, Tensor};
    let cfg = common::tiny_config();
    let model = sparrow::model::Model::new_random(&cfg, 8, DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    sparrow::model_dir::save_at(&model, dir.path(), None).unwrap();
    let ids = Tensor::from_slice(&[3u32, 9, 27, 81], (1, 4), &Device::Cpu).unwrap();
    let (train, _) = sparrow::model_dir::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let (infer, _) = sparrow::model_dir::load_for_inference(
        dir.path(),
        sparrow::weights::WeightFormat::F32,
        DType::F32,
        &Device::Cpu,
        |_| {},
    )
    .unwrap();
    let a = train.forward(&ids).unwrap().logits;
    let b = infer.forward(&ids).unwrap().logits;
    assert!(a.track_op(), "the trainable load records the graph");
    assert!(!b.track_op(), "the inference load must not record a graph");
    assert_eq!(common::rel_err(&a, &b), 0.0);
    assert_eq!(infer.store.num_parameters(), train.store.num_parameters());
}
