//! What a router experiment measured: one `RouterResult` per run (arm and seed), and
//! per arm an `ArmSummary` over seeds, paired with the baseline arm seed by seed.

use super::setup::RouterExperiment;
use crate::eval::routing::LayerRouting;
use crate::experiment::spread::Compared;
use serde::Serialize;
use std::path::PathBuf;

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
    pub fn new(layers: Vec<LayerRouting>) -> Self {
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

/// One run's outcome (one arm, one seed).
#[derive(Debug, Clone, Serialize)]
pub struct RouterResult {
    /// The arm's name.
    pub arm: String,
    /// Its router kind.
    pub router: String,
    pub seed: u64,
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

/// One arm over every seed, each metric compared with the baseline arm's on the same
/// seeds (`topk_softmax`, when it ran).
#[derive(Debug, Clone, Serialize)]
pub struct ArmSummary {
    pub arm: String,
    pub router: String,
    pub seeds: Vec<u64>,
    pub val_loss: Compared,
    pub max_vio: Compared,
    pub cv: Compared,
    pub drop_rate: Compared,
    pub dead: Compared,
    pub demand_max_vio: Compared,
    pub ood_max_vio: Option<Compared>,
    pub ood_cv: Option<Compared>,
    pub ood_drop_rate: Option<Compared>,
    /// For an arm with changed fields: its metrics against the plain arm of its router
    /// on the same seeds, when that ran.
    pub against_router: Option<VariantComparison>,
}

/// A variant arm against the plain arm of its router kind, seed by seed.
#[derive(Debug, Clone, Serialize)]
pub struct VariantComparison {
    /// The plain arm's name.
    pub against: String,
    pub val_loss: Compared,
    pub max_vio: Compared,
    pub cv: Compared,
    pub drop_rate: Compared,
}

/// Everything the experiment measured: `routers.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RouterReport {
    /// The arm the others are compared with, when it ran.
    pub baseline: Option<String>,
    pub summary: Vec<ArmSummary>,
    pub runs: Vec<RouterResult>,
}

/// The arm every other is compared with.
pub const BASELINE_ARM: &str = "topk_softmax";

/// Per-arm summaries of `runs`, compared with the baseline arm seed by seed.
pub fn summarise(exp: &RouterExperiment, runs: Vec<RouterResult>) -> RouterReport {
    let of_arm = |name: &str| -> Vec<&RouterResult> {
        exp.seeds
            .iter()
            .filter_map(|s| runs.iter().find(|r| r.arm == name && r.seed == *s))
            .collect()
    };
    let baseline_runs = of_arm(BASELINE_ARM);
    let baseline = (!baseline_runs.is_empty()).then(|| BASELINE_ARM.to_string());
    let summary = exp
        .arms
        .iter()
        .filter_map(|arm| {
            let mine = of_arm(&arm.name);
            let base = (arm.name != BASELINE_ARM).then_some(baseline_runs.as_slice());
            let compare = |f: &dyn Fn(&RouterResult) -> Option<f64>| compare_runs(&mine, base, f);
            let plain = exp
                .arms
                .iter()
                .find(|a| a.kind == arm.kind && a.overrides.is_empty())
                .filter(|_| !arm.overrides.is_empty());
            let against_router = plain.and_then(|p| {
                let theirs = of_arm(&p.name);
                let vs = |f: &dyn Fn(&RouterResult) -> Option<f64>| {
                    compare_runs(&mine, Some(&theirs), f)
                };
                Some(VariantComparison {
                    against: p.name.clone(),
                    val_loss: vs(&|r| Some(r.val_loss))?,
                    max_vio: vs(&|r| Some(r.validation.max_vio))?,
                    cv: vs(&|r| Some(r.validation.cv))?,
                    drop_rate: vs(&|r| Some(r.validation.drop_rate))?,
                })
            });
            Some(ArmSummary {
                arm: arm.name.clone(),
                router: arm.kind.name().to_string(),
                seeds: mine.iter().map(|r| r.seed).collect(),
                val_loss: compare(&|r| Some(r.val_loss))?,
                max_vio: compare(&|r| Some(r.validation.max_vio))?,
                cv: compare(&|r| Some(r.validation.cv))?,
                drop_rate: compare(&|r| Some(r.validation.drop_rate))?,
                dead: compare(&|r| Some(r.validation.dead as f64))?,
                demand_max_vio: compare(&|r| Some(r.validation.demand_max_vio))?,
                ood_max_vio: compare(&|r| r.ood.as_ref().map(|o| o.max_vio)),
                ood_cv: compare(&|r| r.ood.as_ref().map(|o| o.cv)),
                ood_drop_rate: compare(&|r| r.ood.as_ref().map(|o| o.drop_rate)),
                against_router,
            })
        })
        .collect();
    RouterReport {
        baseline,
        summary,
        runs,
    }
}

/// One metric of `mine` over seeds, paired with `base` (the same seeds in the same order)
/// when given and complete.
fn compare_runs(
    mine: &[&RouterResult],
    base: Option<&[&RouterResult]>,
    f: &dyn Fn(&RouterResult) -> Option<f64>,
) -> Option<Compared> {
    let values: Vec<f64> = mine.iter().map(|r| f(r)).collect::<Option<_>>()?;
    let base: Option<Vec<f64>> = base
        .filter(|b| b.len() == mine.len())
        .and_then(|b| b.iter().map(|r| f(r)).collect::<Option<_>>());
    Compared::new(&values, base.as_deref())
}
