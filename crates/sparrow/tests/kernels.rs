//! Fused kernels against their plain references on random inputs of awkward sizes,
//! forward and backward, plus finite-difference checks of the custom backward passes.

mod common;
#[path = "kernel_checks/mod.rs"]
mod kernel_checks;
use candle_core::{DType, Device, Tensor, Var};
use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparrow::kernels::cross_entropy::CrossEntropy;
use sparrow::kernels::reference;
use sparrow::kernels::softmax::CausalSoftmax;

fn grads_of(x: &Var, loss: &Tensor) -> Tensor {
    loss.backward().unwrap().get(x.as_tensor()).unwrap().clone()
}

#[test]
fn causal_softmax_matches_reference_forward_and_backward() {
    // (batch, groups, queries T, keys S, offset): S not a multiple of any SIMD width,
    // decode (T = 1), prefill after a cache (offset > 0), a single key.
    for &(b, g, t, s, offset) in &[
        (2, 3, 5, 5, 0),
        (1, 7, 13, 13, 0),
        (3, 2, 1, 37, 36),
        (2, 4, 9, 31, 22),
        (1, 1, 1, 1, 0),
        (1, 5, 67, 67, 0),
    ] {
        for dtype in [DType::F32, DType::F64] {
            let seed = (b * 1000 + s) as u64;
            let x = Var::from_tensor(&(randn(&[b, g * t, s], seed, dtype) * 4.0).unwrap()).unwrap();
            let r = randn(&[b, g * t, s], seed + 1, dtype);
            let scale = 0.37;
            let fused = CausalSoftmax {
                scale,
                queries: t,
                offset,
            }
            .apply(x.as_tensor())
            .unwrap();
            let plain = reference::causal_softmax(x.as_tensor(), scale, t, offset).unwrap();
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-13 };
            assert!(
                rel_err(&fused, &plain) < tol,
                "forward {b}x{g}x{t}x{s}+{offset} {dtype:?}: {}",
                rel_err(&fused, &plain)
            );
            let gf = grads_of(&x, &(&fused * &r).unwrap().sum_all().unwrap());
            let gp = grads_of(&x, &(&plain * &r).unwrap().sum_all().unwrap());
            assert!(
                rel_err(&gf, &gp) < tol * 10.0,
                "backward {b}x{g}x{t}x{s}+{offset} {dtype:?}: {}",
                rel_err(&gf, &gp)
            );
            // Causality: masked entries are exactly zero, visible rows sum to one.
            let y = to_f64_vec(&fused);
            for (row, vals) in y.chunks(s).enumerate() {
                let visible = (offset + row % t + 1).min(s);
                assert!(vals[visible..].iter().all(|&v| v == 0.0));
                assert!((vals.iter().sum::<f64>() - 1.0).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn causal_softmax_finite_differences() {
    let x = Var::from_tensor(&randn(&[2, 6, 11], 3, DType::F64)).unwrap();
    let r = randn(&[2, 6, 11], 4, DType::F64);
    let op = CausalSoftmax {
        scale: 0.8,
        queries: 3,
        offset: 5,
    };
    check_gradients(
        &[("scores".into(), x.clone())],
        || {
            (op.apply(x.as_tensor()).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
        },
        40,
    );
}

#[test]
fn cross_entropy_matches_reference_forward_and_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for &(n, v) in &[(1, 2), (7, 13), (33, 1001), (5, 8193)] {
        for dtype in [DType::F32, DType::F64] {
            let x =
                Var::from_tensor(&(randn(&[n, v], (n * v) as u64, dtype) * 6.0).unwrap()).unwrap();
            let t: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
            let t = Tensor::from_vec(t, n, &Device::Cpu).unwrap();
            let fused = CrossEntropy::apply(x.as_tensor(), &t).unwrap();
            let plain = reference::cross_entropy(x.as_tensor(), &t).unwrap();
            // Two f32 computations (each within ~1e-5 of the f64 truth: checked in
            // kernel_checks::cross_entropy_f32) differ by up to the sum of their errors.
            let tol = if dtype == DType::F32 { 2e-5 } else { 1e-12 };
            assert!(
                rel_err(&fused, &plain) < tol,
                "forward {n}x{v} {dtype:?}: {fused} vs {plain}"
            );
            // Scale the loss so the incoming gradient is not 1.
            let gf = grads_of(&x, &(fused * 2.5).unwrap());
            let gp = grads_of(&x, &(plain * 2.5).unwrap());
            assert!(
                rel_err(&gf, &gp) < tol,
                "backward {n}x{v} {dtype:?}: {}",
                rel_err(&gf, &gp)
            );
        }
    }
}

#[test]
fn cross_entropy_f32_matches_its_f64_path_at_the_widest_level() {
    kernel_checks::cross_entropy_f32();
}

#[test]
fn cross_entropy_finite_differences() {
    let x = Var::from_tensor(&randn(&[4, 9], 8, DType::F64)).unwrap();
    let t = Tensor::from_vec(vec![0u32, 8, 3, 3], 4, &Device::Cpu).unwrap();
    check_gradients(
        &[("logits".into(), x.clone())],
        || CrossEntropy::apply(x.as_tensor(), &t).unwrap(),
        36,
    );
}

#[test]
fn cross_entropy_rejects_bad_targets() {
    let x = randn(&[2, 5], 1, DType::F32);
    let t = Tensor::from_vec(vec![1u32, 5], 2, &Device::Cpu).unwrap();
    let e = CrossEntropy::apply(&x, &t).unwrap_err().to_string();
    assert!(e.contains("target 5"), "{e}");
    let t = Tensor::from_vec(vec![1u32], 1, &Device::Cpu).unwrap();
    assert!(CrossEntropy::apply(&x, &t).is_err());
}

#[test]
fn inference_matmul_matches_the_reference_and_is_batch_invariant() {
    kernel_checks::f32_products();
}
