//! The routes that are not one API's generation: `/health`, `/metrics` and the model
//! list (`/v1/models`, in the shape of whichever API asks).

use crate::error::{api_of, Api, ApiError};
use crate::state::AppState;
use crate::{anthropic, openai};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::Arc;

/// `GET /health`: 200 once the model is loaded, 503 before.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "Ready"), (status = 503, description = "Loading")))]
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
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
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus / OpenMetrics text"), (status = 503, description = "Loading")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
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

/// `GET /v1/models` (Anthropic's shape when the request carries `anthropic-version`).
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, description = "The model list"), (status = 401, description = "Missing or wrong API key")))]
pub async fn models(
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
