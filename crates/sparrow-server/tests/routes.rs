//! The router without a network: `/health` before and after the model is ready, the
//! key check, and every refusal in the shape of the API that was asked (OpenAI's
//! `{"error": ...}`, Anthropic's `{"type": "error", ...}`) with its status: malformed
//! JSON, a missing field, an unknown model, an oversized body, a limit exceeded, an
//! unknown route. The official clients' checks are in sparrow-cli's `tests/serve.rs`.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sparrow::engine::SchedulerOptions;
use sparrow_server::{router, AppState, ServerOptions};
use std::path::Path;
use std::sync::Arc;
use tower::ServiceExt;

const MODEL: &str = "sparrow-small";

fn options(keys: &[&str]) -> ServerOptions {
    ServerOptions {
        served_model_name: MODEL.into(),
        api_keys: keys.iter().map(|k| k.to_string()).collect(),
        max_body_bytes: 4096,
        scheduler: SchedulerOptions::default(),
        prefill_chunk: 64,
        max_model_len: None,
        model_metrics: true,
    }
}

fn ready_state(keys: &[&str]) -> Arc<AppState> {
    ready_with(options(keys))
}

fn ready_with(opts: ServerOptions) -> Arc<AppState> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/sparrow-small");
    let source = sparrow::model_source::resolve(&dir, false).unwrap();
    let (model, tok) = sparrow::model_source::load_for_inference(
        &source,
        sparrow::weights::WeightFormat::Native,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        |_| {},
    )
    .unwrap();
    let state = AppState::new(opts);
    state.set_ready(model, tok).unwrap();
    state
}

async fn call(
    state: &Arc<AppState>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = router(state.clone())
        .oneshot(req.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes)}));
    (status, v)
}

fn openai_error(v: &Value) -> &str {
    v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("not an OpenAI error: {v}"))
}

fn anthropic_error(v: &Value) -> &str {
    assert_eq!(v["type"], "error", "not an Anthropic error: {v}");
    v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("not an Anthropic error: {v}"))
}

