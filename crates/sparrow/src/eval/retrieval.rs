//! Long-context retrieval evaluations (DESIGN.md §8), generated locally:
//!
//! - **passkey**: a 5-digit key in the repeated passkey filler at a given depth; the
//!   answer is the first integer the model generates (greedy), correct when it equals
//!   the key.
//! - **needle**: a needle sentence with a 5-digit value at a given depth of held-out real
//!   text; correct when the greedy continuation contains the value (substring match).
//!
//! Every (length, depth) cell runs `trials` prompts with keys drawn from a seeded stream,
//! so a run is reproducible. Prompts are built by `data::retrieval`, the same builder the
//! training mix uses, and start with the BOS token; with `chat` they are a user turn of
//! the model's chat template instead, answered in the assistant's turn.

use crate::data::retrieval::{random_value, Needle, Passkey, RetrievalDoc};
use crate::engine::generate::greedy_continue;
use crate::error::{Error, Result};
use crate::model::cache::SeqCache;
use crate::model::step::StepOptions;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::ops::Range;

/// Which retrieval task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Passkey,
    Needle,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Passkey => "passkey",
            Task::Needle => "needle",
        }
    }
}

/// The grid to run.
#[derive(Debug, Clone)]
pub struct RetrievalOptions {
    /// Prompt lengths in tokens (the prompt is at most this long).
    pub lengths: Vec<usize>,
    /// Key depths in [0, 1].
    pub depths: Vec<f64>,
    /// Prompts per (length, depth) cell.
    pub trials: usize,
    /// Tokens generated after the question.
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Put each document and question in a user turn of the model's chat template
    /// (with [`CHAT_SYSTEM`] as the system turn) and let the assistant answer, for
    /// instruct models; else the prompt is BOS + document + question.
    pub chat: bool,
    /// Also record, per layer, how much of the key line the question's last query
    /// selects ([`Trial::key_selected`]: one more prefill of each prompt, with the
    /// engine's telemetry).
    pub key_selection: bool,
}

/// The system turn of chat-wrapped retrieval prompts.
pub const CHAT_SYSTEM: &str = "You are a helpful assistant.";

/// The model's chat template around a retrieval document: the tokens before and after
/// the user turn's content (the assistant's turn opened). The document's tokens are
/// spliced in between as they are, so a prompt of a given length holds the same filler
/// and key with and without the wrap.
struct ChatWrap {
    before: Vec<u32>,
    after: Vec<u32>,
}

impl ChatWrap {
    fn new(tok: &Tokenizer) -> Result<Self> {
        use crate::chat::{ChatTemplate, Message};
        const MARK: &str = "\u{1}document\u{1}";
        let text = ChatTemplate::for_tokenizer(tok)?.render(
            &[
                Message::new("system", CHAT_SYSTEM),
                Message::new("user", MARK),
            ],
            true,
        )?;
        let (before, after) = text.split_once(MARK).ok_or_else(|| {
            Error::Template("the chat template does not show the user's message".into())
        })?;
        Ok(Self {
            before: tok.encode(before)?,
            after: tok.encode(after)?,
        })
    }
}

/// One prompt and what the model answered.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub length: usize,
    pub depth: f64,
    pub trial: usize,
    /// Tokens in the prompt (BOS included).
    pub prompt_tokens: usize,
    pub expected: String,
    pub output: String,
    pub correct: bool,
    /// Wall time of prefill + decoding (a measurement, not part of the result).
    pub secs: f64,
    /// With [`RetrievalOptions::key_selection`], per layer: the share of the key line's
    /// (or needle's) tokens among the positions the prompt's last query attends to (the
    /// query that produces the answer's first token); None where that query attended
    /// every position (a dense layer, or a prompt within the layer's top-k).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_selected: Option<Vec<Option<f64>>>,
}

/// Accuracy of one (length, depth) cell.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub length: usize,
    pub depth: f64,
    pub trials: usize,
    pub accuracy: f64,
}

