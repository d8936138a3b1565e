//! The OpenAI API: `POST /v1/chat/completions`, `POST /v1/completions`, their
//! server-sent-event streams (`data: {...}` chunks, then `data: [DONE]`; with
//! `stream_options.include_usage` every chunk carries `usage: null` and a last chunk
//! with no choices carries the usage), and the model list.

use crate::error::{Api, ApiError, Refusals};
use crate::generation::{
    self, check_message_count, collect, merged, sse, text_of, Sampling, TextPart,
};
use crate::limits::MAX_PROMPTS;
use crate::state::{random_id, unix_now, AppState, Ready};
use crate::worker::Update;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use sparrow::chat::Message;
use sparrow::engine::logprobs::TokenLogprobs;
use sparrow::engine::OutputFormat;
use sparrow::tokenizer::Tokenizer;
use std::convert::Infallible;
use std::sync::Arc;
use utoipa::ToSchema;

const API: Api = Api::OpenAi;

/// `stop`: one string or a list.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize, Default, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A message's `content`: a string, a list of parts (text only here), or null (an
/// assistant turn that only called tools).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<TextPart>),
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// The options both endpoints share (read from the same body as the endpoint's own
/// fields, so an error names the field's path).
#[derive(Debug, Deserialize, Default, ToSchema)]
pub struct CommonOptions {
    /// At most the context left after the prompt.
    #[schema(minimum = 1)]
    pub max_tokens: Option<u64>,
    #[schema(minimum = 0.0)]
    pub temperature: Option<f64>,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    /// Not in OpenAI's API; vLLM and llama.cpp accept it (0 or -1: off).
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    /// At most `limits::MAX_CHOICES`.
    #[schema(minimum = 1, maximum = 8)]
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f64>,
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f64>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<u64>,
    pub logprobs: Option<bool>,
    /// At most `MAX_TOP_LOGPROBS`.
    #[schema(maximum = 20)]
    pub top_logprobs: Option<u64>,
    pub response_format: Option<ResponseFormat>,
}

/// `response_format`: free text, any JSON object, or JSON valid against a schema; the
/// two JSON formats are enforced by constrained decoding (`sparrow::engine::structured`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub description: Option<String>,
    /// The JSON schema the output must be valid against (absent: any JSON value).
    #[schema(value_type = Option<Object>)]
    pub schema: Option<Value>,
    /// Accepted; the schema is always enforced.
    pub strict: Option<bool>,
}

impl ResponseFormat {
    fn output_format(self) -> Option<OutputFormat> {
        match self {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some(OutputFormat::JsonObject),
            ResponseFormat::JsonSchema { json_schema } => Some(OutputFormat::JsonSchema(
                json_schema.schema.unwrap_or_else(|| json!({})),
            )),
        }
    }
}

/// The body of `POST /v1/chat/completions`: the endpoint's own fields and the options
/// shared with `/v1/completions` (the handler reads the two parts from the same JSON).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatCompletionBody {
    #[serde(flatten)]
    pub request: ChatRequest,
    #[serde(flatten)]
    pub options: CommonOptions,
}

/// The body of `POST /v1/completions`: its own fields and the shared options.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionBody {
    #[serde(flatten)]
    pub request: CompletionRequest,
    #[serde(flatten)]
    pub options: CommonOptions,
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of those.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptField,
    #[serde(default)]
    pub echo: bool,
    pub logprobs: Option<u64>,
    pub suffix: Option<String>,
    pub best_of: Option<u64>,
}

/// `max_tokens` of `/v1/completions` when the request has none (OpenAI's default; chat
/// completions default to the rest of the context).
pub const COMPLETION_DEFAULT_MAX_TOKENS: u64 = 16;

/// A JSON body, with the body-size limit's refusal as a 413.
pub(crate) fn body_json(body: Result<Bytes, BytesRejection>, api: Api) -> Result<Value, ApiError> {
    let bytes = body.map_err(|e| ApiError::new(e.status(), e.body_text(), api))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}"), api))
}

/// `T` from a parsed body; an error names the offending field's path
/// (`messages[0].content: invalid type ...`).
pub(crate) fn typed<T: serde::de::DeserializeOwned>(v: &Value, api: Api) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            String::new()
        } else {
            format!("`{path}`: ")
        };
        ApiError::bad_request(format!("invalid request body: {at}{}", e.inner()), api)
    })
}

/// Parse a JSON body into `T`.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    api: Api,
) -> Result<T, ApiError> {
    typed(&body_json(body, api)?, api)
}

