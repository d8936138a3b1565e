//! Generated retrieval data (DESIGN.md §8), built at the token level so that training
//! rows and evaluation prompts are the same sequences:
//!
//! - **passkey** (Landmark Attention): the filler "The grass is green. The sky is blue.
//!   The sun is yellow. Here we go. There and back again." repeated, the key line "The
//!   pass key is {k}. Remember it. {k} is the pass key." at a given depth, then the
//!   question "What is the pass key? The pass key is"; the answer is " {k}.".
//! - **needle**: a needle sentence with a value ("The special magic number is {value}.")
//!   inserted at a given depth of real text, then a question whose answer is the value.
//!
//! Each piece is tokenized once and pieces are concatenated (every piece starts with a
//! space, as it would inside running text). Depth 0 puts the key right after the start,
//! depth 1 right before the question. `mix_into_batch` replaces a share of a training
//! batch's rows with such documents, drawn from a seeded stream per step, so a resumed
//! run sees the same rows.

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The passkey filler unit (DESIGN.md §8).
pub const PASSKEY_FILLER: &str =
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
/// The default needle; `{value}` is replaced by the value to retrieve.
pub const DEFAULT_NEEDLE: &str = " The special magic number is {value}.";
/// The default needle question (the answer follows it).
pub const DEFAULT_NEEDLE_QUESTION: &str =
    " What is the special magic number? The special magic number is";
/// Stream salt of the retrieval mix (keeps it independent of the window sampler).
const MIX_SALT: u64 = 0x005e_ed0f_4e7e_d1e5;

/// One generated document: `prompt` ends with the question; `answer` is what should
/// follow it. `key_at` is the token index in `prompt` where the key line / needle
/// starts, `key_len` its length in tokens.
#[derive(Debug, Clone)]
pub struct RetrievalDoc {
    pub prompt: Vec<u32>,
    pub answer: Vec<u32>,
    pub key_at: usize,
    pub key_len: usize,
    /// The value the question asks for, as text.
    pub value: String,
}

/// A random 5-digit value (no leading zero), as passkeys are.
pub fn random_value(rng: &mut impl Rng) -> u32 {
    rng.random_range(10_000..100_000)
}

/// Tokenized passkey pieces.
#[derive(Debug, Clone)]
pub struct Passkey {
    filler: Vec<u32>,
    question: Vec<u32>,
    tok: Tokenizer,
}

impl Passkey {
    pub fn new(tok: &Tokenizer) -> Result<Self> {
        Ok(Self {
            filler: tok.encode(PASSKEY_FILLER)?,
            question: tok.encode(" What is the pass key? The pass key is")?,
            tok: tok.clone(),
        })
    }

    /// Tokens of one filler unit.
    pub fn filler_len(&self) -> usize {
        self.filler.len()
    }

    /// The shortest length `build` accepts for a 5-digit key (one filler unit).
    pub fn min_len(&self) -> Result<usize> {
        Ok(self.key_line(99_999)?.len() + self.question.len() + self.filler.len())
    }

    fn key_line(&self, key: u32) -> Result<Vec<u32>> {
        self.tok.encode(&format!(
            " The pass key is {key}. Remember it. {key} is the pass key."
        ))
    }

    /// A prompt of at most `length` tokens (filler units fill what the key line and the
    /// question leave), key line after `depth` (0..=1) of the filler units.
    pub fn build(&self, length: usize, depth: f64, key: u32) -> Result<RetrievalDoc> {
        check_depth(depth)?;
        let line = self.key_line(key)?;
        let fixed = line.len() + self.question.len();
        let units = length.saturating_sub(fixed) / self.filler.len();
        if units == 0 {
            return Err(Error::Invalid(format!(
                "a passkey prompt needs more than {} tokens, got {length}",
                fixed + self.filler.len()
            )));
        }
        let before = (depth * units as f64).round() as usize;
        let mut prompt = Vec::with_capacity(length);
        for _ in 0..before {
            prompt.extend_from_slice(&self.filler);
        }
        let key_at = prompt.len();
        prompt.extend_from_slice(&line);
        for _ in before..units {
            prompt.extend_from_slice(&self.filler);
        }
        prompt.extend_from_slice(&self.question);
        Ok(RetrievalDoc {
            prompt,
            answer: self.tok.encode(&format!(" {key}."))?,
            key_at,
            key_len: line.len(),
            value: key.to_string(),
        })
    }
}

