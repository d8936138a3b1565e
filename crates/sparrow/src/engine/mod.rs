//! The inference engine (DESIGN.md §5c): per-request state ([`sequence::Sequence`]),
//! the batched step that advances any mix of prefilling and decoding sequences in one
//! forward ([`step::Engine`]), sampling, incremental detokenization and stop rules.
//! `generate`, the evaluations and `logits --decode` all run through it.

pub mod detok;
pub mod generate;
pub mod sampler;
pub mod sequence;
pub mod step;
pub mod stop;

pub use sequence::{FinishReason, Sequence, SequenceParams};
pub use step::{Engine, EngineOptions, StepEvent};
