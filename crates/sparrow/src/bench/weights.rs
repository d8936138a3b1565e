//! `sparrow bench weights`: one linear layer's inference product, `Linear::infer` (the
//! call every projection, FFN and LM head of the engine's step makes), for each weight
//! format at decode and small-batch sizes. Enough copies of the layer are cycled
//! through that the weights stream from memory as a whole model's do, and each row is
//! reported against the read bandwidth and candle's f32 GEMM rate measured in the same
//! run: a batch-1 product should stream its weight bytes near the bandwidth, a batch-16
//! one compute near the GEMM rate.

use crate::error::{Error, Result};
use crate::formats::ggml::{quantize_q4_1, quantize_q8_0, GgmlType};
use crate::kernels::hmatmul::{HalfKind, HalfMatrix};
use crate::kernels::qmatmul::QMatrix;
use crate::model::linear::{Linear, LinearWeight};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::sync::Arc;

/// A weight format `bench weights` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchFormat {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_1,
}

impl BenchFormat {
    pub const ALL: [BenchFormat; 5] = [
        BenchFormat::F32,
        BenchFormat::F16,
        BenchFormat::Bf16,
        BenchFormat::Q8_0,
        BenchFormat::Q4_1,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BenchFormat::F32 => "f32",
            BenchFormat::F16 => "f16",
            BenchFormat::Bf16 => "bf16",
            BenchFormat::Q8_0 => "q8_0",
            BenchFormat::Q4_1 => "q4_1",
        }
    }

    /// The format named `s` (`f32`, `f16`, `bf16`, `q8_0`, `q4_1`).
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown weight format `{s}` (expected f32, f16, bf16, q8_0 or q4_1)"
                ))
            })
    }

    /// `values` (rows x cols, row-major) held in this format.
    fn weight(self, rows: usize, cols: usize, values: &[f32]) -> Result<LinearWeight> {
        let quantized = |ty: GgmlType, bytes: Vec<u8>| -> Result<LinearWeight> {
            let q = QMatrix::new(ty, rows, cols, bytes).map_err(Error::Invalid)?;
            Ok(LinearWeight::Quantized(Arc::new(q)))
        };
        Ok(match self {
            BenchFormat::F32 => {
                LinearWeight::Dense(Tensor::from_slice(values, (rows, cols), &Device::Cpu)?)
            }
            BenchFormat::F16 | BenchFormat::Bf16 => {
                let kind = if self == BenchFormat::F16 {
                    HalfKind::F16
                } else {
                    HalfKind::Bf16
                };
                LinearWeight::Half(Arc::new(HalfMatrix::from_f32(kind, rows, cols, values)))
            }
            BenchFormat::Q8_0 => quantized(GgmlType::Q8_0, quantize_q8_0(values))?,
            BenchFormat::Q4_1 => quantized(GgmlType::Q4_1, quantize_q4_1(values))?,
        })
    }
}

/// The measurement's shape.
#[derive(Debug, Clone)]
pub struct WeightBenchSpec {
    /// Output features (weight rows).
    pub rows: usize,
    /// Input features (a multiple of 32 for the block formats).
    pub cols: usize,
    /// Input rows per product (1 = a decode step of one sequence).
    pub batches: Vec<usize>,
    pub formats: Vec<BenchFormat>,
    /// Bytes of weights cycled through (at least one copy; enough copies that they do
    /// not stay in the caches).
    pub working_set_bytes: usize,
    /// Seconds of timed calls per row (at most 2000 calls).
    pub budget_s: f64,
}

/// One format at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct WeightBenchRow {
    pub format: BenchFormat,
    pub rows: usize,
    pub cols: usize,
    pub batch: usize,
    /// Layer copies cycled through (each call reads a different one).
    pub copies: usize,
    /// Median microseconds per product.
    pub us_per_call: f64,
    pub gflops: f64,
    /// Weight bytes read per second (each weight is read once per product).
    pub weight_gbs: f64,
    /// `weight_gbs` over the read bandwidth of this run.
    pub of_bandwidth: f64,
    /// `gflops` over candle's f32 GEMM rate of this run.
    pub of_gemm: f64,
}