/// Tokenized needle pieces (the needle template keeps its `{value}` placeholder).
#[derive(Debug, Clone)]
pub struct Needle {
    template: String,
    question: Vec<u32>,
    tok: Tokenizer,
}

impl Needle {
    /// `needle` must contain `{value}`.
    pub fn new(tok: &Tokenizer, needle: &str, question: &str) -> Result<Self> {
        if !needle.contains("{value}") {
            return Err(Error::Invalid(format!(
                "the needle {needle:?} has no {{value}} placeholder"
            )));
        }
        if question.trim().is_empty() {
            return Err(Error::Invalid("the needle question is empty".into()));
        }
        Ok(Self {
            template: with_space(needle),
            question: tok.encode(&with_space(question))?,
            tok: tok.clone(),
        })
    }

    /// Tokens the needle and question add to a haystack (for a value of `value_len`
    /// digits, the needle's length can vary by a token or two with the value).
    pub fn overhead(&self, value: &str) -> Result<usize> {
        Ok(self.needle(value)?.len() + self.question.len())
    }

    fn needle(&self, value: &str) -> Result<Vec<u32>> {
        self.tok.encode(&self.template.replace("{value}", value))
    }

    /// `haystack` with the needle inserted after `depth` (0..=1) of its tokens, then
    /// the question.
    pub fn build(&self, haystack: &[u32], depth: f64, value: &str) -> Result<RetrievalDoc> {
        check_depth(depth)?;
        let needle = self.needle(value)?;
        let at = (depth * haystack.len() as f64).round() as usize;
        let mut prompt = Vec::with_capacity(haystack.len() + needle.len() + self.question.len());
        prompt.extend_from_slice(&haystack[..at]);
        prompt.extend_from_slice(&needle);
        prompt.extend_from_slice(&haystack[at..]);
        prompt.extend_from_slice(&self.question);
        Ok(RetrievalDoc {
            prompt,
            answer: self.tok.encode(&format!(" {value}."))?,
            key_at: at,
            key_len: needle.len(),
            value: value.to_string(),
        })
    }
}

fn with_space(s: &str) -> String {
    if s.starts_with(' ') {
        s.to_string()
    } else {
        format!(" {s}")
    }
}

fn check_depth(depth: f64) -> Result<()> {
    if (0.0..=1.0).contains(&depth) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "depth must be in [0, 1], got {depth}"
        )))
    }
}

/// Generator of training rows mixing retrieval documents into corpus windows.
#[derive(Debug, Clone)]
pub struct RetrievalMix {
    passkey: Passkey,
    passkey_min_len: usize,
    needle: Needle,
    /// Share of the mixed documents that are passkey prompts (the rest: needles).
    passkey_share: f64,
}

/// The shortest retrieval document the mix generates, in tokens.
pub const MIN_MIX_DOC: usize = 128;
/// Tokens kept free for the answer after a mixed document's prompt (" 12345." is at
/// most 7 tokens even with single-byte digits).
const ANSWER_ROOM: usize = 8;

