//! Structured output by constrained decoding: before each token is sampled, every token
//! that cannot continue the requested format (a JSON schema, any JSON object, a regular
//! expression or a Lark grammar) gets logit −∞, and the sampled token advances the
//! format's parser. The parsing and the token masks are `llguidance`'s (DESIGN.md §5c):
//! [`Grammars`] is built once per tokenizer (its token trie), a [`Constraint`] once per
//! sequence.

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{
    InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv,
};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::Arc;

/// What shape the generated text must have.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid against this JSON schema (`json_schema`).
    JsonSchema(Value),
    /// Text matching this regular expression, whole.
    Regex(String),
    /// Text in the language of this Lark grammar (llguidance's dialect).
    Lark(String),
}

/// How JSON is laid out unless a schema says otherwise (llguidance's `x-guidance`
/// options): separators as Python's `json.dumps` writes them and no other whitespace, so
/// a model cannot spend its budget on blank lines inside an object.
fn json_layout() -> Value {
    json!({"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": false})
}

impl OutputFormat {
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            OutputFormat::JsonObject => TopLevelGrammar::from_json_schema(
                json!({"type": "object", "x-guidance": json_layout()}),
            ),
            OutputFormat::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Some(o) = schema.as_object_mut() {
                    o.entry("x-guidance").or_insert_with(json_layout);
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            OutputFormat::Regex(rx) => TopLevelGrammar::from_regex(rx),
            OutputFormat::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }
}

/// The tokenizer as llguidance sees it: every token's bytes (special tokens behind
/// llguidance's marker byte, so no text can produce them) and the real tokenizer for the
/// text a grammar forces.
struct TokenizerView {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for TokenizerView {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tokenizer
                .encode(text)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            // Part of a character: only the trie knows byte-level pieces.
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// Compiles output formats into per-sequence constraints for one tokenizer (building
/// its token trie takes a moment: make one and keep it).
#[derive(Clone)]
pub struct Grammars {
    factory: Arc<ParserFactory>,
    /// Rows of logits are this long (the model's vocabulary may pad the tokenizer's).
    model_vocab: usize,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("model_vocab", &self.model_vocab)
            .finish()
    }
}

impl Grammars {
    /// Grammars for `tokenizer`, whose model's logits rows are `model_vocab` long. The
    /// tokenizer's stop tokens end a constrained output once it is complete.
    pub fn new(tokenizer: &Tokenizer, model_vocab: usize) -> Result<Self> {
        let bad = |m: String| Error::Tokenizer(format!("structured output: {m}"));
        let json: Value = serde_json::from_str(&tokenizer.to_json()?)
            .map_err(|e| bad(format!("the tokenizer's JSON: {e}")))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| bad(format!("{e:#}")))?;
        let n = tokenizer.vocab_size().max(words.len());
        if n > model_vocab {
            return Err(bad(format!(
                "the tokenizer has {n} tokens, the model's vocabulary {model_vocab}"
            )));
        }
        words.resize(n, Vec::new());
        let mut trie = TokTrie::from(&TokRxInfo::new(n as u32, tokenizer.eos_id), &words);
        let mut ends = vec![tokenizer.eos_id];
        ends.extend(
            tokenizer
                .stop_ids
                .iter()
                .filter(|&&t| t != tokenizer.eos_id),
        );
        if let Some(bad_id) = ends.iter().find(|&&t| t as usize >= n) {
            return Err(bad(format!("stop token {bad_id} is past the vocabulary")));
        }
        trie = trie.with_eos_tokens(&ends);
        let env: TokEnv = Arc::new(TokenizerView {
            trie,
            tokenizer: tokenizer.clone(),
        });
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| bad(format!("{e:#}")))?;
        // llguidance logs grammar warnings to stderr by default; errors reach the caller.
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
            model_vocab,
        })
    }

    /// A fresh constraint for one sequence; a schema or grammar that does not compile
    /// (or exceeds llguidance's size limits) is an [`Error::Invalid`] naming the cause.
    pub fn constraint(&self, format: &OutputFormat) -> Result<Constraint> {
        let parser = self
            .factory
            .create_parser(format.grammar())
            .map_err(|e| Error::Invalid(format!("{e:#}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::Invalid(e));
        }
        Ok(Constraint {
            matcher,
            model_vocab: self.model_vocab,
        })
    }
}

/// One sequence's position in its output format.
pub struct Constraint {
    matcher: Matcher,
    model_vocab: usize,
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            model_vocab: self.model_vocab,
        }
    }
}

