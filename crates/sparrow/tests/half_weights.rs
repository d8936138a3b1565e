//! Weights held in half precision or int8 for inference (`WeightFormat`): the
//! half-precision kernel against an f64 reference on awkward sizes (AVX-512 and
//! portable), its rows independent of the batch; whole models loaded as f16 / bf16 /
//! int8 against the same weights in f32, through the full forward and the engine step.

mod common;
#[path = "kernel_checks/mod.rs"]
mod kernel_checks;
use candle_core::{DType, Device, Tensor};
use common::*;
use sparrow::kernels::hmatmul::{HalfKind, HalfMatrix};
use sparrow::model::linear::LinearWeight;
use sparrow::model_dir::{self, SaveOptions};
use sparrow::weights::WeightFormat;

#[test]
fn half_kernel_matches_the_reference_on_awkward_sizes() {
    kernel_checks::half_products();
}

#[test]
fn half_values_round_to_nearest_and_widen_exactly() {
    let v = [0.1f32, -3.5, 65504.0, 1e-8, 1.0 + 1.0 / 1024.0];
    let h = HalfMatrix::from_f32(HalfKind::F16, 1, 5, &v);
    let back = h.to_f32();
    assert_eq!(back[1], -3.5);
    assert_eq!(back[2], 65504.0);
    assert_eq!(back[4], 1.0 + 1.0 / 1024.0);
    assert!((back[0] - 0.1).abs() < 1e-4);
    let b = HalfMatrix::from_f32(HalfKind::Bf16, 1, 5, &v).to_f32();
    assert_eq!(b[1], -3.5);
    assert!((b[0] - 0.1).abs() < 1e-3);
}

/// A tiny llama-shaped model (dims multiples of 32 so int8 blocks apply) saved with
/// f16 weights, and its logits over a sequence through the full forward and the step.
fn logits_of(dir: &std::path::Path, format: WeightFormat, ids: &[u32]) -> (Tensor, Tensor, usize) {
    let (m, _) =
        model_dir::load_for_inference(dir, format, DType::F32, &Device::Cpu, |_| {}).unwrap();
    let x = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    let full = m.forward(&x).unwrap().logits;
    let (stepped, _) = stepped(&m, ids, &prefill_then_decode(5, ids.len()));
    (full, stepped, m.store.packed_bytes())
}

#[test]
fn models_load_as_f16_bf16_and_int8_and_agree_with_f32() {
    let mut cfg = tiny_config();
    cfg.n_routed_experts = 0;
    cfg.first_k_dense_replace = 0;
    cfg.hidden_size = 64;
    cfg.intermediate_size = 96;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = Some(2);
    cfg.initializer_range = 0.2;
    let model = sparrow::model::Model::new_random(&cfg, 5, DType::F32, &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (f32_dir, f16_dir) = (tmp.path().join("f32"), tmp.path().join("f16"));
    model_dir::save_at(&model, &f32_dir, None).unwrap();
    let opts = SaveOptions {
        dtype: DType::F16,
        ..Default::default()
    };
    model_dir::save(&model, &f16_dir, &opts).unwrap();
    let ids: Vec<u32> = (0..23u32).map(|i| (i * 37 + 11) % 512).collect();

    // An f16 file held as f16 (native) computes what the same values in f32 compute.
    let (want, want_step, none) = logits_of(&f16_dir, WeightFormat::F32, &ids);
    assert_eq!(none, 0, "f32 holds nothing packed");
    let (full, step, bytes) = logits_of(&f16_dir, WeightFormat::Native, &ids);
    assert!(rel_err(&full, &want) < 1e-5, "native f16 full forward");
    assert!(rel_err(&step, &want_step) < 1e-5, "native f16 step");
    let (m, _) = model_dir::load_for_inference(
        &f16_dir,
        WeightFormat::Native,
        DType::F32,
        &Device::Cpu,
        |_| {},
    )
    .unwrap();
    let q = match m.net.layers[0].self_attn {
        sparrow::model::block::SelfAttn::Standard(ref a) => a.q_proj.packed().clone(),
        _ => unreachable!(),
    };
    assert!(matches!(q, LinearWeight::Half(ref h) if h.kind == HalfKind::F16));
    // Every linear weight is packed: 2 bytes per weight.
    let (total, _) = m.parameter_counts();
    let small: usize = m
        .store
        .all_tensors()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(bytes, 2 * (total - small));
    // A packed model refuses to be saved rather than writing something else.
    assert!(model_dir::save_at(&m, &tmp.path().join("no"), None).is_err());

    // f32 weights rounded at load: f16, bf16, int8 blocks, each within its precision
    // (int8 also quantizes the activations per 32-block, as llama.cpp's Q8_0 path
    // does; with this tiny model's large random weights that moves logits ~6%).
    let (want, want_step, _) = logits_of(&f32_dir, WeightFormat::F32, &ids);
    for (format, tol) in [
        (WeightFormat::F16, 2e-3),
        (WeightFormat::Bf16, 2e-2),
        (WeightFormat::Int8, 0.1),
    ] {
        let (full, step, bytes) = logits_of(&f32_dir, format, &ids);
        let (e_full, e_step) = (rel_err(&full, &want), rel_err(&step, &want_step));
        assert!(
            e_full < tol && e_step < tol,
            "{format:?}: {e_full} / {e_step}"
        );
        assert!(e_full > 0.0, "{format:?}: nothing was rounded");
        assert!(bytes > 0, "{format:?}: nothing packed");
    }
}
