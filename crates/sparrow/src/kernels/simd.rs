//! Helpers shared by the hand-written kernels: a vectorisable `exp`, and run-time
//! detection of the instruction sets ([`Level`]: AVX-512, AVX2 + FMA + F16C, portable)
//! so hot loops get compiled for each and the binary stays portable; a process-wide
//! cap ([`set_max_level`]) lets tests run the narrower paths on wider machines.

use std::sync::atomic::{AtomicU8, Ordering};

/// The instruction sets the kernels choose between, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Plain Rust for the baseline target (SSE2 on x86-64).
    Portable,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512F (and VNNI where the quantized kernel finds it).
    Avx512,
}

static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Avx512 as u8);

/// Let no kernel use more than `level` from now on, process-wide (tests of the
/// narrower paths on machines that have the wider ones; each such test runs in its
/// own test binary, since the setting is global).
pub fn set_max_level(level: Level) {
    MAX_LEVEL.store(level as u8, Ordering::SeqCst);
}

/// The widest level this CPU runs, within [`set_max_level`]'s cap.
pub fn level() -> Level {
    if has_avx512() {
        Level::Avx512
    } else if has_avx2_fma() {
        Level::Avx2
    } else {
        Level::Portable
    }
}

fn allowed(level: Level) -> bool {
    MAX_LEVEL.load(Ordering::Relaxed) >= level as u8
}

/// Whether this CPU runs AVX-512F code (checked once, cached by std), within the cap.
#[inline]
pub fn has_avx512() -> bool {
    if !allowed(Level::Avx512) {
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

/// Whether this CPU runs AVX2 with FMA and F16C (within the cap).
#[inline]
pub fn has_avx2_fma() -> bool {
    if !allowed(Level::Avx2) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
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

/// `e^x` of 16 lanes: [`fast_exp`]'s range reduction and polynomial in AVX-512 (with
/// fused multiply-adds, so its bits may differ from the scalar one's in the last place).
/// Inputs below -87 give e^-87 (~1.6e-38), not 0: callers mask the lanes that must be 0.
///
/// # Safety
/// The CPU must have AVX-512F, and the caller must be compiled with it enabled (the
/// function is always inlined into its caller).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn exp512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: register-only AVX-512F arithmetic; the caller guarantees AVX-512F.
    unsafe {
        let x = _mm512_max_ps(
            _mm512_min_ps(x, _mm512_set1_ps(88.0)),
            _mm512_set1_ps(-87.0),
        );
        let n = _mm512_roundscale_ps(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
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
