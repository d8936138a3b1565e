//! What both APIs do with a prompt once it is tokens: check the sampling options and
//! the limits, make one sequence per choice (choice i seeded with seed + i), hand them
//! to the engine thread, then collect their text or stream it as it comes.

use crate::error::{Api, ApiError};
use crate::limits::{MAX_CHOICES, MAX_MESSAGES, MAX_STOP_BYTES, MAX_STOP_STRINGS};
use crate::state::{AppState, Ready};
use crate::worker::{Job, Update};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use sparrow::engine::logprobs::{TokenLogprobs, MAX_TOP_LOGPROBS};
use sparrow::engine::sampler::SamplerConfig;
use sparrow::engine::{FinishReason, OutputFormat, Sequence, SequenceParams};
use tokio::sync::mpsc as tmpsc;

/// Sampling and stopping options as a request states them (absent = the API's default).
#[derive(Debug, Clone, Default)]
pub struct Sampling {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub max_tokens: Option<u64>,
    pub stop: Vec<String>,
    pub n: Option<u64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// Log-probabilities per token: None = not asked; Some(k) = with k alternatives.
    pub logprobs: Option<u64>,
    /// The format the output must keep to (OpenAI's `response_format`).
    pub format: Option<OutputFormat>,
}

/// One part of a message's content as both APIs send it (`{"type": "text", "text":
/// ...}`; other types are refused).
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
pub struct TextPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// The text of `parts` joined; a part of another type is a 400 naming it (`what`:
/// how the API calls them, "content parts" or "content blocks").
pub fn text_of(parts: Vec<TextPart>, what: &str, api: Api) -> Result<String, ApiError> {
    let mut s = String::new();
    for p in parts {
        match (p.kind.as_str(), p.text) {
            ("text", Some(t)) => s.push_str(&t),
            (kind, _) => {
                return Err(ApiError::bad_request(
                    format!("{what} of type `{kind}` are not supported (text only)"),
                    api,
                ))
            }
        }
    }
    Ok(s)
}

/// 400 unless there are 1 to [`MAX_MESSAGES`] messages.
pub fn check_message_count(n: usize, api: Api) -> Result<(), ApiError> {
    if n == 0 {
        return Err(ApiError::bad_request("messages must not be empty", api));
    }
    if n > MAX_MESSAGES {
        return Err(ApiError::bad_request(
            format!("at most {MAX_MESSAGES} messages, got {n}"),
            api,
        ));
    }
    Ok(())
}

/// The prompt's token ids for `text`: the tokenizer's BOS (when it adds one), then the
/// text with the special tokens written in it (a chat template's) parsed.
pub fn encode(ready: &Ready, text: &str, api: Api) -> Result<Vec<u32>, ApiError> {
    let mut ids = ready.tokenizer.prefix_ids();
    ids.extend(
        ready
            .tokenizer
            .encode(text)
            .map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}"), api))?,
    );
    if ids.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty", api));
    }
    Ok(ids)
}

/// Sequences handed to the engine thread, one per choice.
pub struct Started {
    pub prompt_tokens: usize,
    pub choices: Vec<tmpsc::UnboundedReceiver<Update>>,
}

