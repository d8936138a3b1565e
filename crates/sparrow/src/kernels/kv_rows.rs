//! How the attention kernels read a cache: `groups` key/value groups (the KV heads) of
//! `cap` rows each. Keys are `dk` wide, values `dv` wide; the values are either their
//! own rows or the first `dv` values of each key row. The second is the MLA latent
//! store (DeepSeek V2/V3): the absorbed key of a position is `[c ; k_rope]` and its
//! value is `c`, so one buffer of `r + dr` values per position serves both and the
//! latent is never stored twice.
//!
//! Rows are stored as f32 or as IEEE half ([`CacheElem`]: an f16 cache streams half the
//! bytes per decode step, as llama.cpp's default cache does). The kernels scan key
//! blocks ([`KvRows::block`]): f32 blocks are the cache's own rows, f16 blocks are
//! widened into a small f32 scratch that stays in the L1/L2 cache, so each kernel has
//! one f32 inner loop for every storage type.

use super::simd::has_avx2_fma;
use half::f16;

/// An element type the cache stores rows in.
pub trait CacheElem: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// Bytes per element.
    const BYTES: usize;
    /// `src` as f32: the slice itself (f32) or widened into `scratch` (f16).
    fn widen<'s>(src: &'s [Self], scratch: &'s mut Vec<f32>) -> &'s [f32];
    /// Append `src` widened to f32 to `dst`.
    fn extend_f32(src: &[Self], dst: &mut Vec<f32>);
    /// `dst[i] = src[i]` rounded to this type.
    fn narrow(src: &[f32], dst: &mut [Self]);
    /// The zero value.
    fn zero() -> Self;
    /// This value as f32.
    fn to_f32(self) -> f32;
    /// The eight values at `p` as f32 lanes.
    ///
    /// # Safety
    /// AVX and F16C enabled; `p` points at eight readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// The sixteen values at `p` as f32 lanes.
    ///
    /// # Safety
    /// AVX-512F enabled; `p` points at sixteen readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl CacheElem for f32 {
    const BYTES: usize = 4;
    #[inline]
    fn widen<'s>(src: &'s [f32], _scratch: &'s mut Vec<f32>) -> &'s [f32] {
        src
    }
    fn extend_f32(src: &[f32], dst: &mut Vec<f32>) {
        dst.extend_from_slice(src);
    }
    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn zero() -> Self {
        0.0
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's contract (eight readable values, AVX enabled).
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract (sixteen readable values, AVX-512F enabled).
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl CacheElem for f16 {
    const BYTES: usize = 2;
    #[inline]
    fn widen<'s>(src: &'s [f16], scratch: &'s mut Vec<f32>) -> &'s [f32] {
        // Grown once and then reused: no zeroing per block.
        if scratch.len() < src.len() {
            scratch.resize(src.len(), 0.0);
        }
        let dst = &mut scratch[..src.len()];
        widen_f16(src, dst);
        dst
    }
    fn extend_f32(src: &[f16], dst: &mut Vec<f32>) {
        let start = dst.len();
        dst.resize(start + src.len(), 0.0);
        widen_f16(src, &mut dst[start..]);
    }
    fn narrow(src: &[f32], dst: &mut [f16]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: F16C (with AVX2) was detected at run time.
            unsafe { narrow_f16c(src, dst) };
            return;
        }
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = f16::from_f32(x);
        }
    }
    fn zero() -> Self {
        f16::ZERO
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (eight readable values, F16C enabled).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (sixteen readable values, AVX-512F enabled).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

/// `dst[i] = src[i]` widened (`vcvtph2ps`, eight at a time, where the CPU has F16C).
fn widen_f16(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: F16C (with AVX2) was detected at run time.
        unsafe { widen_f16c(src, dst) };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// [`widen_f16`] with F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
fn widen_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let mut i = 0;
    // SAFETY: each step reads src[i..i + 8] and writes dst[i..i + 8], i + 8 <= n.
    unsafe {
        while i + 8 <= n {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
    }
    for j in i..n {
        dst[j] = src[j].to_f32();
    }
}

/// `dst[i] = src[i]` rounded to half (to nearest even, as `f16::from_f32`), with F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
fn narrow_f16c(src: &[f32], dst: &mut [f16]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let mut i = 0;
    // SAFETY: each step reads src[i..i + 8] and writes dst[i..i + 8], i + 8 <= n.
    unsafe {
        while i + 8 <= n {
            let x = _mm256_loadu_ps(src.as_ptr().add(i));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
            _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
            i += 8;
        }
    }
    for j in i..n {
        dst[j] = f16::from_f32(src[j]);
    }
}

/// Where a cache's values are.
#[derive(Debug, Clone, Copy)]
pub enum Values<'a, E = f32> {
    /// Their own rows, (groups, cap, dv).
    Separate(&'a [E]),
    /// The first `dv` values of each key row.
    KeyPrefix,
}

/// A cache's keys and values as the kernels scan them.
#[derive(Debug, Clone, Copy)]
pub struct KvRows<'a, E = f32> {
    /// (groups, cap, dk)
    pub k: &'a [E],
    pub values: Values<'a, E>,
    pub groups: usize,
    /// Rows per group (positions the buffer holds; only the visible ones are read).
    pub cap: usize,
    pub dk: usize,
    pub dv: usize,
}

/// The f32 scratch of one scan: an f16 block's keys and values widened.
#[derive(Debug, Default)]
pub struct BlockScratch {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Rows `s0..s0 + n` of one group as f32: keys (n, dk) and values, row j at
/// `v[j * vs..j * vs + dv]`.
pub struct Block<'s> {
    pub k: &'s [f32],
    pub v: &'s [f32],
    pub vs: usize,
}

impl<'a, E: CacheElem> KvRows<'a, E> {
    /// Keys and values in separate (groups, cap, d) buffers.
    pub fn separate(k: &'a [E], v: &'a [E], groups: usize, d: usize) -> Self {
        Self {
            k,
            values: Values::Separate(v),
            groups,
            cap: k.len() / (groups * d).max(1),
            dk: d,
            dv: d,
        }
    }

    /// One group of `dk`-wide key rows whose first `dv` values are the value.
    pub fn key_prefix(k: &'a [E], dk: usize, dv: usize) -> Self {
        Self {
            k,
            values: Values::KeyPrefix,
            groups: 1,
            cap: k.len() / dk.max(1),
            dk,
            dv,
        }
    }

    /// Panics unless the buffers hold (groups, cap, width) rows: the kernels' entry
    /// check (a size mismatch is a bug of the caller, never user input).
    pub fn check(&self) {
        assert!(self.groups > 0, "attention: no KV groups");
        assert_eq!(
            self.k.len(),
            self.groups * self.cap * self.dk,
            "attention: keys are not (groups, cap, dk)"
        );
        match self.values {
            Values::Separate(v) => assert_eq!(
                v.len(),
                self.groups * self.cap * self.dv,
                "attention: values are not (groups, cap, dv)"
            ),
            Values::KeyPrefix => assert!(self.dv <= self.dk, "attention: value wider than key"),
        }
    }

    /// The value buffer and the distance between consecutive value rows.
    #[inline(always)]
    pub fn value_buffer(&self) -> (&'a [E], usize) {
        match self.values {
            Values::Separate(v) => (v, self.dv),
            Values::KeyPrefix => (self.k, self.dk),
        }
    }

    /// Group `g` alone (groups = 1).
    #[inline(always)]
    pub fn group(&self, g: usize) -> KvRows<'a, E> {
        let k = &self.k[g * self.cap * self.dk..(g + 1) * self.cap * self.dk];
        let values = match self.values {
            Values::Separate(v) => {
                Values::Separate(&v[g * self.cap * self.dv..(g + 1) * self.cap * self.dv])
            }
            Values::KeyPrefix => Values::KeyPrefix,
        };
        KvRows {
            k,
            values,
            groups: 1,
            ..*self
        }
    }

    /// Key row `s` of group 0.
    #[inline(always)]
    pub fn key(&self, s: usize) -> &'a [E] {
        &self.k[s * self.dk..(s + 1) * self.dk]
    }

    /// Value row `s` of group 0.
    #[inline(always)]
    pub fn value(&self, s: usize) -> &'a [E] {
        let (v, stride) = self.value_buffer();
        &v[s * stride..s * stride + self.dv]
    }

    /// Rows `s0..s0 + n` of group 0 as f32 (widened into `scratch` unless stored so).
    #[inline]
    pub fn block<'s>(&'s self, s0: usize, n: usize, scratch: &'s mut BlockScratch) -> Block<'s> {
        let (dk, dv) = (self.dk, self.dv);
        let BlockScratch { k: ks, v: vs_buf } = scratch;
        let k = E::widen(&self.k[s0 * dk..(s0 + n) * dk], ks);
        match self.values {
            Values::Separate(v) => Block {
                k,
                v: E::widen(&v[s0 * dv..(s0 + n) * dv], vs_buf),
                vs: dv,
            },
            Values::KeyPrefix => Block { k, v: k, vs: dk },
        }
    }

    /// Pointer to element `at` of the key buffer as bytes (software prefetch; never
    /// dereferenced, so it may point past the end).
    #[inline(always)]
    pub fn key_bytes_at(&self, at: usize) -> *const i8 {
        (self.k.as_ptr() as *const i8).wrapping_add(at * E::BYTES)
    }

    /// As [`Self::key_bytes_at`] for the value buffer.
    #[inline(always)]
    pub fn value_bytes_at(&self, at: usize) -> *const i8 {
        let (v, _) = self.value_buffer();
        (v.as_ptr() as *const i8).wrapping_add(at * E::BYTES)
    }
}
