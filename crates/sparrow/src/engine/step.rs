//! The engine's batched step: every unfinished sequence contributes its next input, a
//! prefill chunk (up to `prefill_chunk` prompt tokens) or its last sampled token, and
//! one forward (`Model::step`) runs them all, each at its own position with its own
//! cache. Then each sequence that has consumed its whole prompt samples its next
//! token from its own logits row with its own sampler.

use super::logprobs::TokenLogprobs;
use super::sequence::{FinishReason, Sequence};
use super::telemetry::{LayerSummary, TelemetryWindow, DEFAULT_WINDOW};
use crate::error::{Error, Result};
use crate::model::step::{StepOptions, StepProfile};
use crate::model::{Model, StepInput};
use crate::tokenizer::Tokenizer;
use candle_core::DType;

/// How the engine runs its steps.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Most prompt tokens one sequence feeds in one step (long prompts are chunked so
    /// the decodes sharing the step keep flowing).
    pub prefill_chunk: usize,
    /// Every selector set to all positions (the dense baseline of the benchmarks).
    pub dense: bool,
    /// Accumulate per-layer seconds ([`Engine::profile`]).
    pub profile: bool,
    /// Measure the model's sparse parts in every step (each DSA layer's recall for one
    /// sampled query, each MoE layer's expert counts) over a window of recent steps
    /// ([`Engine::telemetry`]).
    pub telemetry: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            prefill_chunk: 512,
            dense: false,
            profile: false,
            telemetry: false,
        }
    }
}

/// What one sequence did in a step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepEvent {
    /// The sequence's id.
    pub seq: u64,
    /// The token sampled (None while the prompt is still being prefilled).
    pub token: Option<u32>,
    /// Text released by this step (empty when held back or without a tokenizer).
    pub text: String,
    /// Set when the sequence ended in this step.
    pub finished: Option<FinishReason>,
    /// Tokens the sequence has generated so far (stop tokens excluded).
    pub generated: usize,
    /// The token's log-probabilities, when its sequence asked for them.
    pub logprobs: Option<TokenLogprobs>,
}

/// Runs batched steps of one model. Shares the model read-only (`Model: Sync`), so
/// several engines or threads may use one model.
pub struct Engine<'m> {
    model: &'m Model,
    tokenizer: Option<&'m Tokenizer>,
    opts: EngineOptions,
    profile: std::cell::RefCell<StepProfile>,
    telemetry: std::cell::RefCell<TelemetryWindow>,
}

impl<'m> Engine<'m> {
    /// Without a tokenizer the engine produces tokens only (no text, no stop strings).
    pub fn new(
        model: &'m Model,
        tokenizer: Option<&'m Tokenizer>,
        opts: EngineOptions,
    ) -> Result<Self> {
        if opts.prefill_chunk == 0 {
            return Err(Error::Invalid("prefill_chunk must be at least 1".into()));
        }
        Ok(Self {
            model,
            tokenizer,
            opts,
            profile: std::cell::RefCell::new(StepProfile::new(model.cfg.num_hidden_layers)),
            telemetry: std::cell::RefCell::new(TelemetryWindow::new(
                model.cfg.num_hidden_layers,
                DEFAULT_WINDOW,
            )),
        })
    }

    pub fn model(&self) -> &Model {
        self.model
    }

    /// Per-layer seconds accumulated over the steps run so far (with `profile`).
    pub fn profile(&self) -> StepProfile {
        self.profile.borrow().clone()
    }

    /// Each layer's recall and expert balance over the recent steps (with
    /// `telemetry`; layers without DSA or MoE, or nothing measured yet, have None).
    pub fn telemetry(&self) -> Vec<LayerSummary> {
        self.telemetry.borrow().summary()
    }

    /// One step over the unfinished sequences of `seqs`; returns one event per sequence
    /// that took part.
    pub fn step(&self, seqs: &mut [&mut Sequence]) -> Result<Vec<StepEvent>> {
        self.step_within(seqs, usize::MAX)
    }

