//! The tokenizer a GGUF file carries in its metadata, rebuilt as a Hugging Face
//! `tokenizers` tokenizer that splits text as llama.cpp does.
//!
//! `tokenizer.ggml.model = gpt2` (byte-level BPE): `tokens` are the vocabulary in id
//! order, `merges` the BPE merges by rank ("a b"), `token_type` marks control tokens
//! (3: special, matched whole in text, e.g. `<|im_start|>`) and user-defined ones (4).
//! `tokenizer.ggml.pre` names llama.cpp's pre-tokenizer; the ones with an exact
//! `tokenizers` equivalent are read, any other is an error naming it:
//! - `gpt2`, `mpt`, `olmo`: GPT-2's split regex, then bytes to symbols;
//! - `smollm`, `starcoder`, `refact`, `codeshell`, `command-r`, `exaone`, `minerva`:
//!   every digit split off alone (`\p{N}`), then GPT-2's regex.
//!
//! Special ids come from `tokenizer.ggml.{bos,eos,eot,eom}_token_id`; generation stops at
//! eos, eot and eom (llama.cpp's end-of-generation set, plus the control tokens it
//! recognises by name: `<|endoftext|>`, `<|im_end|>`, `<|eot_id|>`, `<|end|>`).

use super::gguf::{GgufFile, Value};
use crate::error::{Error, Result};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// Pre-tokenizers with only GPT-2's regex.
const PRE_GPT2: &[&str] = &["gpt2", "mpt", "olmo"];
/// Pre-tokenizers that split each digit off before GPT-2's regex.
const PRE_DIGITS_GPT2: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "codeshell",
    "command-r",
    "exaone",
    "minerva",
];
/// Control tokens that end generation wherever they appear in a vocabulary.
pub const END_OF_GENERATION_NAMES: &[&str] =
    &["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>"];

/// The ids that end generation: `declared` (eos, end of turn, ...) plus every token of
/// [`END_OF_GENERATION_NAMES`] that `special_id` finds, sorted, without repeats.
pub fn end_of_generation_ids(
    declared: Vec<u32>,
    special_id: impl Fn(&str) -> Option<u32>,
) -> Vec<u32> {
    let mut ids = declared;
    ids.extend(END_OF_GENERATION_NAMES.iter().filter_map(|n| special_id(n)));
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// ggml's token types.
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// What a GGUF file says about tokenizing and chatting.
#[derive(Clone)]
pub struct GgufTokenizer {
    /// The HF `tokenizers` tokenizer, built directly (a `tokenizer.json` text and its
    /// parse would take ~40 MB more at peak for a 49K vocabulary).
    pub tokenizer: tokenizers::Tokenizer,
    pub bos_id: u32,
    pub eos_id: u32,
    /// Whether a prompt starts with BOS (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    /// Ids that end generation.
    pub stop_ids: Vec<u32>,
    /// `tokenizer.chat_template`, if any.
    pub chat_template: Option<String>,
}

fn strings<'a>(f: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let items = f
        .get_array_opt(key)?
        .ok_or_else(|| Error::config(key, "missing from the GGUF file"))?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.as_str()),
            other => Err(Error::config(
                format!("{key}[{i}]"),
                format!("is a {}, not a string", other.type_name()),
            )),
        })
        .collect()
}

