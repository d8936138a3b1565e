//! One report type for every command that prints results (DESIGN.md §5b): the same
//! rows go to stdout either as an aligned table under its title lines or, with
//! `--json`, as one JSON object per row, so a script and a person read the same
//! figures. Rows print as they arrive (long benchmarks stream them); notes are lines
//! for people (table mode), records are objects for scripts (JSON mode).

use anyhow::Result;
use serde::Serialize;

/// One column: its header, its width and how a row fills it.
struct Column<T> {
    header: &'static str,
    width: usize,
    cell: Box<dyn Fn(&T) -> String>,
}

/// A table of `T` rows, or JSON lines of them.
pub struct Report<T> {
    json: bool,
    /// Added to each JSON row as `"bench": tag` (rows of a benchmark), if set.
    tag: Option<&'static str>,
    columns: Vec<Column<T>>,
    header_printed: bool,
}

impl<T: Serialize> Report<T> {
    pub fn new(json: bool) -> Self {
        Self {
            json,
            tag: None,
            columns: Vec::new(),
            header_printed: false,
        }
    }

    /// Tag each JSON row with `"bench": tag`.
    pub fn tagged(mut self, tag: &'static str) -> Self {
        self.tag = Some(tag);
        self
    }

    /// Add a column, right-aligned in `width` characters.
    pub fn col(
        mut self,
        header: &'static str,
        width: usize,
        cell: impl Fn(&T) -> String + 'static,
    ) -> Self {
        self.columns.push(Column {
            header,
            width,
            cell: Box::new(cell),
        });
        self
    }

    /// A line for people (table mode only): titles, notes, summaries.
    pub fn note(&self, line: impl std::fmt::Display) {
        if !self.json {
            println!("{line}");
        }
    }

    /// A record for scripts (JSON mode only): the machine line, ratios, summaries.
    pub fn record(&self, value: serde_json::Value) {
        if self.json {
            println!("{value}");
        }
    }

    /// Print one row (the header first, once).
    pub fn row(&mut self, r: &T) -> Result<()> {
        if self.json {
            let mut v = serde_json::to_value(r)?;
            if let (Some(tag), Some(obj)) = (self.tag, v.as_object_mut()) {
                obj.insert("bench".into(), tag.into());
            }
            println!("{v}");
            return Ok(());
        }
        if !self.header_printed {
            let head: Vec<String> = self
                .columns
                .iter()
                .map(|c| format!("{:>w$}", c.header, w = c.width))
                .collect();
            println!("{}", head.join(" "));
            self.header_printed = true;
        }
        let cells: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("{:>w$}", (c.cell)(r), w = c.width))
            .collect();
        println!("{}", cells.join(" "));
        Ok(())
    }

    /// Print every row.
    pub fn rows(&mut self, rows: &[T]) -> Result<()> {
        rows.iter().try_for_each(|r| self.row(r))
    }
}

/// A number with `p` decimals, or "-" when absent or not finite.
pub fn fixed(x: Option<f64>, p: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.p$}"),
        _ => "-".into(),
    }
}
