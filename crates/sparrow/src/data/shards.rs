//! Tokenized corpus shards. Each document is encoded once, followed by EOS; the last
//! `val_fraction` of each document's tokens is held out for validation, so every source
//! is represented in both splits. The token streams are cached on disk (`train.bin`,
//! `val.bin`: little-endian u32) next to a `meta.json` that records which files and
//! tokenizer produced them; a cache that does not match is rebuilt.
//!
//! Batches are random contiguous windows whose positions come from a ChaCha8 stream
//! keyed by (seed, step): the data position of a run is its step, so a resumed run
//! draws exactly the batches an uninterrupted one would.

use super::corpus;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Train and validation token streams.
pub struct TokenData {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ShardMeta {
    files: Vec<(String, u64)>,
    tokenizer_fnv: u64,
    val_fraction: f64,
    train_tokens: usize,
    val_tokens: usize,
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn write_u32s(path: &Path, xs: &[u32]) -> Result<()> {
    let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
    crate::fsio::write_atomic(path, &bytes)
}

fn read_u32s(path: &Path, expected: usize) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.len() != expected * 4 {
        return Err(Error::Corpus(format!(
            "token cache {} has {} bytes, expected {}",
            path.display(),
            bytes.len(),
            expected * 4
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

impl TokenData {
    /// Load the cached shards in `cache_dir` if they match the corpus and tokenizer,
    /// otherwise tokenize `corpus_dir` and write the cache.
    pub fn load_or_build(
        corpus_dir: &Path,
        tokenizer: &Tokenizer,
        val_fraction: f64,
        cache_dir: &Path,
        show_progress: bool,
    ) -> Result<Self> {
        if !(0.0..0.5).contains(&val_fraction) {
            return Err(Error::Invalid(format!(
                "val_fraction must be in [0, 0.5), got {val_fraction}"
            )));
        }
        let files = corpus::list_text_files(corpus_dir)?;
        let mut listing = Vec::new();
        for f in &files {
            let len = std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len();
            let rel = f
                .strip_prefix(corpus_dir)
                .unwrap_or(f)
                .to_string_lossy()
                .into_owned();
            listing.push((rel, len));
        }
        let tokenizer_fnv = fnv(tokenizer.to_json()?.as_bytes());
        let meta_path = cache_dir.join("meta.json");
        if meta_path.exists() {
            if let Ok(meta) = crate::fsio::read_json::<ShardMeta>(&meta_path) {
                if meta.files == listing
                    && meta.tokenizer_fnv == tokenizer_fnv
                    && meta.val_fraction == val_fraction
                {
                    let train = read_u32s(&cache_dir.join("train.bin"), meta.train_tokens)?;
                    let val = read_u32s(&cache_dir.join("val.bin"), meta.val_tokens)?;
                    return Ok(Self { train, val });
                }
            }
        }
        let data = Self::build(&files, tokenizer, val_fraction, show_progress)?;
        std::fs::create_dir_all(cache_dir).map_err(|e| Error::io(cache_dir, e))?;
        write_u32s(&cache_dir.join("train.bin"), &data.train)?;
        write_u32s(&cache_dir.join("val.bin"), &data.val)?;
        let meta = ShardMeta {
            files: listing,
            tokenizer_fnv,
            val_fraction,
            train_tokens: data.train.len(),
            val_tokens: data.val.len(),
        };
        crate::fsio::write_json_atomic(&meta_path, &meta)?;
        Ok(data)
    }

    /// Tokenize the files without caching.
    pub fn build(
        files: &[PathBuf],
        tokenizer: &Tokenizer,
        val_fraction: f64,
        show_progress: bool,
    ) -> Result<Self> {
        let bar = crate::progress::bar(files.len() as u64, "tokenizing", show_progress);
        let mut train = Vec::new();
        let mut val = Vec::new();
        for f in files {
            bar.set_message(format!(
                "tokenizing {}",
                f.file_name().unwrap_or_default().to_string_lossy()
            ));
            let text = corpus::read_document(f)?;
            let pieces = corpus::split_at_lines(&text, 1 << 16);
            let mut ids: Vec<u32> = Vec::new();
            for chunk in tokenizer.encode_batch(&pieces)? {
                ids.extend(chunk);
            }
            ids.push(tokenizer.eos_id);
            let n_val = ((ids.len() as f64) * val_fraction).round() as usize;
            let cut = ids.len() - n_val;
            train.extend_from_slice(&ids[..cut]);
            val.extend_from_slice(&ids[cut..]);
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(Self { train, val })
    }
}

/// Draw `batch` random windows of `seq_len + 1` tokens from `tokens` for `step`.
/// Returns (inputs, targets), each batch * seq_len, row-major.
pub fn sample_batch(
    tokens: &[u32],
    batch: usize,
    seq_len: usize,
    seed: u64,
    step: u64,
) -> Result<(Vec<u32>, Vec<u32>)> {
    if tokens.len() <= seq_len + 1 {
        return Err(Error::Corpus(format!(
            "split has {} tokens, too few for windows of {} (lower `seq_len` or add text)",
            tokens.len(),
            seq_len + 1
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step);
    let mut inputs = Vec::with_capacity(batch * seq_len);
    let mut targets = Vec::with_capacity(batch * seq_len);
    for _ in 0..batch {
        let start = rng.random_range(0..tokens.len() - seq_len);
        inputs.extend_from_slice(&tokens[start..start + seq_len]);
        targets.extend_from_slice(&tokens[start + 1..start + seq_len + 1]);
    }
    Ok((inputs, targets))
}

/// `count` evenly spaced windows over `tokens` (the fixed validation set).
pub fn eval_windows(
    tokens: &[u32],
    count: usize,
    seq_len: usize,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    if tokens.len() <= seq_len + 1 {
        return Err(Error::Corpus(format!(
            "validation split has {} tokens, too few for windows of {} (lower `seq_len` or raise `val_fraction`)",
            tokens.len(),
            seq_len + 1
        )));
    }
    let span = tokens.len() - seq_len - 1;
    Ok((0..count)
        .map(|i| {
            let s = if count > 1 { i * span / (count - 1) } else { 0 };
            (
                tokens[s..s + seq_len].to_vec(),
                tokens[s + 1..s + seq_len + 1].to_vec(),
            )
        })
        .collect())
}
