//! `sparrow tokenizer train`: a byte-level BPE tokenizer from a corpus.

use anyhow::Result;
use clap::Subcommand;
use sparrow::tokenizer::Tokenizer;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum TokenizerCmd {
    /// Train a byte-level BPE tokenizer on a folder of .txt files.
    Train {
        #[arg(long)]
        corpus: PathBuf,
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        #[arg(long, default_value = "tokenizer.json")]
        out: PathBuf,
    },
}

pub fn run(cmd: TokenizerCmd, progress: bool) -> Result<()> {
    let TokenizerCmd::Train {
        corpus,
        vocab_size,
        out,
    } = cmd;
    let files = sparrow::data::corpus::list_text_files(&corpus)?;
    let tok = Tokenizer::train(&files, vocab_size, progress)?;
    tok.save(&out)?;
    println!(
        "tokenizer with {} entries written to {}",
        tok.vocab_size(),
        out.display()
    );
    Ok(())
}