#[tokio::test]
async fn health_and_api_routes_answer_503_while_loading() {
    let state = AppState::new(options(&[]));
    let (s, v) = call(&state, "GET", "/health", &[], Body::empty()).await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("loading"))
    );
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let (s, v) = call(
        &state,
        "POST",
        "/v1/chat/completions",
        &[],
        body.to_string(),
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(openai_error(&v).contains("loading"));
    let body =
        json!({"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]});
    let (s, v) = call(&state, "POST", "/v1/messages", &[], body.to_string()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(anthropic_error(&v).contains("loading"));
    let (s, _) = call(&state, "GET", "/metrics", &[], Body::empty()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn refusals_come_in_the_shape_of_the_api_asked() {
    let state = ready_state(&["k1", "k2"]);
    let (s, _) = call(&state, "GET", "/health", &[], Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    let key = [("authorization", "Bearer k2")];
    let x_key = [("x-api-key", "k1")];
    let chat =
        json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});

    // Keys: none, wrong, either header.
    let (s, v) = call(&state, "GET", "/v1/models", &[], Body::empty()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(openai_error(&v).contains("API key is required"));
    let (s, v) = call(
        &state,
        "POST",
        "/v1/messages",
        &[("x-api-key", "nope")],
        chat.to_string(),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["type"], "authentication_error");
    assert!(anthropic_error(&v).contains("invalid API key"));
    let (s, v) = call(&state, "GET", "/v1/models", &x_key, Body::empty()).await;
    assert_eq!(
        (s, v["data"][0]["id"].as_str()),
        (StatusCode::OK, Some(MODEL))
    );
    let (s, v) = call(
        &state,
        "GET",
        "/v1/models",
        &[("x-api-key", "k1"), ("anthropic-version", "2023-06-01")],
        Body::empty(),
    )
    .await;
    assert_eq!(
        (s, v["data"][0]["type"].as_str()),
        (StatusCode::OK, Some("model"))
    );
    assert_eq!(v["has_more"], false);

    // A working request, then the refusals.
    let (s, v) = call(
        &state,
        "POST",
        "/v1/chat/completions",
        &key,
        chat.to_string(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 2);
    // /metrics needs no key and counts that request.
    let (s, m) = call(&state, "GET", "/metrics", &[], Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    let text = m["raw"].as_str().unwrap().to_string();
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        text.contains(&format!("sparrow_prompt_tokens_total {prompt}\n")),
        "{text}"
    );
    assert!(
        text.contains("sparrow_generation_tokens_total 2\n"),
        "{text}"
    );
    assert!(
        text.contains("sparrow_requests_finished_total{reason=\"length\"} 1\n"),
        "{text}"
    );
    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        ("/v1/chat/completions", "{not json".into(), StatusCode::BAD_REQUEST, "invalid request body"),
        ("/v1/chat/completions", json!({"model": MODEL}).to_string(), StatusCode::BAD_REQUEST, "missing field `messages`"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [], "temperature": "hot"}).to_string(), StatusCode::BAD_REQUEST, "`temperature`: invalid type: string \"hot\""),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": 5}]}).to_string(), StatusCode::BAD_REQUEST, "`messages[0].content`"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "some_new_field": {"x": 1}}).to_string(), StatusCode::OK, ""),
        ("/v1/chat/completions", json!({"model": "other", "messages": []}).to_string(), StatusCode::NOT_FOUND, "not served here"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 99}).to_string(), StatusCode::BAD_REQUEST, "n must be between 1 and 8"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": vec!["x"; 17]}).to_string(), StatusCode::BAD_REQUEST, "at most 16 stop strings"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}).to_string(), StatusCode::BAD_REQUEST, "temperature"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).to_string(), StatusCode::BAD_REQUEST, "max_tokens must be at least 1"),
        ("/v1/completions", json!({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 100_000}).to_string(), StatusCode::BAD_REQUEST, "max_tokens is 100000, but the prompt is 3 tokens"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).to_string(), StatusCode::BAD_REQUEST, "`image_url` are not supported"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}).to_string(), StatusCode::BAD_REQUEST, "top_logprobs needs logprobs: true"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}).to_string(), StatusCode::BAD_REQUEST, "top_logprobs must be between 0 and 20"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 2.5}).to_string(), StatusCode::BAD_REQUEST, "presence_penalty must be between -2 and 2"),
        ("/v1/completions", json!({"model": MODEL, "prompt": [4_000_000u32]}).to_string(), StatusCode::BAD_REQUEST, "outside the vocabulary"),
        ("/v1/completions", json!({"model": MODEL, "prompt": "x".repeat(5000)}).to_string(), StatusCode::PAYLOAD_TOO_LARGE, ""),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}}).to_string(), StatusCode::BAD_REQUEST, "`response_format.type`: unknown variant `xml`"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}}).to_string(), StatusCode::BAD_REQUEST, "`response_format`: missing field `json_schema`"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}).to_string(), StatusCode::BAD_REQUEST, "response_format: the schema does not compile"),
    ];
    for (path, body, status, says) in cases {
        let (s, v) = call(&state, "POST", path, &key, body.clone()).await;
        assert_eq!(s, status, "{path} {body:.80}: {v}");
        if s != StatusCode::OK {
            assert!(openai_error(&v).contains(says), "{path} {body:.80}: {v}");
        }
    }
    let acases: Vec<(String, StatusCode, &str)> = vec![
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).to_string(), StatusCode::BAD_REQUEST, "missing field `max_tokens`"),
        (json!({"model": MODEL, "max_tokens": -3, "messages": []}).to_string(), StatusCode::BAD_REQUEST, "`max_tokens`: invalid value: integer `-3`"),
        (json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "tool", "content": "hi"}]}).to_string(), StatusCode::BAD_REQUEST, "role must be"),
        (json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "image"}]}]}).to_string(), StatusCode::BAD_REQUEST, "`image` are not supported"),
        (json!({"model": "x", "max_tokens": 2, "messages": []}).to_string(), StatusCode::NOT_FOUND, "not served here"),
        ("y".repeat(5000), StatusCode::PAYLOAD_TOO_LARGE, ""),
    ];
    for (body, status, says) in acases {
        let (s, v) = call(&state, "POST", "/v1/messages", &x_key, body.clone()).await;
        assert_eq!(s, status, "{body:.80}: {v}");
        assert!(anthropic_error(&v).contains(says), "{body:.80}: {v}");
    }
    let (s, v) = call(&state, "GET", "/v2/nothing", &key, Body::empty()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(openai_error(&v).contains("no route"));
}

/// `/openapi.json` documents every route and the request bodies as the handlers parse
/// them (the shared options included).
#[tokio::test]
async fn the_openapi_document_covers_every_route() {
    let state = AppState::new(options(&["k"]));
    let (s, doc) = call(&state, "GET", "/openapi.json", &[], Body::empty()).await;
    assert_eq!(s, StatusCode::OK, "no key needed");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut paths: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/health",
            "/metrics",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/messages",
            "/v1/messages/count_tokens",
            "/v1/models",
            "/v1/models/{id}"
        ]
    );
    let schemas = &doc["components"]["schemas"];
    let props = |name: &str| -> Vec<String> {
        schemas[name]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    for (schema, field) in [
        ("ChatRequest", "messages"),
        ("ChatRequest", "max_completion_tokens"),
        ("CommonOptions", "temperature"),
        ("CommonOptions", "stream_options"),
        ("CompletionRequest", "prompt"),
        ("MessagesRequest", "stop_sequences"),
        ("MessagesRequest", "max_tokens"),
    ] {
        assert!(
            props(schema).contains(&field.to_string()),
            "{schema} lacks {field}"
        );
    }
    let body = &doc["paths"]["/v1/chat/completions"]["post"]["requestBody"];
    assert!(body.to_string().contains("ChatCompletionBody"), "{body}");
    assert!(schemas["ChatCompletionBody"]
        .to_string()
        .contains("CommonOptions"));
}

