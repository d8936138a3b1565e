//! The router: the API routes behind the key check and the body limit, `/health`,
//! `/metrics` and `/openapi.json` open to probes, scrapers and tools, and the model list in the shape of whichever API asks.

use crate::error::{api_of, ApiError};
use crate::operations::{health, metrics, models};
use crate::state::AppState;
use crate::{anthropic, openai};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
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
        .route("/openapi.json", get(openapi))
        .merge(api)
        .fallback(not_found)
        .with_state(state)
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

/// `GET /openapi.json` (open: clients and test tools read it without a key).
async fn openapi(State(state): State<Arc<AppState>>) -> Response {
    Json(crate::openapi::document(&state.opts.served_model_name)).into_response()
}

async fn not_found(req: Request) -> ApiError {
    let api = api_of(req.uri().path(), req.headers());
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route {} {}", req.method(), req.uri().path()),
        api,
    )
}
