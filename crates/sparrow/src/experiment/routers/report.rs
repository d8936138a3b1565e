//! The reports of `sparrow experiment routers`: `routers.json`, `routers.md`, and the
//! curves over training of every arm (`val-loss.svg`, `max-vio.svg`: the mean over
//! seeds as a line, the lowest to the highest seed as a band).

use super::results::{RouterReport, BASELINE_ARM};
use super::setup::RouterExperiment;
use crate::error::{Error, Result};
use crate::experiment::spread::{Compared, Spread};
use crate::train::metrics::read_metrics;
use crate::train::plot::{plot_bands, Axes, BandSeries};
use std::fmt::Write as _;
use std::path::Path;

/// Write `routers.json`, `routers.md`, `val-loss.svg` and `max-vio.svg` into `exp.out`.
pub fn write(exp: &RouterExperiment, report: &RouterReport) -> Result<()> {
    let json = serde_json::to_string_pretty(report)
        .map_err(|e| Error::Invalid(format!("serialising results: {e}")))?;
    crate::fsio::write_atomic(&exp.out.join("routers.json"), json.as_bytes())?;
    crate::fsio::write_atomic(
        &exp.out.join("routers.md"),
        markdown(exp, report).as_bytes(),
    )?;
    // Each run's log, read once for both plots.
    let logs = report
        .runs
        .iter()
        .map(|r| read_metrics(&r.run_dir.join("metrics.jsonl")))
        .collect::<Result<Vec<_>>>()?;
    let curves = |key: &dyn Fn(&serde_json::Value) -> Option<f64>| -> Vec<BandSeries> {
        exp.arms
            .iter()
            .map(|arm| {
                let per_seed: Vec<Vec<(f64, f64)>> = report
                    .runs
                    .iter()
                    .zip(&logs)
                    .filter(|(r, _)| r.arm == arm.name)
                    .map(|(_, log)| curve(log, key))
                    .collect();
                BandSeries::over_runs(&arm.name, &per_seed)
            })
            .collect()
    };
    let seeds = exp.seeds.len();
    plot_bands(
        &curves(&|r| r.get("val_loss")?.as_f64()),
        &exp.out.join("val-loss.svg"),
        &Axes {
            title: &format!("validation loss by router ({seeds} seeds: mean, min-max band)"),
            x: "step",
            y: "validation loss (nats/token)",
            log_x: false,
            log_y: false,
        },
    )?;
    plot_bands(
        &curves(&mean_layer_max_vio),
        &exp.out.join("max-vio.svg"),
        &Axes {
            title: &format!(
                "MaxVio on validation text, mean of MoE layers ({seeds} seeds: mean, min-max band)"
            ),
            x: "step",
            y: "MaxVio",
            log_x: false,
            log_y: false,
        },
    )
}

/// `(step, value)` of every record of a run's `metrics.jsonl` that has the value.
fn curve(
    records: &[serde_json::Value],
    key: &dyn Fn(&serde_json::Value) -> Option<f64>,
) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|r| Some((r.get("step")?.as_f64()?, key(r)?)))
        .filter(|p| p.1.is_finite())
        .collect()
}

