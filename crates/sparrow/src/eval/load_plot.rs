//! PNG picture of per-expert load: for each MoE layer, a bar per expert of its load over
//! the mean load (1 = perfectly even), layers side by side, so a router's imbalance and
//! its dead experts are visible at a glance.

use crate::error::{Error, Result};
use plotters::prelude::*;
use std::path::Path;

const FONT: &str = crate::font::FAMILY;

/// Draw `layers` ((layer index, slots per expert) each) into `out` (PNG).
pub fn plot_expert_load(out: &Path, title: &str, layers: &[(usize, Vec<u64>)]) -> Result<()> {
    crate::font::register()?;
    let n_experts = layers.iter().map(|(_, l)| l.len()).max().unwrap_or(0);
    if layers.is_empty() || n_experts == 0 {
        return Err(Error::Invalid("no expert load to plot".into()));
    }
    let rel: Vec<Vec<f64>> = layers
        .iter()
        .map(|(_, load)| {
            let mean = load.iter().sum::<u64>() as f64 / load.len().max(1) as f64;
            load.iter()
                .map(|&l| if mean > 0.0 { l as f64 / mean } else { 0.0 })
                .collect()
        })
        .collect();
    // Headroom above the tallest bar for the legend.
    let y_max = rel.iter().flatten().fold(2.0f64, |a, &b| a.max(b)) * 1.3;
    let draw_err =
        |e: &dyn std::fmt::Display| Error::Invalid(format!("plot {}: {e}", out.display()));
    let root = BitMapBackend::new(out, (1000, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(n_experts as f64 - 0.5), 0.0..y_max)
        .map_err(|e| draw_err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n_experts.min(32))
        .x_label_formatter(&|x| format!("{:.0}", x))
        .x_desc("expert")
        .y_desc("load / mean load")
        .label_style((FONT, 15))
        .draw()
        .map_err(|e| draw_err(&e))?;
    let width = 0.8 / layers.len() as f64;
    for (li, ((layer, _), r)) in layers.iter().zip(&rel).enumerate() {
        let color = Palette99::pick(li).to_rgba();
        let x0 = -0.4 + li as f64 * width;
        chart
            .draw_series(r.iter().enumerate().map(|(e, &v)| {
                let x = e as f64 + x0;
                Rectangle::new([(x, 0.0), (x + width * 0.92, v)], color.filled())
            }))
            .map_err(|e| draw_err(&e))?
            .label(format!("layer {layer}"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .draw_series(LineSeries::new(
            [(-0.5, 1.0), (n_experts as f64 - 0.5, 1.0)],
            BLACK.stroke_width(1),
        ))
        .map_err(|e| draw_err(&e))?;
    chart
        .configure_series_labels()
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw_err(&e))?;
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}
