//! Streaming generation: prefill the prompt once, then decode one token at a time with
//! the KV cache, handing each new piece of text to a callback as soon as it is whole
//! UTF-8.

use super::cache::KvCache;
use super::sampler::{Sampler, SamplerConfig};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use candle_core::{DType, IndexOp, Tensor};
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
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl GenerateStats {
    pub fn prompt_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    pub fn generation_tokens_per_s(&self) -> f64 {
        self.generated_tokens as f64 / self.decode_secs.max(1e-9)
    }
}

/// Generate a continuation of `prompt`, calling `on_text` with each new text piece.
/// Returns the generated token ids and timing.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: &str,
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<(Vec<u32>, GenerateStats)> {
    let mut sampler = Sampler::new(opts.sampler, opts.seed)?;
    let mut ids = vec![tokenizer.bos_id];
    ids.extend(tokenizer.encode(prompt)?);
    let max_pos = model.cfg.max_position_embeddings;
    if ids.len() >= max_pos {
        return Err(Error::Invalid(format!(
            "prompt is {} tokens; the model's context is {max_pos}",
            ids.len()
        )));
    }
    let max_new = opts.max_tokens.min(max_pos - ids.len());
    let dev = model.store.device().clone();
    let mut cache = KvCache::new(model.cfg.num_hidden_layers);
    let mut stats = GenerateStats {
        prompt_tokens: ids.len(),
        ..Default::default()
    };
    let mut generated: Vec<u32> = Vec::new();
    let mut emitted = 0usize; // bytes of decoded text already handed out

    let start = Instant::now();
    let input = Tensor::from_slice(&ids, (1, ids.len()), &dev)?;
    let out = model.forward(&input, Some(&mut cache))?;
    let mut last = last_logits(&out.logits)?;
    stats.prefill_secs = start.elapsed().as_secs_f64();

    let start = Instant::now();
    for _ in 0..max_new {
        let next = sampler.sample(&last);
        if opts.stop_at_eos && next == tokenizer.eos_id {
            break;
        }
        generated.push(next);
        let text = tokenizer.decode(&generated, true)?;
        // Hold back an incomplete UTF-8 sequence (decoded as U+FFFD) until it completes.
        if !text.ends_with('\u{FFFD}') && text.len() > emitted && text.is_char_boundary(emitted) {
            on_text(&text[emitted..]);
            emitted = text.len();
        }
        if generated.len() == max_new {
            break;
        }
        let input = Tensor::from_slice(&[next], (1, 1), &dev)?;
        let out = model.forward(&input, Some(&mut cache))?;
        last = last_logits(&out.logits)?;
    }
    stats.decode_secs = start.elapsed().as_secs_f64();
    stats.generated_tokens = generated.len();
    let text = tokenizer.decode(&generated, true)?;
    if text.len() > emitted && text.is_char_boundary(emitted) {
        on_text(&text[emitted..]);
    }
    Ok((generated, stats))
}

/// Logits of the last position of a (1, T, V) tensor, as f32.
fn last_logits(logits: &Tensor) -> Result<Vec<f32>> {
    let t = logits.dim(1)?;
    Ok(logits.i((0, t - 1))?.to_dtype(DType::F32)?.to_vec1()?)
}

/// Greedy continuation of the token ids `prompt` as given (no BOS added): one prefill,
/// then up to `max_new` cached decode steps, stopping after `eos` (not included).
/// The evaluations' decoder (passkey, needle).
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
    let dev = model.store.device().clone();
    let mut cache = KvCache::new(model.cfg.num_hidden_layers);
    let input = Tensor::from_slice(prompt, (1, prompt.len()), &dev)?;
    let mut last = last_logits(&model.forward(&input, Some(&mut cache))?.logits)?;
    let mut out = Vec::with_capacity(max_new);
    for i in 0..max_new {
        let next = super::sampler::argmax(&last);
        if next == eos {
            break;
        }
        out.push(next);
        if i + 1 < max_new {
            let input = Tensor::from_slice(&[next], (1, 1), &dev)?;
            last = last_logits(&model.forward(&input, Some(&mut cache))?.logits)?;
        }
    }
    Ok(out)
}
