//! What every handler shares: the server's options and, once the model is loaded, the
//! model, its tokenizer and chat template, and the handle of the engine thread. Until
//! then the server answers `/health` with 503 and every API route with 503.

use crate::error::{Api, ApiError};
use crate::worker::EngineHandle;
use axum::http::StatusCode;
use sparrow::chat::ChatTemplate;
use sparrow::engine::{EngineOptions, Grammars, SchedulerOptions};
use sparrow::model::Model;
use sparrow::tokenizer::Tokenizer;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// How the server runs (`sparrow serve`'s flags).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The model id clients name (`model` in requests, `/v1/models`).
    pub served_model_name: String,
    /// Accepted keys (`Authorization: Bearer KEY` or `x-api-key: KEY`); empty: no key
    /// needed.
    pub api_keys: Vec<String>,
    /// Largest request body accepted, in bytes (413 beyond).
    pub max_body_bytes: usize,
    pub scheduler: SchedulerOptions,
    /// Longest prompt piece one sequence feeds in a step.
    pub prefill_chunk: usize,
    /// Longest sequence served, prompt plus completion (None: the model's context).
    pub max_model_len: Option<usize>,
    /// Measure the model's sparse parts as it serves (DSA recall, MoE MaxVio in
    /// `/metrics`; `EngineOptions::telemetry`).
    pub model_metrics: bool,
}

/// The loaded model and the engine thread running it.
pub struct Ready {
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub template: ChatTemplate,
    /// Compiles `response_format`s for this tokenizer.
    pub grammars: Grammars,
    pub engine: EngineHandle,
    /// Unix seconds when the model became ready (`created` of `/v1/models`).
    pub created: u64,
}

pub struct AppState {
    pub opts: ServerOptions,
    ready: OnceLock<Ready>,
    next_id: AtomicU64,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl AppState {
    pub fn new(opts: ServerOptions) -> Arc<Self> {
        Arc::new(Self {
            opts,
            ready: OnceLock::new(),
            next_id: AtomicU64::new(1),
        })
    }

    /// Start the engine thread for `model` and open the API routes.
    pub fn set_ready(&self, model: Model, tokenizer: Tokenizer) -> sparrow::Result<()> {
        let template = ChatTemplate::for_tokenizer(&tokenizer)?;
        let grammars = Grammars::new(&tokenizer, model.cfg.vocab_size)?;
        let model = Arc::new(model);
        let tokenizer = Arc::new(tokenizer);
        let engine = EngineHandle::spawn(
            model.clone(),
            tokenizer.clone(),
            EngineOptions {
                prefill_chunk: self.opts.prefill_chunk,
                telemetry: self.opts.model_metrics,
                ..Default::default()
            },
            self.opts.scheduler,
        )?;
        let ready = Ready {
            model,
            tokenizer,
            template,
            grammars,
            engine,
            created: unix_now(),
        };
        if self.ready.set(ready).is_err() {
            return Err(sparrow::Error::Invalid(
                "the server is already ready".into(),
            ));
        }
        Ok(())
    }

    pub fn is_ready(&self) -> bool {
        self.ready.get().is_some()
    }

    /// The loaded model, or 503 while it loads.
    pub fn ready(&self, api: Api) -> Result<&Ready, ApiError> {
        self.ready.get().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the model is still loading: retry shortly",
                api,
            )
        })
    }

    /// A fresh sequence id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The longest sequence served: the model's context, or `--max-model-len` when
    /// smaller.
    pub fn context(&self, ready: &Ready) -> usize {
        let model = ready.model.cfg.max_position_embeddings;
        self.opts.max_model_len.map_or(model, |n| n.min(model))
    }

    /// 404 unless `model` is the served model's name.
    pub fn check_model(&self, model: &str, api: Api) -> Result<(), ApiError> {
        if model == self.opts.served_model_name {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "model `{model}` is not served here; this server serves `{}`",
                self.opts.served_model_name
            ),
            api,
        ))
    }
}

/// A request or response id: `prefix` and 24 random hex digits.
pub fn random_id(prefix: &str) -> String {
    use rand::Rng;
    let n: u128 = rand::rng().random();
    format!("{prefix}{:024x}", n & ((1u128 << 96) - 1))
}