/// Accuracy at one length over all depths.
#[derive(Debug, Clone, Serialize)]
pub struct LengthAccuracy {
    pub length: usize,
    pub trials: usize,
    pub accuracy: f64,
    /// Mean seconds per prompt (prefill + decoding).
    pub mean_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetrievalReport {
    pub task: Task,
    pub trials: Vec<Trial>,
    pub cells: Vec<Cell>,
    pub by_length: Vec<LengthAccuracy>,
    /// All trials.
    pub accuracy: f64,
}

impl RetrievalReport {
    /// The depths of the grid, in order (the cells of each length list them all).
    pub fn depths(&self) -> Vec<f64> {
        let first = self.by_length.first().map(|l| l.length);
        self.cells
            .iter()
            .filter(|c| Some(c.length) == first)
            .map(|c| c.depth)
            .collect()
    }
}

impl RetrievalOptions {
    fn validate(&self, model: &Model) -> Result<()> {
        if self.lengths.is_empty() || self.depths.is_empty() {
            return Err(Error::Invalid(
                "`lengths` and `depths` need at least one value each".into(),
            ));
        }
        if self.trials == 0 || self.max_new_tokens == 0 {
            return Err(Error::Invalid(
                "`trials` and `max_new_tokens` must be >= 1".into(),
            ));
        }
        if let Some(d) = self.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
            return Err(Error::Invalid(format!("depth {d} is outside [0, 1]")));
        }
        let max = model.cfg.max_position_embeddings;
        if let Some(l) = self
            .lengths
            .iter()
            .find(|&&l| l + self.max_new_tokens > max)
        {
            return Err(Error::Invalid(format!(
                "length {l} plus {} new tokens exceeds the model's max_position_embeddings {max}",
                self.max_new_tokens
            )));
        }
        Ok(())
    }
}

