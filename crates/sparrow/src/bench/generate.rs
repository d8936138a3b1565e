//! `sparrow bench generate`: the whole model through the engine's batched step, the
//! code every generation runs. Per (context, batch) cell: a batch of random prompts of
//! `context` tokens is prefilled together (chunked, as the engine does), then decoded
//! for `decode_tokens` steps. Reports prefill tokens/s, time to first token, decode
//! tokens/s per sequence and over the batch, cache bytes per token, the process's peak
//! RSS during the cell, the decode's estimated memory traffic in GB/s (the weights the
//! batch touches once per step plus what each sequence's attention reads) and a
//! per-layer time breakdown of the decode steps. [`step_bound_ms`] turns a row's traffic
//! and flops into the machine's bound on its step (weights at the read bandwidth or the
//! GEMM rate, whichever is slower, plus the caches at the bandwidth), so a cell can be
//! read as a share of what the machine allows. The dense baseline is the same weights
//! and code with every selector set to all positions (`EngineOptions::dense`).
//! With `synthetic_cache` (DeepSeek-V4 models) the prompt is not prefilled: every
//! sequence starts from a decode state of `context - 1` positions filled with random
//! values (`V4Attention::synthetic_cache`), so decode can be timed at a million tokens;
//! such rows report no prefill figures.

use crate::config::AttentionKind;
use crate::engine::sampler::SamplerConfig;
use crate::engine::{Engine, EngineOptions, Sequence, SequenceParams};
use crate::error::{Error, Result};
use crate::model::block::SelfAttn;
use crate::model::step::StepProfile;
use crate::model::Model;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone)]
pub struct GenerateBench {
    pub contexts: Vec<usize>,
    pub batches: Vec<usize>,
    /// Decode steps timed after the prefill.
    pub decode_tokens: usize,
    pub prefill_chunk: usize,
    /// Also run every cell with dense selectors (the in-run baseline).
    pub dense_baseline: bool,
    /// Longest context whose dense baseline is prefilled densely too; past it the dense
    /// decode runs on the model row's own caches once that row is done, cut back to the
    /// prompt (same shapes, so the same decode cost; no second copy in memory) and no
    /// dense prefill figure is reported.
    pub dense_prefill_max: usize,
    /// Start every sequence from a synthesised decode state instead of a prefill
    /// (DeepSeek-V4 layers only).
    pub synthetic_cache: bool,
    pub seed: u64,
}

/// One cell's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateRow {
    /// "model" (as configured) or "dense" (every selector = all positions).
    pub mode: &'static str,
    pub context: usize,
    pub batch: usize,
    /// NaN when the cell reused another cell's prefill.
    pub prefill_secs: f64,
    /// Prompt tokens of the whole batch per second of prefill.
    pub prefill_tokens_per_s: f64,
    /// Seconds from the start until every sequence had its first token.
    pub ttft_secs: f64,
    /// Decode tokens per second of one sequence.
    pub decode_tokens_per_s: f64,
    /// Decode tokens per second over the batch.
    pub decode_tokens_per_s_total: f64,
    /// Cache bytes per cached position of one sequence (all layers, index keys included).
    pub kv_bytes_per_token: f64,
    /// Peak resident memory of the process during the cell's prefill (bytes; 0 if
    /// unknown).
    pub peak_rss_bytes: u64,
    /// Estimated bytes a decode step reads / its seconds.
    pub decode_gbps: f64,
    /// Weight bytes one decode step reads, as held: the dense weights and, of a MoE
    /// layer's routed experts, as many as `batch` tokens touch on average under uniform
    /// routing (`E (1 - (1 - k/E)^batch)` of E, k per token).
    pub decode_weight_bytes: f64,
    /// Cache bytes one decode step reads (every sequence, every layer, in the cache's
    /// storage precision).
    pub decode_cache_bytes: f64,
    /// Multiply-add flops of the weights in one decode step: 2 x batch x the weights a
    /// token multiplies (its k experts; an untied embedding is a lookup, not counted).
    pub decode_weight_flops: f64,
    /// Per layer: milliseconds of attention per decode step.
    pub layer_attention_ms: Vec<f64>,
    /// Per layer: milliseconds of the FFN per decode step.
    pub layer_ffn_ms: Vec<f64>,
    /// Embedding, final norm and LM head, milliseconds per decode step.
    pub head_ms: f64,
}

