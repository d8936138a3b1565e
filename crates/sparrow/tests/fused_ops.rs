//! The fused ops of the V4 blocks (`kernels::swiglu`, `kernels::rotary`,
//! `kernels::hyper`) and the indexer's selected scores (`kernels::selected_scores`)
//! against their plain references on random inputs of awkward sizes, and their backward
//! passes against central finite differences.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use sparrow::kernels::const_matmul::ConstWeightMatmul;
use sparrow::kernels::hyper::{
    merge_reference, sinkhorn_reference, RowRms, Sinkhorn, StreamCollapse, StreamMerge,
};
use sparrow::kernels::indexer::ScoreAct;
use sparrow::kernels::rms_norm::WeightedRmsNorm;
use sparrow::kernels::rotary::{self, PairRotation};
use sparrow::kernels::selected_scores::SelectedScores;
use sparrow::kernels::swiglu::{self, SwiGlu};
use sparrow::kernels::topk::NONE;
use std::sync::Arc;

/// `sum(y * r)` for a fixed random r: a scalar whose gradient reaches every output.
fn probe(y: &Tensor, seed: u64) -> Tensor {
    (y * randn(y.dims(), seed, DType::F64))
        .unwrap()
        .sum_all()
        .unwrap()
}

fn var(shape: &[usize], seed: u64, scale: f64) -> Var {
    Var::from_tensor(&(randn(shape, seed, DType::F64) * scale).unwrap()).unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    to_f64_vec(t)
}

