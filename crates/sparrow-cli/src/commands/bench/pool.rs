//! `sparrow bench pool`: the cost of one parallel call of the inference kernels, the
//! kernels' thread team against rayon in the same run.

use crate::report::Report;
use anyhow::{bail, Result};
use sparrow::bench::pool::{self, PoolRow};

#[derive(clap::Args)]
pub struct PoolBenchArgs {
    /// Microseconds of serial work before each call (the host work between kernels).
    #[arg(long, value_delimiter = ',', default_value = "2,10,20,100")]
    pub serial_us: Vec<f64>,
    /// Microseconds of each task (one per thread).
    #[arg(long, value_delimiter = ',', default_value = "5,10,25")]
    pub task_us: Vec<f64>,
    /// Iterations per round (five rounds per pattern and side).
    #[arg(long, default_value_t = 400)]
    pub iters: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: PoolBenchArgs) -> Result<()> {
    if a.serial_us.is_empty() || a.task_us.is_empty() {
        bail!("--serial-us and --task-us need at least one value each");
    }
    let patterns: Vec<(f64, f64)> = a
        .serial_us
        .iter()
        .flat_map(|&s| a.task_us.iter().map(move |&t| (s, t)))
        .collect();
    let rows = pool::run(&patterns, a.iters)?;
    let mut report = Report::new(a.json)
        .tagged("pool")
        .col("serial us", 9, |r: &PoolRow| format!("{:.0}", r.serial_us))
        .col("task us", 7, |r| format!("{:.0}", r.task_us))
        .col("ideal us", 8, |r| format!("{:.1}", r.ideal_us))
        .col("team us", 8, |r| format!("{:.1}", r.team_us))
        .col("rayon us", 8, |r| format!("{:.1}", r.rayon_us))
        .col("team over", 9, |r| format!("{:.1}", r.team_us - r.ideal_us))
        .col("rayon over", 10, |r| {
            format!("{:.1}", r.rayon_us - r.ideal_us)
        });
    report.note(format!(
        "per iteration: serial work, then one parallel call of one task per thread ({} threads); median of five rounds of {} iterations, alternated",
        sparrow::kernels::pool::threads(),
        a.iters
    ));
    report.rows(&rows)?;
    Ok(())
}
