//! `GET /metrics` in the Prometheus (OpenMetrics) text format: requests running and
//! waiting, the batch size of each step, time to first token and inter-token latency
//! histograms, prompt and generated token counters, finished requests by reason, and
//! the model's own: each DSA layer's sampled indexer recall and each MoE layer's MaxVio
//! over the engine's recent steps (`sparrow::engine::telemetry`). The engine thread
//! records them as it steps; each server has its own registry (no global state, so
//! several servers can live in one process, as the tests run them).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use sparrow::engine::telemetry::LayerSummary;
use std::sync::atomic::AtomicU64;

/// A per-layer gauge of a fraction or ratio.
type LayerGauge = Family<Vec<(String, String)>, Gauge<f64, AtomicU64>>;

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub running: Gauge,
    pub waiting: Gauge,
    pub batch_size: Histogram,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    /// Finished sequences by `reason` (`stop`, `length`, `abort`).
    pub finished: Family<Vec<(String, String)>, Counter>,
    /// Per DSA layer: mean sampled recall of the dense attention mass.
    pub dsa_recall: LayerGauge,
    /// Per MoE layer: MaxVio of the expert load.
    pub moe_max_vio: LayerGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sparrow");
        let running = Gauge::default();
        let waiting = Gauge::default();
        // Steps of 1 to 256 sequences; latencies from 1 ms to ~65 s.
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 9));
        let time_to_first_token = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        let inter_token_latency = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let prompt_tokens = Counter::default();
        let generated_tokens = Counter::default();
        let finished = Family::default();
        let dsa_recall = LayerGauge::default();
        let moe_max_vio = LayerGauge::default();
        registry.register(
            "requests_running",
            "Sequences in the running batch",
            running.clone(),
        );
        registry.register(
            "requests_waiting",
            "Sequences waiting for a slot",
            waiting.clone(),
        );
        registry.register(
            "batch_size",
            "Sequences per engine step",
            batch_size.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From a sequence's arrival at the engine to its first token",
            time_to_first_token.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Between consecutive tokens of a sequence",
            inter_token_latency.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens of the sequences submitted",
            prompt_tokens.clone(),
        );
        registry.register(
            "generation_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        registry.register(
            "requests_finished",
            "Sequences finished, by reason",
            finished.clone(),
        );
        registry.register(
            "dsa_indexer_recall",
            "Per DSA layer: share of the dense attention mass on the indexer's selection, mean over the queries sampled in the recent steps",
            dsa_recall.clone(),
        );
        registry.register(
            "moe_max_vio",
            "Per MoE layer: max expert load / mean load - 1 over the recent steps",
            moe_max_vio.clone(),
        );
        Self {
            registry,
            running,
            waiting,
            batch_size,
            time_to_first_token,
            inter_token_latency,
            prompt_tokens,
            generated_tokens,
            finished,
            dsa_recall,
            moe_max_vio,
        }
    }
}

impl Metrics {
    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Publish the engine's per-layer telemetry (layers without a measurement keep
    /// their last value, or stay absent).
    pub fn model_telemetry(&self, layers: &[LayerSummary]) {
        for (l, s) in layers.iter().enumerate() {
            let label = vec![("layer".to_string(), l.to_string())];
            if let Some(r) = s.recall {
                self.dsa_recall.get_or_create(&label).set(r);
            }
            if let Some(v) = s.max_vio {
                self.moe_max_vio.get_or_create(&label).set(v);
            }
        }
    }

    pub fn finished(&self, reason: &str) {
        self.finished
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc();
    }
}