/// The first run of ASCII digits in `text`.
pub fn first_integer(text: &str) -> Option<&str> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let rest = &text[start..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Whether `output` answers `expected` under the task's scoring rule.
pub fn is_correct(task: Task, output: &str, expected: &str) -> bool {
    match task {
        Task::Passkey => first_integer(output) == Some(expected),
        Task::Needle => output.contains(expected),
    }
}

/// Run the passkey grid.
pub fn passkey(
    model: &Model,
    tok: &Tokenizer,
    opts: &RetrievalOptions,
    progress: bool,
) -> Result<RetrievalReport> {
    opts.validate(model)?;
    let pk = Passkey::new(tok)?;
    run_grid(
        model,
        tok,
        Task::Passkey,
        opts,
        progress,
        |budget, depth, _trial, rng| pk.build(budget, depth, random_value(rng)),
    )
}

/// Run the needle grid over `haystack` (held-out corpus tokens): trial `i` of a length
/// takes its text from an evenly spaced offset, the same for every depth.
#[allow(clippy::too_many_arguments)]
pub fn needle(
    model: &Model,
    tok: &Tokenizer,
    haystack: &[u32],
    needle: &str,
    question: &str,
    opts: &RetrievalOptions,
    progress: bool,
) -> Result<RetrievalReport> {
    opts.validate(model)?;
    let nd = Needle::new(tok, needle, question)?;
    let longest = opts.lengths.iter().copied().max().unwrap_or(0);
    if haystack.len() < longest {
        return Err(Error::Corpus(format!(
            "the held-out text has {} tokens, fewer than the longest length {longest} (raise the held-out share or use a larger corpus)",
            haystack.len()
        )));
    }
    run_grid(
        model,
        tok,
        Task::Needle,
        opts,
        progress,
        |budget, depth, trial, rng| {
            let value = random_value(rng).to_string();
            let hay_len = budget.saturating_sub(nd.overhead(&value)?);
            if hay_len == 0 {
                return Err(Error::Invalid(format!(
                    "{budget} tokens are too few for the needle"
                )));
            }
            // Trials of a length walk through the text; depths of one trial share a start.
            let span = haystack.len() - hay_len;
            let start = if opts.trials > 1 {
                trial * span / (opts.trials - 1)
            } else {
                span / 2
            };
            nd.build(&haystack[start..start + hay_len], depth, &value)
        },
    )
}

fn run_grid(
    model: &Model,
    tok: &Tokenizer,
    task: Task,
    opts: &RetrievalOptions,
    progress: bool,
    // (tokens the document may take, depth, trial, key stream) -> prompt
    mut build: impl FnMut(usize, f64, usize, &mut ChaCha8Rng) -> Result<RetrievalDoc>,
) -> Result<RetrievalReport> {
    // BOS, or the chat turn, takes part of each length.
    let wrap = if opts.chat {
        Some(ChatWrap::new(tok)?)
    } else {
        None
    };
    let overhead = wrap.as_ref().map_or(1, |w| w.before.len() + w.after.len());
    let total = (opts.lengths.len() * opts.depths.len() * opts.trials) as u64;
    let bar = crate::progress::bar(total, task.name(), progress);
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut trials = Vec::new();
    let mut cells = Vec::new();
    let mut by_length = Vec::new();
    for &length in &opts.lengths {
        let mut right_at_length = 0;
        for trial in 0..opts.trials {
            for &depth in &opts.depths {
                bar.set_message(format!("{length} tokens, depth {depth}"));
                let doc = build(length.saturating_sub(overhead), depth, trial, &mut rng)?;
                let mut ids = Vec::with_capacity(doc.prompt.len() + overhead);
                match &wrap {
                    Some(w) => {
                        ids.extend_from_slice(&w.before);
                        ids.extend_from_slice(&doc.prompt);
                        ids.extend_from_slice(&w.after);
                    }
                    None => {
                        ids.push(tok.bos_id);
                        ids.extend_from_slice(&doc.prompt);
                    }
                }
                let started = std::time::Instant::now();
                let out = greedy_continue(model, &ids, opts.max_new_tokens, tok.eos_id)?;
                let secs = started.elapsed().as_secs_f64();
                let key_selected = if opts.key_selection {
                    // The document follows BOS or the chat turn's opening.
                    let at = wrap.as_ref().map_or(1, |w| w.before.len()) + doc.key_at;
                    Some(key_selection(model, &ids, at..at + doc.key_len)?)
                } else {
                    None
                };
                let output = tok.decode(&out, true)?;
                let correct = is_correct(task, &output, &doc.value);
                right_at_length += correct as usize;
                trials.push(Trial {
                    length,
                    depth,
                    trial,
                    prompt_tokens: ids.len(),
                    expected: doc.value,
                    output,
                    correct,
                    secs,
                    key_selected,
                });
                bar.inc(1);
            }
        }
        for &depth in &opts.depths {
            let right = trials
                .iter()
                .filter(|t| t.length == length && t.depth == depth && t.correct)
                .count();
            cells.push(Cell {
                length,
                depth,
                trials: opts.trials,
                accuracy: right as f64 / opts.trials as f64,
            });
        }
        let n = opts.trials * opts.depths.len();
        let secs: f64 = trials
            .iter()
            .filter(|t| t.length == length)
            .map(|t| t.secs)
            .sum();
        by_length.push(LengthAccuracy {
            length,
            trials: n,
            accuracy: right_at_length as f64 / n as f64,
            mean_secs: secs / n as f64,
        });
    }
    bar.finish_and_clear();
    let accuracy = trials.iter().filter(|t| t.correct).count() as f64 / trials.len() as f64;
    Ok(RetrievalReport {
        task,
        trials,
        cells,
        by_length,
        accuracy,
    })
}

/// Per layer, the share of the prompt positions `span` that the prompt's last query
/// selects (None: it attended every position): one prefill of `ids` through the
/// engine's step with telemetry on.
fn key_selection(model: &Model, ids: &[u32], span: Range<usize>) -> Result<Vec<Option<f64>>> {
    let opts = StepOptions {
        telemetry: true,
        ..Default::default()
    };
    let out = model.step_one(ids, &mut SeqCache::for_config(&model.cfg), &opts)?;
    Ok(out
        .telemetry
        .iter()
        .map(|layer| {
            layer.selected.as_ref().map(|sel| {
                let kept = sel
                    .iter()
                    .filter(|&&p| span.contains(&(p as usize)))
                    .count();
                kept as f64 / span.len().max(1) as f64
            })
        })
        .collect())
}

/// Per layer, the mean over trials of [`Trial::key_selected`] (None where no trial
/// ran that layer sparse, or without key selection).
pub fn key_selected_by_layer(trials: &[Trial]) -> Vec<Option<f64>> {
    let layers = trials
        .iter()
        .filter_map(|t| t.key_selected.as_ref().map(Vec::len))
        .max()
        .unwrap_or(0);
    (0..layers)
        .map(|l| {
            let shares: Vec<f64> = trials
                .iter()
                .filter_map(|t| t.key_selected.as_ref()?.get(l).copied().flatten())
                .collect();
            (!shares.is_empty()).then(|| shares.iter().sum::<f64>() / shares.len() as f64)
        })
        .collect()
}

/// A text table: one row per length, one column per depth, plus the row's accuracy.
pub fn format_table(r: &RetrievalReport) -> String {
    let depths = r.depths();
    let mut s = format!("{:>8}", "length");
    for d in &depths {
        s += &format!(" {:>7}", format!("d={d}"));
    }
    s += &format!(" {:>8} {:>9}\n", "all", "s/prompt");
    for la in &r.by_length {
        s += &format!("{:>8}", la.length);
        for c in r.cells.iter().filter(|c| c.length == la.length) {
            s += &format!(" {:>6.0}%", c.accuracy * 100.0);
        }
        s += &format!(" {:>7.1}% {:>9.2}\n", la.accuracy * 100.0, la.mean_secs);
    }
    s += &format!(
        "overall {:.1}% of {} prompts\n",
        r.accuracy * 100.0,
        r.trials.len()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoring_rules() {
        assert_eq!(first_integer(" 48213. Remember"), Some("48213"));
        assert_eq!(first_integer("no digits"), None);
        assert!(is_correct(Task::Passkey, " 48213.", "48213"));
        assert!(!is_correct(Task::Passkey, " 482135", "48213"));
        assert!(!is_correct(Task::Passkey, " 1 48213", "48213"));
        assert!(is_correct(Task::Needle, "is 1 48213", "48213"));
        assert!(!is_correct(Task::Needle, "4821", "48213"));
    }
}
