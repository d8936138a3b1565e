//! Streaming generation for one prompt, and the evaluations' greedy decoder: both run a
//! single [`Sequence`] through the engine's batched step (the same loop a batch of
//! requests runs), handing each new piece of text to a callback as soon as it is whole
//! UTF-8.

use super::sampler::SamplerConfig;
use super::sequence::{Sequence, SequenceParams};
use super::step::{Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub seed: u64,
    /// Stop when the model emits the end-of-sequence token.
    pub stop_at_eos: bool,
}

#[derive(Debug, Clone, Default)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Seconds until the first token was sampled (the whole prefill).
    pub prefill_secs: f64,
    /// Seconds of the decode steps after it.
    pub decode_secs: f64,
}

impl GenerateStats {
    pub fn prompt_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    pub fn generation_tokens_per_s(&self) -> f64 {
        // The first token comes with the prefill; the decode steps make the rest.
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Generate a continuation of `prompt` (BOS is prepended when the tokenizer adds one;
/// special tokens written in the text, such as a chat template's, are parsed), calling
/// `on_text` with each new text piece. Returns the generated token ids and timing.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: &str,
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<(Vec<u32>, GenerateStats)> {
    let mut ids = tokenizer.prefix_ids();
    ids.extend(tokenizer.encode(prompt)?);
    if ids.is_empty() {
        return Err(Error::Invalid(
            "the prompt is empty and this tokenizer adds no BOS token: give a prompt".into(),
        ));
    }
    let params = SequenceParams {
        max_new_tokens: opts.max_tokens,
        sampler: opts.sampler,
        seed: opts.seed,
        stop_tokens: if opts.stop_at_eos {
            tokenizer.stop_ids.clone()
        } else {
            Vec::new()
        },
        stop_strings: Vec::new(),
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        logprobs: None,
    };
    let mut seq = Sequence::new(0, ids, params, &model.cfg)?;
    let engine = Engine::new(model, Some(tokenizer), EngineOptions::default())?;
    let mut stats = GenerateStats {
        prompt_tokens: seq.prompt().len(),
        ..Default::default()
    };
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    while !seq.is_finished() {
        for e in engine.step(&mut [&mut seq])? {
            if e.token.is_some() && first.is_none() {
                first = Some(Instant::now());
                stats.prefill_secs = start.elapsed().as_secs_f64();
            }
            if !e.text.is_empty() {
                on_text(&e.text);
            }
        }
    }
    stats.decode_secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    stats.generated_tokens = seq.generated().len();
    Ok((seq.generated().to_vec(), stats))
}

/// Greedy continuation of the token ids `prompt` as given (no BOS added): up to
/// `max_new` tokens, stopping at `eos` (not included). The evaluations' decoder
/// (passkey, needle).
pub fn greedy_continue(
    model: &Model,
    prompt: &[u32],
    max_new: usize,
    eos: u32,
) -> Result<Vec<u32>> {
    let max_pos = model.cfg.max_position_embeddings;
    if prompt.is_empty() || prompt.len() + max_new > max_pos {
        return Err(Error::Invalid(format!(
            "a prompt of {} tokens plus {max_new} new ones does not fit the model's context of {max_pos}",
            prompt.len()
        )));
    }
    let mut seqs = [Sequence::new(
        0,
        prompt.to_vec(),
        SequenceParams::greedy(max_new, vec![eos]),
        &model.cfg,
    )?];
    Engine::new(model, None, EngineOptions::default())?.run(&mut seqs, |_| {})?;
    Ok(seqs[0].generated().to_vec())
}