fn tensor(data: Vec<f64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

#[test]
fn swiglu_matches_its_reference_and_finite_differences() {
    let shape = [7usize, 13];
    // Values in (-3, 3): a limit of 1.5 clamps a good share of them.
    let (g, u) = (var(&shape, 1, 3.0), var(&shape, 2, 3.0));
    for limit in [None, Some(1.5)] {
        let op = SwiGlu { limit };
        let got = op.apply(g.as_tensor(), u.as_tensor()).unwrap();
        let want = tensor(
            swiglu::reference(&f64s(g.as_tensor()), &f64s(u.as_tensor()), limit),
            &shape,
        );
        assert!(
            rel_err(&got, &want) < 1e-12,
            "{limit:?}: {:e}",
            rel_err(&got, &want)
        );
        let got32 = op
            .apply(
                &g.as_tensor().to_dtype(DType::F32).unwrap(),
                &u.as_tensor().to_dtype(DType::F32).unwrap(),
            )
            .unwrap();
        assert!(rel_err(&got32, &want) < 1e-5);
        if limit.is_some() {
            // The clamp did something: unclamped, the result differs.
            let free = SwiGlu { limit: None }
                .apply(g.as_tensor(), u.as_tensor())
                .unwrap();
            assert!(rel_err(&free, &want) > 1e-2);
        }
        let vars = vec![("g".to_string(), g.clone()), ("u".to_string(), u.clone())];
        check_gradients(
            &vars,
            || probe(&op.apply(g.as_tensor(), u.as_tensor()).unwrap(), 3),
            40,
        );
    }
}

#[test]
fn pair_rotation_matches_its_reference_inverts_and_has_the_right_gradient() {
    // (B, H, T, D) with 3 rotated pairs at the end of 11 dims, 5 positions.
    let shape = [2usize, 3, 5, 11];
    let (t, half) = (5usize, 3usize);
    let angles = f64s(&randn(&[t * half], 4, DType::F64));
    let table: Vec<(f64, f64)> = angles
        .iter()
        .map(|a| ((3.0 * a).cos() * 1.3, (3.0 * a).sin() * 1.3))
        .collect();
    let rot = PairRotation::new(table.clone(), t).unwrap();
    let x = var(&shape, 5, 1.0);
    let got = rot.apply(x.as_tensor()).unwrap();
    let want = tensor(
        rotary::reference(&f64s(x.as_tensor()), 11, &table, t),
        &shape,
    );
    assert!(rel_err(&got, &want) < 1e-12, "{:e}", rel_err(&got, &want));
    // The leading 5 dims of every row pass through.
    let (xs, ys) = (f64s(x.as_tensor()), f64s(&got));
    for (xr, yr) in xs.chunks(11).zip(ys.chunks(11)) {
        assert_eq!(xr[..5], yr[..5]);
    }
    // A unit-scale table's transpose undoes it.
    let unit: Vec<(f64, f64)> = angles.iter().map(|a| (a.cos(), a.sin())).collect();
    let back: Vec<(f64, f64)> = unit.iter().map(|&(c, s)| (c, -s)).collect();
    let there = PairRotation::new(unit, t)
        .unwrap()
        .apply(x.as_tensor())
        .unwrap();
    let again = PairRotation::new(back, t).unwrap().apply(&there).unwrap();
    assert!(rel_err(&again, x.as_tensor()) < 1e-14);
    let vars = vec![("x".to_string(), x.clone())];
    check_gradients(&vars, || probe(&rot.apply(x.as_tensor()).unwrap(), 6), 40);
    // A table that does not fit the input is an error, not a panic.
    assert!(PairRotation::new(table.clone(), 4).is_err());
    assert!(rot.apply(&randn(&[2, 3, 4, 11], 7, DType::F64)).is_err());
    assert!(rot.apply(&randn(&[2, 3, 5, 5], 7, DType::F64)).is_err());
}

#[test]
fn sinkhorn_matches_its_reference_and_finite_differences() {
    let (r, n) = (5usize, 4usize);
    let z = var(&[r, n, n], 8, 2.0);
    for iters in [1usize, 3, 20] {
        let op = Sinkhorn { iters, eps: 1e-6 };
        let got = op.apply(z.as_tensor()).unwrap();
        let zs = f64s(z.as_tensor());
        let want: Vec<f64> = zs
            .chunks(n * n)
            .flat_map(|m| sinkhorn_reference(m, n, iters, 1e-6))
            .collect();
        let want = tensor(want, &[r, n, n]);
        assert!(
            rel_err(&got, &want) < 1e-12,
            "{iters}: {:e}",
            rel_err(&got, &want)
        );
        if iters == 20 {
            // Nearly doubly stochastic: rows and columns sum to ~1.
            for m in f64s(&got).chunks(n * n) {
                for i in 0..n {
                    let row: f64 = m[i * n..(i + 1) * n].iter().sum();
                    let col: f64 = (0..n).map(|j| m[j * n + i]).sum();
                    assert!((row - 1.0).abs() < 1e-3 && (col - 1.0).abs() < 1e-5);
                }
            }
        }
        let got32 = op
            .apply(&z.as_tensor().to_dtype(DType::F32).unwrap())
            .unwrap();
        assert!(rel_err(&got32, &want) < 1e-5);
        let vars = vec![("z".to_string(), z.clone())];
        check_gradients(&vars, || probe(&op.apply(z.as_tensor()).unwrap(), 9), 30);
    }
}

#[test]
fn row_rms_collapse_and_merge_match_references_and_finite_differences() {
    let (r, n, c) = (6usize, 3usize, 7usize);
    let x = var(&[r, n, c], 10, 1.0);
    let w = var(&[r, n], 11, 1.0);
    let mixes = var(&[r, n + n * n], 12, 1.0);
    let f = var(&[r, c], 13, 1.0);

    // RowRms
    let rms = RowRms { eps: 1e-6 };
    let flat = x.as_tensor().reshape((r, n * c)).unwrap();
    let got = rms.apply(&flat).unwrap();
    let want: Vec<f64> = f64s(&flat)
        .chunks(n * c)
        .map(|row| (row.iter().map(|v| v * v).sum::<f64>() / (n * c) as f64 + 1e-6).sqrt())
        .collect();
    assert!(rel_err(&got, &tensor(want, &[r, 1])) < 1e-12);
    let vars = vec![("x".to_string(), x.clone())];
    check_gradients(
        &vars,
        || {
            let flat = x.as_tensor().reshape((r, n * c)).unwrap();
            probe(&rms.apply(&flat).unwrap(), 14)
        },
        20,
    );

    // StreamCollapse
    let got = StreamCollapse::apply(x.as_tensor(), w.as_tensor()).unwrap();
    let (xs, ws) = (f64s(x.as_tensor()), f64s(w.as_tensor()));
    let want: Vec<f64> = (0..r)
        .flat_map(|row| {
            let (xs, ws) = (&xs, &ws);
            (0..c).map(move |i| {
                (0..n)
                    .map(|j| ws[row * n + j] * xs[(row * n + j) * c + i])
                    .sum()
            })
        })
        .collect();
    assert!(rel_err(&got, &tensor(want, &[r, c])) < 1e-12);
    let vars = vec![("x".to_string(), x.clone()), ("w".to_string(), w.clone())];
    check_gradients(
        &vars,
        || {
            probe(
                &StreamCollapse::apply(x.as_tensor(), w.as_tensor()).unwrap(),
                15,
            )
        },
        20,
    );

    // StreamMerge
    let got = StreamMerge::apply(x.as_tensor(), mixes.as_tensor(), f.as_tensor()).unwrap();
    let (ms, fs) = (f64s(mixes.as_tensor()), f64s(f.as_tensor()));
    let width = n + n * n;
    let want: Vec<f64> = (0..r)
        .flat_map(|row| {
            let m = &ms[row * width..(row + 1) * width];
            merge_reference(
                &xs[row * n * c..(row + 1) * n * c],
                &m[..n],
                &m[n..],
                &fs[row * c..(row + 1) * c],
                n,
            )
        })
        .collect();
    assert!(rel_err(&got, &tensor(want, &[r, n, c])) < 1e-12);
    let got32 = StreamMerge::apply(
        &x.as_tensor().to_dtype(DType::F32).unwrap(),
        &mixes.as_tensor().to_dtype(DType::F32).unwrap(),
        &f.as_tensor().to_dtype(DType::F32).unwrap(),
    )
    .unwrap();
    assert!(rel_err(&got32, &got) < 1e-5);
    let vars = vec![
        ("x".to_string(), x.clone()),
        ("mixes".to_string(), mixes.clone()),
        ("f".to_string(), f.clone()),
    ];
    check_gradients(
        &vars,
        || {
            probe(
                &StreamMerge::apply(x.as_tensor(), mixes.as_tensor(), f.as_tensor()).unwrap(),
                16,
            )
        },
        20,
    );
    // Shapes that do not fit are errors.
    assert!(StreamMerge::apply(x.as_tensor(), w.as_tensor(), f.as_tensor()).is_err());
    assert!(StreamCollapse::apply(x.as_tensor(), f.as_tensor()).is_err());
}

/// A causal selection (B, T, K) over S = T keys: query t picks up to K distinct
/// positions of 0..=t (drawn), the rest `NONE`.
fn causal_selection(b: usize, t: usize, k: usize, seed: u64) -> Vec<u32> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut idx = Vec::with_capacity(b * t * k);
    for _ in 0..b {
        for q in 0..t {
            let mut visible: Vec<u32> = (0..=q as u32).collect();
            visible.shuffle(&mut rng);
            visible.resize(k.max(visible.len()), NONE);
            idx.extend_from_slice(&visible[..k]);
        }
    }
    idx
}

