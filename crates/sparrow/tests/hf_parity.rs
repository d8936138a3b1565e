//! Parity with Hugging Face `transformers`: the fixtures under `fixtures/hf/` were made by
//! `scripts/make_hf_fixtures.py` (transformers 5.24, f32, eager attention) and hold the
//! reference logits of a full forward and of a token-by-token cached decode. Sparrow
//! loads each `save_pretrained` directory as it is and must reproduce both.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use sparrow::infer::cache::KvCache;
use sparrow::model::Model;

fn fixture(name: &str) -> std::path::PathBuf {
    repo_root().join("fixtures/hf").join(name)
}

/// (input ids (1, T) u32, full logits, decode logits) of a fixture.
fn reference(name: &str) -> (Tensor, Tensor, Tensor) {
    let (t, _) =
        sparrow::weights::load(&fixture(name).join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = t["input_ids"].to_dtype(DType::U32).unwrap();
    (ids, t["logits_full"].clone(), t["logits_decode"].clone())
}

fn check(name: &str) {
    let (model, _) = Model::load_dir(&fixture(name), DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let (ids, full_ref, decode_ref) = reference(name);
    let full = model.forward(&ids, None).unwrap().logits;
    let err = rel_err(&full, &full_ref);
    assert!(err < 1e-4, "{name}: full-forward logits differ by {err:e}");

    let t = ids.dim(1).unwrap();
    let mut cache = KvCache::new(model.cfg.num_hidden_layers);
    let mut steps = Vec::new();
    for i in 0..t {
        let one = ids.narrow(1, i, 1).unwrap();
        steps.push(model.forward(&one, Some(&mut cache)).unwrap().logits);
    }
    let decode = Tensor::cat(&steps, 1).unwrap();
    let err = rel_err(&decode, &decode_ref);
    assert!(err < 1e-4, "{name}: cached-decode logits differ by {err:e}");
}

#[test]
fn llama_logits_match_transformers() {
    check("llama");
}

#[test]
fn sharded_tied_mqa_llama_logits_match_transformers() {
    check("llama-sharded");
}

#[test]
fn mixtral_logits_match_transformers() {
    check("mixtral");
}

#[test]
fn unsupported_hf_fields_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama").join("config.json")).unwrap(),
    )
    .unwrap();
    for (field, value, named) in [
        ("attention_bias", serde_json::json!(true), "attention_bias"),
        ("hidden_act", serde_json::json!("gelu"), "hidden_act"),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "yarn", "rope_theta": 1e4}),
            "rope_type",
        ),
        ("model_type", serde_json::json!("gpt2"), "model_type"),
        ("hidden_size", serde_json::json!("wide"), "hidden_size"),
    ] {
        let mut v = base.clone();
        v[field] = value;
        let path = dir.path().join("config.json");
        std::fs::write(&path, v.to_string()).unwrap();
        let err = sparrow::hf::read_config(&path).unwrap_err().to_string();
        assert!(err.contains(named), "{field}: {err}");
    }
    // A shard listed in the index but missing is named.
    let sharded = dir.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    for f in std::fs::read_dir(fixture("llama-sharded")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, sharded.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::remove_file(sharded.join("model-00003-of-00011.safetensors")).unwrap();
    let err = Model::load_dir(&sharded, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model-00003-of-00011.safetensors"), "{err}");
}
