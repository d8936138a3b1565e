//! `sparrow experiment`: several models trained under one protocol and compared.

use crate::common::{require_corpus, stop_on_ctrl_c};
use anyhow::Result;
use clap::Subcommand;
use sparrow::config::ModelConfig;
use sparrow::train::TrainOptions;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ExperimentCmd {
    /// Train the config once per router kind (same seed, same data order) and compare
    /// validation loss, expert utilization and throughput: routers.md, routers.json,
    /// load-<router>.png, val-loss.svg in --out. Rerunning continues unfinished runs.
    Routers {
        /// Model config with MoE layers; its router_kind is replaced per run.
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value = "data/corpus")]
        corpus: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Optimizer steps per router.
        #[arg(long, default_value_t = 600)]
        steps: u64,
        /// Routers to compare (default: all).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "topk_softmax,switch_capacity,capacity_aware,noaux_bias,hash"
        )]
        routers: Vec<String>,
        /// Out-of-distribution text (folder of .txt files, used whole) to route with
        /// the trained routers frozen.
        #[arg(long)]
        ood_corpus: Option<PathBuf>,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        #[arg(long, default_value_t = 3e-3)]
        lr: f64,
        #[arg(long, default_value_t = 30)]
        warmup_steps: u64,
        #[arg(long, default_value_t = 100)]
        val_every: u64,
        #[arg(long, default_value_t = 8)]
        val_batches: usize,
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: ExperimentCmd, progress: bool) -> Result<()> {
    let ExperimentCmd::Routers {
        config,
        corpus,
        out,
        steps,
        routers,
        ood_corpus,
        batch_size,
        seq_len,
        lr,
        warmup_steps,
        val_every,
        val_batches,
        seed,
        json,
    } = cmd;
    let config = ModelConfig::from_file(&config)?;
    let routers = routers
        .iter()
        .map(|r| r.parse())
        .collect::<Result<Vec<sparrow::config::RouterKind>, _>>()?;
    require_corpus(&corpus)?;
    let options = TrainOptions {
        steps,
        batch_size,
        seq_len,
        lr,
        warmup_steps,
        val_every,
        val_batches,
        seed,
        checkpoint_every: val_every,
        ..TrainOptions::default()
    };
    let stop = stop_on_ctrl_c("checkpointing after this step (rerun to continue)")?;
    let exp = sparrow::experiment::routers::RouterExperiment {
        config,
        corpus,
        out: out.clone(),
        options,
        routers,
        ood_corpus,
        show_progress: progress,
        stop,
    };
    let results = sparrow::experiment::routers::run(&exp)?;
    if json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print!("{}", sparrow::experiment::routers::markdown(&exp, &results));
        println!(
            "\nwritten: {}/routers.md, routers.json, load-*.png, val-loss.svg",
            out.display()
        );
    }
    Ok(())
}
