//! Incremental detokenization: the text of each new token as soon as it is whole
//! UTF-8, without decoding the whole output again on every token.
//!
//! Two offsets into the generated ids (as in Hugging Face TGI): `prefix` starts the
//! window decoded for context, `read` ends what was already emitted. A new token's text
//! is `decode(ids[prefix..]) - decode(ids[prefix..read])`: decoding with a little
//! context keeps whatever a tokenizer's decoder does at word starts (spaces,
//! byte fallback) right, and the work per token is the window, not the output. While
//! the new text ends in an incomplete character (U+FFFD) it is held back.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every id pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Add one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && now.is_char_boundary(before.len())
            && now.starts_with(&before)
        {
            self.prefix = self.read;
            self.read = self.ids.len();
            return Ok(now[before.len()..].to_string());
        }
        Ok(String::new())
    }

    /// What is still held back (an incomplete character at the end), decoded as it is.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(match now.strip_prefix(&before) {
            Some(rest) => rest.to_string(),
            None => String::new(),
        })
    }
}
