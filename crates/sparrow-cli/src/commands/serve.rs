//! `sparrow serve`: the OpenAI and Anthropic HTTP APIs over a model
//! (`sparrow-server`). The port is bound first and `/health` answers 503 while the
//! model loads, 200 once it is ready; Ctrl-C or SIGTERM stop it gracefully.

use crate::common::{load_model_as, HoldArgs, DEFAULT_MODEL};
use anyhow::{bail, Context, Result};
use sparrow::engine::scheduler::DEFAULT_MAX_CACHE_POSITIONS;
use sparrow::engine::SchedulerOptions;
use sparrow_server::limits::DEFAULT_MAX_BODY_BYTES;
use sparrow_server::{AppState, ServerOptions};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model: a directory, a GGUF file, or a known model's name (fetched on first use).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Most sequences in one engine step.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Most sequences waiting for a slot; beyond it requests get 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Most prompt tokens fed per step, over all prefilling sequences (long prompts
    /// are fed in pieces so running decodes keep flowing).
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// A key clients must send (`Authorization: Bearer KEY` or `x-api-key: KEY`).
    #[arg(long, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// A file of accepted keys, one per line.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// The model id clients name (default: the model's name or its file's stem).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Longest sequence served, prompt plus completion, in tokens (default: the model's
    /// context, `max_position_embeddings`); a smaller value bounds each request's time
    /// and cache (vLLM's `--max-model-len`, llama.cpp's `--ctx-size`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..))]
    pub max_model_len: Option<u64>,
    /// KV cache budget in token positions over all running requests, each counted at
    /// its prompt plus its max_tokens (or the rest of the context): a request waits until
    /// it fits, one that never could gets 400 (llama.cpp's --ctx-size for its slots).
    #[arg(long, default_value_t = DEFAULT_MAX_CACHE_POSITIONS)]
    pub max_cache_tokens: usize,
    /// Do not measure the model's sparse parts as it serves (by default each step
    /// samples one query's DSA recall per sparse layer and counts each MoE layer's
    /// experts, for `/metrics`).
    #[arg(long)]
    pub no_model_metrics: bool,
    #[command(flatten)]
    pub hold: HoldArgs,
}

/// The id a model is served under when none is given: a named model's name, else the
/// file's stem or the directory's name.
fn default_name(spec: &Path) -> String {
    let s = spec.to_string_lossy();
    if sparrow::registry::find(&s).is_some() {
        return s.into_owned();
    }
    let stem = if spec.is_dir() {
        spec.file_name()
    } else {
        spec.file_stem()
    };
    stem.map_or_else(|| s.into_owned(), |x| x.to_string_lossy().into_owned())
}

fn read_keys(a: &ServeArgs) -> Result<Vec<String>> {
    if let Some(k) = &a.api_key {
        if k.trim().is_empty() {
            bail!("--api-key is empty");
        }
        return Ok(vec![k.trim().to_string()]);
    }
    let Some(path) = &a.api_key_file else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --api-key-file {}", path.display()))?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if keys.is_empty() {
        bail!("--api-key-file {} holds no key", path.display());
    }
    Ok(keys)
}

pub fn run(a: ServeArgs, _progress: bool) -> Result<()> {
    if a.model == Path::new(DEFAULT_MODEL) && !a.model.is_dir() {
        bail!(
            "the default model {} is not here (run from the repository root, or pass --model DIR | FILE.gguf | NAME)",
            a.model.display()
        );
    }
    let scheduler = SchedulerOptions {
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        prefill_budget: a.prefill_chunk,
        max_cache_positions: a.max_cache_tokens,
    };
    scheduler.validate()?;
    let opts = ServerOptions {
        served_model_name: a
            .served_model_name
            .clone()
            .unwrap_or_else(|| default_name(&a.model)),
        api_keys: read_keys(&a)?,
        max_body_bytes: a.max_body_bytes,
        max_model_len: a.max_model_len.map(|n| n as usize),
        model_metrics: !a.no_model_metrics,
        scheduler,
        prefill_chunk: a.prefill_chunk,
    };
    let state = AppState::new(opts);
    // Request ids and lifecycle on stderr (the engine thread's cancellations too).
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let addr = format!("{}:{}", a.host, a.port);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&addr))
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    eprintln!(
        "sparrow serve: listening on http://{local} (model `{}` loading; /health is 503 until it is ready)",
        state.opts.served_model_name
    );
    // Load on a thread while the port already answers /health.
    let loader_state = state.clone();
    let (model, hold) = (a.model.clone(), a.hold);
    std::thread::Builder::new()
        .name("sparrow-load".into())
        .spawn(move || {
            let loaded = load_model_as(&model, hold)
                .and_then(|(m, t)| loader_state.set_ready(m, t).map_err(Into::into));
            match loaded {
                Ok(()) => eprintln!(
                    "sparrow serve: model `{}` ready on http://{local}",
                    loader_state.opts.served_model_name
                ),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::exit(1);
                }
            }
        })?;
    // On Ctrl-C or SIGTERM: stop accepting, let running requests finish for up to
    // SHUTDOWN_GRACE, then exit (what still runs is cancelled with the process).
    let (stopping, mut stopped) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown_signal().await;
        eprintln!("sparrow serve: stopping (no new connections; running requests may finish)");
        let _ = stopping.send(true);
    };
    runtime.block_on(async {
        let server = sparrow_server::serve(listener, state, signal);
        tokio::pin!(server);
        tokio::select! {
            r = &mut server => r,
            _ = async {
                let _ = stopped.wait_for(|s| *s).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                eprintln!(
                    "sparrow serve: requests still running after {} s: cancelled",
                    SHUTDOWN_GRACE.as_secs()
                );
                Ok(())
            }
        }
    })?;
    eprintln!("sparrow serve: stopped");
    Ok(())
}

/// How long running requests may take to finish once a stop was asked for.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
