//! `sparrow bench`: speed and memory of the code users run, each against a baseline
//! measured in the same run.

mod attention;
mod gemm;
mod generate;
mod moe;
mod pool;
mod weights;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// The whole model through the engine's batched step, the code `generate` and the
    /// server run: prefill and decode speed by context and batch size, cache bytes,
    /// peak RSS, memory traffic and a per-layer breakdown; `--dense` adds the same
    /// weights with every selector set to all positions as the in-run baseline.
    Generate(generate::GenerateBenchArgs),
    /// One MoE layer (router + bucketed experts) vs a dense SwiGLU FFN of equal active
    /// FLOPs, in the same run: a training-size batch (forward, forward+backward) and
    /// decode (1 token). Defaults: the MoE layers of configs/small.json.
    Moe(moe::MoeBenchArgs),
    /// candle's f32 GEMM throughput (GFLOP/s), the reference for our kernels.
    Gemm(gemm::GemmBenchArgs),
    /// One attention layer, dense vs DSA, at each context length: decode latency,
    /// prefill time, cache bytes, achieved bandwidth.
    Attention(attention::AttentionBenchArgs),
    /// One linear layer's inference product per weight format (f32, f16, bf16, q8_0,
    /// q4_1) and batch size, against the read bandwidth and GEMM rate of the same run.
    Weights(weights::WeightsBenchArgs),
    /// What one parallel call of the inference kernels costs beyond its work: the
    /// kernels' thread team vs rayon, alternated in the same run.
    Pool(pool::PoolBenchArgs),
}

pub fn run(cmd: BenchCmd, _progress: bool) -> Result<()> {
    match cmd {
        BenchCmd::Generate(a) => generate::run(a),
        BenchCmd::Moe(a) => moe::run(a),
        BenchCmd::Gemm(a) => gemm::run(a),
        BenchCmd::Attention(a) => attention::run(a),
        BenchCmd::Weights(a) => weights::run(a),
        BenchCmd::Pool(a) => pool::run(a),
    }
}
