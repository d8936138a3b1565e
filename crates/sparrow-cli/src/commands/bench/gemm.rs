//! `sparrow bench gemm`: candle's f32 GEMM throughput, the reference for our kernels.

use crate::report::Report;
use anyhow::Result;

#[derive(clap::Args)]
pub struct GemmBenchArgs {
    /// Square matrix sizes.
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024,2048")]
    pub sizes: Vec<usize>,
    #[arg(long)]
    pub json: bool,
}

/// One GEMM measurement.
#[derive(serde::Serialize)]
struct GemmRow {
    bench: &'static str,
    n: usize,
    gflops: f64,
    secs_per_call: f64,
}

pub fn run(a: GemmBenchArgs) -> Result<()> {
    let mut report = Report::new(a.json)
        .col("n", 6, |r: &GemmRow| r.n.to_string())
        .col("GFLOP/s", 9, |r| format!("{:.1}", r.gflops))
        .col("ms/call", 9, |r| format!("{:.3}", r.secs_per_call * 1e3));
    report.note("candle f32 GEMM n x n x n");
    for n in a.sizes {
        let r = sparrow::bench::gemm_f32(n)?;
        report.row(&GemmRow {
            bench: "gemm_f32",
            n,
            gflops: r.gflops,
            secs_per_call: r.secs,
        })?;
    }
    Ok(())
}