impl CommonOptions {
    /// The sampling options (`logprobs`: the per-token log-probabilities asked for).
    fn sampling(
        self,
        max_tokens: Option<u64>,
        logprobs: Option<u64>,
    ) -> Result<(Sampling, bool, bool), ApiError> {
        let include_usage = self.stream_options.is_some_and(|o| o.include_usage);
        Ok((
            Sampling {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                seed: self.seed,
                max_tokens: max_tokens.or(self.max_tokens),
                stop: self.stop.map(StopField::into_vec).unwrap_or_default(),
                n: self.n,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                logprobs,
                format: None,
            },
            self.stream,
            include_usage,
        ))
    }
}

/// A token's text as the APIs show it (decoded alone: a piece of a character shows as
/// U+FFFD) and its UTF-8 bytes.
fn token_entry(tok: &Tokenizer, id: u32, logprob: f32) -> Value {
    let text = tok.decode(&[id], false).unwrap_or_default();
    json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
}

/// Chat's `logprobs.content` entries for `lps`.
fn chat_logprobs(tok: &Tokenizer, lps: &[TokenLogprobs]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|t| {
            let mut e = token_entry(tok, t.token, t.logprob);
            e["top_logprobs"] = t
                .top
                .iter()
                .map(|&(id, lp)| token_entry(tok, id, lp))
                .collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// The legacy completions' `logprobs` object for `lps` (offsets count from `start`).
fn completion_logprobs(tok: &Tokenizer, lps: &[TokenLogprobs], start: usize) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    let mut at = start;
    for t in lps {
        let text = tok.decode(&[t.token], false).unwrap_or_default();
        offsets.push(at);
        at += text.len();
        tokens.push(text);
        token_logprobs.push(t.logprob);
        let alts: serde_json::Map<String, Value> = t
            .top
            .iter()
            .map(|&(id, lp)| {
                let s = tok.decode(&[id], false).unwrap_or_default();
                (s, json!(lp))
            })
            .collect();
        top.push(Value::Object(alts));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

/// Chat messages as the template takes them (text parts joined; other parts refused).
pub(crate) fn to_messages(msgs: Vec<ChatMessage>, api: Api) -> Result<Vec<Message>, ApiError> {
    check_message_count(msgs.len(), api)?;
    msgs.into_iter()
        .map(|m| {
            let role = if m.role == "developer" {
                "system".to_string()
            } else {
                m.role
            };
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => text_of(parts, "content parts", api)?,
            };
            Ok(Message::new(role, content))
        })
        .collect()
}

/// The streamed chunks of one request: `object` (`chat.completion.chunk` or
/// `text_completion`) with the request's id, time and model around `choices`; with
/// `include_usage` every chunk carries `usage`, null until the last.
fn chunker(
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    include_usage: bool,
) -> impl Fn(Value, Option<Value>) -> Event + Send + 'static {
    move |choices, usage_field| {
        let mut c = json!({
            "id": id, "object": object, "created": created, "model": model,
            "system_fingerprint": null, "choices": choices,
        });
        if include_usage {
            c["usage"] = usage_field.unwrap_or(Value::Null);
        }
        Event::default().data(c.to_string())
    }
}

/// A failed step inside a stream (the 200 has gone out), in OpenAI's error shape.
fn stream_error(message: String) -> Event {
    let e =
        json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
    Event::default().data(e.to_string())
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// A request's own fields and the shared options from one body, once its model is
/// known to be the one served and loaded.
fn open<T: serde::de::DeserializeOwned>(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
    model: impl Fn(&T) -> &str,
) -> Result<(T, CommonOptions, &Ready), ApiError> {
    let v = body_json(body, API)?;
    let req: T = typed(&v, API)?;
    let common: CommonOptions = typed(&v, API)?;
    state.check_model(model(&req), API)?;
    Ok((req, common, state.ready(API)?))
}

/// `POST /v1/chat/completions`.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    request_body = ChatCompletionBody,
    responses(
        (status = 200, description = "A chat.completion object, or with `stream` a text/event-stream of chat.completion.chunk objects ending with `data: [DONE]`"),
        Refusals,
    ))]
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (req, common, ready) = open::<ChatRequest>(&state, body, |r| &r.model)?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), k) => Some(k.unwrap_or(0)),
        (_, Some(k)) if k > 0 => {
            return Err(ApiError::bad_request(
                "top_logprobs needs logprobs: true",
                API,
            ))
        }
        _ => None,
    };
    let messages = to_messages(req.messages, API)?;
    let prompt = ready
        .template
        .render(&messages, true)
        .map_err(|e| ApiError::bad_request(e.to_string(), API))?;
    let ids = generation::encode(ready, &prompt, API)?;
    let (mut sampling, stream, include_usage) =
        common.sampling(req.max_completion_tokens, logprobs)?;
    sampling.format = req.response_format.and_then(ResponseFormat::output_format);
    let started = generation::start(&state, ready, ids, &sampling, API).await?;
    let id = random_id("chatcmpl-");
    let created = unix_now();
    let model = state.opts.served_model_name.clone();
    tracing::info!(%id, prompt_tokens = started.prompt_tokens, n = started.choices.len(), stream, "chat completion");
    if !stream {
        let mut choices = Vec::new();
        let mut completion_tokens = 0;
        for (i, rx) in started.choices.into_iter().enumerate() {
            let c = collect(rx, API).await?;
            completion_tokens += c.completion_tokens;
            choices.push(json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text, "refusal": null},
                "logprobs": logprobs.map(|_| chat_logprobs(&ready.tokenizer, &c.logprobs)),
                "finish_reason": c.reason.as_str(),
            }));
        }
        return Ok(Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage(started.prompt_tokens, completion_tokens),
            "system_fingerprint": null,
        }))
        .into_response());
    }
    let prompt_tokens = started.prompt_tokens;
    let n = started.choices.len();
    let chunk = chunker(id, "chat.completion.chunk", created, model, include_usage);
    let mut updates = merged(started.choices);
    let tok = ready.tokenizer.clone();
    // A token's chunk: its text (possibly empty while a character is incomplete) and,
    // when asked, its log-probabilities.
    let lp = move |l: Option<TokenLogprobs>| -> Value {
        l.map_or(Value::Null, |l| {
            chat_logprobs(&tok, std::slice::from_ref(&l))
        })
    };
    let events = async_stream::stream! {
        for i in 0..n {
            yield Ok::<Event, Infallible>(chunk(json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]), None));
        }
        let mut completion_tokens = 0;
        while let Some((i, u)) = updates.next().await {
            match u {
                Update::Token { text, logprobs, .. } if !text.is_empty() || logprobs.is_some() => {
                    yield Ok(chunk(json!([{"index": i, "delta": {"content": text}, "logprobs": lp(logprobs), "finish_reason": null}]), None));
                }
                Update::Finished { reason, text, completion_tokens: c, logprobs } => {
                    completion_tokens += c;
                    if !text.is_empty() || logprobs.is_some() {
                        yield Ok(chunk(json!([{"index": i, "delta": {"content": text}, "logprobs": lp(logprobs), "finish_reason": null}]), None));
                    }
                    yield Ok(chunk(json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": reason.as_str()}]), None));
                }
                Update::Failed(m) => yield Ok(stream_error(m)),
                _ => {}
            }
        }
        if include_usage {
            yield Ok(chunk(json!([]), Some(usage(prompt_tokens, completion_tokens))));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Ok(sse(events))
}

/// `POST /v1/completions`.
#[utoipa::path(post, path = "/v1/completions", tag = "openai",
    request_body = CompletionBody,
    responses(
        (status = 200, description = "A text_completion object, or with `stream` a text/event-stream of them ending with `data: [DONE]`"),
        Refusals,
    ))]
pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (req, common, ready) = open::<CompletionRequest>(&state, body, |r| &r.model)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("suffix is not supported", API));
    }
    // Each prompt's ids and, for `echo`, its text as given (ids decoded as they are).
    let prompts: Vec<(Vec<u32>, Option<String>)> = match req.prompt {
        PromptField::Text(t) => vec![(generation::encode(ready, &t, API)?, Some(t))],
        PromptField::Texts(ts) => {
            check_prompts(ts.len())?;
            ts.into_iter()
                .map(|t| Ok((generation::encode(ready, &t, API)?, Some(t))))
                .collect::<Result<_, ApiError>>()?
        }
        PromptField::Ids(ids) => vec![(ids, None)],
        PromptField::IdLists(lists) => {
            check_prompts(lists.len())?;
            lists.into_iter().map(|ids| (ids, None)).collect()
        }
    };
    let (mut sampling, stream, include_usage) = common.sampling(None, req.logprobs)?;
    // The legacy API's documented default.
    sampling
        .max_tokens
        .get_or_insert(COMPLETION_DEFAULT_MAX_TOKENS);
    if let Some(b) = req.best_of {
        if b != sampling.n.unwrap_or(1) {
            return Err(ApiError::bad_request(
                "best_of other than n is not supported",
                API,
            ));
        }
    }
    let echo = req.echo;
    let mut started = Vec::with_capacity(prompts.len());
    let mut echoes = Vec::with_capacity(prompts.len());
    let mut prompt_tokens = 0;
    for (ids, given) in prompts {
        if let Some(bad) = ids
            .iter()
            .find(|&&t| t as usize >= ready.model.cfg.vocab_size)
        {
            return Err(ApiError::bad_request(
                format!("token id {bad} is outside the vocabulary"),
                API,
            ));
        }
        let text = match (echo, given) {
            (false, _) => String::new(),
            (true, Some(t)) => t,
            (true, None) => ready
                .tokenizer
                .decode(&ids, false)
                .map_err(|e| ApiError::bad_request(e.to_string(), API))?,
        };
        let s = generation::start(&state, ready, ids, &sampling, API).await?;
        prompt_tokens += s.prompt_tokens;
        echoes.push(text);
        started.push(s);
    }
    let id = random_id("cmpl-");
    let created = unix_now();
    let model = state.opts.served_model_name.clone();
    tracing::info!(%id, prompt_tokens, prompts = started.len(), stream, "completion");
    let per_prompt = started.first().map_or(1, |s| s.choices.len());
    let all: Vec<_> = started.into_iter().flat_map(|s| s.choices).collect();
    if !stream {
        let mut choices = Vec::new();
        let mut completion_tokens = 0;
        for (i, rx) in all.into_iter().enumerate() {
            let c = collect(rx, API).await?;
            completion_tokens += c.completion_tokens;
            choices.push(json!({
                "index": i,
                "text": format!("{}{}", echoes[i / per_prompt], c.text),
                "logprobs": req.logprobs.map(|_| completion_logprobs(&ready.tokenizer, &c.logprobs, echoes[i / per_prompt].len())),
                "finish_reason": c.reason.as_str(),
            }));
        }
        return Ok(Json(json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
            "system_fingerprint": null,
        }))
        .into_response());
    }
    let chunk = chunker(id, "text_completion", created, model, include_usage);
    let n = all.len();
    let mut updates = merged(all);
    let tok = ready.tokenizer.clone();
    // Streamed offsets count each choice's text so far (its echo included).
    let mut offsets: Vec<usize> = (0..n).map(|i| echoes[i / per_prompt].len()).collect();
    let mut lp = move |l: Option<TokenLogprobs>, i: usize| -> Value {
        l.map_or(Value::Null, |l| {
            let v = completion_logprobs(&tok, std::slice::from_ref(&l), offsets[i]);
            offsets[i] += v["tokens"][0].as_str().map_or(0, str::len);
            v
        })
    };
    let events = async_stream::stream! {
        if echo {
            for i in 0..n {
                yield Ok::<Event, Infallible>(chunk(json!([{"index": i, "text": echoes[i / per_prompt], "logprobs": null, "finish_reason": null}]), None));
            }
        }
        let mut completion_tokens = 0;
        while let Some((i, u)) = updates.next().await {
            match u {
                Update::Token { text, logprobs, .. } if !text.is_empty() || logprobs.is_some() => {
                    yield Ok(chunk(json!([{"index": i, "text": text, "logprobs": lp(logprobs, i), "finish_reason": null}]), None));
                }
                Update::Finished { reason, text, completion_tokens: c, logprobs } => {
                    completion_tokens += c;
                    yield Ok(chunk(json!([{"index": i, "text": text, "logprobs": lp(logprobs, i), "finish_reason": reason.as_str()}]), None));
                }
                Update::Failed(m) => yield Ok(stream_error(m)),
                _ => {}
            }
        }
        if include_usage {
            yield Ok(chunk(json!([]), Some(usage(prompt_tokens, completion_tokens))));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Ok(sse(events))
}

fn check_prompts(n: usize) -> Result<(), ApiError> {
    if n == 0 || n > MAX_PROMPTS {
        return Err(ApiError::bad_request(
            format!("between 1 and {MAX_PROMPTS} prompts, got {n}"),
            API,
        ));
    }
    Ok(())
}

/// `GET /v1/models` in OpenAI's shape.
pub fn model_list(state: &AppState, created: u64) -> Value {
    json!({"object": "list", "data": [model_object(state, created)]})
}

pub fn model_object(state: &AppState, created: u64) -> Value {
    json!({"id": state.opts.served_model_name, "object": "model", "created": created, "owned_by": "sparrow"})
}

/// `GET /v1/models/{id}`.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai",
    params(("id" = String, Path, description = "The served model's id")),
    responses((status = 200, description = "A model object"), (status = 404, description = "Unknown model")))]
pub async fn model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state.check_model(&id, API)?;
    let ready = state.ready(API)?;
    Ok(Json(model_object(&state, ready.created)).into_response())
}
