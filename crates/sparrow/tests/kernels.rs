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

#[test]
fn adamw_update_matches_the_tensor_op_reference_bit_for_bit() {
    use sparrow::kernels::adamw::{adamw_update, AdamWInPlace, AdamWStep};
    // Sizes around the parallel chunk (32768) and odd ones; steps early (large bias
    // corrections) and late, with and without clipping and decay.
    let cases = [
        (1, 1, 1.0, 0.1),
        (7, 2, 0.37, 0.0),
        (32_767, 3, 1.0, 0.1),
        (32_769, 10, 0.05, 0.1),
        (100_003, 500, 1.0, 0.0),
    ];
    for (case, &(n, t, grad_scale, weight_decay)) in cases.iter().enumerate() {
        let seed = 40 + case as u64;
        let p = randn(&[n], seed, DType::F32);
        let g = (randn(&[n], seed + 100, DType::F32) * 0.03).unwrap();
        let m = (randn(&[n], seed + 200, DType::F32) * 0.01).unwrap();
        let v = (randn(&[n], seed + 300, DType::F32).sqr().unwrap() * 1e-4).unwrap();
        let step = AdamWStep {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            lr: 3e-3,
            weight_decay,
            bias_correction1: 1.0 - 0.9f64.powi(t),
            bias_correction2: 1.0 - 0.95f64.powi(t),
            grad_scale,
        };
        let (want_p, want_m, want_v) = reference::adamw_update(&p, &g, &m, &v, &step).unwrap();

        // The slice kernel.
        let mut got_p = p.to_vec1::<f32>().unwrap();
        let mut got_m = m.to_vec1::<f32>().unwrap();
        let mut got_v = v.to_vec1::<f32>().unwrap();
        adamw_update(
            &mut got_p,
            &g.to_vec1::<f32>().unwrap(),
            &mut got_m,
            &mut got_v,
            &step,
        );
        for (what, got, want) in [
            ("p", &got_p, &want_p),
            ("m", &got_m, &want_m),
            ("v", &got_v, &want_v),
        ] {
            let want = want.to_vec1::<f32>().unwrap();
            let err = rel_err_f64(got, &want.iter().map(|&x| x as f64).collect::<Vec<_>>());
            assert!(err < 1e-6, "case {case} {what}: relative error {err}");
            let differ = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                differ, 0,
                "case {case} {what}: {differ} of {n} values differ in bits"
            );
        }

        // The in-place op on a parameter tensor, with a non-contiguous gradient.
        let param = Var::from_tensor(&p.reshape((1, n)).unwrap()).unwrap();
        let g_t = g.reshape((n, 1)).unwrap().t().unwrap();
        let mut m2 = m.to_vec1::<f32>().unwrap();
        let mut v2 = v.to_vec1::<f32>().unwrap();
        AdamWInPlace::new(&mut m2, &mut v2, step)
            .apply(param.as_tensor(), &g_t)
            .unwrap();
        let updated = param
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            updated, got_p,
            "case {case}: in-place op differs from the slice kernel"
        );
        assert_eq!((m2, v2), (got_m, got_v), "case {case}: moments differ");
    }
}

#[test]
fn adamw_in_place_rejects_mismatched_moments() {
    use sparrow::kernels::adamw::{AdamWInPlace, AdamWStep};
    let step = AdamWStep {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        lr: 1e-3,
        weight_decay: 0.0,
        bias_correction1: 0.1,
        bias_correction2: 0.05,
        grad_scale: 1.0,
    };
    let param = Var::from_tensor(&randn(&[5], 1, DType::F32)).unwrap();
    let grad = randn(&[5], 2, DType::F32);
    let (mut m, mut v) = (vec![0.0f32; 4], vec![0.0f32; 5]);
    let err = AdamWInPlace::new(&mut m, &mut v, step)
        .apply(param.as_tensor(), &grad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("moments 4 and 5"), "{err}");
}

