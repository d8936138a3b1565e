//! `sparrow bench attention`: one attention layer, dense vs DSA, by context length.

use crate::common::{rayon_threads, IndexDtype, KvDtype};
use crate::report::{fixed, Report};
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct AttentionBenchArgs {
    /// Cached context lengths.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,4096,16384,65536,131072"
    )]
    pub context: Vec<usize>,
    /// Run dense prefill only up to this length (its cost grows quadratically).
    #[arg(long, default_value_t = 65536)]
    pub dense_prefill_max: usize,
    /// Run the GEMM-based dense prefill baseline only up to this length.
    #[arg(long, default_value_t = 16384)]
    pub gemm_prefill_max: usize,
    /// Skip the prefill measurements.
    #[arg(long)]
    pub no_prefill: bool,
    /// Query heads.
    #[arg(long, default_value_t = 16)]
    pub heads: usize,
    /// Dimension per query / KV head.
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    /// KV heads (1 = MQA, as DeepSeek; = --heads for MHA).
    #[arg(long, default_value_t = 1)]
    pub kv_heads: usize,
    /// Lightning indexer heads.
    #[arg(long, default_value_t = 4)]
    pub index_heads: usize,
    /// Lightning indexer dimension.
    #[arg(long, default_value_t = 32)]
    pub index_dim: usize,
    /// Positions each query attends to.
    #[arg(long, default_value_t = 512)]
    pub topk: usize,
    /// Precision of the index key cache.
    #[arg(long, value_enum, default_value = "f32")]
    pub index_dtype: IndexDtype,
    /// Precision of the key / value cache.
    #[arg(long, value_enum, default_value = "f32")]
    pub kv_dtype: KvDtype,
    /// DeepSeek-V4 instead: one layer of each V4 type of this config (sliding window,
    /// CSA, HCA) decoding against a synthesised cache of each --context length, next to
    /// a dense layer of the same heads.
    #[arg(long, value_name = "CONFIG")]
    pub v4: Option<PathBuf>,
    /// Also draw decode latency by context, dense vs sparse (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: AttentionBenchArgs) -> Result<()> {
    if let Some(config) = &a.v4 {
        return run_v4(config, &a);
    }
    use sparrow::bench::attention::{
        decode_row, growth_exponent, prefill_row, DecodeRow, LayerShape, PrefillRow,
    };
    let shape = LayerShape {
        heads: a.heads,
        head_dim: a.head_dim,
        kv_heads: a.kv_heads,
        index_heads: a.index_heads,
        index_dim: a.index_dim,
        topk: a.topk,
        index_precision: sparrow::config::IndexCacheDtype::from(a.index_dtype).key_precision(),
        kv_dtype: a.kv_dtype.into(),
        indexed: true,
    };
    for (flag, v) in [
        ("--heads", shape.heads),
        ("--head-dim", shape.head_dim),
        ("--index-heads", shape.index_heads),
        ("--index-dim", shape.index_dim),
        ("--topk", shape.topk),
    ] {
        if v == 0 {
            bail!("{flag} must be > 0");
        }
    }
    if shape.kv_heads == 0 || !shape.heads.is_multiple_of(shape.kv_heads) {
        bail!(
            "--kv-heads {} must divide --heads {}",
            shape.kv_heads,
            shape.heads
        );
    }
    if a.context.contains(&0) {
        bail!("--context lengths must be > 0");
    }
    let bw = sparrow::bench::read_bandwidth(512);
    let gemm = sparrow::bench::gemm_f32(1024)?.gflops;
    let mut decode = Report::new(a.json)
        .col("context", 8, |r: &DecodeRow| r.context.to_string())
        .col("layer dense", 11, |r| format!("{:.3}", r.layer_dense_ms))
        .col("layer sparse", 12, |r| format!("{:.3}", r.layer_sparse_ms))
        .col("layer x", 8, |r| format!("{:.1}x", r.layer_speedup))
        .col("core dense", 10, |r| format!("{:.3}", r.dense_ms))
        .col("dense(mm)", 10, |r| format!("{:.3}", r.dense_candle_ms))
        .col("core sparse", 11, |r| format!("{:.3}", r.sparse_ms))
        .col("select", 8, |r| format!("{:.3}", r.select_ms))
        .col("attend", 8, |r| format!("{:.3}", r.attend_ms))
        .col("core x", 7, |r| format!("{:.1}x", r.speedup))
        .col("dense GF", 9, |r| format!("{:.1}", r.dense_gflops))
        .col("dense GB", 8, |r| format!("{:.1}", r.dense_gbps))
        .col("scan GB/s", 9, |r| format!("{:.1}", r.index_scan_gbps))
        .col("scan/BW", 7, |r| {
            format!("{:.0}%", r.index_scan_bw_share * 100.0)
        });
    decode.record(serde_json::json!({"bench": "machine", "read_gbps": bw, "gemm_f32_gflops": gemm, "threads": rayon_threads(), "shape": shape}));
    decode.note(format!(
        "machine: read bandwidth {bw:.1} GB/s, f32 GEMM {gemm:.0} GFLOP/s, {} threads",
        rayon_threads()
    ));
    decode.note(format!(
        "layer: {} query heads x {} over {} KV head(s), indexer {} x {}, top-k {}, index cache {:?}",
        shape.heads,
        shape.head_dim,
        shape.kv_heads,
        shape.index_heads,
        shape.index_dim,
        shape.topk,
        shape.index_precision
    ));
    decode.note(format!(
        "cache per token: KV {} B (MHA would be {} B), index {} B",
        shape.kv_bytes_per_token(),
        shape.mha_kv_bytes_per_token(),
        shape.index_bytes_per_token()
    ));
    decode.note(
        "\ndecode (one new token), median ms: the layer's step (projections, indexer, cache write, attention) and its attention core alone",
    );
    let mut decode_rows = Vec::new();
    for &c in &a.context {
        let r = decode_row(shape, c, bw)?;
        decode.row(&r)?;
        decode_rows.push(r);
    }
    if let Some(path) = &a.plot {
        use sparrow::train::plot::{plot_series, Axes, Series};
        let line = |label: &str, f: &dyn Fn(&DecodeRow) -> f64| Series {
            label: label.to_string(),
            points: decode_rows
                .iter()
                .map(|r| (r.context as f64, f(r)))
                .collect(),
        };
        plot_series(
            &[
                line("layer, dense selector", &|r| r.layer_dense_ms),
                line("layer, DSA top-k", &|r| r.layer_sparse_ms),
                line("core dense (flash-decoding kernel)", &|r| r.dense_ms),
                line("core dense (candle matmul)", &|r| r.dense_candle_ms),
                line("core sparse (scan + top-k + attend)", &|r| r.sparse_ms),
            ],
            path,
            &Axes {
                title: "decode latency per token, one attention layer",
                x: "cached tokens",
                y: "ms",
                log_x: true,
                log_y: true,
            },
        )?;
        decode.note(format!("plot: {}", path.display()));
    }
    if a.no_prefill {
        return Ok(());
    }
    let mut prefill = Report::new(a.json)
        .col("context", 8, |r: &PrefillRow| r.context.to_string())
        .col("layer dense", 11, |r| fixed(r.dense_s, 3))
        .col("dense(gemm)", 11, |r| fixed(r.dense_gemm_s, 3))
        .col("layer sparse", 12, |r| format!("{:.3}", r.sparse_s))
        .col("ratio", 8, |r| format!("{}x", fixed(r.speedup, 1)))
        .col("dense GF", 9, |r| fixed(r.dense_gflops, 1));
    prefill.note(format!(
        "\nprefill (all tokens through the layer's step, {} per step), seconds; dense(gemm): candle's attention alone",
        sparrow::bench::attention::PREFILL_CHUNK
    ));
    let mut dense_pts = Vec::new();
    let mut sparse_pts = Vec::new();
    for &c in &a.context {
        let r = prefill_row(shape, c, c <= a.dense_prefill_max, c <= a.gemm_prefill_max)?;
        if let Some(d) = r.dense_s {
            dense_pts.push((c, d));
        }
        sparse_pts.push((c, r.sparse_s));
        prefill.row(&r)?;
    }
    let (ed, es) = (growth_exponent(&dense_pts), growth_exponent(&sparse_pts));
    prefill.record(serde_json::json!({"bench": "attention_prefill_growth", "dense_exponent": ed, "sparse_exponent": es}));
    prefill.note(format!(
        "growth exponent of prefill time (log-log fit): dense {}, sparse {}",
        fixed(ed, 2),
        fixed(es, 2)
    ));
    Ok(())
}