/// Reset the kernel's peak-RSS counter of this process (Linux `clear_refs` 5); false
/// where unsupported.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident set size of this process (VmHWM), bytes.
pub fn peak_rss_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Run every cell; `on_row` sees each row as it completes.
pub fn run(
    model: &Model,
    b: &GenerateBench,
    mut on_row: impl FnMut(&GenerateRow),
) -> Result<Vec<GenerateRow>> {
    if b.decode_tokens == 0 || b.contexts.is_empty() || b.batches.is_empty() {
        return Err(Error::Invalid(
            "bench generate needs contexts, batch sizes and at least one decode token".into(),
        ));
    }
    let max_pos = model.cfg.max_position_embeddings;
    let mut rows = Vec::new();
    for &context in &b.contexts {
        if context == 0 || context + b.decode_tokens > max_pos {
            return Err(Error::Invalid(format!(
                "context {context} plus {} decode tokens does not fit max_position_embeddings {max_pos}",
                b.decode_tokens
            )));
        }
        for &batch in &b.batches {
            let reuse = b.dense_baseline && context > b.dense_prefill_max;
            let (row, prefilled) = cell(model, b, context, batch, false, None, reuse)?;
            on_row(&row);
            rows.push(row);
            if b.dense_baseline {
                let (row, _) = cell(model, b, context, batch, true, prefilled, false)?;
                on_row(&row);
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// One cell; returns its row and, with `keep`, its sequences made again for their
/// prompts on their own caches cut back to all but the last prompt token (what the
/// dense row decodes on). With `prefilled`, the prefill is such a one-token feed,
/// untimed.
fn cell(
    model: &Model,
    b: &GenerateBench,
    context: usize,
    batch: usize,
    dense: bool,
    prefilled: Option<Vec<Sequence>>,
    keep: bool,
) -> Result<(GenerateRow, Option<Vec<Sequence>>)> {
    let cfg = &model.cfg;
    let mut rng = ChaCha8Rng::seed_from_u64(b.seed ^ (context as u64) << 8 ^ batch as u64);
    let low = 2.min(cfg.vocab_size as u32 - 1);
    let params = SequenceParams {
        max_new_tokens: b.decode_tokens + 1,
        sampler: SamplerConfig {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
        },
        seed: 0,
        stop_tokens: Vec::new(),
        stop_strings: Vec::new(),
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        logprobs: None,
    };
    let fresh = prefilled.is_none() && !b.synthetic_cache;
    let mut seqs: Vec<Sequence> = match prefilled {
        Some(s) => s,
        None if b.synthetic_cache => (0..batch)
            .map(|i| {
                let prompt: Vec<u32> = (0..context)
                    .map(|_| rng.random_range(low..cfg.vocab_size as u32))
                    .collect();
                let cache = synthetic_cache(model, context - 1, &mut rng)?;
                Sequence::with_cached_prefix(i as u64, prompt, params.clone(), cfg, cache)
            })
            .collect::<Result<_>>()?,
        None => (0..batch)
            .map(|i| {
                let prompt: Vec<u32> = (0..context)
                    .map(|_| rng.random_range(low..cfg.vocab_size as u32))
                    .collect();
                Sequence::new(i as u64, prompt, params.clone(), cfg)
            })
            .collect::<Result<_>>()?,
    };
    let rss_reset = reset_peak_rss();
    let opts = EngineOptions {
        prefill_chunk: b.prefill_chunk,
        dense,
        profile: false,
        telemetry: false,
    };
    let prefill = Engine::new(model, None, opts)?;
    let start = Instant::now();
    while seqs.iter().any(|s| s.generated().is_empty()) {
        let mut active: Vec<&mut Sequence> = seqs.iter_mut().collect();
        prefill.step(&mut active)?;
    }
    let prefill_secs = if fresh {
        start.elapsed().as_secs_f64()
    } else {
        f64::NAN
    };
    let peak_rss = if rss_reset && fresh {
        peak_rss_bytes()
    } else {
        0
    };
    let decode = Engine::new(
        model,
        None,
        EngineOptions {
            profile: true,
            ..opts
        },
    )?;
    let start = Instant::now();
    for _ in 0..b.decode_tokens {
        let mut active: Vec<&mut Sequence> = seqs.iter_mut().collect();
        decode.step(&mut active)?;
    }
    let decode_secs = start.elapsed().as_secs_f64();
    let steps = b.decode_tokens as f64;
    let prof: StepProfile = decode.profile();
    let per_step_ms = |x: f64| 1e3 * x / steps;
    let positions = seqs[0].position();
    let kv_bytes_per_token = seqs[0].cache().used_bytes() as f64 / positions.max(1) as f64;
    let traffic = decode_step_traffic(model, &seqs, dense);
    let read = traffic.weight_bytes + traffic.cache_bytes;
    let again = if keep {
        let made = seqs
            .into_iter()
            .map(|s| {
                let (id, prompt) = (s.id, s.prompt().to_vec());
                let mut cache = s.into_cache();
                cache.truncate(context - 1);
                Sequence::with_cached_prefix(id, prompt, params.clone(), cfg, cache)
            })
            .collect::<Result<Vec<_>>>()?;
        Some(made)
    } else {
        None
    };
    let row = GenerateRow {
        mode: if dense { "dense" } else { "model" },
        context,
        batch,
        prefill_secs,
        prefill_tokens_per_s: (context * batch) as f64 / prefill_secs, // NaN if reused
        ttft_secs: prefill_secs,
        decode_tokens_per_s: steps / decode_secs.max(1e-12),
        decode_tokens_per_s_total: steps * batch as f64 / decode_secs.max(1e-12),
        kv_bytes_per_token,
        peak_rss_bytes: peak_rss,
        decode_gbps: read * steps / decode_secs.max(1e-12) / 1e9,
        decode_weight_bytes: traffic.weight_bytes,
        decode_cache_bytes: traffic.cache_bytes,
        decode_weight_flops: traffic.weight_flops,
        layer_attention_ms: prof.attention.iter().map(|&x| per_step_ms(x)).collect(),
        layer_ffn_ms: prof.ffn.iter().map(|&x| per_step_ms(x)).collect(),
        head_ms: per_step_ms(prof.head),
    };
    Ok((row, again))
}

/// A sequence's decode state at `positions` for a DeepSeek-V4 model, random values in
/// every layer's window, entries, index keys and partial windows.
fn synthetic_cache(
    model: &Model,
    positions: usize,
    rng: &mut ChaCha8Rng,
) -> Result<crate::model::cache::SeqCache> {
    let cfg = &model.cfg;
    let mut cache = crate::model::cache::SeqCache::for_config(cfg);
    for (layer, lc) in model.net.layers.iter().zip(&mut cache.layers) {
        match &layer.self_attn {
            SelfAttn::V4(attn) => lc.v4 = Some(attn.synthetic_cache(positions, rng)),
            _ => {
                return Err(Error::Invalid(
                    "synthesised caches are built for DeepSeek-V4 layers only (prefill the others)"
                        .into(),
                ))
            }
        }
    }
    Ok(cache)
}

/// The machine's bound on one decode step of `row`, milliseconds: its weights streamed
/// at `read_gbps` or multiplied at `gemm_gflops` (an f32 GEMM's rate), whichever takes
/// longer, plus its caches streamed at `read_gbps`. Attention flops are left out (the
/// caches' bytes bound a decode scan), and so is everything else a step does: with f32
/// or f16 / bf16 weights a step can reach this, never beat it. Quantized weights
/// multiply int8 activations (`kernels::qmatmul`), whose multiply-adds can run faster
/// than an f32 GEMM's, so for them the flops term is a yardstick, not a ceiling; nor
/// is the bandwidth term for a model whose weights and caches fit in the last-level
/// cache (`models/sparrow-small`'s 12-21 MB here, in 32 MB).
pub fn step_bound_ms(row: &GenerateRow, read_gbps: f64, gemm_gflops: f64) -> f64 {
    let weights = (row.decode_weight_bytes / (read_gbps * 1e9))
        .max(row.decode_weight_flops / (gemm_gflops * 1e9));
    1e3 * (weights + row.decode_cache_bytes / (read_gbps * 1e9))
}

/// What one decode step reads and multiplies (see the fields of [`GenerateRow`]).
struct StepTraffic {
    weight_bytes: f64,
    cache_bytes: f64,
    weight_flops: f64,
}

/// [`StepTraffic`] of one decode step of `seqs`: weights as held, each sequence's cached
/// keys and values per layer (dense selector) or its index keys and the selected rows
/// (DSA past `index_topk`).
fn decode_step_traffic(model: &Model, seqs: &[Sequence], dense: bool) -> StepTraffic {
    let cfg = &model.cfg;
    let batch = seqs.len();
    // Weights a token multiplies (its k experts of each MoE layer) and the routed
    // expert weights the whole batch skips on average.
    let (total, per_token) = model.parameter_counts();
    let mut skipped_by_batch = 0f64;
    for layer in &model.net.layers {
        if let crate::model::block::Ffn::Moe(moe) = &layer.mlp {
            let per_expert = moe.experts.first().map_or(0, |e| e.num_parameters()) as f64;
            let (e, k) = (moe.experts.len() as f64, moe.top_k() as f64);
            let touched = e * (1.0 - (1.0 - (k / e).min(1.0)).powi(batch as i32));
            skipped_by_batch += per_expert * (e - touched);
        }
    }
    // Weight bytes as held (f32, f16 / bf16, quantized blocks), the touched share.
    let held: usize = model
        .store
        .all_tensors()
        .iter()
        .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
        .sum::<usize>()
        + model.store.packed_bytes();
    let weight_bytes = held as f64 * (total as f64 - skipped_by_batch) / total.max(1) as f64;
    let lookup = if cfg.tie_word_embeddings {
        0.0
    } else {
        (cfg.vocab_size * cfg.hidden_size) as f64
    };
    let weight_flops = 2.0 * batch as f64 * (per_token as f64 - lookup).max(0.0);
    let mut cache_bytes = 0f64;
    for s in seqs {
        let pos = s.position();
        for (l, layer) in s.cache().layers.iter().enumerate() {
            if let (Some(state), SelfAttn::V4(attn)) = (&layer.v4, &model.net.layers[l].self_attn) {
                cache_bytes += attn.decode_read_bytes(state) as f64;
                continue;
            }
            let row_bytes = |b: &Option<crate::model::cache::RowBuffer>| {
                b.as_ref()
                    .map_or(0, |b| b.heads() * b.width() * b.elem_bytes())
            };
            let kv_row = row_bytes(&layer.k) + row_bytes(&layer.v);
            let sparse =
                !dense && cfg.attention_kind(l) == AttentionKind::Dsa && pos > cfg.index_topk;
            cache_bytes += if sparse {
                (layer.index.as_ref().map_or(0, |ix| ix.bytes()) + cfg.index_topk * kv_row) as f64
            } else {
                (pos * kv_row) as f64
            };
        }
    }
    StepTraffic {
        weight_bytes,
        cache_bytes,
        weight_flops,
    }
}