/// The mean over MoE layers of a validation record's MaxVio (`routing[*].max_vio`).
fn mean_layer_max_vio(record: &serde_json::Value) -> Option<f64> {
    let layers = record.get("routing")?.as_array()?;
    let v: Vec<f64> = layers
        .iter()
        .filter_map(|l| l.get("max_vio")?.as_f64())
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// `mean ± std [min, max]` (the range only over several seeds).
fn spread_cell(s: &Spread, decimals: usize) -> String {
    if s.n < 2 {
        return format!("{:.*}", decimals, s.mean);
    }
    format!(
        "{:.*} ± {:.*} [{:.*}, {:.*}]",
        decimals, s.mean, decimals, s.std, decimals, s.min, decimals, s.max
    )
}

/// The change of the mean against the baseline, the per-seed differences' range, and
/// `†` when the two arms' seed ranges do not overlap.
fn delta_cell(c: &Compared, decimals: usize) -> String {
    let Some(d) = &c.delta else {
        return "-".into();
    };
    let rel = c
        .relative
        .map(|r| format!("{:+.1}%", r * 100.0))
        .unwrap_or_else(|| format!("{:+.*}", decimals, d.mean));
    let mark = if c.beyond_spread { " †" } else { "" };
    if d.n < 2 {
        return format!("{rel}{mark}");
    }
    format!(
        "{rel} ({:+.*}..{:+.*}){mark}",
        decimals, d.min, decimals, d.max
    )
}

fn percent_cell(s: &Spread) -> String {
    let p = |v: f64| v * 100.0;
    if s.n < 2 {
        return format!("{:.2}%", p(s.mean));
    }
    format!("{:.2}% [{:.2}, {:.2}]", p(s.mean), p(s.min), p(s.max))
}

/// The report: arms over seeds (mean, spread, paired differences to the baseline), every
/// run, out-of-distribution routing, per-layer MaxVio.
pub fn markdown(exp: &RouterExperiment, report: &RouterReport) -> String {
    let o = &exp.options;
    let c = &exp.config;
    let mut s = String::new();
    let _ = writeln!(s, "# Routers side by side\n");
    let seeds: Vec<String> = exp.seeds.iter().map(|s| s.to_string()).collect();
    let _ = writeln!(
        s,
        "{} layers ({} MoE), {} routed experts, top-{}, {} shared; capacity_factor {}, Switch loss coef {}, CV^2 loss coef {}, z-loss coef {}; \
         {} steps of {} x {} tokens, lr {}, seeds {} (each seed its own initialisation and data order, shared by the arms); \
         utilization over {} held-out windows of {} tokens (capacity limits applied, batches of {}).\n",
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
        o.lr,
        seeds.join(", "),
        o.val_batches * o.batch_size,
        o.seq_len,
        o.batch_size,
    );
    let changed: Vec<String> = exp
        .arms
        .iter()
        .filter(|a| !a.overrides.is_empty())
        .map(|a| {
            let fields: Vec<String> = a
                .overrides
                .iter()
                .map(|(k, v)| format!("`{k}` = {v}"))
                .collect();
            format!(
                "- `{}`: {} with {}",
                a.name,
                a.kind.name(),
                fields.join(", ")
            )
        })
        .collect();
    if !changed.is_empty() {
        let _ = writeln!(s, "Arms with changed fields:\n{}\n", changed.join("\n"));
    }
    let _ = writeln!(
        s,
        "## Over seeds\n\nEach cell: mean ± sample std [lowest, highest seed]. Against `{BASELINE_ARM}`: \
         the change of the mean, the range of the per-seed differences (same seed, same data), and † when \
         the two arms' seed ranges do not overlap (every seed of one beats every seed of the other).\n"
    );
    let _ = writeln!(
        s,
        "| router | val loss | vs {BASELINE_ARM} | MaxVio (mean of layers) | vs {BASELINE_ARM} | CV | vs {BASELINE_ARM} | drop rate | dead | MaxVio before capacity |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for a in &report.summary {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            a.arm,
            spread_cell(&a.val_loss.spread, 4),
            delta_cell(&a.val_loss, 4),
            spread_cell(&a.max_vio.spread, 3),
            delta_cell(&a.max_vio, 3),
            spread_cell(&a.cv.spread, 3),
            delta_cell(&a.cv, 3),
            percent_cell(&a.drop_rate.spread),
            spread_cell(&a.dead.spread, 1),
            spread_cell(&a.demand_max_vio.spread, 3),
        );
    }
    let _ = writeln!(
        s,
        "\nMaxVio = max load / mean load - 1 over the slots experts processed; CV = std / mean \
         of that load; entropy = H(load) / ln E; drop rate = slots dropped by capacity limits; \
         dead = experts (summed over layers) that processed no slot. Means are over MoE layers; \
         tokens/s is the median training step rate (sensitive to other load on the machine). \
         Curves: `val-loss.svg`, `max-vio.svg`."
    );
    let variants: Vec<_> = report
        .summary
        .iter()
        .filter_map(|a| Some((a, a.against_router.as_ref()?)))
        .collect();
    if !variants.is_empty() {
        let _ = writeln!(
            s,
            "\n## Arms with changed fields against their router\n\nThe same cells, paired with the \
             plain arm of the same router kind instead of `{BASELINE_ARM}`.\n"
        );
        let _ = writeln!(
            s,
            "| arm | against | val loss | MaxVio | CV | drop rate (change in points) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for (a, v) in variants {
            let points = v
                .drop_rate
                .delta
                .map(|d| format!("{:+.2}", d.mean * 100.0))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                a.arm,
                v.against,
                delta_cell(&v.val_loss, 4),
                delta_cell(&v.max_vio, 3),
                delta_cell(&v.cv, 3),
                points,
            );
        }
    }
    if let Some(ood) = &exp.ood_corpus {
        let _ = writeln!(
            s,
            "\n## Out of distribution: {} (routers frozen), over seeds\n",
            ood.display()
        );
        let _ = writeln!(
            s,
            "| router | MaxVio | change from validation | CV | change from validation | drop rate |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for a in &report.summary {
            if let (Some(mv), Some(cv), Some(dr)) = (&a.ood_max_vio, &a.ood_cv, &a.ood_drop_rate) {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:+.3} | {} | {:+.3} | {} |",
                    a.arm,
                    spread_cell(&mv.spread, 3),
                    mv.spread.mean - a.max_vio.spread.mean,
                    spread_cell(&cv.spread, 3),
                    cv.spread.mean - a.cv.spread.mean,
                    percent_cell(&dr.spread),
                );
            }
        }
    }
    let _ = writeln!(s, "\n## Every run\n");
    let _ = writeln!(
        s,
        "| router | seed | val loss | MaxVio (mean) | MaxVio (worst) | CV | entropy | drop rate | dead | MaxVio before capacity | OOD MaxVio | tokens/s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &report.runs {
        let v = &r.validation;
        let _ = writeln!(
            s,
            "| {} | {} | {:.4} | {:.3} | {:.3} | {:.3} | {:.4} | {:.2}% | {} | {:.3} | {} | {:.0} |",
            r.arm,
            r.seed,
            r.val_loss,
            v.max_vio,
            v.max_vio_worst,
            v.cv,
            v.entropy,
            v.drop_rate * 100.0,
            v.dead,
            v.demand_max_vio,
            r.ood
                .as_ref()
                .map(|o| format!("{:.3}", o.max_vio))
                .unwrap_or_else(|| "-".into()),
            r.tokens_per_s
        );
    }
    per_layer_table(&mut s, report);
    s
}