/// Read the tokenizer of a GGUF file.
pub fn read(f: &GgufFile) -> Result<GgufTokenizer> {
    let model = f
        .get_str_opt("tokenizer.ggml.model")?
        .ok_or_else(|| Error::config("tokenizer.ggml.model", "missing from the GGUF file"))?;
    if model != "gpt2" {
        return Err(Error::config(
            "tokenizer.ggml.model",
            format!("`{model}` is not supported (Sparrow reads byte-level BPE, `gpt2`)"),
        ));
    }
    let pre = f.get_str_opt("tokenizer.ggml.pre")?.unwrap_or("gpt2");
    let byte_level = || ByteLevel::new(false, true, true);
    let pre_tokenizer: PreTokenizerWrapper = if PRE_GPT2.contains(&pre) {
        byte_level().into()
    } else if PRE_DIGITS_GPT2.contains(&pre) {
        let digits = Split::new(
            SplitPattern::Regex("\\p{N}".into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Tokenizer(format!("digit splitter: {e}")))?;
        Sequence::new(vec![digits.into(), byte_level().into()]).into()
    } else {
        return Err(Error::config(
            "tokenizer.ggml.pre",
            format!(
                "pre-tokenizer `{pre}` is not supported (supported: {}, {})",
                PRE_GPT2.join(", "),
                PRE_DIGITS_GPT2.join(", ")
            ),
        ));
    };
    let tokens = strings(f, "tokenizer.ggml.tokens")?;
    let merges = strings(f, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match f.get_array_opt("tokenizer.ggml.token_type")? {
        None => vec![1; tokens.len()],
        Some(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64().ok_or_else(|| {
                    Error::config(
                        format!("tokenizer.ggml.token_type[{i}]"),
                        format!("is a {}, not an integer", v.type_name()),
                    )
                })
            })
            .collect::<Result<_>>()?,
    };
    if types.len() != tokens.len() {
        return Err(Error::config(
            "tokenizer.ggml.token_type",
            format!("{} entries for {} tokens", types.len(), tokens.len()),
        ));
    }
    let mut vocab = Vocab::default();
    vocab.reserve(tokens.len());
    let mut added = Vec::new();
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        if vocab.insert(tok.to_string(), id as u32).is_some() {
            return Err(Error::config(
                format!("tokenizer.ggml.tokens[{id}]"),
                format!("token {tok:?} appears twice"),
            ));
        }
        if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
            added.push(AddedToken::from(tok, ty == TOKEN_CONTROL).normalized(false));
        }
    }
    let merges: Vec<(String, String)> = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    Error::config(
                        format!("tokenizer.ggml.merges[{i}]"),
                        format!("{m:?} is not two symbols separated by a space"),
                    )
                })
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| Error::Tokenizer(format!("{}: BPE model: {e}", f.path.display())))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(byte_level()));
    let (special, plain): (Vec<AddedToken>, Vec<AddedToken>) =
        added.into_iter().partition(|t| t.special);
    let added_err = |e| Error::Tokenizer(format!("{}: added tokens: {e}", f.path.display()));
    tokenizer.add_special_tokens(special).map_err(added_err)?;
    tokenizer.add_tokens(plain).map_err(added_err)?;
    let n = tokens.len();
    let id = |key: &str| -> Result<Option<u32>> {
        match f.get_usize_opt(key)? {
            Some(v) if v < n => Ok(Some(v as u32)),
            Some(v) => Err(Error::config(
                key,
                format!("token id {v} is outside the {n}-token vocabulary"),
            )),
            None => Ok(None),
        }
    };
    let eos_id = id("tokenizer.ggml.eos_token_id")?.ok_or_else(|| {
        Error::config("tokenizer.ggml.eos_token_id", "missing from the GGUF file")
    })?;
    let bos_id = id("tokenizer.ggml.bos_token_id")?.unwrap_or(eos_id);
    let mut declared = vec![eos_id];
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        declared.extend(id(key)?);
    }
    let stop_ids = end_of_generation_ids(declared, |name| {
        tokens
            .iter()
            .zip(&types)
            .position(|(&t, &ty)| t == name && ty == TOKEN_CONTROL)
            .map(|i| i as u32)
    });
    Ok(GgufTokenizer {
        tokenizer,
        bos_id,
        eos_id,
        add_bos: f
            .get_bool_opt("tokenizer.ggml.add_bos_token")?
            .unwrap_or(false),
        stop_ids,
        chat_template: f
            .get_str_opt("tokenizer.chat_template")?
            .map(str::to_string),
    })
}
