//! `sparrow experiment routers`: the same model trained once per router kind, from the
//! same seed (so every shared parameter starts equal) on the same data order, then
//! compared on validation loss, expert utilization (MaxVio, CV, drop rate, dead experts;
//! `eval::routing` on the held-out split), training throughput and, optionally, the
//! change of utilization on out-of-distribution text with the routers frozen.
//!
//! Outputs in `out/`: one run directory per router (resumable: a finished run is reused,
//! an interrupted one continues), `routers.json`, `routers.md`, `load-<router>.png`
//! (per-expert load on the validation text) and `val-loss.svg`.

use crate::config::{ModelConfig, RouterKind};
use crate::data::corpus;
use crate::data::shards::TokenData;
use crate::error::{Error, Result};
use crate::eval::routing::{self, LayerRouting};
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint::{TrainState, STATE_JSON};
use crate::train::metrics::read_metrics;
use crate::train::{self, ResumeRequest, TrainOptions, TrainRequest};
use candle_core::{DType, Device};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// What to run.
pub struct RouterExperiment {
    /// The model; `router_kind` is replaced per run.
    pub config: ModelConfig,
    pub corpus: PathBuf,
    pub out: PathBuf,
    pub options: TrainOptions,
    pub routers: Vec<RouterKind>,
    /// Out-of-distribution text (folder of .txt files, used whole) to route with the
    /// trained routers frozen.
    pub ood_corpus: Option<PathBuf>,
    pub show_progress: bool,
    pub stop: Arc<AtomicBool>,
}

/// Utilization summarised over the MoE layers.
#[derive(Debug, Clone, Serialize)]
pub struct UtilizationSummary {
    /// Mean over layers of MaxVio.
    pub max_vio: f64,
    /// The worst layer's MaxVio.
    pub max_vio_worst: f64,
    /// Mean over layers of CV.
    pub cv: f64,
    /// Mean over layers of the normalised load entropy.
    pub entropy: f64,
    /// Mean over layers of the drop rate.
    pub drop_rate: f64,
    /// Dead experts summed over layers.
    pub dead: usize,
    /// Mean over layers of the MaxVio of the router's choices before capacity limits.
    pub demand_max_vio: f64,
    pub layers: Vec<LayerRouting>,
}

impl UtilizationSummary {
    fn new(layers: Vec<LayerRouting>) -> Self {
        let n = layers.len().max(1) as f64;
        let mean = |f: &dyn Fn(&LayerRouting) -> f64| layers.iter().map(f).sum::<f64>() / n;
        Self {
            max_vio: mean(&|l| l.utilization.max_vio),
            max_vio_worst: layers
                .iter()
                .map(|l| l.utilization.max_vio)
                .fold(0.0, f64::max),
            cv: mean(&|l| l.utilization.cv),
            entropy: mean(&|l| l.utilization.entropy),
            drop_rate: mean(&|l| l.utilization.drop_rate),
            dead: layers.iter().map(|l| l.utilization.dead).sum(),
            demand_max_vio: mean(&|l| l.utilization.demand_max_vio),
            layers,
        }
    }
}

/// One router's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct RouterResult {
    pub router: String,
    pub run_dir: PathBuf,
    pub steps: u64,
    pub val_loss: f64,
    /// Median training tokens/s over the run's steps.
    pub tokens_per_s: f64,
    /// On the held-out split of the training corpus.
    pub validation: UtilizationSummary,
    /// On the out-of-distribution corpus, when given.
    pub ood: Option<UtilizationSummary>,
    pub load_plot: PathBuf,
}

