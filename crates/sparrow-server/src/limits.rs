//! Every size a request states has a limit here, checked before anything is allocated
//! for it (the body's own size is bounded first, by `ServerOptions::max_body_bytes`).
//! Larger values get a 400 naming the field and the limit. The others live where they
//! are enforced:
//! - `max_tokens` / `max_completion_tokens`: the context left after the prompt
//!   (`--max-model-len` or the model's), and with the prompt at most the scheduler's
//!   cache budget (`--max-cache-tokens`, `SchedulerOptions::max_cache_positions`), which
//!   also bounds the cache of all running requests together;
//! - `top_logprobs` / `logprobs`: `sparrow::engine::logprobs::MAX_TOP_LOGPROBS` (20);
//! - waiting requests: `--max-queue` (then 429), running ones `--max-batch`;
//! - `response_format` schemas: llguidance's `ParserLimits` (grammar size, lexer fuel per
//!   token), checked when the schema is compiled (a 400) and at every token.

/// Choices per request (`n`).
pub const MAX_CHOICES: usize = 8;
/// Stop strings per request (`stop`, `stop_sequences`); OpenAI allows 4.
pub const MAX_STOP_STRINGS: usize = 16;
/// Bytes of one stop string.
pub const MAX_STOP_BYTES: usize = 256;
/// Messages in one chat request.
pub const MAX_MESSAGES: usize = 4096;
/// Prompts in one completions request (a list of prompts).
pub const MAX_PROMPTS: usize = 64;
/// Default request body limit in bytes (`--max-body-bytes`).
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 << 20;
