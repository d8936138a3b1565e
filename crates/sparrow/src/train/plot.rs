//! Training curves as an SVG picture: training loss per step (thin line) and validation
//! loss (line with points) from a run's `metrics.jsonl`.

use super::metrics::read_metrics;
use crate::error::{Error, Result};
use plotters::prelude::*;
use std::path::Path;

/// Draw `metrics_path`'s loss curves into `out` (SVG). Returns (train points, val points).
pub fn plot_losses(metrics_path: &Path, out: &Path, title: &str) -> Result<(usize, usize)> {
    let records = read_metrics(metrics_path)?;
    let point = |key: &str| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
            .filter(|(_, y)| y.is_finite())
            .collect()
    };
    let train = point("loss");
    let val = point("val_loss");
    if train.is_empty() {
        return Err(Error::Invalid(format!(
            "{} holds no loss records",
            metrics_path.display()
        )));
    }
    let max_step = train.iter().chain(&val).map(|p| p.0).fold(1.0, f64::max);
    let ys = train.iter().chain(&val).map(|p| p.1);
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let draw_err =
        |e: &dyn std::fmt::Display| Error::Invalid(format!("plot {}: {e}", out.display()));

    let root = SVGBackend::new(out, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..max_step, (lo - pad)..(hi + pad))
        .map_err(|e| draw_err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("loss (nats/token)")
        .draw()
        .map_err(|e| draw_err(&e))?;
    chart
        .draw_series(LineSeries::new(train.iter().copied(), BLUE.mix(0.5)))
        .map_err(|e| draw_err(&e))?
        .label("train loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    if !val.is_empty() {
        chart
            .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))
            .map_err(|e| draw_err(&e))?
            .label("validation loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .draw_series(val.iter().map(|&p| Circle::new(p, 3, RED.filled())))
            .map_err(|e| draw_err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw_err(&e))?;
    root.present().map_err(|e| draw_err(&e))?;
    Ok((train.len(), val.len()))
}
