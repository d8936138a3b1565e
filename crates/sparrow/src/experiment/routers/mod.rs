//! `sparrow experiment routers`: the same model trained once per router *arm* (a router
//! kind, optionally with config fields changed: a remedy under test) and per seed, then
//! compared on validation loss, expert utilization (MaxVio, CV, drop rate, dead experts;
//! `eval::routing` on the held-out split), training throughput and, optionally, the
//! change of utilization on out-of-distribution text with the routers frozen.
//!
//! Each seed changes the initialisation and the data order; within a seed every arm
//! starts from the same shared parameters and reads the same batches, so per-seed
//! differences to the baseline arm (`topk_softmax`) are paired (`spread`).
//!
//! Outputs in `out/`: `seed-<s>/<arm>/` one run directory per seed and arm (resumable: a
//! finished run is reused, an interrupted one continues), `routers.json` (every run and
//! the per-arm summaries), `routers.md`, `seed-<s>/load-<arm>.png` (per-expert load on
//! the validation text), `val-loss.svg` and `max-vio.svg` (mean over seeds, band from
//! the lowest to the highest seed). The corpus is tokenized once, into `out/data`.
//!
//! Files: `setup` (arms and protocol), `results` (each run, each arm over seeds),
//! `report` (tables and curves); this one trains and measures.

mod report;
mod results;
mod setup;

pub use report::markdown;
pub use results::{
    ArmSummary, RouterReport, RouterResult, UtilizationSummary, VariantComparison, BASELINE_ARM,
};
pub use setup::{RouterArm, RouterExperiment};

use crate::config::ModelConfig;
use crate::data::corpus;
use crate::data::shards::TokenData;
use crate::error::{Error, Result};
use crate::eval::routing;
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint::{TrainState, STATE_JSON};
use crate::train::metrics::read_metrics;
use crate::train::{self, ResumeRequest, TrainOptions, TrainRequest};
use candle_core::{DType, Device};
use std::path::Path;

/// Train (or reuse) one run per seed and arm, measure, and write the reports.
pub fn run(exp: &RouterExperiment) -> Result<RouterReport> {
    exp.options.validate()?;
    exp.config.validate()?;
    if exp.arms.is_empty() {
        return Err(Error::Invalid("no router to compare".into()));
    }
    if exp.seeds.is_empty() {
        return Err(Error::Invalid("no seed to run".into()));
    }
    for (i, a) in exp.arms.iter().enumerate() {
        if exp.arms[..i].iter().any(|b| b.name == a.name) {
            return Err(Error::Invalid(format!(
                "router arm `{}` is listed twice",
                a.name
            )));
        }
    }
    for (i, s) in exp.seeds.iter().enumerate() {
        if exp.seeds[..i].contains(s) {
            return Err(Error::Invalid(format!("seed {s} is listed twice")));
        }
    }
    if exp.config.n_routed_experts == 0
        || exp.config.first_k_dense_replace >= exp.config.num_hidden_layers
    {
        return Err(Error::config(
            "n_routed_experts",
            "the experiment needs a config with MoE layers",
        ));
    }
    let configs = exp
        .arms
        .iter()
        .map(|a| a.config(&exp.config))
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(&exp.out).map_err(|e| Error::io(&exp.out, e))?;
    let tok_path = exp.out.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        Tokenizer::from_file(&tok_path)?
    } else {
        let files = corpus::list_text_files(&exp.corpus)?;
        let t = Tokenizer::train(&files, exp.config.vocab_size, exp.show_progress)?;
        t.save(&tok_path)?;
        t
    };
    let shared_data = exp.out.join("data");
    TokenData::load_or_build(
        &exp.corpus,
        &tokenizer,
        exp.options.val_fraction,
        &shared_data,
        exp.show_progress,
    )?;
    let mut results = Vec::new();
    for &seed in &exp.seeds {
        let seed_dir = exp.out.join(format!("seed-{seed}"));
        for (arm, config) in exp.arms.iter().zip(&configs) {
            let dir = seed_dir.join(&arm.name);
            if exp.show_progress {
                eprintln!("seed {seed}, router {}: {}", arm.name, dir.display());
            }
            let mut options = exp.options.clone();
            options.seed = seed;
            let summary = train_or_resume(exp, config, &options, &dir, &tok_path, &shared_data)?;
            if summary.interrupted {
                return Err(Error::Invalid(format!(
                    "stopped during the {} run of seed {seed}; run the same command again to continue",
                    arm.name
                )));
            }
            results.push(measure(exp, arm, seed, &dir, &seed_dir)?);
        }
    }
    let report = results::summarise(exp, results);
    report::write(exp, &report)?;
    Ok(report)
}

