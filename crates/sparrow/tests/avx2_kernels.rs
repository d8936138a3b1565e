//! The AVX2 + FMA + F16C builds of the hand-written kernels, run in this test binary
//! (its own process: the cap is process-wide) even on machines that have AVX-512,
//! against the same references; and the sums the kernels promise to keep across
//! instruction sets compared bit for bit: the f32 and the f16 / bf16 products on every
//! level.

mod common;
#[path = "kernel_checks/mod.rs"]
mod kernel_checks;
use sparrow::kernels::simd::{self, Level};

#[test]
fn avx2_paths_match_the_references_and_the_other_levels_bits() {
    let widest = simd::level();
    if widest < Level::Avx2 {
        eprintln!("this CPU has no AVX2 + FMA + F16C: nothing to check");
        return;
    }
    let (f32_wide, half_wide) = (
        kernel_checks::f32_products(),
        kernel_checks::half_products(),
    );
    assert!(kernel_checks::all_at(Level::Avx2));
    // The f32 product sums in the same order everywhere (products, then sums).
    assert!(
        kernel_checks::f32_products() == f32_wide,
        "f32: AVX2 vs {widest:?}"
    );
    // The f16 / bf16 product: one chain of fused multiply-adds per output on every
    // level (the AVX-512 panel's 16 lanes are two AVX2 halves; portable `mul_add`).
    assert!(
        kernel_checks::half_products() == half_wide,
        "half: AVX2 vs {widest:?}"
    );
    simd::set_max_level(Level::Portable);
    assert!(
        kernel_checks::f32_products() == f32_wide,
        "f32: portable vs {widest:?}"
    );
    assert!(
        kernel_checks::half_products() == half_wide,
        "half: portable vs {widest:?}"
    );
    simd::set_max_level(Level::Avx512);
}
