//! Every hand-written kernel at the widest level this CPU runs when that is AVX-512
//! (its own test binary, as the AVX2 and portable ones), against the same references:
//! the AVX-512-only paths (the small-group decode scan, the lane scans, the f16 / f32
//! tiles, VNNI) over f32 and f16 caches on awkward sizes.

mod common;
#[path = "kernel_checks/mod.rs"]
mod kernel_checks;
use sparrow::kernels::simd::Level;

#[test]
fn avx512_paths_match_the_references() {
    if !kernel_checks::all_at(Level::Avx512) {
        eprintln!("this CPU has no AVX-512: nothing to check");
    }
}