#[test]
fn linear_cross_entropy_matches_head_then_reference_loss() {
    use sparrow::kernels::linear_cross_entropy::{
        linear_cross_entropy, linear_cross_entropy_chunked,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    // (rows, width, vocabulary, rows per chunk): one row, chunks that do not divide the
    // rows, a single chunk, and the default chunking.
    for &(n, c, v, chunk) in &[
        (1, 1, 2, 1),
        (7, 5, 13, 3),
        (37, 19, 1001, 10),
        (64, 33, 8193, 64),
        (130, 16, 40_000, 0),
    ] {
        for dtype in [DType::F32, DType::F64] {
            let seed = (n * c + v) as u64;
            let x = Var::from_tensor(&randn(&[n, c], seed, dtype)).unwrap();
            let w = Var::from_tensor(&(randn(&[v, c], seed + 1, dtype) * 0.7).unwrap()).unwrap();
            let t: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
            let t = Tensor::from_vec(t, n, &Device::Cpu).unwrap();
            let fused = if chunk == 0 {
                linear_cross_entropy(x.as_tensor(), w.as_tensor(), &t).unwrap()
            } else {
                linear_cross_entropy_chunked(x.as_tensor(), w.as_tensor(), &t, chunk).unwrap()
            };
            let logits = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
            let plain = reference::cross_entropy(&logits, &t).unwrap();
            let tol = if dtype == DType::F32 { 2e-5 } else { 1e-12 };
            let what = format!("{n}x{c} by {v}x{c}, chunks of {chunk}, {dtype:?}");
            assert!(
                rel_err(&fused, &plain) < tol,
                "loss {what}: {fused} vs {plain}"
            );
            // Without gradients wanted (detached inputs): the same loss, nothing kept.
            let detached =
                linear_cross_entropy(&x.as_tensor().detach(), &w.as_tensor().detach(), &t).unwrap();
            assert!(rel_err(&detached, &plain) < tol, "detached loss {what}");
            // Scaled so that the incoming gradient is not 1.
            let gf = (fused * 2.5).unwrap().backward().unwrap();
            let gp = (plain * 2.5).unwrap().backward().unwrap();
            for (name, var) in [("x", &x), ("w", &w)] {
                let (a, b) = (
                    gf.get(var.as_tensor()).unwrap(),
                    gp.get(var.as_tensor()).unwrap(),
                );
                let err = rel_err(a, b);
                assert!(err < tol * 5.0, "d{name} {what}: relative error {err}");
            }
        }
    }
}

#[test]
fn linear_cross_entropy_finite_differences_and_bad_shapes() {
    use sparrow::kernels::linear_cross_entropy::linear_cross_entropy_chunked;
    let x = Var::from_tensor(&randn(&[5, 4], 11, DType::F64)).unwrap();
    let w = Var::from_tensor(&randn(&[9, 4], 12, DType::F64)).unwrap();
    let t = Tensor::from_vec(vec![0u32, 8, 3, 3, 5], 5, &Device::Cpu).unwrap();
    check_gradients(
        &[("x".into(), x.clone()), ("w".into(), w.clone())],
        || linear_cross_entropy_chunked(x.as_tensor(), w.as_tensor(), &t, 2).unwrap(),
        20,
    );
    let short = Tensor::from_vec(vec![0u32, 1], 2, &Device::Cpu).unwrap();
    let err = linear_cross_entropy_chunked(x.as_tensor(), w.as_tensor(), &short, 2).unwrap_err();
    assert!(err.to_string().contains("N targets"), "{err}");
    let outside = Tensor::from_vec(vec![0u32, 9, 0, 0, 0], 5, &Device::Cpu).unwrap();
    let err = linear_cross_entropy_chunked(x.as_tensor(), w.as_tensor(), &outside, 2).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

#[test]
fn row_nll_matches_log_softmax_and_rejects_bad_targets() {
    use sparrow::kernels::cross_entropy::row_nll;
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for &(n, v) in &[(1, 2), (9, 17), (40, 8193)] {
        for dtype in [DType::F32, DType::F64] {
            let x = (randn(&[n, v], (n + v) as u64, dtype) * 5.0).unwrap();
            let t: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
            let t = Tensor::from_vec(t, n, &Device::Cpu).unwrap();
            let want = nll_reference(&x, &t);
            let got = row_nll(&x, &t).unwrap();
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let err = (g - w).abs() / w.abs().max(1.0);
                assert!(err < tol, "{n}x{v} {dtype:?} row {i}: {g} vs {w}");
            }
        }
    }
    let x = randn(&[2, 5], 1, DType::F32);
    let bad = Tensor::from_vec(vec![0u32, 5], 2, &Device::Cpu).unwrap();
    assert!(row_nll(&x, &bad)
        .unwrap_err()
        .to_string()
        .contains("outside the vocabulary"));
}