/// Train (or reuse) one run per router, measure, and write the reports.
pub fn run(exp: &RouterExperiment) -> Result<Vec<RouterResult>> {
    exp.options.validate()?;
    exp.config.validate()?;
    if exp.routers.is_empty() {
        return Err(Error::Invalid("no router to compare".into()));
    }
    if exp.config.n_routed_experts == 0
        || exp.config.first_k_dense_replace >= exp.config.num_hidden_layers
    {
        return Err(Error::config(
            "n_routed_experts",
            "the experiment needs a config with MoE layers",
        ));
    }
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
    let ood_tokens = match &exp.ood_corpus {
        Some(dir) => Some(crate::eval::recall::held_out_tokens(
            dir,
            &tokenizer,
            1.0,
            exp.show_progress,
        )?),
        None => None,
    };
    let mut results = Vec::new();
    for &kind in &exp.routers {
        let dir = exp.out.join(kind.name());
        if exp.show_progress {
            eprintln!("router {}: {}", kind.name(), dir.display());
        }
        let summary = train_or_resume(exp, kind, &dir, &tok_path)?;
        if summary.interrupted {
            return Err(Error::Invalid(format!(
                "stopped during the {} run; run the same command again to continue",
                kind.name()
            )));
        }
        results.push(measure(exp, kind, &dir, &tokenizer, ood_tokens.as_deref())?);
    }
    write_reports(exp, &results)?;
    Ok(results)
}