/// Check `s`, make `n` sequences for `ids` and queue them; 429 when the queue is full
/// (then none of them runs).
pub async fn start(
    state: &AppState,
    ready: &Ready,
    ids: Vec<u32>,
    s: &Sampling,
    api: Api,
) -> Result<Started, ApiError> {
    let n = s.n.unwrap_or(1);
    if n == 0 || n as usize > MAX_CHOICES {
        return Err(ApiError::bad_request(
            format!("n must be between 1 and {MAX_CHOICES}, got {n}"),
            api,
        ));
    }
    if s.stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::bad_request(
            format!(
                "at most {MAX_STOP_STRINGS} stop strings, got {}",
                s.stop.len()
            ),
            api,
        ));
    }
    if let Some(bad) = s
        .stop
        .iter()
        .find(|x| x.is_empty() || x.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::bad_request(
            format!(
                "a stop string must be 1 to {MAX_STOP_BYTES} bytes, got {}",
                bad.len()
            ),
            api,
        ));
    }
    if let Some(k) = s.logprobs.filter(|&k| k as usize > MAX_TOP_LOGPROBS) {
        return Err(ApiError::bad_request(
            format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
            api,
        ));
    }
    for (name, v) in [
        ("presence_penalty", s.presence_penalty),
        ("frequency_penalty", s.frequency_penalty),
    ] {
        if v.is_some_and(|x| !(-2.0..=2.0).contains(&x)) {
            return Err(ApiError::bad_request(
                format!("{name} must be between -2 and 2, got {}", v.unwrap_or(0.0)),
                api,
            ));
        }
    }
    let context = state.context(ready);
    let room = context.saturating_sub(ids.len());
    if room == 0 {
        return Err(ApiError::bad_request(
            format!(
                "the prompt is {} tokens; the model's context is {context}",
                ids.len()
            ),
            api,
        ));
    }
    // Without max_tokens: the rest of the context, or of the cache budget when smaller.
    let budget = state.opts.scheduler.max_cache_positions;
    let max_new = match s.max_tokens {
        None => room.min(budget.saturating_sub(ids.len())).max(1),
        Some(0) => return Err(ApiError::bad_request("max_tokens must be at least 1", api)),
        Some(m) if m as usize > room => {
            return Err(ApiError::bad_request(
                format!(
                    "max_tokens is {m}, but the prompt is {} tokens and the model's context {context}: at most {room} can be generated",
                    ids.len()
                ),
                api,
            ))
        }
        Some(m) => m as usize,
    };
    // What the sequence reserves must fit the batch's cache budget on its own.
    if ids.len() + max_new > budget {
        return Err(ApiError::bad_request(
            format!(
                "the prompt is {} tokens and max_tokens {max_new}: {} cache positions, more than this server's budget of {budget} (--max-cache-tokens)",
                ids.len(),
                ids.len() + max_new
            ),
            api,
        ));
    }
    let top_k = match s.top_k {
        None => 0,
        Some(k) if k <= 0 => 0, // -1 or 0: off, as vLLM and llama.cpp read it
        Some(k) => k as usize,
    };
    let sampler = SamplerConfig {
        temperature: s.temperature.unwrap_or(1.0),
        top_p: s.top_p.unwrap_or(1.0),
        top_k,
    };
    sampler
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string(), api))?;
    let seed = s.seed.map_or_else(rand::random::<u64>, |x| x as u64);
    // Compiled once; each choice gets its own copy of the parser.
    let constraint = match &s.format {
        Some(f) => Some(ready.grammars.constraint(f).map_err(|e| {
            ApiError::bad_request(
                format!("response_format: the schema does not compile: {e}"),
                api,
            )
        })?),
        None => None,
    };
    let prompt_tokens = ids.len();
    let mut choices = Vec::with_capacity(n as usize);
    for i in 0..n {
        let params = SequenceParams {
            max_new_tokens: max_new,
            sampler,
            seed: seed.wrapping_add(i),
            stop_tokens: ready.tokenizer.stop_ids.clone(),
            stop_strings: s.stop.clone(),
            presence_penalty: s.presence_penalty.unwrap_or(0.0) as f32,
            frequency_penalty: s.frequency_penalty.unwrap_or(0.0) as f32,
            logprobs: s.logprobs.map(|k| k.min(u64::from(u32::MAX)) as usize),
        };
        let mut seq = Sequence::new(state.next_id(), ids.clone(), params, &ready.model.cfg)
            .map_err(|e| ApiError::bad_request(e.to_string(), api))?;
        if let Some(c) = &constraint {
            seq.constrain(c.clone())
                .map_err(|e| ApiError::bad_request(e.to_string(), api))?;
        }
        let (tx, rx) = tmpsc::unbounded_channel();
        if !ready.engine.submit(Job { seq, updates: tx }) {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the engine thread has stopped",
                api,
            ));
        }
        choices.push(rx);
    }
    // Each sequence's first update says whether the queue took it.
    for rx in &mut choices {
        match rx.recv().await {
            Some(Update::Queued) => {}
            Some(Update::QueueFull) => {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "the server's queue is full: retry later",
                    api,
                ))
            }
            Some(Update::Failed(m)) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m, api))
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the engine thread answered {other:?} to a submission"),
                    api,
                ))
            }
        }
    }
    Ok(Started {
        prompt_tokens,
        choices,
    })
}

/// One choice's whole text and how it ended.
#[derive(Debug, Clone)]
pub struct Completed {
    pub text: String,
    pub reason: FinishReason,
    pub completion_tokens: usize,
    /// Each emitted token's log-probabilities (when asked).
    pub logprobs: Vec<TokenLogprobs>,
}

/// Wait for a choice to finish.
pub async fn collect(
    mut rx: tmpsc::UnboundedReceiver<Update>,
    api: Api,
) -> Result<Completed, ApiError> {
    let mut text = String::new();
    let mut lps = Vec::new();
    loop {
        match rx.recv().await {
            Some(Update::Token {
                text: t, logprobs, ..
            }) => {
                text.push_str(&t);
                lps.extend(logprobs);
            }
            Some(Update::Finished {
                reason,
                text: t,
                completion_tokens,
                logprobs,
            }) => {
                text.push_str(&t);
                lps.extend(logprobs);
                return Ok(Completed {
                    text,
                    reason,
                    completion_tokens,
                    logprobs: lps,
                });
            }
            Some(Update::Failed(m)) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m, api))
            }
            Some(Update::Queued | Update::QueueFull) => {}
            None => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the engine thread stopped",
                    api,
                ))
            }
        }
    }
}

/// Every choice's updates as they come, tagged with the choice's index.
pub fn merged(
    choices: Vec<tmpsc::UnboundedReceiver<Update>>,
) -> impl Stream<Item = (usize, Update)> + Send + 'static {
    stream::select_all(choices.into_iter().enumerate().map(|(i, rx)| {
        stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|u| (u, rx)) })
            .map(move |u| (i, u))
            .boxed()
    }))
}

/// `events` as a server-sent-event response, with keep-alive comments while idle.
pub fn sse(
    events: impl Stream<Item = Result<Event, std::convert::Infallible>> + Send + 'static,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
