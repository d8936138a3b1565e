//! The Anthropic Messages API: `POST /v1/messages` (a reply as text content blocks, with
//! `stop_reason` `end_turn` / `max_tokens` / `stop_sequence`) and its stream of named
//! events in the documented order (`message_start` with the input usage,
//! `content_block_start`, `ping`, `content_block_delta`..., `content_block_stop`,
//! `message_delta` with the stop reason and output usage, `message_stop`; a `ping`
//! every few seconds while nothing else is sent), and `POST /v1/messages/count_tokens`.

use crate::error::{Api, ApiError, Refusals};
use crate::generation::{
    self, check_message_count, collect, merged, sse, text_of, Sampling, TextPart,
};
use crate::openai::parse_body;
use crate::state::{random_id, AppState, Ready};
use crate::worker::Update;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use sparrow::chat::Message;
use sparrow::engine::FinishReason;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use utoipa::ToSchema;

const API: Api = Api::Anthropic;
/// Seconds between `ping` events while a stream has nothing else to send.
const PING_EVERY: Duration = Duration::from_secs(5);

/// `content` or `system`: a string or a list of blocks (text only here).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Blocks {
    Text(String),
    List(Vec<TextPart>),
}

impl Blocks {
    fn text(self) -> Result<String, ApiError> {
        match self {
            Blocks::Text(t) => Ok(t),
            Blocks::List(blocks) => text_of(blocks, "content blocks", API),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct InputMessage {
    pub role: String,
    pub content: Blocks,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct MessagesRequest {
    pub model: String,
    #[schema(minimum = 1)]
    pub max_tokens: u64,
    pub messages: Vec<InputMessage>,
    pub system: Option<Blocks>,
    #[serde(default)]
    pub stop_sequences: Vec<String>,
    #[schema(minimum = 0.0)]
    pub temperature: Option<f64>,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    /// Accepted and not used (`user_id` is for the provider's abuse detection).
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub stream: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CountTokensRequest {
    pub model: String,
    pub messages: Vec<InputMessage>,
    pub system: Option<Blocks>,
}

/// The prompt's token ids: `system` first, then the turns, through the chat template.
fn prompt_ids(
    ready: &Ready,
    system: Option<Blocks>,
    messages: Vec<InputMessage>,
) -> Result<Vec<u32>, ApiError> {
    check_message_count(messages.len(), API)?;
    let mut msgs = Vec::with_capacity(messages.len() + 1);
    if let Some(s) = system {
        msgs.push(Message::new("system", s.text()?));
    }
    for m in messages {
        if m.role != "user" && m.role != "assistant" {
            return Err(ApiError::bad_request(
                format!(
                    "message role must be `user` or `assistant`, got `{}`",
                    m.role
                ),
                API,
            ));
        }
        msgs.push(Message::new(m.role, m.content.text()?));
    }
    let prompt = ready
        .template
        .render(&msgs, true)
        .map_err(|e| ApiError::bad_request(e.to_string(), API))?;
    generation::encode(ready, &prompt, API)
}

/// `stop_reason` and `stop_sequence` for how a sequence ended.
fn stop_reason(r: &FinishReason) -> (&'static str, Value) {
    match r {
        FinishReason::StopString(s) => ("stop_sequence", json!(s)),
        FinishReason::Length | FinishReason::ContextFull => ("max_tokens", Value::Null),
        FinishReason::StopToken(_) | FinishReason::FormatComplete | FinishReason::Aborted => {
            ("end_turn", Value::Null)
        }
    }
}

fn event(name: &str, data: Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// `POST /v1/messages`.
#[utoipa::path(post, path = "/v1/messages", tag = "anthropic",
    request_body = MessagesRequest,
    responses(
        (status = 200, description = "A message object, or with `stream` a text/event-stream of named events (message_start ... message_stop)"),
        Refusals,
    ))]
pub async fn messages(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: MessagesRequest = parse_body(body, API)?;
    state.check_model(&req.model, API)?;
    let ready = state.ready(API)?;
    let ids = prompt_ids(ready, req.system, req.messages)?;
    let sampling = Sampling {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        seed: None,
        max_tokens: Some(req.max_tokens),
        stop: req.stop_sequences,
        n: Some(1),
        ..Default::default()
    };
    let mut started = generation::start(&state, ready, ids, &sampling, API).await?;
    let id = random_id("msg_");
    let model = state.opts.served_model_name.clone();
    let input_tokens = started.prompt_tokens;
    tracing::info!(%id, input_tokens, stream = req.stream, "message");
    let rx = started.choices.remove(0);
    if !req.stream {
        let c = collect(rx, API).await?;
        let (reason, seq) = stop_reason(&c.reason);
        return Ok(Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": c.text}],
            "stop_reason": reason, "stop_sequence": seq,
            "usage": {"input_tokens": input_tokens, "output_tokens": c.completion_tokens},
        }))
        .into_response());
    }
    let mut updates = merged(vec![rx]);
    let events = async_stream::stream! {
        yield Ok::<Event, Infallible>(event("message_start", json!({
            "type": "message_start",
            "message": {
                "id": id, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": input_tokens, "output_tokens": 0},
            },
        })));
        yield Ok(event("content_block_start", json!({
            "type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""},
        })));
        yield Ok(event("ping", json!({"type": "ping"})));
        let mut ticker = tokio::time::interval(PING_EVERY);
        ticker.tick().await; // the first tick is immediate
        loop {
            let next = tokio::select! {
                u = updates.next() => u,
                _ = ticker.tick() => {
                    yield Ok(event("ping", json!({"type": "ping"})));
                    continue;
                }
            };
            let Some((_, u)) = next else { break };
            match u {
                Update::Token { text, .. } if !text.is_empty() => {
                    ticker.reset();
                    yield Ok(event("content_block_delta", json!({
                        "type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": text},
                    })));
                }
                Update::Finished { reason, text, completion_tokens, .. } => {
                    if !text.is_empty() {
                        yield Ok(event("content_block_delta", json!({
                            "type": "content_block_delta", "index": 0,
                            "delta": {"type": "text_delta", "text": text},
                        })));
                    }
                    let (reason, seq) = stop_reason(&reason);
                    yield Ok(event("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
                    yield Ok(event("message_delta", json!({
                        "type": "message_delta",
                        "delta": {"stop_reason": reason, "stop_sequence": seq},
                        "usage": {"output_tokens": completion_tokens},
                    })));
                    yield Ok(event("message_stop", json!({"type": "message_stop"})));
                    break;
                }
                Update::Failed(m) => {
                    yield Ok(event("error", json!({"type": "error", "error": {"type": "api_error", "message": m}})));
                    break;
                }
                _ => {}
            }
        }
    };
    Ok(sse(events))
}

/// `POST /v1/messages/count_tokens`: the prompt's tokens as `/v1/messages` would run it.
#[utoipa::path(post, path = "/v1/messages/count_tokens", tag = "anthropic",
    request_body = CountTokensRequest,
    responses((status = 200, description = "`{\"input_tokens\": N}`"), (status = 400, description = "Invalid request")))]
pub async fn count_tokens(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CountTokensRequest = parse_body(body, API)?;
    state.check_model(&req.model, API)?;
    let ready = state.ready(API)?;
    let ids = prompt_ids(ready, req.system, req.messages)?;
    Ok(Json(json!({"input_tokens": ids.len()})).into_response())
}

/// `GET /v1/models` in Anthropic's shape (asked with an `anthropic-version` header).
pub fn model_list(state: &AppState, created: u64) -> Value {
    let m = model_object(state, created);
    json!({"data": [m], "has_more": false, "first_id": state.opts.served_model_name, "last_id": state.opts.served_model_name})
}

pub fn model_object(state: &AppState, created: u64) -> Value {
    json!({
        "type": "model", "id": state.opts.served_model_name,
        "display_name": state.opts.served_model_name,
        "created_at": rfc3339(created),
    })
}

/// Unix seconds as an RFC 3339 UTC time (`1970-01-01T00:00:00Z`).
fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_342_399), "2026-12-03T23:59:59Z");
    }
}
