//! `sparrow bench moe`: one MoE layer (router + bucketed expert execution) against a
//! dense SwiGLU FFN of equal active FLOPs (width `k * moe_intermediate_size`, plus the
//! shared experts' width), measured in the same run, at a training-size batch (forward
//! and forward + backward) and at decode (one token, forward). Achieved GFLOP/s are
//! reported against candle's GEMM throughput measured in the same run.

use crate::config::{ModelConfig, RouterKind};
use crate::error::{Error, Result};
use crate::model::mlp::Mlp;
use crate::model::moe::Moe;
use crate::model::params::VarStore;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

/// The layer measured.
#[derive(Debug, Clone, Copy)]
pub struct MoeShape {
    pub hidden: usize,
    pub experts: usize,
    pub top_k: usize,
    pub expert_width: usize,
    pub shared_experts: usize,
    pub router: RouterKind,
}

/// One row: MoE vs dense at one batch size and pass.
#[derive(Debug, Clone, Serialize)]
pub struct MoeBenchRow {
    /// `forward` or `forward+backward`.
    pub pass: String,
    pub tokens: usize,
    pub moe_ms: f64,
    pub dense_ms: f64,
    pub moe_tokens_per_s: f64,
    pub dense_tokens_per_s: f64,
    /// MoE throughput / dense throughput.
    pub ratio: f64,
    /// Active-FLOP rate of the MoE layer (GFLOP/s).
    pub moe_gflops: f64,
    pub dense_gflops: f64,
    /// candle's f32 GEMM rate (1024^3) measured in this run.
    pub gemm_gflops: f64,
}

/// Median seconds of `forward` (and, with `backward`, the backward pass of its sum).
fn time_pass(budget: f64, backward: bool, forward: impl Fn() -> Result<Tensor>) -> Result<f64> {
    super::time_median(budget, || {
        let y = forward()?;
        if backward {
            std::hint::black_box(y.sum_all()?.backward()?);
        } else {
            std::hint::black_box(y);
        }
        Ok(())
    })
}

/// Measure at each batch in `tokens` (forward; and forward + backward when >= 2).
pub fn run(shape: MoeShape, tokens: &[usize], budget_s: f64) -> Result<Vec<MoeBenchRow>> {
    if shape.hidden == 0 || shape.experts == 0 || shape.expert_width == 0 {
        return Err(Error::Invalid(
            "`hidden`, `experts` and `expert_width` must be >= 1".into(),
        ));
    }
    if shape.top_k == 0 || shape.top_k > shape.experts {
        return Err(Error::Invalid(format!(
            "`top_k` must be in 1..={} (`experts`)",
            shape.experts
        )));
    }
    if tokens.is_empty() || tokens.contains(&0) {
        return Err(Error::Invalid("`tokens` must be >= 1".into()));
    }
    let dev = Device::Cpu;
    let cfg = ModelConfig {
        hidden_size: shape.hidden,
        n_routed_experts: shape.experts,
        num_experts_per_tok: shape.top_k,
        moe_intermediate_size: shape.expert_width,
        n_shared_experts: shape.shared_experts,
        router_kind: shape.router,
        ..ModelConfig::from_json(include_str!("../../../../configs/tiny.json"))?
    };
    let store = VarStore::random(1, DType::F32, &dev);
    let moe = Moe::new(&store.root().pp("moe"), &cfg, 1, 0.02)?;
    let dense_width = shape.expert_width * (shape.top_k + shape.shared_experts);
    let dense = Mlp::new(
        &store.root().pp("dense"),
        shape.hidden,
        dense_width,
        0.02,
        0.02,
    )?;
    let gemm = super::gemm_f32(1024)?.gflops;
    // SwiGLU: 3 matmuls of C x W per token, 2 FLOPs per multiply-add.
    let flops_per_token = 6.0 * (shape.hidden * dense_width) as f64;
    let mut rows = Vec::new();
    for &n in tokens {
        let x = Tensor::randn(0f32, 1.0, (1, n, shape.hidden), &dev)?;
        let ids: Vec<u32> = (0..n as u32)
            .map(|i| i.wrapping_mul(2654435761) % 8192)
            .collect();
        let passes: &[bool] = if n >= 2 { &[false, true] } else { &[false] };
        for &backward in passes {
            let moe_s = time_pass(budget_s, backward, || Ok(moe.forward(&x, &ids, true)?.0))?;
            let dense_s = time_pass(budget_s, backward, || dense.forward(&x))?;
            let flops = flops_per_token * n as f64 * if backward { 3.0 } else { 1.0 };
            rows.push(MoeBenchRow {
                pass: if backward {
                    "forward+backward"
                } else {
                    "forward"
                }
                .into(),
                tokens: n,
                moe_ms: moe_s * 1e3,
                dense_ms: dense_s * 1e3,
                moe_tokens_per_s: n as f64 / moe_s,
                dense_tokens_per_s: n as f64 / dense_s,
                ratio: dense_s / moe_s,
                moe_gflops: flops / moe_s / 1e9,
                dense_gflops: flops / dense_s / 1e9,
                gemm_gflops: gemm,
            });
        }
    }
    Ok(rows)
}