impl RetrievalMix {
    /// `passkey_share` in [0, 1]: the share of passkey documents (the rest are needles).
    pub fn new(tok: &Tokenizer, passkey_share: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&passkey_share) {
            return Err(Error::Invalid(format!(
                "the passkey share must be in [0, 1], got {passkey_share}"
            )));
        }
        let passkey = Passkey::new(tok)?;
        Ok(Self {
            passkey_min_len: passkey.min_len()? + 2,
            passkey,
            needle: Needle::new(tok, DEFAULT_NEEDLE, DEFAULT_NEEDLE_QUESTION)?,
            passkey_share,
        })
    }

    /// Replace each row of a (batch, seq_len) training batch with a retrieval document
    /// with probability `share`: a passkey prompt with probability `passkey_share`, else
    /// a needle in the row's own corpus text (needle also when the drawn length is too
    /// short for a passkey prompt).
    /// A document of random length (MIN_MIX_DOC ..= seq_len + 1 tokens, uniform)
    /// with its key at a random depth ends the row; the row's corpus text fills what is
    /// left before it. `inputs` / `targets` are row-major, as `sample_batch` returns
    /// them. Returns how many rows were replaced.
    pub fn mix_into_batch(
        &self,
        inputs: &mut [u32],
        targets: &mut [u32],
        seq_len: usize,
        share: f64,
        seed: u64,
        step: u64,
    ) -> Result<usize> {
        if share <= 0.0 {
            return Ok(0);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ MIX_SALT);
        rng.set_stream(step);
        let rows = inputs.len() / seq_len;
        let mut replaced = 0;
        for r in 0..rows {
            if rng.random::<f64>() >= share {
                continue;
            }
            let span = r * seq_len..(r + 1) * seq_len;
            // The row as seq_len + 1 tokens (inputs plus the last target).
            let mut row: Vec<u32> = inputs[span.clone()].to_vec();
            row.push(targets[span.end - 1]);
            let max_len = seq_len + 1;
            if max_len < MIN_MIX_DOC {
                return Err(Error::Invalid(format!(
                    "retrieval mixing needs `seq_len` >= {}",
                    MIN_MIX_DOC - 1
                )));
            }
            let len = rng.random_range(MIN_MIX_DOC..=max_len);
            let depth = rng.random::<f64>();
            let value = random_value(&mut rng);
            // The answer (" 12345.") takes at most ANSWER_ROOM tokens after the prompt.
            // A share of 0.5 draws a fair coin (the stream the first models trained on).
            let passkey = if self.passkey_share == 0.5 {
                rng.random::<bool>()
            } else {
                rng.random::<f64>() < self.passkey_share
            };
            let doc = if passkey && len - ANSWER_ROOM >= self.passkey_min_len {
                self.passkey.build(len - ANSWER_ROOM, depth, value)?
            } else {
                let over = self.needle.overhead(&value.to_string())? + ANSWER_ROOM;
                let hay = len.saturating_sub(over).max(1);
                let start = max_len - hay;
                self.needle
                    .build(&row[start..start + hay], depth, &value.to_string())?
            };
            let mut doc_tokens = doc.prompt;
            doc_tokens.extend_from_slice(&doc.answer);
            if doc_tokens.len() > max_len {
                return Err(Error::Invalid(format!(
                    "a {}-token retrieval document does not fit a row of {max_len}",
                    doc_tokens.len()
                )));
            }
            row.truncate(max_len - doc_tokens.len());
            row.extend_from_slice(&doc_tokens);
            debug_assert_eq!(row.len(), max_len);
            inputs[span.clone()].copy_from_slice(&row[..seq_len]);
            targets[span].copy_from_slice(&row[1..]);
            replaced += 1;
        }
        Ok(replaced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        // A byte-level BPE trained on the pieces themselves is enough here.
        let tmp = std::env::temp_dir().join(format!("sparrow-retrieval-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let f = tmp.join("a.txt");
        std::fs::write(
            &f,
            format!("{PASSKEY_FILLER} The pass key is 12345. What is it? 0123456789 magic number")
                .repeat(50),
        )
        .unwrap();
        Tokenizer::train(&[f], 300, false).unwrap()
    }

    #[test]
    fn passkey_layout_and_length() {
        let t = tok();
        let p = Passkey::new(&t).unwrap();
        for (len, depth) in [(200, 0.0), (500, 0.5), (1000, 1.0), (333, 0.3)] {
            let d = p.build(len, depth, 48213).unwrap();
            assert!(d.prompt.len() <= len && d.prompt.len() + p.filler_len() > len - 40);
            let text = t.decode(&d.prompt, true).unwrap();
            assert!(text.contains("The pass key is 48213. Remember it. 48213 is the pass key."));
            assert!(text.ends_with("What is the pass key? The pass key is"));
            let key_text = t.decode(&d.prompt[d.key_at..], true).unwrap();
            assert!(key_text.trim_start().starts_with("The pass key is 48213"));
            assert_eq!(t.decode(&d.answer, true).unwrap(), " 48213.");
        }
        let shallow = p.build(1000, 0.0, 11111).unwrap().key_at;
        let deep = p.build(1000, 1.0, 11111).unwrap().key_at;
        assert_eq!(shallow, 0);
        assert!(deep > 900 - 60);
        assert!(p.build(10, 0.5, 11111).is_err());
        assert!(p.build(500, 1.5, 11111).is_err());
    }

    #[test]
    fn needle_inserted_at_depth() {
        let t = tok();
        let n = Needle::new(&t, DEFAULT_NEEDLE, DEFAULT_NEEDLE_QUESTION).unwrap();
        let hay: Vec<u32> = t.encode(&PASSKEY_FILLER.repeat(20)).unwrap();
        let d = n.build(&hay, 0.5, "777").unwrap();
        assert_eq!(d.key_at, (hay.len() as f64 * 0.5).round() as usize);
        assert_eq!(&d.prompt[..d.key_at], &hay[..d.key_at]);
        assert!(t
            .decode(&d.prompt, true)
            .unwrap()
            .contains("The special magic number is 777."));
        assert!(Needle::new(&t, "no placeholder", "q").is_err());
    }

    #[test]
    fn mix_replaces_rows_deterministically_and_keeps_shapes() {
        let t = tok();
        let mix = RetrievalMix::new(&t, 0.5).unwrap();
        let (b, s) = (6, 600);
        // Row r is the window stream[r * (s + 1)..][..s + 1], as sample_batch cuts it.
        let stream: Vec<u32> = (0..b * (s + 1)).map(|k| (k * 7 % 250) as u32 + 3).collect();
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for r in 0..b {
            let w = &stream[r * (s + 1)..(r + 1) * (s + 1)];
            inputs.extend_from_slice(&w[..s]);
            targets.extend_from_slice(&w[1..]);
        }
        let run = |seed, step| {
            let (mut i, mut tg) = (inputs.clone(), targets.clone());
            let n = mix
                .mix_into_batch(&mut i, &mut tg, s, 0.5, seed, step)
                .unwrap();
            (n, i, tg)
        };
        let (n, i, tg) = run(1, 7);
        assert_eq!(run(1, 7).1, i);
        assert_ne!(run(1, 8).1, i);
        assert!(n > 0 && n < b, "{n} rows replaced");
        // Targets stay inputs shifted by one within each row.
        for r in 0..b {
            assert_eq!(&i[r * s + 1..(r + 1) * s], &tg[r * s..(r + 1) * s - 1]);
        }
        let changed = (0..b)
            .filter(|r| i[r * s..(r + 1) * s] != inputs[r * s..(r + 1) * s])
            .count();
        assert_eq!(changed, n);
        // Every replaced row ends with an answer: " <5 digits>."
        for r in 0..b {
            if i[r * s..(r + 1) * s] != inputs[r * s..(r + 1) * s] {
                let mut row = i[r * s..(r + 1) * s].to_vec();
                row.push(tg[(r + 1) * s - 1]);
                let text = t.decode(&row, true).unwrap();
                let tail: String = text
                    .chars()
                    .rev()
                    .take(7)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                assert!(tail.starts_with(' ') && tail.ends_with('.'), "{tail:?}");
                assert!(tail[1..6].chars().all(|c| c.is_ascii_digit()), "{tail:?}");
            }
        }
        // The answer at the end of each replaced row is the value its key line or needle
        // states earlier in the row.
        for r in 0..b {
            let mut row = i[r * s..(r + 1) * s].to_vec();
            row.push(tg[(r + 1) * s - 1]);
            let text = t.decode(&row, true).unwrap();
            let stated = ["The pass key is ", "The special magic number is "]
                .iter()
                .find_map(|p| text.find(p).map(|at| &text[at + p.len()..at + p.len() + 5]));
            if let Some(value) = stated {
                assert!(text.trim_end().ends_with(&format!(" {value}.")), "{text}");
            }
        }
        let (n0, i0, _) = {
            let (mut i, mut tg) = (inputs.clone(), targets.clone());
            let n = mix.mix_into_batch(&mut i, &mut tg, s, 0.0, 1, 7).unwrap();
            (n, i, tg)
        };
        assert_eq!((n0, i0), (0, inputs.clone()));
    }
}
