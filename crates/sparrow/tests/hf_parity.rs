//! Parity with Hugging Face `transformers`: the fixtures under `fixtures/hf/` were made by
//! `scripts/make_hf_fixtures.py` (transformers 5.24, f32, eager attention) and hold the
//! reference logits of a full forward and of a token-by-token cached decode. Sparrow
//! loads each `save_pretrained` directory as it is and must reproduce both, through
//! the training-style forward and through the engine's step (one token per step, then
//! the prompt in uneven chunks).

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
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
    let (model, _) = sparrow::model_dir::load(&fixture(name), DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let (ids, full_ref, decode_ref) = reference(name);
    let full = model.forward(&ids).unwrap().logits;
    let err = rel_err(&full, &full_ref);
    assert!(err < 1e-4, "{name}: full-forward logits differ by {err:e}");

    let t = ids.dim(1).unwrap();
    // The engine's step: one token per step, and chunks of 3, 1, 4, ... tokens.
    let host: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
    for chunks in [vec![1; t], uneven(t)] {
        let (stepped, _) = stepped(&model, &host, &chunks);
        let err = rel_err(&stepped, &decode_ref);
        assert!(
            err < 1e-4,
            "{name}: engine-step logits ({chunks:?}) differ from transformers' cached decode by {err:e}"
        );
    }
}

