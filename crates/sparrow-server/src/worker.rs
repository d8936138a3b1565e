//! The engine thread: the one place the model runs. It owns the engine's
//! [`Scheduler`], takes sequences from the HTTP handlers over a channel, runs batched
//! steps while anything is queued or running, and sends each sequence's events back on
//! that sequence's own channel. A channel whose receiver is gone (the client closed the
//! connection, or its handler was dropped) cancels the sequence before the next step, so
//! its slot and cache are freed at once.

use crate::metrics::Metrics;
use sparrow::engine::logprobs::TokenLogprobs;
use sparrow::engine::{
    Engine, EngineOptions, FinishReason, Refused, Scheduler, SchedulerOptions, Sequence,
};
use sparrow::model::Model;
use sparrow::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::mpsc as tmpsc;

/// What the engine thread tells a request about one of its sequences.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// Accepted into the queue (always the first update unless refused).
    Queued,
    /// The queue is full: the request should be retried later (HTTP 429).
    QueueFull,
    /// A generated token and the text it released (possibly empty: held back until the
    /// UTF-8 is whole or a stop string is ruled out).
    Token {
        token: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// The sequence ended; `text` is what its last step released (and `logprobs` its
    /// last token's, when it emitted one).
    Finished {
        reason: FinishReason,
        text: String,
        completion_tokens: usize,
        logprobs: Option<TokenLogprobs>,
    },
    /// The step failed; the sequence is gone.
    Failed(String),
}

/// A sequence and where its updates go.
pub struct Job {
    pub seq: Sequence,
    pub updates: tmpsc::UnboundedSender<Update>,
}

/// Where a sequence's updates go, and its timing (for the latency histograms).
struct Sink {
    tx: tmpsc::UnboundedSender<Update>,
    arrived: Instant,
    last_token: Option<Instant>,
}

/// The handlers' side of the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Job>,
    pub metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// Start the engine thread for `model`; it ends when every handle is dropped and
    /// the last sequence has finished.
    pub fn spawn(
        model: Arc<Model>,
        tokenizer: Arc<Tokenizer>,
        engine: EngineOptions,
        sched: SchedulerOptions,
    ) -> sparrow::Result<Self> {
        // Fail here, not on the thread, on bad options.
        Engine::new(&model, Some(&tokenizer), engine)?;
        sched.validate()?;
        let (jobs, inbox) = mpsc::channel::<Job>();
        let metrics = Arc::new(Metrics::default());
        let thread_metrics = metrics.clone();
        std::thread::Builder::new()
            .name("sparrow-engine".into())
            .spawn(move || {
                let engine = Engine::new(&model, Some(&tokenizer), engine)
                    .expect("engine options were checked before the thread started");
                let sched = Scheduler::new(engine, sched)
                    .expect("scheduler options were checked before the thread started");
                run(sched, inbox, &thread_metrics);
            })
            .map_err(|e| sparrow::Error::Invalid(format!("cannot start the engine thread: {e}")))?;
        Ok(Self { jobs, metrics })
    }

    /// Hand `job` to the engine thread; false if the thread is gone.
    pub fn submit(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }
}

/// How often the engine thread publishes the model's telemetry while it steps (it
/// summarises a window of steps: not worth doing every step).
const TELEMETRY_EVERY: Duration = Duration::from_millis(500);