#[test]
fn selected_scores_match_the_reference_and_finite_differences() {
    let (b, t, h, di, k) = (2usize, 9usize, 3usize, 5usize, 4usize);
    let idx = causal_selection(b, t, k, 21);
    assert!(
        idx.contains(&NONE),
        "the first queries see fewer than K positions"
    );
    let q = var(&[b, t, h, di], 22, 1.0);
    let w = var(&[b, t, h], 23, 1.0);
    let keys = var(&[b, t, di], 24, 1.0);
    for act in [ScoreAct::Relu, ScoreAct::Identity] {
        let relu = matches!(act, ScoreAct::Relu);
        let op = SelectedScores {
            act,
            idx: Arc::new(idx.clone()),
            k,
        };
        let (qt, wt, kt) = (q.as_tensor(), w.as_tensor(), keys.as_tensor());
        let want = sparrow::kernels::reference::selected_scores(relu, qt, wt, kt, &idx, k).unwrap();
        let got = op.apply(qt, wt, kt).unwrap();
        assert_eq!(got.dims(), &[b, t, k]);
        assert!(rel_err(&got, &want) < 1e-12, "{act:?}");
        // f32 as the trainer runs it.
        let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let got32 = op.apply(&f(qt), &f(wt), &f(kt)).unwrap();
        assert!(rel_err(&got32, &want) < 1e-5, "{act:?} f32");
        // Gradients: the reference's autograd, then finite differences.
        let g_ref = probe(&want, 25).backward().unwrap();
        let g_op = probe(&got, 25).backward().unwrap();
        for (name, v) in [("q", &q), ("w", &w), ("keys", &keys)] {
            let (a, e) = (
                g_op.get(v.as_tensor()).unwrap(),
                g_ref.get(v.as_tensor()).unwrap(),
            );
            assert!(rel_err(a, e) < 1e-12, "{act:?} d{name}");
        }
        let vars = vec![
            ("q".to_string(), q.clone()),
            ("w".to_string(), w.clone()),
            ("keys".to_string(), keys.clone()),
        ];
        check_gradients(
            &vars,
            || {
                probe(
                    &op.apply(q.as_tensor(), w.as_tensor(), keys.as_tensor())
                        .unwrap(),
                    26,
                )
            },
            25,
        );
    }
    // A position past the keys is an error, not a read out of bounds.
    let mut bad = idx.clone();
    bad[5] = t as u32;
    let op = SelectedScores {
        act: ScoreAct::Relu,
        idx: Arc::new(bad),
        k,
    };
    let e = op
        .apply(q.as_tensor(), w.as_tensor(), keys.as_tensor())
        .unwrap_err()
        .to_string();
    assert!(e.contains("past the"), "{e}");
}

