//! `sparrow bench weights`: one linear layer's inference product per weight format and
//! batch size, against the read bandwidth and the GEMM rate measured in the same run.

use crate::report::Report;
use anyhow::{bail, Result};
use sparrow::bench::weights::{self, BenchFormat, WeightBenchRow, WeightBenchSpec};

#[derive(clap::Args)]
pub struct WeightsBenchArgs {
    /// Output features (default: SmolLM2-135M's gate / up projection).
    #[arg(long, default_value_t = 1536)]
    pub rows: usize,
    /// Input features (a multiple of 32 for q8_0 / q4_1).
    #[arg(long, default_value_t = 576)]
    pub cols: usize,
    /// Input rows per product (1 = one sequence's decode step).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub batch: Vec<usize>,
    /// Formats: f32, f16, bf16, q8_0, q4_1.
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,bf16,q8_0,q4_1")]
    pub formats: Vec<String>,
    /// MiB of weights cycled through per format (copies of the layer), so they stream
    /// from memory as a model's weights do.
    #[arg(long, default_value_t = 256)]
    pub working_set_mib: usize,
    /// Seconds of timed calls per row (at most 2000 calls).
    #[arg(long, default_value_t = 1.0)]
    pub budget: f64,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: WeightsBenchArgs) -> Result<()> {
    if !(a.budget > 0.0 && a.budget.is_finite()) {
        bail!("--budget must be > 0 seconds");
    }
    let formats = a
        .formats
        .iter()
        .map(|f| BenchFormat::parse(f))
        .collect::<sparrow::Result<Vec<_>>>()?;
    let spec = WeightBenchSpec {
        rows: a.rows,
        cols: a.cols,
        batches: a.batch,
        formats,
        working_set_bytes: a.working_set_mib << 20,
        budget_s: a.budget,
    };
    let result = weights::run(&spec)?;
    let mut report = Report::new(a.json)
        .tagged("weights")
        .col("format", 6, |r: &WeightBenchRow| {
            r.format.name().to_string()
        })
        .col("batch", 5, |r| r.batch.to_string())
        .col("us/call", 9, |r| format!("{:.1}", r.us_per_call))
        .col("GFLOP/s", 8, |r| format!("{:.1}", r.gflops))
        .col("of GEMM", 7, |r| format!("{:.0}%", r.of_gemm * 100.0))
        .col("weight GB/s", 11, |r| format!("{:.1}", r.weight_gbs))
        .col("of read", 7, |r| format!("{:.0}%", r.of_bandwidth * 100.0));
    report.note(format!(
        "Linear::infer of a {}x{} weight ({} MiB cycled per format, {} threads)",
        a.rows,
        a.cols,
        a.working_set_mib,
        rayon::current_num_threads()
    ));
    report.rows(&result.rows)?;
    report.note(format!(
        "read bandwidth {:.1} GB/s, candle f32 GEMM 1024^3 {:.1} GFLOP/s (measured after the rows)",
        result.read_gbs, result.gemm_gflops
    ));
    report.record(serde_json::json!({
        "bench": "weights_machine",
        "read_gbs": result.read_gbs,
        "gemm_gflops": result.gemm_gflops,
    }));
    Ok(())
}
