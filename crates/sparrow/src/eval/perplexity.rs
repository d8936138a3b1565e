//! Perplexity by context length on held-out text: at each context length N, evenly
//! spaced windows of N + 1 held-out tokens are scored (next-token cross-entropy at every
//! position), and the mean is reported for all positions and for the second half of each
//! window (positions that have at least N/2 tokens of context, where long context can
//! help). Inference forward: no capacity limits, DSA selection as in generation.
//!
//! A window is scored either in one forward ([`Scoring::Window`]: exact f32 attention,
//! memory that grows with the window: 10.7 GB for SmolLM2-135M at 32768 tokens) or
//! through the engine's step in chunks ([`Scoring::Prefill`]: the KV cache in the
//! model's `kv_cache_dtype` as in generation, memory of one chunk plus the cache).

use crate::data::shards::eval_windows;
use crate::error::{Error, Result};
use crate::kernels::cross_entropy::row_nll;
use crate::model::cache::SeqCache;
use crate::model::step::StepOptions;
use crate::model::transformer::ForwardOptions;
use crate::model::Model;
use candle_core::Tensor;
use serde::Serialize;

/// How each window is run through the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// The whole window in one forward (the training forward, no graph kept).
    Window,
    /// The engine's step over chunks of this many tokens, every token's logits kept:
    /// the window's cache grows as in a chunked prefill (long windows, 32K and beyond).
    Prefill(usize),
}

/// Perplexity at one context length.
#[derive(Debug, Clone, Serialize)]
pub struct ContextPerplexity {
    pub context: usize,
    pub windows: usize,
    /// Mean next-token loss (nats) over all positions.
    pub loss: f64,
    pub perplexity: f64,
    /// The same over positions N/2 .. N of each window.
    pub loss_second_half: f64,
    pub perplexity_second_half: f64,
}

/// Score `windows` windows per context length of `tokens`.
pub fn measure(
    model: &Model,
    tokens: &[u32],
    contexts: &[usize],
    windows: usize,
    scoring: Scoring,
    progress: bool,
) -> Result<Vec<ContextPerplexity>> {
    if contexts.is_empty() || windows == 0 {
        return Err(Error::Invalid(
            "context lengths need a value and `windows` must be >= 1".into(),
        ));
    }
    if scoring == Scoring::Prefill(0) {
        return Err(Error::Invalid(
            "the prefill chunk must be >= 1 token".into(),
        ));
    }
    let max = model.cfg.max_position_embeddings;
    if let Some(c) = contexts.iter().find(|&&c| c < 2 || c > max) {
        return Err(Error::Invalid(format!(
            "context {c} must be in [2, max_position_embeddings = {max}]"
        )));
    }
    let total = (contexts.len() * windows) as u64;
    let bar = crate::progress::bar(total, "perplexity", progress);
    let mut rows = Vec::new();
    for &n in contexts {
        let wins = eval_windows(tokens, windows, n)?;
        let (mut sum, mut sum_half, mut count_half) = (0.0f64, 0.0f64, 0usize);
        for (inp, tgt) in &wins {
            bar.set_message(format!("context {n}"));
            let nll = match scoring {
                Scoring::Window => window_nll(model, inp, tgt)?,
                Scoring::Prefill(chunk) => prefill_nll(model, inp, tgt, chunk)?,
            };
            sum += nll.iter().sum::<f64>();
            sum_half += nll[n / 2..].iter().sum::<f64>();
            count_half += n - n / 2;
            bar.inc(1);
        }
        let loss = sum / (wins.len() * n) as f64;
        let loss_second_half = sum_half / count_half as f64;
        rows.push(ContextPerplexity {
            context: n,
            windows: wins.len(),
            loss,
            perplexity: loss.exp(),
            loss_second_half,
            perplexity_second_half: loss_second_half.exp(),
        });
    }
    bar.finish_and_clear();
    Ok(rows)
}

/// Next-token negative log-likelihood at each position of one window.
fn window_nll(model: &Model, inp: &[u32], tgt: &[u32]) -> Result<Vec<f64>> {
    let dev = model.store.device();
    let ids = Tensor::from_slice(inp, (1, inp.len()), dev)?;
    let out = model
        .net
        .forward_hidden_with(&ids, &ForwardOptions::default())?;
    // Row chunks through the head: at 8192 positions and a 49152-token vocabulary the
    // whole window's logits would take 1.6 GB.
    let tgt = Tensor::from_slice(tgt, tgt.len(), dev)?;
    model.net.nll_rows(&out.hidden, &tgt)
}

/// [`window_nll`] through the engine's step: the window in chunks of `chunk` tokens into
/// one sequence's cache, each chunk's logits scored as they come.
fn prefill_nll(model: &Model, inp: &[u32], tgt: &[u32], chunk: usize) -> Result<Vec<f64>> {
    let mut cache = SeqCache::for_config(&model.cfg);
    let opts = StepOptions {
        all_logits: true,
        ..Default::default()
    };
    let mut out = Vec::with_capacity(inp.len());
    for (tokens, targets) in inp.chunks(chunk).zip(tgt.chunks(chunk)) {
        let logits = model.step_one(tokens, &mut cache, &opts)?.logits; // (chunk, V)
        let targets = Tensor::from_slice(targets, targets.len(), logits.device())?;
        out.extend(row_nll(&logits, &targets)?);
    }
    Ok(out)
}
