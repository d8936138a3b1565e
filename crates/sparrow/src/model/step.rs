//! The packed batch of the engine's step: the new tokens of several sequences side by
//! side in one (N, C) activation, each sequence's run of rows a [`Segment`] at its own
//! position with its own cache. Projections, norms and FFNs run once over all N rows
//! (GEMMs instead of one GEMV per sequence); attention runs per segment over that
//! sequence's cache with the fast kernels (flash-decoding, blocked causal prefill,
//! the fused indexer top-k and sparse attention).

use super::utilization::RoutingStats;
use crate::error::{Error, Result};
use crate::kernels::pool;
use std::time::Instant;

/// One sequence's rows of the packed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First row in the packed batch.
    pub start: usize,
    /// Rows (new tokens): 1 for a decode step, more for a prefill chunk.
    pub len: usize,
    /// Position of the first of them (= the sequence's cached length).
    pub pos: usize,
}

impl Segment {
    pub fn rows(&self) -> std::ops::Range<usize> {
        self.start..self.start + self.len
    }

    /// Positions visible to the segment's last token.
    pub fn visible(&self) -> usize {
        self.pos + self.len
    }
}

/// Per-call switches of a step.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepOptions {
    /// Logits of every new token (perplexity, parity) instead of each segment's last.
    pub all_logits: bool,
    /// Every selector set to all causal positions: DSA layers attend densely (their
    /// index keys are still cached). The in-run dense baseline of the benchmarks.
    pub dense: bool,
    /// Time each layer's attention and FFN ([`StepProfile`]).
    pub profile: bool,
    /// Measure what the model's sparse parts did ([`LayerTelemetry`]): each MoE layer's
    /// expert counts and, on each DSA layer that ran sparse for the step's first
    /// sequence, the recall of its last query (one O(H * positions) dense pass).
    pub telemetry: bool,
}

/// What one layer's sparse parts did in a step (with [`StepOptions::telemetry`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerTelemetry {
    /// MoE layers: the router's expert counts over the step's tokens.
    pub routing: Option<RoutingStats>,
    /// DSA layers that ran sparse for the step's first sequence: the share of its last
    /// query's dense attention mass (mean over heads) on the indexer's selection.
    pub recall: Option<f32>,
    /// The same query's selection: the cache positions it attended, ascending (which
    /// prompt positions a sparse layer kept, e.g. a passkey's line: `eval passkey
    /// --key-selection`).
    pub selected: Option<Vec<u32>>,
}

/// Seconds spent per layer in one or more steps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepProfile {
    /// Per layer: attention (norm, projections, cache writes, kernels).
    pub attention: Vec<f64>,
    /// Per layer: the FFN half (norm, dense MLP or MoE).
    pub ffn: Vec<f64>,
    /// Embedding, final norm and LM head.
    pub head: f64,
}

impl StepProfile {
    pub fn new(layers: usize) -> Self {
        Self {
            attention: vec![0.0; layers],
            ffn: vec![0.0; layers],
            head: 0.0,
        }
    }

    /// Add another profile's seconds to this one.
    pub fn add(&mut self, other: &StepProfile) {
        let grow = |a: &mut Vec<f64>, b: &Vec<f64>| {
            if a.len() < b.len() {
                a.resize(b.len(), 0.0);
            }
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        };
        grow(&mut self.attention, &other.attention);
        grow(&mut self.ffn, &other.ffn);
        self.head += other.head;
    }

    pub fn total(&self) -> f64 {
        self.attention.iter().sum::<f64>() + self.ffn.iter().sum::<f64>() + self.head
    }
}

/// A stopwatch that only runs when profiling.
pub(crate) struct Lap(Option<Instant>);

impl Lap {
    pub(crate) fn start(on: bool) -> Self {
        Lap(on.then(Instant::now))
    }

    /// Seconds since the start (or the last lap), and restart; 0 when not profiling.
    pub(crate) fn lap(&mut self) -> f64 {
        match &mut self.0 {
            Some(t) => {
                let s = t.elapsed().as_secs_f64();
                *t = Instant::now();
                s
            }
            None => 0.0,
        }
    }
}

/// `f(segment, its cache)` for every segment of a step, results in segment order.
/// When every segment is one decode token, segments run in parallel (each one's
/// kernels then run on its thread alone: they are short); otherwise one after the
/// other, each segment's kernels parallel (a prefill chunk would otherwise be left to
/// one thread while the others finish their decodes).
pub(crate) fn per_segment<C: Send>(
    segs: &[Segment],
    caches: &mut [C],
    f: impl Fn(&Segment, &mut C) -> Result<Vec<f32>> + Sync,
) -> Result<Vec<Vec<f32>>> {
    if segs.len() != caches.len() {
        return Err(Error::Invalid(format!(
            "{} segments for {} caches",
            segs.len(),
            caches.len()
        )));
    }
    if segs.iter().any(|s| s.len > 1) {
        return segs.iter().zip(caches).map(|(s, c)| f(s, c)).collect();
    }
    type Work<'a, C> = (&'a Segment, &'a mut C, Option<Result<Vec<f32>>>);
    let mut work: Vec<Work<C>> = segs
        .iter()
        .zip(caches.iter_mut())
        .map(|(s, c)| (s, c, None))
        .collect();
    pool::for_each_mut(&mut work, |_, (s, c, out)| *out = Some(f(s, c)));
    work.into_iter()
        .map(|(_, _, out)| out.unwrap_or_else(|| Err(Error::Invalid("segment not run".into()))))
        .collect()
}
