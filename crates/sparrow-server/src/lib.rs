//! Sparrow's HTTP server (DESIGN.md §5c): the OpenAI API (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`) and the Anthropic Messages API (`/v1/messages`,
//! `/v1/messages/count_tokens`) over the engine's continuous batching, so the official
//! clients and SDKs, and the tools built on them, work by changing a base URL.
//!
//! The server only translates: a request becomes sequences ([`generation`]), the engine
//! thread ([`worker`]) runs them in batched steps beside every other request's, and
//! their events become JSON or server-sent events. It owns the limits ([`limits`]: queue
//! -> 429, body -> 413, context -> 400), the keys, `/health` and `/metrics`
//! ([`metrics`]).

pub mod anthropic;
pub mod error;
pub mod generation;
pub mod limits;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod operations;
pub mod routes;
pub mod state;
pub mod worker;

pub use routes::router;
pub use state::{AppState, ServerOptions};

/// Serve `state` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: std::sync::Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
