//! `sparrow serve` as users run it: a real process on a real port, driven by the
//! official `openai` and `anthropic` Python clients (`tests/serve_clients.py`): chat and
//! completions, streamed and whole, seeds, stops, n, usage, errors, keys, Anthropic's
//! event order, a client that leaves mid-stream (the server log must show its sequence
//! cancelled), and a full queue answering 429.
//!
//! Needs `python3` with the `openai` and `anthropic` packages; without them the test
//! says so and passes, unless `SPARROW_REQUIRE_CLIENTS=1` (set by `.ci/run`, which
//! installs them) makes it fail.

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
    fn start(extra: &[&str]) -> Server {
        let model = common::repo_root().join("models/sparrow-small");
        let mut child = Command::new(env!("CARGO_BIN_EXE_sparrow"))
            .args(["serve", "--port", "0", "--api-key", KEY, "--model"])
            .arg(&model)
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
        let out = Command::new("python3")
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

/// The status of `GET /health`, or None when nothing answers.
fn health(addr: &str) -> Option<u16> {
    get(addr, "/health").map(|r| r.0)
}

fn clients_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import openai, anthropic"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("SPARROW_REQUIRE_CLIENTS").is_none(),
            "SPARROW_REQUIRE_CLIENTS is set but python3 cannot import openai and anthropic (pip install openai anthropic)"
        );
        eprintln!(
            "skipped: python3 lacks the openai / anthropic packages (pip install openai anthropic)"
        );
    }
    ok
}

#[test]
fn the_official_clients_work_against_sparrow_serve() {
    if !clients_available() {
        return;
    }
    let server = Server::start(&[]);
    let (ok, out) = server.clients("basic");
    let log = server.log.lock().unwrap().clone();
    assert!(ok, "client checks failed:\n{out}\nserver log:\n{log}");
    assert!(out.contains("all checks passed"), "{out}");
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
