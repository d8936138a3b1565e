//! `sparrow plot`: a run's loss curves, or several runs' validation losses.

use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct PlotArgs {
    /// Run directory holding metrics.jsonl.
    #[arg(long, required_unless_present = "compare")]
    pub run: Option<PathBuf>,
    /// Runs whose validation losses share one picture (needs --out).
    #[arg(long, value_delimiter = ',', conflicts_with = "run", requires = "out")]
    pub compare: Vec<PathBuf>,
    /// Output file (default RUN/loss.svg).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: PlotArgs, _progress: bool) -> Result<()> {
    let PlotArgs { run, compare, out } = a;
    if !compare.is_empty() {
        let out = out.context("--compare needs --out FILE.svg")?;
        let runs: Vec<(String, PathBuf)> = compare
            .iter()
            .map(|r| (r.display().to_string(), r.join("metrics.jsonl")))
            .collect();
        sparrow::train::plot::plot_val_losses(&runs, &out, "validation loss")?;
        println!("{}", out.display());
        return Ok(());
    }
    let run = run.context("--run RUN is required")?;
    let out = out.unwrap_or_else(|| run.join("loss.svg"));
    let title = format!("{}: loss", run.display());
    let (t, v) = sparrow::train::plot::plot_losses(&run.join("metrics.jsonl"), &out, &title)?;
    println!(
        "{} ({t} training points, {v} validation points)",
        out.display()
    );
    Ok(())
}
