//! One request's state: its prompt, its cache for every layer, its position, its
//! sampler (seeded per request, so its text does not depend on what else runs), an
//! incremental detokenizer, its stop tokens and strings, and its token budget.

use super::detok::Detokenizer;
use super::logprobs::{token_logprobs, TokenLogprobs, MAX_TOP_LOGPROBS};
use super::sampler::{Sampler, SamplerConfig};
use super::stop::StopMatcher;
use super::structured::Constraint;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::cache::SeqCache;
use crate::tokenizer::Tokenizer;

/// What a request asks of generation.
#[derive(Debug, Clone)]
pub struct SequenceParams {
    /// Most tokens to generate (0: none; the prompt is not even run).
    pub max_new_tokens: usize,
    pub sampler: SamplerConfig,
    /// Seed of this sequence's sampler.
    pub seed: u64,
    /// Token ids that end generation when sampled (never emitted), e.g. EOS.
    pub stop_tokens: Vec<u32>,
    /// Strings that end generation, matched across token boundaries (never emitted).
    pub stop_strings: Vec<String>,
    /// OpenAI's penalties: before sampling, each token's logit is lowered by
    /// `presence_penalty` once it has been generated and by `frequency_penalty` times the
    /// number of times it has (0 = off; range [-2, 2]).
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Report each generated token's log-probability and those of the k most likely
    /// tokens at its position (`Some(k)`, k <= 20), in [`crate::engine::StepEvent`].
    pub logprobs: Option<usize>,
}