/// The result: every row plus the two machine references.
#[derive(Debug, Clone, Serialize)]
pub struct WeightBench {
    pub rows: Vec<WeightBenchRow>,
    /// Read bandwidth (GB/s) measured in this run.
    pub read_gbs: f64,
    /// candle f32 GEMM 1024^3 (GFLOP/s) measured in this run.
    pub gemm_gflops: f64,
}

fn rand_values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f32>() * 0.2 - 0.1).collect()
}

/// `w` in an allocation of its own (copies that share nothing, so each streams from
/// memory).
fn own_copy(w: &LinearWeight) -> Result<LinearWeight> {
    Ok(match w {
        LinearWeight::Dense(t) => LinearWeight::Dense(t.copy()?),
        LinearWeight::Quantized(q) => LinearWeight::Quantized(Arc::new(q.as_ref().clone())),
        LinearWeight::Half(h) => LinearWeight::Half(Arc::new(h.as_ref().clone())),
    })
}

/// Measure every format at every batch size of `spec`.
pub fn run(spec: &WeightBenchSpec) -> Result<WeightBench> {
    let (rows, cols) = (spec.rows, spec.cols);
    if rows == 0 || cols == 0 || spec.batches.contains(&0) {
        return Err(Error::Invalid(
            "`rows`, `cols` and every batch size must be >= 1".into(),
        ));
    }
    let blocks = spec
        .formats
        .iter()
        .any(|f| matches!(f, BenchFormat::Q8_0 | BenchFormat::Q4_1));
    if blocks && !cols.is_multiple_of(32) {
        return Err(Error::Invalid(format!(
            "`cols` = {cols} is not a multiple of 32 (the q8_0 / q4_1 block)"
        )));
    }
    let values = rand_values(rows * cols, 1);
    let inputs: Vec<Tensor> = spec
        .batches
        .iter()
        .enumerate()
        .map(|(i, &m)| {
            Tensor::from_vec(
                rand_values(m * cols, 10 + i as u64),
                (m, cols),
                &Device::Cpu,
            )
        })
        .collect::<std::result::Result<_, _>>()?;
    let mut out = Vec::new();
    for &format in &spec.formats {
        let one = format.weight(rows, cols, &values)?;
        let bytes = one.n_bytes().max(1);
        let copies = spec.working_set_bytes.div_ceil(bytes).max(1);
        // The same values in `copies` allocations of their own (written as they are
        // made, so resident), each call reading the next.
        let mut layers = Vec::with_capacity(copies);
        for _ in 1..copies {
            layers.push(Linear::from_weight(own_copy(&one)?));
        }
        layers.push(Linear::from_weight(one));
        for (&m, x) in spec.batches.iter().zip(&inputs) {
            let mut next = 0usize;
            let secs = super::time_median(spec.budget_s, || {
                std::hint::black_box(layers[next].infer(x)?);
                next = (next + 1) % copies;
                Ok(())
            })?;
            let flops = 2.0 * (m * rows * cols) as f64;
            out.push(WeightBenchRow {
                format,
                rows,
                cols,
                batch: m,
                copies,
                us_per_call: secs * 1e6,
                gflops: flops / secs / 1e9,
                weight_gbs: bytes as f64 / secs / 1e9,
                of_bandwidth: 0.0,
                of_gemm: 0.0,
            });
        }
    }
    let read_gbs = super::read_bandwidth(512);
    let gemm_gflops = super::gemm_f32(1024)?.gflops;
    for r in &mut out {
        r.of_bandwidth = r.weight_gbs / read_gbs;
        r.of_gemm = r.gflops / gemm_gflops;
    }
    Ok(WeightBench {
        rows: out,
        read_gbs,
        gemm_gflops,
    })
}