/// `response_format` JSON schemas are kept to (constrained decoding), and the default
/// `max_tokens` of the legacy completions is OpenAI's 16.
#[tokio::test]
async fn structured_output_keeps_to_the_schema() {
    let state = ready_state(&[]);
    let schema = json!({
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"],
        "additionalProperties": false
    });
    for seed in 0..3 {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 40, "temperature": 1.0, "seed": seed,
            "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}});
        let (s, v) = call(
            &state,
            "POST",
            "/v1/chat/completions",
            &[],
            body.to_string(),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "stop", "{v}");
        let text = choice["message"]["content"].as_str().unwrap();
        let out: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert!(out["n"].as_u64().is_some_and(|n| n <= 99), "{out}");
        assert!(out["ok"].is_boolean(), "{out}");
        assert_eq!(out.as_object().unwrap().len(), 2, "{out}");
    }
    let body = json!({"model": MODEL, "prompt": "The sea", "temperature": 0});
    let (s, v) = call(&state, "POST", "/v1/completions", &[], body.to_string()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 16, "{v}");
}

/// `--max-model-len` bounds prompt plus completion below the model's context.
#[tokio::test]
async fn max_model_len_bounds_each_request() {
    let state = ready_with(ServerOptions {
        max_model_len: Some(32),
        ..options(&[])
    });
    let body = json!({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 30});
    let (s, v) = call(&state, "POST", "/v1/completions", &[], body.to_string()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        openai_error(&v)
            .contains("max_tokens is 30, but the prompt is 3 tokens and the model's context 32"),
        "{v}"
    );
    let body = json!({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 29});
    let (s, v) = call(&state, "POST", "/v1/completions", &[], body.to_string()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let body = json!({"model": MODEL, "prompt": vec![5u32; 40]});
    let (s, v) = call(&state, "POST", "/v1/completions", &[], body.to_string()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        openai_error(&v).contains("the model's context is 32"),
        "{v}"
    );
}

/// `/metrics` carries the model's own measurements once it has served: each DSA layer's
/// sampled recall (the bundled model goes sparse past 256 positions) and each MoE
/// layer's MaxVio.
#[tokio::test]
async fn metrics_show_the_models_recall_and_expert_balance() {
    let state = ready_state(&[]);
    let cfg = state
        .ready(sparrow_server::error::Api::OpenAi)
        .unwrap()
        .model
        .cfg
        .clone();
    let prompt: Vec<u32> = (0..300u32).map(|i| 10 + (i * 37) % 4000).collect();
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0});
    let (s, v) = call(&state, "POST", "/v1/completions", &[], body.to_string()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The engine thread publishes when it goes idle, just after the last step.
    let mut text = String::new();
    for _ in 0..100 {
        let (_, m) = call(&state, "GET", "/metrics", &[], Body::empty()).await;
        text = m["raw"].as_str().unwrap_or_default().to_string();
        if text.contains("sparrow_dsa_indexer_recall{") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let values = |name: &str| -> Vec<f64> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{layer=")))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect()
    };
    let recall = values("sparrow_dsa_indexer_recall");
    let dsa_layers = (0..cfg.num_hidden_layers)
        .filter(|&l| cfg.attention_kind(l) == sparrow::config::AttentionKind::Dsa)
        .count();
    assert_eq!(recall.len(), dsa_layers, "{text}");
    assert!(
        recall.iter().all(|r| (0.0..=1.0 + 1e-6).contains(r)),
        "{recall:?}"
    );
    let max_vio = values("sparrow_moe_max_vio");
    assert!(
        !max_vio.is_empty() && max_vio.iter().all(|&v| v >= 0.0),
        "{text}"
    );
}

/// `--max-cache-tokens`: a request that could never fit the batch's cache budget is a
/// 400 naming the numbers; without max_tokens a chat gets what the budget leaves.
#[tokio::test]
async fn the_cache_budget_bounds_each_request() {
    let state = ready_with(ServerOptions {
        scheduler: SchedulerOptions {
            max_cache_positions: 40,
            ..SchedulerOptions::default()
        },
        ..options(&[])
    });
    let body = json!({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 38});
    let (s, v) = call(&state, "POST", "/v1/completions", &[], body.to_string()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        openai_error(&v).contains("41 cache positions, more than this server's budget of 40"),
        "{v}"
    );
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0});
    let (s, v) = call(
        &state,
        "POST",
        "/v1/chat/completions",
        &[],
        body.to_string(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let u = &v["usage"];
    assert!(u["total_tokens"].as_u64().unwrap() <= 40, "{v}");
}