impl SequenceParams {
    /// Greedy decoding of up to `max_new_tokens`, stopping at `stop_tokens`.
    pub fn greedy(max_new_tokens: usize, stop_tokens: Vec<u32>) -> Self {
        Self {
            max_new_tokens,
            sampler: SamplerConfig {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
            },
            seed: 0,
            stop_tokens,
            stop_strings: Vec::new(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
        }
    }
}

/// What one sampled token did to a sequence.
pub(crate) struct Accepted {
    pub token: u32,
    pub text: String,
    pub finished: Option<FinishReason>,
    pub logprobs: Option<TokenLogprobs>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` generated.
    Length,
    /// Prompt plus generated tokens fill the model's context (`max_position_embeddings`).
    ContextFull,
    /// A stop token was sampled.
    StopToken(u32),
    /// A stop string completed.
    StopString(String),
    /// The structured output ([`Sequence::constrain`]) is complete: nothing may follow.
    FormatComplete,
    /// Cancelled by its owner.
    Aborted,
}

impl FinishReason {
    /// OpenAI-style name: `length` for the budget or the context, `stop` otherwise.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Length | FinishReason::ContextFull => "length",
            FinishReason::StopToken(_)
            | FinishReason::StopString(_)
            | FinishReason::FormatComplete => "stop",
            FinishReason::Aborted => "abort",
        }
    }
}

/// One request being generated (cloning copies its whole state, cache included).
#[derive(Clone)]
pub struct Sequence {
    pub id: u64,
    pub(crate) prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    pub(crate) fed: usize,
    /// The last sampled token, to be fed at the next step.
    pub(crate) pending: Option<u32>,
    pub(crate) cache: SeqCache,
    pub(crate) params: SequenceParams,
    sampler: Sampler,
    detok: Detokenizer,
    stops: StopMatcher,
    generated: Vec<u32>,
    /// How often each generated token occurs (kept only with a penalty set).
    counts: std::collections::HashMap<u32, u32>,
    text: String,
    finished: Option<FinishReason>,
    max_positions: usize,
    /// The format the output must keep to, if any.
    constraint: Option<Constraint>,
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence")
            .field("id", &self.id)
            .field("prompt_tokens", &self.prompt.len())
            .field("position", &self.cache.len())
            .field("generated", &self.generated.len())
            .field("finished", &self.finished)
            .finish()
    }
}

impl Sequence {
    /// A sequence for `prompt` (token ids as given: add BOS first if the model wants
    /// it). Its cache is reserved for the prompt plus the budget (within the context).
    pub fn new(
        id: u64,
        prompt: Vec<u32>,
        params: SequenceParams,
        cfg: &ModelConfig,
    ) -> Result<Self> {
        let max_pos = cfg.max_position_embeddings;
        if prompt.is_empty() {
            return Err(Error::Invalid("the prompt has no tokens".into()));
        }
        if prompt.len() >= max_pos {
            return Err(Error::Invalid(format!(
                "prompt is {} tokens; the model's context is {max_pos}",
                prompt.len()
            )));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(Error::Invalid(format!(
                "prompt token id {bad} is outside vocab_size {}",
                cfg.vocab_size
            )));
        }
        for (name, v) in [
            ("presence_penalty", params.presence_penalty),
            ("frequency_penalty", params.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::Invalid(format!(
                    "{name} must be in [-2, 2], got {v}"
                )));
            }
        }
        if let Some(k) = params.logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return Err(Error::Invalid(format!(
                "at most {MAX_TOP_LOGPROBS} top log-probabilities per token, got {k}"
            )));
        }
        let sampler = Sampler::new(params.sampler, params.seed)?;
        let mut cache = SeqCache::for_config(cfg);
        cache.reserve((prompt.len() + params.max_new_tokens).min(max_pos)); // reserved_positions
        let finished = (params.max_new_tokens == 0).then_some(FinishReason::Length);
        Ok(Self {
            id,
            stops: StopMatcher::new(&params.stop_strings),
            prompt,
            fed: 0,
            pending: None,
            cache,
            params,
            sampler,
            detok: Detokenizer::new(),
            generated: Vec::new(),
            counts: std::collections::HashMap::new(),
            text: String::new(),
            finished,
            max_positions: max_pos,
            constraint: None,
        })
    }

    /// A sequence for `prompt` whose first `cache.len()` tokens are already in `cache`
    /// (computed by this model for exactly those tokens: a prompt prefix shared with an
    /// earlier sequence); the engine feeds the rest. At least the last prompt token must
    /// be left to feed, since its logits give the first generated token.
    pub fn with_cached_prefix(
        id: u64,
        prompt: Vec<u32>,
        params: SequenceParams,
        cfg: &ModelConfig,
        mut cache: SeqCache,
    ) -> Result<Self> {
        if cache.layers.len() != cfg.num_hidden_layers {
            return Err(Error::Invalid(format!(
                "a cache of {} layers for a model of {}",
                cache.layers.len(),
                cfg.num_hidden_layers
            )));
        }
        if cache.len() >= prompt.len() {
            return Err(Error::Invalid(format!(
                "the cache holds {} positions of a {}-token prompt: at least its last token must be fed",
                cache.len(),
                prompt.len()
            )));
        }
        let mut seq = Self::new(id, prompt, params, cfg)?;
        let total = seq.prompt.len() + seq.params.max_new_tokens;
        cache.reserve(total.min(seq.max_positions));
        seq.fed = cache.len();
        seq.cache = cache;
        Ok(seq)
    }

    /// Make the output keep to a format (structured output): from the next sampled token
    /// on, only tokens that continue it can be drawn, and the sequence finishes
    /// ([`FinishReason::FormatComplete`]) once it is complete. Set it before the first
    /// token is generated.
    pub fn constrain(&mut self, constraint: Constraint) -> Result<()> {
        if !self.generated.is_empty() {
            return Err(Error::Invalid(
                "a format must be set before the first token is generated".into(),
            ));
        }
        self.constraint = Some(constraint);
        Ok(())
    }

    /// The sequence's cache, the sequence consumed.
    pub fn into_cache(self) -> SeqCache {
        self.cache
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    /// Tokens generated so far (stop tokens excluded).
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// Text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Cache positions this sequence may come to hold (and reserves up front): its
    /// prompt plus its token budget, within the model's context.
    pub fn reserved_positions(&self) -> usize {
        (self.prompt.len() + self.params.max_new_tokens).min(self.max_positions)
    }

    /// Positions in the cache.
    pub fn position(&self) -> usize {
        self.cache.len()
    }

    pub fn cache(&self) -> &SeqCache {
        &self.cache
    }

    /// Whether the prompt is still being prefilled.
    pub fn is_prefilling(&self) -> bool {
        self.finished.is_none() && self.fed < self.prompt.len()
    }

    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }

    pub fn finish_reason(&self) -> Option<&FinishReason> {
        self.finished.as_ref()
    }

    /// End the sequence now (a client went away); its cache can be dropped.
    pub fn abort(&mut self) {
        if self.finished.is_none() {
            self.finished = Some(FinishReason::Aborted);
        }
    }

    /// Pick the next token from this sequence's logits row (penalised, if asked) and
    /// apply the stop rules; returns the token, the text released, whether the sequence
    /// just finished, and the token's log-probabilities when asked (not for a stop
    /// token, which is never emitted).
    pub(crate) fn accept(&mut self, logits: &[f32], tok: Option<&Tokenizer>) -> Result<Accepted> {
        let penalised = self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0;
        let id = if penalised || self.constraint.is_some() {
            let mut row = logits.to_vec();
            for (&t, &c) in &self.counts {
                row[t as usize] -=
                    self.params.presence_penalty + self.params.frequency_penalty * c as f32;
            }
            if let Some(c) = &mut self.constraint {
                c.mask(&mut row)?;
            }
            self.sampler.sample(&row)
        } else {
            self.sampler.sample(logits)
        };
        let mut out = String::new();
        let mut reason = None;
        let mut logprobs = None;
        if self.params.stop_tokens.contains(&id) {
            reason = Some(FinishReason::StopToken(id));
        } else {
            self.generated.push(id);
            if let Some(c) = &mut self.constraint {
                c.consume(id)?;
                if c.is_complete() {
                    reason = Some(FinishReason::FormatComplete);
                }
            }
            if penalised {
                *self.counts.entry(id).or_insert(0) += 1;
            }
            logprobs = self.params.logprobs.map(|k| token_logprobs(logits, id, k));
            if let Some(tk) = tok {
                let piece = self.detok.push(tk, id)?;
                let r = self.stops.push(&piece);
                out = r.text;
                if let Some(s) = r.stopped {
                    reason = Some(FinishReason::StopString(s));
                }
            }
            if reason.is_none() {
                if self.generated.len() >= self.params.max_new_tokens {
                    reason = Some(FinishReason::Length);
                } else if self.prompt.len() + self.generated.len() >= self.max_positions {
                    // Prompt plus completion fill the context (the last token is
                    // never fed, but counts, as in the OpenAI API's accounting).
                    reason = Some(FinishReason::ContextFull);
                } else {
                    self.pending = Some(id);
                }
            }
        }
        if let (Some(r), Some(tk)) = (&reason, tok) {
            if !matches!(r, FinishReason::StopString(_)) {
                let rest = self.detok.flush(tk)?;
                out.push_str(&self.stops.push(&rest).text);
                out.push_str(&self.stops.flush());
            }
        }
        self.text.push_str(&out);
        self.finished = reason.clone();
        Ok(Accepted {
            token: id,
            text: out,
            finished: reason,
            logprobs,
        })
    }
}
