//! Continuous batching (DESIGN.md §5c): sequences wait in arrival order, at most
//! `max_batch` run at once, and each step admits waiting ones into the free slots, feeds
//! every decoding sequence its last token and the prefilling ones prompt chunks within a
//! per-step token budget, then drops whatever ended. A new request therefore joins at
//! the next step, a long prompt is fed in pieces beside the running decodes, and a
//! finished or cancelled sequence frees its slot (and its cache) at once. The cache
//! positions the running sequences reserve together stay within a budget, so no mix of
//! requests can make the batch's cache outgrow it.
//!
//! The scheduler is synchronous and owns no thread: the server runs it on its engine
//! thread, tests drive it step by step.

use super::sequence::Sequence;
use super::step::{Engine, StepEvent};
use crate::error::{Error, Result};
use std::collections::VecDeque;

/// Limits of a [`Scheduler`].
#[derive(Debug, Clone, Copy)]
pub struct SchedulerOptions {
    /// Most sequences in one step.
    pub max_batch: usize,
    /// Most sequences waiting for a slot; [`Scheduler::submit`] refuses beyond it.
    pub max_queue: usize,
    /// Most prompt tokens fed in one step, over all prefilling sequences.
    pub prefill_budget: usize,
    /// Most cache positions the running sequences may hold together, each counted at
    /// what it reserves ([`Sequence::reserved_positions`]: its prompt plus its token
    /// budget, within the context). A waiting sequence starts when it fits; one that
    /// could never fit is refused. This bounds the cache memory of the whole batch (as
    /// llama.cpp's `--ctx-size` does for its slots).
    pub max_cache_positions: usize,
}

/// [`SchedulerOptions::max_cache_positions`] unless told otherwise: 256K positions
/// (SmolLM2-135M's f16 cache: 5.6 GiB; the bundled model's f32 cache: 1.5 GiB).
pub const DEFAULT_MAX_CACHE_POSITIONS: usize = 1 << 18;

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_queue: 64,
            prefill_budget: 512,
            max_cache_positions: DEFAULT_MAX_CACHE_POSITIONS,
        }
    }
}

impl SchedulerOptions {
    pub fn validate(&self) -> Result<()> {
        if self.max_batch == 0 || self.prefill_budget == 0 || self.max_cache_positions == 0 {
            return Err(Error::Invalid(format!(
                "max_batch ({}), prefill_budget ({}) and max_cache_positions ({}) must be at least 1",
                self.max_batch, self.prefill_budget, self.max_cache_positions
            )));
        }
        Ok(())
    }
}

/// A submission the scheduler could not take.
#[derive(Debug)]
pub enum Refused {
    /// `max_queue` sequences are already waiting (the server answers 429).
    QueueFull(Box<Sequence>),
    /// A sequence with this id is already queued or running.
    DuplicateId(Box<Sequence>),
    /// The sequence reserves more cache positions than `max_cache_positions`: it could
    /// never run.
    TooLarge(Box<Sequence>),
}

/// Runs any number of sequences through one engine, `max_batch` at a time.
pub struct Scheduler<'m> {
    engine: Engine<'m>,
    opts: SchedulerOptions,
    running: Vec<Sequence>,
    waiting: VecDeque<Sequence>,
}

impl<'m> Scheduler<'m> {
    pub fn new(engine: Engine<'m>, opts: SchedulerOptions) -> Result<Self> {
        opts.validate()?;
        Ok(Self {
            engine,
            opts,
            running: Vec::new(),
            waiting: VecDeque::new(),
        })
    }

    /// Queue `seq`; it runs from the next step that has a free slot.
    pub fn submit(&mut self, seq: Sequence) -> std::result::Result<(), Refused> {
        if self.get(seq.id).is_some() {
            return Err(Refused::DuplicateId(Box::new(seq)));
        }
        if seq.reserved_positions() > self.opts.max_cache_positions {
            return Err(Refused::TooLarge(Box::new(seq)));
        }
        if self.waiting.len() >= self.opts.max_queue {
            return Err(Refused::QueueFull(Box::new(seq)));
        }
        self.waiting.push_back(seq);
        Ok(())
    }

    /// End sequence `id` now (its client went away); false if it is not here.
    pub fn cancel(&mut self, id: u64) -> bool {
        let before = self.running.len() + self.waiting.len();
        self.running.retain(|s| s.id != id);
        self.waiting.retain(|s| s.id != id);
        before != self.running.len() + self.waiting.len()
    }

    /// Cancel every sequence (after a failed step); returns their ids.
    pub fn cancel_all(&mut self) -> Vec<u64> {
        let ids = self
            .running
            .iter()
            .chain(&self.waiting)
            .map(|s| s.id)
            .collect();
        self.running.clear();
        self.waiting.clear();
        ids
    }

    /// Sequences in the running batch.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Sequences waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The engine's recent telemetry ([`Engine::telemetry`]).
    pub fn telemetry(&self) -> Vec<crate::engine::telemetry::LayerSummary> {
        self.engine.telemetry()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// The sequence `id`, running or waiting.
    pub fn get(&self, id: u64) -> Option<&Sequence> {
        self.running
            .iter()
            .chain(&self.waiting)
            .find(|s| s.id == id)
    }

    /// Admit waiting sequences into free slots, run one engine step over the batch and
    /// retire what ended. Returns the step's events (a sequence admitted already
    /// finished, with a budget of 0 tokens, gets its `Length` event here).
    pub fn step(&mut self) -> Result<Vec<StepEvent>> {
        let mut events = Vec::new();
        let mut reserved: usize = self.running.iter().map(Sequence::reserved_positions).sum();
        while self.running.len() < self.opts.max_batch {
            // In arrival order: the first waiting sequence starts once its cache fits.
            let fits = self.waiting.front().is_some_and(|s| {
                s.is_finished()
                    || reserved + s.reserved_positions() <= self.opts.max_cache_positions
            });
            if !fits {
                break;
            }
            let Some(seq) = self.waiting.pop_front() else {
                break;
            };
            if let Some(reason) = seq.finish_reason() {
                events.push(StepEvent {
                    seq: seq.id,
                    token: None,
                    text: String::new(),
                    finished: Some(reason.clone()),
                    generated: 0,
                    logprobs: None,
                });
                continue;
            }
            reserved += seq.reserved_positions();
            self.running.push(seq);
        }
        if !self.running.is_empty() {
            let mut batch: Vec<&mut Sequence> = self.running.iter_mut().collect();
            events.extend(
                self.engine
                    .step_within(&mut batch, self.opts.prefill_budget)?,
            );
            self.running.retain(|s| !s.is_finished());
        }
        Ok(events)
    }
}