/// Per-layer MaxVio on validation text, mean over seeds.
fn per_layer_table(s: &mut String, report: &RouterReport) {
    let _ = writeln!(
        s,
        "\n## Per-layer MaxVio on validation text (mean over seeds)\n"
    );
    let layer_ids: Vec<usize> = report
        .runs
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
    for a in &report.summary {
        let runs: Vec<_> = report.runs.iter().filter(|r| r.arm == a.arm).collect();
        let cells: String = (0..layer_ids.len())
            .map(|i| {
                let v: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| r.validation.layers.get(i).map(|l| l.utilization.max_vio))
                    .collect();
                format!(" {:.3} |", v.iter().sum::<f64>() / v.len().max(1) as f64)
            })
            .collect();
        let _ = writeln!(s, "| {} |{cells}", a.arm);
    }
    let plots: Vec<String> = report
        .runs
        .iter()
        .map(|r| {
            let rel = r
                .load_plot
                .strip_prefix(
                    r.run_dir
                        .parent()
                        .and_then(Path::parent)
                        .unwrap_or(Path::new("")),
                )
                .unwrap_or(&r.load_plot);
            format!("[{} seed {}]({})", r.arm, r.seed, rel.display())
        })
        .collect();
    let _ = writeln!(s, "\nPer-expert load: {}", plots.join(", "));
}