/// `--v4 CONFIG`: the V4 layer types against a dense layer of the same heads.
fn run_v4(config: &std::path::Path, a: &AttentionBenchArgs) -> Result<()> {
    use sparrow::bench::v4_layers::{decode_rows, dense_shape, V4DecodeRow};
    use sparrow::config::ModelConfig;
    let cfg = ModelConfig::from_file(config)?;
    if a.context.contains(&0) {
        bail!("--context lengths must be > 0");
    }
    let bw = sparrow::bench::read_bandwidth(512);
    let mut report = Report::new(a.json)
        .col("context", 8, |r: &V4DecodeRow| r.context.to_string())
        .col("layer", 8, |r| r.layer.to_string())
        .col("V4 ms", 8, |r| format!("{:.3}", r.v4_ms))
        .col("dense ms", 9, |r| format!("{:.3}", r.dense_ms))
        .col("dense/V4", 8, |r| format!("{:.1}x", r.speedup))
        .col("read MB", 8, |r| {
            format!("{:.2}", r.v4_read_bytes as f64 / 1e6)
        })
        .col("GB/s", 6, |r| format!("{:.1}", r.v4_gbps))
        .col("of BW", 6, |r| format!("{:.0}%", r.v4_bw_share * 100.0))
        .col("V4 B/tok", 9, |r| {
            format!("{:.1}", r.v4_cache_bytes_per_token)
        })
        .col("dense B/tok", 11, |r| {
            r.dense_cache_bytes_per_token.to_string()
        });
    let shape = dense_shape(&cfg);
    report.record(
        serde_json::json!({"bench": "machine", "read_gbps": bw, "threads": rayon_threads()}),
    );
    report.note(format!(
        "machine: read bandwidth {bw:.1} GB/s, {} threads",
        rayon_threads()
    ));
    report.note(format!(
        "{}: {} query heads x {} over one K=V head, window {}, compress rates {} (CSA) / {} (HCA), top-k {}; dense: {} query heads x {} over one K/V head",
        config.display(),
        cfg.num_attention_heads,
        cfg.head_dim(),
        cfg.sliding_window.unwrap_or(0),
        cfg.compress_rates.as_ref().map_or(0, |r| r.compressed_sparse_attention),
        cfg.compress_rates.as_ref().map_or(0, |r| r.heavily_compressed_attention),
        cfg.index_topk,
        shape.heads,
        shape.head_dim,
    ));
    report.note(
        "\ndecode (one new token against a synthesised cache), median ms per layer step; read MB: cache bytes the V4 step reads",
    );
    let mut rows = Vec::new();
    for &c in &a.context {
        for r in decode_rows(&cfg, c, bw)? {
            report.row(&r)?;
            rows.push(r);
        }
    }
    if let Some(path) = &a.plot {
        use sparrow::train::plot::{plot_series, Axes, Series};
        let mut series: Vec<Series> = Vec::new();
        for name in ["sliding", "CSA", "HCA"] {
            let points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.layer == name)
                .map(|r| (r.context as f64, r.v4_ms))
                .collect();
            if !points.is_empty() {
                series.push(Series {
                    label: format!("V4 {name} layer"),
                    points,
                });
            }
        }
        let mut dense: Vec<(f64, f64)> = rows
            .iter()
            .map(|r| (r.context as f64, r.dense_ms))
            .collect();
        dense.dedup();
        series.push(Series {
            label: "dense MQA layer, same heads".to_string(),
            points: dense,
        });
        plot_series(
            &series,
            path,
            &Axes {
                title: "decode latency per token, one attention layer: DeepSeek-V4 types vs dense",
                x: "cached tokens",
                y: "ms",
                log_x: true,
                log_y: true,
            },
        )?;
        report.note(format!("plot: {}", path.display()));
    }
    Ok(())
}