fn train_or_resume(
    exp: &RouterExperiment,
    config: &ModelConfig,
    options: &TrainOptions,
    dir: &Path,
    tokenizer: &Path,
    shared_data: &Path,
) -> Result<train::TrainSummary> {
    if train::checkpoint::holds_run(dir) {
        train::recover_run(dir)?;
        let state: TrainState = crate::fsio::read_json(&dir.join(STATE_JSON))?;
        let existing = ModelConfig::from_file(&dir.join("config.json"))?;
        if state.options != *options || existing != *config {
            return Err(Error::Invalid(format!(
                "{} holds a run with another config or other training options; remove it or use another output directory",
                dir.display()
            )));
        }
        return train::resume(ResumeRequest {
            dir: dir.to_path_buf(),
            steps: None,
            corpus: Some(exp.corpus.clone()),
            show_progress: exp.show_progress,
            stop: exp.stop.clone(),
            pause_at: None,
        });
    }
    link_shared_data(shared_data, &dir.join("data"))?;
    train::train(TrainRequest {
        config: config.clone(),
        corpus: exp.corpus.clone(),
        out: dir.to_path_buf(),
        tokenizer: Some(tokenizer.to_path_buf()),
        options: options.clone(),
        show_progress: exp.show_progress,
        stop: exp.stop.clone(),
        pause_at: None,
        init_from: None,
    })
}

/// Give a new run the corpus tokenized once for the experiment: its files hard-linked
/// (copied where links fail) into the run's data cache, which checks them as its own.
fn link_shared_data(shared: &Path, run_data: &Path) -> Result<()> {
    if run_data.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(run_data).map_err(|e| Error::io(run_data, e))?;
    let entries = std::fs::read_dir(shared).map_err(|e| Error::io(shared, e))?;
    for entry in entries {
        let from = entry.map_err(|e| Error::io(shared, e))?.path();
        if !from.is_file() {
            continue;
        }
        let Some(name) = from.file_name() else {
            continue;
        };
        let to = run_data.join(name);
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).map_err(|e| Error::io(&to, e))?;
        }
    }
    Ok(())
}

fn measure(
    exp: &RouterExperiment,
    arm: &RouterArm,
    seed: u64,
    dir: &Path,
    seed_dir: &Path,
) -> Result<RouterResult> {
    let o = &exp.options;
    let (model, step) = crate::model_dir::load_for_inference(
        dir,
        crate::weights::WeightFormat::F32,
        DType::F32,
        &Device::Cpu,
        |_| {},
    )?;
    // The run's own tokenizer (the experiment's, copied when the run began).
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let data = TokenData::load_or_build(
        &exp.corpus,
        &tokenizer,
        o.val_fraction,
        &dir.join("data"),
        exp.show_progress,
    )?;
    let windows = o.val_batches * o.batch_size;
    let val = routing::measure(
        &model,
        &data.val,
        o.seq_len,
        windows,
        o.batch_size,
        exp.show_progress,
    )?;
    let ood = match &exp.ood_corpus {
        Some(ood_dir) => {
            let tokens =
                crate::eval::recall::held_out_tokens(ood_dir, &tokenizer, 1.0, exp.show_progress)?;
            Some(UtilizationSummary::new(routing::measure(
                &model,
                &tokens,
                o.seq_len,
                windows,
                o.batch_size,
                exp.show_progress,
            )?))
        }
        None => None,
    };
    let records = read_metrics(&dir.join("metrics.jsonl"))?;
    let val_loss = records
        .iter()
        .rev()
        .find_map(|r| r.get("val_loss")?.as_f64())
        .ok_or_else(|| Error::Invalid(format!("{} logged no val_loss", dir.display())))?;
    let mut tps: Vec<f64> = records
        .iter()
        .filter_map(|r| r.get("tokens_per_s")?.as_f64())
        .collect();
    tps.sort_by(f64::total_cmp);
    let tokens_per_s = tps.get(tps.len() / 2).copied().unwrap_or(0.0);
    let load_plot = seed_dir.join(format!("load-{}.png", arm.name));
    let layers: Vec<(usize, Vec<u64>)> = val
        .iter()
        .map(|l| (l.layer, l.utilization.load.clone()))
        .collect();
    crate::eval::load_plot::plot_expert_load(
        &load_plot,
        &format!(
            "{} (seed {seed}): per-expert load on validation text",
            arm.name
        ),
        &layers,
    )?;
    Ok(RouterResult {
        arm: arm.name.clone(),
        router: arm.kind.name().to_string(),
        seed,
        run_dir: dir.to_path_buf(),
        steps: step.unwrap_or(0),
        val_loss,
        tokens_per_s,
        validation: UtilizationSummary::new(val),
        ood,
        load_plot,
    })
}
