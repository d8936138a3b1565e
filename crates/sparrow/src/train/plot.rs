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

    crate::font::register()?;
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

/// The colours of successive curves.
const PALETTE: [RGBColor; 12] = [
    BLUE,
    RED,
    GREEN,
    MAGENTA,
    CYAN,
    BLACK,
    RGBColor(230, 140, 0),
    RGBColor(120, 60, 160),
    RGBColor(140, 90, 40),
    RGBColor(120, 120, 120),
    RGBColor(128, 128, 0),
    RGBColor(240, 100, 160),
];

/// One named curve of [`plot_series`].
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Axis labels and scales of [`plot_series`].
pub struct Axes<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
    pub log_x: bool,
    pub log_y: bool,
}

/// Draw several curves (lines with points, one colour each) into an SVG file.
pub fn plot_series(series: &[Series], out: &Path, axes: &Axes) -> Result<()> {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    if pts.is_empty() {
        return Err(Error::Invalid(format!("plot {}: no points", out.display())));
    }
    let (x0, x1) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let (y0, y1) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    let draw_err =
        |e: &dyn std::fmt::Display| Error::Invalid(format!("plot {}: {e}", out.display()));
    crate::font::register()?;
    let root = SVGBackend::new(out, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    macro_rules! draw {
        ($xr:expr, $yr:expr) => {{
            let mut chart = ChartBuilder::on(&root)
                .caption(axes.title, ("sans-serif", 22))
                .margin(16)
                .x_label_area_size(44)
                .y_label_area_size(64)
                .build_cartesian_2d($xr, $yr)
                .map_err(|e| draw_err(&e))?;
            chart
                .configure_mesh()
                .x_desc(axes.x)
                .y_desc(axes.y)
                .draw()
                .map_err(|e| draw_err(&e))?;
            for (i, s) in series.iter().enumerate() {
                let c = PALETTE[i % PALETTE.len()];
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
                    .map_err(|e| draw_err(&e))?
                    .label(s.label.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
                chart
                    .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.filled())))
                    .map_err(|e| draw_err(&e))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| draw_err(&e))?;
        }};
    }
    let ypad = ((y1 - y0) * 0.05).max(1e-3);
    match (axes.log_x, axes.log_y) {
        (true, true) => draw!(
            (x0 * 0.8..x1 * 1.25).log_scale(),
            (y0 * 0.8..y1 * 1.25).log_scale()
        ),
        (true, false) => draw!((x0 * 0.8..x1 * 1.25).log_scale(), (y0 - ypad)..(y1 + ypad)),
        (false, true) => draw!(x0..x1, (y0 * 0.8..y1 * 1.25).log_scale()),
        (false, false) => draw!(x0..x1, (y0 - ypad)..(y1 + ypad)),
    }
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}

/// The validation-loss curves of several runs, one per `(label, metrics.jsonl)`.
pub fn plot_val_losses(
    runs: &[(String, std::path::PathBuf)],
    out: &Path,
    title: &str,
) -> Result<()> {
    let mut series = Vec::new();
    for (label, path) in runs {
        let points: Vec<(f64, f64)> = read_metrics(path)?
            .iter()
            .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get("val_loss")?.as_f64()?)))
            .collect();
        if points.is_empty() {
            return Err(Error::Invalid(format!(
                "{} holds no val_loss records",
                path.display()
            )));
        }
        series.push(Series {
            label: label.clone(),
            points,
        });
    }
    plot_series(
        &series,
        out,
        &Axes {
            title,
            x: "step",
            y: "validation loss (nats/token)",
            log_x: false,
            log_y: false,
        },
    )
}

/// One curve of [`plot_bands`]: a mean line and a band (lowest to highest) around it.
pub struct BandSeries {
    pub label: String,
    /// `(x, mean, low, high)`, ascending in x.
    pub points: Vec<(f64, f64, f64, f64)>,
}

impl BandSeries {
    /// The mean, lowest and highest value at every x that all `runs` share (runs
    /// logged at other steps, or cut short, contribute the common steps only).
    pub fn over_runs(label: &str, runs: &[Vec<(f64, f64)>]) -> Self {
        let mut points = Vec::new();
        if let Some(first) = runs.first() {
            for &(x, _) in first {
                let ys: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| r.iter().find(|p| p.0 == x).map(|p| p.1))
                    .collect();
                if ys.len() == runs.len() {
                    let mean = ys.iter().sum::<f64>() / ys.len() as f64;
                    let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    points.push((x, mean, lo, hi));
                }
            }
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        Self {
            label: label.to_string(),
            points,
        }
    }
}

/// Draw mean lines with shaded bands (one colour per series) into an SVG file.
pub fn plot_bands(series: &[BandSeries], out: &Path, axes: &Axes) -> Result<()> {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, _, lo, hi) in all() {
        if x.is_finite() && lo.is_finite() && hi.is_finite() {
            (x0, x1) = (x0.min(x), x1.max(x));
            (y0, y1) = (y0.min(lo), y1.max(hi));
        }
    }
    if !x0.is_finite() {
        return Err(Error::Invalid(format!("plot {}: no points", out.display())));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let ypad = ((y1 - y0) * 0.05).max(1e-3);
    let draw_err =
        |e: &dyn std::fmt::Display| Error::Invalid(format!("plot {}: {e}", out.display()));
    crate::font::register()?;
    let root = SVGBackend::new(out, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(axes.title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, (y0 - ypad)..(y1 + ypad))
        .map_err(|e| draw_err(&e))?;
    chart
        .configure_mesh()
        .x_desc(axes.x)
        .y_desc(axes.y)
        .draw()
        .map_err(|e| draw_err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let mut outline: Vec<(f64, f64)> = s.points.iter().map(|p| (p.0, p.3)).collect();
        outline.extend(s.points.iter().rev().map(|p| (p.0, p.2)));
        if outline.len() >= 3 {
            chart
                .draw_series(std::iter::once(Polygon::new(outline, c.mix(0.15).filled())))
                .map_err(|e| draw_err(&e))?;
        }
        chart
            .draw_series(LineSeries::new(
                s.points.iter().map(|p| (p.0, p.1)),
                c.stroke_width(2),
            ))
            .map_err(|e| draw_err(&e))?
            .label(s.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        chart
            .draw_series(
                s.points
                    .iter()
                    .map(|p| Circle::new((p.0, p.1), 3, c.filled())),
            )
            .map_err(|e| draw_err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw_err(&e))?;
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}
