//! Errors as the two APIs shape them: OpenAI's `{"error": {"message", "type", ...}}`
//! and Anthropic's `{"type": "error", "error": {"type", "message"}}`, each with its
//! HTTP status. Every refusal the server makes (bad request, unknown model, missing
//! key, full queue, body too large, model still loading) is one of these.

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Which API's error shape a response takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Anthropic,
}

/// Which API's error shape a request expects: Anthropic's for its routes and for any
/// request carrying `anthropic-version`, OpenAI's otherwise.
pub fn api_of(path: &str, headers: &HeaderMap) -> Api {
    if path.starts_with("/v1/messages") || headers.contains_key("anthropic-version") {
        Api::Anthropic
    } else {
        Api::OpenAi
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub api: Api,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>, api: Api) -> Self {
        Self {
            status,
            message: message.into(),
            api,
        }
    }

    pub fn bad_request(message: impl Into<String>, api: Api) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, api)
    }

    /// The error type name each API uses for this status.
    fn kind(&self) -> &'static str {
        match (self.api, self.status.as_u16()) {
            (_, 400) => "invalid_request_error",
            (_, 401) => "authentication_error",
            (_, 404) => "not_found_error",
            (Api::OpenAi, 413) => "invalid_request_error",
            (Api::Anthropic, 413) => "request_too_large",
            (_, 429) => "rate_limit_error",
            (Api::OpenAi, 503) => "service_unavailable_error",
            (Api::Anthropic, 503) => "overloaded_error",
            (Api::OpenAi, _) => "server_error",
            (Api::Anthropic, _) => "api_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.api {
            Api::OpenAi => json!({
                "error": {"message": self.message, "type": self.kind(), "param": null, "code": null}
            }),
            Api::Anthropic => json!({
                "type": "error",
                "error": {"type": self.kind(), "message": self.message}
            }),
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS
            || self.status == StatusCode::SERVICE_UNAVAILABLE
        {
            // Clients (the official SDKs included) wait this long before a retry.
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        resp
    }
}

/// The refusals every generation route can answer, for `/openapi.json` (each in the
/// shape of the route's API).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // documentation only: never constructed
pub enum Refusals {
    /// Invalid request: the offending field's path and the reason.
    #[response(status = 400)]
    BadRequest,
    /// Missing or wrong API key.
    #[response(status = 401)]
    Unauthorized,
    /// The model named is not the one served.
    #[response(status = 404)]
    UnknownModel,
    /// The body is larger than `--max-body-bytes`.
    #[response(status = 413)]
    TooLarge,
    /// The queue is full (with `retry-after`).
    #[response(status = 429)]
    QueueFull,
    /// The model is still loading (with `retry-after`).
    #[response(status = 503)]
    Loading,
}
