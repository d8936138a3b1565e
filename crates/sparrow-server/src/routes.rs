//! The router: the API routes behind the key check and the body limit, `/health` and
//! `/metrics` open to probes and scrapers, and the model list in the shape of whichever API asks.

use crate::error::{Api, ApiError};
use crate::state::AppState;
use crate::{anthropic, openai};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

/// Every route of the server over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .layer(middleware::from_fn_with_state(state.clone(), require_key))
        .layer(DefaultBodyLimit::max(state.opts.max_body_bytes));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(not_found)
        .with_state(state)
}

/// Which API's error shape a request expects: Anthropic's for its routes and for any
/// request carrying `anthropic-version`, OpenAI's otherwise.
fn api_of(path: &str, headers: &HeaderMap) -> Api {
    if path.starts_with("/v1/messages") || headers.contains_key("anthropic-version") {
        Api::Anthropic
    } else {
        Api::OpenAi
    }
}

/// `Authorization: Bearer KEY` (OpenAI's clients) or `x-api-key: KEY` (Anthropic's).
async fn require_key(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if state.opts.api_keys.is_empty() {
        return Ok(next.run(req).await);
    }
    let headers = req.headers();
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let x_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let ok = [bearer, x_key]
        .into_iter()
        .flatten()
        .any(|k| state.opts.api_keys.iter().any(|want| want == k.trim()));
    if ok {
        return Ok(next.run(req).await);
    }
    let api = api_of(req.uri().path(), headers);
    let msg = if bearer.is_none() && x_key.is_none() {
        "an API key is required (Authorization: Bearer KEY or x-api-key: KEY)"
    } else {
        "invalid API key"
    };
    Err(ApiError::new(StatusCode::UNAUTHORIZED, msg, api))
}

/// `GET /health`: 200 once the model is loaded, 503 before.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response()
    }
}

/// `GET /metrics` (open, as `/health`: Prometheus scrapes without a key); 503 while
/// loading.
async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let ready = state.ready(Api::OpenAi)?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ready.engine.metrics.render(),
    )
        .into_response())
}

/// `GET /v1/models`.
async fn models(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let api = api_of("/v1/models", &headers);
    let ready = state.ready(api)?;
    let body = match api {
        Api::OpenAi => openai::model_list(&state, ready.created),
        Api::Anthropic => anthropic::model_list(&state, ready.created),
    };
    Ok(Json(body).into_response())
}

async fn not_found(req: Request) -> ApiError {
    let api = api_of(req.uri().path(), req.headers());
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route {} {}", req.method(), req.uri().path()),
        api,
    )
}
