//! The server's handling of request bodies for both APIs, end to end through the
//! router: the input's first byte picks the route (OpenAI chat and completions,
//! Anthropic messages and count_tokens), the rest is the JSON body. The bundled model is
//! served with `max_model_len` 24, so a request that is accepted generates a few tokens
//! (streams are read to their end). Every answer is fine except a server error: a
//! malformed, hostile or out-of-range body must get a 4xx naming the problem, never a
//! 5xx, a panic or a hang.
#![no_main]

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use sparrow::engine::SchedulerOptions;
use sparrow_server::{router, AppState, ServerOptions};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

const ROUTES: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
];

/// The served model and the runtime, made once per fuzzing process.
fn server() -> &'static (tokio::runtime::Runtime, Arc<AppState>) {
    static SERVER: OnceLock<(tokio::runtime::Runtime, Arc<AppState>)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/sparrow-small");
        let source = sparrow::model_source::resolve(&dir, false).expect("the bundled model");
        let (model, tok) = sparrow::model_source::load_for_inference(
            &source,
            sparrow::weights::WeightFormat::Native,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
            |_| {},
        )
        .expect("load the bundled model");
        let state = AppState::new(ServerOptions {
            served_model_name: "sparrow-small".into(),
            api_keys: Vec::new(),
            max_body_bytes: 1 << 16,
            scheduler: SchedulerOptions {
                max_batch: 4,
                max_queue: 16,
                prefill_budget: 64,
                max_cache_positions: 96,
            },
            prefill_chunk: 64,
            max_model_len: Some(24),
            model_metrics: true,
        });
        state.set_ready(model, tok).expect("start the engine thread");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        (rt, state)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    let path = ROUTES[route as usize % ROUTES.len()];
    let (rt, state) = server();
    let (status, text) = rt.block_on(async {
        let req = Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_vec()))
            .expect("a request");
        let resp = router(state.clone())
            .oneshot(req)
            .await
            .expect("the router is infallible");
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    });
    assert!(
        !status.is_server_error(),
        "{path} answered {status}: {text}\nto {:?}",
        String::from_utf8_lossy(body)
    );
    // A stream that failed inside the engine says so in an error event.
    assert!(
        !text.contains("the engine step failed"),
        "{path}: {text}\nto {:?}",
        String::from_utf8_lossy(body)
    );
});
