//! Byte-level BPE tokenizer: a thin wrapper over the Hugging Face `tokenizers` crate.
//! Training writes a standard `tokenizer.json` that transformers and other engines load
//! as is. Byte-level pre-tokenization without a prefix space makes `decode(encode(s))`
//! exact for every UTF-8 string (emoji, CJK, control characters, empty input).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder, TokenizerImpl};

/// Beginning-of-sequence special token (id 0 in tokenizers Sparrow trains).
pub const BOS_TOKEN: &str = "<|bos|>";
/// End-of-sequence / document-separator special token (id 1).
pub const EOS_TOKEN: &str = "<|eos|>";
pub const BOS_ID: u32 = 0;
pub const EOS_ID: u32 = 1;

/// A loaded tokenizer plus the ids of its special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: u32,
    pub eos_id: u32,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

fn tk_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Load a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Tokenizer(format!(
                "{} does not exist",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::from_inner(inner)
    }

    /// Parse a tokenizer from its JSON text.
    pub fn from_json(json: &str) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(tk_err)?;
        Self::from_inner(inner)
    }

    fn from_inner(inner: tokenizers::Tokenizer) -> Result<Self> {
        let bos_id = inner
            .token_to_id(BOS_TOKEN)
            .ok_or_else(|| Error::Tokenizer(format!("missing special token {BOS_TOKEN}")))?;
        let eos_id = inner
            .token_to_id(EOS_TOKEN)
            .ok_or_else(|| Error::Tokenizer(format!("missing special token {EOS_TOKEN}")))?;
        Ok(Self {
            inner,
            bos_id,
            eos_id,
        })
    }

    /// Train a byte-level BPE tokenizer of `vocab_size` entries (special tokens
    /// included) on the given text files.
    pub fn train(files: &[PathBuf], vocab_size: usize, show_progress: bool) -> Result<Self> {
        if files.is_empty() {
            return Err(Error::Tokenizer("no training files".into()));
        }
        let min_vocab = ByteLevel::alphabet().len() + 2;
        if vocab_size < min_vocab {
            return Err(Error::Tokenizer(format!(
                "vocab size {vocab_size} is below the byte alphabet plus special tokens ({min_vocab})"
            )));
        }
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(show_progress)
            .vocab_size(vocab_size)
            .min_frequency(2)
            .special_tokens(vec![
                AddedToken::from(BOS_TOKEN, true),
                AddedToken::from(EOS_TOKEN, true),
            ])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        // add_prefix_space = false keeps round trips exact; trim_offsets and the GPT-2
        // split regex as usual.
        let byte_level = ByteLevel::new(false, true, true);
        let mut tk: TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel> =
            TokenizerBuilder::new()
                .with_model(BPE::default())
                .with_normalizer(None)
                .with_pre_tokenizer(Some(byte_level))
                .with_post_processor(Some(byte_level))
                .with_decoder(Some(byte_level))
                .build()
                .map_err(tk_err)?;
        let names = files
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        tk.train_from_files(&mut trainer, names).map_err(tk_err)?;
        let json = tk.to_string(false).map_err(tk_err)?;
        Self::from_json(&json)
    }

    /// Atomically write `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.to_json()?;
        crate::fsio::write_atomic(path, json.as_bytes())
    }

    /// The tokenizer as `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(tk_err)
    }

    /// Vocabulary size including special tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` (no BOS/EOS added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode_fast(text, false)
            .map_err(tk_err)?
            .get_ids()
            .to_vec())
    }

    /// Encode many texts in parallel.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encs = self
            .inner
            .encode_batch_fast(texts.to_vec(), false)
            .map_err(tk_err)?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Text of `ids`; special tokens are kept unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tk_err)
    }
}
