//! Machine reference measurements (the baselines our kernels are reported against) and
//! the kernel benchmarks of `sparrow bench`.
//!
//! - [`gemm_f32`]: candle's f32 GEMM throughput.
//! - [`read_bandwidth`]: DRAM read bandwidth of a parallel streaming sum.
//! - [`attention`]: one attention layer, dense vs DSA, decode and prefill by context.
//! - [`moe`]: one MoE layer vs a dense FFN of equal active FLOPs.
//! - [`weights`]: one linear layer's inference product per weight format.
//! - [`pool`]: the cost of one parallel call, the kernels' thread team vs rayon.
//! - [`generate`]: the whole model through the engine's batched step, the model's own
//!   selectors vs dense selectors, by context and batch size.

pub mod attention;
pub mod generate;
pub mod moe;
pub mod pool;
pub mod v4_layers;
pub mod weights;

use crate::error::Result;
use candle_core::{Device, Tensor};
use std::time::Instant;

/// One throughput measurement.
#[derive(Debug, Clone, Copy)]
pub struct GemmResult {
    pub gflops: f64,
    /// Median seconds per call.
    pub secs: f64,
}

/// Median seconds of `reps` (>= 1) timed calls of `f` (callers warm up first).
pub(crate) fn median_secs(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Median seconds of `f` after a warm-up call, over repetitions filling about `budget`
/// seconds (at least 5, at most 2000).
pub(crate) fn time_median(budget: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let t0 = Instant::now();
    f()?;
    let one = t0.elapsed().as_secs_f64().max(1e-7);
    let reps = ((budget / one) as usize).clamp(5, 2000);
    median_secs(reps, f)
}

/// candle f32 matmul of two n x n matrices: median of repeated calls after warm-up.
pub fn gemm_f32(n: usize) -> Result<GemmResult> {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
    let _ = a.matmul(&b)?; // warm-up
    let flops = 2.0 * (n as f64).powi(3);
    let reps = ((2e10 / flops) as usize).clamp(3, 200);
    let secs = median_secs(reps, || {
        std::hint::black_box(a.matmul(&b)?);
        Ok(())
    })?;
    Ok(GemmResult {
        gflops: flops / secs / 1e9,
        secs,
    })
}

#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0.0f32; L];
    let mut c = x.chunks_exact(L);
    for v in &mut c {
        for l in 0..L {
            acc[l] += v[l];
        }
    }
    acc.iter().sum::<f32>() + c.remainder().iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_lanes_avx512(x: &[f32]) -> f32 {
    sum_lanes(x)
}

pub(crate) fn sum_fast(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::simd::has_avx512() {
        // SAFETY: AVX-512F presence checked at run time; reads only `x`.
        return unsafe { sum_lanes_avx512(x) };
    }
    sum_lanes(x)
}

/// DRAM read bandwidth in GB/s: a streaming sum over `mib` MiB of f32 split over the
/// rayon threads; the best of repeated passes after a warm-up pass (the machine's
/// attainable rate, which kernels are compared against; single passes vary by up to 2x
/// on this shared machine).
pub fn read_bandwidth(mib: usize) -> f64 {
    use rayon::prelude::*;
    let n = mib * (1 << 20) / 4;
    let data: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let chunk = n
        .div_ceil(rayon::current_num_threads().max(1) * 8)
        .max(1 << 14);
    let pass = || -> f32 { data.par_chunks(chunk).map(sum_fast).sum() };
    std::hint::black_box(pass());
    let mut times: Vec<f64> = (0..15)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(pass());
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    (n * 4) as f64 / times[0] / 1e9
}
