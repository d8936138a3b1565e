//! The portable builds of the hand-written kernels (no AVX2, no AVX-512), forced on in
//! this test binary (its own process: the cap is process-wide), against the same
//! references as the fast paths.

mod common;
#[path = "kernel_checks/mod.rs"]
mod kernel_checks;
use sparrow::kernels::simd::{self, Level};

#[test]
fn portable_paths_match_the_references() {
    assert!(kernel_checks::all_at(Level::Portable));
    assert!(!simd::has_avx512() && !simd::has_avx2_fma());
}
