//! The font every plot draws its text with: egui's bundled Ubuntu Light, registered with
//! plotters as `sans-serif` (plotters' text layout needs real glyph metrics for SVG and
//! PNG alike), so plots need no system fonts.

use crate::error::{Error, Result};
use plotters::style::FontStyle;
use std::sync::OnceLock;

/// The family name plots use.
pub const FAMILY: &str = "sans-serif";

/// Register the bundled font once per process; later calls return the first outcome.
pub fn register() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font(
            FAMILY,
            FontStyle::Normal,
            epaint_default_fonts::UBUNTU_LIGHT,
        )
        .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(
            "the bundled plot font could not be loaded".into(),
        ))
    }
}
