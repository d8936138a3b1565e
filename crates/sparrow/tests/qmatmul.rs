//! Quantized-weight products (`kernels::qmatmul`) against their plain reference, on
//! fresh random inputs of awkward sizes, for every native type, on the widest path the
//! CPU has (VNNI, else AVX2); the narrower paths run the same checks in
//! `avx2_kernels.rs` and `portable_kernels.rs`.

mod common;
#[path = "kernel_checks/mod.rs"]
mod kernel_checks;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparrow::formats::ggml::{quantize_q8_0, GgmlType};
use sparrow::formats::gguf_model::reorder_qk_rows;
use sparrow::kernels::qmatmul::{qxwt, QMatrix, RowOrder};

#[test]
fn quantized_products_match_the_reference() {
    kernel_checks::quantized_products(12);
}

#[test]
fn extreme_q8_0_weights_and_activations_do_not_saturate() {
    kernel_checks::extreme_q8_0_weights_and_activations_do_not_saturate();
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

/// A GGUF file's Q / K matrix read in place through llama.cpp's row order is the same
/// matrix as its reordered copy: equal products (bit for bit) and rows.
#[test]
fn matrices_read_through_the_gguf_rope_order_equal_their_reordered_copies() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        for (heads, head_dim, cols, m) in [(3, 10, 96, 3), (2, 4, 32, 1), (4, 64, 64, 5)] {
            let rows = heads * head_dim;
            let hf = kernel_checks::random_blocks(&mut rng, ty, rows, cols);
            let row_bytes = hf.len() / rows;
            let gguf = reorder_qk_rows(&hf, rows, row_bytes, heads, true);
            assert_ne!(gguf, hf, "the orders differ for {rows} rows");
            let plain = QMatrix::new(ty, rows, cols, hf).unwrap();
            let stored = QMatrix::new(ty, rows, cols, gguf)
                .unwrap()
                .with_row_order(RowOrder::GgufRope { head_dim })
                .unwrap();
            let x: Vec<f32> = (0..m * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
            let (a, b) = (qxwt(&x, m, &plain), qxwt(&x, m, &stored));
            assert!(
                a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{} {rows}x{cols}: products differ",
                ty.name()
            );
            assert_eq!(plain.dequantize(), stored.dequantize(), "{}", ty.name());
        }
    }
    let w = QMatrix::new(GgmlType::Q8_0, 6, 32, vec![0; 6 * 34]).unwrap();
    for head_dim in [0, 3, 4] {
        assert!(
            w.clone()
                .with_row_order(RowOrder::GgufRope { head_dim })
                .is_err(),
            "head size {head_dim} of 6 rows"
        );
    }
}
