//! The AVX2 + FMA build of the f32 weight kernel's tile ([`super::matmul`]): C weight
//! rows against R input rows, each (weight, input) pair summed into 16 lane-wise
//! partial sums (lane l sums the products at i = l mod 16, in k order, up to `full`, a
//! multiple of 16; each a product then a sum, as the portable loop has them). The
//! caller finishes the lanes in order as [`super::dot`] does, so its sums are the bits
//! of its 16-lane (portable, AVX-512) builds. [`Widen8`] also serves the f16 / bf16
//! kernel ([`super::hmatmul`]), which widens eight weights at a time the same way.
//!
//! AVX2 has 16 registers of 8 lanes, so the 16 lanes are two halves. Small tiles keep
//! both halves' accumulators live and walk k once; larger ones (the AVX-512 tile's
//! 4 x 4 would need 32 accumulators and spill) walk k once per half, C x R
//! accumulators at a time: the same additions in the same order either way.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// A weight element type the tile widens to f32, eight at a time.
pub trait Widen8: Copy {
    type Elem: Copy;
    /// The eight values at `p` as f32.
    ///
    /// # Safety
    /// AVX2 and F16C enabled; `p` points at eight readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen8(p: *const Self::Elem) -> __m256;
}

/// f32 weights (loaded as they are).
#[derive(Clone, Copy)]
pub struct F32Row;
/// IEEE half weights (`vcvtph2ps`).
#[derive(Clone, Copy)]
pub struct F16Row;
/// bfloat16 weights (the upper half of an f32).
#[derive(Clone, Copy)]
pub struct Bf16Row;

impl Widen8 for F32Row {
    type Elem = f32;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(p: *const f32) -> __m256 {
        // SAFETY: the caller's contract (eight readable values, AVX enabled).
        unsafe { _mm256_loadu_ps(p) }
    }
}

impl Widen8 for F16Row {
    type Elem = u16;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(p: *const u16) -> __m256 {
        // SAFETY: the caller's contract (eight readable values, F16C enabled).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

impl Widen8 for Bf16Row {
    type Elem = u16;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(p: *const u16) -> __m256 {
        // SAFETY: the caller's contract (eight readable values, AVX2 enabled).
        unsafe {
            let raw = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
        }
    }
}

/// `acc + w * x` as a product then a sum (the order of the portable loop).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn madd(w: __m256, x: __m256, acc: __m256) -> __m256 {
    // SAFETY: register-only arithmetic; the caller enabled AVX.
    unsafe { _mm256_add_ps(acc, _mm256_mul_ps(w, x)) }
}

/// Whether a C x R tile keeps both halves' accumulators in registers (and walks k
/// once) rather than walking k once per half.
const fn both_halves_fit(c: usize, r: usize) -> bool {
    2 * c * r <= 12
}

/// One 8-lane step at offset `at` of every (weight, input) pair into `acc`.
///
/// # Safety
/// As [`lanes`]: the features enabled, eight readable values at `at` in every row.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // r also picks the input's register
unsafe fn step<W: Widen8, const C: usize, const R: usize>(
    w: [*const W::Elem; C],
    x: [*const f32; R],
    at: usize,
    acc: &mut [[__m256; R]; C],
) {
    // SAFETY: the caller's contract.
    unsafe {
        let mut xv = [_mm256_setzero_ps(); R];
        for r in 0..R {
            xv[r] = _mm256_loadu_ps(x[r].add(at));
        }
        for c in 0..C {
            let wv = W::widen8(w[c].add(at));
            for r in 0..R {
                acc[c][r] = madd(wv, xv[r], acc[c][r]);
            }
        }
    }
}

/// Half `h`'s accumulators into lanes `8h..8h + 8` of `out`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_half<const C: usize, const R: usize>(
    out: &mut [[[f32; 16]; R]; C],
    acc: &[[__m256; R]; C],
    h: usize,
) {
    for c in 0..C {
        for r in 0..R {
            // SAFETY: writes lanes 8h..8h + 8 (h < 2) of a 16-lane array.
            unsafe { _mm256_storeu_ps(out[c][r].as_mut_ptr().add(8 * h), acc[c][r]) };
        }
    }
}

/// `out[c][r][l]` = sum over i < `full`, i = l mod 16, of w_c[i] x_r[i], each lane in
/// k order (products then sums).
///
/// # Safety
/// AVX2, FMA and F16C must be available; `full` is a multiple of 16 and every `w[c]`
/// and `x[r]` points at `full` readable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // the indices also pick load offsets and halves
pub unsafe fn lanes<W: Widen8, const C: usize, const R: usize>(
    w: [*const W::Elem; C],
    x: [*const f32; R],
    full: usize,
) -> [[[f32; 16]; R]; C] {
    let mut out = [[[0f32; 16]; R]; C];
    // SAFETY: every load reads eight values at an offset i + 8 <= full of a row holding
    // `full` values (the caller's contract); the stores write `out`'s own arrays.
    unsafe {
        if both_halves_fit(C, R) {
            // acc[h]: the accumulators of half h.
            let mut acc = [[[_mm256_setzero_ps(); R]; C]; 2];
            let mut i0 = 0;
            while i0 < full {
                step::<W, C, R>(w, x, i0, &mut acc[0]);
                step::<W, C, R>(w, x, i0 + 8, &mut acc[1]);
                i0 += 16;
            }
            for (h, half) in acc.iter().enumerate() {
                store_half(&mut out, half, h);
            }
        } else {
            for h in 0..2 {
                let mut acc = [[_mm256_setzero_ps(); R]; C];
                let mut at = 8 * h;
                while at < full {
                    step::<W, C, R>(w, x, at, &mut acc);
                    at += 16;
                }
                store_half(&mut out, &acc, h);
            }
        }
    }
    out
}
