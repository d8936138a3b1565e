//! `sparrow bench generate`: the whole model through the engine's batched step.

use crate::common::{rayon_threads, HoldArgs, IndexDtype, DEFAULT_MODEL};
use crate::report::Report;
use anyhow::Result;
use sparrow::config::ModelConfig;
use sparrow::model::Model;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct GenerateBenchArgs {
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Benchmark a randomly initialised model of this config instead of --model
    /// (speed does not depend on the weights).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Prompt lengths (tokens) before the timed decode.
    #[arg(long, value_delimiter = ',', default_value = "1024,8192")]
    pub context: Vec<usize>,
    /// Sequences decoded together.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch: Vec<usize>,
    /// Timed decode steps per cell.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// Prompt tokens per sequence per step.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Also run each cell with dense selectors (the baseline), and report ratios.
    #[arg(long)]
    pub dense: bool,
    /// Prefill the dense baseline only up to this context; past it the dense decode
    /// runs on a copy of the model's prefilled caches (same decode cost).
    #[arg(long, default_value_t = 16384)]
    pub dense_prefill_max: usize,
    /// Raise the model's max_position_embeddings to fit the longest context (speed
    /// does not depend on what the model learned; its outputs past the trained
    /// length are not meaningful).
    #[arg(long)]
    pub lift_context_limit: bool,
    /// Precision of the DSA index key cache (default: the model's
    /// `index_cache_dtype`).
    #[arg(long, value_enum)]
    pub index_dtype: Option<IndexDtype>,
    /// Decode from a synthesised cache of `context - 1` positions instead of a prefill
    /// (DeepSeek-V4 models: times decode at a million tokens; no prefill figures).
    #[arg(long)]
    pub synthetic_cache: bool,
    #[command(flatten)]
    pub hold: HoldArgs,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: GenerateBenchArgs) -> Result<()> {
    let longest = a.context.iter().copied().max().unwrap_or(0) + a.decode_tokens;
    let bench = sparrow::bench::generate::GenerateBench {
        contexts: a.context,
        batches: a.batch,
        decode_tokens: a.decode_tokens,
        prefill_chunk: a.prefill_chunk,
        dense_baseline: a.dense,
        dense_prefill_max: a.dense_prefill_max,
        synthetic_cache: a.synthetic_cache,
        seed: a.seed,
    };
    let lift_to = a.lift_context_limit.then_some(longest);
    let index_dtype: Option<sparrow::config::IndexCacheDtype> = a.index_dtype.map(Into::into);
    let (dir, config, hold, json) = (a.model.as_path(), a.config.as_deref(), a.hold, a.json);
    let weights = hold.weights;
    let bench = &bench;
    use sparrow::bench::generate::{step_bound_ms, GenerateRow};
    let edit = |c: &mut ModelConfig| {
        if let Some(n) = lift_to {
            c.max_position_embeddings = c.max_position_embeddings.max(n);
        }
        if let Some(d) = index_dtype {
            c.index_cache_dtype = d;
        }
        hold.edit(c);
    };
    let (m, dir) = match config {
        Some(path) => {
            let mut cfg = ModelConfig::from_file(path)?;
            edit(&mut cfg);
            let m = Model::new_random_with_weights(
                &cfg,
                bench.seed,
                weights.into(),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )?;
            (m, path)
        }
        None => {
            let source = sparrow::model_source::resolve(dir, true)?;
            let m = sparrow::model_source::load_model_for_inference(
                &source,
                weights.into(),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
                edit,
            )?;
            (m, dir)
        }
    };
    crate::return_freed_memory();
    let mut report = Report::new(json)
        .tagged("generate")
        .col("mode", 6, |r: &GenerateRow| r.mode.to_string())
        .col("context", 7, |r| r.context.to_string())
        .col("batch", 6, |r| r.batch.to_string())
        .col("prefill/s", 10, |r| {
            format!("{:.0}", r.prefill_tokens_per_s)
        })
        .col("ttft s", 9, |r| format!("{:.3}", r.ttft_secs))
        .col("decode/s", 11, |r| format!("{:.1}", r.decode_tokens_per_s))
        .col("decode/s all", 12, |r| {
            format!("{:.1}", r.decode_tokens_per_s_total)
        })
        .col("KV B/tok", 10, |r| format!("{:.0}", r.kv_bytes_per_token))
        .col("RSS MB", 9, |r| {
            format!("{:.0}", r.peak_rss_bytes as f64 / 1e6)
        })
        .col("GB/s", 8, |r| format!("{:.2}", r.decode_gbps));
    report.note(format!(
        "{}: {} layers, index cache {:?}, {} threads",
        dir.display(),
        m.cfg.num_hidden_layers,
        m.cfg.index_cache_dtype,
        rayon_threads()
    ));
    let mut failed = None;
    let rows = sparrow::bench::generate::run(&m, bench, |r: &GenerateRow| {
        if let Err(e) = report.row(r) {
            failed.get_or_insert(e);
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    // Per-layer decode breakdown and, with the dense baseline, the ratios.
    for r in rows.iter().filter(|r| r.mode == "model") {
        let base = rows
            .iter()
            .find(|d| d.mode == "dense" && d.context == r.context && d.batch == r.batch);
        let layers: Vec<String> = r
            .layer_attention_ms
            .iter()
            .enumerate()
            .map(|(l, a)| match base {
                Some(d) => format!(
                    "L{l} {a:.3}/{:.3} ms ({:.1}x)",
                    d.layer_attention_ms[l],
                    d.layer_attention_ms[l] / a.max(1e-12)
                ),
                None => format!("L{l} {a:.3} ms"),
            })
            .collect();
        let ffn: f64 = r.layer_ffn_ms.iter().sum();
        report.note(format!(
            "context {} batch {}: attention per decode step (model/dense) {}; FFN {ffn:.3} ms, head {:.3} ms",
            r.context,
            r.batch,
            layers.join(", "),
            r.head_ms
        ));
        if let Some(d) = base {
            report.record(serde_json::json!({
                "bench": "generate_ratio", "context": r.context, "batch": r.batch,
                "decode_speedup": r.decode_tokens_per_s / d.decode_tokens_per_s.max(1e-12),
                "prefill_speedup": r.prefill_tokens_per_s / d.prefill_tokens_per_s,
                "layer_attention_speedup": r.layer_attention_ms.iter().zip(&d.layer_attention_ms)
                    .map(|(a, b)| b / a.max(1e-12)).collect::<Vec<_>>(),
            }));
            let prefill = if d.prefill_tokens_per_s.is_finite() {
                format!("{:.2}x", r.prefill_tokens_per_s / d.prefill_tokens_per_s)
            } else {
                "not measured (the dense decode reused the model's prefill)".to_string()
            };
            report.note(format!(
                "  speedup over dense selectors: decode {:.2}x, prefill {prefill}",
                r.decode_tokens_per_s / d.decode_tokens_per_s.max(1e-12),
            ));
        }
    }
    // Batch scaling at each context: aggregate decode tokens/s over batch 1's.
    for r in rows.iter().filter(|r| r.batch > 1) {
        if let Some(one) = rows
            .iter()
            .find(|o| o.batch == 1 && o.mode == r.mode && o.context == r.context)
        {
            let x = r.decode_tokens_per_s_total / one.decode_tokens_per_s.max(1e-12);
            report.record(serde_json::json!({"bench": "generate_batch_scaling", "mode": r.mode, "context": r.context, "batch": r.batch, "aggregate_over_batch1": x}));
            report.note(format!(
                "{} context {} batch {}: aggregate decode {:.2}x batch 1",
                r.mode, r.context, r.batch, x
            ));
        }
    }
    // The bandwidth probe runs last: its 512 MiB buffer stays in the allocator's pool
    // and would otherwise count in every row's peak RSS.
    let bw = sparrow::bench::read_bandwidth(512);
    report.record(serde_json::json!({"bench": "machine", "read_gbps": bw, "threads": rayon_threads(), "model": dir, "index_cache_dtype": m.cfg.index_cache_dtype}));
    report.note(format!("read bandwidth {bw:.1} GB/s (best of several passes over 512 MiB, measured after the rows)"));
    // Each decode step against the machine's bound: weights at the bandwidth or the GEMM
    // rate (whichever is slower), caches at the bandwidth.
    let gemm = sparrow::bench::gemm_f32(1024)?.gflops;
    report.note(format!(
        "candle f32 GEMM 1024^3 {gemm:.1} GFLOP/s (measured after the rows)"
    ));
    let bound = |r: &GenerateRow| step_bound_ms(r, bw, gemm);
    for r in &rows {
        let step_ms = 1e3 / r.decode_tokens_per_s.max(1e-12);
        report.record(serde_json::json!({"bench": "generate_bound", "mode": r.mode, "context": r.context, "batch": r.batch, "step_ms": step_ms, "bound_ms": bound(r), "share_of_bound": bound(r) / step_ms, "weight_bytes": r.decode_weight_bytes, "weight_flops": r.decode_weight_flops, "cache_bytes": r.decode_cache_bytes}));
        report.note(format!(
            "{} context {} batch {}: decode step {step_ms:.2} ms, machine bound {:.2} ms ({:.0}% of it; weights {:.0} MB and {:.2} GFLOP, caches {:.0} MB)",
            r.mode,
            r.context,
            r.batch,
            bound(r),
            100.0 * bound(r) / step_ms,
            r.decode_weight_bytes / 1e6,
            r.decode_weight_flops / 1e9,
            r.decode_cache_bytes / 1e6,
        ));
    }
    for r in rows.iter().filter(|r| r.batch > 1) {
        if let Some(one) = rows
            .iter()
            .find(|o| o.batch == 1 && o.mode == r.mode && o.context == r.context)
        {
            let x = r.batch as f64 * bound(one) / bound(r).max(1e-12);
            report.record(serde_json::json!({"bench": "generate_batch_scaling_bound", "mode": r.mode, "context": r.context, "batch": r.batch, "aggregate_over_batch1_at_bound": x}));
            report.note(format!(
                "{} context {} batch {}: aggregate over batch 1 if both steps ran at the machine bound {x:.2}x",
                r.mode, r.context, r.batch
            ));
        }
    }
    Ok(())
}
