//! `sparrow params`: a config's parameter counts, from the built model's shapes.

use anyhow::Result;
use sparrow::config::ModelConfig;
use sparrow::model::Model;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ParamsArgs {
    /// Config file (config.json or a preset under configs/).
    pub config: PathBuf,
}

pub fn run(a: ParamsArgs, _progress: bool) -> Result<()> {
    let ParamsArgs { config } = a;
    let cfg = ModelConfig::from_file(&config)?;
    // Counted from the built layers' shapes (random weights, never trained).
    let m = Model::new_random_for_inference(
        &cfg,
        0,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?;
    let (total, active) = m.parameter_counts();
    println!(
        "{}: {:.2}M total parameters, {:.2}M active per token",
        config.display(),
        total as f64 / 1e6,
        active as f64 / 1e6
    );
    Ok(())
}
