//! Machine reference measurements (the baselines our kernels are reported against).

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

/// candle f32 matmul of two n x n matrices: median of repeated calls after warm-up.
pub fn gemm_f32(n: usize) -> Result<GemmResult> {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
    let _ = a.matmul(&b)?; // warm-up
    let flops = 2.0 * (n as f64).powi(3);
    let reps = ((2e10 / flops) as usize).clamp(3, 200);
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        std::hint::black_box(&c);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|x, y| x.total_cmp(y));
    let secs = times[times.len() / 2];
    Ok(GemmResult {
        gflops: flops / secs / 1e9,
        secs,
    })
}