impl Constraint {
    /// Set the logit of every token that cannot come next to −∞ (`row` is one row of
    /// logits, the model's vocabulary long). Once the format is complete only the stop
    /// tokens remain.
    pub fn mask(&mut self, row: &mut [f32]) -> Result<()> {
        if row.len() != self.model_vocab {
            return Err(Error::Invalid(format!(
                "a logits row of {} for a vocabulary of {}",
                row.len(),
                self.model_vocab
            )));
        }
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| Error::Invalid(format!("structured output: {e:#}")))?;
        for (t, x) in row.iter_mut().enumerate() {
            if !allowed.is_allowed(t as TokenId) {
                *x = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advance past `token` (one the last [`Constraint::mask`] allowed, not a stop token).
    pub fn consume(&mut self, token: u32) -> Result<()> {
        self.matcher
            .consume_token(token)
            .map_err(|e| Error::Invalid(format!("structured output: {e:#}")))
    }

    /// Whether the output is complete and nothing may follow it.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/sparrow-small");
        Tokenizer::from_file(&dir.join("tokenizer.json")).expect("the bundled tokenizer")
    }

    /// Drive a constraint with random logits: every step's allowed set is non-empty, the
    /// sampled text always continues the format, and the finished text parses.
    fn random_walk(format: &OutputFormat, seed: u64) -> String {
        use rand::{Rng, SeedableRng};
        let tk = tokenizer();
        let vocab = tk.vocab_size() + 3; // a padded model vocabulary
        let grammars = Grammars::new(&tk, vocab).expect("grammars");
        let mut c = grammars.constraint(format).expect("constraint");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut ids = Vec::new();
        for _ in 0..400 {
            let mut row: Vec<f32> = (0..vocab).map(|_| rng.random::<f32>() * 4.0).collect();
            c.mask(&mut row).expect("mask");
            assert!(row[tk.vocab_size()..].iter().all(|x| x.is_infinite()));
            let t = super::super::sampler::argmax(&row);
            assert!(row[t as usize].is_finite(), "an empty mask");
            if tk.stop_ids.contains(&t) {
                break;
            }
            c.consume(t).expect("consume");
            ids.push(t);
            if c.is_complete() {
                break;
            }
        }
        tk.decode(&ids, false).expect("decode")
    }

    #[test]
    fn random_logits_under_a_schema_give_valid_json() {
        let schema = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 12},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}
            },
            "required": ["name", "age", "tags"],
            "additionalProperties": false
        });
        for seed in 0..4 {
            let text = random_walk(&OutputFormat::JsonSchema(schema.clone()), seed);
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
            assert!(
                v["name"].as_str().is_some_and(|s| s.chars().count() <= 12),
                "{text}"
            );
            assert!(v["age"].as_u64().is_some_and(|a| a <= 150), "{text}");
            assert!(v["tags"].as_array().is_some_and(|a| a.len() <= 3), "{text}");
            assert_eq!(v.as_object().map(|o| o.len()), Some(3), "{text}");
        }
    }

    #[test]
    fn a_regex_is_matched_whole() {
        let text = random_walk(&OutputFormat::Regex("[0-9]{3}-[a-c]{2}".into()), 7);
        assert_eq!(text.len(), 6, "{text:?}");
        assert!(text[..3].bytes().all(|b| b.is_ascii_digit()), "{text:?}");
        assert_eq!(&text[3..4], "-");
        assert!(
            text[4..].bytes().all(|b| (b'a'..=b'c').contains(&b)),
            "{text:?}"
        );
    }

    #[test]
    fn bad_schemas_and_vocabularies_are_errors() {
        let tk = tokenizer();
        let g = Grammars::new(&tk, tk.vocab_size()).expect("grammars");
        let err = g
            .constraint(&OutputFormat::JsonSchema(json!({"type": "no-such-type"})))
            .err()
            .expect("a bad schema");
        assert!(err.to_string().contains("no-such-type"), "{err}");
        assert!(Grammars::new(&tk, tk.vocab_size() - 1).is_err());
        let mut c = g
            .constraint(&OutputFormat::JsonObject)
            .expect("json object");
        let mut short = vec![0.0; 3];
        assert!(c.mask(&mut short).is_err());
    }
}
