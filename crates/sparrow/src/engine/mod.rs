//! The inference engine (DESIGN.md §5c): per-request state ([`sequence::Sequence`]),
//! the batched step that advances any mix of prefilling and decoding sequences in one
//! forward ([`step::Engine`]), continuous batching over it ([`scheduler::Scheduler`]),
//! sampling, incremental detokenization, stop rules and structured output
//! ([`structured::Constraint`]).
//! `generate`, the evaluations and `logits --decode` all run through it.

pub mod detok;
pub mod generate;
pub mod logprobs;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod step;
pub mod stop;
pub mod structured;
pub mod telemetry;

pub use scheduler::{Refused, Scheduler, SchedulerOptions};
pub use sequence::{FinishReason, Sequence, SequenceParams};
pub use step::{Engine, EngineOptions, StepEvent};
pub use structured::{Constraint, Grammars, OutputFormat};