/// Chunk sizes 3, 1, 4, 1, 5, ... summing to t.
fn uneven(t: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut left = t;
    for n in [3usize, 1, 4, 1, 5, 9, 2, 6].iter().cycle() {
        if left == 0 {
            break;
        }
        let n = (*n).min(left);
        out.push(n);
        left -= n;
    }
    out
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
fn deepseek_v3_mla_logits_match_transformers() {
    // Query latent, interleaved RoPE, dense first layer, grouped sigmoid router with a
    // non-zero correction bias, shared expert, routed scaling; the cached decode runs
    // MLA's absorbed path (MQA over the latent).
    check("deepseek-v3");
}

#[test]
fn deepseek_v3_without_query_latent_matches_transformers() {
    check("deepseek-v3-noq");
}

#[test]
fn deepseek_v32_logits_and_selection_match_transformers() {
    // 11 tokens, top-4: queries from position 4 on attend to 4 of their positions.
    check("deepseek-v32");
    let (model, _) =
        sparrow::model_dir::load(&fixture("deepseek-v32"), DType::F32, &Device::Cpu).unwrap();
    let (ids, _, _) = reference("deepseek-v32");
    let opts = sparrow::model::transformer::ForwardOptions {
        collect: sparrow::model::options::Collect {
            selection: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let out = model.net.forward_with(&ids, &opts).unwrap();
    let (refs, _) = sparrow::weights::load(
        &fixture("deepseek-v32").join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let k = model.cfg.index_topk;
    let t = ids.dim(1).unwrap();
    for (layer, diag) in out.diagnostics.layers.iter().enumerate() {
        let ours = diag
            .selection
            .as_ref()
            .expect("every layer runs sparse past index_topk");
        let theirs: Vec<i64> = refs[&format!("topk_layer{layer}")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for q in 0..t {
            let real = (q + 1).min(k); // HF fills the rest with masked positions
            let mut a: Vec<u32> = ours[q * k..(q + 1) * k]
                .iter()
                .copied()
                .filter(|&i| i != sparrow::kernels::topk::NONE)
                .collect();
            let mut b: Vec<u32> = theirs[q * k..q * k + real]
                .iter()
                .map(|&i| i as u32)
                .collect();
            a.sort();
            b.sort();
            assert_eq!(a, b, "layer {layer}, query {q}: selected positions");
        }
    }
}

#[test]
fn deepseek_v4_logits_match_transformers() {
    // Sliding / CSA / HCA layers (rates 4 and 8, YaRN), 2 hyper-connection streams,
    // hash_moe and routed layers, clamped SwiGLU; then rates 2 and 6, 3 streams, plain
    // RoPE, tied embeddings.
    // The engine's step runs each row over the window ring and the compressors' decode
    // state, one token at a time and in uneven chunks.
    check("deepseek-v4");
    check("deepseek-v4-b");
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
        let err = sparrow::formats::hf::read_config(&path)
            .unwrap_err()
            .to_string();
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
    let err = sparrow::model_dir::load(&sharded, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model-00003-of-00011.safetensors"), "{err}");
    // A missing or mis-shaped tensor in an HF checkpoint is named with both shapes.
    let (mut t, meta) =
        sparrow::weights::load(&fixture("mixtral").join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let one = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("mixtral").join("config.json"),
        one.path().join("config.json"),
    )
    .unwrap();
    let name = "model.layers.1.block_sparse_moe.experts.2.w3.weight";
    t.insert(
        name.to_string(),
        Tensor::zeros((5, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let list: Vec<(String, Tensor)> = t.clone().into_iter().collect();
    sparrow::weights::save(&one.path().join("model.safetensors"), &list, meta.clone()).unwrap();
    let err = sparrow::model_dir::load(one.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("mlp.experts.2.up_proj.weight")
            && err.contains("[5, 32]")
            && err.contains("[48, 32]"),
        "{err}"
    );
    // Zero-element tensors (transformers' 0-wide shared MLP when n_shared_experts is 0)
    // are skipped on import: with the right w3 back and one extra empty tensor it loads.
    let good = sparrow::weights::load(&fixture("mixtral").join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .0;
    t.insert(name.to_string(), good[name].clone());
    t.insert(
        "model.layers.0.mlp.shared_experts.up_proj.weight".into(),
        Tensor::zeros((0, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let list: Vec<(String, Tensor)> = t.clone().into_iter().collect();
    sparrow::weights::save(&one.path().join("model.safetensors"), &list, meta.clone()).unwrap();
    sparrow::model_dir::load(one.path(), DType::F32, &Device::Cpu).unwrap();
    t.remove(name);
    let list: Vec<(String, Tensor)> = t.into_iter().collect();
    sparrow::weights::save(&one.path().join("model.safetensors"), &list, meta).unwrap();
    let err = sparrow::model_dir::load(one.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("missing tensor") && err.contains("up_proj"),
        "{err}"
    );
}

/// Every tensor of a model, by name.
fn tensors(m: &Model) -> Vec<(String, Vec<f32>)> {
    m.store
        .all_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn import_export_import_is_bit_exact_with_hf_names() {
    for name in [
        "llama",
        "llama-sharded",
        "mixtral",
        "deepseek-v3",
        "deepseek-v3-noq",
        "deepseek-v32",
        "deepseek-v4",
        "deepseek-v4-b",
    ] {
        let (a, _) = sparrow::model_dir::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let out = tempfile::tempdir().unwrap();
        let opts = sparrow::model_dir::SaveOptions {
            layout: sparrow::model_dir::Layout::Hf,
            ..Default::default()
        };
        let family = sparrow::model_dir::save(&a, out.path(), &opts)
            .unwrap()
            .unwrap();
        let expected = match name {
            "mixtral" => "mixtral",
            "deepseek-v32" => "deepseek_v32",
            n if n.starts_with("deepseek-v4") => "deepseek_v4",
            n if n.starts_with("deepseek") => "deepseek_v3",
            _ => "llama",
        };
        assert_eq!(family.model_type(), expected);
        let (b, _) = sparrow::model_dir::load(out.path(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(a.cfg, b.cfg, "{name}: config changed in the round trip");
        assert!(
            tensors(&a) == tensors(&b),
            "{name}: weights changed in the round trip"
        );
        // The export uses the names transformers saved.
        let original: std::collections::BTreeSet<String> =
            sparrow::formats::hf::weight_files(&fixture(name))
                .unwrap()
                .iter()
                .flat_map(|f| {
                    sparrow::weights::load(f, &Device::Cpu)
                        .unwrap()
                        .0
                        .into_keys()
                        .collect::<Vec<_>>()
                })
                .collect();
        let exported: std::collections::BTreeSet<String> =
            sparrow::weights::load(&out.path().join("model.safetensors"), &Device::Cpu)
                .unwrap()
                .0
                .into_keys()
                .collect();
        assert_eq!(original, exported, "{name}: tensor names");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], family.model_type());
        assert!(cfg["architectures"][0]
            .as_str()
            .unwrap()
            .ends_with("ForCausalLM"));
    }
}

#[test]
fn models_without_an_hf_form_are_refused_by_name() {
    let dsa = tiny_dsa_config(sparrow::config::IndexerKind::Lightning, 4);
    let err = sparrow::formats::hf::export_family(&dsa)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer_types"), "{err}");
    let mut noaux = tiny_config();
    noaux.router_kind = sparrow::config::RouterKind::NoauxBias;
    noaux.first_k_dense_replace = 0;
    noaux.n_shared_experts = 0;
    let err = sparrow::formats::hf::export_family(&noaux)
        .unwrap_err()
        .to_string();
    assert!(err.contains("router_kind"), "{err}");
    let mut dense = tiny_config();
    dense.n_routed_experts = 0;
    dense.num_experts_per_tok = 0;
    assert_eq!(
        sparrow::formats::hf::export_family(&dense).unwrap(),
        sparrow::formats::hf::Family::Llama
    );
}
