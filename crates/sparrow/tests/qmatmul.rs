//! Quantized-weight products (`kernels::qmatmul`) against their plain reference, on
//! fresh random inputs of awkward sizes, for every native type, on the widest path the
//! CPU has (VNNI, else AVX2) and the portable one.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparrow::formats::ggml::{quantize_q8_0, GgmlType};
use sparrow::kernels::qmatmul::{qxwt, reference, QMatrix};

/// Random blocks of `ty`: random nibbles / int8 values with small finite scales.
fn random_matrix(rng: &mut ChaCha8Rng, ty: GgmlType, rows: usize, cols: usize) -> QMatrix {
    let nb = rows * cols / 32;
    let mut data = Vec::with_capacity(nb * ty.block_bytes());
    for _ in 0..nb {
        let mut block: Vec<u8> = (0..ty.block_bytes()).map(|_| rng.random()).collect();
        let d = half::f16::from_f32(rng.random_range(-0.02..0.02));
        block[..2].copy_from_slice(&d.to_le_bytes());
        if ty == GgmlType::Q4_1 {
            let m = half::f16::from_f32(rng.random_range(-0.1..0.1));
            block[2..4].copy_from_slice(&m.to_le_bytes());
        }
        data.extend(block);
    }
    QMatrix::new(ty, rows, cols, data).unwrap()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    let scale = b.iter().fold(0f64, |m, y| m.max(y.abs() as f64));
    diff / scale.max(1e-30)
}

fn check_all(portable: bool) {
    sparrow::kernels::simd::force_portable(portable);
    let mut rng = ChaCha8Rng::seed_from_u64(if portable { 11 } else { 12 });
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        for (m, rows, cols) in [
            (1, 1, 32),
            (3, 7, 96),
            (5, 65, 544),
            (33, 130, 64),
            (2, 200, 1536),
        ] {
            let w = random_matrix(&mut rng, ty, rows, cols);
            let x: Vec<f32> = (0..m * cols).map(|_| rng.random_range(-3.0..3.0)).collect();
            let got = qxwt(&x, m, &w);
            let want = reference(&x, m, &w);
            let err = rel_err(&got, &want);
            assert!(
                err < 2e-6,
                "{} {m}x{cols} * {rows}: rel err {err:e} (portable {portable})",
                ty.name()
            );
            // Within quantization error of the f32 product with the dequantized weight.
            let wf = w.dequantize();
            let exact: Vec<f32> = (0..m)
                .flat_map(|r| {
                    let (x, wf) = (&x, &wf);
                    (0..rows).map(move |c| {
                        (0..cols)
                            .map(|i| x[r * cols + i] * wf[c * cols + i])
                            .sum::<f32>()
                    })
                })
                .collect();
            let err = rel_err(&got, &exact);
            // (Q4_1 carries the f16-rounded activation sums of ggml's Q8_1 blocks.)
            assert!(err < 0.1, "{}: {err:e} from the f32 product", ty.name());
            // Batch invariance: each row alone gives the same bits as in the batch.
            for r in [0, m - 1] {
                let alone = qxwt(&x[r * cols..(r + 1) * cols], 1, &w);
                assert_eq!(
                    alone,
                    got[r * rows..(r + 1) * rows],
                    "{} row {r}",
                    ty.name()
                );
            }
        }
    }
    sparrow::kernels::simd::force_portable(false);
}

#[test]
fn quantized_products_match_the_reference() {
    check_all(false);
    check_all(true);
}

#[test]
fn q8_0_rows_round_trip_and_bad_sizes_are_refused() {
    let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) / 7.0).collect();
    let w = QMatrix::new(GgmlType::Q8_0, 2, 32, quantize_q8_0(&x)).unwrap();
    let mut row = vec![0f32; 32];
    w.dequantize_row(1, &mut row);
    for (a, b) in row.iter().zip(&x[32..]) {
        assert!((a - b).abs() < 0.03, "{a} vs {b}");
    }
    assert!(QMatrix::new(GgmlType::Q8_0, 2, 32, vec![0; 10]).is_err());
    assert!(QMatrix::new(GgmlType::Q8_0, 1, 33, vec![0; 34]).is_err());
    assert!(QMatrix::new(GgmlType::Q6K, 1, 256, vec![0; 210]).is_err());
}

#[test]
fn extreme_q8_0_weights_and_activations_do_not_saturate() {
    // Every weight byte -128 against activations at +-127 after quantization: the
    // largest 16-bit pair sums any int8 path forms (2 * 128 * 127 = 32512).
    let (rows, cols) = (3, 64);
    let mut data = Vec::new();
    for _ in 0..rows * cols / 32 {
        data.extend(half::f16::from_f32(0.01).to_le_bytes());
        data.extend([0x80u8; 32]);
    }
    let w = QMatrix::new(GgmlType::Q8_0, rows, cols, data).unwrap();
    for sign in [1.0f32, -1.0] {
        let x = vec![sign * 2.0; 2 * cols];
        let got = qxwt(&x, 2, &w);
        let want = reference(&x, 2, &w);
        assert!(
            rel_err(&got, &want) < 2e-6,
            "sign {sign}: {got:?} vs {want:?}"
        );
    }
}
