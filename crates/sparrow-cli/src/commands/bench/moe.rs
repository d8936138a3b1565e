//! `sparrow bench moe`: one MoE layer against a dense SwiGLU of equal active FLOPs.

use crate::report::Report;
use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct MoeBenchArgs {
    /// Tokens per call (16 x 256 = a training batch of configs/small.json; 1 = decode).
    #[arg(long, value_delimiter = ',', default_value = "4096,1")]
    pub tokens: Vec<usize>,
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    #[arg(long, default_value_t = 8)]
    pub experts: usize,
    #[arg(long, default_value_t = 2)]
    pub topk: usize,
    #[arg(long, default_value_t = 512)]
    pub expert_width: usize,
    /// Shared experts (run on every token, in both layers' FLOPs).
    #[arg(long, default_value_t = 0)]
    pub shared: usize,
    #[arg(long, default_value = "topk_softmax")]
    pub router: String,
    /// Seconds of repetitions per measurement.
    #[arg(long, default_value_t = 1.0)]
    pub budget: f64,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: MoeBenchArgs) -> Result<()> {
    let MoeBenchArgs {
        tokens,
        hidden,
        experts,
        topk,
        expert_width,
        shared,
        router,
        budget,
        json,
    } = a;
    if hidden == 0 || experts == 0 || expert_width == 0 {
        bail!("--hidden, --experts and --expert-width must be >= 1");
    }
    if topk == 0 || topk > experts {
        bail!("--topk must be in 1..={experts} (--experts)");
    }
    if tokens.contains(&0) {
        bail!("--tokens must be >= 1");
    }
    let shape = sparrow::bench::moe::MoeShape {
        hidden,
        experts,
        top_k: topk,
        expert_width,
        shared_experts: shared,
        router: router.parse()?,
    };
    if !(budget > 0.0 && budget.is_finite()) {
        bail!("--budget must be > 0 seconds");
    }
    let rows = sparrow::bench::moe::run(shape, &tokens, budget)?;
    let mut report = Report::new(json)
        .col("pass", 17, |r: &sparrow::bench::moe::MoeBenchRow| {
            r.pass.to_string()
        })
        .col("tokens", 6, |r| r.tokens.to_string())
        .col("MoE ms", 10, |r| format!("{:.3}", r.moe_ms))
        .col("dense ms", 10, |r| format!("{:.3}", r.dense_ms))
        .col("MoE tok/s", 12, |r| format!("{:.0}", r.moe_tokens_per_s))
        .col("dense tok/s", 12, |r| {
            format!("{:.0}", r.dense_tokens_per_s)
        })
        .col("ratio", 7, |r| format!("{:.0}%", r.ratio * 100.0))
        .col("MoE GF/s", 9, |r| format!("{:.1}", r.moe_gflops))
        .col("dense GF/s", 9, |r| format!("{:.1}", r.dense_gflops));
    report.note(format!(
        "MoE layer (C {hidden}, {experts} experts x {expert_width}, top-{topk}, {shared} shared, {router}) vs dense SwiGLU of width {}; GEMM {:.0} GFLOP/s",
        expert_width * (topk + shared),
        rows.first().map(|r| r.gemm_gflops).unwrap_or(0.0)
    ));
    report.rows(&rows)
}
