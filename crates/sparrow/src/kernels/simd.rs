//! Helpers shared by the hand-written kernels: a vectorisable `exp`, and runtime
//! detection of AVX-512 so hot loops written as plain lane-wise Rust get compiled once
//! for the baseline target and once with AVX-512 enabled (the binary stays portable).

use std::sync::atomic::{AtomicBool, Ordering};

static FORCE_PORTABLE: AtomicBool = AtomicBool::new(false);

/// Run every kernel on its portable path from now on (tests of the fallback code on
/// machines that have AVX-512).
pub fn force_portable(on: bool) {
    FORCE_PORTABLE.store(on, Ordering::SeqCst);
}

/// Whether this CPU runs AVX-512F code (checked once, cached by std), unless
/// [`force_portable`] is on.
#[inline]
pub fn has_avx512() -> bool {
    if FORCE_PORTABLE.load(Ordering::Relaxed) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs AVX2 with FMA (unless [`force_portable`] is on).
#[inline]
pub fn has_avx2_fma() -> bool {
    if FORCE_PORTABLE.load(Ordering::Relaxed) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `e^x` for f32 without a libm call, so loops over it vectorise: x = n ln2 + r with
/// |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n by building the exponent bits.
/// Relative error below 3e-7 on [-87, 88]; returns 0 below -87 (softmax masking uses
/// -inf, which maps to 0 too).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E).round();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor coefficients 1/k! up to k = 6 (error < 2.5e-7 for |r| <= 0.347).
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    let y = p * f32::from_bits(bits);
    if x <= -87.0 {
        0.0
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::fast_exp;

    #[test]
    fn fast_exp_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -86.5f32;
        while x < 87.5 {
            let want = (x as f64).exp();
            let got = fast_exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(-1000.0), 0.0);
    }
}
