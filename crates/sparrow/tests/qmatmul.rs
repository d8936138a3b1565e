//! Quantized-weight products (`kernels::qmatmul`) against their plain reference, on
//! fresh random inputs of awkward sizes, for every native type, on the widest path the
//! CPU has (VNNI, else AVX2); the narrower paths run the same checks in
//! `avx2_kernels.rs` and `portable_kernels.rs`.

mod common;
#[path = "kernel_checks/mod.rs"]
mod kernel_checks;
use sparrow::formats::ggml::{quantize_q8_0, GgmlType};
use sparrow::kernels::qmatmul::QMatrix;

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
