//! Config parsing and validation: every bad field gives an error naming it.

mod common;
use common::*;
use sparrow::{Error, ModelConfig};

fn tiny_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(repo_root().join("configs/tiny.json")).unwrap())
        .unwrap()
}

fn error_for(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v = tiny_json();
    edit(&mut v);
    match ModelConfig::from_json(&v.to_string()) {
        Ok(_) => panic!("config should have been rejected: {v}"),
        Err(e) => {
            assert!(
                matches!(e, Error::Config { .. }),
                "expected a config error, got {e:?}"
            );
            e.to_string()
        }
    }
}

#[test]
fn presets_load_and_small_is_in_range() {
    use candle_core::{DType, Device};
    let counts = |cfg: &ModelConfig| {
        sparrow::model::Model::new_random_for_inference(cfg, 0, DType::F32, &Device::Cpu)
            .unwrap()
            .parameter_counts()
    };
    let tiny = tiny_config();
    assert!(counts(&tiny).0 < 1_000_000);
    let small = ModelConfig::from_file(&repo_root().join("configs/small.json")).unwrap();
    let (total, active) = counts(&small);
    assert!(
        (10_000_000..=30_000_000).contains(&total),
        "small has {total} parameters"
    );
    assert!(active < total);
    assert_eq!(small.num_kv_heads(), 1, "small is MQA");
    assert!(!small.is_moe_layer(0));
    assert!((1..small.num_hidden_layers).all(|i| small.is_moe_layer(i)));
}

#[test]
fn parameter_count_matches_the_built_model() {
    use candle_core::{DType, Device};
    for tie in [false, true] {
        let mut cfg = tiny_config();
        cfg.tie_word_embeddings = tie;
        let model = sparrow::model::Model::new_random(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
        // By hand: tiny has C 32, V 512, 2 layers (dense, then MoE 4 x 32 top-2 + one
        // shared), GQA 4 heads / 2 KV heads of 8.
        let (c, v, d) = (32, 512, 8);
        let attn = c * 4 * d * 2 + c * 2 * d * 2 + 2 * c; // q, o, k, v, two norms
        let expert = 3 * c * 32;
        let layer0 = attn + 3 * c * 64;
        let layer1 = attn + 4 * expert + expert + c * 4; // experts, shared, router
        let embed = v * c * if tie { 1 } else { 2 };
        let total = layer0 + layer1 + embed + c;
        assert_eq!(
            model.parameter_counts(),
            (total, total - 2 * expert),
            "tie {tie}"
        );
    }
}

#[test]
fn unknown_router_kind_names_the_field() {
    let e = error_for(|v| v["router_kind"] = "fancy".into());
    assert!(e.contains("router_kind") && e.contains("fancy"), "{e}");
}

#[test]
fn heads_not_dividing_hidden_size() {
    let e = error_for(|v| v["num_attention_heads"] = 5.into());
    assert!(
        e.contains("num_attention_heads") && e.contains("hidden_size"),
        "{e}"
    );
}

#[test]
fn kv_heads_not_dividing_heads() {
    let e = error_for(|v| v["num_key_value_heads"] = 3.into());
    assert!(e.contains("num_key_value_heads"), "{e}");
}

#[test]
fn experts_per_token_above_expert_count() {
    let e = error_for(|v| v["num_experts_per_tok"] = 9.into());
    assert!(
        e.contains("num_experts_per_tok") && e.contains("n_routed_experts"),
        "{e}"
    );
}

#[test]
fn negative_sizes_name_the_field() {
    for field in [
        "hidden_size",
        "vocab_size",
        "num_hidden_layers",
        "moe_intermediate_size",
        "n_routed_experts",
    ] {
        let e = error_for(|v| v[field] = (-4).into());
        assert!(e.contains(field), "{field}: {e}");
    }
}

#[test]
fn zero_and_wrong_types_and_missing_fields() {
    let e = error_for(|v| v["hidden_size"] = 0.into());
    assert!(e.contains("hidden_size"), "{e}");
    let e = error_for(|v| v["rope_theta"] = "big".into());
    assert!(e.contains("rope_theta"), "{e}");
    let e = error_for(|v| {
        v.as_object_mut().unwrap().remove("vocab_size");
    });
    assert!(e.contains("vocab_size"), "{e}");
    let e = error_for(|v| v["eos_token_id"] = 9999.into());
    assert!(e.contains("eos_token_id"), "{e}");
}

#[test]
fn malformed_json_is_an_error_not_a_panic() {
    assert!(ModelConfig::from_json("{\"vocab_size\": 12,").is_err());
    assert!(ModelConfig::from_json("").is_err());
    let missing =
        ModelConfig::from_file(std::path::Path::new("/nonexistent/config.json")).unwrap_err();
    assert!(
        missing.to_string().contains("/nonexistent/config.json"),
        "{missing}"
    );
}

#[test]
fn config_round_trips_through_json() {
    let cfg = tiny_config();
    assert_eq!(ModelConfig::from_json(&cfg.to_json()).unwrap(), cfg);
}

#[test]
fn router_fields_are_validated_by_name() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("capacity_factor", 0.0.into(), "capacity_factor"),
        ("capacity_floor", 1.5.into(), "capacity_floor"),
        ("router_z_loss_coef", (-1.0).into(), "router_z_loss_coef"),
        ("routed_scaling_factor", 0.0.into(), "routed_scaling_factor"),
        (
            "router_bias_update_speed",
            (-0.1).into(),
            "router_bias_update_speed",
        ),
        ("n_group", 3.into(), "n_group"), // does not divide 4 experts
        ("topk_group", 0.into(), "topk_group"),
    ];
    for (field, value, named) in cases {
        let e = error_for(|v| v[field] = value.clone());
        assert!(e.contains(named), "{field}: {e}");
    }
    // 2 groups of 2 experts, 1 group kept: only 2 experts reachable, fine for top-2;
    // top-3 is not.
    let e = error_for(|v| {
        v["n_group"] = 2.into();
        v["topk_group"] = 1.into();
        v["num_experts_per_tok"] = 3.into();
    });
    assert!(e.contains("topk_group"), "{e}");
    // Every router kind parses; the default config round-trips through JSON.
    for kind in sparrow::config::RouterKind::ALL {
        let mut v = tiny_json();
        v["router_kind"] = kind.name().into();
        let cfg = ModelConfig::from_json(&v.to_string()).unwrap();
        assert_eq!(cfg.router_kind, kind);
        assert_eq!(ModelConfig::from_json(&cfg.to_json()).unwrap(), cfg);
    }
}