#[test]
fn rms_norm_matches_its_reference_and_finite_differences() {
    let x = var(&[3, 5, 11], 31, 2.0);
    let w = var(&[11], 32, 1.0);
    let op = WeightedRmsNorm { eps: 1e-5 };
    let want = sparrow::kernels::reference::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
    let got = op.apply(x.as_tensor(), w.as_tensor()).unwrap();
    assert_eq!(got.dims(), &[3, 5, 11]);
    assert!(rel_err(&got, &want) < 1e-12);
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    assert!(
        rel_err(
            &op.apply(&f(x.as_tensor()), &f(w.as_tensor())).unwrap(),
            &want
        ) < 1e-5
    );
    let (g_ref, g_op) = (
        probe(&want, 33).backward().unwrap(),
        probe(&got, 33).backward().unwrap(),
    );
    for v in [&x, &w] {
        let (a, e) = (
            g_op.get(v.as_tensor()).unwrap(),
            g_ref.get(v.as_tensor()).unwrap(),
        );
        assert!(rel_err(a, e) < 1e-10);
    }
    let vars = vec![("x".to_string(), x.clone()), ("w".to_string(), w.clone())];
    check_gradients(
        &vars,
        || probe(&op.apply(x.as_tensor(), w.as_tensor()).unwrap(), 34),
        25,
    );
    assert!(op
        .apply(x.as_tensor(), &randn(&[10], 1, DType::F64))
        .is_err());
}

#[test]
fn const_weight_matmul_matches_matmul_and_leaves_the_weight_without_gradient() {
    let x = var(&[13, 7], 41, 1.0);
    let w = randn(&[5, 7], 42, DType::F64);
    let op = ConstWeightMatmul::new(&w).unwrap();
    let got = op.apply(x.as_tensor()).unwrap();
    let want = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
    assert!(rel_err(&got, &want) < 1e-12);
    let grads = probe(&got, 43).backward().unwrap();
    let want_dx = probe(&want, 43).backward().unwrap();
    assert!(
        rel_err(
            grads.get(x.as_tensor()).unwrap(),
            want_dx.get(x.as_tensor()).unwrap()
        ) < 1e-12
    );
    assert!(grads.get(&w).is_none());
    let vars = vec![("x".to_string(), x.clone())];
    check_gradients(&vars, || probe(&op.apply(x.as_tensor()).unwrap(), 44), 20);
    assert!(op.apply(&randn(&[3, 6], 45, DType::F64)).is_err());
}

#[test]
fn kernels_refuse_other_dtypes_with_an_error_naming_the_op() {
    let dev = Device::Cpu;
    let x = Tensor::ones((3, 5), DType::F32, &dev).unwrap();
    let norm = WeightedRmsNorm { eps: 1e-5 };
    // Mixed dtypes: the second operand is not the first's.
    let w64 = Tensor::ones(5, DType::F64, &dev).unwrap();
    let err = norm.apply(&x, &w64).unwrap_err().to_string();
    assert!(
        err.contains("rms-norm") && err.contains("expected F32, got F64"),
        "{err}"
    );
    // A dtype no kernel runs in.
    let (x16, w16) = (
        x.to_dtype(DType::F16).unwrap(),
        w64.to_dtype(DType::F16).unwrap(),
    );
    let err = norm.apply(&x16, &w16).unwrap_err().to_string();
    assert!(
        err.contains("rms-norm") && err.contains("unsupported dtype F16"),
        "{err}"
    );
    let err = SwiGlu { limit: None }.apply(&x, &x.to_dtype(DType::F64).unwrap());
    let err = err.unwrap_err().to_string();
    assert!(
        err.contains("swiglu") && err.contains("expected F32, got F64"),
        "{err}"
    );
    // And the same dtypes still run.
    let y = norm.apply(&x, &w64.to_dtype(DType::F32).unwrap()).unwrap();
    assert_eq!(y.dims(), &[3, 5]);
}