fn train_or_resume(
    exp: &RouterExperiment,
    kind: RouterKind,
    dir: &Path,
    tokenizer: &Path,
) -> Result<train::TrainSummary> {
    let mut config = exp.config.clone();
    config.router_kind = kind;
    if train::checkpoint::holds_run(dir) {
        train::recover_run(dir)?;
        let state: TrainState = crate::fsio::read_json(&dir.join(STATE_JSON))?;
        let existing = ModelConfig::from_file(&dir.join("config.json"))?;
        if state.options != exp.options || existing != config {
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
    train::train(TrainRequest {
        config,
        corpus: exp.corpus.clone(),
        out: dir.to_path_buf(),
        tokenizer: Some(tokenizer.to_path_buf()),
        options: exp.options.clone(),
        show_progress: exp.show_progress,
        stop: exp.stop.clone(),
        pause_at: None,
        init_from: None,
    })
}

fn measure(
    exp: &RouterExperiment,
    kind: RouterKind,
    dir: &Path,
    tokenizer: &Tokenizer,
    ood_tokens: Option<&[u32]>,
) -> Result<RouterResult> {
    let o = &exp.options;
    let (model, step) = crate::model_dir::load_for_inference(
        dir,
        crate::weights::WeightFormat::F32,
        DType::F32,
        &Device::Cpu,
        |_| {},
    )?;
    let data = TokenData::load_or_build(
        &exp.corpus,
        tokenizer,
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
    let ood = match ood_tokens {
        Some(t) => Some(UtilizationSummary::new(routing::measure(
            &model,
            t,
            o.seq_len,
            windows,
            o.batch_size,
            exp.show_progress,
        )?)),
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
    let load_plot = exp.out.join(format!("load-{}.png", kind.name()));
    let layers: Vec<(usize, Vec<u64>)> = val
        .iter()
        .map(|l| (l.layer, l.utilization.load.clone()))
        .collect();
    crate::eval::load_plot::plot_expert_load(
        &load_plot,
        &format!("{}: per-expert load on validation text", kind.name()),
        &layers,
    )?;
    Ok(RouterResult {
        router: kind.name().to_string(),
        run_dir: dir.to_path_buf(),
        steps: step.unwrap_or(0),
        val_loss,
        tokens_per_s,
        validation: UtilizationSummary::new(val),
        ood,
        load_plot,
    })
}

fn write_reports(exp: &RouterExperiment, results: &[RouterResult]) -> Result<()> {
    let json = serde_json::to_string_pretty(results)
        .map_err(|e| Error::Invalid(format!("serialising results: {e}")))?;
    crate::fsio::write_atomic(&exp.out.join("routers.json"), json.as_bytes())?;
    crate::fsio::write_atomic(
        &exp.out.join("routers.md"),
        markdown(exp, results).as_bytes(),
    )?;
    let runs: Vec<(String, PathBuf)> = results
        .iter()
        .map(|r| (r.router.clone(), r.run_dir.join("metrics.jsonl")))
        .collect();
    crate::train::plot::plot_val_losses(
        &runs,
        &exp.out.join("val-loss.svg"),
        "validation loss by router",
    )?;
    Ok(())
}

/// The report: one table on validation text, one on OOD text, and each router's MaxVio
/// and loss relative to `topk_softmax` when it ran.
pub fn markdown(exp: &RouterExperiment, results: &[RouterResult]) -> String {
    let o = &exp.options;
    let c = &exp.config;
    let mut s = String::new();
    let _ = writeln!(s, "# Routers side by side\n");
    let _ = writeln!(
        s,
        "{} layers ({} MoE), {} routed experts, top-{}, {} shared; capacity_factor {}, Switch loss coef {}, CV^2 loss coef {}, z-loss coef {}; \
         {} steps of {} x {} tokens, seed {}; utilization over {} held-out windows of {} tokens \
         (capacity limits applied, batches of {}).\n",
        c.num_hidden_layers,
        c.num_hidden_layers - c.first_k_dense_replace,
        c.n_routed_experts,
        c.num_experts_per_tok,
        c.n_shared_experts,
        c.capacity_factor,
        c.router_aux_loss_coef,
        c.router_cv2_loss_coef,
        c.router_z_loss_coef,
        o.steps,
        o.batch_size,
        o.seq_len,
        o.seed,
        o.val_batches * o.batch_size,
        o.seq_len,
        o.batch_size,
    );
    let base = results
        .iter()
        .find(|r| r.router == RouterKind::TopkSoftmax.name());
    let _ = writeln!(
        s,
        "| router | val loss | vs topk_softmax | MaxVio (mean) | MaxVio (worst) | vs topk_softmax | CV | entropy | drop rate | dead | MaxVio before capacity | tokens/s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let v = &r.validation;
        let (dl, dv) = match base {
            Some(b) => (
                format!("{:+.2}%", (r.val_loss / b.val_loss - 1.0) * 100.0),
                format!("{:+.0}%", (v.max_vio / b.validation.max_vio - 1.0) * 100.0),
            ),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            s,
            "| {} | {:.4} | {} | {:.3} | {:.3} | {} | {:.3} | {:.4} | {:.2}% | {} | {:.3} | {:.0} |",
            r.router,
            r.val_loss,
            dl,
            v.max_vio,
            v.max_vio_worst,
            dv,
            v.cv,
            v.entropy,
            v.drop_rate * 100.0,
            v.dead,
            v.demand_max_vio,
            r.tokens_per_s
        );
    }
    if let Some(ood) = &exp.ood_corpus {
        let _ = writeln!(
            s,
            "\n## Out of distribution: {} (routers frozen)\n",
            ood.display()
        );
        let _ = writeln!(
            s,
            "| router | MaxVio (mean) | change | CV | change | drop rate | dead | MaxVio before capacity | change |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for r in results {
            if let Some(o) = &r.ood {
                let v = &r.validation;
                let _ = writeln!(
                    s,
                    "| {} | {:.3} | {:+.3} | {:.3} | {:+.3} | {:.2}% | {} | {:.3} | {:+.3} |",
                    r.router,
                    o.max_vio,
                    o.max_vio - v.max_vio,
                    o.cv,
                    o.cv - v.cv,
                    o.drop_rate * 100.0,
                    o.dead,
                    o.demand_max_vio,
                    o.demand_max_vio - v.demand_max_vio
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "\nMaxVio = max load / mean load - 1 over the slots experts processed; CV = std / mean \
         of that load; entropy = H(load) / ln E; drop rate = slots dropped by capacity limits; \
         dead = experts (summed over layers) that processed no slot. Means are over MoE layers; \
         tokens/s is the median training step rate (sensitive to other load on the machine)."
    );
    let _ = writeln!(s, "\n## Per-layer MaxVio on validation text\n");
    let layer_ids: Vec<usize> = results
        .first()
        .map(|r| r.validation.layers.iter().map(|l| l.layer).collect())
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "| router |{}",
        layer_ids
            .iter()
            .map(|l| format!(" layer {l} |"))
            .collect::<String>()
    );
    let _ = writeln!(s, "|---|{}", "---|".repeat(layer_ids.len()));
    for r in results {
        let _ = writeln!(
            s,
            "| {} |{}",
            r.router,
            r.validation
                .layers
                .iter()
                .map(|l| format!(" {:.3} |", l.utilization.max_vio))
                .collect::<String>()
        );
    }
    let _ = writeln!(s, "\nPer-expert load: {}", {
        results
            .iter()
            .map(|r| {
                format!(
                    "[{}]({})",
                    r.router,
                    r.load_plot
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    });
    s
}
