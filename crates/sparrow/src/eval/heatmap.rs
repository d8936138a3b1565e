//! PNG heatmap of a retrieval evaluation: prompt length across, key depth down, each
//! cell coloured from red (0%) to green (100%) and labelled with its accuracy.

use super::retrieval::RetrievalReport;
use crate::error::{Error, Result};
use plotters::prelude::*;
use std::path::Path;

const FONT: &str = crate::font::FAMILY;

/// Red (0) through yellow to green (1).
fn accuracy_color(a: f64) -> RGBColor {
    let a = a.clamp(0.0, 1.0);
    let (r, g) = if a < 0.5 {
        (220.0, 60.0 + 340.0 * a)
    } else {
        (220.0 - 340.0 * (a - 0.5), 230.0)
    };
    RGBColor(r as u8, g as u8, 70)
}

/// Draw `report`'s cells into `out` (PNG).
pub fn plot_heatmap(out: &Path, title: &str, report: &RetrievalReport) -> Result<()> {
    crate::font::register()?;
    let lengths: Vec<usize> = report.by_length.iter().map(|l| l.length).collect();
    let depths = report.depths();
    if lengths.is_empty() || depths.is_empty() {
        return Err(Error::Invalid("no evaluation cells to plot".into()));
    }
    let (nx, ny) = (lengths.len(), depths.len());
    let draw_err =
        |e: &dyn std::fmt::Display| Error::Invalid(format!("plot {}: {e}", out.display()));
    let width = (160 + 110 * nx).max(60 + 10 * title.len()) as u32;
    let height = (140 + 60 * ny) as u32;
    let root = BitMapBackend::new(out, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..nx as f64, 0f64..ny as f64)
        .map_err(|e| draw_err(&e))?;
    let xl = lengths.clone();
    let yl = depths.clone();
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(nx * 2 + 1)
        .y_labels(ny * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 1e-6 && i < xl.len() {
                xl[i].to_string()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| {
            let i = y.floor() as usize;
            if (y - i as f64 - 0.5).abs() < 1e-6 && i < yl.len() {
                format!("{}", yl[ny - 1 - i])
            } else {
                String::new()
            }
        })
        .x_desc("prompt length (tokens)")
        .y_desc("key depth")
        .label_style((FONT, 15))
        .draw()
        .map_err(|e| draw_err(&e))?;
    for c in &report.cells {
        let (Some(x), Some(y)) = (
            lengths.iter().position(|&l| l == c.length),
            depths.iter().position(|&d| d == c.depth),
        ) else {
            continue;
        };
        // Depth 0 (key near the start) at the top.
        let y = ny - 1 - y;
        let (x0, y0) = (x as f64, y as f64);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x0, y0), (x0 + 1.0, y0 + 1.0)],
                accuracy_color(c.accuracy).filled(),
            )))
            .map_err(|e| draw_err(&e))?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{:.0}%", c.accuracy * 100.0),
                (x0 + 0.35, y0 + 0.6),
                (FONT, 16).into_font().color(&BLACK),
            )))
            .map_err(|e| draw_err(&e))?;
    }
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colors_run_red_to_green() {
        assert_eq!(accuracy_color(0.0), RGBColor(220, 60, 70));
        assert_eq!(accuracy_color(1.0), RGBColor(50, 230, 70));
        let mid = accuracy_color(0.5);
        assert!(mid.0 > 200 && mid.1 > 200);
    }
}