    /// [`Engine::step`] feeding at most `prefill_budget` prompt tokens in all (>= 1):
    /// every decoding sequence takes part; prefilling ones join in order, each with up
    /// to `prefill_chunk` tokens, while the budget lasts (the last one admitted may get
    /// a shorter chunk), so a long prompt cannot stall the decodes beside it.
    pub fn step_within(
        &self,
        seqs: &mut [&mut Sequence],
        prefill_budget: usize,
    ) -> Result<Vec<StepEvent>> {
        if prefill_budget == 0 {
            return Err(Error::Invalid("prefill_budget must be at least 1".into()));
        }
        let chunk = self.opts.prefill_chunk;
        let mut budget = prefill_budget;
        let mut inputs: Vec<StepInput<'_>> = Vec::with_capacity(seqs.len());
        let mut members: Vec<(usize, usize)> = Vec::with_capacity(seqs.len()); // (index, tokens)
        for (i, s) in seqs.iter_mut().enumerate() {
            if s.is_finished() {
                continue;
            }
            if self.tokenizer.is_none() && !s.params.stop_strings.is_empty() {
                return Err(Error::Invalid(
                    "stop strings need the engine's tokenizer".into(),
                ));
            }
            let seq: &mut Sequence = s;
            let tokens: &[u32] = if seq.fed < seq.prompt.len() {
                if budget == 0 {
                    continue;
                }
                let end = (seq.fed + chunk.min(budget)).min(seq.prompt.len());
                budget -= end - seq.fed;
                &seq.prompt[seq.fed..end]
            } else {
                match &seq.pending {
                    Some(t) => std::slice::from_ref(t),
                    None => {
                        return Err(Error::Invalid(format!(
                            "sequence {} has nothing to feed",
                            seq.id
                        )))
                    }
                }
            };
            members.push((i, tokens.len()));
            inputs.push(StepInput {
                tokens,
                cache: &mut seq.cache,
            });
        }
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let opts = StepOptions {
            all_logits: false,
            dense: self.opts.dense,
            profile: self.opts.profile,
            telemetry: self.opts.telemetry,
        };
        let out = self.model.step(&mut inputs, &opts)?;
        drop(inputs);
        if let Some(p) = &out.profile {
            self.profile.borrow_mut().add(p);
        }
        self.telemetry.borrow_mut().push(&out.telemetry);
        let logits: Vec<Vec<f32>> = out.logits.to_dtype(DType::F32)?.to_vec2()?;
        let mut events = Vec::with_capacity(members.len());
        for ((i, n), row) in members.into_iter().zip(logits) {
            let seq = &mut *seqs[i];
            if seq.fed < seq.prompt.len() {
                seq.fed += n;
                if seq.fed < seq.prompt.len() {
                    events.push(StepEvent {
                        seq: seq.id,
                        token: None,
                        text: String::new(),
                        finished: None,
                        generated: 0,
                        logprobs: None,
                    });
                    continue;
                }
            } else {
                seq.pending = None;
            }
            let a = seq.accept(&row, self.tokenizer)?;
            events.push(StepEvent {
                seq: seq.id,
                token: Some(a.token),
                text: a.text,
                finished: a.finished,
                generated: seq.generated().len(),
                logprobs: a.logprobs,
            });
        }
        Ok(events)
    }

    /// Step all of `seqs` together until every one has finished, handing each event to
    /// `on_event`.
    pub fn run(&self, seqs: &mut [Sequence], mut on_event: impl FnMut(&StepEvent)) -> Result<()> {
        loop {
            let mut active: Vec<&mut Sequence> =
                seqs.iter_mut().filter(|s| !s.is_finished()).collect();
            if active.is_empty() {
                return Ok(());
            }
            for e in self.step(&mut active)? {
                on_event(&e);
            }
        }
    }
}
