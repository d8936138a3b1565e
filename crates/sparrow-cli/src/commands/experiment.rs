//! `sparrow experiment`: several models trained under one protocol and compared.

use crate::common::{require_corpus, stop_on_ctrl_c};
use anyhow::Result;
use clap::Subcommand;
use sparrow::config::ModelConfig;
use sparrow::experiment::routers::RouterArm;
use sparrow::train::TrainOptions;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ExperimentCmd {
    /// Train the config once per router arm and seed (within a seed: the same initial
    /// parameters and data order) and compare validation loss, expert utilization and
    /// throughput over seeds: routers.md, routers.json, val-loss.svg, max-vio.svg,
    /// seed-<s>/load-<arm>.png in --out. Rerunning continues unfinished runs.
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
        /// An extra arm, repeatable: `NAME=ROUTER:FIELD=VALUE,FIELD=VALUE` sets config
        /// fields for that router, e.g. `noaux_seq=noaux_bias:router_seq_aux_loss_coef=1e-4`.
        #[arg(long = "variant")]
        variants: Vec<String>,
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
        /// One run per arm for each seed (each seed: its own initialisation and data
        /// order); the report gives means and spreads over them.
        #[arg(long, value_delimiter = ',', default_value = "1337")]
        seeds: Vec<u64>,
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
        variants,
        ood_corpus,
        batch_size,
        seq_len,
        lr,
        warmup_steps,
        val_every,
        val_batches,
        seeds,
        json,
    } = cmd;
    let config = ModelConfig::from_file(&config)?;
    let mut arms = routers
        .iter()
        .map(|r| Ok(RouterArm::plain(r.parse()?)))
        .collect::<Result<Vec<RouterArm>>>()?;
    for v in &variants {
        arms.push(RouterArm::parse(v)?);
    }
    require_corpus(&corpus)?;
    let options = TrainOptions {
        steps,
        batch_size,
        seq_len,
        lr,
        warmup_steps,
        val_every,
        val_batches,
        checkpoint_every: val_every,
        ..TrainOptions::default()
    };
    let stop = stop_on_ctrl_c("checkpointing after this step (rerun to continue)")?;
    let exp = sparrow::experiment::routers::RouterExperiment {
        config,
        corpus,
        out: out.clone(),
        options,
        arms,
        seeds,
        ood_corpus,
        show_progress: progress,
        stop,
    };
    let report = sparrow::experiment::routers::run(&exp)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", sparrow::experiment::routers::markdown(&exp, &report));
        println!(
            "\nwritten: {}/routers.md, routers.json, val-loss.svg, max-vio.svg, seed-*/load-*.png",
            out.display()
        );
    }
    Ok(())
}