fn run(mut sched: Scheduler<'_>, inbox: mpsc::Receiver<Job>, metrics: &Metrics) {
    let mut sinks: HashMap<u64, Sink> = HashMap::new();
    let mut open = true;
    let mut published = Instant::now();
    loop {
        if sched.is_idle() {
            // Whatever the last steps measured is visible while the server waits.
            metrics.model_telemetry(&sched.telemetry());
            if !open {
                return;
            }
            // Nothing to step: sleep until a request comes (or every handle is gone).
            match inbox.recv() {
                Ok(job) => take(&mut sched, &mut sinks, job, metrics),
                Err(_) => return,
            }
        }
        loop {
            match inbox.try_recv() {
                Ok(job) => take(&mut sched, &mut sinks, job, metrics),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        // Clients that went away free their slots before the step.
        sinks.retain(|&id, sink| {
            let gone = sink.tx.is_closed();
            if gone {
                client_left(&mut sched, id, metrics);
            }
            !gone
        });
        match sched.step() {
            Ok(events) => {
                // One event per sequence that took part in the step.
                if !events.is_empty() {
                    metrics.batch_size.observe(events.len() as f64);
                }
                let now = Instant::now();
                if now.duration_since(published) >= TELEMETRY_EVERY {
                    metrics.model_telemetry(&sched.telemetry());
                    published = now;
                }
                for e in events {
                    let Some(sink) = sinks.get_mut(&e.seq) else {
                        continue;
                    };
                    if e.token.is_some() {
                        let since = sink.last_token.unwrap_or(sink.arrived);
                        let hist = if sink.last_token.is_none() {
                            &metrics.time_to_first_token
                        } else {
                            &metrics.inter_token_latency
                        };
                        hist.observe(now.duration_since(since).as_secs_f64());
                        sink.last_token = Some(now);
                        if !matches!(e.finished, Some(FinishReason::StopToken(_))) {
                            metrics.generated_tokens.inc();
                        }
                    }
                    if let Some(r) = &e.finished {
                        metrics.finished(r.as_str());
                    }
                    let tx = &sink.tx;
                    let update = match (e.finished, e.token) {
                        (Some(reason), _) => {
                            tracing::info!(
                                seq = e.seq,
                                reason = ?reason,
                                tokens = e.generated,
                                "finished"
                            );
                            Update::Finished {
                                reason,
                                text: e.text,
                                completion_tokens: e.generated,
                                logprobs: e.logprobs,
                            }
                        }
                        (None, Some(token)) => Update::Token {
                            token,
                            text: e.text,
                            logprobs: e.logprobs,
                        },
                        (None, None) => continue, // a prefill chunk
                    };
                    let finished = matches!(update, Update::Finished { .. });
                    let delivered = tx.send(update).is_ok();
                    if !delivered || finished {
                        sinks.remove(&e.seq);
                    }
                    if !delivered && !finished {
                        // The receiver is gone: stop the sequence now, not at its end.
                        client_left(&mut sched, e.seq, metrics);
                    }
                }
            }
            Err(err) => {
                let msg = format!("the engine step failed: {err}");
                tracing::error!("{msg}");
                for id in sched.cancel_all() {
                    if let Some(sink) = sinks.remove(&id) {
                        let _ = sink.tx.send(Update::Failed(msg.clone()));
                    }
                }
            }
        }
        metrics.running.set(sched.running() as i64);
        metrics.waiting.set(sched.waiting() as i64);
    }
}

/// Sequence `id`'s client went away: free its slot and count it.
fn client_left(sched: &mut Scheduler<'_>, id: u64, metrics: &Metrics) {
    sched.cancel(id);
    metrics.finished("abort");
    tracing::info!(seq = id, "cancelled: the client went away");
}

fn take(sched: &mut Scheduler<'_>, sinks: &mut HashMap<u64, Sink>, job: Job, metrics: &Metrics) {
    let id = job.seq.id;
    let prompt = job.seq.prompt().len();
    match sched.submit(job.seq) {
        Ok(()) => {
            let _ = job.updates.send(Update::Queued);
            metrics.prompt_tokens.inc_by(prompt as u64);
            metrics.waiting.set(sched.waiting() as i64);
            sinks.insert(
                id,
                Sink {
                    tx: job.updates,
                    arrived: Instant::now(),
                    last_token: None,
                },
            );
        }
        Err(Refused::QueueFull(_)) => {
            let _ = job.updates.send(Update::QueueFull);
        }
        Err(Refused::TooLarge(s)) => {
            // The handlers check this first; reaching here is a bug worth a clear line.
            let _ = job.updates.send(Update::Failed(format!(
                "the sequence reserves {} cache positions, more than the server's budget",
                s.reserved_positions()
            )));
        }
        Err(Refused::DuplicateId(_)) => {
            let _ = job.updates.send(Update::Failed(format!(
                "sequence id {id} is already in use"
            )));
        }
    }
}
