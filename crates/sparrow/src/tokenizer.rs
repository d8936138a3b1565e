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
/// The HF file beside `tokenizer.json` that names special tokens and the chat template.
pub const CONFIG_FILE: &str = "tokenizer_config.json";
pub use crate::config::{BOS_ID, EOS_ID};

/// A loaded tokenizer plus the ids of its special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: u32,
    pub eos_id: u32,
    /// Whether a prompt starts with BOS (Sparrow's own tokenizers: yes; a GGUF file
    /// says so in `tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    /// Token ids that end generation (EOS, and end-of-turn tokens of chat models).
    pub stop_ids: Vec<u32>,
    /// The model's Jinja chat template, if it has one (see `crate::chat`).
    pub chat_template: Option<String>,
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

/// A `tokenizers` tokenizer from `tokenizer.json` text, parsed as JSON first: the
/// `tokenizers` crate (0.23) panics (`expect("Helper")` in its decoder) on a syntax
/// error inside the `decoder` object when it parses the text itself (found by
/// `fuzz/fuzz_targets/tokenizer_json.rs`); from a parsed value it returns errors.
fn parse_inner(text: &str) -> std::result::Result<tokenizers::Tokenizer, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    serde_json::from_value(value).map_err(|e| e.to_string())
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
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let inner =
            parse_inner(&text).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let config = path.with_file_name(CONFIG_FILE);
        if config.exists() {
            return Self::from_inner_and_config(inner, &config);
        }
        Self::from_inner(inner)
    }

    /// A tokenizer described by an HF `tokenizer_config.json` beside its
    /// `tokenizer.json`: `bos_token` / `eos_token` (a string or `{"content": ..}`),
    /// `add_bos_token` (default false), `chat_template` (a string, or a list of
    /// `{name, template}` of which `default` is used).
    fn from_inner_and_config(inner: tokenizers::Tokenizer, config: &Path) -> Result<Self> {
        let v: serde_json::Value = crate::fsio::read_json(config)?;
        let bad = |field: &str, what: &str| {
            Error::Tokenizer(format!("{}: `{field}` {what}", config.display()))
        };
        let token_text = |field: &str| -> Result<Option<String>> {
            match v.get(field) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map(|s| Some(s.to_string()))
                    .ok_or_else(|| bad(field, "is neither a string nor {\"content\": ..}")),
            }
        };
        let id_of = |field: &str, text: &str| {
            inner
                .token_to_id(text)
                .ok_or_else(|| bad(field, &format!("{text:?} is not in the vocabulary")))
        };
        let eos_text = token_text("eos_token")?.ok_or_else(|| bad("eos_token", "is missing"))?;
        let eos_id = id_of("eos_token", &eos_text)?;
        let bos_id = match token_text("bos_token")? {
            Some(t) => id_of("bos_token", &t)?,
            None => eos_id,
        };
        let add_bos = match v.get("add_bos_token") {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(_) => return Err(bad("add_bos_token", "is not a bool")),
        };
        let chat_template = match v.get("chat_template") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            Some(_) => return Err(bad("chat_template", "is neither a string nor a list")),
        };
        let stop_ids = crate::formats::gguf_tokenizer::end_of_generation_ids(vec![eos_id], |t| {
            inner.token_to_id(t)
        });
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            add_bos,
            stop_ids,
            chat_template,
        })
    }

    /// This tokenizer as GGUF stores it (`tokenizer.ggml.*`): byte-level BPE with a
    /// pre-tokenizer llama.cpp knows (GPT-2's regex: `gpt2`; digits split off first:
    /// `smollm`). Anything else is an error naming it.
    pub fn gguf_vocab(&self) -> Result<crate::formats::gguf_export::GgufVocab> {
        let v: serde_json::Value = serde_json::from_str(&self.to_json()?).map_err(tk_err)?;
        let bad = |m: String| Error::Tokenizer(format!("cannot write as GGUF: {m}"));
        let model = &v["model"];
        if model["type"] != "BPE" {
            return Err(bad(format!("model type {} is not BPE", model["type"])));
        }
        let n = self.vocab_size();
        let mut tokens: Vec<Option<String>> = vec![None; n];
        let mut types = vec![1i32; n];
        let vocab = model["vocab"]
            .as_object()
            .ok_or_else(|| bad("no vocabulary".into()))?;
        for (tok, id) in vocab {
            let id = id.as_u64().unwrap_or(u64::MAX) as usize;
            *tokens
                .get_mut(id)
                .ok_or_else(|| bad(format!("token id {id} past the vocabulary")))? =
                Some(tok.clone());
        }
        for t in v["added_tokens"].as_array().into_iter().flatten() {
            let id = t["id"].as_u64().unwrap_or(u64::MAX) as usize;
            let content = t["content"].as_str().unwrap_or_default().to_string();
            *tokens
                .get_mut(id)
                .ok_or_else(|| bad(format!("added token id {id} past the vocabulary")))? =
                Some(content);
            types[id] = if t["special"].as_bool().unwrap_or(false) {
                3
            } else {
                4
            };
        }
        let tokens = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.ok_or_else(|| bad(format!("no token has id {i}"))))
            .collect::<Result<Vec<_>>>()?;
        let merges = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| match m {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Array(p) if p.len() == 2 => Ok(format!(
                    "{} {}",
                    p[0].as_str().unwrap_or_default(),
                    p[1].as_str().unwrap_or_default()
                )),
                other => Err(bad(format!("merge {other} is not a pair"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let byte_level = |p: &serde_json::Value| {
            p["type"] == "ByteLevel" && p["use_regex"].as_bool().unwrap_or(true)
        };
        let digits = |p: &serde_json::Value| {
            (p["type"] == "Split"
                && p["pattern"]["Regex"] == "\\p{N}"
                && p["behavior"] == "Isolated")
                || (p["type"] == "Digits" && p["individual_digits"] == true)
        };
        let pre = &v["pre_tokenizer"];
        let pre = if byte_level(pre) {
            "gpt2"
        } else if pre["type"] == "Sequence"
            && pre["pretokenizers"]
                .as_array()
                .is_some_and(|a| a.len() == 2 && digits(&a[0]) && byte_level(&a[1]))
        {
            "smollm"
        } else {
            return Err(bad(format!(
                "pre-tokenizer {pre} has no llama.cpp equivalent Sparrow knows"
            )));
        };
        Ok(crate::formats::gguf_export::GgufVocab {
            tokens,
            token_types: types,
            merges,
            pre: pre.to_string(),
            bos_id: self.bos_id,
            eos_id: self.eos_id,
            add_bos: self.add_bos,
            chat_template: self.chat_template.clone(),
        })
    }

    /// Write `tokenizer.json` into `dir`, plus `tokenizer_config.json` (special tokens,
    /// `add_bos_token`, chat template) when this is not one of Sparrow's own tokenizers.
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        self.save(&dir.join("tokenizer.json"))?;
        let own = self.inner.token_to_id(BOS_TOKEN) == Some(self.bos_id)
            && self.inner.token_to_id(EOS_TOKEN) == Some(self.eos_id)
            && self.add_bos
            && self.chat_template.is_none();
        if !own {
            let config = serde_json::json!({
                "bos_token": self.id_to_token(self.bos_id),
                "eos_token": self.id_to_token(self.eos_id),
                "add_bos_token": self.add_bos,
                "add_eos_token": false,
                "chat_template": self.chat_template,
                "tokenizer_class": "PreTrainedTokenizerFast",
            });
            crate::fsio::write_json_atomic(&dir.join(CONFIG_FILE), &config)?;
        }
        Ok(())
    }

    /// Parse a tokenizer from its JSON text.
    pub fn from_json(json: &str) -> Result<Self> {
        Self::from_inner(parse_inner(json).map_err(tk_err)?)
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
            add_bos: true,
            stop_ids: vec![eos_id],
            chat_template: None,
        })
    }

    /// The tokenizer a GGUF file carries (`crate::formats::gguf_tokenizer`).
    pub fn from_gguf(f: &crate::formats::gguf::GgufFile) -> Result<Self> {
        let g = crate::formats::gguf_tokenizer::read(f)?;
        Ok(Self {
            inner: g.tokenizer,
            bos_id: g.bos_id,
            eos_id: g.eos_id,
            add_bos: g.add_bos,
            stop_ids: g.stop_ids,
            chat_template: g.chat_template,
        })
    }

    /// The ids a prompt starts with: `[bos]` when the tokenizer adds BOS, else none.
    pub fn prefix_ids(&self) -> Vec<u32> {
        if self.add_bos {
            vec![self.bos_id]
        } else {
            Vec::new()
        }
    }

    /// The text of one token id (special tokens included), e.g. for a chat template's
    /// `bos_token`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
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
